"""Neo4j load throughput: `GraphWriter` vs a naive one-statement-per-node/edge writer, same data, same run.

Synthetic prompt graphs have the shape of a pruned `AttributionGraph.to_tables`: `--features` active features spread
over `--layers` layers and `--positions` positions (feature indices drawn Zipf-like from a dictionary, so popular
features recur across prompts and share their `:Feature` nodes), `--errors` error nodes (those pruning keeps), one
token node per position and 10 logit targets; `--edges` edges from features/errors/tokens to features/logits with
heavy-tailed degrees (endpoint popularity drawn from a Pareto law) and heavy-tailed signed weights.

`GraphWriter` writes `--prompts` prompts with one writer, then as many with two writer threads (one transaction per
prompt), both maintaining the aggregate layer (`atlas.storage.aggregate`, the writer's default), then as many with
aggregate maintenance deferred (`aggregates=False`, then `update_for_prompts` in batches of `--aggregate-batch`
prompts, the bulk-load path; rates of the write alone and of write + update), then re-ingests a quarter of
the first set (replacing them).
Before that, `--warmup` prompts are written twice, untimed: a fresh server's JIT needs about a million
relationships before its rates settle. The naive writer
sends one auto-commit statement per node and per edge, for `--naive-prompts` prompts (fewer: it is slow); rates are
per relationship, so the two are comparable, and ours' prompts are deleted first, so both write into the same store
state. `--big-edges` finally writes one large prompt in a single transaction, to show the size that
one-transaction-per-prompt still handles.

With `NEO4J_URI` unset it starts a managed local server (`LocalNeo4jServer`) in a temporary directory and stops it
at the end; with `NEO4J_URI` set it uses that server and deletes only what it wrote (prompt ids `bench-*`, the
benchmark's model, transcoder, features and tokens).

    .venv/bin/python benchmarks/neo4j_load.py [--prompts 200] [--naive-prompts 2] [--features 300] [--edges 4000]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from neo4j import Driver, GraphDatabase
from neo4j.exceptions import TransientError

from atlas.attribution.graph import EDGE_SCHEMA, NODE_SCHEMA, feature_key
from atlas.storage.aggregate import AggregateBacklogError, node_hash, update_for_prompts
from atlas.storage.graph_schema import token_key
from atlas.storage.migrations import ensure_schema
from atlas.storage.neo4j_server import LocalNeo4jServer, Neo4jConnection, resolve_connection
from atlas.storage.neo4j_writer import GraphWriter

MODEL = "bench-model"
TRANSCODER = "bench-clt"
VOCAB = 50_000
DICT_SIZE = 16_384


def synthetic_prompt(
    rng: np.random.Generator,
    prompt_id: str,
    *,
    n_layers: int = 30,
    n_pos: int = 64,
    n_features: int = 300,
    n_edges: int = 4000,
    n_errors: int = 300,
    n_logits: int = 10,
) -> tuple[dict[str, Any], pa.Table, pa.Table]:
    """One prompt graph as `(meta, nodes, edges)` in NODE_SCHEMA / EDGE_SCHEMA, node order as `NodeIndex`."""
    tokens = rng.integers(0, VOCAB, n_pos)
    # Distinct active (layer, position, feature) triples; feature ids Zipf-like so that features recur across prompts.
    triples: set[tuple[int, int, int]] = set()
    while len(triples) < n_features:
        feature = int(min(rng.zipf(1.4), DICT_SIZE) - 1)
        triples.add((int(rng.integers(0, n_layers)), int(rng.integers(0, n_pos)), feature))
    feats = sorted(triples)
    rows: dict[str, list[Any]] = {name: [] for name in NODE_SCHEMA.names}

    def add(kind: str, node_id: str, position: int, **values: Any) -> None:
        rows["prompt_id"].append(prompt_id)
        rows["node_index"].append(len(rows["node_index"]))
        rows["node_id"].append(node_id)
        rows["kind"].append(kind)
        rows["position"].append(position)
        for name in ("layer", "feature", "feature_key", "token_id", "token", "activation", "probability"):
            rows[name].append(values.get(name))
        rows["influence"].append(float(rng.random()))

    for layer, pos, feature in feats:
        add(
            "feature",
            f"{layer}_{feature}_{pos}",
            pos,
            layer=layer,
            feature=feature,
            feature_key=feature_key(TRANSCODER, layer, feature),
            activation=float(rng.exponential(2.0)),
        )
    # Pruning keeps the error nodes that carry influence: a sample of the (layer, position) grid, in NodeIndex order.
    n_errors = min(n_errors, n_layers * n_pos)
    for cell in np.sort(rng.choice(n_layers * n_pos, n_errors, replace=False)):
        layer, pos = divmod(int(cell), n_pos)
        add("error", f"{layer}_-1_{pos}", pos, layer=layer, activation=float(rng.exponential(1.0)))
    for pos in range(n_pos):
        add("token", f"E_{int(tokens[pos])}_{pos}", pos, token_id=int(tokens[pos]), token=f"tok{int(tokens[pos])}")
    probs = rng.dirichlet(np.ones(n_logits))
    for j in range(n_logits):
        tid = int(rng.integers(0, VOCAB))
        add("logit", f"{n_layers + 1}_{tid}_{n_pos - 1}", n_pos - 1, token_id=tid, token=f"tok{tid}",
            activation=float(rng.normal()), probability=float(probs[j]))  # fmt: skip
    n_nodes = len(rows["node_index"])
    nodes = pa.Table.from_pydict(rows, schema=NODE_SCHEMA)

    # Sources: features, errors, tokens; targets: features and logits. Popularity ~ Pareto => heavy-tailed degrees.
    src_pool = np.arange(0, n_features + n_errors + n_pos)
    tgt_pool = np.concatenate([np.arange(n_features), np.arange(n_nodes - n_logits, n_nodes)])
    src_p = rng.pareto(1.2, len(src_pool)) + 1e-3
    tgt_p = rng.pareto(1.2, len(tgt_pool)) + 1e-3
    tgt_p[-n_logits:] *= 50.0  # logits collect many edges
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_edges:
        k = 2 * (n_edges - len(pairs))
        s = rng.choice(src_pool, k, p=src_p / src_p.sum())
        t = rng.choice(tgt_pool, k, p=tgt_p / tgt_p.sum())
        pairs.update((int(a), int(b)) for a, b in zip(s, t, strict=True) if a != b)
    chosen = sorted(pairs)[:n_edges] if len(pairs) > n_edges else sorted(pairs)
    edges = pa.Table.from_pydict(
        {
            "prompt_id": [prompt_id] * len(chosen),
            "source": [a for a, _ in chosen],
            "target": [b for _, b in chosen],
            "weight": (rng.standard_t(2.0, len(chosen)) * 0.05).tolist(),
        },
        schema=EDGE_SCHEMA,
    )
    meta = {
        "id": prompt_id,
        "text": " ".join(f"tok{int(t)}" for t in tokens),
        "tokens": [int(t) for t in tokens],
        "model": MODEL,
        "transcoder": TRANSCODER,
        "run": "bench",
        "replacement_score": float(rng.random()),
        "completeness_score": float(rng.random()),
    }
    return meta, nodes, edges


_NAIVE_INPUT_TOKEN = (
    "MATCH (p:Prompt {id: $pid}) MERGE (t:Token {key: $key}) ON CREATE SET t.model = $model, t.id = $tid, "
    "t.text = $text, t.h = $h CREATE (n:InputToken:Instance {prompt_id: $pid, node_index: $i, node_id: $nid, "
    "position: $pos, "
    "token_id: $tid, influence: $inf})-[:IN]->(p), (n)-[:OF]->(t)"
)
_NAIVE_LOGIT = (
    "MATCH (p:Prompt {id: $pid}) MERGE (t:Token {key: $key}) ON CREATE SET t.model = $model, t.id = $tid, "
    "t.text = $text, t.h = $h CREATE (n:LogitTarget:Instance {prompt_id: $pid, node_index: $i, node_id: $nid, "
    "position: $pos, "
    "token_id: $tid, label: $text, probability: $prob, logit: $act, influence: $inf})-[:IN]->(p), (n)-[:OF]->(t)"
)


class NaiveWriter:
    """The baseline: one auto-commit statement per node and per edge, with the same graph model and indexes."""

    def __init__(self, driver: Driver, database: str = "neo4j") -> None:
        self.driver = driver
        self.database = database

    def write_prompt(self, meta: dict[str, Any], nodes: pa.Table, edges: pa.Table) -> tuple[float, float]:
        """Write one prompt; return (seconds for nodes, seconds for edges)."""
        pid = meta["id"]
        started = time.perf_counter()
        with self.driver.session(database=self.database) as s:
            s.run(
                "MERGE (m:Model {name: $model}) MERGE (t:Transcoder {id: $tc}) ON CREATE SET t.model = $model "
                "MERGE (t)-[:FOR]->(m) MERGE (p:Prompt {id: $pid}) SET p = $props",
                model=meta["model"], tc=meta["transcoder"], pid=pid,
                props={**meta, "n_nodes": nodes.num_rows, "n_edges": edges.num_rows},
            ).consume()  # fmt: skip
            for r in nodes.to_pylist():
                kind = r["kind"]
                common = {"pid": pid, "i": r["node_index"], "nid": r["node_id"], "pos": r["position"],
                          "inf": r["influence"], "act": r["activation"]}  # fmt: skip
                if kind == "feature":
                    s.run(
                        "MATCH (p:Prompt {id: $pid}) MERGE (f:Feature {key: $key}) "
                        "ON CREATE SET f.transcoder = $tc, f.layer = $layer, f.index = $feature, f.h = $h "
                        "CREATE (n:FeatureActivation:Instance {prompt_id: $pid, node_index: $i, node_id: $nid, "
                        "layer: $layer, position: $pos, activation: $act, influence: $inf})-[:IN]->(p), "
                        "(n)-[:OF]->(f)",
                        key=r["feature_key"], tc=meta["transcoder"], layer=r["layer"], feature=r["feature"],
                        h=node_hash(r["feature_key"]), **common,
                    ).consume()  # fmt: skip
                elif kind == "error":
                    s.run(
                        "MATCH (p:Prompt {id: $pid}) CREATE (n:ErrorNode:Instance {prompt_id: $pid, node_index: $i, "
                        "node_id: $nid, layer: $layer, position: $pos, norm: $act, influence: $inf})-[:IN]->(p)",
                        layer=r["layer"], **common,
                    ).consume()  # fmt: skip
                else:
                    s.run(
                        _NAIVE_INPUT_TOKEN if kind == "token" else _NAIVE_LOGIT,
                        key=token_key(meta["model"], r["token_id"]), model=meta["model"], tid=r["token_id"],
                        h=node_hash(token_key(meta["model"], r["token_id"])),
                        text=r["token"], prob=r["probability"], **common,
                    ).consume()  # fmt: skip
            nodes_done = time.perf_counter()
            src = edges.column("source").to_pylist()
            tgt = edges.column("target").to_pylist()
            wts = edges.column("weight").to_pylist()
            for a, b, w in zip(src, tgt, wts, strict=True):
                s.run(
                    "MATCH (a:Instance {prompt_id: $pid, node_index: $a}) "
                    "MATCH (b:Instance {prompt_id: $pid, node_index: $b}) CREATE (a)-[:EDGE {weight: $w}]->(b)",
                    pid=pid, a=a, b=b, w=w,
                ).consume()  # fmt: skip
        return nodes_done - started, time.perf_counter() - nodes_done


@contextlib.contextmanager
def neo4j_connection(heap: str, pagecache: str) -> Iterator[Neo4jConnection]:
    """`NEO4J_URI`'s server, else a managed local server in a temporary directory (stopped at the end)."""
    connection = resolve_connection()
    if connection is not None:
        yield connection
        return
    with tempfile.TemporaryDirectory(prefix="atlas-neo4j-bench-") as tmp:
        server = LocalNeo4jServer(instance_dir=Path(tmp) / "instance", heap_max=heap, pagecache=pagecache)
        try:
            started = time.perf_counter()
            connection = server.start()
            print(
                f"started a local Neo4j in {time.perf_counter() - started:.1f} s at {connection.uri} "
                f"(heap {heap}, page cache {pagecache})"
            )
            yield connection
        finally:
            server.stop()


