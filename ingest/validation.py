"""Validate a circuit read from the store on stored prompts, and store the result: what `atlas validate` runs.

Reads the prompt set (stored ids, or every stored prompt of a task) and the circuit (feature keys, or the top-k
features by influence of a stored prompt graph) from Neo4j through the query library, the mean activations for
mean-ablation from the DuckDB statistics (`frequency × mean_active`, i.e. the mean over all tokens; features without
statistics get 0), runs `atlas.validation.validate`, and writes the report with `atlas.storage.validations`
(atomically, both stores or neither). Every check on the input (unknown prompts or features, a prompt set from
several dictionaries, a transcoder directory that is not the prompts' dictionary) runs before any model is loaded
or anything written. This module sits after storage in the pipeline; it holds no maths of its own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from neo4j import Driver

from atlas.models.loading import LoadedModel
from atlas.storage.feature_stats import FeatureStatsStore
from atlas.storage.queries import AtlasQueries
from atlas.storage.validations import ValidationRecord, ValidationStore, record_from_report
from atlas.transcoders.base import EncoderStack
from atlas.validation.validate import (
    Circuit,
    TargetSpec,
    ValidationConfig,
    ValidationError,
    ValidationReport,
    parse_feature,
    validate,
)

log = logging.getLogger(__name__)


@dataclass
class ValidationRequest:
    target: TargetSpec
    features: list[str] = field(default_factory=list)  # feature keys ("tc/layer/index") or "layer/index"
    top_k_from: str | None = None  # a stored prompt id: the circuit is its top_k features by stored influence
    top_k: int = 5
    prompt_ids: list[str] = field(default_factory=list)
    task: str | None = None
    config: ValidationConfig = field(default_factory=ValidationConfig)
    label: str = ""
    store: bool = True


@dataclass
class ResolvedRequest:
    prompt_ids: list[str]
    texts: list[str]
    transcoder_id: str
    model: str
    feature_keys: list[str]


@dataclass(frozen=True)
class SetPrompt:
    """One prompt of a prompt set: its text, its stored id (None when it is not stored) and its known answer."""

    text: str
    prompt_id: str | None = None
    answer: str | None = None
    transcoder: str | None = None
    model: str | None = None


_STORED_PROMPTS = (
    "MATCH (p:Prompt) WHERE ($ids IS NULL OR p.id IN $ids) AND ($task IS NULL OR p.task = $task) "
    "AND ($texts IS NULL OR p.text IN $texts) "
    "RETURN p.id AS id, p.text AS text, p['answer'] AS answer, p.transcoder AS transcoder, p.model AS model ORDER BY id"
)


def stored_prompts(
    driver: Driver,
    database: str,
    *,
    ids: list[str] | None = None,
    task: str | None = None,
    texts: list[str] | None = None,
) -> list[SetPrompt]:
    """Stored prompts by id (in the order given), by task, or by exact (normalised) text."""
    records = driver.execute_query(_STORED_PROMPTS, ids=ids, task=task, texts=texts, database_=database).records
    found = [SetPrompt(r["text"] or "", r["id"], r["answer"], r["transcoder"], r["model"]) for r in records]
    if ids is not None:
        by_id = {p.prompt_id: p for p in found}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ValidationError(f"unknown prompt id(s) {unknown}: not in the store")
        return [by_id[i] for i in ids]
    return found


def read_prompt_file(path: Path) -> list[SetPrompt]:
    """The prompts of a file (plain text, one per line; JSONL with `text` and optional `answer`; Parquet), read and
    normalised as ingest reads a corpus; a `ValidationError` naming the file when it is missing, empty or has
    unreadable lines."""
    from ingest.prompts import CorpusError, read_corpus

    try:
        records, issues = read_corpus(path)
    except CorpusError as error:
        raise ValidationError(f"prompt file: {error}") from None
    if issues:
        first = issues[0]
        raise ValidationError(f"prompt file {path}: {len(issues)} unreadable line(s), e.g. line {first.line}: "
                              f"{first.error}")  # fmt: skip
    if not records:
        raise ValidationError(f"the prompt set is empty: {path} holds no prompt")
    return [SetPrompt(r.text, None, r.meta.get("answer")) for r in records]


def match_stored(driver: Driver, database: str, prompts: list[SetPrompt], transcoder_id: str) -> list[SetPrompt]:
    """`prompts` with the id (and answer, when they have none) of the stored prompt of `transcoder_id` with the same
    text; the others unchanged (not stored)."""
    texts = sorted({p.text for p in prompts})
    stored: dict[str, SetPrompt] = {}
    for p in stored_prompts(driver, database, texts=texts):
        if p.transcoder == transcoder_id:
            stored.setdefault(p.text, p)
    out = []
    for p in prompts:
        hit = stored.get(p.text)
        out.append(p if hit is None else replace(hit, answer=p.answer or hit.answer))
    return out


def resolve(queries: AtlasQueries, driver: Driver, database: str, request: ValidationRequest) -> ResolvedRequest:
    """Prompt set, dictionary and circuit from the store; a `ValidationError` naming any problem."""
    if request.prompt_ids:
        found = {p.prompt_id: p for p in queries.list_prompts(prompt_ids=request.prompt_ids, limit=10_000).rows}
        unknown = [pid for pid in request.prompt_ids if pid not in found]
        if unknown:
            raise ValidationError(f"unknown prompt id(s) {unknown}: not in the store")
        prompts = [found[pid] for pid in request.prompt_ids]
    elif request.task is not None:
        prompts = list(queries.list_prompts(task=request.task, limit=10_000).rows)
        if not prompts:
            raise ValidationError(f"the prompt set is empty: no stored prompt has task {request.task!r}")
    else:
        raise ValidationError("the prompt set is empty: give prompt ids or a task")
    transcoders = sorted({p.transcoder or "" for p in prompts})
    if len(transcoders) != 1:
        raise ValidationError(f"the prompts come from {len(transcoders)} dictionaries ({transcoders}); validate one")
    models = sorted({p.model or "" for p in prompts})
    if len(models) != 1:
        raise ValidationError(f"the prompts come from {len(models)} models ({models}); validate one")
    transcoder_id = transcoders[0]
    texts = [p.text or "" for p in prompts]
    empty = [p.prompt_id for p in prompts if not (p.text or "").strip()]
    if empty:
        raise ValidationError(f"stored prompt(s) {empty} have no text")

    if request.top_k_from is not None:
        if request.features:
            raise ValidationError("give feature keys or a prompt to take the top features from, not both")
        keys = top_k_keys(queries, request.top_k_from, request.top_k)
    else:
        if not request.features:
            raise ValidationError("the circuit is empty: give feature keys or a prompt to take the top features from")
        keys = full_keys(request.features, transcoder_id)
    check_feature_keys(driver, database, keys, transcoder_id)
    return ResolvedRequest([p.prompt_id for p in prompts], texts, transcoder_id, models[0], keys)


def top_k_keys(queries: AtlasQueries, prompt_id: str, k: int) -> list[str]:
    """The `k` most influential distinct feature keys of a stored prompt's graph."""
    graph = queries.prompt_graph(prompt_id, max_edges=1).single
    # `influence` is a node's place in the cumulative influence (circuit-tracer's): smallest = most influential
    features = sorted(
        (n for n in graph.nodes if n.kind == "feature" and n.key),
        key=lambda n: math.inf if n.influence is None else n.influence,
    )
    keys: list[str] = []
    for node in features:
        if node.key not in keys:
            keys.append(str(node.key))
        if len(keys) == k:
            break
    if not keys:
        raise ValidationError(f"stored prompt {prompt_id!r} has no feature nodes")
    return keys


