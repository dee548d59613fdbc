"""The atlas query library: named, parameterised, read-only queries over the Neo4j store (+ DuckDB statistics).

Every query is a method of `AtlasQueries` and returns a `QueryResult[T]`: typed rows (frozen dataclasses), the
Cypher text and parameters of its main statement, and the elapsed time. Graph-shaped answers (`prompt_graph`,
`shared_subgraph`) return one `Subgraph` row. All statements run in read transactions (`execute_read`, read access
mode) with a server-side timeout (`timeout_s`), so a query can neither write nor run away.

    q = AtlasQueries(driver, stats=FeatureStatsStore(path))          # stats optional (top-token search)
    q.find_features("Dallas")                                         # by key, label or top token
    q.paths_to_logits(["Texas"], [" Austin", " Sacramento"], max_hops=3, min_abs_weight=0.05)
    q.paths_to_logits(None, [" Austin"], at_token=" Dallas")            # from every feature active on " Dallas"
    q.features_on_token(" Dallas")                                    # which features those are, across prompts
    q.top_features_for_logit(" Austin")                               # aggregate + per-prompt evidence
    q.neighbourhood(key, direction="down")                            # aggregated; prompt_id=... for one prompt
    q.prompts_where_feature_matters(key, by="influence")
    q.shared_subgraph([p1, p2, p3], min_prompts=2)
    q.prompt_graph(prompt_id); q.overview(); q.list_prompts(task="capitals")

Definitions:
- A *path* is a chain of attribution `:EDGE`s inside one prompt, from an activation of a source Feature to a
  `LogitTarget` whose Token text is one of the targets, of 1..`max_hops` edges, each with |weight| >=
  `min_abs_weight`. Its `strength` is the product of its edge weights (signed: negative = inhibiting); paths are
  ranked by |strength|, then by `bottleneck` (its smallest |weight|). Weights are direct effects, so |strength| is
  the attribution carried along that one route and longer routes are naturally discounted.
- `at_token` restricts a path's source activations to positions whose input token is that text (in the same
  prompt): "features active on ' Dallas'". Only the activations the pruned graph kept are stored, so these are the
  features active there that mattered for the prompt's targets, not every feature that fired.
- Token text matching is exact, or equal after stripping surrounding whitespace (" Austin" matches "Austin").
- Feature references (`sources`, `feature_key`) are Feature keys ("transcoder/layer/index"), or labels / top tokens
  resolved through `find_features` (a reference matching nothing raises `QueryError`).
- Influence is circuit-tracer's cumulative influence score: lower = more influential.

Errors: unknown features or tokens, and malformed parameters (hops outside 1..`MAX_HOPS`, negative weights, empty
sets, limits outside 1..`MAX_LIMIT`) raise `QueryError` naming the problem; an unreachable server raises
`StoreUnavailableError`, a server-side timeout `QueryTimeoutError` (both subclasses of `QueryError`).

This module must not write to Neo4j or DuckDB, and must not import `ingest/` or `app/`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, LiteralString, TypeVar

from neo4j import READ_ACCESS, Driver, ManagedTransaction, Record, unit_of_work
from neo4j.exceptions import ClientError, DriverError, Neo4jError, ServiceUnavailable, SessionExpired

from atlas.storage.aggregate import AGG_SUM_ABS, AGG_VALUES
from atlas.storage.feature_stats import FeatureStatsStore

T = TypeVar("T")

MAX_HOPS = 6
MAX_LIMIT = 10_000
DEFAULT_TIMEOUT_S = 10.0


class QueryError(ValueError):
    """A query could not be answered as asked: unknown names, malformed parameters, or the store failed."""


class StoreUnavailableError(QueryError):
    """The Neo4j server cannot be reached."""


class QueryTimeoutError(QueryError):
    """The server stopped the query at its timeout."""


@dataclass(frozen=True)
class QueryResult(Generic[T]):
    """Typed rows plus the main Cypher statement and parameters that produced them."""

    rows: tuple[T, ...]
    cypher: str
    params: Mapping[str, Any]
    elapsed_ms: float
    notes: tuple[str, ...] = ()  # e.g. how feature references were resolved

    @property
    def single(self) -> T:
        if len(self.rows) != 1:
            raise QueryError(f"expected one row, got {len(self.rows)}")
        return self.rows[0]

    def __len__(self) -> int:
        return len(self.rows)


# -- row types ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureMatch:
    key: str
    transcoder: str
    layer: int
    index: int
    label: str | None
    matched_on: str  # "key" | "label" | "top_token" | "top_example"
    detail: str  # what matched (the key, the label, the token and its effect)
    n_activations: int  # FeatureActivation instances of it in the store


@dataclass(frozen=True)
class PathNode:
    kind: str  # "feature" | "error" | "token" | "logit"
    node_id: str
    node_index: int
    position: int | None
    layer: int | None
    key: str | None  # Feature key, or Token key ("model/id"); None for error and custom-direction nodes
    text: str | None  # Token text / logit label / Feature label
    activation: float | None  # features: activation; logits: probability


@dataclass(frozen=True)
class LogitPath:
    prompt_id: str
    source_key: str
    target_text: str
    strength: float  # product of the edge weights
    bottleneck: float  # smallest |weight| along the path
    hops: int
    nodes: tuple[PathNode, ...]
    weights: tuple[float, ...]  # weights[i] is the edge nodes[i] -> nodes[i + 1]


@dataclass(frozen=True)
class TokenFeature:
    """A feature active at positions whose input token has the given text, summed over the prompts holding it."""

    feature_key: str
    layer: int
    index: int
    label: str | None
    token_text: str  # the input token's text as stored
    n_prompts: int  # prompts in which it is active at such a position
    n_activations: int
    mean_activation: float
    max_activation: float
    prompt_ids: tuple[str, ...]  # sorted


@dataclass(frozen=True)
class Evidence:
    prompt_id: str
    position: int
    activation: float
    weight: float  # of the edge into the logit


@dataclass(frozen=True)
class LogitDriver:
    feature_key: str
    layer: int
    index: int
    label: str | None
    target_key: str
    n_prompts: int
    n_edges: int
    sum_weight: float
    sum_abs_weight: float
    mean_weight: float
    max_abs_weight: float
    evidence: tuple[Evidence, ...]  # strongest per-prompt edges into the logit, |weight| descending


@dataclass(frozen=True)
class Neighbour:
    kind: str  # "feature" | "token" | "error" | "logit"
    key: str | None  # Feature or Token key (None: error / custom direction)
    text: str | None
    layer: int | None
    position: int | None  # per-prompt only
    prompt_id: str | None  # per-prompt only
    weight: float  # per prompt: the edge weight; aggregated: sum_weight
    abs_weight: float  # per prompt: |weight|; aggregated: sum_abs_weight
    n_prompts: int  # aggregated: prompts with the pair; per prompt: 1
    max_abs_weight: float


@dataclass(frozen=True)
class FeatureInPrompt:
    prompt_id: str
    text: str | None
    task: str | None
    positions: tuple[int, ...]
    max_activation: float
    best_influence: float | None  # smallest cumulative influence of its activations (lower = more influential)
    out_abs_weight: float  # sum of |weight| of its outgoing edges in the prompt


@dataclass(frozen=True)
class GraphNode:
    node_index: int
    node_id: str
    kind: str  # "feature" | "error" | "token" | "logit"
    layer: int | None
    position: int | None
    key: str | None
    text: str | None
    activation: float | None
    influence: float | None
    probability: float | None
    prompt_ids: tuple[str, ...] = ()  # shared_subgraph: the prompts where it occurs


@dataclass(frozen=True)
class GraphEdge:
    source: int  # node_index (prompt_graph) or index into Subgraph.nodes (shared_subgraph)
    target: int
    weight: float
    n_prompts: int = 1


@dataclass(frozen=True)
class Subgraph:
    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]
    prompt: Mapping[str, Any] = field(default_factory=dict)  # prompt_graph: the Prompt's properties


@dataclass(frozen=True)
class PromptSummary:
    prompt_id: str
    text: str | None
    model: str | None
    transcoder: str | None
    run: str | None
    task: str | None
    n_nodes: int | None
    n_edges: int | None
    replacement_score: float | None
    completeness_score: float | None


@dataclass(frozen=True)
class Overview:
    schema_version: int | None
    models: tuple[str, ...]
    transcoders: tuple[str, ...]
    runs: tuple[str, ...]
    prompts: int
    prompts_by_task: tuple[tuple[str, int], ...]  # (task or "(none)", count), largest first
    features: int
    tokens: int
    instance_nodes: int
    edges: int
    agg_edges: int


# -- validation helpers ------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise QueryError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise QueryError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise QueryError(f"{name} must be a number, got {value!r}")
    if value != value or value < 0 or value == float("inf"):
        raise QueryError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)


def _check_strings(name: str, values: Any) -> list[str]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Iterable):
        raise QueryError(f"{name} must be a list of strings, got {values!r}")
    out = list(dict.fromkeys(values))
    if not out:
        raise QueryError(f"{name} is empty")
    bad = [v for v in out if not isinstance(v, str) or not v.strip()]
    if bad:
        raise QueryError(f"{name} must hold non-empty strings, got {bad[0]!r}")
    return out


def _kind(labels: Sequence[str]) -> str:
    for label, kind in (("FeatureActivation", "feature"), ("ErrorNode", "error"), ("InputToken", "token")):
        if label in labels:
            return kind
    return "logit" if "LogitTarget" in labels else "unknown"


_KEY_RE = re.compile(r"^.+/\d+/\d+$")

# Node description used by several statements: `n` an instance node, `x` its identity (or null).
_NODE_MAP: LiteralString = """{labels: labels(n), node_index: n.node_index, node_id: n.node_id, layer: n.layer,
 position: n.position, key: x.key, text: coalesce(n.label, x.text, x.label), activation: n.activation,
 influence: n.influence, probability: n.probability}"""


def _graph_node(m: Mapping[str, Any], prompt_ids: tuple[str, ...] = ()) -> GraphNode:
    return GraphNode(
        node_index=int(m["node_index"]), node_id=str(m["node_id"]), kind=_kind(m["labels"]), layer=m["layer"],
        position=m["position"], key=m["key"], text=m["text"], activation=m["activation"], influence=m["influence"],
        probability=m["probability"], prompt_ids=prompt_ids,
    )  # fmt: skip


def _path_node(m: Mapping[str, Any]) -> PathNode:
    kind = _kind(m["labels"])
    value = m["probability"] if kind == "logit" else m["activation"]
    return PathNode(kind, str(m["node_id"]), int(m["node_index"]), m["position"], m["layer"], m["key"], m["text"],
                    value)  # fmt: skip


# -- statements --------------------------------------------------------------------------------------------------

_FIND_BY_KEY_OR_LABEL: LiteralString = """
MATCH (f:Feature)
WHERE f.key = $text OR f.key ENDS WITH $suffix OR toLower(f.label) CONTAINS $lower
   OR toLower(f.auto_label) CONTAINS $lower
