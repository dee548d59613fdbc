"""Dictionary cards: pooled reconstruction sums on toy tensors, the card in atlas.json, and a card measured on a tiny
model against what its figures must be by construction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atlas.attribution.context import build_context
from atlas.attribution.engine import AttributionConfig, attribute
from atlas.attribution.export import prune_graph
from atlas.attribution.quality import ReconstructionSums, evaluate_dictionary
from atlas.models import LoadedModel
from atlas.training.splicing import spliced_cross_entropy
from atlas.transcoders import TranscoderSpec, build_transcoder, save_transcoder, transcoder_identity
from atlas.transcoders.card import DictionaryCard, card_from_metadata, read_card, recipe_summary, write_card

PROMPTS = ("The Eiffel Tower is in the city of", "two plus three is", "When Mary and John went out, John gave it to")


def test_pooled_sums_equal_the_direct_figures_whatever_the_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(3, 40, 8, generator=gen) * torch.tensor([1.0, 5.0, 0.2])[:, None, None] + 2.0
    reconstruction = targets + 0.3 * torch.randn(3, 40, 8, generator=gen)
    activations = torch.relu(torch.randn(3, 40, 6, generator=gen) - 1.0)
    activations[:, :, 5] = 0  # one feature never fires at any layer
    whole = ReconstructionSums.empty(3, 8, 6)
    whole.add(targets, reconstruction, activations)
    chunked = ReconstructionSums.empty(3, 8, 6)
    for part in (slice(0, 7), slice(7, 31), slice(31, 40)):
        chunked.add(targets[:, part], reconstruction[:, part], activations[:, part])
    t, r = targets.double(), reconstruction.double()
    direct = (t - r).pow(2).sum(dim=(1, 2)) / (t - t.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
    for sums in (whole, chunked):
        assert torch.allclose(sums.fvu(), direct, rtol=1e-9)
        assert torch.allclose(sums.l0(), (activations != 0).double().sum(-1).mean(-1), rtol=1e-12)
        expected_dead = float((~(activations != 0).any(dim=1)).double().mean())
        assert sums.dead_fraction() == pytest.approx(expected_dead) and expected_dead >= 1 / 6


def test_card_from_training_metrics_and_its_warning() -> None:
    meta = {
        "training": {"kind": "clt", "activation": "jumprelu", "n_features": 64, "steps": 100, "sparsity_lambda": 1.0,
                     "stream": {"batch_size": 512}},
        "metrics": {"fvu_mean": 0.65, "l0": [10.0, 20.0, 30.0], "dead_fraction": 0.1, "ce_clean": 4.675,
                    "ce_spliced": 11.864, "ce_delta": 7.189, "tokens": 51200, "eval_tokens": 504},
    }  # fmt: skip
    card = card_from_metadata(meta)
    assert card.l0_mean == pytest.approx(20.0) and card.ce_delta == pytest.approx(7.189)
    assert card.training_tokens == 51200 and card.recipe == recipe_summary(meta["training"])
    assert card.recipe == "clt jumprelu, 64 features, 100 steps, batch 512, λ 1.0"
    assert card.replacement_score is None
    assert "7.19 nats" in (card.warning() or "")
    assert DictionaryCard(ce_delta=1.5).warning() is None
    assert "never measured" in (DictionaryCard().warning() or "")
    assert DictionaryCard.from_dict({**card.to_dict(), "unknown_key": 1}) == card


def test_writing_a_card_keeps_the_rest_and_the_identity(tmp_path: Path) -> None:
    spec = TranscoderSpec(kind="plt", n_layers=2, d_model=8, n_features=4)
    directory = save_transcoder(build_transcoder(spec), tmp_path / "tc", model_name="tiny", metadata={"note": "x"})
    before = transcoder_identity(directory).id
    write_card(directory, DictionaryCard(ce_delta=0.8, recipe="r"))
    write_card(directory, DictionaryCard(replacement_score=0.4))  # merged: the delta stays
    meta = json.loads((directory / "atlas.json").read_text())
    assert meta["note"] == "x" and meta["card"]["ce_delta"] == 0.8 and meta["card"]["replacement_score"] == 0.4
    assert read_card(directory) == DictionaryCard(ce_delta=0.8, recipe="r", replacement_score=0.4)
    assert transcoder_identity(directory).id == before  # a card is not part of what the dictionary is
    assert not list(directory.glob(".*tmp*"))


def test_a_dictionary_that_predicts_only_the_mean_has_fvu_one(tiny_gpt2: LoadedModel) -> None:
    """Features that never fire and a decoder bias equal to each layer's mean MLP output over the evaluation tokens
    reconstruct exactly the mean: pooled FVU 1 at every layer, L0 0, every feature dead. The graph scores are the
    mean of the evaluation prompts' pruned-graph scores and the CE figures those of `spliced_cross_entropy`."""
    model = tiny_gpt2
    torch.manual_seed(1)
    tc = build_transcoder(TranscoderSpec(kind="clt", n_layers=model.info.n_layers, d_model=model.info.d_model,
                                         n_features=16))  # fmt: skip
    outputs = [build_context(model, tc, model.tokenize(p)[0], zero_positions=(0,)).mlp_outputs[:, 1:] for p in PROMPTS]
    with torch.no_grad():
        tc.b_enc.fill_(-1e4)  # nothing fires
        tc.b_dec.copy_(torch.cat(outputs, dim=1).double().mean(dim=1).float())
    tokens = model.tokenize(PROMPTS[0])
    card = evaluate_dictionary(model, tc, prompts=PROMPTS, eval_tokens=tokens, max_feature_nodes=None, progress=False)
    assert card.fvu_mean == pytest.approx(1.0, abs=1e-5)
    assert card.l0_mean == 0.0 and card.dead_fraction == 1.0 and card.eval_prompts == len(PROMPTS)
    spliced = spliced_cross_entropy(model, tc, tokens)
    assert (card.ce_clean, card.ce_spliced, card.ce_delta) == (spliced.clean, spliced.spliced, spliced.delta)
    scores = [prune_graph(attribute(model, tc, p, config=AttributionConfig())).scores_pruned for p in PROMPTS]
    assert card.replacement_score == pytest.approx(sum(s.replacement for s in scores) / len(scores), rel=1e-9)
    assert card.completeness_score == pytest.approx(sum(s.completeness for s in scores) / len(scores), rel=1e-9)
    assert 0.0 <= card.replacement_score <= 1.0
    assert card.feature_nodes_kept == 0.0  # nothing fires, so no graph has a feature node
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate_dictionary(model, tc, prompts=(), progress=False)


