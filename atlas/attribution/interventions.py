"""Interventions on transcoder features: set, scale, ablate or add, at any positions, in three modes.

- `constrained`: the local replacement model with everything frozen (attention patterns, norm scales, every MLP
  output at its clean value); an intervention only adds its decoder writes (`Δa · W_dec`), computed from the clean
  activations, so effects do not pass through other features. This reproduces graph edges exactly: setting a feature
  to twice its activation changes each target by exactly that edge's weight.
- `frozen_attention`: attention patterns replayed from the clean run; real MLPs run; features are re-encoded from the
  live inputs at every layer and the intervened ones clamped, so effects propagate through MLPs and other features.
- `open_loop`: nothing frozen; as above without the replayed patterns.
Generation holds an intervention over new tokens (positions given as `slice(p, None)` cover them); it runs open
loop, since no clean pattern exists for tokens that were not in the prompt.
This is the API the app calls. It must not change model or transcoder weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from atlas.attribution.context import (
    EMBED_HOOK,
    FINAL_RESIDUAL_HOOK,
    PromptContext,
    mlp_output_with_skip,
    replay_freeze_hooks,
)

Operation = Literal["set", "scale", "add", "ablate"]
Mode = Literal["constrained", "frozen_attention", "open_loop"]
MODES: tuple[str, ...] = ("constrained", "frozen_attention", "open_loop")


class InterventionError(ValueError):
    """An intervention names a layer, feature, position, operation or mode that does not exist."""


@dataclass(frozen=True)
class FeatureIntervention:
    layer: int
    feature: int
    position: int | slice  # a slice(p, None) also covers generated tokens
    operation: Operation = "set"
    value: float = 0.0

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        if self.operation == "set":
            return torch.full_like(current, self.value)
        if self.operation == "scale":
            return current * self.value
        if self.operation == "add":
            return current + self.value
        if self.operation == "ablate":
            return torch.zeros_like(current)
        raise InterventionError(f"unknown operation {self.operation!r}; expected set, scale, add or ablate")

    def positions(self, n_pos: int) -> list[int]:
        if isinstance(self.position, slice):
            return list(range(n_pos))[self.position]
        position = self.position + n_pos if self.position < 0 else self.position
        if not 0 <= position < n_pos:
            raise InterventionError(f"position {self.position} is outside the sequence ({n_pos} tokens)")
        return [position]


@dataclass
class InterventionResult:
    logits: torch.Tensor  # (n_pos, vocab)
    pre_activations: torch.Tensor  # (L, n_pos, F) encoder pre-activations (with b_enc) read from the live inputs
    activations: torch.Tensor  # (L, n_pos, F) feature activations (constrained: clean ones plus the edits)
    final_residual: torch.Tensor  # (n_pos, d) at the unembedding input


def _validate(ctx: PromptContext, interventions: list[FeatureIntervention], n_pos: int) -> None:
    spec = ctx.transcoder.spec
    for edit in interventions:
        if not 0 <= edit.layer < spec.n_layers:
            raise InterventionError(f"layer {edit.layer} out of range ({spec.n_layers} layers)")
        if not 0 <= edit.feature < spec.n_features:
            raise InterventionError(f"feature {edit.feature} out of range ({spec.n_features} per layer)")
        edit.positions(n_pos)
        edit.apply(torch.zeros(1))


def feature_deltas(ctx: PromptContext, interventions: list[FeatureIntervention]) -> torch.Tensor:
    """`(L, n_pos, F)` new − clean activation for each edited feature (constrained mode)."""
    _validate(ctx, interventions, ctx.n_pos)
    delta = torch.zeros_like(ctx.activations)
    for edit in interventions:
        for position in edit.positions(ctx.n_pos):
            current = ctx.activations[edit.layer, position, edit.feature]
            delta[edit.layer, position, edit.feature] = edit.apply(current) - current
    return delta


@torch.no_grad()
def constrained_run(
    ctx: PromptContext,
    *,
    feature_delta: torch.Tensor | None = None,
    embed_delta: torch.Tensor | None = None,
    error_delta: torch.Tensor | None = None,
) -> InterventionResult:
    """The frozen local replacement model with additive edits to feature activations `(L, n_pos, F)`, token
    embeddings `(n_pos, d)` and MLP outputs (error terms) `(L, n_pos, d)`. Direct effects only."""
    transcoder = ctx.transcoder
    writes = torch.zeros_like(ctx.mlp_outputs)
    if feature_delta is not None:
        writes = transcoder.decode_all(feature_delta) - transcoder.b_dec.detach().unsqueeze(1)
    if error_delta is not None:
        writes = writes + error_delta
    live: dict[int, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}

    def read_input(layer: int) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            live[layer] = tensor[0].float()
            return tensor

        return hook

    def write_output(layer: int) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            base = ctx.mlp_outputs[layer] + writes[layer]
            return mlp_output_with_skip(ctx, layer, base, live[layer]).unsqueeze(0).to(tensor.dtype)

        return hook

    def edit_embedding(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        return tensor if embed_delta is None else tensor + embed_delta.to(tensor.dtype)

    def read_final(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        captured["final"] = tensor[0].float()
        return tensor

    hooks: list[tuple[str, Any]] = [(EMBED_HOOK, edit_embedding), *replay_freeze_hooks(ctx)]
    for layer in range(ctx.n_layers):
        hooks += [(ctx.input_hook(layer), read_input(layer)), (ctx.output_hook(layer), write_output(layer))]
    hooks.append((FINAL_RESIDUAL_HOOK, read_final))
    logits = ctx.model.model.run_with_hooks(ctx.tokens.view(1, -1).to(ctx.model.device), fwd_hooks=hooks)[0].float()
    inputs = torch.stack([live[layer] for layer in range(ctx.n_layers)])
    pre = torch.baddbmm(transcoder.b_enc.detach().unsqueeze(1), inputs, transcoder.W_enc.detach().transpose(1, 2))
    activations = ctx.activations + (feature_delta if feature_delta is not None else 0)
    return InterventionResult(logits, pre, activations, captured["final"])


@torch.no_grad()
def _propagating_run(
    ctx: PromptContext, tokens: torch.Tensor, interventions: list[FeatureIntervention], *, freeze_attention: bool
) -> InterventionResult:
    transcoder = ctx.transcoder
    n_pos = int(tokens.shape[0])
    _validate(ctx, interventions, n_pos)
    pre: dict[int, torch.Tensor] = {}
    acts: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}

    def read_input(layer: int) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            x = tensor[0].float()
            pre[layer] = transcoder.pre_activations(layer, x).detach()
            current = transcoder.encode(layer, x).detach()
            edited = current.clone()
            for edit in interventions:
                if edit.layer == layer:
                    for position in edit.positions(n_pos):
                        edited[position, edit.feature] = edit.apply(current[position, edit.feature])
            acts[layer], deltas[layer] = edited, edited - current
            return tensor

        return hook

    def write_output(layer: int) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            sources = [deltas.get(source, torch.zeros_like(acts[layer])) for source in range(layer + 1)]
            write = transcoder.decode_layer(layer, sources) - transcoder.b_dec[layer]
            return tensor + write.detach().unsqueeze(0).to(tensor.dtype)

        return hook

    def read_final(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        captured["final"] = tensor[0].float()
        return tensor

    hooks: list[tuple[str, Any]] = []
    if freeze_attention:
        if n_pos != ctx.n_pos:
            raise InterventionError("frozen-attention mode needs the prompt's own tokens (no clean pattern otherwise)")
        hooks += [(name, fn) for name, fn in replay_freeze_hooks(ctx) if name.endswith("attn.hook_pattern")]
    for layer in range(ctx.n_layers):
        hooks += [(ctx.input_hook(layer), read_input(layer)), (ctx.output_hook(layer), write_output(layer))]
    hooks.append((FINAL_RESIDUAL_HOOK, read_final))
    logits = ctx.model.model.run_with_hooks(tokens.view(1, -1).to(ctx.model.device), fwd_hooks=hooks)[0].float()
    L = ctx.n_layers
    return InterventionResult(
        logits,
        torch.stack([pre[layer] for layer in range(L)]),
        torch.stack([acts[layer] for layer in range(L)]),
        captured["final"],
    )


def intervene(
    ctx: PromptContext, interventions: list[FeatureIntervention], *, mode: Mode = "constrained"
) -> InterventionResult:
    """Run the prompt of `ctx` with `interventions` in `mode`; returns logits and feature activations."""
    if mode == "constrained":
        return constrained_run(ctx, feature_delta=feature_deltas(ctx, interventions))
    if mode not in MODES:
        raise InterventionError(f"unknown mode {mode!r}; expected one of {MODES}")
    return _propagating_run(ctx, ctx.tokens, interventions, freeze_attention=mode == "frozen_attention")


@dataclass
class Generation:
    tokens: list[int]  # prompt + generated
    new_tokens: list[int]
    text: str  # the generated continuation only


@torch.no_grad()
def generate(
    ctx: PromptContext,
    interventions: list[FeatureIntervention],
    *,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
) -> Generation:
    """Continue the prompt of `ctx` (greedy, or sampled at `temperature`), holding `interventions` (open loop)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = ctx.tokens.clone()
    new: list[int] = []
    eos = ctx.model.tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        result = _propagating_run(ctx, tokens, interventions, freeze_attention=False)
        logits = result.logits[-1]
        if temperature > 0:
            next_token = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator))
        else:
            next_token = int(logits.argmax())
        new.append(next_token)
        tokens = torch.cat([tokens, torch.tensor([next_token])])
        if eos is not None and next_token == eos:
            break
    return Generation(tokens.tolist(), new, ctx.model.tokenizer.decode(new))
