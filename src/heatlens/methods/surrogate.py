"""Surrogate family: LIME (Ribeiro et al., 2016) and KernelSHAP (Lundberg & Lee, 2017) over superpixels.

Both switch segments on and off, score the perturbed images and fit a weighted linear model to
the scores. The perturbed images are built vectorised per engine batch,
``torch.where(keep[segments], x, hidden)``, from a flat table of coalitions (one row per
perturbed image, one column per segment), so there is no per-sample Python loop and no mask
stack in memory; the regressions are solved in closed form (float64).
Attributions are (N,1,H,W): every pixel carries its segment's weight.

``lime(num_samples="auto")`` needs fewer model calls for the answer lime gives at ``max_samples``:
it draws masks in rounds of antithetic pairs (each mask and its complement, the same distribution
as lime's), refits the ridge after every round and stops once the top segments are separated from
the rest, or predict lime's top segments at ``max_samples`` about as well as lime predicts itself
(cluster-robust standard errors, one cluster per pair, and a parametric bootstrap).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..baselines import BaselineLike, resolve_baseline
from ..batching import map_batches
from ..explanation import Explanation
from ..models.adapter import Classifier, class_scores
from ..targets import TargetLike
from ..validation import check_choice, check_positive_int
from ._autograd import Prepared, fast_layout, make_generator, prepare
from .gradient import explanation
from .registry import register
from .segmentation import SEGMENTATIONS, check_segments, segment

__all__ = ["lime", "kernel_shap", "image_and_mask", "segment_means", "paired_masks", "ranking_check"]

SegmentsLike = Any  # None | method name | (N,H,W) / (H,W) integer tensor or array
EXACT_MAX_SEGMENTS = 12  # kernel_shap enumerates all 2^S coalitions up to here (4,096 evaluations)
# num_samples="auto": samples added per round (16 antithetic pairs: two CPU engine batches of 16)
ADAPTIVE_ROUND = 32
STOP_REASONS = ("separated", "agreement", "max_samples")


# --- shared machinery -------------------------------------------------------------------------

def resolve_segments(model: Classifier, x: Tensor, segments: SegmentsLike) -> Tensor:
    """(N,H,W) contiguous labels on x's device: computed (None = lime's quickshift, or a method name) or checked."""
    if segments is None:
        return segment(x, "quickshift", model=model).to(x.device)
    if isinstance(segments, str):
        check_choice(segments, "segments", SEGMENTATIONS)
        return segment(x, segments, model=model).to(x.device)
    if isinstance(segments, (Tensor, np.ndarray)) and segments.ndim == 2:
        segments = torch.as_tensor(segments)[None].expand(x.shape[0], -1, -1)
    labels = check_segments(segments, "segments", shape=(x.shape[0], *x.shape[-2:]))
    # make labels contiguous 0..S-1 per image, keeping their order (unused ids would be dead columns)
    return torch.stack([torch.unique(s, return_inverse=True)[1] for s in labels]).to(x.device)


def segment_means(x: Tensor, segments: Tensor) -> Tensor:
    """Each pixel replaced by its segment's per-channel mean: x (N,C,H,W), segments (N,H,W) -> (N,C,H,W).

    lime's ``hide_color=None``: a hidden segment looks like a flat patch of its own average colour.
    """
    n, c = x.shape[:2]
    s = int(segments.max()) + 1
    index = segments.flatten(1)[:, None, :].expand(n, c, -1)  # (N,C,H*W)
    sums = torch.zeros(n, c, s, dtype=x.dtype, device=x.device).scatter_add_(2, index, x.flatten(2))
    counts = torch.zeros(n, 1, s, dtype=x.dtype, device=x.device).scatter_add_(
        2, index[:, :1], torch.ones_like(x[:, :1].flatten(2)))
    means = sums / counts.clamp_min(1)
    return means.gather(2, index).reshape(x.shape)


def _hidden(model: Classifier, x: Tensor, segments: Tensor, value: Any, name: str, gen: torch.Generator) -> Tensor:
    """What a switched-off segment shows, (N,C,H,W): segment means for None, else a baseline."""
    if value is None or (isinstance(value, str) and value == "segment_mean"):
        return segment_means(x, segments)
    return resolve_baseline(model, x, value, name=name, generator=gen)


def evaluate_coalitions(
    p: Prepared, segments: Tensor, hidden: Tensor, rows: Tensor, owner: Tensor, columns: Tensor,
    output: str, batch_size: int | None, desc: str,
) -> Tensor:
    """Scores of perturbed images through the batching engine.

    rows: (T,S) bool, True = segment kept; owner: (T,) image index of each row; columns: (N,L) classes
    scored per image. Returns (T,L) float64 scores (probabilities or logits).
    """
    model, x = p.model, p.x
    rows, owner, columns = rows.to(x.device), owner.to(x.device), columns.to(x.device)
    flat = segments.flatten(1)  # (N,H*W)

    def step(start: int, stop: int) -> Tensor:
        img = owner[start:stop]
        keep = rows[start:stop].gather(1, flat[img]).reshape(-1, 1, *x.shape[-2:])  # (B,1,H,W)
        # channels-last where proven safe: CPU convolutions run ~1.3x faster on NHWC input (DESIGN.md)
        out = class_scores(model(fast_layout(model, torch.where(keep, x[img], hidden[img]))), output,
                           binary=model.binary)
        return out.gather(1, columns[img]).double()

    return map_batches(step, rows.shape[0], batch_size=batch_size, grad=False, model=model,
                       item_shape=model.input_size, desc=desc)


def _per_image(values: list[Tensor], width: int) -> Tensor:
    """Stack per-image vectors of different lengths (S_i,...) into (N,width,...), zero-padded."""
    out = values[0].new_zeros((len(values), width, *values[0].shape[1:]))
    for i, v in enumerate(values):
        out[i, : v.shape[0]] = v
    return out


def _pixel_map(weights: Tensor, segments: Tensor) -> Tensor:
    """Per-segment weights (N,S) -> attributions (N,1,H,W), each pixel its segment's weight."""
    return weights.gather(1, segments.flatten(1)).reshape(segments.shape)[:, None].float()


