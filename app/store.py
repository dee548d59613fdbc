"""Read access for the pages: the query library plus the few app-only reads, and conversions for drawing.

`AtlasStore` wraps a Neo4j driver (thread-safe; one short READ session per call) and the path of the statistics
database (opened read-only per call, so each call sees the latest snapshot the single writer swapped in and nothing
is shared between threads). The named cross-prompt queries (feature search, paths to logits, neighbourhoods,
prompts where a feature matters, prompt graphs, overview) are `atlas.storage.queries.AtlasQueries`, reached as
`store.q`; this module adds only what the pages need beyond them (per-run and per-prompt score tables, a prompt's
properties, a feature's DuckDB statistics) and converts query rows into `app.layout` nodes and edges.
It never writes: every Neo4j call runs in a READ session. The graph model is documented in
`atlas.storage.graph_schema`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, LiteralString, cast

import duckdb
from neo4j import READ_ACCESS, Driver, unit_of_work

from app.layout import GraphEdge, GraphNode
from atlas.storage.feature_stats import FeatureStatsStore
from atlas.storage.queries import AtlasQueries, LogitPath, Subgraph
from atlas.transcoders.card import DictionaryCard

# The dictionary card's figures as the ingest stores them on a Transcoder node (`atlas.transcoders.card`).
_CARD_COLUMNS: LiteralString = """
    properties(t)['fvu_mean'] AS fvu_mean, properties(t)['l0_mean'] AS l0_mean,
    properties(t)['dead_fraction'] AS dead_fraction, properties(t)['ce_clean'] AS ce_clean,
    properties(t)['ce_spliced'] AS ce_spliced, properties(t)['ce_delta'] AS ce_delta,
    properties(t)['replacement_score'] AS replacement_score, properties(t)['completeness_score'] AS completeness_score,
    properties(t)['feature_nodes_kept'] AS feature_nodes_kept,
    properties(t)['eval_prompts'] AS eval_prompts, properties(t)['eval_tokens'] AS eval_tokens,
    properties(t)['training_tokens'] AS training_tokens, properties(t)['recipe'] AS recipe
