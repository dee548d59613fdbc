"""Optional explainer: feature explanations from an OpenAI-compatible chat endpoint, scored by detection.

Off unless a user configures an endpoint (`ExplainerConfig`: base URL and model, e.g. from `ATLAS_EXPLAINER_URL`,
`ATLAS_EXPLAINER_MODEL`, optional `ATLAS_EXPLAINER_API_KEY`); nothing leaves the machine otherwise. For one feature:

1. its top activating examples (DuckDB `top_examples`, strongest first) are split alternately: ranks 0, 2, 4, …
   (at most `n_explain`) are shown to the model, ranks 1, 3, 5, … (at most `n_holdout`) are held out;
2. **generation**: the model sees the shown contexts with the activating token marked `<<token>>` and answers with
   a short explanation;
3. **detection scoring** (as in published auto-interpretation pipelines): the model gets the explanation and a
   shuffled list (fixed seed per feature) of the held-out contexts and as many *negatives*, contexts of other
   features' top examples in prompts where this feature has no stored top example, and answers 1 or 0 for each;
   the score is the balanced accuracy (mean of the true-positive and true-negative rates), 0.5 = chance. The
   negatives are an approximation: the statistics store no activations of this feature there, only that none of
   its recorded top examples comes from those prompts.

`explain_features` computes every explanation first and then writes them all in one transaction through
`labels.write_user_labels` (source `explainer`, author `explainer:<model>`, the score beside the label), so an
unreachable endpoint or a malformed answer raises `ExplainerError` with nothing written. An explainer label is a
label like a person's: it overrides the automatic one, keeps history, and a person can overwrite it.
This module reads DuckDB through `FeatureStatsStore` and talks HTTP with the standard library only.
"""

from __future__ import annotations

import json
import random
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from neo4j import Driver

from atlas.storage.feature_stats import FeatureStatsStore
from atlas.storage.labels import MAX_LABEL_CHARS, LabelEdit, write_user_labels

ENV_URL = "ATLAS_EXPLAINER_URL"
ENV_MODEL = "ATLAS_EXPLAINER_MODEL"
ENV_API_KEY = "ATLAS_EXPLAINER_API_KEY"


class ExplainerError(RuntimeError):
    """The endpoint failed or answered nonsense; nothing was written."""


@dataclass(frozen=True)
class ExplainerConfig:
    base_url: str  # e.g. http://localhost:8000/v1 (the endpoint is <base_url>/chat/completions)
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    n_explain: int = 8
    n_holdout: int = 8

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ExplainerConfig | None:
        """The configured explainer, or None (the default: off)."""
        url, model = environ.get(ENV_URL, "").strip(), environ.get(ENV_MODEL, "").strip()
        if not url:
            return None
        if not model:
            raise ExplainerError(f"{ENV_URL} is set but {ENV_MODEL} is not: name the model to ask")
        return cls(url, model, environ.get(ENV_API_KEY) or None)


@dataclass(frozen=True)
class Example:
    tokens: list[str]
    focus: int  # index of the activating token in `tokens`

    def marked(self) -> str:
        return "".join(f"<<{t}>>" if i == self.focus else t for i, t in enumerate(self.tokens)).replace("\n", " ")

    def plain(self) -> str:
        return "".join(self.tokens).replace("\n", " ")


@dataclass(frozen=True)
class Explanation:
    key: str
    label: str
    score: float  # balanced detection accuracy on held-out examples and negatives
    n_positive: int
    n_negative: int


def chat(cfg: ExplainerConfig, messages: list[dict[str, str]]) -> str:
    """One chat completion (temperature 0); ExplainerError on any failure."""
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
            payload = json.loads(response.read().decode())
        return str(payload["choices"][0]["message"]["content"])
    except urllib.error.HTTPError as err:
        raise ExplainerError(f"explainer endpoint {url} answered HTTP {err.code}: {err.reason}") from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise ExplainerError(f"explainer endpoint {url} is unreachable: {err}") from err
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ExplainerError(f"explainer endpoint {url} did not answer like a chat completion: {err!r}") from err


def generation_messages(examples: Sequence[Example]) -> list[dict[str, str]]:
    shown = "\n".join(f"{i + 1}. {e.marked()}" for i, e in enumerate(examples))
    return [
        {"role": "system", "content": "You explain features of a language model's dictionary. Answer with a short "
                                      "phrase (at most 8 words) naming what the feature detects, nothing else."},
        {"role": "user", "content": f"The feature fires most on the tokens marked <<like this>>:\n{shown}"},
    ]  # fmt: skip


