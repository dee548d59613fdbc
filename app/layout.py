"""Drawing attribution graphs: node/edge records, a layered layout, filters, and the Plotly figure.

Layout: y is the layer band: input tokens at the bottom (row 0), features and errors of layer l on row l + 1, logit
targets on top (row n_layers + 1). x follows the token position: each position gets a column span as wide as its
most crowded row (one unit per node, a gap between positions), and the nodes of a (row, position) cell are spread
evenly across that span, most influential first, so nothing overlaps even when most features sit at the last token.
Edges are drawn as line segments grouped into a few width buckets per sign (Plotly draws one width and colour per
trace): blue for positive weights, red for negative, wider for larger |weight|.

Everything here is pure (no Streamlit, no database); `figure()` only builds a `plotly.graph_objects.Figure`, which
renders offline (plotly.js ships inside Streamlit's frontend; nothing is fetched from a CDN).
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

KIND_COLOURS = {"token": "#6b7280", "feature": "#059669", "error": "#a855f7", "logit": "#d97706"}
POSITIVE, NEGATIVE = "#2563eb", "#dc2626"
NODE_WIDTH = 1.0  # x units per node in a crowded cell
POSITION_GAP = 0.6  # x units between the spans of neighbouring positions
WIDTH_BUCKETS = (0.75, 1.5, 3.0, 5.0)


@dataclass(frozen=True)
class GraphNode:
    """One instance node of a prompt graph (`index` is its node_index in the prompt)."""

    index: int
    node_id: str
    kind: str  # feature | error | token | logit
    layer: int | None
    position: int
    label: str
    value: float | None = None  # features: activation; errors: norm; logits: probability
    influence: float | None = None  # cumulative influence (lower = more important); None for some kinds
    feature_key: str | None = None

    @property
    def caption(self) -> str:
        if self.kind == "feature":
            return f"{self.label} @{self.position}"
        if self.kind == "token":
            return repr(self.label)
        if self.kind == "logit":
            return f"→ {self.label!r}"
        return f"{self.label} @{self.position}"


@dataclass(frozen=True)
class GraphEdge:
    source: int  # node_index
    target: int
    weight: float


def n_layers_of(nodes: Iterable[GraphNode]) -> int:
    """Number of model layers implied by the nodes (max layer + 1; 0 when no node has a layer)."""
    layers = [n.layer for n in nodes if n.layer is not None]
    return max(layers) + 1 if layers else 0


def row_of(node: GraphNode, n_layers: int) -> int:
    if node.kind == "token":
        return 0
    if node.kind == "logit":
        return n_layers + 1
    return int(node.layer if node.layer is not None else 0) + 1


def position_spans(nodes: Sequence[GraphNode], n_layers: int | None = None) -> dict[int, tuple[float, float]]:
    """`{position: (start, width)}` of each position's column, for every position from 0 to the largest present."""
    L = n_layers_of(nodes) if n_layers is None else n_layers
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for node in nodes:
        counts[(row_of(node, L), node.position)] += 1
    widest: dict[int, int] = defaultdict(lambda: 1)
    for (_, position), count in counts.items():
        widest[position] = max(widest[position], count)
    spans: dict[int, tuple[float, float]] = {}
    start = 0.0
    for position in range(max((n.position for n in nodes), default=-1) + 1):
        width = widest[position] * NODE_WIDTH
        spans[position] = (start, width)
        start += width + POSITION_GAP
    return spans


def layered_layout(nodes: Sequence[GraphNode], n_layers: int | None = None) -> dict[int, tuple[float, float]]:
    """Positions `{node_index: (x, y)}`: y = layer row; x inside the node's position span (see the module doc)."""
    L = n_layers_of(nodes) if n_layers is None else n_layers
    spans = position_spans(nodes, L)
    cells: dict[tuple[int, int], list[GraphNode]] = defaultdict(list)
    for node in nodes:
        cells[(row_of(node, L), node.position)].append(node)
    out: dict[int, tuple[float, float]] = {}
    for (row, position), members in cells.items():
        members.sort(key=lambda n: (n.influence if n.influence is not None else math.inf, n.index))
        start, width = spans[position]
        step = width / len(members)
        for j, node in enumerate(members):
            out[node.index] = (start + (j + 0.5) * step, float(row))
    return out


def filter_nodes(
    nodes: Sequence[GraphNode], edges: Sequence[GraphEdge], *, max_influence: float
) -> tuple[list[GraphNode], list[GraphEdge]]:
    """Keep tokens, logits, and nodes whose cumulative influence is ≤ `max_influence` (or unknown), and the edges
    between kept nodes. Influence is cumulative (as circuit-tracer's pruning): a lower value is a more important node.
    """
    kept = [
        n for n in nodes if n.kind in ("token", "logit") or n.influence is None or n.influence <= max_influence + 1e-12
    ]
    ids = {n.index for n in kept}
    return kept, [e for e in edges if e.source in ids and e.target in ids]


def subgraph(
    nodes: Sequence[GraphNode], edges: Sequence[GraphEdge], pinned: Iterable[int]
) -> tuple[list[GraphNode], list[GraphEdge]]:
    """The pinned nodes and the edges among them."""
    ids = set(pinned)
    return [n for n in nodes if n.index in ids], [e for e in edges if e.source in ids and e.target in ids]


