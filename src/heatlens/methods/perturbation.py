"""Perturbation family: occlusion, feature ablation and RISE.

All three only run the model forward, so they explain every model kind, black-box numpy predict
functions included. Each describes its perturbed inputs as a flat item range (image x window,
image x segment, mask x image) and builds one engine batch at a time with vectorised tensor ops, so
memory is one batch whatever the number of windows, segments or masks.

The explained quantity defaults to the target's softmax **probability** (``output="probability"``):
the drop in probability is what Zeiler & Fergus (2014), RISE (Petsiuk et al., 2018) and the CSEP
590B occlusion exercise measure. ``output="logit"`` explains the logit, which is what Captum's
``Occlusion`` / ``FeatureAblation`` compute for a forward function that returns logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..baselines import BaselineLike, resolve_baseline
from ..batching import map_batches
from ..explanation import Explanation
from ..models.adapter import Classifier
from ..targets import TargetLike
from ..validation import check_positive_int, is_integer, is_number
from ._autograd import Prepared, fast_layout, make_generator, prepare, scores_over
from .gradient import explanation
from .registry import register

__all__ = ["occlusion", "feature_ablation", "rise", "rise_masks", "grid_segments"]

Pair = Union[int, Sequence[int]]
SegmentsLike = Union[Tensor, str, None]
_DEFAULT_WINDOW = (8, 8)
_DEFAULT_GRID = (7, 7)


# --- shared helpers ---------------------------------------------------------------------------------
def _pair(value: Pair, name: str) -> tuple[int, int]:
    """An int or an (height, width) pair of positive ints."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {value!r}")
    if is_integer(value):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(is_integer(v) for v in value)):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be >= 1 in both dimensions, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _replace(x: Tensor, fill: Tensor, img: Tensor, mask: Tensor) -> Tensor:
    """Images ``x[img]`` with pixels where ``mask`` (B,1,H,W) bool is True taken from ``fill[img]``."""
    return torch.where(mask, fill[img], x[img])  # scores_over gives it the model's fast layout


def _describe(value: object) -> object:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    return getattr(value, "__name__", value)


def _baselines(p: Prepared, baseline: BaselineLike, seed: int | torch.Generator | None) -> Tensor:
    """The fill for removed pixels, (N,C,H,W) in model space (``seed`` drives the random ones)."""
    return resolve_baseline(p.model, p.x, baseline, generator=make_generator(seed))


