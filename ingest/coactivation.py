"""Co-activation statistics during ingest: the pairs file a run hands its workers, their shards, the final merge.

When the statistics database holds global weights of the run's dictionary (`atlas global weights`, norm `fold`),
the run writes their feature pairs once to `<run dir>/coactivation_pairs.parquet` (kept on resume, so every shard
of a run uses the same pairs even if the weights are recomputed meanwhile). Each batch's shard then holds a
`coact-<key>/` directory with the `CoactivationStats` sums of its prompts (BOS not counted). At the end of the run
every shard of the run directory (computed now or resumed) is merged by adding sums and counts, and TWERA/ERA are
written onto the stored rows (`atlas.storage.global_weights.write_activity`), replacing what was there: they cover
the prompts this run directory computed (prompts already stored by another run are not recomputed, so not counted).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch

from atlas.analysis.coactivation import CoactivationStats, activity_table, pairs_table_ids
from atlas.storage.global_weights import GlobalWeightsStoreError, stored_pairs, write_activity

PAIRS_FILE = "coactivation_pairs.parquet"
COACTIVATION_PREFIX = "coact-"
NORM = "fold"


def prepare_pairs(stats_db: Path, transcoder_id: str, run_dir: Path) -> Path | None:
    """The run's pairs file (made from the stored global weights when missing); None when none are stored."""
    path = run_dir / PAIRS_FILE
    if path.is_file():
        return path
    if not stats_db.exists():
        return None
    try:
        pairs = stored_pairs(stats_db, transcoder_id, NORM)
    except GlobalWeightsStoreError:
        return None
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pairs, tmp)
    tmp.rename(path)
    return path


def read_pairs(path: str | Path, n_layers: int, n_features: int) -> CoactivationStats:
    """An empty accumulator over the pairs of a pairs file."""
    ids, _ = pairs_table_ids(pq.read_table(path), n_features)
    return CoactivationStats(ids, n_layers * n_features)


def write_shard(stats: CoactivationStats, directory: Path) -> None:
    directory.mkdir()
    for name, table in stats.to_tables().items():
        pq.write_table(table, directory / f"{name}.parquet")


def merge_run(shard_root: Path, pairs_file: Path, n_layers: int, n_features: int) -> CoactivationStats | None:
    """The merged statistics of every finished shard under `shard_root` (None when no shard has any)."""
    merged = None
    for directory in sorted(shard_root.glob(f"*/{COACTIVATION_PREFIX}*")):
        shard = CoactivationStats.from_tables({name: pq.read_table(directory / f"{name}.parquet")
                                               for name in ("features", "pairs")})  # fmt: skip
        merged = shard if merged is None else merged.merge(shard)
    if merged is not None:
        expected = read_pairs(pairs_file, n_layers, n_features)
        if not torch.equal(merged.pairs, expected.pairs):
            raise ValueError(f"co-activation shards under {shard_root} do not use the pairs of {pairs_file}")
    return merged


def store_run(
    stats_db: Path, transcoder_id: str, shard_root: Path, pairs_file: Path, n_layers: int, n_features: int, run: str
) -> int:
    """Merge the run's shards and write TWERA/ERA onto the stored rows; returns the tokens counted (0: nothing)."""
    merged = merge_run(shard_root, pairs_file, n_layers, n_features)
    if merged is None or merged.n_tokens == 0:
        return 0
    _, virtual = pairs_table_ids(pq.read_table(pairs_file), n_features)
    table = activity_table(merged, virtual, n_features)
    write_activity(stats_db, table, transcoder_id=transcoder_id, norm=NORM, corpus=f"ingest run {run}",
                   n_tokens=merged.n_tokens)  # fmt: skip
    return merged.n_tokens
