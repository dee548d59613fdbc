"""Feature activation statistics: per-shard partial aggregates in Parquet, merged into DuckDB by one writer.

Workers call `FeatureStatsShard.add(prompt_id, token_strings, activations)` for each prompt and `write(dir)` once:
three Parquet files of *partial aggregates* (so shards stay small whatever the corpus size):
- `counts`: (transcoder_id, layer, feature, n_tokens, n_active, sum, sum_sq, max) per shard;
- `histogram`: (transcoder_id, layer, feature, bin, count) over fixed log-spaced bins (`HISTOGRAM_EDGES`);
- `examples`: each feature's top-k activating tokens in the shard, with a context window of tokens and activations.

`FeatureStatsStore.ingest(shard_dirs)` is the single writer. It never writes the live database file: it copies it,
merges the new shards into the copy (skipping shards already ingested, so a rerun never double counts), rebuilds
`feature_stats` / `feature_histogram` / `top_examples`, closes it, and atomically renames it over the live file.
Readers (`FeatureStatsStore.reader()`, read-only) therefore never block the writer and never see a half-built
table; they see the new snapshot when they reconnect. Quantiles come from the histogram, so they are known to one
bin: 8 bins per decade, i.e. to within a factor of 10^(1/8) ≈ 1.33.
Logit effects (`logit_effect_table`) are a property of the decoder, not of data: top positive and negative
demeaned logits of each feature's total decoder write. Every rebuild also recomputes the automatic labels
(`feature_labels`, the rule of `atlas.storage.auto_labels`), so they always match the statistics; `auto_labels`
reads them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from atlas.storage.auto_labels import LABELS_TABLE, rebuild_auto_labels

HISTOGRAM_BINS_PER_DECADE = 8
HISTOGRAM_MIN_EXP, HISTOGRAM_MAX_EXP = -4, 4
HISTOGRAM_EDGES = torch.logspace(
    HISTOGRAM_MIN_EXP, HISTOGRAM_MAX_EXP, (HISTOGRAM_MAX_EXP - HISTOGRAM_MIN_EXP) * HISTOGRAM_BINS_PER_DECADE + 1
)

COUNTS_SCHEMA = pa.schema(
    [
        ("transcoder_id", pa.string()), ("layer", pa.int32()), ("feature", pa.int32()), ("n_tokens", pa.int64()),
        ("n_active", pa.int64()), ("sum", pa.float64()), ("sum_sq", pa.float64()), ("max", pa.float32()),
    ]
)  # fmt: skip
HISTOGRAM_SCHEMA = pa.schema(
    [("transcoder_id", pa.string()), ("layer", pa.int32()), ("feature", pa.int32()), ("bin", pa.int32()),
     ("count", pa.int64())]
)  # fmt: skip
EXAMPLES_SCHEMA = pa.schema(
    [
        ("transcoder_id", pa.string()), ("layer", pa.int32()), ("feature", pa.int32()), ("activation", pa.float32()),
        ("prompt_id", pa.string()), ("position", pa.int32()), ("context_tokens", pa.list_(pa.string())),
        ("context_activations", pa.list_(pa.float32())), ("context_start", pa.int32()),
    ]
)  # fmt: skip
SHARD_FILES = {"counts": COUNTS_SCHEMA, "histogram": HISTOGRAM_SCHEMA, "examples": EXAMPLES_SCHEMA}


class StatsError(ValueError):
    """A shard is malformed or does not match the store; nothing was changed."""


@dataclass
class FeatureStatsShard:
    """Accumulates statistics of one worker's prompts for one transcoder set."""

    transcoder_id: str
    n_layers: int
    n_features: int
    top_k: int = 16
    context: int = 8  # tokens shown before the example (and 1 after)
    n_tokens: int = 0
    n_active: torch.Tensor = field(init=False)
    sums: torch.Tensor = field(init=False)
    sums_sq: torch.Tensor = field(init=False)
    maxima: torch.Tensor = field(init=False)
    histogram: torch.Tensor = field(init=False)
    _examples: dict[tuple[int, int], list[tuple[float, str, int, list[str], list[float], int]]] = field(init=False)
    _floor: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.n_layers, self.n_features)
        self.n_active = torch.zeros(shape, dtype=torch.long)
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.sums_sq = torch.zeros(shape, dtype=torch.float64)
        self.maxima = torch.zeros(shape)
        self.histogram = torch.zeros(*shape, len(HISTOGRAM_EDGES) + 1, dtype=torch.long)
        self._examples = {}
        self._floor = torch.zeros(shape)  # k-th best activation so far (0 until k examples exist)

    def add(self, prompt_id: str, tokens: list[str], activations: torch.Tensor) -> None:
        """One prompt's feature activations `(n_layers, n_pos, n_features)` and its token strings."""
        L, n_pos, F = activations.shape
        if (self.n_layers, self.n_features) != (L, F) or len(tokens) != n_pos:
            raise StatsError(
                f"activations {tuple(activations.shape)} / {len(tokens)} tokens do not fit a shard of"
                f" {self.n_layers} layers × {self.n_features} features"
            )
        acts = activations.detach().float().cpu()
        active = acts > 0
        self.n_tokens += n_pos
        self.n_active += active.sum(1)
        self.sums += acts.sum(1).double()
        self.sums_sq += acts.pow(2).sum(1).double()
        self.maxima = torch.maximum(self.maxima, acts.max(1).values)
        values = acts[active]
        layer_index, _, feature_index = active.nonzero(as_tuple=True)
        bins = torch.bucketize(values, HISTOGRAM_EDGES)
        flat = (layer_index * F + feature_index) * self.histogram.shape[-1] + bins
        self.histogram.view(-1).index_add_(0, flat, torch.ones_like(flat))
        best, where = acts.max(1)  # one candidate per feature and prompt: its strongest token
        for layer, feature in (best > self._floor).nonzero().tolist():
            position = int(where[layer, feature])
            start = max(0, position - self.context)
            stop = min(n_pos, position + 2)
            entry = (float(best[layer, feature]), prompt_id, position, tokens[start:stop],
                     acts[layer, start:stop, feature].tolist(), start)  # fmt: skip
            kept = self._examples.setdefault((layer, feature), [])
            kept.append(entry)
            kept.sort(key=lambda e: -e[0])
            del kept[self.top_k :]
            if len(kept) == self.top_k:
                self._floor[layer, feature] = kept[-1][0]

    def tables(self) -> dict[str, pa.Table]:
        L, F = self.n_layers, self.n_features
        layers = torch.arange(L).repeat_interleave(F).tolist()
        features = torch.arange(F).repeat(L).tolist()
        counts = pa.Table.from_pydict(
            {
                "transcoder_id": [self.transcoder_id] * (L * F), "layer": layers, "feature": features,
                "n_tokens": [self.n_tokens] * (L * F), "n_active": self.n_active.flatten().tolist(),
                "sum": self.sums.flatten().tolist(), "sum_sq": self.sums_sq.flatten().tolist(),
                "max": self.maxima.flatten().tolist(),
            },
            schema=COUNTS_SCHEMA,
        )  # fmt: skip
        nonzero = self.histogram.nonzero().tolist()
        histogram = pa.Table.from_pydict(
            {
                "transcoder_id": [self.transcoder_id] * len(nonzero), "layer": [r[0] for r in nonzero],
                "feature": [r[1] for r in nonzero], "bin": [r[2] for r in nonzero],
                "count": [int(self.histogram[r[0], r[1], r[2]]) for r in nonzero],
            },
            schema=HISTOGRAM_SCHEMA,
        )  # fmt: skip
        rows: dict[str, list[Any]] = {name: [] for name in EXAMPLES_SCHEMA.names}
        for (layer, feature), entries in sorted(self._examples.items()):
            for value, pid, position, context_tokens, context_acts, start in entries:
                for name, item in zip(
                    EXAMPLES_SCHEMA.names,
                    (self.transcoder_id, layer, feature, value, pid, position, context_tokens, context_acts, start),
                    strict=True,
                ):
                    rows[name].append(item)
        return {
            "counts": counts,
            "histogram": histogram,
            "examples": pa.Table.from_pydict(rows, schema=EXAMPLES_SCHEMA),
        }

    def write(self, directory: str | Path) -> Path:
        """Write the shard as `<directory>/shard-<uuid>/` (atomically); returns the shard directory."""
        root = Path(directory)
        final = root / f"shard-{uuid.uuid4().hex[:12]}"
        tmp = root / f".{final.name}.tmp"
        tmp.mkdir(parents=True)
        for name, table in self.tables().items():
            pq.write_table(table, tmp / f"{name}.parquet")
        tmp.rename(final)
        return final


