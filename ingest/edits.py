"""Apply a SHIFT-style feature-set edit to stored or file prompt sets, store and save it: what `atlas edit` runs.

Reads the edited features (keys, `layer/index`, the top-k of a stored graph, or a saved edit's), the target and
control prompt sets (stored prompt ids, every stored prompt of a task, or a prompt file; a file's prompts that are
stored under the dictionary are recognised by their text) from Neo4j, checks everything that can be checked
without the model (unknown prompts or features, empty sets, prompts of another dictionary, a saved edit of another
dictionary) before loading it, runs `atlas.validation.edits.apply_edit`, and then writes the result: an `(:Edit)`
node and DuckDB rows (`atlas.storage.edits`, both or neither) and, when asked, a JSON file (written to a temporary
name and renamed, after the stores). A run interrupted before that leaves nothing. No maths here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neo4j import Driver

from atlas.models.loading import LoadedModel
from atlas.storage.edits import EditRecord, EditStore, record_from_edit
from atlas.storage.queries import AtlasQueries
from atlas.transcoders.base import EncoderStack
from atlas.validation.edits import EditReport, FeatureEdit
from atlas.validation.validate import ValidationError, parse_feature
from ingest.validation import (
    SetPrompt,
    check_feature_keys,
    full_keys,
    match_stored,
    read_prompt_file,
    stored_prompts,
    top_k_keys,
)

log = logging.getLogger(__name__)

SAVED_FORMAT = "circuit-atlas-edit/1"


@dataclass
class PromptSetSpec:
    """Where a prompt set comes from: stored ids, a stored task and/or a file (their union, in that order)."""

    prompt_ids: list[str] = field(default_factory=list)
    task: str | None = None
    file: Path | None = None

    @property
    def given(self) -> bool:
        return bool(self.prompt_ids) or self.task is not None or self.file is not None


@dataclass
class EditRequest:
    target: PromptSetSpec
    control: PromptSetSpec
    features: list[str] = field(default_factory=list)  # keys or layer/index
    top_k_from: str | None = None
    top_k: int = 5
    operation: str | None = None  # ablate (default), scale, set
    value: float | None = None
    answer: str | None = None  # the answer of every target prompt (else each prompt's own)
    apply: Path | None = None  # a saved edit: its features, operation and value (and its prompt sets by default)
    n_generations: int = 2
    max_new_tokens: int = 8
    label: str = ""
    store: bool = True
    save: Path | None = None


@dataclass
class ResolvedEdit:
    edit_keys: list[str]
    operation: str
    value: float
    label: str
    target: list[SetPrompt]
    control: list[SetPrompt]
    transcoder_id: str
    model: str | None  # the stored prompts' model, None when no prompt is stored


def read_saved(path: Path) -> dict[str, Any]:
    """A saved edit (`save_edit`'s JSON); a `ValidationError` naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(f"saved edit {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValidationError(f"saved edit {path} is not readable JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != SAVED_FORMAT:
        raise ValidationError(f"{path} is not a saved edit (no format {SAVED_FORMAT!r})")
    for name in ("feature_keys", "transcoder", "edit", "target", "control"):
        if name not in data:
            raise ValidationError(f"saved edit {path} lacks {name!r}")
    return data


def _set_prompts(driver: Driver, database: str, spec: PromptSetSpec) -> list[SetPrompt]:
    prompts: list[SetPrompt] = []
    if spec.prompt_ids:
        prompts += stored_prompts(driver, database, ids=spec.prompt_ids)
    if spec.task is not None:
        tagged = stored_prompts(driver, database, task=spec.task)
        if not tagged:
            raise ValidationError(f"the prompt set is empty: no stored prompt has task {spec.task!r}")
        prompts += tagged
    if spec.file is not None:
        prompts += read_prompt_file(spec.file)
    return prompts


def _saved_prompts(driver: Driver, database: str, rows: list[dict[str, Any]]) -> list[SetPrompt]:
    ids = [str(r["prompt_id"]) for r in rows if r.get("prompt_id")]
    # every stored id of the saved edit must still be stored
    stored = {p.prompt_id: p for p in stored_prompts(driver, database, ids=ids)} if ids else {}
    out = []
    for r in rows:
        hit = stored.get(r.get("prompt_id"))
        out.append(SetPrompt(str(r["text"]), None, r.get("answer")) if hit is None else
                   SetPrompt(hit.text, hit.prompt_id, r.get("answer"), hit.transcoder, hit.model))  # fmt: skip
    return out


def resolve_edit(driver: Driver, database: str, request: EditRequest, identify: Callable[[], str]) -> ResolvedEdit:
    """Features, prompt sets and dictionary; `identify()` gives the dictionary id when no stored prompt names it.
    A `ValidationError` naming any problem; nothing is loaded or written."""
    saved = read_saved(request.apply) if request.apply is not None else None
    if saved is not None and (request.features or request.top_k_from):
        raise ValidationError("give --feature/--top-k-from or --apply, not both: a saved edit has its features")
    if saved is not None and (request.operation is not None or request.value is not None):
        raise ValidationError("a saved edit has its operation and value; leave --operation and --value out")
    if request.target.given:
        target = _set_prompts(driver, database, request.target)
    elif saved is not None:
        target = _saved_prompts(driver, database, saved["target"])
    else:
        raise ValidationError("the target prompt set is empty: give --target-id, --target-task or --target-file")
    if request.control.given:
        control = _set_prompts(driver, database, request.control)
    elif saved is not None:
        control = _saved_prompts(driver, database, saved["control"])
    else:
        raise ValidationError("the control prompt set is empty: give --control-id, --control-task or --control-file")
    if not target:
        raise ValidationError("the target prompt set is empty")
    if not control:
        raise ValidationError("the control prompt set is empty")
    stored = [p for p in target + control if p.prompt_id is not None]
    transcoders = sorted({p.transcoder for p in stored if p.transcoder is not None})
    if len(transcoders) > 1:
        raise ValidationError(f"the stored prompts come from {len(transcoders)} dictionaries ({transcoders}); "
                              "edit one")  # fmt: skip
    models = sorted({p.model for p in stored if p.model is not None})
    if len(models) > 1:
        raise ValidationError(f"the stored prompts come from {len(models)} models ({models}); edit one")
    transcoder_id = transcoders[0] if transcoders else (saved["transcoder"] if saved else identify())
    if saved is not None and saved["transcoder"] != transcoder_id:
        raise ValidationError(f"the saved edit is of dictionary {saved['transcoder']!r}, the prompts of "
                              f"{transcoder_id!r}")  # fmt: skip
    target = match_stored(driver, database, target, transcoder_id)
    control = match_stored(driver, database, control, transcoder_id)
    empty = [p.prompt_id or repr(p.text) for p in target + control if not p.text.strip()]
    if empty:
        raise ValidationError(f"prompt(s) {empty} have no text")
    if request.answer is not None:
        target = [SetPrompt(p.text, p.prompt_id, request.answer, p.transcoder, p.model) for p in target]

    if saved is not None:
        keys = [str(k) for k in saved["feature_keys"]]
        operation, value = str(saved["edit"]["operation"]), float(saved["edit"]["value"])
        label = request.label or str(saved["edit"].get("label", ""))
    else:
        if request.top_k_from is not None:
            if request.features:
                raise ValidationError("give feature keys or a prompt to take the top features from, not both")
            keys = top_k_keys(AtlasQueries(driver, database), request.top_k_from, request.top_k)
        elif request.features:
            keys = full_keys(request.features, transcoder_id)
        else:
            raise ValidationError("the edit has no features: give --feature, --top-k-from or --apply")
        operation = request.operation or "ablate"
        value = 0.0 if request.value is None else float(request.value)
        label = request.label
    if operation == "steer":
        operation = "set"
    if operation not in ("ablate", "scale", "set"):
        raise ValidationError(f"unknown edit operation {operation!r}; expected ablate, scale or set (steer)")
    if operation != "ablate" and request.value is None and saved is None:
        raise ValidationError(
            f"--operation {operation} needs --value (the {'factor' if operation == 'scale' else 'activation'})"
        )
    keys = list(dict.fromkeys(keys))
    check_feature_keys(driver, database, keys, transcoder_id)
    return ResolvedEdit(keys, operation, value, label, target, control, transcoder_id, models[0] if models else None)


def save_edit(path: Path, resolved: ResolvedEdit, edit: FeatureEdit, report: EditReport, record: EditRecord) -> None:
    """The edit, its prompt sets and its results as JSON at `path`, written whole (temporary name, then renamed)."""
    data = {
        "format": SAVED_FORMAT,
        "id": record.id,
        "edit": json.loads(edit.to_json()),
        "feature_keys": resolved.edit_keys,
        "transcoder": resolved.transcoder_id,
        "model": record.properties["model"],
        "target": [{"text": p.text, "prompt_id": p.prompt_id, "answer": p.answer} for p in resolved.target],
        "control": [{"text": p.text, "prompt_id": p.prompt_id} for p in resolved.control],
        "results": {
            **{k: v for k, v in record.properties.items() if k not in ("id", "features", "transcoder", "model")},
            "target": [asdict(p) for p in report.target],
            "control": [asdict(p) for p in report.control],
            "generations": [{"prompt": p, "before": b, "after": a} for p, b, a in report.generations],
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False), encoding="utf-8")
    os.replace(partial, path)


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null (JSON has none), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def load_from_directory(model_name: str | None, transcoders: Path) -> Callable[[str | None, str], tuple[Any, Any]]:
    """A `load` for `run_edit`: the dictionary in `transcoders` (refused unless it is `transcoder_id`, by weight
    identity) and the model named, else the stored prompts' model, else the default model."""
    from atlas.config import DEFAULT_MODEL
    from ingest.validation import ResolvedRequest
    from ingest.validation import load_from_directory as load_resolved

    loader = load_resolved(model_name, transcoders)

    def load(model: str | None, transcoder_id: str) -> tuple[Any, Any]:
        return loader(ResolvedRequest([], [], transcoder_id, model or DEFAULT_MODEL, []))

    return load


def identify_directory(transcoders: Path) -> Callable[[], str]:
    """An `identify` for `run_edit`: the weight identity of the dictionary in `transcoders`."""

    def identify() -> str:
        from atlas.transcoders.identity import transcoder_identity

        return transcoder_identity(transcoders).id

    return identify


def run_edit(
    driver: Driver,
    database: str,
    request: EditRequest,
    load: Callable[[str | None, str], tuple[LoadedModel, EncoderStack]],
    identify: Callable[[], str],
    *,
    edits_path: Path,
    progress: Callable[[int, int], Any] | None = None,
) -> tuple[EditReport, EditRecord, ResolvedEdit]:
    """Resolve, load (`load(model or None, transcoder_id)`), apply, then store and save as asked."""
    started = time.perf_counter()
    resolved = resolve_edit(driver, database, request, identify)
    log.info("resolved the edit in %.2fs", time.perf_counter() - started)
    started = time.perf_counter()
    model, transcoder = load(resolved.model, resolved.transcoder_id)
    log.info("loaded the model and dictionary in %.2fs", time.perf_counter() - started)
    spec = transcoder.spec
    refs = tuple(
        parse_feature(k, n_layers=spec.n_layers, n_features=spec.n_features, transcoder_id=resolved.transcoder_id)
        for k in resolved.edit_keys
    )
    edit = FeatureEdit(refs, resolved.operation, resolved.value, resolved.label)  # type: ignore[arg-type]
    started = time.perf_counter()
    report = apply_edit_checked(model, transcoder, edit, resolved, request, progress)
    log.info("applied the edit in %.2fs", time.perf_counter() - started)
    record = record_from_edit(
        report,
        feature_keys=resolved.edit_keys,
        transcoder_id=resolved.transcoder_id,
        model=resolved.model or model.info.name,
        target_ids=[p.prompt_id for p in resolved.target],
        control_ids=[p.prompt_id for p in resolved.control],
    )
    if request.store:
        EditStore(driver, edits_path, database).write(record)
    if request.save is not None:
        save_edit(request.save, resolved, edit, report, record)
    return report, record, resolved


def apply_edit_checked(
    model: LoadedModel,
    transcoder: EncoderStack,
    edit: FeatureEdit,
    resolved: ResolvedEdit,
    request: EditRequest,
    progress: Callable[[int, int], Any] | None,
) -> EditReport:
    """`apply_edit`, refusing an edit whose features are inactive on every target prompt (it could change nothing)."""
    from atlas.attribution.context import build_context
    from atlas.validation.edits import apply_edit

    active = False
    for p in resolved.target:
        ctx = build_context(model, transcoder, model.tokenize(p.text)[0].cpu())
        acts = ctx.activations[:, [i for i in range(ctx.n_pos) if i not in ctx.zero_positions]]
        if any(bool((acts[layer, :, feature] != 0).any()) for layer, feature in edit.features):
            active = True
            break
    if not active and edit.operation != "set":
        raise ValidationError(f"no edited feature ({', '.join(resolved.edit_keys)}) is active on any target prompt")
    return apply_edit(model, transcoder, edit, [(p.text, p.answer) for p in resolved.target],
                      [p.text for p in resolved.control], n_generations=request.n_generations,
                      max_new_tokens=request.max_new_tokens, progress=progress)  # fmt: skip
