"""Global (input-independent) weights of a transcoder set: each feature's top-k virtual weights, in chunks.

Virtual weight from feature s (layer l_s) to feature t (layer l_t > l_s), through the residual stream only:

    V_st = < Σ_{ℓ ∈ L_st} W_dec^{s,ℓ} , r_t >,   L_st = { ℓ : s writes to MLP output ℓ and l_s ≤ ℓ < l_t }

A feature of layer l reads the MLP *input* of layer l, which sits upstream of MLP output l; so t sees the decoders
s writes into layers l_s … l_t − 1 and never the one into its own layer l_t. For a per-layer transcoder (PLT) L_st is
{l_s}; for a cross-layer transcoder (CLT) it has l_t − l_s terms. Features of the same layer have no virtual weight.

The reader r_t is t's encoder row moved from the normalised MLP input back onto the residual stream (`norm`):
- "fold" (default): the input-independent part of the norm in front of the MLP (`ln2`): r = w_ln ⊙ W_enc^t, then
  centred over d_model for a LayerNorm (RMSNorm does not centre). What is left out is the prompt's scale σ_{l_t,p}:
  in the attribution engine's frozen model a same-position edge through the residual alone is a_s · V_st / σ.
- "ignore": r = W_enc^t, the formula as written, dotting a residual write with a normalised-space read.
Tokens and logits go through the same algebra: token → feature reads W_E[token] (the vector at `hook_embed`) with
r_t; feature → logit writes Σ_{ℓ ≥ l_s} W_dec^{s,ℓ} (every output layer) and reads the demeaned unembedding column
(W_U[:, v] − mean_v W_U, the engine's logit target direction) through `ln_final` folded the same way.

What this is not: paths through attention (OV under any pattern, i.e. between positions and also at the same
position) and through transcoder skip connections (`W_skip`) are left out: for features at different positions this
is only the direct residual path. Positional embeddings and biases are constants, not sources.

Scale: features are numbered globally, `id = layer · F + feature`. The dense (L·F)² matrix is never built: for each
source layer i and target layer j > i the block C_ij · R_jᵀ is computed in tiles of at most `tile × tile`, each
tile's row-wise and column-wise top-k merged into running top-k states, one per feature and direction. Memory is
O(L·F·k + tile² + L·F·d): the top-k states, one tile, every layer's read vectors and one source layer's decoders (no
more than the weights being read); work is Σ_{i<j} F²·d. Top-k ranks by |V| and keeps the sign; partners are −1
where a feature has fewer than k candidates (layer-0 features have no incoming feature weights, last-layer ones
no outgoing).
Token and logit tables tile the vocabulary instead (outer loop; each tile's read vectors built once) and hold every
layer's read or write vectors, `L·F·d` (the size of the encoder), plus one `ROW_TILE × vocab_tile` block.
This module computes and lays rows out (`to_table`); it writes nothing (see `atlas.storage.global_weights`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import torch

from atlas.storage.global_weights import GLOBAL_WEIGHTS_SCHEMA
from atlas.transcoders.base import EncoderStack

NormMode = Literal["fold", "ignore"]
NORM_MODES: tuple[NormMode, ...] = ("fold", "ignore")
DEFAULT_K = 64
DEFAULT_TILE = 2048
ROW_TILE = 2048  # rows per block in the token and logit phases

Progress = Callable[[str, int, int], None]  # (phase, done, total)


class GlobalWeightsError(ValueError):
    """The request cannot be computed (bad k, unknown feature, transcoders that do not fit the model)."""


@dataclass(frozen=True)
class NormFold:
    """The input-independent part of a norm in front of a reader: elementwise `weight (d,)`, then centring or not."""

    weight: torch.Tensor | None
    centre: bool

    def apply(self, readers: torch.Tensor) -> torch.Tensor:
        """`(n, d)` read directions after the norm → `(n, d)` directions on the residual stream (up to 1/σ)."""
        out = readers if self.weight is None else readers * self.weight.to(readers)
        return out - out.mean(-1, keepdim=True) if self.centre else out


IDENTITY = NormFold(None, False)


@dataclass(frozen=True)
class ResidualReaders:
    """What the model contributes: norm folds before each MLP input and before the unembedding, W_E and W_U."""

    mlp_in: tuple[NormFold, ...]  # per layer
    final: NormFold
    W_E: torch.Tensor  # (vocab, d_model)
    W_U: torch.Tensor  # (d_model, vocab)
    norm: NormMode


def residual_readers(model: Any, norm: NormMode = "fold") -> ResidualReaders:
    """Read norm weights, W_E and W_U from a TransformerLens bridge (`LoadedModel.model`)."""
    if norm not in NORM_MODES:
        raise GlobalWeightsError(f"unknown norm mode {norm!r}; expected one of {NORM_MODES}")
    bridge = model.model
    kind = getattr(bridge.cfg, "normalization_type", None)
    if norm == "ignore":
        folds: tuple[NormFold, ...] = (IDENTITY,) * len(bridge.blocks)
        final = IDENTITY
    elif kind in ("LN", "RMS"):
        centre = kind == "LN"
        folds = tuple(NormFold(block.ln2.weight.detach().float().cpu(), centre) for block in bridge.blocks)
        final = NormFold(bridge.ln_final.weight.detach().float().cpu(), centre)
    else:
        raise GlobalWeightsError(f"cannot fold normalisation of type {kind!r}; use norm='ignore'")
    return ResidualReaders(folds, final, bridge.W_E.detach().float().cpu(), bridge.W_U.detach().float().cpu(), norm)


@dataclass
class TopK:
    """Running top-k by |value| for `n` rows: `values (n, k)` signed, `partners (n, k)` ids, −1 for none."""

    values: torch.Tensor
    partners: torch.Tensor

    @staticmethod
    def empty(n: int, k: int, device: torch.device | str = "cpu") -> TopK:
        return TopK(torch.zeros(n, k, device=device), torch.full((n, k), -1, dtype=torch.long, device=device))

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    def merge(self, rows: slice, values: torch.Tensor, partners: torch.Tensor) -> None:
        """Fold candidates `values (r, m)` with ids `partners (r, m)` into rows `rows` (r of them), keeping k."""
        if values.shape[1] > self.k:  # pre-select: never concatenate more than 2k columns
            picked = values.abs().topk(self.k, dim=1).indices
            values, partners = values.gather(1, picked), partners.gather(1, picked)
        all_values = torch.cat([self.values[rows], values], dim=1)
        all_partners = torch.cat([self.partners[rows], partners], dim=1)
        key = torch.where(all_partners >= 0, all_values.abs(), torch.full_like(all_values, -1.0))
        picked = key.topk(self.k, dim=1).indices
        self.values[rows] = all_values.gather(1, picked)
        self.partners[rows] = all_partners.gather(1, picked)

    def cpu(self) -> TopK:
        return TopK(self.values.cpu(), self.partners.cpu())


@dataclass
class GlobalWeights:
    """Top-k global weights of every feature (`id = layer · F + feature`), each `TopK` with `L·F` rows.

    `incoming`/`outgoing`: feature partners (ids); `tokens_in`: token ids whose embedding drives the feature most;
    `logits_out`: vocabulary ids the feature's total write moves most (demeaned logit).
    """

    n_layers: int
    n_features: int
    k: int
    norm: NormMode
    incoming: TopK
    outgoing: TopK
    tokens_in: TopK | None = None
    logits_out: TopK | None = None
    timings: dict[str, float] = field(default_factory=dict)


def check_k(k: int, transcoder: EncoderStack) -> None:
    total = transcoder.spec.n_layers * transcoder.spec.n_features
    if not 1 <= k <= total:
        raise GlobalWeightsError(f"k must be in 1…{total} (the dictionary's number of features), got {k}")


def feature_id(transcoder: EncoderStack, layer: int, feature: int) -> int:
    """Global id of (layer, feature); a clear error for a feature the dictionary does not have."""
    spec = transcoder.spec
    if not (0 <= layer < spec.n_layers and 0 <= feature < spec.n_features):
        raise GlobalWeightsError(
            f"no feature ({layer}, {feature}): the dictionary has {spec.n_layers} layers × {spec.n_features} features"
        )
    return layer * spec.n_features + feature


def encoder_readers(transcoder: EncoderStack, layer: int, fold: NormFold) -> torch.Tensor:
    """`(F, d_model)` residual-stream read directions of layer `layer`'s features (encoder rows, norm folded)."""
    return fold.apply(transcoder.W_enc[layer].detach().float())


