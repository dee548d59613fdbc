"""Edits page: choose a feature set, an operation (ablate, scale, steer to a value), target and control prompts;
run the SHIFT-style edit live (`atlas.validation.edits`); the effects table, summary and greedy generations."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.interventions import resolve_runtime
from app.resources import config, model_bundle, show_error, store
from app.shaping import InputError, parse_list
from app.validation import edit_rows, edit_summary, run_feature_edit

st.title("Edits")
cfg = config()
try:
    s = store(cfg)
    prompts = s.q.list_prompts(limit=1000).rows
except Exception as err:
    show_error(err, "cannot list prompts")
    st.stop()
if not prompts:
    st.info("The store holds no prompts yet.")
    st.stop()
by_id = {p.prompt_id: p for p in prompts}


def title(pid: str) -> str:
    p = by_id[pid]
    return f"{p.text!r} · {p.task or '-'} · {pid[:10]}"


st.markdown(
    "**Features** — one key per line (`transcoder/layer/index`, or `layer/index` of the target prompts' "
    "dictionary); the edit holds at every position of every prompt."
)
keys_text = st.text_area("Features", key="edit_features", height=90)
c1, c2 = st.columns(2)
operation = c1.selectbox("Operation", ("ablate", "scale", "set"), key="edit_op",
                         format_func=lambda o: "set (steer)" if o == "set" else o)  # fmt: skip
value = c2.number_input("Value (factor for scale; activation for set)", value=0.0, key="edit_value",
                        disabled=operation == "ablate")  # fmt: skip
targets = st.multiselect("Target prompts", list(by_id), key="edit_targets", format_func=title)
answer = st.text_input("Answer token of the targets (optional: accuracy and Δ logit need it)", key="edit_answer")
controls = st.multiselect("Control prompts", list(by_id), key="edit_controls", format_func=title)
n_gen = st.slider("Generations (target prompts)", 0, 5, 2, key="edit_generations")

if st.button("Run edit", type="primary", key="edit_run"):
    try:
        if not targets:
            raise InputError("choose at least one target prompt")
        first = by_id[targets[0]]
        transcoder_id = first.transcoder or ""
        keys = [k if k.count("/") >= 2 else f"{transcoder_id}/{k}" for k in parse_list(keys_text)]
        model_names, sources = s.runtime_labels(str(first.model), transcoder_id)
        model_name, transcoder_dir = resolve_runtime(
            first.model, first.transcoder, default_model=cfg.model, transcoders=cfg.transcoders,
            model_names=model_names, transcoder_sources=sources,
        )  # fmt: skip
        with st.spinner(f"Loading {model_name} and transcoders…"):
            bundle = model_bundle(model_name, str(transcoder_dir))
        with st.spinner("Running the edit…"):
            st.session_state["edit_result"] = run_feature_edit(
                bundle, keys, transcoder_id, operation, float(value),
                [(by_id[pid].text or "", answer if answer.strip() else None) for pid in targets],
                [by_id[pid].text or "" for pid in controls], n_generations=n_gen,
            )  # fmt: skip
    except InputError as err:
        st.session_state.pop("edit_result", None)
        st.error(str(err), icon=":material/pan_tool:")
    except Exception as err:
        st.session_state.pop("edit_result", None)
        show_error(err, "edit failed")

report = st.session_state.get("edit_result")
if report is not None:
    cols = st.columns(5)
    for col, (name, number) in zip(cols, edit_summary(report).items(), strict=True):
        col.metric(name, "—" if number != number else f"{number:.3f}")
    st.dataframe(pd.DataFrame(edit_rows(report)), hide_index=True, key="edit_table")
    if report.generations:
        st.markdown("**Greedy generations before / after**")
        st.dataframe(
            pd.DataFrame([{"prompt": p, "before": b, "after": a} for p, b, a in report.generations]),
            hide_index=True, key="edit_generations_table",
        )  # fmt: skip
    st.caption(f"mode: {report.mode}")
