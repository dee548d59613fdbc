"""`atlas global …`: input-independent global weights of a dictionary into DuckDB (and optionally Neo4j).

    atlas global weights --transcoders runs/demo/transcoders --k 64          # every feature's top-64, stored
    atlas global twera --transcoders runs/demo/transcoders --corpus prompts.txt   # TWERA / ERA over a corpus
    atlas global show --transcoders runs/demo/transcoders --feature 3/17     # one feature's stored partners
    atlas global compare --transcoders runs/demo/transcoders     # Spearman vs the stored AGG_EDGE mean attribution
    atlas global neo4j --transcoders runs/demo/transcoders       # GLOBAL_WEIGHT relationships between stored Features
    atlas global motifs mine|update|list                         # recurring paths (atlas_cli.motif_commands)
    atlas global clusters build|list                             # prompts grouped by shared circuitry

The dictionary is checked against the model before anything loads (layer count, width, the model it was trained on);
the whole result is computed before the store is touched, and written by snapshot swap, replacing the previous rows
of the same (dictionary, norm): a failed run leaves the store as it was, a re-run stores the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from atlas.config import DEFAULT_MODEL
from atlas_cli.common import TRANSCODERS_HELP, console, fail, store_driver, transcoder_directory, user_errors

global_app = typer.Typer(help="Global circuits: input-independent weights between features, tokens and logits.")


def _errors() -> tuple[type[BaseException], ...]:
    from atlas.analysis.coactivation import CoactivationError
    from atlas.analysis.global_weights import GlobalWeightsError
    from atlas.storage.global_weights import GlobalWeightsStoreError

    return (*user_errors(), GlobalWeightsError, GlobalWeightsStoreError, CoactivationError)


@global_app.command("weights")
def weights(
    source: Annotated[str, typer.Option("--transcoders", help=TRANSCODERS_HELP)],
    model: Annotated[str, typer.Option(help="Model the transcoders belong to.")] = DEFAULT_MODEL,
    k: Annotated[
        int, typer.Option(min=1, help="Partners kept per feature and relation (≤ the dictionary's size).")
    ] = 64,
    norm: Annotated[str, typer.Option(help="fold (norm weights folded into readers) | ignore.")] = "fold",
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB statistics file (default: $ATLAS_STATS_DB).")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda (default: cuda when present).")] = "",
    tile: Annotated[int, typer.Option(min=1, help="Tile edge of the chunked products.")] = 2048,
) -> None:
    """Compute every feature's top-k global weights (feature in/out, token in, logit out) and store them."""
    transcoders = transcoder_directory(source)  # a directory, or a published dictionary
    from atlas.transcoders.checks import check_transcoders_fit

    try:
        check_transcoders_fit(transcoders, model)  # milliseconds, before torch and the model load
    except _errors() as err:
        fail(err)
    import torch
    from rich.progress import Progress

    from atlas.analysis.global_weights import NORM_MODES, global_weights, residual_readers, to_table
    from atlas.config import stats_db_path
    from atlas.models import load_model
    from atlas.storage.global_weights import replace_global_weights
    from atlas.transcoders import check_compatible, load_transcoder, transcoder_identity

    try:
        if norm not in NORM_MODES:
            raise typer.BadParameter(f"--norm must be one of {NORM_MODES}, got {norm!r}")
        transcoder = load_transcoder(transcoders)
        total = transcoder.spec.n_layers * transcoder.spec.n_features
        if k > total:
            raise ValueError(f"--k {k} is more than the dictionary's {total} features")
        with console.status(f"loading {model}…"):
            loaded = load_model(model)
        check_compatible(
            transcoder.spec, n_layers=loaded.info.n_layers, d_model=loaded.info.d_model, model_name=loaded.info.name
        )
        readers = residual_readers(loaded, norm)
        transcoder_id = transcoder_identity(transcoders).id
        where = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with Progress(console=console, transient=True) as bar:
            tasks: dict[str, Any] = {}

            def progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done)

            result = global_weights(transcoder, readers, k, tile=tile, device=where, progress=progress)
        table = to_table(result, transcoder_id)
        path = stats_db or stats_db_path()
        rows = replace_global_weights(path, table, transcoder_id=transcoder_id, norm=norm, model=loaded.info.name,
                                      k=k, n_layers=result.n_layers, n_features=result.n_features)  # fmt: skip
    except _errors() as err:
        fail(err)
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.timings.items())
    console.print(
        f"{rows} global weights of {transcoder_id} (k {k}, norm {norm}, {where}) stored in {path} ({timings})"
    )


