"""The cheap checks before an ingest starts anything: model sizes and identity without the model, transcoder
directories from their config and safetensors headers, and the fit of one to the other."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from atlas.config import PACKAGED_MODELS, cache_dir
from atlas.models import LoadedModel, ModelLoadError
from atlas.models.dimensions import ModelDimensions, model_dimensions, model_signature
from atlas.transcoders import TranscoderFormatError, TranscoderSpec, build_transcoder, read_metadata, save_transcoder
from atlas.transcoders.checks import check_fit, check_transcoders_fit, inspect_transcoders, read_safetensors_header
from ingest.preflight import check_inputs


def save(directory: Path, *, kind: str = "clt", n_layers: int = 2, d_model: int = 32, model: str = "tiny-llama",
         skip: bool = False) -> Path:  # fmt: skip
    torch.manual_seed(0)
    spec = TranscoderSpec(kind=kind, n_layers=n_layers, d_model=d_model, n_features=8, skip=skip)  # type: ignore[arg-type]
    return save_transcoder(build_transcoder(spec), directory, model_name=model)


def hf_dir(directory: Path, n_layers: int = 2, hidden: int = 32) -> Path:
    directory.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": n_layers, "hidden_size": hidden}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"x" * 100)
    return directory


def test_the_checks_import_nothing_heavy() -> None:
    heavy = ("torch", "transformers", "distributed", "duckdb", "neo4j")
    code = ("import sys, ingest.preflight, atlas.models.dimensions, atlas.transcoders.checks; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_model_dimensions_match_the_loaded_model(name: str, request: pytest.FixtureRequest) -> None:
    loaded: LoadedModel = request.getfixturevalue(name.replace("-", "_"))
    dims = model_dimensions(name)
    assert dims == ModelDimensions(name, f"name:{name}", loaded.info.n_layers, loaded.info.d_model)


def test_packaged_model_dimensions_match_its_config() -> None:
    spec = next(iter(PACKAGED_MODELS.values()))
    dims = model_dimensions(spec.alias)
    assert dims is not None and dims.identity == f"name:{spec.hub_label}" == model_signature(spec.hub_label)
    cached = sorted((cache_dir() / "models").glob(f"{spec.alias}-fp32-*/config.json"))
    if not cached:
        pytest.skip("the packaged model has not been converted on this machine")
    config = json.loads(cached[0].read_text())
    assert (dims.n_layers, dims.d_model) == (config["num_hidden_layers"], config["hidden_size"])


def test_local_directory_dimensions_and_identity(tmp_path: Path) -> None:
    a = hf_dir(tmp_path / "a", n_layers=3, hidden=16)
    dims = model_dimensions(str(a))
    assert dims is not None and (dims.n_layers, dims.d_model) == (3, 16)
    assert dims.identity.startswith("local:") and dims.identity == model_signature(str(a))
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.move(str(a), str(moved))
    assert model_signature(str(moved)) == dims.identity  # the content names the model, not its path
    other = hf_dir(tmp_path / "c", n_layers=3, hidden=16)
    (other / "model.safetensors").write_bytes(b"x" * 101)
    assert model_signature(str(other)) != dims.identity
    assert model_dimensions("gpt2") is None and model_signature("gpt2") == "name:gpt2"  # a hub name: not asked
    with pytest.raises(ModelLoadError, match="does not exist"):
        model_dimensions(str(tmp_path / "gone"))
    assert model_signature(str(tmp_path / "gone")) is None
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        model_dimensions(str(tmp_path / "noconfig"))


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_inspect_reads_sizes_hooks_and_the_recorded_model(tmp_path: Path, kind: str) -> None:
    directory = save(tmp_path / kind, kind=kind, n_layers=3, d_model=16, skip=True)
    header = inspect_transcoders(directory)
    assert (header.kind, header.n_layers, header.d_model, header.n_features) == (kind, 3, 16, 8)
    assert (header.input_hook, header.output_hook) == ("mlp.hook_in", "mlp.hook_out")
    assert header.model_name == "tiny-llama" and header.model_identity == "name:tiny-llama"
    assert read_metadata(directory)["model_identity"] == "name:tiny-llama"  # recorded at save time


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "W_dec_1.safetensors").write_bytes((d / "W_dec_1.safetensors").read_bytes()[:-10]),
         r"W_dec_1\.safetensors: not a readable safetensors file \(.*truncated"),
        (lambda d: (d / "W_enc_0.safetensors").write_bytes(b"\x00garbage" * 10),
         r"W_enc_0\.safetensors: not a readable safetensors file"),
        (lambda d: (d / "W_enc_1.safetensors").write_bytes(b"\x05\x00"),
         r"W_enc_1\.safetensors: not a readable safetensors file \(2 bytes"),
        (lambda d: (d / "W_dec_0.safetensors").unlink(), r"missing weight file .*W_dec_0\.safetensors"),
        (lambda d: save_file({"W_dec_1": torch.zeros(8, 2, 32)}, str(d / "W_dec_1.safetensors")),
         r"W_dec_1\.safetensors: tensor 'W_dec_1' has shape \(8, 2, 32\), expected \(8, 1, 32\)"),
        (lambda d: save_file({"W_enc_1": torch.zeros(8, 32)}, str(d / "W_enc_1.safetensors")),
         r"W_enc_1\.safetensors: missing tensor 'b_enc_1'"),
        (lambda d: (d / "config.yaml").unlink(), r"missing config\.yaml"),
        (lambda d: (d / "config.yaml").write_text("model_kind: [unclosed\n"), r"config\.yaml: not valid YAML"),
        (lambda d: (d / "atlas.json").write_text("{"), r"atlas\.json: not valid JSON"),
    ],
    ids=["truncated", "garbage", "too-short", "missing-file", "wrong-shape", "missing-tensor", "no-config",
         "bad-yaml", "bad-metadata"],
)  # fmt: skip
def test_corrupt_directories_are_refused_naming_the_file(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    directory = save(tmp_path / "clt")
    damage(directory)
    with pytest.raises(TranscoderFormatError, match=message):
        check_transcoders_fit(directory, "tiny-llama")


def test_header_reader_agrees_with_safetensors(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.float16), "c": torch.zeros(0, 2)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"x": "y"})
    assert read_safetensors_header(tmp_path / "t.safetensors") == {"a": (3, 4), "b": (5,), "c": (0, 2)}


def test_sizes_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TranscoderFormatError, match=r"do not fit model 'tiny-llama': d_model 16 vs the model's 32"):
        check_transcoders_fit(save(tmp_path / "narrow", d_model=16), "tiny-llama")
    with pytest.raises(TranscoderFormatError, match=r"3 layers vs the model's 2"):
        check_transcoders_fit(save(tmp_path / "deep", n_layers=3), "tiny-llama")
    with pytest.raises(TranscoderFormatError, match=r"3 layers vs the model's 30; d_model 32 vs the model's 576"):
        check_transcoders_fit(tmp_path / "deep", "smollm2-135m-instruct")
    local = hf_dir(tmp_path / "model", n_layers=2, hidden=24)
    with pytest.raises(TranscoderFormatError, match=r"d_model 32 vs the model's 24"):
        check_transcoders_fit(save(tmp_path / "for-local", model=str(local)), str(local))


def test_a_set_trained_on_another_model_of_the_same_sizes_is_refused(tmp_path: Path) -> None:
    gpt2 = save(tmp_path / "gpt2", model="tiny-gpt2")
    assert check_transcoders_fit(gpt2, "tiny-gpt2").model_name == "tiny-gpt2"
    with pytest.raises(TranscoderFormatError) as refused:
        check_transcoders_fit(gpt2, "tiny-llama")
    assert str(refused.value) == (
        f"transcoders in {gpt2} do not fit model 'tiny-llama': they were trained on 'tiny-gpt2' (name:tiny-gpt2),"
        " not 'tiny-llama' (name:tiny-llama)"
    )
    # the packaged alias and its hub label are one model
    packaged = next(iter(PACKAGED_MODELS.values()))
    header = inspect_transcoders(save(tmp_path / "smol", n_layers=30, d_model=576, model=packaged.hub_label))
    check_fit(header, packaged.alias)
    # two local directories of the same sizes are told apart by their content
    a, b = hf_dir(tmp_path / "a"), hf_dir(tmp_path / "b")
    (b / "model.safetensors").write_bytes(b"y" * 200)
    with pytest.raises(TranscoderFormatError, match="they were trained on"):
        check_transcoders_fit(save(tmp_path / "for-a", model=str(a)), str(b))


def test_sets_that_record_no_comparable_model_are_checked_on_sizes_only(tmp_path: Path) -> None:
    directory = save(tmp_path / "clt", model="tiny-gpt2")
    (directory / "atlas.json").unlink()
    config = (directory / "config.yaml").read_text().replace("model_name: tiny-gpt2", "model_name: null")
    (directory / "config.yaml").write_text(config)
    assert check_transcoders_fit(directory, "tiny-llama").model_name is None
    # a set trained on a local copy and a named model: the two identities cannot be compared, sizes decide
    local = hf_dir(tmp_path / "model")
    check_transcoders_fit(save(tmp_path / "from-local", model=str(local)), "tiny-llama")
    # a hub model: its sizes are unknown here (the worker checks them once the model is loaded)
    check_transcoders_fit(save(tmp_path / "hub", n_layers=7, model="some-org/some-model"), "some-org/some-model")


def test_unknown_hooks_are_refused(tmp_path: Path) -> None:
    directory = save(tmp_path / "clt")
    config = (directory / "config.yaml").read_text().replace("feature_output_hook: mlp.hook_out",
                                                             "feature_output_hook: mlp.hook_post")  # fmt: skip
    (directory / "config.yaml").write_text(config)
    with pytest.raises(TranscoderFormatError, match=r"output hook 'mlp.hook_post' is not one"):
        check_transcoders_fit(directory, "tiny-llama")


def test_check_inputs_refuses_a_missing_corpus_first(tmp_path: Path) -> None:
    from atlas.training.corpus import CorpusError

    with pytest.raises(CorpusError, match="does not exist"):
        check_inputs(tmp_path / "nope.jsonl", tmp_path / "also-missing", "tiny-llama")
    (tmp_path / "c.txt").write_text("a prompt\n")
    with pytest.raises(TranscoderFormatError, match=r"transcoder directory .* does not exist"):
        check_inputs(tmp_path / "c.txt", tmp_path / "also-missing", "tiny-llama")
