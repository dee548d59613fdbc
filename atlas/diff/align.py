"""Feature alignment between two transcoder dictionaries, layer by layer.

Similarities (pure functions on matrices):
- decoder cosine: the cosine of two features' decoder vectors (a CLT's decoders into all its output layers,
  concatenated); meaningful when both dictionaries write into the same residual basis (one model, or a fine-tune of
  it);
- encoder cosine: the same on the encoder rows;
- activation correlation: Pearson correlation of the two features' activations over the tokens of a shared prompt
  set (needs the same tokenizer; works across models).

Matching, per layer (a feature is only compared with features of the same layer), on a score that is the decoder
cosine, or the mean of decoder cosine and activation correlation when activations are given:
- mutual nearest neighbours: a is b's best match and b is a's;
- an optimal one-to-one assignment maximising the summed score (SciPy's `linear_sum_assignment`); above `chunk`
  features per side, rows are solved in chunks against the union of each row's `candidates` best still-free
  columns (exact when one chunk holds the layer; otherwise near-exact for sparse, near-one-hot similarities);
- one-to-many (a split): every B feature whose best A feature is a, with score >= `split_score`, when a has two or
  more of them (and the mirror case, a merge, from A's side).

A pair counts as aligned when its score >= `match_score` (default 0.7). The pair of dictionaries is classified
(thresholds in `AlignmentThresholds`):
- **injective** when at least `injective_fraction` (0.8) of A's live features have an aligned one-to-one partner;
- else **convertible** when a linear map W with W·a₁ + c ≈ a₂ fits the activations of the circuit features with a
  held-out R² >= `convertible_r2` (0.8; fitted by ridge least squares on even tokens, scored on odd tokens);
- else **distributional** when the aligned pairs correlate (median correlation >= `group_corr`, 0.5) on some prompt
  groups and not on others;
- else **unaligned**.

Different residual widths are refused (`AlignmentError`): no decoder or encoder cosine exists between vectors of
different spaces, and no learned map between them is implemented.

This module computes; it does not read or write any store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from atlas.attribution.context import build_context
from atlas.models.loading import LoadedModel
from atlas.transcoders.base import EncoderStack

logger = logging.getLogger(__name__)

INJECTIVE, CONVERTIBLE, DISTRIBUTIONAL, UNALIGNED = "injective", "convertible", "distributional", "unaligned"
METHOD_MUTUAL, METHOD_ASSIGNMENT, METHOD_SPLIT, METHOD_MERGE = "mutual", "assignment", "split", "merge"


class AlignmentError(ValueError):
    """Two dictionaries (or their activations) that cannot be aligned: the message names the mismatch."""


@dataclass(frozen=True)
class AlignmentThresholds:
    match_score: float = 0.7
    split_score: float = 0.5
    injective_fraction: float = 0.8
    convertible_r2: float = 0.8
    group_corr: float = 0.5
    ridge: float = 1e-3


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`(n_a, d)`, `(n_b, d)` → `(n_a, n_b)` cosines; a zero row has cosine 0 with everything."""
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    a_unit = np.divide(a, na, out=np.zeros_like(a, dtype=np.float64), where=na > 0)
    b_unit = np.divide(b, nb, out=np.zeros_like(b, dtype=np.float64), where=nb > 0)
    return np.clip(a_unit @ b_unit.T, -1.0, 1.0)


