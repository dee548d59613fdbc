"""A transcoder dictionary's identity: a hash of what determines its behaviour, and nothing else.

`transcoder_identity(directory)` hashes
1. every weight tensor of the directory's `*.safetensors` files, in a canonical order (file name, then tensor name):
   its name (`<file stem>/<tensor>`, since a PLT's layer index is only in its file name), dtype, shape and raw
   little-endian bytes, streamed from the file in 1 MiB blocks (`atlas.models.identity.hash_safetensors` parses the
   safetensors header itself; no tensor is loaded, so hashing needs no memory beyond one block);
2. the canonical JSON of the semantic configuration (`semantic_config`): kind, sizes, activation and its parameters,
   input and output hook points, skip.

It never hashes `atlas.json`'s timings, metrics or tags, `config.yaml`'s paths (`scan`, `transcoders`), the
safetensors `__metadata__`, the directory's name or its location. Copying, renaming or re-saving a dictionary (a
deterministic retraining gives the same bytes) therefore keeps its id, and a single changed weight gives another.
The id reads `<kind>-<16 hex digits of SHA-256>` (e.g. `clt-3fa9c1d2e4b5a6f7`); the directory's name and path
are returned beside it as a *label* (`name`, `source`), never part of the key.

The same tensor stored in another dtype is another dictionary here (its values differ once rounded); the hash is of
what is on disk, not of what `load_transcoder` converts it to.

`legacy_transcoder_identity` is the rule of schema versions <= 4 (`<directory name>-<12 hex>` over every file's
bytes, atlas.json included); it is kept only so that `atlas db migrate --transcoders` can recognise the ids that a
store of that era holds.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas.models.identity import IdentityError, hash_safetensors
from atlas.transcoders.io import TranscoderFormatError, read_spec

IDENTITY_VERSION = 1  # enters the hash: a change of the rule must never produce an old rule's id
_HEX_DIGITS = 16


@dataclass(frozen=True)
class TranscoderIdentity:
    """A dictionary's id (the key) and the labels that go beside it (not part of the key)."""

    id: str
    name: str  # the directory's name, a human label
    source: str  # the resolved directory it was read from
    kind: str
    config: dict[str, Any]  # the semantic configuration that entered the hash
    n_tensors: int
    n_bytes: int  # tensor bytes hashed
    seconds: float  # time taken to hash


def semantic_config(directory: str | Path) -> dict[str, Any]:
    """What, besides the weights, fixes the dictionary's behaviour (read from config.yaml, atlas.json, headers)."""
    spec = read_spec(directory)
    return {
        "kind": spec.kind,
        "n_layers": spec.n_layers,
        "d_model": spec.d_model,
        "n_features": spec.n_features,
        "activation": spec.activation.to_dict(),
        "skip": spec.skip,
        "input_hook": spec.input_hook,
        "output_hook": spec.output_hook,
    }


def transcoder_identity(directory: str | Path) -> TranscoderIdentity:
    """The identity of the dictionary in `directory` (see the module docstring)."""
    started = time.perf_counter()
    root = Path(directory)
    if not root.is_dir():
        raise TranscoderFormatError(f"transcoder directory {root} does not exist")
    config = semantic_config(root)
    digest = hashlib.sha256()
    digest.update(json.dumps({"identity_version": IDENTITY_VERSION, "config": config}, sort_keys=True).encode())
    digest.update(b"\0")
    files = sorted(p for p in root.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
    try:
        n_tensors, n_bytes = hash_safetensors(files, digest)
    except IdentityError as err:
        raise TranscoderFormatError(str(err)) from err
    return TranscoderIdentity(
        id=f"{config['kind']}-{digest.hexdigest()[:_HEX_DIGITS]}",
        name=root.resolve().name,
        source=str(root.resolve()),
        kind=str(config["kind"]),
        config=config,
        n_tensors=n_tensors,
        n_bytes=n_bytes,
        seconds=time.perf_counter() - started,
    )


def legacy_transcoder_identity(directory: str | Path, *, chunk: int = 1 << 20) -> str:
    """The id that schema versions <= 4 gave `directory` (every file's bytes and the directory's name)."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return f"{root.resolve().name}-{digest.hexdigest()[:12]}"


def is_weight_identity(transcoder_id: str) -> bool:
    """Whether an id follows the weights rule (`plt-`/`clt-` + 16 hex digits) rather than the legacy one."""
    kind, _, digits = transcoder_id.partition("-")
    return kind in ("plt", "clt") and len(digits) == _HEX_DIGITS and all(c in "0123456789abcdef" for c in digits)
