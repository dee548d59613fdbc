"""Dictionary quality per CPU-minute: train recipes under CPU budgets and measure what a user reads graphs through.

For every recipe (default: `baseline`, `clt` and `cpu`, see `atlas.training.recipes`) and every budget,
the script trains a fresh transcoder set on the default model until the process has spent the budget, then measures,
on held-out text the training never saw (the stream's evaluation sequences, `--eval-sequences` of them):

- per-layer and mean FVU (NMSE about the mean), mean L0 per layer, the share of features that never fired;
- the spliced next-token loss with every MLP replaced at once and no error terms (CE delta, nats/token) and the
  mean KL(clean ‖ spliced) of the next-token distributions; the same splice *with* error terms as a sanity check
  (its delta must be 0 up to rounding);
- the mean replacement and completeness scores of the pruned attribution graphs of the 16 evaluation prompts of
  `atlas.attribution.quality` (factual, IOI, arithmetic, antonym, sequence prompts) and the mean number of feature
  nodes those graphs keep, unless `--no-graphs`.

Budgets are CPU time of this process (`time.process_time`, all its threads), in *core-minutes*: "5 minutes on
2 cores" is 10 core-minutes. CPU time, not wall time, so a budget buys the same work on a machine shared with other
jobs; wall times are printed beside it. The table at the end is the quality-against-CPU-minutes curve of each recipe,
and `--json` keeps every figure.

    .venv/bin/python benchmarks/transcoder_quality.py                       # budgets 10,30,60 core-minutes
    .venv/bin/python benchmarks/transcoder_quality.py --budgets 4,10 --recipes baseline,cpu --no-graphs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from atlas.attribution.quality import EVAL_PROMPTS, ReconstructionSums, evaluate_dictionary
from atlas.models import LoadedModel, load_model
from atlas.training.activations import ActivationStream, StreamConfig
from atlas.training.recipes import recipe_config, recipe_names
from atlas.training.splicing import spliced_cross_entropy
from atlas.training.trainer import Trainer
from atlas.transcoders.base import EncoderStack
from atlas.transcoders.io import load_transcoder


def held_out_reconstruction(model: LoadedModel, transcoder: EncoderStack, tokens: torch.Tensor) -> ReconstructionSums:
    """FVU/L0/dead sums over `tokens (n_seq, ctx)` without BOS, in chunks of 8 sequences."""
    spec = transcoder.spec
    stream = ActivationStream(model, StreamConfig(), input_hook=spec.input_hook, output_hook=spec.output_hook)
    sums = ReconstructionSums.empty(spec.n_layers, spec.d_model, spec.n_features)
    with torch.no_grad():
        for start in range(0, tokens.shape[0], 8):
            inputs, targets = stream.collect(tokens[start : start + 8])
            output = transcoder(inputs)
            sums.add(targets, output.reconstruction, output.activations)
    return sums


def measure(model: LoadedModel, directory: Path, tokens: torch.Tensor, graphs: bool) -> dict[str, Any]:
    transcoder = load_transcoder(directory)
    started = time.perf_counter()
    sums = held_out_reconstruction(model, transcoder, tokens)
    spliced = spliced_cross_entropy(model, transcoder, tokens)
    sanity = spliced_cross_entropy(model, transcoder, tokens, with_errors=True)
    figures: dict[str, Any] = {
        "fvu": [round(v, 4) for v in sums.fvu().tolist()],
        "fvu_mean": float(sums.fvu().mean()),
        "l0_mean": float(sums.l0().mean()),
        "dead_fraction": sums.dead_fraction(),
        "ce_clean": spliced.clean,
        "ce_delta": spliced.delta,
        "kl": spliced.kl,
        "ce_delta_with_errors": sanity.delta,
        "held_out_tokens": spliced.n_tokens,
    }
    if graphs:
        card = evaluate_dictionary(model, transcoder, prompts=EVAL_PROMPTS, progress=False)
        figures["replacement"] = card.replacement_score
        figures["completeness"] = card.completeness_score
        figures["feature_nodes_kept"] = card.feature_nodes_kept
    figures["eval_seconds"] = time.perf_counter() - started
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--recipes", default="baseline,clt,cpu", help=f"comma-separated, of {', '.join(recipe_names())}"
    )
    parser.add_argument("--budgets", default="10,30,60", help="core-minutes of CPU time (2 cores × wall minutes)")
    parser.add_argument("--eval-sequences", type=int, default=32, help="held-out sequences of 64 tokens")
    parser.add_argument("--no-graphs", action="store_true", help="skip the attribution-graph scores")
    parser.add_argument("--out", default="runs/transcoder-quality", help="training runs go under this directory")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TrainConfig field of every recipe (JSON value; stream={...} for its"
                             " stream fields)")  # fmt: skip
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if any(b <= 0 for b in budgets):
        parser.error("budgets must be positive core-minutes")
    for name in recipes:
        if name not in recipe_names():
            parser.error(f"unknown recipe {name!r}; known: {', '.join(recipe_names())}")
    overrides: dict[str, Any] = {}
    for item in args.set:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    if args.eval_sequences < 1:
        parser.error("--eval-sequences must be at least 1")

    model = load_model(args.model)
    eval_config = StreamConfig(eval_sequences=args.eval_sequences)
    tokens = ActivationStream(model, eval_config, input_hook="mlp.hook_in", output_hook="mlp.hook_out")
    held_out = tokens.evaluation_tokens()
    print(f"{model.info.name}: held-out set {held_out.shape[0]} × {held_out.shape[1]} tokens; torch threads"
          f" {torch.get_num_threads()}")  # fmt: skip
    results: list[dict[str, Any]] = []
    for name in recipes:
        for budget in budgets:
            # the held-out sequences are the first of the corpus; every recipe skips at least that many
            fields = dict(overrides)
            stream = {**fields.pop("stream", {}), "eval_sequences": args.eval_sequences}
            config = recipe_config(name, cpu_budget_s=budget * 60, stream=stream, **fields)
            variant = "".join(f"-{k}={v}" for k, v in overrides.items()).replace(" ", "").replace('"', "")
            out = Path(args.out) / f"{name}{variant}-{budget:g}"
            wall = time.perf_counter()
            result = Trainer(model, config, out).run(fresh=True)
            wall = time.perf_counter() - wall
            row = {"recipe": name + variant, "budget_core_minutes": budget, "train_wall_s": wall,
                   "train_cpu_s": result.final_metrics["cpu_seconds"], "steps": result.final_metrics["steps"],
                   "tokens": result.final_metrics["tokens"], **measure(model, result.transcoder_dir, held_out,
                                                                        not args.no_graphs)}  # fmt: skip
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "fvu"}))
    header = (f"{'recipe':<9} {'core-min':>8} {'wall s':>7} {'tokens':>9} {'FVU':>6} {'L0':>7} {'dead':>6}"
              f" {'CE Δ':>6} {'KL':>6} {'Δ w/ err':>9} {'repl':>6} {'compl':>6} {'feat kept':>9}")  # fmt: skip
    print("\n" + header)
    for row in results:
        graphs = (f"{row['replacement']:>6.3f} {row['completeness']:>6.3f} {row['feature_nodes_kept']:>9.1f}"
                  if "replacement" in row else f"{'-':>6} {'-':>6} {'-':>9}")  # fmt: skip
        print(f"{row['recipe']:<9} {row['budget_core_minutes']:>8g} {row['train_wall_s']:>7.0f} {row['tokens']:>9}"
              f" {row['fvu_mean']:>6.3f} {row['l0_mean']:>7.1f} {row['dead_fraction']:>6.1%} {row['ce_delta']:>6.2f}"
              f" {row['kl']:>6.2f} {row['ce_delta_with_errors']:>9.1e} {graphs}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
