"""Latency of the cross-prompt path query (`AtlasQueries.paths_to_logits`) over millions of stored edges.

Loads `--prompts` synthetic prompt graphs (the generator of `benchmarks/neo4j_load.py`: Zipf-recurring features,
heavy-tailed degrees and weights) into a DEDICATED managed Neo4j in a temporary directory (its own data dir, heap and
page cache; deleted at the end), with `GraphWriter` and its aggregate layer on. A fraction `--planted` of the prompts
also gets a planted circuit  Dallas -> Texas -> say-a-capital -> logit " Austin"  (weights scaled per prompt, wired
into the prompt's random graph: input tokens drive Dallas, Dallas drives random features, random features drive the
capital feature), and some other prompts a " Sacramento" / " Albany" logit.

Then `--reps` path queries with varied parameters (sources by key, by label, and random features sampled by
activation count; target sets of capitals; max_hops 2..4; min |weight| 0.02..0.1; limit 10..50), timed on the client
(resolution queries included), after a few warm-up queries. It prints p50/p95/max overall and by source kind, checks
that the planted path ranks first for the planted query, and times the other library queries a few times each.
The machine's load average is printed at each phase: the development machines are shared.

    .venv/bin/python -m benchmarks.query_latency [--prompts 2000] [--edges 2600] [--reps 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from neo4j import GraphDatabase

from atlas.attribution.graph import EDGE_SCHEMA, NODE_SCHEMA, feature_key
from atlas.storage.aggregate import node_hash, rebuild_aggregates
from atlas.storage.graph_schema import SCHEMA_VERSION
from atlas.storage.migrations import ensure_schema
from atlas.storage.neo4j_server import NEO4J_ADMIN_MAIN_CLASS, LocalNeo4jServer, find_java
from atlas.storage.neo4j_writer import GraphWriter
from atlas.storage.queries import AtlasQueries, QueryError
from benchmarks.neo4j_load import MODEL, TRANSCODER, VOCAB, synthetic_prompt

Graph = tuple[dict[str, Any], pa.Table, pa.Table]

# Planted identities: feature indices beyond the generator's dictionary, token ids beyond its vocabulary.
DALLAS, TEXAS, CAPITAL = (4, 20_001), (12, 20_002), (22, 20_003)
CAPITALS = {VOCAB + 1: " Austin", VOCAB + 2: " Sacramento", VOCAB + 3: " Albany", VOCAB + 4: " Tallahassee"}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def plant(rng: np.random.Generator, graph: Graph, scale: float, capital_id: int) -> Graph:
    """Append the planted features and a capital logit to a generated prompt, wired into its random graph."""
    meta, nodes, edges = graph
    rows = nodes.to_pydict()
    n0 = len(rows["node_index"])
    n_pos = int(max(rows["position"])) + 1
    last = n_pos - 1
    layer_of = rows["layer"]
    kinds = rows["kind"]
    feature_rows = [i for i, k in enumerate(kinds) if k == "feature"]
    token_rows = [i for i, k in enumerate(kinds) if k == "token"]

    def add(kind: str, node_id: str, position: int, **values: Any) -> int:
        index = len(rows["node_index"])
        rows["prompt_id"].append(meta["id"])
        rows["node_index"].append(index)
        rows["node_id"].append(node_id)
        rows["kind"].append(kind)
        rows["position"].append(position)
        for name in ("layer", "feature", "feature_key", "token_id", "token", "activation", "probability"):
            rows[name].append(values.get(name))
        rows["influence"].append(float(rng.random() * 0.2))
        return index

    pos = int(rng.integers(0, n_pos))
    planted = {}
    for name, (layer, idx), p in (("dallas", DALLAS, pos), ("texas", TEXAS, pos), ("capital", CAPITAL, last)):
        planted[name] = add("feature", f"{layer}_{idx}_{p}", p, layer=layer, feature=idx,
                            feature_key=feature_key(TRANSCODER, layer, idx), activation=float(2.0 * scale))  # fmt: skip
    text = CAPITALS[capital_id]
    logit = add("logit", f"31_{capital_id}_{last}", last, token_id=capital_id, token=text, activation=3.0,
                probability=0.4)  # fmt: skip
    src, tgt, wts = edges.column("source").to_pylist(), edges.column("target").to_pylist(), edges.column("weight")
    weights = wts.to_pylist()
    new: list[tuple[int, int, float]] = [
        (planted["dallas"], planted["texas"], 0.9 * scale),
        (planted["texas"], planted["capital"], 0.8 * scale),
        (planted["capital"], logit, 0.7 * scale),
        (planted["dallas"], logit, 0.05),  # weak direct route
    ]
    for t in rng.choice(token_rows, 3, replace=False):
        new.append((int(t), planted["dallas"], float(rng.normal(0, 0.3))))
    lower = [i for i in feature_rows if (layer_of[i] or 0) > DALLAS[0]]
    for t in rng.choice(lower, min(6, len(lower)), replace=False):
        new.append((planted["dallas"], int(t), float(rng.normal(0, 0.1))))
    upper = [i for i in feature_rows if (layer_of[i] or 0) < CAPITAL[0]]
    for s in rng.choice(upper, min(6, len(upper)), replace=False):
        new.append((int(s), planted["capital"], float(rng.normal(0, 0.1))))
        new.append((int(s), logit, float(rng.normal(0, 0.05))))
    assert n0 == planted["dallas"]
    nodes = pa.Table.from_pydict(rows, schema=NODE_SCHEMA)
    edges = pa.Table.from_pydict(
        {
            "prompt_id": [meta["id"]] * (len(src) + len(new)),
            "source": src + [e[0] for e in new],
            "target": tgt + [e[1] for e in new],
            "weight": weights + [e[2] for e in new],
        },
        schema=EDGE_SCHEMA,
    )
    return {**meta, "task": "capitals"}, nodes, edges


def prompts(args: argparse.Namespace) -> Iterator[tuple[Graph, tuple[float, str] | None]]:
    """(graph, (planted scale, capital text) or None), generated lazily."""
    rng = np.random.default_rng(args.seed)
    shape = {"n_layers": args.layers, "n_pos": args.positions, "n_features": args.features,
             "n_errors": args.errors, "n_edges": args.edges}  # fmt: skip
    capital_ids = sorted(CAPITALS)
    for i in range(args.prompts):
        graph = synthetic_prompt(rng, f"bench-q-{i}", **shape)
        if rng.random() < args.planted:
            scale = float(rng.uniform(0.5, 1.5))
            capital = capital_ids[int(rng.choice(len(capital_ids), p=[0.55, 0.15, 0.15, 0.15]))]
            yield plant(rng, graph, scale, capital), (scale, CAPITALS[capital])
        else:
            yield ({**graph[0], "task": "other"}, graph[1], graph[2]), None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(values: list[float]) -> str:
    return (f"n={len(values)} p50 {percentile(values, 50):.1f} ms, p95 {percentile(values, 95):.1f} ms, "
            f"max {max(values):.1f} ms")  # fmt: skip


def write_import_csvs(graphs: list[Graph], out: Path) -> list[str]:
    """The graphs as `neo4j-admin database import` CSVs in the model of `graph_schema` (what `GraphWriter` writes,
    less timestamps); returns the import tool's --nodes/--relationships arguments."""
    out.mkdir(parents=True, exist_ok=True)
    nodes = pa.concat_tables([g[1] for g in graphs])
    edges = pa.concat_tables([g[2] for g in graphs])

    def iid(pid: pa.ChunkedArray, index: pa.ChunkedArray) -> pa.ChunkedArray:
        return pc.binary_join_element_wise(pid, pc.cast(index, pa.string()), ":")

    def f64(column: pa.ChunkedArray) -> pa.ChunkedArray:
        return pc.cast(column, pa.float64())

    nodes = nodes.append_column("iid", iid(nodes.column("prompt_id"), nodes.column("node_index")))
    kind = nodes.column("kind")
    files: dict[str, pa.Table] = {}

    def instance(sel: pa.Table, extra: dict[str, pa.ChunkedArray]) -> pa.Table:
        cols = {
            ":ID(Inst)": sel.column("iid"),
            "prompt_id": sel.column("prompt_id"),
            "node_index:int": sel.column("node_index"),
            "node_id": sel.column("node_id"),
            "position:int": sel.column("position"),
            "influence:double": f64(sel.column("influence")),
            **extra,
        }
        return pa.table(cols)  # fmt: skip

    feats = nodes.filter(pc.equal(kind, "feature"))
    files["FeatureActivation"] = instance(feats, {"layer:int": feats.column("layer"),
                                                  "activation:double": f64(feats.column("activation"))})  # fmt: skip
    errs = nodes.filter(pc.equal(kind, "error"))
    files["ErrorNode"] = instance(
        errs, {"layer:int": errs.column("layer"), "norm:double": f64(errs.column("activation"))}
    )
    toks = nodes.filter(pc.equal(kind, "token"))
    files["InputToken"] = instance(toks, {"token_id:int": toks.column("token_id")})
    logs = nodes.filter(pc.equal(kind, "logit"))
    files["LogitTarget"] = instance(logs, {"token_id:int": logs.column("token_id"), "label": logs.column("token"),
                                           "probability:double": f64(logs.column("probability")),
                                           "logit:double": f64(logs.column("activation"))})  # fmt: skip
    features = pa.table({"key:ID(Feature)": feats.column("feature_key"), "layer:int": feats.column("layer"),
                         "index:int": feats.column("feature")}).group_by(["key:ID(Feature)", "layer:int",
                                                                          "index:int"]).aggregate([])  # fmt: skip
    features = features.append_column("transcoder", pa.array([TRANSCODER] * features.num_rows))
    features = features.append_column(
        "h:long", pa.array([node_hash(k) for k in features.column("key:ID(Feature)").to_pylist()], pa.int64())
    )
    linked = pa.concat_tables([toks.select(["token_id", "token", "iid"]), logs.select(["token_id", "token", "iid"])])
    token_keys = pc.binary_join_element_wise(pa.scalar(MODEL), pc.cast(linked.column("token_id"), pa.string()), "/")
    tokens = pa.table(
        {"key:ID(Token)": token_keys, "id:int": linked.column("token_id"), "text": linked.column("token")}
    )
    tokens = (
        tokens.group_by(["key:ID(Token)", "id:int"])
        .aggregate([("text", "min")])
        .rename_columns(["key:ID(Token)", "id:int", "text"])
    )
    tokens = tokens.append_column("model", pa.array([MODEL] * tokens.num_rows))
    tokens = tokens.append_column(
        "h:long", pa.array([node_hash(k) for k in tokens.column("key:ID(Token)").to_pylist()], pa.int64())
    )
    prompts = pa.table({
        "id:ID(Prompt)": [g[0]["id"] for g in graphs], "text": [g[0]["text"] for g in graphs],
        "model": [MODEL] * len(graphs), "transcoder": [TRANSCODER] * len(graphs), "run": ["bench"] * len(graphs),
        "task": [g[0]["task"] for g in graphs], "n_nodes:int": [g[1].num_rows for g in graphs],
        "n_edges:int": [g[2].num_rows for g in graphs], "schema_version:int": [SCHEMA_VERSION] * len(graphs),
        "replacement_score:double": [g[0]["replacement_score"] for g in graphs],
        "completeness_score:double": [g[0]["completeness_score"] for g in graphs],
    })  # fmt: skip
    rels = {
        "EDGE": pa.table({":START_ID(Inst)": iid(edges.column("prompt_id"), edges.column("source")),
                          ":END_ID(Inst)": iid(edges.column("prompt_id"), edges.column("target")),
                          "weight:double": f64(edges.column("weight"))}),
        "IN": pa.table({":START_ID(Inst)": nodes.column("iid"), ":END_ID(Prompt)": nodes.column("prompt_id")}),
        "OF_feature": pa.table(
            {":START_ID(Inst)": feats.column("iid"), ":END_ID(Feature)": feats.column("feature_key")}
        ),
        "OF_token": pa.table({":START_ID(Inst)": linked.column("iid"), ":END_ID(Token)": token_keys}),
        "FOR": pa.table({":START_ID(Transcoder)": [TRANSCODER], ":END_ID(Model)": [MODEL]}),
    }  # fmt: skip
    args = []
    for label, table in files.items():
        pcsv.write_csv(table, out / f"{label}.csv")
        args.append(f"--nodes=Instance:{label}={out / f'{label}.csv'}")
    for label, table in (("Feature", features), ("Token", tokens), ("Prompt", prompts),
                         ("Model", pa.table({"name:ID(Model)": [MODEL]})),
                         ("Transcoder", pa.table({"id:ID(Transcoder)": [TRANSCODER], "model": [MODEL]}))):  # fmt: skip
        pcsv.write_csv(table, out / f"{label}.csv")
        args.append(f"--nodes={label}={out / f'{label}.csv'}")
    for name, table in rels.items():
        pcsv.write_csv(table, out / f"rel_{name}.csv")
        args.append(f"--relationships={name.split('_')[0]}={out / f'rel_{name}.csv'}")
    return args