def correlation_matrix(x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
    """`(n_tokens, n_a)`, `(n_tokens, n_b)` activations → `(n_a, n_b)` Pearson correlations (0 for a constant,
    e.g. dead, feature)."""
    if x_a.shape[0] != x_b.shape[0]:
        raise AlignmentError(f"activations cover {x_a.shape[0]} and {x_b.shape[0]} tokens; they must be the same")
    ca = x_a - x_a.mean(axis=0, keepdims=True)
    cb = x_b - x_b.mean(axis=0, keepdims=True)
    return cosine_matrix(ca.T, cb.T)


def mutual_nearest(score: np.ndarray) -> list[tuple[int, int]]:
    """`(n_a, n_b)` → pairs (i, j) where j is row i's best column and i is column j's best row."""
    if score.size == 0:
        return []
    best_col = score.argmax(axis=1)
    best_row = score.argmax(axis=0)
    return [(i, int(j)) for i, j in enumerate(best_col) if best_row[j] == i]


def assignment(score: np.ndarray, *, chunk: int = 4096, candidates: int = 16) -> list[tuple[int, int]]:
    """`(n_a, n_b)` → one-to-one pairs maximising the summed score (`min(n_a, n_b)` pairs).

    Exact (`linear_sum_assignment`) when both sides fit in `chunk`; otherwise rows in order of their best score, in
    chunks of `chunk`, each solved against the union of its rows' `candidates` best still-free columns."""
    n_a, n_b = score.shape
    if n_a == 0 or n_b == 0:
        return []
    if n_a <= chunk and n_b <= chunk:
        rows, cols = linear_sum_assignment(score, maximize=True)
        return sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    free = np.ones(n_b, dtype=bool)
    pairs: list[tuple[int, int]] = []
    order = np.argsort(-score.max(axis=1), kind="stable")
    for start in range(0, n_a, chunk):
        if not free.any():
            break
        rows = order[start : start + chunk]
        free_cols = np.flatnonzero(free)
        sub = score[np.ix_(rows, free_cols)]
        k = min(candidates, len(free_cols))
        top = np.argpartition(-sub, k - 1, axis=1)[:, :k] if k < len(free_cols) else np.arange(len(free_cols))[None]
        cols = free_cols[np.unique(top)]
        r, c = linear_sum_assignment(score[np.ix_(rows, cols)], maximize=True)
        for i, j in zip(rows[r].tolist(), cols[c].tolist(), strict=True):
            pairs.append((i, j))
            free[j] = False
    return sorted(pairs)


def one_to_many(score: np.ndarray, threshold: float) -> dict[int, list[int]]:
    """`(n_a, n_b)` → {row: columns} for rows that are the best row of two or more columns scoring >= `threshold`
    with it (a feature of A split into several of B). Transpose `score` for merges."""
    if score.size == 0:
        return {}
    best_row = score.argmax(axis=0)
    groups: dict[int, list[int]] = {}
    for j, i in enumerate(best_row.tolist()):
        if score[i, j] >= threshold:
            groups.setdefault(i, []).append(j)
    return {i: cols for i, cols in groups.items() if len(cols) >= 2}


def linear_map_r2(x_a: np.ndarray, x_b: np.ndarray, *, ridge: float = 1e-3) -> tuple[np.ndarray, float]:
    """Fit `x_b ≈ x_a @ W + c` by ridge least squares on even rows; return (W `(n_a + 1, n_b)`, R² on odd rows).

    `x_a` `(n_tokens, n_a)`, `x_b` `(n_tokens, n_b)`. R² = 1 − SSE / SST summed over outputs (pooled); 0 targets
    of zero variance give R² = nan."""
    if x_a.shape[0] != x_b.shape[0]:
        raise AlignmentError(f"activations cover {x_a.shape[0]} and {x_b.shape[0]} tokens; they must be the same")
    if x_a.shape[0] < 4:
        raise AlignmentError(f"a linear map needs at least 4 tokens, got {x_a.shape[0]}")
    design = np.hstack([x_a, np.ones((x_a.shape[0], 1))])
    train, test = design[0::2], design[1::2]
    y_train, y_test = x_b[0::2], x_b[1::2]
    scale = max(float(np.mean(train**2)), 1e-12)
    gram = train.T @ train + ridge * scale * train.shape[0] * np.eye(train.shape[1])
    weights = np.linalg.solve(gram, train.T @ y_train)
    residual = y_test - test @ weights
    total = y_test - y_test.mean(axis=0, keepdims=True)
    sst = float((total**2).sum())
    return weights, (float("nan") if sst == 0 else 1.0 - float((residual**2).sum()) / sst)


@dataclass(frozen=True)
class FeaturePair:
    layer: int
    a: int
    b: int
    decoder_cos: float
    encoder_cos: float
    act_corr: float | None
    score: float
    method: str  # "mutual" | "assignment" | "split" | "merge"


@dataclass
class LayerAlignment:
    layer: int
    pairs: list[FeaturePair]  # one-to-one (mutual or assignment) pairs with score >= match_score
    splits: dict[int, list[int]]  # A feature → the B features it split into
    merges: dict[int, list[int]]  # B feature → the A features merged into it
    n_live_a: int
    n_live_b: int


@dataclass
class Alignment:
    layers: list[LayerAlignment]
    thresholds: AlignmentThresholds
    classification: str = UNALIGNED
    matched_fraction: float = 0.0  # aligned one-to-one partners / live features of A
    r2: float | None = None  # held-out R² of the linear map on circuit features (when fitted)
    group_corr: dict[str, float] = field(default_factory=dict)  # prompt group → median correlation of pairs
    seconds: float = 0.0

    def one_to_one(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(layer, A feature) → (layer, B feature) for every aligned one-to-one pair."""
        return {
            (p.layer, p.a): (p.layer, p.b)
            for layer in self.layers
            for p in layer.pairs
            if p.method in (METHOD_MUTUAL, METHOD_ASSIGNMENT)
        }

    def all_pairs(self) -> list[FeaturePair]:
        return [p for layer in self.layers for p in layer.pairs]


def decoder_matrix(transcoder: EncoderStack, layer: int, *, first_only: bool = False) -> np.ndarray:
    """`(F, n_out · d)` decoder rows of a layer's features (`(F, d)` into the source layer only if `first_only`)."""
    with torch.no_grad():
        vectors = transcoder.decoder_vectors(layer, torch.arange(transcoder.spec.n_features))
    if first_only:
        vectors = vectors[:, :1]
    return vectors.reshape(vectors.shape[0], -1).double().cpu().numpy()


def check_alignable(a: EncoderStack, b: EncoderStack) -> None:
    """Raise `AlignmentError` unless the two dictionaries share residual width and layer count."""
    if a.spec.d_model != b.spec.d_model:
        raise AlignmentError(
            f"residual widths differ (d_model {a.spec.d_model} vs {b.spec.d_model}): decoder and encoder cosines "
            "need one residual space, and no cross-width alignment method is implemented"
        )
    if a.spec.n_layers != b.spec.n_layers:
        raise AlignmentError(f"layer counts differ ({a.spec.n_layers} vs {b.spec.n_layers}): features are aligned "
                             "layer by layer")  # fmt: skip


def feature_activations(model: LoadedModel, transcoder: EncoderStack, texts: Sequence[str]) -> np.ndarray:
    """`(n_layers, n_tokens, F)` activations over every non-BOS position of `texts`, concatenated in order."""
    blocks = []
    with torch.no_grad():
        for text in texts:
            tokens = model.tokenize(text)[0].cpu()
            ctx = build_context(model, transcoder, tokens)
            blocks.append(ctx.activations[:, 1:].double().cpu().numpy())
    return np.concatenate(blocks, axis=1)


def align_layer(
    layer: int,
    dec_a: np.ndarray,
    dec_b: np.ndarray,
    enc_a: np.ndarray,
    enc_b: np.ndarray,
    acts_a: np.ndarray | None,
    acts_b: np.ndarray | None,
    thresholds: AlignmentThresholds,
    *,
    chunk: int = 4096,
) -> LayerAlignment:
    """One layer: decoders `(F_a, k)`/`(F_b, k)`, encoders `(F_a, d)`/`(F_b, d)`, activations `(n_tokens, F)`."""
    dec = cosine_matrix(dec_a, dec_b)
    corr = None if acts_a is None or acts_b is None else correlation_matrix(acts_a, acts_b)
    score = dec if corr is None else (dec + corr) / 2
    live_a = np.linalg.norm(dec_a, axis=1) > 0
    live_b = np.linalg.norm(dec_b, axis=1) > 0
    if acts_a is not None and acts_b is not None:
        live_a &= (acts_a != 0).any(axis=0)
        live_b &= (acts_b != 0).any(axis=0)
    mutual = set(mutual_nearest(score))

    def pair(i: int, j: int, method: str) -> FeaturePair:
        enc = float(cosine_matrix(enc_a[i : i + 1], enc_b[j : j + 1])[0, 0])
        return FeaturePair(layer, i, j, float(dec[i, j]), enc, None if corr is None else float(corr[i, j]),
                           float(score[i, j]), method)  # fmt: skip

    pairs = [
        pair(i, j, METHOD_MUTUAL if (i, j) in mutual else METHOD_ASSIGNMENT)
        for i, j in assignment(score, chunk=chunk)
        if score[i, j] >= thresholds.match_score and live_a[i] and live_b[j]
    ]
    splits = one_to_many(score, thresholds.split_score)
    merges = one_to_many(score.T, thresholds.split_score)
    matched = {(p.a, p.b) for p in pairs}
    pairs += [pair(i, j, METHOD_SPLIT) for i, cols in splits.items() for j in cols if (i, j) not in matched]
    pairs += [pair(i, j, METHOD_MERGE) for j, rows in merges.items() for i in rows if (i, j) not in matched]
    return LayerAlignment(layer, pairs, splits, merges, int(live_a.sum()), int(live_b.sum()))


def align_dictionaries(
    a: EncoderStack,
    b: EncoderStack,
    *,
    acts_a: np.ndarray | None = None,
    acts_b: np.ndarray | None = None,
    circuit_a: Sequence[tuple[int, int]] = (),
    circuit_b: Sequence[tuple[int, int]] = (),
    groups: Mapping[str, np.ndarray] | None = None,
    thresholds: AlignmentThresholds | None = None,
    chunk: int = 4096,
) -> Alignment:
    """Align dictionaries `a` and `b` layer by layer and classify the pair.

    `acts_a` / `acts_b`: `(n_layers, n_tokens, F)` activations on one shared token set (`feature_activations`);
    `circuit_a` / `circuit_b`: (layer, feature) of the circuit features the linear map is fitted on; `groups`: prompt
    group name → boolean `(n_tokens,)` mask of its tokens."""
    started = time.perf_counter()
    thresholds = thresholds or AlignmentThresholds()
    check_alignable(a, b)
    if (acts_a is None) != (acts_b is None):
        raise AlignmentError("give activations for both dictionaries or for neither")
    if acts_a is not None and acts_b is not None and acts_a.shape[1] != acts_b.shape[1]:
        raise AlignmentError(f"activations cover {acts_a.shape[1]} and {acts_b.shape[1]} tokens: the two "
                             "tokenizations differ")  # fmt: skip
    first_only = a.spec.kind != b.spec.kind  # a PLT and a CLT share only the decoder into the source layer
    layers = []
    for layer in range(a.spec.n_layers):
        layers.append(
            align_layer(
                layer,
                decoder_matrix(a, layer, first_only=first_only),
                decoder_matrix(b, layer, first_only=first_only),
                a.W_enc[layer].detach().double().cpu().numpy(),
                b.W_enc[layer].detach().double().cpu().numpy(),
                None if acts_a is None else acts_a[layer],
                None if acts_b is None else acts_b[layer],
                thresholds,
                chunk=chunk,
            )
        )
    result = Alignment(layers, thresholds)
    n_live = sum(layer.n_live_a for layer in layers)
    n_matched = sum(1 for p in result.all_pairs() if p.method in (METHOD_MUTUAL, METHOD_ASSIGNMENT))
    result.matched_fraction = n_matched / n_live if n_live else 0.0
    if acts_a is not None and acts_b is not None and circuit_a and circuit_b:
        x_a = np.stack([acts_a[layer][:, f] for layer, f in circuit_a], axis=1)
        x_b = np.stack([acts_b[layer][:, f] for layer, f in circuit_b], axis=1)
        result.r2 = linear_map_r2(x_a, x_b, ridge=thresholds.ridge)[1]
    if acts_a is not None and acts_b is not None and groups:
        one = [p for p in result.all_pairs() if p.method in (METHOD_MUTUAL, METHOD_ASSIGNMENT)]
        for name, mask in groups.items():
            corrs = [_corr(acts_a[p.layer][mask, p.a], acts_b[p.layer][mask, p.b]) for p in one]
            result.group_corr[name] = float(np.median(corrs)) if corrs else 0.0
    result.classification = classify(result.matched_fraction, result.r2, result.group_corr, thresholds)
    result.seconds = time.perf_counter() - started
    logger.info("aligned %d layers in %.2fs: %s (%.1f%% matched)", len(layers), result.seconds,
                result.classification, 100 * result.matched_fraction)  # fmt: skip
    return result


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    return float(correlation_matrix(x[:, None], y[:, None])[0, 0])


def classify(
    matched_fraction: float, r2: float | None, group_corr: Mapping[str, float], thresholds: AlignmentThresholds
) -> str:
    """injective / convertible / distributional / unaligned, by the documented thresholds (module docstring)."""
    if matched_fraction >= thresholds.injective_fraction:
        return INJECTIVE
    if r2 is not None and not np.isnan(r2) and r2 >= thresholds.convertible_r2:
        return CONVERTIBLE
    aligned = [c >= thresholds.group_corr for c in group_corr.values()]
    if any(aligned) and not all(aligned):
        return DISTRIBUTIONAL
    return UNALIGNED
