"""`atlas diff A B`: diff two stored dictionaries (of one model, or of two models with one tokenizer and width) on the
prompts stored under both; prints the alignment, the per-prompt similarities and the largest changes, and writes the
result (a `(:Diff)` node and `ALIGNS_WITH` relationships in Neo4j, rows in `diffs.duckdb` beside the feature
statistics).

    atlas diff plt-1234... plt-abcd... --prompts prompts.txt --reference plt-5678...
    atlas diff A B --prompts tasks.jsonl    # a JSONL `task` field groups the prompts (distributional classification)
    atlas diff A B --transfer 12/3 --transfer 20/7 --transfer-target ' Rome'    # behavioural equivalence too

A and B are transcoder ids in the store, or dictionary directories (their id is computed from the weights). Each
side's dictionary is loaded from `--transcoders-a/-b`, else from the first existing directory the store recorded for
it; its model from `--model-a/-b`, else the model the store recorded. Bad input (unknown identity, different
tokenizers or widths, no shared prompt) is one red line, exit 2, nothing written.

With `--transfer`, the named features of A (LAYER/FEATURE or A's full keys) are zero-ablated in A and their aligned
one-to-one partners in B on every shared prompt (`atlas.diff.behaviour`), and the per-prompt effects on
`--transfer-target` and their agreement are printed; the transfer runs before anything is written, so a circuit that
cannot be transferred leaves the stores untouched.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from atlas_cli.common import console, fail, store_driver, user_errors


def _identity(ref: str) -> str:
    path = Path(ref)
    if path.is_dir():
        from atlas.transcoders.identity import transcoder_identity

        return transcoder_identity(path).id
    return ref


def _stored(driver: Any, database: str, ident: str) -> dict[str, Any]:
    from atlas.diff.run import DiffInputError
    from atlas.storage.identities import transcoders

    known = {t["id"]: t for t in transcoders(driver, database)}
    if ident not in known:
        raise DiffInputError(f"transcoder {ident!r} is not in the store (known: {', '.join(sorted(known)) or 'none'})")
    return known[ident]


def _load_side(row: dict[str, Any], directory: Path | None, model_name: str | None, cache: dict[str, Any]) -> Any:
    from atlas.diff.run import DiffInputError, Side
    from atlas.models.loading import load_model
    from atlas.transcoders import load_transcoder

    if directory is None:
        directory = next((Path(s) for s in row["sources"] if Path(s).is_dir()), None)
        if directory is None:
            raise DiffInputError(f"no directory of {row['id']} exists any more (recorded: {row['sources'] or 'none'});"
                                 " pass it with --transcoders-a/--transcoders-b")  # fmt: skip
    name = model_name or row["model"]
    if not name:
        raise DiffInputError(f"the store records no model for {row['id']}: pass --model-a/--model-b")
    if name.startswith("hf-") and not Path(name).is_dir():
        raise DiffInputError(f"{row['id']}'s model {name} was loaded from a local directory: pass --model-a/-b DIR")
    if name not in cache:
        cache[name] = load_model(name)
    return Side(row["id"], cache[name], load_transcoder(directory).eval())


def _read_prompts(path: Path) -> tuple[list[str], dict[str, str]]:
    """The prompt texts of a corpus file, and text → task for those that name one (the prompt groups)."""
    from ingest.prompts import read_corpus

    records, _issues = read_corpus(path)
    if not records:
        raise ValueError(f"{path} holds no prompt")
    return [r.text for r in records], {r.text: r.meta["task"] for r in records if r.meta.get("task")}


def diff(
    a: Annotated[str, typer.Argument(help="Dictionary A: a stored transcoder id, or its directory.")],
    b: Annotated[str, typer.Argument(help="Dictionary B: a stored transcoder id, or its directory.")],
    prompts: Annotated[Path | None, typer.Option(help="Prompt file (text/JSONL/Parquet); default: all shared.")] = None,
    reference: Annotated[
        str | None, typer.Option(help="A second dictionary of A's model: its diff against A is the noise floor.")
    ] = None,
    transcoders_a: Annotated[Path | None, typer.Option(help="Directory of A (default: as stored).")] = None,
    transcoders_b: Annotated[Path | None, typer.Option(help="Directory of B (default: as stored).")] = None,
    transcoders_ref: Annotated[Path | None, typer.Option(help="Directory of the reference.")] = None,
    model_a: Annotated[str | None, typer.Option(help="A's model (default: as stored).")] = None,
    model_b: Annotated[str | None, typer.Option(help="B's model (default: as stored).")] = None,
    quantile: Annotated[float, typer.Option(min=0.5, max=1.0, help="Noise-floor quantile.")] = 0.95,
    min_weight: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="Share of attribution below which an element counts as absent.")
    ] = 1e-3,
    match_score: Annotated[float, typer.Option(min=0.0, max=1.0, help="Score for an aligned pair.")] = 0.7,
    top: Annotated[int, typer.Option(min=0, max=1000, help="Changes listed for the most changed prompt.")] = 10,
    store: Annotated[bool, typer.Option(help="Write the result (Neo4j + DuckDB).")] = True,
    transfer: Annotated[
        list[str] | None,
        typer.Option(help="Transfer: ablate this A feature (LAYER/FEATURE) in A, its partner in B; repeatable."),
    ] = None,
    transfer_target: Annotated[
        str | None, typer.Option(help="Transfer: the target logit token (one token), e.g. ' Rome'.")
    ] = None,
) -> None:
    """Align two dictionaries and diff their attribution graphs on the prompts stored under both."""
    from atlas.config import stats_db_path
    from atlas.diff.align import AlignmentThresholds
    from atlas.diff.run import diff_stored, shared_prompts, to_record
    from atlas.storage.diffs import DiffStore

    if bool(transfer) != (transfer_target is not None):
        fail(ValueError("--transfer and --transfer-target go together: name the A features to ablate and the target"))
    driver, database = store_driver()
    started = time.perf_counter()
    transferred = None
    try:
        with driver:
            texts, groups = (None, None) if prompts is None else _read_prompts(prompts)
            rows = [_stored(driver, database, _identity(x)) for x in (a, b)]
            ref_row = None if reference is None else _stored(driver, database, _identity(reference))
            shared_prompts(driver, database, rows[0]["id"], rows[1]["id"], texts)  # refuse early, before loading
            cache: dict[str, Any] = {}
            console.print("loading models and dictionaries")
            side_a = _load_side(rows[0], transcoders_a, model_a, cache)
            side_b = _load_side(rows[1], transcoders_b, model_b, cache)
            side_r = None if ref_row is None else _load_side(ref_row, transcoders_ref, model_a, cache)
            result = diff_stored(
                driver, database, side_a, side_b, texts=texts, reference=side_r, quantile=quantile,
                min_weight=min_weight, thresholds=AlignmentThresholds(match_score=match_score),
                progress=lambda phase, i, n: console.print(f"{phase}: {i}/{n} prompt(s)") if i == n or i % 25 == 0
                else None, groups=groups,
            )  # fmt: skip
            if transfer and transfer_target is not None:
                transferred = _transfer(side_a, side_b, result, transfer, transfer_target)
            record = to_record(result)
            created = None
            if store:
                created = DiffStore(driver, stats_db_path().parent / "diffs.duckdb", database).write(record)
    except user_errors() as err:
        fail(err)
    show(result, top)
    if transferred is not None:
        show_transfer(transferred)
    console.print(f"done in {time.perf_counter() - started:.1f}s (phases: "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()) + ")")  # fmt: skip
    if created is not None:
        console.print(f"stored as {record.id} ({created} ALIGNS_WITH relationship(s) between stored features)")


def _transfer(side_a: Any, side_b: Any, result: Any, refs: list[str], target: str) -> Any:
    """Zero-ablate `refs` (A's features) in A and their aligned partners in B on every shared prompt."""
    from atlas.diff.behaviour import transfer_ablation
    from atlas.validation.validate import Circuit, TargetSpec

    circuit = Circuit.of(refs, side_a.transcoder, transcoder_id=side_a.transcoder_id).features
    console.print(f"transfer: zero-ablating {len(circuit)} feature(s) on {len(result.shared)} prompt(s) in A and B")
    return transfer_ablation(side_a.model, side_a.transcoder, side_b.model, side_b.transcoder, circuit,
                             result.alignment.one_to_one(), [text for text, _, _ in result.shared],
                             TargetSpec.token(target))  # fmt: skip


def show_transfer(report: Any) -> None:
    """The per-prompt effects of a transferred ablation and their agreement."""
    out = Console()

    def name(features: tuple[tuple[int, int], ...]) -> str:
        return ", ".join(f"{layer}/{feature}" for layer, feature in features) or "—"

    table = Table("prompt", "effect in A", "effect in B", "agree",
                  title=f"transfer: ablate {name(report.circuit_a)} in A, {name(report.circuit_b)} in B")  # fmt: skip
    for p in report.prompts:
        table.add_row(p.prompt[:48], f"{p.effect_a:+.3f}", f"{p.effect_b:+.3f}", "yes" if p.agree else "no")
    out.print(table)
    unmapped = f"; without an aligned partner (not ablated in B): {name(report.unmapped)}" if report.unmapped else ""
    out.print(f"transfer agreement: {report.agreement:.0%} of {len(report.prompts)} prompt(s) (effect = share of the"
              f" clean target removed){unmapped}")  # fmt: skip


def show(result: Any, top: int) -> None:
    from atlas.diff.noise import changes_exceeding
    from atlas.diff.run import DiffResult

    assert isinstance(result, DiffResult)
    out = Console()
    al = result.alignment
    layers = Table("layer", "live A", "live B", "aligned 1:1", "mutual", "splits", "merges", "median dec cos",
                   title=f"alignment {result.a} → {result.b}")  # fmt: skip
    for layer in al.layers:
        one = [p for p in layer.pairs if p.method in ("mutual", "assignment")]
        cos = sorted(p.decoder_cos for p in one)
        layers.add_row(str(layer.layer), str(layer.n_live_a), str(layer.n_live_b), str(len(one)),
                       str(sum(p.method == "mutual" for p in one)), str(len(layer.splits)), str(len(layer.merges)),
                       f"{cos[len(cos) // 2]:.3f}" if cos else "—")  # fmt: skip
    out.print(layers)
    r2 = "—" if al.r2 is None else f"{al.r2:.3f}"
    out.print(f"classification: [bold]{al.classification}[/] ({al.matched_fraction:.1%} of A's live features aligned "
              f"one-to-one; linear-map R² {r2})")  # fmt: skip
    if al.group_corr:
        out.print("activation agreement by prompt group (median correlation of the aligned pairs): "
                  + ", ".join(f"{name} {corr:.3f}" for name, corr in sorted(al.group_corr.items())))  # fmt: skip
    floor = result.floor
    table = Table(
        "prompt",
        "similarity",
        "nodes",
        "edges",
        "adjacency",
        "spectral",
        "most divergent layer",
        "cluster",
        *(["noise floor", "exceeds"] if floor else []),
        title="per prompt (most changed first)",
    )
    order = sorted(zip(result.shared, result.diffs, strict=True), key=lambda x: x[1].similarity)
    changed = set(result.summary.changed)
    for (text, pid_a, _), d in order:
        extra = [] if floor is None else [f"{floor.for_prompt(pid_a).dissimilarity:.3f}",
                                          "yes" if pid_a in result.exceeding else "no"]  # fmt: skip
        table.add_row(text[:48], f"{d.similarity:.3f}", f"{d.node_overlap:.3f}", f"{d.edge_overlap:.3f}",
                      f"{d.adjacency_similarity:.3f}", f"{d.spectral_similarity:.3f}", d.max_divergence_layer or "—",
                      "changed" if pid_a in changed else "unchanged", *extra)  # fmt: skip
    out.print(table)
    s = result.summary
    out.print(f"corpus: mean similarity {s.mean_similarity:.3f} over {len(result.diffs)} prompt(s); "
              f"{len(s.changed)} changed / {len(s.unchanged)} unchanged (largest gap {s.gap:.3f}); most divergent "
              f"layer overall: {s.max_divergence_layer or '—'}")  # fmt: skip
    if floor is not None and result.reference_summary is not None:
        out.print(f"noise floor ({result.reference}, same model): mean similarity "
                  f"{result.reference_summary.mean_similarity:.3f}; pooled q{floor.quantile:.2f} dissimilarity "
                  f"{floor.prompt_dissimilarity:.3f}; {len(result.exceeding)}/{len(result.diffs)} prompt(s) exceed "
                  "their floor")  # fmt: skip
    if top and order:
        (text, _, _), d = order[0]
        real = None
        if floor is not None:
            nodes, edges = changes_exceeding(d, floor)
            real = {c.key for c in (*nodes, *edges)}
        changes = Table("element", "status", "key", "layer", "w_A", "w_B", *(["> noise"] if real is not None else []),
                        title=f"largest changes in {text[:60]!r}")  # fmt: skip
        items = [("node", "only A", c) for c in d.nodes_only_a] + [("node", "only B", c) for c in d.nodes_only_b]
        items += [("node", "changed", c) for c in d.nodes_changed] + [("edge", "only A", c) for c in d.edges_only_a]
        items += [("edge", "only B", c) for c in d.edges_only_b] + [("edge", "changed", c) for c in d.edges_changed]
        items.sort(key=lambda x: -abs(x[2].weight_a - x[2].weight_b))
        for element, status, c in items[:top]:
            changes.add_row(element, status, c.key, c.layer, f"{c.weight_a:+.4f}", f"{c.weight_b:+.4f}",
                            *([] if real is None else ["yes" if c.key in real else "no"]))  # fmt: skip
        out.print(changes)


def register(app: typer.Typer) -> None:
    """Add `diff` to the root `atlas` app."""
    app.command()(diff)
