"""Encode activations with circuit-tracer's own transcoder code (interop reference).

Run this INSIDE the circuit-tracer venv (see ``setup_ct_env.sh``), not the main env::

    .venv-ct/bin/python benchmarks/interop/ct_encode.py \
        --transcoders DIR --inputs IN.safetensors --out OUT.safetensors

``DIR`` is a transcoder directory in circuit-tracer's format. ``IN`` holds one tensor
``layer_{i}`` of shape (n_tokens, d_model) per layer: the transcoder input activations
at that layer. ``OUT`` receives, per layer ``i``:

* ``acts_{i}``  (n_tokens, d_transcoder): feature activations (after ReLU/JumpReLU);
* ``recon_{i}`` (n_tokens, d_model): circuit-tracer's reconstruction of target layer ``i``
  (PLT: ``acts_i @ W_dec_i + b_dec_i`` plus ``x_i @ W_skip_i.T`` if the file has ``W_skip``;
  CLT: ``sum_{s<=i} acts_s @ W_dec_s[:, i-s] + b_dec_i``).

All outputs are float32 on CPU. The safetensors header metadata records the kind,
loader, dtype and circuit-tracer version. No position is zeroed here (circuit-tracer's
attribution zeroes position 0 via ``zero_positions``; ``encode_layer`` does not).

circuit-tracer 0.5.0 functions used
-----------------------------------
Loading (``--loader hub``, the default, is the route ``ReplacementModel.from_pretrained``
and the CLI take):

* ``circuit_tracer.utils.hf_utils.load_transcoder_from_hub(abs_dir, device=, dtype=)``
  -> ``(transcoder, config)``. With an ABSOLUTE directory, ``is_cached`` finds
  ``<dir>/config.yaml`` and it delegates to ``utils.caching.load_transcoders_from_cache``,
  which calls ``load_transcoder_set`` (PLT; every ``layer_*.safetensors`` globbed from the
  directory, each loaded by ``load_relu_transcoder``) or ``load_clt`` (CLT). A relative
  path is joined onto ``~/.cache/circuit_tracer`` and then looked up on the HF hub, so the
  path is made absolute here. Defaults there: ``lazy_encoder=False, lazy_decoder=True``.

``--loader direct`` reads ``config.yaml`` itself and calls

* ``circuit_tracer.transcoder.single_layer_transcoder.load_transcoder_set(
  {i: path}, scan=, feature_input_hook=, feature_output_hook=, device=, dtype=,
  lazy_encoder=False, lazy_decoder=False)`` (-> ``load_relu_transcoder`` per layer), or
* ``circuit_tracer.transcoder.cross_layer_transcoder.load_clt(dir, feature_input_hook=,
  feature_output_hook=, scan=, device=, dtype=, lazy_decoder=False, lazy_encoder=False)``.
  Note ``load_clt``'s own dtype default is bfloat16; float32 is passed explicitly.

Encoding and reconstruction:

* PLT: ``TranscoderSet.encode_layer(x, i)`` (= ``SingleLayerTranscoder.encode``:
  ``F.linear(x, W_enc, b_enc)`` then the activation function), and
  ``TranscoderSet.decode(acts[L,n,F], inputs[L,n,d])`` (= per layer
  ``SingleLayerTranscoder.decode``: ``acts @ W_dec + b_dec + x @ W_skip.T``).
* CLT: ``CrossLayerTranscoder.encode_layer(x, i)`` (einsum with ``W_enc[i]`` + ``b_enc[i]``,
  then ``apply_activation_function(i, .)``) and ``CrossLayerTranscoder.decode(acts[L,n,F])``
  (``select_decoder_vectors`` + ``compute_reconstruction``). Two edge cases of ``decode``
  are patched here: it sizes its output by the largest position with an active feature
  (``pos_ids.max() + 1``), so trailing positions with no active feature at any layer are
  missing (filled here with ``b_dec``), and it raises on an all-zero activation tensor
  (``torch.cat`` of an empty list; the result is then ``b_dec`` everywhere).

Activation functions (as loaded): ``activation_function.threshold`` (PLT) /
``threshold_{i}`` (CLT; presence decided by ``W_enc_0.safetensors`` alone) -> JumpReLU
``x * (x > threshold)`` (strict ``>``); otherwise ``torch.nn.functional.relu``.

config.yaml keys
----------------
* Required: ``model_kind`` (``transcoder_set`` | ``cross_layer_transcoder``),
  ``feature_input_hook``, ``feature_output_hook`` (read with ``config[...]``; missing ->
  KeyError).
* Optional: ``scan`` (default: the directory path).
* Tolerated but ignored by the local-directory loaders: ``model_name`` (only the CLI uses
  it), ``transcoders`` (per-layer paths/URIs; only the hub route reads them, the local route
  globs ``layer_*.safetensors``), ``activation`` and ``k`` (no TopK in 0.5.0's loaders; a
  TopK set silently loads as ReLU/JumpReLU), and any other key. ``config`` is a plain dict,
  nothing validates unknown keys.
* Tensors: ``load_state_dict`` is strict, so an unexpected tensor in a PLT
  ``layer_{i}.safetensors`` (e.g. ``k``) makes loading fail; CLT files are read key by key,
  extra tensors there are ignored, and ``W_skip`` is never read for a CLT.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

KINDS = ("transcoder_set", "cross_layer_transcoder")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--transcoders", type=Path, help="circuit-tracer transcoder dir")
    source.add_argument("--hub-ref", help="a Hugging Face reference (repo[@revision]) read from the HF cache")
    p.add_argument("--inputs", required=True, type=Path, help="safetensors with layer_{i} (n, d)")
    p.add_argument("--out", required=True, type=Path, help="output safetensors path")
    p.add_argument(
        "--loader",
        choices=("hub", "direct"),
        default="hub",
        help="hub: utils.hf_utils.load_transcoder_from_hub(abs dir); direct: load_transcoder_set / load_clt",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def _read_config(tdir: Path) -> dict:
    cfg_path = tdir / "config.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"ct_encode: {cfg_path} not found")
    with cfg_path.open() as f:
        cfg = yaml.safe_load(f) or {}
    kind = cfg.get("model_kind")
    if kind not in KINDS:
        raise SystemExit(f"ct_encode: config.yaml model_kind={kind!r}, expected one of {KINDS}")
    return cfg


def load(tdir: Path, loader: str, device: torch.device, dtype: torch.dtype):
    """Load with circuit-tracer's loaders; returns (transcoder object, model_kind)."""
    tdir = tdir.resolve()  # circuit-tracer only treats absolute paths as local directories
    cfg = _read_config(tdir)
    kind = cfg["model_kind"]

    if loader == "hub":
        from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

        transcoder, _ = load_transcoder_from_hub(str(tdir), device=device, dtype=dtype)
        return transcoder, kind

    scan = cfg.get("scan", str(tdir))
    if kind == "transcoder_set":
        from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

        n = 0
        while (tdir / f"layer_{n}.safetensors").is_file():
            n += 1
        if n == 0:
            raise SystemExit(f"ct_encode: no layer_0.safetensors in {tdir}")
        paths = {i: str(tdir / f"layer_{i}.safetensors") for i in range(n)}
        transcoder = load_transcoder_set(
            paths,
            scan=scan,
            feature_input_hook=cfg["feature_input_hook"],
            feature_output_hook=cfg["feature_output_hook"],
            device=device,
            dtype=dtype,
            lazy_encoder=False,
            lazy_decoder=False,
        )
    else:
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        transcoder = load_clt(
            str(tdir),
            feature_input_hook=cfg["feature_input_hook"],
            feature_output_hook=cfg["feature_output_hook"],
            scan=scan,
            device=device,
            dtype=dtype,
            lazy_decoder=False,
            lazy_encoder=False,
        )
    return transcoder, kind


