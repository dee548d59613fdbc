"""Batched intervention engine: many clamp variants of one prompt in one forward pass.

A *variant* clamps chosen feature activations `(layer, position, feature)` to given values (0 for zero-ablation,
a feature's mean for mean-ablation) while every other feature is re-encoded from the live input, so effects
propagate through later features. `B` variants run as one forward of batch `B` (the prompt's tokens repeated);
the clean run is the prompt's `PromptContext`, computed once and shared by every batch.

Intervention mode (what is frozen), the same in every form:
- attention patterns are replayed from the clean run (`interventions.py`'s `frozen_attention` mode);
- norm scales are live by default, replayed from the clean run with `freeze_norms=True`;
- at the zeroed positions (BOS) the MLP output is held at its clean value, as attribution treats it.

Two forms of the MLP output at a layer:
- `replacement` (what validation uses): the local replacement model's MLP, `decode(features) + skip(x) + e·error`,
  with the clean error vector frozen (`e = 1`) or ablated (`e = 0`) per variant. Without clamps it reproduces
  the clean run exactly (the error is defined as the clean difference).
- `real`: the real MLP plus the decoded change of the clamped features, exactly `interventions.py`'s
  `frozen_attention` run (tests check the batched engine against it variant by variant).

The engine returns target values read at the final normalised residual (a `Target` direction: the demeaned
logit for a vocabulary target) and, where asked, full-vocabulary logits at one position. It never changes model or
transcoder weights and does not know what a circuit or a null control is (`atlas.validation.validate` does).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

from atlas.attribution.context import FINAL_RESIDUAL_HOOK, PromptContext, replay_freeze_hooks

MlpForm = Literal["replacement", "real"]
MLP_FORMS: tuple[str, ...] = ("replacement", "real")


class EngineError(ValueError):
    """A batch of variants does not fit the prompt or the transcoder."""


class _StopForward(Exception):
    """Raised at the final residual: the unembedding over every position is never needed."""


@dataclass
class ClampBatch:
    """`B` variants of one prompt.

    `mask (B, L, n_pos, F)` marks the clamped features, `values` (same shape) their clamped activations;
    `error_scale (B,)` multiplies the frozen error vectors (replacement form only: 1 frozen, 0 ablated).
    """

    mask: torch.Tensor
    values: torch.Tensor
    error_scale: torch.Tensor

    @classmethod
    def empty(cls, n_variants: int, n_layers: int, n_pos: int, n_features: int) -> ClampBatch:
        shape = (n_variants, n_layers, n_pos, n_features)
        return cls(torch.zeros(shape, dtype=torch.bool), torch.zeros(shape), torch.ones(n_variants))

    @property
    def n_variants(self) -> int:
        return int(self.mask.shape[0])

    def slice(self, start: int, stop: int) -> ClampBatch:
        return ClampBatch(self.mask[start:stop], self.values[start:stop], self.error_scale[start:stop])


@dataclass
class EngineOutput:
    final_residual: torch.Tensor  # (B, n_pos, d) at the unembedding input
    activations: torch.Tensor  # (B, L, n_pos, F) feature activations after clamping


def clamp(live: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`(..., F)` live activations with the masked entries replaced by `values` (same shapes)."""
    return torch.where(mask, values.to(live.dtype), live)


def _check(ctx: PromptContext, batch: ClampBatch, form: str) -> None:
    spec = ctx.transcoder.spec
    expected = (spec.n_layers, ctx.n_pos, spec.n_features)
    if tuple(batch.mask.shape[1:]) != expected or batch.values.shape != batch.mask.shape:
        raise EngineError(f"clamp tensors of shape {tuple(batch.mask.shape)}; expected (B, {expected})")
    if batch.error_scale.shape != (batch.n_variants,):
        raise EngineError(f"error_scale of shape {tuple(batch.error_scale.shape)}; expected ({batch.n_variants},)")
    if form not in MLP_FORMS:
        raise EngineError(f"unknown MLP form {form!r}; expected one of {MLP_FORMS}")
    if form == "real" and bool((batch.error_scale != 1).any()):
        raise EngineError("errors can only be ablated in the replacement form (the real MLP has no error term)")


