"""What identifies an ingest: the attribution settings, the transcoders' identity, and the batch/shard naming.

`AttributionSettings` is everything that changes a prompt's graph (and therefore enters its id); `identity()` is its
canonical dict. `transcoder_identity(directory)` names a transcoder set by its weights and semantic configuration
(`atlas.transcoders.identity`): the same weights under another path or name, or with other timings in `atlas.json`,
are the same transcoders, and their prompts are stored once. Pure functions and frozen data; no model, no store.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atlas.transcoders.identity import transcoder_identity as identify_transcoders

TARGET_SALIENT = "salient"  # the model's top next tokens (default)
TARGET_ANSWER = "answer"  # the record's `answer` field (its first token)


@dataclass(frozen=True)
class AttributionSettings:
    """Settings that change a prompt's graph; all of them enter the prompt id."""

    targets: tuple[str, ...] = (TARGET_SALIENT,)  # "salient", "answer", or literal single-token strings
    max_feature_nodes: int | None = None
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_n_logits: int = 10
    desired_logit_probability: float = 0.95

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: give at least one of 'salient', 'answer' or a token")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 1:
            raise ValueError(f"max_feature_nodes must be positive, got {self.max_feature_nodes}")
        for name in ("node_threshold", "edge_threshold", "desired_logit_probability"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")

    def identity(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class IngestIdentity:
    """(model, transcoders, settings): prompts are stored once per identity.

    `model` is what the workers load (a name or a local path); `model_key` what the store keys the model by
    (`atlas.models.identity.model_identity`: the name, or `hf-<hash of the weights>` for a local directory);
    empty means `model`.
    """

    model: str
    transcoder_dir: str
    transcoder_id: str
    settings: AttributionSettings = field(default_factory=AttributionSettings)
    model_key: str = ""

    @property
    def store_model(self) -> str:
        return self.model_key or self.model


def transcoder_identity(directory: str | Path) -> str:
    """The id of the dictionary in `directory`: `<kind>-<16 hex>` over its weights and semantic configuration."""
    return identify_transcoders(directory).id


def batch_key(prompt_ids: list[str]) -> str:
    """Stable name of a batch (and of its shard directory): a hash of its prompt ids."""
    return "b" + hashlib.sha256(",".join(prompt_ids).encode()).hexdigest()[:16]
