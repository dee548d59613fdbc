"""Feature labels against a real Neo4j and DuckDB: the automatic rule and its recomputation when statistics change,
user labels with history, bad input writing nothing, JSON and Neuronpedia import/export, the `atlas labels`
commands, and an identity merge (`identities.merge_transcoders`) keeping user labels and their history.

Prompt graphs are synthetic (`test_queries.build`); statistics come from real `FeatureStatsShard`s.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from neo4j import Driver
from test_queries import Spec, build
from typer.testing import CliRunner

from atlas.attribution.graph import feature_key
from atlas.storage.auto_labels import MAX_LABEL_CHARS, auto_label, display_token
from atlas.storage.feature_stats import FeatureStatsShard, FeatureStatsStore
from atlas.storage.identities import DictionaryLabel, merge_transcoders
from atlas.storage.labels import (
    MAX_LABEL_CHARS as MAX_USER_LABEL,
)
from atlas.storage.labels import (
    LabelEdit,
    LabelError,
    edits_from_export,
    edits_from_neuronpedia,
    export_labels,
    feature_label,
    label_history,
    push_auto_labels,
    write_user_labels,
)
from atlas.storage.neo4j_server import Neo4jConnection
from atlas.storage.neo4j_writer import GraphWriter
from atlas_cli.main import app

N_LAYERS, N_FEATURES = 3, 8
CITY, STATE = (1, 2), (2, 5)  # (layer, index)


def test_auto_label_rule() -> None:
    assert auto_label([" Dallas", " Houston", "Dallas", " Dallas", " Austin"], [(" Texas", 2.0), ("Texas", 1.5),
                      (" TX", 1.0)]) == "Dallas, Houston, Austin → Texas, TX"  # fmt: skip
    assert auto_label([], [(" Paris", 1.0), (" France", -0.5)]) == "→ Paris"  # only positive effects
    assert auto_label([" the", "\n", " "], []) == "the, ⏎, ␣"
    assert auto_label([], [("x", -1.0)]) is None and auto_label([], []) is None
    long = auto_label(["a" * 40, "b" * 40, "c" * 40], [("d" * 40, 1.0), ("e" * 40, 1.0)])
    assert long is not None and len(long) == MAX_LABEL_CHARS and long.endswith("…")
    assert display_token("Supercalifragilistic") == "Supercalifrag…" and display_token("a\x07b") == "a�b"


def _shard(transcoder: str, tokens: list[str], acts: dict[tuple[int, int, int], float]) -> FeatureStatsShard:
    """A one-prompt shard: `acts[(layer, position, feature)]` = activation."""
    shard = FeatureStatsShard(transcoder, N_LAYERS, N_FEATURES)
    tensor = torch.zeros(N_LAYERS, len(tokens), N_FEATURES)
    for (layer, pos, feature), value in acts.items():
        tensor[layer, pos, feature] = value
    shard.add(f"p-{uuid.uuid4().hex[:8]}", tokens, tensor)
    return shard


def _effects(transcoder: str, rows: dict[tuple[int, int], list[tuple[str, float]]]) -> pa.Table:
    cols: dict[str, list[object]] = {k: [] for k in ("transcoder_id", "layer", "feature", "sign", "rank", "token_id",
                                                     "token", "effect")}  # fmt: skip
    for (layer, feature), effects in rows.items():
        for rank, (token, effect) in enumerate(effects):
            for name, value in zip(cols, (transcoder, layer, feature, "positive", rank, rank, token, effect),
                                   strict=True):  # fmt: skip
                cols[name].append(value)
    return pa.Table.from_pydict(cols)


@pytest.fixture
def store(neo4j_driver: Driver, neo4j_connection: Neo4jConnection) -> Iterator[tuple[str, GraphWriter]]:
    """One stored prompt of a fresh dictionary with the CITY and STATE features; removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    model, transcoder = f"lmodel-{tag}", f"lclt-{tag}"
    spec = Spec(
        f"l-{tag}",
        "capitals",
        features={"city": (*CITY, 2, 2.0, 0.1), "state": (*STATE, 4, 1.0, 0.2)},
        logits={"austin": (9001, " Austin", 0.5)},
        edges=[("city", "state", 0.5), ("state", "austin", 0.4)],
    )
    writer = GraphWriter(neo4j_driver, neo4j_connection.database)
    writer.write_prompt(*build(model, transcoder, spec))
    try:
        yield transcoder, writer
    finally:
        _wipe(neo4j_driver, [transcoder], model)


