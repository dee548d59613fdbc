"""Co-activation statistics: TWERA/ERA against a by-hand expectation, and exact merging of worker shards."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from neo4j import Driver
from typer.testing import CliRunner

from atlas.analysis.coactivation import CoactivationError, CoactivationStats, pairs_from_topk
from atlas.analysis.global_weights import TopK, dense_virtual_weights, feature_topk
from atlas.attribution.context import build_context
from atlas.models import load_model
from atlas.storage.neo4j_server import Neo4jConnection
from atlas.transcoders import save_transcoder
from atlas_cli.main import app
from tests.test_attribution import random_transcoder
from tests.test_global_weights import F, L, tiny_readers, tiny_transcoder
from tests.tolerances import assert_close_at_scale


def prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Sparse nonnegative activations `(L, n_tokens, F)` of `n` prompts of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(L, 3 + i % 5, F, generator=generator)
        out.append(torch.relu(x - 0.7))  # about a quarter of the entries fire
    return out


def setup() -> tuple[torch.Tensor, torch.Tensor]:
    transcoder, readers = tiny_transcoder("clt"), tiny_readers(False)
    _, outgoing = feature_topk(transcoder, readers, 3)
    return pairs_from_topk(outgoing), dense_virtual_weights(transcoder, readers)


def test_pairs_are_the_top_k_with_a_nonzero_weight() -> None:
    outgoing = TopK(torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), torch.tensor([[5, 6, 7], [-1, -1, -1]]))
    assert pairs_from_topk(outgoing).tolist() == [[0, 5], [0, 7]]


def test_twera_and_era_match_a_by_hand_expectation() -> None:
    pairs, V = setup()
    data = prompts(7)
    stats = CoactivationStats(pairs, L * F)
    for acts in data:
        stats.add(acts)
    tokens = torch.cat([a.permute(1, 0, 2).reshape(-1, L * F) for a in data]).double()  # (n_tokens, L·F)
    assert stats.n_tokens == tokens.shape[0]
    virtual = V[pairs[:, 0], pairs[:, 1]]
    twera, era = stats.weighted(virtual)
    expected_twera, expected_era = [], []
    for p, (i, j) in enumerate(pairs.tolist()):
        joint = sum(float(t[i] * t[j]) for t in tokens) / len(tokens)
        target = sum(float(t[j]) for t in tokens) / len(tokens)
        source = sum(float(t[i]) for t in tokens) / len(tokens)
        expected_twera.append(joint / target * float(virtual[p]) if target > 0 else float("nan"))
        expected_era.append(source * float(virtual[p]))
    assert torch.equal(torch.isnan(twera), torch.isnan(torch.tensor(expected_twera)))
    fired = ~torch.isnan(twera)
    assert int(fired.sum()) > len(pairs) // 2
    assert_close_at_scale(twera[fired], torch.tensor(expected_twera, dtype=torch.float64)[fired], rel=1e-12)
    assert_close_at_scale(era, torch.tensor(expected_era, dtype=torch.float64), rel=1e-12)


def test_shards_merge_to_the_whole_corpus_exactly(tmp_path: Path) -> None:
    """Any split of the prompts over workers, any merge order, through shard files: counts equal, sums to float64."""
    pairs, _ = setup()
    data = prompts(12, seed=3)
    whole = CoactivationStats(pairs, L * F)
    for acts in data:
        whole.add(acts)
    for split, order in ((3, (0, 1, 2)), (4, (3, 1, 0, 2)), (5, (4, 3, 2, 1, 0))):
        shards = [CoactivationStats(pairs, L * F) for _ in range(split)]
        for index, acts in enumerate(data):
            shards[index % split].add(acts)
        read_back = []
        for n, shard in enumerate(shards):
            for name, table in shard.to_tables().items():
                pq.write_table(table, tmp_path / f"{split}-{n}-{name}.parquet")
            read_back.append(CoactivationStats.from_tables(
                {name: pq.read_table(tmp_path / f"{split}-{n}-{name}.parquet") for name in ("features", "pairs")}
            ))  # fmt: skip
        merged = read_back[order[0]]
        for index in order[1:]:
            merged = merged.merge(read_back[index])
        assert merged.n_tokens == whole.n_tokens
        assert torch.equal(merged.pairs, whole.pairs)
        assert_close_at_scale(merged.feature_sums, whole.feature_sums, rel=1e-14)
        assert_close_at_scale(merged.pair_sums, whole.pair_sums, rel=1e-14)


def test_mismatches_are_refused() -> None:
    pairs, _ = setup()
    stats = CoactivationStats(pairs, L * F)
    with pytest.raises(CoactivationError, match="cover"):
        stats.add(torch.zeros(L, 2, F + 1))
    with pytest.raises(CoactivationError, match="different pair lists"):
        stats.merge(CoactivationStats(pairs[:-1], L * F))
    with pytest.raises(CoactivationError, match="pair ids"):
        CoactivationStats(torch.tensor([[0, L * F]]), L * F)
    with pytest.raises(CoactivationError, match="no tokens"):
        stats.weighted(torch.ones(pairs.shape[0]))
    assert stats.n_tokens == 0 and not stats.feature_sums.any(), "a refused add leaves the sums as they were"


def test_a_target_that_never_fires_has_no_twera() -> None:
    pairs = torch.tensor([[0, F], [1, F + 1]])
    stats = CoactivationStats(pairs, L * F)
    acts = torch.zeros(L, 4, F)
    acts[0, :, 0] = 1.0
    acts[1, :2, 0] = 2.0  # feature F fires on half the tokens with the source
    acts[0, :, 1] = 3.0  # feature F + 1 never fires
    stats.add(acts)
    twera, era = stats.weighted(torch.tensor([0.5, 0.5]))
    assert float(twera[0]) == pytest.approx(1.0 * 0.5) and torch.isnan(twera[1])
    assert era.tolist() == pytest.approx([0.5, 1.5])
    assert list(itertools.islice(stats.pair_sums.tolist(), 2)) == pytest.approx([4.0, 0.0])


def test_cli_fills_twera_from_a_corpus_idempotently(tmp_path: Path) -> None:
    """`atlas global twera` stores, on each stored feature row, TWERA/ERA equal to an accumulator fed the same
    prompts; a re-run stores the same; without stored weights it refuses and creates nothing."""
    model = load_model("tiny-llama")
    transcoder = random_transcoder(model, "clt")
    directory = save_transcoder(transcoder, tmp_path / "clt", model_name="tiny-llama")
    corpus = tmp_path / "corpus.txt"
    texts = ["When Mary and John went to the store", "the cat sat on the mat", "John gave a drink to Mary"]
    corpus.write_text("\n".join(texts) + "\n")
    db = tmp_path / "stats.duckdb"
    common = ["--transcoders", str(directory), "--model", "tiny-llama", "--stats-db", str(db)]
    runner = CliRunner()
    refused = runner.invoke(app, ["global", "twera", *common, "--corpus", str(corpus)])
    assert refused.exit_code == 2 and "no statistics database" in refused.output, refused.output
    assert not db.exists()
    assert runner.invoke(app, ["global", "weights", *common, "--k", "8"]).exit_code == 0
    first = runner.invoke(app, ["global", "twera", *common, "--corpus", str(corpus)])
    assert first.exit_code == 0, first.output

    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT relation, layer, feature, partner_layer, partner, v, twera, era FROM global_weights "
            "WHERE relation IN ('feature_out', 'feature_in') ORDER BY ALL"
        ).fetchall()
        n_tokens = con.execute("SELECT n_tokens FROM global_activity_runs").fetchone()
    F = transcoder.spec.n_features
    stats = CoactivationStats(torch.tensor([[0, 0]]), transcoder.spec.n_layers * F)  # means only
    for text in texts:
        ctx = build_context(model, transcoder, model.tokenize(text)[0], zero_positions=(0,))
        stats.add(ctx.activations[:, 1:])
    joint: dict[tuple[int, int], float] = {}
    for text in texts:
        ctx = build_context(model, transcoder, model.tokenize(text)[0], zero_positions=(0,))
        flat = ctx.activations[:, 1:].permute(1, 0, 2).reshape(-1, transcoder.spec.n_layers * F).double()
        for i, j in itertools.product(range(F), range(F, 2 * F)):  # layer-0 sources, layer-1 targets
            joint[(i, j)] = joint.get((i, j), 0.0) + float((flat[:, i] * flat[:, j]).sum())
    assert n_tokens == (stats.n_tokens,)
    mean = stats.feature_sums / stats.n_tokens
    checked = 0
    for relation, layer, feature, partner_layer, partner, v, twera, era in rows:
        src, tgt = (layer * F + feature, partner_layer * F + partner)
        if relation == "feature_in":
            src, tgt = tgt, src
        assert era == pytest.approx(float(mean[src]) * v, rel=1e-9, abs=1e-12)
        if float(mean[tgt]) == 0:
            assert twera is None
        else:
            expected = joint[(src, tgt)] / stats.n_tokens / float(mean[tgt]) * v
            assert twera == pytest.approx(expected, rel=1e-9, abs=1e-12)
            checked += 1
    assert checked > len(rows) // 2

    again = runner.invoke(app, ["global", "twera", *common, "--corpus", str(corpus)])
    assert again.exit_code == 0, again.output
    with duckdb.connect(str(db), read_only=True) as con:
        assert (
            con.execute(
                "SELECT relation, layer, feature, partner_layer, partner, v, twera, era FROM global_weights "
                "WHERE relation IN ('feature_out', 'feature_in') ORDER BY ALL"
            ).fetchall()
            == rows
        )
        assert con.execute("SELECT count(*) FROM global_activity_runs").fetchone() == (1,)


def test_ingest_accumulates_co_activations_and_merges_its_shards(
    tmp_path: Path, neo4j_driver: Driver, neo4j_connection: Neo4jConnection
) -> None:
    """With global weights stored, an ingest (one prompt per shard, so several shards merge) fills TWERA/ERA equal
    to one accumulator over the same prompts; a rerun (nothing left to compute) merges the same shards again."""
    from atlas.analysis.coactivation import corpus_activity
    from atlas.analysis.global_weights import global_weights, residual_readers, to_table
    from atlas.storage.global_weights import replace_global_weights, stored_pairs
    from atlas.transcoders import load_transcoder, transcoder_identity
    from ingest.pipeline import run_ingest
    from tests.test_ingest import PROMPTS, delete_prompts, make_transcoders, options, prompt_ids, write_jsonl

    directory = make_transcoders(tmp_path / "transcoders")
    transcoder = load_transcoder(directory)
    model = load_model("tiny-llama")
    transcoder_id = transcoder_identity(directory).id
    db = tmp_path / "stats.duckdb"
    weights = global_weights(transcoder, residual_readers(model), 4)
    replace_global_weights(db, to_table(weights, transcoder_id), transcoder_id=transcoder_id, norm="fold",
                           model="tiny-llama", k=4, n_layers=2, n_features=transcoder.spec.n_features)  # fmt: skip
    prompts = PROMPTS[:4]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", prompts)
    opts = options(tmp_path, corpus, directory, None, workers=0, batch_prompts=1, stats_db=db)
    report = run_ingest(opts, connection=neo4j_connection)
    ids = prompt_ids(neo4j_driver, transcoder_id)
    try:
        assert report.computed == len(prompts)
        assert len(list((tmp_path / "runs" / "test" / "shards").glob("*/coact-*"))) == len(prompts)
        expected, stats = corpus_activity(
            model, transcoder, [text for text, _ in prompts], stored_pairs(db, transcoder_id)
        )
        wanted = {tuple(r[k] for k in ("source_layer", "source", "target_layer", "target")): (r["twera"], r["era"])
                  for r in expected.to_pylist()}  # fmt: skip

        def stored() -> tuple[list[tuple[Any, ...]], Any]:
            with duckdb.connect(str(db), read_only=True) as con:
                rows = con.execute("SELECT layer, feature, partner_layer, partner, twera, era FROM global_weights "
                                   "WHERE relation = 'feature_out' ORDER BY ALL").fetchall()  # fmt: skip
                return rows, con.execute("SELECT n_tokens FROM global_activity_runs").fetchall()

        rows, runs = stored()
        assert runs == [(stats.n_tokens,)] and stats.n_tokens == sum(len(model.tokenize(t)[0]) - 1 for t, _ in prompts)
        for layer, feature, partner_layer, partner, twera, era in rows:
            want_twera, want_era = wanted[(layer, feature, partner_layer, partner)]
            assert era == pytest.approx(want_era, rel=1e-12, abs=1e-15)
            assert (twera is None) == (want_twera is None)
            if twera is not None:
                assert twera == pytest.approx(want_twera, rel=1e-12, abs=1e-15)
        again = run_ingest(opts, connection=neo4j_connection)
        assert again.computed == 0
        assert stored() == (rows, runs)
    finally:
        delete_prompts(neo4j_driver, ids)
