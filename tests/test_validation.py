"""Circuit validation: statistics on toy data, the batched engine against `interventions.py`, the planted two-hop
circuit as ground truth, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from planted_model import CIRCUIT, planted_model, planted_transcoder
from tolerances import FLOAT32_CHAIN, assert_close_at_scale

from atlas.attribution.context import build_context
from atlas.attribution.interventions import FeatureIntervention, intervene
from atlas.models.loading import LoadedModel
from atlas.transcoders.base import TranscoderSpec
from atlas.transcoders.cross_layer import CrossLayerTranscoder
from atlas.transcoders.per_layer import PerLayerTranscoder
from atlas.validation.engine import ClampBatch, EngineError, logits_at, run_variants
from atlas.validation.stats import (
    empirical_p_value,
    necessity,
    ranks,
    recovered,
    spearman,
    summarise,
    z_score,
)
from atlas.validation.validate import (
    Circuit,
    TargetSpec,
    ValidationConfig,
    ValidationError,
    matched_null_sets,
    validate,
)

PROMPTS = ["xyzA", "qA", "hello A", "mmmmA"]


# --- statistics on toy data ----------------------------------------------------------------------------------
def test_fractions() -> None:
    assert necessity(4.0, 1.0) == 0.75
    assert necessity(4.0, 5.0) == -0.25
    assert math.isnan(necessity(0.0, 1.0))
    assert recovered(kept=3.0, empty=1.0, clean=5.0) == 0.5
    assert math.isnan(recovered(2.0, 1.0, 1.0))


def test_empirical_p_value_counts_ties_and_near_ties() -> None:
    null = [0.0, 0.1, 0.2, 0.5, 0.9]
    assert empirical_p_value(1.0, null) == 1 / 6
    assert empirical_p_value(0.5, null) == 3 / 6  # 0.5 and 0.9 do at least as well
    assert empirical_p_value(0.0, [0.0] * 20) == 1.0
    assert empirical_p_value(0.9 + 1e-9, null) == 1 / 6
    assert empirical_p_value(0.9 + 1e-9, null, tolerance=1e-6) == 2 / 6
    assert math.isnan(empirical_p_value(1.0, [math.nan]))


def test_z_score() -> None:
    null = [1.0, 2.0, 3.0]  # mean 2, sample std 1
    assert z_score(4.0, null) == pytest.approx(2.0)
    assert z_score(2.0, null) == 0.0
    assert z_score(1.0, [0.0, 0.0]) == math.inf
    assert z_score(-1.0, [0.0, 0.0]) == -math.inf
    assert z_score(0.0, [0.0, 0.0]) == 0.0
    assert math.isnan(z_score(1.0, [1.0]))


def test_ranks_average_ties() -> None:
    assert ranks(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]


def test_spearman_on_known_values() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)  # 1 − 6·2/(4·15)
    assert spearman(x, x.exp()) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.ones(4)))
    with pytest.raises(ValueError, match="equal length"):
        spearman(x, torch.ones(3))


def test_summarise_leaves_out_undefined_values() -> None:
    s = summarise([1.0, 3.0, math.nan])
    assert (s.n, s.mean, s.minimum, s.maximum) == (2, 2.0, 1.0, 3.0)
    assert s.std == pytest.approx(math.sqrt(2))
    assert summarise([]).n == 0


def test_null_sets_match_layer_and_magnitude() -> None:
    # layer 0: circuit instance 0 (magnitude 1); candidates with magnitudes 1.1, 50, 0.9, 100, 200, 300
    # layer 1: circuit instance 7 (magnitude 5); candidates 5.5 and 0.01
    layers = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    magnitudes = torch.tensor([1.0, 1.1, 50.0, 0.9, 100.0, 200.0, 300.0, 5.0, 5.5, 0.01])
    circuit = torch.zeros(10, dtype=torch.bool)
    circuit[[0, 7]] = True
    sets, fallbacks = matched_null_sets(layers, magnitudes, circuit, 50, torch.Generator().manual_seed(1))
    assert fallbacks == 0 and len(sets) == 50
    for chosen in sets:
        assert len(chosen) == 2 and not circuit[chosen].any()
        assert chosen[0] in (1, 3, 2)  # the 3 nearest in |log magnitude| among layer 0's 6 candidates
        assert int(layers[chosen[1]]) == 1
    assert {s[0] for s in sets} == {1, 2, 3}  # random within the window


def test_null_sets_fall_back_to_other_layers_and_refuse_a_circuit_larger_than_the_rest() -> None:
    layers = torch.tensor([0, 0, 0, 1, 1])
    circuit = torch.tensor([False, False, False, True, True])  # layer 1 has no candidate: drawn from layer 0
    sets, fallbacks = matched_null_sets(layers, torch.ones(5), circuit, 4, torch.Generator().manual_seed(0))
    assert fallbacks == 8
    assert all(len(set(s)) == 2 and max(s) < 3 for s in sets)  # without replacement inside a set
    with pytest.raises(ValidationError, match="larger than the active set"):
        matched_null_sets(layers, torch.ones(5), torch.tensor([False, False, True, True, True]), 1, torch.Generator())


# --- the batched engine ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted() -> tuple[LoadedModel, PerLayerTranscoder]:
    model = planted_model()
    return model, planted_transcoder(model)


def _random_clt(model: LoadedModel) -> CrossLayerTranscoder:
    torch.manual_seed(0)
    spec = TranscoderSpec("clt", model.info.n_layers, model.info.d_model, 16, skip=True)
    transcoder = CrossLayerTranscoder(spec)
    with torch.no_grad():
        transcoder.W_skip.normal_(0, 0.05)  # type: ignore[union-attr]
        transcoder.b_enc.fill_(0.05)
    return transcoder.eval()


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_batched_real_form_equals_interventions_frozen_attention(which: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(which)
    transcoder = _random_clt(model)
    ctx = build_context(model, transcoder, model.tokenize("abcdefgh")[0])
    active = ctx.active_features()
    assert active.shape[0] >= 12
    generator = torch.Generator().manual_seed(0)
    batch = ClampBatch.empty(9, *ctx.activations.shape)
    edits: list[list[FeatureIntervention]] = []
    for i in range(9):
        chosen = active[torch.randperm(active.shape[0], generator=generator)[: 1 + i % 3]]
        value = 0.0 if i % 2 == 0 else 0.7
        batch.mask[i, chosen[:, 0], chosen[:, 1], chosen[:, 2]] = True
        batch.values[i, chosen[:, 0], chosen[:, 1], chosen[:, 2]] = value
        edits.append([FeatureIntervention(int(r[0]), int(r[2]), int(r[1]), "set", value) for r in chosen])
    out = run_variants(ctx, batch, form="real", chunk_size=4)
    for i, edit in enumerate(edits):
        reference = intervene(ctx, edit, mode="frozen_attention")
        assert_close_at_scale(out.final_residual[i], reference.final_residual, rel=FLOAT32_CHAIN, what=f"variant {i}")
        assert_close_at_scale(out.activations[i], reference.activations, rel=FLOAT32_CHAIN)
    assert not torch.equal(out.final_residual[0], ctx.final_residual)  # the clamps did something


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_replacement_form_reproduces_the_clean_run_and_chunks_agree(which: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(which)
    ctx = build_context(model, _random_clt(model), model.tokenize("hello there")[0])
    batch = ClampBatch.empty(5, *ctx.activations.shape)
    active = ctx.active_features()
    for i in range(1, 5):
        r = active[i * 3]
        batch.mask[i, r[0], r[1], r[2]] = True
    batch.error_scale[4] = 0.0
    whole = run_variants(ctx, batch, chunk_size=5)
    single = run_variants(ctx, batch, chunk_size=1)
    assert_close_at_scale(whole.final_residual, single.final_residual, rel=FLOAT32_CHAIN)
    assert_close_at_scale(whole.final_residual[0], ctx.final_residual, rel=FLOAT32_CHAIN)
    logits = logits_at(ctx, whole.final_residual[:1], ctx.n_pos - 1)
    assert_close_at_scale(logits[0], ctx.logits[-1], rel=FLOAT32_CHAIN)
    assert not torch.allclose(whole.final_residual[4], whole.final_residual[3])  # errors ablated changes things


def test_engine_refuses_bad_batches(planted: tuple[LoadedModel, PerLayerTranscoder]) -> None:
    model, transcoder = planted
    ctx = build_context(model, transcoder, model.tokenize("xA")[0])
    batch = ClampBatch.empty(2, *ctx.activations.shape)
    batch.error_scale[1] = 0.0
    with pytest.raises(EngineError, match="only be ablated in the replacement form"):
        run_variants(ctx, batch, form="real")
    with pytest.raises(EngineError, match="expected"):
        run_variants(ctx, ClampBatch.empty(2, 2, 9, 6))
    with pytest.raises(EngineError, match="unknown MLP form"):
        run_variants(ctx, ClampBatch.empty(1, *ctx.activations.shape), form="bogus")  # type: ignore[arg-type]


# --- ground truth: the planted two-hop circuit ---------------------------------------------------------------------
def test_planted_circuit_is_necessary_sufficient_and_beats_its_nulls(
    planted: tuple[LoadedModel, PerLayerTranscoder],
) -> None:
    model, transcoder = planted
    circuit = Circuit.of(list(CIRCUIT), transcoder)
    means = torch.full((2, 6), 0.05)
    report = validate(model, transcoder, circuit, PROMPTS, TargetSpec.token("B"), mean_activations=means)
    assert len(report.prompts) == len(PROMPTS) and not report.skipped
    for p in report.prompts:
        last = p.n_pos - 1
        assert sorted(p.circuit_instances) == [(0, last, 0), (1, last, 0)]
        assert p.necessity_zero == pytest.approx(1.0, abs=0.05)
        assert p.necessity_mean == pytest.approx(1.0, abs=0.1)
        assert p.sufficiency_frozen_errors == pytest.approx(1.0, abs=0.05)
        assert p.sufficiency_ablated_errors == pytest.approx(1.0, abs=0.05)  # the transcoder is exact: no error
        assert p.logit_change_zero < -3.0 and p.prob_change_zero < 0
        assert len(p.null_necessity) == 20 and len(p.null_sufficiency) == 20
        assert max(abs(v) for v in p.null_necessity) < 0.05
        assert max(abs(v) for v in p.null_sufficiency) < 0.05
        assert p.necessity_p == pytest.approx(1 / 21) and p.sufficiency_p == pytest.approx(1 / 21)
        assert p.necessity_z > 10 and p.sufficiency_z > 10
        assert p.beats_null
        assert p.agreement > 0.9  # attribution ranks the two hops first, as their ablations measure
        assert {row[:3] for row in p.agreement_features[:2]} == {(0, last, 0), (1, last, 0)}
    assert report.pass_fraction == 1.0
    assert report.summary("necessity_zero").mean == pytest.approx(1.0, abs=0.05)
    assert "attention patterns frozen" in report.mode


def test_planted_circuit_with_frozen_norms_leaves_only_the_vocabulary_mean(
    planted: tuple[LoadedModel, PerLayerTranscoder],
) -> None:
    model, transcoder = planted
    config = ValidationConfig(freeze_norms=True, top_k_agreement=0)
    report = validate(
        model, transcoder, Circuit.of(list(CIRCUIT), transcoder), PROMPTS[:2], TargetSpec.token("B"), config=config
    )
    for p in report.prompts:
        # No norm responds, so what is left is the distractors' writes onto the other tokens' unembedding columns,
        # which move the vocabulary mean the demeaned logit subtracts (< 0.1% of the target here).
        assert p.necessity_zero == pytest.approx(1.0, abs=2e-3)
        assert p.sufficiency_frozen_errors == pytest.approx(1.0, abs=2e-3)
        assert max(abs(v) for v in p.null_necessity + p.null_sufficiency) < 0.05  # distractors: no path to 'B'
        assert math.isnan(p.agreement)
    assert "norms frozen" in report.mode


def test_a_random_same_size_set_is_not_significant(planted: tuple[LoadedModel, PerLayerTranscoder]) -> None:
    model, transcoder = planted
    ctx = build_context(model, transcoder, model.tokenize(PROMPTS[0])[0])
    active = {(int(r[0]), int(r[2])) for r in ctx.active_features()} - set(CIRCUIT)
    generator = torch.Generator().manual_seed(3)
    pool = sorted(active)
    random_set = [pool[i] for i in torch.randperm(len(pool), generator=generator)[: len(CIRCUIT)].tolist()]
    report = validate(model, transcoder, Circuit.of(random_set, transcoder), PROMPTS, TargetSpec.token("B"))
    for p in report.prompts:
        assert abs(p.necessity_zero) < 0.05 and abs(p.sufficiency_frozen_errors) < 0.05
        assert p.necessity_p > 0.05 or p.sufficiency_p > 0.05
        assert not p.beats_null
    assert report.pass_fraction == 0.0


# --- bad input ---------------------------------------------------------------------------------------------------
def test_unknown_features_are_named(planted: tuple[LoadedModel, PerLayerTranscoder]) -> None:
    _, transcoder = planted
    with pytest.raises(ValidationError, match=r"unknown feature 2/0: the transcoder has 2 layers of 6"):
        Circuit.of([(2, 0)], transcoder)
    with pytest.raises(ValidationError, match=r"unknown feature 0/6"):
        Circuit.of(["0/6"], transcoder)
    with pytest.raises(ValidationError, match=r"names transcoder 'other'"):
        Circuit.of(["other/0/0"], transcoder, transcoder_id="mine")
    with pytest.raises(ValidationError, match=r"unknown feature key 'zero/one'"):
        Circuit.of(["zero/one"], transcoder)
    with pytest.raises(ValidationError, match="circuit is empty"):
        Circuit.of([], transcoder)
    assert Circuit.of(["mine/1/0", (0, 0), "0/0"], transcoder, transcoder_id="mine").features == ((0, 0), (1, 0))


def test_bad_prompt_sets_and_targets(planted: tuple[LoadedModel, PerLayerTranscoder]) -> None:
    model, transcoder = planted
    circuit = Circuit.of(list(CIRCUIT), transcoder)
    with pytest.raises(ValidationError, match="prompt set is empty"):
        validate(model, transcoder, circuit, [], TargetSpec.token("B"))
    with pytest.raises(ValidationError, match="a prompt of the set is empty"):
        validate(model, transcoder, circuit, ["xA", "  "], TargetSpec.token("B"))
    with pytest.raises(ValidationError, match=r"not a single token \(it splits into \['B', 'C'\]\)"):
        validate(model, transcoder, circuit, ["xA"], TargetSpec.token("BC"))
    with pytest.raises(ValidationError, match="not a single token"):
        validate(model, transcoder, circuit, ["xA"], TargetSpec.difference("B", "CD"))
    with pytest.raises(ValidationError, match="outside the prompt"):
        validate(model, transcoder, circuit, ["xA"], TargetSpec.token("B", position=7))


def test_circuit_inactive_on_every_prompt_or_larger_than_the_active_set(
    planted: tuple[LoadedModel, PerLayerTranscoder],
) -> None:
    model, transcoder = planted
    circuit = Circuit.of(list(CIRCUIT), transcoder)
    with pytest.raises(ValidationError, match=r"no feature of the circuit \(0/0, 1/0\) is active on any prompt"):
        validate(model, transcoder, circuit, ["xyz", "hello"], TargetSpec.token("B"))
    report = validate(model, transcoder, circuit, ["xyz", "xA"], TargetSpec.token("B"), prompt_ids=["p0", "p1"])
    assert report.skipped == ["p0"] and [p.prompt_id for p in report.prompts] == ["p1"]
    everything = Circuit.of([(layer, f) for layer in range(2) for f in range(6)], transcoder)
    with pytest.raises(ValidationError, match="larger than the active set"):
        validate(model, transcoder, everything, ["xA"], TargetSpec.token("B"))


def test_mean_activations_come_from_the_statistics_table(tmp_path: Path) -> None:
    import duckdb

    from ingest.validation import mean_activations

    path = tmp_path / "feature_stats.duckdb"
    assert mean_activations(path, "tc", 2, 3) is None  # no database: no mean-ablation
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE feature_stats (transcoder_id VARCHAR, layer INTEGER, feature INTEGER, n_tokens BIGINT,"
            " n_active BIGINT, frequency DOUBLE, mean_active DOUBLE, max_activation DOUBLE)"
        )
        con.execute(
            "INSERT INTO feature_stats VALUES ('tc', 0, 1, 100, 10, 0.1, 2.0, 5.0), ('tc', 1, 2, 100, 0, 0.0, NULL,"
            " NULL), ('other', 0, 0, 100, 50, 0.5, 1.0, 1.0), ('tc', 7, 0, 100, 50, 0.5, 1.0, 1.0)"
        )
    means = mean_activations(path, "tc", 2, 3)
    assert means is not None
    expected = torch.zeros(2, 3)
    expected[0, 1] = 0.2  # frequency × mean when active = the mean over all tokens
    assert torch.allclose(means, expected)
    assert mean_activations(path, "missing", 2, 3) is None


def test_overlap_measures_of_threshold_robustness() -> None:
    from atlas.storage.robustness import jaccard, top_overlap

    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0 and jaccard({"a"}, set()) == 0.0
    reference = [("p", "x"), ("p", "y"), ("q", "z")]
    assert top_overlap(reference, [("p", "y"), ("p", "x")], k=2) == 1.0  # order inside the top k does not matter
    assert top_overlap(reference, [("q", "z"), ("p", "x")], k=2) == 0.5
    assert top_overlap([], reference, k=3) == 1.0


# --- SHIFT-style edits -------------------------------------------------------------------------------------------
def test_an_edit_removes_the_planted_behaviour_and_spares_the_controls(
    planted: tuple[LoadedModel, PerLayerTranscoder],
) -> None:
    from atlas.validation.edits import FeatureEdit, apply_edit, kl_divergence

    model, transcoder = planted
    edit = FeatureEdit(CIRCUIT, "ablate", label="planted")
    assert FeatureEdit.from_json(edit.to_json()) == edit
    target = [("xyzA", "B"), ("qA", "B"), ("hello A", "B")]
    control = ["xyz", "hello", "mmmm"]  # no 'A': the circuit never fires, nothing may change
    report = apply_edit(model, transcoder, edit, target, control, max_new_tokens=3)
    assert report.accuracy(after=False) == 1.0 and report.accuracy(after=True) == 0.0  # 'B' is top-1, then not
    assert report.target_logit_change < -3.0
    assert all(p.answer_prob_change < -0.1 and p.kl > 0.01 for p in report.target)
    assert report.control_kl == pytest.approx(0.0, abs=1e-9) and report.control_top1_agreement == 1.0
    assert len(report.generations) == 2
    prompt, before, after = report.generations[0]
    assert prompt == "xyzA" and before.startswith("B") and not after.startswith("B")
    scaled = apply_edit(model, transcoder, FeatureEdit(CIRCUIT, "scale", 2.0), target[:1], [], n_generations=0)
    assert scaled.target_logit_change > 0  # doubling the hops strengthens 'B'
    assert kl_divergence(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.0
    with pytest.raises(ValidationError, match="target prompt set is empty"):
        apply_edit(model, transcoder, edit, [], control)
    with pytest.raises(ValidationError, match="unknown feature 5/0"):
        apply_edit(model, transcoder, FeatureEdit(((5, 0),)), target, control)
    with pytest.raises(ValidationError, match="not a single token"):
        apply_edit(model, transcoder, edit, [("xA", "BC")], control)
    with pytest.raises(ValidationError, match="at least one feature"):
        FeatureEdit(())