def _wipe(driver: Driver, transcoders: list[str], model: str) -> None:
    for query in (
        "MATCH (p:Prompt) WHERE p.transcoder IN $tcs MATCH (n:Instance) WHERE n.prompt_id = p.id "
        "AND n.node_index IS NOT NULL DETACH DELETE n",
        "MATCH (p:Prompt) WHERE p.transcoder IN $tcs DETACH DELETE p",
        "MATCH (r:LabelRevision)-[:REVISES]->(f:Feature) WHERE f.transcoder IN $tcs DETACH DELETE r",
        "MATCH (f:Feature) WHERE f.transcoder IN $tcs DETACH DELETE f",
        "MATCH (t:Token {model: $model}) DETACH DELETE t",
        "MATCH (t:Transcoder) WHERE t.id IN $tcs DETACH DELETE t",
        "MATCH (m:Model {name: $model}) DETACH DELETE m",
    ):
        driver.execute_query(query, tcs=transcoders, model=model)


def test_automatic_labels_follow_the_statistics(
    tmp_path: Path, store: tuple[str, GraphWriter], neo4j_driver: Driver
) -> None:
    transcoder, _ = store
    stats = FeatureStatsStore(tmp_path / "stats.duckdb")
    city, state = feature_key(transcoder, *CITY), feature_key(transcoder, *STATE)
    first = _shard(transcoder, ["<s>", " Dallas", " is", " in", " Texas"],
                   {(1, 1, 2): 3.0, (2, 4, 5): 1.0})  # fmt: skip
    stats.ingest([first.write(tmp_path / "shards")],
                 logit_effects=_effects(transcoder, {CITY: [(" Texas", 2.0), (" TX", 1.0)]}))  # fmt: skip
    assert stats.auto_labels({transcoder}) == {(transcoder, *CITY): "Dallas → Texas, TX", (transcoder, *STATE): "Texas"}
    assert push_auto_labels(neo4j_driver, stats, transcoder_ids=[transcoder]) == 2
    assert push_auto_labels(neo4j_driver, stats, transcoder_ids=[transcoder]) == 0  # unchanged: nothing written
    current = feature_label(neo4j_driver, city)
    assert (current.label, current.auto_label, current.user_label) == ("Dallas → Texas, TX", "Dallas → Texas, TX", None)

    # New statistics: a stronger activation on " Houston" comes first; the label follows at the next push.
    second = _shard(transcoder, ["<s>", " Houston", " and", " Dallas"], {(1, 1, 2): 5.0, (1, 3, 2): 0.5})
    stats.ingest([second.write(tmp_path / "shards")])
    assert stats.auto_labels({transcoder})[(transcoder, *CITY)] == "Houston, Dallas → Texas, TX"
    assert push_auto_labels(neo4j_driver, stats) >= 1
    assert feature_label(neo4j_driver, city).label == "Houston, Dallas → Texas, TX"
    assert feature_label(neo4j_driver, state).label == "Texas"


def test_user_labels_edit_history_and_clear(store: tuple[str, GraphWriter], neo4j_driver: Driver) -> None:
    transcoder, writer = store
    city = feature_key(transcoder, *CITY)
    writer.set_feature_labels({city: "Dallas → Texas"})  # a machine label, as push_auto_labels would set
    t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    edit = LabelEdit(city, "  Dallas (city)  ", "fires on Dallas", "ana")
    assert write_user_labels(neo4j_driver, [edit], now=t0) == 1
    after = feature_label(neo4j_driver, city)
    assert (after.label, after.user_label, after.auto_label) == ("Dallas (city)", "Dallas (city)", "Dallas → Texas")
    assert (after.note, after.author, after.updated_at) == ("fires on Dallas", "ana", t0)
    write_user_labels(neo4j_driver, [LabelEdit(city, "Texas cities", "multi-line\nnote", "bo")],
                      now=t0 + timedelta(hours=1))  # fmt: skip
    write_user_labels(neo4j_driver, [LabelEdit(city, None, None, "bo")], now=t0 + timedelta(hours=2))  # clear
    cleared = feature_label(neo4j_driver, city)
    assert (cleared.label, cleared.user_label, cleared.note) == ("Dallas → Texas", None, None)  # automatic again
    history = label_history(neo4j_driver, city)
    assert [(r.seq, r.label, r.author) for r in history] == [(3, None, "bo"), (2, "Texas cities", "bo"),
                                                             (1, "Dallas (city)", "ana")]  # fmt: skip
    assert history[1].note == "multi-line\nnote" and history[2].at == t0
    # A machine label pushed later does not hide a user label.
    write_user_labels(neo4j_driver, [LabelEdit(city, "Dallas")])
    writer.set_feature_labels({city: "something else"})
    assert feature_label(neo4j_driver, city).label == "Dallas"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (LabelEdit("?", "x"), "not a feature key"),
        (LabelEdit("{t}/1/2", "x" * (MAX_USER_LABEL + 1)), "at most 80"),
        (LabelEdit("{t}/1/2", "Dallas\x1b[31m"), "control"),
        (LabelEdit("{t}/1/2", "Dallas\u202eevil"), "control"),  # a bidi override
        (LabelEdit("{t}/1/2", "two\nlines"), "control"),  # newlines only in notes
        (LabelEdit("{t}/1/2", "ok", "\x00"), "control"),
        (LabelEdit("{t}/1/99", "ok"), "unknown feature"),
        (LabelEdit("other-dictionary/1/2", "ok"), "unknown feature"),
    ],
)
def test_bad_input_writes_nothing(
    store: tuple[str, GraphWriter], neo4j_driver: Driver, edit: LabelEdit, message: str
) -> None:
    transcoder, _ = store
    good = LabelEdit(feature_key(transcoder, *STATE), "Texas")
    bad = LabelEdit(edit.key.replace("{t}", transcoder), edit.label, edit.note)
    with pytest.raises(LabelError, match=message):
        write_user_labels(neo4j_driver, [good, bad])  # the good one first: it must not be written either
    assert feature_label(neo4j_driver, good.key).user_label is None
    assert label_history(neo4j_driver, good.key) == []
    with pytest.raises(LabelError, match="twice"):
        write_user_labels(neo4j_driver, [good, good])


