"""Splice transcoders into a model: replace every MLP output with the transcoder's reconstruction.

`spliced_cross_entropy` reports the next-token loss of the model with all MLPs replaced, against the clean model,
on the same tokens, and the mean KL divergence of the spliced next-token distribution from the clean one. With
`with_errors=True` each replaced output gets its error term back (`reconstruction + (mlp_out − reconstruction)`): a
sanity check of the splicing itself, whose delta must be 0 up to float rounding. Position 0 (BOS) keeps its real
MLP output: transcoders are never trained on it, and attribution treats it as a constant.
This module reads a model and a transcoder; it trains nothing.
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
    kl: float = float("nan")  # mean KL(clean ‖ spliced) of the next-token distributions, nats/token

    @property
    def delta(self) -> float:
        return self.spliced - self.clean


def _next_token_ce(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), token_ids[:, 1:].reshape(-1))


def _mean_kl(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """Mean over `(n_seq, ctx − 1)` predicting positions of KL(clean ‖ other) of the next-token distributions."""
    clean = F.log_softmax(clean_logits[:, :-1].float(), dim=-1)
    other = F.log_softmax(other_logits[:, :-1].float(), dim=-1)
    return float((clean.exp() * (clean - other)).sum(-1).mean())


@torch.no_grad()
def spliced_cross_entropy(
    model: LoadedModel,
    transcoder: EncoderStack,
    token_ids: torch.Tensor,
    *,
    input_scale: torch.Tensor | None = None,
    output_scale: torch.Tensor | None = None,
    with_errors: bool = False,
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
    clean_logits = model.model(token_ids)

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
            replaced = (recon + (out.float() - recon) if with_errors else recon).to(out.dtype)
            replaced[:, 0] = out[:, 0]
            return replaced

        return hook

    hooks = [(f"blocks.{layer}.{spec.input_hook}", read_input(layer)) for layer in range(L)]
    hooks += [(f"blocks.{layer}.{spec.output_hook}", write_output(layer)) for layer in range(L)]
    spliced_logits = model.model.run_with_hooks(token_ids, fwd_hooks=hooks)
    n_tokens = token_ids.shape[0] * (token_ids.shape[1] - 1)
    return SplicedLoss(
        clean=float(_next_token_ce(clean_logits, token_ids)),
        spliced=float(_next_token_ce(spliced_logits, token_ids)),
        n_tokens=n_tokens,
        kl=_mean_kl(clean_logits, spliced_logits),
    )
