"""`atlas paths`: the cross-prompt path query of `atlas.storage.queries` from the command line, read-only.

    atlas paths --at-token " Dallas" --target " Austin" --target " Sacramento"    # from the features on " Dallas"
    atlas paths --feature 3/17 --target " Paris" --hops 2 --min-weight 0.01       # from given features

Neo4j comes from `NEO4J_URI` (+ `NEO4J_USER`, `NEO4J_PASSWORD`), else the managed server when it is running (it is
never started here); top-token feature references are resolved through the DuckDB statistics (`$ATLAS_STATS_DB`).
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from atlas_cli.common import console, fail, store_driver


def _open_queries(timeout_s: float) -> tuple[Any, Any]:
    """(driver, AtlasQueries) on the configured or running managed server; a one-line error when there is none."""
    from atlas.config import stats_db_path
    from atlas.storage.feature_stats import FeatureStatsStore
    from atlas.storage.queries import AtlasQueries

    driver, database = store_driver()
    stats = FeatureStatsStore(stats_db_path())
    return driver, AtlasQueries(driver, database, stats=stats, timeout_s=timeout_s)


def node_label(node: Any) -> str:
    """A path step as text: features `L{layer}/{index}@{position}`, logits and tokens by their text."""
    if node.kind == "feature" and node.key:
        return f"L{node.layer}/{node.key.rsplit('/', 1)[1]}@{node.position}"
    if node.kind in ("logit", "token"):
        return repr(node.text)
    return str(node.node_id)


def paths(
    target: Annotated[list[str], typer.Option("--target", help="Logit token text, e.g. ' Austin' (repeatable).")],
    feature: Annotated[
        list[str] | None, typer.Option("--feature", help="Source feature: key, layer/index, label or top token.")
    ] = None,
    at_token: Annotated[
        str | None, typer.Option(help="Start at the features active on this input token, e.g. ' Dallas'.")
    ] = None,
    hops: Annotated[int, typer.Option(min=1, max=6, help="Most edges on a path.")] = 3,
    min_weight: Annotated[float, typer.Option(min=0.0, help="Smallest |weight| of every edge on a path.")] = 0.0,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Paths returned, strongest first.")] = 25,
    model: Annotated[str | None, typer.Option(help="Only tokens of this model (default: any).")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Server-side timeout of each statement, seconds.")] = 30.0,
    cut_off: Annotated[
        list[float] | None,
        typer.Option("--cut-off", min=0.0, help="Also rerun at these |weight| cut-offs and show how stable it is."),
    ] = None,
) -> None:
    """Strongest attribution paths across stored prompts, from source features (or the features on an input token)
    to logit targets; prints the features on the token, the ranked paths, and the features the paths pass through."""
    from atlas.storage.queries import QueryError

    if not feature and at_token is None:
        fail(ValueError("give --feature, --at-token, or both"))
    driver, q = _open_queries(timeout)
    try:
        with driver:
            if at_token is not None:
                on = q.features_on_token(at_token, model=model, limit=limit)
                table = Table("feature", "label", "prompts", "mean act.", "max act.",
                              title=f"features active on {at_token!r} (stored activations)")  # fmt: skip
                for r in on.rows:
                    table.add_row(r.feature_key.split("/", 1)[1], r.label or "", str(r.n_prompts),
                                  f"{r.mean_activation:.3g}", f"{r.max_activation:.3g}")  # fmt: skip
                Console().print(table)
            result = q.paths_to_logits(feature or None, target, max_hops=hops, min_abs_weight=min_weight, limit=limit,
                                       model=model, at_token=at_token)  # fmt: skip
            stability = None
            if cut_off:
                from atlas.storage.robustness import path_robustness

                stability = path_robustness(q, feature or None, target, min_weights=[min_weight, *cut_off],
                                            max_hops=hops, limit=limit, at_token=at_token)  # fmt: skip
            ids = sorted({r.prompt_id for r in result.rows})
            texts = {p.prompt_id: p.text for p in q.list_prompts(prompt_ids=ids, limit=10_000).rows} if ids else {}
    except QueryError as err:
        fail(err)
    for note in result.notes:
        console.print(note)
    show_paths(result.rows, texts)
    console.print(f"{len(result.rows)} path(s) in {result.elapsed_ms:.0f} ms")
    if stability is not None:
        table = Table("min |weight|", "paths", "features (top 10)", "top-10 paths kept", "feature Jaccard",
                      title="stability against the loosest cut-off")  # fmt: skip
        for row in stability:
            table.add_row(f"{row.min_abs_weight:g}", str(row.n_paths), str(row.n_features),
                          f"{row.top_path_overlap:.0%}", f"{row.feature_jaccard:.2f}")  # fmt: skip
        Console().print(table)


def show_paths(rows: Any, texts: dict[str, str | None]) -> None:
    """The ranked paths, then every intermediate feature with the prompts and paths it appears on."""
    table = Table("#", "prompt", "target", "strength", "hops", "path", title="paths, strongest first")
    for rank, r in enumerate(rows, 1):
        text = texts.get(r.prompt_id) or r.prompt_id
        table.add_row(str(rank), text, repr(r.target_text), f"{r.strength:+.3g}", str(r.hops),
                      " → ".join(node_label(n) for n in r.nodes))  # fmt: skip
    Console().print(table)
    via: Counter[str] = Counter()
    prompts: dict[str, set[str]] = {}
    labels: dict[str, str] = {}
    for r in rows:
        for node in r.nodes[1:-1]:
            name = f"L{node.layer}/{node.key.rsplit('/', 1)[1]}" if node.kind == "feature" and node.key else node.kind
            via[name] += 1
            prompts.setdefault(name, set()).add(r.prompt_id)
            if node.kind == "feature" and node.text:  # a feature's text is its label (user, else automatic)
                labels.setdefault(name, node.text)
    if via:
        middle = Table("intermediate", "label", "paths", "prompts", title="what the paths pass through")
        for name, n in via.most_common():
            middle.add_row(name, labels.get(name, ""), str(n), str(len(prompts[name])))
        Console().print(middle)


def register(app: typer.Typer) -> None:
    """Add `paths` to the root `atlas` app."""
    app.command()(paths)
