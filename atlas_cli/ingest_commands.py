"""`atlas ingest` and `atlas demo`: the Dask ingest of a corpus into Neo4j and DuckDB, and the demo that trains a small
CLT on the default model first. Sits above `ingest`, which it drives; imports heavy modules inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from atlas.config import DEFAULT_MODEL, DEMO_CPU_MINUTES, DEMO_TRAINING_RECIPE, TRAINING_RECIPE_NAMES
from atlas_cli.common import TRANSCODERS_HELP, console, fail, transcoder_directory, unit_fraction, user_errors
from atlas_cli.core import measure_card, print_card, print_metrics, run_training


def _ingest_errors() -> tuple[type[BaseException], ...]:
    from atlas.storage.neo4j_server import Neo4jServerError
    from ingest.pipeline import IngestError

    return (*user_errors(), IngestError, Neo4jServerError)


def run_ingest_command(options: Any) -> Any:
    """Run `ingest.pipeline.run_ingest(options)` and print its final report (counts, per-phase timings)."""
    from ingest.pipeline import run_ingest

    report = run_ingest(options, console=console)
    table = Table("", "count", title=f"ingest {report.run}")
    for name in ("corpus_lines", "prompts", "duplicates", "already_stored", "resumed_from_shards", "computed",
                 "input_failures", "prompt_failures", "task_failures", "skipped_known_failures", "nodes_written",
                 "edges_written", "neo4j_retries"):  # fmt: skip
        table.add_row(name.replace("_", " "), str(getattr(report, name)))
    Console().print(table)
    Console().print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
    if report.worker_timings:
        Console().print("worker time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.worker_timings.items()))
    for failure in report.failures[:5]:
        console.print(f"[yellow]failed[/] {failure}")
    console.print(f"report: {report.run_dir}/report.json; statistics: {report.stats_db}; graphs: {report.neo4j_uri}")
    return report


def ingest(
    corpus: Annotated[Path, typer.Option(help="Prompts: .txt (one per line), .jsonl or .parquet.")],
    transcoders: Annotated[str, typer.Option(help=TRANSCODERS_HELP)],
    model: Annotated[str, typer.Option(help="Model the transcoders belong to.")] = DEFAULT_MODEL,
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="LocalCluster processes (default: sized to the machine; 0: in this process, no Dask)"),
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster).")
    ] = None,
    targets: Annotated[list[str] | None, typer.Option(help="salient (default) | answer | a token; repeatable.")] = None,
    max_feature_nodes: Annotated[int | None, typer.Option(min=1, help="Cap on feature nodes per graph.")] = None,
    node_threshold: Annotated[
        float, typer.Option(callback=unit_fraction, help="Node influence kept, in (0, 1].")
    ] = 0.8,
    edge_threshold: Annotated[
        float, typer.Option(callback=unit_fraction, help="Edge influence kept, in (0, 1].")
    ] = 0.98,
    run: Annotated[str | None, typer.Option(help="Run name (directory under the runs root).")] = None,
    text_field: Annotated[str, typer.Option(help="JSONL/Parquet field holding the prompt.")] = "text",
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB statistics file (default: $ATLAS_STATS_DB).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Prompts per Dask task (default: balanced).")] = None,
    retries: Annotated[int, typer.Option(min=0, help="Dask retries of a failed task.")] = 2,
    gpu: Annotated[bool, typer.Option(help="Tasks need the worker resource GPU=1.")] = False,
    runs_root: Annotated[Path | None, typer.Option(help="Root of run directories (default: $ATLAS_RUNS_DIR).")] = None,
) -> None:
    """Attribute every prompt of a corpus on Dask and load graphs into Neo4j, statistics into DuckDB (resumable)."""
    from ingest.preflight import INPUT_ERRORS, check_inputs

    transcoder_dir = transcoder_directory(transcoders)  # a published dictionary: through the Hugging Face cache
    try:  # milliseconds, before the pipeline's imports (seconds): a bad input is refused at once
        check_inputs(corpus, transcoder_dir, model)
    except INPUT_ERRORS as err:
        fail(err)
    from ingest.pipeline import IngestOptions
    from ingest.settings import AttributionSettings

    try:
        settings = AttributionSettings(
            targets=tuple(targets) if targets else AttributionSettings().targets,
            max_feature_nodes=max_feature_nodes,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
        )
        options = IngestOptions(corpus=corpus, transcoders=transcoder_dir, model=model, settings=settings,
                                workers=workers, scheduler=scheduler, run=run, text_field=text_field,
                                stats_db=stats_db, runs_root=runs_root, batch_prompts=batch_size, retries=retries,
                                gpu=gpu)  # fmt: skip
        run_ingest_command(options)
    except _ingest_errors() as err:
        fail(err)


def demo_training_config(recipe: str, steps: int | None, features: int | None, cpu_minutes: float | None) -> Any:
    """The demo's training settings: the named recipe for `steps`, or else for `cpu_minutes` of CPU time (default
    `DEMO_CPU_MINUTES`), with `features` per layer when given."""
    from atlas.training.recipes import recipe_config

    if steps is not None and cpu_minutes is not None:
        raise typer.BadParameter("give the demo's training a length by --steps or by --cpu-minutes, not both")
    length = {"steps": steps} if steps is not None else {"cpu_budget_s": (cpu_minutes or DEMO_CPU_MINUTES) * 60}
    width = {} if features is None else {"n_features": features}
    return recipe_config(recipe, checkpoint_every=25, log_every=5, **length, **width)


def demo(
    out: Annotated[Path, typer.Option(help="Where the demo run goes.")] = Path("runs/demo"),
    recipe: Annotated[
        str, typer.Option(help="The training recipe (" + " | ".join(TRAINING_RECIPE_NAMES) + ").")
    ] = DEMO_TRAINING_RECIPE,
    cpu_minutes: Annotated[
        float | None,
        typer.Option(min=0.1, help=f"Train for this much CPU time (core-minutes). [default: {DEMO_CPU_MINUTES:g}]"),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Train for this many steps instead of a CPU time.")] = None,
    features: Annotated[int | None, typer.Option(min=1, help="Features per layer (default: the recipe's).")] = None,
    prompts: Annotated[
        int, typer.Option(min=0, help="Demo-corpus prompts to ingest (spread over the tasks; 0: all).")
    ] = 24,
    workers: Annotated[int | None, typer.Option(min=0, help="Dask workers for the ingest (0: in this process).")] = (
        None
    ),
    max_feature_nodes: Annotated[int, typer.Option(min=1, help="Cap on feature nodes per demo graph.")] = 256,
    state_capitals: Annotated[
        bool, typer.Option(help="Also ingest the Dallas/state-capital set with the correct capital as target.")
    ] = True,
) -> None:
    """Train (or reuse) a dictionary on the default model (the `clt` recipe for 16 core-minutes of CPU time), ingest
    the demo corpus (and the state-capital set that the Dallas query needs), print where to explore it."""
    from atlas.training.trainer import TRANSCODER_DIR
    from ingest.demo_corpus import demo_subset, state_capital_prompts, state_capitals_path
    from ingest.pipeline import IngestOptions
    from ingest.settings import TARGET_ANSWER, AttributionSettings

    transcoder_dir = out / TRANSCODER_DIR
    try:
        if (transcoder_dir / "config.yaml").is_file():
            console.print(f"reusing the transcoders in {transcoder_dir} (delete them to train again)")
        else:
            config = demo_training_config(recipe, steps, features, cpu_minutes)
            result = run_training(out=out, model=DEFAULT_MODEL, config=config, fresh=False)
            print_metrics(result.final_metrics)
            transcoder_dir = result.transcoder_dir
            console.print(f"transcoders saved in circuit-tracer format: {transcoder_dir}")
        from atlas.transcoders.card import read_card

        if read_card(transcoder_dir).replacement_score is None:  # measured once per dictionary (about 30 s)
            console.print("measuring the dictionary card (held-out reconstruction, spliced CE, 16 graphs)…")
            print_card(measure_card(transcoder_dir, DEFAULT_MODEL, max_feature_nodes=max_feature_nodes))
        corpus = demo_subset(out / "demo_corpus.jsonl", prompts)
        report = run_ingest_command(
            IngestOptions(
                corpus=corpus,
                transcoders=transcoder_dir,
                model=DEFAULT_MODEL,
                workers=workers,
                run="demo",
                settings=AttributionSettings(max_feature_nodes=max_feature_nodes),
            )
        )
        done = report.done
        if state_capitals:
            # The default model gets these two-hop facts wrong, so the target is the record's correct answer (its
            # single token, e.g. " Austin"), whatever the model's top prediction is.
            done += run_ingest_command(
                IngestOptions(
                    corpus=state_capitals_path(),
                    transcoders=transcoder_dir,
                    model=DEFAULT_MODEL,
                    workers=workers,
                    run="demo-state-capitals",
                    settings=AttributionSettings(targets=(TARGET_ANSWER,), max_feature_nodes=max_feature_nodes),
                )
            ).done
    except _ingest_errors() as err:
        fail(err)
    console.print(
        f"[bold green]demo ready[/]: {done} prompt graphs in Neo4j at {report.neo4j_uri} (managed server: "
        f"`atlas db status`), feature statistics in {report.stats_db}. Explore them with `atlas app`."
    )
    if state_capitals:
        capitals = " ".join(f"--target {a!r}" for a in dict.fromkeys(p.answer for p in state_capital_prompts()))
        console.print(
            f"Paths from the features on ' Dallas' to capital logits: atlas paths --at-token ' Dallas' {capitals}"
        )


def register(app: typer.Typer) -> None:
    """Add `ingest` and `demo` to the root `atlas` app."""
    app.command()(ingest)
    app.command()(demo)
