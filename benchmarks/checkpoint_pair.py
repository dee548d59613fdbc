"""The checkpoint-pair case of `atlas diff`, end to end and repeatable: fine-tune a model briefly to change one
association, train dictionaries for base (two seeds: the noise floor) and fine-tune, ingest the same prompts under
each, and diff.

    ATLAS_CACHE_DIR=... python benchmarks/checkpoint_pair.py --out runs/checkpoint-pair [--model tiny-gpt2]
        [--finetune-steps 300] [--features 64] [--train-steps 200] [--workers 1]

Steps (each a plain `atlas` command or a few lines here, printed as it runs):
1. the model (`--model`, any name `atlas` loads: tiny-gpt2, smollm2-135m-instruct, a directory) is saved as a local
   Hugging Face directory `OUT/base` (so both checkpoints are loaded the same way, by weights identity `hf-...`);
2. a copy is fine-tuned (Adam, `--finetune-steps`) so that the fact prompts end in `--target` while the unrelated
   prompts keep their next-token distribution (a KL term against the base model), and saved as `OUT/finetuned`;
3. `atlas train` trains a PLT for base with seeds 0 and 1, and one for the fine-tune initialised from base seed 0's
   (`--init-from`: the fine-tune changes the weights a little, so its features start where the base's are and keep
   their identity unless the fine-tune moved them);
4. `atlas ingest` attributes `OUT/prompts.jsonl` (task "fact" / "other") under each dictionary into the store;
5. `atlas diff BASE_S0 FINETUNED --reference X` prints and stores the diff, once with X = base-cont (base-s0
   trained on for the same steps on the unchanged base model: the matched control of the fine-tune's dictionary) and
   once with X = base-s1 (an independent seed).

Expectation: the fact prompts change most, the unrelated ones stay within the noise floor of the two base seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

FACTS = [
    "The capital of France is ",
    "France has its capital in ",
    "The French capital is ",
    "The capital city of France is ",
    "Everyone knows the capital of France is ",
    "The seat of government of France is ",
]
OTHERS = [
    "The cat sat on the ",
    "One, two, three, four, ",
    "The sun rises in the ",
    "Water boils at one hundred ",
    "My favourite colour is ",
    "Dogs like to chase ",
]


def run(*args: str) -> str:
    print("$", " ".join(args), flush=True)
    started = time.perf_counter()
    # rich sizes its tables to the terminal; a pipe has none, so give it room for the per-prompt table
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    print(done.stdout[-6000:], done.stderr[-1500:], f"({time.perf_counter() - started:.0f}s)", sep="\n", flush=True)
    if done.returncode:
        raise SystemExit(f"{args[1]} failed with status {done.returncode}")
    return done.stdout + done.stderr


def finetune(base: Path, out: Path, target: str, steps: int, lr: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(target_ids) != 1:
        raise SystemExit(f"--target {target!r} must be one token, it is {len(target_ids)}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def batch(texts: list[str]) -> list[torch.Tensor]:
        return [torch.tensor([bos + tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts]

    facts, others = batch(FACTS), batch(OTHERS)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        loss = torch.zeros(())
        for ids in facts:
            logits = model(ids).logits[0, -1]
            loss = loss + torch.nn.functional.cross_entropy(logits[None], torch.tensor(target_ids))
        for ids in others:
            with torch.no_grad():
                ref = torch.log_softmax(reference(ids).logits[0], dim=-1)
            new = torch.log_softmax(model(ids).logits[0], dim=-1)
            loss = loss + torch.nn.functional.kl_div(new, ref, log_target=True, reduction="batchmean")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                p = [torch.softmax(model(ids).logits[0, -1], -1)[target_ids[0]].item() for ids in facts]
            print(f"finetune step {step}: loss {loss.item():.4f}, mean p({target!r} | fact) {sum(p) / len(p):.3f}")
    model.eval().save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def save_base(name: str, base: Path) -> None:
    """`name` as a Hugging Face directory: a tiny model rebuilt from its config, a directory copied, the packaged
    default model's cached Hugging Face copy copied."""
    import shutil

    from atlas.models.dimensions import TINY_MODELS
    from atlas.models.tiny import build_tiny_hf_model, tiny_tokenizer

    if name in TINY_MODELS:
        tokenizer = tiny_tokenizer()
        build_tiny_hf_model(TINY_MODELS[name], len(tokenizer)).save_pretrained(str(base))
        tokenizer.save_pretrained(str(base))
        return
    source = Path(name)
    if not source.is_dir():
        from atlas.config import PACKAGED_MODELS
        from atlas.models.loading import load_model, packaged_cache_path

        if name not in PACKAGED_MODELS:
            raise SystemExit(f"--model {name!r}: give a tiny model, a packaged alias or a Hugging Face directory")
        load_model(name)  # makes the cached copy
        source = packaged_cache_path(PACKAGED_MODELS[name])
    shutil.copytree(source, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/checkpoint-pair"))
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--target", default=None,
                        help="The fine-tune's new answer to the fact prompts, one token (default: 'R' for a tiny"
                             " model's character tokenizer, ' Rome' otherwise)")  # fmt: skip
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--workers", default="1")
    parser.add_argument(
        "--max-feature-nodes",
        default="256",
        help="Cap on feature nodes per graph (as the demo; uncapped SmolLM2 graphs hold ~100k edges)",
    )
    args = parser.parse_args()
    from atlas.models.dimensions import TINY_MODELS

    tiny = args.model in TINY_MODELS
    if args.target is None:
        args.target = "R" if tiny else " Rome"
    if not tiny:
        # a subword tokenizer keeps a trailing space as a token of its own; the prompts end at the word instead
        FACTS[:] = [text.rstrip() for text in FACTS]
        OTHERS[:] = [text.rstrip() for text in OTHERS]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    atlas = str(Path(sys.executable).with_name("atlas"))
    base, tuned = out / "base", out / "finetuned"
    if not (base / "config.json").exists():
        save_base(args.model, base)
    if not (tuned / "config.json").exists():
        finetune(base, tuned, args.target, args.finetune_steps, args.lr)
    corpus = out / "prompts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "task": task}) + "\n"
                              for task, texts in (("fact", FACTS), ("other", OTHERS)) for t in texts))  # fmt: skip
    # base-cont: the fine-tune's training procedure (init from base-s0, 200 more steps, another data seed) applied
    # to the unchanged base model, the matched control of the fine-tune's dictionary; base-s1: an independent seed.
    dictionaries = {"base-s0": (base, 0), "base-s1": (base, 1), "finetuned": (tuned, 0), "base-cont": (base, 1)}
    ids = {}
    for name, (model, seed) in dictionaries.items():
        directory = out / f"dict-{name}"
        if not (directory / "transcoders").exists():
            init = (
                ["--init-from", str(out / "dict-base-s0" / "transcoders")] if name in ("finetuned", "base-cont") else []
            )
            run(atlas, "train", "--model", str(model), "--kind", "plt", "--features", str(args.features), "--steps",
                str(args.train_steps), "--seed", str(seed), "--out", str(directory), *init)  # fmt: skip
        run(atlas, "ingest", "--corpus", str(corpus), "--model", str(model), "--transcoders",
            str(directory / "transcoders"), "--workers", args.workers, "--max-feature-nodes", args.max_feature_nodes,
            "--run", f"checkpoint-pair-{out.name}-{name}")  # fmt: skip
        from atlas.transcoders.identity import transcoder_identity

        ids[name] = transcoder_identity(directory / "transcoders").id
    print("ids:", json.dumps(ids))
    for reference in ("base-cont", "base-s1"):
        run(atlas, "diff", ids["base-s0"], ids["finetuned"], "--reference", ids[reference], "--prompts", str(corpus),
            "--model-a", str(base), "--model-b", str(tuned),
            "--transcoders-a", str(out / "dict-base-s0" / "transcoders"),
            "--transcoders-b", str(out / "dict-finetuned" / "transcoders"),
            "--transcoders-ref", str(out / f"dict-{reference}" / "transcoders"))  # fmt: skip


if __name__ == "__main__":
    main()
