"""Numerical comparisons whose tolerance scales with the magnitude of what is compared.

Float32 results that sum many terms differ across CPUs and thread counts by a few units in the last place of the
*terms*, not of the result: a sum that cancels to almost zero can still carry an error the size of its largest term's
rounding. An elementwise `rtol` on the result is then too tight near zero, and a fixed `atol` is too tight for large
values and too loose for small ones. `assert_close_at_scale` bounds |actual − expected| by `rel × scale`, where
`scale` is the magnitude that produced the values: by default the largest |value| compared, or a tensor
(broadcastable, e.g. the sum of |terms| per row) when the caller knows it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Float32 has a 2^-24 ≈ 6e-8 unit roundoff; sums of up to ~10^3 terms in any order stay well inside 1e-5 of their
# scale, and chains of a few layers of matmuls inside 1e-4.
FLOAT32_SUM = 1e-5
FLOAT32_CHAIN = 1e-4


def as_float64(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def assert_close_at_scale(
    actual: Any, expected: Any, *, rel: float = FLOAT32_SUM, scale: Any = None, what: str = "values"
) -> None:
    """Assert |actual − expected| ≤ rel · scale everywhere (computed in float64).

    `scale` defaults to max(|actual|, |expected|) over everything compared (one number); pass a tensor to give each
    element its own scale, such as the sum of the absolute terms that make it up.
    """
    a, e = as_float64(actual), as_float64(expected)
    assert a.shape == e.shape, f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(e.shape)}"
    if scale is None:
        largest = max((float(t.abs().max()) for t in (a, e) if t.numel()), default=0.0)
        bound = torch.tensor(rel * largest, dtype=torch.float64)
    else:
        bound = rel * as_float64(scale)
    error = (a - e).abs()
    excess = error - bound
    if excess.numel() and float(excess.max()) > 0:
        worst = int(excess.argmax())
        raise AssertionError(
            f"{what}: |Δ| {float(error.flatten()[worst]):.3g} at flat index {worst} exceeds {rel:g} × scale "
            f"{float(bound.expand_as(error).flatten()[worst]) / rel:.3g}; max |Δ| {float(error.max()):.3g}"
        )
