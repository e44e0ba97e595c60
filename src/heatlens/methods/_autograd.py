"""The only code in heatlens that calls backward, and the shared entry of every method (``prepare``).

``prepare`` validates x and resolves the target ONCE at the clean input; inner code sees canonical
forms only. ``input_gradients`` differentiates the explained score for one batch (``score_gradients``
w.r.t. tensors inside the model, such as a layer's activations);
``gradients_over`` streams many lazily built inputs through the batching engine.

Two speed-ups live here, so that every method gets them (measured in ``benchmarks/bench_methods.py``):

* ``fast_layout``: on CPU, images go to convolutional models channels-last (NHWC strides, same
  values): oneDNN convolutions run ~1.3-1.5x faster that way. Only where proven safe: the first
  time a model is seen, one probe runs it on both layouts; a model that fails channels-last (it
  calls ``.view()`` on activations) or computes anything beyond rounding differently keeps NCHW for good.
* the clean pass is reused: in a gradient method, when x fits in one gradient batch, ``prepare``
  runs its forward with autograd recording, and the first ``input_gradients`` call at exactly that
  x (same tensor, same model state) back-propagates through it instead of running the forward again.
  Saliency, gradient x input and SmoothGrad's inner calls thus cost one forward+backward, not an
  extra forward. A method whose pass differs from the plain forward (propagation rules, a CAM's
  tapped layer) hands ``prepare`` that pass (``through=``), so its first pass is the clean one too.
  Any other use (another input, a forward-only batch, layer gradients) releases the recorded pass
  first, so memory stays one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..batching import default_batch_size, map_batches, on_forward_only
from ..models.adapter import Classifier, as_classifier, channels_last_safe, target_scores
from ..targets import TargetLike, resolve_target
from ..validation import check_choice, check_images, check_outputs

OUTPUTS = ("logit", "probability")


@dataclass(frozen=True)
class Prepared:
    """Canonical inputs of one explanation call.

    x: (N,C,H,W) on the model's device. targets: LongTensor (N,). logits: (N,K) at the clean x.
    """

    model: Classifier
    x: Tensor
    targets: Tensor
    logits: Tensor

    def scores(self, output: str = "logit") -> Tensor:
        """The explained score at the clean x (N,), from the logits already computed."""
        return target_scores(self.logits, self.targets, output, binary=self.model.binary).float()


def prepare(model: Any, x: Any, target: TargetLike, *, output: str = "logit", through: Any = None,
            record: bool = True) -> Prepared:
    """Validate ``x`` against the model, run it once, resolve ``target`` from the clean logits.

    through: what runs that pass inside a gradient method, so the method's own first pass doubles
    as the clean one (no extra forward): None is the model itself (reused by ``input_gradients``);
    an object with ``__call__(x) -> logits`` and ``model`` (the Classifier) is the method's own pass,
    e.g. the model under propagation rules or with a layer tapped, reused by ``input_gradients`` /
    ``take_recorded`` called with that object. Its logits must equal the model's. Its
    ``input_grad`` attribute (default True) says whether the pass needs the input gradient.
    record: False when no later pass can reuse this one (DeepLIFT runs x with its baselines): the
    clean logits then come from a cheaper pass without a graph.
    """
    model = as_classifier(model, x)
    c, h, w = model.input_size
    x = check_images(x, "x", channels=c, size=(h, w)).to(model.device).detach()
    check_choice(output, "output", OUTPUTS)
    logits = _recorded_forward(model, x, through) if record and _worth_recording(model, x) else None
    if logits is None:
        with torch.inference_mode():  # NCHW: one pass, and its rounding must not depend on the batch
            logits = model(x).detach().clone()
    check_outputs(logits)
    targets = resolve_target(logits, target, model.labels)
    return Prepared(model=model, x=x, targets=targets, logits=logits)


# --- channels-last inputs ---------------------------------------------------------------------------
def fast_layout(model: Any, x: Tensor) -> Tensor:
    """x (B,C,H,W) with channels-last strides when that makes ``model`` faster and is proven safe, else x.

    Only for CPU torch modules with 2-D convolutions taking NCHW input: oneDNN runs them ~1.3-1.5x
    faster on NHWC memory (DESIGN.md). The values are the same; gradients flow back through the copy.
    Whether the layout is safe is decided once per net by ``models.adapter.channels_last_safe``.
    """
    clf = model if isinstance(model, Classifier) else getattr(model, "model", None)  # or a method's own pass
    if not isinstance(clf, Classifier) or x.dim() != 4 or x.device.type != "cpu" or clf.net is None or clf.layout != "NCHW":
        return x
    return x.contiguous(memory_format=torch.channels_last) if channels_last_safe(clf, x) else x


# --- the recorded clean pass ------------------------------------------------------------------------
@dataclass
class _CleanPass:
    """A forward at the clean x with autograd recording, by ``runner`` (the model or a method's own
    pass): x as given, the leaf it ran on, logits (N,K)."""

    runner: Any
    x: Tensor
    version: int
    state: tuple
    leaf: Tensor
    logits: Tensor


_held = threading.local()  # .clean: the one recorded pass of this thread, or None


def _release() -> None:
    _held.clean = None


on_forward_only(_release)  # a forward-only batch run means the recorded pass will not be used


@contextmanager
def gradient_method(needs_grad: bool) -> Iterator[None]:
    """Scope of one registered method call (``registry.register`` enters it): ``prepare`` records its
    forward only inside a gradient method, so forward-only methods never build a graph. The recorded
    pass is released when the call ends."""
    saved = getattr(_held, "grad_method", False)
    _held.grad_method = bool(needs_grad)
    try:
        yield
    finally:
        _held.grad_method = saved
        _release()


def _worth_recording(model: Classifier, x: Tensor) -> bool:
    """Record inside a gradient method when a gradient pass over x would be one engine batch
    (memory: one batch at most)."""
    if not getattr(_held, "grad_method", False) or not model.differentiable or torch.is_inference_mode_enabled():
        return False
    return x.shape[0] <= default_batch_size(model, model.input_size, grad=True)


def _recorded_forward(model: Classifier, x: Tensor, through: Any = None) -> Tensor | None:
    """Logits (N,K) at x, detached; keeps the graph for one reuse at the same x (see ``prepare``)."""
    _release()
    runner = model if through is None else through
    leaf = fast_layout(model, x).detach().requires_grad_(getattr(runner, "input_grad", True))
    with torch.enable_grad():
        logits = runner(leaf)
    if not logits.requires_grad:  # the model cut the graph (e.g. runs under no_grad itself)
        return None
    _held.clean = _CleanPass(runner, x, x._version, _state(model), leaf, logits)
    return logits.detach().clone()


def _state(model: nn.Module) -> tuple:
    """What must not change between the recorded forward and its reuse: parameter and buffer
    versions (in-place edits, e.g. randomisation) and the number of hooks on every module."""
    versions = hooks = 0
    for m in model.modules():  # one walk (parameters() and buffers() would walk again each)
        versions += sum(t._version for t in m._parameters.values() if t is not None)
        versions += sum(t._version for t in m._buffers.values() if t is not None)
        hooks += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return versions, hooks


def take_recorded(runner: Any, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """(leaf, logits with their graph) of the pass ``prepare`` recorded with ``runner`` at exactly
    this x (same rows, data, model state), else None; released either way, so it is used once."""
    clean = getattr(_held, "clean", None)
    _release()
    if clean is None or clean.runner is not runner:
        return None
    same = (x.data_ptr() == clean.x.data_ptr() and x.shape == clean.x.shape and x.stride() == clean.x.stride()
            and x.dtype == clean.x.dtype and x._version == clean.version)
    model = getattr(runner, "model", runner)
    return (clean.leaf, clean.logits) if same and _state(model) == clean.state else None


def input_gradients(model: Classifier, x: Tensor, targets: Tensor, output: str = "logit") -> tuple[Tensor, Tensor]:
    """d score / d x for one batch. x: (B,C,H,W), targets: (B,). Returns (gradients (B,C,H,W), scores (B,)).

    Rows are independent (eval mode, no batch statistics), so summing the scores before backward
    gives every row its own gradient in one pass. At the x ``prepare`` just ran, its recorded
    forward is reused (no second forward).
    """
    clean = take_recorded(model, x)
    if clean is not None:
        leaf, logits = clean
        clf = model if isinstance(model, Classifier) else model.model  # or a method's own pass (propagation)
        scores = target_scores(logits, targets, output, binary=clf.binary)
    else:
        leaf = fast_layout(model, x.detach()).detach().requires_grad_(True)
        scores = model.score(leaf, targets, output)
    (grads,) = torch.autograd.grad(scores.sum(), leaf)
    return grads.detach().contiguous(), scores.detach()


def score_gradients(
    model: Classifier, x: Tensor, targets: Tensor, tensors_of: Callable[[], Sequence[Tensor]], output: str = "logit",
) -> tuple[list[Tensor | None], Tensor]:
    """d score / d t for tensors ``t`` made during the forward of x (a layer's activations recorded by
    ``hooks.tap``). x: (B,C,H,W), targets: (B,). ``tensors_of()`` is called after the forward.

    Returns (one gradient per tensor, None where the score does not depend on it; scores (B,)).
    Rows are independent, so the summed score gives every row its own gradient in one pass.
    """
    _release()  # hooks tap this forward: the recorded clean pass has none of them
    scores = model.score(fast_layout(model, x), targets, output)
    wrt = list(tensors_of())
    grads = torch.autograd.grad(scores.sum(), wrt, allow_unused=True) if wrt else ()
    return [None if g is None else g.detach() for g in grads], scores.detach()


def gradients_over(
    model: Classifier,
    n_items: int,
    build: Callable[[int, int], tuple[Tensor, Tensor]],
    consume: Callable[[int, int, Tensor, Tensor, Tensor], None],
    *,
    output: str = "logit",
    batch_size: int | None = None,
    desc: str | None = None,
) -> None:
    """Gradients at ``n_items`` lazily built inputs, one engine batch at a time.

    build(start, stop) -> (inputs (B,C,H,W), targets (B,)); consume(start, stop, inputs, grads, scores)
    folds each batch into the caller's running result, so memory stays one batch.
    """

    def step(start: int, stop: int) -> None:
        inputs, targets = build(start, stop)
        grads, scores = input_gradients(model, inputs, targets, output)
        consume(start, stop, inputs.detach(), grads, scores)

    map_batches(step, n_items, batch_size=batch_size, grad=True, model=model,
                item_shape=model.input_size, consume=lambda *_: None, desc=desc)


def scores_over(
    model: Classifier,
    n_items: int,
    build: Callable[[int, int], tuple[Tensor, Tensor]],
    *,
    output: str = "logit",
    batch_size: int | None = None,
    desc: str | None = None,
) -> Tensor:
    """Scores (n_items,) at lazily built inputs, no gradients (``inference_mode``), one batch in memory."""

    def step(start: int, stop: int) -> Tensor:
        inputs, targets = build(start, stop)
        return model.score(fast_layout(model, inputs), targets, output).float()

    return map_batches(step, n_items, batch_size=batch_size, grad=False, model=model,
                       item_shape=model.input_size, desc=desc)


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from a seed (None: fresh entropy). Sampling on CPU keeps results identical across devices."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
