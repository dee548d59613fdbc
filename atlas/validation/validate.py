"""Causal validation of a circuit: necessity, sufficiency, matched null controls and attribution agreement.

A circuit is a set of transcoder features `(layer, feature)` (cross-prompt identities; on a prompt it covers every
position where one of them is active). For each prompt and a target (a token's demeaned logit, a logit difference
or any direction at the final normalised residual, at one position), all in the batched engine's `replacement`
form (`atlas.validation.engine`: attention patterns frozen at the clean run, norm scales live unless
`freeze_norms`, features re-encoded live, the clean error vectors frozen unless ablated, BOS held clean):

- **necessity**: clamp the circuit's active instances to 0 (zero-ablation) or to each feature's mean activation
  (mean-ablation, when means are given) and measure `(clean − ablated) / clean`; for a token target also the change
  of its raw logit and probability;
- **sufficiency**: clamp every other feature at every position to 0 and measure the fraction of the target
  recovered, `(kept − empty) / (clean − empty)` with `empty` = every feature ablated, with the error vectors frozen
  and, as a second variant, ablated;
- **null controls**: the same zero-ablation necessity and frozen-error sufficiency for `n_null` random sets of the
  same size drawn from the other active instances, each instance matched to a circuit instance by layer and by
  activation magnitude (one of the nearest by |log activation|); empirical p-values and z-scores;
- **agreement**: Spearman correlation between the attribution graph's influence on the target (circuit-tracer's
  normalised |edge| influence, `atlas.attribution.pruning.influence`) and |measured zero-ablation effect| of the
  graph's `top_k` most influential features, one ablation each.

All variants of a prompt run as batched forwards after one clean run. This module reads no store and writes none;
mean activations come from the caller (the DuckDB statistics, via `atlas.storage`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from atlas.attribution.context import PromptError, build_context
from atlas.attribution.engine import AttributionConfig, attribute
from atlas.attribution.nodes import NodeKind
from atlas.attribution.pruning import influence, normalise
from atlas.attribution.targets import (
    Target,
    TargetError,
    check_position,
    demeaned_unembedding,
    direction_target,
    single_token_id,
)
from atlas.models.loading import LoadedModel
from atlas.transcoders.base import EncoderStack
from atlas.validation.engine import ClampBatch, logits_at, run_variants
from atlas.validation.stats import Summary, empirical_p_value, necessity, recovered, spearman, summarise, z_score

log = logging.getLogger(__name__)

FeatureRef = tuple[int, int]  # (layer, feature)
INTERVENTION_MODE = "replacement: attention patterns frozen, norms live, features re-encoded, errors frozen"


class ValidationError(ValueError):
    """A circuit, prompt set or target cannot be validated; the message names the problem."""


def parse_feature(ref: str | Sequence[int], *, n_layers: int, n_features: int, transcoder_id: str | None) -> FeatureRef:
    """`"transcoder/layer/feature"` (a stored feature key), `"layer/feature"` or `(layer, feature)` → `(l, f)`."""
    if isinstance(ref, str):
        parts = ref.rsplit("/", 2)
        if len(parts) == 3 and transcoder_id is not None and parts[0] != transcoder_id:
            raise ValidationError(
                f"unknown feature key {ref!r}: it names transcoder {parts[0]!r}, not {transcoder_id!r}"
            )
        try:
            layer, feature = int(parts[-2]), int(parts[-1])
        except (ValueError, IndexError):
            raise ValidationError(
                f"unknown feature key {ref!r}: expected 'transcoder/layer/feature' or 'layer/feature'"
            ) from None
    else:
        if len(ref) != 2:
            raise ValidationError(f"unknown feature {tuple(ref)!r}: expected (layer, feature)")
        layer, feature = int(ref[0]), int(ref[1])
    if not (0 <= layer < n_layers and 0 <= feature < n_features):
        raise ValidationError(
            f"unknown feature {layer}/{feature}: the transcoder has {n_layers} layers of {n_features} features"
        )
    return layer, feature


@dataclass(frozen=True)
class Circuit:
    features: tuple[FeatureRef, ...]  # sorted, unique
    label: str = ""

    @classmethod
    def of(
        cls,
        refs: Sequence[str | Sequence[int]],
        transcoder: EncoderStack,
        *,
        transcoder_id: str | None = None,
        label: str = "",
    ) -> Circuit:
        if not refs:
            raise ValidationError("the circuit is empty: name at least one feature")
        spec = transcoder.spec
        parsed = {
            parse_feature(r, n_layers=spec.n_layers, n_features=spec.n_features, transcoder_id=transcoder_id)
            for r in refs
        }
        return cls(tuple(sorted(parsed)), label)


@dataclass(frozen=True)
class TargetSpec:
    """What to measure, resolved per prompt: a token's logit, a logit difference, or a direction."""

    kind: Literal["token", "difference", "direction"]
    tokens: tuple[str, ...] = ()
    direction: torch.Tensor | None = None  # (d_model,) for kind "direction"
    label: str = ""
    position: int = -1

    @classmethod
    def token(cls, text: str, position: int = -1) -> TargetSpec:
        return cls("token", (text,), label=repr(text), position=position)

    @classmethod
    def difference(cls, positive: str, negative: str, position: int = -1) -> TargetSpec:
        return cls("difference", (positive, negative), label=f"{positive!r} − {negative!r}", position=position)

    def resolve(self, model: LoadedModel, n_pos: int) -> Target:
        try:
            return self._resolve(model, n_pos)
        except TargetError as error:
            raise ValidationError(str(error)) from None

    def _resolve(self, model: LoadedModel, n_pos: int) -> Target:
        position = check_position(self.position, n_pos)
        W_U = model.model.W_U.detach().float()
        if self.kind == "token":
            token_id = single_token_id(model.tokenizer, self.tokens[0])
            return Target(self.label, position, demeaned_unembedding(W_U)[:, token_id].clone(), 1.0, token_id)
        if self.kind == "difference":
            a, b = (single_token_id(model.tokenizer, t) for t in self.tokens)
            return Target(self.label, position, (W_U[:, a] - W_U[:, b]).clone(), 1.0, None)
        if self.direction is None:
            raise ValidationError("a direction target needs a direction vector")
        return direction_target(self.label or "direction", self.direction, position, model.info.d_model)


