"""Pure data shaping for the pages: user input parsing, highlighted token HTML, histogram bins, probability
comparisons, path tables and the merged view of many paths. No Streamlit, no database, no model here.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.layout import GraphEdge, GraphNode

POSITION_ALL = "all"


class InputError(ValueError):
    """User input that cannot be parsed; the message says what was expected."""


def parse_list(text: str) -> list[str]:
    """Items separated by commas or new lines, stripped, empties dropped, order kept, duplicates removed."""
    out: list[str] = []
    for item in re.split(r"[,\n]", text):
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out


def parse_positions(text: str, n_pos: int) -> list[int] | slice:
    """Positions typed by the user: `all`, `5:` (5 to the end, generated tokens included), or a list of integers
    and ranges (`1, 3-5`, negative counts from the end). Raises `InputError` naming the bad part."""
    spec = text.strip().lower()
    if spec in ("", POSITION_ALL):
        return slice(0, None)
    if re.fullmatch(r"-?\d+\s*:", spec):
        start = int(spec.rstrip(": "))
        start = start + n_pos if start < 0 else start
        if not 0 <= start < n_pos:
            raise InputError(f"position {start} is outside the prompt (0..{n_pos - 1})")
        return slice(start, None)
    out: list[int] = []
    for part in parse_list(spec):
        match = re.fullmatch(r"(-?\d+)\s*-\s*(\d+)", part)
        try:
            values = list(range(int(match[1]), int(match[2]) + 1)) if match else [int(part)]
        except ValueError as err:
            raise InputError(f"{part!r} is not a position (use numbers, ranges like 2-4, 'all' or '5:')") from err
        for value in values:
            position = value + n_pos if value < 0 else value
            if not 0 <= position < n_pos:
                raise InputError(f"position {value} is outside the prompt (0..{n_pos - 1})")
            if position not in out:
                out.append(position)
    return out


def activation_colour(value: float, max_value: float) -> str:
    """A CSS background for an activation: transparent at 0, saturated orange at `max_value`."""
    share = 0.0 if max_value <= 0 or not math.isfinite(value) else max(0.0, min(value / max_value, 1.0))
    return f"rgba(249, 115, 22, {share:.2f})"


def highlighted_tokens_html(
    tokens: Sequence[str], activations: Sequence[float], *, max_value: float, focus: int | None = None
) -> str:
    """Tokens as HTML spans shaded by activation (escaped; the `focus` token outlined), for one example row."""
    spans = []
    for i, (token, value) in enumerate(zip(tokens, activations, strict=True)):
        text = html.escape(token).replace("\n", "⏎") or "∅"
        style = f"background:{activation_colour(value, max_value)};padding:1px 2px;border-radius:3px;"
        if i == focus:
            style += "outline:2px solid #7c2d12;"
        spans.append(f'<span title="{value:.3g}" style="{style}">{text}</span>')
    return "<span style='font-family:monospace;white-space:pre-wrap'>" + "".join(spans) + "</span>"


def histogram_rows(
    bins: Iterable[dict[str, Any]], bounds: Callable[[int], tuple[float, float]]
) -> list[dict[str, Any]]:
    """`[{bin, count}]` → `[{low, high, label, count}]` in bin order, using `bounds(bin) -> (low, high)`."""
    out = []
    for row in sorted(bins, key=lambda r: int(r["bin"])):
        low, high = bounds(int(row["bin"]))
        out.append({"low": low, "high": high, "label": f"{low:.3g}–{high:.3g}", "count": int(row["count"])})
    return out


@dataclass(frozen=True)
class TokenChange:
    token_id: int
    token: str
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


def probability_changes(
    before_logits: torch.Tensor, after_logits: torch.Tensor, decode: Callable[[int], str], *, top: int = 8
) -> list[TokenChange]:
    """Next-token probabilities `(vocab,)` logits before/after: the union of both top-`top` sets and the `top`
    largest |changes|, sorted by the larger of the two probabilities."""
    p0 = before_logits.float().softmax(-1)
    p1 = after_logits.float().softmax(-1)
    k = min(top, p0.numel())
    ids = set(p0.topk(k).indices.tolist()) | set(p1.topk(k).indices.tolist())
    ids |= set((p1 - p0).abs().topk(k).indices.tolist())
    rows = [TokenChange(i, decode(i), float(p0[i]), float(p1[i])) for i in ids]
    return sorted(rows, key=lambda r: -max(r.before, r.after))


def _step_label(node: Any) -> str:
    """A path step by its label: features by their label (else the node id), tokens and logits by their text."""
    if node.kind == "feature":
        return str(node.text or node.node_id)
    if node.kind in ("token", "logit"):
        return repr(node.text)
    return str(node.node_id)


def path_rows(paths: Sequence[Any]) -> list[dict[str, Any]]:
    """Ranked table rows of `LogitPath`s (rank 1 = strongest, the order the query returns)."""
    return [
        {
            "rank": rank,
            "prompt": path.prompt_id,
            "source": path.source_key,
            "source label": next((n.text for n in path.nodes if n.kind == "feature"), None),
            "target": path.target_text,
            "hops": path.hops,
            "strength": path.strength,
            "bottleneck": path.bottleneck,
            "path": " → ".join(n.node_id for n in path.nodes),
            "path labels": " → ".join(_step_label(n) for n in path.nodes),
        }
        for rank, path in enumerate(paths, start=1)
    ]


def per_prompt_summary(paths: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per prompt: paths found, strongest |strength|, targets reached; strongest prompt first."""
    groups: dict[str, list[Any]] = {}
    for path in paths:
        groups.setdefault(path.prompt_id, []).append(path)
    rows = [
        {
            "prompt": pid,
            "paths": len(group),
            "best |strength|": max(abs(p.strength) for p in group),
            "targets": ", ".join(sorted({repr(p.target_text) for p in group})),
        }
        for pid, group in groups.items()
    ]
    return sorted(rows, key=lambda r: -r["best |strength|"])


