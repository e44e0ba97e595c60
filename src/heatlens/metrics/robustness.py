"""Robustness: does the explanation stay put when the input barely moves?

max / avg sensitivity (Yeh et al., 2019) and the local Lipschitz estimate (Alvarez-Melis & Jaakkola,
2018) explain noisy copies of x again, with ``method`` (default: the explanation's own method and
params) and the same targets, and compare raw attributions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..batching import default_batch_size, map_batches
from ..explanation import Explanation, MetricResult
from ..methods.registry import get_method, method_info
from ..validation import check_positive_int
from . import canonical, draw, item_noise, register_metric, result, sample_range


def resolve_method(method: str | Callable[..., Explanation] | None, explanation: Any,
                   method_kwargs: dict[str, Any]) -> tuple[Callable[..., Explanation], dict[str, Any], str]:
    """The method to explain again -> (function, keyword arguments, name).

    None: the explanation's own registered method with its recorded params (those the method takes by
    name; tensor-valued ones were recorded by shape only and must be passed again).
    """
    if method is None:
        if not isinstance(explanation, Explanation):
            raise ValueError("method is required when explanation is a tensor: pass method='saliency' (or a function)")
        try:
            fn = get_method(explanation.method)
        except ValueError:
            raise ValueError(f"explanation's method {explanation.method!r} is not a registered name: "
                             "pass method= (a name or a function) to explain again") from None
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in explanation.params.items()
                  if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY
                  and not (isinstance(v, str) and v.startswith("tensor("))}
        return fn, {**kwargs, **method_kwargs}, explanation.method
    info = method_info(method)
    fn = get_method(method)
    return fn, dict(method_kwargs), info.name if info is not None else getattr(fn, "__name__", "method")


def _reexplain_distances(
    s: Any, fn: Callable[..., Explanation], kwargs: dict[str, Any], n_samples: int, radius: float,
    kind: str, seed: Any, batch_size: int | None,
) -> tuple[Tensor, Tensor]:
    """For draws j = 1..n_samples: ||a(x) - a(x_j)|| and ||x - x_j|| per image -> two (N, n_samples).

    x_j = x + radius * (max x - min x) * noise, noise U(-1,1) (``kind="uniform"``) or N(0,1) per pixel.
    Draws are laid out draw-major (item j * N + i), each from its own seed, k draws per engine chunk.
    """
    n = s.x.shape[0]
    seeds = item_noise(seed, n_samples * n)
    scale = (radius * sample_range(s.x)).view(1, n, 1, 1, 1)
    base = s.attributions.flatten(1).double()
    attr_dist = torch.empty(n_samples, n, dtype=torch.float64)
    input_dist = torch.empty(n_samples, n, dtype=torch.float64)

    def step(start: int, stop: int) -> None:
        k = stop - start
        noise = draw(seeds[start * n: stop * n], tuple(s.x.shape[1:]), kind).to(s.x.device, s.x.dtype)
        delta = noise.view(k, n, *s.x.shape[1:]) * scale
        noisy = (s.x.unsqueeze(0) + delta).reshape(k * n, *s.x.shape[1:])
        e = fn(s.model, noisy, s.targets.repeat(k), batch_size=batch_size, **kwargs)
        a = e.attributions.detach().reshape(k, n, -1).double()
        attr_dist[start:stop] = (a - base.unsqueeze(0)).norm(dim=2).cpu()
        input_dist[start:stop] = delta.reshape(k, n, -1).double().norm(dim=2).cpu()

    chunk = max(1, (batch_size or default_batch_size(s.model, s.model.input_size, grad=True)) // n)
    map_batches(step, n_samples, batch_size=chunk, grad=True, consume=lambda *_: None, desc="re-explain")
    return attr_dist.T, input_dist.T


def _sensitivity(name: str, reduce_fn: Callable[[Tensor], Tensor], model: Any, x: Tensor, explanation: Any,
                 target: Any, method: Any, n_samples: int, radius: float, seed: Any, batch_size: int | None,
                 method_kwargs: dict[str, Any]) -> MetricResult:
    check_positive_int(n_samples, "n_samples")
    if not isinstance(radius, (int, float)) or radius <= 0:
        raise ValueError(f"radius must be a positive fraction of the input range, got {radius!r}")
    s = canonical(model, x, explanation, target)
    fn, kwargs, method_name = resolve_method(method, explanation, method_kwargs)
    attr_dist, _ = _reexplain_distances(s, fn, kwargs, n_samples, radius, "uniform", seed, batch_size)
    norm = s.attributions.flatten(1).double().norm(dim=1).cpu().clamp_min(1e-30)
    ratios = attr_dist / norm[:, None]
    params = {"method": method_name, "n_samples": n_samples, "radius": radius}
    return result(name, reduce_fn(ratios), params=params, extras={"sensitivities": ratios})


@register_metric("max_sensitivity", category="robustness", higher_is_better=False)
def max_sensitivity(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    method: str | Callable[..., Explanation] | None = None, n_samples: int = 10, radius: float = 0.02,
    seed: int | torch.Generator | None = 0, batch_size: int | None = None, **method_kwargs: Any,
) -> MetricResult:
    """Max-sensitivity (Yeh et al., 2019): max over draws of ||a(x) - a(x + d)|| / ||a(x)|| (Frobenius),
    d ~ U(-r, r) per pixel with r = radius * (max x - min x). extras["sensitivities"] (N, n_samples)."""
    return _sensitivity("max_sensitivity", lambda r: r.amax(1), model, x, explanation, target, method,
                        n_samples, radius, seed, batch_size, method_kwargs)


@register_metric("avg_sensitivity", category="robustness", higher_is_better=False)
def avg_sensitivity(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    method: str | Callable[..., Explanation] | None = None, n_samples: int = 10, radius: float = 0.02,
    seed: int | torch.Generator | None = 0, batch_size: int | None = None, **method_kwargs: Any,
) -> MetricResult:
    """Avg-sensitivity (Yeh et al., 2019): the mean over draws of the ratio ``max_sensitivity`` maximises."""
    return _sensitivity("avg_sensitivity", lambda r: r.mean(1), model, x, explanation, target, method,
                        n_samples, radius, seed, batch_size, method_kwargs)


@register_metric("local_lipschitz", category="robustness", higher_is_better=False)
def local_lipschitz(
    model: Any, x: Tensor, explanation: Explanation | Tensor, target: Any = None, *,
    method: str | Callable[..., Explanation] | None = None, n_samples: int = 10, noise: float = 0.05,
    seed: int | torch.Generator | None = 0, batch_size: int | None = None, **method_kwargs: Any,
) -> MetricResult:
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola, 2018): max over draws of
    ||a(x) - a(x')|| / ||x - x'||, x' = x + N(0, sigma^2), sigma = noise * (max x - min x)."""
    check_positive_int(n_samples, "n_samples")
    if not isinstance(noise, (int, float)) or noise <= 0:
        raise ValueError(f"noise must be a positive fraction of the input range, got {noise!r}")
    s = canonical(model, x, explanation, target)
    fn, kwargs, method_name = resolve_method(method, explanation, method_kwargs)
    attr_dist, input_dist = _reexplain_distances(s, fn, kwargs, n_samples, noise, "normal", seed, batch_size)
    ratios = attr_dist / input_dist.clamp_min(1e-30)
    params = {"method": method_name, "n_samples": n_samples, "noise": noise}
    return result("local_lipschitz", ratios.amax(1), params=params, extras={"ratios": ratios})
