"""Automatic feature labels: a short, deterministic name for every feature, from the statistics DuckDB holds.

The rule (`auto_label`), applied to one feature:

1. **Activating tokens**: the feature's top activating examples (`top_examples`, strongest first; ties by prompt id
   and position), each reduced to the token it fires on, stripped of surrounding whitespace (a token that is only
   whitespace shows as `␣`, a newline as `⏎`); the first `MAX_TOKENS` (3) distinct ones, in that order.
2. **Logit effects**: the feature's strongest *positive* decoder logit effects (`logit_effects`, rank order), stripped
   the same way; the first `MAX_EFFECTS` (2) distinct ones with a positive effect.
3. The label is `"A, B, C → X, Y"`; with no examples `"→ X, Y"`, with no effects `"A, B, C"`, with neither no label
   (None). Each token is cut to `MAX_TOKEN_CHARS` (14) characters (`…` marks a cut) and the whole label to
   `MAX_LABEL_CHARS` (48), short enough for a graph caption.

Nothing else enters (no model, no randomness), so the same statistics give the same labels. `rebuild_auto_labels`
recomputes the table `feature_labels (transcoder_id, layer, feature, auto_label)` in a DuckDB connection; the
statistics writer (`feature_stats.FeatureStatsStore`) calls it whenever it rebuilds the statistics, so the labels
follow the statistics. This module reads DuckDB and returns strings; it never touches Neo4j (`labels` does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import duckdb
import pyarrow as pa

MAX_TOKENS = 3
MAX_EFFECTS = 2
MAX_TOKEN_CHARS = 14
MAX_LABEL_CHARS = 48

LABELS_TABLE = "feature_labels"


def display_token(token: str) -> str:
    """A token as it appears in a label: stripped; whitespace-only tokens as a visible mark; cut when long."""
    text = token.strip()
    if not text:
        text = "⏎" if "\n" in token else "␣" if token else "∅"
    text = "".join(ch if ch.isprintable() else "�" for ch in text)
    return text if len(text) <= MAX_TOKEN_CHARS else text[: MAX_TOKEN_CHARS - 1] + "…"


def _distinct(tokens: Iterable[str], limit: int) -> list[str]:
    out: list[str] = []
    for token in tokens:
        shown = display_token(token)
        if shown not in out:
            out.append(shown)
        if len(out) == limit:
            break
    return out


def auto_label(activating: Sequence[str], effects: Sequence[tuple[str, float]]) -> str | None:
    """The label of one feature from its activating tokens (strongest first) and its logit effects (token, effect)
    in rank order; None when there is nothing to say. See the module docstring for the rule."""
    left = _distinct(activating, MAX_TOKENS)
    right = _distinct((token for token, effect in effects if effect > 0), MAX_EFFECTS)
    if not left and not right:
        return None
    label = ", ".join(left)
    if right:
        label = f"{label} → {', '.join(right)}" if label else f"→ {', '.join(right)}"
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


_EXAMPLES_SQL = """
SELECT transcoder_id, layer, feature,
       list(context_tokens[position - context_start + 1] ORDER BY activation DESC, prompt_id, position) AS tokens
FROM top_examples GROUP BY ALL
"""
_EFFECTS_SQL = """
SELECT transcoder_id, layer, feature, list(token ORDER BY rank) AS tokens, list(effect ORDER BY rank) AS effects
FROM logit_effects WHERE sign = 'positive' GROUP BY ALL
"""
LABELS_SCHEMA = pa.schema(
    [("transcoder_id", pa.string()), ("layer", pa.int32()), ("feature", pa.int32()), ("auto_label", pa.string())]
)


def rebuild_auto_labels(con: duckdb.DuckDBPyConnection) -> int:
    """Recompute `feature_labels` from `top_examples` and `logit_effects` (either may be missing; with both missing
    nothing is created); returns its rows."""
    tables = {row[0] for row in con.execute("SHOW TABLES").fetchall()}
    if not {"top_examples", "logit_effects"} & tables:
        return 0  # no statistics yet: no table either
    activating: dict[tuple[str, int, int], list[str]] = {}
    effects: dict[tuple[str, int, int], list[tuple[str, float]]] = {}
    if "top_examples" in tables:
        for tid, layer, feature, tokens in con.execute(_EXAMPLES_SQL).fetchall():
            activating[(tid, layer, feature)] = [t for t in tokens if t is not None]
    if "logit_effects" in tables:
        for tid, layer, feature, tokens, values in con.execute(_EFFECTS_SQL).fetchall():
            effects[(tid, layer, feature)] = list(zip(tokens, values, strict=True))
    rows: dict[str, list[object]] = {name: [] for name in LABELS_SCHEMA.names}
    for key in sorted(activating.keys() | effects.keys()):
        label = auto_label(activating.get(key, []), effects.get(key, []))
        if label is not None:
            for name, value in zip(LABELS_SCHEMA.names, (*key, label), strict=True):
                rows[name].append(value)
    con.register("incoming_labels", pa.Table.from_pydict(rows, schema=LABELS_SCHEMA))
    try:
        con.execute(f"CREATE OR REPLACE TABLE {LABELS_TABLE} AS SELECT * FROM incoming_labels")
    finally:
        con.unregister("incoming_labels")
    return len(rows["auto_label"])
