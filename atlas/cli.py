"""The `atlas` command line: model, corpus, transcoder training and inspection sub-commands.

Heavy libraries (torch, transformers) are imported inside commands so `atlas --help` stays instant.
Errors the user can fix are printed as one readable line and exit with status 2; no traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from atlas.config import DEFAULT_MODEL

app = typer.Typer(help="circuit-atlas: attribution graphs of language models at corpus scale.", no_args_is_help=True)
model_app = typer.Typer(help="Load and inspect models.", no_args_is_help=True)
corpus_app = typer.Typer(help="Training corpora.", no_args_is_help=True)
transcoders_app = typer.Typer(help="Inspect saved transcoders.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(corpus_app, name="corpus")
app.add_typer(transcoders_app, name="transcoders")
db_app = typer.Typer(help="The managed local Neo4j server (NEO4J_URI points elsewhere instead).", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from atlas.models.loading import ModelLoadError
    from atlas.training.corpus import CorpusError
    from atlas.training.trainer import TrainingError
    from atlas.transcoders import TranscoderFormatError, TranscoderShapeError

    return (
        ModelLoadError,
        CorpusError,
        TrainingError,
        TranscoderFormatError,
        TranscoderShapeError,
        ValueError,
    )


def _fail(err: BaseException) -> NoReturn:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every phase.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")


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
    except _user_errors() as err:
        _fail(err)
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
    except _user_errors() as err:
        _fail(err)
    n_docs = sum(1 for _ in iter_documents(path))
    print(path)
    console.print(f"{n_docs} documents, {path.stat().st_size / 1e6:.1f} MB")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints, metrics, final transcoders.")],
    model: Annotated[str, typer.Option(help="Model to train on.")] = DEFAULT_MODEL,
    corpus: Annotated[str, typer.Option(help="offline | FILE.txt/.jsonl/.parquet | hf:DATASET")] = "offline",
    text_field: Annotated[str, typer.Option(help="JSONL/Parquet field holding the text.")] = "text",
    kind: Annotated[str, typer.Option(help="clt (cross-layer) or plt (per-layer).")] = "clt",
    features: Annotated[int, typer.Option(help="Features per layer.")] = 128,
    activation: Annotated[str, typer.Option(help="jumprelu | relu | topk")] = "jumprelu",
    topk: Annotated[int | None, typer.Option(help="k for --activation topk.")] = None,
    skip: Annotated[bool, typer.Option(help="Add a linear skip connection.")] = False,
    steps: int = 200,
    batch_size: Annotated[int, typer.Option(help="Tokens per training step.")] = 256,
    context_length: int = 64,
    chunk_sequences: Annotated[int, typer.Option(help="Sequences per shuffle chunk.")] = 64,
    lr: Annotated[float | None, typer.Option(help="Default: 2e-4/√(features/16384).")] = None,
    sparsity_lambda: float = 1.0,
    checkpoint_every: int = 50,
    log_every: int = 10,
    seed: int = 0,
    fresh: Annotated[bool, typer.Option(help="Discard checkpoints in --out instead of resuming.")] = False,
) -> None:
    """Train transcoders with a live progress bar; resumes from the last checkpoint in --out."""
    from atlas.training.activations import StreamConfig
    from atlas.training.trainer import TrainConfig

    try:
        stream = StreamConfig(
            corpus=corpus,
            text_field=text_field,
            context_length=context_length,
            batch_size=batch_size,
            chunk_sequences=chunk_sequences,
            seed=seed,
        )
        config = TrainConfig(
            kind=kind,  # type: ignore[arg-type]
            n_features=features,
            activation=activation,
            topk=topk,
            skip=skip,
            steps=steps,
            lr=lr,
            sparsity_lambda=sparsity_lambda,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            stream=stream,
        )
        config.spec(n_layers=1, d_model=1)  # validates kind/activation/topk before the model loads
        result = run_training(out=out, model=model, config=config, fresh=fresh)
    except _user_errors() as err:
        _fail(err)
    print_metrics(result.final_metrics)
    console.print(f"transcoders: {result.transcoder_dir}")


def run_training(*, out: Path, model: str, config: Any, fresh: bool) -> Any:
    """Load the model and train `config` (a `TrainConfig`) with a rich progress bar. Returns a `TrainResult`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from atlas.models import load_model
    from atlas.training.trainer import Trainer

    with console.status(f"loading {model}…"):
        loaded = load_model(model)
    console.print(f"{loaded.info.name}: {loaded.info.n_layers} layers, loaded in {loaded.load_seconds:.1f}s")
    trainer = Trainer(loaded, config, out)
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
        task = progress.add_task(f"train {config.kind}", total=config.steps, completed=start_step, metrics="")

        def on_progress(record: dict[str, Any]) -> None:
            metrics = (
                f"loss {record['loss']:.3g} fvu {record['fvu_mean']:.3f} L0 {record['l0_total']:.1f}"
                f" dead {record['dead_fraction']:.1%} {record['tokens_per_second']:.0f} tok/s"
            )
            progress.update(task, completed=record["step"], metrics=metrics)
            if not console.is_terminal:
                console.print(f"step {record['step']}/{config.steps} {metrics}")

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
def transcoders_info(directory: Path) -> None:
    """Describe a saved transcoder directory (ours or circuit-tracer's) and its training metrics."""
    from atlas.transcoders.io import describe, read_metadata

    try:
        console.print(describe(directory))
        metrics = read_metadata(directory).get("metrics")
    except _user_errors() as err:
        _fail(err)
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))


