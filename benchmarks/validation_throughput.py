"""Validation throughput: the batched intervention engine against a naive one-intervention-per-forward loop.

On the default model with a random CLT (calibrated sparsity, as `benchmarks.vs_circuit_tracer`), one IOI prompt,
`--variants` single-feature zero-ablations of active feature instances (what validation's agreement step and null
controls run), each measured as the demeaned logit of the clean top token at the last position. Two comparisons,
each in the same run and on the same variants:

1. `real` form: the naive loop is `atlas.attribution.interventions.intervene(..., mode="frozen_attention")`, one
   forward per intervention (the existing API); the batched engine runs the same interventions `--chunk` per
   forward (`atlas.validation.engine.run_variants(form="real")`).
2. `replacement` form (what validation measures): the engine one variant per forward against `--chunk` per forward.

Both sides must give the same target values to 1e-5 of their scale; the script prints interventions/s (the best of
`--repeats` alternating runs of each side) and ratios.

    .venv/bin/python benchmarks/validation_throughput.py [--variants 64] [--chunk 32] [--features 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from atlas.attribution.context import build_context
from atlas.attribution.interventions import FeatureIntervention, intervene
from atlas.attribution.targets import demeaned_unembedding
from atlas.models import load_model
from atlas.transcoders import load_transcoder
from atlas.validation.engine import ClampBatch, run_variants
from benchmarks.vs_circuit_tracer import MODEL, make_random_transcoders

PROMPT = "When Mary and John went to the store, John gave a drink to"
TOLERANCE = 1e-5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.05)
    args = parser.parse_args(argv)
    if min(args.variants, args.chunk, args.features, args.repeats) < 1 or not 0 < args.rate < 1:
        parser.error("--variants, --chunk, --features and --repeats must be positive and --rate in (0, 1)")

    model = load_model(MODEL)
    with tempfile.TemporaryDirectory() as work:
        transcoder = load_transcoder(make_random_transcoders(model, "clt", args.features, args.rate, Path(work)))
    ctx = build_context(model, transcoder, model.tokenize(PROMPT)[0])
    active = ctx.active_features()
    chosen = active[torch.randperm(active.shape[0], generator=torch.Generator().manual_seed(0))[: args.variants]]
    n = int(chosen.shape[0])
    position = ctx.n_pos - 1
    token = int(ctx.logits[position].argmax())
    direction = demeaned_unembedding(model.model.W_U.detach().float())[:, token].clone()
    batch = ClampBatch.empty(n, *ctx.activations.shape)
    batch.mask[torch.arange(n), chosen[:, 0], chosen[:, 1], chosen[:, 2]] = True
    print(
        f"{MODEL}, random CLT {args.features} features/layer ({active.shape[0]} active on {ctx.n_pos} tokens), "
        f"{n} single-feature zero-ablations, target {model.tokenizer.decode([token])!r}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    def measure(final: torch.Tensor) -> torch.Tensor:
        return final[:, position] @ direction

    def timed(fn):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    run_variants(ctx, batch.slice(0, min(n, args.chunk)), form="real", chunk_size=args.chunk)  # warm-up
    intervene(ctx, [FeatureIntervention(0, 0, 1, "ablate")], mode="frozen_attention")

    def naive_real() -> torch.Tensor:
        finals = [
            intervene(
                ctx, [FeatureIntervention(int(r[0]), int(r[2]), int(r[1]), "ablate")], mode="frozen_attention"
            ).final_residual.unsqueeze(0)
            for r in chosen
        ]
        return measure(torch.cat(finals))

    def best_of(naive_fn, batched_fn):  # type: ignore[no-untyped-def]
        """Alternate the two sides `--repeats` times; the fastest time of each (the machine may be shared)."""
        naive_times, batched_times = [], []
        for _ in range(args.repeats):
            naive, seconds = timed(naive_fn)
            naive_times.append(seconds)
            batched, seconds = timed(batched_fn)
            batched_times.append(seconds)
        return naive, min(naive_times), batched, min(batched_times)

    rows = [
        (
            "real MLPs (interventions.intervene loop)",
            *best_of(
                naive_real,
                lambda: measure(run_variants(ctx, batch, form="real", chunk_size=args.chunk).final_residual),
            ),
        ),
        (
            "replacement (engine, 1 per forward)",
            *best_of(
                lambda: measure(run_variants(ctx, batch, chunk_size=1).final_residual),
                lambda: measure(run_variants(ctx, batch, chunk_size=args.chunk).final_residual),
            ),
        ),
    ]

    ok = True
    print(f"{'form (naive side)':<42} {'naive/s':>9} {'batched/s':>10} {'ratio':>7} {'max |Δ|':>10} {'scale':>8}")
    for label, naive, naive_s, batched, batched_s in rows:
        diff = float((naive - batched).abs().max())
        scale = float(torch.cat([naive, batched]).abs().max())
        ok &= diff <= TOLERANCE * scale
        print(
            f"{label:<42} {n / naive_s:>9.1f} {n / batched_s:>10.1f} {naive_s / batched_s:>6.2f}x {diff:>10.2e} "
            f"{scale:>8.3g}"
        )
    print("equal to 1e-5 of scale:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
