"""Recurring paths across prompts' attribution graphs: per-prompt path contributions, their corpus support, and the
alternative routes between one source and one end (input-dependent routing).

Pure functions over plain data (no store, no model): `prompt_paths` enumerates one prompt's strong paths,
`mine_motifs` sums the per-prompt contributions into motifs, `alternatives` groups the motifs that join the same
source to the same end through different intermediates. `atlas.storage.motifs` reads the graphs from and writes the
result to Neo4j; this module must not touch either.

Path strength. Edges of a stored graph are raw direct effects. Each edge is normalised by the total absolute input of
its target, `n(e) = |w_e| / Σ_{e' → target} |w_e'|` (error and token inputs included, so a normalised weight is the
share of the target's input that comes through that edge, as in circuit-tracer's influence computation). A path
`x → … → logit` has strength `p(logit) · Π n(e)`: the share of the prompt's output mass (logit targets weighted by
their probability) that flows along that path. Strengths multiply to ≤ 1 and only shrink as a path grows, so a
backward depth-first search from each logit that stops below `min_strength` finds exactly every path at or above it.
The strengths of all paths of one length sum to at most Σ p(logit) ≤ 1 (each normalised row sums to ≤ 1), so a
prompt has at most 1/`min_strength` such paths per length: the search is bounded whatever the graph's size.

Two motif kinds, both keyed by feature identity (the position a feature fired at is not part of the key):
- `logit`: `f1 → … → fn → logit` with 2 ≤ n ≤ `max_features` features (2–4 feature hops ending at a logit);
- `token`: `token → f1 → … → fn` with 1 ≤ n ≤ `max_features - 1`, the token end of paths that reach a logit; its
  strength is the output share flowing through that chain (summed over the logits it reaches).
A prompt's contribution to a motif is the sum of the strengths of every path with that key (positions, logits for
token chains); the motif's support is the number of prompts contributing, its mean strength the mean of their
contributions over the supporting prompts, its total the sum (the ranking: frequent and strong).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

LOGIT_MOTIF, TOKEN_MOTIF = "logit", "token"
MOTIF_KINDS = (LOGIT_MOTIF, TOKEN_MOTIF)
SEPARATOR = " > "


class MotifError(ValueError):
    """Mining parameters or a graph the miner cannot use."""


@dataclass(frozen=True)
class PromptGraph:
    """One prompt's graph as the miner needs it.

    kinds[i]: "feature" | "token" | "logit" | "error"; keys[i]: the feature or token identity (None for errors and
    custom logit directions, which no motif can name); probability[i]: a logit's weight (ignored elsewhere);
    edges: (source index, target index, raw weight).
    """

    prompt_id: str
    kinds: Sequence[str]
    keys: Sequence[str | None]
    probability: Sequence[float]
    edges: Sequence[tuple[int, int, float]]


@dataclass(frozen=True)
class Contribution:
    """One prompt's share of a motif: the summed strength of its paths with that key, and how many there were."""

    strength: float
    n_paths: int


@dataclass
class Motif:
    key: str
    kind: str
    nodes: tuple[str, ...]  # feature / token keys in path order (a logit motif ends with the logit's token key)
    support: int = 0
    total_strength: float = 0.0
    prompts: dict[str, Contribution] = field(default_factory=dict)

    @property
    def mean_strength(self) -> float:
        return self.total_strength / self.support if self.support else 0.0

    @property
    def source(self) -> str:
        return self.nodes[0]

    @property
    def end(self) -> str:
        return self.nodes[-1]

    @property
    def intermediates(self) -> tuple[str, ...]:
        return self.nodes[1:-1]


def motif_key(kind: str, nodes: Sequence[str]) -> str:
    """The identity of a motif: its kind and its node keys in path order."""
    return f"{kind}:{SEPARATOR.join(nodes)}"


def check_parameters(min_strength: float, max_features: int) -> None:
    if not 0.0 < min_strength < 1.0:
        raise MotifError(f"min_strength must be in (0, 1), got {min_strength}")
    if not 2 <= max_features <= 4:
        raise MotifError(f"max_features must be 2, 3 or 4 (feature hops of a path), got {max_features}")


