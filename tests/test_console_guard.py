"""Issue 17 §2: the Cypher console must not hurt the server or reveal what it should not.

Pure tests of the guard's tokenizer and refusals, then, for each class (information leaks, memory, time, bytes),
several queries run through `run_read_query` against a real Neo4j of our own: a `LocalNeo4jServer` with a small heap
(so memory limits are reached in seconds), loopback only. After each, the same JVM must still be alive, answer
`RETURN 1`, and the store must be unchanged. Runaway queries use a 2 s console timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from neo4j import Driver, GraphDatabase

from app.config import load_config
from app.cypher import ConsoleGate, CypherError, CypherRejected, approx_bytes, run_read_query
from app.cypher_guard import check_read_only, qualified_name, tokenize
from atlas.storage.neo4j_server import JVM_FLAGS, LocalNeo4jServer, parse_size, transaction_memory

# -- the guard, pure ------------------------------------------------------------------------------------------------

LEAKS = [
    # back-quoted, spaced, commented and re-cased procedure names resolve to the refused procedure
    ("CALL `db`.`stats`.`collect`('QUERIES')", "db.stats.collect"),
    ("CALL `db` . /* hidden */ stats . collect('QUERIES')", "db.stats.collect"),
    ("CALL db.stats.retrieve('QUERIES')", "db.stats.retrieve"),
    ("CALL `db`.stats.retrieveAllAnonymized('x')", "db.stats.retrieveAllAnonymized"),
    ("CALL DB.STATS.STOP('QUERIES')", "DB.STATS.STOP"),
    ("call `dbms`.listConfig()", "dbms"),
    ("CALL `dbms`.`listConnections`()", "dbms"),
    ("CALL dbms // line comment\n.queryJmx('*:*')", "dbms"),
    ("CALL { CALL `dbms`.listConfig() YIELD name RETURN name } RETURN name", "dbms"),
    ("MATCH (n) CALL { WITH n CALL db.stats.status() YIELD status RETURN status } RETURN 1", "db.stats.status"),
    ("CALL tx.setMetaData({a: 1})", "tx.setMetaData"),
    ("CALL db.clearQueryCaches()", "db.clearQueryCaches"),
    ("CALL apoc.cypher.run('SHOW SETTINGS', {})", "apoc.cypher.run"),
    ("MATCH (n) CALL apoc.convert.setJsonProperty(n, 'k', {})", "apoc.convert.setJsonProperty"),
    # functions that run text as Cypher, or outside the pure allow-list
    ("RETURN apoc.cypher.runFirstColumnSingle('SHOW TRANSACTIONS', {}) AS x", "apoc.cypher.runFirstColumnSingle"),
    ("RETURN `apoc` . `cypher`.runFirstColumnMany('x', {}) AS x", "apoc.cypher.runFirstColumnMany"),
    ("RETURN graph.names() AS x", "graph.names"),
    ("RETURN {x: apoc.cypher.runFirstColumnSingle('SHOW SETTINGS', {})} AS m", "apoc.cypher"),
    ("MATCH (n) RETURN n {.v, s: apoc.cypher.runFirstColumnMany('x', {})} AS m", "apoc.cypher"),
    ("RETURN CASE WHEN true THEN apoc.util.sleep(1000) END AS x", "apoc.util.sleep"),
    # SHOW forms other than indexes, constraints, functions and procedures
    ("SHOW SETTINGS", "SHOW SETTINGS"),
    ("show settings yield name, value return name, value", "SHOW SETTINGS"),
    ("SHOW TRANSACTIONS", "SHOW TRANSACTIONS"),
    ("SHOW TRANSACTIONS YIELD currentQuery, parameters RETURN currentQuery, parameters", "SHOW TRANSACTIONS"),
    ("SHOW ALL TRANSACTIONS", "SHOW ALL TRANSACTIONS"),
    ("SHOW CURRENT USER", "SHOW CURRENT"),
    ("SHOW USERS", "SHOW USERS"),
    ("SHOW USER PRIVILEGES", "SHOW USER PRIVILEGES"),
    ("SHOW DATABASES", "SHOW DATABASES"),
    ("SHOW SERVERS", "SHOW SERVERS"),
    ("SHOW ALIASES FOR DATABASE", "SHOW ALIASES"),
    ("SHOW /* x */ SETTINGS", "SHOW SETTINGS"),
    # unicode escapes (the server decodes them before parsing, even inside strings)
    ("CALL db.st\\u0061ts.collect('QUERIES')", "unicode"),
    ("RETURN 'a\\u0027 CREATE (n) //' AS s", "unicode"),
    ("MATCH (n:`\\u0041`) RETURN n", "unicode"),
    # prefixes
    ("EXPLAIN MATCH (n) RETURN n", "EXPLAIN"),
    ("PROFILE MATCH (n) RETURN n", "PROFILE"),
    ("CYPHER runtime=slotted MATCH (n) RETURN n", "CYPHER"),
    # writes
    ("INSERT (n:Hacked)", "INSERT"),
    ("insert (:Hacked)-[:R]->(:Hacked)", "INSERT"),
    ("TERMINATE TRANSACTIONS 'neo4j-transaction-1'", "TERMINATE"),
    ("MATCH (n) CALL { WITH n DETACH DELETE n } IN 10 ROWS OF TRANSACTIONS RETURN 1", "DETACH"),
    ("CALL { MATCH (n) RETURN n } IN 2 CONCURRENT TRANSACTIONS RETURN 1", "TRANSACTIONS"),
    ("RETURN 'x", "unterminated"),
    ("MATCH (n:`x) RETURN n", "unterminated"),
    ("RETURN 1 /* x", "unterminated"),
]
READS_OK = [
    "SHOW INDEXES",
    "SHOW ALL INDEXES YIELD name, labelsOrTypes RETURN name, labelsOrTypes",
    "SHOW RANGE INDEXES",
    "SHOW CONSTRAINTS",
    "SHOW BUILT IN FUNCTIONS YIELD name RETURN count(*) AS n",
    "SHOW PROCEDURES YIELD name RETURN name",
    "CALL `db`.`labels`()",
    "RETURN date.truncate('day', datetime()) AS d, duration.between(date(), date()) AS z",
    "MATCH p = (a)-[:R*1..3]->(b) RETURN reduce(w = 1.0, r IN relationships(p) | w * r.weight) AS w",
    "MATCH (n:`Show`) WHERE n.transactions > 0 RETURN n.settings AS settings, n.insert AS transactions",
    "RETURN {show: 1, insert: 2} AS m",
    "RETURN 'CALL dbms.listConfig() SHOW SETTINGS' AS s",
    "MATCH (n) RETURN n.call AS call, n {.show, call: 1} AS m",
]


@pytest.mark.parametrize(("query", "word"), LEAKS)
def test_guard_refuses_leaks_writes_and_bypasses_with_a_reason(query: str, word: str) -> None:
    with pytest.raises(CypherRejected, match=word.replace(".", r"\.").replace("(", r"\(")):
        check_read_only(query)


@pytest.mark.parametrize("query", READS_OK)
def test_guard_lets_reader_queries_through(query: str) -> None:
    assert check_read_only(query) == query


def test_tokenizer_resolves_names_as_cypher_does() -> None:
    tokens = tokenize("CALL `db` . /* c */ `st``ats` // x\n . collect('Q') // tail")
    assert [t.kind for t in tokens][:6] == ["name", "qname", "punct", "qname", "punct", "name"]
    assert qualified_name(tokens, 1) == ("db.st`ats.collect", 6)
    assert [t.text for t in tokenize("RETURN 'a''b', \"c\\\"d\", $p, 1..3")] == [
        "RETURN", "'a'", "'b'", ",", '"c\\"d"', ",", "$p", ",", "1", ".", ".", "3",
    ]  # fmt: skip


def test_managed_server_limits_transaction_memory_and_survives_oom() -> None:
    assert parse_size("1g") == 2**30 and parse_size("384m") == 384 * 2**20 and parse_size("2048k") == 2**21
    limits = transaction_memory("1g")
    assert limits == {"db.memory.transaction.max": "256m", "dbms.memory.transaction.total.max": "512m"}
    assert "-XX:+ExitOnOutOfMemoryError" not in JVM_FLAGS


def test_console_user_settings() -> None:
    cfg = load_config({"ATLAS_CONSOLE_NEO4J_USER": " reader ", "ATLAS_CONSOLE_NEO4J_PASSWORD": "pw"})
    assert (cfg.console_user, cfg.console_password, cfg.console_max_mb) == ("reader", "pw", 32.0)
    assert load_config({}).console_user is None
    assert load_config({"ATLAS_CONSOLE_MAX_MB": "4"}).console_max_mb == 4.0


def test_approx_bytes_grows_with_content() -> None:
    assert approx_bytes("x" * 1000) > 1000 and approx_bytes([1] * 100) > 800
    assert approx_bytes({"a": ["x" * 10] * 10}) > 100


# -- against a real, small server -------------------------------------------------------------------------------------

TIMEOUT_S = 2.0
GRACE_S = 1.0
SLACK_S = 1.5  # the terminate wait (0.5 s) and a loaded 2-core machine


@dataclass
class Small:
    server: LocalNeo4jServer
    driver: Driver
    pid: int

    def fingerprint(self) -> tuple[int, int, int]:
        record = self.driver.execute_query(
            "MATCH (n) OPTIONAL MATCH (n)-[r]->() RETURN count(DISTINCT n) AS n, count(r) AS r, "
            "sum(coalesce(n.v, 0)) AS v"
        ).records[0]
        return record["n"], record["r"], record["v"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Small]:
    server = LocalNeo4jServer(
        instance_dir=tmp_path_factory.mktemp("console-neo4j"), heap_initial="256m", heap_max="384m", pagecache="32m"
    )
    connection = server.start()
    driver = GraphDatabase.driver(connection.uri, auth=(connection.user, connection.password))
    try:
        driver.execute_query("UNWIND range(1, 50) AS i CREATE (:Item {v: i})-[:R {weight: 0.5}]->(:Item {v: 0})")
        yield Small(server, driver, int(server.status()["pid"]))
    finally:
        driver.close()
        server.stop()


@pytest.fixture
def intact(small: Small) -> Iterator[Small]:
    """Yields the server; afterwards asserts the same JVM is up, answers, and the store is unchanged."""
    before = small.fingerprint()
    yield small
    status = small.server.status()
    assert status["running"] and status["pid"] == small.pid, "the managed server died"
    assert small.driver.execute_query("RETURN 1 AS ok").records[0]["ok"] == 1
    assert small.fingerprint() == before


def test_server_has_the_transaction_memory_limits(small: Small) -> None:
    settings = {
        r["name"]: r["value"]
        for r in small.driver.execute_query(
            "SHOW SETTINGS YIELD name, value WHERE name IN ['db.memory.transaction.max', "
            "'dbms.memory.transaction.total.max'] RETURN name, value"
        ).records
    }
    assert settings == {"db.memory.transaction.max": "96.00MiB", "dbms.memory.transaction.total.max": "192.00MiB"}


@pytest.mark.parametrize(("query", "word"), LEAKS)
def test_leaks_are_refused_on_a_real_server(intact: Small, query: str, word: str) -> None:
    stats = "CALL db.stats.status() YIELD section, status RETURN section, status ORDER BY section"
    before = intact.driver.execute_query(stats).records
    with pytest.raises(CypherRejected):
        run_read_query(intact.driver, query, timeout_s=TIMEOUT_S)
    assert intact.driver.execute_query(stats).records == before, "query collection was started or stopped"


@pytest.mark.parametrize("query", READS_OK[:7])
def test_reader_queries_run_on_a_real_server(intact: Small, query: str) -> None:
    result = run_read_query(intact.driver, query, timeout_s=10)
    assert result.columns


MEMORY = [
    "UNWIND range(1, 100000000) AS x WITH collect(x) AS xs RETURN size(xs) AS n",
    "MATCH (a:Item), (b:Item), (c:Item) WITH collect([a, b, c, range(1, 100)]) AS xs RETURN size(xs) AS n",
    "RETURN size([x IN range(1, 100000000) | toString(x)]) AS n",  # not tracked by Neo4j: a caught OOM
    "UNWIND range(1, 20000000) AS x WITH DISTINCT x RETURN count(x) AS n",
]


@pytest.mark.parametrize("query", MEMORY)
def test_memory_hogs_fail_with_a_message_and_the_server_survives(intact: Small, query: str) -> None:
    started = time.monotonic()
    with pytest.raises(CypherError, match=r"memory|timeout") as err:
        run_read_query(intact.driver, query, timeout_s=TIMEOUT_S, grace_s=GRACE_S, gate=ConsoleGate(1))
    assert time.monotonic() - started < TIMEOUT_S + GRACE_S + SLACK_S, "no retries, no waiting past the deadline"
    assert "server is still up" in str(err.value) or "timeout" in str(err.value)
    gate_idle(intact)


RUNAWAY_TEMPLATES = [
    "RETURN reduce(s = 0.0, x IN range(1, {n}) | s + x) AS n",
    "RETURN reduce(s = 0.0, x IN range(1, {n}) | s + sqrt(x)) AS n",
    "RETURN any(x IN range(1, {n}) WHERE x < 0) AS n",
]
RUNAWAY_SECONDS = 5 * TIMEOUT_S  # how long each runaway would run uninterrupted on this machine


def runaway_size(driver: Driver, template: str, target_s: float = RUNAWAY_SECONDS) -> int:
    """The range length at which ``template`` runs about ``target_s`` seconds on this server.

    A fixed size is not a runaway on every machine: one CI machine finished a 2e8-element reduce
    inside the 2 s deadline. The size is measured instead: grow the range fourfold until one run
    takes half a second (by then the JIT has compiled the loop), and scale that rate up.
    """
    n = 1_000_000
    while True:
        started = time.monotonic()
        driver.execute_query(template.format(n=n))
        elapsed = time.monotonic() - started
        if elapsed >= 0.5:
            return int(n * target_s / elapsed)
        n *= 4


def gate_idle(small: Small, gate: ConsoleGate | None = None) -> None:
    from app.cypher import DEFAULT_GATE

    assert (gate or DEFAULT_GATE).wait_idle(120), "the server kept evaluating for over 2 minutes"


@pytest.mark.parametrize("template", RUNAWAY_TEMPLATES)
def test_runaway_expressions_return_at_the_deadline(intact: Small, template: str) -> None:
    query = template.format(n=runaway_size(intact.driver, template))
    gate = ConsoleGate(1)
    started = time.monotonic()
    with pytest.raises(CypherError, match="timeout"):
        run_read_query(intact.driver, query, timeout_s=TIMEOUT_S, grace_s=GRACE_S, gate=gate)
    blocked = time.monotonic() - started
    assert blocked < TIMEOUT_S + GRACE_S + SLACK_S, f"the console blocked {blocked:.1f} s"
    if gate.in_flight:  # the server is still evaluating: the gate refuses a second query meanwhile
        with pytest.raises(CypherError, match="still running on the server"):
            run_read_query(intact.driver, "RETURN 1 AS x", gate=gate)
    assert gate.wait_idle(120), "the server kept evaluating for over 2 minutes"
    assert run_read_query(intact.driver, "RETURN 1 AS x", gate=gate).rows == [{"x": 1}]


def test_results_are_capped_in_bytes(intact: Small) -> None:
    wide = "UNWIND range(1, 5000) AS x RETURN x, reduce(s = '', i IN range(1, 100) | s + 'abcdefghij') AS s"
    result = run_read_query(intact.driver, wide, row_cap=10_000, max_bytes=2**20, max_value_bytes=2**19)
    assert result.truncated and "exceeds 1 MB" in result.truncated_reason
    assert 900 < len(result.rows) < 1100 and result.approx_bytes <= 2**20
    big = "RETURN reduce(s = '', i IN range(1, 20000) | s + 'abcdefghijklmnopqrstuvwxyz0123456789') AS s"
    with pytest.raises(CypherError, match="per value"):
        run_read_query(intact.driver, big, max_bytes=2**20, max_value_bytes=2**19)
    with pytest.raises(CypherError, match="per value"):
        run_read_query(intact.driver, "RETURN range(1, 200000) AS xs", max_value_bytes=2**19)
    rows = run_read_query(intact.driver, "UNWIND range(1, 50) AS x RETURN x", row_cap=10)
    assert rows.truncated and "row cap" in rows.truncated_reason and len(rows.rows) == 10


def test_writes_that_pass_the_text_check_are_still_refused(intact: Small) -> None:
    with pytest.raises(CypherRejected):
        run_read_query(intact.driver, "CALL db.createLabel('Hacked')")
    marker = Path(__file__)  # no LOAD CSV either, even of a local file
    with pytest.raises(CypherRejected, match="LOAD CSV"):
        run_read_query(intact.driver, f"LOAD CSV FROM 'file://{marker}' AS row RETURN row")


def test_console_connects_as_its_own_user_when_given(intact: Small) -> None:
    """Community has no roles, so the reader is not restricted by the server here; the test checks the wiring."""
    from app.resources import console_driver, driver

    system = intact.driver.session(database="system")
    with system:
        system.run("CREATE USER console_reader IF NOT EXISTS SET PASSWORD 'reader-pw' CHANGE NOT REQUIRED").consume()
    connection = intact.server.connection()
    assert connection is not None
    env = {
        "ATLAS_NEO4J_URI": connection.uri,
        "NEO4J_PASSWORD": connection.password,
        "ATLAS_CONSOLE_NEO4J_USER": "console_reader",
        "ATLAS_CONSOLE_NEO4J_PASSWORD": "reader-pw",
    }
    cfg = load_config(env)
    reader, admin = console_driver(cfg), driver(cfg)
    who = "SHOW CURRENT USER YIELD user RETURN user"
    assert reader.execute_query(who, database_="system").records[0]["user"] == "console_reader"
    assert admin.execute_query(who, database_="system").records[0]["user"] == "neo4j"
    assert console_driver(load_config({k: v for k, v in env.items() if "CONSOLE" not in k})) is admin
    result = run_read_query(reader, "MATCH (n:Item) RETURN count(n) AS n", admin_driver=admin)
    assert result.rows == [{"n": 100}]
    with intact.driver.session(database="system") as session:
        session.run("DROP USER console_reader").consume()
