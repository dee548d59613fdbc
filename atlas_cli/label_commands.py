"""`atlas labels`: export and import user feature labels as JSON, import Neuronpedia explanations, show a history.

    atlas labels export --dictionary clt-3fa9c1d2e4b5a6f7 --out labels.json
    atlas labels import labels.json                               # the dictionary named in the file must be stored
    atlas labels import np.json --dictionary clt-… --neuronpedia-model gemma-2-2b --neuronpedia-source clt-hp
    atlas labels show clt-3fa9c1d2e4b5a6f7/9/23
    atlas labels explain --feature clt-…/9/23 --url http://localhost:8000/v1 --model qwen2.5-7b   # optional explainer

Every write goes through `atlas.storage.labels.write_user_labels` (one transaction: a bad entry or an unknown
feature writes nothing). Neo4j comes from `NEO4J_URI` (+ user, password), else the running managed server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from atlas_cli.common import console, fail, store_driver

labels_app = typer.Typer(help="Feature labels: export, import, history.", no_args_is_help=True)


@labels_app.command("export")
def export(
    dictionary: Annotated[str, typer.Option(help="Dictionary (transcoder) id whose user labels to export.")],
    out: Annotated[Path | None, typer.Option(help="Write here (default: standard output).")] = None,
) -> None:
    """Export the user labels and notes of one dictionary as JSON keyed by dictionary id, layer and index."""
    from atlas.storage.labels import LabelError, export_labels

    driver, database = store_driver()
    try:
        document = export_labels(driver, dictionary, database=database)
    except LabelError as err:
        fail(err)
    finally:
        driver.close()
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
        console.print(f"{len(document['labels'])} label(s) of {dictionary} written to {out}")


@labels_app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="An `atlas labels export` file or a Neuronpedia explanations export.")],
    dictionary: Annotated[
        str | None, typer.Option(help="Expected dictionary id (required with --neuronpedia-*).")
    ] = None,
    neuronpedia_model: Annotated[str | None, typer.Option(help="Neuronpedia modelId the export must have.")] = None,
    neuronpedia_source: Annotated[
        str | None, typer.Option(help="Neuronpedia source set: its `layer` fields are '<layer>-<source set>'.")
    ] = None,
    author: Annotated[str | None, typer.Option(help="Author recorded for Neuronpedia labels.")] = None,
) -> None:
    """Import labels in one transaction (nothing is written when any entry is bad or names an unknown feature)."""
    from atlas.storage.labels import LabelError, edits_from_export, edits_from_neuronpedia, read_json, write_user_labels

    try:
        document = read_json(path)
        if neuronpedia_model or neuronpedia_source:
            if not (neuronpedia_model and neuronpedia_source and dictionary):
                raise LabelError("a Neuronpedia import needs --dictionary, --neuronpedia-model, --neuronpedia-source")
            target = dictionary
            edits = edits_from_neuronpedia(document, dictionary, model_id=neuronpedia_model,
                                           source_set=neuronpedia_source, author=author)  # fmt: skip
            source = "neuronpedia"
        else:
            target, edits = edits_from_export(document, dictionary)
            source = "import"
    except LabelError as err:
        fail(err)
    driver, database = store_driver()
    try:
        written = write_user_labels(driver, edits, database=database, source=source)
    except LabelError as err:
        fail(err)
    finally:
        driver.close()
    console.print(f"{written} label(s) imported into {target}")


@labels_app.command("show")
def show(key: Annotated[str, typer.Argument(help="Feature key DICTIONARY/LAYER/INDEX.")]) -> None:
    """A feature's labels and its label history, newest first."""
    from rich.console import Console
    from rich.table import Table

    from atlas.storage.labels import LabelError, feature_label, label_history

    driver, database = store_driver()
    try:
        current = feature_label(driver, key, database=database)
        history = label_history(driver, key, database=database)
    except LabelError as err:
        fail(err)
    finally:
        driver.close()
    out = Console()
    out.print(f"[bold]{key}[/]: {current.label or '(no label)'}  (automatic: {current.auto_label or '-'})")
    table = Table("#", "at", "author", "label", "note", "source", title="history")
    for rev in history:
        table.add_row(str(rev.seq), rev.at.isoformat(timespec="seconds"), rev.author or "", rev.label or "(cleared)",
                      rev.note or "", rev.source)  # fmt: skip
    out.print(table)


@labels_app.command("explain")
def explain(
    feature: Annotated[list[str], typer.Option("--feature", help="Feature key DICTIONARY/LAYER/INDEX (repeatable).")],
    url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (default: $ATLAS_EXPLAINER_URL).")] = None,
    model: Annotated[str | None, typer.Option(help="Model to ask (default: $ATLAS_EXPLAINER_MODEL).")] = None,
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB statistics (default: the managed store's).")] = None,
) -> None:
    """Explain features with a configured OpenAI-compatible endpoint and score each explanation by detection on
    held-out examples; the labels are stored (with the score) only when every feature succeeded."""
    import os

    from atlas.config import stats_db_path
    from atlas.storage.explainer import ENV_MODEL, ENV_URL, ExplainerConfig, ExplainerError, explain_features, summary
    from atlas.storage.feature_stats import FeatureStatsStore, StatsError
    from atlas.storage.labels import LabelError

    env = {**os.environ, **({ENV_URL: url} if url else {}), **({ENV_MODEL: model} if model else {})}
    try:
        cfg = ExplainerConfig.from_env(env)
        if cfg is None:
            raise ExplainerError(f"no explainer configured: pass --url and --model (or set {ENV_URL}, {ENV_MODEL})")
    except ExplainerError as err:
        fail(err)
    driver, database = store_driver()
    try:
        results = explain_features(driver, FeatureStatsStore(stats_db or stats_db_path()), cfg, feature,
                                   database=database)  # fmt: skip
    except (ExplainerError, LabelError, StatsError) as err:
        fail(err)
    finally:
        driver.close()
    typer.echo(json.dumps(summary(results), indent=2, ensure_ascii=False))


def register(app: typer.Typer) -> None:
    app.add_typer(labels_app, name="labels")