def test_export_import_round_trip_and_foreign_files(
    tmp_path: Path, store: tuple[str, GraphWriter], neo4j_driver: Driver, neo4j_connection: Neo4jConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    transcoder, writer = store
    city, state = feature_key(transcoder, *CITY), feature_key(transcoder, *STATE)
    write_user_labels(neo4j_driver, [LabelEdit(city, "Dallas", "a city", "ana"), LabelEdit(state, "Texas")])
    document = export_labels(neo4j_driver, transcoder)
    assert document["dictionary"] == transcoder
    assert [(e["layer"], e["index"], e["label"], e["note"]) for e in document["labels"]] == [
        (*CITY, "Dallas", "a city"), (*STATE, "Texas", None)]  # fmt: skip

    # The store is rebuilt: features and labels gone, the same prompt ingested again; the file brings labels back.
    neo4j_driver.execute_query("MATCH (r:LabelRevision)-[:REVISES]->(f:Feature {transcoder: $t}) DETACH DELETE r, f",
                               t=transcoder)  # fmt: skip
    with pytest.raises(LabelError, match="unknown feature"):
        write_user_labels(neo4j_driver, edits_from_export(document)[1])
    tag = transcoder.removeprefix("lclt-")
    spec = Spec(
        f"l-{tag}",
        "capitals",
        features={"city": (*CITY, 2, 2.0, 0.1), "state": (*STATE, 4, 1.0, 0.2)},
        logits={"austin": (9001, " Austin", 0.5)},
    )
    writer.write_prompt(*build(f"lmodel-{tag}", transcoder, spec))
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(document))
    for name, value in (("NEO4J_URI", neo4j_connection.uri), ("NEO4J_USER", neo4j_connection.user),
                        ("NEO4J_PASSWORD", neo4j_connection.password)):  # fmt: skip
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    result = runner.invoke(app, ["labels", "import", str(path)])
    assert result.exit_code == 0, result.output
    assert export_labels(neo4j_driver, transcoder)["labels"] == document["labels"]
    exported = runner.invoke(app, ["labels", "export", "--dictionary", transcoder])
    assert exported.exit_code == 0 and json.loads(exported.stdout)["labels"] == document["labels"]
    shown = runner.invoke(app, ["labels", "show", city])
    assert shown.exit_code == 0 and "Dallas" in shown.stdout and "import" in shown.stdout

    # A file for another dictionary, a malformed one, an unknown dictionary: clear errors, nothing written.
    before = export_labels(neo4j_driver, transcoder)
    foreign = runner.invoke(app, ["labels", "import", str(path), "--dictionary", "clt-0000000000000000"])
    assert foreign.exit_code == 2 and "another dictionary" in " ".join(foreign.output.split())
    path.write_text(json.dumps({**document, "labels": [{"layer": "x", "index": 1, "label": "y"}]}))
    malformed = runner.invoke(app, ["labels", "import", str(path)])
    assert malformed.exit_code == 2 and "must be an integer" in malformed.output
    missing = runner.invoke(app, ["labels", "export", "--dictionary", "no-such-dictionary"])
    assert missing.exit_code == 2 and "unknown dictionary" in missing.output
    assert export_labels(neo4j_driver, transcoder) == before

    # Neuronpedia: explanations of the matching model/source set become labels; another source set is refused.
    explanations = [
        {"modelId": "tiny", "layer": f"{CITY[0]}-clt-x", "index": str(CITY[1]), "description": "US cities in Texas",
         "explanationModelName": "gpt-4o-mini"},
        {"modelId": "tiny", "layer": f"{STATE[0]}-clt-x", "index": STATE[1], "description": "state " * 30},
    ]  # fmt: skip
    edits = edits_from_neuronpedia(explanations, transcoder, model_id="tiny", source_set="clt-x")
    assert write_user_labels(neo4j_driver, edits, source="neuronpedia") == 2
    assert feature_label(neo4j_driver, city).label == "US cities in Texas"
    long = feature_label(neo4j_driver, state)
    assert long.label is not None and len(long.label) == MAX_USER_LABEL and long.note == ("state " * 30).strip()
    with pytest.raises(LabelError, match="another dictionary"):
        edits_from_neuronpedia(explanations, transcoder, model_id="tiny", source_set="res-jb")


