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
import torch
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
    _drop_dictionary(neo4j_driver, neo4j_connection.database, tc)


def _drop_dictionary(driver: Driver, database: str, tc: str) -> None:
    """Remove what a test stored for dictionary `tc` (its prompts are deleted by the writer)."""
    driver.execute_query(
        "MATCH (n) WHERE (n:Motif OR n:MotifRun OR n:Cluster OR n:ClusterRun OR n:Feature) AND n.transcoder = $tc "
        "DETACH DELETE n",
        tc=tc, database_=database,
    )  # fmt: skip


def _state(driver: Driver, database: str, tc: str | None = None) -> list[tuple[object, ...]]:
    """Every Motif (of dictionary `tc`, else all) with its sums and per-prompt contributions, and the runs."""
    motifs = [tuple(r.values()) for r in driver.execute_query(
        "MATCH (m:Motif) WHERE $tc IS NULL OR m.transcoder = $tc OPTIONAL MATCH (m)-[s:SEEN_IN]->(p:Prompt) "
        "WITH m, p, s ORDER BY m.key, p.id "
        "RETURN m.key, m.transcoder, m.support, round(m.total_strength, 9), collect([p.id, round(s.strength, 9)])",
        tc=tc, database_=database).records]  # fmt: skip
    runs = [tuple(r.values()) for r in driver.execute_query(
        "MATCH (r:MotifRun) WHERE $tc IS NULL OR r.transcoder = $tc "
        "RETURN r.name, r.transcoder, r.min_strength, r.max_features, r.n_prompts ORDER BY r.name",
        tc=tc, database_=database).records]  # fmt: skip
    return motifs + runs


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

    scope = ["--dictionary", tc]  # the session's store may hold other tests' dictionaries
    mined = runner.invoke(app, ["global", "motifs", "mine", "--min-strength", "0.001", *scope])
    assert mined.exit_code == 0, mined.output
    ours = list_motifs(neo4j_driver, database, tc, kind="logit", limit=10_000)
    assert (ours[0]["kind"], tuple(ours[0]["nodes"])) == planted
    assert len(ours) >= 10, "distractor paths (off 'A') are motifs too, with less support and strength"
    # all of B's logit comes through the two hops, so the path carries B's whole probability
    nodes = graphs[f"{tc}-0"][1].to_pylist()  # type: ignore[attr-defined]
    p_b = next(n["probability"] for n in nodes if n["kind"] == "logit" and n["token_id"] == b_id)
    assert ours[0]["support"] == len(A_PROMPTS) and ours[0]["mean"] == pytest.approx(p_b, rel=0.02), (ours[0], p_b)
    by_support = list_motifs(neo4j_driver, database, tc, kind="logit", order="support", limit=10_000,
                             feature=f"{tc}/{HOP1[0]}/{HOP1[1]}")  # fmt: skip
    assert tuple(by_support[0]["nodes"]) == planted[1]
    # the token end of the same circuit: 'A' → hop 1 → hop 2
    token_rows = list_motifs(
        neo4j_driver, database, tc, kind="token", limit=10_000, feature=f"{tc}/{HOP2[0]}/{HOP2[1]}"
    )
    assert tuple(token_rows[0]["nodes"][1:]) == planted[1][:2] and token_rows[0]["support"] == len(A_PROMPTS)
    listed = runner.invoke(app, ["global", "motifs", "list", "--top", "3", *scope])
    assert listed.exit_code == 0 and "'B'" in listed.output, listed.output
    # Cypher-queryable: the motif's features in path order, and its supporting prompts
    record = neo4j_driver.execute_query(
        "MATCH (m:Motif {key: $k})-[h:HAS]->(x) WITH m, x ORDER BY h.pos WITH m, collect(x.key) AS nodes "
        "MATCH (m)-[:SEEN_IN]->(p:Prompt) RETURN nodes, collect(p.text) AS texts",
        k=motif_key(*planted), database_=database).records[0]  # fmt: skip
    assert tuple(record["nodes"]) == planted[1] and sorted(record["texts"]) == sorted(A_PROMPTS)

    full = _state(neo4j_driver, database)
    assert runner.invoke(app, ["global", "motifs", "mine", "--min-strength", "0.001", *scope]).exit_code == 0
    assert _state(neo4j_driver, database) == full, "re-mining gives the same store"
    again = runner.invoke(app, ["global", "motifs", "update", "--min-strength", "0.001", *scope])
    assert again.exit_code == 0 and f"update {tc}: 0 of" in again.output, again.output
    assert _state(neo4j_driver, database) == full

    # delete one A prompt and re-ingest a non-A one: the update touches exactly those, and equals a full re-mine
    a_pid, other_pid = f"{tc}-0", f"{tc}-{len(A_PROMPTS)}"
    writer.delete_prompt(a_pid)
    writer.write_prompts([graphs[other_pid]])
    report = mine_store(neo4j_driver, database, full=False, transcoder=tc, min_strength=0.001)
    assert report.mined == 1 and report.removed > 0
    incremental = _state(neo4j_driver, database)
    mine_store(neo4j_driver, database, full=True, transcoder=tc, min_strength=0.001)
    assert _state(neo4j_driver, database) == incremental
    top = list_motifs(neo4j_driver, database, tc, kind="logit", limit=10_000)[0]
    assert tuple(top["nodes"]) == planted[1] and top["support"] == len(A_PROMPTS) - 1
    assert a_pid not in motif_contributions(neo4j_driver, database, tc)
    with pytest.raises(MotifStoreError, match="same"):
        mine_store(neo4j_driver, database, full=False, transcoder=tc, min_strength=0.01)

    # bad input: clear errors, store unchanged
    before = _state(neo4j_driver, database)
    bad_args = ((["list", "--feature", f"{tc}/9/9"], "no feature"), (["sort"], "unknown action"),
                (["mine", "--min-strength", "0"], "min-strength"), (["list", "--kind", "edge"], "--kind"),
                (["mine", "--max-features", "7"], "max-features"), (["list", "--top", "0"], "top"))  # fmt: skip
    for args, message in bad_args:
        bad = runner.invoke(app, ["global", "motifs", *args, *scope])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    assert _state(neo4j_driver, database) == before


