"""`atlas` commands of the core stages: models, corpora, transcoder training and inspection, attribution of one
prompt, and the managed Neo4j server. Each command imports what it needs inside its body.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from atlas.config import DEFAULT_MODEL, DEFAULT_TRAINING_RECIPE, DEFAULT_TRAINING_STEPS, TRAINING_RECIPE_NAMES
from atlas_cli.common import (
    TRANSCODERS_HELP,
    console,
    fail,
    store_driver,
    transcoder_directory,
    unit_fraction,
    user_errors,
)

model_app = typer.Typer(help="Load and inspect models.", no_args_is_help=True)
corpus_app = typer.Typer(help="Training corpora.", no_args_is_help=True)
transcoders_app = typer.Typer(help="Inspect saved transcoders.", no_args_is_help=True)
db_app = typer.Typer(help="The managed local Neo4j server (NEO4J_URI points elsewhere instead).", no_args_is_help=True)


@model_app.command("info")
def model_info(
    model: Annotated[str, typer.Option(help="Alias, tiny model, local dir or hub name.")] = DEFAULT_MODEL,
    prompt: str = "When Mary and John went to the store, John gave a drink to",
) -> None:
    """Load a model, print its sizes, load time and top next tokens for a prompt."""
    import torch

    from atlas.models import load_model

    try:
        loaded = load_model(model)
    except user_errors() as err:
        fail(err)
    info = loaded.info
    console.print(
        f"[bold]{info.name}[/] ({info.source}, {info.architecture}): {info.n_layers} layers, d_model "
        f"{info.d_model}, d_mlp {info.d_mlp}, vocab {info.vocab_size}; loaded in {loaded.load_seconds:.1f}s"
    )
    with torch.no_grad():
        probs = loaded.model(loaded.tokenize(prompt))[0, -1].softmax(-1)
    top = probs.topk(5)
    table = Table("token", "probability", title=f"next token after {prompt!r}")
    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        table.add_row(repr(loaded.tokenizer.decode([i])), f"{p:.3f}")
    Console().print(table)


@corpus_app.command("offline")
def corpus_offline() -> None:
    """Build (or locate) the offline English corpus from Debian's `fortunes` package and print its path."""
    from atlas.training.corpus import iter_documents, offline_corpus_path

    try:
        path = offline_corpus_path()
    except user_errors() as err:
        fail(err)
    n_docs = sum(1 for _ in iter_documents(path))
    print(path)
    console.print(f"{n_docs} documents, {path.stat().st_size / 1e6:.1f} MB")


