"""The ordered-perturbation curve engine behind insertion, deletion, pixel flipping (MoRF/LeRF) and IROF.

Features are pixels, g x g patches (``granularity=8``: the CSEP 590B homework's 8x8 superpixels) or
segments (an (N,H,W) label map). Each feature scores the sum (or mean) of the map over its pixels;
features are perturbed in order of score (``morf``: most relevant first, ``lerf``: least first), a
block of ``features_per_step`` at a time, and the model's score of the target is read after each block.
Perturbed copies are built lazily inside each engine batch from a per-pixel rank map, so memory is
one batch of images whatever the number of steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..baselines import BaselineLike, resolve_baseline
from ..methods._autograd import make_generator, scores_over
from ..models.adapter import Classifier
from ..validation import check_choice, check_positive_int

MODES = ("insert", "delete")
ORDERS = ("morf", "lerf")
AGGREGATES = ("sum", "mean")


def feature_labels(shape: tuple[int, int, int], granularity: int | Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Feature index of every pixel -> (labels (N,H,W) long, n_features (N,) long).

    granularity: an int g (g x g patches, row-major; g=1 is pixels) or an (N,H,W) integer label map.
    """
    n, h, w = shape
    if isinstance(granularity, Tensor):
        seg = granularity.to(device)
        if seg.is_floating_point() or tuple(seg.shape) != (n, h, w):
            raise ValueError(f"granularity as segments must be an integer (N,H,W) tensor of shape {(n, h, w)}, "
                             f"got {seg.dtype} {tuple(seg.shape)}")
        labels = torch.stack([torch.unique(s, return_inverse=True)[1] for s in seg.long()])
        return labels, labels.flatten(1).amax(1) + 1
    g = check_positive_int(granularity, "granularity")
    cols = math.ceil(w / g)
    rows = torch.arange(h, device=device) // g
    labels = (rows[:, None] * cols + torch.arange(w, device=device)[None, :] // g).expand(n, h, w)
    return labels.contiguous(), torch.full((n,), math.ceil(h / g) * cols, dtype=torch.long, device=device)


def pixel_ranks(maps: Tensor, labels: Tensor, n_features: Tensor, order: str, aggregate: str = "sum") -> Tensor:
    """Position of each pixel's feature in the perturbation order, (N,H,W) long (0 = perturbed first).

    Features are ordered by their summed (or mean) map value; ties keep feature index order (stable sort).
    """
    check_choice(order, "order", ORDERS)
    check_choice(aggregate, "aggregate", AGGREGATES)
    n = maps.shape[0]
    f_max = int(n_features.max())
    flat = labels.flatten(1)
    scores = torch.zeros(n, f_max, dtype=torch.float64, device=maps.device)
    scores.scatter_add_(1, flat, maps.flatten(1).double())
    if aggregate == "mean":
        sizes = torch.zeros_like(scores).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
        scores = scores / sizes.clamp_min(1)
    absent = torch.arange(f_max, device=maps.device)[None, :] >= n_features[:, None]
    scores = scores.masked_fill(absent, -math.inf if order == "morf" else math.inf)  # absent ranked last
    perm = torch.argsort(scores, dim=1, descending=order == "morf", stable=True)
    ranks = torch.empty_like(perm).scatter_(1, perm, torch.arange(f_max, device=maps.device).expand(n, f_max))
    return ranks.gather(1, flat).view_as(labels)


def step_counts(n_features: Tensor, steps: int | None, features_per_step: int | None) -> tuple[Tensor, Tensor]:
    """Features perturbed at each curve point -> (counts (N,S) long, x (S,) fraction of features).

    counts[i, s] = min(s * k_i, F_i) for s = 0..S-1, k_i = features_per_step or ceil(F_i / steps); the
    curve starts at 0 features and ends at all of them. x is k/F when every image has the same F.
    """
    if features_per_step is not None:
        per = torch.full_like(n_features, check_positive_int(features_per_step, "features_per_step"))
    else:
        per = torch.ceil(n_features.double() / check_positive_int(steps, "steps")).long().clamp_min(1)
    points = int(torch.ceil(n_features.double() / per).max()) + 1
    s = torch.arange(points, device=n_features.device)
    counts = torch.minimum(s[None, :] * per[:, None], n_features[:, None])
    if bool((n_features == n_features[0]).all()):
        xs = counts[0].double() / float(n_features[0])
    else:
        xs = torch.linspace(0, 1, points, dtype=torch.float64)
    return counts, xs.cpu()


def perturbation_curve(
    model: Classifier,
    x: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    mode: str = "delete",
    order: str = "morf",
    granularity: int | Tensor = 1,
    steps: int | None = 100,
    features_per_step: int | None = None,
    fill: BaselineLike = "black",
    aggregate: str = "sum",
    output: str = "probability",
    batch_size: int | None = None,
    seed: int | torch.Generator | None = 0,
) -> tuple[Tensor, Tensor]:
    """Score of the target as features are deleted from x (``mode="delete"``) or inserted into the fill.

    x: (N,C,H,W), maps: (N,H,W), targets: (N,). fill: what a removed feature becomes (a baseline:
    "black", "zeros", "blur", "mean", a float, a tensor, a callable; ``seed`` drives random ones).
    Returns (curves (N,S) float, x (S,) fraction of features perturbed). Area: ``auc(curves, x)``.
    """
    check_choice(mode, "mode", MODES)
    n, _, h, w = x.shape
    labels, n_features = feature_labels((n, h, w), granularity, x.device)
    ranks = pixel_ranks(maps.to(x.device), labels, n_features, order, aggregate)
    counts, xs = step_counts(n_features, steps, features_per_step)
    filled = resolve_baseline(model, x, fill, name="fill", generator=make_generator(seed))
    points = counts.shape[1]

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(start, stop, device=x.device)
        img, s = idx // points, idx % points
        hidden = (ranks[img] < counts[img, s].view(-1, 1, 1)).unsqueeze(1)  # (B,1,H,W) features perturbed
        if mode == "delete":
            return torch.where(hidden, filled[img], x[img]), targets[img]
        return torch.where(hidden, x[img], filled[img]), targets[img]

    scores = scores_over(model, n * points, build, output=output, batch_size=batch_size,
                         desc=f"{mode} curve")
    return scores.view(n, points), xs


def paired_curves(
    model: Classifier,
    x: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    order: str = "morf",
    granularity: int | Tensor = 1,
    steps: int | None = 100,
    features_per_step: int | None = None,
    fill: BaselineLike = "black",
    aggregate: str = "sum",
    output: str = "probability",
    batch_size: int | None = None,
    seed: int | torch.Generator | None = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Insertion and deletion curves from one ranking and one engine run -> (insert (N,S), delete (N,S), x (S,)).

    Settings as ``perturbation_curve``. The two images both curves contain are scored once: x itself
    (insertion's last point, deletion's first) and the fully filled image (insertion's first,
    deletion's last), so each image costs 2S - 2 forwards instead of 2S.
    """
    n, _, h, w = x.shape
    labels, n_features = feature_labels((n, h, w), granularity, x.device)
    ranks = pixel_ranks(maps.to(x.device), labels, n_features, order, aggregate)
    counts, xs = step_counts(n_features, steps, features_per_step)
    filled = resolve_baseline(model, x, fill, name="fill", generator=make_generator(seed))
    points = counts.shape[1]
    per_image = 2 * points - 2  # insertion 0..S-1, then deletion 1..S-2

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(start, stop, device=x.device)
        img, j = idx // per_image, idx % per_image
        insert = j < points
        s = torch.where(insert, j, j - points + 1)
        hidden = (ranks[img] < counts[img, s].view(-1, 1, 1)).unsqueeze(1)
        kept_x = torch.where(insert.view(-1, 1, 1, 1), hidden, ~hidden)  # where the image shows x
        return torch.where(kept_x, x[img], filled[img]), targets[img]

    scores = scores_over(model, n * per_image, build, output=output, batch_size=batch_size,
                         desc="insertion and deletion").view(n, per_image)
    inserted = scores[:, :points]
    deleted = torch.cat([inserted[:, -1:], scores[:, points:], inserted[:, :1]], 1)
    return inserted, deleted, xs


def auc(curves: Tensor, xs: Tensor) -> Tensor:
    """Area under each curve (N,) by the trapezoidal rule over x (S,)."""
    return torch.trapezoid(curves.double().cpu(), xs.double().cpu(), dim=1)


def curve_settings(**settings: Any) -> dict[str, Any]:
    """The curve settings recorded in a MetricResult's params (segments by shape)."""
    g = settings.get("granularity")
    if isinstance(g, Tensor):
        settings["granularity"] = f"segments{tuple(g.shape)}"
    fill = settings.get("fill")
    if isinstance(fill, Tensor) or callable(fill):
        settings["fill"] = getattr(fill, "__name__", f"tensor{tuple(getattr(fill, 'shape', ()))}")
    return settings