def test_identity_merge_keeps_user_labels_and_history(
    store: tuple[str, GraphWriter], neo4j_driver: Driver, neo4j_connection: Neo4jConnection
) -> None:
    """Two legacy copies of one dictionary, both labelled: the merged Feature keeps the newer label and both
    histories (step 3 of the migration used to drop them with the deleted node)."""
    transcoder, writer = store  # the first copy's prompt is stored under `transcoder`
    tag = transcoder.removeprefix("lclt-")
    copy, new_id = f"lclt2-{tag}", f"clt-{tag}"
    spec = Spec(
        f"l2-{tag}",
        "capitals",
        features={"city": (*CITY, 2, 2.0, 0.1), "state": (*STATE, 4, 1.0, 0.2)},
        logits={"austin": (9001, " Austin", 0.5)},
        edges=[("city", "state", 0.5)],
    )
    writer.write_prompt(*build(f"lmodel-{tag}", copy, spec))
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    a_city, b_city = feature_key(transcoder, *CITY), feature_key(copy, *CITY)
    b_state = feature_key(copy, *STATE)
    write_user_labels(neo4j_driver, [LabelEdit(a_city, "city (a)", "first", "ana")], now=t0)
    write_user_labels(neo4j_driver, [LabelEdit(a_city, "Dallas (a)", None, "ana")], now=t0 + timedelta(hours=1))
    write_user_labels(neo4j_driver, [LabelEdit(b_city, "Dallas (b)", "newest", "bo")], now=t0 + timedelta(hours=2))
    write_user_labels(neo4j_driver, [LabelEdit(b_state, "Texas (b)", None, "bo")], now=t0)
    label = DictionaryLabel(new_id, "transcoders", "/x", "clt", {})
    try:
        report = merge_transcoders(neo4j_driver, {transcoder: label, copy: label}, lambda p, t: None,
                                   database=neo4j_connection.database)  # fmt: skip
        assert (report.features_rekeyed, report.features_merged) == (2, 2)
        city, state = feature_key(new_id, *CITY), feature_key(new_id, *STATE)
        merged = feature_label(neo4j_driver, city)
        assert (merged.label, merged.note, merged.author) == ("Dallas (b)", "newest", "bo")
        history = label_history(neo4j_driver, city)
        assert [(r.seq, r.label) for r in history] == [(3, "Dallas (b)"), (2, "Dallas (a)"), (1, "city (a)")]
        assert feature_label(neo4j_driver, state).label == "Texas (b)"  # the survivor had none: the copy's kept
        assert [r.label for r in label_history(neo4j_driver, state)] == ["Texas (b)"]
        orphans = neo4j_driver.execute_query(
            "MATCH (r:LabelRevision) WHERE NOT (r)-[:REVISES]->(:Feature) RETURN count(r) AS n"
        ).records[0]["n"]
        assert orphans == 0
    finally:
        _wipe(neo4j_driver, [copy, new_id], f"lmodel-{tag}")


