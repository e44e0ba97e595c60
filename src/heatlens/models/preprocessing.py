"""Image loading and preprocessing without torchvision: a few lines of torch and Pillow.

``Preprocessing`` maps images (paths, PIL images, HWC arrays, uint8 or float tensors) to the model's
(N,C,H,W) input tensor: resize the shorter side, centre-crop, scale to [0, 1], normalise with
``(v - mean) / std``; ``inverse`` maps back to displayable (N,H,W,C) floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Preprocessing:
    """size: (H, W) the model takes. resize: shorter side before the crop, or an exact (H, W) before the
    crop (None: resize straight to size). mean / std: per-channel normalisation applied to [0, 1] pixels.
    channels: 3 for RGB, 1 for grey. resample: "bilinear" (default), "bicubic" or "nearest"."""

    size: tuple[int, int]
    resize: int | tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channels: int = 3
    resample: str = "bilinear"

    def __call__(self, images: Any) -> Tensor:
        """Images -> model input (N,C,H,W). A list or tuple is preprocessed one image at a time, so each
        keeps its own aspect ratio (resized on its shorter side, centre-cropped): a batch of several
        sizes equals its images preprocessed one by one and concatenated."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list")
            return torch.cat([self(im) for im in images], 0)
        batch = to_unit_batch(images, self.channels)  # (N,C,h,w) in [0, 1]
        batch = self._geometry(batch)
        return (batch - self._stat(self.mean)) / self._stat(self.std)

    def inverse(self, x: Tensor) -> np.ndarray:
        """Model input (N,C,H,W) -> displayable (N,H,W,C) float32 in [0, 1]."""
        pixels = x.detach().cpu().float() * self._stat(self.std) + self._stat(self.mean)
        return pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()

    @property
    def input_range(self) -> tuple[Tensor, Tensor]:
        """Per-channel (low, high) in model space of valid pixels, each (1,C,1,1)."""
        return (0 - self._stat(self.mean)) / self._stat(self.std), (1 - self._stat(self.mean)) / self._stat(self.std)

    def to_model_space(self, pixel_value: float) -> Tensor:
        """The model-space value of a constant pixel in [0, 1] (e.g. 0 -> the black baseline), (1,C,1,1)."""
        return (pixel_value - self._stat(self.mean)) / self._stat(self.std)

    def _stat(self, values: Sequence[float]) -> Tensor:
        t = torch.tensor(values, dtype=torch.float32)
        if t.numel() == 1:
            t = t.expand(self.channels)
        return t.reshape(1, -1, 1, 1)

    def _geometry(self, batch: Tensor) -> Tensor:
        h, w = self.size
        if self.resize is None:
            if tuple(batch.shape[-2:]) != (h, w):
                batch = _resize(batch, (h, w), self.resample)
            return batch
        ih, iw = batch.shape[-2:]
        if isinstance(self.resize, int):
            scale = self.resize / min(ih, iw)
            new = (max(h, round(ih * scale)), max(w, round(iw * scale)))
        else:  # an exact size, then the crop (Hugging Face processors with size {height, width} + crop_size)
            new = (max(h, int(self.resize[0])), max(w, int(self.resize[1])))
        if new != (ih, iw):
            batch = _resize(batch, new, self.resample)
        top, left = (batch.shape[-2] - h) // 2, (batch.shape[-1] - w) // 2
        return batch[..., top : top + h, left : left + w]


RESAMPLE = ("bilinear", "bicubic", "nearest")


