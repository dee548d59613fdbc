"""Worker side of the ingest: a plugin that loads model and transcoders once per Dask worker, and the batch task.

`ModelPlugin.setup` runs once in every worker process (torch threads set, model and transcoders loaded onto the
worker's device). `compute_batch(spec)` attributes and prunes each prompt of a batch, accumulates its feature
statistics, and writes ONE shard directory `<shards>/<batch key>/` atomically (written under a temporary name, then
renamed): `nodes.parquet`, `edges.parquet` (`NODE_SCHEMA` / `EDGE_SCHEMA`), `prompts.parquet` (per-prompt metadata as
JSON), a `stats-<key>/` feature-statistics shard and `summary.json`. It returns only that small summary.

Prompts that fail for a reason that will not change on retry (too long, empty, an unknown target token) are listed
in the summary with their error; anything else raises, so that Dask retries the task. A shard that already exists
(an earlier attempt finished, then its worker died) is returned as it is, so a batch never yields two shards.
This module never writes to Neo4j or DuckDB: that is the loader's job, in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from distributed import WorkerPlugin, get_worker

from ingest.settings import TARGET_ANSWER, TARGET_SALIENT, IngestIdentity

SUMMARY_FILE = "summary.json"
SHARD_TABLES = ("nodes", "edges", "prompts")
PROMPTS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("meta", pa.string())])


@dataclass(frozen=True)
class PromptItem:
    prompt_id: str
    text: str
    line: int
    meta: dict[str, str]


@dataclass(frozen=True)
class BatchSpec:
    """One task's work: prompts to attribute and where to put the shard (everything picklable and small)."""

    key: str
    shard_root: str
    plugin: str
    identity: IngestIdentity
    run: str
    prompts: tuple[PromptItem, ...]
    pairs_file: str | None = None  # co-activation pairs (`ingest.coactivation`): accumulate them too when set


class PromptFailure(Exception):
    """A prompt that fails deterministically; recorded with its message and never retried."""


def plugin_name(model: str, transcoder_id: str) -> str:
    return f"atlas-model:{model}:{transcoder_id}"


