"""`run_ingest`: a prompt corpus in, attribution graphs in Neo4j and feature statistics in DuckDB out.

Phases (each timed; the timings go into the report):
1. check: the transcoder directory's config and weight-file headers, and their fit to the model (layer count, width,
   the model they record being trained on), without loading either (`atlas.transcoders.checks`, milliseconds): a
   mismatched or corrupt dictionary (or a missing corpus) is refused before anything is started or created
   (`ingest.preflight`);
2. read: the corpus is read and normalised, each prompt gets its id (`ingest.prompts`); unusable lines are recorded;
3. connect: Neo4j (`NEO4J_URI`, else the managed local server) and the prompts it already has are skipped, as are
   prompts the ledger records as failing deterministically;
4. resume: complete shards left in the run directory by an interrupted run are loaded instead of recomputed;
5. compute + load: a Dask cluster (a `LocalCluster` sized to the machine, or any scheduler address; `workers=0`:
   the same tasks called in this process, without Dask) runs
   `compute_batch` on batches of prompts with `retries`; the client loads each finished shard while the workers go
   on (`as_completed`), with a live progress bar;
6. logit effects + statistics: the transcoders' logit effects are written beside the statistics whenever the
   statistics database lacks them and the run has prompts of these transcoders, however they got to the stores
   (computed, resumed from shards, or already stored), so a rerun leaves the same tables as a clean run;
   when the statistics hold global weights of the dictionary, the workers also accumulate co-activations of their
   pairs and the shards of the run directory are merged into TWERA/ERA (`ingest.coactivation`);
7. report: counts and timings, printed and written to `<run dir>/report.json`.

Everything the run leaves is in its run directory (`shards/`, `ledger.jsonl`, `report.json`); the stores are the
source of truth for what is done, so killing the run at any point and starting it again finishes the rest. A run
that fails before any shard is finished removes the run directory it created.
This module orchestrates: it computes no graph itself and writes to the stores only through `StoreLoader` (and
`ingest.coactivation` for TWERA/ERA).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from atlas.config import ENV_DASK_SCHEDULER, require_at_least, runs_dir, stats_db_path
from atlas.models.identity import model_identity
from atlas.storage.feature_stats import FeatureStatsStore
from atlas.storage.neo4j_server import Neo4jConnection
from atlas.storage.neo4j_writer import GraphWriter
from atlas.transcoders.card import read_card
from atlas.transcoders.hub import resolve_transcoders
from atlas.transcoders.identity import transcoder_identity
from ingest.coactivation import prepare_pairs, store_run
from ingest.ledger import FAIL_INPUT, FAIL_PROMPT, FAIL_TASK, Ledger
from ingest.loader import StoreLoader, retrying
from ingest.preflight import check_inputs
from ingest.prompts import prompt_key, read_corpus
from ingest.settings import AttributionSettings, IngestIdentity, batch_key
from ingest.worker import (
    SUMMARY_FILE,
    BatchSpec,
    ModelPlugin,
    PromptItem,
    compute_batch,
    compute_logit_effects,
    setup_local,
)

log = logging.getLogger(__name__)
REPORT_FILE = "report.json"
SHARDS_DIR = "shards"


class IngestError(RuntimeError):
    """The ingest cannot run (bad options, unreachable store); the message says what to fix."""


@dataclass
class IngestOptions:
    corpus: Path
    transcoders: Path | str  # a directory, or a published dictionary (`atlas.transcoders.hub`)
    model: str
    settings: AttributionSettings = field(default_factory=AttributionSettings)
    workers: int | None = None  # LocalCluster size (default: sized to the machine); 0: in this process, no Dask
    scheduler: str | None = None  # an existing Dask scheduler instead of a LocalCluster
    run: str | None = None  # run name (default: corpus name + identity hash)
    text_field: str = "text"
    stats_db: Path | None = None
    runs_root: Path | None = None
    batch_prompts: int | None = None  # prompts per task (default: balanced over the workers)
    retries: int = 2
    neo4j_retry_s: float = 300.0
    stats_every_s: float = 30.0
    gpu: bool = False  # tasks require the worker resource GPU=1
    progress: bool = True

    def __post_init__(self) -> None:
        require_at_least(
            "ingest",
            {
                "workers": (self.workers, 0),
                "batch_prompts": (self.batch_prompts, 1),
                "retries": (self.retries, 0),
                "neo4j_retry_s": (self.neo4j_retry_s, 0.0),
                "stats_every_s": (self.stats_every_s, 0.0),
            },
        )


@dataclass
class IngestReport:
    run: str
    run_dir: str
    model: str
    transcoder_id: str
    stats_db: str
    neo4j_uri: str
    dashboard: str | None = None
    workers: int = 0
    corpus_lines: int = 0
    prompts: int = 0
    duplicates: int = 0
    input_failures: int = 0
    already_stored: int = 0
    skipped_known_failures: int = 0
    resumed_from_shards: int = 0
    computed: int = 0
    prompt_failures: int = 0
    task_failures: int = 0
    nodes_written: int = 0
    edges_written: int = 0
    neo4j_retries: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    worker_timings: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # first 50, with errors

    @property
    def done(self) -> int:
        return self.already_stored + self.resumed_from_shards + self.computed

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "done": self.done}


class _Phases:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started


def default_workers() -> int:
    """Processes for a LocalCluster: one per core, at most one per 3 GiB of memory (a model per worker)."""
    cores = os.cpu_count() or 1
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = 8.0
    return max(1, min(cores, int(memory_gib // 3)))


def worker_torch_threads(n_workers: int) -> int:
    """torch threads per LocalCluster worker: the machine's cores shared out between its worker processes."""
    return max(1, (os.cpu_count() or 1) // max(1, n_workers))


# A worker's BLAS/OpenMP pools are sized when torch loads, from these variables, which Dask's nanny sets to 1 by
# default (`distributed.nanny.pre-spawn-environ`); a later `torch.set_num_threads(2)` then reports 2 threads but
# computes on one (measured: a 1500² matmul loop 0.97 s with 1 or "2" threads, 0.56 s with the pools sized to 2).
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# The nanny also sets MALLOC_TRIM_THRESHOLD_=65536 before spawning a worker. Any explicit trim threshold switches off
# glibc's dynamic mmap threshold, so attribution's large temporary tensors are mmapped and unmapped anew each time:
# one SmolLM2 prompt took 1.33-1.48 s with it set (65536 or 128 MiB) against 0.73-0.83 s without, on 2 threads.
MALLOC_TRIM_ENV = "MALLOC_TRIM_THRESHOLD_"


@contextlib.contextmanager
def _worker_spawn_environment(threads: int) -> Iterator[None]:
    """While LocalCluster spawns its workers: thread counts of `threads`, no trim threshold, in the spawned process.

    Both must be in the environment a worker process starts with (its own `env` is applied after its arguments are
    unpickled, which may already load torch). A nanny computes its pre-spawn variables from Dask's config, overridden
    by this process's environment, and writes them into this process's environment for good; so they are set here
    for the spawn and restored afterwards, and a trim threshold equal to Dask's own (left by an earlier nanny, not set
    by the user) is dropped.
    """
    import dask

    prefix = "distributed.nanny.pre-spawn-environ."
    saved = {name: os.environ.get(name) for name in (*THREAD_ENV_VARS, MALLOC_TRIM_ENV)}
    dasks_trim = dask.config.get(prefix + MALLOC_TRIM_ENV, None)
    if dasks_trim is not None and saved[MALLOC_TRIM_ENV] == str(dasks_trim):
        del os.environ[MALLOC_TRIM_ENV]
    os.environ.update({name: str(threads) for name in THREAD_ENV_VARS})  # take precedence over Dask's config
    try:
        with dask.config.set({prefix + MALLOC_TRIM_ENV: None}):  # None unsets a pre-spawn variable
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def balanced_batch(n_prompts: int, n_workers: int, cap: int = 8) -> int:
    """Prompts per task: about four tasks per worker (load balance, fine-grained resume), at most `cap`."""
    return max(1, min(cap, math.ceil(n_prompts / max(1, 4 * n_workers))))


def open_connection(connection: Neo4jConnection | None) -> Neo4jConnection:
    """The given connection, else `NEO4J_URI`, else the managed local server (started when needed)."""
    from atlas.storage.neo4j_server import LocalNeo4jServer, resolve_connection

    if connection is not None:
        return connection
    resolved = resolve_connection()
    if resolved is not None:
        return resolved
    return LocalNeo4jServer().start()


def _start_dask(options: IngestOptions) -> tuple[Any, Any, int]:
    from distributed import Client, LocalCluster

    address = options.scheduler or os.environ.get(ENV_DASK_SCHEDULER) or None
    if address:
        client = Client(address, timeout="60s")
        return client, None, len(client.scheduler_info(n_workers=-1).get("workers", {}))
    n = options.workers or default_workers()
    # The scheduler of a LocalCluster lives in this process: keep its INFO chatter out of the progress display.
    for name in ("distributed", "distributed.scheduler", "distributed.core", "distributed.nanny"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with _worker_spawn_environment(worker_torch_threads(n)):
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            resources={"GPU": 1} if options.gpu else None,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
    return Client(cluster), cluster, n


class _Done:
    """A finished in-process 'future' (the subset of `distributed.Future` the pipeline uses)."""

    def __init__(self, key: str, function: Callable[..., Any], *args: Any) -> None:
        self.key = key
        self._value: Any = None
        self._error: BaseException | None = None
        try:
            self._value = function(*args)
        except Exception as err:
            self._error = err

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class _InProcessClient:
    """Runs tasks immediately in this process, one after the other (`workers=0`: debugging, benchmark baseline)."""

    def register_plugin(self, plugin: ModelPlugin, name: str | None = None) -> None:
        setup_local(plugin)

    def submit(self, function: Callable[..., Any], *args: Any, key: str | None = None, **_: Any) -> _Done:
        return _Done(key or function.__name__, function, *args)

    def close(self) -> None:
        pass


def _as_completed(client: Any, futures: list[Any]) -> Iterator[Any]:
    """`futures` in the order they finish, tracked on `client`'s own event loop.

    `distributed.as_completed` otherwise takes the loop of the process's *default* client, which is not ours when the
    caller holds another client (a notebook, a test): futures then wait on one loop and are rescheduled on another,
    and a task lost with its worker fails with "Event ... is bound to a different event loop" instead of rerunning.
    """
    if futures and isinstance(futures[0], _Done):
        return iter(futures)
    from distributed import as_completed

    return iter(as_completed(futures, loop=client.loop))


def _dashboard(client: Any) -> str | None:
    try:
        import bokeh  # noqa: F401  (the dashboard needs it)
    except ImportError:
        return None
    return str(client.dashboard_link) if client.dashboard_link else None


def _progress(console: Console, enabled: bool) -> Progress:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} prompts"),
        TextColumn("{task.fields[rate]:.2f} graphs/s"),
        TextColumn("{task.fields[edges]} edges"),
        TextColumn("[red]{task.fields[failures]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, disable=not enabled, transient=False)


def run_ingest(
    options: IngestOptions,
    *,
    connection: Neo4jConnection | None = None,
    console: Console | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> IngestReport:
    """Run the whole ingest (see the module docstring); `on_shard` sees each loaded shard's summary."""
    console = console or Console(stderr=True)
    timings: dict[str, float] = {}
    phase = _Phases(timings)
    started = time.perf_counter()

    with phase("check"):  # milliseconds, before anything is read at length, started or created
        transcoder_dir = resolve_transcoders(options.transcoders)  # a path, or a published dictionary's reference
        header = check_inputs(options.corpus, transcoder_dir, options.model)
    with phase("read"):
        records, issues = read_corpus(options.corpus, text_field=options.text_field)
        dictionary = transcoder_identity(transcoder_dir)  # by weights and semantic config, not by path or name
        transcoder_id = dictionary.id
        model = model_identity(options.model)  # the store's key: the name, or the weights of a local directory
        identity = IngestIdentity(options.model, str(transcoder_dir.resolve()), transcoder_id, options.settings,
                                  model_key=model.key)  # fmt: skip
        settings_id = options.settings.identity()
        items: dict[str, PromptItem] = {}
        for record in records:
            pid = prompt_key(record.text, model=model.key, transcoder_id=transcoder_id, settings=settings_id)
            items.setdefault(pid, PromptItem(pid, record.text, record.line, record.meta))
    identity_hash = prompt_key("", model=model.key, transcoder_id=transcoder_id, settings=settings_id)
    run = options.run or f"{options.corpus.stem}-{identity_hash[:8]}"
    run_dir = (options.runs_root or runs_dir()) / run
    shard_root = run_dir / SHARDS_DIR
    stats_path = options.stats_db or stats_db_path()
    ledger = Ledger(run_dir, run)
    with _removed_on_failure(None if run_dir.exists() else run_dir, ledger):
        shard_root.mkdir(parents=True, exist_ok=True)
        state = ledger.read()
        pairs_file = prepare_pairs(stats_path, transcoder_id, run_dir)  # None unless global weights are stored
        for issue in issues:
            ledger.failed(None, kind=FAIL_INPUT, error=issue.error, line=issue.line)
        with phase("connect"):
            conn = open_connection(connection)
        report = IngestReport(run=run, run_dir=str(run_dir), model=options.model, transcoder_id=transcoder_id,
                              stats_db=str(stats_path), neo4j_uri=conn.uri)  # fmt: skip
        report.corpus_lines = len(records) + len(issues)
        report.prompts = len(items)
        report.duplicates = len(records) - len(items)
        report.input_failures = len(issues)
        report.failures += [{"line": i.line, "kind": FAIL_INPUT, "error": i.error} for i in issues[:50]]
        from neo4j import GraphDatabase

        driver = GraphDatabase.driver(conn.uri, auth=(conn.user, conn.password))
        client = cluster = None
        try:
            writer = GraphWriter(driver, conn.database)  # the loader aggregates in the background
            stats = FeatureStatsStore(stats_path)
            aggregate_hook = _aggregate_hook(driver, conn.database)
            loader = StoreLoader(writer, stats, retry_s=options.neo4j_retry_s, stats_every_s=options.stats_every_s,
                                 after_write=aggregate_hook)  # fmt: skip
            with phase("connect"):
                retrying(writer.ensure_schema, retry_s=options.neo4j_retry_s, what="schema")
                retrying(lambda: writer.register_model(model.key, name=model.name, source=model.source,
                                                       weights=model.weights),
                         retry_s=options.neo4j_retry_s, what="model")  # fmt: skip
                retrying(lambda: writer.register_transcoder(dictionary.id, model=model.key, name=dictionary.name,
                                                            source=dictionary.source, kind=dictionary.kind,
                                                            config=dictionary.config,
                                                            card=read_card(transcoder_dir).to_dict()),
                         retry_s=options.neo4j_retry_s, what="transcoder")  # fmt: skip
                stored = loader.existing(items)
                if aggregate_hook is not None and stored:  # a run killed between a write and its aggregate update
                    retrying(lambda: aggregate_hook(sorted(stored)), retry_s=options.neo4j_retry_s, what="aggregates")
            report.already_stored = len(stored)
            known = state.deterministic_failures()
            todo = {pid: item for pid, item in items.items() if pid not in stored and pid not in known}
            report.skipped_known_failures = sum(1 for pid in items if pid in known and pid not in stored)
            report.failures += [{"prompt_id": pid, "kind": FAIL_PROMPT, "error": e["error"]}
                                for pid, e in known.items()]  # fmt: skip

            with phase("resume"):
                for summary_path in sorted(shard_root.glob(f"*/{SUMMARY_FILE}")):
                    summary = json.loads(summary_path.read_text())
                    if not summary["done"] or not set(summary["done"]) <= set(todo) | stored:
                        continue
                    load = loader.load_shard(summary_path.parent)
                    ledger.done(load.written + load.already)
                    report.resumed_from_shards += sum(1 for pid in summary["done"] if pid in todo)
                    report.nodes_written += load.n_nodes
                    report.edges_written += load.n_edges
                    for pid in summary["done"]:
                        todo.pop(pid, None)

            in_process = options.workers == 0 and not options.scheduler
            threads = os.cpu_count() or 1  # in this process (also for logit effects with nothing to compute)
            if todo:
                with phase("cluster_start"):
                    if in_process:
                        client, n_workers = _InProcessClient(), 1
                    else:
                        client, cluster, n_workers = _start_dask(options)
                    report.workers = n_workers
                    report.dashboard = None if in_process else _dashboard(client)
                where = "in this process (no Dask)" if in_process else f"on {n_workers} Dask worker(s)"
                console.print(
                    f"ingest [bold]{run}[/]: {len(todo)} prompts to attribute {where}"
                    f" ({report.already_stored} already stored); run dir {run_dir}"
                )
                if not in_process:
                    console.print(f"Dask dashboard: {report.dashboard or 'unavailable (install bokeh>=3.1)'}")
                if not in_process:
                    threads = worker_torch_threads(n_workers) if cluster else 1
            else:
                console.print(
                    f"ingest [bold]{run}[/]: nothing to compute ({report.already_stored} prompts already stored,"
                    f" {report.resumed_from_shards} loaded from shards)"
                )
            plugin = ModelPlugin(options.model, identity.transcoder_dir, transcoder_id, torch_threads=threads)
            if client is not None:
                with phase("worker_setup"):
                    client.register_plugin(plugin, name=plugin.name)
                _compute_and_load(options, client, plugin.name, identity, run, shard_root, todo, loader, ledger,
                                  report, console, phase, on_shard, pairs_file)  # fmt: skip
            effects = None
            # Every run that leaves prompts of these transcoders in the stores leaves their logit effects beside the
            # statistics, however its prompts got there: computed now, resumed from shards, or stored by a run that
            # died before writing the effects (with nothing left to compute, they are computed in this process).
            if report.done and not stats.has_logit_effects(transcoder_id):
                with phase("logit_effects"):
                    effects = _logit_effects(client, plugin, transcoder_id, run_dir, options)
            with phase("load_stats"):
                loader.flush_stats(logit_effects=effects)
            if pairs_file is not None:
                with phase("coactivation"):
                    store_run(stats_path, transcoder_id, shard_root, pairs_file, header.n_layers, header.n_features,
                              run)  # fmt: skip
            report.neo4j_retries = loader.retries
            timings["load_neo4j"] = loader.neo4j_seconds
            timings["load_stats_total"] = loader.stats_seconds
        finally:
            with contextlib.suppress(Exception):
                if client is not None:
                    client.close()
            with contextlib.suppress(Exception):
                if cluster is not None:
                    cluster.close()
            driver.close()
            ledger.close()
        timings["total"] = time.perf_counter() - started
        report.timings = {k: round(v, 3) for k, v in timings.items()}
        report.worker_timings = {k: round(v, 3) for k, v in report.worker_timings.items()}
        tmp = run_dir / f".{REPORT_FILE}.tmp"
        tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        tmp.replace(run_dir / REPORT_FILE)
    return report


@contextlib.contextmanager
def _removed_on_failure(run_dir: Path | None, ledger: Ledger) -> Iterator[None]:
    """Remove `run_dir` (a run directory this call created) when the run fails before any shard was finished there.

    What it would hold then (an input-failure ledger, empty or half-written shard directories) is rebuilt by the next
    run; a finished shard is work to resume, so a directory holding one is kept.
    """
    try:
        yield
    except BaseException:
        ledger.close()
        if run_dir is not None and not any((run_dir / SHARDS_DIR).glob(f"*/{SUMMARY_FILE}")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _aggregate_hook(driver: Any, database: str) -> Callable[[list[str]], None] | None:
    """The aggregate layer's update for newly written prompts, when the storage layer provides one."""
    import importlib

    try:
        aggregate = importlib.import_module("atlas.storage.aggregate")
    except ImportError:
        return None
    update = getattr(aggregate, "update_for_prompts", None)
    if update is None:
        return None
    return lambda prompt_ids: update(driver, prompt_ids, database=database)


def _logit_effects(client: Any, plugin: ModelPlugin, transcoder_id: str, run_dir: Path, options: IngestOptions) -> Any:
    """The transcoders' logit effects: on the cluster that computed the prompts, else (`client` None) in this process,
    loading the model here only when no earlier attempt left `logit_effects.parquet` in the run directory."""
    import pyarrow.parquet as pq

    out = run_dir / "logit_effects.parquet"
    if client is None:
        if not out.is_file():
            setup_local(plugin)
        return pq.read_table(compute_logit_effects(plugin.name, transcoder_id, str(out)))
    resources = {"GPU": 1} if options.gpu else None
    future = client.submit(compute_logit_effects, plugin.name, transcoder_id, str(out), pure=False,
                           retries=options.retries, resources=resources)  # fmt: skip
    return pq.read_table(future.result())


def _compute_and_load(
    options: IngestOptions,
    client: Any,
    plugin: str,
    identity: IngestIdentity,
    run: str,
    shard_root: Path,
    todo: dict[str, PromptItem],
    loader: StoreLoader,
    ledger: Ledger,
    report: IngestReport,
    console: Console,
    phase: _Phases,
    on_shard: Callable[[dict[str, Any]], None] | None,
    pairs_file: Path | None = None,
) -> None:
    pending = list(todo.values())
    size = options.batch_prompts or balanced_batch(len(pending), max(1, report.workers))
    specs: dict[str, BatchSpec] = {}
    for start in range(0, len(pending), size):
        chunk = tuple(pending[start : start + size])
        key = batch_key([p.prompt_id for p in chunk])
        specs[f"atlas-ingest-{key}"] = BatchSpec(key, str(shard_root), plugin, identity, run, chunk,
                                                 None if pairs_file is None else str(pairs_file))  # fmt: skip
    resources = {"GPU": 1} if options.gpu else None
    compute_started = time.perf_counter()
    with phase("compute_and_load"), _progress(console, options.progress) as progress:
        task = progress.add_task(f"ingest {run}", total=len(pending), rate=0.0, edges=0, failures=0)
        submit = [(key, spec) for key, spec in specs.items()]
        if isinstance(client, _InProcessClient):  # compute lazily, so loading follows each batch
            futures: Iterator[Any] = (client.submit(compute_batch, spec, key=key) for key, spec in submit)
        else:
            submitted = [client.submit(compute_batch, spec, key=key, retries=options.retries, pure=False,
                                       resources=resources) for key, spec in submit]  # fmt: skip
            futures = _as_completed(client, submitted)
        finished = 0
        for future in futures:
            spec = specs[str(future.key)]
            try:
                summary = future.result()
            except Exception as err:  # the batch failed after every retry: its prompts are retried next run
                for item in spec.prompts:
                    ledger.failed(item.prompt_id, kind=FAIL_TASK, error=f"{type(err).__name__}: {err}", line=item.line)
                report.task_failures += len(spec.prompts)
                if len(report.failures) < 50:
                    report.failures.append({"batch": spec.key, "kind": FAIL_TASK, "error": f"{err!r}"})
                finished += len(spec.prompts)
            else:
                load = loader.load_shard(Path(summary["shard"]))
                ledger.done(load.written + load.already)
                for failure in summary["failures"]:
                    ledger.failed(failure["prompt_id"], kind=FAIL_PROMPT, error=failure["error"], line=failure["line"])
                    if len(report.failures) < 50:
                        report.failures.append({**failure, "kind": FAIL_PROMPT})
                report.computed += len(summary["done"])
                report.prompt_failures += len(summary["failures"])
                report.nodes_written += load.n_nodes
                report.edges_written += load.n_edges
                for name, seconds in summary["timings"].items():
                    report.worker_timings[name] = report.worker_timings.get(name, 0.0) + seconds
                finished += len(spec.prompts)
                if on_shard is not None:
                    on_shard(summary)
            elapsed = time.perf_counter() - compute_started
            failed = report.prompt_failures + report.task_failures
            rate = report.computed / elapsed if elapsed else 0.0
            progress.update(task, completed=finished, rate=rate, edges=report.edges_written, failures=failed)
            if not options.progress and not console.is_terminal:
                log.info("ingest %s: %d/%d prompts", run, finished, len(pending))