"""
_FEATURE_KEY = re.compile(r"^(?P<transcoder>.+)/(?P<layer>\d+)/(?P<feature>\d+)$")


class StoreError(RuntimeError):
    """A store is missing or unreadable; the message says which and what to do."""


def parse_feature_key(key: str) -> tuple[str, int, int]:
    """`(transcoder, layer, feature)` of a key `"{transcoder}/{layer}/{feature}"`; ValueError if malformed."""
    match = _FEATURE_KEY.match(key.strip())
    if match is None:
        raise ValueError(f"{key!r} is not a feature key (expected TRANSCODER/LAYER/INDEX)")
    return match["transcoder"], int(match["layer"]), int(match["feature"])


@dataclass(frozen=True)
class PromptInfo:
    id: str
    text: str
    model: str
    transcoder: str
    run: str | None
    task: str | None
    n_nodes: int
    n_edges: int
    replacement_score: float | None
    completeness_score: float | None

    @property
    def title(self) -> str:
        short = self.text if len(self.text) <= 60 else self.text[:57] + "…"
        return f"{short!r} [{self.id[:10]}]"


class AtlasStore:
    """Read-only queries over Neo4j and the DuckDB statistics file."""

    def __init__(self, driver: Driver, database: str, stats_db: Path, *, timeout_s: float = 30.0) -> None:
        self.driver = driver
        self.database = database
        self.stats_db = stats_db
        self.timeout_s = timeout_s
        self.q = AtlasQueries(driver, database, stats=FeatureStatsStore(stats_db), timeout_s=timeout_s)

    # -- plumbing ------------------------------------------------------------------------------------------------

    def read(self, cypher: LiteralString, **params: Any) -> list[dict[str, Any]]:
        """Rows of a read query (READ session, server-side timeout)."""

        @unit_of_work(timeout=self.timeout_s)
        def work(tx: Any) -> list[dict[str, Any]]:
            return [{k: _native(v) for k, v in record.items()} for record in tx.run(cypher, params)]

        with self.driver.session(database=self.database, default_access_mode=READ_ACCESS) as session:
            return cast(list[dict[str, Any]], session.execute_read(work))

    @contextmanager
    def stats(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only DuckDB connection to the statistics snapshot (closed after use)."""
        if not self.stats_db.exists():
            raise StoreError(f"no feature statistics at {self.stats_db}: ingest a corpus first (atlas ingest)")
        con = duckdb.connect(str(self.stats_db), read_only=True)
        try:
            yield con
        finally:
            con.close()

    def stats_tables(self) -> set[str]:
        if not self.stats_db.exists():
            return set()
        with self.stats() as con:
            return {row[0] for row in con.execute("SHOW TABLES").fetchall()}

    def stats_rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with self.stats() as con:
            cursor = con.execute(sql, params or [])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # -- overview ------------------------------------------------------------------------------------------------

    def dictionaries(self) -> list[dict[str, Any]]:
        """One row per transcoder dictionary (keyed by its weights): its names and where it came from, its models,
        how many prompts it has; dictionaries still keyed by path (schema <= 4, `atlas db migrate`) say so."""
        return self.read(
            """
            MATCH (t:Transcoder)
            OPTIONAL MATCH (t)-[:FOR]->(m:Model)
            WITH t, collect(DISTINCT m.name) AS models
            CALL (t) { MATCH (p:Prompt) WHERE p.transcoder = t.id RETURN count(p) AS prompts }
            RETURN t.id AS dictionary, coalesce(t.kind, '') AS kind, models,
                   coalesce(properties(t)['names'], []) AS names, coalesce(properties(t)['sources'], []) AS sources,
                   coalesce(properties(t)['identity'], 'legacy') AS identity, prompts,
                   """
            + _CARD_COLUMNS
            + """
            ORDER BY dictionary
            """
        )

    def dictionary_card(self, transcoder_id: str) -> DictionaryCard | None:
        """The card the ingest stored on a dictionary's Transcoder node (None: no such dictionary)."""
        rows = self.read("MATCH (t:Transcoder {id: $id}) RETURN " + _CARD_COLUMNS, id=transcoder_id)
        return DictionaryCard.from_dict(rows[0]) if rows else None

    def runtime_labels(self, model: str, transcoder: str) -> tuple[list[str], list[str]]:
        """The names a model was loaded by and the directories a dictionary was ingested from (for re-running)."""
        rows = self.read(
            """
            OPTIONAL MATCH (m:Model {name: $model})
            OPTIONAL MATCH (t:Transcoder {id: $transcoder})
            RETURN coalesce(properties(m)['names'], []) AS names, coalesce(properties(t)['sources'], []) AS sources
            """,
            model=model,
            transcoder=transcoder,
        )
        return (list(rows[0]["names"]), list(rows[0]["sources"])) if rows else ([], [])

    def runs(self) -> list[dict[str, Any]]:
        return self.read(
            """
            MATCH (p:Prompt)
            RETURN p.run AS run, p.model AS model, p.transcoder AS transcoder, count(p) AS prompts,
                   sum(p.n_edges) AS edges, avg(p.replacement_score) AS mean_replacement,
                   avg(p.completeness_score) AS mean_completeness, max(p.ingested_at) AS last_ingested
            ORDER BY run
            """
        )

    def task_counts(self) -> list[dict[str, Any]]:
        return self.read(
            "MATCH (p:Prompt) RETURN coalesce(p.task, '(untagged)') AS task, count(p) AS prompts ORDER BY prompts DESC"
        )

    def graph_scores(self) -> list[dict[str, Any]]:
        return self.read(
            """
            MATCH (p:Prompt)
            RETURN p.id AS prompt, coalesce(p.task, '(untagged)') AS task, p.replacement_score AS replacement,
                   p.completeness_score AS completeness, p.n_nodes AS nodes, p.n_edges AS edges
            """
        )

    # -- prompts -------------------------------------------------------------------------------------------------

    def prompt(self, prompt_id: str) -> PromptInfo | None:
        rows = self.read("MATCH (p:Prompt {id: $pid}) RETURN p AS p", pid=prompt_id)
        return _prompt_info(dict(rows[0]["p"])) if rows else None

    # -- features ------------------------------------------------------------------------------------------------

    def feature_stats(self, key: str) -> dict[str, Any]:
        """DuckDB statistics of one feature: summary, histogram, top examples, logit effects (empty if none)."""
        transcoder, layer, feature = parse_feature_key(key)
        tables = self.stats_tables()
        out: dict[str, Any] = {"summary": None, "histogram": [], "examples": [], "logit_effects": []}
        args = [transcoder, layer, feature]
        where = "WHERE transcoder_id = ? AND layer = ? AND feature = ?"
        if "feature_stats" in tables:
            rows = self.stats_rows(f"SELECT * FROM feature_stats {where}", args)
            out["summary"] = rows[0] if rows else None
        if "feature_histogram" in tables:
            out["histogram"] = self.stats_rows(f"SELECT bin, count FROM feature_histogram {where} ORDER BY bin", args)
        if "top_examples" in tables:
            out["examples"] = self.stats_rows(
                f"SELECT activation, prompt_id, position, context_tokens, context_activations, context_start "
                f"FROM top_examples {where} ORDER BY activation DESC",
                args,
            )
        if "logit_effects" in tables:
            out["logit_effects"] = self.stats_rows(
                f"SELECT sign, rank, token, effect FROM logit_effects {where} ORDER BY sign, rank", args
            )
        return out


