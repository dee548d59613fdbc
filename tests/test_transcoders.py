"""PLT/CLT math, normalisation folding, circuit-tracer file formats and bad-input handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from atlas.transcoders import (
    ActivationConfig,
    CrossLayerTranscoder,
    PerLayerTranscoder,
    Transcoder,
    TranscoderFormatError,
    TranscoderShapeError,
    TranscoderSpec,
    build_transcoder,
    check_compatible,
    load_transcoder,
    save_transcoder,
)
from atlas.transcoders import io as transcoder_io
from tests.tolerances import assert_close_at_scale

L, D, F, N = 3, 8, 6, 11


def make(kind: str, activation: str = "jumprelu", skip: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    act = ActivationConfig(activation, 2 if activation == "topk" else None)  # type: ignore[arg-type]
    tc = build_transcoder(TranscoderSpec(kind=kind, n_layers=L, d_model=D, n_features=F, activation=act, skip=skip))  # type: ignore[arg-type]
    with torch.no_grad():
        tc.b_enc.normal_(0.3, 0.2)
        tc.b_dec.normal_()
        if tc.W_skip is not None:
            tc.W_skip.normal_(0, 0.1)
    return tc


def naive_clt_reconstruction(tc: CrossLayerTranscoder, acts: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Reference: explicit sum over every (source, target) pair."""
    out = torch.zeros(L, acts.shape[1], D)
    for target in range(L):
        out[target] = tc.b_dec[target]
        for source in range(target + 1):
            out[target] += acts[source] @ tc.W_dec[source][:, target - source, :]
        if tc.W_skip is not None:
            out[target] += inputs[target] @ tc.W_skip[target].T
    return out


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_both_kinds_satisfy_the_protocol(kind: str) -> None:
    assert isinstance(make(kind), Transcoder)


@pytest.mark.parametrize("skip", [False, True])
def test_clt_packed_decoder_equals_pairwise_sum(skip: bool) -> None:
    tc = make("clt", skip=skip)
    assert isinstance(tc, CrossLayerTranscoder)
    x = torch.randn(L, N, D)
    out = tc(x)
    assert (out.activations > 0).any()
    expected = naive_clt_reconstruction(tc, out.activations, x)
    assert_close_at_scale(out.reconstruction, expected, what="packed CLT decoder")
    for target in range(L):
        single = tc.decode_layer(target, list(out.activations), x[target])
        assert_close_at_scale(single, expected[target], what=f"decode_layer({target})")


def test_plt_reconstruction_is_per_layer() -> None:
    tc = make("plt", skip=True)
    assert isinstance(tc, PerLayerTranscoder)
    x = torch.randn(L, N, D)
    out = tc(x)
    for layer in range(L):
        expected = out.activations[layer] @ tc.W_dec[layer] + tc.b_dec[layer] + x[layer] @ tc.W_skip[layer].T  # type: ignore[index]
        assert_close_at_scale(out.reconstruction[layer], expected, what=f"PLT layer {layer}")
        torch.testing.assert_close(tc.encode(layer, x[layer]), out.activations[layer])


def test_clt_decoder_norm_is_over_concatenated_targets() -> None:
    tc = make("clt")
    norms = tc.decoder_norms()
    assert norms.shape == (L, F)
    torch.testing.assert_close(norms[0, 2], tc.W_dec[0][2].reshape(-1).norm())
    assert list(tc.output_layers(1)) == [1, 2]
    assert tc.decoder_vectors(1, torch.tensor([0, 3])).shape == (2, L - 1, D)


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_folding_normalisation_reproduces_normalised_model_in_raw_units(kind: str) -> None:
    tc = make(kind, skip=True)
    x = torch.randn(L, N, D) * 5
    s_in, s_out = torch.tensor([0.5, 2.0, 3.0]), torch.tensor([4.0, 0.25, 1.5])
    with torch.no_grad():
        trained = tc(x * s_in.view(-1, 1, 1))
        tc.fold_normalisation(s_in, s_out)
        folded = tc(x)
    assert_close_at_scale(folded.activations, trained.activations, what="folded activations")
    assert_close_at_scale(
        folded.reconstruction, trained.reconstruction / s_out.view(-1, 1, 1), what="folded reconstruction"
    )


@pytest.mark.parametrize("kind", ["plt", "clt"])
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
def test_save_load_roundtrip(tmp_path: Path, kind: str, activation: str) -> None:
    tc = make(kind, activation, skip=True)
    directory = save_transcoder(tc, tmp_path / "tc", model_name="tiny", metadata={"note": "x"})
    loaded = load_transcoder(directory)
    assert loaded.spec == tc.spec
    x = torch.randn(L, N, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).reconstruction, tc(x).reconstruction)


