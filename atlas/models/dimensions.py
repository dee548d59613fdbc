"""A model's sizes and identity without loading it: what a caller needs to refuse a mismatched input up front.

`model_dimensions(name)` answers for the packaged default (its sizes are declared in `atlas.config`), the tiny test
models (their configs, below) and local Hugging Face directories (their `config.json`); for a hub name it returns
None, since knowing its sizes would mean asking the hub. `model_signature(name)` names the model a transcoder set was
trained on, so a set trained on another model of the same sizes can be told apart:
- `name:<hub label>` for the packaged default (its alias and hub label give the same identity);
- `name:<name>` for the tiny models and hub names;
- `local:<16 hex digits>` for a local directory: a hash of its `config.json` and its weight files' names and sizes
  (not their contents: cheap, and the same wherever the directory is moved).

This module imports nothing heavy (no torch, no transformers): the command line uses it before anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas.config import PACKAGED_MODELS

NAMED, LOCAL = "name:", "local:"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which source was tried and what to do."""


@dataclass(frozen=True)
class TinyModelConfig:
    """Sizes of a tiny test model. Defaults are small enough that a forward pass takes milliseconds."""

    architecture: str  # "gpt2" | "llama"
    n_layers: int = 2
    d_model: int = 32
    n_heads: int = 4
    n_kv_heads: int = 2  # llama only (grouped-query attention)
    d_mlp: int = 64
    n_ctx: int = 64
    seed: int = 0


TINY_MODELS: dict[str, TinyModelConfig] = {
    "tiny-gpt2": TinyModelConfig(architecture="gpt2"),
    "tiny-llama": TinyModelConfig(architecture="llama"),
}


@dataclass(frozen=True)
class ModelDimensions:
    """The sizes a transcoder set must fit, and the model's identity."""

    name: str
    identity: str
    n_layers: int
    d_model: int


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") > 1)


def _local_directory(name: str) -> Path | None:
    """The directory `name` names, if it is one; a path-like name that is not a directory is an error."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if looks_like_path(name):
        raise ModelLoadError(f"model directory {name!r} does not exist")
    return None


def _read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return config


def _local_identity(directory: Path) -> str:
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return LOCAL + digest.hexdigest()[:16]


def model_signature(name: str) -> str | None:
    """The identity of the model `name` would load (see the module docstring); None for a path that is gone."""
    if name in PACKAGED_MODELS:
        return NAMED + PACKAGED_MODELS[name].hub_label
    if name in TINY_MODELS:
        return NAMED + name
    try:
        directory = _local_directory(name)
    except ModelLoadError:
        return None
    if directory is None:
        # a hub name; the packaged default's hub label is the same model as its alias
        return NAMED + name
    return _local_identity(directory) if (directory / "config.json").is_file() else None


def _first_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_dimensions(name: str) -> ModelDimensions | None:
    """Sizes and identity of `name` without loading it; None for a hub name (see the module docstring)."""
    if name in PACKAGED_MODELS:
        spec = PACKAGED_MODELS[name]
        return ModelDimensions(name, NAMED + spec.hub_label, spec.n_layers, spec.d_model)
    if name in TINY_MODELS:
        tiny = TINY_MODELS[name]
        return ModelDimensions(name, NAMED + name, tiny.n_layers, tiny.d_model)
    directory = _local_directory(name)
    if directory is None:
        return None
    config = _read_hf_config(directory)
    text = config.get("text_config")
    text_config = text if isinstance(text, dict) else config
    n_layers = _first_int(text_config, "num_hidden_layers", "n_layer", "num_layers")
    d_model = _first_int(text_config, "hidden_size", "n_embd", "d_model")
    if n_layers is None or d_model is None:
        raise ModelLoadError(f"{directory / 'config.json'}: no layer count or hidden size")
    return ModelDimensions(name, _local_identity(directory), n_layers, d_model)
