"""Motifs: the path miner against brute-force enumeration on toy graphs, alternatives, and on a real Neo4j store the
planted two-hop path of `tests.planted_model` as the top motif, incremental add / re-ingest / delete, idempotence."""

from __future__ import annotations

import itertools
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from neo4j import Driver
from typer.testing import CliRunner

from atlas.analysis.corpus_motifs import mine_store
from atlas.analysis.motifs import (
    Contribution,
    MotifError,
    PromptGraph,
    alternatives,
    mine_motifs,
    motif_key,
    prompt_paths,
)
from atlas.attribution.engine import AttributionConfig, attribute
from atlas.storage.graph_schema import token_key
from atlas.storage.motifs import MotifStoreError, list_motifs, motif_contributions
from atlas.storage.neo4j_server import Neo4jConnection
from atlas.storage.neo4j_writer import GraphWriter
from atlas_cli.main import app
from tests.planted_model import HOP1, HOP2, TARGET_TOKEN, planted_model, planted_transcoder


def toy(pid: str, middle: str, weight_mid: float = 1.0) -> PromptGraph:
    """token T → a → {middle} → logit L (p 0.8), plus an error input of L: a → middle is the only input of middle."""
    kinds = ["token", "feature", "feature", "logit", "error"]
    keys = ["m/7", "tc/0/1", f"tc/1/{middle}", "m/9", None]
    edges = [(0, 1, 2.0), (1, 2, weight_mid), (2, 3, 3.0), (4, 3, -1.0)]
    return PromptGraph(pid, kinds, keys, [0.0, 0.0, 0.0, 0.8, 0.0], edges)


def test_toy_paths_have_the_normalised_strengths_by_hand() -> None:
    paths = prompt_paths(toy("p", "2"), min_strength=0.01, max_features=4)
    # b → L carries 3 of L's |input| 4; a is b's only input, T is a's only input: 0.8 · 0.75 · 1 = 0.6
    # (T → a is not a token chain of its own: a reaches the logit only through b, so its chain is T → a → b)
    assert set(paths) == {("logit", ("tc/0/1", "tc/1/2", "m/9")), ("token", ("m/7", "tc/0/1", "tc/1/2"))}
    for contribution in paths.values():
        assert contribution.strength == pytest.approx(0.6) and contribution.n_paths == 1
    assert prompt_paths(toy("p", "2"), min_strength=0.61) == {}


