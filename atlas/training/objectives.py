"""Pure functions of transcoder training: the loss, its schedules, normalisation scales, per-layer metrics.

All take and return tensors; none touch models, files or optimisers, so each can be tested on toy inputs.
Shapes: inputs/targets/reconstructions `(n_layers, n_tokens, d_model)`; (pre-)activations
`(n_layers, n_tokens, n_features)`; decoder norms and thresholds `(n_layers, n_features)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from atlas.transcoders.base import TranscoderOutput


class LossParts(NamedTuple):
    total: torch.Tensor
    reconstruction: torch.Tensor  # Σ_layers mean_tokens ‖ŷ − y‖²
    sparsity: torch.Tensor  # Σ_layers mean_tokens Σ_features tanh(c · ‖W_dec,f‖ · a_f)   (before λ)
    pre_activation: torch.Tensor  # Σ_layers mean_tokens Σ_features ReLU(θ_f − h_f) · ‖W_dec,f‖   (before λ_P)


def transcoder_loss(
    output: TranscoderOutput,
    targets: torch.Tensor,
    decoder_norms: torch.Tensor,
    threshold: torch.Tensor | None,
    *,
    sparsity_lambda: float,
    sparsity_c: float,
    pre_act_coef: float,
) -> LossParts:
    """Reconstruction MSE + λ·Σ tanh(c·‖W_dec‖·a) + λ_P·Σ ReLU(θ − h)·‖W_dec‖ (Anthropic's JumpReLU recipe).

    The decoder norm of a feature is taken over its concatenated decoders (all output layers of a CLT feature).
    Without a threshold (ReLU/TopK) the pre-activation term pushes on `ReLU(−h)` instead.
    """
    norms = decoder_norms.unsqueeze(1)  # (L, 1, F)
    reconstruction = (output.reconstruction - targets).pow(2).sum(-1).mean(-1).sum()
    sparsity = torch.tanh(sparsity_c * output.activations * norms).sum(-1).mean(-1).sum()
    floor = threshold.unsqueeze(1) if threshold is not None else torch.zeros_like(norms)
    pre_activation = (torch.relu(floor - output.pre_activations) * norms).sum(-1).mean(-1).sum()
    total = reconstruction + sparsity_lambda * sparsity + pre_act_coef * pre_activation
    return LossParts(total, reconstruction, sparsity, pre_activation)


def sparsity_lambda_at(step: int, total_steps: int, final_lambda: float) -> float:
    """λ ramps linearly from 0 to `final_lambda` over the whole run."""
    return final_lambda * min(1.0, (step + 1) / max(1, total_steps))


def lr_factor_at(step: int, total_steps: int, decay_fraction: float = 0.2) -> float:
    """Learning-rate multiplier: 1 until the last `decay_fraction` of the run, then linear decay to 0."""
    decay_start = int(total_steps * (1.0 - decay_fraction))
    if step < decay_start:
        return 1.0
    remaining = max(1, total_steps - decay_start)
    return max(0.0, (total_steps - step) / remaining)


def default_learning_rate(n_features: int) -> float:
    """`2e-4 / √(n_features / 2¹⁴)`: the size rule sparsify uses, so small dictionaries learn faster."""
    return 2e-4 / math.sqrt(n_features / 2**14)


def least_squares_affine(
    inputs: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer ridge regression `targets ≈ inputs @ W.T + b`, solved in float64.

        `inputs (n_layers, n_tokens, d_in)`, `targets (n_layers, n_tokens, d_out)` → `W (n_layers, d_out, d_in)`,
        `b (n_layers, d_out)`. The ridge term is `ridge` times the mean diagonal of each layer's Gram matrix, so it
        scales with the inputs; 1e-3 keeps the fit from leaning on directions the sample barely covers (a token with a
    rare, huge input would otherwise get a huge output). The best linear stand-in for each MLP: a skip's starting point.
    """
    n_layers, n_tokens, d_in = inputs.shape
    ones = torch.ones(n_layers, n_tokens, 1, dtype=torch.float64)
    x = torch.cat([inputs.double(), ones], dim=-1)
    gram = x.transpose(1, 2) @ x  # (L, d_in + 1, d_in + 1)
    rhs = x.transpose(1, 2) @ targets.double()  # (L, d_in + 1, d_out)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).view(-1, 1, 1)
    solution = torch.linalg.solve(gram + ridge * scale * torch.eye(d_in + 1, dtype=torch.float64), rhs)
    return solution[:, :d_in].transpose(1, 2).float(), solution[:, d_in].float()


def massive_output_limits(targets: torch.Tensor, factor: float) -> torch.Tensor:
    """Per-layer norm limits `(n_layers,)`: `factor` times the 99th percentile of the per-token MLP output norms of
    `targets (n_layers, n_tokens, d)`. Tokens above a limit carry "massive activations" (attention sinks: in
    SmolLM2 the first token after BOS, whose layer-11 MLP output is ~900× the median norm); a quantile keeps frequent
    large-but-ordinary tokens (SmolLM2's ' the' at layer 2, ~40× the median) inside the limit."""
    norms = targets.float().norm(dim=-1)
    return factor * norms.quantile(0.99, dim=1)


def ordinary_token_mask(targets: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """`(n_tokens,)` True where the MLP output norm of `targets (n_layers, n_tokens, d)` is within `limits
    (n_layers,)` at every layer."""
    return (targets.float().norm(dim=-1) <= limits.to(targets.device).view(-1, 1)).all(dim=0)


def normalisation_scales(activations: torch.Tensor) -> torch.Tensor:
    """Per-layer scalars `s[l]` with `E‖s[l]·x‖₂ = √d`: `(n_layers, n_tokens, d)` → `(n_layers,)`."""
    d = activations.shape[-1]
    mean_norm = activations.norm(dim=-1).mean(dim=-1).clamp(min=1e-8)
    return math.sqrt(d) / mean_norm


def fraction_of_variance_unexplained(reconstruction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-layer FVU (normalised MSE): `Σ‖ŷ − y‖² / Σ‖y − ȳ‖²`, `(n_layers,)`."""
    residual = (reconstruction - targets).pow(2).sum(dim=(-1, -2))
    variance = (targets - targets.mean(dim=1, keepdim=True)).pow(2).sum(dim=(-1, -2)).clamp(min=1e-12)
    return residual / variance


def l0_per_layer(activations: torch.Tensor) -> torch.Tensor:
    """Mean number of active features per token at each layer, `(n_layers,)`."""
    return (activations > 0).sum(-1).float().mean(-1)


def update_tokens_since_fired(tokens_since_fired: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Add this batch's token count to every feature that did not fire in it; reset the ones that did."""
    fired = (activations > 0).any(dim=1)  # (L, F)
    return torch.where(fired, torch.zeros_like(tokens_since_fired), tokens_since_fired + activations.shape[1])


def dead_fraction(tokens_since_fired: torch.Tensor, window: int) -> torch.Tensor:
    """Per-layer share of features silent for at least `window` tokens, `(n_layers,)`."""
    return (tokens_since_fired >= window).float().mean(dim=-1)


@torch.no_grad()
def encoder_bias_for_firing_rate(pre_without_bias: torch.Tensor, threshold: float, rate: float) -> torch.Tensor:
    """`b_enc (n_layers, F)` making each feature fire on a share `rate` of the given tokens at initialisation."""
    quantile = torch.quantile(pre_without_bias, 1.0 - rate, dim=1)  # (L, F)
    return threshold - quantile
