"""Co-activation statistics for activation-weighted global weights (TWERA, ERA), sparse and mergeable.

For a fixed list of feature pairs (source i, target j) — the pairs with a nonzero virtual weight among each source's
top-k (`pairs_from_topk`), never all pairs — an accumulator sums over every token it sees (same position: the
residual path a virtual weight describes):
- `n_tokens`, and per feature `Σ a` (float64);
- per pair `Σ a_i · a_j` (float64; each product of two float32 activations is exact in float64).
Accumulators of disjoint token sets merge by adding counts (exact) and sums (float64 additions: the result depends
on the order only at float64 rounding, ~1e-16 relative per addition), so shards computed by different workers and
merged give the statistics of the whole corpus. They round-trip through Arrow tables for shard files.

From them, with V_ij the virtual weight (`atlas.analysis.global_weights`):
    TWERA_ij = E[a_i a_j] / E[a_j] · V_ij      (target-weighted: the source's mean activation where the target fires)
    ERA_ij   = E[a_i] · V_ij
(NaN, stored as NULL, where the target never fired: E[a_j] = 0.) `corpus_activity` runs a model over prompts to fill
them (one process; the accumulator's merge is what Dask shards would use). This module writes no store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from atlas.analysis.global_weights import TopK
from atlas.attribution.context import build_context
from atlas.storage.global_weights import ACTIVITY_SCHEMA
from atlas.transcoders.base import EncoderStack

PAIR_CHUNK = 1 << 20  # pairs per product block in `add`


class CoactivationError(ValueError):
    """Activations or shards that do not fit the accumulator; nothing was added."""


def pairs_from_topk(outgoing: TopK) -> torch.Tensor:
    """`(P, 2)` sorted unique (source id, target id) pairs with a partner and a nonzero virtual weight."""
    rows, ranks = ((outgoing.partners >= 0) & (outgoing.values != 0)).nonzero(as_tuple=True)
    pairs = torch.stack([rows, outgoing.partners[rows, ranks]], dim=1)
    return torch.unique(pairs, dim=0)


@dataclass
class CoactivationStats:
    """Sums over tokens for `pairs (P, 2)` of global feature ids (`layer · F + feature`) among `n_ids` features."""

    pairs: torch.Tensor
    n_ids: int
    n_tokens: int = 0
    feature_sums: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    pair_sums: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def __post_init__(self) -> None:
        if self.pairs.dim() != 2 or self.pairs.shape[1] != 2:
            raise CoactivationError(f"pairs must be (P, 2), got {tuple(self.pairs.shape)}")
        if self.pairs.numel() and (int(self.pairs.min()) < 0 or int(self.pairs.max()) >= self.n_ids):
            raise CoactivationError(f"pair ids must lie in 0…{self.n_ids - 1}")
        if self.feature_sums.numel() == 0:
            self.feature_sums = torch.zeros(self.n_ids, dtype=torch.float64)
        if self.pair_sums.numel() == 0:
            self.pair_sums = torch.zeros(self.pairs.shape[0], dtype=torch.float64)

    @torch.no_grad()
    def add(self, activations: torch.Tensor) -> None:
        """Add the tokens of `activations (n_layers, n_tokens, F)` (drop positions that should not count first)."""
        L, n, F = activations.shape
        if self.n_ids != L * F:
            raise CoactivationError(f"activations cover {L}×{F} features, the accumulator {self.n_ids}")
        flat = activations.detach().permute(1, 0, 2).reshape(n, L * F).double()  # (n_tokens, L·F)
        self.feature_sums += flat.sum(0)
        for start in range(0, self.pairs.shape[0], PAIR_CHUNK):
            chunk = self.pairs[start : start + PAIR_CHUNK]
            self.pair_sums[start : start + chunk.shape[0]] += (flat[:, chunk[:, 0]] * flat[:, chunk[:, 1]]).sum(0)
        self.n_tokens += n

    def merge(self, other: CoactivationStats) -> CoactivationStats:
        """Statistics of both token sets (which must be disjoint); the pair lists must be equal."""
        if self.n_ids != other.n_ids or not torch.equal(self.pairs, other.pairs):
            raise CoactivationError("cannot merge co-activation statistics of different pair lists")
        return CoactivationStats(
            self.pairs, self.n_ids, self.n_tokens + other.n_tokens, self.feature_sums + other.feature_sums,
            self.pair_sums + other.pair_sums,
        )  # fmt: skip

    def weighted(self, virtual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(twera, era)`, each `(P,)`, from the pairs' virtual weights `virtual (P,)`."""
        if self.n_tokens == 0:
            raise CoactivationError("no tokens accumulated")
        mean = self.feature_sums / self.n_tokens
        source_mean, target_mean = mean[self.pairs[:, 0]], mean[self.pairs[:, 1]]
        joint = self.pair_sums / self.n_tokens
        twera = torch.where(target_mean > 0, joint / target_mean, torch.nan) * virtual.double()
        return twera, source_mean * virtual.double()

    def to_tables(self) -> dict[str, pa.Table]:
        """Arrow tables for a shard: `features (id, sum, n_tokens)` and `pairs (source, target, sum)`."""
        return {
            "features": pa.table({"id": pa.array(range(self.n_ids), pa.int64()),
                                  "sum": pa.array(self.feature_sums.numpy(), pa.float64()),
                                  "n_tokens": pa.array([self.n_tokens] * self.n_ids, pa.int64())}),
            "pairs": pa.table({"source": pa.array(self.pairs[:, 0].numpy(), pa.int64()),
                               "target": pa.array(self.pairs[:, 1].numpy(), pa.int64()),
                               "sum": pa.array(self.pair_sums.numpy(), pa.float64())}),
        }  # fmt: skip

    @staticmethod
    def from_tables(tables: dict[str, pa.Table]) -> CoactivationStats:
        features, pairs = tables["features"], tables["pairs"]
        counts = set(features.column("n_tokens").to_pylist())
        if len(counts) > 1:
            raise CoactivationError(f"a shard's features disagree on n_tokens: {sorted(counts)}")
        ids = torch.tensor(features.column("id").to_pylist(), dtype=torch.long)
        if not torch.equal(ids, torch.arange(ids.numel())):
            raise CoactivationError("a shard's feature ids are not 0…n−1 in order")
        return CoactivationStats(
            torch.stack([torch.tensor(pairs.column(c).to_numpy(), dtype=torch.long) for c in ("source", "target")], 1),
            int(ids.numel()),
            counts.pop() if counts else 0,
            torch.tensor(features.column("sum").to_numpy(), dtype=torch.float64),
            torch.tensor(pairs.column("sum").to_numpy(), dtype=torch.float64),
        )


