"""Adversarial examples as explanations: FGSM and PGD in L-inf and L2 balls.

An adversarial example answers "what is the smallest change, of a given kind, that changes the
decision?" (Goodfellow et al., 2015; Madry et al., 2018). Both attacks work in model input space
(``model.preprocess(images)``), so ``epsilon`` and ``step_size`` are in model-space units: for a
model normalised with ``(v - 0.5) / 0.5`` (efficientnet-lite0) one pixel level 1/255 is 2/255 there.
Results are clamped to the model's valid input range (``Classifier.input_range``, per channel).

Untargeted attacks maximise the cross-entropy of the current class (``target=None``: the predicted
class; or pass the true labels); targeted attacks (``targeted=True``) minimise the cross-entropy of
``target``. Images are independent rows, batched through ``heatlens.batching`` (one engine batch of
images runs all its iterations), and the model runs inside ``hooks.frozen`` (state restored).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batching import map_batches
from ..models.adapter import Classifier, as_classifier
from ..models.hooks import frozen
from ..models.preprocessing import Preprocessing
from ..targets import TargetLike, resolve_target
from ..validation import check_choice, check_images, check_positive_int
from ._autograd import make_generator

__all__ = ["AdversarialResult", "fgsm", "pgd"]

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AdversarialResult:
    """An adversarial example per image, with what it changed.

    x / x_adv / perturbation: (N,C,H,W) in model space, ``perturbation = x_adv - x``.
    original_pred / new_pred: (N,) argmax class at x and at x_adv. target: (N,) the class attacked
    (untargeted: the class pushed away from; targeted: the class aimed at). success: (N,) bool,
    ``new_pred != target`` (untargeted) or ``new_pred == target`` (targeted).
    linf / l2: (N,) norms of the perturbation in model space. losses: (N,) final cross-entropy of target.
    """

    x: Tensor
    x_adv: Tensor
    perturbation: Tensor
    original_pred: Tensor
    new_pred: Tensor
    target: Tensor
    success: Tensor
    linf: Tensor
    l2: Tensor
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] | None = field(default=None, repr=False)
    preprocessing: Preprocessing | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def plot(self, *, amplify: float | None = None, max_images: int = 8):
        """original | adversarial | perturbation (amplified around grey), one row per image.

        amplify: factor applied to the perturbation; None scales each row so that its largest
        change spans half the display range. Returns the matplotlib Figure.
        """
        n = min(len(self), max_images)
        original, adversarial = to_display(self.preprocessing, self.x[:n]), to_display(self.preprocessing, self.x_adv[:n])
        rows, titles = [], []
        for i in range(n):
            diff = adversarial[i] - original[i]
            scale = amplify if amplify is not None else 0.5 / max(float(abs(diff).max()), 1e-12)
            rows.append((original[i], adversarial[i], (0.5 + scale * diff).clip(0, 1)))
            titles.append((f"original: {class_name(self.labels, int(self.original_pred[i]))}",
                           f"adversarial: {class_name(self.labels, int(self.new_pred[i]))}",
                           f"perturbation x{scale:.3g} (linf {float(self.linf[i]):.3g})"))
        return triptych(rows, titles)

    def __repr__(self) -> str:
        rate = float(self.success.float().mean()) if len(self) else 0.0
        return (f"AdversarialResult(method={self.method!r}, n={len(self)}, success_rate={rate:.2f}, "
                f"linf_max={float(self.linf.max()):.4g}, l2_max={float(self.l2.max()):.4g})")


def class_name(labels: tuple[str, ...] | None, index: int) -> str:
    """A class index as its name (the index itself when the model has no labels)."""
    return labels[index] if labels is not None and 0 <= index < len(labels) else str(index)


def to_display(preprocessing: Preprocessing | None, x: Tensor):
    """(n,C,H,W) model space -> (n,H,W,C) numpy in [0, 1] for display."""
    if preprocessing is not None:
        return preprocessing.inverse(x)
    return x.detach().cpu().float().clamp(0, 1).permute(0, 2, 3, 1).numpy()


def triptych(rows: list[tuple], titles: list[tuple[str, str, str]]):
    """A figure with one row of three (H,W,C) images per entry of ``rows``; matplotlib imported lazily."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (images, names) in enumerate(zip(rows, titles)):
        for col, (img, title) in enumerate(zip(images, names)):
            grey = img.shape[-1] == 1
            axes[r, col].imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, vmin=0, vmax=1)
            axes[r, col].set_title(title, fontsize=9)
            axes[r, col].axis("off")
    fig.tight_layout()
    return fig