def full_keys(refs: list[str], transcoder_id: str) -> list[str]:
    """Feature keys `transcoder/layer/index` from keys or `layer/index` references of `transcoder_id`."""
    return [ref if ref.count("/") >= 2 else f"{transcoder_id}/{ref}" for ref in refs]


def check_feature_keys(driver: Driver, database: str, keys: list[str], transcoder_id: str) -> None:
    """A `ValidationError` naming the keys that are not features of `transcoder_id` in the store."""
    wrong = [k for k in keys if k.rsplit("/", 2)[0] != transcoder_id]
    if wrong:
        raise ValidationError(f"unknown feature key(s) {wrong}: the prompts' dictionary is {transcoder_id!r}")
    present = {
        r["key"]
        for r in driver.execute_query(
            "MATCH (f:Feature) WHERE f.key IN $keys RETURN f.key AS key", keys=keys, database_=database
        ).records
    }
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValidationError(f"unknown feature key(s) {missing}: not in the store")


def mean_activations(stats_path: Path, transcoder_id: str, n_layers: int, n_features: int) -> torch.Tensor | None:
    """`(L, F)` mean activation over all tokens from the DuckDB statistics, or None when there are none."""
    if not stats_path.exists():
        return None
    with FeatureStatsStore(stats_path).reader() as con:
        tables = {row[0] for row in con.execute("SHOW TABLES").fetchall()}
        if "feature_stats" not in tables:
            return None
        rows = con.execute(
            "SELECT layer, feature, frequency * coalesce(mean_active, 0) FROM feature_stats WHERE transcoder_id = ?",
            [transcoder_id],
        ).fetchall()
    if not rows:
        return None
    means = torch.zeros(n_layers, n_features)
    for layer, feature, value in rows:
        if 0 <= layer < n_layers and 0 <= feature < n_features:
            means[layer, feature] = float(value)
    return means


