"""``recommend``: which attribution method to trust for *this* model, as a ranked verdict.

Raw score tables leave the ranking to the reader, and rankings flip between settings (Meta-Rank,
arXiv 2407.19471). ``recommend`` gathers, per method, the evidence heatlens already measures and
turns it into one ranked table with a plain-language verdict and a statement of how stable it is:

* faithfulness against a Random map: insertion, deletion and insertion − deletion per image, for
  two fills of the perturbation metrics, with standard errors over the images and the paired
  advantage over the Random map (``heatlens.metrics.random_explanation``);
* sanity checks on a few images: model randomisation (Adebayo et al., 2018) as a cascade over the
  top ``randomization_steps`` parameterised blocks (default 1: the output layer, the step at which
  guided backprop's map stays identical while saliency's and Grad-CAM's change), random logit (Sixt et al., 2020), input invariance (Kindermans
  et al., 2019) where the model's first layer can absorb the shift;
* robustness: max-sensitivity (Yeh et al., 2019) on the same few images;
* cost: seconds per image of the explanation, measured in the run.

Stability: Kendall's τ between the order on all images and on bootstrap resamples of the images,
τ between the orders under the two fills, and how often the recommended method stays first.

Cost with the defaults: every method explains the N images once and the ``check_images`` images
about 10 more times (the checks and the robustness metric); the curves cost (N maps + 2 random) x N x
2 fills x 2 metrics x (steps + 1) forward passes. ``recommend`` logs an estimate of the rest after
the first explanations (printed when progress is on). Measured: README "Which method to trust".
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .explanation import Explanation, MetricResult, SanityResult
from .methods._autograd import prepare
from .methods.registry import get_method, method_info
from .validation import check_positive_int

logger = logging.getLogger("heatlens.recommend")

DEFAULT_METHODS = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop",
                   "gradcam", "occlusion", "lime")
# cheaper settings than each method's own defaults, so the whole run stays within minutes on a CPU;
# any entry is overridden by the caller's method_kwargs
DEFAULT_METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"n_samples": 16},
    "integrated_gradients": {"steps": 32},
    "occlusion": {"superpixel_size": 16},
    "lime": {"num_samples": "auto"},
}
DEFAULT_METRICS = ("insertion", "deletion", "max_sensitivity")
DEFAULT_CHECKS = ("model_randomization", "random_logit", "input_invariance")
TIERS = ("recommended", "use with care", "not recommended")
RANDOM = "random"

FAILURES = {
    "model_randomization": "fails model randomisation: shows edges, not the model",
    "random_logit": "fails random logit: the map ignores the class explained",
    "input_invariance": "fails input invariance: follows a constant input shift the model ignores",
    "fragility": "fragile: small noise that keeps the prediction moves the top pixels",
}
# which faults make a method unusable (the map does not explain this model) rather than a caveat
DISQUALIFYING = ("model_randomization", "ins_minus_del")


# --- the result ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recommendation:
    """A ranked verdict: ``rows`` one dict per method in rank order, then the Random-map reference.

    ``scores[method]`` (N,) per-image ranking score (insertion − deletion averaged over the fills);
    ``results[(method, metric, fill)]`` the MetricResults (fill None for robustness metrics);
    ``checks[(method, check)]`` the SanityResults; ``stability`` Kendall τ's and rank intervals;
    ``bootstrap_ranks[method]`` (B,) the method's rank in every resample.
    """

    rows: list[dict[str, Any]]
    stability: dict[str, Any]
    scores: dict[str, Tensor] = field(repr=False)
    results: dict[tuple[str, str, str | None], MetricResult] = field(repr=False)
    checks: dict[tuple[str, str], SanityResult] = field(repr=False)
    explanations: dict[str, Explanation] = field(repr=False)
    bootstrap_ranks: dict[str, Tensor] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def methods(self) -> list[str]:
        """Ranked methods, best first (the Random reference excluded)."""
        return [r["method"] for r in self.rows if r["rank"] is not None]

    @property
    def verdicts(self) -> dict[str, str]:
        """method -> plain-language verdict, in rank order (the Random reference last)."""
        return {r["method"]: r["verdict"] for r in self.rows}

    @property
    def best(self) -> str | None:
        """The top-ranked method that is not "not recommended" (None when every method failed)."""
        return next((r["method"] for r in self.rows if r["tier"] in TIERS[:2]), None)

    @property
    def table(self):
        """The rows as a pandas DataFrame indexed by method (rank 1 first)."""
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("method")

    def summary(self) -> str:
        """Best method and the stability statement, one line each."""
        best = self.best
        head = (f"recommended: {best} ({self.verdicts[best]})" if best is not None
                else "no method passed: every map failed a check that disqualifies it")
        return f"{head}\nstability: {self.stability['statement']}"

    def to_text(self) -> str:
        """Aligned plain-text table (rank, method, verdict, evidence) with the summary underneath."""
        header, body = _grid(self)
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body), "", self.summary(),
                          f"({self.seconds:.0f} s in all)"])

    def to_markdown(self) -> str:
        """The table as GitHub markdown, with the summary as a last paragraph."""
        header, body = _grid(self)
        rows = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows) + \
            "\n\n" + self.summary().replace("\n", "  \n")

    def plot(self, **kwargs: Any):
        """Rank chart: insertion − deletion ± SE per method and its bootstrap rank interval -> Figure."""
        return plot_recommendation(self, **kwargs)

    def section(self, title: str = "Which method to trust"):
        """This recommendation as a report ``Section`` (``heatlens.report.write_report``)."""
        return recommendation_section(self, title)

    def _repr_html_(self) -> str:
        return recommendation_html(self)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return f"Recommendation(best={self.best!r}, methods={self.methods}, {self.stability['label']})"


# --- the function ----------------------------------------------------------------------------------
def recommend(
    model: Any,
    x: Tensor,
    methods: Sequence[str | Callable[..., Explanation]] = DEFAULT_METHODS,
    metrics: Sequence[str] = DEFAULT_METRICS,
    checks: Sequence[str] = DEFAULT_CHECKS,
    *,
    target: Any = "predicted",
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    fills: Sequence[Any] = ("blur", "black"),
    granularity: int = 8,
    steps: int = 25,
    check_images: int = 4,
    randomization_steps: int = 1,
    sensitivity_samples: int = 3,
    n_random: int = 2,
    n_bootstrap: int = 1000,
    z: float = 2.0,
    seed: int = 0,
    batch_size: int | None = None,
    verbose: bool | None = None,
    **metric_options: Any,
) -> Recommendation:
    """Rank attribution methods for ``model`` on images ``x`` (N,C,H,W) -> ``Recommendation``.

    methods: registry names or method functions (default: the gradient family, guided backprop,
    Grad-CAM, occlusion 16x16 and LIME). metrics: faithfulness metrics scored on all N images for each
    fill (insertion − deletion is the ranking score when both are given, else the first one) and
    robustness metrics (``max_sensitivity``) on the check images. checks: sanity checks run on
    ``check_images`` images spread over x (``model_randomization`` cascades over the top
    ``randomization_steps`` parameterised blocks). method_kwargs: per-method hyperparameters by name,
    on top of ``DEFAULT_METHOD_KWARGS``. fills: the perturbation metrics' fills (two give the fill
    agreement). granularity / steps: superpixel size and curve intervals of the curves. n_random:
    Random maps averaged for the reference. z: a method beats the Random map on a metric when its
    paired mean advantage exceeds z standard errors over the images. n_bootstrap: image resamples.
    metric_options: further settings for ``heatlens.evaluate`` (e.g. ``output="logit"``).

    Cost: about (1 + check_images / N x (5 + randomization_steps + sensitivity_samples)) explanations
    of x per method plus (methods + n_random) x N x 4 x (steps + 1) forward passes; an estimate is
    logged after the first explanations. On efficientnet-lite0, the default methods and 8 photos it
    takes a few minutes on 2 CPU cores (README).
    """
    start = time.perf_counter()
    methods = [methods] if isinstance(methods, str) or callable(methods) else list(methods)
    if not methods:
        raise ValueError("methods must name at least one explanation method")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    checks = [checks] if isinstance(checks, str) else list(checks)
    faithful, robust = _split_metrics(metrics)
    check_fns = _check_functions(checks)
    fills = _check_fills(fills)
    for value, name in ((granularity, "granularity"), (steps, "steps"), (check_images, "check_images"),
                        (randomization_steps, "randomization_steps"), (sensitivity_samples, "sensitivity_samples"),
                        (n_random, "n_random"), (n_bootstrap, "n_bootstrap")):
        check_positive_int(value, name)
    if not isinstance(z, (int, float)) or z < 0:
        raise ValueError(f"z must be a non-negative number of standard errors, got {z!r}")
    verbose = _progress() if verbose is None else verbose
    p = prepare(model, x, target)
    clf, x, targets = p.model, p.x, p.targets
    n = x.shape[0]
    bound = _bind_methods(methods, method_kwargs or {}, seed)
    if RANDOM in bound:
        raise ValueError(f"a method is named {RANDOM!r}, the name of the Random-map reference: rename it")

    explanations, seconds = {}, {}
    for name, fn in bound.items():
        tic = time.perf_counter()
        explanations[name] = fn(clf, x, targets, batch_size=batch_size)
        seconds[name] = (time.perf_counter() - tic) / n
    pick = _spread(n, check_images)
    _announce(clf, x, seconds, len(pick), faithful, robust, check_fns, fills, steps, n_random,
              randomization_steps, sensitivity_samples, time.perf_counter() - start, verbose)

    curve = {"granularity": granularity, "steps": steps, "seed": seed, "batch_size": batch_size, **metric_options}
    results = _faithfulness(clf, x, targets, explanations, faithful, fills, n_random, seed, curve)
    cascade = _cascade_layers(clf, randomization_steps) if "model_randomization" in check_fns else None
    sanity = {}
    for name, fn in bound.items():
        for check, check_fn in check_fns.items():
            r = _run_check(check, check_fn, clf, x[pick], targets[pick], fn, cascade, seed, batch_size)
            if r is not None:
                sanity[(name, check)] = r
        for metric in robust:
            from .metrics import get_metric

            results[(name, metric, None)] = get_metric(metric)(
                clf, x[pick], explanations[name].select(pick), method=fn, n_samples=sensitivity_samples,
                seed=seed, batch_size=batch_size)
    rec = _assemble(list(bound), results, sanity, faithful, robust, list(check_fns), fills, seconds, z,
                    n_bootstrap, seed)
    params = {"methods": list(bound), "metrics": metrics, "faithfulness": faithful, "robustness": robust,
              "checks": list(check_fns), "fills": list(fills),
              "granularity": granularity, "steps": steps, "check_images": pick.tolist(),
              "randomization_layers": cascade, "sensitivity_samples": sensitivity_samples, "n_random": n_random,
              "n_bootstrap": n_bootstrap, "z": z, "seed": seed, "n_images": n,
              "method_kwargs": {k: {a: _describe(v) for a, v in kw.items()}
                                for k, kw in _merged_kwargs(list(bound), method_kwargs or {}).items()}}
    return Recommendation(rows=rec["rows"], stability=rec["stability"], scores=rec["scores"], results=results,
                          checks=sanity, explanations=explanations, bootstrap_ranks=rec["bootstrap_ranks"],
                          params=params, seconds=time.perf_counter() - start)


def recommend_per_class(
    model: Any,
    x: Tensor,
    classes: Sequence[Any] | Tensor | None = None,
    *,
    min_images: int = 2,
    **options: Any,
) -> dict[str, Recommendation]:
    """One ``recommend`` per class: images grouped by ``classes`` (N,) (default: the predicted class),
    each group explained for its own class. Groups with fewer than ``min_images`` images are skipped
    (the standard errors and the bootstrap need at least two). Returns {class name: Recommendation}.

    For ``heatlens audit --recommend``: pass the audited images and their labels (or predictions).
    """
    check_positive_int(min_images, "min_images", minimum=2)
    p = prepare(model, x, "predicted")
    if classes is None:
        keys = [int(t) for t in p.targets]
    else:
        keys = classes.tolist() if isinstance(classes, Tensor) else list(classes)
        if len(keys) != p.x.shape[0]:
            raise ValueError(f"classes has {len(keys)} entries but x has {p.x.shape[0]} images")
    labels = p.model.labels
    def name(k: Any) -> str:
        return labels[k] if isinstance(k, int) and labels is not None and 0 <= k < len(labels) else str(k)

    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out = {}
    for k, idx in groups.items():
        if len(idx) < min_images:
            logger.info("recommend_per_class: class %s has %d image(s) (< %d): skipped", name(k), len(idx), min_images)
            continue
        named = isinstance(k, str) and labels is not None and k in labels
        target = k if isinstance(k, int) or named else p.targets[idx]
        out[name(k)] = recommend(p.model, p.x[idx], target=target, **options)
    return out


def per_class_table(recommendations: Mapping[str, Recommendation]):
    """{class: Recommendation} -> DataFrame: one row per class with its best method, verdict and stability."""
    import pandas as pd

    rows = [{"class": k, "images": r.params["n_images"], "best": r.best,
             "verdict": r.verdicts[r.best] if r.best is not None else "no method passed",
             "bootstrap_tau": r.stability["bootstrap_tau"], "fill_tau": r.stability["fill_tau"],
             "best_share": r.stability["best_share"], "stability": r.stability["label"]}
            for k, r in recommendations.items()]
    return pd.DataFrame(rows)


# --- evidence ----------------------------------------------------------------------------------------
def _split_metrics(metrics: Sequence[str]) -> tuple[list[str], list[str]]:
    from .metrics import metric_info

    faithful, robust = [], []
    for m in metrics:
        if not isinstance(m, str):
            raise TypeError(f"metrics must be metric names, got {type(m).__name__}")
        info = metric_info(m)
        if info.category == "faithfulness":
            faithful.append(m)
        elif info.category == "robustness":
            robust.append(m)
        else:
            raise ValueError(f"metrics: {m!r} is a {info.category} metric; recommend takes faithfulness "
                             "metrics (insertion, deletion, ...) and robustness metrics (max_sensitivity, ...)")
    if not faithful:
        raise ValueError("metrics must include at least one faithfulness metric, e.g. 'insertion' and 'deletion'")
    return faithful, robust


def _check_functions(checks: Sequence[str]) -> dict[str, Callable[..., SanityResult]]:
    from .sanity import CHECKS

    out = {}
    for c in checks:
        if not isinstance(c, str):
            raise TypeError(f"checks must be sanity check names, got {type(c).__name__}")
        out[c] = CHECKS.get(c).fn
    return out


def _check_fills(fills: Sequence[Any]) -> list[Any]:
    fills = [fills] if isinstance(fills, str) or not isinstance(fills, Sequence) else list(fills)
    if not fills:
        raise ValueError("fills must name at least one fill, e.g. ('blur', 'black')")
    return fills


def _merged_kwargs(names: list[str], method_kwargs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    unknown = set(method_kwargs) - set(names)
    if unknown:
        raise ValueError(f"method_kwargs names methods that are not in methods: {', '.join(sorted(unknown))}")
    return {n: {**DEFAULT_METHOD_KWARGS.get(n, {}), **method_kwargs.get(n, {})} for n in names}


def _bind_methods(methods: Sequence[Any], method_kwargs: Mapping[str, Mapping[str, Any]],
                  seed: int) -> dict[str, Callable[..., Explanation]]:
    """name -> method with its hyperparameters (and seed, if it draws) bound, so that a check's own
    ``seed`` / ``batch_size`` keywords never collide with the method's."""
    named = []
    for m in methods:
        info = method_info(m)
        named.append((info.name if info is not None else getattr(m, "__name__", None), m, info))
    for name, m, _ in named:
        if not name:
            raise TypeError(f"methods: {m!r} has no name (give the function a __name__)")
    names = [n for n, _, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"methods has duplicates: {names}")
    kwargs = _merged_kwargs(names, method_kwargs)
    out = {}
    for name, m, info in named:
        kw = dict(kwargs[name])
        if info is not None and info.meta.get("stochastic"):
            kw.setdefault("seed", seed)
        out[name] = _bound(get_method(m), name, kw)
    return out


