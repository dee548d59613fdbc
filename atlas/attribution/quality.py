"""Measure a dictionary card: how well a transcoder set stands in for a model's MLPs, on held-out text and prompts.

Three phases, each timed: reconstruction (mean FVU pooled over the evaluation prompts' tokens, mean L0 per layer, the
share of features that never fire), the spliced next-token loss on held-out sequences (every MLP replaced at once,
no error terms; `atlas.training.splicing`), and the mean replacement and completeness scores of the evaluation
prompts' pruned attribution graphs, with the mean number of feature nodes those graphs keep (a dictionary whose
features carry too little influence leaves graphs of tokens and error nodes only). Position 0 (BOS) is left out
everywhere, as attribution leaves it out.

This module measures; it must not write anything (`atlas.transcoders.card.write_card` does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.progress import track

from atlas.attribution.context import build_context
from atlas.attribution.engine import AttributionConfig, attribute
from atlas.attribution.export import prune_graph
from atlas.attribution.nodes import NodeKind
from atlas.models import LoadedModel
from atlas.training.splicing import spliced_cross_entropy
from atlas.transcoders.base import EncoderStack
from atlas.transcoders.card import DictionaryCard, recipe_summary
from atlas.transcoders.checks import read_metadata

log = logging.getLogger(__name__)

# Short factual, indirect-object and arithmetic prompts the default model answers (the demo corpus's tasks).
EVAL_PROMPTS: tuple[str, ...] = (
    "The Eiffel Tower is in the city of",
    "The capital of Italy is the city of",
    "The capital of Japan is the city of",
    "The Colosseum is in the city of",
    "Berlin is the capital of",
    "Madrid is the capital of",
    "When Mary and John went to the store, John gave a drink to",
    "When Alice and Bob went to the park, Bob gave a ball to",
    "After Sarah and Tom had lunch, Tom handed the bill to",
    "When Emma and James arrived at the party, James gave a gift to",
    "two plus three is",
    "four plus four is",
    "The opposite of hot is",
    "The opposite of up is",
    "Monday, Tuesday, Wednesday,",
    "January, February, March,",
)


@dataclass
class ReconstructionSums:
    """Running sums, per layer, from which pooled FVU and L0 follow exactly (merge by adding)."""

    squared_error: torch.Tensor  # (n_layers,) Σ‖target − reconstruction‖²
    target_sum: torch.Tensor  # (n_layers, d_model) Σ target
    target_squares: torch.Tensor  # (n_layers,) Σ‖target‖²
    active: torch.Tensor  # (n_layers,) Σ active features per token
    ever_fired: torch.Tensor  # (n_layers, n_features) bool
    tokens: int = 0

    @classmethod
    def empty(cls, n_layers: int, d_model: int, n_features: int) -> ReconstructionSums:
        f64 = torch.float64
        return cls(torch.zeros(n_layers, dtype=f64), torch.zeros(n_layers, d_model, dtype=f64),
                   torch.zeros(n_layers, dtype=f64), torch.zeros(n_layers, dtype=f64),
                   torch.zeros(n_layers, n_features, dtype=torch.bool))  # fmt: skip

    def add(self, targets: torch.Tensor, reconstruction: torch.Tensor, activations: torch.Tensor) -> None:
        """`targets`, `reconstruction` `(n_layers, n_tokens, d_model)`; `activations (n_layers, n_tokens, F)`."""
        t, r = targets.double(), reconstruction.double()
        self.squared_error += (t - r).pow(2).sum(dim=(1, 2))
        self.target_sum += t.sum(dim=1)
        self.target_squares += t.pow(2).sum(dim=(1, 2))
        fired = activations != 0
        self.active += fired.sum(dim=(1, 2)).double()
        self.ever_fired |= fired.any(dim=1)
        self.tokens += targets.shape[1]

    def fvu(self) -> torch.Tensor:
        """`(n_layers,)` squared error over the targets' total variance about their mean, pooled over tokens."""
        variance = self.target_squares - self.target_sum.pow(2).sum(dim=1) / max(self.tokens, 1)
        return self.squared_error / variance.clamp(min=1e-30)

    def l0(self) -> torch.Tensor:
        """`(n_layers,)` mean number of active features per token."""
        return self.active / max(self.tokens, 1)

    def dead_fraction(self) -> float:
        return float((~self.ever_fired).double().mean())


def evaluate_dictionary(
    model: LoadedModel,
    transcoder: EncoderStack,
    *,
    prompts: Sequence[str] = EVAL_PROMPTS,
    eval_tokens: torch.Tensor | None = None,
    max_feature_nodes: int | None = 256,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    transcoder_dir: str | None = None,
    progress: bool = True,
) -> DictionaryCard:
    """The card's figures for `transcoder` on `model`: reconstruction and graph scores on `prompts`, spliced CE on
    `eval_tokens (n_seq, ctx)` (skipped when None). `transcoder_dir` adds the training tokens and recipe."""
    if not prompts:
        raise ValueError("the evaluation needs at least one prompt")
    spec = transcoder.spec
    sums = ReconstructionSums.empty(spec.n_layers, spec.d_model, spec.n_features)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with torch.no_grad():
        for text in prompts:
            ctx = build_context(model, transcoder, model.tokenize(text)[0].cpu(), zero_positions=(0,))
            output = transcoder(ctx.inputs[:, 1:])
            sums.add(ctx.mlp_outputs[:, 1:], output.reconstruction, output.activations)
    timings["reconstruction"] = time.perf_counter() - started
    spliced = None
    if eval_tokens is not None:
        started = time.perf_counter()
        spliced = spliced_cross_entropy(model, transcoder, eval_tokens)
        timings["spliced_ce"] = time.perf_counter() - started
    started = time.perf_counter()
    replacement, completeness, features_kept = [], [], []
    config = AttributionConfig(max_feature_nodes=max_feature_nodes)
    for text in track(prompts, description="graph scores", disable=not progress, transient=True):
        pruned = prune_graph(attribute(model, transcoder, text, config=config), node_threshold=node_threshold,
                             edge_threshold=edge_threshold)  # fmt: skip
        replacement.append(pruned.scores_pruned.replacement)
        completeness.append(pruned.scores_pruned.completeness)
        features_kept.append(int(pruned.result.node_mask[pruned.graph.index.slice(NodeKind.FEATURE)].sum()))
    timings["graph_scores"] = time.perf_counter() - started
    log.info("dictionary evaluation phases (s): %s", {k: round(v, 2) for k, v in timings.items()})
    meta = read_metadata(transcoder_dir) if transcoder_dir else {}
    training = meta.get("training") or {}
    return DictionaryCard(
        fvu_mean=float(sums.fvu().mean()),
        l0_mean=float(sums.l0().mean()),
        dead_fraction=sums.dead_fraction(),
        ce_clean=None if spliced is None else spliced.clean,
        ce_spliced=None if spliced is None else spliced.spliced,
        ce_delta=None if spliced is None else spliced.delta,
        replacement_score=sum(replacement) / len(replacement),
        completeness_score=sum(completeness) / len(completeness),
        feature_nodes_kept=sum(features_kept) / len(features_kept),
        eval_prompts=len(prompts),
        eval_tokens=None if spliced is None else spliced.n_tokens,
        training_tokens=(meta.get("metrics") or {}).get("tokens"),
        recipe=recipe_summary(training) if training else None,
    )
