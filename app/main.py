"""Entry point of the atlas app: `streamlit run app/main.py` (or `atlas app`). Builds the page navigation.

Each page is a script in `app/views/` (not `pages/`, which Streamlit would also list by file name); this script
runs before the selected page on every rerun, shows where the app reads from in the sidebar, and turns any uncaught
error of a page into a readable `st.error` (Streamlit's own control-flow exceptions derive from BaseException and
pass through). It holds no page logic.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ itself on sys.path; the repository root makes `app.*` importable too.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from app.config import ConfigError, load_config  # noqa: E402
from app.resources import show_error  # noqa: E402

PAGES_DIR = Path(__file__).resolve().parent / "views"

st.set_page_config(page_title="circuit-atlas", page_icon=":material/explore:", layout="wide")

PAGES = [
    st.Page(
        PAGES_DIR / "overview.py", title="Overview", icon=":material/dashboard:", url_path="overview", default=True
    ),
    st.Page(PAGES_DIR / "features.py", title="Features", icon=":material/search:", url_path="features"),
    st.Page(PAGES_DIR / "prompt_graph.py", title="Prompt graph", icon=":material/hub:", url_path="prompt_graph"),
    st.Page(PAGES_DIR / "paths.py", title="Paths across prompts", icon=":material/route:", url_path="paths"),
    st.Page(PAGES_DIR / "cypher.py", title="Cypher console", icon=":material/terminal:", url_path="cypher"),
    st.Page(PAGES_DIR / "interventions.py", title="Interventions", icon=":material/science:", url_path="interventions"),
    st.Page(PAGES_DIR / "global_circuits.py", title="Global circuits", icon=":material/lan:", url_path="global"),
    st.Page(PAGES_DIR / "compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
    st.Page(PAGES_DIR / "edits.py", title="Edits", icon=":material/tune:", url_path="edits"),
]

page = st.navigation(PAGES)

with st.sidebar:
    try:
        cfg = load_config()
        st.caption(
            f"Neo4j: `{cfg.neo4j_uri or 'managed local server'}` · stats: `{cfg.stats_db.name}` · model: `{cfg.model}`"
        )
    except ConfigError as err:
        st.error(f"configuration: {err}")

try:
    page.run()
except Exception as err:  # a page failed in a way it did not handle itself: say so, never a traceback
    show_error(err, page.title)
