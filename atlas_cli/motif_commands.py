"""`atlas global motifs …` and `atlas global clusters …`: corpus structure of the stored graphs, kept in Neo4j.

    atlas global motifs mine                 # the dictionary's prompts' strong paths → (:Motif) nodes (replaced)
    atlas global motifs update               # only prompts added or re-ingested since; deleted prompts drop out
    atlas global motifs list [--kind logit] [--feature KEY] [--alternatives]
    atlas global clusters build              # its prompts grouped by shared circuitry → (:Cluster) nodes (replaced)
    atlas global clusters list

Each works on one dictionary: `--transcoders DIR` (its id), or `--dictionary ID` (no files needed), or, when the
store holds the prompts of a single dictionary, that one; with several and neither option, an error lists them. The
other dictionaries' motifs and clusters are never read or touched. Every mining / clustering step is computed before
its write, and each write is one transaction per batch; an empty store, a dictionary without prompts or a bad
option is one red line and exit 2 with the store untouched.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from atlas_cli.common import TRANSCODERS_HELP, console, fail, store_driver, transcoder_directory, user_errors

MOTIF_ACTIONS = ("mine", "update", "list")
CLUSTER_ACTIONS = ("build", "list")


def _errors() -> tuple[type[BaseException], ...]:
    from atlas.analysis.motifs import MotifError
    from atlas.storage.motifs import MotifStoreError

    return (*user_errors(), MotifError, MotifStoreError)


TranscodersOption = Annotated[
    str | None, typer.Option("--transcoders", help=f"{TRANSCODERS_HELP} Scopes to its dictionary id.")
]
DictionaryOption = Annotated[
    str | None, typer.Option(help="Dictionary id (e.g. clt-3fa9c1d2e4b5a6f7), instead of --transcoders.")
]


def _requested(source: str | None, dictionary: str | None) -> str | None:
    """The dictionary id asked for: `--transcoders`'s id (checked against `--dictionary` when both), else
    `--dictionary`; None when neither (the store's only dictionary is used)."""
    if source is None:
        return dictionary
    from atlas.transcoders import transcoder_identity

    try:
        transcoder_id = transcoder_identity(transcoder_directory(source)).id
    except _errors() as err:
        fail(err)
    if dictionary is not None and dictionary != transcoder_id:
        fail(ValueError(f"--dictionary {dictionary} is not the dictionary of --transcoders {source} ({transcoder_id})"))
    return transcoder_id


def _short(key: str) -> str:
    """A feature key without its dictionary id ('clt-…/3/17' → '3/17'); token keys ('model/id') stay whole."""
    parts = key.split("/")
    return "/".join(parts[-2:]) if len(parts) >= 3 else key


def _token_texts(driver: Any, database: str, keys: set[str]) -> dict[str, str]:
    records = driver.execute_query(
        "UNWIND $keys AS k MATCH (t:Token {key: k}) RETURN t.key AS k, t.text AS text", keys=sorted(keys),
        database_=database,
    ).records  # fmt: skip
    return {r["k"]: repr(r["text"]) for r in records}


def motifs(
    action: Annotated[str, typer.Argument(help="mine | update | list")],
    min_strength: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Smallest path strength kept (share of a prompt's output mass).")
    ] = 0.01,
    max_features: Annotated[int, typer.Option(min=2, max=4, help="Most features on a path (feature hops).")] = 4,
    kind: Annotated[str | None, typer.Option(help="list: logit | token.")] = None,
    feature: Annotated[str | None, typer.Option(help="list: only motifs through this feature key.")] = None,
    min_support: Annotated[int, typer.Option(min=1, help="list: fewest supporting prompts.")] = 1,
    top: Annotated[int, typer.Option(min=1, max=10_000, help="list: rows shown.")] = 15,
    order: Annotated[str, typer.Option(help="list: total (support × mean strength) | support.")] = "total",
    alternatives: Annotated[bool, typer.Option(help="list: alternative routes (same source and end).")] = False,
    source: TranscodersOption = None,
    dictionary: DictionaryOption = None,
) -> None:
    """Recurring paths of the stored graphs: mine them, update them incrementally, or list them."""
    from atlas.analysis.motifs import MOTIF_KINDS

    if action not in MOTIF_ACTIONS:
        fail(ValueError(f"unknown action {action!r}; expected one of {MOTIF_ACTIONS}"))
    if not 0.0 < min_strength < 1.0:
        fail(ValueError(f"--min-strength must be in (0, 1), got {min_strength}"))
    if kind is not None and kind not in MOTIF_KINDS:
        fail(ValueError(f"--kind must be one of {MOTIF_KINDS}, got {kind!r}"))
    from rich.progress import Progress

    from atlas.analysis.corpus_motifs import mine_store
    from atlas.storage import motifs as store

    requested = _requested(source, dictionary)
    driver, database = store_driver(start=True)
    with driver:
        try:
            if action != "list":
                with Progress(console=console, transient=True) as bar:
                    task = bar.add_task("prompts", total=None)

                    def progress(done: int, total: int) -> None:
                        bar.update(task, completed=done, total=total)

                    report = mine_store(driver, database, full=action == "mine", transcoder=requested,
                                        min_strength=min_strength,
                                        max_features=max_features, progress=progress)  # fmt: skip
                timings = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items())
                n_motifs = driver.execute_query("MATCH (m:Motif {transcoder: $t}) RETURN count(m) AS n",
                                                t=report.transcoder, database_=database).records  # fmt: skip
                console.print(
                    f"{action} {report.transcoder}: {report.mined} of {report.n_prompts} prompts mined,"
                    f" {report.touched} motifs changed, {report.removed} refreshed after deletions;"
                    f" {n_motifs[0]['n']} motifs stored ({timings})"
                )
                return
            tc = store.resolve_dictionary(driver, database, requested)
            if store.motif_run(driver, database, tc) is None:
                raise store.MotifStoreError(f"no motifs stored for {tc}; run `atlas global motifs mine` first")
            if feature is not None:
                found = driver.execute_query("MATCH (f:Feature {key: $k}) RETURN count(f) AS n", k=feature,
                                             database_=database).records  # fmt: skip
                if not found[0]["n"]:
                    raise store.MotifStoreError(f"no feature {feature!r} in the store (keys look like 'clt-…/3/17')")
                if not feature.startswith(f"{tc}/"):
                    raise store.MotifStoreError(f"feature {feature!r} is not of dictionary {tc}; pass its --dictionary")
            if alternatives:
                _print_alternatives(driver, database, tc, kind, min_support, top)
                return
            rows = store.list_motifs(driver, database, tc, kind=kind, min_support=min_support, limit=top,
                                     feature=feature, order=order)  # fmt: skip
        except _errors() as err:
            fail(err)
        texts = _token_texts(driver, database, {n for r in rows for n in r["nodes"]})
    table = Table("kind", "path", "support", "mean strength", "total", "alternatives", title=f"motifs of {tc}")
    for r in rows:
        path = " → ".join(texts.get(n, _short(n)) for n in r["nodes"])
        table.add_row(r["kind"], path, str(r["support"]), f"{r['mean']:.3f}", f"{r['total']:.3f}",
                      str(r["alternatives"]))  # fmt: skip
    Console(width=200).print(table)


