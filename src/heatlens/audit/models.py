"""The audited model: loaded from a spec (so Ray workers and ``Audit.model()`` can load it again) or
given as an object, and fingerprinted so that a resumed audit is refused on another model."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from typing import Any

import torch
from torch import nn

from ..models.adapter import Classifier


def load_spec(spec: str, *, weights: str | None = None, device: str | torch.device | None = None) -> Classifier:
    """A model spec -> Classifier: a zoo name, a ``.keras`` / ``.pt2`` file, or ``package.module:function``
    (called with no arguments; ``weights`` is a state-dict file loaded into what it returns)."""
    from ..models import zoo

    if "weights" in inspect.signature(zoo.load_model).parameters:
        # the zoo loader reads every spec form itself
        return zoo.load_model(spec, weights=weights, device=device)
    if _is_function_spec(spec):
        return _load_function(spec, weights, device)
    if weights is not None:
        raise ValueError(f"weights= is for 'package.module:function' specs, not for {spec!r}")
    return zoo.load_model(spec, device=device)


def _is_function_spec(spec: str) -> bool:
    module, sep, attr = spec.partition(":")
    return bool(sep) and bool(attr) and not os.path.exists(spec) and "/" not in module and "\\" not in module


def _load_function(spec: str, weights: str | None, device: str | torch.device | None) -> Classifier:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model spec {spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model spec {spec!r}: module {module_name!r} has no function {attr!r}")
    model = fn()
    if weights is not None:
        net = model.net if isinstance(model, Classifier) else model
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    if not isinstance(model, Classifier):
        raise TypeError(f"model spec {spec!r} returned {type(model).__name__}; the function must return a "
                        "heatlens Classifier (heatlens.wrap(module, input_size=...))")
    return model.to(device) if device is not None else model


def fingerprint(model: nn.Module | Classifier) -> str:
    """sha256 of the model's class, parameters and buffers (names, dtypes, shapes, values), 16 hex digits.

    Black-box predict functions have no weights: their fingerprint is their name only."""
    h = hashlib.sha256(type(getattr(model, "net", model) or model).__qualname__.encode())
    if isinstance(model, Classifier) and model.net is None:
        h.update(f"predict_fn:{model.name}".encode())
        return h.hexdigest()[:16]
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_spec(model: Any) -> str | None:
    """The spec a model object was loaded from, when it recorded one (``Classifier.spec``)."""
    spec = getattr(model, "spec", None)
    return spec if isinstance(spec, str) else None