def run_validation(
    driver: Driver,
    database: str,
    request: ValidationRequest,
    load: Callable[[ResolvedRequest], tuple[LoadedModel, EncoderStack]],
    *,
    stats_path: Path,
    validations_path: Path,
    progress: Callable[[int, int], Any] | None = None,
) -> tuple[ValidationReport, ValidationRecord | None]:
    """Resolve, load (`load` gets the resolved request and returns the model and dictionary), validate, store."""
    queries = AtlasQueries(driver, database)
    resolved = resolve(queries, driver, database, request)
    model, transcoder = load(resolved)
    spec = transcoder.spec
    refs = [
        parse_feature(k, n_layers=spec.n_layers, n_features=spec.n_features, transcoder_id=resolved.transcoder_id)
        for k in resolved.feature_keys
    ]
    circuit = Circuit.of(refs, transcoder, label=request.label)
    means = mean_activations(stats_path, resolved.transcoder_id, spec.n_layers, spec.n_features)
    report = validate(
        model,
        transcoder,
        circuit,
        resolved.texts,
        request.target,
        config=request.config,
        mean_activations=means,
        prompt_ids=resolved.prompt_ids,
        progress=progress,
    )
    if not request.store:
        return report, None
    record = record_from_report(report, transcoder_id=resolved.transcoder_id, model=resolved.model, label=request.label)
    ValidationStore(driver, validations_path, database).write(record)
    return report, record


def default_validations_path() -> Path:
    """`validations.duckdb` beside the feature statistics (`$ATLAS_STATS_DB` or the cache's store directory)."""
    from atlas.config import stats_db_path

    return stats_db_path().with_name("validations.duckdb")


def load_from_directory(model_name: str | None, transcoders: Path) -> Callable[[ResolvedRequest], tuple[Any, Any]]:
    """A `load` for `run_validation`: the dictionary in `transcoders` (refused unless it is the prompts' own, by
    weight identity) and the model named, else the prompts' model."""

    def load(resolved: ResolvedRequest) -> tuple[Any, Any]:
        from atlas.models.loading import load_model
        from atlas.transcoders import load_transcoder
        from atlas.transcoders.identity import transcoder_identity

        identity = transcoder_identity(transcoders).id
        if identity != resolved.transcoder_id:
            raise ValidationError(
                f"transcoder directory {transcoders} holds dictionary {identity}, but the prompts were attributed with"
                f" {resolved.transcoder_id}"
            )
        name = model_name or resolved.model
        if name.startswith("hf-"):
            raise ValidationError(f"the prompts' model {name} was loaded from a local directory: pass --model DIR")
        return load_model(name), load_transcoder(transcoders).eval()

    return load