class ChatEndpoint:
    """A loopback OpenAI-compatible chat endpoint with fixed rules: explains every feature as "Texas cities" and, as
    a judge, says 1 for texts naming a Texas city (or for every text when `always_yes`)."""

    def __init__(self, *, always_yes: bool = False, garbage: bool = False) -> None:
        import http.server
        import threading

        outer = self
        self.requests: list[dict[str, object]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                system, user = body["messages"][0]["content"], body["messages"][1]["content"]
                if "explain" in system:
                    answer = "Texas cities."
                else:
                    texts = user.split("Texts:\n", 1)[1].splitlines()
                    votes = [1 if always_yes or "Dallas" in t or "Houston" in t else 0 for t in texts]
                    answer = "maybe" if garbage else json.dumps(votes)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_explainer_scores_by_detection_and_writes_nothing_on_failure(
    tmp_path: Path, store: tuple[str, GraphWriter], neo4j_driver: Driver
) -> None:
    from atlas.storage.explainer import ExplainerConfig, ExplainerError, explain_features
    from atlas.storage.neo4j_server import free_loopback_port

    transcoder, _ = store
    city = feature_key(transcoder, *CITY)
    shard = FeatureStatsShard(transcoder, N_LAYERS, N_FEATURES)
    for i, name in enumerate([" Dallas", " Houston", " Dallas", " Houston", " Dallas", " Houston"]):
        tokens = ["<s>", " I", " live", " in", name, " now", " and", " the", " sky", " is", " blue"]
        acts = torch.zeros(N_LAYERS, len(tokens), N_FEATURES)
        acts[CITY[0], 4, CITY[1]] = 3.0 - 0.1 * i  # the city feature on the city
        acts[0, 8, 0] = 1.0 + i  # another feature on " sky"; in the city's prompts, so never a negative
        shard.add(f"p{i}", tokens, acts)
    for i in range(4):  # prompts without a city: the other feature's examples there are the negatives
        tokens = ["<s>", " The", " sky", " over", " the", " sea", " is", " grey"]
        acts = torch.zeros(N_LAYERS, len(tokens), N_FEATURES)
        acts[0, 2, 0] = 10.0 + i
        shard.add(f"q{i}", tokens, acts)
    stats = FeatureStatsStore(tmp_path / "stats.duckdb")
    stats.ingest([shard.write(tmp_path / "shards")])

    endpoint = ChatEndpoint()
    try:
        cfg = ExplainerConfig(endpoint.url, "fake-judge")
        (result,) = explain_features(neo4j_driver, stats, cfg, [city])
        assert (result.label, result.n_positive, result.n_negative) == ("Texas cities", 3, 3)
        assert result.score == 1.0  # a judge that follows the explanation separates them perfectly
        shown = endpoint.requests[0]["messages"][1]["content"]  # type: ignore[index]
        assert "<< Dallas>>" in shown and "Houston" not in shown  # ranks 0, 2, 4 shown; 1, 3, 5 (Houston) held out
    finally:
        endpoint.close()
    stored = feature_label(neo4j_driver, city)
    assert (stored.label, stored.author, stored.score) == ("Texas cities", "explainer:fake-judge", 1.0)
    assert label_history(neo4j_driver, city)[0].source == "explainer"

    yes = ChatEndpoint(always_yes=True)  # says yes to everything: chance level
    try:
        (blind,) = explain_features(neo4j_driver, stats, ExplainerConfig(yes.url, "yes-man"), [city])
        assert blind.score == 0.5
    finally:
        yes.close()

    before = (feature_label(neo4j_driver, city), label_history(neo4j_driver, city))
    garbage = ChatEndpoint(garbage=True)
    try:
        with pytest.raises(ExplainerError, match="not a JSON list"):
            explain_features(neo4j_driver, stats, ExplainerConfig(garbage.url, "g"), [city])
    finally:
        garbage.close()
    dead = f"http://127.0.0.1:{free_loopback_port()}/v1"
    with pytest.raises(ExplainerError, match="unreachable"):
        explain_features(neo4j_driver, stats, ExplainerConfig(dead, "m", timeout_s=5), [city])
    assert (feature_label(neo4j_driver, city), label_history(neo4j_driver, city)) == before
    with pytest.raises(ExplainerError, match="not a feature key"):
        explain_features(neo4j_driver, stats, ExplainerConfig(dead, "m"), ["nonsense"])
    with pytest.raises(ExplainerError, match="0 stored example"):
        explain_features(neo4j_driver, stats, ExplainerConfig(dead, "m"), [feature_key(transcoder, 2, 7)])
    assert ExplainerConfig.from_env({}) is None  # off by default
    with pytest.raises(ExplainerError, match="ATLAS_EXPLAINER_MODEL"):
        ExplainerConfig.from_env({"ATLAS_EXPLAINER_URL": "http://x"})