WITH f, CASE WHEN f.key = $text OR f.key ENDS WITH $suffix THEN 'key' ELSE 'label' END AS matched_on
RETURN f.key AS key, f.transcoder AS transcoder, f.layer AS layer, f.index AS index, f.label AS label, matched_on,
       CASE WHEN matched_on = 'key' THEN f.key WHEN toLower(f.label) CONTAINS $lower THEN f.label
            ELSE f.auto_label END AS detail, COUNT { (f)<-[:OF]-() } AS n
ORDER BY CASE matched_on WHEN 'key' THEN 0 ELSE 1 END, n DESC, key
LIMIT $limit
"""

_FEATURES_BY_KEYS: LiteralString = """
UNWIND $keys AS k
MATCH (f:Feature {key: k})
RETURN f.key AS key, f.transcoder AS transcoder, f.layer AS layer, f.index AS index, f.label AS label,
       COUNT { (f)<-[:OF]-() } AS n
"""

_TOKENS_BY_TEXT: LiteralString = """
UNWIND $texts AS text
MATCH (t:Token) WHERE (t.text = text OR trim(t.text) = trim(text)) AND ($model IS NULL OR t.model = $model)
RETURN text, collect(t.key) AS keys
"""

# Paths inside one prompt from activations of the source features to logit targets of the target tokens. Only
# activations in prompts that have such a logit target are expanded (`candidates`). Hops are inlined (a validated
# integer); the per-hop weight predicate sits inside the quantified pattern so it prunes the expansion.
_PATHS: LiteralString = (
    """