@transcoders_app.command("eval")
def transcoders_eval(
    directory: Path,
    model: Annotated[str, typer.Option(help="Model the transcoders were trained on.")] = DEFAULT_MODEL,
    corpus: Annotated[str, typer.Option(help="Evaluation text (held-out sequences of it are used).")] = "offline",
    sequences: int = 8,
    context_length: int = 64,
) -> None:
    """Next-token loss of the model with every MLP replaced by these transcoders (spliced CE)."""
    from atlas.models import load_model
    from atlas.training.activations import ActivationStream, StreamConfig
    from atlas.training.splicing import spliced_cross_entropy
    from atlas.transcoders import load_transcoder

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
    except _user_errors() as err:
        _fail(err)
    print(
        f"clean CE {result.clean:.4f}, spliced CE {result.spliced:.4f}, delta {result.delta:+.4f} nats over "
        f"{result.n_tokens} tokens"
    )


@app.command()
def attribute(
    prompt: Annotated[str, typer.Option(help="Text to attribute (BOS is prepended).")],
    transcoders: Annotated[Path, typer.Option(help="Transcoder directory (circuit-tracer format).")],
    model: Annotated[str, typer.Option(help="Model the transcoders belong to.")] = DEFAULT_MODEL,
    target: Annotated[list[str] | None, typer.Option(help="Target token (repeatable); default: top logits.")] = None,
    position: Annotated[int, typer.Option(help="Position the targets are read at (-1: last).")] = -1,
    max_feature_nodes: Annotated[int | None, typer.Option(help="Cap on feature nodes (influence order).")] = None,
    batch_size: int = 32,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
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

    try:
        transcoder = load_transcoder(transcoders)
        with console.status(f"loading {model}…"):
            loaded = load_model(model)
        n_pos = loaded.tokenize(prompt).shape[1]
        targets = (
            token_targets(target, loaded.model.W_U.detach(), loaded.tokenizer, position % n_pos) if target else None
        )
        config = AttributionConfig(max_feature_nodes=max_feature_nodes, batch_size=batch_size)
        with console.status("attributing…"):
            graph = run_attribution(
                loaded, transcoder, prompt, targets=targets, config=config, transcoder_id=str(transcoders.resolve())
            )
            pruned = prune_graph(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    except _user_errors() as err:
        _fail(err)
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
def db_start(port: Annotated[int | None, typer.Option(help="Bolt port (default: a free one).")] = None) -> None:
    """Install (first time) and start a loopback-only Neo4j Community server; auth on, password in a 0600 file."""
    from atlas.storage.neo4j_server import LocalNeo4jServer, Neo4jServerError

    server = LocalNeo4jServer()
    try:
        with console.status("installing Neo4j from Maven Central (first time only)…"):
            server.install()
        with console.status("starting Neo4j…"):
            connection = server.start(port=port)
    except Neo4jServerError as err:
        _fail(err)
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


def _ingest_errors() -> tuple[type[BaseException], ...]:
    from atlas.storage.neo4j_server import Neo4jServerError
    from ingest.pipeline import IngestError

    return (*_user_errors(), IngestError, Neo4jServerError)


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


@app.command()
def ingest(
    corpus: Annotated[Path, typer.Option(help="Prompts: .txt (one per line), .jsonl or .parquet.")],
    transcoders: Annotated[Path, typer.Option(help="Transcoder directory (circuit-tracer format).")],
    model: Annotated[str, typer.Option(help="Model the transcoders belong to.")] = DEFAULT_MODEL,
    workers: Annotated[int | None, typer.Option(help="LocalCluster processes (default: sized to the machine).")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster).")
    ] = None,
    targets: Annotated[list[str] | None, typer.Option(help="salient (default) | answer | a token; repeatable.")] = None,
    max_feature_nodes: Annotated[int | None, typer.Option(help="Cap on feature nodes per graph.")] = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    run: Annotated[str | None, typer.Option(help="Run name (directory under the runs root).")] = None,
    text_field: Annotated[str, typer.Option(help="JSONL/Parquet field holding the prompt.")] = "text",
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB statistics file (default: $ATLAS_STATS_DB).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per Dask task (default: balanced).")] = None,
    retries: Annotated[int, typer.Option(help="Dask retries of a failed task.")] = 2,
    gpu: Annotated[bool, typer.Option(help="Tasks need the worker resource GPU=1.")] = False,
    runs_root: Annotated[Path | None, typer.Option(help="Root of run directories (default: $ATLAS_RUNS_DIR).")] = None,
) -> None:
    """Attribute every prompt of a corpus on Dask and load graphs into Neo4j, statistics into DuckDB (resumable)."""
    from ingest.pipeline import IngestOptions
    from ingest.settings import AttributionSettings

    try:
        settings = AttributionSettings(
            targets=tuple(targets) if targets else AttributionSettings().targets,
            max_feature_nodes=max_feature_nodes,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
        )
        options = IngestOptions(corpus=corpus, transcoders=transcoders, model=model, settings=settings,
                                workers=workers, scheduler=scheduler, run=run, text_field=text_field,
                                stats_db=stats_db, runs_root=runs_root, batch_prompts=batch_size, retries=retries,
                                gpu=gpu)  # fmt: skip
        run_ingest_command(options)
    except _ingest_errors() as err:
        _fail(err)


@app.command("app")
def app_command(
    port: Annotated[int, typer.Option(help="Port the app serves on (loopback and LAN, as Streamlit does).")] = 8501,
    neo4j_uri: Annotated[
        str | None, typer.Option(help="bolt:// or neo4j:// URI (default: NEO4J_URI, else the managed local server).")
    ] = None,
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB feature statistics (default: managed store).")] = None,
    model: Annotated[str | None, typer.Option(help="Model for interventions (default: each prompt's model).")] = None,
    transcoders: Annotated[Path | None, typer.Option(help="Transcoder directory for interventions.")] = None,
) -> None:
    """Open the Streamlit atlas app: overview, features, prompt graphs, paths, Cypher console, interventions."""
    import importlib.util
    import os

    from app.config import ConfigError, environment_for, load_config

    settings = environment_for(neo4j_uri=neo4j_uri, stats_db=stats_db, model=model, transcoders=transcoders)
    env = {**os.environ, **settings}
    try:
        load_config(env)
    except ConfigError as err:
        _fail(err)
    spec = importlib.util.find_spec("app")
    if spec is None or not spec.submodule_search_locations:
        _fail(RuntimeError("the `app` package is not installed with circuit-atlas"))
    script = Path(next(iter(spec.submodule_search_locations))) / "main.py"
    argv = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port), "--server.headless",
            "true", "--browser.gatherUsageStats", "false", "--client.showErrorDetails", "none",
            "--client.toolbarMode", "minimal"]  # fmt: skip
    console.print(f"atlas app on http://localhost:{port}")
    os.execve(sys.executable, argv, env)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo run goes.")] = Path("runs/demo"),
    steps: int = 100,
    features: int = 64,
    prompts: Annotated[int, typer.Option(help="Demo-corpus prompts to ingest (spread over the tasks; 0: all).")] = 24,
    workers: Annotated[int | None, typer.Option(help="Dask workers for the ingest.")] = None,
    max_feature_nodes: Annotated[int, typer.Option(help="Cap on feature nodes per demo graph.")] = 256,
) -> None:
    """Train (or reuse) a small CLT on the default model, ingest the demo corpus, print where to explore it."""
    from atlas.training.activations import StreamConfig
    from atlas.training.trainer import TRANSCODER_DIR, TrainConfig
    from ingest.demo_corpus import demo_subset
    from ingest.pipeline import IngestOptions
    from ingest.settings import AttributionSettings

    transcoder_dir = out / TRANSCODER_DIR
    try:
        if (transcoder_dir / "config.yaml").is_file():
            console.print(f"reusing the transcoders in {transcoder_dir} (delete them to train again)")
        else:
            config = TrainConfig(
                kind="clt",
                n_features=features,
                steps=steps,
                checkpoint_every=25,
                log_every=5,
                stream=StreamConfig(chunk_sequences=32),
            )
            result = run_training(out=out, model=DEFAULT_MODEL, config=config, fresh=False)
            print_metrics(result.final_metrics)
            transcoder_dir = result.transcoder_dir
            console.print(f"transcoders saved in circuit-tracer format: {transcoder_dir}")
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
    except _ingest_errors() as err:
        _fail(err)
    console.print(
        f"[bold green]demo ready[/]: {report.done} prompt graphs in Neo4j at {report.neo4j_uri} (managed server: "
        f"`atlas db status`), feature statistics in {report.stats_db}. Explore them with `atlas app`."
    )


if __name__ == "__main__":
    sys.exit(app())
