"""Overview page: what the atlas holds (dictionaries and their models, runs, prompts by task, graph-score
distributions). Each transcoder dictionary is listed once, by its weights-based id, with every name and source
directory it was ingested from."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app.resources import show_error, store
from atlas.transcoders.card import DictionaryCard

CARD_SHOWN = ["fvu_mean", "l0_mean", "ce_delta", "replacement_score", "feature_nodes_kept", "training_tokens", "recipe"]

st.title("Atlas overview")
try:
    s = store()
    with st.spinner("Counting the store…"):
        overview = s.q.overview().single
        dictionaries = s.dictionaries()
        runs = s.runs()
        scores = s.graph_scores()
except Exception as err:
    show_error(err, "cannot read the store")
    st.stop()

cols = st.columns(5)
cols[0].metric("prompts", f"{overview.prompts:,}")
cols[1].metric("features", f"{overview.features:,}")
cols[2].metric("instance nodes", f"{overview.instance_nodes:,}")
cols[3].metric("attribution edges", f"{overview.edges:,}")
cols[4].metric("aggregate edges", f"{overview.agg_edges:,}")
if overview.prompts == 0:
    st.info("The store holds no prompt graphs yet: run `atlas ingest` (see the README) and reload.")

left, right = st.columns(2)
with left:
    st.subheader("Transcoder dictionaries")
    table = pd.DataFrame(
        dictionaries, columns=["dictionary", "kind", "models", "names", "sources", "identity", "prompts", *CARD_SHOWN]
    )
    for column in ("models", "names", "sources"):
        table[column] = table[column].map(", ".join)
    st.dataframe(table, hide_index=True, key="dictionaries")
    st.caption(
        "Dictionary cards: mean FVU and L0 per layer on held-out prompts, the next-token loss added when every MLP is "
        "replaced (CE Δ, nats), the mean replacement score of 16 evaluation graphs and the feature nodes those pruned "
        "graphs keep (`atlas transcoders card`; a dictionary whose graphs keep few features shows paths of tokens and "
        "errors)."
    )
    for row in dictionaries:
        if (caution := DictionaryCard.from_dict(row).warning()) is not None:
            st.warning(f"`{row['dictionary']}`: {caution}.", icon="⚠️")
    if (table["identity"] == "legacy").any():
        st.warning(
            "Some dictionaries are still keyed by their directory (stored before schema version 5); copies of one "
            "dictionary may be counted apart. Run `atlas db migrate --transcoders DIR...` to merge them."
        )
    st.subheader("Runs")
    st.dataframe(pd.DataFrame(runs), hide_index=True)
with right:
    st.subheader("Prompts by task")
    by_task = pd.DataFrame(overview.prompts_by_task, columns=["task", "prompts"])
    if not by_task.empty:
        st.plotly_chart(px.bar(by_task, x="task", y="prompts", height=300), key="tasks_chart")
    st.dataframe(by_task, hide_index=True)

st.subheader("Graph scores")
frame = pd.DataFrame(scores)
if frame.empty or frame[["replacement", "completeness"]].isna().all().all():
    st.caption("No graph scores stored yet.")
else:
    long = frame.melt(id_vars=["prompt", "task"], value_vars=["replacement", "completeness"], var_name="score")
    fig = px.histogram(long.dropna(), x="value", color="score", barmode="overlay", nbins=30, height=320)
    fig.update_layout(xaxis_title="score (pruned graph)", yaxis_title="prompts")
    st.plotly_chart(fig, key="scores_chart")
    summary = frame[["replacement", "completeness", "nodes", "edges"]].describe().loc[["mean", "min", "50%", "max"]]
    st.dataframe(summary, key="scores_summary")
