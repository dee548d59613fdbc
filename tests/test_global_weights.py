"""Global weights: chunked top-k against a dense by-hand computation, and against the attribution engine's edges."""

from __future__ import annotations

import itertools
from pathlib import Path

import duckdb
import pytest
import torch
from typer.testing import CliRunner

from atlas.analysis.global_weights import (
    GlobalWeightsError,
    NormFold,
    ResidualReaders,
    TopK,
    dense_virtual_weights,
    feature_id,
    feature_topk,
    global_weights,
    logit_topk,
    residual_readers,
    to_table,
    token_topk,
)
from atlas.attribution.context import build_context
from atlas.attribution.engine import AttributionConfig, attribute
from atlas.models import LoadedModel, load_model
from atlas.storage.global_weights import RELATIONS
from atlas.transcoders import TranscoderSpec, build_transcoder, save_transcoder, transcoder_identity
from atlas.transcoders.base import EncoderStack
from atlas_cli.main import app
from tests.test_attribution import PROMPT, random_transcoder
from tests.tolerances import FLOAT32_SUM, assert_close_at_scale

L, F, D, VOCAB = 4, 6, 8, 11


def tiny_transcoder(kind: str, seed: int = 0) -> EncoderStack:
    torch.manual_seed(seed)
    transcoder = build_transcoder(TranscoderSpec(kind=kind, n_layers=L, d_model=D, n_features=F))  # type: ignore[arg-type]
    with torch.no_grad():
        for param in transcoder.parameters():
            param.normal_(0, 1.0)
    return transcoder


def tiny_readers(centre: bool, seed: int = 1) -> ResidualReaders:
    generator = torch.Generator().manual_seed(seed)
    folds = tuple(NormFold(torch.rand(D, generator=generator) + 0.5, centre) for _ in range(L))
    final = NormFold(torch.rand(D, generator=generator) + 0.5, centre)
    return ResidualReaders(
        folds, final, torch.randn(VOCAB, D, generator=generator), torch.randn(D, VOCAB, generator=generator), "fold"
    )


def decoder_row(transcoder: EncoderStack, source_layer: int, feature: int, output_layer: int) -> torch.Tensor | None:
    """Feature (source_layer, feature)'s decoder into MLP output `output_layer`, read straight off the weights."""
    if transcoder.spec.kind == "plt":
        return transcoder.W_dec[source_layer, feature].double() if output_layer == source_layer else None
    if output_layer < source_layer:
        return None
    return transcoder.W_dec[source_layer][feature, output_layer - source_layer].double()


def fold(vector: torch.Tensor, norm: NormFold) -> torch.Tensor:
    out = vector.double() * (1.0 if norm.weight is None else norm.weight.double())
    return out - out.mean() if norm.centre else out


def by_hand(transcoder: EncoderStack, readers: ResidualReaders) -> torch.Tensor:
    """V[s, t] one pair at a time: Σ over output layers l_s ≤ ℓ < l_t of s's decoder, dotted with t's read vector."""
    n = L * F
    dense = torch.zeros(n, n, dtype=torch.float64)
    for (ls, fs), (lt, ft) in itertools.product(itertools.product(range(L), range(F)), repeat=2):
        total = torch.zeros(D, dtype=torch.float64)
        for layer in range(ls, lt):
            row = decoder_row(transcoder, ls, fs, layer)
            if row is not None:
                total += row
        dense[ls * F + fs, lt * F + ft] = total @ fold(transcoder.W_enc[lt, ft].detach(), readers.mlp_in[lt])
    return dense


def check_topk(top: TopK, dense: torch.Tensor, k: int) -> None:
    """`top` holds, per row, the k largest |dense| entries among the row's candidates (nonzero-able entries)."""
    scale = float(dense.detach().abs().max())
    for row in range(dense.shape[0]):
        partners = top.partners[row]
        valid = partners >= 0
        assert_close_at_scale(top.values[row][valid], dense[row, partners[valid]], scale=scale, what=f"row {row}")
        expected = dense[row].abs().sort(descending=True).values[: int(valid.sum())]
        assert_close_at_scale(top.values[row][valid].abs(), expected, scale=scale, what=f"row {row} ranking")
        assert valid.tolist() == sorted(valid.tolist(), reverse=True), "padding only after real partners"


