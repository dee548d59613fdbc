"""Published dictionaries by name: a Hugging Face reference resolved to a local directory `load_transcoder` reads.

A reference is `owner/repo` or `owner/repo/subfolder`, either with `@revision` (a branch, tag or commit), an
`hf://owner/repo/subfolder?revision=...` URI, or a short name from `atlas.config.HUB_PRESETS` (`gemma`, `llama`,
`qwen3-0.6b`, ...). An existing local path, or a relative path whose first directory exists here, is never taken
for a reference.

- A repo in circuit-tracer's directory formats (`cross_layer_transcoder` with `W_enc_i` / `W_dec_i` files, or a
  `transcoder_set` of `layer_i.safetensors`) resolves to its snapshot in the Hugging Face cache, unchanged.
- A `transcoder_set` whose `config.yaml` lists one file per layer (`transcoders:`, as circuit-tracer's GemmaScope
  preset does) is assembled once into `<atlas cache>/hub/<owner>--<repo>[--subfolder]@<commit>/` as
  `layer_i.safetensors` files: files already in circuit-tracer's tensor names are linked; GemmaScope `params.npz`
  and GemmaScope-2 safetensors are converted as circuit-tracer's own loaders convert them (encoder transposed,
  `threshold` -> `activation_function.threshold`, `affine_skip_connection` transposed -> `W_skip`). The format is
  recognised from the tensor names, not from the repo's name.

Downloads go through `huggingface_hub`: its cache (`HF_HOME` / `HF_HUB_CACHE`), revision pinning and offline mode
(`HF_HUB_OFFLINE=1`: the cache answers or the reference is refused). Every failure is a `HubError` (a
`TranscoderFormatError`) naming the reference and what to do. This module only produces a directory: it must not
load weights into a transcoder, check them against a model (`atlas.transcoders.checks` does) or touch a store.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import yaml

from atlas.config import HUB_PRESETS, cache_dir
from atlas.transcoders.checks import CONFIG_FILE, TranscoderFormatError

log = logging.getLogger(__name__)

_MODEL_KINDS = ("transcoder_set", "cross_layer_transcoder")
_REQUIRED_KEYS = ("model_kind", "feature_input_hook", "feature_output_hook")
_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<sub>(?:/[\w.-]+)*)(?:@(?P<rev>[\w./-]+))?$")
_ASSEMBLED_MARKER = ".assembled"


class HubError(TranscoderFormatError):
    """A published dictionary that cannot be resolved: unknown repo or revision, uncached offline, not a dictionary."""


@dataclass(frozen=True)
class HubRef:
    """Where a published dictionary lives: repo id, optional subfolder inside it, optional revision."""

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        path = self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
        return path + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(text: str) -> HubRef:
    """Parse a reference (see the module docstring); HubError when it is not one."""
    name = text.strip()
    name = HUB_PRESETS.get(name, name)
    if name.startswith("hf://"):
        parsed = urlparse(name)
        parts = [p for p in f"{parsed.netloc}{parsed.path}".split("/") if p]
        if len(parts) < 2:
            raise HubError(f"{text!r} is not a Hugging Face reference (expected hf://owner/repo[/subfolder])")
        revision = parse_qs(parsed.query).get("revision", [None])[0] or None
        return HubRef("/".join(parts[:2]), "/".join(parts[2:]) or None, revision)
    match = _REF.match(name)
    if match is None:
        raise HubError(
            f"{text!r} is neither an existing directory nor a Hugging Face reference"
            f" (owner/repo[/subfolder][@revision], hf://..., or one of {sorted(HUB_PRESETS)})"
        )
    return HubRef(match["repo"], match["sub"].strip("/") or None, match["rev"])


def is_hub_ref(text: str | Path) -> bool:
    """Whether `text` names a published dictionary rather than a local path. An existing path never does, nor does a
    relative path whose first directory exists here (`runs/demo/transcoder`, a typo, is a missing directory, not a
    repo `runs/demo`)."""
    if isinstance(text, Path) or Path(text).exists() or Path(Path(text).parts[0] if text else "").is_dir():
        return False
    try:
        parse_hub_ref(text)
    except HubError:
        return False
    return True


def resolve_transcoders(
    source: str | Path,
    *,
    hub_cache: str | Path | None = None,
    offline: bool | None = None,
    endpoint: str | None = None,
    assembled_root: Path | None = None,
) -> Path:
    """The local directory of a transcoder set: `source` itself when it is a path, else the resolved reference.

    `hub_cache` / `offline` / `endpoint` default to huggingface_hub's own settings (`HF_HUB_CACHE`,
    `HF_HUB_OFFLINE`, `HF_ENDPOINT`); `assembled_root` to `<atlas cache>/hub`."""
    if isinstance(source, Path) or Path(source).exists() or not is_hub_ref(source):
        path = Path(source)
        if not path.exists():
            if isinstance(source, str) and not source.startswith(("/", ".", "~")):
                parse_hub_ref(source)  # explains what a reference would have looked like, when it is not one
            raise TranscoderFormatError(f"transcoder directory {path} does not exist")
        return path
    ref = parse_hub_ref(str(source))
    hub = _Hub(ref, hub_cache=hub_cache, offline=offline, endpoint=endpoint)
    started = time.perf_counter()
    config_path = hub.download(CONFIG_FILE, subfolder=ref.subfolder)
    config = _read_hub_config(config_path, ref)
    if config["model_kind"] == "transcoder_set" and config.get("transcoders"):
        directory = _assemble(hub, config, _commit_of(config_path), assembled_root or cache_dir() / "hub")
    else:
        directory = hub.snapshot(ref.subfolder)
        _check_snapshot(directory, config, ref)
    log.info("resolved %s to %s in %.1f s", ref, directory, time.perf_counter() - started)
    return directory


class _Hub:
    """huggingface_hub calls for one reference, with its errors turned into HubError."""

    def __init__(self, ref: HubRef, *, hub_cache: str | Path | None, offline: bool | None, endpoint: str | None):
        self.ref = ref
        self.kwargs: dict[str, Any] = {"cache_dir": str(hub_cache) if hub_cache is not None else None}
        if offline is not None:
            self.kwargs["local_files_only"] = offline
        if endpoint is not None:
            self.kwargs["endpoint"] = endpoint

    def download(self, filename: str, *, subfolder: str | None, repo_id: str | None = None,
                 revision: str | None = None) -> Path:  # fmt: skip
        from huggingface_hub import hf_hub_download

        repo = repo_id or self.ref.repo_id
        where = f"{repo}/{subfolder + '/' if subfolder else ''}{filename}"
        with self._errors(where):
            return Path(hf_hub_download(repo, filename, subfolder=subfolder, revision=revision or self.ref.revision,
                                        **self.kwargs))  # fmt: skip

    def snapshot(self, subfolder: str | None) -> Path:
        from huggingface_hub import snapshot_download

        prefix = f"{subfolder}/" if subfolder else ""
        with self._errors(str(self.ref)):
            root = Path(snapshot_download(self.ref.repo_id, revision=self.ref.revision,
                                          allow_patterns=[f"{prefix}*.safetensors", f"{prefix}{CONFIG_FILE}"],
                                          **self.kwargs))  # fmt: skip
        return root / subfolder if subfolder else root

    def _errors(self, where: str) -> _HubErrors:
        return _HubErrors(self.ref, where)


class _HubErrors:
    """Context manager: huggingface_hub's exceptions -> HubError with the reference and a remedy."""

    def __init__(self, ref: HubRef, where: str):
        self.ref, self.where = ref, where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, _tb: object) -> None:
        if err is None or not isinstance(err, Exception) or isinstance(err, HubError):
            return
        from huggingface_hub import errors

        if isinstance(err, errors.RevisionNotFoundError):
            raise HubError(f"{self.ref}: revision {self.ref.revision!r} does not exist in {self.ref.repo_id}") from err
        if isinstance(err, errors.RepositoryNotFoundError):
            raise HubError(f"{self.ref}: no such repository on the hub (or it is private/gated: log in)") from err
        if isinstance(err, errors.EntryNotFoundError | FileNotFoundError) and not isinstance(
            err, errors.LocalEntryNotFoundError
        ):
            raise HubError(f"{self.ref}: {self.where} does not exist; is this a transcoder repository?") from err
        if isinstance(err, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled | OSError):
            raise HubError(
                f"{self.ref}: {self.where} is not in the Hugging Face cache and the hub cannot be reached"
                f" ({type(err).__name__}); download it once on a connected machine or point HF_HUB_CACHE at a"
                " cache that holds it"
            ) from err
        raise HubError(f"{self.ref}: {self.where}: {type(err).__name__}: {err}") from err


