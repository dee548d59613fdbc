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
  with the clean error vector frozen (`e = 1`) or ablated (`e = 0`) per variant. Computed as the clean MLP output
  plus the decoded change of the features from their clean values, plus the skip's change, plus `(e − 1)·error`
  (the same sum), so without clamps it reproduces the clean run exactly.
- `real`: the real MLP plus the decoded change of the clamped features, exactly `interventions.py`'s
  `frozen_attention` run (tests check the batched engine against it variant by variant).

Decoder writes are computed from the nonzero activation changes only (`sparse_writes`): a clamp changes few
features, and decoding dense `(B, n_pos, F)` activations for every (source, output) layer pair cost as much as the
model itself on a 30-layer CLT.

Activations are reused: a variant equals the clean run below the first layer it changes, so variants are sorted by
that layer and each chunk's forward starts there (`start_at_layer`) from the clean residual, cached once per call.

The engine returns target values read at the final normalised residual (a `Target` direction: the demeaned
logit for a vocabulary target) and, where asked, full-vocabulary logits at one position. It never changes model or
transcoder weights and does not know what a circuit or a null control is (`atlas.validation.validate` does).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

from atlas.attribution.context import FINAL_RESIDUAL_HOOK, PromptContext, mlp_output_with_skip, replay_freeze_hooks
from atlas.transcoders.base import EncoderStack

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
    L, F = ctx.n_layers, ctx.transcoder.spec.n_features
    if batch.n_variants == 0:
        return EngineOutput(torch.zeros(0, ctx.n_pos, ctx.inputs.shape[-1]), torch.zeros(0, L, ctx.n_pos, F))
    decoders = flat_decoders(ctx.transcoder)
    clean = CleanRun.of(ctx)
    first = first_changed_layers(batch)
    order = first.argsort(stable=True)  # variants that change the same early layers share a chunk
    finals, acts = [], []
    for start in range(0, batch.n_variants, chunk_size):
        members = order[start : start + chunk_size]
        chunk = ClampBatch(batch.mask[members], batch.values[members], batch.error_scale[members])
        out = _forward(ctx, chunk, form, freeze_norms, decoders, clean, int(first[members].min()))
        finals.append(out.final_residual)
        acts.append(out.activations)
    inverse = order.argsort()
    return EngineOutput(torch.cat(finals)[inverse], torch.cat(acts)[inverse])


def first_changed_layers(batch: ClampBatch) -> torch.Tensor:
    """`(B,)` the first layer each variant changes: its earliest clamped layer (`L` with no clamp), 0 when its
    errors are scaled (that changes every layer). Below it the variant's run equals the clean run."""
    B, L = batch.mask.shape[:2]
    clamped = batch.mask.reshape(B, L, -1).any(-1)  # (B, L)
    first = torch.where(clamped.any(-1), clamped.float().argmax(-1), torch.full((B,), L))
    return torch.where(batch.error_scale != 1, torch.zeros_like(first), first)


@dataclass
class CleanRun:
    """What a variant reuses of the clean run below its first changed layer."""

    resid_pre: list[torch.Tensor]  # per layer, (1, n_pos, d) residual entering the block
    live_activations: torch.Tensor  # (L, n_pos, F) encoded from the clean inputs, zeroed positions included

    @classmethod
    @torch.no_grad()
    def of(cls, ctx: PromptContext) -> CleanRun:
        names = {f"blocks.{layer}.hook_resid_pre" for layer in range(ctx.n_layers)}
        tokens = ctx.tokens.view(1, -1).to(ctx.model.device)
        _, cache = ctx.model.model.run_with_cache(tokens, names_filter=lambda n: n in names)
        live = torch.stack([ctx.transcoder.encode(layer, ctx.inputs[layer]).detach() for layer in range(ctx.n_layers)])
        return cls([cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(ctx.n_layers)], live)


def flat_decoders(transcoder: EncoderStack) -> list[torch.Tensor]:
    """Per source layer, its decoder as one matrix `(F, n_output_layers · d)` (output layers in order)."""
    every = torch.arange(transcoder.spec.n_features)
    return [
        transcoder.decoder_vectors(layer, every).detach().reshape(transcoder.spec.n_features, -1)
        for layer in range(transcoder.spec.n_layers)
    ]