@pytest.mark.parametrize("kind", ["plt", "clt"])
@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("tile", [2, 4096])
def test_feature_topk_matches_a_dense_by_hand_computation(kind: str, centre: bool, tile: int) -> None:
    transcoder, readers = tiny_transcoder(kind), tiny_readers(centre)
    expected = by_hand(transcoder, readers)
    assert_close_at_scale(dense_virtual_weights(transcoder, readers), expected, rel=FLOAT32_SUM, what="dense")
    k = 5
    incoming, outgoing = feature_topk(transcoder, readers, k, tile=tile)
    check_topk(outgoing, expected, k)
    check_topk(incoming, expected.T, k)
    # layer 0 has no sources, the last layer no targets; layer 1 has exactly F sources.
    assert (incoming.partners[:F] == -1).all() and (outgoing.partners[(L - 1) * F :] == -1).all()
    k_big = 2 * F
    incoming, _ = feature_topk(transcoder, readers, k_big, tile=tile)
    assert ((incoming.partners[F : 2 * F] >= 0).sum(1) == F).all()
    assert ((incoming.partners[2 * F : 3 * F] >= 0).sum(1) == 2 * F).all()


def test_a_clt_target_never_sees_its_own_layers_decoder() -> None:
    """Only decoders into layers l_s … l_t − 1 enter: changing the decoder into l_t leaves V_st unchanged."""
    transcoder, readers = tiny_transcoder("clt"), tiny_readers(False)
    before = dense_virtual_weights(transcoder, readers)
    with torch.no_grad():
        transcoder.W_dec[0][:, 2].add_(5.0)  # layer-0 features' writes into MLP output 2
    after = dense_virtual_weights(transcoder, readers)
    assert torch.equal(after[:F, 2 * F : 3 * F], before[:F, 2 * F : 3 * F])  # layer 2 reads before MLP output 2
    assert not torch.allclose(after[:F, 3 * F :], before[:F, 3 * F :])  # layer 3 reads after it


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_token_and_logit_weights_match_by_hand(kind: str) -> None:
    transcoder, readers = tiny_transcoder(kind), tiny_readers(True)
    k = 4
    tokens = token_topk(transcoder, readers, k, tile=3)
    logits = logit_topk(transcoder, readers, k, tile=3)
    token_dense = torch.zeros(L * F, VOCAB, dtype=torch.float64)
    logit_dense = torch.zeros(L * F, VOCAB, dtype=torch.float64)
    centred = readers.W_U.double() - readers.W_U.double().mean(1, keepdim=True)
    for layer, feature, token in itertools.product(range(L), range(F), range(VOCAB)):
        read = fold(transcoder.W_enc[layer, feature].detach(), readers.mlp_in[layer])
        token_dense[layer * F + feature, token] = readers.W_E[token].double() @ read
        write = sum(
            (row for out in range(L) if (row := decoder_row(transcoder, layer, feature, out)) is not None),
            torch.zeros(D, dtype=torch.float64),
        )
        logit_dense[layer * F + feature, token] = write @ fold(centred[:, token], readers.final)
    check_topk(tokens, token_dense, k)
    check_topk(logits, logit_dense, k)


def test_bad_requests_get_clear_errors() -> None:
    transcoder, readers = tiny_transcoder("clt"), tiny_readers(False)
    for k in (0, -1, L * F + 1):
        with pytest.raises(GlobalWeightsError, match="k must be in"):
            global_weights(transcoder, readers, k)
    with pytest.raises(GlobalWeightsError, match="no feature"):
        feature_id(transcoder, L, 0)
    with pytest.raises(GlobalWeightsError, match="no feature"):
        feature_id(transcoder, 0, F)
    wrong = ResidualReaders(readers.mlp_in[:2], readers.final, readers.W_E, readers.W_U, "fold")
    with pytest.raises(GlobalWeightsError, match="do not match the model"):
        global_weights(transcoder, wrong, 3)