# --- occlusion --------------------------------------------------------------------------------------
def window_counts(size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    """Window positions per dimension, as Captum counts them: ceil((size - window) / stride) + 1.

    The last window may stick out of the image and is clipped, so with stride <= window every
    pixel is covered at least once.
    """
    return tuple(math.ceil((s - w) / st) + 1 for s, w, st in zip(size, window, stride))  # type: ignore[return-value]


def _occlusion_geometry(
    size: tuple[int, int], window: Pair | None, stride: Pair | None, superpixel_size: int | None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resolve (window, stride) from the two ways of asking, and check them against the image."""
    if superpixel_size is not None:
        if window is not None or stride is not None:
            raise ValueError("pass either superpixel_size or window/stride, not both "
                             f"(got superpixel_size={superpixel_size!r}, window={window!r}, stride={stride!r})")
        window = stride = _pair(superpixel_size, "superpixel_size")
    win = _pair(window if window is not None else _DEFAULT_WINDOW, "window")
    step = _pair(stride, "stride") if stride is not None else win
    if win[0] > size[0] or win[1] > size[1]:
        raise ValueError(f"window {win} is larger than the image {tuple(size)}")
    for dim in range(2):
        if step[dim] > win[dim] and win[dim] < size[dim]:
            raise ValueError(f"stride {step} is larger than window {win}: pixels between windows would never "
                             "be occluded; use stride <= window")
    return win, step


def _occlusion_drops(p: Prepared, fill: Tensor, win: tuple[int, int], step: tuple[int, int],
                     output: str, batch_size: int | None) -> Tensor:
    """Score drop for every window position, (N, nh, nw). Items are image-major (i * P + pos)."""
    n, _, h, w = p.x.shape
    nh, nw = window_counts((h, w), win, step)
    per_image = nh * nw
    rows = torch.arange(h, device=p.x.device)
    cols = torch.arange(w, device=p.x.device)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(start, stop, device=p.x.device)
        img, pos = idx // per_image, idx % per_image
        top, left = (pos // nw) * step[0], (pos % nw) * step[1]
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + win[0])  # (B,H)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + win[1])  # (B,W)
        mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B,1,H,W)
        return _replace(p.x, fill, img, mask), p.targets[img]

    scores = scores_over(p.model, n * per_image, build, output=output, batch_size=batch_size, desc="occlusion")
    return (p.scores(output)[:, None] - scores.view(n, per_image)).view(n, nh, nw)


def _spread(drops: Tensor, size: tuple[int, int], win: tuple[int, int], step: tuple[int, int]) -> Tensor:
    """Average over the windows covering each pixel of their drops: (N,nh,nw) -> (N,H,W).

    A transposed convolution with a ones kernel adds each window's drop onto the pixels it covers;
    the same on ones counts the covering windows. Clipped border windows are cropped away.
    """
    kernel = torch.ones((1, 1, *win), dtype=torch.float64, device=drops.device)
    total = F.conv_transpose2d(drops.double()[:, None], kernel, stride=step)[:, 0, : size[0], : size[1]]
    counts = F.conv_transpose2d(torch.ones_like(drops[:1], dtype=torch.float64)[:, None], kernel,
                                stride=step)[:, 0, : size[0], : size[1]]
    return total / counts


@register("occlusion", family="perturbation", needs_grad=False, per_sample=("baseline",),
          description="Occlusion: score drop when a sliding window is replaced by a baseline (Zeiler & Fergus, 2014)")
def occlusion(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    window: Pair | None = None, stride: Pair | None = None, superpixel_size: int | None = None,
    baseline: BaselineLike = "zeros", output: str = "probability",
    batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """Occlusion (Zeiler & Fergus, 2014), with Captum's ``Occlusion`` semantics.

    window: (height, width) or int, default (8, 8), slid over all channels with ``stride`` (default
    = window). superpixel_size: the CSEP 590B form, non-overlapping squares (window = stride = it).
    baseline: what an occluded window shows: "zeros" | "black" | "white" | "mean" | "blur" |
    ``heatlens.baselines.blur(sigma)`` | float | Tensor | callable (``seed`` drives "uniform").
    attributions (N,1,H,W), signed: per pixel, the mean over the windows covering it of
    score(x) - score(x occluded) (Captum with a full-channel window repeats it over channels).
    extras["windows"] (N,nh,nw): the drop of each window position (top-left at i*stride).
    """
    p = prepare(model, x, target, output=output)
    size = tuple(p.x.shape[-2:])
    win, step = _occlusion_geometry(size, window, stride, superpixel_size)
    drops = _occlusion_drops(p, _baselines(p, baseline, seed), win, step, output, batch_size)
    per_pixel = _spread(drops, size, win, step).to(p.x.dtype)
    attributions = per_pixel[:, None]  # (N,1,H,W): one score per location, not one per channel
    params = {"window": win, "stride": step, "baseline": _describe(baseline), "output": output}
    return explanation(p, attributions, "occlusion", params, {"windows": drops.to(p.x.dtype)})


# --- feature ablation -------------------------------------------------------------------------------
def grid_segments(size: tuple[int, int], cell_size: int, n_images: int = 1) -> Tensor:
    """A regular grid of square cells as an (N,H,W) label map; cell (r, c) = r * ceil(W / cell) + c.

    Border cells are clipped when the cell size does not divide the image.
    """
    check_positive_int(cell_size, "superpixel_size")
    h, w = int(size[0]), int(size[1])
    per_row = -(-w // cell_size)
    labels = (torch.arange(h) // cell_size)[:, None] * per_row + (torch.arange(w) // cell_size)[None, :]
    return labels[None].expand(n_images, -1, -1).clone()


def _segment_map(p: Prepared, segments: SegmentsLike, superpixel_size: int) -> Tensor:
    """Segments in any accepted form -> (N,H,W) LongTensor on x's device."""
    n, _, h, w = p.x.shape
    if segments is None:
        return grid_segments((h, w), superpixel_size, n).to(p.x.device)
    if isinstance(segments, str):
        from .segmentation import segment  # lazy: scikit-image only loads when asked for

        return segment(p.x, segments, model=p.model).to(p.x.device).long()
    if not isinstance(segments, Tensor):
        raise TypeError(f"segments must be an (N,H,W) integer tensor, a segmentation name or None, "
                        f"got {type(segments).__name__}")
    if segments.is_floating_point() or segments.is_complex() or segments.dtype == torch.bool:
        raise TypeError(f"segments must hold integer labels, got dtype {segments.dtype}")
    if segments.dim() == 2:
        segments = segments[None].expand(n, -1, -1)
    if segments.dim() != 3 or tuple(segments.shape) != (n, h, w):
        raise ValueError(f"segments must have shape (N,H,W) = {(n, h, w)} (or (H,W) for all images), "
                         f"got {tuple(segments.shape)}")
    return segments.to(p.x.device).long()


def _features(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Number every (image, label) pair present: returns feature ids (N,H,W) in 0..T-1 (image-major,
    labels ascending), the image of each feature (T,) and its label within its image (T,), 0-based."""
    n = labels.shape[0]
    low = labels.amin()
    span = int(labels.amax() - low) + 1
    keys = torch.arange(n, device=labels.device).view(n, 1, 1) * span + (labels - low)
    present, ids = torch.unique(keys, return_inverse=True)
    image = present // span
    first = torch.searchsorted(image, torch.arange(n, device=labels.device))
    return ids, image, torch.arange(image.numel(), device=labels.device) - first[image]


@register("feature_ablation", family="perturbation", needs_grad=False, per_sample=("baseline", "segments"),
          description="Feature ablation: score drop when each segment is replaced by a baseline")
def feature_ablation(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    segments: SegmentsLike = None, superpixel_size: int = 16,
    baseline: BaselineLike = "zeros", output: str = "probability",
    batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """Feature ablation over segments (Captum ``FeatureAblation`` with a feature mask).

    segments: (N,H,W) (or (H,W)) integer label map, e.g. from ``heatlens.methods.segmentation.segment``;
    a segmentation name ("slic", "quickshift", "felzenszwalb", "grid"); or None for a regular grid of
    ``superpixel_size`` squares. Each segment, in all channels, is replaced by ``baseline`` (as in
    ``occlusion``) and every pixel of it gets score(x) - score(x ablated).
    attributions (N,1,H,W), signed, one score per location. extras["segments"] (N,H,W) labels renumbered
    0..S_i-1 per image; extras["drops"] (N, max S_i): each segment's drop, NaN past an image's S_i.
    """
    p = prepare(model, x, target, output=output)
    labels = _segment_map(p, segments, superpixel_size)
    ids, image, local = _features(labels)
    fill = _baselines(p, baseline, seed)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        feature = torch.arange(start, stop, device=p.x.device)
        img = image[feature]
        mask = (ids[img] == feature[:, None, None])[:, None]  # (B,1,H,W)
        return _replace(p.x, fill, img, mask), p.targets[img]

    scores = scores_over(p.model, image.numel(), build, output=output, batch_size=batch_size,
                         desc="feature ablation")
    drops = p.scores(output)[image] - scores  # (T,)
    attributions = drops[ids].to(p.x.dtype)[:, None]  # (N,1,H,W): one score per segment pixel
    padded = torch.full((p.x.shape[0], int(local.max()) + 1), float("nan"), device=p.x.device)
    padded[image, local] = drops
    params = {"segments": _describe(segments) if segments is not None else f"grid({superpixel_size})",
              "baseline": _describe(baseline), "output": output}
    extras = {"segments": ids - (ids.flatten(1).amin(1)).view(-1, 1, 1), "drops": padded.to(p.x.dtype)}
    return explanation(p, attributions, "feature_ablation", params, extras)


# --- RISE -------------------------------------------------------------------------------------------
class _MaskDraws:
    """The random part of RISE masks, drawn once (tiny: n_masks grids and shifts) so that a seed gives
    the same masks whatever the batch size; the full-resolution masks are rendered per batch."""

    def __init__(self, n_masks: int, size: tuple[int, int], grid: tuple[int, int], p_keep: float,
                 generator: torch.Generator) -> None:
        self.size = size
        self.cell = (math.ceil(size[0] / grid[0]), math.ceil(size[1] / grid[1]))
        self.up = ((grid[0] + 1) * self.cell[0], (grid[1] + 1) * self.cell[1])
        self.grids = torch.rand((n_masks, 1, *grid), generator=generator) < p_keep
        self.shift_rows = torch.randint(0, self.cell[0], (n_masks,), generator=generator)
        self.shift_cols = torch.randint(0, self.cell[1], (n_masks,), generator=generator)

    def render(self, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Masks ``start..stop-1`` as (B,1,H,W) in [0, 1]: the binary grid upsampled bilinearly to
        (grid + 1) cells, then cropped at the mask's random shift (Petsiuk et al., 2018)."""
        grids = self.grids[start:stop].to(device=device, dtype=dtype)
        up = F.interpolate(grids, size=self.up, mode="bilinear", align_corners=False)
        b = up.shape[0]
        rows = self.shift_rows[start:stop].to(device)[:, None] + torch.arange(self.size[0], device=device)
        cols = self.shift_cols[start:stop].to(device)[:, None] + torch.arange(self.size[1], device=device)
        picked = up[torch.arange(b, device=device)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
        return picked[:, None].clamp_(0, 1)  # bilinear weights can round a hair past 1


def _rise_setup(size: tuple[int, int], n_masks: int, grid: Pair | None, cell_size: int | None,
                p_keep: float, seed: int | torch.Generator | None) -> _MaskDraws:
    check_positive_int(n_masks, "n_masks")
    if not is_number(p_keep) or not 0 < float(p_keep) <= 1:
        raise ValueError(f"p_keep must be a probability in (0, 1], got {p_keep!r}")
    if cell_size is not None:
        if grid is not None:
            raise ValueError(f"pass either grid or cell_size, not both (got grid={grid!r}, cell_size={cell_size!r})")
        cell = _pair(cell_size, "cell_size")
        grid = (math.ceil(size[0] / cell[0]), math.ceil(size[1] / cell[1]))
    cells = _pair(grid if grid is not None else _DEFAULT_GRID, "grid")
    if cells[0] > size[0] or cells[1] > size[1]:
        raise ValueError(f"grid {cells} has more cells than the image {tuple(size)} has pixels")
    return _MaskDraws(n_masks, size, cells, float(p_keep), make_generator(seed))


def rise_masks(
    n_masks: int, size: tuple[int, int], *, grid: Pair | None = None, cell_size: int | None = None,
    p_keep: float = 0.5, seed: int | torch.Generator | None = None,
) -> Tensor:
    """The (n_masks,1,H,W) masks ``rise`` uses for the same arguments and seed (all in memory at once:
    for inspection and tests; ``rise`` renders them one batch at a time)."""
    draws = _rise_setup(tuple(size), n_masks, grid, cell_size, p_keep, seed)  # type: ignore[arg-type]
    return draws.render(0, n_masks, torch.device("cpu"), torch.float32)


@register("rise", family="perturbation", needs_grad=False, per_sample=("baseline",), stochastic=True,
          description="RISE: saliency from scores of randomly masked inputs (Petsiuk et al., 2018)")
def rise(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    n_masks: int = 4000, grid: Pair | None = None, cell_size: int | None = None, p_keep: float = 0.5,
    baseline: BaselineLike = "zeros", output: str = "probability",
    batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """RISE (Petsiuk et al., 2018): saliency = sum_m score(x * M_m) M_m / (n_masks * p_keep).

    Masks: a random binary ``grid`` (default 7x7; or cells of ``cell_size`` pixels) keeping each cell
    with probability ``p_keep``, upsampled bilinearly with a random shift. Masked pixels blend towards
    ``baseline`` (x * M + baseline * (1 - M); "zeros" is the paper's x * M). The same masks serve
    every image; ``seed`` fixes them (``rise_masks`` returns them).
    attributions (N,1,H,W): one map per image at input resolution, raw (not normalised).
    extras["coverage"] (N,1,H,W): the mean mask, ~p_keep everywhere when n_masks is large.
    """
    p = prepare(model, x, target, output=output)
    n, _, h, w = p.x.shape
    draws = _rise_setup((h, w), n_masks, grid, cell_size, p_keep, seed)
    fill = _baselines(p, baseline, seed)
    total = torch.zeros((n, 1, h, w), dtype=torch.float64, device=p.x.device)
    coverage = torch.zeros((1, 1, h, w), dtype=torch.float64, device=p.x.device)

    def step(start: int, stop: int) -> None:
        # items are mask-major (m * N + i): a batch renders each of its masks once for all images
        idx = torch.arange(start, stop, device=p.x.device)
        first = start // n
        masks = draws.render(first, (stop - 1) // n + 1, p.x.device, p.x.dtype)
        m, img = idx // n - first, idx % n
        inputs = fast_layout(p.model, torch.lerp(fill[img], p.x[img], masks[m]))
        scores = p.model.score(inputs, p.targets[img], output).double()
        total.index_add_(0, img, scores.view(-1, 1, 1, 1) * masks[m].double())
        coverage.add_(masks[m].double().sum(0, keepdim=True) / n)

    map_batches(step, n * n_masks, batch_size=batch_size, model=p.model, item_shape=p.model.input_size,
                consume=lambda *_: None, desc="rise")
    attributions = (total / (n_masks * float(p_keep))).to(p.x.dtype)
    params = {"n_masks": n_masks, "grid": _grid_param(draws), "p_keep": float(p_keep),
              "baseline": _describe(baseline), "output": output}
    extras = {"coverage": (coverage / n_masks).to(p.x.dtype).expand(n, -1, -1, -1)}
    return explanation(p, attributions, "rise", params, extras)


def _grid_param(draws: _MaskDraws) -> tuple[int, int]:
    return int(draws.grids.shape[-2]), int(draws.grids.shape[-1])
