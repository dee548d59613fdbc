"""The Streamlit app under `streamlit.testing.v1.AppTest`, every page, against a real Neo4j and DuckDB store.

The store is populated once per session by the real ingest path (`ingest.pipeline.run_ingest`, in-process) with
the tiny GPT-2 and a random, calibrated CLT saved to disk: a small JSONL corpus tagged with tasks goes in, prompt
graphs land in Neo4j (with the aggregate layer) and feature statistics in DuckDB. One decoder bias of the transcoder
is shifted by a random tag, so its content identity and prompt ids are unique and other tests sharing the server (the
browser test builds a second store from the same recipe) do not see or disturb this content. The oracles come from
outside the app: the ingest's own Parquet shards (a feature->logit edge and a feature->feature->logit chain of a
prompt), activations recomputed with `build_context`, and the intervention library called directly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from neo4j import Driver
from streamlit.testing.v1 import AppTest

from atlas.attribution.context import build_context
from atlas.attribution.quality import evaluate_dictionary
from atlas.models import LoadedModel
from atlas.storage.neo4j_server import Neo4jConnection
from atlas.storage.neo4j_writer import GraphWriter
from atlas.transcoders import TranscoderSpec, build_transcoder, save_transcoder
from atlas.transcoders.base import EncoderStack
from atlas.transcoders.card import DictionaryCard, write_card
from ingest.pipeline import IngestOptions, run_ingest
from ingest.settings import AttributionSettings, transcoder_identity

APP = Path(__file__).resolve().parent.parent / "app" / "main.py"
PROMPTS = {
    "capitals": ["The Eiffel Tower is in the city of", "The capital of Italy is the city of"],
    "ioi": ["When Mary and John went to the store, John gave it to"],
    "arithmetic": ["two plus three is"],
}
TARGETS = ("a", "e", "s")


@dataclass
class PlantedPath:
    prompt_id: str
    source_key: str  # feature key of the path's first node
    target: str  # logit token text
    node_ids: list[str]  # frontend ids along the path
    weights: list[float]


@dataclass
class StoredGraph:
    """One prompt's pruned graph as the ingest wrote it to its Parquet shard."""

    text: str
    task: str
    nodes: pa.Table  # NODE_SCHEMA rows of the kept nodes
    edges: pa.Table  # EDGE_SCHEMA rows of the kept edges


@dataclass
class AtlasFixture:
    connection: Neo4jConnection
    stats_db: Path
    transcoder_dir: Path
    transcoder_id: str
    model_name: str
    run: str
    graphs: dict[str, StoredGraph]  # prompt id -> graph
    activations: dict[str, torch.Tensor]  # prompt id -> (L, n_pos, F) clean feature activations
    token_strings: dict[str, list[str]]
    tokens: dict[str, list[int]]
    one_hop: PlantedPath
    two_hop: PlantedPath | None
    card: DictionaryCard

    def env(self) -> dict[str, str]:
        return {
            "ATLAS_NEO4J_URI": self.connection.uri,
            "NEO4J_USER": self.connection.user,
            "NEO4J_PASSWORD": self.connection.password,
            "NEO4J_DATABASE": self.connection.database,
            "ATLAS_STATS_DB": str(self.stats_db),
            "ATLAS_TRANSCODERS": str(self.transcoder_dir),
            "ATLAS_MODEL": self.model_name,
        }


def calibrated_transcoder(model: LoadedModel, text: str) -> EncoderStack:
    """A random CLT whose encoder biases make about 15 % of features fire (as in test_attribution)."""
    torch.manual_seed(3)
    spec = TranscoderSpec(kind="clt", n_layers=model.info.n_layers, d_model=model.info.d_model, n_features=24)
    transcoder = build_transcoder(spec)
    with torch.no_grad():
        for param in transcoder.parameters():
            param.normal_(0, 0.3)
        if transcoder.log_threshold is not None:
            transcoder.log_threshold.fill_(-3.0)
        ctx = build_context(model, transcoder, model.tokenize(text)[0], zero_positions=())
        pre = torch.bmm(ctx.inputs, transcoder.W_enc.transpose(1, 2))
        transcoder.b_enc.copy_(-torch.quantile(pre, 0.85, dim=1) + 0.05)
    return transcoder


def plant_paths(pid: str, graph: StoredGraph) -> tuple[PlantedPath | None, PlantedPath | None]:
    """The strongest stored feature->logit edge and feature->feature->logit chain of one prompt's shard tables."""
    rows = {r["node_index"]: r for r in graph.nodes.to_pylist()}
    edges = [(e["source"], e["target"], e["weight"]) for e in graph.edges.to_pylist()]

    def kind(i: int) -> str:
        return str(rows[i]["kind"])

    one = [(s, t, w) for s, t, w in edges if kind(s) == "feature" and kind(t) == "logit"]
    one_hop = None
    if one:
        s, t, w = max(one, key=lambda e: abs(e[2]))
        one_hop = PlantedPath(pid, rows[s]["feature_key"], rows[t]["token"], [rows[s]["node_id"], rows[t]["node_id"]],
                              [w])  # fmt: skip
    two_hop, best = None, 0.0
    for s, m, w1 in edges:
        if kind(s) != "feature" or kind(m) != "feature":
            continue
        for s2, t, w2 in one:
            if s2 == m and abs(w1 * w2) > best:
                best = abs(w1 * w2)
                ids = [rows[s]["node_id"], rows[m]["node_id"], rows[t]["node_id"]]
                two_hop = PlantedPath(pid, rows[s]["feature_key"], rows[t]["token"], ids, [w1, w2])
    return one_hop, two_hop


