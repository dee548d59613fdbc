"""Build a prompt's attribution graph: exact direct effects in the local replacement model, kept sparse.

Algorithm (phases are timed in the log):
1. context: one clean forward; transcoder features, error vectors, freeze points (`atlas.attribution.context`).
2. frozen forward: one pass of the local replacement model (attention patterns and norm scales detached, every
   MLP output a constant leaf (its clean value) plus the transcoder's skip, the only gradient path across an MLP,
   token embeddings a leaf), stopped before the unembedding; and one over each shorter prefix of the prompt
   (`prefix_buckets`, default 2: the first half and all of it). The model is causal, so a target at position p
   depends only on positions ≤ p, and its backward pass can run on the shortest prefix holding p. A pass costs
   about (deepest layer) × (prefix length); on a 64-token prompt 2 prefixes saved ~13% of the backward work for one
   more forward (net ~10%; 3 or 4 prefixes saved a little more backward work but cost more in forwards). Prompts
   shorter than 2 × `min_prefix_tokens` (24) get one forward: there, the extra forward cost more than it saved.
3. rows: each batch of targets injects its read-out vector (a feature's encoder row at its input hook and position,
   or a target's direction at the final residual) and one batched `torch.autograd.grad` call (a vector-Jacobian
   product per target, `is_grads_batched`) returns gradients at every MLP output and at the embeddings; the forward
   is never replicated per target, unlike circuit-tracer's. Targets are grouped by prefix, then by layer, so a
   backward pass only traverses the layers below its deepest target and asks for gradients only at the MLP outputs
   it can reach.
   Edge weights are dot products of those gradients with each source's vector: activation × decoder row (summed
   over a CLT feature's output layers), error vector, token embedding. They are computed per leaf as a few
   batched matrix products (`Readout`: the vectors written at each position stacked as one matrix), never as one
   product per (source layer, target layer) pair. Only nonzero weights are stored: the graph is never a dense
   `n_nodes²` matrix.
4. selection: logit rows first; then, with `max_feature_nodes`, features in order of their estimated influence on
   the targets (re-estimated every `update_interval` batches from the rows so far), until the cap.
   Features never visited are not dropped: their outgoing edges are folded into the error node at their (layer,
   position), so every target's incoming edges still sum to its value. `graph.folded_features` says how much.
5. package: a `NodeIndex` over the selected features, sparse edges, activations and targets.

Edges follow circuit-tracer's definition: the effect on a feature's pre-activation (without `b_enc`) or on a target
direction at the final residual (the demeaned logit for a vocabulary target).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from atlas.attribution.context import (
    EMBED_HOOK,
    FINAL_RESIDUAL_HOOK,
    PromptContext,
    PromptError,
    build_context,
    mlp_output_with_skip,
)
from atlas.attribution.freezing import detach_hooks, freeze_point_names
from atlas.attribution.graph import AttributionGraph
from atlas.attribution.nodes import FeatureNode, LogitNode, NodeIndex
from atlas.attribution.pruning import SparseEdges, influence, normalise
from atlas.attribution.targets import Target, check_position, salient_logits
from atlas.models.loading import LoadedModel
from atlas.transcoders.base import EncoderStack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttributionConfig:
    max_feature_nodes: int | None = None  # None: every active feature becomes a node
    batch_size: int = 32  # targets per batched backward pass
    update_interval: int = 4  # batches between re-rankings of features by influence
    zero_positions: tuple[int, ...] = (0,)  # no features or errors here (circuit-tracer's BOS convention)
    prefix_buckets: int = 2  # frozen forwards over prompt prefixes; a target's pass uses the shortest holding it
    min_prefix_tokens: int = 24  # no prefix shorter: a forward's fixed cost outweighs what a short one saves
    max_n_logits: int = 10
    desired_logit_probability: float = 0.95


@dataclass(frozen=True)
class _Injection:
    layer: int | None  # None: the final residual (a target direction)
    position: int
    vector: torch.Tensor  # (d_model,)


READOUT_CACHE_BYTES = 512 * 2**20  # readouts above this are rebuilt per backward pass instead of kept


class _StopForward(Exception):
    """Raised by the last hook we need, so the forward pass skips the unembedding."""


class FrozenReplacementRun:
    """One forward of the local replacement model whose autograd graph serves many batched backward passes.

    The frozen model is linear, so its Jacobian is the same for every target: instead of replicating the prompt
    `batch` times (circuit-tracer's way, memory ∝ batch × n_pos), one forward is kept and each backward pass
    computes `batch` vector-Jacobian products at once with `torch.autograd.grad(..., is_grads_batched=True)`.
    """

    def __init__(self, ctx: PromptContext, batch: int, n_pos: int | None = None) -> None:
        self.ctx = ctx
        self.batch = batch
        self.n_pos = ctx.n_pos if n_pos is None else n_pos  # the first n_pos tokens: a prefix of the prompt
        if not 1 <= self.n_pos <= ctx.n_pos:
            raise ValueError(f"prefix of {self.n_pos} tokens for a prompt of {ctx.n_pos}")
        L, P = ctx.n_layers, self.n_pos
        self.embed_leaf = ctx.embeddings[:P].unsqueeze(0).clone().requires_grad_(True)
        self.mlp_leaves = [ctx.mlp_outputs[layer, :P].unsqueeze(0).clone().requires_grad_(True) for layer in range(L)]
        self.inputs: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None

        def read_input(layer: int) -> Any:
            def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
                self.inputs[layer] = tensor
                return tensor

            return hook

        def write_output(layer: int) -> Any:
            return lambda tensor, hook: mlp_output_with_skip(ctx, layer, self.mlp_leaves[layer], self.inputs[layer])

        def read_final(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            self.final = tensor
            raise _StopForward  # the unembedding's n_pos × vocab logits are never needed

        hooks: list[tuple[str, Any]] = [(EMBED_HOOK, lambda tensor, hook: self.embed_leaf)]
        hooks += detach_hooks(freeze_point_names(L))
        for layer in range(L):
            hooks += [(ctx.input_hook(layer), read_input(layer)), (ctx.output_hook(layer), write_output(layer))]
        hooks.append((FINAL_RESIDUAL_HOOK, read_final))
        tokens = ctx.tokens[:P].view(1, -1).to(ctx.model.device)
        with torch.enable_grad(), contextlib.suppress(_StopForward):
            ctx.model.model.run_with_hooks(tokens, fwd_hooks=hooks)
        if self.final is None:
            raise RuntimeError(f"the forward pass never reached {FINAL_RESIDUAL_HOOK}")

    def gradients(self, injections: list[_Injection]) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """Gradients `(n_injections, n_pos, d)` at the MLP outputs and at the embeddings, one row per injection.

        Only the MLP outputs below the deepest injected layer can influence the batch: the list holds None for
        the others, which the backward pass never reaches (the logit targets reach every layer). A prefix run's
        gradients are zero-padded to the prompt's `n_pos`: the model is causal, so nothing at or after the prefix's
        end affects a target inside it.
        """
        if len(injections) > self.batch:
            raise ValueError(f"{len(injections)} injections for a batch of {self.batch}")
        if any(injection.position >= self.n_pos for injection in injections):
            raise ValueError(f"an injection lies outside this run's prefix of {self.n_pos} tokens")
        rows = len(injections)
        grads: dict[int | None, torch.Tensor] = {}
        for row, injection in enumerate(injections):
            if injection.layer not in grads:
                source = self.final if injection.layer is None else self.inputs[injection.layer]
                assert source is not None
                grads[injection.layer] = torch.zeros(rows, *source.shape, dtype=source.dtype)
            grads[injection.layer][row, 0, injection.position] = injection.vector.to(grads[injection.layer].dtype)
        reach = reachable_layers([i.layer for i in injections], self.ctx.n_layers)
        outputs = [self.final if layer is None else self.inputs[layer] for layer in grads]
        result = torch.autograd.grad(
            outputs,  # type: ignore[arg-type]
            [*self.mlp_leaves[:reach], self.embed_leaf],
            grad_outputs=list(grads.values()),
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        mlp_grads: list[torch.Tensor | None] = [None if g is None else self._full(g[:, 0]) for g in result[:-1]]
        mlp_grads += [None] * (self.ctx.n_layers - reach)
        embed = result[-1]
        shape = (rows, self.ctx.n_pos, self.embed_leaf.shape[-1])
        embed_grad = self._full(embed[:, 0]) if embed is not None else torch.zeros(shape, dtype=self.embed_leaf.dtype)
        return mlp_grads, embed_grad

    def _full(self, grad: torch.Tensor) -> torch.Tensor:
        """`(rows, n_pos_prefix, d)` → `(rows, n_pos, d)`, zeros after the prefix."""
        missing = self.ctx.n_pos - self.n_pos
        return grad if missing == 0 else torch.nn.functional.pad(grad, (0, 0, 0, missing))


def prefix_lengths(n_pos: int, n_buckets: int, min_tokens: int = 1) -> list[int]:
    """Ascending prefix lengths, the last `n_pos`: `n_buckets` about equal splits of the prompt, fewer when a split
    would be shorter than `min_tokens`."""
    k = max(1, min(n_buckets, n_pos // max(1, min_tokens)))
    return sorted({-(-n_pos * (i + 1) // k) for i in range(k)})


def plan_batches(
    layers: torch.Tensor, positions: torch.Tensor, lengths: list[int], batch_size: int
) -> list[tuple[torch.Tensor, int]]:
    """Batches `(rows, prefix length)` of the targets read at `layers (n,)` (`n_layers` for the final residual)
    and `positions (n,)`: each target goes to the shortest prefix of `lengths` that holds its position, and within
    a prefix targets are sorted by layer (stable), so a batch's backward pass stops at its deepest layer.

    A pass costs about (deepest layer) × (prefix length): the two sorts trade a little depth for a lot of length.
    """
    bucket = torch.searchsorted(torch.tensor(lengths), positions, right=True)
    batches = []
    for b in bucket.unique().tolist():
        members = (bucket == b).nonzero().flatten()
        members = members[layers[members].argsort(stable=True)]
        batches += [(members[i : i + batch_size], lengths[b]) for i in range(0, members.numel(), batch_size)]
    return batches


def reachable_layers(layers: list[int | None], n_layers: int) -> int:
    """How many MLP outputs (layers `0..k-1`) targets read at `layers` (None: the final residual) depend on.

    A feature of layer l reads the MLP input of layer l, upstream of MLP output l.
    """
    return max(n_layers if layer is None else layer for layer in layers)


@dataclass(frozen=True)
class _Block:
    """Sources at `positions (n,)` stacked per position: `vectors (n, m, d)`, `columns (n·m,)` (see `Readout`)."""

    positions: torch.Tensor
    vectors: torch.Tensor
    columns: torch.Tensor


@dataclass(frozen=True)
class Readout:
    """The source vectors written into one leaf `(n_pos, d)`, laid out for a few batched products per pass.

    Sources at the same position share that position's gradient row, so a position's sources are stacked as the
    columns of one matrix and `bmm` over positions gives every weight at once. Positions are grouped by their
    number of sources (up to a power of two) and each group is zero-padded to its largest count, so padding at
    most doubles the stored vectors however unevenly sources spread over positions. Each block's `columns` name
    the source column of every (position, slot); padding slots name a scratch column that is dropped.
    """

    blocks: tuple[_Block, ...]

    @staticmethod
    def build(
        positions: torch.Tensor, columns: torch.Tensor, vectors: torch.Tensor, n_pos: int, scratch: int
    ) -> Readout:
        """Stack `vectors (k, d)` written at `positions (k,)` by sources `columns (k,)`, padding with `scratch`."""
        order = positions.argsort(stable=True)
        positions, columns, vectors = positions[order], columns[order], vectors[order]
        counts = torch.bincount(positions, minlength=n_pos)
        slots = torch.arange(positions.numel()) - (counts.cumsum(0) - counts)[positions]
        width = torch.where(counts > 0, 2 ** torch.log2(counts.clamp(min=1).double()).ceil().long(), 0)
        blocks = []
        for size in width.unique().tolist():
            if size == 0:
                continue
            members = (width == size).nonzero().flatten()
            rank = torch.full((n_pos,), -1, dtype=torch.long)
            rank[members] = torch.arange(members.numel())
            inside = rank[positions] >= 0
            where, slot = rank[positions[inside]], slots[inside]
            stacked = vectors.new_zeros(members.numel(), size, vectors.shape[-1])
            stacked[where, slot] = vectors[inside]
            names = torch.full((members.numel(), size), scratch, dtype=torch.long)
            names[where, slot] = columns[inside]
            blocks.append(_Block(members, stacked, names.flatten()))
        return Readout(tuple(blocks))

    @property
    def nbytes(self) -> int:
        return sum(block.vectors.numel() * block.vectors.element_size() for block in self.blocks)

    def add_weights(self, out: torch.Tensor, grad: torch.Tensor) -> None:
        """`out (n_columns, batch)` += the direct effect of every source here, given `grad (batch, n_pos, d)`."""
        for block in self.blocks:
            picked = grad if block.positions.numel() == grad.shape[1] else grad.index_select(1, block.positions)
            products = torch.bmm(picked.transpose(0, 1), block.vectors.transpose(1, 2))  # (n, batch, m)
            out.index_add_(0, block.columns, products.transpose(1, 2).reshape(-1, grad.shape[0]))


class SourceVectors:
    """Turns gradients into edge weights from every source (full active-feature layout), one `Readout` per leaf.

    The readout of MLP output l' holds every feature writing there (activation × decoder row: one output layer
    for a PLT feature, every l' ≥ its layer for a CLT feature, so a CLT feature's weight sums over its readouts)
    and the error vectors of layer l'; the embedding readout holds the token embeddings. Readouts are built once
    when their padded size fits `cache_bytes`, otherwise rebuilt for every pass from the unpadded decoder rows.
    """

    def __init__(self, ctx: PromptContext, active: torch.Tensor, cache_bytes: int = READOUT_CACHE_BYTES) -> None:
        self.ctx = ctx
        self.n_active = int(active.shape[0])
        self.writes: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(ctx.n_layers)]
        transcoder = ctx.transcoder
        n_writes = ctx.n_layers * ctx.n_pos  # error vectors
        for layer in range(ctx.n_layers):
            rows = (active[:, 0] == layer).nonzero().flatten()
            if rows.numel() == 0:
                continue
            positions, features = active[rows, 1], active[rows, 2]
            values = ctx.activations[layer, positions, features]
            with torch.no_grad():
                decoders = transcoder.decoder_vectors(layer, features).detach() * values.view(-1, 1, 1)
            for offset, target in enumerate(transcoder.output_layers(layer)):
                self.writes[target].append((rows, positions, decoders[:, offset]))
            n_writes += int(rows.numel()) * len(transcoder.output_layers(layer))
        self.cached: dict[int, Readout] | None = None
        if 2 * n_writes * ctx.inputs.shape[-1] * ctx.inputs.element_size() <= cache_bytes:  # padding at most doubles
            self.cached = {layer: self.readout(layer) for layer in range(ctx.n_layers)}
            self.writes = []  # the readouts hold every decoder row now
        positions = torch.arange(ctx.n_pos)
        token_columns = self.n_active + ctx.n_layers * ctx.n_pos + positions
        self.tokens = Readout.build(positions, token_columns, ctx.embeddings, ctx.n_pos, self.n_sources)

    @property
    def n_sources(self) -> int:
        return self.n_active + self.ctx.n_layers * self.ctx.n_pos + self.ctx.n_pos

    def readout(self, layer: int) -> Readout:
        """Every source writing into MLP output `layer`: its features, then its error nodes."""
        if self.cached is not None:
            return self.cached[layer]
        ctx = self.ctx
        positions = torch.arange(ctx.n_pos)
        writes = [*self.writes[layer], (self.n_active + layer * ctx.n_pos + positions, positions, ctx.errors[layer])]
        columns, where, vectors = (torch.cat(parts) for parts in zip(*writes, strict=True))
        return Readout.build(where, columns, vectors, ctx.n_pos, self.n_sources)

    @torch.no_grad()
    def edge_rows(self, mlp_grads: list[torch.Tensor | None], embed_grad: torch.Tensor) -> torch.Tensor:
        """`(batch, n_sources)` direct effects on each batch row's target."""
        out = torch.zeros(self.n_sources + 1, embed_grad.shape[0], dtype=embed_grad.dtype)  # + a scratch row
        for layer, grad in enumerate(mlp_grads):
            if grad is not None:
                self.readout(layer).add_weights(out, grad)
        self.tokens.add_weights(out, embed_grad)
        return out[:-1].T


