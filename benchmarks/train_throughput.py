"""Training throughput: our CLT training step vs a straightforward reference, same activations, same run.

The reference is what a direct transcription of the CLT equations gives: one dense decoder tensor
`W_dec (n_layers, F, n_layers, d)` multiplied by a causal mask (source ≤ target) and contracted with one einsum,
decoder norms taken over the masked tensor. Ours stores only the L(L+1)/2 existing (source, target) blocks,
packed per source, and decodes with one matrix product per source layer (`atlas.transcoders.cross_layer`).
Both start from identical weights, run the same `train_step` (same loss, Adam, clipping) on the same batches of real
model activations, so their losses must agree step by step ("equal loss"); the script prints both and the ratio.

    .venv/bin/python benchmarks/train_throughput.py [--model smollm2-135m-instruct] [--features 128] [--steps 8]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch import nn

from atlas.models import load_model
from atlas.training.activations import ActivationStream, StreamConfig
from atlas.training.objectives import normalisation_scales
from atlas.training.trainer import TrainConfig, train_step
from atlas.transcoders import CrossLayerTranscoder, TranscoderOutput, TranscoderSpec
from atlas.transcoders.activations import apply_activation


class DenseEinsumCLT(nn.Module):
    """Reference CLT: full `(L, F, L, d)` decoder with a causal mask, one einsum. Same maths as ours."""

    def __init__(self, ours: CrossLayerTranscoder) -> None:
        super().__init__()
        spec = ours.spec
        L, F, d = spec.n_layers, spec.n_features, spec.d_model
        self.spec = spec
        self.bandwidth = ours.bandwidth
        self.W_enc = nn.Parameter(ours.W_enc.detach().clone())
        self.b_enc = nn.Parameter(ours.b_enc.detach().clone())
        self.b_dec = nn.Parameter(ours.b_dec.detach().clone())
        assert ours.log_threshold is not None
        self.log_threshold = nn.Parameter(ours.log_threshold.detach().clone())
        dense = torch.zeros(L, F, L, d)
        for source in range(L):
            dense[source, :, source:, :] = ours.W_dec[source].detach()
        self.W_dec = nn.Parameter(dense)
        mask = torch.tensor([[1.0 if s <= t else 0.0 for t in range(L)] for s in range(L)])
        self.register_buffer("mask", mask.view(L, 1, L, 1))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def masked_decoder(self) -> torch.Tensor:
        return self.W_dec * self.mask

    def decoder_norms(self) -> torch.Tensor:
        return self.masked_decoder().pow(2).sum(dim=(2, 3)).sqrt()

    def forward(self, inputs: torch.Tensor) -> TranscoderOutput:
        pre = torch.einsum("lnd,lfd->lnf", inputs, self.W_enc) + self.b_enc.unsqueeze(1)
        acts = apply_activation(pre, self.spec.activation, self.threshold.unsqueeze(1), self.bandwidth)
        recon = torch.einsum("snf,sftd->tnd", acts, self.masked_decoder()) + self.b_dec.unsqueeze(1)
        return TranscoderOutput(pre, acts, recon)


def time_steps(
    module: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], config: TrainConfig, warmup: int
) -> tuple[float, list[float]]:
    optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
    losses = []
    elapsed = 0.0
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        _, loss = train_step(module, optimizer, x, y, config.sparsity_lambda * (i + 1) / len(batches), config)
        if i >= warmup:
            elapsed += time.perf_counter() - start
        losses.append(loss.total.item())
    return elapsed, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    n_batches = args.steps + args.warmup
    stream_config = StreamConfig(
        batch_size=args.batch_size, chunk_sequences=max(8, 1 + n_batches * args.batch_size // 63)
    )
    stream = ActivationStream(model, stream_config, input_hook="mlp.hook_in", output_hook="mlp.hook_out")
    raw = list(itertools.islice(stream.batches(), n_batches))
    s_in, s_out = normalisation_scales(raw[0][0]).view(-1, 1, 1), normalisation_scales(raw[0][1]).view(-1, 1, 1)
    batches = [(x * s_in, y * s_out) for x, y in raw]

    config = TrainConfig(n_features=args.features, sparsity_lambda=1.0)
    spec = TranscoderSpec(
        kind="clt", n_layers=model.info.n_layers, d_model=model.info.d_model, n_features=args.features
    )
    torch.manual_seed(0)
    ours = CrossLayerTranscoder(spec, bandwidth=config.bandwidth, initial_threshold=config.initial_threshold)
    with torch.no_grad():
        ours.b_enc.fill_(0.05)
    reference = DenseEinsumCLT(ours)

    tokens = args.steps * args.batch_size
    ref_seconds, ref_losses = time_steps(reference, batches, config, args.warmup)
    our_seconds, our_losses = time_steps(ours, batches, config, args.warmup)
    worst = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(our_losses, ref_losses, strict=True))
    print(
        f"model {args.model}: {spec.n_layers} layers × {args.features} features, d_model {spec.d_model}, "
        f"batch {args.batch_size} tokens, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{torch.get_num_threads()} threads"
    )
    for label, seconds in (
        ("reference (dense einsum decoder)", ref_seconds),
        ("ours (packed per-source)", our_seconds),
    ):
        print(f"{label:34s} {tokens / seconds:8.1f} tokens/s  ({seconds / args.steps:.3f} s/step)")
    print(f"speed-up: {ref_seconds / our_seconds:.2f}×")
    print(
        f"loss per step, ours vs reference: max relative difference {worst:.2e}; final {our_losses[-1]:.6g} vs "
        f"{ref_losses[-1]:.6g}"
    )


if __name__ == "__main__":
    main()