def train(
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints, metrics, final transcoders.")],
    model: Annotated[str, typer.Option(help="Model to train on.")] = DEFAULT_MODEL,
    recipe: Annotated[str, typer.Option(help="Starting settings: " + " | ".join(TRAINING_RECIPE_NAMES))] = (
        DEFAULT_TRAINING_RECIPE
    ),
    corpus: Annotated[str, typer.Option(help="offline | FILE.txt/.jsonl/.parquet | hf:DATASET")] = "offline",
    text_field: Annotated[str, typer.Option(help="JSONL/Parquet field holding the text.")] = "text",
    kind: Annotated[str | None, typer.Option(help="clt (cross-layer) or plt (per-layer). [recipe]")] = None,
    features: Annotated[int | None, typer.Option(min=1, help="Features per layer. [recipe]")] = None,
    activation: Annotated[str | None, typer.Option(help="jumprelu | relu | topk [recipe]")] = None,
    topk: Annotated[int | None, typer.Option(min=1, help="k for --activation topk.")] = None,
    skip: Annotated[bool | None, typer.Option(help="Add a linear skip connection. [recipe]")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps (default 200 unless --cpu-minutes).")] = (
        None
    ),
    cpu_minutes: Annotated[
        float | None, typer.Option(min=0.1, help="Instead of --steps: train for this much CPU time (core-minutes).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Tokens per training step. [recipe]")] = None,
    context_length: Annotated[int, typer.Option(min=2, help="Tokens per sequence, BOS included.")] = 64,
    chunk_sequences: Annotated[int | None, typer.Option(min=1, help="Sequences per shuffle chunk. [recipe]")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="Default: 2e-4/√(features/16384).")] = None,
    sparsity_lambda: Annotated[float | None, typer.Option(min=0.0, help="Final sparsity coefficient λ. [recipe]")] = (
        None
    ),
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 50,
    log_every: Annotated[int, typer.Option(min=1, help="Steps between logged metrics.")] = 10,
    seed: Annotated[int, typer.Option(min=0, help="Seed of initialisation and shuffling.")] = 0,
    fresh: Annotated[bool, typer.Option(help="Discard checkpoints in --out instead of resuming.")] = False,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this saved dictionary (same kind and size), e.g. the base model's.")
    ] = None,
) -> None:
    """Train transcoders with a live progress bar; resumes from the last checkpoint in --out.

    Options marked [recipe] default to the chosen --recipe's value."""
    from atlas.training.recipes import recipe_config

    if steps is not None and cpu_minutes is not None:
        raise typer.BadParameter("give --steps or --cpu-minutes, not both")
    chosen = {"kind": kind, "n_features": features, "activation": activation, "topk": topk, "skip": skip,
              "lr": lr, "sparsity_lambda": sparsity_lambda}  # fmt: skip
    stream = {"corpus": corpus, "text_field": text_field, "context_length": context_length,
              "batch_size": batch_size, "chunk_sequences": chunk_sequences, "seed": seed}  # fmt: skip
    try:
        config = recipe_config(
            recipe,
            steps=None if cpu_minutes is not None else (steps or DEFAULT_TRAINING_STEPS),
            cpu_budget_s=None if cpu_minutes is None else cpu_minutes * 60,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            stream={k: v for k, v in stream.items() if v is not None},
            **{k: v for k, v in chosen.items() if v is not None},
        )
        config.spec(n_layers=1, d_model=1)  # validates kind/activation/topk before the model loads
        result = run_training(out=out, model=model, config=config, fresh=fresh, init_from=init_from)
    except user_errors() as err:
        fail(err)
    print_metrics(result.final_metrics)
    console.print(f"transcoders: {result.transcoder_dir}")


def run_training(*, out: Path, model: str, config: Any, fresh: bool, init_from: Path | None = None) -> Any:
    """Load the model and train `config` (a `TrainConfig`) with a rich progress bar. Returns a `TrainResult`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from atlas.models import load_model
    from atlas.training.trainer import Trainer

    with console.status(f"loading {model}…"):
        loaded = load_model(model)
    console.print(f"{loaded.info.name}: {loaded.info.n_layers} layers, loaded in {loaded.load_seconds:.1f}s")
    initial = None
    if init_from is not None:
        from atlas.transcoders import load_transcoder

        initial = load_transcoder(init_from)
    trainer = Trainer(loaded, config, out, init_from=initial)
    start_step = 0 if fresh else trainer.resume_step()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        # a CPU-budget run counts CPU seconds on its bar; a step run counts steps
        budget = config.cpu_budget_s
        total = config.steps if budget is None else round(budget)
        task = progress.add_task(f"train {config.kind}", total=total, completed=start_step if budget is None else 0,
                                 metrics="")  # fmt: skip

        def on_progress(record: dict[str, Any]) -> None:
            metrics = (
                f"loss {record['loss']:.3g} fvu {record['fvu_mean']:.3f} L0 {record['l0_total']:.1f}"
                f" dead {record['dead_fraction']:.1%} {record['tokens_per_second']:.0f} tok/s"
            )
            done = record["step"] if budget is None else min(total, round(record["cpu_seconds"]))
            progress.update(task, completed=done, metrics=metrics)
            if not console.is_terminal:
                where = f"{config.steps}" if budget is None else f"∞, CPU {record['cpu_seconds']:.0f}/{total} s"
                console.print(f"step {record['step']}/{where} {metrics}")

        return trainer.run(fresh=fresh, on_progress=on_progress)


def print_metrics(metrics: dict[str, Any]) -> None:
    table = Table("layer", "FVU", "L0", "dead", title="per-layer metrics (last logged batch)")
    for layer, (fvu, l0, dead) in enumerate(zip(metrics["fvu"], metrics["l0"], metrics["dead"], strict=True)):
        table.add_row(str(layer), f"{fvu:.3f}", f"{l0:.1f}", f"{dead:.1%}")
    Console().print(table)
    Console().print(
        f"steps {metrics['steps']}, tokens {metrics['tokens']}: mean FVU {metrics['fvu_mean']:.3f}, total L0"
        f" {metrics['l0_total']:.1f}, dead {metrics['dead_fraction']:.1%}; next-token CE clean"
        f" {metrics['ce_clean']:.3f} → spliced {metrics['ce_spliced']:.3f} (Δ {metrics['ce_delta']:+.3f} nats)"
    )


@transcoders_app.command("info")
def transcoders_info(source: Annotated[str, typer.Argument(help=TRANSCODERS_HELP)]) -> None:
    """Describe a saved transcoder directory (ours or circuit-tracer's) and its training metrics."""
    from atlas.transcoders.io import describe, read_metadata

    directory = transcoder_directory(source)
    try:
        console.print(describe(directory))
        metrics = read_metadata(directory).get("metrics")
    except user_errors() as err:
        fail(err)
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))


