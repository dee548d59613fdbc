"""Compare page: a stored diff of two dictionaries (`atlas diff A B`): its alignment summary, the corpus similarity
plot, and for one shared prompt the two graphs side by side, aligned features highlighted, with the diff table."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app.layout import figure
from app.resources import show_error, store
from app.store import drawable

st.title("Compare")
try:
    s = store()
    diffs = s.read("MATCH (d:Diff) RETURN properties(d) AS d ORDER BY d.created_at DESC, d.id LIMIT 200")
except Exception as err:
    show_error(err, "cannot list stored diffs")
    st.stop()
if not diffs:
    st.info("The store holds no diff yet: run `atlas diff A B` to compare two dictionaries or checkpoints.")
    st.stop()
by_id = {r["d"]["id"]: r["d"] for r in diffs}
diff_id = st.selectbox("Diff", list(by_id), key="diff_pick",
                       format_func=lambda i: f"{by_id[i]['a']} → {by_id[i]['b']} · {i}")  # fmt: skip
d = by_id[diff_id]
c1, c2, c3, c4 = st.columns(4)
c1.metric("Alignment", str(d.get("classification")))
c2.metric("Aligned 1:1", f"{d.get('matched_fraction', 0.0):.1%}")
c3.metric("Mean similarity", f"{d.get('mean_similarity', float('nan')):.3f}")
c4.metric("Prompts above noise", "—" if d.get("n_exceeding") is None else f"{d['n_exceeding']}/{d.get('n_prompts')}")
st.caption(f"A `{d['a']}` · B `{d['b']}` · noise reference `{d.get('noise_reference') or 'none'}` · most divergent "
           f"layer {d.get('max_divergence_layer') or '—'}")  # fmt: skip

try:
    rows = s.read("MATCH (:Diff {id: $id})-[o:ON]->(p:Prompt) RETURN p.id AS prompt_a, p.text AS text, "
                  "properties(o) AS o ORDER BY o.similarity, p.id", id=diff_id)  # fmt: skip
    aligned = s.read("MATCH (fa:Feature)-[:ALIGNS_WITH {diff: $id}]->(fb:Feature) RETURN fa.key AS a, fb.key AS b",
                     id=diff_id)  # fmt: skip
except Exception as err:
    show_error(err, "cannot read the diff")
    st.stop()
table = pd.DataFrame([{"prompt": r["text"], "prompt_a": r["prompt_a"], **r["o"]} for r in rows])
if table.empty:
    st.info("This diff has no prompts.")
    st.stop()
plot = px.bar(table, x="prompt", y="similarity", color="cluster" if "cluster" in table else None,
              range_y=[0, 1], title="Similarity per shared prompt (1 = same graph after alignment)")  # fmt: skip
if "noise_dissimilarity" in table:
    plot.add_scatter(x=table["prompt"], y=1 - table["noise_dissimilarity"], mode="markers", name="noise floor")
st.plotly_chart(plot, key="corpus_plot")
COLUMNS = ("prompt", "similarity", "node_overlap", "edge_overlap", "adjacency_similarity", "spectral_similarity",
           "max_divergence_layer", "cluster", "exceeds_noise")  # fmt: skip
shown = [c for c in COLUMNS if c in table]
st.dataframe(table[shown], hide_index=True, key="diff_prompts")

texts = dict(zip(table["prompt_a"], table["prompt"], strict=True))
prompt_a = st.selectbox("Prompt", list(texts), key="diff_prompt_pick", format_func=lambda p: repr(texts[p]))
prompt_b = str(table.set_index("prompt_a").loc[prompt_a, "prompt_b"])
a_to_b = {r["a"]: r["b"] for r in aligned}
try:
    graph_a = s.q.prompt_graph(prompt_a).single
    graph_b = s.q.prompt_graph(prompt_b).single
except Exception as err:
    show_error(err, "cannot load the two graphs")
    st.stop()
(nodes_a, edges_a), (nodes_b, edges_b) = drawable(graph_a), drawable(graph_b)
keys_b = {n.feature_key for n in nodes_b if n.feature_key}
keys_a = {n.feature_key for n in nodes_a if n.feature_key}
matched_a = [n.index for n in nodes_a if n.feature_key and a_to_b.get(n.feature_key) in keys_b]
matched_b = [n.index for n in nodes_b if n.feature_key in {a_to_b[k] for k in keys_a if k in a_to_b}]
tokens = [n.label for n in sorted((n for n in nodes_a if n.kind == "token"), key=lambda n: n.position)]
left, right = st.columns(2)
left.plotly_chart(figure(nodes_a, edges_a, tokens=tokens or None, highlight=matched_a, title="A", height=520),
                  key="graph_a")  # fmt: skip
right.plotly_chart(figure(nodes_b, edges_b, tokens=tokens or None, highlight=matched_b, title="B", height=520),
                   key="graph_b")  # fmt: skip
st.caption(f"highlighted: {len(matched_a)} feature node(s) of A whose aligned partner is in B's graph "
           f"({len(matched_b)} in B)")  # fmt: skip

changes_path = s.stats_db.parent / "diffs.duckdb"
if changes_path.exists():
    import duckdb

    with duckdb.connect(str(changes_path), read_only=True) as con:
        changes = con.execute(
            "SELECT element, status, key, layer, weight_a, weight_b, exceeds_noise FROM diff_changes "
            "WHERE diff_id = ? AND prompt_a = ? ORDER BY abs(weight_a - weight_b) DESC", [diff_id, prompt_a]
        ).df()  # fmt: skip
    st.subheader("Nodes and edges only in A, only in B, or changed")
    st.dataframe(changes, hide_index=True, key="diff_changes")
else:
    st.caption(f"No diff table: {changes_path} does not exist (written by `atlas diff` beside the statistics).")
