"""A diff of two stored dictionaries (of one model, or of two models with one tokenizer and residual width) on the
prompts stored under both: checks, alignment, per-prompt graph diffs, corpus summary, noise floor, and the record to
store.

    result = diff_stored(driver, database, Side(a_id, model_a, tc_a), Side(b_id, model_b, tc_b),
                         texts=None, reference=Side(a2_id, model_a, tc_a2))
    DiffStore(driver, "diffs.duckdb", database).write(to_record(result))

Shared prompts are matched by their stored text: the Prompt of A and the Prompt of B with the same text (prompt ids
differ, since they include the dictionary). `reference`, when given, is a second dictionary of A's model with graphs
of the same texts stored: its diff against A is the noise floor (`atlas.diff.noise`).

Bad input raises `DiffInputError` (or `AlignmentError`) before anything is computed or written: an identity that is
not in the store, different tokenizers, different residual widths or layer counts, an empty prompt intersection.
This module reads the store; writing is `atlas.storage.diffs`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from neo4j import Driver

from atlas.diff.align import (
    METHOD_ASSIGNMENT,
    METHOD_MUTUAL,
    Alignment,
    AlignmentThresholds,
    align_dictionaries,
    check_alignable,
    feature_activations,
)
from atlas.diff.graph_diff import CorpusSummary, GNode, Graph, PromptDiff, corpus_summary, diff_graphs
from atlas.diff.noise import NoiseFloor, changes_exceeding, noise_floor, prompts_exceeding
from atlas.models.loading import LoadedModel
from atlas.storage.diffs import DiffRecord
from atlas.storage.identities import transcoders
from atlas.storage.queries import AtlasQueries, Subgraph
from atlas.transcoders.base import EncoderStack

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


class DiffInputError(ValueError):
    """Two sides that cannot be diffed; the message names the problem. Nothing was computed or written."""


@dataclass(frozen=True)
class Side:
    transcoder_id: str
    model: LoadedModel
    transcoder: EncoderStack


@dataclass
class DiffResult:
    a: str
    b: str
    alignment: Alignment
    shared: list[tuple[str, str, str]]  # (text, prompt of A, prompt of B)
    diffs: list[PromptDiff]
    summary: CorpusSummary
    reference: str | None = None
    floor: NoiseFloor | None = None
    reference_alignment: Alignment | None = None
    reference_summary: CorpusSummary | None = None
    exceeding: list[str] = field(default_factory=list)  # A's prompt ids whose change exceeds the noise floor
    timings: dict[str, float] = field(default_factory=dict)


def _vocab(model: LoadedModel) -> dict[str, int]:
    return dict(model.tokenizer.get_vocab())


def check_sides(a: Side, b: Side) -> None:
    """Same tokenizer (vocabulary), residual width and layer count, or `DiffInputError` / `AlignmentError`."""
    if _vocab(a.model) != _vocab(b.model):
        raise DiffInputError(
            f"{a.transcoder_id} and {b.transcoder_id} belong to models with different tokenizers: prompts tokenize "
            "differently, so neither activations nor graph positions correspond (refused; no shared-token alignment "
            "is implemented)"
        )
    check_alignable(a.transcoder, b.transcoder)


def shared_prompts(
    driver: Driver, database: str, a: str, b: str, texts: Sequence[str] | None = None
) -> list[tuple[str, str, str]]:
    """(text, prompt id under A, prompt id under B) for every text stored under both (restricted to `texts`)."""
    known = {t["id"] for t in transcoders(driver, database)}
    for ident in (a, b):
        if ident not in known:
            listing = ", ".join(sorted(known)) or "none"
            raise DiffInputError(f"transcoder {ident!r} is not in the store (known: {listing})")
    if a == b:
        raise DiffInputError(f"both sides are {a!r}: a diff needs two different dictionaries")
    rows = driver.execute_query(
        "MATCH (p:Prompt) WHERE p.transcoder IN [$a, $b] AND ($texts IS NULL OR p.text IN $texts) "
        "RETURN p.transcoder AS t, p.text AS text, p.id AS id ORDER BY id",
        a=a, b=b, texts=None if texts is None else list(texts), database_=database,
    ).records  # fmt: skip
    by_side: dict[str, dict[str, str]] = {a: {}, b: {}}
    for r in rows:
        by_side[r["t"]].setdefault(r["text"], r["id"])
    shared = sorted(set(by_side[a]) & set(by_side[b]))
    if not shared:
        asked = "" if texts is None else f" among the {len(texts)} given prompt(s)"
        raise DiffInputError(f"no prompt text is stored under both {a} ({len(by_side[a])} prompt(s)) and {b} "
                             f"({len(by_side[b])} prompt(s)){asked}: the prompt intersection is empty")  # fmt: skip
    return [(text, by_side[a][text], by_side[b][text]) for text in shared]


def graph_from_subgraph(sub: Subgraph) -> Graph:
    """A stored prompt graph (`AtlasQueries.prompt_graph`) as a diff `Graph`."""
    position = {n.node_index: i for i, n in enumerate(sub.nodes)}
    nodes = []
    for n in sub.nodes:
        feature = int(n.key.rsplit("/", 1)[1]) if n.kind == "feature" and n.key else None
        nodes.append(GNode(n.kind, n.layer, n.position, feature, n.text))
    edges = [(position[e.source], position[e.target], e.weight) for e in sub.edges]
    return Graph(nodes, edges)


def _rename(alignment: Alignment) -> dict[tuple[int, int], int]:
    """(layer, B feature) → aligned A feature."""
    return {b: a[1] for a, b in alignment.one_to_one().items()}


MAX_CIRCUIT = 256  # circuit features per side the linear map is fitted on (the most frequent in the graphs)


def circuit_features(graphs: Sequence[Graph], limit: int = MAX_CIRCUIT) -> list[tuple[int, int]]:
    """(layer, feature) of the feature nodes of `graphs`, most graphs first (ties by key), at most `limit`."""
    counts: dict[tuple[int, int], int] = {}
    for graph in graphs:
        for key in {(n.layer, n.feature) for n in graph.nodes if n.kind == "feature"}:
            if key[0] is not None and key[1] is not None:
                counts[(int(key[0]), int(key[1]))] = counts.get((int(key[0]), int(key[1])), 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k))[:limit]


def group_masks(lengths: Sequence[int], groups: Sequence[str | None]) -> dict[str, np.ndarray]:
    """Boolean `(Σ lengths,)` token masks per group name, for texts of `lengths` tokens laid end to end (the layout of
    `feature_activations`); texts without a group belong to none."""
    masks: dict[str, np.ndarray] = {}
    offset = 0
    for length, group in zip(lengths, groups, strict=True):
        if group is not None:
            mask = masks.setdefault(group, np.zeros(sum(lengths), dtype=bool))
            mask[offset : offset + length] = True
        offset += length
    return masks


def _align(
    a: Side, b: Side, texts: Sequence[str], thresholds: AlignmentThresholds,
    graphs: Sequence[tuple[Graph, Graph]], groups: Mapping[str, str] | None = None,
) -> Alignment:  # fmt: skip
    """Align on activations over `texts`; the linear map is fitted on the features of the two sides' graphs;
    `groups` (text → group name, two groups or more) adds the per-group activation agreement."""
    acts_a = feature_activations(a.model, a.transcoder, texts)
    acts_b = feature_activations(b.model, b.transcoder, texts)
    masks = None
    if groups and len({groups[t] for t in texts if t in groups}) >= 2:
        lengths = [int(a.model.tokenize(t).shape[1]) - 1 for t in texts]  # non-BOS positions, as in the activations
        masks = group_masks(lengths, [groups.get(t) for t in texts])
    return align_dictionaries(a.transcoder, b.transcoder, acts_a=acts_a, acts_b=acts_b, thresholds=thresholds,
                              circuit_a=circuit_features([g for g, _ in graphs]),
                              circuit_b=circuit_features([g for _, g in graphs]), groups=masks)  # fmt: skip


def _graphs(queries: AtlasQueries, shared: Sequence[tuple[str, str, str]]) -> list[tuple[Graph, Graph]]:
    def read(pid: str) -> Graph:
        return graph_from_subgraph(queries.prompt_graph(pid, max_edges=10**7).single)

    return [(read(pid_a), read(pid_b)) for _, pid_a, pid_b in shared]


def _diffs(
    shared: Sequence[tuple[str, str, str]], graphs: Sequence[tuple[Graph, Graph]],
    rename: dict[tuple[int, int], int], progress: Progress | None, phase: str, **options: float,
) -> list[PromptDiff]:  # fmt: skip
    out = []
    for i, ((_, pid_a, _), (graph_a, graph_b)) in enumerate(zip(shared, graphs, strict=True)):
        out.append(diff_graphs(pid_a, graph_a, graph_b, rename, **options))
        if progress:
            progress(phase, i + 1, len(shared))
    return out


def diff_stored(
    driver: Driver,
    database: str,
    a: Side,
    b: Side,
    *,
    texts: Sequence[str] | None = None,
    reference: Side | None = None,
    thresholds: AlignmentThresholds | None = None,
    quantile: float = 0.95,
    min_weight: float = 1e-3,
    change_ratio: float = 0.5,
    progress: Progress | None = None,
    groups: Mapping[str, str] | None = None,
) -> DiffResult:
    """Diff dictionary `b` against `a` on their shared stored prompts (see the module docstring); `groups` maps
    prompt texts to group names (e.g. their corpus `task`) for the distributional classification."""
    thresholds = thresholds or AlignmentThresholds()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    check_sides(a, b)
    shared = shared_prompts(driver, database, a.transcoder_id, b.transcoder_id, texts)
    ref_shared: list[tuple[str, str, str]] = []
    if reference is not None:
        check_sides(a, reference)
        if _vocab(reference.model) != _vocab(a.model) or reference.model.info.name != a.model.info.name:
            raise DiffInputError("the noise reference must be a second dictionary of A's model")
        ref_shared = shared_prompts(driver, database, a.transcoder_id, reference.transcoder_id, texts)
    timings["checks"] = time.perf_counter() - started
    queries = AtlasQueries(driver, database=database, timeout_s=120.0)
    options = {"min_weight": min_weight, "change_ratio": change_ratio}
    started = time.perf_counter()
    graphs = _graphs(queries, shared)
    timings["read_graphs"] = time.perf_counter() - started
    started = time.perf_counter()
    alignment = _align(a, b, [t for t, _, _ in shared], thresholds, graphs, groups)
    timings["align"] = time.perf_counter() - started
    started = time.perf_counter()
    diffs = _diffs(shared, graphs, _rename(alignment), progress, "diff", **options)
    timings["graph_diff"] = time.perf_counter() - started
    result = DiffResult(a.transcoder_id, b.transcoder_id, alignment, shared, diffs, corpus_summary(diffs))
    if reference is not None:
        started = time.perf_counter()
        result.reference = reference.transcoder_id
        ref_graphs = _graphs(queries, ref_shared)
        result.reference_alignment = _align(a, reference, [t for t, _, _ in ref_shared], thresholds, ref_graphs)
        ref_diffs = _diffs(ref_shared, ref_graphs, _rename(result.reference_alignment), progress, "noise", **options)
        result.reference_summary = corpus_summary(ref_diffs)
        result.floor = noise_floor(ref_diffs, quantile=quantile)
        result.exceeding = prompts_exceeding(diffs, result.floor)
        timings["noise_floor"] = time.perf_counter() - started
    result.timings = timings
    logger.info("diff %s vs %s: %d prompts, phases %s", a.transcoder_id, b.transcoder_id, len(shared),
                {k: round(v, 2) for k, v in timings.items()})  # fmt: skip
    return result


def _key(transcoder_id: str, layer: int, feature: int) -> str:
    return f"{transcoder_id}/{layer}/{feature}"


def to_record(result: DiffResult) -> DiffRecord:
    """The `DiffRecord` of a result (every aligned pair, every prompt, every change)."""
    floor = result.floor
    changed = set(result.summary.changed)
    prompts, changes = [], []
    for (text, pid_a, pid_b), d in zip(result.shared, result.diffs, strict=True):
        prompts.append({
            "text": text, "prompt_a": pid_a, "prompt_b": pid_b, "similarity": d.similarity,
            "node_overlap": d.node_overlap, "edge_overlap": d.edge_overlap,
            "adjacency_similarity": d.adjacency_similarity, "spectral_similarity": d.spectral_similarity,
            "noise_dissimilarity": None if floor is None else floor.for_prompt(pid_a).dissimilarity,
            "exceeds_noise": None if floor is None else pid_a in result.exceeding,
            "max_divergence_layer": d.max_divergence_layer, "cluster": "changed" if pid_a in changed else "unchanged",
        })  # fmt: skip
        real_nodes, real_edges = changes_exceeding(d, floor) if floor else ([], [])
        real = {c.key for c in (*real_nodes, *real_edges)}
        for element, groups in (("node", (("only_a", d.nodes_only_a), ("only_b", d.nodes_only_b),
                                           ("changed", d.nodes_changed))),
                                ("edge", (("only_a", d.edges_only_a), ("only_b", d.edges_only_b),
                                          ("changed", d.edges_changed)))):  # fmt: skip
            for status, items in groups:
                changes += [{"prompt_a": pid_a, "element": element, "status": status, "key": c.key, "layer": c.layer,
                             "weight_a": c.weight_a, "weight_b": c.weight_b,
                             "exceeds_noise": None if floor is None else c.key in real} for c in items]  # fmt: skip
    alignments = [
        {"layer": p.layer, "key_a": _key(result.a, p.layer, p.a), "key_b": _key(result.b, p.layer, p.b),
         "decoder_cos": p.decoder_cos, "encoder_cos": p.encoder_cos, "act_corr": p.act_corr, "score": p.score,
         "method": p.method}
        for p in result.alignment.all_pairs()
    ]  # fmt: skip
    properties: dict[str, Any] = {
        "classification": result.alignment.classification,
        "matched_fraction": result.alignment.matched_fraction,
        "r2": result.alignment.r2,
        "n_prompts": len(result.shared),
        "mean_similarity": result.summary.mean_similarity,
        "noise_quantile": None if floor is None else floor.quantile,
        "noise_dissimilarity": None if floor is None else floor.prompt_dissimilarity,
        "noise_reference": result.reference,
        "n_exceeding": None if floor is None else len(result.exceeding),
        "max_divergence_layer": result.summary.max_divergence_layer,
    }
    return DiffRecord(result.a, result.b, properties, alignments, prompts, changes)


def one_to_one_fraction(alignment: Alignment) -> float:
    """Share of aligned pairs that are mutual nearest neighbours (a diagnostic printed by the CLI)."""
    pairs = [p for p in alignment.all_pairs() if p.method in (METHOD_MUTUAL, METHOD_ASSIGNMENT)]
    return float(np.mean([p.method == METHOD_MUTUAL for p in pairs])) if pairs else 0.0