def brute_force(graph: PromptGraph, min_strength: float, max_features: int) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every simple path into each logit, by enumeration of node sequences (independent of the miner's search)."""
    n = len(graph.kinds)
    weight: dict[tuple[int, int], float] = defaultdict(float)
    total_in = [0.0] * n
    for s, t, w in graph.edges:
        weight[(s, t)] += abs(w)
        total_in[t] += abs(w)
    features = [i for i in range(n) if graph.kinds[i] == "feature"]
    out: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
    for logit in (i for i in range(n) if graph.kinds[i] == "logit"):
        for length in range(1, max_features + 1):
            for chain in itertools.permutations(features, length):
                hops = [*itertools.pairwise(chain), (chain[-1], logit)]
                if any((s, t) not in weight for s, t in hops):
                    continue
                strength = graph.probability[logit]
                prefix_ok = strength >= min_strength
                for s, t in reversed(hops):  # the miner stops a path as soon as its strength drops below
                    strength *= weight[(s, t)] / total_in[t]
                    prefix_ok = prefix_ok and strength >= min_strength
                if not prefix_ok:
                    continue
                names = tuple(graph.keys[i] or "" for i in chain)
                if length >= 2:
                    out[("logit", (*names, graph.keys[logit] or ""))] += strength
                for token in (i for i in range(n) if graph.kinds[i] == "token"):
                    if (token, chain[0]) in weight and length <= max_features - 1:
                        s = strength * weight[(token, chain[0])] / total_in[chain[0]]
                        if s >= min_strength:
                            out[("token", (graph.keys[token] or "", *names))] += s
    return dict(out)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_features", [2, 4])
def test_miner_finds_exactly_the_brute_force_paths(seed: int, max_features: int) -> None:
    """Random layered DAGs (tokens → 4 feature layers → logits, with error inputs and duplicate feature keys)."""
    rng = random.Random(seed)
    kinds, keys, probability = [], [], []
    layers: list[list[int]] = []
    for layer, width in enumerate([3, 4, 4, 4, 4, 3]):
        kind = "token" if layer == 0 else "logit" if layer == 5 else "feature"
        layers.append([])
        for j in range(width):
            layers[-1].append(len(kinds))
            kinds.append(kind)
            keys.append(f"m/{j}" if kind != "feature" else f"tc/{layer}/{rng.randrange(3)}")
            probability.append(rng.uniform(0.05, 0.6) if kind == "logit" else 0.0)
    kinds.append("error"), keys.append(None), probability.append(0.0)
    edges = [(s, t, rng.uniform(-2, 2)) for a, b in itertools.combinations(range(6), 2)
             for s in layers[a] for t in layers[b] if rng.random() < 0.5]  # fmt: skip
    edges += [(len(kinds) - 1, t, rng.uniform(-1, 1)) for layer in layers[1:] for t in layer]
    graph = PromptGraph("r", kinds, keys, probability, edges)
    got = prompt_paths(graph, min_strength=0.005, max_features=max_features)
    want = brute_force(graph, 0.005, max_features)
    assert set(got) == set(want)
    assert got, "the random graph has paths above the threshold"
    for key, contribution in got.items():
        assert contribution.strength == pytest.approx(want[key], rel=1e-12)  # float64 sums of the same terms


def test_mine_sums_support_and_alternatives_show_input_dependent_routing() -> None:
    per_prompt = {pid: prompt_paths(toy(pid, middle)) for pid, middle in
                  (("p1", "2"), ("p2", "2"), ("p3", "3"), ("p4", "2"))}  # fmt: skip
    motifs = mine_motifs(per_prompt)
    top = motifs[0]
    assert top.nodes in {("tc/0/1", "tc/1/2", "m/9"), ("m/7", "tc/0/1", "tc/1/2")}
    assert (top.support, top.mean_strength, top.total_strength) == (3, pytest.approx(0.6), pytest.approx(1.8))
    assert top.key == motif_key(top.kind, top.nodes) and set(top.prompts) == {"p1", "p2", "p4"}
    assert [m.support for m in mine_motifs(per_prompt, min_support=2)] == [3, 3]
    groups = alternatives(motifs)
    logit = next(g for g in groups if g.kind == "logit")
    assert (logit.source, logit.end) == ("tc/0/1", "m/9")
    assert [m.intermediates for m in logit.routes] == [("tc/1/2",), ("tc/1/3",)]
    assert (logit.n_prompts, logit.exclusive_prompts) == (4, 4), "each prompt takes one route: input-dependent"
    with pytest.raises(MotifError, match="min_strength"):
        prompt_paths(toy("p", "2"), min_strength=0.0)
    with pytest.raises(MotifError, match="max_features"):
        prompt_paths(toy("p", "2"), max_features=5)
    with pytest.raises(MotifError, match="min_support"):
        mine_motifs(per_prompt, min_support=0)
    assert mine_motifs({"p": {("logit", ("a", "b", "c")): Contribution(0.5, 1)}})[0].support == 1


# -- the planted model on a real store ------------------------------------------------------------------------------

A_PROMPTS = ["xyA", "hello A", "the A", "q A", "mA"]
OTHER_PROMPTS = ["A b", "abc", "zz"]


@pytest.fixture
def planted_store(
    neo4j_driver: Driver, neo4j_connection: Neo4jConnection, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[GraphWriter, str, dict[str, tuple[dict[str, object], object, object]]]]:
    for name, value in (("NEO4J_URI", neo4j_connection.uri), ("NEO4J_USER", neo4j_connection.user),
                        ("NEO4J_PASSWORD", neo4j_connection.password), ("NEO4J_DATABASE", neo4j_connection.database),
                        ("COLUMNS", "200")):  # fmt: skip
        monkeypatch.setenv(name, value)
    model = planted_model()
    transcoder = planted_transcoder(model)
    tc = f"planted-{uuid.uuid4().hex[:8]}"
    writer = GraphWriter(neo4j_driver, neo4j_connection.database)
    graphs = {}
    for i, text in enumerate(A_PROMPTS + OTHER_PROMPTS):
        graph = attribute(model, transcoder, text, config=AttributionConfig(), transcoder_id=tc)
        pid = f"{tc}-{i}"
        nodes, edges = graph.to_tables(pid)
        graphs[pid] = ({"id": pid, "text": text, "model": model.info.name, "transcoder": tc, "run": tc}, nodes, edges)
    writer.write_prompts(list(graphs.values()))
    yield writer, tc, graphs
    for pid in graphs:
        writer.delete_prompt(pid)
    neo4j_driver.execute_query("MATCH (m:Motif) DETACH DELETE m", database_=neo4j_connection.database)
    neo4j_driver.execute_query("MATCH (r:MotifRun) DELETE r", database_=neo4j_connection.database)
    neo4j_driver.execute_query("MATCH (f:Feature {transcoder: $tc}) DETACH DELETE f", tc=tc,
                               database_=neo4j_connection.database)  # fmt: skip


def _state(driver: Driver, database: str) -> list[tuple[object, ...]]:
    return [tuple(r.values()) for r in driver.execute_query(
        "MATCH (m:Motif) OPTIONAL MATCH (m)-[s:SEEN_IN]->(p:Prompt) WITH m, p, s ORDER BY m.key, p.id "
        "RETURN m.key, m.support, round(m.total_strength, 9), collect([p.id, round(s.strength, 9)])",
        database_=database).records]  # fmt: skip


def test_planted_two_hop_path_is_the_top_motif_and_updates_are_incremental(
    planted_store: tuple[GraphWriter, str, dict[str, tuple[dict[str, object], object, object]]],
    neo4j_driver: Driver, neo4j_connection: Neo4jConnection, tmp_path: Path,
) -> None:  # fmt: skip
    writer, tc, graphs = planted_store
    database = neo4j_connection.database
    runner = CliRunner()
    model_name = next(iter(graphs.values()))[0]["model"]
    b_id = planted_model().tokenizer.convert_tokens_to_ids(TARGET_TOKEN)
    planted = ("logit", (f"{tc}/{HOP1[0]}/{HOP1[1]}", f"{tc}/{HOP2[0]}/{HOP2[1]}", token_key(str(model_name), b_id)))

    mined = runner.invoke(app, ["global", "motifs", "mine", "--min-strength", "0.001"])
    assert mined.exit_code == 0, mined.output
    ours = [r for r in list_motifs(neo4j_driver, database, limit=10_000) if r["nodes"][0].startswith(tc)]
    assert (ours[0]["kind"], tuple(ours[0]["nodes"])) == planted
    assert len(ours) >= 10, "distractor paths (off 'A') are motifs too, with less support and strength"
    # all of B's logit comes through the two hops, so the path carries B's whole probability
    nodes = graphs[f"{tc}-0"][1].to_pylist()  # type: ignore[attr-defined]
    p_b = next(n["probability"] for n in nodes if n["kind"] == "logit" and n["token_id"] == b_id)
    assert ours[0]["support"] == len(A_PROMPTS) and ours[0]["mean"] == pytest.approx(p_b, rel=0.02), (ours[0], p_b)
    by_support = list_motifs(neo4j_driver, database, kind="logit", order="support", limit=10_000,
                             feature=f"{tc}/{HOP1[0]}/{HOP1[1]}")  # fmt: skip
    assert tuple(by_support[0]["nodes"]) == planted[1]
    # the token end of the same circuit: 'A' → hop 1 → hop 2
    token_rows = list_motifs(neo4j_driver, database, kind="token", limit=10_000, feature=f"{tc}/{HOP2[0]}/{HOP2[1]}")
    assert tuple(token_rows[0]["nodes"][1:]) == planted[1][:2] and token_rows[0]["support"] == len(A_PROMPTS)
    listed = runner.invoke(app, ["global", "motifs", "list", "--top", "3"])
    assert listed.exit_code == 0 and "'B'" in listed.output, listed.output
    # Cypher-queryable: the motif's features in path order, and its supporting prompts
    record = neo4j_driver.execute_query(
        "MATCH (m:Motif {key: $k})-[h:HAS]->(x) WITH m, x ORDER BY h.pos WITH m, collect(x.key) AS nodes "
        "MATCH (m)-[:SEEN_IN]->(p:Prompt) RETURN nodes, collect(p.text) AS texts",
        k=motif_key(*planted), database_=database).records[0]  # fmt: skip
    assert tuple(record["nodes"]) == planted[1] and sorted(record["texts"]) == sorted(A_PROMPTS)

    full = _state(neo4j_driver, database)
    assert runner.invoke(app, ["global", "motifs", "mine", "--min-strength", "0.001"]).exit_code == 0
    assert _state(neo4j_driver, database) == full, "re-mining gives the same store"
    again = runner.invoke(app, ["global", "motifs", "update", "--min-strength", "0.001"])
    assert again.exit_code == 0 and "update: 0 of" in again.output, again.output
    assert _state(neo4j_driver, database) == full

    # delete one A prompt and re-ingest a non-A one: the update touches exactly those, and equals a full re-mine
    a_pid, other_pid = f"{tc}-0", f"{tc}-{len(A_PROMPTS)}"
    writer.delete_prompt(a_pid)
    writer.write_prompts([graphs[other_pid]])
    report = mine_store(neo4j_driver, database, full=False, min_strength=0.001)
    assert report.mined == 1 and report.removed > 0
    incremental = _state(neo4j_driver, database)
    mine_store(neo4j_driver, database, full=True, min_strength=0.001)
    assert _state(neo4j_driver, database) == incremental
    top = next(r for r in list_motifs(neo4j_driver, database, limit=10_000) if r["nodes"][0].startswith(tc))
    assert tuple(top["nodes"]) == planted[1] and top["support"] == len(A_PROMPTS) - 1
    assert a_pid not in motif_contributions(neo4j_driver, database)
    with pytest.raises(MotifStoreError, match="same"):
        mine_store(neo4j_driver, database, full=False, min_strength=0.01)

    # bad input: clear errors, store unchanged
    before = _state(neo4j_driver, database)
    bad_args = ((["list", "--feature", f"{tc}/9/9"], "no feature"), (["sort"], "unknown action"),
                (["mine", "--min-strength", "0"], "min-strength"), (["list", "--kind", "edge"], "--kind"),
                (["mine", "--max-features", "7"], "max-features"), (["list", "--top", "0"], "top"))  # fmt: skip
    for args, message in bad_args:
        bad = runner.invoke(app, ["global", "motifs", *args])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    assert _state(neo4j_driver, database) == before


def _clusters(driver: Driver, database: str) -> list[tuple[object, ...]]:
    return [tuple(r.values()) for r in driver.execute_query(
        "MATCH (c:Cluster) OPTIONAL MATCH (c)-[:CONTAINS]->(p:Prompt) WITH c, p ORDER BY p.id "
        "RETURN c.key, c.size, round(c.cohesion, 9), c.features, c.motifs, collect(p.id) ORDER BY c.key",
        database_=database).records]  # fmt: skip


def test_planted_prompts_cluster_by_their_circuit_idempotently(
    planted_store: tuple[GraphWriter, str, dict[str, tuple[dict[str, object], object, object]]],
    neo4j_driver: Driver, neo4j_connection: Neo4jConnection,
) -> None:  # fmt: skip
    """Prompts ending in 'A' run the planted two hops, the others the distractors: two clusters, each characterised
    by its own features (and the planted cluster by the planted motif); a rebuild stores the same."""
    _, tc, graphs = planted_store
    database = neo4j_connection.database
    runner = CliRunner()
    neo4j_driver.execute_query("MATCH (c:Cluster) DETACH DELETE c", database_=database)
    neo4j_driver.execute_query("MATCH (r:ClusterRun) DELETE r", database_=database)
    empty = runner.invoke(app, ["global", "clusters", "list"])
    assert empty.exit_code == 2 and "no clusters stored" in empty.output, empty.output
    assert runner.invoke(app, ["global", "motifs", "mine"]).exit_code == 0
    built = runner.invoke(app, ["global", "clusters", "build"])
    assert built.exit_code == 0 and "clusters of" in built.output, built.output
    state = _clusters(neo4j_driver, database)
    a_ids = {f"{tc}-{i}" for i in range(len(A_PROMPTS))}
    other_ids = set(graphs) - a_ids
    ours = [c for c in state if set(c[5]) & set(graphs)]  # type: ignore[arg-type]
    assert {frozenset(c[5]) for c in ours} == {frozenset(a_ids), frozenset(other_ids)}  # type: ignore[arg-type]
    planted_cluster = next(c for c in ours if set(c[5]) == a_ids)  # type: ignore[arg-type]
    hop_keys = {f"{tc}/{HOP1[0]}/{HOP1[1]}", f"{tc}/{HOP2[0]}/{HOP2[1]}"}
    assert hop_keys <= set(planted_cluster[3]), planted_cluster  # type: ignore[arg-type]
    assert any(k.startswith(f"logit:{tc}/0/0 > {tc}/1/0 > ") for k in planted_cluster[4]), planted_cluster  # type: ignore[union-attr]
    other_cluster = next(c for c in ours if set(c[5]) == other_ids)  # type: ignore[arg-type]
    assert not hop_keys & set(other_cluster[3])  # type: ignore[arg-type]
    # Cypher: a prompt's cluster and the cluster's characteristic features
    rows = neo4j_driver.execute_query(
        "MATCH (c:Cluster)-[:CONTAINS]->(:Prompt {id: $p}) MATCH (c)-[r:CHARACTERISED_BY]->(f:Feature) "
        "RETURN f.key AS key ORDER BY r.rank", p=f"{tc}-0", database_=database).records  # fmt: skip
    assert hop_keys <= {r["key"] for r in rows}
    listed = runner.invoke(app, ["global", "clusters", "list"])
    assert listed.exit_code == 0 and "xyA" in listed.output, listed.output
    assert runner.invoke(app, ["global", "clusters", "build"]).exit_code == 0
    assert _clusters(neo4j_driver, database) == state, "a rebuild stores the same clusters"
    for args, message in ((["build", "--eps", "0"], "--eps"), (["build", "--min-samples", "1"], "min-samples"),
                          (["group"], "unknown action"), (["build", "--neighbours", "0"], "neighbours")):  # fmt: skip
        bad = runner.invoke(app, ["global", "clusters", *args])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    assert _clusters(neo4j_driver, database) == state
    neo4j_driver.execute_query("MATCH (c:Cluster) DETACH DELETE c", database_=database)
    neo4j_driver.execute_query("MATCH (r:ClusterRun) DELETE r", database_=database)
