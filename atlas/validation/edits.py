"""SHIFT-style feature-set edits: ablate, scale or set a set of features everywhere, and measure what changes.

An edit (`FeatureEdit`, saved and reloaded as JSON) clamps its features at every position but the zeroed ones
(BOS). `apply_edit` measures it on a *target* prompt set (the answer token's logit and probability change, accuracy
before and after where an answer is known) and a *control* set (side effects: KL(clean ‖ edited) of the next-token
distribution at the last position, and whether the top-1 token is unchanged), each prompt as one variant of the
batched engine in its `real` form (real MLPs plus the decoded change of the edited features, attention patterns
frozen: `interventions.py`'s `frozen_attention`), plus greedy generations before/after for a few target prompts
(open loop, `interventions.generate`, the edit held over the new tokens).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from atlas.attribution.context import build_context
from atlas.attribution.interventions import FeatureIntervention, generate
from atlas.attribution.targets import TargetError, single_token_id
from atlas.models.loading import LoadedModel
from atlas.transcoders.base import EncoderStack
from atlas.validation.engine import ClampBatch, logits_at, run_variants
from atlas.validation.validate import FeatureRef, ValidationError

EditOperation = Literal["ablate", "scale", "set"]
EDIT_MODE = "real MLPs + decoded feature changes, attention patterns frozen (next token); open loop (generations)"


@dataclass(frozen=True)
class FeatureEdit:
    features: tuple[FeatureRef, ...]
    operation: EditOperation = "ablate"
    value: float = 0.0  # the factor (scale) or the activation (set)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.features:
            raise ValidationError("an edit needs at least one feature")
        if self.operation not in ("ablate", "scale", "set"):
            raise ValidationError(f"unknown edit operation {self.operation!r}; expected ablate, scale or set")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "features": [list(f) for f in self.features]})

    @classmethod
    def from_json(cls, text: str) -> FeatureEdit:
        data = json.loads(text)
        return cls(tuple((int(a), int(b)) for a, b in data["features"]), data["operation"], float(data["value"]),
                   data.get("label", ""))  # fmt: skip


@dataclass
class EditedPrompt:
    prompt: str
    answer: str | None
    answer_logit_change: float  # NaN without an answer
    answer_prob_change: float
    correct_before: bool | None  # top-1 is the answer
    correct_after: bool | None
    kl: float  # KL(clean ‖ edited) of the next-token distribution
    top1_same: bool


@dataclass
class EditReport:
    edit: FeatureEdit
    mode: str
    target: list[EditedPrompt]
    control: list[EditedPrompt]
    generations: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, before, after)

    @staticmethod
    def _mean(values: Sequence[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def accuracy(self, after: bool) -> float:
        known = [p.correct_after if after else p.correct_before for p in self.target]
        scored = [k for k in known if k is not None]
        return sum(scored) / len(scored) if scored else math.nan

    @property
    def target_logit_change(self) -> float:
        return self._mean([p.answer_logit_change for p in self.target])

    @property
    def control_kl(self) -> float:
        return self._mean([p.kl for p in self.control])

    @property
    def control_top1_agreement(self) -> float:
        return sum(p.top1_same for p in self.control) / len(self.control) if self.control else math.nan


def kl_divergence(clean_logits: torch.Tensor, edited_logits: torch.Tensor) -> float:
    """KL(softmax(clean) ‖ softmax(edited)) of two `(vocab,)` logit vectors, in nats."""
    p = clean_logits.double().log_softmax(-1)
    q = edited_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def _measure(
    model: LoadedModel, transcoder: EncoderStack, edit: FeatureEdit, prompt: str, answer: str | None
) -> EditedPrompt:
    if not prompt.strip():
        raise ValidationError("a prompt of the set is empty")
    answer_id = None
    if answer is not None:
        try:
            answer_id = single_token_id(model.tokenizer, answer)
        except TargetError as error:
            raise ValidationError(str(error)) from None
    ctx = build_context(model, transcoder, model.tokenize(prompt)[0].cpu())
    batch = ClampBatch.empty(1, *ctx.activations.shape)
    positions = [p for p in range(ctx.n_pos) if p not in ctx.zero_positions]
    for layer, feature in edit.features:
        batch.mask[0, layer, positions, feature] = True
        if edit.operation == "set":
            batch.values[0, layer, positions, feature] = edit.value
        elif edit.operation == "scale":
            batch.values[0, layer, positions, feature] = edit.value * ctx.activations[layer, positions, feature]
    last = ctx.n_pos - 1
    edited = logits_at(ctx, run_variants(ctx, batch, form="real").final_residual, last)[0]
    clean = ctx.logits[last]
    change = prob_change = math.nan
    before = after = None
    if answer_id is not None:
        change = float(edited[answer_id] - clean[answer_id])
        prob_change = float(edited.softmax(-1)[answer_id] - clean.softmax(-1)[answer_id])
        before, after = int(clean.argmax()) == answer_id, int(edited.argmax()) == answer_id
    return EditedPrompt(prompt, answer, change, prob_change, before, after, kl_divergence(clean, edited),
                        int(clean.argmax()) == int(edited.argmax()))  # fmt: skip


def apply_edit(
    model: LoadedModel,
    transcoder: EncoderStack,
    edit: FeatureEdit,
    target: Sequence[tuple[str, str | None]],
    control: Sequence[str],
    *,
    n_generations: int = 2,
    max_new_tokens: int = 8,
    progress: Callable[[int, int], Any] | None = None,
) -> EditReport:
    """Measure `edit` on the target prompts `(text, answer or None)` and the control prompts (see module doc);
    `progress(done, total)` after each prompt measured and each generation pair."""
    if not target:
        raise ValidationError("the target prompt set is empty")
    spec = transcoder.spec
    for layer, feature in edit.features:
        if not (0 <= layer < spec.n_layers and 0 <= feature < spec.n_features):
            raise ValidationError(
                f"unknown feature {layer}/{feature}: the transcoder has {spec.n_layers} layers of {spec.n_features}"
            )
    total = len(target) + len(control) + min(n_generations, len(target))
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    targets, controls = [], []
    for text, answer in target:
        targets.append(_measure(model, transcoder, edit, text, answer))
        step()
    for text in control:
        controls.append(_measure(model, transcoder, edit, text, None))
        step()
    generations = []
    for text, _ in target[:n_generations]:
        ctx = build_context(model, transcoder, model.tokenize(text)[0].cpu())
        held = [FeatureIntervention(layer, feature, slice(1, None), edit.operation, edit.value)
                for layer, feature in edit.features]  # fmt: skip
        before = generate(ctx, [], max_new_tokens=max_new_tokens).text
        after = generate(ctx, held, max_new_tokens=max_new_tokens).text
        generations.append((text, before, after))
        step()
    return EditReport(edit, EDIT_MODE, targets, controls, generations)
