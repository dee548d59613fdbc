"""Check the demo candidates against a model and write the kept prompts and per-task accuracy.

`python -m ingest.demo_corpus.check [--model M] [--out DIR]`: one forward pass per candidate; a prompt is kept when
the first token of its expected answer is the model's top-1 next token or has probability ≥ `KEEP_PROBABILITY`.
Writes `prompts.jsonl` and `accuracy.json` (by default next to this module, i.e. the shipped corpus), and
`state_capitals.jsonl`: every state-capital prompt, unfiltered, with the model's answer probability and top-1 token.
`--unfiltered-only` checks the state-capital set alone: it rewrites `state_capitals.jsonl` and that task's entry of
`accuracy.json`, and leaves `prompts.jsonl` as it is.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from atlas.config import DEFAULT_MODEL
from atlas.models import load_model
from ingest.demo_corpus import (
    ACCURACY_FILE,
    DEMO_CORPUS_FILE,
    KEEP_PROBABILITY,
    STATE_CAPITALS_FILE,
    candidate_prompts,
    demo_corpus_dir,
    state_capital_prompts,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=demo_corpus_dir())
    parser.add_argument("--unfiltered-only", action="store_true", help="Check only the state-capital set.")
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    kept: list[dict[str, object]] = []
    unfiltered: list[dict[str, object]] = []
    total: Counter[str] = Counter()
    top1: Counter[str] = Counter()
    keep: Counter[str] = Counter()
    with torch.no_grad():
        checked = [] if args.unfiltered_only else [(True, p) for p in candidate_prompts()]
        checked += [(False, p) for p in state_capital_prompts()]
        for filtered, prompt in checked:
            answer_id = int(loaded.tokenizer(prompt.answer, add_special_tokens=False)["input_ids"][0])
            probabilities = loaded.model(loaded.tokenize(prompt.text))[0, -1].float().softmax(-1)
            p_answer = float(probabilities[answer_id])
            is_top1 = int(probabilities.argmax()) == answer_id
            total[prompt.task] += 1
            top1[prompt.task] += is_top1
            record = {**prompt.record(), "p_answer": round(p_answer, 4), "top1": is_top1}
            if not filtered:
                top = loaded.tokenizer.decode([int(probabilities.argmax())])
                unfiltered.append({**record, "model_top1": top, "p_model_top1": round(float(probabilities.max()), 4)})
                keep[prompt.task] += 1
            elif is_top1 or p_answer >= KEEP_PROBABILITY:
                keep[prompt.task] += 1
                kept.append(record)
    args.out.mkdir(parents=True, exist_ok=True)
    written = (
        [(STATE_CAPITALS_FILE, unfiltered)]
        if args.unfiltered_only
        else [(DEMO_CORPUS_FILE, kept), (STATE_CAPITALS_FILE, unfiltered)]
    )
    for name, records in written:
        with (args.out / name).open("w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    accuracy = {
        task: {"candidates": total[task], "top1": top1[task], "top1_accuracy": round(top1[task] / total[task], 4),
               "kept": keep[task]}
        for task in total
    }  # fmt: skip
    report = {"model": args.model, "keep_probability": KEEP_PROBABILITY, "tasks": accuracy, "kept": len(kept),
              "unfiltered_tasks": sorted({p.task for p in state_capital_prompts()})}  # fmt: skip
    if args.unfiltered_only and (args.out / ACCURACY_FILE).is_file():
        previous = json.loads((args.out / ACCURACY_FILE).read_text())
        report = {
            **previous,
            "tasks": {**previous["tasks"], **accuracy},
            "unfiltered_tasks": report["unfiltered_tasks"],
        }
    (args.out / ACCURACY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
