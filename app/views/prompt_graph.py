"""Prompt graph page: one prompt's layered attribution graph (tokens bottom, layers up, logits top), a node
threshold, click (or pick, or link with `?node=<node id>`) a node for its detail and its label, pin nodes into a
subgraph, send features to Interventions."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.label_edits import label_panel
from app.layout import figure, filter_nodes, neighbours, selected_node, subgraph
from app.resources import config, show_error, store
from app.store import drawable

st.title("Prompt graph")
try:
    s = store()
    contains = st.text_input("Filter prompts by text", key="prompt_filter")
    prompts = s.q.list_prompts(contains=contains.strip() or None, limit=500).rows
except Exception as err:
    show_error(err, "cannot list prompts")
    st.stop()
if not prompts:
    st.info("No stored prompt matches." if contains else "The store holds no prompt graphs yet.")
    st.stop()

ids = [p.prompt_id for p in prompts]
by_id = {p.prompt_id: p for p in prompts}
wanted = st.query_params.get("prompt", "")
prompt_id = st.selectbox(
    "Prompt", ids, index=ids.index(wanted) if wanted in ids else 0, key="prompt_pick",
    format_func=lambda pid: f"{by_id[pid].text!r} · {by_id[pid].task or '-'} · {pid[:10]}",
)  # fmt: skip
try:
    with st.spinner("Loading the graph…"):
        graph = s.q.prompt_graph(prompt_id).single
except Exception as err:
    show_error(err, "cannot load the prompt graph")
    st.stop()
nodes, edges = drawable(graph)
info = graph.prompt
token_nodes = sorted((n for n in nodes if n.kind == "token"), key=lambda n: n.position)
tokens = [n.label for n in token_nodes]
st.caption(
    f"{len(nodes)} nodes, {len(edges)} edges · model `{info.get('model')}` · transcoder `{info.get('transcoder')}` · "
    f"replacement {info.get('replacement_score', float('nan')):.3f} · completeness "
    f"{info.get('completeness_score', float('nan')):.3f}"
)
try:
    card = s.dictionary_card(str(info.get("transcoder")))
except Exception as err:  # the card is a caution, not the page: a failed read only says so
    show_error(err, "cannot read the dictionary card")
    card = None
if card is not None and (caution := card.warning()) is not None:
    st.warning(f"Dictionary caution: {caution}.", icon="⚠️")

c1, c2 = st.columns(2)
threshold = c1.slider(
    "Node threshold (cumulative influence; lower keeps fewer, more important nodes)", 0.05, 1.0, 1.0, 0.05,
    key="node_threshold",
)  # fmt: skip
edge_share = c2.slider("Hide edges below this share of the largest |weight|", 0.0, 0.5, 0.0, 0.01, key="edge_share")
shown_nodes, shown_edges = filter_nodes(nodes, edges, max_influence=threshold)
max_abs = max((abs(e.weight) for e in shown_edges), default=0.0)
shown_edges = [e for e in shown_edges if abs(e.weight) >= edge_share * max_abs]
known = {n.index for n in nodes}
if st.session_state.get("pinned_prompt") != prompt_id:  # pins belong to one prompt
    st.session_state["pinned_prompt"] = prompt_id
    st.session_state["pinned_select"] = []
st.session_state["pinned_select"] = [i for i in st.session_state.get("pinned_select", []) if i in known]
pinned: list[int] = list(st.session_state["pinned_select"])

fig = figure(shown_nodes, shown_edges, tokens=tokens or None, highlight=pinned)
event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key="graph_chart")
st.caption(f"showing {len(shown_nodes)} of {len(nodes)} nodes and {len(shown_edges)} edges · click a node for detail")

by_index = {n.index: n for n in nodes}
clicked = selected_node(event)
options = [n.index for n in shown_nodes]
if clicked is not None and clicked in options:
    st.session_state["node_pick"] = clicked
elif "node_pick" not in st.session_state and (linked := st.query_params.get("node")):  # ?node=<node id> deep link
    st.session_state["node_pick"] = next((n.index for n in shown_nodes if n.node_id == linked), None)
if st.session_state.get("node_pick") not in options:
    st.session_state.pop("node_pick", None)


def pin(index: int) -> None:
    current = list(st.session_state.get("pinned_select", []))
    if index not in current:
        st.session_state["pinned_select"] = [*current, index]


picked = st.selectbox(
    "Node detail", options, key="node_pick", format_func=lambda i: f"{by_index[i].node_id} · {by_index[i].caption}"
)
if picked is not None:
    node = by_index[picked]
    left, right = st.columns([1, 2])
    with left:
        st.markdown(f"**{node.node_id}** ({node.kind})")
        st.json({"layer": node.layer, "position": node.position, "label": node.label, "value": node.value,
                 "influence": node.influence, "feature": node.feature_key})  # fmt: skip
        if node.feature_key:
            st.page_link("views/features.py", label="feature dashboard", query_params={"feature": node.feature_key})
            label_panel(s.driver, config(), node.feature_key, database=s.database, where="graph")
        st.button("Pin this node", key="pin_node", on_click=pin, args=(picked,))
    with right:
        incoming, outgoing = neighbours(edges, picked)
        rows = [{"direction": "in", "node": by_index[e.source].node_id, "label": by_index[e.source].caption,
                 "weight": e.weight} for e in incoming]  # fmt: skip
        rows += [{"direction": "out", "node": by_index[e.target].node_id, "label": by_index[e.target].caption,
                  "weight": e.weight} for e in outgoing]  # fmt: skip
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="node_edges")

st.subheader("Pinned subgraph")
pinned = st.multiselect(
    "Pinned nodes", [n.index for n in nodes], key="pinned_select",
    format_func=lambda i: f"{by_index[i].node_id} · {by_index[i].caption}",
)  # fmt: skip
if pinned:
    sub_nodes, sub_edges = subgraph(nodes, edges, pinned)
    st.plotly_chart(figure(sub_nodes, sub_edges, tokens=tokens or None, height=420), key="pinned_chart")
    features = [i for i in pinned if by_index[i].kind == "feature"]
    if features and st.button("Send pinned features to Interventions", key="pins_to_interventions"):
        st.session_state["iv_prompt_id"] = prompt_id
        st.session_state["iv_preset"] = [by_index[i].node_id for i in features]
        st.switch_page("views/interventions.py")
else:
    st.caption("Pin nodes (button above, or pick them here) to draw the subgraph they form.")
