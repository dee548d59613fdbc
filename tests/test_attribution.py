"""Attribution engine oracles on both tiny architectures, PLT and CLT: completeness and constrained interventions."""

from __future__ import annotations

import pytest
import torch

from atlas.attribution.context import PromptContext, PromptError, build_context
from atlas.attribution.engine import AttributionConfig, Readout, SourceVectors, attribute, plan_batches, prefix_lengths
from atlas.attribution.graph import AttributionGraph
from atlas.attribution.interventions import FeatureIntervention, constrained_run, generate, intervene
from atlas.attribution.nodes import ErrorNode, NodeKind, TokenNode
from atlas.attribution.targets import TargetError, logit_difference, token_targets
from atlas.models import LoadedModel, load_model
from atlas.transcoders import TranscoderFormatError, TranscoderSpec, build_transcoder
from atlas.transcoders.base import EncoderStack
from tests.tolerances import FLOAT32_CHAIN, FLOAT32_SUM, assert_close_at_scale

PROMPT = "When Mary and John went to the store"
NO_ZEROING = AttributionConfig(zero_positions=(), batch_size=16, min_prefix_tokens=1)  # prefix runs exercised too


def random_transcoder(model: LoadedModel, kind: str, *, skip: bool = False, b_dec: bool = True) -> EncoderStack:
    """Random weights with encoder biases calibrated so roughly 15 % of features fire on the prompt."""
    torch.manual_seed(1)
    spec = TranscoderSpec(kind=kind, n_layers=model.info.n_layers, d_model=model.info.d_model, n_features=24, skip=skip)  # type: ignore[arg-type]
    transcoder = build_transcoder(spec)
    with torch.no_grad():
        for param in transcoder.parameters():
            param.normal_(0, 0.3)
        if transcoder.log_threshold is not None:
            transcoder.log_threshold.fill_(-3.0)
        if not b_dec:
            transcoder.b_dec.zero_()
        ctx = build_context(model, transcoder, model.tokenize(PROMPT)[0], zero_positions=())
        pre = torch.bmm(ctx.inputs, transcoder.W_enc.transpose(1, 2))
        transcoder.b_enc.copy_(-torch.quantile(pre, 0.85, dim=1) + 0.05)
    return transcoder


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model(request: pytest.FixtureRequest) -> LoadedModel:
    return load_model(request.param)


def dense(graph: AttributionGraph) -> torch.Tensor:
    return graph.edges.to_dense().double()


def target_values(
    ctx: PromptContext, graph: AttributionGraph, result_final: torch.Tensor, result_pre: torch.Tensor
) -> torch.Tensor:
    """Per-node value read out from a run: pre-activation − b_enc for features, direction·h for targets."""
    index = graph.index
    values = torch.zeros(index.n_nodes, dtype=torch.float64)
    b_enc = ctx.transcoder.b_enc.detach()
    for i, node in enumerate(index.features):
        values[i] = result_pre[node.layer, node.position, node.feature] - b_enc[node.layer, node.feature]
    logit_slice = index.slice(NodeKind.LOGIT)
    for j, node in enumerate(index.logits):
        direction = graph_directions(ctx, graph)[j]
        values[logit_slice.start + j] = direction @ result_final[node.position]
    return values


def graph_directions(ctx: PromptContext, graph: AttributionGraph) -> list[torch.Tensor]:
    W_U = ctx.model.model.W_U.detach().float()
    centred = W_U - W_U.mean(1, keepdim=True)
    return [centred[:, node.token_id] for node in graph.index.logits]