def build_atlas(tmp: Path, model: LoadedModel, connection: Neo4jConnection) -> AtlasFixture:
    """Ingest the tagged corpus (in-process) into Neo4j and DuckDB; collect the oracles from its shards."""
    tag = uuid.uuid4().hex[:8]
    all_texts = [text for texts in PROMPTS.values() for text in texts]
    transcoder = calibrated_transcoder(model, all_texts[0])
    with torch.no_grad():  # identities are by content: a tag-sized shift keeps this fixture's store its own
        transcoder.b_dec[0, 0] += 1e-6 * (1 + int(tag, 16) % 1000)
    transcoder_dir = save_transcoder(transcoder, tmp / f"apptest-{tag}", model_name=model.info.name)
    # Its card, measured as `atlas transcoders card` measures one (spliced CE on the first prompt's tokens)
    card = evaluate_dictionary(model, transcoder, prompts=all_texts, eval_tokens=model.tokenize(all_texts[0]),
                               max_feature_nodes=None, progress=False)  # fmt: skip
    write_card(transcoder_dir, card)
    corpus = tmp / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t, "task": task}) + "\n" for task, texts in PROMPTS.items() for t in texts)
    )
    run = f"apptest-run-{tag}"
    options = IngestOptions(
        corpus=corpus, transcoders=transcoder_dir, model=model.info.name, workers=0, run=run,
        settings=AttributionSettings(targets=TARGETS, node_threshold=0.9, edge_threshold=0.99),
        stats_db=tmp / "stats.duckdb", runs_root=tmp / "runs", progress=False,
    )  # fmt: skip
    report = run_ingest(options, connection=connection)
    assert report.computed == len(all_texts) and not report.prompt_failures, report.failures
    graphs: dict[str, StoredGraph] = {}
    for shard in sorted(Path(report.run_dir).glob("shards/*/")):
        if not (shard / "prompts.parquet").exists():
            continue
        nodes, edges = pq.read_table(shard / "nodes.parquet"), pq.read_table(shard / "edges.parquet")
        for row in pq.read_table(shard / "prompts.parquet").to_pylist():
            pid, meta = row["prompt_id"], json.loads(row["meta"])
            graphs[pid] = StoredGraph(
                meta["text"], meta["task"],
                nodes.filter(pc.equal(nodes["prompt_id"], pid)),
                edges.filter(pc.equal(edges["prompt_id"], pid)),
            )  # fmt: skip
    assert len(graphs) == len(all_texts)
    activations, token_strings, tokens = {}, {}, {}
    for pid, graph in graphs.items():
        ids = model.tokenize(graph.text)[0]
        activations[pid] = build_context(model, transcoder, ids).activations
        tokens[pid] = ids.tolist()
        token_strings[pid] = [model.tokenizer.decode([i]) for i in tokens[pid]]
    plants = [plant_paths(pid, graph) for pid, graph in graphs.items()]
    one_hops = [p for p, _ in plants if p is not None]
    two_hops = [p for _, p in plants if p is not None]
    assert one_hops, "no feature->logit edge survived pruning in any prompt; the fixture needs another seed"
    return AtlasFixture(
        connection, Path(report.stats_db), transcoder_dir, transcoder_identity(transcoder_dir), model.info.name, run,
        graphs, activations, token_strings, tokens, max(one_hops, key=lambda p: abs(p.weights[0])),
        max(two_hops, key=lambda p: abs(p.weights[0] * p.weights[1])) if two_hops else None, card,
    )  # fmt: skip


@pytest.fixture(scope="session")
def atlas_store(
    tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: LoadedModel, neo4j_connection: Neo4jConnection,
    neo4j_driver: Driver,
) -> Iterator[AtlasFixture]:  # fmt: skip
    fixture = build_atlas(tmp_path_factory.mktemp("atlas-app"), tiny_gpt2, neo4j_connection)
    try:
        yield fixture
    finally:
        writer = GraphWriter(neo4j_driver, neo4j_connection.database)
        for pid in fixture.graphs:
            writer.delete_prompt(pid)


@pytest.fixture
def app_env(atlas_store: AtlasFixture, monkeypatch: pytest.MonkeyPatch) -> AtlasFixture:
    for name in ("NEO4J_URI", "ATLAS_QUERY_TIMEOUT_S", "ATLAS_ROW_CAP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in atlas_store.env().items():
        monkeypatch.setenv(name, value)
    return atlas_store


def app_test(page: str | None = None) -> AppTest:
    """The app, run once (navigation registered), then switched to `page` (e.g. "views/features.py") and run."""
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception, at.exception
    if page is not None:
        at.switch_page(page).run()
    return at


def frames(at: AppTest, *columns: str) -> list[Any]:
    """The rendered dataframes (pandas) that have all these columns, in page order."""
    return [d.value for d in at.dataframe if set(columns) <= set(d.value.columns)]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error] + [str(e.value) for e in at.exception]


