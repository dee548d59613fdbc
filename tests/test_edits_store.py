"""`atlas edit` on the planted two-hop model with a real Neo4j and DuckDB: the edit report, storage round trip,
saving and re-applying, bad input, and interrupted writes.

The planted prompts are stored by the fixture of `test_validation_store` (fresh names, deleted afterwards).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import duckdb
import pytest
from neo4j import Driver
from test_validation_store import TEXTS, StoredPlanted, stored  # noqa: F401  (the module-scoped store fixture)

from atlas.storage.edits import EditStore, record_from_edit
from atlas.validation.validate import ValidationError
from ingest.edits import EditRequest, PromptSetSpec, run_edit

pytestmark = pytest.mark.usefixtures("neo4j_driver")

CONTROLS = ["xyz", "hello", "mmmm"]  # no 'A': the planted circuit never fires on them


def _loader(world: StoredPlanted, loads: list[str]) -> Any:
    def load(model: str | None, transcoder_id: str) -> tuple[Any, Any]:
        assert transcoder_id == world.transcoder_id and model == world.model_key
        loads.append(transcoder_id)
        return world.model, world.transcoder

    return load


def _counts(driver: Driver, world: StoredPlanted, duck: Path) -> tuple[int, int, int]:
    nodes = driver.execute_query(
        "MATCH (e:Edit {transcoder: $tc}) RETURN count(e) AS n", tc=world.transcoder_id, database_=world.database
    ).records[0]["n"]
    if not duck.exists():
        return nodes, 0, 0
    with duckdb.connect(str(duck)) as con:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        if "edits" not in tables:
            return nodes, 0, 0
        return (nodes, con.execute("SELECT count(*) FROM edits").fetchone()[0],  # type: ignore[index]
                con.execute("SELECT count(*) FROM edit_prompts").fetchone()[0])  # type: ignore[index]  # fmt: skip


def _request(world: StoredPlanted, control_file: Path, **kwargs: Any) -> EditRequest:
    defaults: dict[str, Any] = dict(
        target=PromptSetSpec([world.prompt_ids[n] for n in TEXTS]),
        control=PromptSetSpec(file=control_file),
        features=["0/0", "1/0"],
        answer="B",
    )
    return EditRequest(**{**defaults, **kwargs})


@pytest.fixture
def control_file(tmp_path: Path) -> Path:
    path = tmp_path / "control.txt"
    path.write_text("\n".join(CONTROLS) + "\n", encoding="utf-8")
    return path


def test_the_planted_edit_is_reported_stored_saved_and_reapplied(
    neo4j_driver: Driver,
    stored: StoredPlanted,  # noqa: F811
    tmp_path: Path,
    control_file: Path,
) -> None:
    duck = tmp_path / "validations.duckdb"
    loads: list[str] = []
    saved = tmp_path / "edits" / "planted.json"
    request = _request(stored, control_file, label="planted", save=saved)
    report, record, resolved = run_edit(neo4j_driver, stored.database, request, _loader(stored, loads),
                                        lambda: "never-asked", edits_path=duck)  # fmt: skip
    # the planted behaviour is gone on the targets; the controls (no 'A') are untouched
    assert report.accuracy(after=False) == 1.0 and report.accuracy(after=True) == 0.0
    assert report.target_logit_change < -3.0
    assert report.control_kl == pytest.approx(0.0, abs=1e-9) and report.control_top1_agreement == 1.0
    assert [p.prompt_id for p in resolved.target] == [stored.prompt_ids[n] for n in TEXTS]
    assert all(p.prompt_id is None for p in resolved.control)  # the file's prompts are not stored
    # Neo4j: the node, its features, a MEASURED_ON per stored prompt
    store = EditStore(neo4j_driver, duck, stored.database)
    back = store.read(record.id)
    assert back is not None
    assert back.feature_keys == [f"{stored.transcoder_id}/0/0", f"{stored.transcoder_id}/1/0"]
    props = back.properties
    assert props["operation"] == "ablate" and props["label"] == "planted" and props["n_control"] == 3
    assert props["accuracy_before"] == 1.0 and props["accuracy_after"] == 0.0
    assert props["target_logit_change"] == pytest.approx(report.target_logit_change)
    assert props["control_top1_agreement"] == 1.0 and props["control_kl"] == pytest.approx(0.0, abs=1e-9)
    assert [(r["role"], r["prompt_id"]) for r in back.prompts] == [("target", p.prompt_id) for p in resolved.target]
    assert all(r["correct_before"] and not r["correct_after"] for r in back.prompts)
    assert back.prompts[0]["generation_before"].startswith("B")
    # DuckDB: every prompt, the file's controls with their text
    rows = store.rows(record.id)
    assert [(r["role"], r["text"]) for r in rows[3:]] == [("control", t) for t in CONTROLS]
    assert all(r["prompt_id"] is None and r["top1_same"] for r in rows[3:])
    assert [r["answer_logit_change"] for r in rows[:3]] == pytest.approx([p.answer_logit_change for p in report.target])
    # the saved JSON, and re-applying it to its own prompt sets gives the same numbers as a new edit
    data = json.loads(saved.read_text())
    assert data["id"] == record.id and data["feature_keys"] == back.feature_keys
    assert data["results"]["accuracy_after"] == 0.0 and len(data["results"]["generations"]) == 2
    assert not list(saved.parent.glob(".*partial"))
    again, record2, _ = run_edit(neo4j_driver, stored.database,
                                 EditRequest(PromptSetSpec(), PromptSetSpec(), apply=saved), _loader(stored, loads),
                                 lambda: "never-asked", edits_path=duck)  # fmt: skip
    assert record2.id != record.id and again.edit.features == report.edit.features and again.edit.label == "planted"
    assert again.target_logit_change == pytest.approx(report.target_logit_change, rel=1e-6)
    assert again.control_top1_agreement == 1.0
    assert _counts(neo4j_driver, stored, duck) == (2, 2, 12)
    # steering the hop-1 feature on the controls (where it is silent) makes 'B' appear
    steer = _request(stored, control_file, features=["0/0"], operation="steer", value=4.0, n_generations=0,
                     store=False)  # fmt: skip
    steered, _, _ = run_edit(neo4j_driver, stored.database, steer, _loader(stored, loads), lambda: "", edits_path=duck)
    assert steered.control_top1_agreement < 1.0 and steered.control_kl > 0.1
    store.delete(record.id)
    store.delete(record2.id)
    assert _counts(neo4j_driver, stored, duck) == (0, 0, 0)


def test_bad_input_is_named_and_nothing_is_written(
    neo4j_driver: Driver,
    stored: StoredPlanted,  # noqa: F811
    tmp_path: Path,
    control_file: Path,
) -> None:
    duck = tmp_path / "validations.duckdb"
    loads: list[str] = []
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "circuit-atlas-edit/1", "feature_keys": ["x/0/0"], "transcoder": "x",
                                 "edit": {"operation": "ablate", "value": 0}, "target": [{"text": "qA"}],
                                 "control": [{"text": "q"}]}))  # fmt: skip
    ids = [stored.prompt_ids[n] for n in TEXTS]
    before_load = [
        (dict(features=["1/5"]), r"unknown feature key\(s\) .*1/5'\]: not in the store"),
        (dict(features=["other/0/0"]), r"unknown feature key\(s\) \['other/0/0'\]"),
        (dict(features=[]), "the edit has no features"),
        (dict(target=PromptSetSpec()), "target prompt set is empty"),
        (dict(target=PromptSetSpec(["no-such"])), r"unknown prompt id\(s\) \['no-such'\]"),
        (dict(target=PromptSetSpec(task="no-such-task")), "no stored prompt has task 'no-such-task'"),
        (dict(control=PromptSetSpec()), "control prompt set is empty"),
        (dict(control=PromptSetSpec(file=tmp_path / "none.txt")), "does not exist"),
        (dict(control=PromptSetSpec(file=tmp_path / "empty.txt")), "empty.txt is empty"),
        (dict(operation="scale"), "needs --value"),
        (dict(operation="rotate", value=1.0), "unknown edit operation 'rotate'"),
        (dict(apply=other, features=[]), "saved edit is of dictionary 'x'"),
        (dict(apply=other), "not both"),
        (dict(apply=tmp_path / "none.json", features=[]), "does not exist"),
        (dict(apply=control_file, features=[]), "not readable JSON"),
    ]
    for kwargs, message in before_load:
        with pytest.raises(ValidationError, match=message):
            run_edit(neo4j_driver, stored.database, _request(stored, control_file, **kwargs), _loader(stored, loads),
                     lambda: "x", edits_path=duck)  # fmt: skip
    assert loads == []
    after_load = [
        (dict(answer="BC"), "not a single token"),  # the tokenizer splits the answer
        (dict(features=["1/1"], target=PromptSetSpec([stored.prompt_ids["p3"]])), "active on any target prompt"),
    ]
    for kwargs, message in after_load:
        with pytest.raises(ValidationError, match=message):
            run_edit(neo4j_driver, stored.database, _request(stored, control_file, save=tmp_path / "s.json", **kwargs),
                     _loader(stored, loads), lambda: "x", edits_path=duck)  # fmt: skip
    assert len(loads) == 2 and ids
    assert _counts(neo4j_driver, stored, duck) == (0, 0, 0)
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("fail_at", ["edit", "features", "prompts", "duckdb-commit"])
def test_an_interrupted_write_leaves_nothing(
    neo4j_driver: Driver,
    stored: StoredPlanted,  # noqa: F811
    tmp_path: Path,
    fail_at: str,
) -> None:
    from atlas.validation.edits import EDIT_MODE, EditedPrompt, EditReport, FeatureEdit

    duck = tmp_path / "validations.duckdb"
    pid = stored.prompt_ids["p0"]
    measured = EditedPrompt("xyzA", "B", -3.0, -0.5, True, False, 0.7, False)
    report = EditReport(FeatureEdit(((0, 0),)), EDIT_MODE, [measured], [replace_answer(measured)])
    record = record_from_edit(report, feature_keys=[f"{stored.transcoder_id}/0/0"], transcoder_id=stored.transcoder_id,
                              model=stored.model_key, target_ids=[pid], control_ids=[None])  # fmt: skip
    store = EditStore(neo4j_driver, duck, stored.database)

    def hook(step: str) -> None:
        if step == fail_at:
            raise KeyboardInterrupt(step)

    with pytest.raises(KeyboardInterrupt):
        store.write(record, hook=hook)
    assert _counts(neo4j_driver, stored, duck) == (0, 0, 0)
    store.write(record)
    assert _counts(neo4j_driver, stored, duck) == (1, 1, 2)
    store.delete(record.id)


def replace_answer(p: Any) -> Any:
    from dataclasses import replace

    return replace(p, prompt="xyz", answer=None, answer_logit_change=math.nan, answer_prob_change=math.nan,
                   correct_before=None, correct_after=None)  # fmt: skip


def test_atlas_edit_prints_the_report_and_refuses_bad_input(
    neo4j_driver: Driver,
    stored: StoredPlanted,  # noqa: F811
    neo4j_connection: object,
    tmp_path: Path,
    control_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    import ingest.edits
    from atlas_cli.main import app

    for name, value in (("NEO4J_URI", "uri"), ("NEO4J_USER", "user"), ("NEO4J_PASSWORD", "password"),
                        ("NEO4J_DATABASE", "database")):  # fmt: skip
        monkeypatch.setenv(name, getattr(neo4j_connection, value))
    monkeypatch.setenv("ATLAS_STATS_DB", str(tmp_path / "feature_stats.duckdb"))
    loads: list[str] = []
    monkeypatch.setattr(ingest.edits, "load_from_directory", lambda model, directory: _loader(stored, loads))
    base = ["edit", "--transcoders", str(tmp_path), "--control-file", str(control_file), "--answer", "B"]
    targets = [x for n in TEXTS for x in ("--target-id", stored.prompt_ids[n])]
    cases = [
        ([*base, *targets, "--feature", "3/0"], "not in the store"),
        ([*base, "--feature", "0/0"], "the target prompt set is empty"),
        ([*base, *targets, "--feature", "0/0", "--generations", "-1"], "--generations"),
        ([*base, *targets, "--feature", "0/0", "--operation", "scale", "--value", "nan"], "finite"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "validations.duckdb").exists() and loads == []
    saved = tmp_path / "cli.json"
    result = CliRunner().invoke(app, [*base, *targets, "--feature", "0/0", "--feature", "1/0", "--save", str(saved)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "target: accuracy before │ 1.0000" in text and "target: accuracy after │ 0.0000" in text
    assert "control: top-1 agreement │ 1.0000" in text and "greedy generations" in text
    edit_id = json.loads(saved.read_text())["id"]
    assert f"stored as {edit_id}" in text
    EditStore(neo4j_driver, tmp_path / "validations.duckdb", stored.database).delete(edit_id)
