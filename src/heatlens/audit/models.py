"""The audited model: loaded from a spec (so Ray workers and ``Audit.model()`` can load it again) or
given as an object, and fingerprinted so that a resumed audit is refused on another model."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..models.adapter import Classifier


def load_spec(spec: str, *, weights: str | None = None, device: str | torch.device | None = None,
              input_size: Sequence[int] | None = None) -> Classifier:
    """A model spec -> Classifier through ``heatlens.load_model``: a zoo name, a ``.keras`` / ``.pt2`` file,
    or ``package.module:function`` (``weights``: a state-dict file; ``input_size`` for a bare module)."""
    from ..models import load_model

    return load_model(spec, weights=weights, device=device, input_size=input_size)


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