@dataclass(frozen=True)
class ValidationConfig:
    n_null: int = 20  # random same-size sets per prompt
    seed: int = 0
    freeze_norms: bool = False
    chunk_size: int = 32  # variants per forward pass
    top_k_agreement: int = 20  # 0: no agreement measurement (no attribution graph)
    alpha: float = 0.05  # significance level of "beats its null controls"
    magnitude_window: float = 0.25  # a null instance is drawn from this share of its layer's nearest candidates
    zero_positions: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.n_null < 1:
            raise ValidationError(f"n_null must be at least 1, got {self.n_null}")
        if self.chunk_size < 1:
            raise ValidationError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.top_k_agreement < 0:
            raise ValidationError(f"top_k_agreement must be >= 0, got {self.top_k_agreement}")
        if not 0 < self.alpha < 1:
            raise ValidationError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.magnitude_window <= 1:
            raise ValidationError(f"magnitude_window must be in (0, 1], got {self.magnitude_window}")


@dataclass
class PromptValidation:
    prompt: str
    prompt_id: str | None
    n_pos: int
    target: str
    target_position: int
    circuit_instances: list[tuple[int, int, int]]  # (layer, position, feature) active instances of the circuit
    n_active: int
    clean: float  # target value (demeaned logit for a token target)
    necessity_zero: float
    necessity_mean: float  # NaN without mean activations
    logit_change_zero: float  # raw logit change of a token target (NaN for other targets)
    prob_change_zero: float
    sufficiency_frozen_errors: float
    sufficiency_ablated_errors: float
    null_necessity: list[float]
    null_sufficiency: list[float]
    necessity_p: float
    necessity_z: float
    sufficiency_p: float
    sufficiency_z: float
    beats_null: bool
    null_layer_fallbacks: int  # null instances drawn outside their circuit instance's layer (none there)
    agreement: float  # Spearman; NaN when not measured
    agreement_features: list[tuple[int, int, int, float, float]] = field(default_factory=list)  # (l, p, f, infl, eff)
    n_interventions: int = 0
    seconds: float = 0.0