def test_pure_completeness_llama_without_biases() -> None:
    """No bias anywhere (Llama, b_dec = 0): in-edges sum to pre − b_enc and to the demeaned logit themselves."""
    model = load_model("tiny-llama")
    for kind in ("plt", "clt"):
        transcoder = random_transcoder(model, kind, b_dec=False)
        graph = attribute(model, transcoder, PROMPT, config=NO_ZEROING)
        ctx = build_context(model, transcoder, torch.tensor(graph.tokens), zero_positions=())
        edges = dense(graph)
        sums, row_scale = edges.sum(1), edges.abs().sum(1)  # each row's error scales with its terms, not its sum
        assert graph.index.n_features > 20
        pre = torch.stack(
            [
                ctx.inputs[node.layer, node.position] @ transcoder.W_enc[node.layer, node.feature]
                for node in graph.index.features
            ]
        )
        features = slice(0, graph.index.n_features)
        assert_close_at_scale(
            sums[features], pre, rel=FLOAT32_CHAIN, scale=row_scale[features], what=f"{kind} feature in-edge sums"
        )
        logits = ctx.logits[-1]
        rows = graph.index.slice(NodeKind.LOGIT)
        demeaned = torch.stack([logits[node.token_id] - logits.mean() for node in graph.index.logits])
        assert_close_at_scale(sums[rows], demeaned, rel=FLOAT32_CHAIN, scale=row_scale[rows], what=f"{kind} logit sums")


@pytest.mark.parametrize(("kind", "skip"), [("plt", False), ("clt", False), ("plt", True), ("clt", True)])
def test_completeness_with_constant_terms(model: LoadedModel, kind: str, skip: bool) -> None:
    """In-edges + the constant part (biases, b_dec, positions: the frozen model with every source removed) = value."""
    transcoder = random_transcoder(model, kind, skip=skip)
    graph = attribute(model, transcoder, PROMPT, config=NO_ZEROING)
    ctx = build_context(model, transcoder, torch.tensor(graph.tokens), zero_positions=())
    clean = constrained_run(ctx)
    constant = constrained_run(
        ctx, feature_delta=-ctx.activations, embed_delta=-ctx.embeddings, error_delta=-ctx.errors
    )
    value = target_values(ctx, graph, clean.final_residual, clean.pre_activations)
    const = target_values(ctx, graph, constant.final_residual, constant.pre_activations)
    rows = torch.cat(
        [
            torch.arange(graph.index.n_features),
            torch.arange(*graph.index.slice(NodeKind.LOGIT).indices(graph.index.n_nodes)),
        ]
    )
    edges = dense(graph)
    row_scale = edges.abs().sum(1)[rows] + const[rows].abs() + value[rows].abs()
    assert_close_at_scale(
        edges.sum(1)[rows] + const[rows], value[rows], rel=FLOAT32_CHAIN, scale=row_scale, what="completeness"
    )
    # the clean constrained run is the real model
    assert_close_at_scale(clean.logits, ctx.logits, rel=FLOAT32_CHAIN, what="constrained clean logits")


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_constrained_interventions_reproduce_edges(model: LoadedModel, kind: str) -> None:
    transcoder = random_transcoder(model, kind)
    graph = attribute(model, transcoder, PROMPT, config=NO_ZEROING)
    ctx = build_context(model, transcoder, torch.tensor(graph.tokens), zero_positions=())
    adjacency = dense(graph)
    clean = constrained_run(ctx)
    row_terms = adjacency.abs().sum(1)
    base = target_values(ctx, graph, clean.final_residual, clean.pre_activations)
    index = graph.index
    rows = torch.cat(
        [torch.arange(index.n_features), torch.arange(*index.slice(NodeKind.LOGIT).indices(index.n_nodes))]
    )

    def check(column: int, result: object) -> None:
        changed = target_values(ctx, graph, result.final_residual, result.pre_activations)  # type: ignore[attr-defined]
        # an edge is a difference of two runs: its error scales with what makes up the target values (their terms
        # in the graph and the values themselves), not with the edge
        scale = row_terms[rows] + base[rows].abs() + changed[rows].abs()
        assert_close_at_scale(
            changed[rows] - base[rows],
            adjacency[rows, column],
            rel=FLOAT32_CHAIN,
            scale=scale,
            what="edge by intervention",
        )

    generator = torch.Generator().manual_seed(0)
    sample = torch.randperm(index.n_features, generator=generator)[:50].tolist()
    assert len(sample) >= min(50, index.n_features) and index.n_features >= 50
    for i in sample:
        node = index.features[i]
        delta = torch.zeros_like(ctx.activations)
        delta[node.layer, node.position, node.feature] = ctx.activations[node.layer, node.position, node.feature]
        check(i, constrained_run(ctx, feature_delta=delta))  # doubling the feature adds its edges once
    for position in range(index.n_pos):
        embed = torch.zeros_like(ctx.embeddings)
        embed[position] = ctx.embeddings[position]
        check(index.index_of(TokenNode(position, graph.tokens[position])), constrained_run(ctx, embed_delta=embed))
        for layer in range(index.n_layers):
            error = torch.zeros_like(ctx.errors)
            error[layer, position] = ctx.errors[layer, position]
            check(index.index_of(ErrorNode(layer, position)), constrained_run(ctx, error_delta=error))


