"""Behavioural equivalence: transfer an intervention across two models — zero-ablate a circuit in A and its aligned
features in B (the batched engine of `atlas.validation`) — and compare the effects on the target, prompt by prompt.

For each prompt the effect is the validation's `necessity_zero` (the share of the clean target value removed by
zero-ablating the circuit's active instances). The two agree on a prompt when both effects have the same sign and
|e_A − e_B| <= `tolerance` · max(|e_A|, |e_B|, `floor`) (defaults 0.25 and 0.05: two effects below 5% of the target
always agree). A prompt where the circuit is active on one side only disagrees. Circuit features of A without an
aligned partner are listed and left out of B's ablation.

Reads no store and writes none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from atlas.models.loading import LoadedModel
from atlas.transcoders.base import EncoderStack
from atlas.validation.validate import Circuit, TargetSpec, ValidationConfig, validate


class TransferError(ValueError):
    """A circuit that cannot be transferred (no feature of it has an aligned partner)."""


@dataclass(frozen=True)
class PromptAgreement:
    prompt: str
    effect_a: float  # NaN where the circuit is inactive on that side
    effect_b: float
    agree: bool


@dataclass(frozen=True)
class TransferReport:
    circuit_a: tuple[tuple[int, int], ...]
    circuit_b: tuple[tuple[int, int], ...]
    unmapped: tuple[tuple[int, int], ...]  # A features without an aligned partner
    prompts: list[PromptAgreement]

    @property
    def agreement(self) -> float:
        return sum(p.agree for p in self.prompts) / len(self.prompts) if self.prompts else math.nan


def effects_agree(a: float, b: float, *, tolerance: float = 0.25, floor: float = 0.05) -> bool:
    """Same sign and within `tolerance` of the larger magnitude (or both below `floor`); NaN never agrees."""
    if math.isnan(a) or math.isnan(b):
        return False
    if max(abs(a), abs(b)) < floor:
        return True
    return (a > 0) == (b > 0) and abs(a - b) <= tolerance * max(abs(a), abs(b), floor)


def _effects(model: LoadedModel, transcoder: EncoderStack, circuit: Sequence[tuple[int, int]], texts: Sequence[str],
             target: TargetSpec, config: ValidationConfig) -> dict[str, float]:  # fmt: skip
    report = validate(model, transcoder, Circuit.of([list(f) for f in circuit], transcoder), list(texts), target,
                      config=config, prompt_ids=list(texts))  # fmt: skip
    return {p.prompt_id or p.prompt: p.necessity_zero for p in report.prompts}


def transfer_ablation(
    model_a: LoadedModel,
    transcoder_a: EncoderStack,
    model_b: LoadedModel,
    transcoder_b: EncoderStack,
    circuit_a: Sequence[tuple[int, int]],
    one_to_one: Mapping[tuple[int, int], tuple[int, int]],
    texts: Sequence[str],
    target: TargetSpec,
    *,
    tolerance: float = 0.25,
    config: ValidationConfig | None = None,
) -> TransferReport:
    """Zero-ablate `circuit_a` ((layer, feature) of A) in A and its partners under `one_to_one` in B, per prompt."""
    config = config or ValidationConfig(n_null=4, top_k_agreement=0)
    circuit_b = [one_to_one[f] for f in circuit_a if f in one_to_one]
    unmapped = tuple(f for f in circuit_a if f not in one_to_one)
    if not circuit_b:
        raise TransferError(f"no feature of the circuit {list(circuit_a)} has an aligned partner in B")
    effects_a = _effects(model_a, transcoder_a, circuit_a, texts, target, config)
    effects_b = _effects(model_b, transcoder_b, circuit_b, texts, target, config)
    prompts = []
    for text in texts:
        a, b = effects_a.get(text, math.nan), effects_b.get(text, math.nan)
        prompts.append(PromptAgreement(text, a, b, effects_agree(a, b, tolerance=tolerance)))
    return TransferReport(tuple(circuit_a), tuple(circuit_b), unmapped, prompts)
