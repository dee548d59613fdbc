"""Feature statistics: shards of partial aggregates merged by the single DuckDB writer, checked against torch."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from atlas.models import load_model
from atlas.storage.feature_stats import (
    FeatureStatsShard,
    FeatureStatsStore,
    StatsError,
    bin_bounds,
    logit_effect_table,
)
from atlas.transcoders import TranscoderSpec, build_transcoder

L, F = 2, 6


def prompts() -> list[tuple[str, list[str], torch.Tensor]]:
    torch.manual_seed(0)
    out = []
    for i in range(6):
        n_pos = 5 + i
        acts = torch.relu(torch.randn(L, n_pos, F) * 2 - 1)
        out.append((f"p{i}", [f"t{i}_{j}" for j in range(n_pos)], acts))
    return out


def build(tmp_path: Path, parts: list[list[int]]) -> list[Path]:
    data = prompts()
    dirs = []
    for indices in parts:
        shard = FeatureStatsShard("tc", L, F, top_k=3, context=2)
        for i in indices:
            shard.add(*data[i])
        dirs.append(shard.write(tmp_path / "shards"))
    return dirs


def test_merged_statistics_match_direct_computation(tmp_path: Path) -> None:
    store = FeatureStatsStore(tmp_path / "stats.duckdb", top_k=3)
    assert store.ingest(build(tmp_path, [[0, 1, 2], [3, 4, 5]])) == 2
    all_acts = torch.cat([acts for _, _, acts in prompts()], dim=1)  # (L, tokens, F)
    with store.reader() as con:
        rows = con.execute(
            "SELECT layer, feature, n_tokens, n_active, frequency, mean_active, max_activation "
            "FROM feature_stats ORDER BY layer, feature"
        ).fetchall()
        assert len(rows) == L * F
        for layer, feature, n_tokens, n_active, frequency, mean_active, max_activation in rows:
            column = all_acts[layer, :, feature]
            active = column[column > 0]
            assert n_tokens == all_acts.shape[1] and n_active == active.numel()
            assert frequency == pytest.approx(active.numel() / all_acts.shape[1])
            assert mean_active == pytest.approx(float(active.mean()), rel=1e-5)
            assert max_activation == pytest.approx(float(column.max()), rel=1e-6)
        layer, feature, q50 = con.execute("SELECT layer, feature, bin_q50 FROM feature_quantiles LIMIT 1").fetchone()
        column = all_acts[layer, :, feature]
        median = float(column[column > 0].median())
        low, high = bin_bounds(q50)
        assert low / 1.34 <= median <= high * 1.34
        examples = con.execute(
            "SELECT activation, prompt_id, position, context_tokens FROM top_examples "
            "WHERE layer = 1 AND feature = 2 ORDER BY activation DESC"
        ).fetchall()
    per_prompt_best = sorted(((float(a[1, :, 2].max()), pid) for pid, _, a in prompts()), reverse=True)[:3]
    assert [(round(e[0], 5), e[1]) for e in examples] == [(round(v, 5), p) for v, p in per_prompt_best]
    pid, position = examples[0][1], examples[0][2]
    assert examples[0][3][-1] in (f"t{pid[1:]}_{position}", f"t{pid[1:]}_{position + 1}")


def test_reingest_does_not_double_count_and_readers_are_never_blocked(tmp_path: Path) -> None:
    store = FeatureStatsStore(tmp_path / "stats.duckdb")
    first = build(tmp_path, [[0, 1]])
    store.ingest(first)
    reader = store.reader()  # held open across the next ingest
    try:
        before = reader.execute("SELECT sum(n_tokens) FROM feature_stats").fetchone()
        assert store.ingest(first) == 0  # same shard again: skipped
        assert store.ingest(build(tmp_path, [[2]])) == 1  # the writer is not blocked by the open reader
        assert reader.execute("SELECT sum(n_tokens) FROM feature_stats").fetchone() == before  # old snapshot
    finally:
        reader.close()
    with store.reader() as con:
        n_tokens = con.execute("SELECT max(n_tokens) FROM feature_stats").fetchone()[0]
    assert n_tokens == sum(acts.shape[1] for _, _, acts in prompts()[:3])


def test_bad_shard_is_rejected_and_the_store_is_unchanged(tmp_path: Path) -> None:
    store = FeatureStatsStore(tmp_path / "stats.duckdb")
    good = build(tmp_path, [[0]])
    store.ingest(good)
    snapshot = (tmp_path / "stats.duckdb").read_bytes()
    bad = build(tmp_path, [[1]])[0]
    pq.write_table(pa.table({"layer": [0]}), bad / "counts.parquet")
    with pytest.raises(StatsError, match=r"counts\.parquet does not match the schema \(missing \['feature'"):
        store.ingest([bad])
    assert (tmp_path / "stats.duckdb").read_bytes() == snapshot
    missing = build(tmp_path, [[2]])[0]
    (missing / "histogram.parquet").unlink()
    with pytest.raises(StatsError, match=r"missing histogram\.parquet"):
        store.ingest([missing])
    assert (tmp_path / "stats.duckdb").read_bytes() == snapshot
    with pytest.raises(StatsError, match="do not fit"):
        FeatureStatsShard("tc", L, F).add("x", ["a"], torch.zeros(L, 2, F))


def test_logit_effects_follow_the_decoder() -> None:
    model = load_model("tiny-llama")
    torch.manual_seed(0)
    transcoder = build_transcoder(TranscoderSpec(kind="clt", n_layers=2, d_model=32, n_features=4))
    W_U = model.model.W_U.detach()
    table = logit_effect_table(transcoder, W_U, model.tokenizer, "tc", top=3)
    assert table.num_rows == 2 * 4 * 2 * 3
    row = table.filter(pa.compute.equal(table["layer"], 0)).to_pylist()[0]
    write = transcoder.W_dec[0][row["feature"]].sum(0).detach()
    expected = write @ (W_U - W_U.mean(1, keepdim=True))
    assert row["sign"] == "positive" and row["effect"] == pytest.approx(float(expected.max()), rel=1e-4)
    assert math.isfinite(row["effect"]) and isinstance(duckdb.__version__, str)


def test_an_empty_shard_registers_nothing(tmp_path: Path) -> None:
    store = FeatureStatsStore(tmp_path / "stats.duckdb")
    empty = FeatureStatsShard("tc", L, F).write(tmp_path / "shards")  # a batch whose every prompt failed
    assert store.ingest([empty]) == 0
    with store.reader() as con:
        tables = {row[0] for row in con.execute("SHOW TABLES").fetchall()}
        assert tables == {"ingested_shards"}
        assert con.execute("SELECT count(*) FROM ingested_shards").fetchone() == (0,)
    assert store.ingest([*build(tmp_path, [[0]]), empty]) == 1
    with store.reader() as con:
        assert con.execute("SELECT count(*) FROM ingested_shards").fetchone() == (1,)
        assert con.execute("SELECT count(*) FROM shard_counts").fetchone() == (L * F,)


def test_logit_effects_are_replaced_per_transcoder_set(tmp_path: Path) -> None:
    store = FeatureStatsStore(tmp_path / "stats.duckdb")
    assert not store.has_logit_effects("a")

    def effects(transcoder_id: str, value: float) -> pa.Table:
        return pa.table({"transcoder_id": [transcoder_id] * 2, "layer": [0, 1], "feature": [0, 0],
                         "sign": ["positive"] * 2, "rank": [0, 0], "token_id": [5, 6], "token": ["x", "y"],
                         "effect": [value, value]})  # fmt: skip

    store.ingest([], logit_effects=effects("a", 1.0))
    store.ingest([], logit_effects=effects("b", 2.0))
    store.ingest([], logit_effects=effects("a", 3.0))  # the same set again replaces its own rows only
    assert store.has_logit_effects("a") and store.has_logit_effects("b") and not store.has_logit_effects("c")
    with store.reader() as con:
        rows = con.execute("SELECT transcoder_id, effect, count(*) FROM logit_effects GROUP BY ALL ORDER BY 1")
        assert rows.fetchall() == [("a", 3.0, 2), ("b", 2.0, 2)]
