"""``compare``: which method should I trust for my model? Several methods x several metrics, one table.

Each method explains the batch once; each metric scores every explanation; a Random map (Gaussian
noise, the CSEP 590B homework's baseline) is included so "better than chance" can be read off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..explanation import Explanation, MetricResult
from ..methods._autograd import make_generator, prepare
from ..methods.gradient import explanation as package
from ..methods.multi import SHARED, one_pass
from ..methods.registry import get_method, method_info
from ..models.adapter import guarded
from . import evaluate


def random_explanation(model: Any, x: Tensor, target: Any = "predicted", *, seed: int | None = 0) -> Explanation:
    """A Random explanation: one N(0,1) value per pixel, attributions (N,1,H,W) (the homework's baseline)."""
    p = prepare(model, x, target)
    n, _, h, w = p.x.shape
    noise = torch.randn((n, 1, h, w), generator=make_generator(seed)).to(p.x.device, p.x.dtype)
    return package(p, noise, "random", {"seed": seed}, map_kind="location")  # a signed score per pixel


@dataclass(frozen=True)
class Comparison:
    """Methods x metrics: ``rows`` is a tidy list of dicts {method, metric, mean, sem, n, higher_is_better};
    ``results[(method, metric)]`` the MetricResults, ``explanations[method]`` the Explanations."""

    rows: list[dict[str, Any]]
    results: dict[tuple[str, str], MetricResult] = field(repr=False)
    explanations: dict[str, Explanation] = field(repr=False)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(r["metric"] for r in self.rows))

    def to_dicts(self) -> list[dict[str, Any]]:
        """The plain list-of-dicts form (one row per method and metric)."""
        return [dict(r) for r in self.rows]

    def best(self, metric: str) -> str:
        """The method with the best mean on ``metric`` (its ``higher_is_better`` decides)."""
        rows = [r for r in self.rows if r["metric"] == metric and not math.isnan(r["mean"])]
        if not rows:
            raise ValueError(f"metric {metric!r} is not in this comparison: {', '.join(self.metrics)}")
        pick = max if rows[0]["higher_is_better"] else min
        return pick(rows, key=lambda r: r["mean"])["method"]

    def _grid(self) -> tuple[list[str], list[list[str]]]:
        header = ["method"] + [f"{m} {'↑' if self._hib(m) else '↓'}" for m in self.metrics]
        cells = {(r["method"], r["metric"]): f"{r['mean']:.4g} ± {r['sem']:.2g}" for r in self.rows}
        body = [[meth] + [cells.get((meth, met), "") for met in self.metrics] for meth in self.methods]
        return header, body

    def _hib(self, metric: str) -> bool:
        return next(r["higher_is_better"] for r in self.rows if r["metric"] == metric)

    def to_wide(self) -> list[dict[str, str]]:
        """One dict per method: {"method": name, "<metric> ↑|↓": "mean ± sem"}, as the text table shows."""
        header, body = self._grid()
        return [dict(zip(header, row)) for row in body]

    def to_text(self) -> str:
        """Aligned plain-text table: one row per method, ``mean ± standard error`` per metric."""
        header, body = self._grid()
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])

    def to_markdown(self) -> str:
        """The same table as GitHub markdown."""
        header, body = self._grid()
        rows = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(r) + " |" for r in rows)

    def __str__(self) -> str:
        return self.to_text()


@guarded  # one guarded scope for all its explanations and scores (models.adapter.guarded)
def compare(
    model: Any,
    x: Tensor,
    methods: Sequence[str | Callable[..., Explanation] | Explanation] | Mapping[str, Explanation | str | Callable],
    metrics: Sequence[str | Callable[..., MetricResult]] = ("insertion", "deletion"),
    *,
    target: Any = "predicted",
    include_random: bool = True,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    seed: int | None = 0,
    batch_size: int | None = None,
    **metric_options: Any,
) -> Comparison:
    """Explain x with every method, score every explanation with every metric -> ``Comparison``.

    methods: names or functions (run here), ``Explanation`` objects already computed for ``x`` (scored
    as they are, named by their ``method``), or a dict name -> either of those.
    method_kwargs: per-method hyperparameters by name, e.g. ``{"smoothgrad": {"n_samples": 20}}``.
    metric_options: passed to ``heatlens.evaluate`` (settings by name, or per metric as
    ``insertion={"fill": "blur"}``). include_random: add the Random-map baseline as method "random".
    """
    if isinstance(methods, (str, Explanation)) or callable(methods):
        methods = [methods]
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    method_kwargs = method_kwargs or {}
    items = list(methods.items()) if isinstance(methods, Mapping) else [(None, m) for m in methods]
    explanations: dict[str, Explanation] = {}
    # saliency, gradient x input and the gradient CAMs share one forward+backward (methods.multi)
    group = [m for g, m in items if g is None and isinstance(m, str) and m in SHARED and not method_kwargs.get(m)]
    shared = one_pass(model, x, group, target, batch_size=batch_size) if len(set(group)) >= 2 else {}
    for given_name, method in items:
        if isinstance(method, Explanation):
            name = given_name or method.method
            if len(method) != x.shape[0]:
                raise ValueError(f"methods: the explanation {name!r} holds {len(method)} images, x has {x.shape[0]}")
            explanations[name] = method
            continue
        info = method_info(method)
        name = given_name or (info.name if info is not None else getattr(method, "__name__", str(method)))
        if given_name is None and name in shared:
            explanations[name] = shared[name]
            continue
        kwargs = dict(method_kwargs.get(name, {}))
        if info is not None and info.stochastic:
            kwargs.setdefault("seed", seed)
        explanations[name] = get_method(method)(model, x, target, batch_size=batch_size, **kwargs)
    if include_random:
        given = [m for _, m in items if isinstance(m, Explanation)]
        # the baseline scores the class the given explanations explain (e.g. a --target class name)
        random_target = given[0].targets if given and isinstance(target, str) and target == "predicted" else target
        explanations["random"] = random_explanation(model, x, random_target, seed=seed)
    rows, results = [], {}
    for name, e in explanations.items():
        scored = evaluate(model, x, e, list(metrics), batch_size=batch_size, **metric_options)
        for metric, r in scored.items():
            results[(name, metric)] = r
            rows.append({"method": name, "metric": metric, "mean": r.mean(), "sem": r.sem(),
                         "n": int(r.values.numel()), "higher_is_better": r.higher_is_better})
    return Comparison(rows=rows, results=results, explanations=explanations)