def logit_effect_table(
    transcoder: Any, W_U: torch.Tensor, tokenizer: Any, transcoder_id: str, top: int = 10
) -> pa.Table:
    """Top positive and negative demeaned logits of each feature's total decoder write."""
    centred = (W_U - W_U.mean(1, keepdim=True)).float()
    rows: dict[str, list[Any]] = {k: [] for k in ("transcoder_id", "layer", "feature", "sign", "rank", "token_id",
                                                   "token", "effect")}  # fmt: skip
    spec = transcoder.spec
    with torch.no_grad():
        for layer in range(spec.n_layers):
            writes = transcoder.decoder_vectors(layer, torch.arange(spec.n_features)).sum(1)  # (F, d)
            effects = writes.float() @ centred  # (F, vocab)
            for sign, (values, ids) in (
                ("positive", effects.topk(top, dim=1)),
                ("negative", (-effects).topk(top, dim=1)),
            ):
                for feature in range(spec.n_features):
                    for rank, (value, token_id) in enumerate(
                        zip(values[feature].tolist(), ids[feature].tolist(), strict=True)
                    ):
                        rows["transcoder_id"].append(transcoder_id)
                        rows["layer"].append(layer)
                        rows["feature"].append(feature)
                        rows["sign"].append(sign)
                        rows["rank"].append(rank)
                        rows["token_id"].append(token_id)
                        rows["token"].append(tokenizer.decode([token_id]))
                        rows["effect"].append(value if sign == "positive" else -value)
    return pa.Table.from_pydict(rows)