def attribute(
    model: LoadedModel,
    transcoder: EncoderStack,
    prompt: str | torch.Tensor,
    *,
    targets: list[Target] | None = None,
    config: AttributionConfig | None = None,
    transcoder_id: str = "transcoders",
) -> AttributionGraph:
    """Attribution graph of `prompt` (text, BOS prepended; or token ids `(n_pos,)` used as given)."""
    config = config or AttributionConfig()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PromptError("the prompt is empty")
        tokens = model.tokenize(prompt)[0].cpu()
        text = prompt
    else:
        tokens = prompt.flatten().cpu()
        text = model.tokenizer.decode(tokens.tolist())
    ctx = build_context(model, transcoder, tokens, zero_positions=config.zero_positions)
    W_U = model.model.W_U.detach().float()
    if targets is None:
        position = ctx.n_pos - 1
        targets = salient_logits(
            ctx.logits[position],
            W_U,
            model.tokenizer,
            position,
            max_n_logits=config.max_n_logits,
            desired_probability=config.desired_logit_probability,
        )
    targets = [  # own copies of the directions: a salient logit's is a view of a whole demeaned unembedding
        Target(t.label, check_position(t.position, ctx.n_pos), t.direction.clone(), t.weight, t.token_id)
        for t in targets
    ]
    del W_U
    if not targets:
        raise ValueError("no attribution targets")
    timings["context"] = time.perf_counter() - start

    start = time.perf_counter()
    ctx.frozen.clear()  # clean patterns and scales: only needed for value replay, never by attribution
    lengths = prefix_lengths(ctx.n_pos, config.prefix_buckets, config.min_prefix_tokens)
    runs: dict[int, FrozenReplacementRun] = {}  # by prefix length, each made when a batch first needs it
    active = ctx.active_features()
    sources = SourceVectors(ctx, active)
    timings["frozen_forward"] = time.perf_counter() - start

    start = time.perf_counter()
    n_active = sources.n_active
    logit_offset = sources.n_sources  # full layout: [active features | errors | tokens | logits]
    n_full = logit_offset + len(targets)
    collected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    forward_seconds: list[float] = []

    def run_batches(row_ids: list[int], injections: list[_Injection]) -> None:
        layers = torch.tensor([ctx.n_layers if i.layer is None else i.layer for i in injections])
        positions = torch.tensor([i.position for i in injections])
        for members, length in plan_batches(layers, positions, lengths, config.batch_size):
            if length not in runs:
                made = time.perf_counter()
                runs[length] = FrozenReplacementRun(ctx, config.batch_size, length)
                forward_seconds.append(time.perf_counter() - made)
            rows = sources.edge_rows(*runs[length].gradients([injections[m] for m in members.tolist()]))
            r, c = rows.nonzero(as_tuple=True)
            ids = torch.tensor(row_ids)[members]
            collected.append((ids[r], c, rows[r, c]))

    run_batches(
        [logit_offset + j for j in range(len(targets))],
        [_Injection(None, t.position, t.direction.to(ctx.inputs.dtype)) for t in targets],
    )
    encoder = transcoder.W_enc.detach()
    cap = n_active if config.max_feature_nodes is None else min(config.max_feature_nodes, n_active)
    visited = torch.zeros(n_active, dtype=torch.bool)
    seed = torch.zeros(n_full)
    seed[logit_offset:] = torch.tensor([t.weight for t in targets])
    while int(visited.sum()) < cap:
        if cap == n_active:
            order = torch.arange(n_active)  # uncapped: layer order, so backward passes stop early
        else:
            current = influence(normalise(_edges(collected, n_full)), seed)[:n_active]
            order = current.argsort(descending=True, stable=True)
        chunk = cap if cap == n_active else config.update_interval * config.batch_size  # uncapped: plan all at once
        pending = order[~visited[order]][: min(cap - int(visited.sum()), chunk)]
        visited[pending] = True
        run_batches(
            pending.tolist(),
            [
                _Injection(int(active[i, 0]), int(active[i, 1]), encoder[int(active[i, 0]), int(active[i, 2])])
                for i in pending.tolist()
            ],
        )
    timings["rows"] = time.perf_counter() - start - sum(forward_seconds)
    timings["frozen_forward"] += sum(forward_seconds)

    start = time.perf_counter()
    graph = _package(ctx, active, visited, _edges(collected, n_full), targets, text, config, transcoder_id)
    timings["package"] = time.perf_counter() - start
    graph.settings["timings"] = timings
    log.info(
        "attribution: %s; %d frozen forwards (prefixes %s)",
        ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
        len(runs),
        sorted(runs),
    )
    return graph


