"""Reversible, scoped edits to a user's model: every context here restores state in ``finally``.

``guard``: the one entry of every method, metric and sanity check: the model's lock held (concurrent
calls on one model run one after the other) and the model ``frozen`` for the duration of the call.
``frozen``: eval mode and no parameter gradients for the duration of an explanation.
``capture``: activations (and their gradients) at one layer, hook removed afterwards.
``tap``: a layer's output at every call of one forward (as gradient leaves, or edited), hook removed afterwards.
``resolve_layer``: a layer given by name or module -> (name, module), with suggestions.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..validation import unknown_name


# One re-entrant lock per model (weakly keyed: forgotten with the model; an RLock holds no reference
# to it). Keyed by the wrapped net, so two Classifiers around one module share it.
_locks: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: object) -> threading.RLock:
    """The re-entrant lock of ``model`` (a Classifier locks on the net it wraps; a black box on itself)."""
    net = getattr(model, "net", None)
    key = net if net is not None else model  # not `or`: an nn.Sequential with no layers is falsy
    with _locks_guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = threading.RLock()
        return lock


@contextmanager
def guard(model: nn.Module) -> Iterator[nn.Module]:
    """The scope of one method, metric or sanity-check call on ``model``.

    Why a lock: freezing, hooks and the recorded clean pass edit the shared model, so two threads
    explaining one model at once would see each other's hooks and restore each other's flags. Calls
    on one model therefore run one at a time (re-entrant: a metric that explains again, a sanity
    check that calls a method, nest freely); calls on different models still run in parallel.
    Inside, the model is ``frozen``; everything is restored on exit, also on error.
    """
    with model_lock(model), frozen(model):
        yield model


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
    """All submodules by their dotted name (the root excluded).

    Keras 3 layers (torch backend) are ``nn.Module``s that torch does not list as children; they are
    added under their Keras names (``net.conv2d_1``, nested ones dotted) so they can be hooked too.
    """
    layers = {}
    for name, m in model.named_modules():
        if name:
            layers[name] = m
        if _is_keras_layer(m):
            layers.update(_keras_layers(m, name))
    return layers


def _is_keras_layer(m: nn.Module) -> bool:
    return hasattr(m, "_flatten_layers") and type(m).__module__.split(".")[0] == "keras"


def _keras_layers(layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """A Keras layer's sublayers by dotted Keras name, depth first in the model's layer order."""
    found = {}
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        name = f"{prefix}.{sub.name}" if prefix else sub.name
        found[name] = sub
        found.update(_keras_layers(sub, name))
    return found


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


@dataclass
class Tapped:
    """What ``tap`` saw in the latest forward of ``root``: the layer's output at each of its calls."""

    outputs: list = field(default_factory=list)


@contextmanager
def tap(
    module: nn.Module,
    *,
    root: nn.Module | None = None,
    leaf: bool = False,
    edit: Callable[[int, Tensor], Tensor] | None = None,
) -> Iterator[Tapped]:
    """Record ``module``'s output at every call, optionally as gradient leaves or edited.

    root: the model being called; each of its forwards starts a fresh record, so a module called
    several times per forward (a shared activation) keeps one entry per call, in call order.
    leaf: record each output as a detached leaf with ``requires_grad`` and feed the rest of the model
    a clone of it: ``autograd.grad(score, tapped.outputs[i])`` then needs no input gradient and stops
    at the layer, and in-place operations downstream leave the recorded value intact.
    edit: ``edit(call_index, output) -> output`` replaces what the rest of the model sees (ablations).
    A tuple output is tapped at its first element. PyTorch's fused transformer fast path, which skips
    submodule hooks, is off inside the block. Hooks are removed and the fast path restored in ``finally``.
    """
    seen = Tapped()

    def on_root(_mod: nn.Module, _inp: object) -> None:
        seen.outputs = []

    def on_forward(_mod: nn.Module, _inp: object, out: object) -> object:
        first = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(first, Tensor):
            return None
        index = len(seen.outputs)
        if leaf:
            first = first.detach().requires_grad_(True)
            seen.outputs.append(first)
            first = first.clone()
        else:
            seen.outputs.append(first)
        if edit is not None:
            first = edit(index, first)
        if not leaf and edit is None:
            return None
        return type(out)([first, *out[1:]]) if isinstance(out, (tuple, list)) else first

    with _hooks_registered() as handles:
        handles.append(module.register_forward_hook(on_forward))
        if root is not None:
            handles.append(root.register_forward_pre_hook(on_root))
        yield seen


@contextmanager
def trace_layers(model: nn.Module) -> Iterator[list[tuple[str, int, Tensor]]]:
    """Record every layer's tensor output during the block as (name, call index, output), in call order.

    Names are ``named_layers``'s (Keras layers included); the call index counts a module's calls in
    the block, as ``tap`` does. Used to find layers automatically (CAM's ``layer=None``). Hooks are
    removed and PyTorch's transformer fast path (which skips submodule hooks) restored in ``finally``.
    """
    calls: list[tuple[str, int, Tensor]] = []
    counts: dict[str, int] = {}

    def recorder(name: str) -> Callable[..., None]:
        def on_forward(_mod: nn.Module, _inp: object, out: object) -> None:
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, Tensor):
                calls.append((name, counts.get(name, 0), first))
                counts[name] = counts.get(name, 0) + 1

        return on_forward

    with _hooks_registered() as handles:
        for name, module in named_layers(model).items():
            handles.append(module.register_forward_hook(recorder(name)))
        yield calls


@contextmanager
def _hooks_registered() -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    """A list to append hook handles to; all are removed on exit, also on error.

    PyTorch's transformer fast path skips submodule hooks, so it is off inside and restored after.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        _fastpath_off()
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        _fastpath_restore()


# The fast-path switch is process-wide: blocks on several threads (different models) count, so the
# last one out restores the user's setting, not the first (which would re-enable it under the others).
_fastpath = {"users": 0, "saved": True}
_fastpath_lock = threading.Lock()


def _fastpath_off() -> None:
    with _fastpath_lock:
        if _fastpath["users"] == 0:
            _fastpath["saved"] = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _fastpath["users"] += 1


def _fastpath_restore() -> None:
    with _fastpath_lock:
        _fastpath["users"] -= 1
        if _fastpath["users"] == 0:
            torch.backends.mha.set_fastpath_enabled(_fastpath["saved"])