def _number(value: float | None) -> str:
    """Four significant digits; blank for a missing value, and no "-0" (a pair that never co-activated has TWERA 0
    with V's sign)."""
    return "" if value is None else f"{value + 0.0:.4g}"


@global_app.command("show")
def show(
    source: Annotated[str, typer.Option("--transcoders", help=TRANSCODERS_HELP)],
    feature: Annotated[str, typer.Option(help="LAYER/INDEX of the feature.")],
    relation: Annotated[str | None, typer.Option(help="feature_out | feature_in | token_in | logit_out.")] = None,
    norm: Annotated[str, typer.Option(help="fold | ignore.")] = "fold",
    top: Annotated[int, typer.Option(min=1, help="Rows shown per relation.")] = 10,
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB statistics file (default: $ATLAS_STATS_DB).")] = None,
) -> None:
    """Print one feature's stored global weights (read-only)."""
    transcoders = transcoder_directory(source)  # a directory, or a published dictionary
    from atlas.config import stats_db_path
    from atlas.storage.global_weights import read_global_weights
    from atlas.transcoders import transcoder_identity

    layer_text, _, index_text = feature.partition("/")
    if not (layer_text.isdigit() and index_text.isdigit()):
        raise typer.BadParameter(f"--feature wants LAYER/INDEX, got {feature!r}")
    try:
        transcoder_id = transcoder_identity(transcoders).id
        rows = read_global_weights(stats_db or stats_db_path(), transcoder_id, int(layer_text), int(index_text),
                                   norm=norm, relation=relation)  # fmt: skip
    except _errors() as err:
        fail(err)
    table = Table("relation", "rank", "partner", "v", "twera", "era", title=f"global weights of {feature}")
    for row in rows:
        if row["rank"] >= top:
            continue
        partner = (
            f"{row['partner_layer']}/{row['partner']}" if row["partner_layer"] is not None else str(row["partner"])
        )
        twera, era = (_number(row[name]) for name in ("twera", "era"))
        table.add_row(row["relation"], str(row["rank"]), partner, _number(row["v"]), twera, era)
    Console().print(table)


@global_app.command("twera")
def twera(
    source: Annotated[str, typer.Option("--transcoders", help=TRANSCODERS_HELP)],
    corpus: Annotated[Path, typer.Option(help="Prompts: .txt (one per line), .jsonl or .parquet.")],
    model: Annotated[str, typer.Option(help="Model the transcoders belong to.")] = DEFAULT_MODEL,
    norm: Annotated[str, typer.Option(help="Which stored global weights: fold | ignore.")] = "fold",
    text_field: Annotated[str, typer.Option(help="JSONL/Parquet field holding the prompt.")] = "text",
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N prompts only.")] = None,
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB statistics file (default: $ATLAS_STATS_DB).")] = None,
) -> None:
    """Co-activation statistics of the stored feature pairs over a corpus: fill their TWERA and ERA (replaced)."""
    transcoders = transcoder_directory(source)  # a directory, or a published dictionary
    from ingest.preflight import INPUT_ERRORS, check_inputs

    try:
        check_inputs(corpus, transcoders, model)
    except INPUT_ERRORS as err:
        fail(err)
    from rich.progress import Progress

    from atlas.analysis.coactivation import corpus_activity
    from atlas.config import stats_db_path
    from atlas.models import load_model
    from atlas.storage.global_weights import stored_pairs, write_activity
    from atlas.transcoders import load_transcoder, transcoder_identity
    from ingest.prompts import read_corpus

    path = stats_db or stats_db_path()
    try:
        transcoder_id = transcoder_identity(transcoders).id
        pairs = stored_pairs(path, transcoder_id, norm)  # before any model work: nothing stored is a clear error
        records, _ = read_corpus(corpus, text_field=text_field)
        texts = [record.text for record in records][:limit]
        transcoder = load_transcoder(transcoders)
        with console.status(f"loading {model}…"):
            loaded = load_model(model)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("prompts", total=len(texts))
            table, stats = corpus_activity(loaded, transcoder, texts, pairs,
                                           progress=lambda done: bar.update(task, completed=done))  # fmt: skip
        write_activity(path, table, transcoder_id=transcoder_id, norm=norm, corpus=str(corpus.resolve()),
                       n_tokens=stats.n_tokens)  # fmt: skip
    except _errors() as err:
        fail(err)
    console.print(f"TWERA/ERA of {table.num_rows} feature pairs over {len(texts)} prompts ({stats.n_tokens} tokens)"
                  f" stored in {path}")  # fmt: skip


