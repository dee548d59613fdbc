"""How long a bad Cypher console query blocks the console, and how long the server keeps working on it.

Starts a throwaway managed Neo4j (default heap, 1 GiB) on loopback in a temporary directory, runs a few queries that
exhaust memory or time through `app.cypher.run_read_query` with the console's default 15 s timeout, and prints for
each: how long the call blocked, when the server released the query's thread, whether the same JVM is still up, and
the console's message. `.venv/bin/python benchmarks/console_bounds.py [--timeout 15] [--quadratic]`
(`--quadratic` adds the quadratic string `reduce`, which keeps one server core busy for many minutes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from neo4j import GraphDatabase

from app.cypher import ConsoleGate, CypherError, CypherRejected, run_read_query
from atlas.storage.neo4j_server import LocalNeo4jServer

QUERIES = {
    "reduce over 10^9": "RETURN reduce(s = 0, x IN range(1, 1000000000) | s + x) AS n",
    "collect 10^8": "UNWIND range(1, 100000000) AS x WITH collect(x) AS xs RETURN size(xs) AS n",
    "comprehension 10^8 (untracked)": "RETURN size([x IN range(1, 100000000) | toString(x)]) AS n",
    "distinct 2*10^7": "UNWIND range(1, 20000000) AS x WITH DISTINCT x RETURN count(x) AS n",
}
QUADRATIC = "RETURN size(reduce(s = '', x IN range(1, 100000000) | s + 'abcdefghij')) AS n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--quadratic", action="store_true")
    args = parser.parse_args()
    queries = dict(QUERIES, **({"quadratic string reduce": QUADRATIC} if args.quadratic else {}))
    with tempfile.TemporaryDirectory(prefix="atlas-console-bench-") as tmp:
        server = LocalNeo4jServer(instance_dir=Path(tmp) / "neo4j")
        connection = server.start()
        pid = server.status()["pid"]
        driver = GraphDatabase.driver(connection.uri, auth=(connection.user, connection.password))
        try:
            for name, query in queries.items():
                gate = ConsoleGate(1)
                started = time.perf_counter()
                try:
                    run_read_query(driver, query, timeout_s=args.timeout, gate=gate)
                    message = "completed"
                except (CypherError, CypherRejected) as err:
                    message = str(err)[:110]
                blocked = time.perf_counter() - started
                released = gate.wait_idle(600)
                busy = time.perf_counter() - started
                status = server.status()
                alive = status["running"] and status["pid"] == pid
                print(
                    f"{name}: console blocked {blocked:.1f} s; server thread "
                    f"{'released after' if released else 'still busy after'} {busy:.1f} s; same JVM up: {alive}; "
                    f"{message}",
                    flush=True,
                )
        finally:
            driver.close()
            server.stop(timeout_s=20)


if __name__ == "__main__":
    main()