def neighbours(edges: Sequence[GraphEdge], index: int, *, limit: int = 10) -> tuple[list[GraphEdge], list[GraphEdge]]:
    """`(incoming, outgoing)` edges of a node, strongest |weight| first."""
    incoming = sorted((e for e in edges if e.target == index), key=lambda e: -abs(e.weight))[:limit]
    outgoing = sorted((e for e in edges if e.source == index), key=lambda e: -abs(e.weight))[:limit]
    return incoming, outgoing


def width_bucket(weight: float, max_abs: float) -> int:
    """Index into `WIDTH_BUCKETS` for |weight| relative to the largest |weight| (quarters of the range)."""
    if max_abs <= 0:
        return 0
    share = min(abs(weight) / max_abs, 1.0)
    return min(int(share * len(WIDTH_BUCKETS)), len(WIDTH_BUCKETS) - 1)


def figure(
    nodes: Sequence[GraphNode],
    edges: Sequence[GraphEdge],
    *,
    tokens: Sequence[str] | None = None,
    highlight: Iterable[int] = (),
    title: str | None = None,
    height: int = 640,
) -> go.Figure:
    """The layered graph as a Plotly figure. Node traces carry `customdata = node_index` for click selection.

    Traces: first the edge traces (one per sign and width bucket), then one node trace per kind (in
    `KIND_COLOURS` order, kinds without nodes skipped).
    """
    L = n_layers_of(nodes)
    pos = layered_layout(nodes, L)
    spans = position_spans(nodes, L)
    fig = go.Figure()
    max_abs = max((abs(e.weight) for e in edges), default=0.0)
    groups: dict[tuple[bool, int], list[GraphEdge]] = defaultdict(list)
    for edge in edges:
        if edge.source in pos and edge.target in pos:
            groups[(edge.weight >= 0, width_bucket(edge.weight, max_abs))].append(edge)
    for (positive, bucket), members in sorted(groups.items()):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for edge in members:
            (x0, y0), (x1, y1) = pos[edge.source], pos[edge.target]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"width": WIDTH_BUCKETS[bucket], "color": POSITIVE if positive else NEGATIVE},
                opacity=0.35 + 0.15 * bucket,
                hoverinfo="skip",
                showlegend=False,
                name=f"{'+' if positive else '−'} edges",
            )
        )
    marked = set(highlight)
    for kind, colour in KIND_COLOURS.items():
        members_n = [n for n in nodes if n.kind == kind]
        if not members_n:
            continue
        fig.add_trace(
            go.Scatter(
                x=[pos[n.index][0] for n in members_n],
                y=[pos[n.index][1] for n in members_n],
                mode="markers+text" if kind == "logit" or (kind == "token" and not tokens) else "markers",
                text=[n.caption for n in members_n],
                textposition="bottom center" if kind == "token" else "top center",
                customdata=[n.index for n in members_n],
                hovertext=[_hover(n) for n in members_n],
                hoverinfo="text",
                marker={
                    "size": [16 if n.index in marked else 10 for n in members_n],
                    "color": colour,
                    "symbol": "square" if kind == "error" else "circle",
                    "line": {"width": [3 if n.index in marked else 0.5 for n in members_n], "color": "#111827"},
                },
                name=kind,
                unselected={"marker": {"opacity": 0.8}},  # a click selects a node; keep the others readable
            )
        )
    ticks = list(range(L + 2))
    fig.update_layout(
        title=title,
        height=height,
        margin={"l": 60, "r": 20, "t": 40 if title else 10, "b": 40},
        plot_bgcolor="white",
        legend={"orientation": "h", "y": 1.02, "x": 0},
        clickmode="event+select",
        dragmode="pan",
        yaxis={
            "tickvals": ticks,
            "ticktext": ["tokens", *(f"L{layer}" for layer in range(L)), "logits"],
            "range": [-0.8, L + 1.8],
            "gridcolor": "#f3f4f6",
            "zeroline": False,
        },
        xaxis={"title": "input tokens", "gridcolor": "#f3f4f6", "zeroline": False, "showgrid": False},
    )
    centres = [spans[p][0] + spans[p][1] / 2 for p in sorted(spans)]
    if tokens:
        labels = [repr(t)[1:-1].replace(" ", "␣") or "∅" for t in tokens[: len(centres)]]
        fig.update_xaxes(tickvals=centres[: len(labels)], ticktext=labels, tickangle=0)
    else:
        fig.update_xaxes(tickvals=centres, ticktext=[str(p) for p in sorted(spans)], title="token position")
    return fig


def _hover(node: GraphNode) -> str:
    parts = [f"<b>{node.node_id}</b> ({node.kind})", f"position {node.position}"]
    if node.feature_key and node.label and node.label != node.feature_key:
        parts.insert(0, f"<b>{html.escape(node.label)}</b>")  # the feature's label first, its key below
    if node.feature_key:
        parts.append(f"feature {node.feature_key}")
    if node.value is not None:
        name = {"feature": "activation", "error": "norm", "logit": "probability"}.get(node.kind, "value")
        parts.append(f"{name} {node.value:.4g}")
    if node.influence is not None:
        parts.append(f"influence {node.influence:.3f}")
    return "<br>".join(parts)


def selected_node(event: object) -> int | None:
    """The node_index of a clicked point in a `st.plotly_chart(on_select=...)` event (None when nothing is)."""
    selection = getattr(event, "selection", None)
    if selection is None and isinstance(event, dict):
        selection = event.get("selection")
    if not selection:
        return None
    points = selection.get("points") if isinstance(selection, dict) else getattr(selection, "points", None)
    for point in points or []:
        data = point.get("customdata")
        if isinstance(data, list):
            data = data[0] if data else None
        if isinstance(data, int | float):
            return int(data)
    return None
