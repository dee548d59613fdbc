"""Save and load transcoders in circuit-tracer's directory formats, so other tools read ours and we read theirs.

PLT directory (`model_kind: transcoder_set`):
    config.yaml, layer_{i}.safetensors with W_enc (F, d), W_dec (F, d), b_enc (F), b_dec (d),
    optional activation_function.threshold (F), optional W_skip (d, d) applied as x @ W_skip.T.
CLT directory (`model_kind: cross_layer_transcoder`):
    config.yaml, W_enc_{i}.safetensors with W_enc_{i} (F, d), b_enc_{i} (F), b_dec_{i} (d) (bias of target i),
    optional threshold_{i} (F); W_dec_{i}.safetensors with W_dec_{i} (F, L − i, d), targets i…L−1.
    circuit-tracer has no CLT skip; ours is written to W_skip_{i}.safetensors (W_skip_{i} (d, d)), which it ignores.
Both: `atlas.json` holds what the formats cannot say (activation kind, training config, metrics, and the model the
set was trained on: `model_name` and `model_identity`, which `atlas.transcoders.checks` compares with the model an
ingest names); it is optional on load, so directories written by other tools load too.

Saving is atomic: files go to a temporary sibling directory that replaces the target only once complete, so a
crash never leaves a half-written transcoder where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atlas.models.dimensions import model_signature
from atlas.transcoders.activations import ActivationConfig
from atlas.transcoders.base import EncoderStack, TranscoderKind, TranscoderSpec
from atlas.transcoders.checks import (
    CONFIG_FILE,
    METADATA_FILE,
    TranscoderFormatError,
    read_config,
    read_metadata,
    read_safetensors_header,
)
from atlas.transcoders.cross_layer import CrossLayerTranscoder
from atlas.transcoders.per_layer import PerLayerTranscoder

_MODEL_KINDS: dict[str, TranscoderKind] = {"transcoder_set": "plt", "cross_layer_transcoder": "clt"}


def build_transcoder(spec: TranscoderSpec, **kwargs: Any) -> PerLayerTranscoder | CrossLayerTranscoder:
    """A freshly initialised transcoder of the kind named by `spec`."""
    cls = PerLayerTranscoder if spec.kind == "plt" else CrossLayerTranscoder
    return cls(spec, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# save


def save_transcoder(
    transcoder: EncoderStack,
    directory: str | Path,
    *,
    model_name: str,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `transcoder` to `directory` in circuit-tracer's format (atomically); returns the directory."""
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        spec = transcoder.spec
        tensors = _plt_files(transcoder) if spec.kind == "plt" else _clt_files(transcoder)
        for filename, content in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(tmp / filename))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(_config_yaml(spec, model_name, target), sort_keys=False))
        meta = {
            "format": "circuit-atlas-transcoder",
            "format_version": 1,
            "kind": spec.kind,
            "n_layers": spec.n_layers,
            "d_model": spec.d_model,
            "n_features": spec.n_features,
            "activation": spec.activation.to_dict(),
            "skip": spec.skip,
            "input_hook": spec.input_hook,
            "output_hook": spec.output_hook,
            "model_name": model_name,
            # what `atlas.transcoders.checks` compares with the model an ingest names (None: a path that is gone)
            "model_identity": model_signature(model_name),
            **(metadata or {}),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
        _replace_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_directory(new: Path, target: Path) -> None:
    """Swap `new` into place of `target`; the old one is removed only after the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def _config_yaml(spec: TranscoderSpec, model_name: str, target: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model_name": model_name,
        "model_kind": "transcoder_set" if spec.kind == "plt" else "cross_layer_transcoder",
        "feature_input_hook": spec.input_hook,
        "feature_output_hook": spec.output_hook,
        "scan": str(target),
    }
    if spec.kind == "plt":
        config["transcoders"] = [str(target / f"layer_{i}.safetensors") for i in range(spec.n_layers)]
    if spec.activation.kind == "topk":
        config["activation"] = "topk"
        config["k"] = spec.activation.k
    return config


def _plt_files(tc: EncoderStack) -> dict[str, dict[str, torch.Tensor]]:
    assert isinstance(tc, PerLayerTranscoder)
    threshold = tc.threshold
    files = {}
    for i in range(tc.spec.n_layers):
        layer = {"W_enc": tc.W_enc[i], "W_dec": tc.W_dec[i], "b_enc": tc.b_enc[i], "b_dec": tc.b_dec[i]}
        if threshold is not None:
            layer["activation_function.threshold"] = threshold[i]
        if tc.W_skip is not None:
            layer["W_skip"] = tc.W_skip[i]
        files[f"layer_{i}.safetensors"] = layer
    return files


def _clt_files(tc: EncoderStack) -> dict[str, dict[str, torch.Tensor]]:
    assert isinstance(tc, CrossLayerTranscoder)
    threshold = tc.threshold
    files = {}
    for i in range(tc.spec.n_layers):
        enc = {f"W_enc_{i}": tc.W_enc[i], f"b_enc_{i}": tc.b_enc[i], f"b_dec_{i}": tc.b_dec[i]}
        if threshold is not None:
            enc[f"threshold_{i}"] = threshold[i]
        files[f"W_enc_{i}.safetensors"] = enc
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": tc.W_dec[i]}
        if tc.W_skip is not None:
            files[f"W_skip_{i}.safetensors"] = {f"W_skip_{i}": tc.W_skip[i]}
    return files


# ---------------------------------------------------------------------------------------------------------
# load


def load_transcoder(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> PerLayerTranscoder | CrossLayerTranscoder:
    """Load a PLT or CLT directory in circuit-tracer's format (ours or another tool's)."""
    root = Path(directory)
    if not root.is_dir():
        raise TranscoderFormatError(f"transcoder directory {root} does not exist")
    config = read_config(root)
    kind = _MODEL_KINDS.get(str(config.get("model_kind")))
    if kind is None:
        raise TranscoderFormatError(
            f"{root / CONFIG_FILE}: model_kind is {config.get('model_kind')!r}; expected one of {list(_MODEL_KINDS)}"
        )
    meta = read_metadata(root)
    loader = _load_plt if kind == "plt" else _load_clt
    transcoder = loader(root, config, meta)
    return transcoder.to(device)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TranscoderFormatError(f"missing weight file {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise TranscoderFormatError(f"{path}: not a readable safetensors file ({err})") from err
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TranscoderFormatError(f"{path}: tensor {name} contains NaN or infinite values")
    return tensors


def read_spec(directory: str | Path) -> TranscoderSpec:
    """The spec of a saved transcoder from its config, metadata and tensor headers, without loading a weight."""
    root = Path(directory)
    if not root.is_dir():
        raise TranscoderFormatError(f"transcoder directory {root} does not exist")
    config = read_config(root)
    kind = _MODEL_KINDS.get(str(config.get("model_kind")))
    if kind is None:
        raise TranscoderFormatError(
            f"{root / CONFIG_FILE}: model_kind is {config.get('model_kind')!r}; expected one of {list(_MODEL_KINDS)}"
        )
    meta = read_metadata(root)
    if kind == "plt":
        n_layers = _count_layers(root, "layer_{}.safetensors")
        first = read_safetensors_header(root / "layer_0.safetensors")
        enc, has_threshold, has_skip = "W_enc", "activation_function.threshold" in first, "W_skip" in first
    else:
        n_layers = _count_layers(root, "W_enc_{}.safetensors")
        first = read_safetensors_header(root / "W_enc_0.safetensors")
        enc, has_threshold = "W_enc_0", "threshold_0" in first
        has_skip = (root / "W_skip_0.safetensors").exists()
    if enc not in first or len(first[enc]) != 2:
        raise TranscoderFormatError(f"{root}: the first layer's file has no 2-d tensor {enc!r}")
    F, d = first[enc]
    return _spec_from(kind, n_layers, F, d, has_threshold, has_skip, config, meta)


def _get(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if name not in tensors:
        raise TranscoderFormatError(f"{path}: missing tensor {name!r} (has {sorted(tensors)})")
    tensor = tensors[name].to(torch.float32)
    if tuple(tensor.shape) != shape:
        raise TranscoderFormatError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _count_layers(root: Path, pattern: str) -> int:
    n = 0
    while (root / pattern.format(n)).exists():
        n += 1
    if n == 0:
        raise TranscoderFormatError(f"{root}: no {pattern.format(0)} found")
    return n


def _spec_from(
    kind: TranscoderKind,
    n_layers: int,
    F: int,
    d: int,
    has_threshold: bool,
    has_skip: bool,
    config: dict[str, Any],
    meta: dict[str, Any],
) -> TranscoderSpec:
    if config.get("activation") == "topk":
        activation = ActivationConfig("topk", int(config["k"]))
    elif "activation" in meta:
        activation = ActivationConfig(**meta["activation"])
    else:
        activation = ActivationConfig("jumprelu" if has_threshold else "relu")
    if (activation.kind == "jumprelu") != has_threshold:
        raise TranscoderFormatError(
            f"activation {activation.kind!r} in the metadata does not match the files (threshold present:"
            f" {has_threshold})"
        )
    return TranscoderSpec(
        kind=kind,
        n_layers=n_layers,
        d_model=d,
        n_features=F,
        activation=activation,
        skip=has_skip,
        input_hook=str(config.get("feature_input_hook", "mlp.hook_in")),
        output_hook=str(config.get("feature_output_hook", "mlp.hook_out")),
    )


def _threshold_to_log(threshold: torch.Tensor) -> torch.Tensor:
    return threshold.clamp(min=1e-30).log()


def _load_plt(root: Path, config: dict[str, Any], meta: dict[str, Any]) -> PerLayerTranscoder:
    n_layers = _count_layers(root, "layer_{}.safetensors")
    first_path = root / "layer_0.safetensors"
    first = _read_tensors(first_path)
    if "W_enc" not in first:
        raise TranscoderFormatError(f"{first_path}: missing tensor 'W_enc'")
    F, d = first["W_enc"].shape
    spec = _spec_from("plt", n_layers, F, d, "activation_function.threshold" in first, "W_skip" in first, config, meta)
    tc = PerLayerTranscoder(spec)
    with torch.no_grad():
        for i in range(n_layers):
            path = root / f"layer_{i}.safetensors"
            t = first if i == 0 else _read_tensors(path)
            tc.W_enc[i] = _get(t, "W_enc", (F, d), path)
            tc.W_dec[i] = _get(t, "W_dec", (F, d), path)
            tc.b_enc[i] = _get(t, "b_enc", (F,), path)
            tc.b_dec[i] = _get(t, "b_dec", (d,), path)
            if tc.log_threshold is not None:
                tc.log_threshold[i] = _threshold_to_log(_get(t, "activation_function.threshold", (F,), path))
            if tc.W_skip is not None:
                tc.W_skip[i] = _get(t, "W_skip", (d, d), path)
    return tc


def _load_clt(root: Path, config: dict[str, Any], meta: dict[str, Any]) -> CrossLayerTranscoder:
    n_layers = _count_layers(root, "W_enc_{}.safetensors")
    first_path = root / "W_enc_0.safetensors"
    first = _read_tensors(first_path)
    if "W_enc_0" not in first:
        raise TranscoderFormatError(f"{first_path}: missing tensor 'W_enc_0'")
    F, d = first["W_enc_0"].shape
    has_skip = (root / "W_skip_0.safetensors").exists()
    spec = _spec_from("clt", n_layers, F, d, "threshold_0" in first, has_skip, config, meta)
    tc = CrossLayerTranscoder(spec)
    with torch.no_grad():
        for i in range(n_layers):
            enc_path, dec_path = root / f"W_enc_{i}.safetensors", root / f"W_dec_{i}.safetensors"
            enc = first if i == 0 else _read_tensors(enc_path)
            tc.W_enc[i] = _get(enc, f"W_enc_{i}", (F, d), enc_path)
            tc.b_enc[i] = _get(enc, f"b_enc_{i}", (F,), enc_path)
            tc.b_dec[i] = _get(enc, f"b_dec_{i}", (d,), enc_path)
            if tc.log_threshold is not None:
                tc.log_threshold[i] = _threshold_to_log(_get(enc, f"threshold_{i}", (F,), enc_path))
            tc.W_dec[i].copy_(_get(_read_tensors(dec_path), f"W_dec_{i}", (F, n_layers - i, d), dec_path))
            if tc.W_skip is not None:
                skip_path = root / f"W_skip_{i}.safetensors"
                tc.W_skip[i] = _get(_read_tensors(skip_path), f"W_skip_{i}", (d, d), skip_path)
    return tc


def check_compatible(spec: TranscoderSpec, *, n_layers: int, d_model: int, model_name: str) -> None:
    """Raise a clear error when a transcoder does not fit a model."""
    problems = []
    if spec.n_layers != n_layers:
        problems.append(f"{spec.n_layers} layers vs the model's {n_layers}")
    if spec.d_model != d_model:
        problems.append(f"d_model {spec.d_model} vs the model's {d_model}")
    if problems:
        raise TranscoderFormatError(f"transcoder does not fit model {model_name!r}: " + "; ".join(problems))


def describe(directory: str | Path) -> str:
    """A one-line human summary of a saved transcoder."""
    meta = read_metadata(directory)
    tc = load_transcoder(directory)
    s = tc.spec
    n_params = sum(p.numel() for p in tc.parameters())
    return (
        f"{s.kind.upper()} {s.n_layers}×{s.n_features} features, d_model {s.d_model}, {s.activation.kind}"
        f"{' + skip' if s.skip else ''}, {n_params / 1e6:.1f}M params, hooks {s.input_hook} → {s.output_hook},"
        f" model {meta.get('model_name', '?')}"
    )