def _bound(fn: Callable[..., Explanation], name: str, kwargs: dict[str, Any]) -> Callable[..., Explanation]:
    def method(model: Any, x: Tensor, target: Any = "predicted", **more: Any) -> Explanation:
        return fn(model, x, target, **{**kwargs, **more})

    method.__name__ = name
    return method


def _spread(n: int, k: int) -> Tensor:
    """k image indices spread evenly over 0..n-1 (all of them when k >= n)."""
    if k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long().unique()


def _faithfulness(model: Any, x: Tensor, targets: Tensor, explanations: dict[str, Explanation], metrics: list[str],
                  fills: list[Any], n_random: int, seed: int, settings: dict[str, Any]) -> dict:
    """(method, metric, fill) -> MetricResult, the Random reference averaged over n_random maps."""
    from .metrics import evaluate, random_explanation

    results = {}
    for fill in fills:
        for name, e in explanations.items():
            for metric, r in evaluate(model, x, e, metrics, fill=fill, **settings).items():
                results[(name, metric, _fill_name(fill))] = r
        randoms = [evaluate(model, x, random_explanation(model, x, targets, seed=seed + k), metrics, fill=fill,
                            **settings) for k in range(n_random)]
        for metric in metrics:
            values = torch.stack([r[metric].values for r in randoms]).mean(0)
            first = randoms[0][metric]
            results[(RANDOM, metric, _fill_name(fill))] = MetricResult(
                name=metric, values=values, higher_is_better=first.higher_is_better, params=first.params,
                extras={"n_random": n_random})
    return results


