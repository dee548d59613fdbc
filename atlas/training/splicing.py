"""Splice transcoders into a model: replace every MLP output with the transcoder's reconstruction.

`spliced_cross_entropy` reports the next-token loss of the model with all MLPs replaced, against the clean model,
on the same tokens. Position 0 (BOS) keeps its real MLP output: transcoders are never trained on it, and
attribution treats it as a constant. This module reads a model and a transcoder; it trains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from atlas.models.loading import LoadedModel
from atlas.transcoders.base import EncoderStack
from atlas.transcoders.io import check_compatible


@dataclass(frozen=True)
class SplicedLoss:
    clean: float  # next-token cross-entropy of the model, nats/token
    spliced: float  # the same with every MLP output replaced by the transcoder's
    n_tokens: int

    @property
    def delta(self) -> float:
        return self.spliced - self.clean


def _next_token_ce(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), token_ids[:, 1:].reshape(-1))


@torch.no_grad()
def spliced_cross_entropy(
    model: LoadedModel,
    transcoder: EncoderStack,
    token_ids: torch.Tensor,
    *,
    input_scale: torch.Tensor | None = None,
    output_scale: torch.Tensor | None = None,
) -> SplicedLoss:
    """CE of clean and spliced runs on `token_ids (n_seq, ctx)`.

    `input_scale`/`output_scale` `(n_layers,)` let an unfolded transcoder (trained on normalised activations)
    be evaluated mid-training; leave them None for a transcoder whose normalisation is folded in.
    """
    spec = transcoder.spec
    check_compatible(spec, n_layers=model.info.n_layers, d_model=model.info.d_model, model_name=model.info.name)
    L = spec.n_layers
    s_in = input_scale if input_scale is not None else torch.ones(L)
    s_out = output_scale if output_scale is not None else torch.ones(L)
    token_ids = token_ids.to(model.device)
    clean = _next_token_ce(model.model(token_ids), token_ids)

    activations: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}

    def read_input(layer: int) -> Any:
        def hook(x: torch.Tensor, hook: Any) -> None:
            normalised = x.float() * s_in[layer]
            inputs[layer] = normalised
            activations[layer] = transcoder.encode(layer, normalised)

        return hook

    def write_output(layer: int) -> Any:
        def hook(out: torch.Tensor, hook: Any) -> torch.Tensor:
            acts = [activations[source] for source in range(layer + 1)]
            recon = transcoder.decode_layer(layer, acts, inputs[layer]) / s_out[layer]
            replaced = recon.to(out.dtype)
            replaced[:, 0] = out[:, 0]
            return replaced

        return hook

    hooks = [(f"blocks.{layer}.{spec.input_hook}", read_input(layer)) for layer in range(L)]
    hooks += [(f"blocks.{layer}.{spec.output_hook}", write_output(layer)) for layer in range(L)]
    spliced = _next_token_ce(model.model.run_with_hooks(token_ids, fwd_hooks=hooks), token_ids)
    n_tokens = token_ids.shape[0] * (token_ids.shape[1] - 1)
    return SplicedLoss(clean=float(clean), spliced=float(spliced), n_tokens=n_tokens)
