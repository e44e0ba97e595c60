"""heatlens: explain, evaluate and debug image classifiers.

>>> import heatlens as hl
>>> model = hl.load_model("efficientnet-lite0")
>>> x = model.preprocess(hl.data.sample_images())
>>> e = hl.explain(model, x, "integrated_gradients", steps=50)
>>> e.maps().shape            # (N, 224, 224)
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from .explanation import Explanation, MetricResult, SanityResult
from .models import Classifier, load_model, wrap

__version__ = "0.1.0"
__all__ = [
    "Classifier", "Explanation", "MetricResult", "SanityResult",
    "explain", "evaluate", "load_model", "wrap", "__version__", "audit", "Audit",
]

_LAZY = ("methods", "metrics", "sanity", "debug", "viz", "report", "data", "batching", "baselines", "targets")


def explain(model: Any, x: Any, method: Any = "saliency", /, target: Any = "predicted", **hyper: Any):
    """Explain ``x`` with one method (a registry name or a method function) -> Explanation,
    or with several (a list of names) -> dict name -> Explanation. See ``heatlens.methods``.

    ``model``, ``x`` and ``method`` are positional, so a method's own ``method=`` hyperparameter
    (Integrated Gradients' quadrature) passes through."""
    from .methods import get_method

    if isinstance(method, (list, tuple)):  # shared passes where methods allow (heatlens.methods.multi)
        from .methods.multi import explain_many

        return explain_many(model, x, method, target, **hyper)
    return get_method(method)(model, x, target, **hyper)


def evaluate(model: Any, x: Any, explanation: Any, metrics: str | Sequence[str] = ("insertion", "deletion"), **options: Any):
    """Score an explanation with one or several metrics -> dict name -> MetricResult. See ``heatlens.metrics``."""
    from .metrics import evaluate as _evaluate

    return _evaluate(model, x, explanation, metrics, **options)


def __getattr__(name: str) -> Any:
    if name in ("recommend", "recommend_per_class", "Recommendation"):  # which method to trust (recommendation.py)
        return getattr(importlib.import_module(".recommendation", __name__), name)
    # hl.audit is the heatlens.audit package, callable as the function (importing a subpackage would
    # otherwise replace a function of the same name); hl.Audit its result class
    if name in ("audit", "Audit"):
        module = importlib.import_module(".audit", __name__)
        return module if name == "audit" else module.Audit
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'heatlens' has no attribute {name!r}")