@transcoders_app.command("eval")
def transcoders_eval(
    source: Annotated[str, typer.Argument(help=TRANSCODERS_HELP)],
    model: Annotated[str, typer.Option(help="Model the transcoders were trained on.")] = DEFAULT_MODEL,
    corpus: Annotated[str, typer.Option(help="Evaluation text (held-out sequences of it are used).")] = "offline",
    sequences: Annotated[int, typer.Option(min=1, help="Held-out sequences to evaluate on.")] = 8,
    context_length: Annotated[int, typer.Option(min=2, help="Tokens per sequence, BOS included.")] = 64,
) -> None:
    """Next-token loss of the model with every MLP replaced by these transcoders (spliced CE)."""
    from atlas.models import load_model
    from atlas.training.activations import ActivationStream, StreamConfig
    from atlas.training.splicing import spliced_cross_entropy
    from atlas.transcoders import load_transcoder

    directory = transcoder_directory(source)
    try:
        transcoder = load_transcoder(directory)
        loaded = load_model(model)
        stream = ActivationStream(
            loaded,
            StreamConfig(corpus=corpus, context_length=context_length, eval_sequences=sequences),
            input_hook=transcoder.spec.input_hook,
            output_hook=transcoder.spec.output_hook,
        )
        result = spliced_cross_entropy(loaded, transcoder, stream.evaluation_tokens())
    except user_errors() as err:
        fail(err)
    print(
        f"clean CE {result.clean:.4f}, spliced CE {result.spliced:.4f}, delta {result.delta:+.4f} nats over "
        f"{result.n_tokens} tokens"
    )