def _resize(batch: Tensor, size: tuple[int, int], resample: str = "bilinear") -> Tensor:
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
    if resample == "nearest":  # no antialiasing for nearest (as PIL's NEAREST)
        return F.interpolate(batch, size=size, mode="nearest-exact")
    # antialias=True filters when shrinking, as PIL does: the Hugging Face processors resize with PIL
    return F.interpolate(batch, size=size, mode=resample, align_corners=False, antialias=True).clamp(0, 1)


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes for 16-bit (and 32-bit) grey


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB (H,W,3): uint8 for 8-bit files, float32 in [0, 1] for 16-bit ones.

    Pillow opens 16-bit grey PNG/TIFF as integer modes that ``convert("RGB")`` clips at 255 (an
    all-white image); they are scaled by their real range (65535) instead. The array is a fresh,
    writable copy. A clear error names an unreadable path.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file {str(p)!r} does not exist")
    try:
        with Image.open(p) as img:
            if img.mode in HIGH_BIT_MODES:
                return _high_bit_grey(np.array(img), img.mode)
            if img.mode == "F":  # 32-bit float grey (TIFF): kept as floats, [0, 1] or [0, 255] (see _scale)
                return np.repeat(np.array(img, dtype=np.float32)[..., None], 3, axis=2)
            return np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image file {str(p)!r} is not a readable image: {err}") from None


def _high_bit_grey(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit grey (or 32-bit "I" holding 16-bit data, as Pillow reads some PNGs) -> float32 (H,W,3) in [0, 1]."""
    a = a.astype(np.float64)
    top = 65535.0 if mode != "I" or a.max() <= 65535 else float(2**31 - 1)
    return np.repeat((np.clip(a, 0, top) / top).astype(np.float32)[..., None], 3, axis=2)


def to_unit_batch(images: Any, channels: int = 3) -> Tensor:
    """Images in any common form -> float (N,C,h,w) in [0, 1]. A list is converted image by image and
    must share one size (stretching one image to another's size would change what it shows; the
    ``Preprocessing`` call resizes and crops each image on its own)."""
    if isinstance(images, (str, Path)):
        images = load_image(images)
    if isinstance(images, (list, tuple)):
        items = [to_unit_batch(im, channels) for im in images]
        sizes = sorted({tuple(t.shape[-2:]) for t in items})
        if len(sizes) > 1:
            raise ValueError(f"images have different sizes {sizes}: they cannot be stacked as they are; "
                             "use model.preprocess(images), which resizes and crops each image on its own")
        return torch.cat(items, 0)
    if _is_pil(images):
        images = np.asarray(images.convert("RGB" if channels == 3 else "L"))
    if isinstance(images, np.ndarray):
        t = _from_numpy(images)
    elif isinstance(images, Tensor):
        t = _from_tensor(images)
    else:
        raise TypeError(f"images must be paths, PIL images, arrays or tensors, got {type(images).__name__}")
    return _match_channels(t, channels)


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Image.Image)


def _from_numpy(a: np.ndarray) -> Tensor:
    """HW, HWC or NHWC array (uint8 in [0,255] or float in [0,1]) -> (N,C,H,W) float in [0,1]."""
    if a.ndim == 2:
        a = a[None, :, :, None]
    elif a.ndim == 3:
        a = a[None] if a.shape[-1] in (1, 3, 4) else a[..., None]
    if a.ndim != 4:
        raise ValueError(f"images must be HW, HWC or NHWC arrays, got shape {a.shape}")
    # a copy when the array is read-only (np.asarray of a PIL image): torch warns on those
    a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a)
    t = torch.from_numpy(a).permute(0, 3, 1, 2)
    return _scale(t)


def _from_tensor(t: Tensor) -> Tensor:
    """(C,H,W) or (N,C,H,W) tensor (uint8 or float in [0,1]) -> (N,C,H,W) float."""
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"images tensor must be (C,H,W) or (N,C,H,W), got shape {tuple(t.shape)}")
    return _scale(t.detach().cpu())


def _scale(t: Tensor) -> Tensor:
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    t = t.float()
    if float(t.max()) > 1.0 + 1e-6:  # float images given in [0, 255]
        t = t / 255.0
    return t


def _match_channels(t: Tensor, channels: int) -> Tensor:
    c = t.shape[1]
    if c == 4:
        t, c = t[:, :3], 3
    if c == channels:
        return t
    if c == 1 and channels == 3:
        return t.expand(-1, 3, -1, -1).clone()
    if c == 3 and channels == 1:
        return (t * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    raise ValueError(f"images have {c} channels but the model expects {channels}")
