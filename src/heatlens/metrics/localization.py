"""Localisation: does the explanation point at the object? Needs a ground-truth ``mask`` (N,H,W) bool.

All work on maps (N,H,W) (see ``heatlens.metrics`` for ``reduce``); mass and rank metrics use |map|
as Quantus does. An image whose mask is empty scores NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..explanation import Explanation, MetricResult
from ..validation import check_positive_int
from . import as_maps, register_metric, result


def _maps_and_mask(x: Tensor, explanation: Explanation | Tensor, mask: Any, reduce: str | None) -> tuple[Tensor, Tensor]:
    """(N, H*W) float64 maps and (N, H*W) bool mask, checked against x (N,C,H,W)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be an (N,C,H,W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    n, _, h, w = x.shape
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool tensor of shape (N,H,W) = {(n, h, w)}, got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if tuple(mask.shape) != (n, h, w):
        raise ValueError(f"mask must have shape (N,H,W) = {(n, h, w)}, got {tuple(mask.shape)}")
    maps = as_maps(explanation, (h, w), reduce)
    if maps.shape[0] != n:
        raise ValueError(f"explanation has {maps.shape[0]} maps but x has {n} images")
    return maps.flatten(1).double().cpu(), mask.flatten(1).bool().cpu()


def _nan_if_empty(values: Tensor, mask: Tensor) -> Tensor:
    return values.masked_fill(mask.sum(1) == 0, float("nan"))


def _top(maps: Tensor, k: Tensor) -> Tensor:
    """(N, P) bool: each image's k_i highest-valued pixels (ties by pixel order, stable sort)."""
    order = torch.argsort(-maps, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(maps.shape[1]).expand_as(order))
    return rank < k.view(-1, 1)


@register_metric("pointing_game", category="localisation", higher_is_better=True, needs_mask=True)
def pointing_game(model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
                  mask: Tensor, reduce: str | None = None) -> MetricResult:
    """Pointing game (Zhang et al., 2018): 1 when a pixel of maximal attribution lies in the mask."""
    maps, m = _maps_and_mask(x, explanation, mask, reduce)
    peak = maps == maps.amax(1, keepdim=True)
    return result("pointing_game", _nan_if_empty((peak & m).any(1).double(), m))


@register_metric("relevance_mass", category="localisation", higher_is_better=True, needs_mask=True)
def relevance_mass(model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
                   mask: Tensor, reduce: str | None = None) -> MetricResult:
    """Relevance mass accuracy (Arras et al., 2022): share of |map| inside the mask."""
    maps, m = _maps_and_mask(x, explanation, mask, reduce)
    a = maps.abs()
    return result("relevance_mass", _nan_if_empty((a * m).sum(1) / a.sum(1), m))


@register_metric("relevance_rank", category="localisation", higher_is_better=True, needs_mask=True)
def relevance_rank(model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
                   mask: Tensor, reduce: str | None = None) -> MetricResult:
    """Relevance rank accuracy (Arras et al., 2022): share of the K highest |map| pixels inside the
    mask, K = mask size."""
    maps, m = _maps_and_mask(x, explanation, mask, reduce)
    k = m.sum(1)
    hits = (_top(maps.abs(), k) & m).sum(1).double()
    return result("relevance_rank", _nan_if_empty(hits / k.clamp_min(1), m))


@register_metric("top_k_intersection", category="localisation", higher_is_better=True, needs_mask=True)
def top_k_intersection(model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
                       mask: Tensor, k: int = 1000, reduce: str | None = None) -> MetricResult:
    """Top-k intersection (Theiner et al., 2021): share of the k highest |map| pixels inside the mask."""
    check_positive_int(k, "k")
    maps, m = _maps_and_mask(x, explanation, mask, reduce)
    if k > maps.shape[1]:
        raise ValueError(f"k must be at most the number of pixels {maps.shape[1]}, got {k}")
    top = _top(maps.abs(), torch.full((maps.shape[0],), k))
    return result("top_k_intersection", _nan_if_empty((top & m).sum(1).double() / k, m), params={"k": k})


@register_metric("attribution_iou", category="localisation", higher_is_better=True, needs_mask=True)
def attribution_iou(model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
                    mask: Tensor, k: int | None = None, reduce: str | None = None) -> MetricResult:
    """Intersection over union of the k highest |map| pixels with the mask (k = mask size by default)."""
    maps, m = _maps_and_mask(x, explanation, mask, reduce)
    sizes = m.sum(1) if k is None else torch.full((m.shape[0],), check_positive_int(k, "k"))
    top = _top(maps.abs(), sizes)
    iou = (top & m).sum(1).double() / (top | m).sum(1).clamp_min(1).double()
    return result("attribution_iou", _nan_if_empty(iou, m), params={"k": k})
