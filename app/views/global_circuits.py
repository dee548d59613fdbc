"""Global circuits page: one feature's strongest global inputs and outputs (virtual weight, ERA, TWERA beside the
empirical mean attribution of the stored prompts) and the motifs through it; the corpus's motifs by support; the
prompt clusters with their prompts. Reads only (DuckDB global weights, Neo4j motifs / clusters / aggregate layer).
Motifs and clusters are per dictionary: the page shows one, picked in the selector (default: the typed feature's)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st
from neo4j import RoutingControl

from app.resources import show_error, store
from app.store import parse_feature_key
from atlas.storage.clusters import cluster_run, list_clusters
from atlas.storage.global_weights import read_global_weights
from atlas.storage.motifs import list_motifs, motif_run

st.title("Global circuits")
try:
    s = store()
except Exception as err:
    show_error(err, "cannot reach the store")
    st.stop()


def short(key: str) -> str:
    parts = key.split("/")
    return "/".join(parts[-2:]) if len(parts) >= 3 else key


def token_texts(keys: set[str]) -> dict[str, str]:
    """Token key → its text in quotes (motif ends and token chains are Token keys "model/id")."""
    records = s.driver.execute_query(
        "UNWIND $keys AS k MATCH (t:Token {key: k}) RETURN t.key AS k, t.text AS text", keys=sorted(keys),
        database_=s.database, routing_=RoutingControl.READ,
    ).records  # fmt: skip
    return {r["k"]: repr(r["text"]) for r in records}


def motif_frame(rows: list[dict]) -> pd.DataFrame:
    texts = token_texts({n for r in rows for n in r["nodes"]})
    return pd.DataFrame(
        [{"kind": r["kind"], "path": " → ".join(texts.get(n, short(n)) for n in r["nodes"]), "support": r["support"],
          "mean strength": r["mean"], "total": r["total"], "alternatives": r["alternatives"]} for r in rows]
    )  # fmt: skip


def scoped_dictionaries() -> list[str]:
    """Dictionaries with mined motifs or built clusters."""
    records = s.driver.execute_query(
        "MATCH (r) WHERE (r:MotifRun OR r:ClusterRun) AND r.transcoder IS NOT NULL RETURN DISTINCT r.transcoder AS t "
        "ORDER BY t",
        database_=s.database, routing_=RoutingControl.READ,
    ).records  # fmt: skip
    return [r["t"] for r in records]


try:
    dictionaries = scoped_dictionaries()
except Exception as err:
    show_error(err, "motifs and clusters unavailable")
    dictionaries = []
# default: the typed feature's dictionary (no widget key, so the pick follows a newly typed feature)
typed = str(st.session_state.get("global_feature", st.query_params.get("feature", ""))).strip()
shown = typed.split("/", 1)[0] if typed else st.query_params.get("dictionary", "")
dictionary = (
    st.selectbox("Dictionary (motifs and clusters)", dictionaries,
                 index=dictionaries.index(shown) if shown in dictionaries else 0)
    if len(dictionaries) > 1 else (dictionaries[0] if dictionaries else None)
)  # fmt: skip

feature_tab, motif_tab, cluster_tab = st.tabs(["Feature", "Motifs by support", "Prompt clusters"])

with feature_tab:
    key = st.text_input("Feature key (transcoder/layer/index)", value=st.query_params.get("feature", ""),
                        key="global_feature").strip()  # fmt: skip
    if key:
        try:
            transcoder, layer, index = parse_feature_key(key)
            rows = read_global_weights(s.stats_db, transcoder, layer, index)
            empirical = {}
            for direction in ("up", "down"):
                for n in s.q.neighbourhood(key, direction, limit=200).rows:
                    if n.kind == "feature" and n.key and n.n_prompts:
                        empirical[(direction, n.key)] = n.weight / n.n_prompts
        except Exception as err:
            show_error(err, "no global weights for this feature")
            rows = []
        for relation, title, direction in (("feature_in", "Strongest global inputs", "up"),
                                           ("feature_out", "Strongest global outputs", "down")):  # fmt: skip
            part = [r for r in rows if r["relation"] == relation][:12]
            st.subheader(title)
            if not part:
                st.caption("None stored.")
                continue
            table = pd.DataFrame(
                [{"partner": f"{transcoder}/{r['partner_layer']}/{r['partner']}", "v": r["v"], "era": r["era"],
                  "twera": r["twera"],
                  "empirical mean attribution": empirical.get((direction, f"{transcoder}/{r['partner_layer']}/"
                                                                          f"{r['partner']}"))}
                 for r in part]
            )  # fmt: skip
            st.dataframe(table, hide_index=True, key=f"global_{relation}")
            long = table.assign(partner=table["partner"].map(short)).melt(
                id_vars="partner", var_name="measure", value_name="value"
            )
            long = long.dropna(subset=["value"])
            fig = px.bar(long, x="partner", y="value", facet_row="measure", height=560, color="measure")
            fig.update_yaxes(matches=None, title_text="")
            fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
            fig.update_layout(showlegend=False, margin={"t": 20})
            st.plotly_chart(fig, key=f"global_chart_{relation}")
        st.subheader("Motifs through this feature")
        try:
            mined = motif_run(s.driver, s.database, transcoder) is not None
            through = list_motifs(s.driver, s.database, transcoder, feature=key, limit=25) if mined else []
        except Exception as err:
            show_error(err, "motifs unavailable")
            through = []
        if through:
            st.dataframe(motif_frame(through), hide_index=True, key="feature_motifs")
        else:
            st.caption("No stored motif passes through this feature (or no motifs mined: `atlas global motifs mine`).")
    else:
        st.info("Type a feature key to see its global weights, TWERA and empirical attribution side by side.")

with motif_tab:
    try:
        run = motif_run(s.driver, s.database, dictionary) if dictionary else None
        kind = st.radio("Kind", ["logit", "token"], horizontal=True, key="motif_kind")
        top = (
            list_motifs(s.driver, s.database, dictionary, kind=kind, order="support", limit=50)
            if run and dictionary
            else []
        )
    except Exception as err:
        show_error(err, "motifs unavailable")
        run, top = None, []
    if not run:
        st.caption("No motifs mined yet: `atlas global motifs mine`.")
    else:
        st.caption(f"{dictionary}: {run.get('n_prompts', '?')} prompts mined · paths ≥ {run['min_strength']} of a"
                   f" prompt's output · up to {run['max_features']} features")  # fmt: skip
        frame = motif_frame(top)
        st.dataframe(frame, hide_index=True, key="corpus_motifs")
        if not frame.empty:
            fig = px.bar(frame.head(20), x="support", y="path", orientation="h", color="mean strength", height=520)
            fig.update_layout(yaxis={"autorange": "reversed"}, margin={"t": 20})
            st.plotly_chart(fig, key="motif_chart")

with cluster_tab:
    try:
        crun = cluster_run(s.driver, s.database, dictionary) if dictionary else None
        clusters = list_clusters(s.driver, s.database, dictionary, limit=50, prompts=20) if crun and dictionary else []
    except Exception as err:
        show_error(err, "clusters unavailable")
        crun, clusters = None, []
    if crun is None:
        st.caption("No clusters stored yet: `atlas global clusters build`.")
    else:
        st.caption(f"{dictionary}: {crun['n_clusters']} clusters of {crun['n_prompts']} prompts"
                   f" ({crun['n_unclustered']} unclustered: sharing their circuitry with too few others) · DBSCAN eps"
                   f" {crun['eps']}"
                   " (cosine distance)")  # fmt: skip
    if clusters:
        st.dataframe(
            pd.DataFrame([{"cluster": c["key"], "size": c["size"], "cohesion": c["cohesion"],
                           "tasks": ", ".join(t for t in c["tasks"] if t),
                           "features": ", ".join(short(f) for f in c["features"][:5])} for c in clusters]),
            hide_index=True, key="clusters",
        )  # fmt: skip
        for c in clusters:
            with st.expander(f"{c['key']}: {c['size']} prompts"):
                st.dataframe(pd.DataFrame({"prompt": c["prompt_ids"], "text": c["texts"]}), hide_index=True,
                             key=f"cluster_prompts_{c['key']}")  # fmt: skip
                st.caption("characteristic motifs: " + ("; ".join(c["motifs"][:5]) or "none"))