MATCH (t0:Token) WHERE t0.key IN $targets
MATCH (t0)<-[:OF]-(l0:LogitTarget)
WITH collect(DISTINCT l0.prompt_id) AS candidates
MATCH (f:Feature) WHERE f.key IN $sources
MATCH (f)<-[:OF]-(a:FeatureActivation)
WHERE a.prompt_id IN candidates AND ($prompts IS NULL OR a.prompt_id IN $prompts)
MATCH p = (a)(()-[r:EDGE WHERE abs(r.weight) >= $min_w]->()){HOPS}(l:LogitTarget WHERE l.token_id IN $target_ids)
MATCH (l)-[:OF]->(t:Token) WHERE t.key IN $targets
WITH f, a, p, t, [e IN relationships(p) | e.weight] AS ws
WITH f, a, p, t, ws, reduce(s = 1.0, w IN ws | s * w) AS strength,
     reduce(m = abs(ws[0]), w IN ws | CASE WHEN abs(w) < m THEN abs(w) ELSE m END) AS bottleneck
ORDER BY abs(strength) DESC, bottleneck DESC, a.prompt_id
LIMIT $limit
CALL (p) {
  UNWIND range(0, length(p)) AS i
  WITH i, nodes(p)[i] AS n
  OPTIONAL MATCH (n)-[:OF]->(x)
  WITH i, """
    + _NODE_MAP
    + """ AS step ORDER BY i
  RETURN collect(step) AS steps
}
RETURN a.prompt_id AS prompt_id, f.key AS source, t.text AS target, strength, bottleneck, ws, steps
"""
)

# Paths as in `_PATHS`, but from every stored activation at a position whose input token is one of `$source_tokens`
# (optionally only of the features `$sources`). Anchored on the Token key index, then each InputToken instance's
# prompt through the composite Instance(prompt_id, node_index) index.
_PATHS_FROM_TOKEN: LiteralString = (
    """
MATCH (t0:Token) WHERE t0.key IN $targets
MATCH (t0)<-[:OF]-(l0:LogitTarget)
WITH collect(DISTINCT l0.prompt_id) AS candidates
MATCH (s:Token) WHERE s.key IN $source_tokens
MATCH (s)<-[:OF]-(i:InputToken)
WHERE i.prompt_id IN candidates AND ($prompts IS NULL OR i.prompt_id IN $prompts)
MATCH (a:Instance)
WHERE a.prompt_id = i.prompt_id AND a.node_index IS NOT NULL AND a.position = i.position AND a:FeatureActivation
MATCH (a)-[:OF]->(f:Feature) WHERE $sources IS NULL OR f.key IN $sources
MATCH p = (a)(()-[r:EDGE WHERE abs(r.weight) >= $min_w]->()){HOPS}(l:LogitTarget WHERE l.token_id IN $target_ids)
MATCH (l)-[:OF]->(t:Token) WHERE t.key IN $targets
WITH f, a, p, t, [e IN relationships(p) | e.weight] AS ws
WITH f, a, p, t, ws, reduce(s = 1.0, w IN ws | s * w) AS strength,
     reduce(m = abs(ws[0]), w IN ws | CASE WHEN abs(w) < m THEN abs(w) ELSE m END) AS bottleneck
ORDER BY abs(strength) DESC, bottleneck DESC, a.prompt_id
LIMIT $limit
CALL (p) {
  UNWIND range(0, length(p)) AS i
  WITH i, nodes(p)[i] AS n
  OPTIONAL MATCH (n)-[:OF]->(x)
  WITH i, """
    + _NODE_MAP
    + """ AS step ORDER BY i
  RETURN collect(step) AS steps
}
RETURN a.prompt_id AS prompt_id, f.key AS source, t.text AS target, strength, bottleneck, ws, steps
"""
)

# Features active at positions whose input token is one of `$tokens`, with how many prompts and how strongly.
_FEATURES_ON_TOKEN: LiteralString = """
MATCH (t:Token) WHERE t.key IN $tokens
MATCH (t)<-[:OF]-(i:InputToken) WHERE $prompts IS NULL OR i.prompt_id IN $prompts
MATCH (a:Instance)
WHERE a.prompt_id = i.prompt_id AND a.node_index IS NOT NULL AND a.position = i.position AND a:FeatureActivation
MATCH (a)-[:OF]->(f:Feature) WHERE $transcoder IS NULL OR f.transcoder = $transcoder
WITH f, collect(DISTINCT t.text) AS texts, collect(DISTINCT a.prompt_id) AS pids, count(a) AS n,
     avg(a.activation) AS mean_act, max(a.activation) AS max_act
RETURN f.key AS key, f.layer AS layer, f.index AS index, f.label AS label, texts[0] AS text, pids, n, mean_act,
       max_act
ORDER BY size(pids) DESC, max_act DESC, key
LIMIT $limit
"""

_TOP_FOR_LOGIT: LiteralString = (
    """
MATCH (t:Token) WHERE t.key IN $targets
MATCH (f:Feature)-[g:AGG_EDGE]->(t)
WHERE g.n_prompts >= $min_prompts AND ($transcoder IS NULL OR f.transcoder = $transcoder)
RETURN f.key AS key, f.layer AS layer, f.index AS index, f.label AS label, t.key AS target, """
    + AGG_VALUES
    + """ AS g