def test_overview_counts_prompts_and_plots_scores(app_env: AtlasFixture) -> None:
    at = app_test()
    assert not errors(at), errors(at)
    assert at.title[0].value == "Atlas overview"
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["prompts"].replace(",", "")) >= len(app_env.graphs)
    runs = at.dataframe[1].value
    mine = runs[(runs["run"] == app_env.run) & (runs["transcoder"] == app_env.transcoder_id)]
    assert int(mine["prompts"].sum()) == len(app_env.graphs)
    (dictionaries,) = frames(at, "dictionary", "names", "sources")
    ours = dictionaries[dictionaries["dictionary"] == app_env.transcoder_id]  # listed once, by its weights
    assert len(ours) == 1 and ours.iloc[0]["names"] == app_env.transcoder_dir.name
    assert ours.iloc[0]["sources"] == str(app_env.transcoder_dir) and ours.iloc[0]["identity"] == "weights"
    # The dictionary's card, as the ingest stored it on its Transcoder node, and its caution when it has one.
    assert ours.iloc[0]["ce_delta"] == pytest.approx(app_env.card.ce_delta, rel=1e-9)
    assert ours.iloc[0]["replacement_score"] == pytest.approx(app_env.card.replacement_score, rel=1e-9)
    assert ours.iloc[0]["fvu_mean"] == pytest.approx(app_env.card.fvu_mean, rel=1e-9)
    assert ours.iloc[0]["feature_nodes_kept"] == pytest.approx(app_env.card.feature_nodes_kept, rel=1e-9)
    caution = app_env.card.warning(threshold=-1.0)  # any measured delta exceeds a negative threshold
    assert caution is not None and f"{app_env.card.ce_delta:.2f} nats" in caution
    shown = [w.value for w in at.warning if app_env.transcoder_id in w.value]
    expected = app_env.card.warning()
    assert (shown == []) if expected is None else (len(shown) == 1 and expected in shown[0])
    tasks = at.dataframe[2].value
    assert set(PROMPTS) <= set(tasks["task"])
    charts = [c for c in at.get("plotly_chart")]
    assert len(charts) >= 2  # tasks bar chart and score histogram


def feature_density(app_env: AtlasFixture, layer: int, feature: int) -> tuple[float, str, float]:
    """(share of active tokens, text of its top activating token, top activation) over the fixture's prompts."""
    active = total = 0
    best, best_token = -1.0, ""
    for pid, acts in app_env.activations.items():
        column = acts[layer, :, feature]
        active += int((column > 0).sum())
        total += column.numel()
        value, position = column.max(0)
        if float(value) > best:
            best, best_token = float(value), app_env.token_strings[pid][int(position)]
    return active / total, best_token, best


def top_logit_token(app_env: AtlasFixture, model: LoadedModel, layer: int, feature: int) -> str:
    """The token a feature's total decoder write raises most (demeaned unembedding), computed from the weights."""
    from atlas.transcoders import load_transcoder

    transcoder = load_transcoder(app_env.transcoder_dir)
    W_U = model.model.W_U.detach().float()
    with torch.no_grad():
        write = transcoder.decoder_vectors(layer, torch.tensor([feature])).sum(1)[0].float()
    return str(model.tokenizer.decode([int((write @ (W_U - W_U.mean(1, keepdim=True))).argmax())]))


def test_feature_search_and_dashboard(app_env: AtlasFixture, tiny_gpt2: LoadedModel) -> None:
    key = app_env.one_hop.source_key
    _, layer, feature = key.rsplit("/", 2)
    at = app_test("views/features.py")
    assert at.info, "an empty search shows a hint"
    at.text_input(key="feature_search").input(key).run()
    assert not errors(at), errors(at)
    results = frames(at, "matched on")[0]
    assert key in set(results["key"])
    assert at.selectbox(key="feature_pick").value == key
    density, top_token, top_value = feature_density(app_env, int(layer), int(feature))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["density (active tokens)"] == f"{density:.4%}"
    assert metrics["max activation"] == f"{top_value:.3g}"
    positive = frames(at, "token", "effect")[0]
    assert list(positive["effect"]) == sorted(positive["effect"], reverse=True)
    assert positive["token"].iloc[0] == top_logit_token(app_env, tiny_gpt2, int(layer), int(feature))
    mattering = frames(at, "best influence")[0]
    assert app_env.one_hop.prompt_id in set(mattering["prompt"])
    # the planted logit edge, aggregated over prompts, is among the downstream partners (the upstream table only
    # lists features, so a layer-0 feature may have none)
    partners = frames(at, "partner", "sum |weight|")
    assert any(((f["kind"] == "logit") & (f["label"] == app_env.one_hop.target)).any() for f in partners)
    if top_token.strip():  # search by a top activating token finds it too
        at.text_input(key="feature_search").input(top_token.strip()).run()
        assert not errors(at), errors(at)
        assert key in set(frames(at, "matched on")[0]["key"])
    at.text_input(key="feature_search").input("no-such-feature-xyz").run()
    assert "No feature matches" in at.warning[0].value


def test_prompt_graph_threshold_detail_and_pins(app_env: AtlasFixture) -> None:
    pid = app_env.one_hop.prompt_id
    stored = app_env.graphs[pid]
    at = app_test("views/prompt_graph.py")
    at.selectbox(key="prompt_pick").select(pid).run()
    assert not errors(at), errors(at)
    n_nodes, n_edges = stored.nodes.num_rows, stored.edges.num_rows
    assert at.caption[0].value.startswith(f"{n_nodes} nodes, {n_edges} edges")
    cautions = [w.value for w in at.warning if w.value.startswith("Dictionary caution")]
    expected = app_env.card.warning()  # the graph's dictionary card, as on the overview
    assert (cautions == []) if expected is None else (len(cautions) == 1 and expected in cautions[0])
    assert f"showing {n_nodes} of {n_nodes} nodes" in " ".join(c.value for c in at.caption)
    source_id = app_env.one_hop.node_ids[0]
    picker = at.selectbox(key="node_pick")
    picker.select_index(next(k for k, label in enumerate(picker.options) if label.startswith(source_id + " "))).run()
    detail = frames(at, "direction", "weight")[0]
    out = detail[detail["direction"] == "out"]
    assert app_env.one_hop.node_ids[1] in set(out["node"])
    weight = float(out[out["node"] == app_env.one_hop.node_ids[1]]["weight"].iloc[0])
    assert weight == pytest.approx(app_env.one_hop.weights[0], rel=1e-5)
    at.button(key="pin_node").click().run()
    assert len(at.session_state["pinned_select"]) == 1
    assert len(at.get("plotly_chart")) == 2  # the graph and the pinned subgraph
    at.slider(key="node_threshold").set_value(0.3).run()
    shown = next(c.value for c in at.caption if c.value.startswith("showing"))
    kept = int(shown.split()[1])
    rows = stored.nodes.to_pylist()
    expected = sum(
        1 for r in rows if r["kind"] in ("token", "logit") or r["influence"] is None or r["influence"] <= 0.3
    )
    assert kept == expected < n_nodes


