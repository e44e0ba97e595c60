"""Meta-methods: SmoothGrad, SmoothGrad², VarGrad as wrappers that apply to ANY method.

``smooth(method)`` returns a method with the uniform signature that explains Gaussian-noised
copies of x and folds them into running moments (constant memory in ``n_samples``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..batching import map_batches
from ..explanation import Explanation
from ..models.adapter import Classifier
from ..targets import TargetLike
from ..validation import check_choice, check_positive_int, is_number
from ._autograd import make_generator, prepare
from .gradient import explanation, saliency
from .registry import get_method, method_info, register

STATISTICS = ("mean", "mean_square", "variance")


class RunningMoments:
    """Mean, mean of squares and variance over draws, merged batch by batch (Chan et al.'s update)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None  # sum of squared deviations from the mean

    def update(self, draws: Tensor) -> None:
        """draws: (k, ...) new samples."""
        k = draws.shape[0]
        batch_mean = draws.mean(0)
        batch_m2 = ((draws - batch_mean) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = k, batch_mean, batch_m2
            return
        total = self.count + k
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * k / total)
        self.count = total

    def statistic(self, name: str) -> Tensor:
        assert self.mean is not None and self.m2 is not None
        variance = self.m2 / self.count  # population variance, as Captum's vargrad
        if name == "mean":
            return self.mean
        if name == "variance":
            return variance
        return variance + self.mean**2  # mean of squares


def smooth(
    method: str | Callable[..., Explanation],
    *,
    n_samples: int = 50,
    noise: float = 0.15,
    statistic: str = "mean",
) -> Callable[..., Explanation]:
    """Return ``method`` averaged over Gaussian-noised inputs (Smilkov et al., 2017).

    noise: sigma as a fraction of each image's range, sigma_i = noise * (max x_i - min x_i) (PAIR, zennit).
    statistic: "mean" (SmoothGrad), "mean_square" (SmoothGrad²), "variance" (VarGrad, Adebayo et al.).
    The result takes ``(model, x, target="predicted", *, n_samples=, noise=, seed=None, batch_size=None,
    **method_kwargs)``. The target is resolved on the clean x (noise cannot change the explained class),
    ``outputs`` are the clean logits, and arguments the inner method declares ``per_sample`` are repeated
    with x.
    """
    inner = get_method(method)
    info = method_info(method)
    inner_name = info.name if info is not None else getattr(inner, "__name__", "method")
    per_sample = tuple(info.per_sample) if info is not None else ()
    check_choice(statistic, "statistic", STATISTICS)
    default_n, default_noise = n_samples, noise

    def smoothed(
        model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
        n_samples: int = default_n, noise: float = default_noise,
        seed: int | torch.Generator | None = None, batch_size: int | None = None, **kwargs: Any,
    ) -> Explanation:
        check_positive_int(n_samples, "n_samples")
        if not is_number(noise) or noise < 0:  # NaN and inf are refused here, by name
            raise ValueError(f"noise must be a non-negative fraction of the input range, got {noise!r}")
        p = prepare(model, x, target)
        n = p.x.shape[0]
        gen = make_generator(seed)
        flat = p.x.flatten(1)
        sigma = (noise * (flat.amax(1) - flat.amin(1))).view(1, n, 1, 1, 1)
        moments = RunningMoments()
        inner_kind: list[str] = []
        # one engine item = one draw of all n images: the engine measures how many draws per batch are
        # fastest (batch_size=None) and the inner method runs each chunk as one batch
        draws_per_chunk = None if batch_size is None else max(1, batch_size // n)
        draw_shape = tuple(p.model.input_size) if n == 1 else (n, *p.model.input_size)

        def step(start: int, stop: int) -> None:
            k = stop - start
            # one draw at a time from the generator, so a seed gives the same noise whatever the chunking
            eps = torch.stack([torch.randn(p.x.shape, generator=gen) for _ in range(k)]).to(p.x.device, p.x.dtype)
            noisy = (p.x.unsqueeze(0) + sigma * eps).reshape(k * n, *p.x.shape[1:])
            repeated = {key: _repeat(val, k, n) if key in per_sample else val for key, val in kwargs.items()}
            inner_seed = None if info is None or not info.stochastic else int(torch.randint(0, 2**62, (1,), generator=gen))
            if inner_seed is not None:
                repeated.setdefault("seed", inner_seed)
            e = inner(p.model, noisy, p.targets.repeat(k), batch_size=k * n, **repeated)
            a = e.attributions
            inner_kind[:] = [e.kind]
            moments.update(a.reshape(k, n, *a.shape[1:]).double())

        map_batches(step, n_samples, batch_size=draws_per_chunk, grad=True, model=p.model, item_shape=draw_shape,
                    consume=lambda *_: None, desc=f"smooth({inner_name})")
        attributions = moments.statistic(statistic).to(p.x.dtype)
        name = smoothed.__name__
        params = {"n_samples": n_samples, "noise": noise, "statistic": statistic, "inner": inner_name, **kwargs}
        # the smoothed map is of the inner method's kind (smooth(gradcam) is a per-location map)
        kind = inner_kind[0] if inner_kind else None
        result = explanation(p, attributions, name, _printable(params), map_kind=kind)
        return result

    smoothed.__name__ = f"smooth({inner_name})" if statistic == "mean" else f"smooth({inner_name}, {statistic})"
    smoothed.__doc__ = f"{inner_name} smoothed over Gaussian-noised inputs ({statistic}); see heatlens.methods.smooth."
    return smoothed


def _repeat(value: Any, k: int, n: int) -> Any:
    """Repeat a per-image argument (N,...) for k draws laid out draw-major (k*N,...)."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value.repeat(k, *([1] * (value.dim() - 1)))
    return value


def _printable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (f"tensor{tuple(v.shape)}" if isinstance(v, Tensor) else v) for k, v in params.items()}


def _registered(name: str, statistic: str, description: str) -> Callable[..., Explanation]:
    wrapped = smooth(saliency, statistic=statistic)

    @functools.wraps(wrapped)
    def method(model: Classifier, x: Tensor, target: TargetLike = "predicted", **kwargs: Any) -> Explanation:
        e = wrapped(model, x, target, **kwargs)
        return Explanation(**{**e.__dict__, "method": name})

    method.__name__ = name
    return register(name, family="smoothing", needs_grad=True, stochastic=True, description=description)(method)


smoothgrad = _registered("smoothgrad", "mean", "SmoothGrad: saliency averaged over noisy inputs (Smilkov et al., 2017)")
smoothgrad_sq = _registered("smoothgrad_sq", "mean_square", "SmoothGrad²: mean of squared noisy gradients (Hooker et al., 2019)")
vargrad = _registered("vargrad", "variance", "VarGrad: variance of noisy gradients (Adebayo et al., 2018)")
