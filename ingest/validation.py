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
    prompt_file: Path | None = None  # prompts from a file; those stored under the dictionary are found by text
    from_paths: PathsQuery | None = None  # the circuit: the features on the strongest paths of a stored query
    config: ValidationConfig = field(default_factory=ValidationConfig)
    label: str = ""
    store: bool = True


@dataclass(frozen=True)
class PathsQuery:
    """A stored `paths_to_logits` query (the arguments of `atlas paths`) whose rows give a circuit: the first
    `top_k` distinct features met along its paths, strongest path first, sources included."""

    targets: tuple[str, ...]
    sources: tuple[str, ...] = ()
    at_token: str | None = None
    max_hops: int = 3
    min_abs_weight: float = 0.0
    limit: int = 25
    model: str | None = None


@dataclass
class ResolvedRequest:
    prompt_ids: list[str | None]  # None: a prompt from a file that is not stored
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
    "RETURN p.id AS id, p.text AS text, properties(p)['answer'] AS answer, p.transcoder AS transcoder, "
    "p.model AS model ORDER BY id"
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


def match_stored(driver: Driver, database: str, prompts: list[SetPrompt], transcoder_id: str | None) -> list[SetPrompt]:
    """`prompts` with the id (and answer, when they have none) of the stored prompt of `transcoder_id` (None: of any
    dictionary) with the same text; the others unchanged (not stored)."""
    texts = sorted({p.text for p in prompts})
    stored: dict[str, SetPrompt] = {}
    for p in stored_prompts(driver, database, texts=texts):
        if transcoder_id is None or p.transcoder == transcoder_id:
            stored.setdefault(p.text, p)
    out = []
    for p in prompts:
        hit = stored.get(p.text)
        out.append(p if hit is None else replace(hit, answer=p.answer or hit.answer))
    return out


def resolve(
    queries: AtlasQueries,
    driver: Driver,
    database: str,
    request: ValidationRequest,
    identify: Callable[[], str] | None = None,
) -> ResolvedRequest:
    """Prompt set, dictionary and circuit from the store (and a prompt file); a `ValidationError` naming any problem.
    `identify()` names the dictionary when no prompt of the set is stored."""
    if request.from_paths is not None and (request.features or request.top_k_from is not None):
        raise ValidationError("give one circuit: feature keys, a prompt's top features, or a paths query")
    prompts: list[SetPrompt] = []
    if request.prompt_ids:
        prompts += stored_prompts(driver, database, ids=request.prompt_ids)
    if request.task is not None:
        tagged = stored_prompts(driver, database, task=request.task)
        if not tagged:
            raise ValidationError(f"the prompt set is empty: no stored prompt has task {request.task!r}")
        prompts += tagged
    if request.prompt_file is not None:
        prompts += read_prompt_file(request.prompt_file)
    path_keys: list[str] = []
    if request.from_paths is not None:  # on the stored prompts of the set, else on any (and validated on those)
        ids = [p.prompt_id for p in prompts if p.prompt_id is not None]
        if prompts and not ids and request.prompt_file is not None:
            ids = [p.prompt_id for p in match_stored(driver, database, prompts, None) if p.prompt_id is not None]
        path_keys, path_prompts = paths_circuit(queries, request.from_paths, request.top_k, ids or None)
        if not prompts:
            prompts = stored_prompts(driver, database, ids=path_prompts)  # the prompts the paths were found on
    if not prompts:
        raise ValidationError("the prompt set is empty: give prompt ids, a task or a prompt file")
    stored = [p for p in prompts if p.prompt_id is not None]
    transcoders = sorted({p.transcoder or "" for p in stored})
    if len(transcoders) > 1:
        raise ValidationError(f"the prompts come from {len(transcoders)} dictionaries ({transcoders}); validate one")
    models = sorted({p.model or "" for p in stored})
    if len(models) > 1:
        raise ValidationError(f"the prompts come from {len(models)} models ({models}); validate one")
    if not transcoders and request.prompt_file is not None:  # the dictionaries storing the file's texts
        texts = sorted({p.text for p in prompts})
        transcoders = sorted({p.transcoder or "" for p in stored_prompts(driver, database, texts=texts)})
        transcoders = transcoders if len(transcoders) == 1 or identify is None else []
        if len(transcoders) > 1:
            raise ValidationError(f"the file's prompts are stored under {len(transcoders)} dictionaries "
                                  f"({transcoders}); give --transcoders to pick one")  # fmt: skip
    if transcoders:
        transcoder_id = transcoders[0]
    elif identify is not None:
        transcoder_id = identify()
    else:
        raise ValidationError("no prompt of the set is stored: the dictionary is unknown")
    if request.prompt_file is not None:
        prompts = match_stored(driver, database, prompts, transcoder_id)
        models = sorted({p.model or "" for p in prompts if p.prompt_id is not None}) or models
    unstored = [p.text for p in prompts if p.prompt_id is None]
    if unstored and request.store:
        raise ValidationError(
            f"{len(unstored)} prompt(s) of {request.prompt_file} are not stored under dictionary {transcoder_id!r} "
            f"(e.g. {unstored[0]!r}); a stored validation links to stored prompts: ingest them, or pass --no-store"
        )
    empty = [p.prompt_id or repr(p.text) for p in prompts if not p.text.strip()]
    if empty:
        raise ValidationError(f"prompt(s) {empty} have no text")

    if request.from_paths is not None:
        keys = path_keys
    elif request.top_k_from is not None:
        if request.features:
            raise ValidationError("give feature keys or a prompt to take the top features from, not both")
        keys = top_k_keys(queries, request.top_k_from, request.top_k)
    else:
        if not request.features:
            raise ValidationError("the circuit is empty: give feature keys or a prompt to take the top features from")
        keys = full_keys(request.features, transcoder_id)
    check_feature_keys(driver, database, keys, transcoder_id)
    model = models[0] if models else ""
    return ResolvedRequest([p.prompt_id for p in prompts], [p.text for p in prompts], transcoder_id, model, keys)