# --- LIME ----------------------------------------------------------------------------------------

def weighted_ridge(z: Tensor, y: Tensor, w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """sklearn's ``Ridge(alpha, fit_intercept=True).fit(z, y, sample_weight=w)`` in closed form.

    z: (M,S), y: (M,L), w: (M,) float64. Centring on the weighted means leaves the intercept
    unpenalised. Returns coef (S,L), intercept (L,).
    """
    sw = w.sum()
    z_mean, y_mean = (w @ z) / sw, (w @ y) / sw
    zc, yc = z - z_mean, y - y_mean
    gram = zc.T @ (w[:, None] * zc) + alpha * torch.eye(z.shape[1], dtype=z.dtype)
    coef = torch.linalg.solve(gram, zc.T @ (w[:, None] * yc))
    return coef, y_mean - z_mean @ coef


def _lasso(z: Tensor, y: Tensor, w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """sklearn's weighted Lasso (coordinate descent has no closed form), one fit per column of y."""
    from sklearn.linear_model import Lasso

    coefs, intercepts = [], []
    for col in y.T:
        fit = Lasso(alpha=alpha, fit_intercept=True).fit(z.numpy(), col.numpy(), sample_weight=w.numpy())
        coefs.append(torch.from_numpy(np.atleast_1d(fit.coef_).astype(np.float64)))
        intercepts.append(float(fit.intercept_))
    return torch.stack(coefs, 1), torch.tensor(intercepts, dtype=torch.float64)


def _fit_local(z: Tensor, y: Tensor, w: Tensor, regressor: str, alpha: float, num_features: int,
               feature_selection: str) -> tuple[Tensor, Tensor, Tensor]:
    """One image's local model. z (M,S), y (M,L), w (M,). Returns coef (S,L), intercept (L,), r2 (L,)."""
    fit = weighted_ridge if regressor == "ridge" else _lasso
    if feature_selection == "none" or num_features >= z.shape[1]:
        coef, intercept = fit(z, y, w, alpha)
    else:
        # lime's "highest_weights": rank segments by a lightly regularised ridge on all of them,
        # refit on the top num_features (per label); the others get weight 0
        ranking, _ = weighted_ridge(z, y, w, 0.01)
        coef = torch.zeros(z.shape[1], y.shape[1], dtype=z.dtype)
        intercept = torch.zeros(y.shape[1], dtype=z.dtype)
        for j in range(y.shape[1]):
            keep = ranking[:, j].abs().argsort(descending=True)[:num_features]
            c, b = fit(z[:, keep], y[:, j : j + 1], w, alpha)
            coef[keep, j], intercept[j] = c[:, 0], b[0]
    pred = z @ coef + intercept
    y_mean = (w @ y) / w.sum()
    r2 = 1 - (w[:, None] * (y - pred) ** 2).sum(0) / (w[:, None] * (y - y_mean) ** 2).sum(0)
    return coef, intercept, r2


def _lime_rows(masks: Any, n_seg: list[int], num_samples: int, gen: torch.Generator) -> list[Tensor]:
    """Per image (num_samples, S_i) bool coalitions: random halves with row 0 all on, as lime draws them."""
    if masks is None:
        out = []
        for s in n_seg:
            rows = torch.randint(0, 2, (num_samples, s), generator=gen).bool()
            rows[0] = True  # lime's first sample is the unperturbed image
            out.append(rows)
        return out
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, Tensor) else masks).cpu()
    if m.dim() == 2:
        m = m[None].expand(len(n_seg), -1, -1)
    if m.dim() != 3 or m.shape[0] != len(n_seg) or any(m.shape[2] != s for s in n_seg):
        raise ValueError(f"masks must be (num_samples, S) or (N, num_samples, S) with S the segment count "
                         f"{sorted(set(n_seg))}, got {tuple(m.shape)}")
    return [row.bool() for row in m]


