"""Segmentation: superpixel label maps shared by LIME, KernelSHAP, feature ablation and metrics.

``segment(images, method)`` returns an (N,H,W) LongTensor of labels 0..S_i-1 per image (contiguous,
so ``labels.max() + 1`` is the segment count). SLIC, quickshift and Felzenszwalb call scikit-image
on [0, 1] pixels; ``grid`` is a regular lattice of square cells. This is a utility, not an
explanation method: it is not in the method registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..validation import check_choice, check_positive_int

SEGMENTATIONS = ("quickshift", "slic", "felzenszwalb", "grid")

# lime's LimeImageExplainer default (kernel_size=4, max_dist=200, ratio=0.2), so that heatlens's
# default LIME segments are the ones the lime package and the R255 practical use.
DEFAULTS: dict[str, dict[str, Any]] = {
    "quickshift": {"kernel_size": 4, "max_dist": 200, "ratio": 0.2},
    "slic": {"n_segments": 100, "compactness": 10.0, "start_label": 0},
    "felzenszwalb": {"scale": 100.0, "sigma": 0.8, "min_size": 50},
    "grid": {"cell_size": 16},
}

__all__ = ["segment", "n_segments", "segment_masks", "relabel", "SEGMENTATIONS"]


def segment(images: Any, method: str = "quickshift", *, model: Any = None, **params: Any) -> Tensor:
    """Superpixel label maps.

    images: (N,C,H,W) model input (pass ``model=`` so it is deprocessed to [0,1] pixels; without a
    model the tensor is taken as [0,1] pixels already), or numpy pixels (N,H,W,C) / (H,W,C) / (H,W),
    uint8 or float in [0, 1].
    method: ``"quickshift"`` (lime's default: kernel_size=4, max_dist=200, ratio=0.2),
    ``"slic"`` (n_segments=100, compactness=10), ``"felzenszwalb"`` (scale=100, sigma=0.8,
    min_size=50) or ``"grid"`` (cell_size=16: square cells, the last row/column clipped).
    params: keyword arguments of the scikit-image function (or ``cell_size`` for grid), overriding
    the defaults above.
    Returns a LongTensor (N,H,W) with labels 0..S_i-1 per image, on the model's device if given.
    """
    check_choice(method, "method", SEGMENTATIONS)
    pixels = _pixels(images, model)  # (N,H,W,C) float64 in [0, 1]
    options = {**DEFAULTS[method], **params}
    if method == "grid":
        labels = grid(pixels.shape[1:3], **options)[None].expand(pixels.shape[0], -1, -1).clone()
    else:
        fn = _skimage_fn(method, pixels.shape[-1])
        labels = torch.stack([torch.from_numpy(relabel(fn(img, **options))) for img in pixels])
    device = getattr(model, "device", None) if model is not None else (images.device if isinstance(images, Tensor) else None)
    return labels.to(device) if device is not None else labels


def grid(size: tuple[int, int], cell_size: int = 16) -> Tensor:
    """Regular square cells: (H,W) labels, row-major, cell (r, c) = r * ceil(W / cell_size) + c."""
    check_positive_int(cell_size, "cell_size")
    h, w = int(size[0]), int(size[1])
    rows = torch.arange(h) // cell_size
    cols = torch.arange(w) // cell_size
    per_row = -(-w // cell_size)
    return rows[:, None] * per_row + cols[None, :]


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels made contiguous 0..S-1 keeping their order (scikit-image may start at 1 or skip values)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def n_segments(labels: Tensor) -> Tensor:
    """Segment count per image, LongTensor (N,), for contiguous labels (N,H,W)."""
    check_segments(labels)
    return labels.flatten(1).amax(1) + 1


def segment_masks(labels: Tensor) -> Tensor:
    """Boolean masks (N,S,H,W), S = the largest segment count (padding masks are all False).

    Memory is N*S*H*W bytes: prefer indexing ``keep[labels]`` with a per-segment vector when S is large.
    """
    check_segments(labels)
    s = int(labels.max()) + 1
    ids = torch.arange(s, device=labels.device).reshape(1, s, 1, 1)
    return labels[:, None] == ids


def check_segments(labels: Any, name: str = "segments", *, shape: tuple[int, ...] | None = None) -> Tensor:
    """Validate an (N,H,W) integer label map with non-negative labels (optionally of a given shape)."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be an (N,H,W) integer tensor or array, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer labels, got dtype {labels.dtype}")
    if labels.dim() != 3:
        raise ValueError(f"{name} must have shape (N,H,W), got {tuple(labels.shape)}")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(labels.shape)} but x needs {tuple(shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} must hold labels >= 0, got {int(labels.min())}")
    return labels.long()


def _skimage_fn(method: str, channels: int) -> Callable[..., np.ndarray]:
    """The scikit-image segmentation for [0,1] float pixels (H,W,C)."""
    from skimage import segmentation as sk

    fn = {"quickshift": sk.quickshift, "slic": sk.slic, "felzenszwalb": sk.felzenszwalb}[method]
    if method == "quickshift" and channels == 1:
        # quickshift clusters in Lab colour space, which needs RGB: repeat the grey channel
        return lambda img, **kw: fn(np.repeat(img, 3, axis=-1), **kw)
    if channels == 1:
        return lambda img, **kw: fn(img[..., 0], **{"channel_axis": None, **kw})
    return fn


def _pixels(images: Any, model: Any) -> np.ndarray:
    """Any accepted image form -> (N,H,W,C) float64 pixels in [0, 1]."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be an (N,C,H,W) tensor, got shape {tuple(images.shape)}")
        if model is not None:
            return np.asarray(model.deprocess(images), dtype=np.float64)
        return images.detach().cpu().double().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be an (N,C,H,W) tensor or an (N,H,W,C) numpy array, got {type(images).__name__}")
    arr = images
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[-1] in (1, 3, 4) else arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"images must be (N,H,W,C) pixels, got shape {images.shape}")
    if arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha: the colour segmentations work on RGB
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"images must be uint8 or float pixels in [0, 1], got dtype {arr.dtype}")
    return np.clip(arr.astype(np.float64), 0.0, 1.0)