def _fill_name(fill: Any) -> str:
    return fill if isinstance(fill, str) else _describe(fill)


def _describe(value: Any) -> Any:
    from .metrics import describe

    return describe(value)


def _cascade_layers(model: nn.Module, n_steps: int) -> list[str]:
    """The top ``n_steps`` parameterised blocks, top first: the model's parameterised children,
    the largest expanded into its own until there are at least 8, normalisation layers left out
    (randomising them alone barely changes a map and costs a step)."""
    net = getattr(model, "net", None)
    root = net if isinstance(net, nn.Module) else model
    groups = [(n, m) for n, m in root.named_children() if _has_params(m)]
    if not groups:
        raise ValueError("model_randomization needs a model with parameters (not a black-box function)")
    while len(groups) < 8:
        sizes = [sum(1 for leaf in m.modules() if _has_params(leaf, own=True)) for _, m in groups]
        i = max(range(len(groups)), key=sizes.__getitem__)
        if sizes[i] <= 1:
            break
        name, m = groups[i]
        groups[i:i + 1] = [(f"{name}.{c}", cm) for c, cm in m.named_children() if _has_params(cm)]
    prefix = "net." if root is not model else ""
    kept = [prefix + n for n, m in groups if not isinstance(m, _NORMS)]
    return kept[::-1][:n_steps]


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _has_params(m: nn.Module, own: bool = False) -> bool:
    return any(True for _ in m.parameters(recurse=not own))


