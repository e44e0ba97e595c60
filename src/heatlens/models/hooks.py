"""Reversible, scoped edits to a user's model: every context here restores state in ``finally``.

``frozen``: eval mode and no parameter gradients for the duration of an explanation.
``capture``: activations (and their gradients) at one layer, hook removed afterwards.
``resolve_layer``: a layer given by name or module -> (name, module), with suggestions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..validation import unknown_name


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False`` on every parameter, then restore both.

    Why: attributions must not depend on dropout / batch statistics, and skipping parameter
    gradients makes input gradients ~1.5x cheaper. Exceptions propagate; state is restored anyway.
    """
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All submodules by their dotted name (the root excluded)."""
    return {name: m for name, m in model.named_modules() if name}


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """A layer by dotted name (``"features.12"``) or by module -> (name, module).

    Unknown names raise ``ValueError`` listing the closest valid names. A ``Classifier`` wrapper's
    own prefix (``net.``) may be left out.
    """
    layers = named_layers(model)
    if isinstance(layer, nn.Module):
        for name, m in layers.items():
            if m is layer:
                return name, m
        raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module or a dotted name, got {type(layer).__name__}")
    for candidate in (layer, f"net.{layer}"):
        if candidate in layers:
            return candidate, layers[candidate]
    visible = [n[4:] if n.startswith("net.") else n for n in layers]
    raise unknown_name("layer", layer, visible)


def hook_count(model: nn.Module) -> int:
    """Number of forward / backward hooks on ``model`` and its submodules (tests check it returns to 0)."""
    total = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            total += len(getattr(m, attr, {}) or {})
    return total


@dataclass
class Captured:
    """What ``capture`` saw at a layer: the last forward's activation and, after backward, its gradient."""

    activations: Tensor | None = None
    gradients: Tensor | None = None
    calls: int = 0
    _handles: list = field(default_factory=list, repr=False)


@contextmanager
def capture(module: nn.Module, *, grads: bool = True) -> Iterator[Captured]:
    """Record ``module``'s output (and the gradient flowing into it) for the duration of the block.

    A module called more than once per forward keeps its last call (``calls`` says how many).
    The output of a tuple-returning layer is its first element.
    """
    seen = Captured()

    def on_forward(_mod: nn.Module, _inp: object, out: object) -> None:
        act = out[0] if isinstance(out, (tuple, list)) else out
        seen.activations = act
        seen.calls += 1
        if grads and isinstance(act, Tensor) and act.requires_grad:

            def on_grad(g: Tensor) -> None:
                seen.gradients = g

            act.register_hook(on_grad)

    handle = module.register_forward_hook(on_forward)
    try:
        yield seen
    finally:
        handle.remove()