def print_card(card: Any, *, title: str = "dictionary card") -> None:
    """The card as a two-column table, and its warning when it has one."""
    table = Table("figure", "value", title=title)
    for name, value in card.to_dict().items():
        table.add_row(name, "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    if (warning := card.warning()) is not None:
        console.print(f"[yellow]warning:[/] {warning}")


def measure_card(directory: Path, model_name: str, *, sequences: int = 8, context_length: int = 64,
                 max_feature_nodes: int = 256, write: bool = True) -> Any:  # fmt: skip
    """Evaluate the dictionary in `directory` on `model_name` (`atlas.attribution.quality`) and merge the figures into
    its card in atlas.json (`write`); returns the whole card."""
    from atlas.attribution.quality import evaluate_dictionary
    from atlas.models import load_model
    from atlas.training.activations import ActivationStream, StreamConfig
    from atlas.transcoders import load_transcoder
    from atlas.transcoders.card import read_card, write_card

    transcoder = load_transcoder(directory)
    with console.status(f"loading {model_name}…"):
        loaded = load_model(model_name)
    stream = ActivationStream(
        loaded,
        StreamConfig(corpus="offline", context_length=context_length, eval_sequences=sequences),
        input_hook=transcoder.spec.input_hook,
        output_hook=transcoder.spec.output_hook,
    )
    measured = evaluate_dictionary(loaded, transcoder, eval_tokens=stream.evaluation_tokens(),
                                   max_feature_nodes=max_feature_nodes, transcoder_dir=str(directory))  # fmt: skip
    if write:
        write_card(directory, measured)
    return read_card(directory).merged(measured)


@transcoders_app.command("card")
def transcoders_card(
    source: Annotated[str, typer.Argument(help=TRANSCODERS_HELP)],
    model: Annotated[str, typer.Option(help="Model the transcoders were trained on.")] = DEFAULT_MODEL,
    sequences: Annotated[int, typer.Option(min=1, help="Held-out sequences for the spliced CE.")] = 8,
    context_length: Annotated[int, typer.Option(min=2, help="Tokens per sequence, BOS included.")] = 64,
    max_feature_nodes: Annotated[int, typer.Option(min=1, help="Feature-node cap of the evaluation graphs.")] = 256,
    write: Annotated[bool, typer.Option(help="Merge the figures into the directory's atlas.json card.")] = True,
) -> None:
    """Measure a dictionary's card: held-out FVU, L0, dead share, spliced CE delta, and the mean replacement and
    completeness scores of 16 evaluation prompts' graphs; write it beside the weights (a published dictionary's
    cache is never written)."""
    from atlas.transcoders.hub import is_hub_ref

    directory = transcoder_directory(source)
    write = write and not is_hub_ref(source)
    try:
        card = measure_card(directory, model, sequences=sequences, context_length=context_length,
                            max_feature_nodes=max_feature_nodes, write=write)  # fmt: skip
    except user_errors() as err:
        fail(err)
    print_card(card, title=f"dictionary card of {source} on {model}")
    if write:
        console.print(f"card written to {directory / 'atlas.json'}")


def attribute(
    prompt: Annotated[str, typer.Option(help="Text to attribute (BOS is prepended).")],
    transcoders: Annotated[str, typer.Option(help=TRANSCODERS_HELP)],
    model: Annotated[str, typer.Option(help="Model the transcoders belong to.")] = DEFAULT_MODEL,
    target: Annotated[list[str] | None, typer.Option(help="Target token (repeatable); default: top logits.")] = None,
    position: Annotated[int, typer.Option(help="Position the targets are read at (-1: last).")] = -1,
    max_feature_nodes: Annotated[
        int | None, typer.Option(min=1, help="Cap on feature nodes (influence order).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Targets per backward pass.")] = 32,
    node_threshold: Annotated[
        float, typer.Option(callback=unit_fraction, help="Node influence kept, in (0, 1].")
    ] = 0.8,
    edge_threshold: Annotated[
        float, typer.Option(callback=unit_fraction, help="Edge influence kept, in (0, 1].")
    ] = 0.98,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write circuit-tracer graph JSON here.")] = None,
    parquet_out: Annotated[Path | None, typer.Option("--parquet", help="Write nodes/edges Parquet here.")] = None,
) -> None:
    """Build, prune and export one prompt's attribution graph."""
    from atlas.attribution.engine import AttributionConfig
    from atlas.attribution.engine import attribute as run_attribution
    from atlas.attribution.export import prune_graph, write_circuit_tracer_json, write_parquet
    from atlas.attribution.targets import token_targets
    from atlas.models import load_model
    from atlas.transcoders import load_transcoder

    transcoder_dir = transcoder_directory(transcoders)
    try:
        transcoder = load_transcoder(transcoder_dir)
        with console.status(f"loading {model}…"):
            loaded = load_model(model)
        n_pos = loaded.tokenize(prompt).shape[1]
        targets = (
            token_targets(target, loaded.model.W_U.detach(), loaded.tokenizer, position % n_pos) if target else None
        )
        config = AttributionConfig(max_feature_nodes=max_feature_nodes, batch_size=batch_size)
        with console.status("attributing…"):
            graph = run_attribution(
                loaded, transcoder, prompt, targets=targets, config=config, transcoder_id=str(transcoder_dir.resolve())
            )
            pruned = prune_graph(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    except user_errors() as err:
        fail(err)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in graph.settings["timings"].items())
    console.print(
        f"{graph.index.n_features} feature nodes ({graph.folded_features['n_folded_into_errors']} more folded into"
        f" errors), {graph.edges.weight.numel()} edges; pruned to {pruned.n_nodes} nodes / {pruned.n_edges} edges"
        f" ({timings})"
    )
    console.print(
        f"replacement {pruned.scores_unpruned.replacement:.3f} → {pruned.scores_pruned.replacement:.3f},"
        f" completeness {pruned.scores_unpruned.completeness:.3f} → {pruned.scores_pruned.completeness:.3f}"
    )
    table = Table("target", "position", "weight", title="targets")
    for node, weight in zip(graph.index.logits, graph.target_probabilities.tolist(), strict=True):
        table.add_row(repr(node.label), str(node.position), f"{weight:.3f}")
    Console().print(table)
    if json_out:
        console.print(f"graph JSON: {write_circuit_tracer_json(pruned, json_out, slug=json_out.stem)}")
    if parquet_out:
        console.print(f"Parquet: {', '.join(str(p) for p in write_parquet(pruned, parquet_out))}")


@db_app.command("start")
def db_start(
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Bolt port (default: a free one).")] = None,
) -> None:
    """Install (first time) and start a loopback-only Neo4j Community server; auth on, password in a 0600 file."""
    from atlas.storage.neo4j_server import LocalNeo4jServer, Neo4jServerError

    server = LocalNeo4jServer()
    try:
        with console.status("installing Neo4j from Maven Central (first time only)…"):
            server.install()
        with console.status("starting Neo4j…"):
            connection = server.start(port=port)
    except Neo4jServerError as err:
        fail(err)
    console.print(f"Neo4j running at {connection.uri} (user {connection.user}; password in {server.password_file})")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the managed server (no-op when it is not running)."""
    from atlas.storage.neo4j_server import LocalNeo4jServer

    console.print("stopped" if LocalNeo4jServer().stop() else "not running")


@db_app.command("status")
def db_status() -> None:
    """Print the managed server's state as JSON; exit 3 when it is not running."""
    from atlas.storage.neo4j_server import LocalNeo4jServer

    state = LocalNeo4jServer().status()
    print(json.dumps(state, indent=2, default=str))
    if not state.get("running"):
        raise typer.Exit(code=3)


@db_app.command("migrate")
def db_migrate(
    transcoders: Annotated[
        list[Path] | None,
        typer.Option(
            "--transcoders",
            "-t",
            help="A transcoder directory whose stored ids to bring to the weights "
            "rule (repeat for each copy or dictionary).",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    mapping: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            help="OLD_ID=DIR: the stored legacy id OLD_ID is the dictionary in DIR (when the "
            "directory it was ingested from is gone or was re-saved since).",
        ),
    ] = None,
    stats_db: Annotated[Path | None, typer.Option(help="Feature statistics DuckDB (default: the store's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Upgrade the store's schema; with --transcoders, re-key those dictionaries by their weights and merge copies.

    Idempotent. Stop ingests while it runs: it moves prompts and rebuilds the aggregate layer of merged dictionaries.
    """
    from atlas.config import stats_db_path
    from ingest.migrate import legacy_ids, migrate_identities

    explicit: dict[str, str] = {}
    for item in mapping or []:
        old, sep, directory = item.partition("=")
        if not sep or not old or not Path(directory).is_dir():
            raise typer.BadParameter(f"--map wants OLD_ID=DIR with an existing DIR, got {item!r}")
        explicit[old] = directory
    driver, database = store_driver(start=True)
    try:
        report = migrate_identities(driver, transcoders or [], database=database,
                                    stats_db=stats_db or stats_db_path(), explicit=explicit)  # fmt: skip
        left = legacy_ids(driver, database)
    except user_errors() as err:
        fail(err)
    finally:
        driver.close()
    if as_json:
        print(json.dumps(report.to_json(), indent=2, default=str))
        return
    for directory, ident in report.dictionaries.items():
        console.print(f"{directory}: [bold]{ident['id']}[/] (was {ident['legacy_id']}; hashed in {ident['seconds']} s)")
    graph = report.graph
    console.print(
        f"merged {graph.transcoders_merged} stored id(s): {graph.prompts_moved} prompts moved, "
        f"{graph.prompts_deduplicated} duplicate prompts removed, {graph.features_rekeyed} features re-keyed, "
        f"{graph.features_merged} merged; aggregates rebuilt for {graph.aggregates_rebuilt or 'none'}"
    )
    if report.stats:
        console.print("statistics: " + ", ".join(f"{sid} {action}" for sid, action in sorted(report.stats.items())))
    if "inexact" in report.stats.values():
        console.print("[yellow]some statistics overlapped only in part and were dropped; re-ingest to recount[/]")
    if left:
        console.print(f"[yellow]still keyed by path (pass their directories with --transcoders or --map):[/] {left}")


def register(app: typer.Typer) -> None:
    """Add these commands and command groups to the root `atlas` app."""
    app.add_typer(model_app, name="model")
    app.add_typer(corpus_app, name="corpus")
    app.add_typer(transcoders_app, name="transcoders")
    app.add_typer(db_app, name="db")
    app.command()(train)
    app.command()(attribute)