def prompt_paths(
    graph: PromptGraph, *, min_strength: float = 0.01, max_features: int = 4
) -> dict[tuple[str, tuple[str, ...]], Contribution]:
    """Every motif key of one prompt with strength ≥ `min_strength`, summed per key: {(kind, nodes): Contribution}.

    Backward depth-first search from each logit target over normalised edges (see the module docstring); paths pass
    through feature nodes only (an error node has no identity; a token node ends a path).
    """
    check_parameters(min_strength, max_features)
    n = len(graph.kinds)
    if not (len(graph.keys) == len(graph.probability) == n):
        raise MotifError(f"prompt {graph.prompt_id}: kinds, keys and probability differ in length")
    incoming: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    total_in = [0.0] * n
    for source, target, weight in graph.edges:
        if not (0 <= source < n and 0 <= target < n):
            raise MotifError(f"prompt {graph.prompt_id}: edge ({source}, {target}) outside its {n} nodes")
        incoming[target].append((source, abs(weight)))
        total_in[target] += abs(weight)
    strengths: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
    counts: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)

    def record(kind: str, nodes: tuple[str, ...], strength: float) -> None:
        strengths[(kind, nodes)] += strength
        counts[(kind, nodes)] += 1

    def walk(node: int, features: tuple[str, ...], strength: float, logit: str) -> None:
        # `features`: the feature keys from `node` (inclusive, when a feature) to the logit, in path order
        if total_in[node] == 0.0:
            return
        for source, weight in incoming[node]:
            s = strength * weight / total_in[node]
            if s < min_strength or weight == 0.0:
                continue
            kind, key = graph.kinds[source], graph.keys[source]
            if key is None:
                continue
            if kind == "token" and features:
                record(TOKEN_MOTIF, (key, *features), s)
            elif kind == "feature" and len(features) < max_features:
                path = (key, *features)
                if len(path) >= 2:
                    record(LOGIT_MOTIF, (*path, logit), s)
                walk(source, path, s, logit)

    for node in range(n):
        key = graph.keys[node]
        if graph.kinds[node] == "logit" and key is not None and graph.probability[node] >= min_strength:
            walk(node, (), float(graph.probability[node]), key)
    # a token chain has at most max_features - 1 features (its token hop counts as one of the path's hops)
    return {
        k: Contribution(strengths[k], counts[k])
        for k in sorted(strengths)
        if not (k[0] == TOKEN_MOTIF and len(k[1]) - 1 > max_features - 1)
    }


def mine_motifs(
    per_prompt: Mapping[str, Mapping[tuple[str, tuple[str, ...]], Contribution]], *, min_support: int = 1
) -> list[Motif]:
    """Sum per-prompt contributions into motifs with support ≥ `min_support`, strongest total first (ties: key)."""
    if min_support < 1:
        raise MotifError(f"min_support must be ≥ 1, got {min_support}")
    motifs: dict[tuple[str, tuple[str, ...]], Motif] = {}
    for prompt_id in sorted(per_prompt):
        for (kind, nodes), contribution in per_prompt[prompt_id].items():
            motif = motifs.get((kind, nodes))
            if motif is None:
                motif = motifs[(kind, nodes)] = Motif(motif_key(kind, nodes), kind, nodes)
            motif.support += 1
            motif.total_strength += contribution.strength
            motif.prompts[prompt_id] = contribution
    kept = [m for m in motifs.values() if m.support >= min_support]
    return sorted(kept, key=lambda m: (-m.total_strength, m.key))


@dataclass(frozen=True)
class RouteGroup:
    """Motifs of one kind joining `source` to `end` through different intermediates (alternative routes).

    `routes` are strongest total first; `exclusive_prompts` counts the prompts that use exactly one of the routes:
    when it is large the routing is input-dependent (different prompts take different routes), when it is zero every
    prompt that uses the pair uses several routes at once (parallel paths)."""

    kind: str
    source: str
    end: str
    routes: tuple[Motif, ...]
    n_prompts: int  # prompts using at least one route
    exclusive_prompts: int


def alternatives(motifs: Iterable[Motif], *, min_routes: int = 2) -> list[RouteGroup]:
    """Group motifs by (kind, source, end); keep groups with ≥ `min_routes` distinct intermediates, largest first."""
    groups: dict[tuple[str, str, str], list[Motif]] = defaultdict(list)
    for motif in motifs:
        groups[(motif.kind, motif.source, motif.end)].append(motif)
    out = []
    for (kind, source, end), routes in groups.items():
        if len({m.intermediates for m in routes}) < min_routes:
            continue
        uses: dict[str, int] = defaultdict(int)
        for motif in routes:
            for prompt_id in motif.prompts:
                uses[prompt_id] += 1
        ordered = tuple(sorted(routes, key=lambda m: (-m.total_strength, m.key)))
        out.append(RouteGroup(kind, source, end, ordered, len(uses), sum(1 for c in uses.values() if c == 1)))
    return sorted(out, key=lambda g: (-g.n_prompts, -len(g.routes), g.kind, g.source, g.end))
