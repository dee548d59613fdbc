"""The attribution graph as data, and its columnar form: the contract between attribution and storage.

`AttributionGraph` holds one prompt's graph: the `NodeIndex`, per-node values, sparse edges
`adjacency[target, source]`, target probabilities, and provenance. `to_tables()` turns it into two Arrow tables
whose schemas (`NODE_SCHEMA`, `EDGE_SCHEMA`) are written down here once; the storage layer reads exactly these
columns (and Parquet files of them). Feature identity across prompts is `(transcoder_id, layer, feature)`:
`feature_key` gives the stable string form, independent of position and prompt.
This module converts and describes; it computes no attributions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from atlas.attribution.nodes import ErrorNode, FeatureNode, LogitNode, NodeIndex, TokenNode, frontend_id
from atlas.attribution.pruning import SparseEdges

GRAPH_SCHEMA_VERSION = 1

# One row per node of one prompt graph.
NODE_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),  # stable hash of (model, transcoders, tokens, settings)
        pa.field("node_index", pa.int32(), nullable=False),  # position in the graph's NodeIndex layout
        pa.field("node_id", pa.string(), nullable=False),  # circuit-tracer frontend id (fixed error ids)
        pa.field("kind", pa.string(), nullable=False),  # feature | error | token | logit
        pa.field("layer", pa.int32()),  # features, errors (null for tokens and logits)
        pa.field("position", pa.int32(), nullable=False),  # token position in the prompt
        pa.field("feature", pa.int32()),  # feature index within its layer (features only)
        pa.field("feature_key", pa.string()),  # "{transcoder_id}/{layer}/{feature}": identity across prompts
        pa.field("token_id", pa.int32()),  # tokens; logits (null for a custom direction)
        pa.field("token", pa.string()),  # decoded token text (tokens, logits) or target label
        pa.field("activation", pa.float32()),  # features: activation; errors: ‖error vector‖; logits: logit value
        pa.field("probability", pa.float32()),  # logits: target weight (probability)
        pa.field("influence", pa.float32()),  # cumulative influence score (as circuit-tracer's JSON `influence`)
    ]
)

# One row per kept edge; weights are raw direct effects (not normalised).
EDGE_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("source", pa.int32(), nullable=False),  # node_index of the source
        pa.field("target", pa.int32(), nullable=False),  # node_index of the target
        pa.field("weight", pa.float32(), nullable=False),
    ]
)


def feature_key(transcoder_id: str, layer: int, feature: int) -> str:
    """Identity of a feature across prompts (and positions)."""
    return f"{transcoder_id}/{layer}/{feature}"


@dataclass
class AttributionGraph:
    """One prompt's attribution graph. Edges are sparse; node values follow `index` order."""

    prompt: str
    tokens: list[int]
    token_strings: list[str]
    index: NodeIndex
    edges: SparseEdges
    activations: torch.Tensor  # (n_features,) activation of each selected feature node
    target_probabilities: torch.Tensor  # (n_logits,) weights of the targets
    target_logits: torch.Tensor  # (n_logits,) demeaned logit (or direction value) of each target
    error_norms: torch.Tensor  # (n_layers, n_pos) ‖error vector‖ of each error node
    model_name: str
    transcoder_id: str
    settings: dict[str, Any] = field(default_factory=dict)
    folded_features: dict[str, Any] = field(default_factory=dict)  # how unvisited features were accounted for

    def node_strings(self) -> list[str]:
        return [frontend_id(self.index.node_at(i), self.index.n_layers) for i in range(self.index.n_nodes)]

    def to_tables(self, prompt_id: str, influence: torch.Tensor | None = None) -> tuple[pa.Table, pa.Table]:
        """Arrow tables `(nodes, edges)` in `NODE_SCHEMA` / `EDGE_SCHEMA`."""
        index = self.index
        rows: dict[str, list[Any]] = {name: [] for name in NODE_SCHEMA.names}
        for i in range(index.n_nodes):
            node = index.node_at(i)
            layer = feature = token_id = token = activation = probability = None
            if isinstance(node, FeatureNode):
                layer, feature = node.layer, node.feature
                activation = float(self.activations[i])
            elif isinstance(node, ErrorNode):
                layer = node.layer
                activation = float(self.error_norms[node.layer, node.position])
            elif isinstance(node, TokenNode):
                token_id, token = node.token_id, self.token_strings[node.position]
            elif isinstance(node, LogitNode):
                token_id, token = node.token_id, node.label
                j = i - index.slice(node.kind).start
                activation = float(self.target_logits[j])
                probability = float(self.target_probabilities[j])
            rows["prompt_id"].append(prompt_id)
            rows["node_index"].append(i)
            rows["node_id"].append(frontend_id(node, index.n_layers))
            rows["kind"].append(node.kind.value)
            rows["layer"].append(layer)
            rows["position"].append(node.position)
            rows["feature"].append(feature)
            rows["feature_key"].append(
                feature_key(self.transcoder_id, node.layer, node.feature) if isinstance(node, FeatureNode) else None
            )
            rows["token_id"].append(token_id)
            rows["token"].append(token)
            rows["activation"].append(activation)
            rows["probability"].append(probability)
            rows["influence"].append(None if influence is None else float(influence[i]))
        nodes = pa.Table.from_pydict(rows, schema=NODE_SCHEMA)
        edges = pa.Table.from_pydict(
            {
                "prompt_id": [prompt_id] * int(self.edges.weight.numel()),
                "source": self.edges.source.to(torch.int32).tolist(),
                "target": self.edges.target.to(torch.int32).tolist(),
                "weight": self.edges.weight.float().tolist(),
            },
            schema=EDGE_SCHEMA,
        )
        return nodes, edges