@global_app.command("compare")
def compare(
    source: Annotated[str, typer.Option("--transcoders", help=TRANSCODERS_HELP)],
    norm: Annotated[str, typer.Option(help="Which stored global weights: fold | ignore.")] = "fold",
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB statistics file (default: $ATLAS_STATS_DB).")] = None,
) -> None:
    """Spearman of the corpus's mean attribution (AGG_EDGE) against V and TWERA, over the pairs stored in both."""
    transcoders = transcoder_directory(source)  # a directory, or a published dictionary
    from atlas.analysis.global_vs_empirical import compare as compare_rows
    from atlas.analysis.global_vs_empirical import parse_feature_key
    from atlas.config import stats_db_path
    from atlas.storage.aggregate import aggregate_rows
    from atlas.storage.global_weights import stored_pairs
    from atlas.transcoders import transcoder_identity

    try:
        transcoder_id = transcoder_identity(transcoders).id
        pairs = stored_pairs(stats_db or stats_db_path(), transcoder_id, norm).to_pylist()
        driver, database = store_driver(start=True)
        with driver:
            aggregates = aggregate_rows(driver, database, transcoder=transcoder_id)
    except _errors() as err:
        fail(err)
    result = compare_rows(
        (((r["source_layer"], r["source"], r["target_layer"], r["target"]), r["v"], r["twera"]) for r in pairs),
        (((*parse_feature_key(a.source_key), *parse_feature_key(a.target_key)), a.mean_weight)
         for a in aggregates if a.target_kind == "feature"),
    )  # fmt: skip
    console.print(
        f"{result.n_matched} pairs in both ({result.n_global_pairs} stored global, {result.n_empirical_pairs}"
        f" aggregated): Spearman(mean attribution, V) {result.spearman_v:.3f}; with TWERA ({result.n_with_twera}"
        f" pairs) {result.spearman_twera:.3f}"
    )


@global_app.command("neo4j")
def neo4j_relationships(
    source: Annotated[str, typer.Option("--transcoders", help=TRANSCODERS_HELP)],
    norm: Annotated[str, typer.Option(help="Which stored global weights: fold | ignore.")] = "fold",
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB statistics file (default: $ATLAS_STATS_DB).")] = None,
) -> None:
    """Copy the stored feature → feature global weights (with TWERA/ERA) to Neo4j as GLOBAL_WEIGHT (replaced)."""
    transcoders = transcoder_directory(source)  # a directory, or a published dictionary
    from atlas.config import stats_db_path
    from atlas.storage.global_weights import feature_rows, write_global_weight_relationships
    from atlas.transcoders import transcoder_identity

    try:
        transcoder_id = transcoder_identity(transcoders).id
        rows = feature_rows(stats_db or stats_db_path(), transcoder_id, norm)
        driver, database = store_driver(start=True)
        with driver:
            created = write_global_weight_relationships(
                driver, rows, transcoder_id=transcoder_id, norm=norm, database=database
            )
    except _errors() as err:
        fail(err)
    console.print(f"{created} GLOBAL_WEIGHT relationships of {len(rows)} stored pairs (the others have an endpoint"
                  " no stored prompt activated)")  # fmt: skip


def register(app: typer.Typer) -> None:
    from atlas_cli.motif_commands import clusters, motifs

    global_app.command("motifs")(motifs)
    global_app.command("clusters")(clusters)
    app.add_typer(global_app, name="global")
