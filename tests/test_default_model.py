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
            diff = (smollm2.model(ids) - reference(ids).logits).abs().max().item()
        assert diff <= 1e-4, f"{prompt!r}: max |Δlogit| {diff}"


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
