"""Faithfulness: does perturbing what the explanation calls important change the prediction?

insertion / deletion (Petsiuk et al., 2018; CSEP 590B homework), pixel flipping MoRF/LeRF (Bach et al.,
2015), IROF (Rieger & Hansen, 2020), faithfulness correlation (Bhatt et al., 2020), infidelity
(Yeh et al., 2019), ROAD (Rong et al., 2022), and the completeness axiom of path methods.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..baselines import BaselineLike, resolve_baseline
from ..explanation import Explanation, MetricResult
from ..models.adapter import guarded
from ..methods._autograd import make_generator, scores_over
from ..validation import check_choice, check_positive_int
from . import canonical, describe, draw, item_noise, register_metric, result, sample_range
from ._curves import auc, curve_settings, paired_curves, perturbation_curve, pixel_ranks, feature_labels


def _curve_metric(name: str, model: Any, x: Tensor, explanation: Any, target: Any, reduce: str | None,
                  **curve: Any) -> MetricResult:
    s = canonical(model, x, explanation, target, reduce=reduce)
    curves, xs = perturbation_curve(s.model, s.x, s.maps, s.targets, **curve)
    return result(name, auc(curves, xs), curves=curves, xs=xs, params=curve_settings(**curve))


@register_metric("insertion", category="faithfulness", higher_is_better=True)
def insertion(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    granularity: int | Tensor = 8, steps: int | None = 100, features_per_step: int | None = None,
    fill: BaselineLike = "black", output: str = "probability", reduce: str | None = None,
    batch_size: int | None = None, seed: int | None = 0,
) -> MetricResult:
    """Insertion (Petsiuk et al., 2018; CSEP 590B): start from ``fill`` and insert features from most to
    least important; curve (N,S) = p(target) after each block, value = area under it (trapezoid).

    granularity: 8 = 8x8 superpixels (the homework), 1 = pixels, or (N,H,W) segments; a feature scores
    the sum of the map inside it. steps: curve intervals (features_per_step = ceil(F / steps)) unless
    ``features_per_step`` is given. fill: "black" (homework's zeros image), "blur", "mean", "zeros", ...
    """
    return _curve_metric("insertion", model, x, explanation, target, reduce, mode="insert", order="morf",
                         granularity=granularity, steps=steps, features_per_step=features_per_step, fill=fill,
                         output=output, batch_size=batch_size, seed=seed)


@register_metric("deletion", category="faithfulness", higher_is_better=False)
def deletion(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    granularity: int | Tensor = 8, steps: int | None = 100, features_per_step: int | None = None,
    fill: BaselineLike = "black", output: str = "probability", reduce: str | None = None,
    batch_size: int | None = None, seed: int | None = 0,
) -> MetricResult:
    """Deletion (Petsiuk et al., 2018; CSEP 590B): replace features by ``fill`` from most to least
    important; curve (N,S) = p(target), value = area under it (lower is better). Settings as ``insertion``."""
    return _curve_metric("deletion", model, x, explanation, target, reduce, mode="delete", order="morf",
                         granularity=granularity, steps=steps, features_per_step=features_per_step, fill=fill,
                         output=output, batch_size=batch_size, seed=seed)


@guarded
def insertion_deletion(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    granularity: int | Tensor = 8, steps: int | None = 100, features_per_step: int | None = None,
    fill: BaselineLike = "black", output: str = "probability", reduce: str | None = None,
    batch_size: int | None = None, seed: int | None = 0,
) -> dict[str, MetricResult]:
    """``insertion`` and ``deletion`` at the same settings from one ranking and one engine run
    (``_curves.paired_curves``: x and the filled image are scored once) -> {"insertion", "deletion"}.
    ``heatlens.evaluate`` uses it when both are asked for with the same settings."""
    s = canonical(model, x, explanation, target, reduce=reduce)
    curve = dict(order="morf", granularity=granularity, steps=steps, features_per_step=features_per_step,
                 fill=fill, output=output, batch_size=batch_size, seed=seed)
    inserted, deleted, xs = paired_curves(s.model, s.x, s.maps, s.targets, **curve)
    return {name: result(name, auc(c, xs), curves=c, xs=xs, params=curve_settings(mode=mode, **curve))
            for name, mode, c in (("insertion", "insert", inserted), ("deletion", "delete", deleted))}


@register_metric("pixel_flipping", category="faithfulness", higher_is_better=False)
def pixel_flipping(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    order: str = "morf", granularity: int | Tensor = 1, steps: int | None = 100,
    features_per_step: int | None = None, fill: BaselineLike = "black", output: str = "probability",
    reduce: str | None = None, batch_size: int | None = None, seed: int | None = 0,
) -> MetricResult:
    """Pixel flipping (Bach et al., 2015; Samek et al., 2017): delete pixels (or patches) in ``order``
    ``"morf"`` (most relevant first: lower area is better) or ``"lerf"`` (least first: higher is better)."""
    check_choice(order, "order", ("morf", "lerf"))
    s = canonical(model, x, explanation, target, reduce=reduce)
    curve = dict(mode="delete", order=order, granularity=granularity, steps=steps,
                 features_per_step=features_per_step, fill=fill, output=output, batch_size=batch_size, seed=seed)
    curves, xs = perturbation_curve(s.model, s.x, s.maps, s.targets, **curve)
    return result("pixel_flipping", auc(curves, xs), curves=curves, xs=xs, params=curve_settings(**curve),
                  higher_is_better=order == "lerf")


@register_metric("irof", category="faithfulness", higher_is_better=True)
def irof(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    segments: str | Tensor = "slic", fill: BaselineLike = "mean", output: str = "probability",
    reduce: str | None = None, batch_size: int | None = None, seed: int | None = 0,
) -> MetricResult:
    """Iterative Removal Of Features (Rieger & Hansen, 2020): remove segments by mean relevance, most
    relevant first; value = area over the curve of p(target) / p(target at x) (higher is better).

    segments: a segmentation name for ``heatlens.methods.segmentation.segment`` ("slic", "quickshift",
    "felzenszwalb", "grid") or an (N,H,W) label map.
    """
    s = canonical(model, x, explanation, target, reduce=reduce)
    if isinstance(segments, str):
        from ..methods.segmentation import segment

        segments = segment(s.x, segments, model=s.model)
    curve = dict(mode="delete", order="morf", granularity=segments, steps=None, features_per_step=1,
                 fill=fill, aggregate="mean", output=output, batch_size=batch_size, seed=seed)
    curves, xs = perturbation_curve(s.model, s.x, s.maps, s.targets, **curve)
    relative = curves / curves[:, :1].clamp_min(1e-12)
    return result("irof", 1.0 - auc(relative, xs), curves=relative, xs=xs, params=curve_settings(**curve))


@register_metric("faithfulness_correlation", category="faithfulness", higher_is_better=True)
def faithfulness_correlation(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    n_runs: int = 100, subset_size: int = 224, fill: BaselineLike = "black", output: str = "logit",
    reduce: str | None = None, batch_size: int | None = None, seed: int | torch.Generator | None = 0,
) -> MetricResult:
    """Faithfulness correlation (Bhatt et al., 2020): Pearson correlation over ``n_runs`` random pixel
    subsets of size ``subset_size`` between the summed map on the subset and the score drop
    f(x) - f(x with the subset replaced by ``fill``). Subsets come from ``seed``; extras["subsets"]
    (N, n_runs, subset_size) holds the flat pixel indices used.
    """
    check_positive_int(n_runs, "n_runs", minimum=2)
    check_positive_int(subset_size, "subset_size")
    s = canonical(model, x, explanation, target, reduce=reduce)
    n, _, h, w = s.x.shape
    if subset_size >= h * w:
        # a subset covering every pixel is the same in every run: the correlation is 0/0 (Quantus refuses it too)
        raise ValueError(f"subset_size must be smaller than the number of pixels {h * w}, got {subset_size}: "
                         "every run would hide the whole image and the correlation is undefined")
    gen = make_generator(seed)
    subsets = torch.stack([torch.multinomial(torch.ones(n_runs, h * w), subset_size, generator=gen) for _ in range(n)])
    subsets = subsets.to(s.x.device)
    filled = resolve_baseline(s.model, s.x, fill, name="fill", generator=gen)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(start, stop, device=s.x.device)
        img, run = idx // n_runs, idx % n_runs
        hidden = torch.zeros(idx.numel(), h * w, dtype=torch.bool, device=s.x.device)
        hidden.scatter_(1, subsets[img, run], True)
        return torch.where(hidden.view(-1, 1, h, w), filled[img], s.x[img]), s.targets[img]

    with torch.inference_mode():
        clean = s.model.score(s.x, s.targets, output).double()
    perturbed = scores_over(s.model, n * n_runs, build, output=output, batch_size=batch_size,
                            desc="faithfulness correlation").double().view(n, n_runs)
    drops = clean[:, None] - perturbed
    sums = torch.gather(s.maps.flatten(1).double()[:, None, :].expand(n, n_runs, h * w), 2, subsets).sum(2)
    params = {"n_runs": n_runs, "subset_size": subset_size, "fill": describe(fill), "output": output}
    return result("faithfulness_correlation", _pearson(sums, drops), params=params,
                  extras={"subsets": subsets.cpu(), "attribution_sums": sums.cpu(), "score_drops": drops.cpu()})


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of (N,R) tensors (NaN where a row is constant)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def _pixel_attributions(s: Any) -> Tensor:
    """Attributions usable as a dot product with an input perturbation: (N,C,H,W) raw ones when they
    match x, else the (N,1,H,W) map broadcast over channels (CAMs, raw maps)."""
    if s.attributions.shape == s.x.shape:
        return s.attributions
    return s.maps[:, None]


@register_metric("infidelity", category="faithfulness", higher_is_better=False)
def infidelity(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    n_perturbations: int = 50, noise: float = 0.1, normalize: bool = False, output: str = "logit",
    reduce: str | None = None, batch_size: int | None = None, seed: int | torch.Generator | None = 0,
) -> MetricResult:
    """Infidelity (Yeh et al., 2019): E_I[(I . a - (f(x) - f(x - I)))^2], I ~ N(0, sigma^2) with
    sigma = noise * (max x - min x) per image (Captum's ``infidelity`` with that perturbation).

    a: raw (N,C,H,W) attributions, or the map broadcast over channels. normalize: scale I . a by the
    optimal beta first (Yeh et al.'s scale-free form, Captum ``normalize=True``).
    """
    check_positive_int(n_perturbations, "n_perturbations")
    s = canonical(model, x, explanation, target, reduce=reduce)
    n = s.x.shape[0]
    attr = _pixel_attributions(s)
    sigma = noise * sample_range(s.x)
    seeds = item_noise(seed, n * n_perturbations)
    dots = torch.empty(n * n_perturbations, dtype=torch.float64, device=s.x.device)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        img = torch.arange(start, stop, device=s.x.device) // n_perturbations
        pert = draw(seeds[start:stop], tuple(s.x.shape[1:])).to(s.x.device, s.x.dtype) * sigma[img].view(-1, 1, 1, 1)
        dots[start:stop] = (pert * attr[img]).flatten(1).sum(1).double()
        return s.x[img] - pert, s.targets[img]

    with torch.inference_mode():
        clean = s.model.score(s.x, s.targets, output).double()
    perturbed = scores_over(s.model, n * n_perturbations, build, output=output, batch_size=batch_size,
                            desc="infidelity").double().view(n, n_perturbations)
    drops = clean[:, None] - perturbed
    dots = dots.view(n, n_perturbations)
    if normalize:
        beta = (dots * drops).mean(1, keepdim=True) / (dots * dots).mean(1, keepdim=True).clamp_min(1e-30)
        dots = beta * dots
    values = ((dots - drops) ** 2).mean(1)
    params = {"n_perturbations": n_perturbations, "noise": noise, "normalize": normalize, "output": output}
    return result("infidelity", values, params=params)


def noisy_linear_imputation(image: np.ndarray, hidden: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """ROAD's imputation (Rong et al., 2022): every hidden pixel becomes the weighted mean of its 8
    neighbours (direct 1/6, diagonal 1/12), solved jointly as a sparse linear system, plus N(0, noise^2).

    image: (C,H,W), hidden: (H,W) bool. Returns (C,H,W).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = image.shape
    out = image.reshape(c, -1).astype(np.float64).copy()
    unknown = np.flatnonzero(hidden.reshape(-1))
    if unknown.size == 0:
        return image
    where = -np.ones(h * w, dtype=np.int64)
    where[unknown] = np.arange(unknown.size)
    ys, xs = np.divmod(unknown, w)
    rows, cols, vals = [], [], []
    rhs = np.zeros((unknown.size, c))
    total = np.zeros(unknown.size)
    for dy, dx, weight in ((0, 1, 1 / 6), (0, -1, 1 / 6), (1, 0, 1 / 6), (-1, 0, 1 / 6),
                           (1, 1, 1 / 12), (1, -1, 1 / 12), (-1, 1, 1 / 12), (-1, -1, 1 / 12)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        k = np.flatnonzero(inside)
        q = ny[k] * w + nx[k]
        total[k] += weight
        known = where[q] < 0
        rhs[k[known]] += weight * out[:, q[known]].T
        rows.append(k[~known]), cols.append(where[q[~known]]), vals.append(np.full((~known).sum(), -weight))
    rows.append(np.arange(unknown.size)), cols.append(np.arange(unknown.size)), vals.append(total)
    matrix = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(unknown.size, unknown.size)).tocsc()
    solved = np.asarray(spsolve(matrix, rhs)).reshape(unknown.size, c)
    out[:, unknown] = solved.T + noise * rng.standard_normal((c, unknown.size))
    return out.reshape(c, h, w).astype(image.dtype)


@register_metric("road", category="faithfulness", higher_is_better=False)
def road(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    percentages: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), order: str = "morf",
    noise: float = 0.01, output: str = "probability", reduce: str | None = None,
    batch_size: int | None = None, seed: int = 0,
) -> MetricResult:
    """ROAD (Rong et al., 2022): remove the top (``morf``) or bottom (``lerf``) fraction of pixels and
    fill them by noisy linear imputation, which leaks no mask shape to the model; curve (N,P) =
    p(target) per percentage, value = its mean (MoRF: lower is better, LeRF: higher is better)."""
    check_choice(order, "order", ("morf", "lerf"))
    if not percentages or not all(0.0 <= p <= 1.0 for p in percentages):
        raise ValueError(f"percentages must be fractions in [0, 1], got {percentages!r}")
    s = canonical(model, x, explanation, target, reduce=reduce)
    n, _, h, w = s.x.shape
    labels, n_features = feature_labels((n, h, w), 1, s.x.device)
    ranks = pixel_ranks(s.maps, labels, n_features, order).cpu().numpy()
    counts = [int(round(p * h * w)) for p in percentages]
    images = s.x.detach().cpu().numpy()
    seeds = item_noise(seed, n * len(counts)).tolist()

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        out, img = [], torch.arange(start, stop) // len(counts)
        for item in range(start, stop):  # one sparse solve per image in this batch
            i, j = divmod(item, len(counts))
            rng = np.random.default_rng(seeds[item])
            out.append(noisy_linear_imputation(images[i], ranks[i] < counts[j], noise, rng))
        return torch.from_numpy(np.stack(out)).to(s.x.device, s.x.dtype), s.targets[img.to(s.x.device)]

    curves = scores_over(s.model, n * len(counts), build, output=output, batch_size=batch_size,
                         desc="road").double().view(n, len(counts))
    xs = torch.tensor(percentages, dtype=torch.float64)
    params = {"percentages": tuple(percentages), "order": order, "noise": noise, "output": output}
    return result("road", curves.mean(1), curves=curves, xs=xs, params=params, higher_is_better=order == "lerf")


@register_metric("completeness", category="axiom", higher_is_better=False)
def completeness(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    baseline: BaselineLike | None = None, output: str | None = None, batch_size: int | None = None,
) -> MetricResult:
    """Completeness (Sundararajan et al., 2017): |sum(a) - (f(x) - f(x'))| per image, for path methods.

    Needs raw (N,C,H,W) attributions. baseline / output default to the explanation's own params
    (``"zeros"`` / ``"logit"`` otherwise). extras["gap"] (N,) is the signed difference.
    """
    s = canonical(model, x, explanation, target, reduce="sum")
    one_per_location = s.attributions.shape[1] == 1 and s.attributions.shape[2:] == s.x.shape[2:]
    if s.attributions.shape != s.x.shape and not one_per_location:  # (N,1,H,W) location maps sum as well
        raise ValueError(f"completeness needs attributions shaped like x {tuple(s.x.shape)}, "
                         f"got {tuple(s.attributions.shape)}")
    params = explanation.params if isinstance(explanation, Explanation) else {}
    if baseline is None:
        baseline = params.get("baseline", "zeros")
        if isinstance(baseline, str) and baseline.startswith("tensor"):
            raise ValueError("the explanation used a tensor baseline: pass it again as baseline=")
    output = output or params.get("output", "logit")
    ref = resolve_baseline(s.model, s.x, baseline)
    with torch.inference_mode():
        delta = (s.model.score(s.x, s.targets, output) - s.model.score(ref, s.targets, output)).double()
    gap = s.attributions.flatten(1).sum(1).double() - delta
    return result("completeness", gap.abs(), params={"baseline": describe(baseline), "output": output},
                  extras={"gap": gap.cpu(), "score_difference": delta.cpu()})
