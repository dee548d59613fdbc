"""Paths across prompts: from source features (picked via search, or every feature active on an input token) to
target logit tokens; hop limit and minimum |weight|; ranked table, per-prompt drill-down and a merged graph of all
paths found. Example queries fill the form in one click; the first is the project's own question, "paths from the
Dallas feature to capital logits across prompts" (the state-capital set that `atlas demo` ingests)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.layout import figure
from app.resources import show_error, store
from app.shaping import merged_path_graph, parse_list, path_rows, per_prompt_summary
from app.store import path_graph

# name -> (input token, source features (one per line), target tokens, hops, min |weight|)
EXAMPLES: dict[str, tuple[str, str, str, int, float]] = {
    "Dallas → state capitals": (
        " Dallas",
        "",
        " Austin, Springfield, Sacramento, Albany, Columbus, Nashville, Phoenix, Atlanta",
        3,
        0.0,
    ),
    "France → Paris": (" France", "", " Paris", 3, 0.0),
    "Mary → Mary (IOI)": (" Mary", "", " Mary", 2, 0.0),
}


def load_example(name: str) -> None:
    token, sources, targets, hops, min_w = EXAMPLES[name]
    st.session_state.update(path_token=token, path_sources=sources, path_targets=targets, path_hops=hops,
                            path_min_w=min_w, path_source_search="")  # fmt: skip


st.title("Paths across prompts")
try:
    s = store()
except Exception as err:
    show_error(err, "cannot reach the store")
    st.stop()

st.caption("Examples (fill the form; then press Find paths)")
cols = st.columns(len(EXAMPLES))
for i, name in enumerate(EXAMPLES):
    cols[i].button(name, key=f"path_example_{i}", on_click=load_example, args=(name,), use_container_width=True)

st.markdown(
    "**1. Source features** — every feature active on an input token (e.g. ` Dallas`), and/or features picked by "
    "search or typed as keys, labels or top tokens (with a token too: only those features, on that token)."
)
at_token = st.text_input("Features active on the input token", key="path_token", placeholder=" Dallas")
search = st.text_input("Search features", key="path_source_search")
picked: list[str] = []
if search.strip():
    try:
        found = s.q.find_features(search.strip(), limit=50).rows
    except Exception as err:
        show_error(err, "search failed")
        found = ()
    picked = st.multiselect(
        "Matching features", [m.key for m in found], default=[m.key for m in found[:3]], key="path_source_pick",
    )  # fmt: skip
typed = st.text_area("More source features (one per line)", key="path_sources", height=68)
st.markdown("**2. Target tokens** — logit tokens, comma or line separated (surrounding spaces are ignored).")
targets_text = st.text_area("Target tokens", key="path_targets", height=68, placeholder=" Paris, London, Berlin")
c1, c2, c3 = st.columns(3)
hops = c1.number_input("Hop limit", 1, 6, 3, key="path_hops")
min_w = c2.number_input("Min |weight| per edge", 0.0, value=0.0, step=0.01, format="%.4f", key="path_min_w")
limit = c3.number_input("Max paths", 1, 2000, 100, key="path_limit")

if st.button("Find paths", type="primary", key="run_paths"):
    sources = list(dict.fromkeys([*picked, *parse_list(typed)]))
    targets = parse_list(targets_text)
    token = at_token if at_token.strip() else None
    if not sources and token is None:
        st.error("Give an input token, or pick or type at least one source feature.")
    elif not targets:
        st.error("Give at least one target token.")
    else:
        try:
            with st.spinner("Searching paths across prompts…"):
                st.session_state["path_result"] = s.q.paths_to_logits(
                    sources or None, targets, max_hops=int(hops), min_abs_weight=float(min_w), limit=int(limit),
                    at_token=token,
                )  # fmt: skip
        except Exception as err:
            st.session_state.pop("path_result", None)
            show_error(err, "path query failed")

result = st.session_state.get("path_result")
if result is not None:
    paths = list(result.rows)
    for note in result.notes:
        st.caption(note)
    st.caption(f"{len(paths)} path(s) in {result.elapsed_ms:.0f} ms")
    with st.expander("Cypher"):
        st.code(result.cypher, language="cypher")
    if not paths:
        st.warning("No path within the hop limit and weight threshold. Try more hops or a smaller min |weight|.")
    else:
        st.subheader("Ranked paths")
        best = paths[0]
        st.markdown(
            f"Strongest: `{' → '.join(n.node_id for n in best.nodes)}` in prompt `{best.prompt_id}` "
            f"(strength {best.strength:+.4g}, {best.hops} hop(s))"
        )
        st.dataframe(pd.DataFrame(path_rows(paths)), hide_index=True, key="path_table")
        st.subheader("Per prompt")
        summary = per_prompt_summary(paths)
        st.dataframe(pd.DataFrame(summary), hide_index=True, key="path_prompts")
        drill = st.selectbox("Drill down into a prompt", [r["prompt"] for r in summary], key="path_drill")
        mine = [p for p in paths if p.prompt_id == drill]
        nodes: dict[int, object] = {}
        edge_map = {}
        for path in mine:
            ns, es = path_graph(path)
            nodes.update({n.index: n for n in ns})
            edge_map.update({(e.source, e.target): e for e in es})
        st.plotly_chart(
            figure(list(nodes.values()), list(edge_map.values()), height=420),  # type: ignore[arg-type]
            key="path_drill_chart",
        )
        st.page_link("views/prompt_graph.py", label="open this prompt's full graph", query_params={"prompt": drill})
        on_path = list(dict.fromkeys(n.node_id for p in mine for n in p.nodes if n.kind == "feature"))
        if on_path and st.button("Send this prompt's path features to Interventions", key="paths_to_interventions"):
            st.session_state["iv_prompt_id"] = drill
            st.session_state["iv_preset"] = on_path
            st.switch_page("views/interventions.py")
        st.subheader("Merged view (all prompts)")
        merged_nodes, merged_edges = merged_path_graph(paths)
        st.plotly_chart(figure(merged_nodes, merged_edges, height=460), key="path_merged_chart")

    if not paths:
        st.stop()
    st.subheader("Validate the circuit on these paths")
    st.caption(
        "The first features along the strongest paths, tested by intervention on the prompts the paths come from: "
        "necessity (ablate them), sufficiency (ablate everything else) against random same-size feature sets "
        "matched by layer and activation (`atlas validate --from-paths`)."
    )
    v1, v2, v3 = st.columns(3)
    top_k = v1.number_input("Circuit size (features)", 1, 50, 5, key="val_top_k")
    target_texts = list(dict.fromkeys(p.target_text for p in paths))
    val_target = v2.selectbox("Target logit", target_texts, key="val_target", format_func=repr)
    n_null = v3.number_input("Null sets per prompt", 5, 200, 20, key="val_n_null")
    if st.button("Validate", key="run_validation"):
        from app.config import load_config
        from app.interventions import resolve_runtime
        from app.resources import model_bundle
        from app.shaping import InputError
        from app.validation import circuit_from_paths, run_circuit_validation, store_validation

        try:
            cfg = load_config()
            keys, prompt_ids = circuit_from_paths([p for p in paths if p.target_text == val_target], int(top_k))
            infos = [s.prompt(pid) for pid in prompt_ids]
            prompts_found = [i for i in infos if i is not None]
            first = prompts_found[0]
            model_names, sources = s.runtime_labels(first.model, first.transcoder)
            model_name, transcoder_dir = resolve_runtime(
                first.model, first.transcoder, default_model=cfg.model, transcoders=cfg.transcoders,
                model_names=model_names, transcoder_sources=sources,
            )  # fmt: skip
            with st.spinner(f"Loading {model_name} and transcoders…"):
                bundle = model_bundle(model_name, str(transcoder_dir))
            bar = st.progress(0.0, text="validating…")
            report = run_circuit_validation(
                bundle, keys, first.transcoder, [i.text for i in prompts_found], [i.id for i in prompts_found],
                str(val_target), n_null=int(n_null),
                progress=lambda i, n: bar.progress(i / n, text=f"validated {i}/{n} prompt(s)"),
            )  # fmt: skip
            stored_id = None
            if not cfg.read_only:
                stored_id = store_validation(s.driver, s.database, cfg.stats_db.with_name("validations.duckdb"),
                                             report, first.transcoder, first.model)  # fmt: skip
            st.session_state["val_result"] = (report, keys, stored_id)
        except InputError as err:
            st.session_state.pop("val_result", None)
            st.error(str(err), icon=":material/pan_tool:")
        except Exception as err:
            st.session_state.pop("val_result", None)
            show_error(err, "validation failed")

    validated = st.session_state.get("val_result")
    if validated is not None:
        import plotly.express as px

        from app.validation import null_rows, prompt_rows, summary_rows

        report, keys, stored_id = validated
        st.markdown("Circuit: " + ", ".join(f"`{k}`" for k in keys))
        a, b, c = st.columns(3)
        a.metric("beats its nulls on", f"{report.pass_fraction:.0%} of {len(report.prompts)} prompt(s)")
        b.metric("mean necessity", f"{report.summary('necessity_zero').mean:+.3f}")
        c.metric("mean sufficiency", f"{report.summary('sufficiency_frozen_errors').mean:+.3f}")
        points = pd.DataFrame(null_rows(report))
        fig = px.strip(points, x="prompt", y="value", color="set", facet_row="measure", height=520,
                       color_discrete_map={"circuit": "#dc2626", "null": "#9ca3af"})  # fmt: skip
        fig.update_yaxes(matches=None)
        st.plotly_chart(fig, key="val_null_chart")
        pooled = px.box(points, x="measure", y="value", color="set", points="all", height=320,
                        color_discrete_map={"circuit": "#dc2626", "null": "#9ca3af"})  # fmt: skip
        st.plotly_chart(pooled, key="val_pooled_chart")
        st.dataframe(pd.DataFrame(prompt_rows(report)), hide_index=True, key="val_prompts")
        st.dataframe(pd.DataFrame(summary_rows(report)), hide_index=True, key="val_summary")
        st.caption(f"mode: {report.mode}" + (f" · stored as `{stored_id}`" if stored_id else " · not stored"))
