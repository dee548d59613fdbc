"""Export attribution graphs: circuit-tracer/Neuronpedia graph JSON (schema 1) and Parquet node/edge tables.

`prune_graph` applies influence pruning and returns the masks plus graph scores before and after. The JSON keeps
the nodes touching a kept edge plus every token and target node, as circuit-tracer's `create_graph_files` does,
with the fixed error ids (`{layer}_-1_{pos}`) that cannot collide with feature ids. Parquet tables follow
`atlas.attribution.graph.NODE_SCHEMA` / `EDGE_SCHEMA`, the storage layer's input.
This module formats; it does not attribute.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from atlas.attribution.graph import GRAPH_SCHEMA_VERSION, AttributionGraph
from atlas.attribution.nodes import ErrorNode, FeatureNode, LogitNode, NodeKind, TokenNode, frontend_id
from atlas.attribution.pruning import GraphScores, PruneResult, graph_scores, prune


@dataclass
class PrunedGraph:
    graph: AttributionGraph
    result: PruneResult
    node_threshold: float
    edge_threshold: float
    scores_unpruned: GraphScores
    scores_pruned: GraphScores

    @property
    def n_nodes(self) -> int:
        return int(self.result.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self.result.edge_mask.sum())


def prune_graph(graph: AttributionGraph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    result = prune(
        graph.edges,
        graph.index,
        graph.target_probabilities,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    return PrunedGraph(
        graph=graph,
        result=result,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        scores_unpruned=graph_scores(graph.edges, graph.index, graph.target_probabilities),
        scores_pruned=graph_scores(graph.edges.select(result.edge_mask), graph.index, graph.target_probabilities),
    )


def prompt_id(graph: AttributionGraph) -> str:
    """Stable id of a graph's inputs: model, transcoders, tokens and attribution settings."""
    settings = {k: v for k, v in graph.settings.items() if k != "timings"}
    key = json.dumps([graph.model_name, graph.transcoder_id, graph.tokens, settings], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def to_circuit_tracer_json(pruned: PrunedGraph, *, slug: str, scan: str | None = None) -> dict[str, Any]:
    """The graph JSON circuit-tracer's and Neuronpedia's frontends read (schema version 1)."""
    graph, mask = pruned.graph, pruned.result
    index = graph.index
    L, n_pos = index.n_layers, index.n_pos
    vocab_size = int(graph.settings.get("vocab_size", 0))
    edges = graph.edges.select(mask.edge_mask)
    touched = torch.zeros(index.n_nodes, dtype=torch.bool)
    touched[edges.source] = True
    touched[edges.target] = True
    touched[index.slice(NodeKind.TOKEN)] = True
    touched[index.slice(NodeKind.LOGIT)] = True
    keep = touched & mask.node_mask
    nodes = []
    logit_start = index.slice(NodeKind.LOGIT).start
    for i in keep.nonzero().flatten().tolist():
        node = index.node_at(i)
        entry: dict[str, Any] = {
            "node_id": frontend_id(node, L),
            "ctx_idx": node.position,
            "reverse_ctx_idx": n_pos - 1 - node.position,
            "run_idx": 0,
            "token_prob": 0.0,
            "is_target_logit": False,
            "clerp": "",
            "influence": float(mask.cumulative_scores[i]),
            "activation": None,
        }
        if isinstance(node, FeatureNode):
            entry.update(
                feature=cantor(node.layer, node.feature),
                layer=str(node.layer),
                feature_type="cross layer transcoder",
                jsNodeId=f"{node.layer}_{node.feature}-0",
                activation=float(graph.activations[i]),
            )
        elif isinstance(node, ErrorNode):
            entry.update(
                feature=-1,
                layer=str(node.layer),
                feature_type="mlp reconstruction error",
                jsNodeId=f"{node.layer}_-1-{node.position}",
            )
        elif isinstance(node, TokenNode):
            entry.update(
                feature=node.position,
                layer="E",
                feature_type="embedding",
                jsNodeId=f"E_{node.token_id}-{node.position}",
                clerp=graph.token_strings[node.position],
            )
        elif isinstance(node, LogitNode):
            j = i - logit_start
            probability = float(graph.target_probabilities[j])
            token = node.token_id if node.token_id is not None else vocab_size + j
            entry.update(
                feature=token,
                layer=str(L + 1),
                feature_type="logit",
                token_prob=probability,
                is_target_logit=j == 0,
                jsNodeId=f"L_{token}-{node.position}",
                clerp=f'Output "{node.label}" (p={probability:.3f})',
                influence=None,
            )
        nodes.append(entry)
    ids = [frontend_id(index.node_at(i), L) for i in range(index.n_nodes)]
    links = [
        {"source": ids[s], "target": ids[t], "weight": w}
        for s, t, w in zip(edges.source.tolist(), edges.target.tolist(), edges.weight.tolist(), strict=True)
    ]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan or graph.transcoder_id,
            "transcoder_list": [],
            "prompt_tokens": graph.token_strings,
            "prompt": graph.prompt,
            "node_threshold": pruned.node_threshold,
            "schema_version": GRAPH_SCHEMA_VERSION,
            "info": {
                "generator": "circuit-atlas",
                "model": graph.model_name,
                "replacement_score": pruned.scores_pruned.replacement,
                "completeness_score": pruned.scores_pruned.completeness,
            },
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


def write_circuit_tracer_json(pruned: PrunedGraph, path: str | Path, *, slug: str, scan: str | None = None) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(to_circuit_tracer_json(pruned, slug=slug, scan=scan)))
    tmp.replace(target)
    return target


def write_parquet(pruned: PrunedGraph, directory: str | Path) -> tuple[Path, Path]:
    """`nodes.parquet` and `edges.parquet` of the pruned graph (kept nodes and edges, original node indices)."""
    graph, result = pruned.graph, pruned.result
    pid = prompt_id(graph)
    nodes, edges = graph.to_tables(pid, influence=result.cumulative_scores)
    nodes = nodes.filter(result.node_mask.numpy())
    edges = edges.filter(result.edge_mask.numpy())
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = root / "nodes.parquet", root / "edges.parquet"
    for table, path in zip((nodes, edges), paths, strict=True):
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
    return paths