def test_recipe_summary_names_a_cpu_budget_instead_of_its_step_bound() -> None:
    base = {
        "kind": "plt",
        "activation": "jumprelu",
        "n_features": 512,
        "sparsity_lambda": 0.1,
        "stream": {"batch_size": 1024},
    }
    assert "300 steps" in recipe_summary({**base, "steps": 300, "cpu_budget_s": None})
    budget = recipe_summary({**base, "steps": 10_000_000, "cpu_budget_s": 600.0})
    assert "10 core-minutes" in budget and "steps" not in budget


def test_feature_nodes_kept_is_the_mean_over_the_pruned_evaluation_graphs(tiny_gpt2: LoadedModel) -> None:
    """With features that fire, the card counts the feature nodes each pruned evaluation graph keeps (not its errors,
    tokens or logits) and averages them over the prompts."""
    model = tiny_gpt2
    torch.manual_seed(2)
    tc = build_transcoder(TranscoderSpec(kind="clt", n_layers=model.info.n_layers, d_model=model.info.d_model,
                                         n_features=16))  # fmt: skip
    card = evaluate_dictionary(model, tc, prompts=PROMPTS, max_feature_nodes=None, progress=False)
    counts = []
    for prompt in PROMPTS:
        pruned = prune_graph(attribute(model, tc, prompt, config=AttributionConfig()))
        counts.append(int(pruned.result.node_mask[: pruned.graph.index.n_features].sum()))
    assert sum(counts) > 0
    assert card.feature_nodes_kept == pytest.approx(sum(counts) / len(counts))
