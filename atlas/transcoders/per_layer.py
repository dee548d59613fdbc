"""Per-layer transcoders (PLT): layer l's features reconstruct only MLP output l."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from atlas.transcoders.base import EncoderStack, TranscoderKind, TranscoderSpec


class PerLayerTranscoder(EncoderStack):
    """A set of independent transcoders, one per layer, stored together.

    `W_dec (n_layers, n_features, d_model)`: row f of layer l is feature f's write into MLP output l.
    """

    kind: ClassVar[TranscoderKind] = "plt"

    def __init__(self, spec: TranscoderSpec, *, bandwidth: float = 2.0, initial_threshold: float = 0.1) -> None:
        super().__init__(spec, bandwidth=bandwidth, initial_threshold=initial_threshold)
        L, F, d = spec.n_layers, spec.n_features, spec.d_model
        self.W_dec = nn.Parameter(torch.empty(L, F, d))
        bound = 1.0 / math.sqrt(L * d)
        nn.init.uniform_(self.W_dec, -bound, bound)

    def output_layers(self, layer: int) -> range:
        self._check_layer(layer)
        return range(layer, layer + 1)

    def decode_all(self, activations: torch.Tensor) -> torch.Tensor:
        """`(n_layers, n_tokens, F)` → `(n_layers, n_tokens, d)` including `b_dec` (not the skip)."""
        return torch.baddbmm(self.b_dec.unsqueeze(1), activations, self.W_dec)

    def decode_layer(
        self, target: int, activations: Sequence[torch.Tensor], x_target: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_layer(target)
        out = activations[target] @ self.W_dec[target] + self.b_dec[target]
        if x_target is not None and self.W_skip is not None:
            out = out + self.compute_skip(target, x_target)
        return out

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer)
        return self.W_dec[layer, features].unsqueeze(1)

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def fold_normalisation(self, input_scale: torch.Tensor, output_scale: torch.Tensor) -> None:
        self._fold_encoder(input_scale, output_scale)
        self.W_dec.div_(output_scale.view(-1, 1, 1))
