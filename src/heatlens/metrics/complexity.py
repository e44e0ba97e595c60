"""Complexity: how concentrated is an explanation? Sparse, low-entropy maps are easier to read.

Both are computed on |map| (N,H,W), as Quantus does (``abs=True``); neither runs the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..explanation import Explanation, MetricResult
from . import as_maps, register_metric, result


def _abs_maps(x: Tensor, explanation: Explanation | Tensor, reduce: str | None) -> Tensor:
    """(N, H*W) float64 |map| at x's resolution (the model is not needed: only x's size)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be an (N,C,H,W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    maps = as_maps(explanation, tuple(x.shape[-2:]), reduce)
    if maps.shape[0] != x.shape[0]:
        raise ValueError(f"explanation has {maps.shape[0]} maps but x has {x.shape[0]} images")
    return maps.flatten(1).double().abs()


@register_metric("sparseness", category="complexity", higher_is_better=True)
def sparseness(model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
               reduce: str | None = None) -> MetricResult:
    """Sparseness (Chalasani et al., 2020): Gini index of |map| in [0, 1]; 1 = all mass on one pixel.

    G = sum_i (2i - d - 1) a_(i) / (d sum a), a sorted ascending, with 1e-7 added (Quantus)."""
    a = torch.sort(_abs_maps(x, explanation, reduce) + 1e-7, dim=1).values
    d = a.shape[1]
    i = torch.arange(1, d + 1, dtype=a.dtype, device=a.device)
    return result("sparseness", ((2 * i - d - 1) * a).sum(1) / (d * a.sum(1)))


@register_metric("complexity", category="complexity", higher_is_better=False)
def complexity(model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
               reduce: str | None = None) -> MetricResult:
    """Complexity (Bhatt et al., 2020): entropy of the fractional contribution p = |a| / sum |a|
    (nats; log of the pixel count for a uniform map, 0 for a single pixel)."""
    a = _abs_maps(x, explanation, reduce)
    p = a / a.sum(1, keepdim=True).clamp_min(1e-30)
    return result("complexity", -(p * torch.log(p + 1e-12)).sum(1))
