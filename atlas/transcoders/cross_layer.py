"""Cross-layer transcoders (CLT): a layer-l feature writes into the MLP outputs of every layer l' ≥ l.

Decoders are stored source-indexed and packed, as circuit-tracer stores them: `W_dec[i] (F, n_layers − i, d)`
holds the writes of source layer i into targets i…L−1. Only the L(L+1)/2 (source, target) blocks that exist
are stored and multiplied — half of what a dense `(L, F, L, d)` decoder with a causal mask computes — and each
source's blocks form one contiguous matrix, so decoding is one matrix product per source layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from atlas.transcoders.base import EncoderStack, TranscoderKind, TranscoderSpec


class CrossLayerTranscoder(EncoderStack):
    kind: ClassVar[TranscoderKind] = "clt"

    def __init__(self, spec: TranscoderSpec, *, bandwidth: float = 2.0, initial_threshold: float = 0.1) -> None:
        super().__init__(spec, bandwidth=bandwidth, initial_threshold=initial_threshold)
        L, F, d = spec.n_layers, spec.n_features, spec.d_model
        bound = 1.0 / math.sqrt(L * d)
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(F, L - i, d).uniform_(-bound, bound)) for i in range(L)]
        )

    def output_layers(self, layer: int) -> range:
        self._check_layer(layer)
        return range(layer, self.spec.n_layers)

    def decode_all(self, activations: torch.Tensor) -> torch.Tensor:
        """`(n_layers, n_tokens, F)` → `(n_layers, n_tokens, d)`: Σ over sources ≤ target, plus `b_dec`."""
        L, n_tokens, _ = activations.shape
        d = self.spec.d_model
        recon = self.b_dec.unsqueeze(1).expand(L, n_tokens, d).clone()
        for source in range(L):
            packed = self.W_dec[source].reshape(self.spec.n_features, -1)  # (F, (L − source)·d)
            writes = (activations[source] @ packed).view(n_tokens, L - source, d)
            recon[source:] += writes.transpose(0, 1)
        return recon

    def decode_layer(
        self, target: int, activations: Sequence[torch.Tensor], x_target: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_layer(target)
        out = self.b_dec[target] + sum(
            activations[source] @ self.W_dec[source][:, target - source, :] for source in range(target + 1)
        )
        if x_target is not None and self.W_skip is not None:
            out = out + self.compute_skip(target, x_target)
        return out

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer)
        return self.W_dec[layer][features]

    def decoder_norms(self) -> torch.Tensor:
        return torch.stack([w.pow(2).sum(dim=(1, 2)).sqrt() for w in self.W_dec])

    @torch.no_grad()
    def fold_normalisation(self, input_scale: torch.Tensor, output_scale: torch.Tensor) -> None:
        self._fold_encoder(input_scale, output_scale)
        for source, weights in enumerate(self.W_dec):
            weights.div_(output_scale[source:].view(1, -1, 1))
