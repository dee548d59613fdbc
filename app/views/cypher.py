"""Cypher console: ad hoc read-only queries (checked, EXPLAIN-classified, READ transaction, hard timeout, row and
byte caps; see `app.cypher`); results as a table, and as a graph when nodes and relationships come back; example
queries one click away."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.cypher import CypherError, CypherRejected, run_read_query
from app.layout import figure
from app.resources import config, console_driver, driver, show_error
from app.shaping import result_graph_drawable

EXAMPLES: dict[str, str] = {
    "Prompts by task": "MATCH (p:Prompt) RETURN coalesce(p.task, '(none)') AS task, count(*) AS prompts "
    "ORDER BY prompts DESC",
    "Most active features": "MATCH (f:Feature)<-[:OF]-(a:FeatureActivation)\n"
    "RETURN f.key AS feature, count(a) AS activations, max(a.activation) AS max_activation\n"
    "ORDER BY activations DESC LIMIT 25",
    "Strongest edges into logits": "MATCH (a:FeatureActivation)-[e:EDGE]->(l:LogitTarget)\n"
    "RETURN a.prompt_id AS prompt, a.node_id AS feature, l.label AS logit, e.weight AS weight\n"
    "ORDER BY abs(e.weight) DESC LIMIT 25",
    "Paths of 2 edges into a logit (graph)": "MATCH p = (a:FeatureActivation)-[:EDGE]->(:FeatureActivation)"
    "-[:EDGE]->(:LogitTarget)\nRETURN p LIMIT 20",
    "Schema": "CALL db.schema.visualization()",
}

st.title("Cypher console")
cfg = config()
st.caption(
    f"Read-only: write and admin clauses are refused, the server plans the query first and it runs in a READ "
    f"transaction; timeout {cfg.query_timeout_s:g} s, at most {cfg.row_cap:,} rows and {cfg.console_max_mb:g} MB."
)


def load_example(text: str) -> None:
    st.session_state["cypher"] = text


cols = st.columns(len(EXAMPLES))
for i, (name, text) in enumerate(EXAMPLES.items()):
    cols[i].button(name, key=f"example_{i}", on_click=load_example, args=(text,), use_container_width=True)

query = st.text_area("Query", key="cypher", height=140, placeholder="MATCH (p:Prompt) RETURN p.text LIMIT 10")
if st.button("Run", type="primary", key="run_cypher"):
    try:
        with st.spinner("Running…"):
            st.session_state["cypher_result"] = run_read_query(
                console_driver(cfg),
                query,
                database=cfg.neo4j_database,
                timeout_s=cfg.query_timeout_s,
                row_cap=cfg.row_cap,
                max_bytes=int(cfg.console_max_mb * 2**20),
                max_value_bytes=int(cfg.console_max_mb * 2**20 / 4),
                admin_driver=driver(cfg),
            )
    except CypherRejected as err:
        st.session_state.pop("cypher_result", None)
        st.error(f"Rejected: {err}", icon=":material/block:")
    except CypherError as err:
        st.session_state.pop("cypher_result", None)
        st.error(f"Query failed: {err}", icon=":material/error:")
    except Exception as err:
        st.session_state.pop("cypher_result", None)
        show_error(err, "query failed")

result = st.session_state.get("cypher_result")
if result is not None:
    st.caption(f"{len(result.rows)} row(s) in {result.seconds * 1000:.0f} ms")
    if result.truncated:
        st.warning(result.truncated_reason[:1].upper() + result.truncated_reason[1:] + ".")
    frame = pd.DataFrame(result.rows, columns=result.columns)
    st.dataframe(frame.map(lambda v: v if isinstance(v, int | float | str | bool) or v is None else str(v)),
                 hide_index=True, key="cypher_table")  # fmt: skip
    if result.graph.has_relationships:
        nodes, edges = result_graph_drawable(result.graph)
        st.subheader("As a graph")
        st.plotly_chart(figure(nodes, edges, height=480), key="cypher_graph")