def lime_kernel(z: Tensor, s: int, kernel_width: float) -> Tensor:
    """lime's sample weights (M,) for coalitions z (M,S) float64 over s segments.

    ``sqrt(exp(-d^2 / width^2))`` with d the cosine distance between the coalition and the all-on row.
    """
    distance = 1 - (z.sum(1) / s).sqrt()
    return torch.exp(-(distance**2) / kernel_width**2).sqrt()


def paired_masks(s: int, pairs: int, gen: torch.Generator) -> Tensor:
    """(2*pairs, S) bool coalitions: a uniform random mask, then its complement, ``pairs`` times.

    Each row on its own is a draw of lime's distribution (every segment on with probability 1/2),
    so the fitted surrogate targets the same answer; within a pair the even part of the model's
    response (its constant and pairwise interactions) cancels from the slopes (antithetic sampling).
    """
    half = torch.randint(0, 2, (pairs, s), generator=gen).bool()
    return torch.stack([half, ~half], 1).reshape(2 * pairs, s)


class Settledness(NamedTuple):
    """``ranking_check``'s verdict on one image's top-k after M samples (see there)."""

    top: list[int]
    separation: float
    ratio: float
    agreement: float
    ceiling: float


def ranking_check(z: Tensor, y: Tensor, w: Tensor, clusters: Tensor, alpha: float, k: int,
                  positive_only: bool, *, reference_samples: int | None = None,
                  gen: torch.Generator | None = None, draws: int = 256) -> Settledness:
    """How settled the top-k segments of lime's weighted ridge are after M samples.

    z: (M,S) float64 coalitions, y: (M,) scores, w: (M,) kernel weights, clusters: (M,) long, equal
    for the rows of one antithetic pair. The top-k are ``top_segments``' choice: the k largest
    positive weights (positive_only) or the k largest |weights|. Standard errors are sandwich
    estimates over clusters (pairs) with the small-sample factor G / (G - S - 1).

    separation: every decision behind the top-k is a contrast of two weights (a member beats an
    outsider; with positive_only also a weight against 0); the weakest one in standard errors.
    ratio: the contrasts' summed variance under pairing over that of M independent rows (the
    variance reduction of pairing; 1 when every row is its own cluster).
    agreement / ceiling (with ``reference_samples`` R, else nan): a parametric bootstrap around the
    fitted weights of the expected top-k overlap between this estimate and plain lime's at R samples
    (covariance: the rows' sandwich scaled by M / R), and of two plain lime runs at R with each other.
    ``agreement >= ceiling`` means this answer predicts lime's as well as lime predicts itself.
    Needs more clusters than S + 1; else separation 0, ratio inf, agreement 0.
    """
    s = z.shape[1]
    sw = w.sum()
    zc, yc = z - (w @ z) / sw, y - (w @ y) / sw
    inverse = torch.linalg.inv(zc.T @ (w[:, None] * zc) + alpha * torch.eye(s, dtype=z.dtype))
    beta = inverse @ (zc.T @ (w * yc))
    rows = (w * (yc - zc @ beta))[:, None] * zc  # (M,S) each row's contribution to the estimating equation
    pairs = rows.new_zeros(int(clusters.max()) + 1, s).index_add_(0, clusters, rows)
    top = _top_segments(beta[None], [s], k, positive_only)[0]
    top = top[top >= 0].tolist()
    contrasts = _contrasts(beta, torch.tensor(top, dtype=torch.long), k, positive_only)  # (P,S)
    if contrasts.shape[0] == 0:  # nothing to decide (k >= S, signs free): certain at once
        return Settledness(top, math.inf, math.inf, float(len(top)), float(len(top)))
    if pairs.shape[0] <= s + 1:
        return Settledness(top, 0.0, math.inf, 0.0, math.nan)
    half_pairs = inverse @ pairs.T * _dof(pairs.shape[0], s + 1) ** 0.5  # (S,G): v_pairs = half @ half.T
    half_rows = inverse @ rows.T * _dof(rows.shape[0], s + 1) ** 0.5
    var_pairs = ((contrasts @ half_pairs) ** 2).sum(1)
    var_rows = ((contrasts @ half_rows) ** 2).sum(1)
    separation = float(((contrasts @ beta) / var_pairs.clamp_min(1e-300).sqrt()).min())
    # pooled over all contrasts: one contrast's ratio is too noisy to act on
    ratio = float(var_pairs.sum() / var_rows.sum().clamp_min(1e-300))
    agreement = ceiling = math.nan
    if reference_samples is not None:
        ref = half_rows * (z.shape[0] / reference_samples) ** 0.5
        noise = [h @ torch.randn(h.shape[1], draws, generator=gen, dtype=h.dtype) for h in (half_pairs, ref, ref)]
        ours, lime_a, lime_b = (_members(beta[:, None] + e, k, positive_only) for e in noise)  # (S,D) each
        agreement = float((ours & lime_a).sum(0).double().mean())
        ceiling = float((lime_a & lime_b).sum(0).double().mean())
    return Settledness(top, separation, ratio, agreement, ceiling)


