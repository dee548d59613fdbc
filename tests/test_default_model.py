"""End-to-end checks on the real offline default model, SmolLM2-135M-Instruct (marked e2e; CI runs them)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from atlas.config import SMOLLM2_135M_INSTRUCT
from atlas.models import LoadedModel, load_model
from atlas.models.loading import packaged_cache_path
from atlas.training.activations import StreamConfig
from atlas.training.trainer import TrainConfig, Trainer
from atlas.transcoders import load_transcoder
from tests.tolerances import FLOAT32_CHAIN, assert_close_at_scale

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model(SMOLLM2_135M_INSTRUCT.alias)


def test_logits_match_the_hugging_face_model(smollm2: LoadedModel) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        packaged_cache_path(SMOLLM2_135M_INSTRUCT), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    for prompt in ("The Eiffel Tower is located in the city of", "1+1=", 'The opposite of "small" is "'):
        ids = smollm2.tokenize(prompt)
        with torch.no_grad():
            ours, theirs = smollm2.model(ids), reference(ids).logits
        # 30 layers of float32 matmuls summed in another order: roundoff of the logits' scale, not an absolute bound
        assert_close_at_scale(ours, theirs, rel=FLOAT32_CHAIN, what=f"{prompt!r} logits vs Hugging Face")


def test_ioi_prompt_predicts_mary(smollm2: LoadedModel) -> None:
    ids = smollm2.tokenize("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        top = smollm2.model(ids)[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([top]) == " Mary"
    assert smollm2.info.n_layers == 30 and smollm2.info.d_model == 576


def test_cached_reload_takes_seconds() -> None:
    start = time.perf_counter()
    loaded = load_model(SMOLLM2_135M_INSTRUCT.alias)
    elapsed = time.perf_counter() - start
    assert loaded.info.source == "packaged-gguf"
    assert elapsed < 45, f"cached load took {elapsed:.1f}s"


def test_smoke_training_on_the_default_model(smollm2: LoadedModel, tmp_path: Path) -> None:
    stream = StreamConfig(corpus="offline", context_length=33, batch_size=128, chunk_sequences=8, eval_sequences=2)
    config = TrainConfig(kind="clt", n_features=16, steps=4, log_every=2, checkpoint_every=2, stream=stream)
    result = Trainer(smollm2, config, tmp_path / "run").run()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["fvu"]) == 30 and metrics["ce_clean"] < 6
    clt = load_transcoder(result.transcoder_dir)
    assert clt.spec.n_layers == 30 and clt.spec.d_model == 576


def test_attribution_on_the_default_model_is_complete(smollm2: LoadedModel) -> None:
    """Llama architecture without biases, b_dec = 0, no position zeroing: logit rows sum to the demeaned logits."""
    from atlas.attribution.engine import AttributionConfig, attribute
    from atlas.attribution.nodes import NodeKind
    from atlas.transcoders import TranscoderSpec, build_transcoder

    torch.manual_seed(0)
    clt = build_transcoder(TranscoderSpec(kind="clt", n_layers=30, d_model=576, n_features=64))
    with torch.no_grad():
        clt.b_dec.zero_()
        clt.log_threshold.fill_(-4.0)  # type: ignore[union-attr]
        clt.b_enc.fill_(-0.5)
    prompt = "When Mary and John went to the store, John gave a drink to"
    graph = attribute(smollm2, clt, prompt, config=AttributionConfig(zero_positions=(), max_feature_nodes=32))
    assert graph.index.logits[0].label == " Mary"
    assert graph.folded_features["n_active"] > 32 == graph.index.n_features
    sums = torch.zeros(graph.index.n_nodes, dtype=torch.float64).index_add_(
        0, graph.edges.target, graph.edges.weight.double()
    )
    with torch.no_grad():
        logits = smollm2.model(smollm2.tokenize(prompt))[0, -1].double()
    rows = graph.index.slice(NodeKind.LOGIT)
    demeaned = torch.stack([logits[node.token_id] - logits.mean() for node in graph.index.logits])
    # a logit's in-edges are thousands of float32 terms: compare at the scale of those terms
    row_scale = torch.zeros(graph.index.n_nodes, dtype=torch.float64).index_add_(
        0, graph.edges.target, graph.edges.weight.double().abs()
    )
    assert_close_at_scale(sums[rows], demeaned, rel=FLOAT32_CHAIN, scale=row_scale[rows], what="logit completeness")


def test_state_capital_answers_are_single_tokens_of_the_default_model(smollm2: LoadedModel) -> None:
    """An `answer` target is the answer's first token, so every capital of the set must be exactly one token."""
    from ingest.demo_corpus import state_capital_prompts

    for prompt in state_capital_prompts():
        ids = smollm2.tokenizer(prompt.answer, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and smollm2.tokenizer.decode(ids) == prompt.answer, prompt.answer


def test_dallas_prompts_ingested_with_the_answer_target_answer_the_token_query(
    smollm2: LoadedModel, tmp_path: Path, neo4j_connection: Any, neo4j_driver: Any
) -> None:
    """Two Dallas prompts through the real ingest path (in-process) with a small random CLT and `--targets answer`:
    the only logit target is " Austin" although the model predicts something else, and the query from the features
    active on " Dallas" to capital logits returns paths that start on the " Dallas" position and end on " Austin"."""
    import uuid

    from atlas.storage.neo4j_writer import GraphWriter
    from atlas.storage.queries import AtlasQueries
    from atlas.transcoders import TranscoderSpec, build_transcoder, save_transcoder
    from ingest.demo_corpus import state_capital_prompts
    from ingest.pipeline import IngestOptions, run_ingest
    from ingest.settings import TARGET_ANSWER, AttributionSettings

    dallas = [p for p in state_capital_prompts() if " Dallas " in f" {p.text} "][:2]
    corpus = tmp_path / "dallas.jsonl"
    corpus.write_text("".join(json.dumps(p.record()) + "\n" for p in dallas))
    torch.manual_seed(0)
    clt = build_transcoder(TranscoderSpec(kind="clt", n_layers=30, d_model=576, n_features=16))
    with torch.no_grad():
        clt.b_dec.zero_()
        clt.log_threshold.fill_(-4.0)  # type: ignore[union-attr]
        clt.b_enc.fill_(-0.5)
        clt.b_dec[0, 0] += 1e-6 * (1 + uuid.uuid4().int % 1000)  # identities are by content: this test's own
    transcoders = save_transcoder(clt, tmp_path / "clt", model_name=SMOLLM2_135M_INSTRUCT.alias,
                                  metadata={"test_tag": uuid.uuid4().hex})  # fmt: skip
    settings = AttributionSettings(targets=(TARGET_ANSWER,), max_feature_nodes=48, node_threshold=1.0,
                                   edge_threshold=1.0)  # fmt: skip
    options = IngestOptions(corpus=corpus, transcoders=transcoders, model=SMOLLM2_135M_INSTRUCT.alias, workers=0,
                            settings=settings, run="dallas-e2e", runs_root=tmp_path / "runs",
                            stats_db=tmp_path / "stats.duckdb", progress=False)  # fmt: skip
    report = run_ingest(options, connection=neo4j_connection)
    ids = sorted(r["id"] for r in neo4j_driver.execute_query(
        "MATCH (p:Prompt {transcoder: $t}) RETURN p.id AS id", t=report.transcoder_id).records)  # fmt: skip
    try:
        assert report.computed == len(ids) == 2 and report.prompt_failures == 0
        targets = neo4j_driver.execute_query(
            "MATCH (l:LogitTarget) WHERE l.prompt_id IN $ids RETURN l.label AS label", ids=ids
        ).records
        assert sorted(r["label"] for r in targets) == [" Austin", " Austin"]
        q = AtlasQueries(neo4j_driver, neo4j_connection.database)
        on = q.features_on_token(" Dallas", prompt_ids=ids, model=SMOLLM2_135M_INSTRUCT.alias)
        assert on.rows and all(r.token_text == " Dallas" for r in on.rows)
        paths = q.paths_to_logits(None, [" Austin", " Sacramento"], at_token=" Dallas", max_hops=2, prompt_ids=ids,
                                  model=SMOLLM2_135M_INSTRUCT.alias, limit=50).rows  # fmt: skip
        assert paths and {p.target_text for p in paths} == {" Austin"}
        texts = {p.prompt_id: str(p.text) for p in q.list_prompts(prompt_ids=ids).rows}
        for path in paths:
            tokens = smollm2.tokenizer.convert_ids_to_tokens(smollm2.tokenize(texts[path.prompt_id])[0].tolist())
            assert path.nodes[0].kind == "feature" and tokens[path.nodes[0].position] == "ĠDallas"
            assert path.source_key in {r.feature_key for r in on.rows}
    finally:
        writer = GraphWriter(neo4j_driver, neo4j_connection.database)
        for pid in ids:
            writer.delete_prompt(pid)
