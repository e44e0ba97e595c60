"""Path family: Integrated Gradients, Expected Gradients, GradientSHAP.

All three average gradients at points between a reference and the input; the points are built
lazily per engine batch and folded into a running sum, so memory is one batch whatever ``steps``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from ..baselines import BaselineLike, resolve_baseline
from ..explanation import Explanation
from ..models.adapter import Classifier
from ..targets import TargetLike
from ..validation import check_choice, check_images, check_nonnegative, check_positive_int
from ._autograd import Prepared, gradients_over, make_generator, prepare
from .gradient import explanation
from .registry import register

QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(method: str, steps: int) -> tuple[Tensor, Tensor]:
    """Points alpha (S,) in [0, 1] and weights (S,) approximating the integral over [0, 1].

    The rules of Captum's ``approximation_parameters``, with one difference: "riemann_trapezoid" is the
    standard trapezoid rule (weights 1/(S-1), ends halved, summing to 1, exact for linear integrands);
    Captum's weights are 1/S with the ends halved and sum to (S-1)/S, so its trapezoid attributions are
    (S-1)/S of these. The others (Gauss-Legendre, the default, and left/right/middle Riemann) agree.
    """
    check_choice(method, "method", QUADRATURES)
    check_positive_int(steps, "steps", minimum=2 if method == "riemann_trapezoid" else 1)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.tensor(0.5 * (nodes + 1), dtype=torch.float64), torch.tensor(0.5 * weights, dtype=torch.float64)
    if method == "riemann_trapezoid":
        alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
        weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        return alphas, weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    alphas = (torch.arange(steps, dtype=torch.float64) + offset) / steps
    return alphas, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


def _path_gradient_sum(p: Prepared, baselines: Tensor, alphas: Tensor, weights: Tensor,
                       output: str, batch_size: int | None) -> Tensor:
    """sum_s w_s * grad f(x' + a_s (x - x')) per image, (N,C,H,W). Items are image-major (i*S + s)."""
    steps = alphas.numel()
    alphas = alphas.to(p.x.device, p.x.dtype)
    weights = weights.to(p.x.device, p.x.dtype)
    delta = p.x - baselines
    total = torch.zeros_like(p.x)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(start, stop, device=p.x.device)
        img, s = idx // steps, idx % steps
        return baselines[img] + alphas[s].view(-1, 1, 1, 1) * delta[img], p.targets[img]

    def consume(start: int, stop: int, _inputs: Tensor, grads: Tensor, _scores: Tensor) -> None:
        idx = torch.arange(start, stop, device=p.x.device)
        total.index_add_(0, idx // steps, grads * weights[idx % steps].view(-1, 1, 1, 1))

    gradients_over(p.model, p.x.shape[0] * steps, build, consume, output=output, batch_size=batch_size,
                   desc="integrated gradients")
    return total


@register("integrated_gradients", family="path", needs_grad=True, per_sample=("baseline",),
          description="Integrated Gradients: path integral of gradients from a baseline (Sundararajan et al., 2017)")
def integrated_gradients(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    baseline: BaselineLike = "zeros", steps: int | str = 50, method: str = "gausslegendre",
    tolerance: float = 0.01, output: str = "logit", batch_size: int | None = None,
    seed: int | torch.Generator | None = None,
) -> Explanation:
    """Integrated Gradients (Sundararajan et al., 2017).

    attributions (N,C,H,W) = (x - x') * integral_0^1 grad f(x' + a (x - x')) da, signed.
    baseline: "zeros" | "black" | "white" | "uniform" | "blur" | "mean" | float | Tensor | callable
    (``heatlens.baselines``; ``seed`` drives "uniform"). method: quadrature, one of ``QUADRATURES``.
    extras["completeness_gap"] (N,) = f(x) - f(x') - sum(attributions) (0 for an exact integral);
    extras["baseline_scores"] (N,) = f(x').
    steps="auto": points placed where the score changes until the completeness gap is within
    ``tolerance`` x |f(x) - f(x')| (``heatlens.methods._ig_auto``);
    ``method`` is then not used. extras["passes"] counts the passes ({"forward", "forward_backward"}).
    """
    p = prepare(model, x, target, output=output)
    baselines = resolve_baseline(p.model, p.x, baseline, generator=make_generator(seed))
    auto = _check_steps(steps, tolerance)
    if auto:
        from ._ig_auto import adaptive_gradient_sum

        grad_sum, base_scores, auto_extras = adaptive_gradient_sum(p, baselines, tolerance, output, batch_size)
    else:
        alphas, weights = quadrature(method, steps)
        grad_sum = _path_gradient_sum(p, baselines, alphas, weights, output, batch_size)
        with torch.inference_mode():
            base_scores = p.model.score(baselines, p.targets, output).float()
        auto_extras = {"passes": {"forward": p.x.shape[0], "forward_backward": steps * p.x.shape[0]}}
    attributions = (p.x - baselines) * grad_sum
    x_scores = p.scores(output)
    gap = x_scores - base_scores - attributions.flatten(1).sum(1).float()
    _warn_if_unconverged(gap, x_scores - base_scores, steps, "adaptive" if auto else method)
    params = {"baseline": _describe(baseline), "steps": steps, "method": "adaptive" if auto else method,
              "output": output, **({"tolerance": tolerance} if auto else {})}
    extras = {"completeness_gap": gap, "baseline_scores": base_scores, "scores": x_scores,
              "relative_gap": gap.abs() / (x_scores - base_scores).abs().clamp_min(1e-12), **auto_extras}
    return explanation(p, attributions, "integrated_gradients", params, extras)


def _check_steps(steps: object, tolerance: object) -> bool:
    """True for steps="auto" (then tolerance must be in (0, 1)); an int steps is checked by ``quadrature``."""
    if isinstance(steps, str):
        if steps != "auto":
            raise ValueError(f"steps must be a positive integer or 'auto', got {steps!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
            raise ValueError(f"tolerance must be a number in (0, 1) (a fraction of |f(x) - f(baseline)|), got {tolerance!r}")
        return True
    return False


GAP_TOLERANCE = 0.05  # relative completeness gap above which the integral has visibly not converged


def _warn_if_unconverged(gap: Tensor, difference: Tensor, steps: int, method: str) -> None:
    """Warn when sum(attributions) misses f(x) - f(x') by more than GAP_TOLERANCE.

    Why: on real CNNs the score often jumps within the first few percent of the path from a
    constant baseline (efficientnet-lite0 on chelsea: f goes 0.19 -> 8.8 between alpha 0.025 and
    0.05), so a modest ``steps`` silently gives maps that do not add up.
    """
    relative = gap.abs() / difference.abs().clamp_min(1e-6)
    worst = float(relative.max())
    if worst > GAP_TOLERANCE:
        warnings.warn(
            f"integrated_gradients: attributions miss f(x) - f(baseline) by {100 * worst:.1f}% "
            f"(steps={steps}, method={method!r}); raise steps or try a blurred baseline "
            "(extras['completeness_gap'] has the per-image gap)", stacklevel=3)


def _reference_gradients(
    p: Prepared, background: Tensor, per_image: bool, n_samples: int, noise: float, output: str,
    batch_size: int | None, gen: torch.Generator,
) -> Tensor:
    """Mean over draws of (x~ - r) * grad f(r + a (x~ - r)), a ~ U(0,1), x~ = x + noise; r is image i's
    own reference ``background[i]`` when ``per_image``, else r ~ the shared set ``background`` (M,C,H,W).

    Returns attributions (N,C,H,W). All random draws come from the CPU generator ``gen`` in a fixed
    order (references, alphas, then noise per batch; items are image-major, i * n_samples + s), so a
    seed reproduces the result on any device.
    """
    n = p.x.shape[0]
    picks = torch.randint(0, 1 if per_image else background.shape[0], (n, n_samples), generator=gen)
    alphas = torch.rand((n, n_samples), generator=gen, dtype=torch.float64).to(p.x.device, p.x.dtype)
    sigma = _sample_range(p.x) * noise
    total = torch.zeros_like(p.x)
    picks = picks.to(p.x.device)
    batch_delta: dict[str, Tensor] = {}  # x~ - r of the batch in flight, used again by consume

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(start, stop, device=p.x.device)
        img, s = idx // n_samples, idx % n_samples
        ref = background[img] if per_image else background[picks[img, s]]
        xin = p.x[img]
        if noise > 0:  # drawn per batch from the same generator, in item order
            eps = torch.randn((img.numel(), *p.x.shape[1:]), generator=gen).to(p.x.device, p.x.dtype)
            xin = xin + sigma[img].view(-1, 1, 1, 1) * eps
        batch_delta["delta"] = xin - ref
        return ref + alphas[img, s].view(-1, 1, 1, 1) * batch_delta["delta"], p.targets[img]

    def consume(start: int, stop: int, _inputs: Tensor, grads: Tensor, _scores: Tensor) -> None:
        img = torch.arange(start, stop, device=p.x.device) // n_samples
        total.index_add_(0, img, grads * batch_delta["delta"])

    gradients_over(p.model, n * n_samples, build, consume, output=output, batch_size=batch_size,
                   desc="expected gradients")
    return total / n_samples


def _background(p: Prepared, background: BaselineLike | Tensor, gen: torch.Generator) -> tuple[Tensor, bool]:
    """(references, per_image). A 4-D tensor is a reference set (M,C,H,W) shared by every image
    (per_image False). Any other form (a name, a number, a callable, a broadcastable tensor) is
    resolved against all of x, so each image gets its own reference (N,C,H,W) (per_image True):
    "mean", "blur" and callables depend on the image, "uniform"/"gaussian" are drawn from ``gen``."""
    if isinstance(background, Tensor) and background.dim() == 4 and background.shape[0] != p.x.shape[0]:
        c, h, w = p.model.input_size
        return check_images(background, "background", channels=c, size=(h, w)).to(p.x.device, p.x.dtype), False
    if isinstance(background, Tensor) and background.dim() == 4:
        return check_images(background, "background").to(p.x.device, p.x.dtype), False
    return resolve_baseline(p.model, p.x, background, name="background", generator=gen), True


@register("expected_gradients", family="path", needs_grad=True, stochastic=True,
          description="Expected Gradients: IG averaged over references drawn from a background set (Erion et al., 2021)")
def expected_gradients(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    background: Tensor | BaselineLike = "zeros", n_samples: int = 50,
    output: str = "logit", batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """Expected Gradients (Erion et al., 2021): E_{r~background, a~U(0,1)} [(x - r) grad f(r + a(x - r))].

    background: (M,C,H,W) reference images (e.g. a sample of the training set) shared by all images, or
    any baseline form, resolved per image ("mean" / "blur" / a callable give each image its own
    reference; ``seed`` drives "uniform" / "gaussian"). n_samples: draws per image. attributions (N,C,H,W), signed; they sum to f(x) - E f(r) in expectation.
    """
    check_positive_int(n_samples, "n_samples")
    p = prepare(model, x, target, output=output)
    gen = make_generator(seed)
    refs, per_image = _background(p, background, gen)
    attributions = _reference_gradients(p, refs, per_image, n_samples, 0.0, output, batch_size, gen)
    params = {"background": _describe(background), "n_samples": n_samples, "output": output}
    return explanation(p, attributions, "expected_gradients", params)


@register("gradient_shap", family="path", needs_grad=True, stochastic=True,
          description="GradientSHAP: expected gradients with Gaussian noise on the input (Lundberg & Lee, 2017)")
def gradient_shap(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    background: Tensor | BaselineLike = "zeros", n_samples: int = 5, noise: float = 0.0,
    output: str = "logit", batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """GradientSHAP (Lundberg & Lee, 2017; Captum's defaults n_samples=5, no noise).

    Like ``expected_gradients`` but each draw also adds N(0, sigma^2) noise to x with
    sigma = noise * (max x - min x) per image (noise >= 0). background: as in ``expected_gradients``.
    attributions (N,C,H,W), signed.
    """
    check_positive_int(n_samples, "n_samples")
    noise = check_nonnegative(noise, "noise")
    p = prepare(model, x, target, output=output)
    gen = make_generator(seed)
    refs, per_image = _background(p, background, gen)
    attributions = _reference_gradients(p, refs, per_image, n_samples, noise, output, batch_size, gen)
    params = {"background": _describe(background), "n_samples": n_samples, "noise": noise, "output": output}
    return explanation(p, attributions, "gradient_shap", params)


def _sample_range(x: Tensor) -> Tensor:
    """max - min of each image (N,): noise is relative to it (PAIR, zennit)."""
    flat = x.flatten(1)
    return flat.amax(1) - flat.amin(1)


def _describe(value: object) -> object:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    return getattr(value, "__name__", value)
