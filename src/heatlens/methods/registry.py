"""A registry of named callables (methods, metrics, sanity checks) with metadata.

Variants are data, not subclasses: ``@register("saliency", family="gradient")`` adds an entry, and
an unknown name raises with the closest valid names.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..validation import unknown_name

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """One registered callable. meta holds family / category, needs_grad, per_sample, ..."""

    name: str
    fn: Callable[..., Any]
    description: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.meta[key]
        except KeyError:
            raise AttributeError(key) from None


class Registry(Generic[F]):
    """Name -> Entry, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, fn: Callable[..., Any], **meta: Any) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        entry = Entry(name=name, fn=fn, description=meta.pop("description", doc[0] if doc else ""), meta=meta)
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} must be a name (str), got {type(name).__name__}")
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name(self.kind, name, list(self._entries)) from None

    def names(self, **where: Any) -> list[str]:
        """Registered names, optionally filtered by metadata (``names(family="cam")``)."""
        return [n for n, e in self._entries.items() if all(e.meta.get(k) == v for k, v in where.items())]

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


METHODS: Registry = Registry("method")
# The map kind of each family's attributions (``Explanation.kind``): per-location scores stay signed,
# per-channel gradient-like attributions are ranked by magnitude (``explanation.DEFAULT_REDUCE``).
FAMILY_MAP_KINDS = {"gradient": "gradient", "path": "gradient", "propagation": "gradient", "smoothing": "gradient",
                    "cam": "location", "perturbation": "location", "surrogate": "location",
                    "counterfactual": "location"}


def register(
    name: str,
    *,
    family: str,
    needs_grad: bool,
    per_sample: tuple[str, ...] = (),
    stochastic: bool = False,
    map_kind: str | None = None,
    description: str | None = None,
) -> Callable[[F], F]:
    """Register an explanation method ``fn(model, x, target="predicted", **hyper) -> Explanation``.

    The registered function is wrapped so that, for the duration of the call, the model is a
    ``Classifier`` inside ``models.hooks.guard`` (the model's lock held: concurrent calls on one model
    run one at a time; eval mode with frozen parameters, restored afterwards, also on error) and
    black-box models are refused by gradient methods with a clear error.
    family: "gradient" | "path" | "propagation" | "cam" | "perturbation" | "surrogate" | ...
    per_sample: keyword arguments holding one entry per image (e.g. "baseline"): meta-methods that
    expand the batch (smoothing) repeat exactly these alongside x.
    stochastic: the method draws random numbers and takes ``seed``.
    map_kind: "location" (one score per location, (N,1,H,W) or (N,1,h,w)) or "gradient" (per input
    channel); default by family (``FAMILY_MAP_KINDS``). Recorded in every Explanation the method returns.
    """
    kind = map_kind or FAMILY_MAP_KINDS.get(family, "gradient")

    def decorate(fn: F) -> F:
        from ..models.adapter import as_classifier
        from ..models.hooks import guard
        from ._autograd import gradient_method

        @functools.wraps(fn)
        def method(model: Any, x: Any, target: Any = "predicted", **hyper: Any) -> Any:
            clf = as_classifier(model, x)
            if needs_grad:
                clf.require_gradients(name)
            with guard(clf), gradient_method(needs_grad):  # lets prepare's forward be reused by the gradient
                return _with_kind(fn(clf, x, target, **hyper), kind)

        method.info = METHODS.add(  # type: ignore[attr-defined]
            name, method, family=family, needs_grad=needs_grad, per_sample=tuple(per_sample),
            stochastic=stochastic, map_kind=kind, **({"description": description} if description else {}),
        )
        return method  # type: ignore[return-value]

    return decorate


def _with_kind(result: Any, kind: str) -> Any:
    """The Explanation with its map kind recorded (a kind the method set itself is kept)."""
    from ..explanation import Explanation

    if isinstance(result, Explanation) and result.map_kind is None:
        return dataclasses.replace(result, map_kind=kind)
    return result


def get_method(method: str | Callable[..., Any]) -> Callable[..., Any]:
    """A method by registry name, or a callable passed through."""
    if callable(method):
        return method
    return METHODS.get(method).fn


def method_info(method: str | Callable[..., Any]) -> Entry | None:
    """The registry entry of a method given by name or by its registered function (None for others)."""
    if isinstance(method, str):
        return METHODS.get(method)
    return getattr(method, "info", None)
