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
from atlas.training.objectives import least_squares_affine, massive_output_limits, ordinary_token_mask
from atlas.training.recipes import RECIPES, recipe_config
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
    # `make demo`'s recipe (`clt`: attention-sink tokens left out), shrunk to the tiny model and a few steps
    base = replace(
        RECIPES["clt"],
        kind=kind,
        n_features=16,
        steps=steps,
        log_every=5,
        checkpoint_every=10,
        stream=stream,
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


@pytest.mark.parametrize("outlier_factor", [None, 1.0])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(
    tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path, outlier_factor: float | None
) -> None:
    """Also with outlier_factor 1.0, which leaves out every batch's tokens above the set-up's 99th-percentile output
    norms: the resumed run must restore those limits, not measure new ones."""
    config = small_config(jsonl_corpus, steps=30, outlier_factor=outlier_factor)
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


def test_least_squares_affine_recovers_a_planted_map() -> None:
    """The ridge fit of `y = x·Wᵀ + b` (plus noise 1e-3) finds W and b per layer; one layer's map is not another's."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, 4, generator=generator)
    bias = torch.randn(3, 5, generator=generator)
    inputs = torch.randn(3, 2000, 4, generator=generator)
    targets = inputs @ weight.transpose(1, 2) + bias.unsqueeze(1) + 1e-3 * torch.randn(3, 2000, 5, generator=generator)
    fitted_weight, fitted_bias = least_squares_affine(inputs, targets)
    assert fitted_weight.shape == (3, 5, 4) and fitted_bias.shape == (3, 5)
    assert_close_at_scale(fitted_weight, weight, rel=1e-3, what="weight")
    assert_close_at_scale(fitted_bias, bias, rel=1e-3, what="bias")


def test_massive_output_limits_leave_out_sinks_and_keep_frequent_large_tokens() -> None:
    """Toy outputs `(2 layers, 1000 tokens, 8)` with norm about 1: 30 tokens (3 %) at 40× in layer 0, like a frequent
    token with a large output, and 2 attention-sink tokens at 900× in layer 1. With factor 10 only the sinks fall
    outside the limits, and they are left out at every layer."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(2, 1000, 8, generator=generator) / 8**0.5
    frequent, sinks = torch.arange(100, 130), torch.tensor([7, 512])
    targets[0, frequent] *= 40.0
    targets[1, sinks] = 900.0 / 8**0.5
    limits = massive_output_limits(targets, 10.0)
    assert limits.shape == (2,)
    keep = ordinary_token_mask(targets, limits)
    assert keep.shape == (1000,) and keep.sum() == 998
    assert not keep[sinks].any() and keep[frequent].all()
    assert ordinary_token_mask(targets, massive_output_limits(targets, 1e6)).all()


def test_outlier_tokens_are_left_out_of_the_skip_fit(tiny_llama: LoadedModel, jsonl_corpus: Path) -> None:
    """Set-up of the least-squares skip on batches with a planted linear MLP plus three sink tokens whose outputs
    are 500× the rest: with outlier_factor the fit recovers the planted map, without it the sinks bend it."""
    generator = torch.Generator().manual_seed(1)
    n_layers, d = tiny_llama.info.n_layers, tiny_llama.info.d_model
    weight = torch.randn(n_layers, d, d, generator=generator) / d**0.5
    inputs = torch.randn(n_layers, 512, d, generator=generator)
    targets = inputs @ weight.transpose(1, 2)
    targets[:, [3, 200, 401]] = 500.0 * torch.randn(n_layers, 3, d, generator=generator)
    batches = [(inputs[:, i : i + 64], targets[:, i : i + 64]) for i in range(0, 512, 64)]
    common = {"kind": "plt", "skip": True, "skip_init": "least_squares", "init_tokens": 512}

    def skip_error(**overrides: object) -> float:
        trainer = Trainer(tiny_llama, small_config(jsonl_corpus, **common, **overrides), "unused")
        state = trainer._fresh_state(batches)
        assert state.transcoder.W_skip is not None
        # the skip acts on normalised units: back to raw units for the comparison
        raw = state.transcoder.W_skip.detach() * (state.input_scale / state.output_scale).view(-1, 1, 1)
        return float((raw - weight).norm() / weight.norm())

    assert skip_error(outlier_factor=10.0) < 0.05 < 0.5 < skip_error(outlier_factor=None)


def test_stream_passes_reuse_each_chunk_in_fresh_orders(tiny_llama: LoadedModel, jsonl_corpus: Path) -> None:
    """With passes=2 a chunk's tokens are served twice, each pass a permutation of the chunk; pass 1 of the first
    chunk is exactly what passes=1 serves, and resuming mid-pass yields the uninterrupted batches."""
    once = replace(small_config(jsonl_corpus).stream, batch_size=62)  # a chunk (8 × 31 tokens) is 4 whole batches
    twice = replace(once, passes=2)
    per_chunk = once.batches_per_chunk

    def take(config: StreamConfig, n: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        stream = ActivationStream(tiny_llama, config, input_hook="mlp.hook_in", output_hook="mlp.hook_out")
        batches = stream.batches(start_step=start)
        return [next(batches) for _ in range(n)]

    single, double = take(once, per_chunk), take(twice, 2 * per_chunk + 1)
    for a, b in zip(single, double[:per_chunk], strict=True):
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    first_pass = torch.cat([b[0] for b in double[:per_chunk]], dim=1)
    second_pass = torch.cat([b[0] for b in double[per_chunk : 2 * per_chunk]], dim=1)
    assert not torch.equal(first_pass, second_pass)  # another order ...
    key = lambda t: sorted(map(tuple, t[0].round(decimals=5).tolist()))  # noqa: E731
    assert key(first_pass) == key(second_pass)  # ... of the same tokens
    assert not torch.equal(double[2 * per_chunk][0], double[0][0])  # then the next chunk
    resumed = take(twice, 2, start=per_chunk + 1)
    for a, b in zip(resumed, double[per_chunk + 1 : per_chunk + 3], strict=True):
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)


def test_least_squares_skip_start_explains_more_than_a_zero_start(
    tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path
) -> None:
    """Set-up with skip_init='least_squares' starts the skip at the MLPs' linear fit: the first logged FVU is
    below that of the same recipe with a zero skip, and the first batch's FVU of the skip alone is below 1."""
    common = {"kind": "plt", "skip": True, "steps": 5, "log_every": 1, "init_tokens": 512}
    fitted = Trainer(tiny_llama, small_config(jsonl_corpus, skip_init="least_squares", **common), tmp_path / "ls")
    zero = Trainer(tiny_llama, small_config(jsonl_corpus, **common), tmp_path / "zero")
    assert fitted.initial_batch_count() == 8 and zero.initial_batch_count() == 1
    slow_skip = Trainer(tiny_llama, small_config(jsonl_corpus, skip_lr_scale=0.01, **common), tmp_path / "slow")
    groups = slow_skip._optimizer(slow_skip._new_transcoder()).param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 0.01] and groups[1]["params"][0].shape == (2, 32, 32)
    fitted.run()
    zero.run()

    def first_fvu(run: str) -> float:
        return json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])["fvu_mean"]

    assert first_fvu("ls") < first_fvu("zero")
    assert first_fvu("ls") < 1.0


