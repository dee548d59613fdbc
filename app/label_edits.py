"""The app's one write: setting, editing or clearing a feature's user label and note.

`save_label` refuses when the app runs read-only (`AppConfig.read_only`: `atlas app --read-only`,
`ATLAS_READ_ONLY=1`), else writes through `atlas.storage.labels.write_user_labels` (one parameterised statement in
one transaction; validation and unknown features raise `LabelError` with nothing written), with the author of the
app's settings. `label_panel` is the Streamlit widget the Features page and the prompt graph's node detail share:
the shown label (user, else automatic), who wrote it and when, the history, and, unless read-only, the edit fields
(plus an "Explain" button when an OpenAI-compatible explainer is configured, `atlas.storage.explainer`).
Nothing here runs user text as Cypher; the console stays read-only whatever this module does.
"""

from __future__ import annotations

import os

from neo4j import Driver

from app.config import AppConfig
from atlas.storage.explainer import ExplainerConfig, ExplainerError, explain_features
from atlas.storage.feature_stats import FeatureStatsStore
from atlas.storage.labels import (
    MAX_LABEL_CHARS,
    MAX_NOTE_CHARS,
    FeatureLabel,
    LabelEdit,
    feature_label,
    label_history,
    write_user_labels,
)


def _explainer() -> ExplainerConfig | None:
    """The explainer of the environment (`ATLAS_EXPLAINER_URL`, `ATLAS_EXPLAINER_MODEL`), None when off or unusable."""
    try:
        return ExplainerConfig.from_env(os.environ)
    except ExplainerError:
        return None


class ReadOnlyError(RuntimeError):
    """A label edit in an app started read-only."""


def save_label(
    driver: Driver, cfg: AppConfig, key: str, label: str | None, note: str | None, *, database: str
) -> FeatureLabel:
    """Write a user label and note (None or empty clears) and return the feature's labels after it."""
    if cfg.read_only:
        raise ReadOnlyError("this app was started read-only (--read-only / ATLAS_READ_ONLY): label edits are off")
    write_user_labels(driver, [LabelEdit(key, label, note, cfg.label_author)], database=database, source="app")
    return feature_label(driver, key, database=database)


def label_panel(driver: Driver, cfg: AppConfig, key: str, *, database: str, where: str) -> None:
    """The label of feature `key` and, unless read-only, fields to change it (`where` keeps widget keys apart)."""
    import streamlit as st

    from app.resources import show_error

    try:
        current = feature_label(driver, key, database=database)
    except Exception as err:
        show_error(err, "labels unavailable")
        return
    flash = st.session_state.pop(f"{where}_label_flash", None)
    if flash:
        st.success(flash)
    shown = current.label or "(no label)"
    source = "user label" if current.user_label else "automatic label" if current.auto_label else ""
    score = f" · detection score {current.score:.2f}" if current.score is not None else ""
    st.markdown(f"**Label:** {shown}" + (f" · _{source}_" if source else "") + score, help=f"feature key `{key}`")
    if current.user_label and current.auto_label:
        st.caption(f"automatic: {current.auto_label}")
    if current.note:
        st.caption(f"note: {current.note}")
    if current.updated_at is not None:
        by = f" by {current.author}" if current.author else ""
        st.caption(f"edited {current.updated_at:%Y-%m-%d %H:%M} UTC{by}")
    if cfg.read_only:
        st.caption("read-only app: label edits are off")
        return
    with st.expander("Edit label", expanded=False):
        label = st.text_input(f"Label (at most {MAX_LABEL_CHARS} characters)", value=current.user_label or "",
                              key=f"{where}_label_text_{key}")  # fmt: skip
        note = st.text_area(f"Note (at most {MAX_NOTE_CHARS} characters)", value=current.note or "",
                            key=f"{where}_label_note_{key}", height=80)  # fmt: skip
        save, clear = st.columns(2)
        action: tuple[str | None, str | None] | None = None
        if save.button("Save label", key=f"{where}_label_save", type="primary"):
            action = (label, note)
        if clear.button("Clear label", key=f"{where}_label_clear"):
            action = (None, None)
        explainer = _explainer()
        if explainer is not None and st.button(f"Explain with {explainer.model}", key=f"{where}_label_explain",
                                               help=f"asks {explainer.base_url} (ATLAS_EXPLAINER_URL)"):  # fmt: skip
            try:
                (result,) = explain_features(driver, FeatureStatsStore(cfg.stats_db), explainer, [key],
                                             database=database)  # fmt: skip
            except Exception as err:
                show_error(err, "explainer failed; nothing was written")
            else:
                st.session_state[f"{where}_label_flash"] = f"explained: {result.label} (detection {result.score:.2f})"
                st.rerun()
        if action is not None:
            try:
                after = save_label(driver, cfg, key, *action, database=database)
            except Exception as err:
                show_error(err, "label not saved")
            else:  # rerun, so that every caption on the page shows the new label
                st.session_state[f"{where}_label_flash"] = f"saved: {after.label or '(no label)'}"
                st.rerun()
        history = label_history(driver, key, database=database)
        if history:
            st.caption("history (newest first)")
            st.dataframe(
                [{"#": r.seq, "at": r.at, "author": r.author, "label": r.label or "(cleared)", "note": r.note,
                  "source": r.source} for r in history],
                hide_index=True, key=f"{where}_label_history",
            )  # fmt: skip