def _members(weights: Tensor, k: int, positive_only: bool) -> Tensor:
    """(S,D) bool: segment in the top-k of each column of weights (S,D), as ``_top_segments`` picks."""
    score = weights if positive_only else weights.abs()
    kth = score.topk(min(k, score.shape[0]), dim=0).values[-1:]
    chosen = score >= kth
    return chosen & (weights > 0) if positive_only else chosen


def _dof(clusters: int, fitted: int) -> float:
    return clusters / (clusters - fitted)


def _contrasts(beta: Tensor, top: Tensor, k: int, positive_only: bool) -> Tensor:
    """(P,S) contrast vectors c with c @ beta > 0 for every comparison that keeps ``top`` the top-k."""
    s = beta.shape[0]
    inside = torch.zeros(s, dtype=torch.bool)
    inside[top] = True
    sign = torch.ones(s, dtype=beta.dtype) if positive_only else torch.where(beta < 0, -1.0, 1.0).to(beta.dtype)
    eye = torch.diag(sign)
    members, outsiders = eye[inside], eye[~inside]
    parts = [(members[:, None, :] - outsiders[None, :, :]).reshape(-1, s)]  # member beats outsider
    if positive_only:
        parts.append(members)  # a member's weight stays positive
        if len(top) < k:
            parts.append(-outsiders)  # with fewer than k positive weights, outsiders stay <= 0
    return torch.cat(parts)


def _adaptive_samples(
    p: Prepared, segs: Tensor, hidden: Tensor, columns: Tensor, n_seg: list[int], output: str,
    batch_size: int | None, gen: torch.Generator, *, kernel_width: float, alpha: float, num_features: int,
    positive_only: bool, max_samples: int, tolerance: float, patience: int, z_stop: float,
) -> tuple[list[Tensor], list[Tensor], dict[str, Any]]:
    """lime samples in rounds of antithetic pairs until each image's top segments settle.

    Returns per image the coalitions (M_i,S_i) bool (row 0 the image itself, as lime's), their
    scores (M_i,L) float64, and extras: ``n_samples`` (N,), ``stop_reason`` (one of STOP_REASONS per
    image) and ``ranking_check``'s last ``separation``, ``precision_ratio``, ``agreement``, ``ceiling`` (N,).
    """
    n = len(n_seg)
    # one generator per image: an image's masks do not depend on when the others stop
    gens = [make_generator(int(v)) for v in torch.randint(0, 2**62, (n,), generator=gen)]
    clean = class_scores(p.logits, output, binary=p.model.binary).gather(1, columns.to(p.logits.device))
    rows = [[torch.ones(1, s, dtype=torch.bool)] for s in n_seg]  # the image itself: its score is known
    scores = [[clean[i : i + 1].double().cpu()] for i in range(n)]
    checks: list[list[Settledness]] = [[] for _ in range(n)]
    reasons = [""] * n
    active = list(range(n))
    while active:  # rounds, not batches: each round's perturbations go through the batching engine
        new = [paired_masks(n_seg[i], _round_pairs(sum(len(r) for r in rows[i]), n_seg[i], max_samples), gens[i])
               for i in active]
        owner = torch.tensor(active).repeat_interleave(torch.tensor([len(r) for r in new]))
        y = evaluate_coalitions(p, segs, hidden, torch.cat([_pad_columns(r, max(n_seg)) for r in new]), owner,
                                columns, output, batch_size, "lime").cpu()
        for i, r, part in zip(active, new, torch.split(y, [len(r) for r in new])):
            rows[i].append(r)
            scores[i].append(part)
            z = torch.cat(rows[i]).double()
            clusters = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.arange(z.shape[0] - 1) // 2])
            checks[i].append(ranking_check(
                z, torch.cat(scores[i])[:, 0], lime_kernel(z, n_seg[i], kernel_width), clusters, alpha,
                num_features, positive_only, reference_samples=max_samples, gen=gens[i]))
            reasons[i] = _stop_reason(checks[i], z.shape[0], max_samples, tolerance, patience, z_stop)
        active = [i for i in active if not reasons[i]]
    rows_out = [torch.cat(r) for r in rows]
    last = [c[-1] for c in checks]
    info = {"n_samples": torch.tensor([len(r) for r in rows_out]), "stop_reason": tuple(reasons)}
    for key, field in (("separation", "separation"), ("precision_ratio", "ratio"), ("agreement", "agreement"),
                       ("ceiling", "ceiling")):
        info[key] = torch.tensor([getattr(c, field) for c in last], dtype=torch.float32)
    return rows_out, [torch.cat(v) for v in scores], info