def _run_check(check: str, fn: Callable[..., SanityResult], model: Any, x: Tensor, targets: Tensor,
               method: Callable[..., Explanation], cascade: list[str] | None, seed: int,
               batch_size: int | None) -> SanityResult | None:
    """One sanity check with recommend's settings; None where it does not apply to this model."""
    settings: dict[str, Any] = {"batch_size": batch_size}
    if check == "model_randomization":
        settings.update(layers=cascade, seed=seed)
    elif check in ("random_logit", "fragility"):
        settings["seed"] = seed
    try:
        r = fn(model, x, method, targets, **settings)
    except ValueError as err:  # the check cannot be built for this model (no first conv, no parameters)
        logger.info("%s does not apply to %s: %s", check, method.__name__, err)
        return None
    if check == "input_invariance" and not _shift_absorbed(r):
        logger.info("input_invariance does not apply: the shift-compensated model differs in its logits")
        return None
    return r


def _shift_absorbed(r: SanityResult) -> bool:
    """Input invariance applies only when the shift-compensated copy computes the same function."""
    gap = max(row.get("logit_gap", 0.0) for row in r.table)
    return gap <= 1e-3


# --- ranking -------------------------------------------------------------------------------------------
def _assemble(names: list[str], results: dict, sanity: dict, faithful: list[str], robust: list[str],
              checks: list[str], fills: list[Any], seconds: dict[str, float], z: float, n_bootstrap: int,
              seed: int) -> dict[str, Any]:
    fills = [_fill_name(f) for f in fills]
    paired = "insertion" in faithful and "deletion" in faithful
    key = "ins_minus_del" if paired else faithful[0]

    def per_image(method: str, fill: str) -> Tensor:
        if paired:
            return results[(method, "insertion", fill)].values - results[(method, "deletion", fill)].values
        r = results[(method, key, fill)]
        return r.values if r.higher_is_better else -r.values

    by_fill = {m: torch.stack([per_image(m, f) for f in fills]) for m in [*names, RANDOM]}  # (F, N)
    scores = {m: v.mean(0) for m, v in by_fill.items()}
    rows = {}
    for m in [*names, RANDOM]:
        row: dict[str, Any] = {"rank": None, "method": m, "tier": None, "verdict": ""}
        row[key] = _mean(scores[m])
        row[f"{key}_sem"] = _sem(scores[m])
        adv = scores[m] - scores[RANDOM]
        row["vs_random"], row["vs_random_sem"] = _mean(adv), _sem(adv)
        for f in fills:
            row[f"{key}[{f}]"] = _mean(by_fill[m][fills.index(f)])
        faults = [] if m == RANDOM else _faults(m, results, faithful, fills, row, key, z)
        for metric in faithful:
            v = torch.stack([results[(m, metric, f)].values for f in fills]).mean(0)
            row[metric], row[f"{metric}_sem"] = _mean(v), _sem(v)
        for check in checks:
            r = sanity.get((m, check))
            row[check] = None if r is None else ("pass" if r.passed else "fail")
            row[f"{check}_value"] = None if r is None else _check_value(r)
            if r is not None and not r.passed:
                faults.append(check)
        for metric in robust:
            r = results.get((m, metric, None))
            row[metric] = None if r is None else r.mean()
            if r is not None and metric == "max_sensitivity" and r.mean() > 1.0:
                faults.append("max_sensitivity")
        row["seconds_per_image"] = seconds.get(m, 0.0)
        row["tier"], row["verdict"] = _verdict(m, faults, row, key)
        rows[m] = row
    ranked = sorted(names, key=lambda m: (TIERS.index(rows[m]["tier"]), -rows[m][key]))
    for i, m in enumerate(ranked, 1):
        rows[m]["rank"] = i
    stability, boot = _stability(ranked, rows, scores, by_fill, fills, n_bootstrap, seed)
    for m in ranked:
        rows[m]["rank_low"], rows[m]["rank_high"] = stability["rank_interval"][m]
    rows[RANDOM]["rank_low"] = rows[RANDOM]["rank_high"] = None
    return {"rows": [rows[m] for m in [*ranked, RANDOM]], "stability": stability, "scores": scores,
            "bootstrap_ranks": boot}


