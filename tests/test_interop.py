"""Transcoders we train and save load in circuit-tracer 0.5.0 (its own virtualenv) and encode identically.

The circuit-tracer environment is created by `benchmarks/interop/setup_ct_env.sh` (the README's test command
runs it). Its `ct_encode.py` loads our directory with circuit-tracer's own loader and encodes our activations
with circuit-tracer's own code; we compare activations and reconstructions to 1e-5.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from atlas.models import LoadedModel
from atlas.training.activations import ActivationStream, StreamConfig
from atlas.training.trainer import TrainConfig, Trainer
from atlas.transcoders import load_transcoder

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[1]
CT_PYTHON = Path(os.environ.get("CT_VENV", REPO / ".venv-ct")) / "bin" / "python"
CT_ENCODE = REPO / "benchmarks" / "interop" / "ct_encode.py"


@pytest.mark.parametrize(
    ("kind", "activation", "skip"),
    [("clt", "jumprelu", False), ("plt", "jumprelu", True), ("clt", "relu", False)],
)
def test_circuit_tracer_reproduces_our_encodings(
    tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path, kind: str, activation: str, skip: bool
) -> None:
    if not CT_PYTHON.exists():
        pytest.fail(f"circuit-tracer env missing at {CT_PYTHON}: run benchmarks/interop/setup_ct_env.sh")
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
    ours = load_transcoder(result.transcoder_dir)
    inputs, _ = next(
        ActivationStream(tiny_llama, stream, input_hook="mlp.hook_in", output_hook="mlp.hook_out").batches(start_step=7)
    )
    save_file({f"layer_{i}": inputs[i].contiguous() for i in range(inputs.shape[0])}, str(tmp_path / "in.st"))
    run = subprocess.run(
        [
            str(CT_PYTHON),
            str(CT_ENCODE),
            "--transcoders",
            str(result.transcoder_dir),
            "--inputs",
            str(tmp_path / "in.st"),
            "--out",
            str(tmp_path / "out.st"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = load_file(tmp_path / "out.st")
    with torch.no_grad():
        output = ours(inputs)
    assert (output.activations > 0).float().mean() > 0.01, "too few active features to compare"
    for layer in range(inputs.shape[0]):
        torch.testing.assert_close(theirs[f"acts_{layer}"], output.activations[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs[f"recon_{layer}"], output.reconstruction[layer], atol=1e-5, rtol=1e-5)
