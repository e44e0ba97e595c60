"""Evaluation metrics: how far can an explanation be trusted? Every metric has the same shape::

    metric(model, x, explanation, target=None, *, <settings>, batch_size=None) -> MetricResult

Shared arguments (documented here once):

model, x
    As for methods (``heatlens.methods``): a Classifier or bare ``nn.Module``, and (N,C,H,W) input.
explanation
    An ``Explanation`` or a raw tensor: (N,H,W) maps, (N,1,h,w) coarse maps (upsampled bilinearly)
    or (N,C,H,W) attributions.
target
    Defaults to ``explanation.targets`` (the class that was explained); ``"predicted"`` for raw tensors.
reduce
    How attributions become (N,H,W) maps. ``None`` (default): the one rule of ``Explanation.maps``:
    per-location maps (CAMs, occlusion, feature ablation, LIME, KernelSHAP, RISE; a raw (N,H,W)
    tensor) stay signed; gradient-like attributions (gradients, paths, propagation; a raw (N,C,H,W)
    tensor, also with C = 1) use ``"sum_abs"`` over channels (CSEP 590B homework, Quantus).
batch_size
    Perturbed inputs per model call; None lets ``heatlens.batching`` choose. Perturbed copies are built
    lazily per batch, so memory is one batch whatever the number of curve steps.

Every metric returns a ``MetricResult`` (values (N,), curves (N,S) and x (S,) where it traces one,
``higher_is_better``). ``evaluate`` runs several by name; ``METRICS`` is the registry with metadata
``category`` (faithfulness, robustness, complexity, localisation, axiom), ``higher_is_better`` and
``needs_mask``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..explanation import Explanation, MetricResult, attribution_maps
from ..methods.registry import Entry, Registry
from ..models.adapter import Classifier, as_classifier, guarded
from ..targets import resolve_target
from ..validation import check_choice, check_finite, check_images, check_outputs

METRICS: Registry = Registry("metric")
CATEGORIES = ("faithfulness", "robustness", "complexity", "localisation", "axiom")


def register_metric(
    name: str,
    *,
    category: str,
    higher_is_better: bool,
    needs_mask: bool = False,
    description: str | None = None,
) -> Callable[[Callable[..., MetricResult]], Callable[..., MetricResult]]:
    """Register a metric ``fn(model, x, explanation, target=None, **settings) -> MetricResult``.

    category: one of ``CATEGORIES``. needs_mask: the metric takes a ground-truth ``mask`` (N,H,W) bool.
    The registered function runs guarded as methods do (``models.adapter.guarded``): the model a
    Classifier, its lock held, eval mode and frozen parameters, all restored afterwards.
    """
    check_choice(category, "category", CATEGORIES)

    def decorate(fn: Callable[..., MetricResult]) -> Callable[..., MetricResult]:
        metric = guarded(fn)
        metric.info = METRICS.add(  # type: ignore[attr-defined]
            name, metric, category=category, higher_is_better=higher_is_better, needs_mask=needs_mask,
            **({"description": description} if description else {}),
        )
        return metric

    return decorate


def names(**where: Any) -> list[str]:
    """Registered metric names, optionally filtered by metadata (``names(category="robustness")``)."""
    return METRICS.names(**where)


def get_metric(metric: str | Callable[..., MetricResult]) -> Callable[..., MetricResult]:
    """A metric by registry name, or a callable passed through."""
    if callable(metric):
        return metric
    return METRICS.get(metric).fn


def metric_info(metric: str | Callable[..., MetricResult]) -> Entry | None:
    if isinstance(metric, str):
        return METRICS.get(metric)
    return getattr(metric, "info", None)


@guarded
def evaluate(
    model: Any,
    x: Tensor,
    explanation: Explanation | Tensor,
    metrics: str | Sequence[str | Callable[..., MetricResult]] = ("insertion", "deletion"),
    **options: Any,
) -> dict[str, MetricResult]:
    """Score ``explanation`` with several metrics -> dict name -> MetricResult.

    options: settings passed to every metric that accepts them (by name), e.g. ``batch_size``,
    ``mask`` for the localisation metrics, ``granularity``; per-metric settings as
    ``{"insertion": {"fill": "blur"}}`` under the metric's name.
    """
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    per_metric = {k: options.pop(k) for k in list(options) if isinstance(options[k], dict) and k in METRICS}
    results: dict[str, MetricResult] = {}
    if "insertion" in metrics and "deletion" in metrics:  # one ranking, one run, shared end points
        pair = [{**_accepted(get_metric(m), options), **per_metric.get(m, {})} for m in ("insertion", "deletion")]
        if pair[0] == pair[1]:
            from .faithfulness import insertion_deletion

            results.update(insertion_deletion(model, x, explanation, **pair[0]))
    for metric in metrics:
        if isinstance(metric, str) and metric in results:
            continue
        fn = get_metric(metric)
        info = metric_info(metric)
        key = info.name if info is not None else getattr(fn, "__name__", str(metric))
        if info is not None and info.needs_mask and options.get("mask") is None:
            raise ValueError(f"metric {key!r} needs a ground-truth mask: pass mask=(N,H,W) bool tensor")
        kwargs = {**_accepted(fn, options), **per_metric.get(key, {})}
        results[key] = fn(model, x, explanation, **kwargs)
    return _in_order(results, metrics)


def _in_order(results: dict[str, MetricResult], metrics: Sequence[Any]) -> dict[str, MetricResult]:
    """results in the order the metrics were asked for (a shared pair is computed first)."""
    names = [m for m in metrics if isinstance(m, str)]
    return {**{k: results[k] for k in names if k in results}, **{k: v for k, v in results.items() if k not in names}}


def _accepted(fn: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The options ``fn`` takes by name (a metric with **kwargs forwards them to a method: none go there)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params and params[k].kind is not inspect.Parameter.VAR_KEYWORD}


# --- shared canonical inputs ----------------------------------------------------------------------
@dataclass(frozen=True)
class Scored:
    """Canonical inputs of one metric call: model, x (N,C,H,W) on its device, targets (N,),
    maps (N,H,W) float at input resolution, attributions (N,C',H',W') raw (C' is C or 1)."""

    model: Classifier
    x: Tensor
    targets: Tensor
    maps: Tensor
    attributions: Tensor


def as_maps(explanation: Explanation | Tensor, size: tuple[int, int], reduce: str | None = None) -> Tensor:
    """(N,H,W) float maps at ``size`` by the one map rule (``Explanation.maps``).

    An Explanation is turned into maps by its recorded ``kind`` (per-location maps signed, gradient
    attributions ``sum_abs``). A raw tensor carries no kind, so its shape says what it is: (N,H,W) is
    a map and is used as is (signed); (N,C,H,W), C >= 1, is gradient-like attributions (``sum_abs``).
    Pass a signed per-location map as (N,H,W), or an Explanation with ``map_kind="location"``.
    ``reduce`` overrides the rule."""
    if isinstance(explanation, Explanation):
        a, kind = explanation.attributions, explanation.kind
    elif isinstance(explanation, Tensor):
        a, kind = explanation, "gradient"
    else:
        raise TypeError(f"explanation must be an Explanation or a Tensor, got {type(explanation).__name__}")
    a = a.detach().float()
    if a.dim() == 3:
        a, kind = a[:, None], "location"
    if a.dim() != 4:
        raise ValueError(f"explanation must have shape (N,H,W) or (N,C,H,W), got {tuple(a.shape)}")
    check_finite(a, "explanation")
    return attribution_maps(a, kind, reduce, size)


def canonical(
    model: Any, x: Any, explanation: Explanation | Tensor, target: Any = None, *, reduce: str | None = None,
) -> Scored:
    """Validate and resolve once: the class scored is the one explained unless ``target`` says otherwise."""
    model = as_classifier(model, x)
    c, h, w = model.input_size
    x = check_images(x, "x", channels=c, size=(h, w)).to(model.device).detach()
    maps = as_maps(explanation, (h, w), reduce).to(x.device)
    if maps.shape[0] != x.shape[0]:
        raise ValueError(f"explanation has {maps.shape[0]} maps but x has {x.shape[0]} images")
    with torch.inference_mode():
        logits = check_outputs(model(x))
    if target is None and isinstance(explanation, Explanation):
        targets = explanation.targets.to(x.device)
    else:
        targets = resolve_target(logits, target if target is not None else "predicted", model.labels)
    raw = explanation.attributions if isinstance(explanation, Explanation) else explanation
    raw = raw.detach().float().to(x.device)
    if raw.dim() == 3:
        raw = raw[:, None]
    return Scored(model=model, x=x, targets=targets, maps=maps, attributions=raw)


def result(name: str, values: Tensor, *, curves: Tensor | None = None, xs: Tensor | None = None,
           params: dict[str, Any] | None = None, extras: dict[str, Any] | None = None,
           higher_is_better: bool | None = None) -> MetricResult:
    """Package values (N,) with the registry's ``higher_is_better`` unless the call overrides it."""
    hib = METRICS.get(name).higher_is_better if higher_is_better is None else higher_is_better
    return MetricResult(
        name=name, values=values.detach().double().cpu(), higher_is_better=hib,
        curves=None if curves is None else curves.detach().double().cpu(),
        x=None if xs is None else xs.detach().double().cpu(), params=params or {}, extras=extras or {},
    )


