"""Compare our encodings of a saved transcoder with circuit-tracer 0.5.0's, on real activations of a model.

Runs `ct_encode.py` inside the circuit-tracer virtualenv (`setup_ct_env.sh`) on the same inputs and reports the
largest differences in feature activations and reconstructions. Used by `tests/test_interop.py` and by hand:

    .venv/bin/python -m benchmarks.interop.compare runs/demo/transcoders --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from atlas.transcoders import load_transcoder

REPO = Path(__file__).resolve().parents[2]
CT_PYTHON = Path(os.environ.get("CT_VENV", REPO / ".venv-ct")) / "bin" / "python"
CT_ENCODE = Path(__file__).with_name("ct_encode.py")


@dataclass(frozen=True)
class Comparison:
    max_activation_diff: float
    max_reconstruction_diff: float
    activation_scale: float  # max |activation| on our side
    reconstruction_scale: float  # max |reconstruction| on our side, to read the difference against
    active_share: float  # share of (layer, token, feature) entries active in our encoding
    n_tokens: int


def compare_with_circuit_tracer(
    transcoder_dir: Path, inputs: torch.Tensor, *, hub_ref: str | None = None, hub_cache: Path | None = None
) -> Comparison:
    """`inputs (n_layers, n_tokens, d_model)` raw transcoder inputs; encodes them on both sides.

    With `hub_ref`, circuit-tracer loads that reference itself from the Hugging Face cache `hub_cache` (offline),
    while ours reads `transcoder_dir` (what `atlas.transcoders.hub.resolve_transcoders` made of the reference)."""
    if not CT_PYTHON.exists():
        raise FileNotFoundError(f"circuit-tracer env missing at {CT_PYTHON}: run benchmarks/interop/setup_ct_env.sh")
    ours = load_transcoder(transcoder_dir)
    source = ["--hub-ref", hub_ref] if hub_ref else ["--transcoders", str(Path(transcoder_dir).resolve())]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if hub_cache is not None:
        env["HF_HUB_CACHE"] = str(hub_cache)
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        save_file({f"layer_{i}": inputs[i].contiguous() for i in range(inputs.shape[0])}, str(in_path))
        run = subprocess.run(
            [
                str(CT_PYTHON),
                str(CT_ENCODE),
                *source,
                "--inputs",
                str(in_path),
                "--out",
                str(out_path),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        if run.returncode != 0:
            raise RuntimeError(f"ct_encode.py failed:\n{run.stderr[-3000:]}")
        theirs = load_file(out_path)
    with torch.no_grad():
        output = ours(inputs)
    n_layers = inputs.shape[0]
    return Comparison(
        max_activation_diff=max(
            (theirs[f"acts_{i}"] - output.activations[i]).abs().max().item() for i in range(n_layers)
        ),
        max_reconstruction_diff=max(
            (theirs[f"recon_{i}"] - output.reconstruction[i]).abs().max().item() for i in range(n_layers)
        ),
        activation_scale=output.activations.abs().max().item(),
        reconstruction_scale=output.reconstruction.abs().max().item(),
        active_share=(output.activations > 0).float().mean().item(),
        n_tokens=inputs.shape[1],
    )


def main() -> None:
    from atlas.models import load_model
    from atlas.training.activations import ActivationStream, StreamConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("transcoders", type=Path)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--corpus", default="offline")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    spec = load_transcoder(args.transcoders).spec
    model = load_model(args.model)
    stream = ActivationStream(
        model,
        StreamConfig(corpus=args.corpus, batch_size=args.tokens, chunk_sequences=8),
        input_hook=spec.input_hook,
        output_hook=spec.output_hook,
    )
    inputs, _ = next(stream.batches())
    result = compare_with_circuit_tracer(args.transcoders, inputs)
    print(
        f"{spec.kind.upper()} {spec.n_layers}×{spec.n_features} on {result.n_tokens} tokens of {args.model}: "
        f"max |Δ activation| {result.max_activation_diff:.2e}, max |Δ reconstruction| "
        f"{result.max_reconstruction_diff:.2e} of max |reconstruction| {result.reconstruction_scale:.3g}"
        f" (active share {result.active_share:.3f})"
    )


if __name__ == "__main__":
    main()
