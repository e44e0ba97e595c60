"""Fragility (Ghorbani et al., 2019): small input noise that keeps the prediction but moves the map.

Random sign perturbations of L-infinity size ``noise`` x (image range) — Ghorbani et al.'s random
baseline attack — are applied; for those that keep the predicted class, the top-k pixels of the new
map are compared with the original ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..batching import default_batch_size, map_batches
from ..explanation import Explanation, SanityResult
from ..methods._autograd import prepare
from ..methods.registry import get_method
from ..metrics import draw, item_noise, sample_range
from ..validation import check_fraction, check_positive_int, is_integer, is_number
from .randomization import _maps, method_name, spearman


def _top_k(maps: Tensor, k: int) -> Tensor:
    """(N,P) bool: the k highest pixels of each |map| (N,H,W)."""
    flat = maps.flatten(1).abs()
    idx = flat.topk(k, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)


def fragility(
    model: Any,
    x: Tensor,
    method: str | Callable[..., Explanation] = "saliency",
    target: Any = "predicted",
    *,
    noise: float = 0.02,
    n_trials: int = 8,
    top_k: int | float = 0.05,
    threshold: float = 0.5,
    seed: int = 0,
    batch_size: int | None = None,
    **method_kwargs: Any,
) -> SanityResult:
    """Fragility test (Ghorbani et al., 2019).

    noise: L-inf size of the sign perturbation as a fraction of each image's range. top_k: pixels
    compared (an int, or a fraction of the pixels). table: per image ``prediction_kept`` (share of
    trials whose predicted class is unchanged), ``top_k_overlap`` and ``spearman`` (means over the kept
    trials; NaN when none kept). passed: mean top-k overlap at least ``threshold``. extras: (N, n_trials)
    "kept", "overlap", "spearman".
    """
    check_positive_int(n_trials, "n_trials")
    threshold = check_fraction(threshold, "threshold")
    if not is_number(noise) or noise <= 0:
        raise ValueError(f"noise must be a positive fraction of the input range, got {noise!r}")
    p = prepare(model, x, target)
    n, _, h, w = p.x.shape
    k = int(top_k) if is_integer(top_k) else int(round(top_k * h * w)) if is_number(top_k) else 0
    if not 1 <= k <= h * w:
        raise ValueError(f"top_k must select between 1 and {h * w} pixels, got {top_k!r}")
    fn = get_method(method)
    reference = _maps(fn(p.model, p.x, p.targets, batch_size=batch_size, **method_kwargs))
    top_ref = _top_k(reference, k)
    seeds = item_noise(seed, n_trials * n)
    scale = (noise * sample_range(p.x)).view(1, n, 1, 1, 1)
    kept = torch.empty(n_trials, n, dtype=torch.bool)
    overlap = torch.empty(n_trials, n, dtype=torch.float64)
    rank_corr = torch.empty(n_trials, n, dtype=torch.float64)
    predicted = p.logits.argmax(1)

    def step(start: int, stop: int) -> None:
        t = stop - start
        signs = draw(seeds[start * n: stop * n], tuple(p.x.shape[1:])).sign().to(p.x)
        noisy = (p.x.unsqueeze(0) + signs.view(t, n, *p.x.shape[1:]) * scale).reshape(t * n, *p.x.shape[1:])
        e = fn(p.model, noisy, p.targets.repeat(t), batch_size=batch_size, **method_kwargs)
        maps = _maps(e)
        kept[start:stop] = (e.outputs.argmax(1) == predicted.repeat(t)).view(t, n).cpu()
        overlap[start:stop] = ((_top_k(maps, k) & top_ref.repeat(t, 1)).sum(1).double() / k).view(t, n)
        rank_corr[start:stop] = spearman(maps, reference.repeat(t, 1, 1)).view(t, n)

    chunk = max(1, (batch_size or default_batch_size(p.model, p.model.input_size, grad=True)) // n)
    map_batches(step, n_trials, batch_size=chunk, grad=True, consume=lambda *_: None, desc="fragility")
    kept, overlap, rank_corr = kept.T, overlap.T, rank_corr.T
    weights = kept.double()
    count = weights.sum(1)
    mean_overlap = torch.where(count > 0, (overlap * weights).sum(1) / count.clamp_min(1), torch.nan)
    mean_corr = torch.where(count > 0, (rank_corr * weights).sum(1) / count.clamp_min(1), torch.nan)
    rows = [{"image": i, "prediction_kept": float(weights[i].mean()), "top_k_overlap": float(mean_overlap[i]),
             "spearman": float(mean_corr[i])} for i in range(n)]
    valid = mean_overlap[~torch.isnan(mean_overlap)]
    score = float(valid.mean()) if valid.numel() else float("nan")
    passed = bool(valid.numel()) and score >= threshold
    verdict = (f"{method_name(method)}: {float(weights.mean()):.0%} of the perturbations kept the prediction; "
               f"their top-{k} pixels overlap the original's by {score:.0%} on average; "
               + ("stable" if passed else f"below {threshold:.0%}: the map is fragile"))
    return SanityResult(name="fragility", method=method_name(method), table=rows, passed=passed, verdict=verdict,
                        params={"noise": noise, "n_trials": n_trials, "top_k": k, "threshold": threshold,
                                "seed": seed, **method_kwargs},
                        extras={"kept": kept, "overlap": overlap, "spearman": rank_corr})