@dataclass
class ValidationReport:
    circuit: Circuit
    target: str
    mode: str
    config: ValidationConfig
    prompts: list[PromptValidation]
    skipped: list[str]  # prompts where no circuit feature is active

    def summary(self, metric: str) -> Summary:
        return summarise([float(getattr(p, metric)) for p in self.prompts])

    @property
    def pass_fraction(self) -> float:
        return sum(p.beats_null for p in self.prompts) / len(self.prompts) if self.prompts else math.nan


def matched_null_sets(
    layers: torch.Tensor,
    magnitudes: torch.Tensor,
    circuit: torch.Tensor,
    n_sets: int,
    generator: torch.Generator,
    window: float = 0.25,
) -> tuple[list[list[int]], int]:
    """`n_sets` random sets of indices into the active instances, each as large as the circuit.

    `layers (n,)`, `magnitudes (n,)` of the active instances, `circuit (n,) bool`. Each circuit instance is matched
    by an instance of its layer drawn from the `window` share (at least 3) of that layer's non-circuit instances
    nearest in |log magnitude|; when its layer has none left, from all layers (counted as a fallback). Returns the
    sets and the number of fallbacks."""
    candidates = (~circuit).nonzero().flatten()
    members = circuit.nonzero().flatten()
    if members.numel() > candidates.numel():
        raise ValidationError(
            f"the circuit has {members.numel()} active instances on this prompt, more than the {candidates.numel()}"
            " other active ones: no same-size null set exists (circuit larger than the active set)"
        )
    log_mag = magnitudes.clamp(min=1e-12).log()
    layer_of = layers.tolist()
    candidate_list = candidates.tolist()
    # per circuit instance: |log magnitude difference| to every instance (float32, as a Python list: the draws
    # below index it millions of times on a large prompt)
    distance = {m: (log_mag - log_mag[m]).abs().tolist() for m in members.tolist()}
    sets, fallbacks = [], 0
    for _ in range(n_sets):
        used: set[int] = set()
        chosen: list[int] = []
        for member in members.tolist():
            pool = [c for c in candidate_list if layer_of[c] == layer_of[member] and c not in used]
            if not pool:
                pool = [c for c in candidate_list if c not in used]
                fallbacks += 1
            pool.sort(key=distance[member].__getitem__)
            size = min(len(pool), max(3, math.ceil(window * len(pool))))
            pick = pool[int(torch.randint(size, (1,), generator=generator))]
            used.add(pick)
            chosen.append(pick)
        sets.append(chosen)
    return sets, fallbacks


