"""Validation and edits for the app: a circuit from a path result, the validation stage run on it (and stored), the
stored validations and edits of a feature, a feature-set edit on chosen prompts, and the rows the pages draw.

The computation is `atlas.validation` (`validate`, `apply_edit`) and the storage `atlas.storage.validations`; this
module only orchestrates, holding the model bundle's lock while it runs. No Streamlit here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from neo4j import Driver

from app.shaping import InputError
from atlas.storage.graph_schema import EDIT, FEATURE, REL_EDITS, REL_TESTS, VALIDATION
from atlas.validation.edits import EditReport, FeatureEdit, apply_edit
from atlas.validation.validate import (
    Circuit,
    TargetSpec,
    ValidationConfig,
    ValidationError,
    ValidationReport,
    parse_feature,
    validate,
)


def circuit_from_paths(paths: Sequence[Any], top_k: int) -> tuple[list[str], list[str]]:
    """(the first `top_k` distinct feature keys along the paths, strongest path first; the paths' prompt ids)."""
    keys: list[str] = []
    prompts: list[str] = []
    for path in paths:
        if path.prompt_id not in prompts:
            prompts.append(path.prompt_id)
        for node in path.nodes:
            if node.kind == "feature" and node.key and node.key not in keys and len(keys) < top_k:
                keys.append(node.key)
    if not keys:
        raise InputError("the paths pass through no feature: nothing to validate")
    return keys, prompts


def _refs(keys: Sequence[str], transcoder: Any, transcoder_id: str) -> list[tuple[int, int]]:
    spec = transcoder.spec
    try:
        return [parse_feature(k, n_layers=spec.n_layers, n_features=spec.n_features, transcoder_id=transcoder_id)
                for k in keys]  # fmt: skip
    except ValidationError as err:
        raise InputError(str(err)) from None


def run_circuit_validation(
    bundle: Any,
    keys: Sequence[str],
    transcoder_id: str,
    texts: Sequence[str],
    prompt_ids: Sequence[str],
    target: str,
    *,
    n_null: int = 20,
    top_k_agreement: int = 10,
    progress: Callable[[int, int], Any] | None = None,
) -> ValidationReport:
    """Validate the circuit `keys` on the prompts for the token `target` (see `atlas.validation.validate`)."""
    try:
        with bundle.lock:
            circuit = Circuit.of(_refs(keys, bundle.transcoder, transcoder_id), bundle.transcoder)
            config = ValidationConfig(n_null=n_null, top_k_agreement=top_k_agreement)
            return validate(bundle.model, bundle.transcoder, circuit, list(texts), TargetSpec.token(target),
                            config=config, prompt_ids=list(prompt_ids), progress=progress)  # fmt: skip
    except ValidationError as err:
        raise InputError(str(err)) from None


def store_validation(
    driver: Driver, database: str, validations_path: Path, report: ValidationReport, transcoder_id: str, model: str
) -> str:
    """Write the report as a `(:Validation)` node and DuckDB rows (both or neither); its id."""
    from atlas.storage.validations import ValidationStore, record_from_report

    record = record_from_report(report, transcoder_id=transcoder_id, model=model, label="app: paths")
    return ValidationStore(driver, validations_path, database).write(record)


def null_rows(report: ValidationReport) -> list[dict[str, Any]]:
    """One row per (prompt, measure, circuit or null set): the values the null-distribution plot draws."""
    rows: list[dict[str, Any]] = []
    for p in report.prompts:
        name = p.prompt_id or p.prompt
        for measure, value, nulls in (("necessity", p.necessity_zero, p.null_necessity),
                                      ("sufficiency", p.sufficiency_frozen_errors, p.null_sufficiency)):  # fmt: skip
            rows.append({"prompt": name, "measure": measure, "set": "circuit", "value": value})
            rows += [{"prompt": name, "measure": measure, "set": "null", "value": v} for v in nulls]
    return rows


def prompt_rows(report: ValidationReport) -> list[dict[str, Any]]:
    return [
        {"prompt": p.prompt_id or p.prompt, "text": p.prompt, "necessity": p.necessity_zero,
         "null necessity (mean)": sum(p.null_necessity) / len(p.null_necessity), "p necessity": p.necessity_p,
         "sufficiency": p.sufficiency_frozen_errors,
         "null sufficiency (mean)": sum(p.null_sufficiency) / len(p.null_sufficiency),
         "p sufficiency": p.sufficiency_p, "beats null": p.beats_null, "agreement": p.agreement}
        for p in report.prompts
    ]  # fmt: skip


def summary_rows(report: ValidationReport) -> list[dict[str, Any]]:
    rows = []
    for metric in ("necessity_zero", "sufficiency_frozen_errors", "sufficiency_ablated_errors", "agreement"):
        s = report.summary(metric)
        rows.append({"measure": metric, "mean": s.mean, "std": s.std, "min": s.minimum, "max": s.maximum, "n": s.n})
    return rows


def feature_validations(driver: Driver, database: str, key: str) -> list[dict[str, Any]]:
    """The stored validations whose circuit holds the feature `key`: its measured ablation effects, newest first."""
    records = driver.execute_query(
        f"MATCH (v:{VALIDATION})-[:{REL_TESTS}]->(:{FEATURE} {{key: $key}}) "
        "RETURN v.id AS id, v.created_at AS created, v.label AS label, v.target AS target, size(v.circuit) AS "
        "circuit_size, v.n_prompts AS prompts, v.necessity_zero AS necessity, v.sufficiency_frozen_errors AS "
        "sufficiency, v.pass_fraction AS beats_null, v.agreement AS agreement ORDER BY created DESC LIMIT 50",
        key=key,
        database_=database,
    ).records
    return [dict(r) for r in records]


def feature_edits(driver: Driver, database: str, key: str) -> list[dict[str, Any]]:
    """The stored edits of a feature set holding `key`, newest first."""
    records = driver.execute_query(
        f"MATCH (e:{EDIT})-[:{REL_EDITS}]->(:{FEATURE} {{key: $key}}) "
        "RETURN e.id AS id, e.created_at AS created, e.label AS label, e.operation AS operation, size(e.features) AS "
        "features, e.target_logit_change AS target_logit_change, e.accuracy_before AS accuracy_before, "
        "e.accuracy_after AS accuracy_after, e.control_kl AS control_kl, e.control_top1_agreement AS control_top1 "
        "ORDER BY created DESC LIMIT 50",
        key=key,
        database_=database,
    ).records
    return [dict(r) for r in records]


def run_feature_edit(
    bundle: Any,
    keys: Sequence[str],
    transcoder_id: str,
    operation: str,
    value: float,
    target: Sequence[tuple[str, str | None]],
    control: Sequence[str],
    *,
    n_generations: int = 2,
    max_new_tokens: int = 8,
) -> EditReport:
    """Apply the edit of `keys` (see `atlas.validation.edits.apply_edit`); bad input as an `InputError`."""
    if not keys:
        raise InputError("choose at least one feature to edit")
    if not target:
        raise InputError("choose at least one target prompt")
    if not control:
        raise InputError("choose at least one control prompt")
    try:
        with bundle.lock:
            edit = FeatureEdit(tuple(_refs(keys, bundle.transcoder, transcoder_id)), operation, value)  # type: ignore[arg-type]
            return apply_edit(bundle.model, bundle.transcoder, edit, list(target), list(control),
                              n_generations=n_generations, max_new_tokens=max_new_tokens)  # fmt: skip
    except ValidationError as err:
        raise InputError(str(err)) from None


def edit_rows(report: EditReport) -> list[dict[str, Any]]:
    """One row per measured prompt (targets first)."""
    return [
        {"set": role, "prompt": p.prompt, "answer": p.answer, "Δ logit": p.answer_logit_change,
         "Δ prob": p.answer_prob_change, "correct before": p.correct_before, "correct after": p.correct_after,
         "KL": p.kl, "top-1 same": p.top1_same}
        for role, measured in (("target", report.target), ("control", report.control)) for p in measured
    ]  # fmt: skip


def edit_summary(report: EditReport) -> dict[str, float]:
    return {
        "target: mean Δ logit": report.target_logit_change,
        "target: accuracy before": report.accuracy(after=False),
        "target: accuracy after": report.accuracy(after=True),
        "control: mean KL": report.control_kl,
        "control: top-1 agreement": report.control_top1_agreement,
    }
