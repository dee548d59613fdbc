"""Train a transcoder set (PLT or CLT) on activations streamed from a model, with checkpoints and resume.

Phases, each timed in the log: (1) set-up: normalisation scales and encoder-bias initialisation from the first
batch; (2) training: Adam, λ ramped linearly over the run, learning rate decayed linearly over the last 20 %,
gradients clipped, per-layer metrics (FVU, L0, dead fraction) logged live and to `metrics.jsonl`; checkpoints every
`checkpoint_every` steps; (3) evaluation: next-token loss with every MLP replaced (spliced CE delta); (4) export:
the activation normalisation folded into the weights, saved in circuit-tracer's format under `<out>/transcoders`.

Resume: a checkpoint holds weights, optimiser state, normalisation scales, dead-feature counters and the step;
the activation stream is a pure function of the step (see `atlas.training.activations`), so a resumed run sees the
batches the uninterrupted run would have seen and, on CPU, ends with identical weights (on GPU, up to the
nondeterminism of atomic reductions). Checkpoints are written to a temporary file and renamed, so a kill
mid-write never replaces a good checkpoint with a partial one; a non-finite loss stops training before any
checkpoint is written.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from atlas.config import require_at_least
from atlas.models.loading import LoadedModel
from atlas.training import objectives as obj
from atlas.training.activations import ActivationStream, StreamConfig
from atlas.training.splicing import spliced_cross_entropy
from atlas.transcoders.activations import ActivationConfig
from atlas.transcoders.base import EncoderStack, TranscoderKind, TranscoderSpec
from atlas.transcoders.card import CARD_KEY, card_from_metadata
from atlas.transcoders.io import build_transcoder, save_transcoder

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_LOG = "metrics.jsonl"
FINAL_METRICS = "metrics.json"
TRANSCODER_DIR = "transcoders"


SKIP_INITS = ("zero", "least_squares")
# Norm of each feature's (concatenated) decoder rows when encoders start from decoders: small, so that the
# untrained features barely disturb what the skip already reconstructs (normalised units: E‖y‖ = √d_model).
DECODER_INIT_NORM = 0.1
ENCODER_INITS = ("random", "decoder")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and must match for a resume)."""

    kind: TranscoderKind = "clt"
    n_features: int = 128
    activation: str = "jumprelu"
    topk: int | None = None
    skip: bool = False
    steps: int = 200
    lr: float | None = None  # None: 2e-4 / √(n_features / 2¹⁴)
    lr_decay_fraction: float = 0.2
    sparsity_lambda: float = 1.0  # final value of the linear ramp
    sparsity_c: float = 4.0
    bandwidth: float = 1.0
    initial_threshold: float = 0.1
    pre_act_coef: float = 3e-6
    init_firing_rate: float = 0.1  # share of tokens each feature fires on at initialisation (capped 10000/features)
    grad_clip: float = 1.0
    skip_init: str = "zero"  # "least_squares": W_skip and b_dec start as the ridge fit of the MLP (needs skip)
    encoder_init: str = "random"  # "decoder": each encoder row starts as its feature's (own-layer) decoder row
    skip_lr_scale: float = 1.0  # the skip's learning rate relative to the rest (Adam moves all its d² entries)
    init_tokens: int = 8192  # tokens the least-squares skip fit reads at set-up (they are trained on too)
    # Leave out of training (and of the skip fit) tokens whose MLP output norm at some layer exceeds this many
    # times that layer's 99th-percentile norm at set-up: attention sinks with massive activations. None: keep all.
    outlier_factor: float | None = None
    cpu_budget_s: float | None = None  # stop after this much process CPU time; schedules follow its fraction
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    dead_window_tokens: int = 1_000_000
    input_hook: str = "mlp.hook_in"
    output_hook: str = "mlp.hook_out"
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        require_at_least(
            "training",
            {
                "n_features": (self.n_features, 1),
                "topk": (self.topk, 1),
                "steps": (self.steps, 1),
                "lr": (self.lr, 0.0),
                "sparsity_lambda": (self.sparsity_lambda, 0.0),
                "checkpoint_every": (self.checkpoint_every, 1),
                "keep_checkpoints": (self.keep_checkpoints, 1),
                "log_every": (self.log_every, 1),
                "init_tokens": (self.init_tokens, 1),
                "skip_lr_scale": (self.skip_lr_scale, 0.0),
                "outlier_factor": (self.outlier_factor, 1.0),
                "cpu_budget_s": (self.cpu_budget_s, 1.0),
            },
        )
        if self.skip_init not in SKIP_INITS:
            raise ValueError(f"unknown skip_init {self.skip_init!r}; expected one of {SKIP_INITS}")
        if self.encoder_init not in ENCODER_INITS:
            raise ValueError(f"unknown encoder_init {self.encoder_init!r}; expected one of {ENCODER_INITS}")
        if self.skip_init == "least_squares" and not self.skip:
            raise ValueError("skip_init='least_squares' fits the skip connection; it needs skip=True")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else obj.default_learning_rate(self.n_features)

    def spec(self, n_layers: int, d_model: int) -> TranscoderSpec:
        return TranscoderSpec(
            kind=self.kind,
            n_layers=n_layers,
            d_model=d_model,
            n_features=self.n_features,
            activation=ActivationConfig(self.activation, self.topk),  # type: ignore[arg-type]
            skip=self.skip,
            input_hook=self.input_hook,
            output_hook=self.output_hook,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["stream"] = StreamConfig(**values.get("stream", {}))
        return cls(**values)


@dataclass
class TrainResult:
    out_dir: Path
    transcoder_dir: Path
    final_metrics: dict[str, Any]
    resumed_from: int | None


@dataclass
class _State:
    step: int
    transcoder: EncoderStack
    optimizer: torch.optim.Optimizer
    input_scale: torch.Tensor
    output_scale: torch.Tensor
    tokens_since_fired: torch.Tensor
    cpu_seconds: float = 0.0  # process CPU time spent training so far (kept across resumes)
    output_limits: torch.Tensor | None = None  # (n_layers,) norms above which a token is left out (outlier_factor)


ProgressCallback = Callable[[dict[str, Any]], None]


def _ordinary_tokens(
    batch: tuple[torch.Tensor, torch.Tensor], limits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch `(inputs, targets)`, each `(n_layers, n_tokens, d)`, without its tokens above `limits` (all of it
    in the unlikely case that every token is above: a step is never taken on an empty batch)."""
    inputs, targets = batch
    keep = obj.ordinary_token_mask(targets, limits)
    if not keep.any():
        return batch
    return inputs[:, keep], targets[:, keep]


class Trainer:
    """Runs one training job into `out_dir` (metrics log, checkpoints, final transcoders)."""

    def __init__(
        self, model: LoadedModel, config: TrainConfig, out_dir: str | Path, *, init_from: EncoderStack | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.out_dir = Path(out_dir)
        self.stream = ActivationStream(
            model, config.stream, input_hook=config.input_hook, output_hook=config.output_hook
        )
        self.spec = config.spec(model.info.n_layers, model.info.d_model)
        # A saved dictionary (acting on raw activations) to start from instead of a random one, e.g. the base model's
        # dictionary when training one for a fine-tune: the features keep their identity, so a diff aligns them.
        self.init_from = init_from
        shape = (self.spec.kind, self.spec.n_layers, self.spec.d_model, self.spec.n_features)
        if init_from is not None and shape != (init_from.spec.kind, init_from.spec.n_layers, init_from.spec.d_model,
                                               init_from.spec.n_features):  # fmt: skip
            raise TrainingError(
                f"cannot initialise from a {init_from.spec.kind} of {init_from.spec.n_layers} layers × "
                f"{init_from.spec.n_features} features (d_model {init_from.spec.d_model}): this run trains a "
                f"{self.spec.kind} of {self.spec.n_layers} × {self.spec.n_features} (d_model {self.spec.d_model})"
            )

    # --- checkpoints --------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    def latest_checkpoint(self) -> Path | None:
        files = sorted(self.checkpoint_dir.glob("step_*.pt"))
        return files[-1] if files else None

    def resume_step(self) -> int:
        """The step a run into `out_dir` would continue from (0 without a checkpoint)."""
        latest = self.latest_checkpoint()
        return 0 if latest is None else int(latest.stem.split("_")[1])

    def _save_checkpoint(self, state: _State) -> Path:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step_{state.step:08d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(
            {
                "step": state.step,
                "config": self.config.to_dict(),
                "model_name": self.model.info.name,
                "transcoder": state.transcoder.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "input_scale": state.input_scale,
                "output_scale": state.output_scale,
                "tokens_since_fired": state.tokens_since_fired,
                "cpu_seconds": state.cpu_seconds,
                "output_limits": state.output_limits,
            },
            tmp,
        )
        os.replace(tmp, path)
        for old in sorted(self.checkpoint_dir.glob("step_*.pt"))[: -self.config.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def _load_checkpoint(self, path: Path) -> _State:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for truncated files
            raise TrainingError(f"checkpoint {path} is unreadable ({err}); delete it to fall back") from err
        saved = TrainConfig.from_dict(data["config"])
        if saved != self.config or data.get("model_name") != self.model.info.name:
            raise TrainingError(
                f"{self.out_dir} holds a run with different settings (checkpoint {path.name}); pass --fresh to"
                " discard it, or choose another --out directory"
            )
        transcoder = self._new_transcoder()
        transcoder.load_state_dict(data["transcoder"])
        optimizer = self._optimizer(transcoder)
        optimizer.load_state_dict(data["optimizer"])
        return _State(
            step=int(data["step"]),
            transcoder=transcoder,
            optimizer=optimizer,
            input_scale=data["input_scale"],
            output_scale=data["output_scale"],
            tokens_since_fired=data["tokens_since_fired"],
            cpu_seconds=float(data.get("cpu_seconds", 0.0)),
            output_limits=data.get("output_limits"),
        )

    # --- set-up -------------------------------------------------------------------------------------------
    def _new_transcoder(self) -> EncoderStack:
        return build_transcoder(
            self.spec, bandwidth=self.config.bandwidth, initial_threshold=self.config.initial_threshold
        ).to(self.model.device)

    def _optimizer(self, transcoder: EncoderStack) -> torch.optim.Optimizer:
        """Adam; with `skip_lr_scale != 1` the skip gets its own parameter group (its `lr_scale` is kept there)."""
        lr, scale = self.config.learning_rate, self.config.skip_lr_scale
        if transcoder.W_skip is None or scale == 1.0:
            return torch.optim.Adam(transcoder.parameters(), lr=lr, betas=(0.9, 0.999))
        rest = [p for name, p in transcoder.named_parameters() if name != "W_skip"]
        groups = [{"params": rest, "lr_scale": 1.0}, {"params": [transcoder.W_skip], "lr_scale": scale}]
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999))

    def initial_batch_count(self) -> int:
        """Batches set-up reads: the first (normalisation scales), or enough for the least-squares skip fit."""
        if self.config.skip_init != "least_squares":
            return 1
        return -(-self.config.init_tokens // self.config.stream.batch_size)

    def _fresh_state(self, initial: list[tuple[torch.Tensor, torch.Tensor]]) -> _State:
        """Initialise from the stream's first batches: normalisation scales from the first, then (by the recipe)
        the least-squares skip fit from all of them, encoder rows from decoder rows, and encoder biases that make
        each feature fire on a set share of the first batch's tokens."""
        cfg = self.config
        torch.manual_seed(cfg.stream.seed)
        transcoder = self._new_transcoder()
        limits = None
        if cfg.outlier_factor is not None:
            limits = obj.massive_output_limits(torch.cat([batch[1] for batch in initial], dim=1), cfg.outlier_factor)
            initial = [_ordinary_tokens(batch, limits) for batch in initial]
        inputs, targets = initial[0]
        input_scale = obj.normalisation_scales(inputs)
        output_scale = obj.normalisation_scales(targets)
        rate = min(cfg.init_firing_rate, 10_000 / (self.spec.n_layers * self.spec.n_features))
        if self.init_from is not None:
            # Training runs on normalised activations; unfolding (the inverse of `fold_normalisation`) makes the
            # saved dictionary compute the same pre-activations and outputs on them.
            transcoder.load_state_dict(self.init_from.state_dict())
            transcoder.fold_normalisation(1 / input_scale, 1 / output_scale)
            return self._state_from(transcoder, input_scale, output_scale, limits)
        with torch.no_grad():
            if cfg.skip_init == "least_squares" and transcoder.W_skip is not None:
                all_inputs = torch.cat([batch[0] for batch in initial], dim=1) * input_scale.view(-1, 1, 1)
                all_targets = torch.cat([batch[1] for batch in initial], dim=1) * output_scale.view(-1, 1, 1)
                weight, bias = obj.least_squares_affine(all_inputs, all_targets)
                transcoder.W_skip.copy_(weight)
                transcoder.b_dec.copy_(bias)
            if cfg.encoder_init == "decoder":
                _scale_decoder_rows(transcoder, DECODER_INIT_NORM)
                every = torch.arange(self.spec.n_features)
                own = [transcoder.decoder_vectors(layer, every)[:, 0, :] for layer in range(self.spec.n_layers)]
                transcoder.W_enc.copy_(torch.stack(own))
            normalised = inputs * input_scale.view(-1, 1, 1)
            pre = torch.bmm(normalised, transcoder.W_enc.transpose(1, 2))
            transcoder.b_enc.copy_(obj.encoder_bias_for_firing_rate(pre, self.config.initial_threshold, rate))
        return self._state_from(transcoder, input_scale, output_scale, limits)

    def _state_from(
        self,
        transcoder: EncoderStack,
        input_scale: torch.Tensor,
        output_scale: torch.Tensor,
        output_limits: torch.Tensor | None,
    ) -> _State:
        return _State(
            step=0,
            transcoder=transcoder,
            optimizer=self._optimizer(transcoder),
            input_scale=input_scale,
            output_scale=output_scale,
            tokens_since_fired=torch.zeros(self.spec.n_layers, self.spec.n_features, dtype=torch.long),
            output_limits=output_limits,
        )

    # --- the run ------------------------------------------------------------------------------------------
    def run(self, *, fresh: bool = False, on_progress: ProgressCallback | None = None) -> TrainResult:
        cfg = self.config
        phase_start = time.perf_counter()
        setup_cpu_start = time.process_time()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            for path in self.checkpoint_dir.glob("step_*.pt"):
                path.unlink()
            (self.out_dir / METRICS_LOG).unlink(missing_ok=True)
        checkpoint = self.latest_checkpoint()
        resumed_from: int | None = None
        if checkpoint is not None:
            state = self._load_checkpoint(checkpoint)
            resumed_from = state.step
            log.info("resuming from %s (step %d)", checkpoint, state.step)
            self._truncate_metrics_log(state.step)
            batches = self.stream.batches(start_step=state.step)
        else:
            batches = self.stream.batches(start_step=0)
            initial = list(itertools.islice(batches, self.initial_batch_count()))
            state = self._fresh_state(initial)
            batches = itertools.chain(initial, batches)
        eval_tokens = self.stream.evaluation_tokens()
        state.cpu_seconds += time.process_time() - setup_cpu_start  # a CPU budget pays for set-up too
        log.info("phase set-up done in %.1fs", time.perf_counter() - phase_start)

        phase_start = time.perf_counter()
        self._train(state, batches, on_progress)
        train_seconds = time.perf_counter() - phase_start
        log.info("phase training done in %.1fs", train_seconds)

        phase_start = time.perf_counter()
        folded = copy.deepcopy(state.transcoder)
        folded.fold_normalisation(state.input_scale, state.output_scale)
        spliced = spliced_cross_entropy(self.model, folded, eval_tokens)
        log.info("phase evaluation done in %.1fs", time.perf_counter() - phase_start)

        final = self._final_metrics(state, spliced, train_seconds, resumed_from)
        phase_start = time.perf_counter()
        transcoder_dir = save_transcoder(
            folded,
            self.out_dir / TRANSCODER_DIR,
            model_name=self.model.info.name,
            # the card's first figures (fvu/L0 of the last training batch, spliced CE on held-out text);
            # `atlas transcoders card` measures it again on held-out prompts and adds graph scores
            metadata={
                "training": cfg.to_dict(),
                "metrics": final,
                CARD_KEY: card_from_metadata({"training": cfg.to_dict(), "metrics": final}).to_dict(),
            },
        )
        (self.out_dir / FINAL_METRICS).write_text(json.dumps(final, indent=2))
        log.info("phase export done in %.1fs → %s", time.perf_counter() - phase_start, transcoder_dir)
        return TrainResult(self.out_dir, transcoder_dir, final, resumed_from)

    def _train(
        self,
        state: _State,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        on_progress: ProgressCallback | None,
    ) -> None:
        cfg = self.config
        tc = state.transcoder
        s_in = state.input_scale.view(-1, 1, 1).to(self.model.device)
        s_out = state.output_scale.view(-1, 1, 1).to(self.model.device)
        base_lr = cfg.learning_rate
        window_start = time.perf_counter()
        window_tokens = 0
        tokens_seen = state.step * cfg.stream.batch_size
        cpu_origin = time.process_time() - state.cpu_seconds
        with (self.out_dir / METRICS_LOG).open("a") as metrics_log:
            while state.step < cfg.steps and not self._budget_spent(state):
                inputs, targets = next(batches)
                if not (torch.isfinite(inputs).all() and torch.isfinite(targets).all()):
                    raise TrainingError(f"the model produced non-finite activations at step {state.step}")
                if state.output_limits is not None:
                    inputs, targets = _ordinary_tokens((inputs, targets), state.output_limits)
                step = self._schedule_step(state)
                lam = obj.sparsity_lambda_at(step, cfg.steps, cfg.sparsity_lambda)
                for group in state.optimizer.param_groups:
                    factor = obj.lr_factor_at(step, cfg.steps, cfg.lr_decay_fraction)
                    group["lr"] = base_lr * factor * group.get("lr_scale", 1.0)
                normalised_targets = targets * s_out
                output, loss = train_step(
                    tc,
                    state.optimizer,
                    inputs * s_in,
                    normalised_targets,
                    lam,
                    cfg,
                    on_non_finite=functools.partial(self._non_finite_message, step),
                )
                state.step += 1
                state.cpu_seconds = time.process_time() - cpu_origin
                last = state.step == cfg.steps or self._budget_spent(state)
                tokens_seen += inputs.shape[1]
                window_tokens += inputs.shape[1]
                with torch.no_grad():
                    state.tokens_since_fired = obj.update_tokens_since_fired(
                        state.tokens_since_fired, output.activations.cpu()
                    )
                if state.step % cfg.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    record = self._metrics_record(
                        state,
                        output,
                        normalised_targets,
                        loss,
                        lam,
                        tokens_seen,
                        window_tokens / max(elapsed, 1e-9),
                    )
                    metrics_log.write(json.dumps(record) + "\n")
                    metrics_log.flush()
                    if on_progress:
                        on_progress(record)
                    window_start, window_tokens = time.perf_counter(), 0
                if state.step % cfg.checkpoint_every == 0 or last:
                    self._save_checkpoint(state)

    def _budget_spent(self, state: _State) -> bool:
        return self.config.cpu_budget_s is not None and state.cpu_seconds >= self.config.cpu_budget_s

    def _schedule_step(self, state: _State) -> int:
        """The step the λ and learning-rate schedules read: the real step, or under a CPU budget the step as far
        into `steps` as the budget is spent, whichever is further (a budget run ramps and decays on time)."""
        cfg = self.config
        if cfg.cpu_budget_s is None:
            return state.step
        return max(state.step, min(cfg.steps - 1, int(state.cpu_seconds / cfg.cpu_budget_s * cfg.steps)))

    def _non_finite_message(self, step: int) -> str:
        return (
            f"at step {step}; training stopped. Last good checkpoint: {self.latest_checkpoint() or 'none'} (untouched)."
        )

    @torch.no_grad()
    def _metrics_record(
        self,
        state: _State,
        output: Any,
        targets: torch.Tensor,
        loss: obj.LossParts,
        lam: float,
        tokens_seen: int,
        tokens_per_second: float,
    ) -> dict[str, Any]:
        fvu = obj.fraction_of_variance_unexplained(output.reconstruction, targets)
        l0 = obj.l0_per_layer(output.activations)
        dead = obj.dead_fraction(state.tokens_since_fired, min(self.config.dead_window_tokens, tokens_seen))
        return {
            "step": state.step,
            "tokens": tokens_seen,
            "cpu_seconds": round(state.cpu_seconds, 2),
            "loss": loss.total.item(),
            "reconstruction_loss": loss.reconstruction.item(),
            "sparsity_loss": loss.sparsity.item(),
            "pre_act_loss": loss.pre_activation.item(),
            "lambda": lam,
            "lr": state.optimizer.param_groups[0]["lr"],
            "tokens_per_second": tokens_per_second,
            "fvu_mean": fvu.mean().item(),
            "l0_total": l0.sum().item(),
            "dead_fraction": dead.mean().item(),
            "fvu": [round(v, 5) for v in fvu.tolist()],
            "l0": [round(v, 3) for v in l0.tolist()],
            "dead": [round(v, 4) for v in dead.tolist()],
        }

    def _final_metrics(
        self, state: _State, spliced: Any, train_seconds: float, resumed_from: int | None
    ) -> dict[str, Any]:
        last = self._read_metrics_log()
        record = last[-1] if last else {}
        return {
            "steps": state.step,
            "tokens": state.step * self.config.stream.batch_size,
            "resumed_from": resumed_from,
            "train_seconds_this_session": train_seconds,
            "cpu_seconds": state.cpu_seconds,
            "fvu": record.get("fvu"),
            "fvu_mean": record.get("fvu_mean"),
            "l0": record.get("l0"),
            "l0_total": record.get("l0_total"),
            "dead_fraction": record.get("dead_fraction"),
            "dead": record.get("dead"),
            "ce_clean": spliced.clean,
            "ce_spliced": spliced.spliced,
            "ce_delta": spliced.delta,
            "kl": spliced.kl,
            "eval_tokens": spliced.n_tokens,
        }

    def _read_metrics_log(self) -> list[dict[str, Any]]:
        path = self.out_dir / METRICS_LOG
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _truncate_metrics_log(self, step: int) -> None:
        kept = [r for r in self._read_metrics_log() if r["step"] <= step]
        path = self.out_dir / METRICS_LOG
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)


def train_step(
    transcoder: Any,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    sparsity_lambda: float,
    config: TrainConfig,
    *,
    on_non_finite: Callable[[], str] = lambda: "",
) -> tuple[Any, obj.LossParts]:
    """One optimiser step on normalised `inputs`/`targets` `(n_layers, n_tokens, d)`; raises on a non-finite loss.

    `transcoder` is anything with `forward → TranscoderOutput`, `decoder_norms()` and `threshold` (the benchmark
    runs its reference implementation through this same function).
    """
    output = transcoder(inputs)
    loss = obj.transcoder_loss(
        output,
        targets,
        transcoder.decoder_norms(),
        transcoder.threshold,
        sparsity_lambda=sparsity_lambda,
        sparsity_c=config.sparsity_c,
        pre_act_coef=config.pre_act_coef,
    )
    if not torch.isfinite(loss.total):
        raise TrainingError(
            f"loss became {loss.total.item()} (reconstruction {loss.reconstruction.item():.4g}, sparsity"
            f" {loss.sparsity.item():.4g}) {on_non_finite()} Try a lower --lr."
        )
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    torch.nn.utils.clip_grad_norm_(transcoder.parameters(), config.grad_clip)
    optimizer.step()
    return output, loss


@torch.no_grad()
def _scale_decoder_rows(transcoder: EncoderStack, norm: float) -> None:
    """Rescale every feature's decoder rows so that its decoder norm (over all its output layers) is `norm`."""
    factor = norm / transcoder.decoder_norms().clamp(min=1e-12)  # (n_layers, n_features)
    decoders: Any = transcoder.W_dec
    if isinstance(decoders, torch.nn.ParameterList):  # cross-layer: W_dec[source] (F, n_outputs, d)
        for source, weights in enumerate(decoders):
            weights.mul_(factor[source].view(-1, 1, 1))
    else:  # per-layer: W_dec (n_layers, F, d)
        decoders.mul_(factor.unsqueeze(-1))