def without_attention_output(model: LoadedModel) -> LoadedModel:
    """Zero every attention output projection: the residual stream is then the only path between features."""
    with torch.no_grad():
        for block in model.model.blocks:
            for name, param in block.attn.named_parameters():
                if name.startswith(("o.", "_original_component.o_proj.")):
                    param.zero_()
    return model


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_virtual_weight_is_the_engines_same_position_edge(model_name: str, kind: str) -> None:
    """With attention patterns frozen and no attention output, a feature→feature edge is a_s · V_st / σ_{l_t, p}.

    σ is the target's `ln2` scale on the prompt (the part of the norm a virtual weight cannot know); V is folded.
    Between positions the only path left is attention's, so those edges vanish.
    """
    model = without_attention_output(load_model(model_name))
    transcoder = random_transcoder(model, kind)
    config = AttributionConfig(zero_positions=(), batch_size=16, min_prefix_tokens=1)
    graph = attribute(model, transcoder, PROMPT, config=config)
    ctx = build_context(model, transcoder, torch.tensor(graph.tokens), zero_positions=())
    V = dense_virtual_weights(transcoder, residual_readers(model, "fold"))
    features = graph.index.features
    n = len(features)
    is_feature_edge = (graph.edges.target < n) & (graph.edges.source < n)
    same, expected, cross = [], [], []
    for t, s, weight in zip(
        graph.edges.target[is_feature_edge].tolist(),
        graph.edges.source[is_feature_edge].tolist(),
        graph.edges.weight[is_feature_edge].tolist(),
        strict=True,
    ):
        src, tgt = features[s], features[t]
        if src.position != tgt.position:
            cross.append(weight)
            continue
        sigma = float(ctx.frozen[f"blocks.{tgt.layer}.ln2.hook_scale"][0, tgt.position, 0])
        same.append(weight / float(graph.activations[s]) * sigma)
        expected.append(float(V[src.layer * transcoder.spec.n_features + src.feature,
                                tgt.layer * transcoder.spec.n_features + tgt.feature]))  # fmt: skip
    assert len(same) > 20, "the prompt should give many same-position feature edges"
    assert_close_at_scale(torch.tensor(same), torch.tensor(expected), rel=FLOAT32_SUM, what="edge·σ/a vs V")
    scale = max(abs(w) for w in graph.edges.weight.tolist())
    assert all(abs(w) <= FLOAT32_SUM * scale for w in cross), "cross-position edges need attention"


def test_with_attention_alive_the_edge_also_holds_the_attention_path() -> None:
    """What is exact and what is not: with attention's output kept, same-position edges include the OV path through
    the frozen pattern (a token attends to itself), so edge · σ / a_s departs from V_st."""
    model = load_model("tiny-llama")
    transcoder = random_transcoder(model, "clt")
    graph = attribute(model, transcoder, PROMPT, config=AttributionConfig(zero_positions=(), min_prefix_tokens=1))
    ctx = build_context(model, transcoder, torch.tensor(graph.tokens), zero_positions=())
    V = dense_virtual_weights(transcoder, residual_readers(model, "fold"))
    features, n_features = graph.index.features, transcoder.spec.n_features
    gaps, scale = [], 0.0
    for t, s, weight in zip(graph.edges.target.tolist(), graph.edges.source.tolist(), graph.edges.weight.tolist(),
                            strict=True):  # fmt: skip
        if t < len(features) and s < len(features) and features[s].position == features[t].position:
            src, tgt = features[s], features[t]
            sigma = float(ctx.frozen[f"blocks.{tgt.layer}.ln2.hook_scale"][0, tgt.position, 0])
            v = float(V[src.layer * n_features + src.feature, tgt.layer * n_features + tgt.feature])
            gaps.append(abs(weight / float(graph.activations[s]) * sigma - v))
            scale = max(scale, abs(v))
    assert gaps and max(gaps) > 1e-3 * scale


def stored_rows(path: Path) -> list[tuple[object, ...]]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT * FROM global_weights ORDER BY ALL").fetchall()