_BUILD_SQL = """
CREATE OR REPLACE TABLE feature_stats AS
SELECT c.transcoder_id, c.layer, c.feature, sum(c.n_tokens) AS n_tokens, sum(c.n_active) AS n_active,
       sum(c.n_active) / sum(c.n_tokens) AS frequency,
       CASE WHEN sum(c.n_active) > 0 THEN sum(c.sum) / sum(c.n_active) END AS mean_active,
       max(c.max) AS max_activation
FROM shard_counts c GROUP BY ALL;
CREATE OR REPLACE TABLE feature_histogram AS
SELECT transcoder_id, layer, feature, bin, sum(count) AS count FROM shard_histogram GROUP BY ALL;
CREATE OR REPLACE TABLE feature_quantiles AS
WITH cumulative AS (
  SELECT transcoder_id, layer, feature, bin,
         sum(count) OVER (PARTITION BY transcoder_id, layer, feature ORDER BY bin) / sum(count) OVER
           (PARTITION BY transcoder_id, layer, feature) AS cdf
  FROM feature_histogram)
SELECT transcoder_id, layer, feature,
       min(CASE WHEN cdf >= 0.5 THEN bin END) AS bin_q50, min(CASE WHEN cdf >= 0.9 THEN bin END) AS bin_q90,
       min(CASE WHEN cdf >= 0.99 THEN bin END) AS bin_q99
FROM cumulative GROUP BY ALL;
CREATE OR REPLACE TABLE top_examples AS
SELECT * EXCLUDE (rn) FROM (
  SELECT *, row_number() OVER (PARTITION BY transcoder_id, layer, feature ORDER BY activation DESC, prompt_id, position)
         AS rn FROM shard_examples) WHERE rn <= {top_k};
"""


