"""The only code in heatlens that calls backward, and the shared entry of every method (``prepare``).

``prepare`` validates x and resolves the target ONCE at the clean input; inner code sees canonical
forms only. ``input_gradients`` differentiates the explained score for one batch (``score_gradients``
w.r.t. tensors inside the model, such as a layer's activations);
``gradients_over`` streams many lazily built inputs through the batching engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..batching import map_batches
from ..models.adapter import Classifier, as_classifier
from ..targets import TargetLike, resolve_target
from ..validation import check_choice, check_images

OUTPUTS = ("logit", "probability")


@dataclass(frozen=True)
class Prepared:
    """Canonical inputs of one explanation call.

    x: (N,C,H,W) on the model's device. targets: LongTensor (N,). logits: (N,K) at the clean x.
    """

    model: Classifier
    x: Tensor
    targets: Tensor
    logits: Tensor

    def scores(self, output: str = "logit") -> Tensor:
        """The explained score at the clean x (N,), from the logits already computed."""
        values = self.logits.softmax(1) if output == "probability" else self.logits
        return values.gather(1, self.targets.view(-1, 1)).squeeze(1).float()


def prepare(model: Any, x: Any, target: TargetLike, *, output: str = "logit") -> Prepared:
    """Validate ``x`` against the model, run it once, resolve ``target`` from the clean logits."""
    model = as_classifier(model, x)
    c, h, w = model.input_size
    x = check_images(x, "x", channels=c, size=(h, w)).to(model.device).detach()
    check_choice(output, "output", OUTPUTS)
    with torch.inference_mode():
        logits = model(x).detach().clone()
    targets = resolve_target(logits, target, model.labels)
    return Prepared(model=model, x=x, targets=targets, logits=logits)


def input_gradients(model: Classifier, x: Tensor, targets: Tensor, output: str = "logit") -> tuple[Tensor, Tensor]:
    """d score / d x for one batch. x: (B,C,H,W), targets: (B,). Returns (gradients (B,C,H,W), scores (B,)).

    Rows are independent (eval mode, no batch statistics), so summing the scores before backward
    gives every row its own gradient in one pass.
    """
    x = x.detach().requires_grad_(True)
    scores = model.score(x, targets, output)
    (grads,) = torch.autograd.grad(scores.sum(), x)
    return grads.detach(), scores.detach()


def score_gradients(
    model: Classifier, x: Tensor, targets: Tensor, tensors_of: Callable[[], Sequence[Tensor]], output: str = "logit",
) -> tuple[list[Tensor | None], Tensor]:
    """d score / d t for tensors ``t`` made during the forward of x (a layer's activations recorded by
    ``hooks.tap``). x: (B,C,H,W), targets: (B,). ``tensors_of()`` is called after the forward.

    Returns (one gradient per tensor, None where the score does not depend on it; scores (B,)).
    Rows are independent, so the summed score gives every row its own gradient in one pass.
    """
    scores = model.score(x, targets, output)
    wrt = list(tensors_of())
    grads = torch.autograd.grad(scores.sum(), wrt, allow_unused=True) if wrt else ()
    return [None if g is None else g.detach() for g in grads], scores.detach()


def gradients_over(
    model: Classifier,
    n_items: int,
    build: Callable[[int, int], tuple[Tensor, Tensor]],
    consume: Callable[[int, int, Tensor, Tensor, Tensor], None],
    *,
    output: str = "logit",
    batch_size: int | None = None,
    desc: str | None = None,
) -> None:
    """Gradients at ``n_items`` lazily built inputs, one engine batch at a time.

    build(start, stop) -> (inputs (B,C,H,W), targets (B,)); consume(start, stop, inputs, grads, scores)
    folds each batch into the caller's running result, so memory stays one batch.
    """

    def step(start: int, stop: int) -> None:
        inputs, targets = build(start, stop)
        grads, scores = input_gradients(model, inputs, targets, output)
        consume(start, stop, inputs.detach(), grads, scores)

    map_batches(step, n_items, batch_size=batch_size, grad=True, model=model,
                item_shape=model.input_size, consume=lambda *_: None, desc=desc)


def scores_over(
    model: Classifier,
    n_items: int,
    build: Callable[[int, int], tuple[Tensor, Tensor]],
    *,
    output: str = "logit",
    batch_size: int | None = None,
    desc: str | None = None,
) -> Tensor:
    """Scores (n_items,) at lazily built inputs, no gradients (``inference_mode``), one batch in memory."""

    def step(start: int, stop: int) -> Tensor:
        inputs, targets = build(start, stop)
        return model.score(inputs, targets, output).float()

    return map_batches(step, n_items, batch_size=batch_size, grad=False, model=model,
                       item_shape=model.input_size, desc=desc)


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from a seed (None: fresh entropy). Sampling on CPU keeps results identical across devices."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