# --- shared checks and maths ---------------------------------------------------------------------

def check_epsilon(value: object, name: str = "epsilon") -> float:
    """A positive, finite number (a radius or a step size)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def loss_gradient(model: Classifier, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of the per-image cross-entropy of ``targets`` w.r.t. x (B,C,H,W); returns (grads, losses (B,)).

    Rows are independent (eval mode), so the summed loss gives every row its own gradient.
    Cross-entropy on log-probability outputs is exact too: log_softmax leaves log-probabilities unchanged.
    """
    x = x.detach().requires_grad_(True)
    losses = F.cross_entropy(model(x), targets, reduction="none")
    (grads,) = torch.autograd.grad(losses.sum(), x)
    return grads.detach(), losses.detach()


def _flat_norm(t: Tensor) -> Tensor:
    """Per-image L2 norm, shaped (B,1,1,1) for broadcasting."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def ascent_direction(grads: Tensor, norm: str) -> Tensor:
    """The steepest-ascent unit step for ``norm``: sign(g) for L-inf, g / ||g||_2 for L2."""
    return grads.sign() if norm == "linf" else grads / _flat_norm(grads)


def project(delta: Tensor, epsilon: float, norm: str) -> Tensor:
    """Project perturbations (B,C,H,W) onto the ``norm`` ball of radius ``epsilon``."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    return delta * (epsilon / _flat_norm(delta)).clamp(max=1.0)


def clamp_valid(model: Classifier, x: Tensor) -> Tensor:
    """Clamp model-space inputs to the valid range, per channel. Moving towards a valid x never leaves the ball."""
    low, high = model.input_range
    return torch.max(torch.min(x, high.to(x.dtype)), low.to(x.dtype))


def _prepare(model: Any, x: Any, target: TargetLike, targeted: bool, epsilon: object, norm: str, method: str):
    """Validate and resolve once -> (Classifier, x on its device, clean predictions (N,), attacked classes (N,)).

    Call inside ``frozen(model)`` so the clean predictions are eval-mode ones.
    """
    clf = as_classifier(model, x)
    clf.require_gradients(method)
    c, h, w = clf.input_size
    x = check_images(x, "x", channels=c, size=(h, w)).to(clf.device).detach()
    check_epsilon(epsilon)
    check_choice(norm, "norm", NORMS)
    if targeted and target is None:
        raise ValueError("target is required when targeted=True: the class (or per-image classes) to reach")
    with torch.inference_mode():
        logits = clf(x).detach().clone()
    original = logits.argmax(1)
    targets = original.clone() if target is None else resolve_target(logits, target, clf.labels)
    return clf, x, original, targets


def _attack(clf: Classifier, x: Tensor, targets: Tensor, batch_size: int | None,
            run: Callable[[int, Tensor, Tensor], Tensor], desc: str) -> tuple[Tensor, Tensor]:
    """``run(start, x_chunk, targets_chunk) -> x_adv_chunk`` per engine batch of images -> (x_adv, losses (N,))."""

    def step(start: int, stop: int) -> tuple[Tensor, Tensor]:
        x_adv = run(start, x[start:stop], targets[start:stop]).detach()
        with torch.no_grad():
            losses = F.cross_entropy(clf(x_adv), targets[start:stop], reduction="none")
        return x_adv, losses

    return map_batches(step, x.shape[0], batch_size=batch_size, grad=True, model=clf,
                       item_shape=clf.input_size, desc=desc)


def _result(clf: Classifier, x: Tensor, x_adv: Tensor, losses: Tensor, original: Tensor, targets: Tensor,
            targeted: bool, method: str, params: dict) -> AdversarialResult:
    with torch.inference_mode():
        new_pred = clf(x_adv).argmax(1)
    delta = x_adv - x
    success = new_pred == targets if targeted else new_pred != targets
    return AdversarialResult(
        x=x, x_adv=x_adv, perturbation=delta, original_pred=original, new_pred=new_pred,
        target=targets, success=success, linf=delta.flatten(1).abs().amax(1), l2=delta.flatten(1).norm(dim=1),
        method=method, params=params, extras={"loss": losses}, labels=clf.labels, preprocessing=clf.preprocessing,
    )