def _instance_mask(shape: tuple[int, ...], instances: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    if instances.numel():
        mask[instances[:, 0], instances[:, 1], instances[:, 2]] = True
    return mask


def validate_prompt(
    model: LoadedModel,
    transcoder: EncoderStack,
    circuit: Circuit,
    prompt: str | torch.Tensor,
    target_spec: TargetSpec,
    *,
    config: ValidationConfig | None = None,
    mean_activations: torch.Tensor | None = None,
    prompt_id: str | None = None,
) -> PromptValidation | None:
    """Validate `circuit` on one prompt (text with BOS prepended, or token ids). None when no circuit feature is
    active on it."""
    config = config or ValidationConfig()
    start = time.perf_counter()
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValidationError("a prompt of the set is empty")
        tokens = model.tokenize(prompt)[0].cpu()
        text = prompt
    else:
        tokens = prompt.flatten().cpu()
        text = model.tokenizer.decode(tokens.tolist())
    try:
        ctx = build_context(model, transcoder, tokens, zero_positions=config.zero_positions)
    except PromptError as error:
        raise ValidationError(f"prompt {text!r}: {error}") from None
    target = target_spec.resolve(model, ctx.n_pos)
    L, P, F = ctx.activations.shape
    if mean_activations is not None and tuple(mean_activations.shape) != (L, F):
        raise ValidationError(f"mean activations of shape {tuple(mean_activations.shape)}; expected ({L}, {F})")

    active = ctx.active_features()  # (n, 3) layer, position, feature
    magnitudes = ctx.activations[active[:, 0], active[:, 1], active[:, 2]]
    wanted = torch.zeros(L, F, dtype=torch.bool)
    for layer, feature in circuit.features:
        wanted[layer, feature] = True
    in_circuit = wanted[active[:, 0], active[:, 2]]
    if not bool(in_circuit.any()):
        return None
    generator = torch.Generator().manual_seed(config.seed)
    null_sets, fallbacks = matched_null_sets(
        active[:, 0], magnitudes, in_circuit, config.n_null, generator, config.magnitude_window
    )
    agreement_nodes, agreement_influence = _top_influence(model, transcoder, tokens, target, config)

    shape = (L, P, F)
    features_on = torch.ones(shape, dtype=torch.bool)
    features_on[:, list(ctx.zero_positions)] = False
    circuit_mask = _instance_mask(shape, active[in_circuit])
    variants: list[tuple[torch.Tensor, torch.Tensor | None, float]] = []  # (mask, values or None for 0, errors)
    variants.append((torch.zeros(shape, dtype=torch.bool), None, 1.0))  # 0 clean
    variants.append((circuit_mask, None, 1.0))  # 1 necessity, zero
    if mean_activations is not None:
        values = mean_activations.float().unsqueeze(1).expand(L, P, F)
        variants.append((circuit_mask, values, 1.0))  # necessity, mean
    keep_only = features_on & ~circuit_mask
    variants += [(keep_only, None, 1.0), (keep_only, None, 0.0), (features_on, None, 1.0), (features_on, None, 0.0)]
    fixed = len(variants)
    for chosen in null_sets:
        variants.append((_instance_mask(shape, active[chosen]), None, 1.0))
    for chosen in null_sets:
        variants.append((features_on & ~_instance_mask(shape, active[chosen]), None, 1.0))
    for node in agreement_nodes:
        variants.append((_instance_mask(shape, torch.tensor([node])), None, 1.0))

    batch = ClampBatch.empty(len(variants), L, P, F)
    for i, (mask, clamp_to, errors) in enumerate(variants):
        batch.mask[i] = mask
        if clamp_to is not None:
            batch.values[i] = clamp_to
        batch.error_scale[i] = errors
    output = run_variants(ctx, batch, freeze_norms=config.freeze_norms, chunk_size=config.chunk_size)
    measured = (output.final_residual[:, target.position] @ target.direction.float()).tolist()

    clean = measured[0]
    nec_zero = necessity(clean, measured[1])
    offset = 2
    nec_mean = math.nan
    if mean_activations is not None:
        nec_mean, offset = necessity(clean, measured[2]), 3
    suff_frozen = recovered(measured[offset], measured[offset + 2], clean)
    suff_ablated = recovered(measured[offset + 1], measured[offset + 3], clean)
    n = config.n_null
    null_nec = [necessity(clean, v) for v in measured[fixed : fixed + n]]
    null_suff = [recovered(v, measured[offset + 2], clean) for v in measured[fixed + n : fixed + 2 * n]]
    tolerance = 1e-5
    nec_p, suff_p = (
        empirical_p_value(nec_zero, null_nec, tolerance),
        empirical_p_value(suff_frozen, null_suff, tolerance),
    )

    logit_change = prob_change = math.nan
    if target.token_id is not None:
        logits = logits_at(ctx, output.final_residual[:2], target.position)
        logit_change = float(logits[1, target.token_id] - logits[0, target.token_id])
        probabilities = logits.softmax(-1)[:, target.token_id]
        prob_change = float(probabilities[1] - probabilities[0])

    agreement, rows = math.nan, []
    if agreement_nodes:
        effects = torch.tensor([clean - v for v in measured[fixed + 2 * n :]])
        agreement = spearman(agreement_influence.double(), effects.abs().double())
        rows = [
            (*node, float(infl), float(eff))
            for node, infl, eff in zip(agreement_nodes, agreement_influence.tolist(), effects.tolist(), strict=True)
        ]
    return PromptValidation(
        prompt=text,
        prompt_id=prompt_id,
        n_pos=ctx.n_pos,
        target=target.label,
        target_position=target.position,
        circuit_instances=[(r[0], r[1], r[2]) for r in active[in_circuit].tolist()],
        n_active=int(active.shape[0]),
        clean=clean,
        necessity_zero=nec_zero,
        necessity_mean=nec_mean,
        logit_change_zero=logit_change,
        prob_change_zero=prob_change,
        sufficiency_frozen_errors=suff_frozen,
        sufficiency_ablated_errors=suff_ablated,
        null_necessity=null_nec,
        null_sufficiency=null_suff,
        necessity_p=nec_p,
        necessity_z=z_score(nec_zero, null_nec),
        sufficiency_p=suff_p,
        sufficiency_z=z_score(suff_frozen, null_suff),
        beats_null=bool(nec_p <= config.alpha and suff_p <= config.alpha),
        null_layer_fallbacks=fallbacks,
        agreement=agreement,
        agreement_features=rows,
        n_interventions=len(variants),
        seconds=time.perf_counter() - start,
    )


def _top_influence(
    model: LoadedModel, transcoder: EncoderStack, tokens: torch.Tensor, target: Target, config: ValidationConfig
) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """The `top_k_agreement` feature instances of the prompt's attribution graph (target as its only logit) with the
    largest influence on the target, and their influences."""
    if config.top_k_agreement == 0:
        return [], torch.zeros(0)
    graph = attribute(
        model, transcoder, tokens, targets=[target], config=AttributionConfig(zero_positions=config.zero_positions)
    )
    index = graph.index
    seed = torch.zeros(index.n_nodes)
    seed[index.slice(NodeKind.LOGIT)] = 1.0
    scores = influence(normalise(graph.edges), seed)[index.slice(NodeKind.FEATURE)]
    order = scores.argsort(descending=True, stable=True)[: config.top_k_agreement]
    nodes = [(index.features[i].layer, index.features[i].position, index.features[i].feature) for i in order.tolist()]
    return nodes, scores[order]


def validate(
    model: LoadedModel,
    transcoder: EncoderStack,
    circuit: Circuit,
    prompts: Sequence[str | torch.Tensor],
    target: TargetSpec,
    *,
    config: ValidationConfig | None = None,
    mean_activations: torch.Tensor | None = None,
    prompt_ids: Sequence[str | None] | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> ValidationReport:
    """Validate `circuit` on every prompt of the set and aggregate (see the module docstring)."""
    config = config or ValidationConfig()
    if not prompts:
        raise ValidationError("the prompt set is empty")
    if prompt_ids is not None and len(prompt_ids) != len(prompts):
        raise ValidationError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts")
    results, skipped = [], []
    for i, prompt in enumerate(prompts):
        pid = None if prompt_ids is None else prompt_ids[i]
        result = validate_prompt(
            model, transcoder, circuit, prompt, target, config=config, mean_activations=mean_activations, prompt_id=pid
        )
        if result is None:
            skipped.append(pid or (prompt if isinstance(prompt, str) else model.tokenizer.decode(prompt.tolist())))
        else:
            results.append(result)
        if progress is not None:
            progress(i + 1, len(prompts))
    if not results:
        names = ", ".join(f"{f[0]}/{f[1]}" for f in circuit.features)
        raise ValidationError(f"no feature of the circuit ({names}) is active on any prompt of the set")
    mode = INTERVENTION_MODE if not config.freeze_norms else INTERVENTION_MODE.replace("norms live", "norms frozen")
    return ValidationReport(circuit, results[0].target, mode, config, results, skipped)


__all__ = [
    "INTERVENTION_MODE",
    "Circuit",
    "PromptValidation",
    "TargetSpec",
    "ValidationConfig",
    "ValidationError",
    "ValidationReport",
    "matched_null_sets",
    "parse_feature",
    "validate",
    "validate_prompt",
]
