"""Baselines: the "absence of signal" a path or perturbation method compares against.

``resolve_baseline(model, x, baseline)`` turns every accepted form into an (N,C,H,W) tensor in model
space. A *baseline* is one point per image; a reference *distribution* (expected gradients,
GradientSHAP, KernelSHAP) is a ``background`` and is handled by those methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import check_finite, did_you_mean

BaselineLike = Union[str, float, int, Tensor, Callable[[Tensor], Tensor]]
NAMED_BASELINES = ("zeros", "black", "white", "uniform", "gaussian", "blur", "mean")


def resolve_baseline(
    model,
    x: Tensor,
    baseline: BaselineLike,
    *,
    name: str = "baseline",
    generator: torch.Generator | None = None,
) -> Tensor:
    """An (N,C,H,W) baseline for ``x`` (N,C,H,W).

    ``"zeros"`` (or 0): zero in model space. ``"black"`` / ``"white"``: a black / white image pushed
    through the model's preprocessing (the CSEP 590B homework baselines). ``"uniform"``: uniform noise
    over the valid input range. ``"gaussian"``: x plus N(0, 0.1 * range) noise. ``"blur"``: a Gaussian
    blur of x (sigma 5 px; ``blur(sigma)`` for other strengths). ``"mean"``: each image's per-channel mean.
    A float is a constant in model space; a Tensor broadcastable to x is used as is; a callable gets x.
    """
    if isinstance(baseline, bool):
        raise TypeError(f"{name} must be a name, a number, a tensor or a callable, got a bool")
    if isinstance(baseline, (int, float)):
        out = torch.full_like(x, float(baseline))
    elif isinstance(baseline, str):
        out = _named(model, x, baseline, name, generator)
    elif isinstance(baseline, Tensor):
        try:
            out = baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(baseline.shape)} does not broadcast to x {tuple(x.shape)}") from None
    elif callable(baseline):
        out = baseline(x)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(f"{name} callable must return a tensor shaped like x {tuple(x.shape)}")
    else:
        raise TypeError(f"{name} must be one of {NAMED_BASELINES}, a number, a tensor or a callable, got {type(baseline).__name__}")
    return check_finite(out.detach().contiguous(), name)


def _named(model, x: Tensor, key: str, name: str, generator: torch.Generator | None) -> Tensor:
    low, high = _range(model, x)
    if key == "zeros":
        return torch.zeros_like(x)
    if key in ("black", "white"):
        return _pixel(model, x, 0.0 if key == "black" else 1.0)
    if key == "uniform":
        u = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        return low + (high - low) * u
    if key == "gaussian":
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        return x + 0.1 * (high - low) * noise
    if key == "blur":
        return gaussian_blur(x, sigma=5.0)
    if key == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    raise ValueError(f"unknown {name} {key!r}.{did_you_mean(key, NAMED_BASELINES)} Valid names: {', '.join(NAMED_BASELINES)}")


def _pixel(model, x: Tensor, value: float) -> Tensor:
    if hasattr(model, "pixel_baseline"):
        return model.pixel_baseline(value).to(x.device, x.dtype).expand_as(x).clone()
    return torch.full_like(x, value)


def _range(model, x: Tensor) -> tuple[Tensor, Tensor]:
    if hasattr(model, "input_range"):
        low, high = model.input_range
        return low.to(x.device, x.dtype), high.to(x.device, x.dtype)
    return x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)


def blur(sigma: float) -> Callable[[Tensor], Tensor]:
    """A baseline that is a Gaussian blur of the input with standard deviation ``sigma`` pixels."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")

    def blurred(x: Tensor) -> Tensor:
        return gaussian_blur(x, sigma=sigma)

    blurred.__name__ = f"blur(sigma={sigma:g})"
    return blurred


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N,C,H,W) with reflect padding (kernel radius 3 sigma)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding needs pad < size
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    horizontal = kernel.reshape(1, 1, 1, -1).expand(c, 1, 1, -1)
    vertical = kernel.reshape(1, 1, -1, 1).expand(c, 1, -1, 1)
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), horizontal, groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), vertical, groups=c)
