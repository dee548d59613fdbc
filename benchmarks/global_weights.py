"""Global weights: time and peak memory of the chunked top-k against the naive dense matrix, same run.

Ours (`atlas.analysis.global_weights`): every (source layer, target layer) block in tiles, each tile's top-k merged
into running per-feature states, memory O(L·F·k + tile²). Naive: the whole `(L·F, L·F)` virtual-weight matrix
(`dense_virtual_weights`), then top-k along rows and columns; for tokens/logits the whole `(L·F, vocab)` matrix.
Both read the same weights; the script checks that their top-k values agree before printing figures.

Each measurement runs in a fresh process: its peak resident memory above the level reached once the model readers and
the transcoders are loaded (Linux `VmHWM` after resetting it through `/proc/self/clear_refs`) is the extra memory
the computation needs. Dictionaries are the default model's shapes (SmolLM2-135M: 30 layers, d_model 576, vocab
49,152, norm weights folded) with the demo CLT's width (64 features per layer) and 4× that; weights are random
(`--transcoders DIR` uses a trained set instead, and its 4× is random with the same shapes).

    .venv/bin/python -m benchmarks.global_weights [--features 64] [--k 64] [--device cpu] [--skip-naive-vocab]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import torch

from atlas.analysis.global_weights import (
    TopK,
    dense_virtual_weights,
    feature_topk,
    logit_readers,
    logit_topk,
    residual_readers,
    token_topk,
)
from atlas.config import DEFAULT_MODEL
from atlas.transcoders import TranscoderSpec, build_transcoder, load_transcoder


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _transcoder(features: int, transcoders: str | None, n_layers: int, d_model: int) -> Any:
    if transcoders:
        loaded = load_transcoder(transcoders)
        if loaded.spec.n_features == features:
            return loaded
    torch.manual_seed(0)
    transcoder = build_transcoder(TranscoderSpec(kind="clt", n_layers=n_layers, d_model=d_model, n_features=features))
    with torch.no_grad():
        transcoder.W_enc.normal_(0, d_model**-0.5)
    return transcoder


def _naive_features(transcoder: Any, readers: Any, k: int) -> tuple[TopK, TopK]:
    dense = dense_virtual_weights(transcoder, readers)
    L, F = transcoder.spec.n_layers, transcoder.spec.n_features
    layer = torch.arange(L * F) // F
    mask = layer.view(-1, 1) < layer.view(1, -1)
    key = torch.where(mask, dense.abs(), torch.full_like(dense, -1.0))
    out = key.topk(k, dim=1).indices
    inc = key.T.topk(k, dim=1).indices
    return (
        TopK(dense.T.gather(1, inc), torch.where(key.T.gather(1, inc) >= 0, inc, -1)),
        TopK(dense.gather(1, out), torch.where(key.gather(1, out) >= 0, out, -1)),
    )


def _naive_vocab(transcoder: Any, readers: Any, k: int) -> tuple[TopK, TopK]:
    L, F = transcoder.spec.n_layers, transcoder.spec.n_features
    encoders = torch.cat([readers.mlp_in[j].apply(transcoder.W_enc[j].detach()) for j in range(L)])
    tokens = encoders @ readers.W_E.T  # (L·F, vocab)
    picked = tokens.abs().topk(k, dim=1).indices
    token_top = TopK(tokens.gather(1, picked), picked)
    del tokens
    writes = torch.cat([transcoder.decoder_vectors(i, torch.arange(F)).detach().sum(1) for i in range(L)])  # (L·F, d)
    logits = writes @ logit_readers(readers, slice(None)).T
    picked = logits.abs().topk(k, dim=1).indices
    return token_top, TopK(logits.gather(1, picked), picked)


def _measure(job: str, features: int, args: dict[str, Any], queue: Any) -> None:
    torch.set_num_threads(args["threads"])
    from atlas.models import load_model

    model = load_model(args["model"])
    readers = residual_readers(model, "fold")
    info = model.info
    del model
    transcoder = _transcoder(features, args["transcoders"], info.n_layers, info.d_model)
    k, device = args["k"], args["device"]
    base = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    if job == "chunked-features":
        result: Any = feature_topk(transcoder, readers, k, device=device)
    elif job == "naive-features":
        result = _naive_features(transcoder, readers, k)
    elif job == "chunked-vocab":
        result = (token_topk(transcoder, readers, k, device=device), logit_topk(transcoder, readers, k, device=device))
    else:
        result = _naive_vocab(transcoder, readers, k)
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - base
    gpu_peak = torch.cuda.max_memory_allocated() if device != "cpu" else 0
    values = [top.values.abs().sort(1, descending=True).values.cpu().numpy() for top in result]
    queue.put({"seconds": seconds, "peak_bytes": peak, "gpu_peak_bytes": gpu_peak, "values": values})


def run(job: str, features: int, args: dict[str, Any]) -> dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(job, features, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--transcoders", default=None)
    parser.add_argument("--features", type=int, default=64, help="features per layer of the base dictionary")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-naive-vocab", action="store_true", help="the (L·F, vocab) matrices: GBs at 4×")
    parser.add_argument("--skip-naive", action="store_true", help="no naive baseline at all")
    args = vars(parser.parse_args())
    print(f"model {args['model']}, k {args['k']}, device {args['device']}, threads {args['threads']}")
    for features in (args["features"], 4 * args["features"]):
        for kind in ("features", "vocab"):
            ours = run(f"chunked-{kind}", features, args)
            line = (f"F/layer {features:5d} {kind:8s} chunked {ours['seconds']:8.2f} s, peak +"
                    f"{ours['peak_bytes'] / 2**20:8.1f} MiB")  # fmt: skip
            if ours["gpu_peak_bytes"]:
                line += f" (GPU {ours['gpu_peak_bytes'] / 2**20:.1f} MiB)"
            if args["skip_naive"] or (kind == "vocab" and args["skip_naive_vocab"]):
                print(line + "; naive skipped")
                continue
            naive = run(f"naive-{kind}", features, args)
            agree = max(
                float(abs(a - b).max() / max(abs(b).max(), 1e-30))
                for a, b in zip(ours["values"], naive["values"], strict=True)
            )
            print(
                line + f" | naive {naive['seconds']:8.2f} s, peak +{naive['peak_bytes'] / 2**20:8.1f} MiB"
                f" | time ×{naive['seconds'] / ours['seconds']:.2f}, memory ×"
                f"{naive['peak_bytes'] / max(ours['peak_bytes'], 1):.1f} | top-k values agree to {agree:.1e}"
            )


if __name__ == "__main__":
    main()