def cleanup(driver: Driver, database: str) -> None:
    """Delete everything the benchmark wrote (bench prompts and the benchmark's global nodes), in batches."""
    for query in (
        "MATCH (f:Feature {transcoder: $tc})-[g:AGG_EDGE]->() CALL (g) { DELETE g } IN TRANSACTIONS OF 10000 ROWS",
        "MATCH (n:Instance) WHERE n.prompt_id STARTS WITH 'bench-' "
        "CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 5000 ROWS",
        "MATCH (p:Prompt) WHERE p.id STARTS WITH 'bench-' DETACH DELETE p",
        "MATCH (f:Feature {transcoder: $tc}) CALL (f) { DETACH DELETE f } IN TRANSACTIONS OF 5000 ROWS",
        "MATCH (t:Token {model: $model}) CALL (t) { DETACH DELETE t } IN TRANSACTIONS OF 5000 ROWS",
        "MATCH (t:Transcoder {id: $tc}) DETACH DELETE t",
        "MATCH (m:Model {name: $model}) DETACH DELETE m",
    ):
        with driver.session(database=database) as session:
            session.run(query, tc=TRANSCODER, model=MODEL).consume()


def count_aggregates(driver: Driver, database: str) -> int:
    """AGG_EDGE relationships in the store (the benchmark's only transcoder)."""
    return int(
        driver.execute_query("MATCH ()-[g:AGG_EDGE]->() RETURN count(g) AS n", database_=database).records[0]["n"]
    )


