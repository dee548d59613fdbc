"""Tiny randomly initialised models for fast tests, built from local configs with no network.

Two architectures cover what attribution must handle:
- ``tiny-gpt2``: LayerNorm (with biases), absolute position embeddings, GELU MLP;
- ``tiny-llama``: RMSNorm, rotary positions, grouped-query attention, gated SiLU MLP.

Both share a byte-level character tokenizer written to the cache directory on first use (TransformerLens
needs a tokenizer that can be reloaded from disk). This module builds Hugging Face models only; wrapping
them in TransformerLens is `atlas.models.loading`'s job.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from atlas.config import cache_dir
from atlas.models.dimensions import TINY_MODELS, TinyModelConfig

TINY_BOS, TINY_EOS, TINY_UNK = "<bos>", "<eos>", "<unk>"
# Printable ASCII plus newline; everything else maps to <unk>.
_TINY_CHARS = ["\n", *(chr(i) for i in range(32, 127))]

__all__ = ["TINY_MODELS", "TinyModelConfig", "build_tiny_hf_model", "tiny_tokenizer"]


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer (vocab ≈ 100) saved under the cache directory and reloaded from there."""
    directory = cache_dir() / "tokenizers" / "tiny-char-v1"
    if not (directory / "tokenizer.json").exists():
        _write_tiny_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def _write_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {TINY_BOS: 0, TINY_EOS: 1, TINY_UNK: 2}
    for char in _TINY_CHARS:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=TINY_UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        unk_token=TINY_UNK,
        pad_token=TINY_EOS,
    )
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(directory)
    except OSError:  # another process wrote it first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_hf_model(config: TinyModelConfig, vocab_size: int) -> PreTrainedModel:
    """A randomly initialised Hugging Face causal LM with the given sizes, deterministic in `config.seed`."""
    torch.manual_seed(config.seed)
    hf_config: GPT2Config | LlamaConfig
    if config.architecture == "gpt2":
        hf_config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_inner=config.d_mlp,
            n_positions=config.n_ctx,
            bos_token_id=0,
            eos_token_id=1,
        )
        model: PreTrainedModel = GPT2LMHeadModel(hf_config)
    elif config.architecture == "llama":
        hf_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=config.d_model,
            intermediate_size=config.d_mlp,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads,
            max_position_embeddings=config.n_ctx,
            bos_token_id=0,
            eos_token_id=1,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(hf_config)
    else:
        raise ValueError(f"unknown tiny architecture {config.architecture!r}; expected 'gpt2' or 'llama'")
    # Larger-than-default weights so the random model's activations are not all near zero.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
            elif "bias" in name:
                param.normal_(0.0, 0.02)
    return model.eval()
