"""Check a transcoder directory, and its fit to a model, from its config and safetensors headers: no weights loaded.

`inspect_transcoders(directory)` reads `config.yaml`, `atlas.json` and the header of every weight file (8 bytes of
length, then JSON naming each tensor's dtype, shape and byte range) and checks what loading would check about the
files' structure: every file present, every header readable, every tensor's byte range consistent with its shape and
inside the file (a truncated or overwritten file fails here), the shapes consistent across files. It does not read
the tensor data, so NaNs in an intact file are still found only by `load_transcoder`.
`check_fit(header, model)` then compares the set with the model's sizes (`atlas.models.dimensions`, no model
loaded) and with the model the set records it was trained on. Both raise `TranscoderFormatError` with one message
that names the file or both models. Only the standard library, PyYAML and `atlas.models.dimensions` are imported:
the command line runs this before anything heavy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from atlas.models.dimensions import LOCAL, NAMED, ModelDimensions, model_dimensions, model_signature

METADATA_FILE = "atlas.json"
CONFIG_FILE = "config.yaml"
MODEL_KINDS = {"transcoder_set": "plt", "cross_layer_transcoder": "clt"}
# Block-relative hooks a transcoder may read or write: all d_model wide, as attribution requires (`check_compatible`).
HOOKS = frozenset({"mlp.hook_in", "mlp.hook_out", "hook_mlp_in", "hook_mlp_out", "hook_resid_pre", "hook_resid_mid",
                   "hook_resid_post", "ln2.hook_normalized", "hook_attn_out"})  # fmt: skip
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


class TranscoderFormatError(ValueError):
    """A transcoder directory is missing a file, has an unreadable file, or has inconsistent shapes."""


@dataclass(frozen=True)
class TranscoderHeader:
    """What a transcoder directory holds, read from its config and headers."""

    directory: Path
    kind: str  # "plt" | "clt"
    n_layers: int
    d_model: int
    n_features: int
    input_hook: str
    output_hook: str
    model_name: str | None  # the model it records it was trained on (atlas.json, else config.yaml)
    model_identity: str | None  # atlas.json's record, else derived from model_name where that is possible
    metadata: dict[str, Any] = field(default_factory=dict)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """`atlas.json` of a transcoder directory, or `{}` when it was written by another tool."""
    path = Path(directory) / METADATA_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TranscoderFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise TranscoderFormatError(f"{path}: expected a JSON object")
    return data


def read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_FILE
    if not path.is_file():
        raise TranscoderFormatError(f"{root}: missing {CONFIG_FILE}")
    try:
        config = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise TranscoderFormatError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise TranscoderFormatError(f"{path}: expected a mapping")
    return config


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, after checking the header against the file's size."""
    if not path.is_file():
        raise TranscoderFormatError(f"missing weight file {path}")
    size = path.stat().st_size
    bad = f"{path}: not a readable safetensors file"
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise TranscoderFormatError(f"{bad} ({size} bytes, shorter than a header)")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise TranscoderFormatError(f"{bad} (header of {n} bytes in a file of {size}: truncated or overwritten)")
        raw = handle.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TranscoderFormatError(f"{bad} (header is not JSON: {err})") from err
    if not isinstance(header, dict):
        raise TranscoderFormatError(f"{bad} (header is not a JSON object)")
    data_bytes, end_max, shapes = size - 8 - n, 0, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            expected = math.prod(int(s) for s in shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as err:
            raise TranscoderFormatError(f"{bad} (tensor {name!r} has a malformed header entry: {err!r})") from err
        if not 0 <= begin <= end <= data_bytes or end - begin != expected:
            raise TranscoderFormatError(
                f"{bad} (tensor {name!r} {dtype}{list(shape)} at bytes {begin}-{end} of {data_bytes}: truncated or"
                " overwritten)"
            )
        shapes[name] = tuple(int(s) for s in shape)
        end_max = max(end_max, end)
    if end_max != data_bytes:
        raise TranscoderFormatError(f"{bad} ({data_bytes} bytes of data, its tensors cover {end_max})")
    return shapes


def _count(root: Path, pattern: str) -> int:
    n = 0
    while (root / pattern.format(n)).exists():
        n += 1
    if n == 0:
        raise TranscoderFormatError(f"{root}: no {pattern.format(0)} found")
    return n


def _expect(shapes: dict[str, tuple[int, ...]], name: str, shape: tuple[int, ...], path: Path) -> None:
    if name not in shapes:
        raise TranscoderFormatError(f"{path}: missing tensor {name!r} (has {sorted(shapes)})")
    if shapes[name] != shape:
        raise TranscoderFormatError(f"{path}: tensor {name!r} has shape {shapes[name]}, expected {shape}")


def _first_shape(shapes: dict[str, tuple[int, ...]], name: str, path: Path) -> tuple[int, int]:
    shape = shapes.get(name)
    if shape is None or len(shape) != 2:
        raise TranscoderFormatError(f"{path}: missing 2-d tensor {name!r} (has {sorted(shapes)})")
    return shape[0], shape[1]


def _plt_sizes(root: Path) -> tuple[int, int, int]:
    n_layers = _count(root, "layer_{}.safetensors")
    first = root / "layer_0.safetensors"
    F, d = _first_shape(read_safetensors_header(first), "W_enc", first)
    for i in range(n_layers):
        path = root / f"layer_{i}.safetensors"
        shapes = read_safetensors_header(path)
        for name, shape in (("W_enc", (F, d)), ("W_dec", (F, d)), ("b_enc", (F,)), ("b_dec", (d,))):
            _expect(shapes, name, shape, path)
    return n_layers, F, d


def _clt_sizes(root: Path) -> tuple[int, int, int]:
    n_layers = _count(root, "W_enc_{}.safetensors")
    first = root / "W_enc_0.safetensors"
    F, d = _first_shape(read_safetensors_header(first), "W_enc_0", first)
    has_skip = (root / "W_skip_0.safetensors").exists()
    for i in range(n_layers):
        enc, dec = root / f"W_enc_{i}.safetensors", root / f"W_dec_{i}.safetensors"
        shapes = read_safetensors_header(enc)
        for name, shape in ((f"W_enc_{i}", (F, d)), (f"b_enc_{i}", (F,)), (f"b_dec_{i}", (d,))):
            _expect(shapes, name, shape, enc)
        _expect(read_safetensors_header(dec), f"W_dec_{i}", (F, n_layers - i, d), dec)
        if has_skip:
            skip = root / f"W_skip_{i}.safetensors"
            _expect(read_safetensors_header(skip), f"W_skip_{i}", (d, d), skip)
    return n_layers, F, d


def inspect_transcoders(directory: str | Path) -> TranscoderHeader:
    """Read and check a PLT or CLT directory's config and headers (see the module docstring)."""
    root = Path(directory)
    if not root.is_dir():
        raise TranscoderFormatError(f"transcoder directory {root} does not exist")
    config = read_config(root)
    kind = MODEL_KINDS.get(str(config.get("model_kind")))
    if kind is None:
        raise TranscoderFormatError(
            f"{root / CONFIG_FILE}: model_kind is {config.get('model_kind')!r}; expected one of {list(MODEL_KINDS)}"
        )
    meta = read_metadata(root)
    n_layers, F, d = _plt_sizes(root) if kind == "plt" else _clt_sizes(root)
    raw_name = meta.get("model_name") or config.get("model_name")
    model_name = str(raw_name) if raw_name else None
    recorded = meta.get("model_identity")
    identity = str(recorded) if recorded else model_signature(model_name) if model_name else None
    return TranscoderHeader(
        directory=root,
        kind=kind,
        n_layers=n_layers,
        d_model=d,
        n_features=F,
        input_hook=str(config.get("feature_input_hook", "mlp.hook_in")),
        output_hook=str(config.get("feature_output_hook", "mlp.hook_out")),
        model_name=model_name,
        model_identity=identity,
        metadata=meta,
    )


def _comparable(a: str, b: str) -> bool:
    """Two identities can be told apart only when both are names or both are local-directory hashes."""
    return any(a.startswith(p) and b.startswith(p) for p in (NAMED, LOCAL))


def check_fit(header: TranscoderHeader, model: str, dimensions: ModelDimensions | None = None) -> None:
    """Refuse a transcoder set that does not fit `model`: hooks, layer count, widths, the model it was trained on.

    `dimensions` defaults to `model_dimensions(model)`; where that is None (a hub name), only the hooks and the
    recorded model are checked here, and the sizes when the model is loaded (`check_compatible`).
    """
    dims = dimensions if dimensions is not None else model_dimensions(model)
    where = f"transcoders in {header.directory}"
    for role, hook in (("input", header.input_hook), ("output", header.output_hook)):
        if hook not in HOOKS:
            raise TranscoderFormatError(
                f"{where}: {role} hook {hook!r} is not one this pipeline can attach to (one of {sorted(HOOKS)})"
            )
    problems = []
    if dims is not None:
        if header.n_layers != dims.n_layers:
            problems.append(f"{header.n_layers} layers vs the model's {dims.n_layers}")
        if header.d_model != dims.d_model:
            problems.append(f"d_model {header.d_model} vs the model's {dims.d_model}")
    current = dims.identity if dims is not None else model_signature(model)
    recorded = header.model_identity
    if recorded and current and recorded != current and _comparable(recorded, current):
        problems.insert(0, f"they were trained on {header.model_name or recorded!r} ({recorded}), not {model!r}"
                           f" ({current})")  # fmt: skip
    if problems:
        raise TranscoderFormatError(f"{where} do not fit model {model!r}: " + "; ".join(problems))


def check_transcoders_fit(directory: str | Path, model: str) -> TranscoderHeader:
    """`inspect_transcoders` then `check_fit`: the cheap check before anything is created (milliseconds)."""
    header = inspect_transcoders(directory)
    check_fit(header, model)
    return header
