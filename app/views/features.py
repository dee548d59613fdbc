"""Features page: search features by key, label or top token; one feature's dashboard (examples, histogram,
density, logit effects, aggregate up/downstream partners with links, prompts where it matters)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app.label_edits import label_panel
from app.resources import config, show_error, store
from app.shaping import highlighted_tokens_html, histogram_rows
from atlas.storage.feature_stats import bin_bounds

st.title("Features")
try:
    s = store()
except Exception as err:
    show_error(err, "cannot reach the store")
    st.stop()

initial = st.query_params.get("feature", "")
text = st.text_input(
    "Search by feature key (transcoder/layer/index or layer/index), label, or top token", value=initial,
    key="feature_search",
)  # fmt: skip
key: str | None = None
if text.strip():
    try:
        with st.spinner("Searching…"):
            found = s.q.find_features(text.strip(), limit=50)
    except Exception as err:
        show_error(err, "search failed")
        st.stop()
    if not found.rows:
        st.warning(f"No feature matches {text.strip()!r} (by key, label or top token).")
        st.stop()
    table = pd.DataFrame(
        [{"key": m.key, "layer": m.layer, "index": m.index, "label": m.label, "matched on": m.matched_on,
          "detail": m.detail, "activations": m.n_activations} for m in found.rows]
    )  # fmt: skip
    st.caption(f"{len(found.rows)} feature(s) found in {found.elapsed_ms:.0f} ms")
    st.dataframe(table, hide_index=True, key="feature_results")
    keys = [m.key for m in found.rows]
    key = st.selectbox("Feature", keys, index=keys.index(initial) if initial in keys else 0, key="feature_pick")
else:
    st.info("Type a feature key, a label, or a token (a feature's top logit effect or top activating token).")
    st.stop()

assert key is not None
st.header(f"Feature `{key}`")
label_panel(s.driver, config(), key, database=s.database, where="features")
try:
    with st.spinner("Loading statistics…"):
        stats = s.feature_stats(key)
except Exception as err:
    show_error(err, "feature statistics unavailable")
    stats = {"summary": None, "histogram": [], "examples": [], "logit_effects": []}

summary = stats["summary"]
cols = st.columns(4)
if summary:
    cols[0].metric("density (active tokens)", f"{summary['frequency']:.4%}")
    cols[1].metric("mean when active", f"{summary['mean_active'] or 0:.3g}")
    cols[2].metric("max activation", f"{summary['max_activation']:.3g}")
    cols[3].metric("tokens seen", f"{summary['n_tokens']:,}")
else:
    st.caption("No activation statistics for this feature in the DuckDB store.")

left, right = st.columns([3, 2])
with left:
    st.subheader("Top activating examples")
    examples = stats["examples"]
    if examples:
        top = max(float(e["activation"]) for e in examples)
        for e in examples[:12]:
            focus = int(e["position"]) - int(e["context_start"])
            body = highlighted_tokens_html(
                list(e["context_tokens"]), [float(v) for v in e["context_activations"]], max_value=top, focus=focus
            )
            st.html(f"<div style='margin:2px 0'><b>{float(e['activation']):.3g}</b> &nbsp; {body}</div>")
    else:
        st.caption("No examples stored.")
with right:
    st.subheader("Activation histogram")
    bins = histogram_rows(stats["histogram"], bin_bounds)
    if bins:
        fig = px.bar(pd.DataFrame(bins), x="label", y="count", height=260)
        fig.update_layout(xaxis_title="activation (log bins)", yaxis_title="tokens", margin={"t": 10})
        st.plotly_chart(fig, key="histogram_chart")
    else:
        st.caption("No histogram stored.")
    st.subheader("Logit effects")
    effects = pd.DataFrame(stats["logit_effects"])
    if not effects.empty:
        pos, neg = st.columns(2)
        pos.dataframe(effects[effects["sign"] == "positive"][["token", "effect"]], hide_index=True, key="logit_pos")
        neg.dataframe(effects[effects["sign"] == "negative"][["token", "effect"]], hide_index=True, key="logit_neg")
    else:
        st.caption("No logit effects stored.")


def partner_links(rows: list, title: str, direction: str) -> None:
    st.subheader(title)
    if not rows:
        st.caption(f"No aggregate {direction}stream partners stored.")
        return
    st.dataframe(
        pd.DataFrame(
            [{"kind": n.kind, "label": n.text, "partner": n.key or n.text, "sum weight": n.weight,
              "sum |weight|": n.abs_weight, "prompts": n.n_prompts, "max |weight|": n.max_abs_weight} for n in rows]
        ),
        hide_index=True,
        key=f"partners_{direction}",
    )  # fmt: skip
    for n in rows[:8]:
        if n.kind == "feature" and n.key:
            name = f"{n.text} ({n.key})" if n.text else n.key
            st.page_link("views/features.py", label=f"→ {name} ({n.weight:+.3g})", query_params={"feature": n.key})


up_col, down_col = st.columns(2)
try:
    with st.spinner("Reading neighbours…"):
        upstream = list(s.q.neighbourhood(key, "up", limit=15).rows)
        downstream = list(s.q.neighbourhood(key, "down", limit=15).rows)
        mattering = s.q.prompts_where_feature_matters(key, by="influence", limit=20).rows
except Exception as err:
    show_error(err, "neighbourhood query failed")
    st.stop()
with up_col:
    partner_links(upstream, "Strongest upstream (aggregate)", "up")
with down_col:
    partner_links(downstream, "Strongest downstream (aggregate)", "down")

st.subheader("Prompts where it matters")
if mattering:
    st.dataframe(
        pd.DataFrame(
            [{"prompt": m.prompt_id, "text": m.text, "task": m.task, "positions": list(m.positions),
              "max activation": m.max_activation, "best influence": m.best_influence,
              "sum |out weight|": m.out_abs_weight} for m in mattering]
        ),
        hide_index=True,
        key="mattering",
    )  # fmt: skip
    for m in mattering[:5]:
        st.page_link("views/prompt_graph.py", label=f"graph of {m.text!r}", query_params={"prompt": m.prompt_id})
else:
    st.caption("The feature is not active in any stored prompt graph.")

st.subheader("Measured ablation effects")
try:
    from app.validation import feature_edits, feature_validations

    tested = feature_validations(s.driver, s.database, key)
    edited = feature_edits(s.driver, s.database, key)
except Exception as err:
    show_error(err, "stored validations unavailable")
    tested, edited = [], []
if tested:
    st.caption(
        "Stored validations of circuits holding this feature: the drop of the target when the circuit is ablated "
        "(necessity), the share recovered by the circuit alone (sufficiency), and how often it beat its null sets."
    )
    st.dataframe(pd.DataFrame(tested), hide_index=True, key="feature_validations")
else:
    st.caption(
        "No stored validation tests this feature (validate a circuit on the paths page or with `atlas validate`)."
    )
if edited:
    st.caption("Stored edits of feature sets holding this feature (`atlas edit`).")
    st.dataframe(pd.DataFrame(edited), hide_index=True, key="feature_edits")
