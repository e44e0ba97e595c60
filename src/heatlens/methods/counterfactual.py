"""Counterfactual explanations: what would have to change for the model to decide otherwise?

* ``region_swap`` (Goyal et al., 2019, "Counterfactual Visual Explanations"): replace the fewest
  grid cells of a query image with the same cells of a distractor image of another class so that
  the prediction becomes the distractor's class (greedy or exhaustive search, every candidate of a
  step scored in one batched call through the engine).
* ``optimize_counterfactual``: the smallest sparse, smooth change (L1 + total variation) that moves
  the prediction to a chosen class within a step budget (Adam with a proximal L1 step).
* ``extremal_perturbation`` (Fong, Patrick & Vedaldi, 2019): the smooth mask of a fixed area that
  best keeps (preservation) or destroys (deletion) the target score; a registered method.

All work in model input space and clamp to the model's valid input range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..baselines import BaselineLike, gaussian_blur, resolve_baseline
from ..batching import map_batches
from ..explanation import Explanation
from ..models.adapter import Classifier, as_classifier
from ..models.hooks import frozen
from ..models.preprocessing import Preprocessing
from ..targets import TargetLike, resolve_target
from ..validation import check_choice, check_finite, check_fraction, check_images, check_positive_int, is_integer, is_number
from ._autograd import Prepared, make_generator, prepare
from .adversarial import check_epsilon, class_name, to_display, triptych
from .gradient import explanation
from .registry import register

__all__ = ["CounterfactualResult", "region_swap", "optimize_counterfactual", "extremal_perturbation"]

STRATEGIES = ("greedy", "exhaustive")
MODES = ("preservation", "deletion")
MAX_EXHAUSTIVE_EVALUATIONS = 200_000


@dataclass(frozen=True)
class CounterfactualResult:
    """A counterfactual per image and the edits that make it.

    x / counterfactual / delta: (N,C,H,W) in model space, ``delta = counterfactual - x``.
    class_before / class_after: (N,) argmax at x and at the counterfactual. target_class: (N,) the
    class asked for. success: (N,) ``class_after == target_class``. score_before / score_after: (N,)
    softmax probability of target_class. changed_pixels: (N,) pixels (any channel) changed by more
    than the method's threshold. edited_cells / cell_mask: the swapped grid cells ((row, col) list and
    (rows, cols) bool) for ``region_swap``, None otherwise.
    """

    x: Tensor
    counterfactual: Tensor
    delta: Tensor
    class_before: Tensor
    class_after: Tensor
    target_class: Tensor
    success: Tensor
    score_before: Tensor
    score_after: Tensor
    changed_pixels: Tensor
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    edited_cells: list[tuple[int, int]] | None = None
    cell_mask: Tensor | None = None
    labels: tuple[str, ...] | None = field(default=None, repr=False)
    preprocessing: Preprocessing | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def plot(self, *, max_images: int = 8):
        """original | counterfactual | difference (signed, grey = unchanged), one row per image."""
        n = min(len(self), max_images)
        original = to_display(self.preprocessing, self.x[:n])
        counter = to_display(self.preprocessing, self.counterfactual[:n])
        rows, titles = [], []
        for i in range(n):
            diff = counter[i] - original[i]
            scale = 0.5 / max(float(abs(diff).max()), 1e-12)
            rows.append((original[i], counter[i], (0.5 + scale * diff).clip(0, 1)))
            edits = (f"{len(self.edited_cells)} cells" if self.edited_cells is not None
                     else f"{int(self.changed_pixels[i])} pixels")
            goal = class_name(self.labels, int(self.target_class[i]))
            titles.append((
                f"original: {class_name(self.labels, int(self.class_before[i]))}\n"
                f"p({goal}) = {float(self.score_before[i]):.2f}",
                f"counterfactual: {class_name(self.labels, int(self.class_after[i]))}\n"
                f"p({goal}) = {float(self.score_after[i]):.2f}",
                f"difference: {edits}",
            ))
        return triptych(rows, titles)

    def __repr__(self) -> str:
        return (f"CounterfactualResult(method={self.method!r}, before={self.class_before.tolist()}, "
                f"after={self.class_after.tolist()}, target={self.target_class.tolist()}, "
                f"success={self.success.tolist()}, changed_pixels={self.changed_pixels.tolist()})")


def _package(clf: Classifier, x: Tensor, counterfactual: Tensor, targets: Tensor, changed: Tensor,
             method: str, params: dict, extras: dict, **cells: Any) -> CounterfactualResult:
    """Score x and the counterfactual once more and build the result."""
    with torch.inference_mode():
        before, after = clf(x).softmax(1), clf(counterfactual).softmax(1)
    class_after = after.argmax(1)
    pick = targets.view(-1, 1)
    return CounterfactualResult(
        x=x, counterfactual=counterfactual, delta=counterfactual - x, class_before=before.argmax(1),
        class_after=class_after, target_class=targets, success=class_after == targets,
        score_before=before.gather(1, pick)[:, 0], score_after=after.gather(1, pick)[:, 0], changed_pixels=changed,
        method=method, params=params, extras=extras, labels=clf.labels, preprocessing=clf.preprocessing, **cells,
    )


# --- (a) region swapping ---------------------------------------------------------------------------

def cell_masks(size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Boolean masks (rows*cols, H, W) of a grid of near-equal cells; cell r*cols + c is (row r, col c)."""
    (h, w), (rows, cols) = size, grid
    ys = [round(i * h / rows) for i in range(rows + 1)]
    xs = [round(j * w / cols) for j in range(cols + 1)]
    masks = torch.zeros(rows * cols, h, w, dtype=torch.bool)
    for r in range(rows):
        for c in range(cols):
            masks[r * cols + c, ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = True
    return masks


def _grid(size: tuple[int, int], grid: Any, cell_size: Any) -> tuple[int, int]:
    """(rows, cols) from ``grid`` or from ``cell_size`` (pixels, int or (h, w))."""
    if cell_size is not None:
        ch, cw = (cell_size, cell_size) if is_integer(cell_size) else tuple(cell_size)
        check_positive_int(ch, "cell_size")
        check_positive_int(cw, "cell_size")
        grid = (math.ceil(size[0] / ch), math.ceil(size[1] / cw))
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(is_integer(g) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be (rows, cols) of positive integers, got {grid!r}")
    if grid[0] > size[0] or grid[1] > size[1]:
        raise ValueError(f"grid {tuple(grid)} has more cells than pixels in an image of size {tuple(size)}")
    return int(grid[0]), int(grid[1])


def _check_pair(model: Any, query: Any, distractor: Any) -> tuple[Classifier, Tensor, Tensor]:
    """Both must be single images of the same shape that the model takes."""
    for name, t in (("query", query), ("distractor", distractor)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (1,C,H,W), got {type(t).__name__}")
    if query.shape != distractor.shape:
        raise ValueError(f"query and distractor must have the same shape, got query {tuple(query.shape)} "
                         f"and distractor {tuple(distractor.shape)}")
    clf = as_classifier(model, query)
    c, h, w = clf.input_size
    query = check_images(query, "query", channels=c, size=(h, w))
    distractor = check_images(distractor, "distractor", channels=c, size=(h, w))
    if query.shape[0] != 1:
        raise ValueError(f"query and distractor must each hold one image (1,C,H,W), got {query.shape[0]} images")
    return clf, query.to(clf.device).detach(), distractor.to(clf.device).detach()


def _selection(cells: list[int], n_cells: int) -> Tensor:
    sel = torch.zeros(1, n_cells, dtype=torch.bool)
    sel[0, cells] = True
    return sel


def _swap_log_probs(clf: Classifier, query: Tensor, distractor: Tensor, masks: Tensor, selections: Tensor,
                    cls: int, batch_size: int | None) -> tuple[Tensor, Tensor]:
    """Score query images with the selected cells taken from the distractor.

    selections: (M, n_cells) bool. Returns (log p(cls) (M,), predicted class (M,)), one engine run.
    """
    flat = masks.flatten(1).to(query.device, query.dtype)  # (n_cells, H*W)

    def step(start: int, stop: int) -> tuple[Tensor, Tensor]:
        chosen = selections[start:stop].to(query.device, query.dtype)
        m = (chosen @ flat).clamp(max=1).view(-1, 1, *query.shape[-2:])
        logits = clf(query * (1 - m) + distractor * m)
        return logits.log_softmax(1)[:, cls].float(), logits.argmax(1)

    return map_batches(step, selections.shape[0], batch_size=batch_size, grad=False, model=clf,
                       item_shape=clf.input_size, desc="region swap")


def _best(logp: Tensor, flipped: Tensor) -> int:
    """Index of the highest log p(distractor class), preferring candidates that flip the prediction."""
    if bool(flipped.any()):
        logp = torch.where(flipped, logp, torch.full_like(logp, -math.inf))
    return int(logp.argmax())


def _greedy(score, candidates: list[int], n_cells: int, max_cells: int) -> tuple[list[int], list[float], int]:
    """Add, at each step, the candidate cell whose swap raises log p(distractor class) most (a cell
    that flips the prediction wins over one that does not). Stops at the first flip."""
    remaining = list(candidates)
    chosen: list[int] = []
    trajectory: list[float] = []
    evaluations = 0
    while remaining and len(chosen) < max_cells:
        sel = torch.zeros(len(remaining), n_cells, dtype=torch.bool)
        sel[:, chosen] = True
        sel[torch.arange(len(remaining)), remaining] = True
        logp, flipped = score(sel)
        evaluations += len(remaining)
        best = _best(logp, flipped)
        chosen.append(remaining.pop(best))
        trajectory.append(float(logp[best].exp()))
        if bool(flipped[best]):
            break
    return chosen, trajectory, evaluations


def _prune(score, chosen: list[int], n_cells: int) -> tuple[list[int], int]:
    """Backward elimination after a greedy flip: while some chosen cell can be put back (the query's
    own pixels) and the prediction stays the distractor's, put back the one that keeps p(distractor
    class) highest. The result is minimal: without any one of its cells the flip is lost."""
    kept, evaluations = list(chosen), 0
    while len(kept) > 1:
        sel = torch.zeros(len(kept), n_cells, dtype=torch.bool)
        for row, drop in enumerate(kept):
            sel[row, [c for c in kept if c != drop]] = True
        logp, flipped = score(sel)
        evaluations += len(kept)
        if not bool(flipped.any()):
            break
        kept.pop(_best(logp, flipped))
    return kept, evaluations


def _exhaustive(score, candidates: list[int], n_cells: int, max_cells: int) -> tuple[list[int], list[float], int]:
    """All subsets of 1, 2, ... ``max_cells`` candidate cells; the first size with a flip wins, and
    among its flipping subsets the one with the highest p(distractor class)."""
    total = sum(math.comb(len(candidates), k) for k in range(1, max_cells + 1))
    if total > MAX_EXHAUSTIVE_EVALUATIONS:
        raise ValueError(
            f"an exhaustive search over up to {max_cells} of {len(candidates)} differing cells needs {total} "
            f"model evaluations (limit {MAX_EXHAUSTIVE_EVALUATIONS}); pass a smaller max_cells, a coarser grid "
            "or strategy='greedy'")
    evaluations, best_seen = 0, (-math.inf, [])
    for k in range(1, max_cells + 1):
        subsets = torch.combinations(torch.tensor(candidates), r=k).view(-1, k)
        sel = torch.zeros(subsets.shape[0], n_cells, dtype=torch.bool)
        sel.scatter_(1, subsets, True)
        logp, flipped = score(sel)
        evaluations += subsets.shape[0]
        pick = _best(logp, flipped)
        if bool(flipped.any()) or float(logp[pick]) > best_seen[0]:
            best_seen = (float(logp[pick]), subsets[pick].tolist())
        if bool(flipped.any()):
            return best_seen[1], [math.exp(best_seen[0])], evaluations
    return best_seen[1], [math.exp(best_seen[0])], evaluations


def region_swap(
    model: Any, query: Tensor, distractor: Tensor, *,
    grid: tuple[int, int] = (4, 8), cell_size: int | tuple[int, int] | None = None,
    strategy: str = "greedy", max_cells: int | None = None, batch_size: int | None = None,
) -> CounterfactualResult:
    """Counterfactual visual explanation by region swapping (Goyal et al., 2019).

    query, distractor: (1,C,H,W) images of the same size that the model puts in different classes.
    The query is cut into a ``grid`` of (rows, cols) cells (or cells of ``cell_size`` pixels) and
    cells are replaced by the *same* cells of the distractor (spatially aligned, rather than the
    paper's best-matching permutation: the digit CNNs and aligned photos need no search over
    positions) until the prediction becomes the distractor's class. Cells where the two images are
    identical are never candidates: swapping them changes nothing.
    strategy: ``"greedy"`` adds the cell that raises p(distractor class) most at each step;
    ``"exhaustive"`` tries all subsets of 1, 2, ... cells (small grids; at most
    ``MAX_EXHAUSTIVE_EVALUATIONS`` model calls) and returns a smallest flipping subset.
    max_cells: most cells to swap (default: all candidates). After a greedy flip, cells the flip does
    not need are put back (backward elimination), so the edit is minimal: without any one of its cells
    the prediction is not the distractor's. ``success`` is False when no flip was found and also when
    every differing cell had to be swapped (the result is then the distractor, not a counterfactual).
    Returns a ``CounterfactualResult`` with ``edited_cells`` [(row, col), ...] in the order chosen,
    ``cell_mask`` (rows, cols), extras["trajectory"] (p(distractor class) after each greedy step),
    extras["evaluations"] (model evaluations), extras["distractor_class"], extras["fraction_changed"]
    (N,) share of the image's pixels changed, extras["cells_fraction"] (swapped / differing cells),
    extras["greedy_cells"] (cells before pruning), extras["whole_image"].
    """
    clf, query, distractor = _check_pair(model, query, distractor)
    check_choice(strategy, "strategy", STRATEGIES)
    rows, cols = _grid(tuple(query.shape[-2:]), grid, cell_size)
    with frozen(clf):
        with torch.inference_mode():
            q_class, d_class = int(clf(query).argmax(1)), int(clf(distractor).argmax(1))
        if q_class == d_class:
            raise ValueError(
                f"distractor is predicted as class {q_class} ({class_name(clf.labels, q_class)!r}), the same class as "
                "query; choose a distractor that the model puts in another class")
        masks = cell_masks(tuple(query.shape[-2:]), (rows, cols))
        differs = (query != distractor).any(1)[0].cpu()  # (H, W)
        candidates = [i for i in range(rows * cols) if bool((masks[i] & differs).any())]
        limit = len(candidates) if max_cells is None else min(check_positive_int(max_cells, "max_cells"), len(candidates))

        def score(sel: Tensor) -> tuple[Tensor, Tensor]:
            logp, pred = _swap_log_probs(clf, query, distractor, masks, sel, d_class, batch_size)
            return logp.cpu(), (pred == d_class).cpu()

        search = _greedy if strategy == "greedy" else _exhaustive
        chosen, trajectory, evaluations = search(score, candidates, rows * cols, limit)
        greedy_cells = len(chosen)
        if strategy == "greedy" and chosen:
            flipped = bool(score(_selection(chosen, rows * cols))[1][0])
            if flipped:  # greedy may have picked cells the flip does not need: drop them
                chosen, more = _prune(score, chosen, rows * cols)
                evaluations += more + 1
        cell_mask = torch.zeros(rows * cols, dtype=torch.bool)
        cell_mask[chosen] = True
        pixels = (cell_mask.float() @ masks.flatten(1).float()).clamp(max=1).view(1, 1, *query.shape[-2:])
        pixels = pixels.to(query.device, query.dtype)
        counterfactual = query * (1 - pixels) + distractor * pixels
        changed = (counterfactual != query).any(1).flatten(1).sum(1)
        # every differing cell swapped: the "counterfactual" is the distractor itself, which explains nothing
        whole = bool(candidates) and len(chosen) == len(candidates)
        params = {"grid": (rows, cols), "strategy": strategy, "max_cells": max_cells}
        extras = {"trajectory": trajectory, "evaluations": evaluations, "distractor": distractor,
                  "distractor_class": d_class, "candidates": len(candidates), "greedy_cells": greedy_cells,
                  "fraction_changed": changed.double().cpu() / float(query.shape[-2] * query.shape[-1]),
                  "cells_fraction": len(chosen) / max(len(candidates), 1), "whole_image": whole}
        result = _package(clf, query, counterfactual, torch.tensor([d_class], device=query.device), changed,
                          "region_swap", params, extras, edited_cells=[(i // cols, i % cols) for i in chosen],
                          cell_mask=cell_mask.view(rows, cols))
        return dataclasses.replace(result, success=result.success & (not whole))


# --- (b) optimisation-based counterfactual ---------------------------------------------------------

def total_variation(t: Tensor) -> Tensor:
    """Anisotropic total variation per image of (B,C,H,W): sum |vertical| + |horizontal| differences, (B,)."""
    dv = (t[:, :, 1:, :] - t[:, :, :-1, :]).abs().flatten(1).sum(1)
    dh = (t[:, :, :, 1:] - t[:, :, :, :-1]).abs().flatten(1).sum(1)
    return dv + dh


def _margin(logits: Tensor, targets: Tensor, kappa: float) -> Tensor:
    """Hinge max(0, max_{j != t} z_j - z_t + kappa) per row (Carlini & Wagner): zero once t leads by kappa."""
    z_t = logits.gather(1, targets.view(-1, 1))[:, 0]
    others = logits.scatter(1, targets.view(-1, 1), -math.inf).amax(1)
    return (others - z_t + kappa).clamp_min(0)


def optimize_counterfactual(
    model: Any, x: Tensor, target_class: TargetLike, *,
    l1: float = 0.8, tv: float = 0.02, steps: int = 200, lr: float = 0.05, kappa: float = 0.5,
    threshold: float = 0.01, batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> CounterfactualResult:
    """The smallest sparse, smooth change that makes the model predict ``target_class``.

    Minimises c * hinge(logits(x + delta), target_class, kappa) + tv * TV(delta) with Adam (learning
    rate ``lr``) and, after every step, a proximal L1 step (soft-thresholding by ``lr * l1``) that
    sets small changes exactly to zero; x + delta is kept in the valid input range. c starts at 1
    and doubles every ``steps // 10`` steps for images that have not reached the target yet (Carlini
    & Wagner's search for the constant, folded into one run). delta is
    measured in units of each channel's valid range, so ``lr``, ``l1`` and ``threshold`` mean the
    same for a [0,1] model and a [-1,1] one. Over the ``steps`` budget the successful delta with the
    smallest L1 norm is kept (the last one when none succeeds: ``success`` is then False).
    l1: in [0, 1], the share of a step that shrinkage takes back; larger is sparser.
    threshold: a pixel counts as changed when some channel moves by more than this fraction of its range.
    seed: the tiny random start of delta (|delta| <= 1e-3) that breaks ties between pixels.
    Returns a ``CounterfactualResult``; extras["l1"] (N,) and extras["tv"] (N,) of the kept delta.
    """
    check_fraction(l1, "l1")
    for name, value in (("tv", tv), ("kappa", kappa)):
        if not is_number(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    check_epsilon(lr, "lr")
    check_positive_int(steps, "steps")
    check_fraction(threshold, "threshold")
    clf = as_classifier(model, x)
    clf.require_gradients("optimize_counterfactual")
    with frozen(clf):
        p = prepare(clf, x, "predicted")
        targets = resolve_target(p.logits, target_class, clf.labels, name="target_class")
        p = Prepared(model=p.model, x=p.x, targets=targets, logits=p.logits)
        _refuse_current_class(clf, p.logits.argmax(1), p.targets, "target_class")
        low, high = (t.to(p.x.dtype) for t in clf.input_range)
        span = high - low
        every = max(1, steps // 10)
        init = (torch.rand(p.x.shape, generator=make_generator(seed)) * 2 - 1).to(p.x.device, p.x.dtype) * 1e-3

        def step(start: int, stop: int) -> Tensor:
            xb, tb = p.x[start:stop], p.targets[start:stop]
            lo, hi = (low - xb) / span, (high - xb) / span  # delta range keeping x + delta valid
            delta = torch.max(torch.min(init[start:stop].clone(), hi), lo).requires_grad_(True)
            best, best_l1 = delta.detach().clone(), torch.full((stop - start,), math.inf, device=xb.device)
            opt = torch.optim.Adam([delta], lr=lr)
            weight = torch.ones(stop - start, device=xb.device, dtype=xb.dtype)
            for i in range(steps):  # optimisation steps of one batch, not a batch loop
                logits = clf(xb + delta * span)
                loss = weight * _margin(logits, tb, kappa) + tv * total_variation(delta)
                with torch.no_grad():  # keep the best successful delta seen so far
                    norm = delta.abs().flatten(1).sum(1)
                    reached = logits.argmax(1) == tb
                    better = reached & (norm < best_l1)
                    best[better], best_l1[better] = delta[better], norm[better]
                    if (i + 1) % every == 0:  # images still short of the target weigh the class more
                        weight = torch.where(torch.isinf(best_l1), 2 * weight, weight)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                with torch.no_grad():  # proximal L1 step, then back into the valid range
                    delta.copy_(delta.sign() * (delta.abs() - lr * l1).clamp_min(0))
                    delta.copy_(torch.max(torch.min(delta, hi), lo))
            never = torch.isinf(best_l1)
            best[never] = delta.detach()[never]
            return best

        delta = map_batches(step, p.x.shape[0], batch_size=batch_size, grad=True, model=clf,
                            item_shape=clf.input_size, desc="counterfactual")
        counterfactual = p.x + delta * span
        changed = (delta.abs() > threshold).any(1).flatten(1).sum(1)
        params = {"l1": l1, "tv": tv, "steps": steps, "lr": lr, "kappa": kappa, "threshold": threshold}
        extras = {"l1": delta.abs().flatten(1).sum(1), "tv": total_variation(delta)}
        return _package(clf, p.x, counterfactual, p.targets, changed, "optimize_counterfactual", params, extras)


def _refuse_current_class(clf: Classifier, predicted: Tensor, targets: Tensor, name: str) -> None:
    same = (predicted == targets).nonzero()
    if same.numel():
        i = int(same[0, 0])
        cls = int(targets[i])
        raise ValueError(
            f"{name} {cls} ({class_name(clf.labels, cls)!r}) is already the predicted class of image {i}; "
            "a counterfactual needs another class")


# --- (c) extremal perturbations --------------------------------------------------------------------

def smooth_mask(params: Tensor, size: tuple[int, int], sigma: float) -> Tensor:
    """Low-resolution mask parameters (B,1,h,w) in [0,1] -> smooth mask (B,1,H,W) in [0,1]:
    bilinear upsampling then a Gaussian blur of ``sigma`` pixels (a convex combination, so it stays in [0,1])."""
    m = F.interpolate(params, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(m, sigma) if sigma > 0 else m


def area_loss(mask: Tensor, area: float) -> Tensor:
    """Fong et al.'s area constraint per image (B,): mean squared distance of the sorted mask to a
    reference with a ``1 - area`` fraction of zeros then ``area`` of ones (a soft rank constraint)."""
    flat = mask.flatten(1)
    n = flat.shape[1]
    reference = torch.zeros(n, device=mask.device, dtype=mask.dtype)
    reference[n - int(round(area * n)):] = 1
    # Rank on values rounded to 1e-6 with a stable sort: ties (the flat initial mask) then break by
    # pixel index, not by float noise that differs with the batch size, so rows stay independent.
    order = torch.sort(torch.round(flat.detach() * 1e6), dim=1, stable=True).indices
    return (flat.gather(1, order) - reference).pow(2).mean(1)


@register("extremal_perturbation", family="counterfactual", needs_grad=True, per_sample=("baseline",),
          description="Smooth mask of fixed area that keeps or destroys the target score (Fong et al., 2019)")
def extremal_perturbation(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    area: float = 0.1, mode: str = "preservation", steps: int = 300, lr: float = 0.05,
    stride: int | None = None, sigma: float | None = None, baseline: BaselineLike = "blur",
    area_weight: float = 30.0, batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """Extremal perturbation (Fong, Patrick & Vedaldi, 2019).

    Finds a smooth mask m with area ``area`` (fraction of pixels) that maximises the target logit of
    m * x + (1 - m) * b (``mode="preservation"``: what must be kept) or minimises it for
    (1 - m) * x + m * b (``"deletion"``: what must be removed), b = ``baseline`` (default a blur).
    m is ``smooth_mask`` of parameters on a grid ``stride`` times coarser than the image (default
    ~1/28 of the short side, at least 2) blurred by ``sigma`` pixels (default ``stride``); the area is
    enforced by ``area_loss`` with a weight growing geometrically from ``area_weight`` to 16x that
    over the ``steps`` Adam steps (TorchRay's schedule; a smaller start than its 300 lets the reward
    shape the mask before the area locks in, which finds masks keeping about twice the score on the
    digit CNNs). The optimisation is deterministic (``seed`` only drives a random ``baseline``).
    attributions (N,1,H,W) = the mask in [0, 1], high = kept (preservation) or removed (deletion).
    extras: "scores" (N,) target logit at the perturbed input, "clean_scores" (N,), "baseline_scores" (N,),
    "area" (N,) fraction of the mask above 0.5 (the constraint's target), "mask_mean" (N,) (a little
    above ``area``: the smooth edges), "area_error" (N,) = area_loss at the end.
    """
    area = check_fraction(area, "area")
    if not 0 < area < 1:
        raise ValueError(f"area must be strictly between 0 and 1, got {area!r}")
    check_choice(mode, "mode", MODES)
    check_positive_int(steps, "steps")
    check_epsilon(lr, "lr")
    check_epsilon(area_weight, "area_weight")
    p = prepare(model, x, target)
    h, w = p.x.shape[-2:]
    stride = max(2, min(h, w) // 28) if stride is None else check_positive_int(stride, "stride")
    sigma = float(stride) if sigma is None else float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a non-negative number, got {sigma!r}")
    fill = resolve_baseline(p.model, p.x, baseline, generator=make_generator(seed))
    grid = (math.ceil(h / stride), math.ceil(w / stride))
    sign = 1.0 if mode == "preservation" else -1.0
    growth = 16.0 ** (1.0 / max(1, steps - 1))

    def perturb(xb: Tensor, bb: Tensor, m: Tensor) -> Tensor:
        return m * xb + (1 - m) * bb if mode == "preservation" else (1 - m) * xb + m * bb

    def step(start: int, stop: int) -> tuple[Tensor, Tensor]:
        xb, bb, tb = p.x[start:stop], fill[start:stop], p.targets[start:stop]
        params = torch.full((stop - start, 1, *grid), 0.5, device=xb.device, dtype=xb.dtype, requires_grad=True)
        opt = torch.optim.Adam([params], lr=lr)
        weight = area_weight
        for _ in range(steps):  # optimisation steps of one batch, not a batch loop
            m = smooth_mask(params, (h, w), sigma)
            reward = sign * p.model.score(perturb(xb, bb, m), tb)
            energy = -reward + weight * area_loss(m, area)
            opt.zero_grad(set_to_none=True)
            energy.sum().backward()
            opt.step()
            with torch.no_grad():
                params.clamp_(0, 1)
            weight *= growth
        with torch.no_grad():
            m = smooth_mask(params, (h, w), sigma)
            return m, p.model.score(perturb(xb, bb, m), tb).float()

    masks, scores = map_batches(step, p.x.shape[0], batch_size=batch_size, grad=True, model=p.model,
                                item_shape=p.model.input_size, desc="extremal perturbation")
    check_finite(masks, "mask")
    with torch.inference_mode():
        clean, base = p.model.score(p.x, p.targets).float(), p.model.score(fill, p.targets).float()
    params_out = {"area": area, "mode": mode, "steps": steps, "lr": lr, "stride": stride, "sigma": sigma,
                  "baseline": baseline if isinstance(baseline, (str, int, float)) else type(baseline).__name__,
                  "area_weight": area_weight}
    extras = {"scores": scores, "clean_scores": clean, "baseline_scores": base,
              "area": (masks > 0.5).flatten(1).float().mean(1), "mask_mean": masks.flatten(1).mean(1),
              "area_error": area_loss(masks, area)}
    return explanation(p, masks, "extremal_perturbation", params_out, extras)