def _edges(collected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_nodes: int) -> SparseEdges:
    if not collected:
        empty = torch.zeros(0, dtype=torch.long)
        return SparseEdges(empty, empty, torch.zeros(0), n_nodes)
    target, source, weight = (torch.cat(parts) for parts in zip(*collected, strict=True))
    return SparseEdges(target, source, weight, n_nodes)


def _package(
    ctx: PromptContext,
    active: torch.Tensor,
    visited: torch.Tensor,
    edges: SparseEdges,
    targets: list[Target],
    text: str,
    config: AttributionConfig,
    transcoder_id: str,
) -> AttributionGraph:
    """Re-index from the full active layout to the selected features; fold unvisited features into errors."""
    n_active, L, n_pos = int(active.shape[0]), ctx.n_layers, ctx.n_pos
    selected = visited.nonzero().flatten()
    n_selected = int(selected.numel())
    shift = n_active - n_selected
    mapping = torch.empty(edges.n_nodes, dtype=torch.long)
    mapping[selected] = torch.arange(n_selected)
    unvisited = (~visited).nonzero().flatten()
    error_start = n_selected
    mapping[unvisited] = error_start + active[unvisited, 0] * n_pos + active[unvisited, 1]
    mapping[n_active:] = torch.arange(n_active, edges.n_nodes) - shift

    def is_visited_feature(indices: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(indices, dtype=torch.bool)
        inside = indices < n_active
        mask[inside] = visited[indices[inside]]
        return mask

    kept = edges.select((edges.target >= n_active) | is_visited_feature(edges.target))  # rows of unvisited: none
    folded = (kept.source < n_active) & ~is_visited_feature(kept.source)
    n_final = edges.n_nodes - shift
    target, source = mapping[kept.target], mapping[kept.source]
    key = target * n_final + source
    unique, inverse = key.unique(return_inverse=True)
    weight = torch.zeros(unique.numel(), dtype=kept.weight.dtype).index_add_(0, inverse, kept.weight)
    nonzero = weight != 0
    final_edges = SparseEdges(unique[nonzero] // n_final, unique[nonzero] % n_final, weight[nonzero], n_final)

    features = [FeatureNode(layer, position, feature) for layer, position, feature in active[selected].tolist()]
    logits = [LogitNode(t.position, t.token_id, t.label) for t in targets]
    index = NodeIndex(features, n_layers=L, tokens=ctx.tokens.tolist(), logits=logits)
    folded_abs = float(kept.weight[folded].abs().sum())
    total_abs = float(kept.weight.abs().sum())
    target_values = torch.tensor([float(t.direction @ ctx.final_residual[t.position]) for t in targets])
    return AttributionGraph(
        prompt=text,
        tokens=ctx.tokens.tolist(),
        token_strings=[ctx.model.tokenizer.decode([t]) for t in ctx.tokens.tolist()],
        index=index,
        edges=final_edges,
        activations=ctx.activations[active[selected, 0], active[selected, 1], active[selected, 2]],
        target_probabilities=torch.tensor([t.weight for t in targets]),
        target_logits=target_values,
        error_norms=ctx.errors.norm(dim=-1),
        model_name=ctx.model.info.name,
        transcoder_id=transcoder_id,
        settings={
            **asdict(config),
            "zero_positions": list(ctx.zero_positions),
            "vocab_size": ctx.model.info.vocab_size,
        },
        folded_features={
            "n_active": n_active,
            "n_selected": n_selected,
            "n_folded_into_errors": n_active - n_selected,
            "folded_edge_abs_share": folded_abs / total_abs if total_abs else 0.0,
        },
    )
