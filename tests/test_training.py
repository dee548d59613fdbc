"""Transcoder training on a tiny model: learning, metrics, export, resume (in-process and after kill -9), faults."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from atlas.models import LoadedModel, load_model
from atlas.training.activations import ActivationStream, StreamConfig
from atlas.training.corpus import CorpusError
from atlas.training.trainer import TrainConfig, Trainer, TrainingError
from atlas.transcoders import check_compatible, load_transcoder
from tests.tolerances import FLOAT32_CHAIN, assert_close_at_scale


def small_config(corpus: Path, kind: str = "clt", steps: int = 30, **overrides: object) -> TrainConfig:
    stream = StreamConfig(
        corpus=str(corpus),
        context_length=32,
        batch_size=64,
        chunk_sequences=8,
        model_batch_size=8,
        eval_sequences=4,
    )
    base = TrainConfig(
        kind=kind,
        n_features=16,
        steps=steps,
        log_every=5,
        checkpoint_every=10,
        stream=stream,  # type: ignore[arg-type]
        sparsity_lambda=0.1,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


class StopAt(Exception):
    pass


def stop_at(step: int):  # type: ignore[no-untyped-def]
    def callback(record: dict) -> None:  # type: ignore[type-arg]
        if record["step"] >= step:
            raise StopAt(step)

    return callback


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_training_learns_and_exports(tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path, kind: str) -> None:
    result = Trainer(tiny_llama, small_config(jsonl_corpus, kind, steps=40), tmp_path / kind).run()
    log = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert log[-1]["fvu_mean"] < log[0]["fvu_mean"]
    assert len(log[-1]["fvu"]) == len(log[-1]["l0"]) == len(log[-1]["dead"]) == 2
    final = json.loads((tmp_path / kind / "metrics.json").read_text())
    assert final["steps"] == 40 and final["eval_tokens"] == 4 * 31
    assert final["ce_spliced"] > 0 and final["ce_delta"] == pytest.approx(final["ce_spliced"] - final["ce_clean"])
    transcoder = load_transcoder(result.transcoder_dir)
    assert transcoder.spec.kind == kind
    check_compatible(transcoder.spec, n_layers=2, d_model=32, model_name="tiny-llama")


def test_exported_weights_act_on_raw_activations(tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path) -> None:
    """The folded export reproduces the trained model's reconstruction in raw units (no normaliser needed)."""
    config = small_config(jsonl_corpus, steps=10)
    result = Trainer(tiny_llama, config, tmp_path / "run").run()
    checkpoint = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    trained = Trainer(tiny_llama, config, tmp_path / "run")._new_transcoder()
    trained.load_state_dict(checkpoint["transcoder"])
    exported = load_transcoder(result.transcoder_dir)
    stream = ActivationStream(tiny_llama, config.stream, input_hook="mlp.hook_in", output_hook="mlp.hook_out")
    inputs, _ = next(stream.batches())
    s_in, s_out = checkpoint["input_scale"].view(-1, 1, 1), checkpoint["output_scale"].view(-1, 1, 1)
    with torch.no_grad():
        expected = trained(inputs * s_in).reconstruction / s_out
        assert_close_at_scale(exported(inputs).reconstruction, expected, rel=FLOAT32_CHAIN, what="exported")


def _final_state(directory: Path) -> dict[str, torch.Tensor]:
    return load_transcoder(directory).state_dict()


