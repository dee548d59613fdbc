"""The demo corpus: templated prompts for behaviours the default model performs, each tagged with task and answer.

Four tasks, chosen because SmolLM2-135M-Instruct gets many of them right (checked by `python -m
ingest.demo_corpus.check`, which keeps only prompts whose expected answer is the model's top-1 next token or has
probability ≥ `KEEP_PROBABILITY`, and records the per-task accuracy in `ACCURACY_FILE`):

- `ioi`: indirect-object identification ("When Mary and John went to the store, John gave a drink to" → " Mary");
- `capitals`: capital cities and landmarks ("The capital of France is" → " Paris");
- `antonyms`: "The opposite of hot is" → " cold";
- `addition`: single-digit sums in a few-shot format ("2+3=5, 4+1=5, 3+4=" → "7").

`candidate_prompts()` generates every candidate (deterministically); `demo_corpus_path()` is the shipped, checked
JSONL (fields `text`, `task`, `answer`, `template`).

A fifth set is *not* filtered by the model: `state_capitals` (`state_capital_prompts()`, shipped as
`state_capitals_path()`), two-hop facts such as "Fact: the capital of the state containing Dallas is" → " Austin",
city → state → capital. The default model gets every one of them wrong (its top-1 is " the", the city itself or the
state), so the top-1 filter would keep none; they are ingested with the correct capital as the attribution target
(`--targets answer`) whatever the model predicts, which is what the query "paths from the features active on
' Dallas' to capital logits across prompts" needs. Every capital is one token with a leading space in the default
model's vocabulary (checked by the tests), because an `answer` target is the answer's first token: capitals that
split (" Tallahassee" → " Tall"…, " Olympia" → " Olymp"…) would be attributed on an ambiguous fragment, so Miami and
Seattle are left out. Dallas is asked in every template, the other cities once. `check.py` records the model's
probability and top-1 token for these too. This module only builds text; it runs no model.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

DEMO_CORPUS_FILE = "prompts.jsonl"
STATE_CAPITALS_FILE = "state_capitals.jsonl"
STATE_CAPITALS_TASK = "state_capitals"
ACCURACY_FILE = "accuracy.json"
KEEP_PROBABILITY = 0.3

_NAMES = ("Mary", "John", "Tom", "Sarah", "James", "Anna", "David", "Lisa", "Paul", "Kate", "Mark", "Emma")
_IOI_TEMPLATES = (
    "When {a} and {b} went to the store, {b} gave a drink to",
    "When {a} and {b} went to the park, {b} gave a ball to",
    "After {a} and {b} had lunch, {b} handed the bill to",
    "Then, {a} and {b} went to the office. {b} gave a book to",
    "While {a} and {b} were cooking dinner, {b} passed the salt to",
)
_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Russia", "Moscow"), ("England", "London"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Ireland", "Dublin"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Turkey", "Ankara"), ("Kenya", "Nairobi"),
    ("Thailand", "Bangkok"), ("Hungary", "Budapest"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Peru", "Lima"), ("Cuba", "Havana"),
)  # fmt: skip
_CAPITAL_TEMPLATES = ("The capital of {country} is", "The capital city of {country} is", "{country}'s capital is")
_LANDMARKS = (
    ("The Eiffel Tower", "Paris"), ("The Louvre", "Paris"), ("The Colosseum", "Rome"), ("Big Ben", "London"),
    ("The Brandenburg Gate", "Berlin"), ("The Kremlin", "Moscow"), ("The Acropolis", "Athens"),
    ("The Statue of Liberty", "New"), ("The Golden Gate Bridge", "San"), ("The Forbidden City", "Beijing"),
    ("The Sagrada Familia", "Barcelona"), ("The Space Needle", "Seattle"), ("Times Square", "New"),
    ("Buckingham Palace", "London"), ("The Vatican", "Rome"), ("The Taj Mahal", "Agra"),
)  # fmt: skip
_LANDMARK_TEMPLATES = ("{place} is located in the city of", "{place} is in the city of")
_ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("good", "bad"), ("high", "low"), ("old", "young"), ("open", "closed"), ("rich", "poor"), ("early", "late"),
    ("long", "short"), ("strong", "weak"), ("wet", "dry"), ("full", "empty"), ("true", "false"), ("love", "hate"),
    ("day", "night"), ("black", "white"), ("left", "right"), ("top", "bottom"), ("inside", "outside"),
    ("north", "south"), ("east", "west"), ("heavy", "light"), ("thick", "thin"), ("clean", "dirty"),
    ("loud", "quiet"), ("hard", "soft"), ("win", "lose"), ("before", "after"), ("first", "last"),
    ("always", "never"), ("friend", "enemy"), ("question", "answer"),
)  # fmt: skip
_ANTONYM_TEMPLATES = (
    "The opposite of {word} is",
    "The word {word} is the opposite of the word",
    "hot and cold, big and small, {word} and",
)
# (city, its state's capital): the capitals are single tokens of the default model (" Austin" = 19292, ...).
_STATE_CITIES = (
    ("Dallas", "Austin"), ("Houston", "Austin"), ("San Antonio", "Austin"), ("Chicago", "Springfield"),
    ("Los Angeles", "Sacramento"), ("San Francisco", "Sacramento"), ("Buffalo", "Albany"), ("Cleveland", "Columbus"),
    ("Memphis", "Nashville"), ("Tucson", "Phoenix"), ("Savannah", "Atlanta"),
)  # fmt: skip
_STATE_TEMPLATES = (
    "Fact: the capital of the state containing {city} is",
    "The capital of the state where {city} is located is",
    "Q: What is the capital of the state that {city} is in? A: The capital is",
)
_ADDITION_TEMPLATES = ("2+3=5, 4+1=5, {a}+{b}=", "1+1=2\n3+2=5\n{a}+{b}=")


@dataclass(frozen=True)
class DemoPrompt:
    text: str
    task: str
    answer: str  # the expected continuation; its first token is what the model must predict
    template: str

    def record(self) -> dict[str, str]:
        return asdict(self)


def _ioi() -> list[DemoPrompt]:
    out = []
    for template in _IOI_TEMPLATES:
        for a, b in itertools.permutations(_NAMES[:8], 2):
            out.append(DemoPrompt(template.format(a=a, b=b), "ioi", f" {a}", template))
    return out


def _capitals() -> list[DemoPrompt]:
    out = []
    for template in _CAPITAL_TEMPLATES:
        out += [DemoPrompt(template.format(country=c), "capitals", f" {city}", template) for c, city in _CAPITALS]
    for template in _LANDMARK_TEMPLATES:
        out += [DemoPrompt(template.format(place=p), "capitals", f" {city}", template) for p, city in _LANDMARKS]
    return out


def _antonyms() -> list[DemoPrompt]:
    out = []
    for template in _ANTONYM_TEMPLATES:
        out += [DemoPrompt(template.format(word=w), "antonyms", f" {a}", template) for w, a in _ANTONYMS]
    return out


def _addition() -> list[DemoPrompt]:
    out = []
    for template in _ADDITION_TEMPLATES:
        for a, b in itertools.product(range(1, 10), range(1, 10)):
            if a + b < 10:
                out.append(DemoPrompt(template.format(a=a, b=b), "addition", str(a + b), template))
    return out


def state_capital_prompts() -> list[DemoPrompt]:
    """The two-hop city → state → capital set (not filtered by the model): Dallas in every template, others once."""
    out = []
    for city, capital in _STATE_CITIES:
        for template in _STATE_TEMPLATES if city == "Dallas" else _STATE_TEMPLATES[:1]:
            out.append(DemoPrompt(template.format(city=city), STATE_CAPITALS_TASK, f" {capital}", template))
    return out


def candidate_prompts() -> list[DemoPrompt]:
    """Every templated candidate, in a fixed order (before the model check)."""
    return _ioi() + _capitals() + _antonyms() + _addition()


def demo_corpus_dir() -> Path:
    return Path(__file__).resolve().parent


def demo_corpus_path() -> Path:
    """The shipped JSONL of checked prompts (`text`, `task`, `answer`, `template`, `p_answer`)."""
    return demo_corpus_dir() / DEMO_CORPUS_FILE


def state_capitals_path() -> Path:
    """The shipped JSONL of the state-capital set, with the model's `p_answer`, `top1` and `model_top1` recorded."""
    return demo_corpus_dir() / STATE_CAPITALS_FILE


def demo_subset(target: Path, n: int) -> Path:
    """Write `n` shipped prompts, spread evenly over the tasks (round robin), to `target`; `n` ≤ 0: all of them."""
    import json

    records = [json.loads(line) for line in demo_corpus_path().read_text(encoding="utf-8").splitlines() if line]
    by_task: dict[str, list[dict[str, object]]] = {}
    for record in records:
        by_task.setdefault(str(record["task"]), []).append(record)
    if n <= 0 or n >= len(records):
        chosen = records
    else:
        chosen = []
        queues = [list(reversed(v)) for v in by_task.values()]
        while len(chosen) < n and any(queues):
            for queue in queues:
                if queue and len(chosen) < n:
                    chosen.append(queue.pop())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
    tmp.replace(target)
    return target
