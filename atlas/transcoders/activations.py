"""Sparse activation functions for transcoders: JumpReLU (with a straight-through threshold gradient), ReLU, TopK.

Pure tensor functions; no module state. Shapes broadcast: pre-activations `(..., n_features)` and thresholds that
broadcast to them, e.g. `(n_layers, 1, n_features)` against `(n_layers, n_tokens, n_features)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

ActivationKind = Literal["jumprelu", "relu", "topk"]
ACTIVATION_KINDS: tuple[str, ...] = ("jumprelu", "relu", "topk")


@dataclass(frozen=True)
class ActivationConfig:
    """Which nonlinearity a transcoder uses. `k` is TopK's active count per token and layer."""

    kind: ActivationKind = "jumprelu"
    k: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(f"unknown activation {self.kind!r}; expected one of {ACTIVATION_KINDS}")
        if self.kind == "topk" and (self.k is None or self.k < 1):
            raise ValueError("TopK activation needs k >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _JumpReLU(torch.autograd.Function):
    """`z · H(z − θ)`. Gradient to z through the mask; to θ through a rectangle kernel of width ε."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        (grad_out,) = grad_outputs
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            in_window = ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype)
            grad_threshold = (-(threshold / bandwidth) * in_window * grad_out).sum_to_size(threshold.shape)
        return grad_pre, grad_threshold, None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 2.0) -> torch.Tensor:
    """JumpReLU with the straight-through threshold estimator used by Anthropic and circuit-tracer.

    Forward keeps `pre` where `pre > threshold`. Backward: `∂out/∂θ = −(θ/ε)·rect((pre − θ)/ε)`.
    """
    return _JumpReLU.apply(pre, threshold, bandwidth)


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest pre-activations along the last axis (then ReLU); zero the rest."""
    k = min(k, pre.shape[-1])
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.clamp(min=0))


def apply_activation(
    pre: torch.Tensor, config: ActivationConfig, threshold: torch.Tensor | None, bandwidth: float = 2.0
) -> torch.Tensor:
    """Feature activations from pre-activations under `config` (threshold needed for JumpReLU)."""
    if config.kind == "jumprelu":
        if threshold is None:
            raise ValueError("JumpReLU needs a threshold")
        return jumprelu(pre, threshold, bandwidth)
    if config.kind == "relu":
        return torch.relu(pre)
    assert config.k is not None
    return topk_relu(pre, config.k)