def test_feature_cap_folds_unvisited_features_into_errors(model: LoadedModel) -> None:
    transcoder = random_transcoder(model, "clt")
    full = attribute(model, transcoder, PROMPT, config=NO_ZEROING)
    capped = attribute(
        model,
        transcoder,
        PROMPT,
        config=AttributionConfig(zero_positions=(), batch_size=8, max_feature_nodes=12, update_interval=1),
    )
    assert capped.index.n_features == 12
    assert capped.folded_features["n_folded_into_errors"] == full.index.n_features - 12
    assert 0 < capped.folded_features["folded_edge_abs_share"] < 1
    # logit rows keep their totals: nothing is dropped, only moved into error nodes
    logit_rows = full.index.slice(NodeKind.LOGIT)
    full_logits = dense(full).sum(1)[logit_rows]
    capped_logits = dense(capped).sum(1)[capped.index.slice(NodeKind.LOGIT)]
    assert_close_at_scale(
        capped_logits, full_logits, rel=FLOAT32_SUM, scale=dense(full).abs().sum(1)[logit_rows], what="capped"
    )
    # the kept features are the most influential ones by direct effect on the targets, not the first 12
    assert [n for n in capped.index.features] != list(full.index.features[:12])


def test_position_zero_convention_and_targets_anywhere(model: LoadedModel) -> None:
    transcoder = random_transcoder(model, "plt")
    graph = attribute(model, transcoder, PROMPT)  # default: position 0 zeroed
    assert all(node.position > 0 for node in graph.index.features)
    tokens = model.tokenize(PROMPT)[0]
    middle = attribute(
        model,
        transcoder,
        PROMPT,
        targets=token_targets([" ", "e"], model.model.W_U.detach(), model.tokenizer, position=4),
    )
    assert [node.position for node in middle.index.logits] == [4, 4]
    logit_rows = torch.arange(*middle.index.slice(NodeKind.LOGIT).indices(middle.index.n_nodes))
    sources = middle.edges.source[torch.isin(middle.edges.target, logit_rows)]
    assert sources.numel() > 0
    assert all(middle.index.node_at(int(s)).position <= 4 for s in sources)  # causal: nothing after position 4
    diff = logit_difference("M", "J", model.model.W_U.detach(), model.tokenizer, position=len(tokens) - 1)
    assert attribute(model, transcoder, PROMPT, targets=[diff]).index.n_logits == 1


def test_bad_input_is_rejected(model: LoadedModel) -> None:
    transcoder = random_transcoder(model, "plt")
    with pytest.raises(PromptError, match="empty"):
        attribute(model, transcoder, "   ")
    with pytest.raises(PromptError, match="more than the model's context of 64"):
        attribute(model, transcoder, "x" * 100)
    with pytest.raises(TargetError, match="not a single token"):
        token_targets(["ab"], model.model.W_U.detach(), model.tokenizer, position=-1)
    wrong = build_transcoder(TranscoderSpec(kind="plt", n_layers=3, d_model=32, n_features=4))
    with pytest.raises(TranscoderFormatError, match="3 layers vs the model's 2"):
        attribute(model, wrong, PROMPT)