def _read_hub_config(path: Path, ref: HubRef) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise HubError(f"{ref}: {CONFIG_FILE} is not readable YAML ({err})") from err
    if not isinstance(config, dict):
        raise HubError(f"{ref}: {CONFIG_FILE} is not a mapping")
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise HubError(f"{ref}: {CONFIG_FILE} lacks {missing}; not a circuit-tracer transcoder config")
    if config["model_kind"] not in _MODEL_KINDS:
        raise HubError(f"{ref}: {CONFIG_FILE} model_kind is {config['model_kind']!r}; expected one of {_MODEL_KINDS}")
    return config


def _commit_of(path: Path) -> str:
    """The commit a file of the hub cache belongs to (`.../snapshots/<commit>/...`)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "local"


def _check_snapshot(directory: Path, config: dict[str, Any], ref: HubRef) -> None:
    first = "W_enc_0.safetensors" if config["model_kind"] == "cross_layer_transcoder" else "layer_0.safetensors"
    if not (directory / first).is_file():
        raise HubError(f"{ref}: {config['model_kind']} repository without {first}; not a transcoder set we can read")


# -- per-layer file lists (GemmaScope and friends) -------------------------------------------------------------------


def parse_hf_uri(uri: str) -> tuple[str, str, str | None]:
    """`hf://owner/repo/path/in/repo?revision=r` -> (repo_id, path, revision)."""
    parsed = urlparse(uri)
    parts = [p for p in f"{parsed.netloc}{parsed.path}".split("/") if p]
    if parsed.scheme != "hf" or len(parts) < 3:
        raise HubError(f"{uri!r} is not a file URI of the form hf://owner/repo/path")
    return "/".join(parts[:2]), "/".join(parts[2:]), parse_qs(parsed.query).get("revision", [None])[0] or None


def _assemble(hub: _Hub, config: dict[str, Any], commit: str, root: Path) -> Path:
    """Layer files of a `transcoders:` list, in circuit-tracer's `layer_i.safetensors` names, built once."""
    ref = hub.ref
    name = ref.repo_id.replace("/", "--") + (f"--{ref.subfolder.replace('/', '--')}" if ref.subfolder else "")
    target = root / f"{name}@{commit}"
    if (target / _ASSEMBLED_MARKER).is_file():
        return target
    entries = config["transcoders"]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise HubError(f"{ref}: {CONFIG_FILE} 'transcoders' must be a list of file URIs or paths")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        from rich.progress import track

        for layer, entry in enumerate(track(entries, description=f"assembling {ref}", transient=True)):
            if entry.startswith("hf://"):
                repo, path, revision = parse_hf_uri(entry)
                local = hub.download(Path(path).name, subfolder=str(Path(path).parent) if "/" in path else None,
                                     repo_id=repo, revision=revision)  # fmt: skip
            else:
                local = Path(entry)
                if not local.is_file():
                    raise HubError(f"{ref}: layer {layer} file {entry} does not exist")
            _write_layer(local, staging / f"layer_{layer}.safetensors", ref, layer)
        assembled: dict[str, Any] = {"model_kind": "transcoder_set", "source": str(ref), "commit": commit}
        assembled |= {k: config[k] for k in ("model_name", "feature_input_hook", "feature_output_hook") if k in config}
        (staging / CONFIG_FILE).write_text(
            yaml.safe_dump(assembled),
            encoding="utf-8",
        )
        (staging / _ASSEMBLED_MARKER).write_text(str(ref), encoding="utf-8")
        if target.exists():  # an unfinished earlier attempt (no marker): replaced whole
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_layer(source: Path, target: Path, ref: HubRef, layer: int) -> None:
    """One layer file in circuit-tracer's PLT tensor names: linked when already so, else converted."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray]
    try:
        if source.suffix == ".npz":
            with np.load(source) as npz:
                tensors = {str(k): npz[k] for k in npz.files}
        else:
            with safe_open(str(source), framework="numpy") as handle:
                names = set(handle.keys())
                if "W_enc" in names:  # circuit-tracer's own names already
                    target.symlink_to(source.resolve())
                    return
                tensors = {k: handle.get_tensor(k) for k in names}
    except (OSError, ValueError, RuntimeError) as err:
        raise HubError(f"{ref}: layer {layer} file {source} is not readable ({err})") from err
    save_file(_convert_layer(tensors, f"{ref}: layer {layer} file {source.name}"), str(target))


def _convert_layer(tensors: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """GemmaScope (`W_enc (d, F)`, `threshold`) or GemmaScope-2 (`w_enc (d, F)`, `w_dec`, `threshold`,
    optional `affine_skip_connection (d, d)`) tensors -> circuit-tracer's PLT names, `W_enc (F, d)`, `W_dec (F, d)`."""
    names = {k.lower(): k for k in tensors}
    needed = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
    missing = [n for n in needed if n not in names]
    if missing:
        raise HubError(f"{where}: not a GemmaScope transcoder file (missing {missing}; has {sorted(tensors)})")
    out = {
        "W_enc": np.ascontiguousarray(tensors[names["w_enc"]].T),
        "W_dec": np.ascontiguousarray(tensors[names["w_dec"]]),
        "b_enc": np.ascontiguousarray(tensors[names["b_enc"]]),
        "b_dec": np.ascontiguousarray(tensors[names["b_dec"]]),
        "activation_function.threshold": np.ascontiguousarray(tensors[names["threshold"]]),
    }
    if "affine_skip_connection" in names:
        out["W_skip"] = np.ascontiguousarray(tensors[names["affine_skip_connection"]].T)
    return out