class FeatureStatsStore:
    """The DuckDB statistics database at `path` (single writer, snapshot-swapped; readers open read-only)."""

    def __init__(self, path: str | Path, *, top_k: int = 16) -> None:
        self.path = Path(path)
        self.top_k = top_k

    def reader(self) -> duckdb.DuckDBPyConnection:
        if not self.path.exists():
            raise StatsError(f"no statistics database at {self.path} yet; ingest shards first")
        return duckdb.connect(str(self.path), read_only=True)

    def ingest(self, shard_dirs: list[Path], *, logit_effects: pa.Table | None = None) -> int:
        """Merge shards (and optionally logit effects) into a new snapshot; returns the number of new shards."""
        tables = {str(d): self._read_shard(Path(d)) for d in shard_dirs}  # validate everything before writing
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
        added = 0
        try:
            con = duckdb.connect(str(tmp))
            try:
                con.execute("CREATE TABLE IF NOT EXISTS ingested_shards (name VARCHAR PRIMARY KEY)")
                done = {row[0] for row in con.execute("SELECT name FROM ingested_shards").fetchall()}
                for directory, shard in tables.items():
                    name = Path(directory).name
                    if name in done or _is_empty(shard):  # a shard of failed prompts only: nothing to register
                        continue
                    for kind, table in shard.items():
                        con.register("incoming", table)
                        con.execute(f"CREATE TABLE IF NOT EXISTS shard_{kind} AS SELECT * FROM incoming LIMIT 0")
                        con.execute(f"INSERT INTO shard_{kind} SELECT * FROM incoming")
                        con.unregister("incoming")
                    con.execute("INSERT INTO ingested_shards VALUES (?)", [name])
                    done.add(name)
                    added += 1
                if logit_effects is not None:  # replaces the effects of these transcoders only
                    con.register("incoming", logit_effects)
                    con.execute("CREATE TABLE IF NOT EXISTS logit_effects AS SELECT * FROM incoming LIMIT 0")
                    con.execute(
                        "DELETE FROM logit_effects WHERE transcoder_id IN (SELECT DISTINCT transcoder_id FROM incoming)"
                    )
                    con.execute("INSERT INTO logit_effects SELECT * FROM incoming")
                    con.unregister("incoming")
                if "shard_counts" in {r[0] for r in con.execute("SHOW TABLES").fetchall()}:
                    con.execute(_BUILD_SQL.replace("{top_k}", str(self.top_k)))
                rebuild_auto_labels(con)
            finally:
                con.close()
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return added

    def auto_labels(self, transcoder_ids: Collection[str] | None = None) -> dict[tuple[str, int, int], str]:
        """{(transcoder id, layer, feature): automatic label} of the snapshot (of these transcoders only if given)."""
        if not self.path.exists():
            return {}
        with self.reader() as con:
            if LABELS_TABLE not in {row[0] for row in con.execute("SHOW TABLES").fetchall()}:
                return {}
            rows = con.execute(
                f"SELECT transcoder_id, layer, feature, auto_label FROM {LABELS_TABLE} "
                "WHERE ? IS NULL OR list_contains(?, transcoder_id) ORDER BY ALL",
                [None if transcoder_ids is None else 1, sorted(transcoder_ids or [])],
            ).fetchall()
        return {(tid, int(layer), int(feature)): label for tid, layer, feature, label in rows}

    def has_logit_effects(self, transcoder_id: str) -> bool:
        """Whether the database holds logit effects of `transcoder_id` (False when it does not exist yet)."""
        if not self.path.exists():
            return False
        with self.reader() as con:
            tables = {row[0] for row in con.execute("SHOW TABLES").fetchall()}
            if "logit_effects" not in tables:
                return False
            found = con.execute("SELECT 1 FROM logit_effects WHERE transcoder_id = ? LIMIT 1", [transcoder_id])
            return found.fetchone() is not None

    def merge_transcoder_ids(
        self, groups: Mapping[str, Mapping[str, Collection[str]]], prompt_ids: Mapping[str, str]
    ) -> dict[str, str]:
        """Re-key the statistics of transcoder ids that are one dictionary, counting every prompt once.

        `groups[new_id][source_id]` is the set of (new) prompt ids that `source_id` (a legacy id of the dictionary,
        or `new_id` itself) has stored; `prompt_ids` maps old prompt ids to new ones (for `top_examples`). The
        statistics tables hold per-shard partial sums, not per-prompt rows, so overlapping sources cannot be
        subtracted from one another: per group the source with the most prompts is kept, each other source is
        added when its prompts are disjoint from those kept (exact), dropped when they are a subset (exact: they
        were counted already), and dropped with the action `inexact` otherwise (re-ingest to recount). Logit
        effects, a property of the weights, are taken from the kept source. Returns {source id: action}; sources
        without rows here are left out. Idempotent (a re-keyed source has no rows left under its old id) and atomic
        (snapshot swap, like `ingest`).
        """
        if not self.path.exists():
            return {}
        actions: dict[str, str] = {}
        with duckdb.connect(str(self.path), read_only=True) as con:
            tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
            if "shard_counts" not in tables:
                return {}
            present = {r[0] for r in con.execute("SELECT DISTINCT transcoder_id FROM shard_counts").fetchall()}
        renames: list[tuple[str, str]] = []  # (source, new) whose rows stay, under `new`
        drops: list[str] = []
        effects_from: dict[str, str] = {}  # new id -> the source whose logit effects are kept
        with duckdb.connect(str(self.path), read_only=True) as con:
            with_effects = (
                {r[0] for r in con.execute("SELECT DISTINCT transcoder_id FROM logit_effects").fetchall()}
                if "logit_effects" in tables
                else set()
            )
        for new_id, sources in sorted(groups.items()):
            here = {sid: set(prompts) for sid, prompts in sources.items() if sid in present}
            if not here or set(here) == {new_id}:
                continue
            order = sorted(here, key=lambda sid: (-len(here[sid]), sid != new_id, sid))
            kept: set[str] = set(here[order[0]])
            effects_from[new_id] = next((sid for sid in order if sid in with_effects), order[0])
            renames.append((order[0], new_id))
            actions[order[0]] = "kept"
            for sid in order[1:]:
                if not here[sid] & kept:
                    renames.append((sid, new_id))
                    kept |= here[sid]
                    actions[sid] = "added"
                elif here[sid] <= kept:
                    drops.append(sid)
                    actions[sid] = "dropped"
                else:
                    drops.append(sid)
                    actions[sid] = "inexact"
        if not renames and not drops:
            return actions
        with self.snapshot() as con:
            con.execute("CREATE TABLE IF NOT EXISTS identity_merges (source VARCHAR, target VARCHAR, action VARCHAR)")
            tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
            data = [t for t in ("shard_counts", "shard_histogram", "shard_examples") if t in tables]
            for sid in drops:
                for table in data:
                    con.execute(f"DELETE FROM {table} WHERE transcoder_id = ?", [sid])
            if "logit_effects" in tables:
                for new_id, source in effects_from.items():
                    others = [sid for sid in groups[new_id] if sid != source]
                    con.execute("DELETE FROM logit_effects WHERE list_contains(?, transcoder_id)", [others])
                    con.execute("UPDATE logit_effects SET transcoder_id = ? WHERE transcoder_id = ?", [new_id, source])
            if prompt_ids and "shard_examples" in tables:
                mapping = pa.table({"old": list(prompt_ids), "new": list(prompt_ids.values())})
                con.register("prompt_map", mapping)
                con.execute(
                    "UPDATE shard_examples SET prompt_id = m.new FROM prompt_map m "
                    "WHERE shard_examples.prompt_id = m.old"
                )
                con.unregister("prompt_map")
            for source, new_id in renames:
                for table in data:
                    con.execute(f"UPDATE {table} SET transcoder_id = ? WHERE transcoder_id = ?", [new_id, source])
            for sid, action in actions.items():
                target = next(new for new, sources in groups.items() if sid in sources)
                con.execute("INSERT INTO identity_merges VALUES (?, ?, ?)", [sid, target, action])
            con.execute(_BUILD_SQL.replace("{top_k}", str(self.top_k)))
            rebuild_auto_labels(con)
        return actions

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A writable copy of the database, renamed over the live file when the block succeeds."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
        try:
            con = duckdb.connect(str(tmp))
            try:
                yield con
            finally:
                con.close()
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _read_shard(directory: Path) -> dict[str, pa.Table]:
        if not directory.is_dir():
            raise StatsError(f"shard {directory} does not exist")
        tables = {}
        for kind, schema in SHARD_FILES.items():
            path = directory / f"{kind}.parquet"
            if not path.exists():
                raise StatsError(f"shard {directory}: missing {path.name}")
            try:
                table = pq.read_table(path)
            except Exception as err:  # pyarrow raises several types
                raise StatsError(f"shard {directory}: {path.name} is not readable Parquet ({err})") from err
            if not table.schema.equals(schema, check_metadata=False):
                missing = sorted(set(schema.names) - set(table.schema.names))
                raise StatsError(f"shard {directory}: {path.name} does not match the schema (missing {missing})")
            tables[kind] = table
        return tables


def _is_empty(shard: dict[str, pa.Table]) -> bool:
    """A shard that saw no token (every prompt of its batch failed)."""
    counts = shard["counts"]
    return counts.num_rows == 0 or not any(counts.column("n_tokens").to_pylist())


def bin_bounds(bin_index: int) -> tuple[float, float]:
    """Activation range `[low, high)` of a histogram bin (bin 0 is below the first edge)."""
    edges = HISTOGRAM_EDGES.tolist()
    low = 0.0 if bin_index == 0 else edges[bin_index - 1]
    high = edges[bin_index] if bin_index < len(edges) else float("inf")
    return low, high
