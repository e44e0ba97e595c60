"""Result objects: ``Explanation`` (attributions), ``MetricResult`` (scores), ``SanityResult`` (checks).

Attributions stay raw and signed. Every view (channel reduction, upsampling, normalisation,
plots) is a method here, so a method never decides how its output is looked at.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import check_choice

Reduce = Literal["sum_abs", "abs_sum", "sum", "mean", "mean_abs", "max_abs", "l2", "none"]
MAP_KINDS = ("location", "gradient")
# How attributions of each kind become a map when no reduce is given (one rule for maps(), metrics and
# sanity checks): a per-location score (CAM, occlusion, LIME, ...) is already the map and keeps its sign;
# gradient-like attributions (one value per input channel, even when there is one channel) are ranked by
# magnitude, summed over channels (CSEP 590B homework; Quantus's default abs + sum over channels).
DEFAULT_REDUCE = {"location": "mean", "gradient": "sum_abs"}
REDUCTIONS = ("sum_abs", "abs_sum", "sum", "mean", "mean_abs", "max_abs", "l2")
NORMALIZATIONS = ("minmax", "absmax", "percentile", "standardize")


def reduce_channels(attributions: Tensor, reduce: str = "sum_abs") -> Tensor:
    """(N,C,H,W) -> (N,H,W).

    ``sum_abs``: sum over channels of |a| (CSEP 590B homework); ``abs_sum``: |sum over channels|;
    ``sum``: signed sum; ``mean``: signed mean (R255 practical); ``mean_abs``: mean of |a|;
    ``max_abs``: max over channels of |a| (Simonyan et al.); ``l2``: Euclidean norm over channels.
    """
    check_choice(reduce, "reduce", REDUCTIONS)
    a = attributions
    if reduce == "sum_abs":
        return a.abs().sum(1)
    if reduce == "abs_sum":
        return a.sum(1).abs()
    if reduce == "sum":
        return a.sum(1)
    if reduce == "mean":
        return a.mean(1)
    if reduce == "mean_abs":
        return a.abs().mean(1)
    if reduce == "max_abs":
        return a.abs().amax(1)
    return a.pow(2).sum(1).sqrt()


def normalize_maps(maps: Tensor, mode: str = "absmax", *, percentile: float = 99.0) -> Tensor:
    """Per-image normalisation of (N,...) maps; the batch axis is never mixed.

    ``minmax``: to [0, 1]; ``absmax``: divide by max |m| (keeps sign and zero, in [-1, 1]);
    ``percentile``: divide by the ``percentile`` of |m| and clip to [-1, 1] (PAIR's VisualizeImageGrayscale);
    ``standardize``: zero mean, unit variance per image (the R255 practical's standardisation; a constant map gives zeros).
    """
    check_choice(mode, "mode", NORMALIZATIONS)
    flat = maps.reshape(maps.shape[0], -1).double()
    eps = 1e-12
    if mode == "minmax":
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        out = (flat - lo) / (hi - lo).clamp_min(eps)
    elif mode == "absmax":
        out = flat / flat.abs().amax(1, keepdim=True).clamp_min(eps)
    elif mode == "percentile":
        q = torch.quantile(flat.abs(), percentile / 100.0, dim=1, keepdim=True)
        out = (flat / q.clamp_min(eps)).clamp(-1, 1)
    else:
        # unit variance whatever the scale: tf.image.per_image_standardization's floor of 1/sqrt(n) was
        # meant for pixel values and left small gradient maps (std ~1e-3) far from unit variance
        std = flat.std(1, unbiased=False, keepdim=True)
        out = (flat - flat.mean(1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    return out.to(maps.dtype).reshape(maps.shape)


def attribution_maps(attributions: Tensor, kind: str | None, reduce: str | None = None,
                     size: tuple[int, int] | None = None) -> Tensor:
    """(N,C,h,w) attributions -> (N,H,W) maps at ``size``: with ``reduce`` None, by the rule of their
    ``kind`` (``DEFAULT_REDUCE``), else by ``reduce``. The only place attributions become maps."""
    a = attributions
    if reduce is None:
        reduce = DEFAULT_REDUCE[check_choice(kind, "map_kind", MAP_KINDS)]
    if reduce == "none":
        if a.shape[1] != 1:
            raise ValueError(f"reduce='none' needs single-channel attributions, got {a.shape[1]} channels")
        m = a[:, 0]
    else:
        m = reduce_channels(a, reduce)
    target = size or tuple(m.shape[-2:])
    if tuple(m.shape[-2:]) != tuple(target):
        m = F.interpolate(m[:, None].float(), size=tuple(target), mode="bilinear", align_corners=False)[:, 0]
    return m


@dataclass(frozen=True)
class Explanation:
    """Attributions for N images, with what they explain.

    attributions: (N,C,H,W) in model input space, (N,1,H,W) for per-location methods (occlusion, LIME,
    ...), or (N,1,h,w) for CAMs (coarse, upsampled by ``maps``). map_kind: "location" | "gradient",
    recorded from the method's registry entry; it decides how ``maps()`` reduces (see ``kind``).
    targets: LongTensor (N,) explained class per image. outputs: logits (N,K) at the clean input.
    method: registry name (``smooth(saliency)`` for wrapped ones). params: the hyperparameters used.
    extras: diagnostics (IG ``completeness_gap`` (N,), LIME ``r2`` ...). input_size: (H, W) of x.
    """

    attributions: Tensor
    targets: Tensor
    outputs: Tensor
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int] | None = None
    labels: tuple[str, ...] | None = field(default=None, repr=False)
    inputs: Tensor | None = field(default=None, repr=False)
    map_kind: str | None = None

    def __post_init__(self) -> None:
        if self.map_kind is not None:
            check_choice(self.map_kind, "map_kind", MAP_KINDS)

    @property
    def kind(self) -> str:
        """"location" (one signed score per location: CAMs, occlusion, LIME, KernelSHAP, RISE) or
        "gradient" (per-channel attributions: gradients, paths, propagation). Recorded by the method's
        registry entry (``map_kind``); an Explanation built by hand without it counts as "gradient"."""
        if self.map_kind is not None:
            return self.map_kind
        from .methods.registry import METHODS

        return METHODS.get(self.method).meta.get("map_kind", "gradient") if self.method in METHODS else "gradient"

    def __len__(self) -> int:
        return int(self.attributions.shape[0])

    @property
    def predictions(self) -> Tensor:
        """Predicted class per image (N,)."""
        return self.outputs.argmax(1)

    def target_names(self) -> list[str]:
        if self.labels is None:
            return [str(int(t)) for t in self.targets]
        return [self.labels[int(t)] for t in self.targets]

    def maps(self, reduce: Reduce | None = None, *, size: tuple[int, int] | None = None) -> Tensor:
        """(N,H,W) maps at input resolution (or ``size``).

        reduce None (default): the one map rule, by ``kind``: per-location attributions stay signed,
        gradient-like ones become ``"sum_abs"`` over channels (also with one channel). Any other
        ``reduce`` is applied as given (see ``reduce_channels``; ``"none"`` keeps single-channel
        attributions signed). Coarse CAM maps (N,1,h,w) are upsampled bilinearly.
        """
        return attribution_maps(self.attributions.detach(), self.kind if reduce is None else None,
                                reduce, size or self.input_size)

    def normalize(self, mode: str = "absmax", *, reduce: Reduce | None = None, percentile: float = 99.0) -> Tensor:
        """Per-image normalised maps (N,H,W); see ``normalize_maps`` for the modes."""
        return normalize_maps(self.maps(reduce), mode, percentile=percentile)

    def numpy(self, reduce: Reduce | None = None) -> np.ndarray:
        """Raw attributions as (N,C,H,W) numpy, or reduced (N,H,W) maps when ``reduce`` is given."""
        t = self.attributions if reduce is None else self.maps(reduce)
        return t.detach().cpu().float().numpy()

    def select(self, index: int | slice | Tensor) -> "Explanation":
        """The explanation restricted to some images (keeps the (N,...) leading axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        pick = lambda t: t[index] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == len(self) else t  # noqa: E731
        extras = {k: pick(v) for k, v in self.extras.items()}
        return dataclasses.replace(
            self,
            attributions=self.attributions[index],
            targets=self.targets[index],
            outputs=self.outputs[index],
            extras=extras,
            inputs=None if self.inputs is None else self.inputs[index],
        )

    def plot(self, images: Any = None, **kwargs: Any):
        """Overlay each map on its image (``heatlens.viz.plot_explanation``); returns the matplotlib Figure."""
        from .viz.overlay import plot_explanation

        return plot_explanation(self, images, **kwargs)

    def _repr_html_(self) -> str:
        from .viz.overlay import explanation_html

        return explanation_html(self)

    def __repr__(self) -> str:
        shape = tuple(self.attributions.shape)
        return f"Explanation(method={self.method!r}, attributions={shape}, targets={self.targets.tolist()})"


@dataclass(frozen=True)
class MetricResult:
    """Per-image scores of one metric.

    values: (N,) one score per image. curves: (N,S) where the metric traces one (insertion, ...),
    with ``x`` (S,) the fraction of features along it. higher_is_better tells how to read ``values``.
    """

    name: str
    values: Tensor
    higher_is_better: bool
    curves: Tensor | None = None
    x: Tensor | None = None
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> float:
        return float(self.values.double().mean())

    def sem(self) -> float:
        """Standard error of the mean over images."""
        n = self.values.numel()
        return float(self.values.double().std(unbiased=True) / n**0.5) if n > 1 else 0.0

    def numpy(self) -> np.ndarray:
        return self.values.detach().cpu().double().numpy()

    def plot(self, ax: Any = None, **kwargs: Any):
        from .viz.curves import plot_metric

        return plot_metric(self, ax=ax, **kwargs)

    def __repr__(self) -> str:
        arrow = "higher is better" if self.higher_is_better else "lower is better"
        return f"MetricResult({self.name!r}, mean={self.mean():.4g} ± {self.sem():.2g}, n={self.values.numel()}, {arrow})"


@dataclass(frozen=True)
class SanityResult:
    """Outcome of a sanity check: a table (list of row dicts), a verdict and the evidence.

    passed: whether the explanation method passed. verdict: one sentence saying why.
    """

    name: str
    method: str
    table: list[dict[str, Any]]
    passed: bool
    verdict: str
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def plot(self, ax: Any = None, **kwargs: Any):
        from .viz.curves import plot_sanity

        return plot_sanity(self, ax=ax, **kwargs)

    def to_text(self) -> str:
        if not self.table:
            return self.verdict
        cols = list(self.table[0])
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        widths = [max(len(c), *(len(fmt(r[c])) for r in self.table)) for c in cols]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in self.table]
        return "\n".join(lines + [f"verdict: {'PASS' if self.passed else 'FAIL'}: {self.verdict}"])

    def __repr__(self) -> str:
        return f"SanityResult({self.name!r}, method={self.method!r}, passed={self.passed}: {self.verdict})"


def superpixel_sum(maps: Tensor | Explanation, size: int, *, expand: bool = True,
                   reduce: Reduce = "sum_abs") -> Tensor:
    """Sum a map over ``size`` x ``size`` squares (the CSEP 590B homework's superpixel view, part 4b).

    maps: (N,H,W) maps or an Explanation (reduced with ``reduce`` at input size). Edge squares of a
    size that does not divide H or W are partial (they sum what they cover). Returns (N,H,W) with every
    pixel holding its square's sum (``expand=True``, for display), or (N,ceil(H/size),ceil(W/size)).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer (the square's side in pixels), got {size!r}")
    m = maps.maps(reduce) if isinstance(maps, Explanation) else maps
    if not isinstance(m, Tensor) or m.dim() != 3:
        raise ValueError(f"maps must be an (N,H,W) tensor or an Explanation, got {getattr(m, 'shape', type(m))}")
    n, h, w = m.shape
    gh, gw = -(-h // size), -(-w // size)
    padded = F.pad(m, (0, gw * size - w, 0, gh * size - h))
    sums = padded.reshape(n, gh, size, gw, size).sum((2, 4))
    if not expand:
        return sums
    return sums.repeat_interleave(size, 1).repeat_interleave(size, 2)[:, :h, :w]