def pairs_table_ids(pairs: pa.Table, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global id pairs `(P, 2)`, sorted by (source, target), and virtual weights `(P,)` of a `stored_pairs` table."""
    columns = {name: torch.tensor(pairs.column(name).to_numpy(), dtype=torch.long)
               for name in ("source_layer", "source", "target_layer", "target")}  # fmt: skip
    ids = torch.stack([columns["source_layer"] * n_features + columns["source"],
                       columns["target_layer"] * n_features + columns["target"]], dim=1)  # fmt: skip
    virtual = torch.tensor(pairs.column("v").to_numpy(), dtype=torch.float64)
    order = torch.argsort(ids[:, 0] * (int(ids.max()) + 1 if ids.numel() else 1) + ids[:, 1])
    return ids[order], virtual[order]


@torch.no_grad()
def corpus_activity(
    model: Any, transcoder: EncoderStack, prompts: Iterable[str], pairs: pa.Table,
    progress: Callable[[int], None] | None = None,
) -> tuple[pa.Table, CoactivationStats]:  # fmt: skip
    """Run every prompt once (BOS prepended and not counted), accumulate co-activations of `pairs` (a
    `stored_pairs` table) and return their TWERA/ERA as an `ACTIVITY_SCHEMA` table, with the statistics."""
    spec = transcoder.spec
    ids, virtual = pairs_table_ids(pairs, spec.n_features)
    stats = CoactivationStats(ids, spec.n_layers * spec.n_features)
    for done, text in enumerate(prompts, 1):
        ctx = build_context(model, transcoder, model.tokenize(text)[0].cpu(), zero_positions=(0,))
        stats.add(ctx.activations[:, 1:])
        if progress:
            progress(done)
    table = activity_table(stats, virtual, spec.n_features)
    return table, stats


def activity_table(stats: CoactivationStats, virtual: torch.Tensor, n_features: int) -> pa.Table:
    """`ACTIVITY_SCHEMA` rows (TWERA NULL where the target never fired) from statistics and their pairs' V `(P,)`."""
    twera, era = stats.weighted(virtual)
    ids = stats.pairs
    return pa.table(
        {"source_layer": pa.array((ids[:, 0] // n_features).int().numpy(), pa.int32()),
         "source": pa.array((ids[:, 0] % n_features).numpy(), pa.int64()),
         "target_layer": pa.array((ids[:, 1] // n_features).int().numpy(), pa.int32()),
         "target": pa.array((ids[:, 1] % n_features).numpy(), pa.int64()),
         "twera": pa.array(twera.numpy(), pa.float64(), from_pandas=True),
         "era": pa.array(era.numpy(), pa.float64())},
        schema=ACTIVITY_SCHEMA,
    )  # fmt: skip