def test_cpu_budget_stops_training_and_drives_the_schedules(
    tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path
) -> None:
    """A run with a CPU budget stops once the process has spent it (long before its step ceiling), records the CPU
    time, and ramps λ on the budget: the last logged λ is close to its final value."""
    config = small_config(jsonl_corpus, steps=1_000_000, cpu_budget_s=3.0, log_every=1, checkpoint_every=10_000)
    result = Trainer(tiny_llama, config, tmp_path / "budget").run()
    final = result.final_metrics
    assert 3.0 <= final["cpu_seconds"] < 30.0 and 1 <= final["steps"] < 1_000_000
    log = [json.loads(line) for line in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == final["steps"]  # the stopping step is logged and checkpointed
    assert (tmp_path / "budget" / "checkpoints" / f"step_{final['steps']:08d}.pt").exists()
    assert log[-1]["lambda"] > 0.8 * config.sparsity_lambda > log[0]["lambda"]


def test_recipes_and_bad_training_settings() -> None:
    cpu = recipe_config("cpu", steps=10)
    assert cpu.skip and cpu.skip_init == "least_squares" and cpu.steps == 10 and cpu.cpu_budget_s is None
    budget = recipe_config("baseline", cpu_budget_s=60.0, stream={"eval_sequences": 32})
    assert budget.cpu_budget_s == 60.0 and budget.stream.eval_sequences == 32 and budget.kind == "clt"
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        recipe_config("fast", steps=10)
    with pytest.raises(ValueError, match="exactly one length"):
        recipe_config("cpu", steps=10, cpu_budget_s=5.0)
    with pytest.raises(ValueError, match="needs skip=True"):
        TrainConfig(skip_init="least_squares")
    with pytest.raises(ValueError, match="unknown encoder_init"):
        TrainConfig(encoder_init="magic")
    with pytest.raises(ValueError, match="cpu_budget_s must be at least"):
        TrainConfig(cpu_budget_s=0.0)
    with pytest.raises(ValueError, match="passes must be at least 1"):
        StreamConfig(passes=0)
    with pytest.raises(ValueError, match="skip_lr_scale must be at least 0"):
        TrainConfig(skip_lr_scale=-1.0)
    with pytest.raises(ValueError, match="outlier_factor must be at least 1"):
        TrainConfig(outlier_factor=0.5)
    assert recipe_config("cpu", steps=10).outlier_factor == 10.0


def test_init_from_a_saved_dictionary_starts_where_it_left_off(
    tiny_llama: LoadedModel, jsonl_corpus: Path, tmp_path: Path
) -> None:
    """`init_from`: the first state, folded back to raw units, is the saved dictionary (the fine-tune case)."""
    config = small_config(jsonl_corpus, steps=5)
    saved = load_transcoder(Trainer(tiny_llama, config, tmp_path / "base").run().transcoder_dir)
    trainer = Trainer(tiny_llama, replace(config, stream=replace(config.stream, seed=7)), tmp_path / "next",
                      init_from=saved)  # fmt: skip
    state = trainer._fresh_state([next(trainer.stream.batches())])
    start = copy.deepcopy(state.transcoder)
    start.fold_normalisation(state.input_scale, state.output_scale)
    for name, value in saved.state_dict().items():
        assert_close_at_scale(start.state_dict()[name], value, rel=FLOAT32_CHAIN, what=name)
    with pytest.raises(TrainingError, match="cannot initialise"):
        Trainer(tiny_llama, small_config(jsonl_corpus, n_features=8), tmp_path / "x", init_from=saved)


def test_demo_trains_its_clt_or_a_named_recipe(tmp_path: Path) -> None:
    """`atlas demo` trains the `clt` recipe for `DEMO_CPU_MINUTES` of CPU time by default, another recipe, a step
    count or a width when asked; an unknown recipe, or both lengths at once, is one clear line and nothing is
    created."""
    from typer.testing import CliRunner

    from atlas.config import DEMO_CPU_MINUTES, DEMO_TRAINING_RECIPE
    from atlas.training.recipes import RECIPES
    from atlas_cli.ingest_commands import demo_training_config
    from atlas_cli.main import app

    default = demo_training_config(DEMO_TRAINING_RECIPE, None, None, None)
    assert (default.kind, default.n_features, default.cpu_budget_s) == ("clt", 128, DEMO_CPU_MINUTES * 60)
    assert default.outlier_factor == 10.0 and not default.skip  # the baseline CLT with the attention sinks left out
    assert replace(default, outlier_factor=None, cpu_budget_s=None, steps=RECIPES["baseline"].steps,
                   checkpoint_every=RECIPES["baseline"].checkpoint_every,
                   log_every=RECIPES["baseline"].log_every) == RECIPES["baseline"]  # fmt: skip
    cpu = demo_training_config("cpu", None, None, 20.0)
    assert cpu.kind == "plt" and cpu.skip and cpu.outlier_factor == 10.0 and cpu.cpu_budget_s == 1200.0
    short = demo_training_config("clt", 40, 64, None)
    assert (short.steps, short.n_features, short.cpu_budget_s) == (40, 64, None)
    runner = CliRunner()
    out = tmp_path / "demo"
    unknown = runner.invoke(app, ["demo", "--recipe", "fast", "--out", str(out)])
    assert unknown.exit_code != 0 and "unknown recipe 'fast'" in unknown.output
    both = runner.invoke(app, ["demo", "--cpu-minutes", "3", "--steps", "10", "--out", str(out)])
    assert both.exit_code != 0 and "by --steps or by --cpu-minutes, not both" in " ".join(
        both.output.replace("│", " ").split()
    )
    assert not out.exists()