def bulk_import(server: LocalNeo4jServer, graphs: list[Graph], workdir: Path) -> float:
    """Offline `neo4j-admin database import full` of the graphs into the (stopped) server's `neo4j` database."""
    started = time.perf_counter()
    args = write_import_csvs(graphs, workdir / "csv")
    csv_s = time.perf_counter() - started
    cmd = [str(find_java()), "-Xmx2g", "-cp", str(server.lib_dir / "*"), NEO4J_ADMIN_MAIN_CLASS, "database", "import",
           "full", "neo4j", "--overwrite-destination=true", "--array-delimiter=;",
           f"--report-file={workdir / 'import.report'}", *args]  # fmt: skip
    env = {**os.environ, "NEO4J_HOME": str(server.instance_dir), "NEO4J_CONF": str(server.conf_dir)}
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"neo4j-admin import failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    shutil.rmtree(workdir / "csv")
    print(f"  CSVs written in {csv_s:.0f} s, imported in {time.perf_counter() - started - csv_s:.0f} s")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--edges", type=int, default=2600, help="edges per prompt")
    parser.add_argument("--features", type=int, default=250)
    parser.add_argument("--errors", type=int, default=200)
    parser.add_argument("--positions", type=int, default=48)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--planted", type=float, default=0.1, help="fraction of prompts with the planted circuit")
    parser.add_argument("--reps", type=int, default=100, help="timed path queries")
    parser.add_argument(
        "--loader",
        choices=["import", "writer"],
        default="import",
        help="offline neo4j-admin import (fast) or GraphWriter with its aggregates (slow, shared box)",
    )
    parser.add_argument(
        "--aggregates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --loader import: rebuild the aggregate layer after the import (timed)",
    )
    parser.add_argument("--heap", default="2g")
    parser.add_argument("--pagecache", default="2g")
    parser.add_argument("--timeout", type=float, default=10.0, help="server-side timeout of each query (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()  # fmt: skip
    print(f"start: {load_average()}")

    with tempfile.TemporaryDirectory(prefix="atlas-query-bench-") as tmp:
        server = LocalNeo4jServer(instance_dir=Path(tmp) / "instance", heap_initial=args.heap, heap_max=args.heap,
                                  pagecache=args.pagecache)  # fmt: skip
        try:
            started = time.perf_counter()
            connection = server.start()
            print(f"dedicated Neo4j started in {time.perf_counter() - started:.1f} s (heap {args.heap}, page cache "
                  f"{args.pagecache}, data in {tmp})")  # fmt: skip
            planted: dict[str, tuple[float, str]] = {}
            if args.loader == "import":
                started = time.perf_counter()
                graphs = []
                for graph, scale in prompts(args):
                    graphs.append(graph)
                    if scale is not None:
                        planted[graph[0]["id"]] = scale
                print(f"generated {len(graphs)} prompts in {time.perf_counter() - started:.0f} s; {load_average()}")
                server.stop()
                seconds = bulk_import(server, graphs, Path(tmp))
                del graphs
                connection = server.start()
                print(f"bulk import + restart: {seconds:.0f} s")
            with GraphDatabase.driver(connection.uri, auth=(connection.user, connection.password)) as driver:
                if args.loader == "import":
                    prepare_imported(driver, connection.database, args.aggregates)
                else:
                    planted = load_with_writer(driver, connection.database, args)
                run(driver, connection.database, args, Path(tmp), planted)
        finally:
            server.stop()
    print(f"server stopped and its data directory deleted; end: {load_average()}")


def prepare_imported(driver: Any, db: str, aggregates: bool) -> None:
    started = time.perf_counter()
    ensure_schema(driver, db)
    print(f"constraints and indexes online in {time.perf_counter() - started:.0f} s")
    if aggregates:
        result = rebuild_aggregates(driver, db)
        print(f"aggregate layer rebuilt: {result.relationships:,} AGG_EDGE in {result.seconds:.0f} s; {load_average()}")


def load_with_writer(driver: Any, db: str, args: argparse.Namespace) -> dict[str, tuple[float, str]]:
    writer = GraphWriter(driver, db)
    writer.ensure_schema()
    started = time.perf_counter()
    n_edges = 0
    planted: dict[str, tuple[float, str]] = {}
    batch: list[Graph] = []
    for graph, scale in prompts(args):
        if scale is not None:
            planted[graph[0]["id"]] = scale
        batch.append(graph)
        if len(batch) == 50:
            writer.write_prompts(batch)
            n_edges += sum(g[2].num_rows for g in batch)
            batch = []
    if batch:
        writer.write_prompts(batch)
        n_edges += sum(g[2].num_rows for g in batch)
    seconds = time.perf_counter() - started
    print(f"GraphWriter load: {n_edges / seconds:,.0f} edges/s incl. generation and aggregates; {load_average()}")
    return planted


def run(
    driver: Any, db: str, args: argparse.Namespace, data_dir: Path, planted_scales: dict[str, tuple[float, str]]
) -> None:
    writer = GraphWriter(driver, db)
    counts = writer.store_counts()
    size = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
    print(f"store: {counts.prompts} prompts, {counts.instance_nodes:,} instance nodes, {counts.edges:,} EDGE "
          f"relationships; {len(planted_scales)} planted prompts; on disk {size / 2**30:.2f} GiB")  # fmt: skip
    labels = {feature_key(TRANSCODER, *DALLAS): "Dallas", feature_key(TRANSCODER, *TEXAS): "Texas",
              feature_key(TRANSCODER, *CAPITAL): "say a capital"}  # fmt: skip
    writer.set_feature_labels(labels)

    q = AtlasQueries(driver, db, timeout_s=args.timeout)
    ov = q.overview().single
    print(f"overview: {ov.prompts} prompts, {ov.features:,} features, {ov.edges:,} edges, {ov.agg_edges:,} "
          f"aggregate edges, tasks {dict(ov.prompts_by_task)}")  # fmt: skip

    # Random sources weighted like a user's picks: features with 20..2000 activations (neither unique nor hubs).
    mid = driver.execute_query(
        "MATCH (f:Feature) WITH f, COUNT { (f)<-[:OF]-() } AS n WHERE 20 <= n <= 2000 RETURN f.key AS key, n",
        database_=db,
    ).records
    hub = driver.execute_query(
        "MATCH (f:Feature) RETURN f.key AS key, COUNT { (f)<-[:OF]-() } AS n ORDER BY n DESC LIMIT 1", database_=db
    ).records[0]
    print(f"{len(mid)} candidate random source features with 20..2000 activations; the top hub {hub['key']} has "
          f"{hub['n']:,} activations")  # fmt: skip
    rng = np.random.default_rng(args.seed + 1)
    dallas = feature_key(TRANSCODER, *DALLAS)
    capital_sets = [[" Austin"], [" Austin", " Sacramento"], list(CAPITALS.values())[:3], list(CAPITALS.values())]

    def planted_query() -> dict[str, Any]:
        return {"sources": [dallas], "target_tokens": [" Austin", " Sacramento"], "max_hops": 3,
                "min_abs_weight": 0.05, "limit": 25}  # fmt: skip

    def varied(i: int) -> tuple[str, dict[str, Any]]:
        kind = ["key", "label", "random", "random+planted"][i % 4]
        if kind == "key":
            sources = [dallas]
        elif kind == "label":
            sources = [["Dallas", "Texas"], ["Texas"], ["say a capital"]][i % 3]
        elif kind == "random":
            sources = [str(mid[int(j)]["key"]) for j in rng.choice(len(mid), 3, replace=False)]
        else:
            sources = [dallas, str(mid[int(rng.integers(0, len(mid)))]["key"])]
        return kind, {
            "sources": sources,
            "target_tokens": capital_sets[int(rng.integers(0, len(capital_sets)))],
            "max_hops": int(rng.integers(2, 5)),
            "min_abs_weight": float(rng.choice([0.02, 0.05, 0.1])),
            "limit": int(rng.choice([10, 25, 50])),
        }

    def call(params: dict[str, Any]) -> tuple[float, Any]:
        t0 = time.perf_counter()
        try:
            result = q.paths_to_logits(params["sources"], params["target_tokens"], max_hops=params["max_hops"],
                                       min_abs_weight=params["min_abs_weight"], limit=params["limit"])  # fmt: skip
        except QueryError as exc:
            return 1000 * (time.perf_counter() - t0), exc
        return 1000 * (time.perf_counter() - t0), result

    # Warm-up: hops are inlined in the Cypher text, so each value has its own cached plan (a server that has been
    # serving a while has them all); then a few varied queries.
    for hops in range(1, 5):
        call({**planted_query(), "max_hops": hops})
    for i in range(8):
        call(varied(i)[1])
    ms, top = call(planted_query())
    assert not isinstance(top, QueryError), top
    targets = set(planted_query()["target_tokens"])
    best = max((pid for pid, (_, text) in planted_scales.items() if text in targets),
               key=lambda pid: planted_scales[pid][0])  # fmt: skip
    first = top.rows[0]
    print(f"planted query ({ms:.0f} ms): {len(top.rows)} paths; first {first.prompt_id} hops {first.hops} strength "
          f"{first.strength:.4f} via {[n.key for n in first.nodes]}; expected first {best} (largest planted scale "
          f"{planted_scales[best][0]:.3f} among prompts planted with a target capital; ranked first: "
          f"{first.prompt_id == best})")  # fmt: skip

    times: dict[str, list[float]] = {}
    failures = 0
    print(f"timing {args.reps} path queries: {load_average()}")
    for i in range(args.reps):
        kind, params = varied(i)
        ms, result = call(params)
        if isinstance(result, QueryError):
            failures += 1
            print(f"  query {i} ({kind}) failed after {ms:.0f} ms: {result}")
        times.setdefault(kind, []).append(ms)
        times.setdefault(f"max_hops={params['max_hops']}", []).append(ms)
        times.setdefault(f"min_abs_weight={params['min_abs_weight']}", []).append(ms)
        times.setdefault("all", []).append(ms)
    print(f"paths_to_logits over {counts.edges:,} edges: {summary(times['all'])} (goal p95 < 500 ms; "
          f"{failures} errors/timeouts)")  # fmt: skip
    for kind in ("key", "label", "random", "random+planted"):
        if kind in times:
            print(f"  sources by {kind}: {summary(times[kind])}")
    for kind in sorted(k for k in times if "=" in k):
        print(f"  {kind}: {summary(times[kind])}")
    ms_hub, hub_result = call({"sources": [str(hub["key"])], "target_tokens": [" Austin"], "max_hops": 3,
                               "min_abs_weight": 0.05, "limit": 25})  # fmt: skip
    outcome = f"error: {hub_result}" if isinstance(hub_result, QueryError) else f"{len(hub_result.rows)} paths"
    print(f"  from the top hub feature ({hub['n']:,} activations), 3 hops, |w| >= 0.05: {ms_hub:.0f} ms ({outcome})")
    print(f"after the path queries: {load_average()}")

    others: dict[str, Callable[[], Any]] = {
        "top_features_for_logit(' Austin')": lambda: q.top_features_for_logit(" Austin"),
        "neighbourhood(Texas, down, aggregated)": lambda: q.neighbourhood(feature_key(TRANSCODER, *TEXAS), "down"),
        "neighbourhood(random, up, aggregated)": lambda: q.neighbourhood(str(mid[0]["key"]), "up"),
        "prompts_where_feature_matters(Dallas)": lambda: q.prompts_where_feature_matters(dallas),
        "prompt_graph(one prompt)": lambda: q.prompt_graph("bench-q-0"),
        "shared_subgraph(5 planted prompts, k=3)": lambda: q.shared_subgraph(list(planted_scales)[:5], 3),
        "overview()": q.overview,
    }
    for name, fn in others.items():
        values = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            values.append(1000 * (time.perf_counter() - t0))
        print(f"  {name}: median {statistics.median(values):.0f} ms, max {max(values):.0f} ms over 5")


if __name__ == "__main__":
    main()