def _clusters(driver: Driver, database: str, tc: str | None = None) -> list[tuple[object, ...]]:
    """Every Cluster (of dictionary `tc`, else all): key, size, cohesion, features, motifs, member prompts."""
    return [tuple(r.values()) for r in driver.execute_query(
        "MATCH (c:Cluster) WHERE $tc IS NULL OR c.transcoder = $tc OPTIONAL MATCH (c)-[:CONTAINS]->(p:Prompt) "
        "WITH c, p ORDER BY p.id "
        "RETURN c.key, c.size, round(c.cohesion, 9), c.features, c.motifs, collect(p.id) ORDER BY c.key",
        tc=tc,
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
    scope = ["--dictionary", tc]
    empty = runner.invoke(app, ["global", "clusters", "list", *scope])
    assert empty.exit_code == 2 and "no clusters stored" in empty.output, empty.output
    assert runner.invoke(app, ["global", "motifs", "mine", *scope]).exit_code == 0
    built = runner.invoke(app, ["global", "clusters", "build", *scope])
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
    listed = runner.invoke(app, ["global", "clusters", "list", *scope])
    assert listed.exit_code == 0 and "xyA" in listed.output, listed.output
    assert runner.invoke(app, ["global", "clusters", "build", *scope]).exit_code == 0
    assert _clusters(neo4j_driver, database) == state, "a rebuild stores the same clusters"
    for args, message in ((["build", "--eps", "0"], "--eps"), (["build", "--min-samples", "1"], "min-samples"),
                          (["group"], "unknown action"), (["build", "--neighbours", "0"], "neighbours")):  # fmt: skip
        bad = runner.invoke(app, ["global", "clusters", *args, *scope])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    assert _clusters(neo4j_driver, database) == state


def _everything(driver: Driver, database: str) -> list[object]:
    """Every corpus-structure node of the store (all dictionaries), with its relationships: what 'nothing written'
    compares."""
    return [tuple(r.values()) for r in driver.execute_query(
        "MATCH (n) WHERE n:Motif OR n:MotifRun OR n:Cluster OR n:ClusterRun OPTIONAL MATCH (n)-[r]->(x) "
        "WITH n, type(r) AS t, coalesce(x.key, x.id) AS k ORDER BY t, k "
        "WITH n, collect([t, k]) AS out RETURN labels(n), properties(n), out ORDER BY n.name, n.key",
        database_=database).records]  # fmt: skip


def test_two_dictionaries_in_one_store_are_mined_and_clustered_apart(
    planted_store: tuple[GraphWriter, str, dict[str, tuple[dict[str, object], object, object]]],
    neo4j_driver: Driver, neo4j_connection: Neo4jConnection, tmp_path: Path,
) -> None:  # fmt: skip
    """A second dictionary (a perturbed copy of the planted one, with its own content id, as after `atlas diff`)
    beside the planted store's: mining / updating / clustering one never reads, mixes or touches the other's; with
    both stored and no dictionary named, or a dictionary without prompts, each command errors and writes nothing."""
    from atlas.transcoders import save_transcoder, transcoder_identity

    writer, tc, _ = planted_store
    database = neo4j_connection.database
    runner = CliRunner()
    model = planted_model()
    copy = planted_transcoder(model)
    with torch.no_grad():
        copy.b_dec[0, 0] += 1e-6 * (1 + uuid.uuid4().int % 1000)  # a dictionary of its own, this test's alone
    directory = save_transcoder(copy, tmp_path / "copy", model_name=model.info.name)
    tc2 = transcoder_identity(directory).id
    assert tc2 != tc and tc2.startswith("plt-")
    texts = A_PROMPTS[:3] + OTHER_PROMPTS
    second = {}
    for i, text in enumerate(texts):
        graph = attribute(model, copy, text, config=AttributionConfig(), transcoder_id=tc2)
        nodes, edges = graph.to_tables(f"{tc2}-{i}")
        second[f"{tc2}-{i}"] = ({"id": f"{tc2}-{i}", "text": text, "model": model.info.name, "transcoder": tc2,
                                 "run": tc2}, nodes, edges)  # fmt: skip
    writer.write_prompts(list(second.values()))
    try:
        # ambiguous (several dictionaries, none named) and a dictionary with no prompts: clear errors, nothing written
        before = _everything(neo4j_driver, database)
        for args in (["motifs", "mine"], ["motifs", "update"], ["motifs", "list"], ["clusters", "build"],
                     ["clusters", "list"]):  # fmt: skip
            bad = runner.invoke(app, ["global", *args])
            assert bad.exit_code == 2 and "dictionaries" in bad.output, (args, bad.output)
            assert tc in bad.output and tc2 in bad.output, "the error lists the stored dictionaries"
            for missing in (["--dictionary", "plt-0000000000000000"], ["--transcoders", str(tmp_path / "none")]):
                bad = runner.invoke(app, ["global", *args, *missing])
                assert bad.exit_code == 2, (args, missing, bad.output)
            unknown = runner.invoke(app, ["global", *args, "--dictionary", "plt-0000000000000000"])
            assert "no prompts of dictionary 'plt-0000000000000000'" in unknown.output, unknown.output
        conflict = runner.invoke(app, ["global", "motifs", "mine", "--transcoders", str(directory), "--dictionary", tc])
        assert conflict.exit_code == 2 and "is not the dictionary of --transcoders" in conflict.output
        assert _everything(neo4j_driver, database) == before

        # the copy by its files (--transcoders resolves the content id), the planted one by its id
        for args in (["motifs", "mine", "--transcoders", str(directory)], ["clusters", "build", "--dictionary", tc2]):
            done = runner.invoke(app, ["global", *args])
            assert done.exit_code == 0 and tc2 in done.output, done.output
        motifs2, clusters2 = _state(neo4j_driver, database, tc2), _clusters(neo4j_driver, database, tc2)
        assert motifs2 and clusters2
        for args in (["motifs", "mine"], ["clusters", "build"]):
            assert runner.invoke(app, ["global", *args, "--dictionary", tc]).exit_code == 0
        assert _state(neo4j_driver, database, tc2) == motifs2, "mining the planted dictionary left the copy's alone"
        assert _clusters(neo4j_driver, database, tc2) == clusters2, "so did clustering it"
        # each dictionary's motifs and clusters hold its own prompts only; each finds the planted path
        mixed = neo4j_driver.execute_query(
            "MATCH (n)-[:SEEN_IN|CONTAINS]->(p:Prompt) WHERE (n:Motif OR n:Cluster) AND n.transcoder IN [$a, $b] "
            "AND p.transcoder <> n.transcoder RETURN count(*) AS n", a=tc, b=tc2, database_=database,
        ).records[0]["n"]  # fmt: skip
        assert mixed == 0
        b_key = token_key(str(model.info.name), model.tokenizer.convert_tokens_to_ids(TARGET_TOKEN))
        for dictionary, ids in (
            (tc, {f"{tc}-{i}" for i in range(len(A_PROMPTS))}),
            (tc2, {f"{tc2}-{i}" for i in range(3)}),
        ):
            top = list_motifs(neo4j_driver, database, dictionary, kind="logit", order="support", limit=1)[0]
            assert tuple(top["nodes"]) == (f"{dictionary}/{HOP1[0]}/{HOP1[1]}", f"{dictionary}/{HOP2[0]}/{HOP2[1]}",
                                           b_key) and top["support"] == len(ids)  # fmt: skip
            assert ids in [set(c[5]) for c in _clusters(neo4j_driver, database, dictionary)]  # type: ignore[arg-type]
        listed = runner.invoke(app, ["global", "motifs", "list", "--dictionary", tc2, "--top", "100"])
        assert listed.exit_code == 0 and tc2 in listed.output and f"motifs of {tc2}" in listed.output
        assert str(tc) not in listed.output, "a listing shows one dictionary's motifs"
        other = runner.invoke(
            app, ["global", "motifs", "list", "--dictionary", tc2, "--feature", f"{tc}/{HOP1[0]}/{HOP1[1]}"]
        )
        assert other.exit_code == 2 and f"is not of dictionary {tc2}" in other.output, other.output

        # incremental update of one dictionary after its prompts change: the other's stays as it was
        planted_before = _state(neo4j_driver, database, tc)
        writer.delete_prompt(f"{tc2}-0")
        report = mine_store(neo4j_driver, database, full=False, transcoder=tc2)
        assert report.transcoder == tc2 and report.mined == 0 and report.removed > 0
        assert _state(neo4j_driver, database, tc) == planted_before
        incremental = _state(neo4j_driver, database, tc2)
        mine_store(neo4j_driver, database, full=True, transcoder=tc2)
        assert _state(neo4j_driver, database, tc2) == incremental, "the update equals a full re-mine of the copy"
        assert list_motifs(neo4j_driver, database, tc2, kind="logit", order="support", limit=1)[0]["support"] == 2

        # motifs mined before they were scoped (no `transcoder`, one store-wide run "motifs"): the next update adopts
        # them exactly as a scoped mining would have stored them, re-mining nothing
        scoped = _state(neo4j_driver, database, tc)
        neo4j_driver.execute_query("MATCH (m:Motif {transcoder: $t}) REMOVE m.transcoder", t=tc, database_=database)
        neo4j_driver.execute_query("MATCH (r:MotifRun {transcoder: $t}) SET r.name = 'motifs' REMOVE r.transcoder, "
                                   "r.n_prompts", t=tc, database_=database)  # fmt: skip
        assert _state(neo4j_driver, database, tc) == []
        adopted = mine_store(neo4j_driver, database, full=False, transcoder=tc, min_strength=0.01)
        assert adopted.mined == 0 and _state(neo4j_driver, database, tc) == scoped
        assert _state(neo4j_driver, database, tc2) == incremental
    finally:
        for pid in second:
            writer.delete_prompt(pid)
        _drop_dictionary(neo4j_driver, database, tc2)
