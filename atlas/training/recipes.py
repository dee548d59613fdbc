"""Named training recipes: the settings `atlas train --recipe`, `atlas demo` and the quality benchmark start from.

A recipe is a `TrainConfig` without a length; `recipe_config` gives it one, either a step count (reproducible: a
resumed run ends with the weights of an uninterrupted one) or a CPU-time budget (the run stops when the process has
spent it, and the sparsity ramp and learning-rate decay follow the share of the budget spent; not bit-reproducible).
Why each recipe is what it is, with the figures that chose it, is in the README ("Dictionary quality").

This module only names settings; it trains nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from atlas.config import TRAINING_RECIPE_NAMES
from atlas.training.activations import StreamConfig
from atlas.training.trainer import TrainConfig

# Steps a budget run may not exceed; far beyond what any CPU budget reaches, so the budget is what stops it.
BUDGET_STEP_CEILING = 10_000_000

# Wave 1's recipe, kept as the benchmark's baseline: a cross-layer transcoder, random initialisation.
_BASELINE = TrainConfig(kind="clt", n_features=128)

RECIPES: dict[str, TrainConfig] = {
    "baseline": _BASELINE,
    # Per-layer transcoders with an affine skip connection that starts as the least-squares fit of each MLP, so the
    # features only learn what a linear map cannot (the skip then moves at 1 % of the learning rate: Adam would
    # move each of its d² entries by about the learning rate per step and undo the fit); encoder rows start as their
    # small decoder rows; each model pass over a shuffle chunk feeds two passes of larger batches (the model forward
    # is most of a CPU step's cost). Attention-sink tokens (massive MLP outputs, e.g. SmolLM2's first token after BOS)
    # are left out: a few of them dominated the squared error, bent the skip fit and broke held-out tokens. With the
    # skip explaining half the variance from the start, λ 1.0 starves the features (88 % dead after 4 core-minutes);
    # λ 0.1 keeps them alive at the same loss.
    "cpu": TrainConfig(
        kind="plt",
        n_features=512,
        skip=True,
        skip_init="least_squares",
        encoder_init="decoder",
        skip_lr_scale=0.01,
        init_tokens=16384,
        outlier_factor=10.0,
        sparsity_lambda=0.1,
        stream=StreamConfig(batch_size=1024, chunk_sequences=128, passes=2),
    ),
    # `baseline` with the attention sinks left out (as in `cpu`): what `make demo` trains. A CLT without a skip, because
    # its features, not a linear map, carry what the dictionary explains, so its pruned graphs keep feature nodes
    # (about 120 of 256 on the evaluation prompts, against 16 for `cpu`, whose skip explains most of each MLP and
    # leaves the features little influence); it reconstructs worse per CPU-minute (CE Δ 3.7 against 1.7 at 10).
    "clt": dataclasses.replace(_BASELINE, outlier_factor=10.0),
}


if tuple(RECIPES) != TRAINING_RECIPE_NAMES:  # the CLI's help lists the names from atlas.config without torch
    raise ImportError(f"atlas.config.TRAINING_RECIPE_NAMES {TRAINING_RECIPE_NAMES} != recipes {tuple(RECIPES)}")


def recipe_names() -> tuple[str, ...]:
    return tuple(RECIPES)


def recipe_config(
    name: str, *, steps: int | None = None, cpu_budget_s: float | None = None, **overrides: Any
) -> TrainConfig:
    """The recipe `name` with a length (`steps`, or `cpu_budget_s` seconds of process CPU time) and any other
    `TrainConfig` field overridden (`stream` fields by `stream={...}`)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    if (steps is None) == (cpu_budget_s is None):
        raise ValueError("give a recipe exactly one length: steps or cpu_budget_s")
    base = RECIPES[name]
    stream_overrides = overrides.pop("stream", None) or {}
    stream = dataclasses.replace(base.stream, **stream_overrides)
    length = {"steps": steps} if steps is not None else {"steps": BUDGET_STEP_CEILING, "cpu_budget_s": cpu_budget_s}
    return dataclasses.replace(base, stream=stream, **length, **overrides)