def describe(value: Any) -> Any:
    """A printable form of a setting (tensors by shape, callables by name)."""
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    if callable(value) and not isinstance(value, type):
        return getattr(value, "__name__", repr(value))
    return value


def item_noise(seed: int | torch.Generator | None, n_items: int) -> Tensor:
    """One seed per item (n_items,) from ``seed``: each item's noise is drawn from its own generator,
    so results do not depend on the batch size the engine picks."""
    from ..methods._autograd import make_generator

    return torch.randint(0, 2**62, (n_items,), generator=make_generator(seed))


def draw(seeds: Tensor, shape: tuple[int, ...], kind: str = "normal") -> Tensor:
    """(B, *shape) float32 CPU noise, row b from generator ``seeds[b]``: N(0,1) or U(-1,1)."""
    rows = []
    for s in seeds.tolist():
        gen = torch.Generator().manual_seed(int(s))
        rows.append(torch.randn(shape, generator=gen) if kind == "normal" else 2 * torch.rand(shape, generator=gen) - 1)
    return torch.stack(rows)


def sample_range(x: Tensor) -> Tensor:
    """max - min of each image (N,): noise is a fraction of it (PAIR, zennit)."""
    flat = x.flatten(1)
    return flat.amax(1) - flat.amin(1)


from .complexity import complexity, sparseness  # noqa: E402
from .faithfulness import (  # noqa: E402
    completeness, deletion, faithfulness_correlation, infidelity, insertion, irof, pixel_flipping, road,
)
from .localization import (  # noqa: E402
    attribution_iou, pointing_game, relevance_mass, relevance_rank, top_k_intersection,
)
from .robustness import avg_sensitivity, local_lipschitz, max_sensitivity  # noqa: E402
from ._curves import perturbation_curve  # noqa: E402
from .compare import Comparison, compare, random_explanation  # noqa: E402

__all__ = [
    "METRICS", "CATEGORIES", "register_metric", "names", "get_metric", "evaluate", "as_maps", "perturbation_curve",
    "insertion", "deletion", "pixel_flipping", "irof", "faithfulness_correlation", "infidelity", "road",
    "completeness", "max_sensitivity", "avg_sensitivity", "local_lipschitz", "sparseness", "complexity",
    "pointing_game", "relevance_mass", "relevance_rank", "attribution_iou", "top_k_intersection",
    "compare", "Comparison", "random_explanation",
]