# --- the attacks -----------------------------------------------------------------------------------

def fgsm(
    model: Any, x: Tensor, target: TargetLike = None, *,
    epsilon: float, norm: str = "linf", targeted: bool = False, clamp: bool = True,
    batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> AdversarialResult:
    """Fast Gradient Sign Method (Goodfellow et al., 2015): one step of size ``epsilon``.

    L-inf: x + epsilon * sign(grad); L2 (fast gradient method): x + epsilon * grad / ||grad||_2;
    the gradient is of the cross-entropy of ``target``, ascended (untargeted) or descended
    (targeted). clamp: clip to the valid input range (the result stays in the ball).
    seed: accepted for the uniform signature; FGSM draws no random numbers and is deterministic.
    """
    clf = as_classifier(model, x)
    with frozen(clf):
        clf, x, original, targets = _prepare(clf, x, target, targeted, epsilon, norm, "fgsm")
        sign = -1.0 if targeted else 1.0

        def run(_start: int, xb: Tensor, tb: Tensor) -> Tensor:
            grads, _ = loss_gradient(clf, xb, tb)
            x_adv = xb + sign * epsilon * ascent_direction(grads, norm)
            return clamp_valid(clf, x_adv) if clamp else x_adv

        x_adv, losses = _attack(clf, x, targets, batch_size, run, "fgsm")
        params = {"epsilon": float(epsilon), "norm": norm, "targeted": targeted, "clamp": clamp}
        return _result(clf, x, x_adv, losses, original, targets, targeted, "fgsm", params)


def pgd(
    model: Any, x: Tensor, target: TargetLike = None, *,
    epsilon: float, step_size: float, steps: int = 20, norm: str = "linf", targeted: bool = False,
    random_start: bool = True, batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> AdversarialResult:
    """Projected Gradient Descent (Madry et al., 2018): ``steps`` steps of ``step_size`` along
    ``ascent_direction`` (descent when targeted), each followed by projection onto the ``norm``
    ball of radius ``epsilon`` around x and clamping to the valid input range.

    random_start: begin at a uniform point of the L-inf ball (a uniform point of the L2 ball for
    ``norm="l2"``), drawn for all images up front from ``seed`` on CPU, so results depend on neither
    the batch size nor the device. Every image takes all ``steps`` (no early stopping).
    """
    clf = as_classifier(model, x)
    with frozen(clf):
        clf, x, original, targets = _prepare(clf, x, target, targeted, epsilon, norm, "pgd")
        check_epsilon(step_size, "step_size")
        check_positive_int(steps, "steps")
        sign = -1.0 if targeted else 1.0
        starts = _random_starts(x, epsilon, norm, make_generator(seed)) if random_start else torch.zeros_like(x)

        def run(start: int, xb: Tensor, tb: Tensor) -> Tensor:
            x_adv = clamp_valid(clf, xb + starts[start:start + xb.shape[0]])
            for _ in range(steps):  # iterations of one attack, not a batch loop
                grads, _ = loss_gradient(clf, x_adv, tb)
                stepped = x_adv + sign * step_size * ascent_direction(grads, norm)
                x_adv = clamp_valid(clf, xb + project(stepped - xb, epsilon, norm))
            return x_adv

        x_adv, losses = _attack(clf, x, targets, batch_size, run, "pgd")
        params = {"epsilon": float(epsilon), "step_size": float(step_size), "steps": steps, "norm": norm,
                  "targeted": targeted, "random_start": random_start}
        return _result(clf, x, x_adv, losses, original, targets, targeted, "pgd", params)


def _random_starts(x: Tensor, epsilon: float, norm: str, gen: torch.Generator) -> Tensor:
    """Uniform points of the ball, (N,C,H,W), drawn on CPU then moved to x's device."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=gen) * 2 - 1
        return (epsilon * u).to(x.device, x.dtype)
    direction = torch.randn(x.shape, generator=gen)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    # radius ~ epsilon * U^(1/d) is uniform in volume; in high dimension that is ~epsilon
    radius = epsilon * torch.rand(x.shape[0], generator=gen, dtype=torch.float64) ** (1.0 / x[0].numel())
    return (direction * radius.float().view(-1, 1, 1, 1)).to(x.device, x.dtype)
