"""`atlas validate`: causal validation of a circuit on stored prompts (necessity, sufficiency, null controls,
attribution agreement), printed and stored (a `(:Validation)` node in Neo4j and rows in `validations.duckdb`).

    atlas validate --transcoders runs/demo/transcoders --task ioi --target ' Mary' --feature clt-.../12/3
    atlas validate --transcoders DIR --prompt-id P1 --prompt-id P2 --top-k-from P1 --top-k 5 --target ' Austin'
    atlas validate --transcoders DIR --prompt-file prompts.jsonl --feature 12/3 --target ' Mary' --no-store
    atlas validate --transcoders DIR --from-paths --at-token ' Dallas' --target ' Austin' --top-k 4

With `--from-paths` the circuit is the first `--top-k` features along the strongest paths of the `atlas paths`
query given by the same arguments (`--target`, `--feature` as its sources, `--at-token`, `--hops`, `--min-weight`,
`--limit`), on the prompts those paths come from unless a prompt set is given.

Neo4j comes from `NEO4J_URI` (+ `NEO4J_USER`, `NEO4J_PASSWORD`), else the managed server when it is running.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from atlas_cli.common import TRANSCODERS_HELP, console, fail, store_driver, transcoder_directory, user_errors


def _fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:+.3f}"


def validate(
    source: Annotated[str, typer.Option("--transcoders", help=TRANSCODERS_HELP)],
    target: Annotated[str, typer.Option(help="Target logit token, e.g. ' Mary' (one token).")],
    wrong: Annotated[str | None, typer.Option(help="Measure logit(target) − logit(wrong) instead.")] = None,
    feature: Annotated[list[str] | None, typer.Option("--feature", help="Circuit feature key or layer/index.")] = None,
    top_k_from: Annotated[str | None, typer.Option(help="Circuit: the top features of this stored prompt.")] = None,
    top_k: Annotated[
        int, typer.Option(min=1, max=1000, help="How many top features (--top-k-from, --from-paths).")
    ] = 5,
    prompt_id: Annotated[list[str] | None, typer.Option("--prompt-id", help="A stored prompt (repeatable).")] = None,
    task: Annotated[str | None, typer.Option(help="Every stored prompt of this task.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Prompts from a file (text, JSONL, Parquet); stored ones found by text.")
    ] = None,
    from_paths: Annotated[
        bool, typer.Option("--from-paths", help="Circuit: the features on the paths of an `atlas paths` query.")
    ] = False,
    at_token: Annotated[str | None, typer.Option(help="--from-paths: start at the features on this token.")] = None,
    hops: Annotated[int, typer.Option(min=1, max=6, help="--from-paths: most edges on a path.")] = 3,
    min_weight: Annotated[float, typer.Option(min=0.0, help="--from-paths: smallest |weight| on a path.")] = 0.0,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="--from-paths: paths read, strongest first.")] = 25,
    position: Annotated[int, typer.Option(help="Target position (negative: from the end).")] = -1,
    model: Annotated[str | None, typer.Option(help="Model to load (default: the prompts' model).")] = None,
    n_null: Annotated[int, typer.Option(min=1, max=10_000, help="Random matched sets per prompt.")] = 20,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the null sets.")] = 0,
    agreement_top_k: Annotated[int, typer.Option(min=0, max=1000, help="Features in the agreement test.")] = 20,
    alpha: Annotated[float, typer.Option(min=1e-6, max=0.5, help="Significance level against the nulls.")] = 0.05,
    freeze_norms: Annotated[bool, typer.Option(help="Also freeze norm scales at the clean run.")] = False,
    chunk: Annotated[int, typer.Option(min=1, max=4096, help="Variants per forward pass.")] = 32,
    label: Annotated[str, typer.Option(help="A name for the stored validation.")] = "",
    store: Annotated[bool, typer.Option(help="Store the result (Neo4j + DuckDB).")] = True,
) -> None:
    """Validate a circuit on stored prompts by intervention and store the result."""
    transcoders = transcoder_directory(source)  # a directory, or a published dictionary
    from atlas.config import stats_db_path
    from atlas.storage.queries import QueryError
    from atlas.validation.validate import TargetSpec, ValidationConfig
    from ingest.edits import identify_directory
    from ingest.validation import (
        PathsQuery,
        ValidationRequest,
        default_validations_path,
        load_from_directory,
        run_validation,
    )

    paths = None
    if from_paths:
        if feature is None and at_token is None:
            fail(ValueError("--from-paths needs --feature (its sources), --at-token, or both, as `atlas paths` does"))
        paths = PathsQuery((target,), tuple(feature or ()), at_token, hops, min_weight, limit)
    spec = TargetSpec.token(target, position) if wrong is None else TargetSpec.difference(target, wrong, position)
    request = ValidationRequest(
        target=spec,
        features=[] if from_paths else list(feature or []),
        top_k_from=top_k_from,
        top_k=top_k,
        prompt_ids=list(prompt_id or []),
        task=task,
        prompt_file=prompt_file,
        from_paths=paths,
        config=ValidationConfig(
            n_null=n_null,
            seed=seed,
            freeze_norms=freeze_norms,
            chunk_size=chunk,
            top_k_agreement=agreement_top_k,
            alpha=alpha,
        ),
        label=label,
        store=store,
    )
    driver, database = store_driver()
    try:
        with driver:
            report, record = run_validation(
                driver, database, request, load_from_directory(model, transcoders),
                stats_path=stats_db_path(), validations_path=default_validations_path(),
                progress=lambda i, n: console.print(f"validated {i}/{n} prompt(s)"),
                identify=identify_directory(transcoders),
            )  # fmt: skip
    except (QueryError, *user_errors()) as err:  # type: ignore[misc]
        fail(err)
    show(report)
    if record is not None:
        console.print(f"stored as {record.id}")


def show(report: object) -> None:
    from atlas.validation.validate import ValidationReport

    assert isinstance(report, ValidationReport)
    table = Table("prompt", "clean", "nec. zero", "nec. mean", "suff. (err frozen)", "suff. (err ablated)",
                  "p nec.", "p suff.", "beats null", "agreement", title=f"circuit on {report.target}")  # fmt: skip
    for p in report.prompts:
        table.add_row(p.prompt_id or p.prompt, f"{p.clean:.3g}", _fmt(p.necessity_zero), _fmt(p.necessity_mean),
                      _fmt(p.sufficiency_frozen_errors), _fmt(p.sufficiency_ablated_errors), f"{p.necessity_p:.3f}",
                      f"{p.sufficiency_p:.3f}", "yes" if p.beats_null else "no", _fmt(p.agreement))  # fmt: skip
    Console().print(table)
    summary = Table("metric", "mean", "std", "min", "max", "n", title="over the prompt set")
    for metric in ("necessity_zero", "necessity_mean", "sufficiency_frozen_errors", "sufficiency_ablated_errors",
                   "agreement"):  # fmt: skip
        s = report.summary(metric)
        summary.add_row(metric, _fmt(s.mean), _fmt(s.std), _fmt(s.minimum), _fmt(s.maximum), str(s.n))
    Console().print(summary)
    console.print(f"mode: {report.mode}")
    console.print(f"circuit beats its null controls on {report.pass_fraction:.0%} of {len(report.prompts)} prompt(s)"
                  + (f"; {len(report.skipped)} prompt(s) skipped (no circuit feature active)" if report.skipped
                     else ""))  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add `validate` to the root `atlas` app."""
    app.command()(validate)
