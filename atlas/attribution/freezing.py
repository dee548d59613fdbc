"""Freeze points of the local replacement model: what is held constant so the model becomes linear.

Attention patterns and every normalisation scale (`ln1`, `ln2`, `ln_final`) are frozen at their values on the
prompt, and no gradient crosses a real MLP. Two ways to freeze, which must agree (tests check it on both tiny
architectures): *detach* hooks stop gradients at the freeze points during a backward pass (how attribution computes
edges), and *replay* hooks substitute cached values in a forward pass (how constrained interventions run).
This module builds hook lists only; it runs no model and knows nothing about transcoders.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

HookFn = Callable[[torch.Tensor, Any], torch.Tensor]

# Freezing a norm scale *is* editing `hook_scale`: both hook kinds return a new tensor (detached or replayed), and
# TransformerLens's RMSNorm bridge then warns, once per process, that it rebuilds the output from the hooked values
# instead of calling HF's native norm ("numerics may differ at float-rounding scale"). That rebuild is exactly the
# frozen linear model we want, its precision is what tests/test_attribution.py and tests/test_freezing.py check
# (in-edges sum to each node's value, interventions reproduce edges, to 1e-4), and a user can do nothing about it; so
# exactly that message from exactly that module is ignored, in every process that builds freeze hooks.
NATIVE_NORM_EDIT_WARNING = r"A forward hook edited hook_scale/hook_normalized on the native-autograd path"


def ignore_native_norm_edit_warning() -> None:
    """Ignore that one TransformerLens warning (done at import; idempotent: an equal filter is not added twice)."""
    warnings.filterwarnings(
        "ignore",
        message=NATIVE_NORM_EDIT_WARNING,
        category=UserWarning,
        module=r"transformer_lens\.model_bridge\.generalized_components\.normalization",
    )


ignore_native_norm_edit_warning()

_PER_BLOCK_FREEZE_POINTS = ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale")
FINAL_NORM_SCALE = "ln_final.hook_scale"


def freeze_point_names(n_layers: int) -> list[str]:
    """Hook names whose values are frozen: attention patterns and all norm scales."""
    names = [f"blocks.{layer}.{point}" for layer in range(n_layers) for point in _PER_BLOCK_FREEZE_POINTS]
    return [*names, FINAL_NORM_SCALE]


def _detach(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    return tensor.detach()


def detach_hooks(names: list[str]) -> list[tuple[str, HookFn]]:
    """Hooks that keep values but stop gradients at `names`."""
    return [(name, _detach) for name in names]


def replay_hooks(names: list[str], cache: Mapping[str, torch.Tensor]) -> list[tuple[str, HookFn]]:
    """Hooks that replace the values at `names` with those in `cache` (a clean run's)."""

    def replay(name: str) -> HookFn:
        cached = cache[name]
        return lambda tensor, hook: cached.to(tensor.dtype)

    return [(name, replay(name)) for name in names]
