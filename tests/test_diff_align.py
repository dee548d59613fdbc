"""Feature alignment, graph diff and noise floor as pure functions on toy matrices and graphs, and the planted model's
dictionaries aligned in memory (no store)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from planted_model import D_MLP, planted_model, planted_transcoder

from atlas.diff.align import (
    CONVERTIBLE,
    DISTRIBUTIONAL,
    INJECTIVE,
    UNALIGNED,
    AlignmentError,
    AlignmentThresholds,
    align_dictionaries,
    assignment,
    classify,
    correlation_matrix,
    cosine_matrix,
    feature_activations,
    linear_map_r2,
    mutual_nearest,
    one_to_many,
)
from atlas.diff.behaviour import TransferError, effects_agree, transfer_ablation
from atlas.diff.graph_diff import GNode, Graph, corpus_summary, diff_graphs
from atlas.diff.noise import NoiseFloorError, bootstrap_interval, noise_floor, prompts_exceeding
from atlas.diff.run import group_masks
from atlas.transcoders.activations import ActivationConfig
from atlas.transcoders.base import TranscoderSpec
from atlas.transcoders.per_layer import PerLayerTranscoder
from atlas.validation.validate import TargetSpec


def _permuted_copy(n: int, d: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    perm = rng.permutation(n)
    b = np.empty_like(a)
    b[perm] = a + noise * rng.normal(size=a.shape) * np.linalg.norm(a, axis=1, keepdims=True) / np.sqrt(d)
    return a, b, perm


@pytest.mark.parametrize("chunk", [4096, 16])  # one exact solve, and the chunked path
def test_a_permuted_noised_copy_aligns_to_its_permutation(chunk: int) -> None:
    a, b, perm = _permuted_copy(120, 32, noise=0.3, seed=1)
    score = cosine_matrix(a, b)
    pairs = assignment(score, chunk=chunk)
    assert pairs == [(i, int(perm[i])) for i in range(120)]
    assert set(mutual_nearest(score)) == set(pairs)
    # heavy noise: the assignment is no longer the permutation, and its matched cosines fall
    a, b, perm = _permuted_copy(120, 32, noise=3.0, seed=1)
    noisy = assignment(cosine_matrix(a, b), chunk=chunk)
    assert sum(j == perm[i] for i, j in noisy) < 120


def test_cosine_and_correlation_basics() -> None:
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    c = cosine_matrix(a, a)
    assert c[0, 0] == pytest.approx(1.0) and c[1].tolist() == [0.0, 0.0, 0.0]
    assert c[0, 2] == pytest.approx(1 / np.sqrt(2))
    x = np.array([[0.0, 1.0, 5.0], [1.0, 3.0, 5.0], [2.0, 5.0, 5.0], [3.0, 7.0, 5.0]])
    r = correlation_matrix(x, x[:, ::-1] * -1)
    assert r[0, 1] == pytest.approx(-1.0) and r[2].tolist() == [0.0, 0.0, 0.0]  # a constant feature correlates 0
    with pytest.raises(AlignmentError, match="tokens"):
        correlation_matrix(x, x[:3])


def test_a_split_feature_is_kept_one_to_many() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 64))
    # B: features 0..4 copy A, except A's feature 2 is split into two B features near it (2 and 5)
    b = np.vstack([a, a[2] + 0.6 * rng.normal(size=64)])
    b[2] = a[2] + 0.6 * rng.normal(size=64)
    score = cosine_matrix(a, b)
    assert one_to_many(score, 0.5) == {2: [2, 5]}
    assert one_to_many(score.T, 0.5) == {}
    assert len(assignment(score)) == 5


def test_linear_map_r2_and_classification() -> None:
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(400, 6)))
    mixing = rng.normal(size=(6, 4))
    _, r2 = linear_map_r2(x, x @ mixing + 0.5)
    assert r2 == pytest.approx(1.0, abs=1e-4)
    _, r2_noise = linear_map_r2(x, rng.normal(size=(400, 4)))
    assert r2_noise < 0.1
    t = AlignmentThresholds()
    assert classify(0.9, None, {}, t) == INJECTIVE
    assert classify(0.3, 0.95, {}, t) == CONVERTIBLE
    assert classify(0.3, 0.2, {"capitals": 0.9, "code": 0.1}, t) == DISTRIBUTIONAL
    assert classify(0.3, 0.2, {"capitals": 0.1, "code": 0.1}, t) == UNALIGNED


def test_planted_dictionaries_align_through_a_permutation() -> None:
    order = [[3, 0, 5, 1, 2, 4], [2, 4, 0, 5, 1, 3]]
    model_a, model_b = planted_model(), planted_model(rewired=True, order=order)
    tc_a, tc_b = planted_transcoder(model_a), planted_transcoder(model_b)
    texts = ["xyzA", "qA", "hello A", "abc", "xyz q"]
    acts_a, acts_b = feature_activations(model_a, tc_a, texts), feature_activations(model_b, tc_b, texts)
    assert acts_a.shape == (2, sum(len(t) for t in texts), D_MLP)
    alignment = align_dictionaries(tc_a, tc_b, acts_a=acts_a, acts_b=acts_b,
                                   circuit_a=[(0, 0), (1, 0)], circuit_b=[(0, 3), (1, 2)])  # fmt: skip
    assert alignment.one_to_one() == {(layer, f): (layer, order[layer][f]) for layer in range(2) for f in range(3)}
    assert alignment.classification == INJECTIVE and alignment.matched_fraction == 1.0
    assert alignment.r2 is not None and alignment.r2 > 0.99
    hop2 = next(p for p in alignment.all_pairs() if (p.layer, p.a) == (1, 0))
    # the rewired hop 2 writes the same direction but reads another: decoder cosine 1, encoder cosine 0
    assert hop2.decoder_cos == pytest.approx(1.0) and abs(hop2.encoder_cos) < 1e-6
    # without activations the decoders alone find the same permutation
    assert align_dictionaries(tc_a, tc_b).one_to_one() == alignment.one_to_one()


def test_different_widths_are_refused() -> None:
    model = planted_model()
    narrow = PerLayerTranscoder(TranscoderSpec("plt", 2, 8, D_MLP, activation=ActivationConfig("relu")))
    with pytest.raises(AlignmentError, match="residual widths differ"):
        align_dictionaries(planted_transcoder(model), narrow)


def _chain(weights: list[float], features: list[int]) -> Graph:
    """token → f(0, features[0]) → f(1, features[1]) → logit, at position 1."""
    nodes = [GNode("token", None, 1, None, "A"), GNode("feature", 0, 1, features[0]),
             GNode("feature", 1, 1, features[1]), GNode("logit", None, 1, None, "B")]  # fmt: skip
    return Graph(nodes, [(0, 1, weights[0]), (1, 2, weights[1]), (2, 3, weights[2])])


def test_graph_diff_on_toy_graphs() -> None:
    a = _chain([1.0, 2.0, 1.0], [0, 0])
    same = diff_graphs("p", a, _chain([1.0, 2.0, 1.0], [7, 9]), {(0, 7): 0, (1, 9): 0})
    assert (same.node_overlap, same.edge_overlap, same.adjacency_similarity) == (1.0, 1.0, 1.0)
    assert not (same.nodes_only_a or same.nodes_only_b or same.edges_changed)
    assert same.max_divergence_layer is None
    # B routes through another layer-1 feature with no partner in A: exactly that feature's node and edges differ
    moved = diff_graphs("q", a, _chain([1.0, 2.0, 1.0], [7, 4]), {(0, 7): 0})
    assert [c.key for c in moved.nodes_only_a] == ["f1/0@1"] and [c.key for c in moved.nodes_only_b] == ["f1/b4@1"]
    assert {c.key for c in moved.edges_only_a} == {"f0/0@1 -> f1/0@1", "f1/0@1 -> logit:B"}
    assert moved.max_divergence_layer == "1" and moved.similarity < same.similarity
    # a sign flip is a change
    flipped = diff_graphs("p", a, _chain([1.0, -2.0, 1.0], [0, 0]), {(0, 0): 0, (1, 0): 0})
    assert [c.key for c in flipped.edges_changed] == ["f0/0@1 -> f1/0@1"]
    summary = corpus_summary([same, moved])
    assert summary.changed == ["q"] and summary.unchanged == ["p"] and summary.max_divergence_layer == "1"
    assert corpus_summary([same]).changed == []


def test_noise_floor_and_bootstrap() -> None:
    a = _chain([1.0, 2.0, 1.0], [0, 0])
    reference = [diff_graphs(f"r{i}", a, _chain([1.0, 2.0 + 0.05 * i, 1.0], [0, 0]), {(0, 0): 0, (1, 0): 0})
                 for i in range(5)]  # fmt: skip
    floor = noise_floor(reference)
    assert 0 < floor.prompt_dissimilarity < 0.05 and floor.for_prompt("r3") == floor.per_prompt["r3"]
    assert floor.for_prompt("real") == floor.pooled
    real = diff_graphs("real", a, _chain([1.0, 2.0, 1.0], [0, 5]), {(0, 0): 0})
    small = diff_graphs("small", a, _chain([1.0, 2.05, 1.0], [0, 0]), {(0, 0): 0, (1, 0): 0})
    assert prompts_exceeding([real, small], floor) == ["real"]
    mean, low, high = bootstrap_interval([0.1, 0.2, 0.3, 0.4])
    assert low <= mean <= high and mean == pytest.approx(0.25)
    with pytest.raises(NoiseFloorError):
        noise_floor([])


def test_feature_activations_drop_bos() -> None:
    model = planted_model()
    acts = feature_activations(model, planted_transcoder(model), ["A"])
    assert acts.shape == (2, 1, D_MLP) and acts[0, 0, 0] > 0  # hop 1 fires on 'A'
    assert torch.is_tensor(torch.as_tensor(acts))


def test_ablation_transfers_where_the_circuit_is_shared_and_not_where_it_was_rewired() -> None:
    order = [[3, 0, 5, 1, 2, 4], [2, 4, 0, 5, 1, 3]]
    model_a, model_b = planted_model(), planted_model(rewired=True, order=order)
    tc_a, tc_b = planted_transcoder(model_a), planted_transcoder(model_b)
    mapping = align_dictionaries(tc_a, tc_b).one_to_one()
    texts = ["xyzA", "qA"]
    hop2 = transfer_ablation(model_a, tc_a, model_b, tc_b, [(1, 0)], mapping, texts, TargetSpec.token("B"))
    assert hop2.circuit_b == ((1, 2),) and hop2.agreement == 1.0
    assert all(p.effect_a > 0.9 and p.effect_b > 0.9 for p in hop2.prompts)
    # hop 1 carries the target in A; in B hop 2 reads the token itself, so ablating hop 1's partner does not remove it
    hop1 = transfer_ablation(model_a, tc_a, model_b, tc_b, [(0, 0)], mapping, texts, TargetSpec.token("B"))
    assert hop1.circuit_b == ((0, 3),) and hop1.agreement == 0.0
    assert all(p.effect_a > 0.9 and p.effect_b < 0.1 for p in hop1.prompts)
    with pytest.raises(TransferError, match="no feature"):
        transfer_ablation(model_a, tc_a, model_b, tc_b, [(0, 4)], mapping, texts, TargetSpec.token("B"))


def test_effects_agree() -> None:
    assert effects_agree(0.9, 0.8) and not effects_agree(0.9, 0.5) and not effects_agree(0.9, -0.9)
    assert effects_agree(0.01, -0.02) and not effects_agree(float("nan"), 0.5)


def test_group_masks_lay_groups_over_texts_end_to_end() -> None:
    masks = group_masks([2, 3, 1], ["x", None, "y"])
    assert masks["x"].tolist() == [True, True, False, False, False, False]
    assert masks["y"].tolist() == [False, False, False, False, False, True]
    assert set(masks) == {"x", "y"}