@torch.no_grad()
def run_variants(
    ctx: PromptContext,
    batch: ClampBatch,
    *,
    form: MlpForm = "replacement",
    freeze_norms: bool = False,
    chunk_size: int = 32,
) -> EngineOutput:
    """Run every variant of `batch`, `chunk_size` variants per forward pass."""
    _check(ctx, batch, form)
    if chunk_size < 1:
        raise EngineError(f"chunk_size must be at least 1, got {chunk_size}")
    finals, acts = [], []
    for start in range(0, batch.n_variants, chunk_size):
        out = _forward(ctx, batch.slice(start, start + chunk_size), form, freeze_norms)
        finals.append(out.final_residual)
        acts.append(out.activations)
    if not finals:
        L, F = ctx.n_layers, ctx.transcoder.spec.n_features
        return EngineOutput(torch.zeros(0, ctx.n_pos, ctx.inputs.shape[-1]), torch.zeros(0, L, ctx.n_pos, F))
    return EngineOutput(torch.cat(finals), torch.cat(acts))


def _forward(ctx: PromptContext, batch: ClampBatch, form: str, freeze_norms: bool) -> EngineOutput:
    transcoder = ctx.transcoder
    B, L = batch.n_variants, ctx.n_layers
    zeroed = list(ctx.zero_positions)
    live: dict[int, torch.Tensor] = {}
    edited: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}
    error_scale = batch.error_scale.view(B, 1, 1)

    def read_input(layer: int) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            x = tensor.float()
            live[layer] = x
            current = transcoder.encode(layer, x).detach()
            new = clamp(current, batch.mask[:, layer], batch.values[:, layer])
            edited[layer], deltas[layer] = new, new - current
            return tensor

        return hook

    def write_output(layer: int) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            if form == "real":
                sources = [deltas[source] for source in range(layer + 1)]
                write = transcoder.decode_layer(layer, sources) - transcoder.b_dec[layer]
                return tensor + write.detach().to(tensor.dtype)
            sources = [edited[source] for source in range(layer + 1)]
            out = transcoder.decode_layer(layer, sources, live[layer]).detach()
            out = out + error_scale * ctx.errors[layer]
            if zeroed:
                out[:, zeroed] = ctx.mlp_outputs[layer, zeroed]
            return out.to(tensor.dtype)

        return hook

    def read_final(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        captured["final"] = tensor.float()
        raise _StopForward

    hooks: list[tuple[str, Any]] = [
        (name, fn)
        for name, fn in replay_freeze_hooks(ctx, batch=B)
        if name.endswith("attn.hook_pattern") or (freeze_norms and name.endswith("hook_scale"))
    ]
    for layer in range(L):
        hooks += [(ctx.input_hook(layer), read_input(layer)), (ctx.output_hook(layer), write_output(layer))]
    hooks.append((FINAL_RESIDUAL_HOOK, read_final))
    tokens = ctx.tokens.view(1, -1).expand(B, -1).to(ctx.model.device)
    with contextlib.suppress(_StopForward):
        ctx.model.model.run_with_hooks(tokens, fwd_hooks=hooks)
    if "final" not in captured:
        raise RuntimeError(f"the forward pass never reached {FINAL_RESIDUAL_HOOK}")
    return EngineOutput(captured["final"], torch.stack([edited[layer] for layer in range(L)], dim=1))


def logits_at(ctx: PromptContext, final_residual: torch.Tensor, position: int) -> torch.Tensor:
    """`(B, vocab)` logits at `position` from final residuals `(B, n_pos, d)` (the model's unembedding)."""
    bridge = ctx.model.model
    W_U = bridge.W_U.detach().float()
    logits = final_residual[:, position] @ W_U
    b_U = getattr(bridge, "b_U", None)
    return logits if b_U is None else logits + b_U.detach().float()