def detection_messages(explanation: str, texts: Sequence[str]) -> list[dict[str, str]]:
    listed = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))
    return [
        {"role": "system", "content": "You judge whether a described language-model feature fires on texts. Answer "
                                      "with a JSON list of 0/1, one per text, nothing else."},
        {"role": "user", "content": f"Feature: {explanation}\nTexts:\n{listed}"},
    ]  # fmt: skip


def parse_votes(answer: str, n: int) -> list[int]:
    match = re.search(r"\[[^\]]*\]", answer)
    try:
        votes = json.loads(match[0]) if match else None
    except ValueError:
        votes = None
    if not isinstance(votes, list) or len(votes) != n or any(v not in (0, 1) for v in votes):
        raise ExplainerError(f"the detection answer is not a JSON list of {n} zeros and ones: {answer[:200]!r}")
    return [int(v) for v in votes]


def balanced_accuracy(votes: Sequence[int], truth: Sequence[int]) -> float:
    pos = [v for v, t in zip(votes, truth, strict=True) if t == 1]
    neg = [v for v, t in zip(votes, truth, strict=True) if t == 0]
    rates = [sum(pos) / len(pos)] if pos else []
    rates += [1 - sum(neg) / len(neg)] if neg else []
    return sum(rates) / len(rates)


def explain_one(
    cfg: ExplainerConfig, key: str, examples: Sequence[Example], negatives: Sequence[Example]
) -> Explanation:
    """Generate and score one feature's explanation (see the module docstring)."""
    shown, held = list(examples[0::2][: cfg.n_explain]), list(examples[1::2][: cfg.n_holdout])
    if not shown or not held:
        raise ExplainerError(f"feature {key} has {len(examples)} stored example(s); at least 2 are needed")
    label = " ".join(chat(cfg, generation_messages(shown)).split()).strip(" .\"'")
    if not label:
        raise ExplainerError(f"the explainer gave an empty explanation for {key}")
    label = label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"
    negs = list(negatives[: len(held)])
    items = [(e.plain(), 1) for e in held] + [(e.plain(), 0) for e in negs]
    random.Random(key).shuffle(items)
    votes = parse_votes(chat(cfg, detection_messages(label, [t for t, _ in items])), len(items))
    return Explanation(key, label, balanced_accuracy(votes, [y for _, y in items]), len(held), len(negs))


Examples = tuple[list[Example], list[Example]]


def _examples(stats: FeatureStatsStore, transcoder: str, layer: int, feature: int) -> Examples:
    """(this feature's top examples, strongest first; negatives from other features of the dictionary)."""
    with stats.reader() as con:
        rows = con.execute(
            "SELECT layer, feature, prompt_id, position, context_tokens, context_start, activation FROM top_examples "
            "WHERE transcoder_id = ? ORDER BY activation DESC, prompt_id, position",
            [transcoder],
        ).fetchall()
    mine = {r[2] for r in rows if (r[0], r[1]) == (layer, feature)}  # prompts this feature has examples in
    own: list[Example] = []
    others: list[Example] = []
    seen: set[tuple[str, int]] = set()
    for lay, feat, pid, pos, tokens, start, _ in rows:
        example = Example(list(tokens), pos - start)
        if (lay, feat) == (layer, feature):
            own.append(example)
        elif pid not in mine and (pid, pos) not in seen:
            seen.add((pid, pos))
            others.append(example)
    random.Random(f"{transcoder}/{layer}/{feature}").shuffle(others)
    return own, others


def explain_features(
    driver: Driver, stats: FeatureStatsStore, cfg: ExplainerConfig, keys: Sequence[str], *, database: str = "neo4j"
) -> list[Explanation]:
    """Explain and score each feature, then store all labels in one transaction (nothing on any failure)."""
    results = []
    for key in keys:
        match = re.fullmatch(r"(.+)/(\d+)/(\d+)", key)
        if match is None:
            raise ExplainerError(f"{key!r} is not a feature key (expected DICTIONARY/LAYER/INDEX)")
        own, others = _examples(stats, match[1], int(match[2]), int(match[3]))
        results.append(explain_one(cfg, key, own, others))
    edits = [LabelEdit(r.key, r.label, None, f"explainer:{cfg.model}", score=r.score) for r in results]
    write_user_labels(driver, edits, database=database, source="explainer")
    return results


def summary(results: Sequence[Explanation]) -> dict[str, Any]:
    return {r.key: {"label": r.label, "score": round(r.score, 4), "held_out": r.n_positive,
                    "negatives": r.n_negative} for r in results}  # fmt: skip
