"""A tiny GPT-2-style model with a planted two-hop circuit, and a transcoder that is exactly its MLPs.

Constructed weights, no training. The residual stream has 16 dimensions; every direction written is a
difference `e_i − e_j`, so LayerNorm's centring leaves it alone. Attention writes nothing (its output projection
is zero) and positions embed to zero, so each position computes on its own token:

- token 'A' embeds to `4·(e0 − e1) + (e2 − e3)`; every other token to `4·(e2 − e3)`;
- layer 0, feature 0 (**hop 1**) reads `e0 − e1` (fires on 'A' only) and writes `2·(e4 − e5)`;
  features 1 and 2 (distractors) read `e2 − e3` (1 fires everywhere, weakly on 'A'; 2 off 'A') and write
  `e10 − e11`, `e12 − e13`;
- layer 1, feature 0 (**hop 2**) reads `e4 − e5` (fires where hop 1 fired) and writes `3·(e6 − e7)`;
  feature 1 (distractor) reads `e10 − e11` and `e12 − e13` (fires off 'A'), writes `e14 − e15`;
  feature 2 (distractor) reads `e0 − e1` (fires on 'A' beside hop 2), writes `e8 − e9`;
- the unembedding column of 'B' is `e6 − e7`; other columns are small and live in dims 8..15.

So on a prompt ending in 'A', the logit of 'B' at the last position comes only through A → L0/0 → L1/0 → 'B'.
The MLPs use ReLU and the transcoder (a PLT with ReLU) copies their weights: features are the MLP neurons and the
reconstruction error is zero up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from atlas.models.loading import LoadedModel, _boot_bridge, _model_info
from atlas.models.tiny import tiny_tokenizer
from atlas.transcoders.activations import ActivationConfig
from atlas.transcoders.base import TranscoderSpec
from atlas.transcoders.per_layer import PerLayerTranscoder

D_MODEL, N_LAYERS, D_MLP = 16, 2, 6
HOP1, HOP2 = (0, 0), (1, 0)  # (layer, feature)
CIRCUIT = (HOP1, HOP2)
SOURCE_TOKEN, TARGET_TOKEN = "A", "B"


def _pair(i: int, j: int) -> torch.Tensor:
    v = torch.zeros(D_MODEL)
    v[i], v[j] = 1.0, -1.0
    return v


def _neurons(rewired: bool = False) -> list[list[tuple[torch.Tensor, float, torch.Tensor]]]:
    """Per layer, per feature: (read direction, bias, write vector). `rewired`: hop 2 reads the token 'A' itself
    (`e0 − e1`, like the distractor beside it) instead of hop 1's output, so the circuit is A → L1/0 → 'B'."""
    layers = [
        [
            (_pair(0, 1) / 2, -1.0, 2 * _pair(4, 5)),  # hop 1
            (_pair(2, 3) / 2, -0.3, _pair(10, 11)),  # distractor, everywhere
            (_pair(2, 3) / 2, -1.0, _pair(12, 13)),  # distractor, off 'A'
        ],
        [
            (_pair(4, 5) / 2, -0.5, 3 * _pair(6, 7)),  # hop 2
            ((_pair(10, 11) + _pair(12, 13)) / 2, -0.5, _pair(14, 15)),  # distractor, off 'A'
            (_pair(0, 1) / 2, -1.0, _pair(8, 9)),  # distractor beside hop 2
        ],
    ]
    if rewired:
        layers[1][0] = (_pair(0, 1) / 2, -1.0, 3 * _pair(6, 7))
    return layers


def planted_model(*, rewired: bool = False, order: Sequence[Sequence[int]] | None = None) -> LoadedModel:
    """The planted model; `rewired`: model B of the diff tests (see `_neurons`); `order[layer][f]`: the MLP slot of
    neuron f (a permutation of `range(D_MLP)`), so a transcoder of the model numbers its features differently."""
    hf, tokenizer = planted_hf_model(rewired=rewired, order=order)
    bridge = _boot_bridge("planted-two-hop", hf, tokenizer, "cpu")
    return LoadedModel(bridge, tokenizer, _model_info("planted-two-hop", "tiny", hf, int(tokenizer.bos_token_id)), 0.0)


def planted_hf_model(*, rewired: bool = False, order: Sequence[Sequence[int]] | None = None) -> tuple[Any, Any]:
    """The planted model as a Hugging Face GPT-2 and its tokenizer (what `save_pretrained` can write)."""
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=1,
        n_inner=D_MLP,
        n_positions=64,
        activation_function="relu",
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    hf = GPT2LMHeadModel(config)
    a_id = tokenizer.convert_tokens_to_ids(SOURCE_TOKEN)
    b_id = tokenizer.convert_tokens_to_ids(TARGET_TOKEN)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf.parameters():
            param.zero_()
        hf.transformer.wte.weight[:] = 4 * _pair(2, 3)
        hf.transformer.wte.weight[a_id] = 4 * _pair(0, 1) + _pair(2, 3)
        for i, (block, layer) in enumerate(zip(hf.transformer.h, _neurons(rewired), strict=True)):
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
            block.attn.c_attn.weight.normal_(0, 0.1, generator=generator)  # patterns exist; the output is zero
            slots = list(range(D_MLP)) if order is None else list(order[i])
            block.mlp.c_fc.bias[:] = -1.0  # unused neurons never fire
            for f, (read, bias, write) in enumerate(layer):
                block.mlp.c_fc.weight[:, slots[f]] = read
                block.mlp.c_fc.bias[slots[f]] = bias
                block.mlp.c_proj.weight[slots[f]] = write
        hf.transformer.ln_f.weight.fill_(1.0)
        unembed = torch.zeros(vocab, D_MODEL)
        unembed[:, 8:] = 0.05 * torch.randn(vocab, D_MODEL - 8, generator=generator)
        unembed[b_id] = _pair(6, 7)
        hf.lm_head.weight[:] = unembed
    return hf.eval(), tokenizer


def planted_transcoder(model: LoadedModel) -> PerLayerTranscoder:
    """A PLT whose features are the model's MLP neurons (ReLU): exact reconstruction."""
    spec = TranscoderSpec("plt", N_LAYERS, D_MODEL, D_MLP, activation=ActivationConfig("relu"))
    transcoder = PerLayerTranscoder(spec)
    hf_blocks = [model.model.original_model.transformer.h[i] for i in range(N_LAYERS)]
    with torch.no_grad():
        for layer, block in enumerate(hf_blocks):
            transcoder.W_enc[layer] = block.mlp.c_fc.weight.T
            transcoder.b_enc[layer] = block.mlp.c_fc.bias
            transcoder.W_dec[layer] = block.mlp.c_proj.weight
            transcoder.b_dec[layer] = block.mlp.c_proj.bias
    return transcoder.eval()