def test_intervention_modes(model: LoadedModel) -> None:
    transcoder = random_transcoder(model, "clt")
    ctx = build_context(model, transcoder, model.tokenize(PROMPT)[0], zero_positions=())
    for mode in ("constrained", "frozen_attention", "open_loop"):
        assert_close_at_scale(intervene(ctx, [], mode=mode).logits, ctx.logits, rel=FLOAT32_CHAIN, what=mode)  # type: ignore[arg-type]
    # steer the strongest early feature hard
    layer0 = ctx.activations[0]
    position, feature = divmod(int(layer0.argmax()), layer0.shape[1])
    edit = [FeatureIntervention(0, feature, position, "scale", 8.0)]
    constrained = intervene(ctx, edit, mode="constrained")
    frozen = intervene(ctx, edit, mode="frozen_attention")
    open_loop = intervene(ctx, edit, mode="open_loop")
    # constrained: later features keep their clean activations; propagating modes re-encode them
    assert torch.equal(constrained.activations[1], ctx.activations[1])
    assert not torch.allclose(frozen.activations[1], ctx.activations[1])
    assert not torch.allclose(constrained.logits, frozen.logits, atol=1e-3)
    assert not torch.allclose(frozen.logits, open_loop.logits, atol=1e-4)
    # positions before the edit are untouched in every mode (causality)
    for result in (constrained, frozen, open_loop):
        assert_close_at_scale(result.logits[:position], ctx.logits[:position], rel=FLOAT32_CHAIN, what="causal")
    assert frozen.activations[0, position, feature] == pytest.approx(8 * float(layer0[position, feature]))


def test_generation_holds_an_open_ended_intervention(model: LoadedModel) -> None:
    transcoder = random_transcoder(model, "plt")
    ctx = build_context(model, transcoder, model.tokenize(PROMPT)[0])
    baseline = generate(ctx, [], max_new_tokens=6)
    tokens = ctx.tokens.clone()
    for _ in range(6):
        with torch.no_grad():
            tokens = torch.cat([tokens, model.model(tokens.view(1, -1))[0, -1].argmax().view(1)])
    assert baseline.tokens == tokens.tolist()  # no intervention: the model's own greedy continuation
    last_layer = model.info.n_layers - 1
    steer = [FeatureIntervention(last_layer, f, slice(ctx.n_pos - 1, None), "set", 50.0) for f in range(4)]
    steered = generate(ctx, steer, max_new_tokens=6)
    assert steered.new_tokens != baseline.new_tokens
    assert len(steered.new_tokens) == 6


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_source_vectors_match_the_edge_definition(model: LoadedModel, kind: str) -> None:
    """Batched readouts (cached, and rebuilt per pass) give Σ_l' grad[l', p]·a·W_dec[l → l'], errors, tokens."""
    transcoder = random_transcoder(model, kind)
    ctx = build_context(model, transcoder, model.tokenize(PROMPT)[0], zero_positions=())
    active = ctx.active_features()
    generator = torch.Generator().manual_seed(3)
    batch, L, n_pos, d = 5, ctx.n_layers, ctx.n_pos, ctx.inputs.shape[-1]
    mlp_grads: list[torch.Tensor | None] = [torch.randn(batch, n_pos, d, generator=generator) for _ in range(L)]
    mlp_grads[-1] = None  # a layer the pass never reached
    embed_grad = torch.randn(batch, n_pos, d, generator=generator)
    expected = torch.zeros(batch, int(active.shape[0]) + L * n_pos + n_pos)
    for i, (layer, position, feature) in enumerate(active.tolist()):
        decoders = transcoder.decoder_vectors(layer, torch.tensor([feature])).detach()[0]
        for offset, target in enumerate(transcoder.output_layers(layer)):
            grad = mlp_grads[target]
            if grad is not None:
                expected[:, i] += ctx.activations[layer, position, feature] * (grad[:, position] @ decoders[offset])
    start = int(active.shape[0])
    for layer, grad in enumerate(mlp_grads):
        if grad is not None:
            expected[:, start + layer * n_pos : start + (layer + 1) * n_pos] = (grad * ctx.errors[layer]).sum(-1)
    expected[:, start + L * n_pos :] = (embed_grad * ctx.embeddings).sum(-1)
    cached = SourceVectors(ctx, active)
    rebuilt = SourceVectors(ctx, active, cache_bytes=0)
    assert cached.cached is not None and rebuilt.cached is None
    for sources in (cached, rebuilt):
        assert_close_at_scale(sources.edge_rows(mlp_grads, embed_grad), expected, rel=FLOAT32_SUM, what="readouts")


