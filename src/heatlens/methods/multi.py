"""Several methods in one call: ``hl.explain(model, x, ["saliency", "gradcam", ...])``.

The input-gradient methods and the gradient CAMs (``SHARED``) all read one backward of the target
score: saliency and gradient x input its gradient at the input, every gradient CAM the activations
and gradient at one layer. ``one_pass`` runs that forward+backward once for all of them (Captum
runs one pass per method) and gives each method exactly what it gives alone: the same pass in the
same layout, the layer tapped so the backward continues through it to the input (the downstream
model sees a copy of the layer's output, as in a CAM's own pass, so the numbers are identical).
Any other method in the list runs on its own with the target resolved once, by the first method,
so every method explains the same class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..batching import map_batches
from ..explanation import Explanation
from ..models.adapter import as_classifier, target_scores
from ..models.hooks import guard, tap
from ..targets import TargetLike
from ._autograd import fast_layout, gradient_method, prepare, take_recorded
from .gradient import explanation
from .registry import get_method, method_info

INPUT_GRADIENT = ("saliency", "input_x_gradient")
GRADIENT_CAMS = ("gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam")
SHARED = INPUT_GRADIENT + GRADIENT_CAMS
# hyperparameters one_pass understands: those every method of a shared list takes
_INPUT_KWARGS, _CAM_KWARGS = {"output", "batch_size"}, {"output", "batch_size", "layer", "relu"}


def explain_many(model: Any, x: Any, methods: Sequence[str | Callable[..., Explanation]],
                 target: TargetLike = "predicted", **hyper: Any) -> dict[str, Explanation]:
    """name -> Explanation for every method, in the order given (``heatlens.explain`` with a list).

    Names in ``SHARED`` (two or more) share one forward+backward (``one_pass``) when ``hyper`` holds
    only what they all take; the others run alone with the target resolved once.
    """
    keys = [m if isinstance(m, str) else getattr(m, "__name__", str(m)) for m in methods]
    group = [m for m in dict.fromkeys(keys) if m in SHARED]
    done: dict[str, Explanation] = {}
    if len(group) >= 2 and set(hyper) <= _allowed(group):
        done = one_pass(model, x, group, target, **hyper)
    out: dict[str, Explanation] = {}
    for key, method in zip(keys, methods):
        if key not in done:
            shared = next(iter(done.values()), None)
            done[key] = get_method(method)(model, x, target if shared is None else shared.targets, **hyper)
        out[key] = done[key]
    return out


def _allowed(group: Sequence[str]) -> set[str]:
    return set(_INPUT_KWARGS if any(m in INPUT_GRADIENT for m in group) else _CAM_KWARGS)


class _SharedPass:
    """The model's forward with the CAM layer recorded inside the graph (``prepare(through=)``): the
    rest of the model gets a copy of the layer's output, as in the CAM's own pass, and the input
    gradient flows through it."""

    input_grad = True

    def __init__(self, model: Any, site: Any) -> None:
        self.model, self.site, self.outputs = model, site, []

    def __call__(self, x: Tensor) -> Tensor:
        if self.site is None:
            return self.model(x)
        with tap(self.site.module, root=self.model, edit=lambda _i, out: out.clone()) as seen:
            logits = self.model(x)
        self.outputs = seen.outputs
        return logits


def one_pass(model: Any, x: Any, methods: Sequence[str], target: TargetLike = "predicted", *,
             output: str = "logit", layer: Any = None, relu: bool = True,
             batch_size: int | None = None) -> dict[str, Explanation]:
    """Every method of ``methods`` (a subset of ``SHARED``) from one forward+backward per engine batch.

    Returns name -> Explanation, each equal to ``method(model, x, target, ...)`` alone: attributions
    (N,C,H,W) for the input-gradient methods, (N,1,h,w) at ``layer`` for the CAMs.
    """
    unknown = [m for m in methods if m not in SHARED]
    if unknown:
        raise ValueError(f"one_pass runs {', '.join(SHARED)}; got {unknown}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be True or False, got {relu!r}")
    clf = as_classifier(model, x)
    clf.require_gradients(methods[0])
    with guard(clf), gradient_method(True):  # the model lock, eval mode, frozen parameters
        return _one_pass(clf, x, list(methods), target, output, layer, relu, batch_size)


def _one_pass(clf: Any, x: Any, methods: list[str], target: TargetLike, output: str, layer: Any, relu: bool,
              batch_size: int | None) -> dict[str, Explanation]:
    from .cam import CamContext, _picked, known_site, layout_of, resolve_site

    cams = [m for m in methods if m in GRADIENT_CAMS]
    site = known_site(clf, layer) if cams else None
    if cams and site is None:  # the automatic layer takes one traced pass, once per model (as gradcam alone)
        site = resolve_site(prepare(clf, x, target, output=output, record=False), layer)
    runner = _SharedPass(clf, site)
    p = prepare(clf, x, target, output=output, through=runner)
    combine = {m: method_info(m).fn.combine for m in cams}
    ctx = CamContext(p, site, output, batch_size) if cams else None

    def step(start: int, stop: int) -> tuple[Tensor, ...]:
        recorded = take_recorded(runner, p.x[start:stop])
        if recorded is None:
            leaf = fast_layout(clf, p.x[start:stop].detach()).detach().requires_grad_(True)
            logits = runner(leaf)
        else:
            leaf, logits = recorded
        scores = target_scores(logits, p.targets[start:stop], output)
        acts = [_picked(runner.outputs, site)] if cams else []
        grads = torch.autograd.grad(scores.sum(), [leaf, *acts], allow_unused=True)
        out = [grads[0].detach().contiguous()]
        if cams:
            a = acts[0].detach()
            lay = ctx.layout = layout_of(a, clf, site.name)
            g = torch.zeros_like(a) if grads[1] is None else grads[1].detach()
            out += [combine[m](lay.to_map(a), lay.to_map(g), ctx) for m in cams]
        return tuple(out)

    parts = map_batches(step, p.x.shape[0], batch_size=batch_size, grad=True, model=clf,
                        item_shape=clf.input_size, desc="shared pass")
    results: dict[str, Explanation] = {}
    for m in methods:
        if m == "saliency":
            results[m] = explanation(p, parts[0], m, {"output": output})
        elif m == "input_x_gradient":
            results[m] = explanation(p, p.x * parts[0], m, {"output": output})
        else:
            cam = parts[1 + cams.index(m)]
            cam = cam.clamp_min(0) if relu else cam
            params = {"layer": site.name, "relu": relu, "output": output}
            if site.call is not None:
                params["layer_call"] = site.call
            results[m] = explanation(p, cam.to(p.x.dtype), m, params, {})
    return results