def test_clt_files_follow_circuit_tracer_layout(tmp_path: Path) -> None:
    directory = save_transcoder(make("clt"), tmp_path / "clt", model_name="tiny")
    config = (directory / "config.yaml").read_text()
    assert "model_kind: cross_layer_transcoder" in config and "feature_input_hook: mlp.hook_in" in config
    for i in range(L):
        enc = load_file(directory / f"W_enc_{i}.safetensors")
        assert set(enc) == {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"}
        assert enc[f"W_enc_{i}"].shape == (F, D)
        assert load_file(directory / f"W_dec_{i}.safetensors")[f"W_dec_{i}"].shape == (F, L - i, D)


def test_plt_files_follow_circuit_tracer_layout(tmp_path: Path) -> None:
    directory = save_transcoder(make("plt", skip=True), tmp_path / "plt", model_name="tiny")
    assert "model_kind: transcoder_set" in (directory / "config.yaml").read_text()
    layer = load_file(directory / "layer_1.safetensors")
    assert set(layer) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"}
    assert layer["W_dec"].shape == (F, D) and layer["W_skip"].shape == (D, D)


def test_loads_directory_without_atlas_metadata(tmp_path: Path) -> None:
    directory = save_transcoder(make("clt", "relu"), tmp_path / "clt", model_name="tiny")
    (directory / "atlas.json").unlink()
    assert load_transcoder(directory).spec.activation.kind == "relu"


@pytest.fixture
def saved_clt(tmp_path: Path) -> Path:
    return save_transcoder(make("clt"), tmp_path / "clt", model_name="tiny")


def test_missing_weight_file_is_named(saved_clt: Path) -> None:
    (saved_clt / "W_dec_1.safetensors").unlink()
    with pytest.raises(TranscoderFormatError, match=r"missing weight file .*W_dec_1\.safetensors"):
        load_transcoder(saved_clt)


def test_corrupt_weight_file_is_named(saved_clt: Path) -> None:
    (saved_clt / "W_enc_2.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TranscoderFormatError, match=r"W_enc_2\.safetensors: not a readable safetensors"):
        load_transcoder(saved_clt)


def test_wrong_shape_is_named(saved_clt: Path) -> None:
    save_file({"W_dec_1": torch.zeros(F, L, D)}, str(saved_clt / "W_dec_1.safetensors"))
    with pytest.raises(TranscoderFormatError, match=r"'W_dec_1' has shape \(6, 3, 8\), expected \(6, 2, 8\)"):
        load_transcoder(saved_clt)


def test_nan_weights_are_rejected(saved_clt: Path) -> None:
    tensors = load_file(saved_clt / "W_enc_0.safetensors")
    tensors["b_enc_0"][0] = float("nan")
    save_file(tensors, str(saved_clt / "W_enc_0.safetensors"))
    with pytest.raises(TranscoderFormatError, match="NaN"):
        load_transcoder(saved_clt)


def test_missing_directory_and_bad_kind(tmp_path: Path, saved_clt: Path) -> None:
    with pytest.raises(TranscoderFormatError, match="does not exist"):
        load_transcoder(tmp_path / "nope")
    (saved_clt / "config.yaml").write_text("model_kind: something_else\n")
    with pytest.raises(TranscoderFormatError, match="model_kind"):
        load_transcoder(saved_clt)


def test_dimension_mismatch_with_model_and_inputs() -> None:
    tc = make("clt")
    with pytest.raises(TranscoderFormatError, match=r"d_model 8 vs the model's 576"):
        check_compatible(tc.spec, n_layers=L, d_model=576, model_name="m")
    with pytest.raises(TranscoderFormatError, match=r"3 layers vs the model's 30"):
        check_compatible(tc.spec, n_layers=30, d_model=D, model_name="m")
    with pytest.raises(TranscoderShapeError, match="d_model is 8"):
        tc.encode(0, torch.zeros(2, 9))
    with pytest.raises(TranscoderShapeError, match="n_layers=3"):
        tc(torch.zeros(2, 4, D))


def test_failed_save_keeps_previous_transcoder(saved_clt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.read_bytes() for p in saved_clt.iterdir()}
    calls = {"n": 0}
    real_save = transcoder_io.save_file

    def failing_save(tensors, path):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(transcoder_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_transcoder(make("clt", seed=1), saved_clt, model_name="tiny")
    after = {p.name: p.read_bytes() for p in saved_clt.iterdir()}
    assert after == before
    assert not [p for p in saved_clt.parent.iterdir() if p.name.startswith(".")]