def _round_pairs(m: int, s: int, max_samples: int) -> int:
    """Pairs to add to an image with m samples: a first round of more pairs than fitted values
    (S + 1, so that the sandwich estimates exist), then ADAPTIVE_ROUND samples, never past max_samples."""
    want = max(2 * ADAPTIVE_ROUND, 4 * (s + 1)) if m == 1 else ADAPTIVE_ROUND
    return max(1, min(want, max_samples - m) // 2)


def _stop_reason(checks: list[Settledness], m: int, max_samples: int, tolerance: float, patience: int,
                 z_stop: float) -> str:
    """'' to go on, else why to stop (STOP_REASONS), judged on the last ``patience`` checks:
    the same top-k every time, ``z_stop`` standard errors clear of the rest ("separated"); or the
    expected overlap with lime's top-k at max_samples within ``tolerance`` of lime's with itself
    ("agreement")."""
    if m + 1 >= max_samples:  # pairs come two at a time: one more sample cannot be drawn
        return "max_samples"
    if len(checks) < patience:
        return ""
    recent = checks[-patience:]
    if all(c.top == recent[-1].top and c.separation >= z_stop for c in recent):
        return "separated"
    if all(c.agreement >= c.ceiling - tolerance for c in recent):
        return "agreement"
    return ""


@register("lime", family="surrogate", needs_grad=False, stochastic=True,
          per_sample=("segments", "hide_color", "masks"),
          description="Local linear surrogate over superpixels (Ribeiro et al., 2016)")
def lime(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    segments: SegmentsLike = None, num_samples: int | str = 1000, num_features: int = 5,
    hide_color: BaselineLike | None = None, positive_only: bool = True, kernel_width: float = 0.25,
    regressor: str = "ridge", alpha: float = 1.0, feature_selection: str = "none",
    labels: Any = None, masks: Any = None, output: str = "probability",
    max_samples: int = 1000, tolerance: float = 0.5, patience: int = 2, z_stop: float = 3.0,
    batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """LIME for images (Ribeiro et al., 2016), as ``lime.lime_image.LimeImageExplainer``.

    segments: None (lime's quickshift), a name from ``segmentation.SEGMENTATIONS`` or (N,H,W) labels.
    num_samples: perturbed images per image; row 0 is the image itself, the rest keep each segment
    with probability 1/2 (or pass ``masks`` (num_samples,S) / (N,num_samples,S) to fix them).
    ``"auto"``: the same distribution drawn as antithetic pairs (a mask and its complement) in rounds
    of 32 after a first round of 4(S+1), refitting after each round (``ranking_check``), until at
    ``patience`` consecutive checks either the top ``num_features`` segments (as ``top_segments``
    picks them) stayed the same and ``z_stop`` standard errors clear of the rest ("separated"), or
    their expected overlap with plain lime's top segments at ``max_samples`` is within
    ``tolerance`` segments of lime's overlap with itself ("agreement"); at the latest at
    ``max_samples`` ("max_samples"). The rule watches the ridge fit with ``alpha`` (1 for lasso) and
    the target's score only (not ``labels``).
    hide_color: what a switched-off segment shows: None = its mean colour (lime's default), else any
    baseline in model space ("black" = lime's ``hide_color=0`` on pixels, "zeros", "blur", a float...).
    kernel_width: sample weight ``sqrt(exp(-d^2 / width^2))``, d the cosine distance to the image.
    regressor: "ridge" (closed form, intercept unpenalised, = sklearn Ridge) or "lasso" (sklearn), with ``alpha``.
    feature_selection: "none" (default) fits all segments; "highest_weights" refits on the top
    ``num_features`` (lime's choice for ``num_features > 6``). ``num_features`` and ``positive_only``
    otherwise only pick the segments of ``extras["top_segments"]`` and ``image_and_mask``.
    labels: extra classes (ints) to explain from the same samples, like lime's ``labels``.
    output: "probability" (lime's) or "logit" of the target.
    attributions (N,1,H,W) = each pixel's segment weight. extras: ``weights`` (N,S) (zero-padded to
    the largest S), ``intercept``, ``r2`` (weighted R² of the local model, lime's ``score``),
    ``local_pred`` (N,), ``segments`` (N,H,W), ``n_segments`` (N,), ``top_segments`` (N,num_features)
    (-1 padded), ``n_samples`` (N,) model evaluations used per image, and for ``labels``: ``labels``
    (L,), ``label_weights`` (N,L,S), ``label_intercept``, ``label_r2`` (N,L). With ``"auto"`` also
    ``stop_reason`` (a str per image) and the last check's ``separation``, ``precision_ratio``,
    ``agreement`` and ``ceiling`` (N,) (``ranking_check``).
    """
    adaptive = isinstance(num_samples, str)
    if adaptive:
        if num_samples != "auto":
            raise ValueError(f"num_samples must be an integer >= 2 or 'auto', got {num_samples!r}")
        check_positive_int(max_samples, "max_samples", minimum=3)
        check_positive_int(patience, "patience")
        _check_positive(z_stop, "z_stop")
        _check_positive(tolerance, "tolerance", allow_zero=True)
        if masks is not None:
            raise ValueError("masks cannot be combined with num_samples='auto', which draws its own antithetic pairs")
    else:
        check_positive_int(num_samples, "num_samples", minimum=2)
    check_positive_int(num_features, "num_features")
    check_choice(regressor, "regressor", ("ridge", "lasso"))
    check_choice(feature_selection, "feature_selection", ("none", "highest_weights"))
    _check_positive(kernel_width, "kernel_width")
    _check_positive(alpha, "alpha", allow_zero=regressor == "ridge")
    p = prepare(model, x, target, output=output)
    gen = make_generator(seed)
    segs = resolve_segments(p.model, p.x, segments)
    n_seg = [int(s.max()) + 1 for s in segs]
    hidden = _hidden(p.model, p.x, segs, hide_color, "hide_color", gen)
    extra = _check_labels(labels, p.logits.shape[1])
    columns = torch.cat([p.targets[:, None], extra[None].expand(len(n_seg), -1).to(p.targets.device)], 1)

    if adaptive:
        per_image, per_scores, info = _adaptive_samples(
            p, segs, hidden, columns, n_seg, output, batch_size, gen, kernel_width=kernel_width,
            alpha=alpha if regressor == "ridge" else 1.0, num_features=num_features, positive_only=positive_only,
            max_samples=max_samples, tolerance=tolerance, patience=patience, z_stop=z_stop)
    else:
        per_image = _lime_rows(masks, n_seg, num_samples, gen)
        rows = torch.cat([_pad_columns(r, max(n_seg)) for r in per_image])
        owner = torch.arange(len(n_seg)).repeat_interleave(torch.tensor([r.shape[0] for r in per_image]))
        scores = evaluate_coalitions(p, segs, hidden, rows, owner, columns, output, batch_size, "lime").cpu()
        per_scores = list(torch.split(scores, [len(r) for r in per_image]))
        info = {"n_samples": torch.tensor([len(r) for r in per_image])}

    fits = []
    for r, y, s in zip(per_image, per_scores, n_seg):
        z = r.double()
        w = lime_kernel(z, s, kernel_width)
        fits.append(_fit_local(z, y, w, regressor, alpha, num_features, feature_selection))
    coef = _per_image([f[0] for f in fits], max(n_seg))  # (N,S,L), zero-padded segments
    intercept = torch.stack([f[1] for f in fits])  # (N,L)
    r2 = torch.stack([f[2] for f in fits])
    weights = coef[:, :, 0]
    extras = {
        "weights": weights.float(), "intercept": intercept[:, 0].float(), "r2": r2[:, 0].float(),
        "local_pred": (intercept[:, 0] + weights.sum(1)).float(), "segments": segs,
        "n_segments": torch.tensor(n_seg), "top_segments": _top_segments(weights, n_seg, num_features, positive_only),
        **info,
    }
    if len(extra):
        extras.update(labels=extra, label_weights=coef[:, :, 1:].transpose(1, 2).float(),
                      label_intercept=intercept[:, 1:].float(), label_r2=r2[:, 1:].float())
    params = {"num_samples": num_samples, "num_features": num_features, "hide_color": _printable(hide_color),
              "positive_only": positive_only, "kernel_width": kernel_width, "regressor": regressor, "alpha": alpha,
              "feature_selection": feature_selection, "output": output, "seed": _printable(seed),
              "segments": _printable(segments)}
    if adaptive:
        params.update(max_samples=max_samples, tolerance=tolerance, patience=patience, z_stop=z_stop)
    return explanation(p, _pixel_map(weights.to(segs.device), segs), "lime", params, extras)


def image_and_mask(
    e: Explanation, index: int = 0, *, label: int | None = None, positive_only: bool | None = None,
    negative_only: bool = False, hide_rest: bool = False, num_features: int | None = None,
    min_weight: float = 0.0, image: Any = None, model: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """lime's ``ImageExplanation.get_image_and_mask`` for image ``index`` of a lime/kernel_shap Explanation.

    label: None for the explained target, or one of the ``labels`` passed to lime. image: (H,W,C)
    pixels to paint; default ``model.deprocess`` of the input when ``model`` is given, else the raw
    input (H,W,C). positive_only / num_features default to the call's. Returns (image (H,W,C), mask
    (H,W) int: 1 kept, -1 negative when both signs are shown, 0 elsewhere), ready for
    ``skimage.segmentation.mark_boundaries``.
    """
    if "segments" not in e.extras or "weights" not in e.extras:
        raise ValueError(f"e must be a lime or kernel_shap Explanation with segment weights, got method {e.method!r}")
    positive_only = e.params.get("positive_only", True) if positive_only is None else positive_only
    num_features = e.params.get("num_features", 5) if num_features is None else num_features
    if positive_only and negative_only:
        raise ValueError("positive_only and negative_only cannot both be True")
    weights = _weights_for(e, index, label)
    segs = e.extras["segments"][index].cpu().numpy()
    img = _image(e, index, image, model)
    out = np.zeros_like(img) if hide_rest else img.copy()
    mask = np.zeros(segs.shape, dtype=np.int64)
    order = np.argsort(-np.abs(weights), kind="stable")  # lime sorts by |weight|, largest first
    if positive_only or negative_only:
        sign = 1 if positive_only else -1
        chosen = [f for f in order if sign * weights[f] > 0 and abs(weights[f]) > min_weight][:num_features]
        for f in chosen:
            out[segs == f] = img[segs == f]
            mask[segs == f] = 1
        return out, mask
    for f in order[:num_features]:
        if abs(weights[f]) < min_weight:
            continue
        out[segs == f] = img[segs == f]
        out[segs == f, 0 if weights[f] < 0 else 1] = img.max()  # lime paints red (neg) / green (pos)
        mask[segs == f] = -1 if weights[f] < 0 else 1
    return out, mask


# --- KernelSHAP ----------------------------------------------------------------------------------

@register("kernel_shap", family="surrogate", needs_grad=False, stochastic=True, per_sample=("segments", "baseline"),
          description="Shapley values of superpixels by the Shapley-kernel weighted regression (Lundberg & Lee, 2017)")
def kernel_shap(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    segments: SegmentsLike = None, baseline: BaselineLike = "zeros", n_samples: int | str = "auto",
    output: str = "probability", batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """KernelSHAP over superpixels (Lundberg & Lee, 2017).

    A hidden segment shows ``baseline`` (any baseline form; "zeros" in model space by default).
    Coalitions: all 2^S when they cost no more than ``n_samples`` evaluations ("auto": when
    S <= 12), giving the exact Shapley values; otherwise ``n_samples`` sampled ones ("auto": 2S + 2048),
    sizes drawn in proportion to the Shapley kernel's mass and each paired with its complement.
    The weighted least squares is solved under the efficiency constraint
    sum(weights) = f(x) - f(all hidden). attributions (N,1,H,W) = each pixel's segment value.
    extras: ``weights`` (N,S) zero-padded, ``base_value`` f(all hidden) (N,), ``value`` f(x) (N,),
    ``exact`` (N,) bool, ``n_evaluations`` (N,), ``segments`` (N,H,W), ``n_segments`` (N,).
    """
    if n_samples != "auto":
        check_positive_int(n_samples, "n_samples", minimum=2)
    p = prepare(model, x, target, output=output)
    gen = make_generator(seed)
    segs = resolve_segments(p.model, p.x, segments)
    n_seg = [int(s.max()) + 1 for s in segs]
    hidden = resolve_baseline(p.model, p.x, baseline, name="baseline", generator=gen)
    per_image = [_shap_rows(s, n_samples, gen) for s in n_seg]  # (rows (M,S), kernel weights (M,), exact)
    rows = torch.cat([_pad_columns(r, max(n_seg)) for r, _, _ in per_image])
    owner = torch.arange(len(n_seg)).repeat_interleave(torch.tensor([r.shape[0] for r, _, _ in per_image]))
    scores = evaluate_coalitions(p, segs, hidden, rows, owner, p.targets[:, None], output, batch_size,
                                 "kernel_shap").cpu()[:, 0]
    values, base, full, offset = [], [], [], 0
    for r, w, _ in per_image:
        y = scores[offset : offset + len(r)]
        offset += len(r)
        # rows 0 and 1 are the empty and the full coalition: the two ends of the efficiency constraint
        values.append(constrained_least_squares(r[2:].double(), y[2:], w, y[0], y[1]))
        base.append(y[0])
        full.append(y[1])
    weights = _per_image(values, max(n_seg))
    extras = {
        "weights": weights.float(), "base_value": torch.stack(base).float(), "value": torch.stack(full).float(),
        "exact": torch.tensor([e for _, _, e in per_image]),
        "n_evaluations": torch.tensor([len(r) for r, _, _ in per_image]), "segments": segs,
        "n_segments": torch.tensor(n_seg),
    }
    params = {"n_samples": n_samples, "baseline": _printable(baseline), "output": output,
              "seed": _printable(seed), "segments": _printable(segments)}
    return explanation(p, _pixel_map(weights.to(segs.device), segs), "kernel_shap", params, extras)


def shapley_kernel(s: int, k: Tensor) -> Tensor:
    """Shapley kernel weight of a coalition of size k among s players: (s-1) / (C(s,k) k (s-k))."""
    k = k.double()
    log_binom = math.lgamma(s + 1) - torch.lgamma(k + 1) - torch.lgamma(s - k + 1)
    return (s - 1) / (log_binom.exp() * k * (s - k))


def constrained_least_squares(z: Tensor, y: Tensor, w: Tensor, f_empty: Tensor, f_full: Tensor) -> Tensor:
    """argmin_phi sum_j w_j (f_empty + z_j . phi - y_j)^2 subject to sum(phi) = f_full - f_empty.

    z: (M,S) coalitions without the empty and full ones, y (M,), w (M,), float64. Solved through the
    KKT system [[Z'WZ, 1], [1', 0]] [phi, mu] = [Z'W(y - f_empty), f_full - f_empty]; returns phi (S,).
    """
    s = z.shape[1] if z.dim() == 2 else 1
    delta = (f_full - f_empty).double()
    if z.shape[0] == 0 or s == 1:
        return delta.reshape(1).expand(s) / s
    kkt = torch.zeros(s + 1, s + 1, dtype=torch.float64)
    kkt[:s, :s] = z.T @ (w[:, None] * z)
    kkt[:s, s] = kkt[s, :s] = 1.0
    rhs = torch.cat([z.T @ (w * (y - f_empty)), delta.reshape(1)])
    # lstsq (SVD) rather than solve: few sampled coalitions can leave Z'WZ rank-deficient
    return torch.linalg.lstsq(kkt, rhs[:, None], driver="gelsd").solution[:s, 0]


def _shap_rows(s: int, n_samples: int | str, gen: torch.Generator) -> tuple[Tensor, Tensor, bool]:
    """Coalitions of one image: (rows (M,S) bool with row 0 empty and row 1 full, weights (M-2,), exact)."""
    ends = torch.stack([torch.zeros(s, dtype=torch.bool), torch.ones(s, dtype=torch.bool)])
    budget = 2 * s + 2048 if n_samples == "auto" else int(n_samples)
    exact = s <= EXACT_MAX_SEGMENTS if n_samples == "auto" else 2**s <= budget + 2 if s < 63 else False
    if exact:
        codes = torch.arange(1, 2**s - 1)
        inner = (codes[:, None] >> torch.arange(s)) & 1 == 1  # every coalition but the empty and full one
        return torch.cat([ends, inner]), shapley_kernel(s, inner.sum(1)), True
    # sizes in proportion to the kernel's total mass per size, (s-1)/(k(s-k)); pairs with complements
    sizes = torch.arange(1, s)
    mass = (s - 1) / (sizes * (s - sizes)).double()
    half = max(1, budget // 2)
    k = sizes[torch.multinomial(mass / mass.sum(), half, replacement=True, generator=gen)]
    order = torch.rand(half, s, generator=gen).argsort(1).argsort(1)  # a random rank per segment
    inner = order < k[:, None]
    inner = torch.cat([inner, ~inner])
    return torch.cat([ends, inner]), torch.ones(inner.shape[0], dtype=torch.float64), False


# --- small helpers -------------------------------------------------------------------------------

def _pad_columns(rows: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(rows, (0, width - rows.shape[1]))


def _top_segments(weights: Tensor, n_seg: list[int], k: int, positive_only: bool) -> Tensor:
    """(N,k) segment ids: the k largest positive weights (positive_only) or largest |weights|, -1 padded."""
    out = torch.full((weights.shape[0], k), -1, dtype=torch.long)
    for i, s in enumerate(n_seg):
        w = weights[i, :s]
        order = w.argsort(descending=True) if positive_only else w.abs().argsort(descending=True)
        if positive_only:
            order = order[w[order] > 0]
        out[i, : min(k, len(order))] = order[:k]
    return out


def _check_labels(labels: Any, num_classes: int) -> Tensor:
    if labels is None:
        return torch.zeros(0, dtype=torch.long)
    extra = torch.as_tensor(np.atleast_1d(np.asarray(labels)))
    if extra.is_floating_point() or extra.dim() != 1:
        raise ValueError(f"labels must be a sequence of class indices, got {labels!r}")
    if len(extra) and (int(extra.min()) < 0 or int(extra.max()) >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes - 1}], got {extra.tolist()}")
    return extra.long()


def _check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _weights_for(e: Explanation, index: int, label: int | None) -> np.ndarray:
    n = int(e.extras["n_segments"][index]) if "n_segments" in e.extras else e.extras["weights"].shape[1]
    if label is None or label == int(e.targets[index]):
        return e.extras["weights"][index, :n].double().numpy()
    labels = e.extras.get("labels", torch.zeros(0, dtype=torch.long)).tolist()
    if label not in labels:
        raise ValueError(f"label {label} was not explained: the target is {int(e.targets[index])}, labels are {labels}")
    return e.extras["label_weights"][index, labels.index(label), :n].double().numpy()


def _image(e: Explanation, index: int, image: Any, model: Any) -> np.ndarray:
    if image is not None:
        return np.array(image)  # a copy: the caller's image is never painted on
    if e.inputs is None:
        raise ValueError("image is required: the explanation does not hold its inputs")
    if model is not None:
        return np.asarray(model.deprocess(e.inputs[index : index + 1]))[0]
    return e.inputs[index].detach().cpu().permute(1, 2, 0).numpy().copy()


def _printable(value: Any) -> Any:
    if isinstance(value, (Tensor, np.ndarray)):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, torch.Generator) or callable(value):
        return getattr(value, "__name__", type(value).__name__)
    return value
