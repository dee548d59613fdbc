"""Node layout and pruning math, checked on hand-computed toy graphs."""

from __future__ import annotations

import pytest
import torch

from atlas.attribution.nodes import ErrorNode, FeatureNode, LogitNode, NodeIndex, NodeKind, TokenNode, frontend_id
from atlas.attribution.pruning import (
    SparseEdges,
    find_threshold,
    graph_scores,
    influence,
    logit_seed,
    normalise,
    prune,
)

F0, F1 = FeatureNode(0, 0, 3), FeatureNode(0, 1, 4)
TARGET = LogitNode(1, 9, " x")


def toy() -> tuple[NodeIndex, SparseEdges]:
    """F0=0 F1=1 E(0,0)=2 E(0,1)=3 T0=4 T1=5 L=6, edges as (target, source, weight)."""
    index = NodeIndex([F0, F1], n_layers=1, tokens=[5, 7], logits=[TARGET])
    triples = [(0, 4, 2.0), (1, 5, 1.0), (1, 0, 1.0), (1, 2, 2.0), (6, 1, 3.0), (6, 5, 1.0), (6, 3, -1.0)]
    target, source, weight = zip(*triples, strict=True)
    return index, SparseEdges(torch.tensor(target), torch.tensor(source), torch.tensor(weight), index.n_nodes)


def test_node_index_layout_round_trips() -> None:
    index, _ = toy()
    assert index.n_nodes == 7
    assert index.slice(NodeKind.ERROR) == slice(2, 4) and index.slice(NodeKind.LOGIT) == slice(6, 7)
    nodes = [F0, F1, ErrorNode(0, 0), ErrorNode(0, 1), TokenNode(0, 5), TokenNode(1, 7), TARGET]
    assert [index.node_at(i) for i in range(7)] == nodes
    assert [index.index_of(node) for node in nodes] == list(range(7))
    with pytest.raises(KeyError):
        index.index_of(FeatureNode(0, 0, 99))
    with pytest.raises(KeyError):
        index.index_of(TokenNode(0, 6))


def test_frontend_ids_do_not_collide() -> None:
    """circuit-tracer's old error id `0_{l}_{p}` equalled the id of layer-0 feature l at p (its issue #78)."""
    feature, error = FeatureNode(0, 2, 1), ErrorNode(1, 2)
    assert frontend_id(feature, 1) == "0_1_2"
    assert frontend_id(error, 1) == "1_-1_2"
    assert frontend_id(TokenNode(0, 5), 1) == "E_5_0" and frontend_id(TARGET, 1) == "2_9_1"


def test_normalise_makes_incoming_abs_weights_sum_to_one() -> None:
    _, edges = toy()
    dense = normalise(edges).to_dense()
    assert dense[1].tolist() == [0.25, 0.0, 0.5, 0.0, 0.0, 0.25, 0.0]
    torch.testing.assert_close(dense[6], torch.tensor([0.0, 0.6, 0.0, 0.2, 0.0, 0.2, 0.0]))


def test_influence_by_hand_and_against_the_matrix_inverse() -> None:
    index, edges = toy()
    seed = logit_seed(index, torch.tensor([1.0]))
    result = influence(normalise(edges), seed)
    torch.testing.assert_close(result, torch.tensor([0.15, 0.6, 0.3, 0.2, 0.15, 0.35, 0.0]))
    a = normalise(edges).to_dense().double()
    closed_form = seed.double() @ (torch.linalg.inv(torch.eye(7, dtype=torch.float64) - a) - torch.eye(7))
    torch.testing.assert_close(result.double(), closed_form)


def test_influence_detects_cycles() -> None:
    cycle = SparseEdges(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([1.0, 1.0]), 2)
    with pytest.raises(RuntimeError, match="acyclic"):
        influence(cycle, torch.tensor([1.0, 0.0]), max_iterations=50)


def test_find_threshold() -> None:
    scores = torch.tensor([0.1, 0.6, 0.3])
    assert find_threshold(scores, 0.5) == pytest.approx(0.6)
    assert find_threshold(scores, 0.8) == pytest.approx(0.3)
    assert find_threshold(scores, 0.95) == pytest.approx(0.1)


def test_graph_scores_by_hand() -> None:
    index, edges = toy()
    scores = graph_scores(edges, index, torch.tensor([1.0]))
    assert scores.replacement == pytest.approx(0.5)
    assert scores.completeness == pytest.approx(2.25 / 2.75)


def test_prune_by_hand() -> None:
    index, edges = toy()
    loose = prune(edges, index, torch.tensor([1.0]), node_threshold=0.8, edge_threshold=0.98)
    # F0 (influence 0.15) falls below the node threshold (0.2); its edges go with it
    assert loose.node_mask.tolist() == [False, True, True, True, True, True, True]
    assert loose.edge_mask.tolist() == [False, True, False, True, True, True, True]
    tight = prune(edges, index, torch.tensor([1.0]), node_threshold=0.8, edge_threshold=0.6)
    # edge scores .2 .4 .6 .2 .2 → keep L←F1 and F1←E(0,0); E(0,1) loses its only edge and goes
    assert tight.edge_mask.tolist() == [False, False, False, True, True, False, False]
    assert tight.node_mask.tolist() == [False, True, True, False, True, True, True]
    torch.testing.assert_close(loose.cumulative_scores[1], torch.tensor(0.6 / 1.75))


def test_prune_memory_follows_edges_not_nodes_squared() -> None:
    """400k nodes prune without any n_nodes² allocation (a dense adjacency would need 640 GB)."""
    n_pos, n_features, fan_in = 200_000, 1_000, 200
    features = [FeatureNode(0, j, 0) for j in range(n_features)]
    index = NodeIndex(features, n_layers=1, tokens=[0] * n_pos, logits=[LogitNode(n_pos - 1, 1, "y")])
    tokens, logit = index.slice(NodeKind.TOKEN), index.slice(NodeKind.LOGIT).start
    feature_of_token = torch.arange(n_pos) // fan_in
    target = torch.cat([feature_of_token, torch.full((n_features,), logit)])
    source = torch.cat([torch.arange(tokens.start, tokens.stop), torch.arange(n_features)])
    weight = torch.cat([torch.ones(n_pos), torch.linspace(1.0, 2.0, n_features)])
    edges = SparseEdges(target, source, weight, index.n_nodes)
    result = prune(edges, index, torch.tensor([1.0]))
    node_influence = influence(normalise(edges), logit_seed(index, torch.tensor([1.0])))
    assert node_influence[tokens].sum().item() == pytest.approx(1.0, rel=1e-4)
    kept_features = int(result.node_mask[:n_features].sum())
    assert 0 < kept_features < n_features  # the weakest features fall below the 0.8 node threshold
    assert bool(result.node_mask[tokens].all())