def _print_alternatives(driver: Any, database: str, tc: str, kind: str | None, min_support: int, top: int) -> None:
    from atlas.analysis.motifs import Contribution, alternatives, mine_motifs
    from atlas.storage.motifs import motif_contributions

    per_prompt = {
        pid: {(r["kind"], tuple(r["nodes"])): Contribution(r["strength"], r["n_paths"]) for r in rows}
        for pid, rows in motif_contributions(driver, database, tc).items()
    }
    mined = [m for m in mine_motifs(per_prompt, min_support=min_support) if kind is None or m.kind == kind]
    groups = alternatives(mined)[:top]
    texts = _token_texts(driver, database, {n for g in groups for m in g.routes for n in m.nodes})
    table = Table("kind", "source → end", "prompts", "one route only", "routes (intermediates: support)",
                  title="alternative routes")  # fmt: skip
    for g in groups:
        routes = "; ".join(f"{' → '.join(_short(n) for n in m.intermediates)}: {m.support}" for m in g.routes[:4]) + (
            "; …" if len(g.routes) > 4 else ""
        )
        ends = f"{texts.get(g.source, _short(g.source))} → {texts.get(g.end, _short(g.end))}"
        table.add_row(g.kind, ends, str(g.n_prompts), str(g.exclusive_prompts), routes)
    Console(width=200).print(table)


def clusters(
    action: Annotated[str, typer.Argument(help="build | list")],
    eps: Annotated[float, typer.Option(min=0.0, max=1.0, help="build: DBSCAN radius, a cosine distance.")] = 0.3,
    min_samples: Annotated[int, typer.Option(min=2, help="build: neighbours (itself included) of a core prompt.")] = 2,
    neighbours: Annotated[int, typer.Option(min=1, max=1000, help="build: nearest prompts kept per prompt.")] = 15,
    top: Annotated[int, typer.Option(min=1, max=10_000, help="list: clusters shown.")] = 10,
    source: TranscodersOption = None,
    dictionary: DictionaryOption = None,
) -> None:
    """Prompts grouped by shared circuitry (influence-weighted features): build them, or list them."""
    if action not in CLUSTER_ACTIONS:
        fail(ValueError(f"unknown action {action!r}; expected one of {CLUSTER_ACTIONS}"))
    if not 0.0 < eps < 1.0:
        fail(ValueError(f"--eps must be in (0, 1), got {eps}"))
    from rich.progress import Progress

    from atlas.analysis.corpus_motifs import cluster_store
    from atlas.storage.clusters import list_clusters
    from atlas.storage.motifs import resolve_dictionary

    requested = _requested(source, dictionary)
    driver, database = store_driver(start=True)
    with driver:
        try:
            if action == "build":
                with Progress(console=console, transient=True) as bar:
                    task = bar.add_task("prompts", total=None)

                    def progress(done: int, total: int) -> None:
                        bar.update(task, completed=done, total=total)

                    report = cluster_store(driver, database, transcoder=requested, eps=eps, min_samples=min_samples,
                                           n_neighbours=neighbours, progress=progress)  # fmt: skip
                timings = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items())
                console.print(
                    f"{report.transcoder}: {report.n_clusters} clusters of {report.n_prompts} prompts"
                    f" ({report.n_unclustered} unclustered);"
                    f" {report.candidate_pairs} candidate pairs compared of {report.all_pairs} ({timings})"
                )
                return
            tc = resolve_dictionary(driver, database, requested)
            rows = list_clusters(driver, database, tc, limit=top)
        except _errors() as err:  # ClusterError / ClusterStoreError are ValueErrors
            fail(err)
    table = Table("cluster", "size", "cohesion", "tasks", "prompts (first 5)", "characteristic features", "motifs",
                  title=f"prompt clusters of {tc}")  # fmt: skip
    for r in rows:
        table.add_row(f"cluster-{r['index']}", str(r["size"]), f"{r['cohesion']:.2f}",
                      ", ".join(t for t in r["tasks"] if t),
                      " | ".join(t[:40] for t in r["texts"]), ", ".join(_short(f) for f in r["features"][:4]),
                      str(len(r["motifs"])))  # fmt: skip
    Console(width=220).print(table)