def sparse_writes(
    decoder: torch.Tensor, outputs: range, delta: torch.Tensor, pending: torch.Tensor, zeroed: list[int]
) -> None:
    """Add the decoder writes of `delta (B, n_pos, F)`, a change of one source layer's activations, into
    `pending (B, n_pos, L, d)` at its `outputs` layers; `decoder (F, len(outputs) · d)` from `flat_decoders`.

    A sparse-dense product over the nonzero changes only: a clamp changes few features, and a dense decode of
    `(B, n_pos, F)` for every (source, output) layer pair cost as much as the model itself on a 30-layer CLT.
    Zeroed positions are skipped."""
    if zeroed:
        delta = delta.clone()
        delta[:, zeroed] = 0
    B, P, F = delta.shape
    rows = delta.reshape(B * P, F)
    if not bool(rows.any()):
        return
    writes = torch.sparse.mm(rows.to_sparse(), decoder)  # (B·P, n_out·d)
    flat = pending.view(B * P, *pending.shape[2:])
    flat[:, outputs.start : outputs.stop] += writes.view(B * P, len(outputs), -1).to(pending.dtype)


def _forward(
    ctx: PromptContext,
    batch: ClampBatch,
    form: str,
    freeze_norms: bool,
    decoders: list[torch.Tensor],
    clean: CleanRun,
    start_layer: int,
) -> EngineOutput:
    """One forward of `batch`, starting at block `start_layer` from the clean residual (nothing below it changes)."""
    transcoder = ctx.transcoder
    B, L, P = batch.n_variants, ctx.n_layers, ctx.n_pos
    zeroed = list(ctx.zero_positions)
    edited: dict[int, torch.Tensor] = {}
    live: dict[int, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}
    pending = torch.zeros(B, P, L, ctx.inputs.shape[-1])  # decoded activation changes, by output layer
    error_change = (batch.error_scale - 1).view(B, 1, 1)

    def read_input(layer: int) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            x = tensor.float()
            live[layer] = x
            current = transcoder.encode(layer, x).detach()
            new = clamp(current, batch.mask[:, layer], batch.values[:, layer])
            edited[layer] = new
            # real form: the change made by the clamps; replacement form: the change from the clean activations
            reference = current if form == "real" else ctx.activations[layer]
            outputs = transcoder.output_layers(layer)
            sparse_writes(decoders[layer], outputs, new - reference, pending, [] if form == "real" else zeroed)
            return tensor

        return hook

    def write_output(layer: int) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            if form == "real":
                return tensor + pending[:, :, layer].to(tensor.dtype)
            base = ctx.mlp_outputs[layer] + pending[:, :, layer] + error_change * ctx.errors[layer]
            out = mlp_output_with_skip(ctx, layer, base, live[layer])
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
    with contextlib.suppress(_StopForward):
        if start_layer == 0:
            tokens = ctx.tokens.view(1, -1).expand(B, -1).to(ctx.model.device)
            ctx.model.model.run_with_hooks(tokens, fwd_hooks=hooks)
        elif start_layer < L:
            resid = clean.resid_pre[start_layer].expand(B, -1, -1)
            ctx.model.model.run_with_hooks(resid, fwd_hooks=hooks, start_at_layer=start_layer)
        else:  # no variant changes anything: the clean run
            captured["final"] = ctx.final_residual.unsqueeze(0).expand(B, -1, -1).clone()
    if "final" not in captured:
        raise RuntimeError(f"the forward pass never reached {FINAL_RESIDUAL_HOOK}")
    for layer in range(min(start_layer, L)):
        edited[layer] = clean.live_activations[layer].unsqueeze(0).expand(B, -1, -1)
    return EngineOutput(captured["final"], torch.stack([edited[layer] for layer in range(L)], dim=1))


def logits_at(ctx: PromptContext, final_residual: torch.Tensor, position: int) -> torch.Tensor:
    """`(B, vocab)` logits at `position` from final residuals `(B, n_pos, d)` (the model's unembedding)."""
    bridge = ctx.model.model
    W_U = bridge.W_U.detach().float()
    logits = final_residual[:, position] @ W_U
    b_U = getattr(bridge, "b_U", None)
    return logits if b_U is None else logits + b_U.detach().float()