def test_resume_gives_the_same_result_as_an_uninterrupted_run(
    tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path
) -> None:
    config = small_config(jsonl_corpus, steps=30)
    straight = Trainer(tiny_llama, config, tmp_path / "straight").run()
    with pytest.raises(StopAt):
        Trainer(tiny_llama, config, tmp_path / "resumed").run(on_progress=stop_at(25))
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("*.pt"))[-1] == "step_00000020.pt"
    resumed = Trainer(tiny_llama, config, tmp_path / "resumed").run()
    assert resumed.resumed_from == 20
    a, b = _final_state(straight.transcoder_dir), _final_state(resumed.transcoder_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
    log = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert log == [5, 10, 15, 20, 25, 30]


def test_resume_refuses_different_settings(tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(StopAt):
        Trainer(tiny_llama, small_config(jsonl_corpus), tmp_path / "run").run(on_progress=stop_at(15))
    with pytest.raises(TrainingError, match="different settings"):
        Trainer(tiny_llama, small_config(jsonl_corpus, n_features=8), tmp_path / "run").run()


def test_non_finite_training_stops_and_keeps_the_good_checkpoint(jsonl_corpus: Path, tmp_path: Path) -> None:
    model = load_model("tiny-llama")  # own copy: it gets poisoned below
    config = small_config(jsonl_corpus)
    with pytest.raises(StopAt):
        Trainer(model, config, tmp_path / "run").run(on_progress=stop_at(15))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000010.pt"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    with torch.no_grad():
        model.model.original_model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite activations at step 10"):
        Trainer(model, config, tmp_path / "run").run()
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step_00000010.pt"]


def test_diverging_loss_is_reported(tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path) -> None:
    config = small_config(jsonl_corpus, sparsity_lambda=float("inf"))
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) .*at step 0.*Last good checkpoint: none"):
        Trainer(tiny_llama, config, tmp_path / "run").run()
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_empty_and_missing_corpus(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CorpusError, match="empty or too small"):
        Trainer(tiny_llama, small_config(empty), tmp_path / "run").run()
    with pytest.raises(CorpusError, match="does not exist"):
        Trainer(tiny_llama, small_config(tmp_path / "nope.jsonl"), tmp_path / "run2")


def _train_cli(out: Path, corpus: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "atlas_cli",
        "train",
        "--out",
        str(out),
        "--model",
        "tiny-llama",
        "--corpus",
        str(corpus),
        "--features",
        "16",
        "--steps",
        str(steps),
        "--batch-size",
        "64",
        "--context-length",
        "32",
        "--chunk-sequences",
        "8",
        "--checkpoint-every",
        "10",
        "--log-every",
        "10",
        "--sparsity-lambda",
        "0.1",
    ]


def test_kill_minus_nine_then_restart_matches_uninterrupted_cli_run(jsonl_corpus: Path, tmp_path: Path) -> None:
    steps = 400
    subprocess.run(_train_cli(tmp_path / "straight", jsonl_corpus, steps), check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cli(out, jsonl_corpus, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("checkpoints/step_*.pt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "training finished before it could be killed; raise the step count"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "transcoders").exists()
    rerun = subprocess.run(_train_cli(out, jsonl_corpus, steps), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    final = json.loads((out / "metrics.json").read_text())
    assert final["resumed_from"] is not None and 0 < final["resumed_from"] < steps
    a, b = _final_state(tmp_path / "straight" / "transcoders"), _final_state(out / "transcoders")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


def test_cli_eval_rejects_transcoders_of_another_model(
    tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path
) -> None:
    result = Trainer(tiny_llama, small_config(jsonl_corpus, steps=10), tmp_path / "run").run()
    eval_command = [sys.executable, "-m", "atlas_cli", "transcoders", "eval", str(result.transcoder_dir)]
    ok = subprocess.run(
        [*eval_command, "--model", "tiny-llama", "--corpus", str(jsonl_corpus), "--context-length", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "spliced CE" in ok.stdout
    bad = subprocess.run(
        [*eval_command, "--model", "smollm2-135m-instruct"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2
    assert "transcoder does not fit model 'smollm2-135m-instruct': 2 layers vs the model's 30" in " ".join(
        bad.stderr.split()
    )


def test_init_from_a_saved_dictionary_starts_where_it_left_off(
    tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path
) -> None:
    """`init_from`: the first state, folded back to raw units, is the saved dictionary (the fine-tune case)."""
    config = small_config(jsonl_corpus, steps=5)
    saved = load_transcoder(Trainer(tiny_llama, config, tmp_path / "base").run().transcoder_dir)
    trainer = Trainer(tiny_llama, replace(config, stream=replace(config.stream, seed=7)), tmp_path / "next",
                      init_from=saved)  # fmt: skip
    state = trainer._fresh_state(next(trainer.stream.batches()))
    start = copy.deepcopy(state.transcoder)
    start.fold_normalisation(state.input_scale, state.output_scale)
    for name, value in saved.state_dict().items():
        assert_close_at_scale(start.state_dict()[name], value, rel=FLOAT32_CHAIN, what=name)
    with pytest.raises(TrainingError, match="cannot initialise"):
        Trainer(tiny_llama, small_config(jsonl_corpus, n_features=8), tmp_path / "x", init_from=saved)