def load_hub_ref(ref: str, device: torch.device, dtype: torch.dtype):
    """circuit-tracer's hub route (`load_transcoder_from_hub`) for a reference, from the Hugging Face cache.

    One step is replaced: for configs listing per-layer files (`transcoders:`, GemmaScope), `download_hf_uris`
    first asks the hub API whether each repo is gated, which no offline cache can answer; here each URI goes through
    circuit-tracer's own `download_hf_uri` instead. Everything else (config reading, the GemmaScope special loader
    chosen from the repo name, `load_transcoder_set` / `load_clt`) is circuit-tracer's code."""
    from circuit_tracer.utils import hf_utils

    hf_utils.download_hf_uris = lambda uris, max_workers=8: {u: hf_utils.download_hf_uri(u) for u in uris}
    transcoder, config = hf_utils.load_transcoder_from_hub(ref, device=device, dtype=dtype, lazy_decoder=False)
    return transcoder, config["model_kind"]


def _clt_reconstruction(clt, acts: torch.Tensor) -> torch.Tensor:
    """CrossLayerTranscoder.decode, padded to all positions (see module docstring)."""
    n_layers, n_pos, _ = acts.shape
    base = clt.b_dec[:, None, :].to(acts.dtype).expand(n_layers, n_pos, clt.d_model)
    if not bool((acts != 0).any()):
        return base.clone()
    recon = clt.decode(acts)  # (n_layers, n_pos_seen, d_model), includes b_dec
    if recon.shape[1] < n_pos:
        recon = torch.cat([recon, base[:, recon.shape[1] :]], dim=1)
    return recon