def _faults(m: str, results: dict, faithful: list[str], fills: list[str], row: dict, key: str,
            z: float) -> list[str]:
    """Faithfulness faults: the ranking score, insertion and deletion not better than the Random map.
    Records in row["chance"] how each compares: "worse", "no better" (advantage within one standard
    error) or "not clearly better" (within z standard errors)."""
    row["chance"] = {}
    advantages = {key: (row["vs_random"], row["vs_random_sem"])}
    for metric in ("insertion", "deletion"):
        if metric in faithful and key == "ins_minus_del":
            ours = torch.stack([results[(m, metric, f)].values for f in fills]).mean(0)
            chance = torch.stack([results[(RANDOM, metric, f)].values for f in fills]).mean(0)
            adv = ours - chance if metric == "insertion" else chance - ours
            advantages[metric] = (_mean(adv), _sem(adv))
    faults = []
    for name, (mean, sem) in advantages.items():
        if mean > z * sem:
            continue
        faults.append(name)
        row["chance"][name] = "worse" if mean < -z * sem else "no better" if mean <= sem else "not clearly better"
    return faults


def _verdict(m: str, faults: list[str], row: dict, key: str) -> tuple[str | None, str]:
    if m == RANDOM:
        return None, "reference: a random map (chance level)"
    labels = {key: "insertion − deletion" if key == "ins_minus_del" else key, "insertion": "insertion",
              "deletion": "deletion"}
    text = {f: f"{row['chance'].get(f, 'no better')} than a random map on {label}" for f, label in labels.items()}
    text["max_sensitivity"] = f"unstable: 2% input noise moves the map by {row.get('max_sensitivity', 0):.0%}"
    text.update(FAILURES)
    if not faults:
        return TIERS[0], "trustworthy for this model"
    if key in faults:  # insertion and deletion alone add nothing once their difference fails
        faults = [f for f in faults if f not in ("insertion", "deletion")]
    ordered = sorted(faults, key=lambda f: (f not in DISQUALIFYING, f))
    reasons = "; ".join(text.get(f, f"fails {f}") for f in ordered)
    tier = TIERS[2] if any(f in DISQUALIFYING for f in faults) else TIERS[1]
    return tier, f"{tier}: {reasons}"