ORDER BY g.sum_abs_weight DESC, key LIMIT $limit
"""
)

# Evidence for the top features, expanded from the logit side: a target token has few logit instances (one per
# prompt that targets it), a popular feature thousands of activations, so this direction stays cheap.
_LOGIT_EVIDENCE: LiteralString = """
MATCH (t:Token) WHERE t.key IN $targets
MATCH (t)<-[:OF]-(l:LogitTarget)<-[e:EDGE]-(a:FeatureActivation)
MATCH (a)-[:OF]->(f:Feature) WHERE f.key IN $features
WITH f, t, a, e ORDER BY abs(e.weight) DESC, a.prompt_id
WITH f, t, collect({prompt_id: a.prompt_id, position: a.position, activation: a.activation, weight: e.weight}) AS ev
RETURN f.key AS key, t.key AS target, ev[..$evidence] AS ev
"""

_AGG_DOWN: LiteralString = (
    """
MATCH (f:Feature {key: $key})-[g:AGG_EDGE]->(x)
WHERE """
    + AGG_SUM_ABS
    + """ >= $min_w
RETURN CASE WHEN x:Feature THEN 'feature' ELSE 'logit' END AS kind, x.key AS key, coalesce(x.label, x.text) AS text,
       x.layer AS layer, """
    + AGG_VALUES
    + """ AS g
ORDER BY g.sum_abs_weight DESC, key LIMIT $limit
"""
)

_AGG_UP: LiteralString = (
    """
MATCH (f:Feature {key: $key})<-[g:AGG_EDGE]-(x:Feature)
WHERE """
    + AGG_SUM_ABS
    + """ >= $min_w
RETURN 'feature' AS kind, x.key AS key, x.label AS text, x.layer AS layer, """
    + AGG_VALUES
    + """ AS g
ORDER BY g.sum_abs_weight DESC, key LIMIT $limit
"""
)

_PROMPT_DOWN: LiteralString = (
    """
MATCH (f:Feature {key: $key})<-[:OF]-(a:FeatureActivation) WHERE a.prompt_id = $prompt
MATCH (a)-[e:EDGE]->(n) WHERE abs(e.weight) >= $min_w
OPTIONAL MATCH (n)-[:OF]->(x)
RETURN """
    + _NODE_MAP
    + """ AS node, e.weight AS weight
ORDER BY abs(weight) DESC, node.node_index LIMIT $limit
"""
)

_PROMPT_UP: LiteralString = (
    """
MATCH (f:Feature {key: $key})<-[:OF]-(a:FeatureActivation) WHERE a.prompt_id = $prompt
MATCH (a)<-[e:EDGE]-(n) WHERE abs(e.weight) >= $min_w
OPTIONAL MATCH (n)-[:OF]->(x)
RETURN """
    + _NODE_MAP
    + """ AS node, e.weight AS weight
ORDER BY abs(weight) DESC, node.node_index LIMIT $limit
"""
)

_PROMPTS_FOR_FEATURE: LiteralString = """
MATCH (f:Feature {key: $key})<-[:OF]-(a:FeatureActivation)
WITH a.prompt_id AS pid, collect(a.position) AS positions, max(a.activation) AS max_act, min(a.influence) AS infl,
     sum(reduce(s = 0.0, e IN [(a)-[e:EDGE]->() | abs(e.weight)] | s + e)) AS out_abs
MATCH (p:Prompt {id: pid})
RETURN pid, p.text AS text, p.task AS task, positions, max_act, infl, out_abs
ORDER BY {order}, pid
LIMIT $limit
"""

_PROMPT_GRAPH_NODES: LiteralString = (
    """
MATCH (p:Prompt {id: $prompt})
MATCH (n:Instance) WHERE n.prompt_id = $prompt AND n.node_index IS NOT NULL
OPTIONAL MATCH (n)-[:OF]->(x)
RETURN properties(p) AS prompt, """
    + _NODE_MAP
    + """ AS node
ORDER BY n.node_index
"""
)

_PROMPT_GRAPH_EDGES: LiteralString = """
MATCH (a:Instance)-[e:EDGE]->(b) WHERE a.prompt_id = $prompt AND a.node_index IS NOT NULL AND abs(e.weight) >= $min_w
RETURN a.node_index AS s, b.node_index AS t, e.weight AS w
ORDER BY abs(w) DESC, s, t LIMIT $max_edges
"""

# Feature-level subgraph shared by a prompt set: features active in >= k of the prompts, and the feature->feature /
# feature->logit-token pairs joined by an edge in >= k of them (weights summed over those prompts).
_SHARED_FEATURES: LiteralString = """
UNWIND $prompts AS pid
MATCH (a:Instance) WHERE a.prompt_id = pid AND a.node_index IS NOT NULL AND (a:FeatureActivation OR a:LogitTarget)
MATCH (a)-[:OF]->(x)
WITH x, collect(DISTINCT pid) AS pids, min(a.layer) AS layer
WHERE size(pids) >= $k
RETURN x.key AS key, CASE WHEN x:Feature THEN 'feature' ELSE 'logit' END AS kind, coalesce(x.label, x.text) AS text,
       coalesce(layer, x.layer) AS layer, pids