def _prompt_info(props: dict[str, Any]) -> PromptInfo:
    return PromptInfo(
        id=str(props["id"]),
        text=str(props.get("text") or ""),
        model=str(props.get("model") or ""),
        transcoder=str(props.get("transcoder") or ""),
        run=props.get("run"),
        task=props.get("task"),
        n_nodes=int(props.get("n_nodes") or 0),
        n_edges=int(props.get("n_edges") or 0),
        replacement_score=props.get("replacement_score"),
        completeness_score=props.get("completeness_score"),
    )


def drawable(graph: Subgraph) -> tuple[list[GraphNode], list[GraphEdge]]:
    """A query-library `Subgraph` (prompt graph) as layout nodes and edges."""
    nodes = []
    for n in graph.nodes:
        if n.kind == "feature":
            label = n.text or n.key or n.node_id
            value = n.activation
        elif n.kind == "logit":
            label, value = str(n.text), n.probability
        elif n.kind == "token":
            label, value = str(n.text), None
        else:
            label, value = f"error L{n.layer}", n.activation
        nodes.append(
            GraphNode(
                index=n.node_index, node_id=n.node_id, kind=n.kind, layer=n.layer, position=int(n.position or 0),
                label=label, value=value, influence=n.influence, feature_key=n.key if n.kind == "feature" else None,
            )
        )  # fmt: skip
    return nodes, [GraphEdge(e.source, e.target, e.weight) for e in graph.edges]


def path_graph(path: LogitPath) -> tuple[list[GraphNode], list[GraphEdge]]:
    """One path's nodes (instance indices of its prompt) and edges, for drawing on its own."""
    nodes = [
        GraphNode(n.node_index, n.node_id, n.kind, n.layer, int(n.position or 0),
                  str((n.text or n.key) if n.kind == "feature" else n.text), n.activation,
                  feature_key=n.key if n.kind == "feature" else None)
        for n in path.nodes
    ]  # fmt: skip
    pairs = zip(path.nodes, path.nodes[1:], path.weights, strict=False)
    edges = [GraphEdge(a.node_index, b.node_index, w) for a, b, w in pairs]
    return nodes, edges


def _native(value: Any) -> Any:
    """Neo4j temporal values as Python ones (tables and Arrow know those)."""
    return value.to_native() if hasattr(value, "to_native") else value