def rel_counts(graphs: list[tuple[dict[str, Any], pa.Table, pa.Table]]) -> tuple[int, int, int]:
    """(nodes, EDGE relationships, all relationships: EDGE + one IN per node + OF per feature/token/vocab logit)."""
    nodes = sum(g[1].num_rows for g in graphs)
    edges = sum(g[2].num_rows for g in graphs)
    linked = sum(
        g[1].filter(pc.or_(pc.is_in(g[1].column("kind"), pa.array(["feature", "token"])),
                           pc.is_valid(g[1].column("token_id")))).num_rows
        for g in graphs
    )  # fmt: skip
    return nodes, edges, edges + nodes + linked


def timed_write(
    writer: GraphWriter,
    graphs: list[tuple[dict[str, Any], pa.Table, pa.Table]],
    workers: int,
    what: str,
    *,
    pipelined: bool = True,
) -> float:
    """Write `graphs`, print the rates; return EDGE relationships/s."""
    started = time.perf_counter()
    results = writer.write_prompts(graphs, workers=workers, pipelined=pipelined)
    seconds = time.perf_counter() - started
    nodes, edges, rels = rel_counts(graphs)
    latencies = [r.seconds for r in results]
    print(
        f"{what}: {len(graphs)} prompts, {nodes} nodes, {edges} edges in {seconds:.2f} s\n"
        f"  EDGE relationships/s {edges / seconds:,.0f}; all relationships/s (EDGE+IN+OF) {rels / seconds:,.0f}; "
        f"nodes/s {nodes / seconds:,.0f}; prompts/s {len(graphs) / seconds:.1f}; per-prompt transaction "
        f"p50 {1000 * statistics.median(latencies):.0f} ms, max {1000 * max(latencies):.0f} ms"
    )
    return edges / seconds


