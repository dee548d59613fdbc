"""Ingest throughput: prompts/s through the Dask pipeline vs an in-process loop over the same prompts, same run.

Modes, each over the same prompts and the same transcoders, into the same Neo4j (each mode's prompts are deleted
before the next, so every mode writes into the same store state) and its own DuckDB file:
- `in-process`: `run_ingest(workers=0)`: the same batch task and loader, called in a plain loop in this process
  (no Dask, no overlap of computing and loading), torch on all cores;
- `dask-1`, `dask-2`: a `LocalCluster` of 1 or 2 worker processes (the cores shared out as torch threads: 2 or 1
  each here), the loader in this process.
For each mode it prints the end-to-end time (cluster start and model loading included), the steady-state rate over
the compute-and-load phase, the time the tasks spent computing (summed over workers), the loader's Neo4j time, and
the Dask/in-process ratios (goal: Dask overhead ≤ 10%). The machine's load
average is printed too: other processes share the cores.

    .venv/bin/python benchmarks/ingest_throughput.py [--model tiny-llama|smollm2-135m-instruct] [--prompts 48]
        [--transcoders DIR] [--modes in-process,dask-1,dask-2] [--batch 4]

With the tiny model and no `--transcoders` it saves random transcoders in a temporary directory. With `NEO4J_URI`
unset it starts a managed local Neo4j in a temporary directory and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from neo4j import GraphDatabase

from atlas.storage.neo4j_server import LocalNeo4jServer, Neo4jConnection, resolve_connection
from atlas.storage.neo4j_writer import GraphWriter
from ingest.demo_corpus import demo_corpus_path
from ingest.pipeline import IngestOptions, IngestReport, run_ingest


@contextlib.contextmanager
def neo4j(tmp: Path) -> Iterator[Neo4jConnection]:
    connection = resolve_connection()
    if connection is not None:
        yield connection
        return
    server = LocalNeo4jServer(instance_dir=tmp / "neo4j")
    try:
        yield server.start()
    finally:
        server.stop()


def tiny_transcoders(directory: Path) -> Path:
    import torch

    from atlas.transcoders import TranscoderSpec, build_transcoder, save_transcoder

    torch.manual_seed(0)
    transcoder = build_transcoder(TranscoderSpec(kind="clt", n_layers=2, d_model=32, n_features=8))
    with torch.no_grad():
        transcoder.b_enc.fill_(0.05)  # about half the features active, as in tests/test_ingest.py
    return save_transcoder(transcoder, directory, model_name="tiny-llama")


def corpus(path: Path, n: int, max_chars: int) -> Path:
    """`n` demo-corpus prompts (cycled), each at most `max_chars` long."""
    records = [json.loads(line) for line in demo_corpus_path().read_text().splitlines() if line]
    records = [r for r in records if len(r["text"]) <= max_chars]
    with path.open("w") as handle:
        for i in range(n):
            record = records[i % len(records)]
            suffix = f" ({i // len(records)})" if i >= len(records) else ""
            handle.write(json.dumps({**record, "text": record["text"] + suffix}) + "\n")
    return path


def run_mode(mode: str, args: argparse.Namespace, tmp: Path, corpus_path: Path, transcoders: Path,
             connection: Neo4jConnection) -> IngestReport:  # fmt: skip
    workers = 0 if mode == "in-process" else int(mode.split("-")[1])
    options = IngestOptions(
        corpus=corpus_path,
        transcoders=transcoders,
        model=args.model,
        workers=workers,
        run=mode,
        runs_root=tmp / "runs",
        stats_db=tmp / f"{mode}.duckdb",
        batch_prompts=args.batch,
        progress=False,
    )
    started = time.perf_counter()
    report = run_ingest(options, connection=connection)
    report.timings["wall"] = time.perf_counter() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--transcoders", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--modes", default="in-process,dask-1,dask-2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as name, neo4j(Path(name)) as connection:
        tmp = Path(name)
        transcoders = args.transcoders or tiny_transcoders(tmp / "transcoders")
        max_chars = 60 if args.model.startswith("tiny") else 400  # the tiny model's context is 64 characters
        corpus_path = corpus(tmp / "corpus.jsonl", args.prompts, max_chars)
        load_before = os.getloadavg()
        results: dict[str, IngestReport] = {}
        driver = GraphDatabase.driver(connection.uri, auth=(connection.user, connection.password))
        try:
            for mode in args.modes.split(","):
                report = run_mode(mode, args, tmp, corpus_path, transcoders, connection)
                results[mode] = report
                ids = [r["id"] for r in driver.execute_query(
                    "MATCH (p:Prompt {run: $run, transcoder: $t}) RETURN p.id AS id", run=mode,
                    t=report.transcoder_id).records]  # fmt: skip
                writer = GraphWriter(driver, connection.database)
                for pid in ids:
                    writer.delete_prompt(pid)
        finally:
            driver.close()
        load_after = os.getloadavg()
    loads = f"before {load_before[0]:.2f}/{load_before[1]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}"
    print(f"\nmodel {args.model}, {args.prompts} prompts, batch {args.batch}; {os.cpu_count()} cores; load {loads}")
    print(f"{'mode':<12}{'computed':>9}{'edges':>9}{'wall s':>9}{'steady s':>10}{'prompts/s':>11}{'steady p/s':>12}"
          f"{'worker s':>10}{'neo4j s':>9}")  # fmt: skip
    rates: dict[str, tuple[float, float]] = {}
    for mode, report in results.items():
        wall = report.timings["wall"]
        steady = report.timings.get("compute_and_load", wall)
        rates[mode] = (report.computed / wall, report.computed / steady)
        worker = sum(report.worker_timings.values())  # summed over workers: attribute, prune, stats, write
        print(f"{mode:<12}{report.computed:>9}{report.edges_written:>9}{wall:>9.1f}{steady:>10.1f}"
              f"{rates[mode][0]:>11.2f}{rates[mode][1]:>12.2f}{worker:>10.1f}"
              f"{report.timings.get('load_neo4j', 0.0):>9.1f}")  # fmt: skip
    if "in-process" in rates:
        base_wall, base_steady = rates["in-process"]
        for mode in (m for m in rates if m != "in-process"):
            wall, steady = rates[mode]
            print(f"{mode} vs in-process: end-to-end {wall / base_wall:.2f}x, steady state {steady / base_steady:.2f}x"
                  f" (overhead {100 * (1 - steady / base_steady):+.1f}% steady)")  # fmt: skip
    if "dask-1" in rates and "dask-2" in rates:
        print(f"dask-2 vs dask-1: end-to-end {rates['dask-2'][0] / rates['dask-1'][0]:.2f}x, steady state "
              f"{rates['dask-2'][1] / rates['dask-1'][1]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