def test_cli_stores_global_weights_idempotently_and_refuses_bad_input(tmp_path: Path) -> None:
    model = load_model("tiny-llama")
    transcoder = random_transcoder(model, "clt")
    directory = save_transcoder(transcoder, tmp_path / "clt", model_name="tiny-llama")
    db = tmp_path / "stats.duckdb"
    base = ["global", "weights", "--transcoders", str(directory), "--model", "tiny-llama", "--stats-db", str(db)]
    runner = CliRunner()
    first = runner.invoke(app, [*base, "--k", "5"])
    assert first.exit_code == 0, first.output
    rows = stored_rows(db)
    expected = to_table(global_weights(transcoder, residual_readers(model), 5), transcoder_identity(directory).id)
    assert len(rows) == expected.num_rows
    stored = sorted(rows, key=lambda r: (r[2], r[3], r[4], r[5]))  # relation, layer, feature, rank
    wanted = sorted(zip(*expected.to_pydict().values(), strict=True), key=lambda r: (r[2], r[3], r[4], r[5]))
    assert [r[:8] for r in stored] == [r[:8] for r in wanted]
    assert_close_at_scale(torch.tensor([r[8] for r in stored]), torch.tensor([r[8] for r in wanted]))
    n_layers, n_features = transcoder.spec.n_layers, transcoder.spec.n_features
    counts = {rel: sum(1 for r in rows if r[2] == rel) for rel in RELATIONS}
    assert counts == {"feature_out": n_features * 5, "feature_in": n_features * 5,  # one layer pair, 2-layer model
                      "token_in": n_layers * n_features * 5, "logit_out": n_layers * n_features * 5}  # fmt: skip

    again = runner.invoke(app, [*base, "--k", "5"])
    assert again.exit_code == 0, again.output
    assert stored_rows(db) == rows, "a re-run stores the same rows, no duplicates"

    before = db.read_bytes()
    for bad, message in (
        (["--k", "0"], "greater than or equal to 1"),
        (["--k", str(n_layers * n_features + 1)], "more than the dictionary"),
        (["--norm", "sideways"], "--norm"),
    ):
        result = runner.invoke(app, [*base, *bad])
        assert result.exit_code == 2 and message in result.output, result.output
    mismatched = runner.invoke(app, [*base[:4], "--model", "tiny-gpt2", *base[6:], "--k", "3"])
    assert mismatched.exit_code == 2 and "do not fit" in mismatched.output, mismatched.output
    assert db.read_bytes() == before, "refused runs leave the store untouched"

    show = ["global", "show", "--transcoders", str(directory), "--stats-db", str(db)]
    shown = runner.invoke(app, [*show, "--feature", "1/0", "--relation", "feature_in"])
    assert shown.exit_code == 0 and "0/" in shown.output, shown.output
    unknown = runner.invoke(app, [*show, "--feature", f"0/{n_features}"])
    assert unknown.exit_code == 2 and "no feature" in unknown.output, unknown.output
    empty = runner.invoke(app, [*show[:4], "--stats-db", str(tmp_path / "none.duckdb"), "--feature", "0/0"])
    assert empty.exit_code == 2 and "no statistics database" in empty.output, empty.output
    assert not (tmp_path / "none.duckdb").exists()


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_a_planted_circuit_has_the_largest_global_weights(kind: str) -> None:
    """Plant (0, 2) → (2, 4) → (3, 1): layer-0 feature 2 writes along the direction feature (2, 4) reads, which
    writes along what (3, 1) reads; every other weight is small. The planted pairs top their features' lists."""
    torch.manual_seed(5)
    transcoder = build_transcoder(TranscoderSpec(kind=kind, n_layers=L, d_model=D, n_features=F))  # type: ignore[arg-type]
    readers = tiny_readers(True)
    u, w = torch.zeros(D), torch.zeros(D)
    u[0], w[1] = 1.0, 1.0
    with torch.no_grad():
        for param in transcoder.parameters():
            param.normal_(0, 0.05)
        transcoder.W_enc[2, 4] = u * 3 / readers.mlp_in[2].weight  # type: ignore[operator]
        transcoder.W_enc[3, 1] = w * 3 / readers.mlp_in[3].weight  # type: ignore[operator]
        if kind == "plt":
            transcoder.W_dec[0, 2] += 3 * u
            transcoder.W_dec[2, 4] += 3 * w
        else:
            transcoder.W_dec[0][2, 0] += 3 * u  # writes into MLP output 0: read by layers 1…3
            transcoder.W_dec[2][4, 0] += 3 * w
    incoming, outgoing = feature_topk(transcoder, readers, 3, tile=2)
    a, b, c = 0 * F + 2, 2 * F + 4, 3 * F + 1
    assert int(outgoing.partners[a, 0]) == b and int(incoming.partners[b, 0]) == a
    assert int(outgoing.partners[b, 0]) == c and int(incoming.partners[c, 0]) == b
    strongest = outgoing.values[:, 0].abs().topk(2).indices.tolist()
    assert sorted(strongest) == sorted([a, b]), "the two planted edges are the largest in the dictionary"