def _stability(ranked: list[str], rows: dict, scores: dict[str, Tensor], by_fill: dict[str, Tensor],
               fills: list[str], n_bootstrap: int, seed: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Kendall τ of the score order across image resamples and across fills; rank intervals."""
    s = torch.stack([scores[m] for m in ranked]).double()  # (M, N)
    m_count, n = s.shape
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_bootstrap, n), generator=gen)
    boot = s[:, idx].mean(-1).T  # (B, M)
    full = s.mean(1)
    tau_boot = float(_kendall(boot, full.expand_as(boot)).mean()) if m_count > 1 else float("nan")
    fill_means = torch.stack([torch.stack([by_fill[m][i] for m in ranked]).double().mean(1)
                              for i in range(len(fills))])  # (F, M)
    pairs = [(i, j) for i in range(len(fills)) for j in range(i + 1, len(fills))]
    tau_fill = (float(torch.stack([_kendall(fill_means[i:i + 1], fill_means[j:j + 1])[0] for i, j in pairs]).mean())
                if pairs and m_count > 1 else float("nan"))
    tier = torch.tensor([TIERS.index(rows[m]["tier"]) for m in ranked], dtype=torch.float64)
    # rank in each resample: the tiers (from the checks) stay, the scores are resampled
    order_key = tier * 1e12 - boot  # (B, M), smaller first
    ranks = order_key.argsort(1).argsort(1) + 1
    low = torch.quantile(ranks.double(), 0.05, dim=0)
    high = torch.quantile(ranks.double(), 0.95, dim=0)
    best = next((i for i, m in enumerate(ranked) if rows[m]["tier"] != TIERS[2]), None)
    share = float((ranks[:, best] == 1).double().mean()) if best is not None else float("nan")
    label = _label(tau_boot, tau_fill)
    stability = {
        "bootstrap_tau": tau_boot, "fill_tau": tau_fill, "best_share": share, "label": label,
        "rank_interval": {m: (int(low[i]), int(high[i])) for i, m in enumerate(ranked)},
        "statement": _statement(label, tau_boot, tau_fill, share, ranked[best] if best is not None else None,
                                n_bootstrap, n, fills),
    }
    return stability, {m: ranks[:, i] for i, m in enumerate(ranked)}


def _kendall(a: Tensor, b: Tensor) -> Tensor:
    """Kendall's τ-a between the rows of a and b (B, M) -> (B,): concordant minus discordant pairs."""
    i, j = torch.triu_indices(a.shape[1], a.shape[1], offset=1)
    agree = torch.sign(a[:, i] - a[:, j]) * torch.sign(b[:, i] - b[:, j])
    return agree.double().mean(1)


def _label(tau_boot: float, tau_fill: float) -> str:
    worst = min(t for t in (tau_boot, tau_fill) if not math.isnan(t)) if not math.isnan(tau_boot) else float("nan")
    if math.isnan(worst):
        return "stability unknown (one method)"
    if worst >= 0.7:
        return "stable"
    if worst >= 0.4:
        return "moderately stable"
    return "unstable"


def _statement(label: str, tau_boot: float, tau_fill: float, share: float, best: str | None, n_bootstrap: int,
               n: int, fills: list[str]) -> str:
    parts = [f"{label}: Kendall τ {tau_boot:.2f} between the order on all {n} images and on {n_bootstrap} "
             "bootstrap resamples"]
    if not math.isnan(tau_fill):
        parts.append(f"{tau_fill:.2f} between the {' and '.join(fills)} fills")
    if best is not None:
        parts.append(f"{best} ranks first in {share:.0%} of the resamples")
    text = "; ".join(parts)
    return text + (" (read the order as a near-tie)" if label == "unstable" else "")


def _check_value(r: SanityResult) -> float | None:
    """The number a check's verdict rests on: final Spearman (randomisation), mean first similarity
    (random logit), worst relative difference (input invariance), mean top-k overlap (fragility)."""
    if r.name == "model_randomization":
        return float(r.table[-1].get("spearman", next(v for k, v in r.table[-1].items() if k != "layer")))
    key = {"random_logit": r.params.get("similarity", ("ssim",))[0], "input_invariance": "relative_difference",
           "fragility": "top_k_overlap"}.get(r.name)
    values = [row[key] for row in r.table if key in row and not math.isnan(row[key])]
    if not values:
        return None
    return max(values) if r.name == "input_invariance" else sum(values) / len(values)


def _mean(v: Tensor) -> float:
    return float(v.double().mean())


def _sem(v: Tensor) -> float:
    return float(v.double().std(unbiased=True) / v.numel() ** 0.5) if v.numel() > 1 else float("nan")


# --- cost estimate -------------------------------------------------------------------------------------
def _progress() -> bool:
    from .batching import progress_enabled

    return progress_enabled()


def _announce(model: Any, x: Tensor, seconds: dict[str, float], n_check: int, faithful: list[str], robust: list[str],
              checks: dict, fills: list[Any], steps: int, n_random: int, randomization_steps: int,
              sensitivity_samples: int, elapsed: float, verbose: bool) -> float:
    """Log (and print when verbose) how long the rest of the run will take, from what was measured."""
    with torch.inference_mode():
        tic = time.perf_counter()
        model(x)
        forward = (time.perf_counter() - tic) / x.shape[0]
    repeats = sum({"model_randomization": 1 + randomization_steps, "random_logit": 2, "input_invariance": 2,
                   "fragility": 9}.get(c, 2) for c in checks) + sensitivity_samples * len(robust)
    explain = sum(seconds.values()) * n_check * repeats
    curves = (len(seconds) + n_random) * x.shape[0] * len(fills) * len(faithful) * (steps + 1) * forward
    rest = explain + curves
    text = (f"recommend: explained {x.shape[0]} images with {len(seconds)} methods in {elapsed:.0f} s; "
            f"the checks and metrics will take about {_duration(rest)} more (estimate: {_duration(explain)} "
            f"re-explaining {n_check} images, {_duration(curves)} of curves)")
    logger.info(text)
    if verbose:
        print(text, file=sys.stderr)
    return rest


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


# --- views ------------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _grid(rec: Recommendation) -> tuple[list[str], list[list[str]]]:
    key = _key(rec)
    label = "ins − del" if key == "ins_minus_del" else key
    checks, robust = rec.params["checks"], rec.params["robustness"]
    header = ["rank", "method", "verdict", f"{label} ± se", "vs random ± se"]
    header += [m for m in ("insertion", "deletion") if m in rec.rows[0]]
    header += [c.replace("_", " ") for c in checks] + [m.replace("_", " ") for m in robust]
    header += ["s / image", "rank 90%"]
    body = []
    for r in rec.rows:
        cells = [_fmt(r["rank"]) if r["rank"] is not None else "–", r["method"], r["verdict"],
                 f"{r[key]:.3f} ± {r[key + '_sem']:.3f}", f"{r['vs_random']:+.3f} ± {r['vs_random_sem']:.3f}"]
        cells += [f"{r[m]:.3f}" for m in ("insertion", "deletion") if m in r]
        for c in checks:
            cells.append("–" if r["method"] == RANDOM else
                         "n/a" if r[c] is None else f"{r[c]} ({_fmt(r[c + '_value'], 2)})")
        cells += ["–" if r["method"] == RANDOM else _fmt(r.get(m), 2) for m in robust]
        cells.append("–" if r["method"] == RANDOM else f"{r['seconds_per_image']:.2f}")
        cells.append("–" if r["rank"] is None else
                     (f"{r['rank_low']}" if r["rank_low"] == r["rank_high"] else f"{r['rank_low']}–{r['rank_high']}"))
        body.append(cells)
    return header, body


def _key(rec: Recommendation) -> str:
    """The ranking score's column: insertion − deletion, or the first faithfulness metric."""
    faithful = rec.params["faithfulness"]
    return "ins_minus_del" if "insertion" in faithful and "deletion" in faithful else faithful[0]


TIER_COLOURS = {TIERS[0]: "#2a9d40", TIERS[1]: "#e09b16", TIERS[2]: "#c8322b", None: "#888888"}


def plot_recommendation(rec: Recommendation, *, figsize: tuple[float, float] | None = None):
    """Two panels in rank order: left the ranking score (mean ± SE over images, the Random map as a
    dashed line and band), right the rank with its 5-95% bootstrap interval; colour = verdict tier."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = rec.rows
    key = _key(rec)
    ranked = [r for r in rows if r["rank"] is not None]
    reference = next(r for r in rows if r["method"] == RANDOM)
    m = len(ranked)
    fig, (left, right) = plt.subplots(1, 2, figsize=figsize or (9.0, 0.45 * m + 1.8), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 2]})
    ys = np.arange(m)
    colours = [TIER_COLOURS[r["tier"]] for r in ranked]
    left.axvspan(reference[key] - reference[key + "_sem"], reference[key] + reference[key + "_sem"],
                 color="#bbbbbb", alpha=0.4, lw=0)
    left.axvline(reference[key], color="#666666", ls="--", lw=1, label="random map ± se")
    left.errorbar([r[key] for r in ranked], ys, xerr=[r[key + "_sem"] for r in ranked], fmt="none",
                  ecolor="#444444", capsize=3, lw=1)
    left.scatter([r[key] for r in ranked], ys, c=colours, s=40, zorder=3)
    left.set_yticks(ys)
    left.set_yticklabels([f"{r['rank']}. {r['method']}" for r in ranked])
    left.invert_yaxis()
    left.set_xlabel(("insertion − deletion" if key == "ins_minus_del" else key) + " (mean ± se over images)")
    lo = np.array([r["rank_low"] for r in ranked])
    hi = np.array([r["rank_high"] for r in ranked])
    rk = np.array([r["rank"] for r in ranked])
    right.errorbar(rk, ys, xerr=[rk - lo, hi - rk], fmt="none", ecolor="#444444", capsize=3, lw=1)
    right.scatter(rk, ys, c=colours, s=40, zorder=3)
    right.set_xlim(0.5, m + 0.5)
    right.set_xticks(range(1, m + 1))
    right.set_xlabel("rank (dot) and 90% bootstrap interval")
    handles = [plt.Line2D([], [], marker="o", ls="", color=TIER_COLOURS[t], label=t) for t in TIERS]
    handles.append(plt.Line2D([], [], ls="--", color="#666666", label="random map ± se"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    s = rec.stability
    fig.suptitle(f"Which method to trust: {s['label']} (τ {s['bootstrap_tau']:.2f} over resamples, "
                 f"{_fmt(s['fill_tau'], 2)} across fills)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def recommendation_html(rec: Recommendation, *, plot: bool = True) -> str:
    """The recommendation as HTML: summary, the ranked table (verdicts coloured by tier), the rank chart."""
    import html

    from .report.html import figure_data_uri, img_tag

    header, body = _grid(rec)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for row, r in zip(body, rec.rows):
        cells = []
        for i, c in enumerate(row):
            style = f' style="color:{TIER_COLOURS[r["tier"]]}"' if i == 2 else ""
            cells.append(f"<td{style}>{html.escape(c)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    best = rec.best
    summary = (f"<p><b>Recommended: {html.escape(best)}</b> — {html.escape(rec.verdicts[best])}.</p>"
               if best is not None else "<p><b>No method passed</b> the checks that disqualify a map.</p>")
    summary += f"<p>Ranking {html.escape(rec.stability['statement'])}.</p>"
    note = (f"<p class='subtitle'>{rec.params['n_images']} images; faithfulness over the "
            f"{', '.join(map(str, rec.params['fills']))} fills against a Random map; checks on images "
            f"{rec.params['check_images']}; a method beats the Random map when its paired advantage exceeds "
            f"{rec.params['z']:g} standard errors; {rec.seconds:.0f} s in all.</p>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"
    chart = img_tag(figure_data_uri(rec.plot()), "rank chart") if plot else ""
    return f"<div class='heatlens-recommendation'>{summary}{table}{note}{chart}</div>"


def recommendation_section(rec: Recommendation, title: str = "Which method to trust"):
    """A ``heatlens.report`` Section holding ``recommendation_html`` (for ``write_report``)."""
    from .report.html import Section

    return Section(title, recommendation_html(rec))