def naive_rates(naive_writer: NaiveWriter, naive: list[tuple[dict[str, Any], pa.Table, pa.Table]], ours: float) -> None:
    """Write `naive` with the naive writer; print its rates and the ratio to `ours` (EDGE relationships/s)."""
    node_s = edge_s = 0.0
    for meta, nodes, edges in naive:
        a, b = naive_writer.write_prompt(meta, nodes, edges)
        node_s, edge_s = node_s + a, edge_s + b
    naive_nodes, naive_edges, _ = rel_counts(naive)
    naive_edge_rate = naive_edges / edge_s
    naive_all_rate = naive_edges / (node_s + edge_s)
    print(
        f"naive (one auto-commit statement per node / edge): {len(naive)} prompts, {naive_nodes} nodes in "
        f"{node_s:.1f} s, {naive_edges} edges in {edge_s:.1f} s\n"
        f"  EDGE relationships/s {naive_edge_rate:,.0f} (edge phase alone), {naive_all_rate:,.0f} (whole prompts)"
    )
    print(
        f"ratio GraphWriter (1 writer, whole prompts) / naive, EDGE relationships/s: "
        f"{ours / naive_edge_rate:.0f}x against the naive edge phase alone, "
        f"{ours / naive_all_rate:.0f}x against naive whole prompts"
    )


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts per timed GraphWriter run")
    parser.add_argument(
        "--warmup", type=int, default=100, help="untimed prompts written twice first (the server's JIT needs ~1M rels)"
    )
    parser.add_argument("--naive-prompts", type=int, default=2, help="prompts written by the naive writer")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--features", type=int, default=300, help="active features per prompt")
    parser.add_argument("--errors", type=int, default=300, help="error nodes kept per prompt (max layers*positions)")
    parser.add_argument("--edges", type=int, default=4000, help="edges per prompt")
    parser.add_argument("--batch-size", type=int, default=10_000, help="rows per UNWIND statement")
    parser.add_argument("--aggregate-batch", type=int, default=32, help="prompts per deferred aggregate update")
    parser.add_argument("--big-edges", type=int, default=200_000, help="edges of the single large prompt (0: skip)")
    parser.add_argument("--heap", default="1g", help="max heap of the managed server (ignored with NEO4J_URI)")
    parser.add_argument("--pagecache", default="128m", help="page cache of the managed server (ignored with NEO4J_URI)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rng = np.random.default_rng(args.seed)
    shape = {
        "n_layers": args.layers,
        "n_pos": args.positions,
        "n_features": args.features,
        "n_errors": args.errors,
        "n_edges": args.edges,
    }
    started = time.perf_counter()
    warm = [synthetic_prompt(rng, f"bench-warm-{i}", **shape) for i in range(args.warmup)]
    ours = [synthetic_prompt(rng, f"bench-ours-{i}", **shape) for i in range(args.prompts)]
    ours2 = [synthetic_prompt(rng, f"bench-ours2-{i}", **shape) for i in range(args.prompts)]
    in_tx = [synthetic_prompt(rng, f"bench-intx-{i}", **shape) for i in range(args.prompts)]
    plain = [synthetic_prompt(rng, f"bench-plain-{i}", **shape) for i in range(args.prompts)]
    naive = [synthetic_prompt(rng, f"bench-naive-{i}", **shape) for i in range(args.naive_prompts)]
    nodes0, edges0 = ours[0][1], ours[0][2]
    out_degree = np.bincount(edges0.column("source").to_numpy(), minlength=nodes0.num_rows)
    in_degree = np.bincount(edges0.column("target").to_numpy(), minlength=nodes0.num_rows)
    shared = len(set().union(*(set(g[1].column("feature_key").drop_null().to_pylist()) for g in ours)))
    n_nodes, n_edges, _ = rel_counts(ours)
    print(
        f"generated {len(warm) + len(ours) + len(ours2) + len(in_tx) + len(plain) + len(naive)} prompts in "
        f"{time.perf_counter() - started:.1f} s;"
        f" per prompt {n_nodes / len(ours):.0f} nodes ({args.features} features, {args.errors} errors, "
        f"{args.positions} tokens, 10 logits; {args.layers} layers), {n_edges / len(ours):.0f} edges; "
        f"out-degree max {out_degree.max()} / p99 {np.percentile(out_degree, 99):.0f} / median "
        f"{np.median(out_degree):.0f}, in-degree max {in_degree.max()}; {shared} distinct features over "
        f"{args.prompts * args.features} activations"
    )

    with neo4j_connection(args.heap, args.pagecache) as connection:
        db = connection.database
        with GraphDatabase.driver(connection.uri, auth=(connection.user, connection.password)) as driver:
            ensure_schema(driver, db)
            cleanup(driver, db)
            writer = GraphWriter(driver, db, batch_size=args.batch_size)
            writer.write_prompts(warm)
            writer.write_prompts(warm, workers=2)  # again: warms the replace (delete) path and the threaded path

            print(f"timed phases start: {load_average()}")
            agg_before = count_aggregates(driver, db)
            ours_started = time.perf_counter()
            ours_rate = timed_write(
                writer,
                ours,
                1,
                "GraphWriter.write_prompts, the default: 1 writer (one transaction per prompt), "
                "aggregates added by the background aggregator, timed until all are in",
            )
            ours_seconds = time.perf_counter() - ours_started
            agg_created = count_aggregates(driver, db) - agg_before
            print(
                f"  it also created {agg_created} AGG_EDGE relationships ({agg_created / len(ours):.0f} per prompt; "
                f"the rest of the pairs it touched existed); counting them, relationships created/s "
                f"{(rel_counts(ours)[2] + agg_created) / ours_seconds:,.0f}"
            )
            in_tx_rate = timed_write(
                writer, in_tx, 1, "GraphWriter, 1 writer, aggregates maintained INSIDE each prompt's transaction "
                "(write_prompts(pipelined=False))", pipelined=False
            )  # fmt: skip
            print(f"  pipelined / in-transaction, EDGE relationships/s: {ours_rate / in_tx_rate:.2f}x")
            timed_write(writer, ours2, 2, "GraphWriter, 2 writer threads (aggregates pipelined)")
            deferred_started = time.perf_counter()
            plain_rate = timed_write(
                GraphWriter(driver, db, batch_size=args.batch_size, aggregates=False), plain, 1,
                "GraphWriter, 1 writer, aggregates DEFERRED (aggregates=False, then update_for_prompts)",
            )  # fmt: skip
            agg_started = time.perf_counter()
            added = update_for_prompts(driver, [g[0]["id"] for g in plain], database=db,
                                       prompts_per_tx=args.aggregate_batch)  # fmt: skip
            agg_seconds = time.perf_counter() - agg_started
            total_seconds = time.perf_counter() - deferred_started
            _, plain_edges, plain_rels = rel_counts(plain)
            print(
                f"  then update_for_prompts: {added} prompts added to the aggregate layer in {agg_seconds:.2f} s "
                f"(batches of {args.aggregate_batch} prompts, one sweep each)\n"
                f"  deferred write + aggregate update together: EDGE relationships/s {plain_edges / total_seconds:,.0f}"
                f"; all relationships/s (EDGE+IN+OF) {plain_rels / total_seconds:,.0f}"
            )
            print(
                f"  aggregate maintenance costs, in EDGE relationships/s: pipelined {plain_rate / ours_rate:.2f}x, "
                f"in-transaction {plain_rate / in_tx_rate:.2f}x, "
                f"deferred {plain_rate / (plain_edges / total_seconds):.2f}x"
            )
            counts = writer.store_counts()
            print(f"  store: {counts}")
            timed_write(writer, ours[: max(1, len(ours) // 4)], 1, "re-ingest (replace) of existing prompts, 1 writer")
            print(f"  store unchanged by the re-ingest: {writer.store_counts() == counts}")

            cleanup(driver, db)
            if naive:
                naive_rates(NaiveWriter(driver, db), naive, ours_rate)
                cleanup(driver, db)

            if args.big_edges:
                big_shape = dict(shape, n_features=max(args.features, args.big_edges // 10), n_edges=args.big_edges)
                big_shape["n_errors"] = min(args.layers * args.positions, big_shape["n_features"])
                big = synthetic_prompt(rng, "bench-big", **big_shape)
                for mode in ("in-transaction", "pipelined", "off"):
                    big_writer = GraphWriter(driver, db, batch_size=args.batch_size, aggregates=mode != "off")
                    started = time.perf_counter()
                    try:
                        result = big_writer.write_prompts([big], pipelined=mode == "pipelined")[0]
                    except (TransientError, AggregateBacklogError) as exc:  # e.g. a too small transaction memory pool
                        print(f"one large prompt, aggregates {mode}: FAILED ({exc})")
                        cleanup(driver, db)
                        continue
                    seconds = time.perf_counter() - started
                    print(
                        f"one large prompt (its graph in one transaction), aggregates {mode}: "
                        f"{result.n_nodes} nodes, {result.n_edges} edges in {seconds:.2f} s "
                        f"({result.n_edges / seconds:,.0f} EDGE relationships/s)"
                    )
                    cleanup(driver, db)
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
