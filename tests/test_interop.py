"""Transcoders we train and save load in circuit-tracer 0.5.0 (its own virtualenv) and encode identically.

The circuit-tracer environment is created by `benchmarks/interop/setup_ct_env.sh` (the README's test command
runs it). `benchmarks.interop.compare` runs circuit-tracer's own loader and encoder on our directory and our
activations; activations and reconstructions must equal ours to 1e-5 of their largest magnitude.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas.models import LoadedModel
from atlas.training.activations import ActivationStream, StreamConfig
from atlas.training.trainer import TrainConfig, Trainer
from benchmarks.interop.compare import compare_with_circuit_tracer
from tests.tolerances import FLOAT32_SUM

pytestmark = pytest.mark.interop


@pytest.mark.parametrize(
    ("kind", "activation", "skip"),
    [("clt", "jumprelu", False), ("plt", "jumprelu", True), ("clt", "relu", False)],
)
def test_circuit_tracer_reproduces_our_encodings(
    tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path, kind: str, activation: str, skip: bool
) -> None:
    stream = StreamConfig(
        corpus=str(jsonl_corpus), context_length=32, batch_size=64, chunk_sequences=8, eval_sequences=2
    )
    config = TrainConfig(
        kind=kind,
        n_features=24,
        activation=activation,
        skip=skip,
        steps=20,  # type: ignore[arg-type]
        log_every=10,
        checkpoint_every=20,
        sparsity_lambda=0.1,
        stream=stream,
    )
    result = Trainer(tiny_llama, config, tmp_path / "run").run()
    inputs, _ = next(
        ActivationStream(tiny_llama, stream, input_hook="mlp.hook_in", output_hook="mlp.hook_out").batches(start_step=7)
    )
    comparison = compare_with_circuit_tracer(result.transcoder_dir, inputs)
    assert comparison.active_share > 0.01, "too few active features to compare"
    # float32 sums in another library's order: equal to roundoff of the values' scale
    assert comparison.max_activation_diff <= FLOAT32_SUM * comparison.activation_scale
    assert comparison.max_reconstruction_diff <= FLOAT32_SUM * comparison.reconstruction_scale
