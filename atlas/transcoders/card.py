"""Dictionary cards: the quality figures that say how far to trust graphs built with a transcoder set.

A card holds reconstruction (mean FVU, mean L0 per layer, dead fraction), the spliced next-token loss (clean CE, CE
with every MLP replaced at once and no error terms, their delta), the mean replacement and completeness scores of
attribution graphs on a fixed evaluation prompt set, training tokens, and the recipe. It lives in the directory's
`atlas.json` under `card` (the identity of a dictionary is its weights and semantic config, so rewriting its card
never changes its id); the trainer writes the figures it has at the end of training, `atlas transcoders card`
adds the graph scores. The ingest copies the card onto the dictionary's `Transcoder` node, and the app shows it.

This module reads and writes cards; it must not compute them (that needs a model: `atlas.attribution.quality`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from atlas.config import CE_DELTA_WARNING_NATS
from atlas.transcoders.checks import METADATA_FILE, TranscoderFormatError, read_metadata

CARD_KEY = "card"


@dataclass(frozen=True)
class DictionaryCard:
    """Quality figures of one transcoder set; None where not measured."""

    fvu_mean: float | None = None
    l0_mean: float | None = None  # active features per token, mean over layers
    dead_fraction: float | None = None
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_delta: float | None = None  # nats lost when every MLP is replaced (no error terms)
    replacement_score: float | None = None  # mean over the evaluation prompts' pruned graphs
    completeness_score: float | None = None
    feature_nodes_kept: float | None = None  # mean feature nodes left in those pruned graphs
    eval_prompts: int | None = None
    eval_tokens: int | None = None
    training_tokens: int | None = None
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictionaryCard:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def merged(self, newer: DictionaryCard) -> DictionaryCard:
        """This card with every figure `newer` measured replacing ours."""
        return DictionaryCard(**{**self.to_dict(), **{k: v for k, v in newer.to_dict().items() if v is not None}})

    def warning(self, threshold: float = CE_DELTA_WARNING_NATS) -> str | None:
        """Why graphs built with this dictionary deserve caution, or None."""
        if self.ce_delta is None:
            return "its spliced CE delta was never measured (run `atlas transcoders card`)"
        if self.ce_delta > threshold:
            return (
                f"replacing every MLP with it raises the model's loss by {self.ce_delta:.2f} nats (more than"
                f" {threshold:g}): much of each graph is error nodes, and paths describe the dictionary as much as"
                " the model"
            )
        return None


def card_from_metadata(meta: dict[str, Any]) -> DictionaryCard:
    """The card in `atlas.json` contents; for directories trained before cards, derived from their final metrics."""
    card = meta.get(CARD_KEY)
    if isinstance(card, dict):
        return DictionaryCard.from_dict(card)
    metrics, training = meta.get("metrics") or {}, meta.get("training") or {}
    return DictionaryCard(
        fvu_mean=_number(metrics.get("fvu_mean")),
        l0_mean=_mean(metrics.get("l0")),
        dead_fraction=_number(metrics.get("dead_fraction")),
        ce_clean=_number(metrics.get("ce_clean")),
        ce_spliced=_number(metrics.get("ce_spliced")),
        ce_delta=_number(metrics.get("ce_delta")),
        eval_tokens=metrics.get("eval_tokens"),
        training_tokens=metrics.get("tokens"),
        recipe=recipe_summary(training) if training else None,
    )


def read_card(directory: str | Path) -> DictionaryCard:
    """The card of a transcoder directory (empty for another tool's directory without `atlas.json`)."""
    return card_from_metadata(read_metadata(directory))


def write_card(directory: str | Path, card: DictionaryCard) -> Path:
    """Merge `card` into the directory's card in `atlas.json` (written atomically; other keys kept)."""
    root = Path(directory)
    if not root.is_dir():
        raise TranscoderFormatError(f"transcoder directory {root} does not exist")
    meta = read_metadata(root)
    meta[CARD_KEY] = card_from_metadata(meta).merged(card).to_dict()
    path = root / METADATA_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def recipe_summary(training: dict[str, Any]) -> str:
    """One line naming how a dictionary was trained (from atlas.json's `training`)."""
    stream = training.get("stream") or {}
    parts = [
        f"{training.get('kind', '?')} {training.get('activation', '?')}",
        f"{training.get('n_features', '?')} features",
        # a CPU-budget run's `steps` is only an upper bound: name the budget instead
        (
            f"{training['cpu_budget_s'] / 60:g} core-minutes"
            if isinstance(training.get("cpu_budget_s"), int | float)
            else f"{training.get('steps', '?')} steps"
        ),
        f"batch {stream.get('batch_size', '?')}",
        f"λ {training.get('sparsity_lambda', '?')}",
    ]
    if training.get("skip"):
        parts.append("skip")
    return ", ".join(parts)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _mean(value: Any) -> float | None:
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        return float(sum(value) / len(value))
    return _number(value)
