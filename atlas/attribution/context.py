"""One prompt's local replacement model: clean activations, transcoder features, error vectors, frozen values.

`build_context` runs the model once (no gradients) and records what the linearised model needs: the transcoder
inputs and real MLP outputs at every layer, the token embeddings, every freeze point (attention patterns and norm
scales), the final normalised residual and the logits. It then encodes the transcoder inputs into feature
activations (zeroing `zero_positions`, circuit-tracer's position-0 convention, off when empty) and defines
`error = real MLP output − reconstruction` (the reconstruction includes `b_dec` and the skip). At zeroed positions
the error is zero too: the real MLP output there is an untracked constant, like biases.

`hooks_for(...)` builds the hook lists that turn the model into the local replacement model, in two flavours used
by attribution (gradient: detach at freeze points) and interventions (values: replay cached freeze points).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from atlas.attribution.freezing import freeze_point_names
from atlas.models.loading import LoadedModel
from atlas.transcoders.base import EncoderStack
from atlas.transcoders.io import check_compatible

EMBED_HOOK = "hook_embed"
FINAL_RESIDUAL_HOOK = "unembed.hook_in"


class PromptError(ValueError):
    """The prompt cannot be attributed (empty, too long, ...)."""


@dataclass
class PromptContext:
    """Clean-run values of one prompt, `n_pos` tokens, `L` layers, `F` features per layer."""

    model: LoadedModel
    transcoder: EncoderStack
    tokens: torch.Tensor  # (n_pos,)
    inputs: torch.Tensor  # (L, n_pos, d) transcoder inputs
    mlp_outputs: torch.Tensor  # (L, n_pos, d) real MLP outputs
    activations: torch.Tensor  # (L, n_pos, F), zero at zeroed positions
    reconstruction: torch.Tensor  # (L, n_pos, d), includes b_dec and skip
    errors: torch.Tensor  # (L, n_pos, d), zero at zeroed positions
    embeddings: torch.Tensor  # (n_pos, d) token embeddings at hook_embed
    final_residual: torch.Tensor  # (n_pos, d) at unembed.hook_in
    logits: torch.Tensor  # (n_pos, vocab)
    frozen: dict[str, torch.Tensor]  # freeze point name → clean value (batch dim 1)
    zero_positions: tuple[int, ...]

    @property
    def n_layers(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    def input_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.transcoder.spec.input_hook}"

    def output_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.transcoder.spec.output_hook}"

    def active_features(self) -> torch.Tensor:
        """`(n_active, 3)` rows `(layer, position, feature)` of nonzero activations, in that sort order."""
        return self.activations.nonzero()


@torch.no_grad()
def build_context(
    model: LoadedModel, transcoder: EncoderStack, tokens: torch.Tensor, *, zero_positions: tuple[int, ...] = (0,)
) -> PromptContext:
    """Run the prompt `tokens (n_pos,)` once and derive features and errors."""
    spec = transcoder.spec
    check_compatible(spec, n_layers=model.info.n_layers, d_model=model.info.d_model, model_name=model.info.name)
    n_pos = int(tokens.shape[0])
    if n_pos == 0:
        raise PromptError("the prompt is empty")
    if n_pos > model.info.n_ctx:
        raise PromptError(f"the prompt has {n_pos} tokens, more than the model's context of {model.info.n_ctx}")
    L = spec.n_layers
    freeze_names = freeze_point_names(L)
    wanted = {EMBED_HOOK, FINAL_RESIDUAL_HOOK, *freeze_names}
    wanted |= {f"blocks.{layer}.{spec.input_hook}" for layer in range(L)}
    wanted |= {f"blocks.{layer}.{spec.output_hook}" for layer in range(L)}
    logits, cache = model.model.run_with_cache(tokens.view(1, -1).to(model.device), names_filter=lambda n: n in wanted)
    inputs = torch.stack([cache[f"blocks.{layer}.{spec.input_hook}"][0].float() for layer in range(L)])
    outputs = torch.stack([cache[f"blocks.{layer}.{spec.output_hook}"][0].float() for layer in range(L)])
    _, activations = transcoder.encode_all(inputs)
    zeroed = tuple(p for p in zero_positions if 0 <= p < n_pos)
    activations[:, list(zeroed)] = 0
    reconstruction = transcoder.decode_all(activations)
    skip = transcoder.skip_all(inputs)
    if skip is not None:
        reconstruction = reconstruction + skip
    errors = outputs - reconstruction
    errors[:, list(zeroed)] = 0
    return PromptContext(
        model=model,
        transcoder=transcoder,
        tokens=tokens.cpu(),
        inputs=inputs,
        mlp_outputs=outputs,
        activations=activations,
        reconstruction=reconstruction,
        errors=errors,
        embeddings=cache[EMBED_HOOK][0].float(),
        final_residual=cache[FINAL_RESIDUAL_HOOK][0].float(),
        logits=logits[0].float(),
        frozen={name: cache[name] for name in freeze_names},
        zero_positions=zeroed,
    )


def mlp_output_with_skip(ctx: PromptContext, layer: int, base: torch.Tensor, x_live: torch.Tensor) -> torch.Tensor:
    """`base + skip(x_live) − skip(x_clean)`: the frozen MLP output, letting only the skip respond to its input.

    `x_live (..., n, d)` may cover a prefix of the prompt (`n ≤ n_pos`): the clean input is cut to match.
    """
    transcoder = ctx.transcoder
    if transcoder.W_skip is None:
        return base
    clean = ctx.inputs[layer, : x_live.shape[-2]]
    return base + transcoder.compute_skip(layer, x_live) - transcoder.compute_skip(layer, clean)


def replay_freeze_hooks(ctx: PromptContext, batch: int = 1) -> list[tuple[str, Any]]:
    """Hooks that replay the clean attention patterns and norm scales (value-level freezing)."""

    def replay(name: str) -> Any:
        cached = ctx.frozen[name]
        return lambda tensor, hook: cached.expand(batch, *cached.shape[1:]).to(tensor.dtype)

    return [(name, replay(name)) for name in ctx.frozen]