@torch.no_grad()
def encode_all(transcoder, kind: str, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs (L, n, d) -> (acts (L, n, F), recon (L, n, d)) via circuit-tracer methods."""
    n_layers = inputs.shape[0]
    acts = torch.stack([transcoder.encode_layer(inputs[i], i) for i in range(n_layers)])
    # PLT: per layer, includes W_skip if present
    recon = transcoder.decode(acts, inputs) if kind == "transcoder_set" else _clt_reconstruction(transcoder, acts)
    return acts, recon


def _load_inputs(path: Path, n_layers: int, d_model: int, dtype, device) -> torch.Tensor:
    tensors = load_file(str(path))
    missing = [f"layer_{i}" for i in range(n_layers) if f"layer_{i}" not in tensors]
    if missing:
        raise SystemExit(f"ct_encode: {path} lacks {missing} (transcoders have {n_layers} layers)")
    xs = [tensors[f"layer_{i}"] for i in range(n_layers)]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1 or len(xs[0].shape) != 2 or xs[0].shape[1] != d_model:
        raise SystemExit(f"ct_encode: inputs must all be (n_tokens, {d_model}); got {shapes}")
    return torch.stack(xs).to(device=device, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from here

    if args.hub_ref:
        transcoder, kind = load_hub_ref(args.hub_ref, device, dtype)
    else:
        transcoder, kind = load(args.transcoders, args.loader, device, dtype)
    n_layers = transcoder.n_layers
    d_model = transcoder.d_model if kind == "cross_layer_transcoder" else transcoder[0].d_model
    inputs = _load_inputs(args.inputs, n_layers, d_model, dtype, device)

    acts, recon = encode_all(transcoder, kind, inputs)

    out: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        out[f"acts_{i}"] = acts[i].detach().to("cpu", torch.float32).contiguous()
        out[f"recon_{i}"] = recon[i].detach().to("cpu", torch.float32).contiguous()
    meta = {
        "model_kind": kind,
        "loader": args.loader,
        "dtype": args.dtype,
        "n_layers": str(n_layers),
        "circuit_tracer_version": importlib.metadata.version("circuit-tracer"),
        "skip_connection": str(bool(getattr(transcoder, "skip_connection", False))),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.out), metadata=meta)
    print(
        f"ct_encode: {kind}, {n_layers} layers, {inputs.shape[1]} tokens, d_transcoder={acts.shape[-1]} -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