def cumulative_writes(transcoder: EncoderStack, source: int, before: int | None = None) -> torch.Tensor:
    """`(F, d_model)` Σ of each source-layer feature's decoders into output layers ℓ < `before` (None: all)."""
    spec = transcoder.spec
    decoders = transcoder.decoder_vectors(source, torch.arange(spec.n_features)).detach().float()  # (F, n_out, d)
    outputs = list(transcoder.output_layers(source))
    keep = [o for o, layer in enumerate(outputs) if before is None or layer < before]
    if not keep:
        return decoders.new_zeros(spec.n_features, spec.d_model)
    return decoders[:, keep].sum(1)


def _tiles(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


@torch.no_grad()
def feature_topk(
    transcoder: EncoderStack,
    readers: ResidualReaders,
    k: int,
    *,
    tile: int = DEFAULT_TILE,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[TopK, TopK]:
    """Top-k incoming and outgoing feature→feature virtual weights of every feature: two `TopK` of `L·F` rows."""
    check_k(k, transcoder)
    L, F = transcoder.spec.n_layers, transcoder.spec.n_features
    incoming, outgoing = TopK.empty(L * F, k, device), TopK.empty(L * F, k, device)
    enc = [encoder_readers(transcoder, j, readers.mlp_in[j]).to(device) for j in range(L)]
    done, total = 0, L * (L - 1) // 2
    for i in range(L):
        decoders = transcoder.decoder_vectors(i, torch.arange(F)).detach().float().to(device)  # (F, n_out, d)
        outputs = list(transcoder.output_layers(i))
        writes = decoders.new_zeros(F, transcoder.spec.d_model)
        for j in range(i + 1, L):
            if j - 1 in outputs:  # writes: decoders into layers i…j−1, grown by one layer per step
                writes = writes + decoders[:, outputs.index(j - 1)]
            for rows in _tiles(F, tile):
                src_ids = torch.arange(rows.start, rows.stop, device=device) + i * F
                for cols in _tiles(F, tile):
                    block = writes[rows] @ enc[j][cols].T  # (r, c) = V[source rows, target cols]
                    tgt_ids = torch.arange(cols.start, cols.stop, device=device) + j * F
                    out_rows = slice(i * F + rows.start, i * F + rows.stop)
                    in_rows = slice(j * F + cols.start, j * F + cols.stop)
                    outgoing.merge(out_rows, block, tgt_ids.expand(block.shape[0], -1))
                    incoming.merge(in_rows, block.T.contiguous(), src_ids.expand(block.shape[1], -1))
            done += 1
            if progress:
                progress("features", done, total)
    return incoming.cpu(), outgoing.cpu()


def _vocab_topk(
    rows: list[torch.Tensor],
    read: Callable[[slice], torch.Tensor],
    vocab: int,
    k: int,
    *,
    tile: int,
    device: torch.device | str,
    phase: str,
    progress: Progress | None,
) -> TopK:
    """Top-k over vocabulary ids of `rows[l] (F, d) @ read(ids)ᵀ` for every layer l: a `TopK` of `L·F` rows.

    Vocabulary tiles are the outer loop, so each tile's read vectors `read(ids) (t, d)` are built once; the layers'
    rows are stacked and taken `ROW_TILE` at a time (blocks of at most `ROW_TILE × tile`).
    """
    stacked = torch.cat(rows)  # (L·F, d)
    state = TopK.empty(stacked.shape[0], min(k, vocab), device)
    tiles = _tiles(vocab, tile)
    for done, cols in enumerate(tiles, 1):
        vectors = read(cols).to(device)
        ids = torch.arange(cols.start, cols.stop, device=device)
        for part in _tiles(stacked.shape[0], ROW_TILE):
            state.merge(part, stacked[part] @ vectors.T, ids.expand(part.stop - part.start, -1))
        if progress:
            progress(phase, done, len(tiles))
    return state.cpu()


@torch.no_grad()
def token_topk(
    transcoder: EncoderStack,
    readers: ResidualReaders,
    k: int,
    *,
    tile: int = 8192,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> TopK:
    """Per feature, the top-k tokens by < W_E[token], r_t >: the token embedding's direct path to the feature."""
    L = transcoder.spec.n_layers
    encoders = [encoder_readers(transcoder, j, readers.mlp_in[j]).to(device) for j in range(L)]
    return _vocab_topk(
        encoders, lambda cols: readers.W_E[cols], readers.W_E.shape[0], k, tile=tile, device=device,
        phase="tokens", progress=progress,
    )  # fmt: skip


def logit_readers(readers: ResidualReaders, cols: slice, mean: torch.Tensor | None = None) -> torch.Tensor:
    """`(t, d_model)` residual read directions of vocabulary ids `cols`: demeaned W_U columns through `ln_final`.

    `mean (d_model, 1)`: W_U's mean over the vocabulary, when the caller has it already.
    """
    mean = readers.W_U.mean(1, keepdim=True) if mean is None else mean
    return readers.final.apply((readers.W_U[:, cols] - mean).T)


@torch.no_grad()
def logit_topk(
    transcoder: EncoderStack,
    readers: ResidualReaders,
    k: int,
    *,
    tile: int = 8192,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> TopK:
    """Per feature, the top-k vocabulary ids by < Σ_ℓ W_dec^{s,ℓ}, demeaned W_U[:, v] through `ln_final` >."""
    writes = [cumulative_writes(transcoder, i).to(device) for i in range(transcoder.spec.n_layers)]
    mean = readers.W_U.mean(1, keepdim=True)
    return _vocab_topk(
        writes, lambda cols: logit_readers(readers, cols, mean), readers.W_U.shape[1], k, tile=tile, device=device,
        phase="logits", progress=progress,
    )  # fmt: skip


def global_weights(
    transcoder: EncoderStack,
    readers: ResidualReaders,
    k: int = DEFAULT_K,
    *,
    tokens: bool = True,
    logits: bool = True,
    tile: int = DEFAULT_TILE,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> GlobalWeights:
    """Every top-k table of one transcoder set (feature in/out, token in, logit out), with per-phase timings."""
    check_k(k, transcoder)
    if len(readers.mlp_in) != transcoder.spec.n_layers or readers.W_E.shape[1] != transcoder.spec.d_model:
        raise GlobalWeightsError(
            f"the transcoders ({transcoder.spec.n_layers} layers, d_model {transcoder.spec.d_model}) do not match the"
            f" model ({len(readers.mlp_in)} layers, d_model {readers.W_E.shape[1]})"
        )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    incoming, outgoing = feature_topk(transcoder, readers, k, tile=tile, device=device, progress=progress)
    timings["features"] = time.perf_counter() - start
    result = GlobalWeights(transcoder.spec.n_layers, transcoder.spec.n_features, k, readers.norm, incoming, outgoing)
    if tokens:
        start = time.perf_counter()
        result.tokens_in = token_topk(transcoder, readers, k, device=device, progress=progress)
        timings["tokens"] = time.perf_counter() - start
    if logits:
        start = time.perf_counter()
        result.logits_out = logit_topk(transcoder, readers, k, device=device, progress=progress)
        timings["logits"] = time.perf_counter() - start
    result.timings = timings
    return result


@torch.no_grad()
def dense_virtual_weights(transcoder: EncoderStack, readers: ResidualReaders) -> torch.Tensor:
    """The naive baseline: the whole `(L·F, L·F)` matrix V[source id, target id] (zero unless l_s < l_t).

    Memory O((L·F)²): for benchmarks and small dictionaries only.
    """
    L, F = transcoder.spec.n_layers, transcoder.spec.n_features
    dense = torch.zeros(L * F, L * F)
    for i in range(L):
        for j in range(i + 1, L):
            block = cumulative_writes(transcoder, i, before=j) @ encoder_readers(transcoder, j, readers.mlp_in[j]).T
            dense[i * F : (i + 1) * F, j * F : (j + 1) * F] = block
    return dense


def to_table(result: GlobalWeights, transcoder_id: str) -> pa.Table:
    """Rows of `GLOBAL_WEIGHTS_SCHEMA`: one per (feature, relation, rank) that has a partner."""
    F = result.n_features
    parts: dict[str, list[Any]] = {name: [] for name in GLOBAL_WEIGHTS_SCHEMA.names}
    relations = [("feature_out", result.outgoing, True), ("feature_in", result.incoming, True),
                 ("token_in", result.tokens_in, False), ("logit_out", result.logits_out, False)]  # fmt: skip
    for relation, top, partner_is_feature in relations:
        if top is None:
            continue
        rows, ranks = (top.partners >= 0).nonzero(as_tuple=True)
        partners = top.partners[rows, ranks]
        n = int(rows.numel())
        parts["transcoder_id"].append(pa.array([transcoder_id] * n, pa.string()))
        parts["norm"].append(pa.array([result.norm] * n, pa.string()))
        parts["relation"].append(pa.array([relation] * n, pa.string()))
        parts["layer"].append(pa.array((rows // F).int().numpy(), pa.int32()))
        parts["feature"].append(pa.array((rows % F).int().numpy(), pa.int32()))
        parts["rank"].append(pa.array(ranks.int().numpy(), pa.int32()))
        partner_layer = (partners // F).int().numpy() if partner_is_feature else None
        parts["partner_layer"].append(
            pa.array(partner_layer, pa.int32()) if partner_is_feature else pa.nulls(n, pa.int32())
        )
        parts["partner"].append(pa.array((partners % F if partner_is_feature else partners).numpy(), pa.int64()))
        parts["v"].append(pa.array(top.values[rows, ranks].double().numpy(), pa.float64()))
        parts["twera"].append(pa.nulls(n, pa.float64()))
        parts["era"].append(pa.nulls(n, pa.float64()))
    columns = [pa.concat_arrays(parts[name]) if parts[name] else pa.array([], field.type)
               for name, field in zip(GLOBAL_WEIGHTS_SCHEMA.names, GLOBAL_WEIGHTS_SCHEMA, strict=True)]  # fmt: skip
    return pa.Table.from_arrays(columns, schema=GLOBAL_WEIGHTS_SCHEMA)
