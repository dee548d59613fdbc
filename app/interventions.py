"""Interventions for the app: turn picks from the UI into `FeatureIntervention`s, find the model and transcoders
of a prompt, and run the edit live (next-token probabilities before/after, continuations with and without).

The computation is `atlas.attribution.interventions` (`intervene`, `generate`); this module only parses and
orchestrates, holding the model bundle's lock while it runs. No Streamlit here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.shaping import InputError, TokenChange, probability_changes
from atlas.attribution.interventions import MODES, FeatureIntervention, Operation, generate, intervene

OPERATIONS: tuple[str, ...] = ("ablate", "scale", "set", "add")
_NODE_ID = re.compile(r"^(\d+)_(\d+)_(\d+)$")
_REF = re.compile(r"^(?:.*/)?(\d+)/(\d+)$|^L?(\d+)\s*#\s*(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class FeaturePick:
    layer: int
    feature: int
    position: int | None  # None: use the positions typed by the user


def pick_from_node_id(node_id: str) -> FeaturePick:
    """A feature activation's frontend id `"{layer}_{feature}_{position}"` → pick at that position."""
    match = _NODE_ID.match(node_id.strip())
    if match is None:
        raise InputError(f"{node_id!r} is not a feature node id (layer_feature_position)")
    return FeaturePick(int(match[1]), int(match[2]), int(match[3]))


def pick_from_reference(text: str) -> FeaturePick:
    """`transcoder/layer/index`, `layer/index` or `L3#17` → a pick without a position."""
    match = _REF.match(text.strip())
    if match is None:
        raise InputError(f"{text!r} is not a feature reference (use layer/index, transcoder/layer/index or L3#17)")
    layer, feature = (match[1], match[2]) if match[1] is not None else (match[3], match[4])
    return FeaturePick(int(layer), int(feature), None)


def build_interventions(
    picks: Sequence[FeaturePick],
    positions: list[int] | slice | None,
    operation: str,
    value: float,
) -> list[FeatureIntervention]:
    """One intervention per (pick, position). `positions` None: each pick's own position (required then)."""
    if operation not in OPERATIONS:
        raise InputError(f"unknown operation {operation!r}; expected one of {', '.join(OPERATIONS)}")
    if not picks:
        raise InputError("pick at least one feature to intervene on")
    op: Operation = operation  # type: ignore[assignment]
    out: list[FeatureIntervention] = []
    for pick in picks:
        if positions is None:
            if pick.position is None:
                raise InputError(f"feature L{pick.layer}#{pick.feature} has no position: type positions")
            targets: list[int | slice] = [pick.position]
        elif isinstance(positions, slice):
            targets = [positions]
        else:
            targets = list(positions)
        for position in targets:
            out.append(FeatureIntervention(pick.layer, pick.feature, position, op, float(value)))
    return out


def resolve_runtime(
    prompt_model: str | None,
    prompt_transcoder: str | None,
    *,
    default_model: str,
    transcoders: Path | None,
    model_names: Sequence[str] = (),
    transcoder_sources: Sequence[str] = (),
) -> tuple[str, Path]:
    """`(model name, transcoder directory)` for a prompt: the model it was attributed with (else the default),
    and `--transcoders` if given, else the prompt's transcoder id when it is a directory on this machine, else the
    first directory its Transcoder was ingested from (`transcoder_sources`) that exists here. A model stored by the
    hash of a local directory (`hf-...`) is loaded from the first of its recorded `model_names` that exists here."""
    model = (prompt_model or "").strip() or default_model
    if model.startswith("hf-"):
        local = [name for name in model_names if Path(name).expanduser().is_dir()]
        if not local:
            raise InputError(f"the prompt's model {model} was loaded from a local directory that is not here")
        model = local[0]
    if transcoders is not None:
        if not transcoders.is_dir():
            raise InputError(f"transcoder directory {transcoders} does not exist (--transcoders / ATLAS_TRANSCODERS)")
        return model, transcoders
    for candidate in (prompt_transcoder, *transcoder_sources):
        if candidate and Path(candidate).is_dir():
            return model, Path(candidate)
    raise InputError(
        f"the prompt's transcoders {prompt_transcoder!r} are not a directory here: start the app with "
        "--transcoders DIR (or set ATLAS_TRANSCODERS)"
    )


@dataclass
class InterventionOutcome:
    changes: list[TokenChange]
    clean_continuation: str
    edited_continuation: str
    max_abs_delta: float  # largest |Δ probability| over the vocabulary at the read-out position
    logit_shift: float  # max |Δ logit| over the vocabulary
    seconds: float
    n_edits: int


def run_intervention(
    bundle: Any,
    tokens: Sequence[int],
    edits: list[FeatureIntervention],
    *,
    mode: str,
    max_new_tokens: int = 12,
    top: int = 8,
) -> InterventionOutcome:
    """Run `edits` on the prompt `tokens` in `mode` with `bundle` (model, transcoder, lock); read out the last
    position. Continuations are greedy, with the edits held over new tokens (open loop)."""
    from atlas.attribution.context import build_context

    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    started = time.perf_counter()
    with bundle.lock:
        ctx = build_context(bundle.model, bundle.transcoder, torch.tensor(list(tokens), dtype=torch.long))
        result = intervene(ctx, edits, mode=mode)  # type: ignore[arg-type]
        before, after = ctx.logits[-1], result.logits[-1]
        tokenizer = bundle.model.tokenizer
        changes = probability_changes(before, after, lambda i: tokenizer.decode([i]), top=top)
        delta = (after.float().softmax(-1) - before.float().softmax(-1)).abs().max()
        clean = generate(ctx, [], max_new_tokens=max_new_tokens).text if max_new_tokens else ""
        edited = generate(ctx, edits, max_new_tokens=max_new_tokens).text if max_new_tokens else ""
    return InterventionOutcome(
        changes, clean, edited, float(delta), float((after - before).abs().max()), time.perf_counter() - started,
        len(edits),
    )  # fmt: skip