def test_labels_set_on_the_features_page_appear_everywhere(app_env: AtlasFixture, neo4j_driver: Driver,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Ingest gave every stored feature its automatic label; a user label set on the Features page (editable, the
    default) shows on the prompt graph, the paths table and the interventions picker, is searchable, and can be
    edited from the graph's node detail and cleared back to the automatic label, with the history kept."""
    from atlas.storage.feature_stats import FeatureStatsStore
    from atlas.storage.labels import feature_label, label_history

    monkeypatch.setenv("ATLAS_LABEL_AUTHOR", "tester")
    path = app_env.one_hop
    key = path.source_key
    _, layer, index = key.rsplit("/", 2)
    automatic = FeatureStatsStore(app_env.stats_db).auto_labels({app_env.transcoder_id})
    assert automatic[(app_env.transcoder_id, int(layer), int(index))] == feature_label(neo4j_driver, key).auto_label
    stored = neo4j_driver.execute_query(
        "MATCH (f:Feature) WHERE f.transcoder = $t RETURN count(f) AS n, count(f.auto_label) AS labelled",
        t=app_env.transcoder_id,
    ).records[0]
    assert stored["n"] > 0 and stored["labelled"] == stored["n"]  # pushed at ingest, for every stored feature

    name = f"planted source {uuid.uuid4().hex[:6]}"
    at = app_test("views/features.py")
    at.text_input(key="feature_search").input(key).run()
    at.text_input(key=f"features_label_text_{key}").input(name)
    at.text_area(key=f"features_label_note_{key}").input("set by the app test")
    at.button(key="features_label_save").click().run()
    assert not errors(at), errors(at)
    assert any(name in m.value for m in at.markdown) and any(f"saved: {name}" in s.value for s in at.success)
    assert any("by tester" in c.value for c in at.caption)
    at.text_input(key="feature_search").input(name.upper()).run()  # search by label, case-blind
    assert list(frames(at, "matched on")[0]["key"]) == [key]

    linked = AppTest.from_file(str(APP), default_timeout=120)
    linked.query_params["prompt"] = path.prompt_id
    linked.query_params["node"] = path.node_ids[0]
    linked.run().switch_page("views/prompt_graph.py").run()
    assert not errors(linked), errors(linked)
    node_index = next(r["node_index"] for r in app_env.graphs[path.prompt_id].nodes.to_pylist()
                      if r["node_id"] == path.node_ids[0])  # fmt: skip
    assert linked.selectbox(key="node_pick").value == node_index  # ?node= opens that node's detail and label
    assert any(m.value.startswith(f"**Label:** {name}") for m in linked.markdown)
    graph = app_test("views/prompt_graph.py")
    graph.selectbox(key="prompt_pick").select(path.prompt_id).run()
    picker = graph.selectbox(key="node_pick")
    shown = next(o for o in picker.options if o.startswith(path.node_ids[0] + " "))
    assert name in shown  # node captions carry the label
    graph.selectbox(key="node_pick").select_index(picker.options.index(shown)).run()
    renamed = name + " (graph)"
    graph.text_input(key=f"graph_label_text_{key}").input(renamed)
    graph.button(key="graph_label_save").click().run()
    assert not errors(graph), errors(graph)
    assert feature_label(neo4j_driver, key).label == renamed

    paths = app_test("views/paths.py")
    run_paths(paths, path, hops=1)
    table = frames(paths, "rank", "path")[0]
    row = table[(table["prompt"] == path.prompt_id) & (table["path"] == " → ".join(path.node_ids))]
    assert row["source label"].iloc[0] == renamed and row["path labels"].iloc[0].startswith(renamed + " → ")

    iv = app_test("views/interventions.py")
    iv.selectbox(key="iv_prompt").select(path.prompt_id).run()
    assert any(renamed in o for o in iv.multiselect(key="iv_features").options)

    at.button(key="features_label_clear").click().run()  # back to the automatic label; nothing lost
    assert not errors(at), errors(at)
    after = feature_label(neo4j_driver, key)
    assert after.user_label is None and after.label == after.auto_label
    assert [(r.label, r.author) for r in label_history(neo4j_driver, key)][:3] == [
        (None, "tester"), (renamed, "tester"), (name, "tester")]  # fmt: skip


def test_explain_button_labels_a_feature_with_its_score(app_env: AtlasFixture, neo4j_driver: Driver,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from test_labels import ChatEndpoint

    from atlas.storage.labels import LabelEdit, feature_label, label_history, write_user_labels

    key = app_env.one_hop.source_key
    endpoint = ChatEndpoint()
    try:
        monkeypatch.setenv("ATLAS_EXPLAINER_URL", endpoint.url)
        monkeypatch.setenv("ATLAS_EXPLAINER_MODEL", "loopback-judge")
        at = app_test("views/features.py")
        at.text_input(key="feature_search").input(key).run()
        at.button(key="features_label_explain").click().run()
        assert not errors(at), errors(at)
    finally:
        endpoint.close()
    assert any(s.value.startswith("explained: Texas cities (detection ") for s in at.success)
    stored = feature_label(neo4j_driver, key)
    assert stored.label == "Texas cities" and stored.author == "explainer:loopback-judge"
    assert stored.score is not None and 0.0 <= stored.score <= 1.0
    assert any(f"detection score {stored.score:.2f}" in m.value for m in at.markdown)
    assert label_history(neo4j_driver, key)[0].source == "explainer"
    write_user_labels(neo4j_driver, [LabelEdit(key, None)])  # back to the automatic label for the other tests


def test_read_only_app_refuses_label_edits(app_env: AtlasFixture, neo4j_driver: Driver,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from app.config import load_config
    from app.label_edits import ReadOnlyError, save_label
    from atlas.storage.labels import feature_label, label_history

    monkeypatch.setenv("ATLAS_READ_ONLY", "1")
    key = app_env.one_hop.source_key
    before = (feature_label(neo4j_driver, key), label_history(neo4j_driver, key))
    at = app_test("views/features.py")
    at.text_input(key="feature_search").input(key).run()
    assert not errors(at), errors(at)
    assert any("read-only app" in c.value for c in at.caption)
    assert not [b for b in at.button if b.key == "features_label_save"]
    with pytest.raises(ReadOnlyError, match="read-only"):
        save_label(neo4j_driver, load_config(), key, "sneaky", None, database=app_env.connection.database)
    assert (feature_label(neo4j_driver, key), label_history(neo4j_driver, key)) == before
    monkeypatch.setenv("ATLAS_READ_ONLY", "maybe")
    with pytest.raises(ValueError, match="ATLAS_READ_ONLY"):
        load_config()


def run_paths(at: AppTest, path: PlantedPath, hops: int) -> None:
    at.text_area(key="path_sources").input(path.source_key)
    at.text_area(key="path_targets").input(path.target)
    at.number_input(key="path_hops").set_value(hops)
    at.number_input(key="path_min_w").set_value(0.5 * min(abs(w) for w in path.weights))
    at.button(key="run_paths").click().run()


def test_path_query_returns_the_planted_paths(app_env: AtlasFixture) -> None:
    at = app_test("views/paths.py")
    run_paths(at, app_env.one_hop, hops=1)
    assert not errors(at), errors(at)
    table = frames(at, "rank", "path")[0]
    expected = " → ".join(app_env.one_hop.node_ids)
    row = table[(table["prompt"] == app_env.one_hop.prompt_id) & (table["path"] == expected)]
    assert len(row) == 1
    assert float(row["strength"].iloc[0]) == pytest.approx(app_env.one_hop.weights[0], rel=1e-5)
    assert set(table["hops"]) == {1}
    assert len(at.get("plotly_chart")) == 2  # per-prompt drill-down and merged view
    if app_env.two_hop is not None:
        run_paths(at, app_env.two_hop, hops=2)
        table = frames(at, "rank", "path")[0]
        expected = " → ".join(app_env.two_hop.node_ids)
        row = table[(table["prompt"] == app_env.two_hop.prompt_id) & (table["path"] == expected)]
        assert len(row) == 1
        product = app_env.two_hop.weights[0] * app_env.two_hop.weights[1]
        assert float(row["strength"].iloc[0]) == pytest.approx(product, rel=1e-5)
    at.text_area(key="path_targets").input("").run()
    at.button(key="run_paths").click().run()
    assert "Give at least one target token." in errors(at)


def test_paths_page_examples_and_input_token_sources(app_env: AtlasFixture) -> None:
    """The first example is the Dallas query (it fills the form); an input token as the source finds the planted path
    from the feature active on that token (this tiny store has no " Dallas", so the token comes from the oracle)."""
    at = app_test("views/paths.py")
    at.button(key="path_example_0").click().run()
    assert at.text_input(key="path_token").value == " Dallas"
    assert "Austin" in at.text_area(key="path_targets").value and at.text_area(key="path_sources").value == ""
    path = app_env.one_hop
    position = int(path.node_ids[0].rsplit("_", 1)[1])
    token = app_env.token_strings[path.prompt_id][position]
    at.text_input(key="path_token").input(token)
    at.text_area(key="path_targets").input(path.target)
    at.number_input(key="path_hops").set_value(1)
    at.button(key="run_paths").click().run()
    assert not errors(at), errors(at)
    table = frames(at, "rank", "path")[0]
    row = table[(table["prompt"] == path.prompt_id) & (table["path"] == " → ".join(path.node_ids))]
    assert len(row) == 1 and float(row["strength"].iloc[0]) == pytest.approx(path.weights[0], rel=1e-5)
    for pid, first in zip(table["prompt"], (p.split(" → ")[0] for p in table["path"]), strict=True):
        assert app_env.token_strings[pid][int(first.rsplit("_", 1)[1])].strip() == token.strip()  # starts on it
    assert any("input token" in c.value for c in at.caption)
    at.text_input(key="path_token").input("").run()
    at.text_area(key="path_sources").input("").run()
    at.button(key="run_paths").click().run()
    assert "Give an input token, or pick or type at least one source feature." in errors(at)


def test_cypher_console_rejects_writes_and_returns_rows(app_env: AtlasFixture, neo4j_driver: Driver) -> None:
    count = "MATCH (n) RETURN count(n) AS n"
    before = neo4j_driver.execute_query(count).records[0]["n"]
    at = app_test("views/cypher.py")
    for query, word in (
        ("CREATE (x:Hacked {name: 'x'}) RETURN x", "CREATE"),
        ("MATCH (p:Prompt) DETACH DELETE p", "DETACH"),
        ("MATCH (p:Prompt) WITH p LIMIT 1 DELETE p", "DELETE"),
        ("CALL dbms.components()", "dbms"),
        ("MATCH (p:Prompt) SET p.text = 'x'", "SET"),
        ("LOAD CSV FROM 'file:///etc/passwd' AS row RETURN row", "LOAD CSV"),
        ("SHOW SETTINGS", "SHOW SETTINGS"),
        ("SHOW TRANSACTIONS YIELD currentQuery, parameters", "SHOW TRANSACTIONS"),
        ("CALL `db`.`stats`.collect('QUERIES')", "db.stats.collect"),
        ("INSERT (x:Hacked)", "INSERT"),
    ):
        at.text_area(key="cypher").input(query)
        at.button(key="run_cypher").click().run()
        assert at.error, query
        assert at.error[0].value.startswith("Rejected:") and word in at.error[0].value, at.error[0].value
        assert not at.dataframe
    assert neo4j_driver.execute_query(count).records[0]["n"] == before
    read = f"MATCH (p:Prompt) WHERE p.transcoder = '{app_env.transcoder_id}' RETURN p.id AS id, p.task AS task"
    at.text_area(key="cypher").input(read)
    at.button(key="run_cypher").click().run()
    assert not errors(at), errors(at)
    rows = frames(at, "id", "task")[0]
    assert set(rows["id"]) == set(app_env.graphs)
    at.button(key="example_3").click().run()  # paths example: loads the text, then run shows a graph
    assert at.text_area(key="cypher").value.startswith("MATCH p =")
    at.button(key="run_cypher").click().run()
    assert not errors(at), errors(at)
    assert at.get("plotly_chart"), "paths come back as a graph"


def test_intervention_changes_the_logits(
    app_env: AtlasFixture, tiny_gpt2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atlas.attribution.interventions import FeatureIntervention, intervene
    from atlas.transcoders import load_transcoder

    pid = app_env.one_hop.prompt_id
    node_id = app_env.one_hop.node_ids[0]
    at = app_test("views/interventions.py")
    at.selectbox(key="iv_prompt").select(pid).run()
    at.button(key="iv_run").click().run()
    assert "pick at least one feature to intervene on" in errors(at)
    at.multiselect(key="iv_features").select(node_id)
    at.selectbox(key="iv_op").select("ablate")
    at.selectbox(key="iv_mode").select("constrained")
    at.slider(key="iv_new_tokens").set_value(4)
    at.button(key="iv_run").click().run()
    assert not errors(at), errors(at)
    outcome = at.session_state["iv_result"]
    layer, feature, position = (int(x) for x in node_id.split("_"))
    transcoder = load_transcoder(app_env.transcoder_dir)
    tokens = torch.tensor(app_env.tokens[pid])
    ctx = build_context(tiny_gpt2, transcoder, tokens)
    edited = intervene(ctx, [FeatureIntervention(layer, feature, position, "ablate")], mode="constrained")
    delta = (edited.logits[-1].softmax(-1) - ctx.logits[-1].softmax(-1)).abs().max()
    assert float(delta) > 0
    assert outcome.max_abs_delta == pytest.approx(float(delta), rel=1e-4)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["max |Δ probability|"] == f"{float(delta):.4f}"
    table = frames(at, "before", "after", "delta")[0]
    assert (table["delta"].abs() > 0).any()
    assert len(at.code) == 2  # continuations with and without
    # Without --transcoders the dictionary is found through the directory it was ingested from (its weights-based
    # id is no path).
    monkeypatch.delenv("ATLAS_TRANSCODERS")
    again = app_test("views/interventions.py")
    again.selectbox(key="iv_prompt").select(pid).run()
    again.multiselect(key="iv_features").select(node_id)
    again.selectbox(key="iv_op").select("ablate")
    again.selectbox(key="iv_mode").select("constrained")
    again.slider(key="iv_new_tokens").set_value(4)
    again.button(key="iv_run").click().run()
    assert not errors(again), errors(again)
    assert again.session_state["iv_result"].max_abs_delta == pytest.approx(outcome.max_abs_delta, rel=1e-6)


def test_unreachable_store_shows_a_readable_error_on_every_page(monkeypatch: pytest.MonkeyPatch) -> None:
    from atlas.storage.neo4j_server import free_loopback_port

    monkeypatch.setenv("ATLAS_NEO4J_URI", f"bolt://127.0.0.1:{free_loopback_port()}")  # nothing listens there
    monkeypatch.setenv("NEO4J_PASSWORD", "x")
    at = app_test()
    for page in (None, "views/features.py", "views/prompt_graph.py", "views/paths.py", "views/interventions.py",
                 "views/edits.py"):  # fmt: skip
        if page is not None:
            at.switch_page(page).run()
        assert not at.exception, at.exception
        assert at.error and "does not answer" in at.error[0].value, (page, errors(at))


def global_circuits_store(app_env: AtlasFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Global weights (DuckDB), motifs and clusters (Neo4j) of the fixture store, by the CLI as a user makes them."""
    from typer.testing import CliRunner

    from atlas_cli.main import app as cli

    monkeypatch.setenv("NEO4J_URI", app_env.connection.uri)  # the CLI's variable; the app reads ATLAS_NEO4J_URI
    runner = CliRunner()
    for args in (["weights", "--transcoders", str(app_env.transcoder_dir), "--model", app_env.model_name, "--k", "8"],
                 ["motifs", "mine", "--min-strength", "0.0001", "--dictionary", app_env.transcoder_id],
                 ["clusters", "build", "--dictionary", app_env.transcoder_id]):  # fmt: skip
        result = runner.invoke(cli, ["global", *args])
        assert result.exit_code == 0, result.output
    monkeypatch.delenv("NEO4J_URI")


def test_global_circuits_page_shows_weights_motifs_and_clusters(
    app_env: AtlasFixture, neo4j_driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.store import parse_feature_key
    from atlas.storage.clusters import list_clusters
    from atlas.storage.global_weights import read_global_weights
    from atlas.storage.motifs import list_motifs

    global_circuits_store(app_env, monkeypatch)
    database = app_env.connection.database
    try:
        path = app_env.two_hop or app_env.one_hop
        key = path.source_key
        at = app_test("views/global_circuits.py")
        assert not errors(at), errors(at)
        at.text_input(key="global_feature").set_value(key).run()
        assert not errors(at), errors(at)
        tc, layer, index = parse_feature_key(key)
        stored = read_global_weights(app_env.stats_db, tc, layer, index)
        wanted = [[(f"{tc}/{r['partner_layer']}/{r['partner']}", r["v"]) for r in stored if r["relation"] == rel][:12]
                  for rel in ("feature_in", "feature_out")]  # fmt: skip
        shown = frames(at, "partner", "v", "era", "twera", "empirical mean attribution")
        assert [list(zip(f["partner"], f["v"], strict=True)) for f in shown] == [w for w in wanted if w]
        assert wanted[1], "a layer-0 feature of the tiny CLT writes to later features"
        # the empirical column is the aggregate layer's mean attribution of the same pair
        agg = {r["t"]: r["mean"] for r in neo4j_driver.execute_query(
            "MATCH (:Feature {key: $k})-[g:AGG_EDGE]->(t:Feature) RETURN t.key AS t, "
            "toFloat(g.sum_weight_fx) / 2.0 ^ 32 / g.n_prompts AS mean", k=key, database_=database,
        ).records}  # fmt: skip
        for partner, mean in zip(shown[-1]["partner"], shown[-1]["empirical mean attribution"], strict=True):
            if partner in agg:
                assert mean == pytest.approx(agg[partner], rel=1e-6, abs=1e-9)
            else:
                assert pd_isna(mean)
        through = list_motifs(neo4j_driver, database, tc, feature=key, limit=25)
        corpus = list_motifs(neo4j_driver, database, tc, kind="logit", order="support", limit=50)
        assert corpus, "the fixture's graphs hold feature → feature → logit paths"
        motif_frames = frames(at, "path", "support", "mean strength")
        assert len(motif_frames) == (2 if through else 1)
        if through:
            assert list(motif_frames[0]["support"]) == [r["support"] for r in through]
        assert list(motif_frames[-1]["support"]) == [r["support"] for r in corpus]
        assert len(at.get("plotly_chart")) >= 2
        clusters = list_clusters(neo4j_driver, database, tc, limit=50, prompts=20)
        cluster_frames = frames(at, "cluster", "size", "cohesion")
        assert [list(f["size"]) for f in cluster_frames] == ([[c["size"] for c in clusters]] if clusters else [])
        # a malformed key is a readable error, not a crash
        at.text_input(key="global_feature").set_value("not-a-key").run()
        assert not at.exception and any("feature key" in e.value for e in at.error), errors(at)
    finally:
        neo4j_driver.execute_query("MATCH (n) WHERE n:Motif OR n:MotifRun OR n:Cluster OR n:ClusterRun DETACH DELETE n",
                                   database_=database)  # fmt: skip


def test_global_circuits_page_shows_one_dictionary_at_a_time(
    app_env: AtlasFixture, tiny_gpt2: LoadedModel, neo4j_driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second dictionary's prompts beside the fixture's, each mined and clustered: the page's picker shows one
    dictionary at a time, with exactly its own motifs, mined-prompt count and clusters."""
    from typer.testing import CliRunner

    from atlas.attribution.engine import AttributionConfig, attribute
    from atlas.storage.clusters import cluster_run
    from atlas.storage.motifs import list_motifs, motif_run
    from atlas.transcoders import load_transcoder
    from atlas_cli.main import app as cli

    database = app_env.connection.database
    ours = app_env.transcoder_id
    other = f"{ours.split('-')[0]}-{uuid.uuid4().hex[:16]}"  # the fixture's weights under a second dictionary id
    transcoder = load_transcoder(app_env.transcoder_dir)
    texts = [graph.text for graph in app_env.graphs.values()][:4]
    writer = GraphWriter(neo4j_driver, database)
    pids = [f"{other}-{i}" for i in range(len(texts))]
    for pid, text in zip(pids, texts, strict=True):
        nodes, edges = attribute(
            tiny_gpt2, transcoder, text, config=AttributionConfig(), transcoder_id=other
        ).to_tables(pid)
        writer.write_prompts([({"id": pid, "text": text, "model": app_env.model_name, "transcoder": other}, nodes,
                               edges)])  # fmt: skip
    try:
        monkeypatch.setenv("NEO4J_URI", app_env.connection.uri)  # the CLI's variable; the app reads ATLAS_NEO4J_URI
        for dictionary in (other, ours):
            for args in (["motifs", "mine", "--min-strength", "0.0001"], ["clusters", "build"]):
                result = CliRunner().invoke(cli, ["global", *args, "--dictionary", dictionary])
                assert result.exit_code == 0, result.output
        monkeypatch.delenv("NEO4J_URI")
        at = app_test("views/global_circuits.py")
        assert not errors(at), errors(at)
        picker = next(b for b in at.selectbox if b.label.startswith("Dictionary"))
        assert {ours, other} <= set(picker.options)
        for dictionary in (other, ours):
            next(b for b in at.selectbox if b.label.startswith("Dictionary")).set_value(dictionary).run()
            assert not errors(at), errors(at)
            run, crun = motif_run(neo4j_driver, database, dictionary), cluster_run(neo4j_driver, database, dictionary)
            assert run is not None and crun is not None
            captions = [c.value for c in at.caption]
            assert f"{dictionary}: {run['n_prompts']} prompts mined" in " ".join(captions), captions
            assert f"{dictionary}: {crun['n_clusters']} clusters of {crun['n_prompts']} prompts" in " ".join(captions)
            corpus = list_motifs(neo4j_driver, database, dictionary, kind="logit", order="support", limit=50)
            shown = [list(f["support"]) for f in frames(at, "path", "support", "mean strength")]
            assert shown == ([[r["support"] for r in corpus]] if corpus else []), (dictionary, shown)
        assert motif_run(neo4j_driver, database, other)["n_prompts"] == len(texts)  # type: ignore[index]
    finally:
        for pid in pids:
            writer.delete_prompt(pid)
        neo4j_driver.execute_query(
            "MATCH (n) WHERE n:Motif OR n:MotifRun OR n:Cluster OR n:ClusterRun OR (n:Feature AND n.transcoder = $t) "
            "OR (n:Transcoder AND n.id = $t) DETACH DELETE n",
            t=other, database_=database,
        )  # fmt: skip


def pd_isna(value: object) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_validate_a_path_result_then_see_it_on_the_feature_page(
    app_env: AtlasFixture, tiny_gpt2: LoadedModel, neo4j_driver: Driver
) -> None:
    """The paths page's Validate action runs the validation stage on the path prompts, plots circuit against null
    values, and stores it; the oracle is `atlas.validation.validate` called directly on the same prompts."""
    from atlas.storage.validations import ValidationStore
    from atlas.transcoders import load_transcoder
    from atlas.validation.validate import Circuit, TargetSpec, ValidationConfig, validate

    path = app_env.one_hop
    at = app_test("views/paths.py")
    run_paths(at, path, hops=1)
    assert not errors(at), errors(at)
    at.number_input(key="val_top_k").set_value(1)
    at.number_input(key="val_n_null").set_value(5)
    at.button(key="run_validation").click().run()
    assert not errors(at), errors(at)
    report, keys, stored_id = at.session_state["val_result"]
    assert keys == [path.source_key] and stored_id is not None
    result_prompts = [p.prompt_id for p in report.prompts]
    assert path.prompt_id in result_prompts
    transcoder = load_transcoder(app_env.transcoder_dir)
    _, layer, feature = path.source_key.rsplit("/", 2)
    texts = [app_env.graphs[pid].text for pid in result_prompts]
    oracle = validate(tiny_gpt2, transcoder, Circuit.of([(int(layer), int(feature))], transcoder), texts,
                      TargetSpec.token(path.target), config=ValidationConfig(n_null=5, top_k_agreement=10))  # fmt: skip
    for got, want in zip(report.prompts, oracle.prompts, strict=True):
        assert got.necessity_zero == pytest.approx(want.necessity_zero, rel=1e-4, abs=1e-6)
        assert got.null_necessity == pytest.approx(want.null_necessity, rel=1e-4, abs=1e-6)
    prompts = frames(at, "necessity", "p necessity", "beats null")[0]
    assert list(prompts["prompt"]) == result_prompts
    assert len(at.get("plotly_chart")) >= 4  # drill-down, merged, per-prompt null plot, pooled
    # stored, and shown on the feature's page as a measured ablation effect
    at = app_test("views/features.py")
    at.text_input(key="feature_search").input(path.source_key).run()
    assert not errors(at), errors(at)
    tested = frames(at, "necessity", "sufficiency", "beats_null")[0]
    row = tested[tested["id"] == stored_id]
    assert len(row) == 1 and float(row["necessity"].iloc[0]) == pytest.approx(report.summary("necessity_zero").mean)
    ValidationStore(neo4j_driver, app_env.stats_db.with_name("validations.duckdb"),
                    app_env.connection.database).delete(stored_id)  # fmt: skip


def test_edits_page_reports_the_edit(app_env: AtlasFixture, tiny_gpt2: LoadedModel) -> None:
    from atlas.transcoders import load_transcoder
    from atlas.validation.edits import FeatureEdit, apply_edit

    path = app_env.one_hop
    others = [pid for pid in app_env.graphs if pid != path.prompt_id]
    at = app_test("views/edits.py")
    at.button(key="edit_run").click().run()
    assert "choose at least one target prompt" in errors(at)
    at.text_area(key="edit_features").input(path.source_key)
    at.multiselect(key="edit_targets").select(path.prompt_id)
    at.text_input(key="edit_answer").input(path.target)
    at.multiselect(key="edit_controls").select(others[0])
    at.button(key="edit_run").click().run()
    assert not errors(at), errors(at)
    report = at.session_state["edit_result"]
    transcoder = load_transcoder(app_env.transcoder_dir)
    _, layer, feature = path.source_key.rsplit("/", 2)
    target, control = [(app_env.graphs[path.prompt_id].text, path.target)], [app_env.graphs[others[0]].text]
    oracle = apply_edit(tiny_gpt2, transcoder, FeatureEdit(((int(layer), int(feature)),)), target, control)
    assert report.target_logit_change == pytest.approx(oracle.target_logit_change, rel=1e-4, abs=1e-6)
    assert report.control_kl == pytest.approx(oracle.control_kl, rel=1e-4, abs=1e-9)
    table = frames(at, "set", "Δ logit", "KL")[0]
    assert list(table["set"]) == ["target", "control"]
    assert frames(at, "before", "after")[0]["prompt"].iloc[0] == app_env.graphs[path.prompt_id].text
    at.text_area(key="edit_features").input("0/99999")
    at.button(key="edit_run").click().run()
    assert any("unknown feature" in e for e in errors(at)), errors(at)