ORDER BY size(pids) DESC, key
LIMIT $limit
"""

_SHARED_EDGES: LiteralString = """
UNWIND $prompts AS pid
MATCH (a:Instance) WHERE a.prompt_id = pid AND a.node_index IS NOT NULL AND a:FeatureActivation
MATCH (a)-[e:EDGE]->(b) WHERE (b:FeatureActivation OR b:LogitTarget)
MATCH (a)-[:OF]->(f:Feature)
MATCH (b)-[:OF]->(x) WHERE x.key IN $keys
WITH f, x, count(DISTINCT pid) AS n, sum(e.weight) AS w
WHERE n >= $k
RETURN f.key AS s, x.key AS t, n, w
ORDER BY abs(w) DESC, s, t
"""

_OVERVIEW: LiteralString = """
CALL () { OPTIONAL MATCH (v:SchemaVersion) RETURN max(v.version) AS version }
CALL () { MATCH (m:Model) RETURN collect(m.name) AS models }
CALL () { MATCH (t:Transcoder) RETURN collect(t.id) AS transcoders }
CALL () { MATCH (p:Prompt) RETURN count(p) AS prompts, collect(DISTINCT p.run) AS runs }
CALL () {
  MATCH (p:Prompt) WITH coalesce(p.task, '(none)') AS task, count(*) AS n ORDER BY n DESC, task
  RETURN collect([task, n]) AS by_task
}
CALL () { MATCH (f:Feature) RETURN count(f) AS features }
CALL () { MATCH (t:Token) RETURN count(t) AS tokens }
CALL () { MATCH (n:Instance) RETURN count(n) AS instances }
CALL () { MATCH ()-[e:EDGE]->() RETURN count(e) AS edges }
CALL () { MATCH ()-[g:AGG_EDGE]->() RETURN count(g) AS agg }
RETURN version, models, transcoders, runs, prompts, by_task, features, tokens, instances, edges, agg
"""

_LIST_PROMPTS: LiteralString = """
MATCH (p:Prompt)
WHERE ($task IS NULL OR p.task = $task) AND ($run IS NULL OR p.run = $run)
  AND ($contains IS NULL OR toLower(p.text) CONTAINS toLower($contains)) AND ($ids IS NULL OR p.id IN $ids)
  AND ($transcoder IS NULL OR p.transcoder = $transcoder)
