"""`atlas db migrate`: bring a store's transcoder ids to the weights rule, merging the copies of one dictionary.

Stores written before schema version 5 keyed a dictionary by its directory name and the bytes of every file in it
(`atlas.json`'s run timings included), so the same weights ingested from two directories, or re-saved, were stored
twice: two Transcoders, every prompt and every feature twice. Given the dictionaries (`directories`), this:

1. computes each one's new id (`atlas.transcoders.identity.transcoder_identity`) and the id the old rule gave it
   (`legacy_transcoder_identity`; the directory must be byte-identical to the one ingested, or be named with
   `explicit={old_id: directory}`, for a stored id whose directory is gone or was re-saved since);
2. computes, for every stored prompt of those old ids, the id a single ingest under the new id gives it
   (`ingest.prompts.prompt_key` over its stored text, model and settings): copies of one prompt get one id;
3. merges the DuckDB statistics (`FeatureStatsStore.merge_transcoder_ids`: a prompt counted under two ids counts
   once), then the Neo4j store (`atlas.storage.identities.merge_transcoders`: one Transcoder with all names and
   sources, each prompt and feature once, the aggregate layer rebuilt from the surviving prompts).

Idempotent: a second run finds no old id left and changes nothing (it still rebuilds an aggregate layer a crash left
stale). Opening the store with this code version already applies the schema migration 4 -> 5, which marks the old
Transcoders `identity: "legacy"`; `legacy_ids` lists those still waiting for their directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neo4j import Driver

from atlas.storage.feature_stats import FeatureStatsStore
from atlas.storage.identities import (
    IDENTITY_LEGACY,
    DictionaryLabel,
    MergeReport,
    merge_transcoders,
    stored_prompts,
    transcoders,
)
from atlas.storage.labels import push_auto_labels
from atlas.storage.migrations import ensure_schema
from atlas.transcoders.identity import legacy_transcoder_identity, transcoder_identity
from ingest.prompts import prompt_key


@dataclass
class MigrationReport:
    """What `migrate_identities` found and did."""

    dictionaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # directory -> id, legacy id, seconds
    mapping: dict[str, str] = field(default_factory=dict)  # stored legacy id -> new id
    stats: dict[str, str] = field(default_factory=dict)  # statistics source id -> action
    graph: MergeReport = field(default_factory=MergeReport)
    legacy_left: list[str] = field(default_factory=list)  # legacy ids still in the store (no directory given)
    labels_changed: int = 0  # Features whose automatic label the merged statistics changed

    def to_json(self) -> dict[str, Any]:
        return {
            "dictionaries": self.dictionaries,
            "mapping": self.mapping,
            "stats": self.stats,
            "graph": self.graph.__dict__,
            "legacy_left": self.legacy_left,
            "labels_changed": self.labels_changed,
        }


def new_prompt_id(prompt: Mapping[str, Any], transcoder_id: str) -> str | None:
    """The id a single ingest under `transcoder_id` gives a stored prompt; None when it lacks text or settings."""
    text, model, settings = prompt.get("text"), prompt.get("model"), prompt.get("settings")
    if not isinstance(text, str) or not isinstance(model, str) or not isinstance(settings, str):
        return None
    return prompt_key(text, model=model, transcoder_id=transcoder_id, settings=json.loads(settings))


def legacy_ids(driver: Driver, database: str = "neo4j") -> list[str]:
    """Transcoder ids in the store that still follow the pre-version-5 rule."""
    return [t["id"] for t in transcoders(driver, database) if t["identity"] == IDENTITY_LEGACY]


def migrate_identities(
    driver: Driver,
    directories: Iterable[str | Path],
    *,
    database: str = "neo4j",
    stats_db: str | Path | None = None,
    explicit: Mapping[str, str | Path] | None = None,
) -> MigrationReport:
    """Merge the stored ids of the dictionaries in `directories` (and `explicit` old id -> directory)."""
    ensure_schema(driver, database)
    report = MigrationReport()
    labels: dict[str, DictionaryLabel] = {}
    pairs = [(legacy_transcoder_identity(d), Path(d)) for d in directories]
    pairs += [(old, Path(d)) for old, d in (explicit or {}).items()]
    seen: dict[Path, DictionaryLabel] = {}
    for old, directory in pairs:
        if directory not in seen:
            ident = transcoder_identity(directory)
            seen[directory] = DictionaryLabel(ident.id, ident.name, ident.source, ident.kind, ident.config)
            report.dictionaries[str(directory)] = {"id": ident.id, "legacy_id": old, "seconds": round(ident.seconds, 3),
                                                   "tensor_bytes": ident.n_bytes}  # fmt: skip
        labels[old] = seen[directory]
    stored = {t["id"] for t in transcoders(driver, database)}
    mapping = {old: label for old, label in labels.items() if old in stored and old != label.id}
    report.mapping = {old: label.id for old, label in mapping.items()}

    groups: dict[str, dict[str, set[str]]] = {}
    prompt_map: dict[str, str] = {}
    for old, label in mapping.items():
        ids = set()
        for prompt in stored_prompts(driver, old, database):
            new = new_prompt_id(prompt, label.id) or prompt["id"]
            prompt_map[prompt["id"]] = new
            ids.add(new)
        groups.setdefault(label.id, {})[old] = ids
    for new_id, group in groups.items():
        group[new_id] = {p["id"] for p in stored_prompts(driver, new_id, database)}
    if stats_db is not None and groups:
        report.stats = FeatureStatsStore(stats_db).merge_transcoder_ids(groups, prompt_map)
    report.graph = merge_transcoders(driver, mapping, new_prompt_id, database=database)
    if stats_db is not None and groups:  # the statistics were re-keyed and the labels recomputed: copy them over
        report.labels_changed = push_auto_labels(driver, FeatureStatsStore(stats_db), transcoder_ids=groups,
                                                 database=database)  # fmt: skip
    report.legacy_left = legacy_ids(driver, database)
    return report