def merged_path_graph(paths: Sequence[Any]) -> tuple[list[GraphNode], list[GraphEdge]]:
    """All paths merged across prompts into one graph whose nodes are identities, not instances.

    Features merge by feature key, tokens and logits by text, errors by layer; each node is drawn at the position
    of its first occurrence. Edge weights are summed over the paths that use them.
    """
    nodes: dict[str, GraphNode] = {}
    weights: dict[tuple[str, str], float] = {}
    for path in paths:
        keys = []
        for n in path.nodes:
            name = n.key if n.kind == "feature" else n.text
            key = f"{n.kind}:{n.layer if n.kind == 'error' else name}"
            keys.append(key)
            if key not in nodes:
                shown = (n.text or name) if n.kind == "feature" else name  # a feature by its label when it has one
                nodes[key] = GraphNode(
                    len(nodes), n.node_id, n.kind, n.layer, int(n.position or 0),
                    str(shown) if n.kind != "error" else f"error L{n.layer}",
                    feature_key=n.key if n.kind == "feature" else None,
                )  # fmt: skip
        for a, b, weight in zip(keys, keys[1:], path.weights, strict=False):
            weights[(a, b)] = weights.get((a, b), 0.0) + weight
    edges = [GraphEdge(nodes[a].index, nodes[b].index, w) for (a, b), w in weights.items()]
    return list(nodes.values()), edges


_KIND_OF_LABEL = {"FeatureActivation": "feature", "ErrorNode": "error", "InputToken": "token", "LogitTarget": "logit",
                  "Feature": "feature", "Token": "token"}  # fmt: skip


def result_graph_drawable(graph: Any) -> tuple[list[GraphNode], list[GraphEdge]]:
    """Nodes and relationships of a console result (`app.cypher.ResultGraph`) as layout records.

    Attribution instance nodes keep their layer and position; other nodes (prompts, features, tokens, ...) are
    laid out along the x axis in the order met, on the row of their kind.
    """
    index: dict[str, int] = {}
    nodes: list[GraphNode] = []
    for element_id, node in graph.nodes.items():
        labels, props = node["labels"], node["properties"]
        kind = next((_KIND_OF_LABEL[label] for label in labels if label in _KIND_OF_LABEL), "error")
        position = props.get("position")
        index[element_id] = len(nodes)
        caption = props.get("node_id") or props.get("key") or props.get("label") or props.get("text") or props.get("id")
        nodes.append(
            GraphNode(
                index=len(nodes), node_id=str(caption or element_id), kind=kind,
                layer=props.get("layer") if isinstance(props.get("layer"), int) else None,
                position=int(position) if isinstance(position, int) else len(nodes),
                label=str(props.get("label") or props.get("text") or props.get("key") or caption or labels),
                value=props.get("activation") if isinstance(props.get("activation"), float) else None,
                feature_key=props.get("key") if "Feature" in labels else None,
            )
        )  # fmt: skip
    edges = [
        GraphEdge(index[r["start"]], index[r["end"]], float(r["properties"].get("weight", 1.0) or 1.0))
        for r in graph.relationships.values()
        if r["start"] in index and r["end"] in index
    ]
    return nodes, edges
