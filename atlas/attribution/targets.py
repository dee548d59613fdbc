"""Attribution targets: what a graph explains, as directions in the final residual stream at a position.

A target is read out at `unembed.hook_in` (the normalised final residual) at any `position`, not only the last.
For a vocabulary logit the direction is the demeaned unembedding column `W_U[:, k] − mean_k W_U`, so edges explain
`logit_k − mean(logits)` (circuit-tracer's definition). Logit differences (`" Mary" − " John"`) and arbitrary
directions are targets of the same kind. Each target carries a weight (its probability for salient logits) used
by influence and pruning. Pure functions of tensors and a tokenizer; no forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


class TargetError(ValueError):
    """A requested target is not a single token, out of range, or malformed."""


@dataclass(frozen=True)
class Target:
    label: str
    position: int
    direction: torch.Tensor  # (d_model,) applied to the final normalised residual at `position`
    weight: float  # probability (salient logits) or a user weight
    token_id: int | None = None  # None for custom directions and differences


def demeaned_unembedding(W_U: torch.Tensor) -> torch.Tensor:
    """`(d_model, vocab)` columns minus their mean over the vocabulary."""
    return W_U - W_U.mean(dim=1, keepdim=True)


def salient_logits(
    logits: torch.Tensor,
    W_U: torch.Tensor,
    tokenizer: Any,
    position: int,
    *,
    max_n_logits: int = 10,
    desired_probability: float = 0.95,
) -> list[Target]:
    """The smallest set of top tokens at `position` whose probabilities reach `desired_probability` (≤ max)."""
    probabilities = logits.float().softmax(-1)
    top = probabilities.topk(min(max_n_logits, probabilities.numel()))
    cumulative = top.values.cumsum(0)
    count = int(torch.searchsorted(cumulative, torch.tensor(desired_probability)).item()) + 1
    count = min(count, top.values.numel())
    directions = demeaned_unembedding(W_U)
    return [
        Target(tokenizer.decode([int(k)]), position, directions[:, int(k)], float(p), int(k))
        for p, k in zip(top.values[:count].tolist(), top.indices[:count].tolist(), strict=True)
    ]


def single_token_id(tokenizer: Any, text: str) -> int:
    """The id of `text` if it is exactly one token, else a `TargetError` naming how it splits."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise TargetError(f"target {text!r} is not a single token (it splits into {pieces})")
    return int(ids[0])


def token_targets(
    tokens: Sequence[str], W_U: torch.Tensor, tokenizer: Any, position: int, logits: torch.Tensor | None = None
) -> list[Target]:
    """Explicit token targets; weighted by their probability when `logits` at `position` are given, else equally."""
    directions = demeaned_unembedding(W_U)
    ids = [single_token_id(tokenizer, text) for text in tokens]
    probabilities = logits.float().softmax(-1)[ids].tolist() if logits is not None else [1.0 / len(ids)] * len(ids)
    return [
        Target(text, position, directions[:, i], float(p), i)
        for text, i, p in zip(tokens, ids, probabilities, strict=True)
    ]


def logit_difference(positive: str, negative: str, W_U: torch.Tensor, tokenizer: Any, position: int) -> Target:
    """The direction of `logit(positive) − logit(negative)` (the mean cancels)."""
    a, b = single_token_id(tokenizer, positive), single_token_id(tokenizer, negative)
    return Target(f"{positive} − {negative}", position, W_U[:, a] - W_U[:, b], 1.0, None)


def direction_target(label: str, direction: torch.Tensor, position: int, d_model: int, weight: float = 1.0) -> Target:
    if direction.shape != (d_model,):
        raise TargetError(f"direction {label!r} has shape {tuple(direction.shape)}, expected ({d_model},)")
    return Target(label, position, direction.float(), weight, None)


def check_position(position: int, n_pos: int) -> int:
    """Normalise a possibly negative position and check it is inside the prompt."""
    resolved = position + n_pos if position < 0 else position
    if not 0 <= resolved < n_pos:
        raise TargetError(f"target position {position} is outside the prompt ({n_pos} tokens)")
    return resolved
