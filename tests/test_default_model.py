"""End-to-end checks on the real offline default model, SmolLM2-135M-Instruct (marked e2e; CI runs them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
