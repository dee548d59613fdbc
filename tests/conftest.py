"""Shared fixtures: tiny models (session-scoped, built once) and small on-disk corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas.models import LoadedModel, load_model

# Neo4j fixtures: NEO4J_URI, else testcontainers with a Docker engine, else the managed local server.
pytest_plugins = ["neo4j_fixtures"]


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2() -> LoadedModel:
    return load_model("tiny-gpt2")


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.\n"
    "All that glitters is not gold; all who wander are not lost. The old that is strong does not wither.\n"
)


@pytest.fixture
def jsonl_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as handle:
        for i in range(200):
            handle.write(json.dumps({"text": f"Document {i}. {SAMPLE_TEXT}", "id": i}) + "\n")
    return path