def test_readout_pads_uneven_positions_at_most_twofold() -> None:
    """Positions with 0, 1, 3 and 9 sources: blocks of widths 1, 4 and 16, every source in exactly one slot."""
    counts = [0, 1, 3, 9]
    positions = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    vectors = torch.randn(int(positions.numel()), 6)
    columns = torch.arange(int(positions.numel())) * 10
    scratch = int(columns.max()) + 1
    readout = Readout.build(positions, columns, vectors, n_pos=4, scratch=scratch)
    assert sorted(int(block.vectors.shape[1]) for block in readout.blocks) == [1, 4, 16]
    named = torch.cat([block.columns for block in readout.blocks])
    assert sorted(named[named != scratch].tolist()) == columns.tolist()
    assert readout.nbytes <= 2 * vectors.numel() * vectors.element_size()
    grad = torch.randn(2, 4, 6)
    out = torch.zeros(scratch + 1, 2)
    readout.add_weights(out, grad)
    assert_close_at_scale(out[columns], (grad[:, positions] * vectors).sum(-1).T, rel=FLOAT32_SUM, what="padded")


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_prefix_runs_give_the_edges_of_one_full_run(model: LoadedModel, kind: str) -> None:
    """Backward passes over prompt prefixes (causality) change no edge, with a skip, a cap and a mid-prompt target."""
    transcoder = random_transcoder(model, kind, skip=True)
    W_U = model.model.W_U.detach()
    for extra in ({}, {"max_feature_nodes": 10, "update_interval": 1}):
        graphs = [
            attribute(
                model,
                transcoder,
                PROMPT,
                targets=[
                    *token_targets([" ", "e"], W_U, model.tokenizer, position=3),
                    *token_targets(["e"], W_U, model.tokenizer, position=-1),
                ],
                config=AttributionConfig(
                    zero_positions=(), batch_size=4, prefix_buckets=buckets, min_prefix_tokens=1, **extra
                ),  # type: ignore[arg-type]
            )
            for buckets in (1, 4)
        ]
        assert graphs[0].index.features == graphs[1].index.features
        # the same edges summed in another order: equal to float32 roundoff of the graph's scale
        assert_close_at_scale(dense(graphs[1]), dense(graphs[0]), rel=FLOAT32_SUM, what=f"{kind} prefix-run edges")


def test_batches_use_the_shortest_prefix_holding_each_target() -> None:
    assert prefix_lengths(64, 2) == [32, 64]
    assert prefix_lengths(10, 3) == [4, 7, 10]
    assert prefix_lengths(2, 5) == [1, 2]  # never more prefixes than tokens
    assert prefix_lengths(9, 1) == [9]
    assert prefix_lengths(47, 2, min_tokens=24) == [47] and prefix_lengths(48, 2, min_tokens=24) == [24, 48]
    generator = torch.Generator().manual_seed(0)
    layers = torch.randint(0, 6, (50,), generator=generator)
    positions = torch.randint(0, 10, (50,), generator=generator)
    lengths = prefix_lengths(10, 3)
    batches = plan_batches(layers, positions, lengths, batch_size=8)
    rows = torch.cat([members for members, _ in batches])
    assert sorted(rows.tolist()) == list(range(50))  # every target exactly once
    for members, length in batches:
        assert 0 < members.numel() <= 8
        shortest = min(n for n in lengths if n > int(positions[members].max()))
        assert all(min(n for n in lengths if n > int(p)) == length for p in positions[members].tolist())
        assert length == shortest
        assert layers[members].tolist() == sorted(layers[members].tolist())
