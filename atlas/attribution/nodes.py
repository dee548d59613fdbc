"""Typed node ids and the one object that owns an attribution graph's node layout.

Nodes are ordered `[features | errors (layer-major) | tokens | logits]`, circuit-tracer's order, so exported
adjacency indices line up with its tools. Every offset is computed here and nowhere else: code asks a `NodeIndex`
for `index_of(node)`, `node_at(i)` or a kind's `slice`, never re-derives `n_features + layer * n_pos + pos`.
Ids are dataclasses, not strings; the string forms circuit-tracer's frontend expects (with the fixed error ids,
`{layer}_-1_{pos}`, that cannot collide with feature ids) are produced in one place, `frontend_id`.
This module is pure bookkeeping: no tensors of activations, no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class NodeKind(StrEnum):
    FEATURE = "feature"
    ERROR = "error"
    TOKEN = "token"
    LOGIT = "logit"


@dataclass(frozen=True, order=True)
class FeatureNode:
    """An active transcoder feature: `feature` of source `layer` at `position`."""

    layer: int
    position: int
    feature: int
    kind: NodeKind = NodeKind.FEATURE


@dataclass(frozen=True, order=True)
class ErrorNode:
    """The reconstruction error of MLP output `layer` at `position`."""

    layer: int
    position: int
    kind: NodeKind = NodeKind.ERROR


@dataclass(frozen=True, order=True)
class TokenNode:
    """The embedding of input token `token_id` at `position`."""

    position: int
    token_id: int
    kind: NodeKind = NodeKind.TOKEN


@dataclass(frozen=True, order=True)
class LogitNode:
    """An attribution target read out at `position`: a vocabulary logit, or a custom direction (`token_id` None)."""

    position: int
    token_id: int | None
    label: str
    kind: NodeKind = NodeKind.LOGIT


NodeId = FeatureNode | ErrorNode | TokenNode | LogitNode


class NodeIndex:
    """Layout of one graph's nodes: `n_features` selected features, `n_layers × n_pos` errors, tokens, logits."""

    def __init__(
        self,
        features: Sequence[FeatureNode],
        *,
        n_layers: int,
        tokens: Sequence[int],
        logits: Sequence[LogitNode],
    ) -> None:
        self.features = tuple(features)
        self.n_layers = n_layers
        self.tokens = tuple(tokens)
        self.logits = tuple(logits)
        self._feature_index = {node: i for i, node in enumerate(self.features)}
        if len(self._feature_index) != len(self.features):
            raise ValueError("duplicate feature nodes in a NodeIndex")
        for node in self.features:
            if not (0 <= node.layer < n_layers and 0 <= node.position < self.n_pos):
                raise ValueError(f"{node} is outside {n_layers} layers × {self.n_pos} positions")
        self._logit_index = {node: i for i, node in enumerate(self.logits)}

    # --- sizes and slices ---------------------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logits)

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    def slice(self, kind: NodeKind) -> slice:
        """The contiguous index range of one kind of node."""
        starts = {
            NodeKind.FEATURE: 0,
            NodeKind.ERROR: self.n_features,
            NodeKind.TOKEN: self.n_features + self.n_errors,
            NodeKind.LOGIT: self.n_features + self.n_errors + self.n_pos,
        }
        sizes = {
            NodeKind.FEATURE: self.n_features,
            NodeKind.ERROR: self.n_errors,
            NodeKind.TOKEN: self.n_pos,
            NodeKind.LOGIT: self.n_logits,
        }
        return slice(starts[kind], starts[kind] + sizes[kind])

    # --- id ↔ index ---------------------------------------------------------------------------------------
    def index_of(self, node: NodeId) -> int:
        if isinstance(node, FeatureNode):
            if node not in self._feature_index:
                raise KeyError(f"{node} is not a selected feature of this graph")
            return self._feature_index[node]
        if isinstance(node, ErrorNode):
            self._check_position(node.position)
            if not 0 <= node.layer < self.n_layers:
                raise KeyError(f"{node}: layer out of range")
            return self.slice(NodeKind.ERROR).start + node.layer * self.n_pos + node.position
        if isinstance(node, TokenNode):
            self._check_position(node.position)
            if self.tokens[node.position] != node.token_id:
                raise KeyError(f"{node}: the token at position {node.position} is {self.tokens[node.position]}")
            return self.slice(NodeKind.TOKEN).start + node.position
        if node not in self._logit_index:
            raise KeyError(f"{node} is not a target of this graph")
        return self.slice(NodeKind.LOGIT).start + self._logit_index[node]

    def node_at(self, index: int) -> NodeId:
        if not 0 <= index < self.n_nodes:
            raise IndexError(f"node index {index} out of range ({self.n_nodes} nodes)")
        errors, tokens, logits = self.slice(NodeKind.ERROR), self.slice(NodeKind.TOKEN), self.slice(NodeKind.LOGIT)
        if index < errors.start:
            return self.features[index]
        if index < tokens.start:
            layer, position = divmod(index - errors.start, self.n_pos)
            return ErrorNode(layer, position)
        if index < logits.start:
            position = index - tokens.start
            return TokenNode(position, self.tokens[position])
        return self.logits[index - logits.start]

    def kind_at(self, index: int) -> NodeKind:
        return self.node_at(index).kind

    def _check_position(self, position: int) -> None:
        if not 0 <= position < self.n_pos:
            raise KeyError(f"position {position} out of range ({self.n_pos} positions)")


def frontend_id(node: NodeId, n_layers: int) -> str:
    """The `node_id` circuit-tracer's and Neuronpedia's graph JSON uses (schema 1, fixed error ids)."""
    if isinstance(node, FeatureNode):
        return f"{node.layer}_{node.feature}_{node.position}"
    if isinstance(node, ErrorNode):
        return f"{node.layer}_-1_{node.position}"
    if isinstance(node, TokenNode):
        return f"E_{node.token_id}_{node.position}"
    return f"{n_layers + 1}_{node.token_id if node.token_id is not None else node.label}_{node.position}"
