"""Interventions page: pick a prompt and features (from its graph, a path result, or search), an operation,
positions and a mode; run live on the model; next-token probabilities before/after and continuations."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app.interventions import (
    OPERATIONS,
    build_interventions,
    pick_from_node_id,
    pick_from_reference,
    resolve_runtime,
    run_intervention,
)
from app.resources import config, model_bundle, show_error, store
from app.shaping import InputError, parse_list, parse_positions
from app.store import drawable
from atlas.attribution.interventions import MODES

st.title("Interventions")
cfg = config()
try:
    s = store(cfg)
    prompts = s.q.list_prompts(limit=1000).rows
except Exception as err:
    show_error(err, "cannot list prompts")
    st.stop()
if not prompts:
    st.info("The store holds no prompt graphs yet.")
    st.stop()

ids = [p.prompt_id for p in prompts]
by_id = {p.prompt_id: p for p in prompts}
wanted = st.session_state.get("iv_prompt_id") or st.query_params.get("prompt", "")
prompt_id = st.selectbox(
    "Prompt", ids, index=ids.index(wanted) if wanted in ids else 0, key="iv_prompt",
    format_func=lambda pid: f"{by_id[pid].text!r} · {by_id[pid].task or '-'} · {pid[:10]}",
)  # fmt: skip
try:
    graph = s.q.prompt_graph(prompt_id).single
except Exception as err:
    show_error(err, "cannot load the prompt graph")
    st.stop()
nodes, _ = drawable(graph)
props = graph.prompt
features = sorted((n for n in nodes if n.kind == "feature"), key=lambda n: (n.influence or 9.0, n.index))
labels = {
    n.node_id: f"L{n.layer} #{n.node_id.split('_')[1]} @{n.position} (act {n.value or 0:.3g})"
    + (f" · {n.label}" if n.label not in (n.feature_key, n.node_id) else "")
    for n in features
}
preset = [x for x in st.session_state.pop("iv_preset", []) if x in labels]
if preset:
    st.session_state["iv_features"] = preset

st.markdown("**Features** — from this prompt's graph (most influential first), or by reference.")
chosen = st.multiselect(
    "Feature activations in the graph", list(labels), key="iv_features", format_func=lambda x: labels[x]
)
extra = st.text_input(
    "More features (layer/index, transcoder/layer/index or L3#17, e.g. from a search; need positions below)",
    key="iv_extra",
)
c1, c2, c3, c4 = st.columns(4)
operation = c1.selectbox("Operation", OPERATIONS, key="iv_op")
value = c2.number_input(
    "Value (factor for scale; activation for set; amount for add)", value=0.0 if operation != "scale" else 2.0,
    key=f"iv_value_{operation}", disabled=operation == "ablate",
)  # fmt: skip
positions_text = c3.text_input("Positions (empty: each feature's own; 'all', '3:', '1, 4-6')", key="iv_positions")
mode = c4.selectbox("Mode", MODES, key="iv_mode", format_func=lambda m: m.replace("_", " "))
max_new = st.slider("Continuation length (tokens)", 0, 32, 12, key="iv_new_tokens")

if st.button("Run intervention", type="primary", key="iv_run"):
    try:
        tokens = [int(t) for t in (props.get("tokens") or [])]
        picks = [pick_from_node_id(x) for x in chosen] + [pick_from_reference(x) for x in parse_list(extra)]
        n_pos = len(tokens) if tokens else max((n.position for n in nodes), default=0) + 1
        positions = parse_positions(positions_text, n_pos) if positions_text.strip() else None
        edits = build_interventions(picks, positions, operation, float(value))
        model_names, sources = store().runtime_labels(str(props.get("model")), str(props.get("transcoder")))
        model_name, transcoder_dir = resolve_runtime(
            props.get("model"), props.get("transcoder"), default_model=cfg.model, transcoders=cfg.transcoders,
            model_names=model_names, transcoder_sources=sources,
        )  # fmt: skip
        with st.spinner(f"Loading {model_name} and transcoders…"):
            bundle = model_bundle(model_name, str(transcoder_dir))
        if not tokens:
            tokens = bundle.model.tokenize(str(props.get("text", "")))[0].tolist()
        with st.spinner(f"Running {len(edits)} edit(s) in {mode.replace('_', ' ')} mode…"):
            st.session_state["iv_result"] = run_intervention(bundle, tokens, edits, mode=mode, max_new_tokens=max_new)
    except InputError as err:
        st.session_state.pop("iv_result", None)
        st.error(str(err), icon=":material/pan_tool:")
    except Exception as err:
        st.session_state.pop("iv_result", None)
        show_error(err, "intervention failed")

outcome = st.session_state.get("iv_result")
if outcome is not None:
    m1, m2, m3 = st.columns(3)
    m1.metric("edits", outcome.n_edits)
    m2.metric("max |Δ probability|", f"{outcome.max_abs_delta:.4f}")
    m3.metric("max |Δ logit|", f"{outcome.logit_shift:.4f}")
    frame = pd.DataFrame(
        [{"token": repr(c.token), "before": c.before, "after": c.after, "delta": c.delta} for c in outcome.changes]
    )
    fig = go.Figure(
        [
            go.Bar(name="before", x=frame["token"], y=frame["before"], marker_color="#9ca3af"),
            go.Bar(name="after", x=frame["token"], y=frame["after"], marker_color="#2563eb"),
        ]
    )
    fig.update_layout(barmode="group", height=340, yaxis_title="next-token probability", margin={"t": 20})
    st.plotly_chart(fig, key="iv_chart")
    st.dataframe(frame, hide_index=True, key="iv_table")
    a, b = st.columns(2)
    a.markdown("**Continuation without the intervention**")
    a.code(outcome.clean_continuation or "∅", language=None, wrap_lines=True)
    b.markdown("**Continuation with the intervention**")
    b.code(outcome.edited_continuation or "∅", language=None, wrap_lines=True)
    st.caption(f"ran in {outcome.seconds:.2f} s")
