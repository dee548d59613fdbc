"""Published dictionaries by name, offline: a local Hugging Face cache laid out as the hub lays it out.

Each test publishes small random dictionaries into its own cache (`models--owner--repo/refs/<rev>` naming a commit,
`snapshots/<commit>/<files>`), in each published format circuit-tracer 0.5.0 reads: a cross-layer transcoder, a
per-layer `transcoder_set` with and without skip, and GemmaScope's `params.npz` files listed by a config in another
repo (the `gemma` preset). `atlas.transcoders.hub.resolve_transcoders` must turn each reference into a directory that
`load_transcoder` reads with the published weights, and circuit-tracer's own hub loader, reading the same cache
offline, must encode and decode like ours to 1e-5 of the values' scale.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from atlas.transcoders import (
    TranscoderFormatError,
    TranscoderSpec,
    build_transcoder,
    load_transcoder,
    save_transcoder,
)
from atlas.transcoders.hub import HubError, HubRef, is_hub_ref, parse_hub_ref, resolve_transcoders
from benchmarks.interop.compare import CT_PYTHON, compare_with_circuit_tracer
from tests.tolerances import FLOAT32_SUM

N_LAYERS, D_MODEL, N_FEATURES = 2, 16, 32
GEMMA_CONFIG_REPO = "mwhanna/gemma-scope-transcoders"  # what circuit-tracer's (and our) `gemma` preset names
GEMMA_FILES_REPO = "google/gemma-scope-2b-pt-transcoders"


def publish(
    cache: Path, repo_id: str, files: dict[str, Path | bytes], *, revisions: tuple[str, ...] = ("main",)
) -> str:
    """Lay `files` (path in repo -> source file or bytes) out as one commit of `repo_id`; returns the commit."""
    commit = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for revision in revisions:
        (repo / "refs" / revision).write_text(commit)
    return commit


def random_transcoder(kind: str, *, skip: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = TranscoderSpec(kind=kind, n_layers=N_LAYERS, d_model=D_MODEL, n_features=N_FEATURES, skip=skip)  # type: ignore[arg-type]
    transcoder = build_transcoder(spec)
    with torch.no_grad():
        for param in transcoder.parameters():
            param.normal_(0, 0.3)
        if transcoder.log_threshold is not None:
            transcoder.log_threshold.fill_(-2.0)
    return transcoder


def published_files(transcoder: torch.nn.Module, tmp: Path, *, repo: str = "", layer_uris: bool = False
                    ) -> dict[str, Path | bytes]:  # fmt: skip
    """What a circuit-tracer-format repo holds: config.yaml and the weight files (no atlas.json, no local paths).

    A per-layer set's config lists its files as `hf://repo/layer_i.safetensors` URIs with `layer_uris` (as the
    published Llama-3.2-1B set does), else nothing (circuit-tracer then globs `layer_*.safetensors`)."""
    directory = save_transcoder(transcoder, tmp / f"saved-{uuid.uuid4().hex[:6]}", model_name="tiny")  # type: ignore[arg-type]
    files: dict[str, Path | bytes] = {p.name: p for p in directory.glob("*.safetensors")}
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config.pop("scan", None)
    config.pop("transcoders", None)
    if layer_uris:
        config["transcoders"] = [f"hf://{repo}/{name}" for name in sorted(files) if name.startswith("layer_")]
    files["config.yaml"] = yaml.safe_dump(config).encode()
    return files


def gemma_scope_layers(seed: int = 1) -> list[dict[str, np.ndarray]]:
    """GemmaScope `params.npz` contents: `W_enc (d_model, F)` (transposed against circuit-tracer), `threshold`."""
    rng = np.random.default_rng(seed)
    return [
        {
            "W_enc": rng.normal(0, 0.3, (D_MODEL, N_FEATURES)).astype(np.float32),
            "W_dec": rng.normal(0, 0.3, (N_FEATURES, D_MODEL)).astype(np.float32),
            "b_enc": rng.normal(0, 0.1, N_FEATURES).astype(np.float32),
            "b_dec": rng.normal(0, 0.1, D_MODEL).astype(np.float32),
            "threshold": rng.uniform(0.05, 0.3, N_FEATURES).astype(np.float32),
        }
        for _ in range(N_LAYERS)
    ]


def npz_bytes(tmp: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = tmp / f"params-{uuid.uuid4().hex[:6]}.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def publish_gemma(cache: Path, tmp: Path, layers: list[dict[str, np.ndarray]]) -> None:
    files = {f"layer_{i}/width_16k/average_l0_76/params.npz": npz_bytes(tmp, a) for i, a in enumerate(layers)}
    publish(cache, GEMMA_FILES_REPO, files)  # type: ignore[arg-type]
    config = {
        "model_name": "google/gemma-2-2b",
        "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"hf://{GEMMA_FILES_REPO}/{name}" for name in files],
    }
    publish(cache, GEMMA_CONFIG_REPO, {"config.yaml": yaml.safe_dump(config).encode()})


def random_inputs(seed: int = 5, n_tokens: int = 12) -> torch.Tensor:
    return torch.randn(N_LAYERS, n_tokens, D_MODEL, generator=torch.Generator().manual_seed(seed))


def assert_circuit_tracer_agrees(directory: Path, ref: str, cache: Path) -> None:
    if not CT_PYTHON.exists():
        pytest.fail(f"circuit-tracer env missing at {CT_PYTHON}: the README's test command creates it")
    comparison = compare_with_circuit_tracer(directory, random_inputs(), hub_ref=ref, hub_cache=cache)
    assert comparison.active_share > 0.02, "too few active features to compare"
    assert comparison.max_activation_diff <= FLOAT32_SUM * comparison.activation_scale
    assert comparison.max_reconstruction_diff <= FLOAT32_SUM * comparison.reconstruction_scale


# -- references --------------------------------------------------------------------------------------------------


def test_references_parse_as_the_hub_names_them(tmp_path: Path) -> None:
    assert parse_hub_ref("gemma") == HubRef(GEMMA_CONFIG_REPO)
    assert parse_hub_ref("llama") == HubRef("mntss/transcoder-Llama-3.2-1B")
    assert parse_hub_ref("acme/clt@v1") == HubRef("acme/clt", None, "v1")
    assert parse_hub_ref("acme/sets/width_16k/l0_50@0123abc") == HubRef("acme/sets", "width_16k/l0_50", "0123abc")
    assert parse_hub_ref("hf://acme/sets/sub?revision=r2") == HubRef("acme/sets", "sub", "r2")
    assert str(HubRef("acme/sets", "sub", "r2")) == "acme/sets/sub@r2"
    for bad in ("", "noslash", "a b/c", "hf://only"):
        with pytest.raises(HubError):
            parse_hub_ref(bad)
    existing = tmp_path / "acme" / "clt"
    existing.mkdir(parents=True)
    assert is_hub_ref("acme/clt") and not is_hub_ref(existing) and not is_hub_ref(str(existing))
    assert resolve_transcoders(existing) == existing  # a local path is never looked up on the hub


def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`runs/demo/transcoder` (a typo) when `runs/` exists here: a missing directory at once, not a hub lookup."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert not is_hub_ref("runs/demo/transcoder") and is_hub_ref("acme/demo")
    with pytest.raises(TranscoderFormatError, match="transcoder directory runs/demo/transcoder does not exist") as err:
        resolve_transcoders("runs/demo/transcoder", hub_cache=tmp_path / "hub", offline=False,
                            endpoint="http://127.0.0.1:9")  # fmt: skip
    assert not isinstance(err.value, HubError)


# -- each published format, against the weights and against circuit-tracer ----------------------------------------


@pytest.mark.parametrize(
    ("kind", "skip", "layer_uris"), [("clt", False, False), ("plt", False, True), ("plt", True, False)]
)
def test_circuit_tracer_format_repos_resolve_to_their_snapshot(
    tmp_path: Path, kind: str, skip: bool, layer_uris: bool
) -> None:
    cache, assembled = tmp_path / "hub", tmp_path / "assembled"
    original = random_transcoder(kind, skip=skip)
    commit = publish(cache, "acme/tiny-dict", published_files(original, tmp_path, repo="acme/tiny-dict",
                                                              layer_uris=layer_uris))  # fmt: skip
    directory = resolve_transcoders("acme/tiny-dict", hub_cache=cache, offline=True, assembled_root=assembled)
    if layer_uris:  # listed files in circuit-tracer's names: linked into an assembled directory, not copied
        assert directory == assembled / f"acme--tiny-dict@{commit}"
        assert all((directory / f"layer_{i}.safetensors").is_symlink() for i in range(N_LAYERS))
    else:  # the snapshot itself
        assert directory.name == commit and directory.parent.name == "snapshots"
    loaded = load_transcoder(directory)
    assert loaded.spec.kind == kind and loaded.spec.skip == skip
    for name, param in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param), name
    assert_circuit_tracer_agrees(directory, "acme/tiny-dict", cache)


def test_gemma_scope_preset_is_assembled_from_params_npz(tmp_path: Path) -> None:
    cache, assembled = tmp_path / "hub", tmp_path / "assembled"
    layers = gemma_scope_layers()
    publish_gemma(cache, tmp_path, layers)
    directory = resolve_transcoders("gemma", hub_cache=cache, offline=True, assembled_root=assembled)
    assert directory.parent == assembled
    loaded = load_transcoder(directory)
    assert loaded.spec.kind == "plt" and loaded.spec.activation.kind == "jumprelu"
    assert (loaded.spec.input_hook, loaded.spec.output_hook) == ("ln2.hook_normalized", "hook_mlp_out")
    for i, arrays in enumerate(layers):
        assert torch.equal(loaded.W_enc[i], torch.from_numpy(arrays["W_enc"].T))
        assert torch.equal(loaded.W_dec[i], torch.from_numpy(arrays["W_dec"]))
        assert torch.allclose(loaded.threshold[i], torch.from_numpy(arrays["threshold"]), rtol=1e-6)  # type: ignore[index]
    assert_circuit_tracer_agrees(directory, "gemma", cache)
    # Built once: a second resolution reuses the assembled directory untouched.
    stamp = (directory / "layer_0.safetensors").stat().st_mtime_ns
    again = resolve_transcoders("gemma", hub_cache=cache, offline=True, assembled_root=assembled)
    assert again == directory and (directory / "layer_0.safetensors").stat().st_mtime_ns == stamp


def test_gemma_scope_2_files_are_converted_with_their_skip(tmp_path: Path) -> None:
    """GemmaScope-2 names (`w_enc (d, F)`, `affine_skip_connection (d, d)`) become circuit-tracer's PLT names, as its
    `load_gemma_scope_2_transcoder` converts them (encoder and skip transposed)."""
    from safetensors.numpy import save_file

    cache = tmp_path / "hub"
    rng = np.random.default_rng(3)
    layers = []
    files: dict[str, Path | bytes] = {}
    for i in range(N_LAYERS):
        arrays = {
            "w_enc": rng.normal(0, 0.3, (D_MODEL, N_FEATURES)).astype(np.float32),
            "w_dec": rng.normal(0, 0.3, (N_FEATURES, D_MODEL)).astype(np.float32),
            "b_enc": rng.normal(0, 0.1, N_FEATURES).astype(np.float32),
            "b_dec": rng.normal(0, 0.1, D_MODEL).astype(np.float32),
            "threshold": rng.uniform(0.05, 0.3, N_FEATURES).astype(np.float32),
            "affine_skip_connection": rng.normal(0, 0.1, (D_MODEL, D_MODEL)).astype(np.float32),
        }
        path = tmp_path / f"gs2-{i}.safetensors"
        save_file(arrays, str(path))
        files[f"transcoder/layer_{i}/params.safetensors"] = path
        layers.append(arrays)
    publish(cache, "acme/gemma-scope-2-like", files)
    config = {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
              "feature_output_hook": "mlp.hook_out",
              "transcoders": [f"hf://acme/gemma-scope-2-like/{name}" for name in files]}  # fmt: skip
    publish(cache, "acme/gs2-set", {"config.yaml": yaml.safe_dump(config).encode()})
    loaded = load_transcoder(resolve_transcoders("acme/gs2-set", hub_cache=cache, offline=True,
                                                 assembled_root=tmp_path / "a"))  # fmt: skip
    assert loaded.spec.skip
    for i, arrays in enumerate(layers):
        assert torch.equal(loaded.W_enc[i], torch.from_numpy(arrays["w_enc"].T))
        assert torch.equal(loaded.W_skip[i], torch.from_numpy(arrays["affine_skip_connection"].T))  # type: ignore[index]


def test_a_revision_pins_the_commit(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    old, new = random_transcoder("clt", seed=1), random_transcoder("clt", seed=2)
    old_commit = publish(cache, "acme/moving", published_files(old, tmp_path), revisions=("v1",))
    publish(cache, "acme/moving", published_files(new, tmp_path), revisions=("main",))

    def w_enc(ref: str) -> torch.Tensor:
        return load_transcoder(resolve_transcoders(ref, hub_cache=cache, offline=True)).W_enc

    assert torch.equal(w_enc("acme/moving"), new.W_enc)
    assert torch.equal(w_enc("acme/moving@v1"), old.W_enc)
    assert torch.equal(w_enc(f"acme/moving@{old_commit}"), old.W_enc)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_unresolvable_references_are_refused_with_the_reason(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    with pytest.raises(HubError, match="not in the Hugging Face cache and the hub cannot be reached"):
        resolve_transcoders("acme/never-downloaded", hub_cache=cache, offline=True)
    # Online but nothing listens at the endpoint: the same message, not a traceback from the HTTP stack.
    with pytest.raises(HubError, match="hub cannot be reached"):
        resolve_transcoders("acme/never-downloaded", hub_cache=cache, offline=False, endpoint="http://127.0.0.1:9")
    with pytest.raises(HubError, match="neither an existing directory nor a Hugging Face reference"):
        resolve_transcoders("no such dir", hub_cache=cache, offline=True)
    absent = tmp_path / "absent" / "dict"  # an absolute path is a path: its absence is the whole message
    with pytest.raises(TranscoderFormatError, match=f"transcoder directory {absent} does not exist") as err:
        resolve_transcoders(str(absent), hub_cache=cache, offline=True)
    assert not isinstance(err.value, HubError)
    publish(
        cache, "acme/not-a-dict", {"config.yaml": b"model_kind: sae\nfeature_input_hook: a\nfeature_output_hook: b\n"}
    )
    with pytest.raises(HubError, match="model_kind is 'sae'"):
        resolve_transcoders("acme/not-a-dict", hub_cache=cache, offline=True)
    publish(cache, "acme/no-hooks", {"config.yaml": b"model_kind: transcoder_set\n"})
    with pytest.raises(HubError, match=r"lacks \['feature_input_hook', 'feature_output_hook'\]"):
        resolve_transcoders("acme/no-hooks", hub_cache=cache, offline=True)
    publish(cache, "acme/empty-set", {"config.yaml": b"model_kind: cross_layer_transcoder\nfeature_input_hook: a\n"
                                                     b"feature_output_hook: b\n"})  # fmt: skip
    with pytest.raises(HubError, match=r"without W_enc_0\.safetensors"):
        resolve_transcoders("acme/empty-set", hub_cache=cache, offline=True)


def test_a_corrupt_layer_file_leaves_nothing_assembled(tmp_path: Path) -> None:
    cache, assembled = tmp_path / "hub", tmp_path / "assembled"
    layers = gemma_scope_layers()
    publish_gemma(cache, tmp_path, layers)
    snapshot = next((cache / f"models--{GEMMA_FILES_REPO.replace('/', '--')}" / "snapshots").iterdir())
    (snapshot / "layer_1/width_16k/average_l0_76/params.npz").write_bytes(b"not an npz file")
    with pytest.raises(HubError, match=r"layer 1 file .*params\.npz is not readable"):
        resolve_transcoders("gemma", hub_cache=cache, offline=True, assembled_root=assembled)
    assert list(assembled.iterdir()) == []  # no partial directory to be mistaken for a dictionary later


def test_ingest_takes_a_reference_and_checks_it_against_the_model(tmp_path: Path) -> None:
    """The command line resolves `--transcoders acme/...` from the cache, then refuses a dictionary of another width
    before anything is created (milliseconds after the resolution, no run directory)."""
    cache = tmp_path / "hub"
    publish(cache, "acme/tiny-dict", published_files(random_transcoder("clt"), tmp_path))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of France is\n")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", ATLAS_RUNS_DIR=str(tmp_path / "runs"))
    run = subprocess.run(
        [sys.executable, "-m", "atlas_cli", "ingest", "--corpus", str(corpus), "--transcoders", "acme/tiny-dict"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    message = " ".join((run.stdout + run.stderr).split())
    assert "d_model" in message or "width" in message, message
    assert "Traceback" not in message and not (tmp_path / "runs").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "atlas_cli", "ingest", "--corpus", str(corpus), "--transcoders", "acme/absent"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert missing.returncode != 0 and "not in the Hugging Face cache" in " ".join(
        (missing.stdout + missing.stderr).split()
    )
    # neither a directory nor a reference: the explanation prints its brackets literally (not as console markup)
    neither = subprocess.run(
        [sys.executable, "-m", "atlas_cli", "ingest", "--corpus", str(corpus), "--transcoders", "no such dir"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    said = " ".join((neither.stdout + neither.stderr).split())
    assert neither.returncode == 2 and "owner/repo[/subfolder][@revision]" in said and "Traceback" not in said, said
