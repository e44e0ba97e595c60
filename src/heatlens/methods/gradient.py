"""Gradient family: vanilla gradient (saliency) and gradient x input.

Both are one backward pass per image, batched by the engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..explanation import Explanation
from ..models.adapter import Classifier
from ..targets import TargetLike
from ._autograd import Prepared, gradients_over, prepare
from .registry import register


def _gradients(p: Prepared, output: str, batch_size: int | None) -> Tensor:
    """d score / d x at the clean inputs, (N,C,H,W)."""
    grads = torch.empty_like(p.x)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        return p.x[start:stop], p.targets[start:stop]

    def consume(start: int, stop: int, _inputs: Tensor, g: Tensor, _scores: Tensor) -> None:
        grads[start:stop] = g

    gradients_over(p.model, p.x.shape[0], build, consume, output=output, batch_size=batch_size)
    return grads


def explanation(p: Prepared, attributions: Tensor, method: str, params: dict, extras: dict | None = None,
                map_kind: str | None = None) -> Explanation:
    """Package a method's result with the prepared call's targets, clean logits and input.
    map_kind: "location" | "gradient", or None to let the registry entry record it."""
    return Explanation(
        attributions=attributions.detach(),
        targets=p.targets,
        outputs=p.logits,
        method=method,
        params=params,
        extras=extras or {},
        input_size=tuple(p.x.shape[-2:]),
        labels=p.model.labels,
        inputs=p.x,
        map_kind=map_kind,
    )


@register("saliency", family="gradient", needs_grad=True,
          description="Vanilla gradient of the target score w.r.t. the input (Simonyan et al., 2014)")
def saliency(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    output: str = "logit", batch_size: int | None = None,
) -> Explanation:
    """Vanilla gradient (Simonyan et al., 2014): attributions (N,C,H,W) = d score / d x, signed.

    Take ``.maps("max_abs")`` for the paper's map or ``.maps("sum_abs")`` for the CSEP 590B one.
    """
    p = prepare(model, x, target, output=output)
    return explanation(p, _gradients(p, output, batch_size), "saliency", {"output": output})


@register("input_x_gradient", family="gradient", needs_grad=True,
          description="Gradient times input, a first-order Taylor attribution (Shrikumar et al., 2016)")
def input_x_gradient(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    output: str = "logit", batch_size: int | None = None,
) -> Explanation:
    """Gradient x input (Shrikumar et al., 2016): attributions (N,C,H,W) = x * d score / d x."""
    p = prepare(model, x, target, output=output)
    return explanation(p, p.x * _gradients(p, output, batch_size), "input_x_gradient", {"output": output})
