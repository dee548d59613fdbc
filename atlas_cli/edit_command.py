"""`atlas edit`: a SHIFT-style edit of a feature set (ablate, scale or steer it at every position) measured on a
target prompt set and a control prompt set, printed, stored (an `(:Edit)` node and DuckDB rows) and saved as JSON.

    atlas edit --transcoders runs/demo/transcoders --feature 12/3 --target-task ioi --control-file other.txt
    atlas edit --transcoders DIR --top-k-from P1 --top-k 5 --target-id P1 --answer ' Mary' --control-task capitals
    atlas edit --transcoders DIR --apply edit.json                  # re-apply a saved edit to its own prompt sets

Neo4j comes from `NEO4J_URI` (+ `NEO4J_USER`, `NEO4J_PASSWORD`), else the managed server when it is running.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from atlas_cli.common import TRANSCODERS_HELP, console, fail, store_driver, transcoder_directory, user_errors


def _fmt(value: float | None, digits: str = "+.3f") -> str:
    return "—" if value is None or math.isnan(value) else format(value, digits)


def _finite_value(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def edit(
    source: Annotated[str, typer.Option("--transcoders", help=TRANSCODERS_HELP)],
    feature: Annotated[list[str] | None, typer.Option("--feature", help="Feature key or layer/index.")] = None,
    top_k_from: Annotated[str | None, typer.Option(help="Edit the top features of this stored prompt.")] = None,
    top_k: Annotated[int, typer.Option(min=1, max=1000, help="How many top features (--top-k-from).")] = 5,
    operation: Annotated[
        str | None, typer.Option(help="ablate (default), scale (by --value) or steer/set (to --value).")
    ] = None,
    value: Annotated[
        float | None, typer.Option(callback=_finite_value, help="The factor (scale) or activation (steer).")
    ] = None,
    target_id: Annotated[list[str] | None, typer.Option("--target-id", help="A stored target prompt.")] = None,
    target_task: Annotated[str | None, typer.Option(help="Every stored prompt of this task is a target.")] = None,
    target_file: Annotated[Path | None, typer.Option(help="Target prompts from a file (text, JSONL, Parquet).")] = None,
    answer: Annotated[str | None, typer.Option(help="The answer token of every target (else each one's own).")] = None,
    control_id: Annotated[list[str] | None, typer.Option("--control-id", help="A stored control prompt.")] = None,
    control_task: Annotated[str | None, typer.Option(help="Every stored prompt of this task is a control.")] = None,
    control_file: Annotated[Path | None, typer.Option(help="Control prompts from a file.")] = None,
    apply: Annotated[Path | None, typer.Option(help="Re-apply a saved edit (JSON from --save).")] = None,
    generations: Annotated[int, typer.Option(min=0, max=100, help="Target prompts to generate from.")] = 2,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=256, help="Tokens per generation.")] = 8,
    model: Annotated[str | None, typer.Option(help="Model to load (default: the prompts' model).")] = None,
    label: Annotated[str, typer.Option(help="A name for the edit.")] = "",
    store: Annotated[bool, typer.Option(help="Store the result (Neo4j + DuckDB).")] = True,
    save: Annotated[Path | None, typer.Option(help="Also save the edit and its results as JSON here.")] = None,
) -> None:
    """Edit a feature set on target and control prompts; print the effects, store and save the edit."""
    transcoders = transcoder_directory(source)
    from atlas.storage.queries import QueryError
    from ingest.edits import EditRequest, PromptSetSpec, identify_directory, load_from_directory, run_edit
    from ingest.validation import default_validations_path

    request = EditRequest(
        target=PromptSetSpec(list(target_id or []), target_task, target_file),
        control=PromptSetSpec(list(control_id or []), control_task, control_file),
        features=list(feature or []),
        top_k_from=top_k_from,
        top_k=top_k,
        operation=operation,
        value=value,
        answer=answer,
        apply=apply,
        n_generations=generations,
        max_new_tokens=max_new_tokens,
        label=label,
        store=store,
        save=save,
    )
    driver, database = store_driver()
    try:
        with driver, Progress(console=console, transient=True) as bar:
            task = bar.add_task("editing", total=None)
            report, record, resolved = run_edit(
                driver, database, request, load_from_directory(model, transcoders), identify_directory(transcoders),
                edits_path=default_validations_path(),
                progress=lambda i, n: bar.update(task, completed=i, total=n),
            )  # fmt: skip
    except (QueryError, *user_errors()) as err:  # type: ignore[misc]
        fail(err)
    show(report, record.properties, [p.prompt_id for p in resolved.target])
    if store:
        console.print(f"stored as {record.id}")
    if save is not None:
        console.print(f"saved to {save}")


def show(report: Any, summary: dict[str, Any], target_ids: list[str | None]) -> None:
    """The per-prompt effects, the summary and the generations."""
    from atlas.validation.edits import EditReport

    assert isinstance(report, EditReport)
    edit = report.edit
    what = f"{edit.operation}" + ("" if edit.operation == "ablate" else f" {edit.value:g}")
    table = Table("target prompt", "answer", "Δ logit", "Δ prob", "correct before", "after", "KL",
                  title=f"{what} of {len(edit.features)} feature(s) on the target set")  # fmt: skip
    for p, pid in zip(report.target, target_ids, strict=True):
        answer = repr(p.answer) if p.answer is not None else "—"
        table.add_row(pid or p.prompt, answer, _fmt(p.answer_logit_change), _fmt(p.answer_prob_change),
                      _yes(p.correct_before), _yes(p.correct_after), _fmt(p.kl, ".4f"))  # fmt: skip
    Console().print(table)
    effects = Table("measure", "value", title="effects")
    for name, text in (("target_logit_change", "target: mean Δ logit of the answer"),
                       ("target_prob_change", "target: mean Δ probability of the answer"),
                       ("accuracy_before", "target: accuracy before"), ("accuracy_after", "target: accuracy after"),
                       ("target_kl", "target: mean KL(clean ‖ edited)"),
                       ("control_kl", "control: mean KL(clean ‖ edited)"),
                       ("control_top1_agreement", "control: top-1 agreement")):  # fmt: skip
        effects.add_row(text, _fmt(summary.get(name), ".4f"))
    Console().print(effects)
    if report.generations:
        gens = Table("prompt", "before", "after", title="greedy generations")
        for prompt, before, after in report.generations:
            gens.add_row(prompt, repr(before), repr(after))
        Console().print(gens)
    console.print(f"mode: {report.mode}; {len(report.target)} target and {len(report.control)} control prompt(s)")


def _yes(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "no")


def register(app: typer.Typer) -> None:
    """Add `edit` to the root `atlas` app."""
    app.command()(edit)