class ModelPlugin(WorkerPlugin):
    """Loads `model` and the transcoders in `transcoder_dir` once per worker (`setup`), frees them in `teardown`."""

    def __init__(self, model: str, transcoder_dir: str, transcoder_id: str, torch_threads: int = 1) -> None:
        self.model_name = model
        self.transcoder_dir = transcoder_dir
        self.torch_threads = torch_threads
        self.name = plugin_name(model, transcoder_id)
        self.model: Any = None
        self.transcoder: Any = None
        self.load_seconds = 0.0

    def setup(self, worker: Any) -> None:
        import torch

        from atlas.models import load_model
        from atlas.transcoders import check_compatible, load_transcoder

        started = time.perf_counter()
        torch.set_num_threads(self.torch_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(self.model_name, device=device)
        self.transcoder = load_transcoder(self.transcoder_dir, device=device)
        # The driver checked the sizes before starting anything where it could know them without the model (not for
        # a hub name); this check covers the rest, before any prompt is attributed.
        info = self.model.info
        check_compatible(self.transcoder.spec, n_layers=info.n_layers, d_model=info.d_model, model_name=info.name)
        self.load_seconds = time.perf_counter() - started

    def teardown(self, worker: Any) -> None:
        self.model = self.transcoder = None


# Plugins set up in this very process (`run_ingest(workers=0)`: no Dask), looked up before the Dask worker's.
_LOCAL_PLUGINS: dict[str, ModelPlugin] = {}


def setup_local(plugin: ModelPlugin) -> None:
    """Load the plugin's model into this process, for tasks called directly (in-process mode)."""
    if plugin.name not in _LOCAL_PLUGINS:
        plugin.setup(None)
        _LOCAL_PLUGINS[plugin.name] = plugin


def _plugin(name: str) -> ModelPlugin:
    plugin = _LOCAL_PLUGINS.get(name) or get_worker().plugins.get(name)
    if not isinstance(plugin, ModelPlugin) or plugin.model is None:
        raise RuntimeError(f"worker has no loaded model plugin {name!r} (register ModelPlugin first)")
    return plugin


def _targets(plugin: ModelPlugin, item: PromptItem, spec: BatchSpec, n_pos: int) -> list[Any] | None:
    from atlas.attribution.targets import TargetError, token_targets

    wanted = spec.identity.settings.targets
    if wanted == (TARGET_SALIENT,):
        return None
    tokens = []
    for target in wanted:
        if target == TARGET_ANSWER:
            answer = item.meta.get("answer")
            if not answer:
                raise PromptFailure("target 'answer' requested but the record has no 'answer' field")
            ids = plugin.model.tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not ids:
                raise PromptFailure(f"answer {answer!r} has no tokens")
            tokens.append(plugin.model.tokenizer.decode([ids[0]]))
        else:
            tokens.append(target)
    try:
        return token_targets(tokens, plugin.model.model.W_U.detach(), plugin.model.tokenizer, n_pos - 1)
    except TargetError as err:
        raise PromptFailure(str(err)) from err


def attribute_prompt(plugin: ModelPlugin, item: PromptItem, spec: BatchSpec, timings: dict[str, float]) -> Any:
    """(nodes, edges, prompt metadata, token strings, activations `(L, n_pos, F)`) of one prompt."""
    from atlas.attribution.context import PromptError, build_context
    from atlas.attribution.engine import AttributionConfig, attribute
    from atlas.attribution.export import prune_graph

    identity, settings = spec.identity, spec.identity.settings
    model = plugin.model
    tokens = model.tokenize(item.text)[0].cpu()
    if tokens.numel() > model.info.n_ctx:
        raise PromptFailure(f"the prompt has {tokens.numel()} tokens, more than the context length {model.info.n_ctx}")
    config = AttributionConfig(
        max_feature_nodes=settings.max_feature_nodes,
        max_n_logits=settings.max_n_logits,
        desired_logit_probability=settings.desired_logit_probability,
    )
    started = time.perf_counter()
    try:
        targets = _targets(plugin, item, spec, int(tokens.numel()))
        graph = attribute(model, plugin.transcoder, tokens, targets=targets, config=config,
                          transcoder_id=identity.transcoder_id)  # fmt: skip
    except PromptError as err:
        raise PromptFailure(str(err)) from err
    timings["attribute"] += time.perf_counter() - started
    started = time.perf_counter()
    pruned = prune_graph(graph, node_threshold=settings.node_threshold, edge_threshold=settings.edge_threshold)
    nodes, edges = graph.to_tables(item.prompt_id, influence=pruned.result.cumulative_scores)
    nodes = nodes.filter(pruned.result.node_mask.numpy())
    edges = edges.filter(pruned.result.edge_mask.numpy())
    timings["prune"] += time.perf_counter() - started
    started = time.perf_counter()
    activations = build_context(model, plugin.transcoder, tokens).activations
    timings["stats_forward"] += time.perf_counter() - started
    meta: dict[str, Any] = {
        "id": item.prompt_id,
        "model": identity.store_model,
        "transcoder": identity.transcoder_id,
        "text": item.text,
        "run": spec.run,
        "source_line": item.line,
        "n_tokens": int(tokens.numel()),
        "targets": [node.label for node in graph.index.logits],
        "target_probabilities": [float(p) for p in graph.target_probabilities],
        "replacement_score": float(pruned.scores_pruned.replacement),
        "completeness_score": float(pruned.scores_pruned.completeness),
        "settings": json.dumps(settings.identity(), sort_keys=True),
        **item.meta,
    }
    return nodes, edges, meta, graph.token_strings, activations


def compute_batch(spec: BatchSpec) -> dict[str, Any]:
    """Attribute a batch and write its shard; returns the shard's summary (see module docstring)."""
    import torch

    from atlas.attribution.graph import EDGE_SCHEMA, NODE_SCHEMA
    from atlas.storage.feature_stats import FeatureStatsShard
    from ingest.coactivation import COACTIVATION_PREFIX, read_pairs, write_shard

    final = Path(spec.shard_root) / spec.key
    if (final / SUMMARY_FILE).is_file():
        return json.loads((final / SUMMARY_FILE).read_text())
    plugin = _plugin(spec.plugin)
    # OpenMP's thread count is per OS thread: the plugin set it in the thread that ran `setup`, but Dask runs tasks
    # in its executor threads. (It cannot grow the pools beyond what OMP_NUM_THREADS gave them at the worker's
    # start: the pipeline's LocalCluster sizes that, see `ingest.pipeline.THREAD_ENV_VARS`.)
    torch.set_num_threads(plugin.torch_threads)
    transcoder = plugin.transcoder.spec
    stats = FeatureStatsShard(spec.identity.transcoder_id, transcoder.n_layers, transcoder.n_features)
    coactivation = (
        None if spec.pairs_file is None else read_pairs(spec.pairs_file, transcoder.n_layers, transcoder.n_features)
    )
    timings = {"attribute": 0.0, "prune": 0.0, "stats_forward": 0.0, "stats": 0.0, "write": 0.0}
    nodes, edges, metas, done, failures = [], [], [], [], []
    for item in spec.prompts:
        try:
            n, e, meta, token_strings, activations = attribute_prompt(plugin, item, spec, timings)
        except PromptFailure as err:
            failures.append({"prompt_id": item.prompt_id, "line": item.line, "error": str(err)})
            continue
        started = time.perf_counter()
        stats.add(item.prompt_id, token_strings, activations)
        if coactivation is not None:
            coactivation.add(activations[:, 1:])  # BOS (zeroed) is not a token of the corpus here
        timings["stats"] += time.perf_counter() - started
        nodes.append(n)
        edges.append(e)
        metas.append(meta)
        done.append(item.prompt_id)
    started = time.perf_counter()
    summary = {
        "key": spec.key,
        "shard": str(final),
        "done": done,
        "failures": failures,
        "n_nodes": sum(t.num_rows for t in nodes),
        "n_edges": sum(t.num_rows for t in edges),
        "worker_pid": os.getpid(),
        "timings": timings,
    }
    tmp = final.with_name(f".{spec.key}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        tables = {
            "nodes": pa.concat_tables(nodes) if nodes else NODE_SCHEMA.empty_table(),
            "edges": pa.concat_tables(edges) if edges else EDGE_SCHEMA.empty_table(),
            "prompts": pa.Table.from_pydict(
                {"prompt_id": done, "meta": [json.dumps(m, sort_keys=True) for m in metas]}, schema=PROMPTS_SCHEMA
            ),
        }
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        stats_dir = tmp / f"stats-{spec.key}"
        stats_dir.mkdir()
        for name, table in stats.tables().items():
            pq.write_table(table, stats_dir / f"{name}.parquet")
        if coactivation is not None:
            write_shard(coactivation, tmp / f"{COACTIVATION_PREFIX}{spec.key}")
        timings["write"] = time.perf_counter() - started
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary))
        try:
            tmp.rename(final)
        except OSError:
            if not (final / SUMMARY_FILE).is_file():
                raise
            return json.loads((final / SUMMARY_FILE).read_text())  # another attempt finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def compute_logit_effects(plugin: str, transcoder_id: str, out: str) -> str:
    """Write the transcoders' decoder logit effects (`logit_effect_table`) to `out` (Parquet, atomically)."""
    from atlas.storage.feature_stats import logit_effect_table

    target = Path(out)
    if target.is_file():
        return out
    loaded = _plugin(plugin)
    table = logit_effect_table(
        loaded.transcoder, loaded.model.model.W_U.detach().cpu(), loaded.model.tokenizer, transcoder_id
    )
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp)
    tmp.replace(target)
    return out