def paths_circuit(
    queries: AtlasQueries, query: PathsQuery, top_k: int, prompt_ids: list[str] | None
) -> tuple[list[str], list[str]]:
    """(the first `top_k` distinct feature keys along the query's paths, strongest first; the prompts of the paths)."""
    from atlas.storage.queries import QueryError

    try:
        rows = queries.paths_to_logits(
            list(query.sources) or None, list(query.targets), max_hops=query.max_hops,
            min_abs_weight=query.min_abs_weight, limit=query.limit, prompt_ids=prompt_ids, model=query.model,
            at_token=query.at_token,
        ).rows  # fmt: skip
    except QueryError as error:
        raise ValidationError(f"paths query: {error}") from None
    if not rows:
        raise ValidationError("the circuit is empty: the paths query returned no path")
    keys: list[str] = []
    prompts: list[str] = []
    for row in rows:
        if row.prompt_id not in prompts:
            prompts.append(row.prompt_id)
        for node in row.nodes:
            if node.kind == "feature" and node.key and node.key not in keys and len(keys) < top_k:
                keys.append(node.key)
    if not keys:
        raise ValidationError("the circuit is empty: the paths of the query pass through no feature")
    return keys, prompts


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
    identify: Callable[[], str] | None = None,
) -> tuple[ValidationReport, ValidationRecord | None]:
    """Resolve, load (`load` gets the resolved request and returns the model and dictionary), validate, store."""
    queries = AtlasQueries(driver, database)
    resolved = resolve(queries, driver, database, request, identify)
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
        from atlas.config import DEFAULT_MODEL

        name = model_name or resolved.model or DEFAULT_MODEL
        if name.startswith("hf-"):
            raise ValidationError(f"the prompts' model {name} was loaded from a local directory: pass --model DIR")
        return load_model(name), load_transcoder(transcoders).eval()

    return load