RETURN properties(p) AS p ORDER BY p.id LIMIT $limit
"""


class AtlasQueries:
    """Named read-only queries over one Neo4j database (and optionally a DuckDB `FeatureStatsStore`).

    Thread-safe as long as the driver is (a session per call). `timeout_s` is the server-side limit of each
    statement; `max_hops` caps `paths_to_logits`.
    """

    def __init__(
        self,
        driver: Driver,
        database: str = "neo4j",
        *,
        stats: FeatureStatsStore | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_hops: int = MAX_HOPS,
    ) -> None:
        if timeout_s <= 0:
            raise QueryError("timeout_s must be positive")
        self.driver = driver
        self.database = database
        self.stats = stats
        self.timeout_s = timeout_s
        self.max_hops = max_hops

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _read(self, cypher: str, params: Mapping[str, Any]) -> list[Record]:
        """Run one statement in a read transaction with the server-side timeout; translate driver errors."""

        @unit_of_work(timeout=self.timeout_s)
        def work(tx: ManagedTransaction) -> list[Record]:
            return list(tx.run(cypher, dict(params)))  # text built from this module's literals and validated integers

        try:
            # Notifications off: schema-less warnings (a label or type not created yet) are not errors here.
            with self.driver.session(
                database=self.database, default_access_mode=READ_ACCESS, notifications_min_severity="OFF"
            ) as session:
                return session.execute_read(work)
        except (ServiceUnavailable, SessionExpired) as exc:
            raise StoreUnavailableError(
                f"Neo4j is unreachable ({exc}); is the server running? (`atlas db status`)"
            ) from exc
        except ClientError as exc:
            if "TimedOut" in (exc.code or ""):
                raise QueryTimeoutError(f"the query ran past the {self.timeout_s:g} s server-side timeout") from exc
            raise QueryError(f"Neo4j rejected the query: {exc.message} ({exc.code})") from exc
        except Neo4jError as exc:
            raise QueryError(f"Neo4j failed: {exc.message} ({exc.code})") from exc
        except DriverError as exc:
            raise StoreUnavailableError(f"the Neo4j driver failed: {exc}") from exc

    @staticmethod
    def _result(
        rows: Iterable[T], cypher: str, params: Mapping[str, Any], started: float, notes: Iterable[str] = ()
    ) -> QueryResult[T]:
        return QueryResult(tuple(rows), cypher, dict(params), 1000 * (time.perf_counter() - started), tuple(notes))

    # -- resolution ----------------------------------------------------------------------------------------------

    def _stats_feature_keys(self, text: str, limit: int) -> list[tuple[str, str, str]]:
        """(key, matched_on, detail) from DuckDB: features whose top positive logit effects or top activating
        example tokens equal `text` (exact or stripped). Empty without a stats store or its tables."""
        if self.stats is None or not self.stats.path.exists():
            return []
        out: list[tuple[str, str, str]] = []
        con = self.stats.reader()
        try:
            tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
            if "logit_effects" in tables:
                for tc, layer, feature, token, effect in con.execute(
                    "SELECT transcoder_id, layer, feature, token, effect FROM logit_effects "
                    "WHERE sign = 'positive' AND (token = ? OR trim(token) = trim(?)) ORDER BY effect DESC LIMIT ?",
                    [text, text, limit],
                ).fetchall():
                    out.append((f"{tc}/{layer}/{feature}", "top_token", f"logit effect {token!r} {effect:+.3g}"))
            if "top_examples" in tables:
                for tc, layer, feature, token, act in con.execute(
                    "SELECT transcoder_id, layer, feature, tok, max(activation) AS act FROM ("
                    "  SELECT *, context_tokens[position - context_start + 1] AS tok FROM top_examples)"
                    " WHERE tok = ? OR trim(tok) = trim(?) GROUP BY ALL ORDER BY act DESC LIMIT ?",
                    [text, text, limit],
                ).fetchall():
                    out.append((f"{tc}/{layer}/{feature}", "top_example", f"activates on {token!r} ({act:.3g})"))
        finally:
            con.close()
        return out

    def find_features(self, text: str, *, limit: int = 25) -> QueryResult[FeatureMatch]:
        """Features whose key is or ends with `text` ("layer/index" works), whose label (shown or automatic) contains
        it (case-blind), or (with a stats store) whose top logit effect or top activating token is `text`."""
        if not isinstance(text, str) or not text.strip():
            raise QueryError(f"find_features needs a non-empty search text, got {text!r}")
        _check_int("limit", limit, 1, MAX_LIMIT)
        started = time.perf_counter()
        stripped = text.strip()
        params = {"text": stripped, "suffix": "/" + stripped.lstrip("/"), "lower": stripped.lower(), "limit": limit}
        matches: dict[str, FeatureMatch] = {}
        for r in self._read(_FIND_BY_KEY_OR_LABEL, params):
            matches[r["key"]] = FeatureMatch(r["key"], r["transcoder"], int(r["layer"]), int(r["index"]), r["label"],
                                             r["matched_on"], str(r["detail"]), int(r["n"]))  # fmt: skip
        from_stats = self._stats_feature_keys(text, limit)
        if from_stats:
            found = {r["key"]: r for r in self._read(_FEATURES_BY_KEYS, {"keys": [k for k, _, _ in from_stats]})}
            for key, matched_on, detail in from_stats:
                hit = found.get(key)
                if hit is not None and key not in matches:
                    matches[key] = FeatureMatch(key, hit["transcoder"], int(hit["layer"]), int(hit["index"]),
                                                hit["label"], matched_on, detail, int(hit["n"]))  # fmt: skip
        return self._result(list(matches.values())[:limit], _FIND_BY_KEY_OR_LABEL, params, started)

    def resolve_features(self, refs: str | Sequence[str], *, per_ref: int = 50) -> tuple[list[str], list[str]]:
        """Feature keys for references (keys, labels, top tokens); returns (keys, notes). Unknown -> QueryError."""
        names = _check_strings("feature references", refs)
        keys: dict[str, None] = {}
        notes = []
        direct = {r["key"] for r in self._read(_FEATURES_BY_KEYS, {"keys": names})}
        for ref in names:
            if ref in direct:
                keys[ref] = None
                continue
            found = self.find_features(ref, limit=per_ref).rows
            if not found:
                hint = "" if self.stats is not None else " (top-token search needs a FeatureStatsStore)"
                raise QueryError(f"unknown feature {ref!r}: no Feature key, label or top token matches it{hint}")
            keys.update(dict.fromkeys(m.key for m in found))
            notes.append(f"{ref!r} -> {len(found)} feature(s) by {found[0].matched_on}")
        return list(keys), notes

    def resolve_tokens(self, texts: str | Sequence[str], *, model: str | None = None) -> dict[str, list[str]]:
        """Token keys for each text (exact or whitespace-stripped match); unknown texts raise QueryError."""
        names = _check_strings("target tokens", texts)
        found = {r["text"]: list(r["keys"]) for r in self._read(_TOKENS_BY_TEXT, {"texts": names, "model": model})}
        missing = [t for t in names if not found.get(t)]
        if missing:
            raise QueryError(f"unknown token(s) {missing}: no stored Token has that text")
        return found

    def _target_keys(self, texts: str | Sequence[str], model: str | None) -> tuple[list[str], list[str]]:
        """Token keys of the logit-target texts that are stored, and a note naming those that are not.

        A list such as every state capital is a question about whichever of them the store holds: only when none is
        stored does this raise QueryError (a misspelt single target should not return an empty answer silently)."""
        names = _check_strings("target tokens", texts)
        found = {r["text"]: list(r["keys"]) for r in self._read(_TOKENS_BY_TEXT, {"texts": names, "model": model})}
        missing = [t for t in names if not found.get(t)]
        if len(missing) == len(names):
            raise QueryError(f"unknown token(s) {missing}: no stored Token has that text")
        keys = sorted({k for ks in found.values() for k in ks})
        return keys, [f"no stored Token for target(s) {missing}; searched the other targets"] if missing else []

    def _feature_key(self, feature_key: str) -> str:
        keys, _ = self.resolve_features([feature_key])
        if len(keys) != 1:
            raise QueryError(f"feature reference {feature_key!r} is ambiguous ({len(keys)} features); use a key")
        return keys[0]

    def _token_keys(self, token: str, model: str | None) -> list[str]:
        """The Token keys of one input-token text (QueryError when it is not a non-empty string or unknown)."""
        if not isinstance(token, str) or not token.strip():
            raise QueryError(f"the input token must be a non-empty string, got {token!r}")
        return sorted(self.resolve_tokens([token], model=model)[token])

    # -- queries -------------------------------------------------------------------------------------------------

    def paths_to_logits(
        self,
        sources: str | Sequence[str] | None,
        target_tokens: str | Sequence[str],
        *,
        max_hops: int = 3,
        min_abs_weight: float = 0.0,
        limit: int = 25,
        prompt_ids: Sequence[str] | None = None,
        model: str | None = None,
        at_token: str | None = None,
    ) -> QueryResult[LogitPath]:
        """Strongest paths, across prompts, from the source features to logit targets of the given token texts.

        With `at_token`, paths start only at activations whose position holds that input token (exact or
        whitespace-stripped text), e.g. `paths_to_logits(None, [" Austin"], at_token=" Dallas")`: from the features
        active on " Dallas"; `sources` (optional then) further restricts them to those features."""
        hops = _check_int("max_hops", max_hops, 1, self.max_hops)
        min_w = _check_weight("min_abs_weight", min_abs_weight)
        _check_int("limit", limit, 1, MAX_LIMIT)
        prompts = None if prompt_ids is None else _check_strings("prompt_ids", prompt_ids)
        if sources is None and at_token is None:
            raise QueryError("give source features, an input token (at_token), or both")
        started = time.perf_counter()
        keys, notes = (None, []) if sources is None else self.resolve_features(sources)
        targets, missing_note = self._target_keys(target_tokens, model)
        notes.extend(missing_note)
        target_ids = sorted({int(k.rsplit("/", 1)[1]) for k in targets})  # keys are "model/id" (token_key)
        params: dict[str, Any] = {"sources": keys, "targets": targets, "target_ids": target_ids, "min_w": min_w,
                                  "limit": limit, "prompts": prompts}  # fmt: skip
        if at_token is None:
            cypher = _PATHS.replace("{HOPS}", "{1," + str(hops) + "}")
        else:
            source_tokens = self._token_keys(at_token, model)
            params["source_tokens"] = source_tokens
            cypher = _PATHS_FROM_TOKEN.replace("{HOPS}", "{1," + str(hops) + "}")
            notes.append(f"sources: activations on the input token {at_token!r} ({len(source_tokens)} token id(s))")
        rows = [
            LogitPath(r["prompt_id"], r["source"], r["target"], float(r["strength"]), float(r["bottleneck"]),
                      len(r["ws"]), tuple(_path_node(s) for s in r["steps"]), tuple(float(w) for w in r["ws"]))
            for r in self._read(cypher, params)
        ]  # fmt: skip
        return self._result(rows, cypher, params, started, notes)

    def features_on_token(
        self,
        token: str,
        *,
        limit: int = 25,
        prompt_ids: Sequence[str] | None = None,
        model: str | None = None,
        transcoder: str | None = None,
    ) -> QueryResult[TokenFeature]:
        """Features with a stored activation at a position whose input token is `token` (exact or whitespace-
        stripped text), most prompts first, then largest activation: "the features active on ' Dallas'"; `transcoder`
        keeps one dictionary's features."""
        _check_int("limit", limit, 1, MAX_LIMIT)
        prompts = None if prompt_ids is None else _check_strings("prompt_ids", prompt_ids)
        started = time.perf_counter()
        params = {"tokens": self._token_keys(token, model), "prompts": prompts, "limit": limit,
                  "transcoder": transcoder}  # fmt: skip
        rows = [
            TokenFeature(r["key"], int(r["layer"]), int(r["index"]), r["label"], str(r["text"]), len(r["pids"]),
                         int(r["n"]), float(r["mean_act"]), float(r["max_act"]), tuple(sorted(r["pids"])))
            for r in self._read(_FEATURES_ON_TOKEN, params)
        ]  # fmt: skip
        return self._result(rows, _FEATURES_ON_TOKEN, params, started)

    def top_features_for_logit(
        self,
        token: str,
        *,
        limit: int = 25,
        min_prompts: int = 1,
        evidence: int = 3,
        model: str | None = None,
        transcoder: str | None = None,
    ) -> QueryResult[LogitDriver]:
        """Features with the largest summed |direct effect| on a logit token over all prompts (aggregate layer),
        each with its `evidence` strongest per-prompt edges; `transcoder` keeps one dictionary's features."""
        _check_int("limit", limit, 1, MAX_LIMIT)
        _check_int("min_prompts", min_prompts, 1, 10**9)
        _check_int("evidence", evidence, 0, 1000)
        started = time.perf_counter()
        targets = sorted({k for ks in self.resolve_tokens([token], model=model).values() for k in ks})
        params = {"targets": targets, "min_prompts": min_prompts, "limit": limit, "transcoder": transcoder}
        rows = []
        top = self._read(_TOP_FOR_LOGIT, params)
        evidence_by_pair: dict[tuple[str, str], list[Any]] = {}
        if top and evidence:
            ev_params = {"targets": targets, "features": sorted({r["key"] for r in top}), "evidence": evidence}
            for r in self._read(_LOGIT_EVIDENCE, ev_params):
                evidence_by_pair[(r["key"], r["target"])] = r["ev"]
        for r in top:
            g = r["g"]
            ev = tuple(Evidence(e["prompt_id"], int(e["position"]), float(e["activation"]), float(e["weight"]))
                       for e in evidence_by_pair.get((r["key"], r["target"]), []))  # fmt: skip
            rows.append(
                LogitDriver(r["key"], int(r["layer"]), int(r["index"]), r["label"], r["target"], int(g["n_prompts"]),
                            int(g["n_edges"]), float(g["sum_weight"]), float(g["sum_abs_weight"]),
                            float(g["mean_weight"]), float(g["max_abs_weight"]), ev)
            )  # fmt: skip
        return self._result(rows, _TOP_FOR_LOGIT, params, started, ("evidence: " + _LOGIT_EVIDENCE.strip(),))

    def neighbourhood(
        self,
        feature_key: str,
        direction: str = "down",
        *,
        prompt_id: str | None = None,
        limit: int = 25,
        min_abs_weight: float = 0.0,
    ) -> QueryResult[Neighbour]:
        """Upstream ("up": what drives it) or downstream ("down": what it drives) neighbours of a feature: in one
        prompt (instance edges, strongest first) or aggregated over all prompts (aggregate layer; upstream then
        lists features only, since tokens and error nodes are not aggregated)."""
        if direction not in ("up", "down"):
            raise QueryError(f"direction must be 'up' or 'down', got {direction!r}")
        _check_int("limit", limit, 1, MAX_LIMIT)
        min_w = _check_weight("min_abs_weight", min_abs_weight)
        started = time.perf_counter()
        key = self._feature_key(feature_key)
        params: dict[str, Any] = {"key": key, "limit": limit, "min_w": min_w}
        rows: list[Neighbour] = []
        if prompt_id is None:
            cypher = _AGG_DOWN if direction == "down" else _AGG_UP
            for r in self._read(cypher, params):
                g = r["g"]
                rows.append(
                    Neighbour(
                        r["kind"],
                        r["key"],
                        r["text"],
                        r["layer"],
                        None,
                        None,
                        float(g["sum_weight"]),
                        float(g["sum_abs_weight"]),
                        int(g["n_prompts"]),
                        float(g["max_abs_weight"]),
                    )
                )
        else:
            if not isinstance(prompt_id, str) or not prompt_id:
                raise QueryError(f"prompt_id must be a non-empty string, got {prompt_id!r}")
            self._require_prompt(prompt_id)
            cypher = _PROMPT_DOWN if direction == "down" else _PROMPT_UP
            params["prompt"] = prompt_id
            for r in self._read(cypher, params):
                n, w = r["node"], float(r["weight"])
                rows.append(Neighbour(_kind(n["labels"]), n["key"], n["text"], n["layer"], n["position"], prompt_id,
                                      w, abs(w), 1, abs(w)))  # fmt: skip
        return self._result(rows, cypher, params, started)

    def prompts_where_feature_matters(
        self, feature_key: str, *, by: str = "influence", limit: int = 25
    ) -> QueryResult[FeatureInPrompt]:
        """Prompts in which the feature is active, ranked `by` "influence" (most influential first), "activation"
        (largest first) or "weight" (largest summed |outgoing weight| first)."""
        orders = {"influence": "infl ASC", "activation": "max_act DESC", "weight": "out_abs DESC"}
        if by not in orders:
            raise QueryError(f"by must be one of {sorted(orders)}, got {by!r}")
        _check_int("limit", limit, 1, MAX_LIMIT)
        started = time.perf_counter()
        key = self._feature_key(feature_key)
        cypher = _PROMPTS_FOR_FEATURE.replace("{order}", orders[by])
        params = {"key": key, "limit": limit}
        rows = [
            FeatureInPrompt(r["pid"], r["text"], r["task"], tuple(sorted(int(p) for p in r["positions"])),
                            float(r["max_act"]), None if r["infl"] is None else float(r["infl"]), float(r["out_abs"]))
            for r in self._read(cypher, params)
        ]  # fmt: skip
        return self._result(rows, cypher, params, started)

    def shared_subgraph(
        self, prompt_ids: Sequence[str], min_prompts: int = 2, *, limit: int = 500
    ) -> QueryResult[Subgraph]:
        """Features (and logit tokens) occurring in >= `min_prompts` of the prompts, and the feature-level edges
        between them present in >= `min_prompts` of the prompts. `GraphEdge.source/target` index `Subgraph.nodes`;
        nodes carry no per-prompt fields (node_index is their index in `nodes`, position None)."""
        prompts = _check_strings("prompt_ids", prompt_ids)
        k = _check_int("min_prompts", min_prompts, 1, len(prompts))
        _check_int("limit", limit, 1, MAX_LIMIT)
        for pid in prompts:
            self._require_prompt(pid)
        started = time.perf_counter()
        params: dict[str, Any] = {"prompts": prompts, "k": k, "limit": limit}
        nodes: list[GraphNode] = []
        index: dict[str, int] = {}
        for r in self._read(_SHARED_FEATURES, params):
            index[r["key"]] = len(nodes)
            nodes.append(
                GraphNode(
                    len(nodes),
                    r["key"],
                    "feature" if r["kind"] == "feature" else "logit",
                    r["layer"],
                    None,
                    r["key"],
                    r["text"],
                    None,
                    None,
                    None,
                    tuple(sorted(r["pids"])),
                )
            )
        edge_params = {"prompts": prompts, "k": k, "keys": list(index)}
        edges = [
            GraphEdge(index[r["s"]], index[r["t"]], float(r["w"]), int(r["n"]))
            for r in self._read(_SHARED_EDGES, edge_params)
            if r["s"] in index
        ]
        return self._result([Subgraph(tuple(nodes), tuple(edges))], _SHARED_FEATURES + ";\n" + _SHARED_EDGES, params,
                            started)  # fmt: skip

    def prompt_graph(
        self, prompt_id: str, *, min_abs_weight: float = 0.0, max_edges: int = MAX_LIMIT
    ) -> QueryResult[Subgraph]:
        """A stored prompt's nodes (by node_index) and edges (strongest first, at most `max_edges`)."""
        if not isinstance(prompt_id, str) or not prompt_id:
            raise QueryError(f"prompt_id must be a non-empty string, got {prompt_id!r}")
        min_w = _check_weight("min_abs_weight", min_abs_weight)
        _check_int("max_edges", max_edges, 1, 10**7)
        started = time.perf_counter()
        params = {"prompt": prompt_id, "min_w": min_w, "max_edges": max_edges}
        records = self._read(_PROMPT_GRAPH_NODES, params)
        if not records:
            raise QueryError(f"unknown prompt {prompt_id!r}")
        nodes = tuple(_graph_node(r["node"]) for r in records)
        edges = tuple(GraphEdge(int(r["s"]), int(r["t"]), float(r["w"])) for r in self._read(_PROMPT_GRAPH_EDGES,
                                                                                          params))  # fmt: skip
        graph = Subgraph(nodes, edges, dict(records[0]["prompt"]))
        return self._result([graph], _PROMPT_GRAPH_NODES + ";\n" + _PROMPT_GRAPH_EDGES, params, started)

    def overview(self) -> QueryResult[Overview]:
        """Counts of what the store holds (edge and node counts come from the count store: cheap)."""
        started = time.perf_counter()
        r = self._read(_OVERVIEW, {})[0]
        row = Overview(
            None if r["version"] is None else int(r["version"]), tuple(sorted(r["models"])),
            tuple(sorted(r["transcoders"])), tuple(sorted(x for x in r["runs"] if x is not None)), int(r["prompts"]),
            tuple((str(t), int(n)) for t, n in r["by_task"]), int(r["features"]), int(r["tokens"]),
            int(r["instances"]), int(r["edges"]), int(r["agg"]),
        )  # fmt: skip
        return self._result([row], _OVERVIEW, {}, started)

    def list_prompts(
        self,
        *,
        task: str | None = None,
        run: str | None = None,
        contains: str | None = None,
        prompt_ids: Sequence[str] | None = None,
        limit: int = 100,
        transcoder: str | None = None,
    ) -> QueryResult[PromptSummary]:
        """Stored prompts, optionally filtered by task, run, a case-blind substring of the text, their ids, or the
        dictionary (`transcoder` id) they were attributed with."""
        _check_int("limit", limit, 1, MAX_LIMIT)
        ids = None if prompt_ids is None else _check_strings("prompt_ids", prompt_ids)
        started = time.perf_counter()
        params = {"task": task, "run": run, "contains": contains, "ids": ids, "limit": limit, "transcoder": transcoder}
        rows = []
        for r in self._read(_LIST_PROMPTS, params):
            p = r["p"]
            rows.append(PromptSummary(p["id"], p.get("text"), p.get("model"), p.get("transcoder"), p.get("run"),
                                      p.get("task"), p.get("n_nodes"), p.get("n_edges"), p.get("replacement_score"),
                                      p.get("completeness_score")))  # fmt: skip
        return self._result(rows, _LIST_PROMPTS, params, started)

    def _require_prompt(self, prompt_id: str) -> None:
        if not self._read("MATCH (p:Prompt {id: $pid}) RETURN p.id AS id", {"pid": prompt_id}):
            raise QueryError(f"unknown prompt {prompt_id!r}")


QueryFn = Callable[..., QueryResult[Any]]
