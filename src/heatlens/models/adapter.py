"""``Classifier``: one interface over PyTorch modules, Keras 3 models and black-box predict functions.

Methods only ever see a ``Classifier``: ``forward(x)`` takes model-space (N,C,H,W) float tensors and
returns logits (N,K); models that output probabilities are wrapped with ``outputs="probabilities"``
and expose log-probabilities as logits, so ``softmax(logits)`` is their output exactly.

The model contract (docs/models.md):

* outputs: a tensor (N,K); an object with ``.logits`` or a dict with key ``"logits"`` (Hugging Face),
  taken automatically; any other tuple / dict / object needs ``wrap(..., select=...)``: heatlens never
  guesses which element holds the logits.
* one logit per image ((N,) or (N,1), a binary head) is seen as two classes, logits ``[0, z]``: class 1
  is the positive class (``softmax`` gives ``sigmoid(z)``), class 0 the negative (``1 - sigmoid(z)``);
  the explained logit of a target is its log-odds, ``z`` for target 1 and ``-z`` for target 0
  (pytorch-grad-cam's ``BinaryClassifierOutputTarget``), never a constant.
* dtypes: the model runs in its own floating dtype (float64, float16, bfloat16): a floating x is cast to
  it on the way in (gradients flow back to x in x's dtype) and logits come back in at least float32.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..validation import check_choice
from .hooks import guard
from .preprocessing import Preprocessing

Output = Literal["logit", "probability"]
Select = Union[int, str, Callable[[Any], Tensor], None]


def class_scores(logits: Tensor, output: Output = "logit", *, binary: bool = False) -> Tensor:
    """The explained quantity of every class (N,K) from logits (N,K): the logits, or the softmax.

    binary: the logits are a one-logit model's two-class view ``[0, z]`` (``Classifier.binary``): a
    class's logit is then its log-odds, ``-z`` for class 0 and ``z`` for class 1."""
    if output == "probability":
        return logits.softmax(1)
    if output != "logit":
        check_choice(output, "output", ("logit", "probability"))
    return logits - logits.flip(1) if binary else logits


def target_scores(logits: Tensor, targets: Tensor, output: Output = "logit", *, binary: bool = False) -> Tensor:
    """The explained quantity (N,) from logits (N,K) already computed: the target's logit (log-odds
    for a binary head, see ``class_scores``), or its softmax probability (``Classifier.score``
    without running the model)."""
    return class_scores(logits, output, binary=binary).gather(1, targets.reshape(-1, 1)).squeeze(1)


def select_logits(out: Any, select: Select = None) -> Tensor:
    """The class scores in a model's raw output: ``select`` (an index, a key or attribute name, or a
    function ``out -> Tensor``) when given; otherwise a tensor itself, or ``out.logits`` /
    ``out["logits"]`` (Hugging Face). Anything else raises a ``TypeError`` saying what to pass."""
    if select is not None:
        if callable(select):
            picked = select(out)
        elif isinstance(select, str):
            picked = out[select] if isinstance(out, Mapping) and select in out else getattr(out, select, None)
            if picked is None:
                raise TypeError(f"select={select!r}: the model's {type(out).__name__} output has no such key or attribute")
        else:
            picked = out[select]
        if not isinstance(picked, Tensor):
            raise TypeError(f"select={select!r} picked a {type(picked).__name__} from the model's output, not a tensor")
        return picked
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)  # Hugging Face ModelOutput, or any object with .logits
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping):
        keys = list(out)
        raise TypeError(
            f"model returns a {type(out).__name__} with keys {keys} and no 'logits': pass the key of the "
            f"class scores, e.g. heatlens.wrap(model, input_size=(C, H, W), select={keys[0]!r})"
        )
    if isinstance(out, (tuple, list)):
        shapes = ", ".join(str(tuple(o.shape)) if isinstance(o, Tensor) else type(o).__name__ for o in out)
        raise TypeError(
            f"model returns a {type(out).__name__} of {len(out)} outputs ({shapes}); heatlens does not guess which "
            "holds the logits: pass its index, e.g. heatlens.wrap(model, input_size=(C, H, W), select=1)"
        )
    raise TypeError(
        f"model returns a {type(out).__name__}, not a tensor: pass select= to heatlens.wrap (an index, a key or "
        "attribute name, or a function output -> (N,K) tensor)"
    )


class Classifier(nn.Module):
    """A classifier heatlens can explain.

    net: an ``nn.Module`` (differentiable) or ``None`` when ``predict_fn`` is a black box.
    input_size: (C,H,W) of one model input. labels: class names (index -> name) or None.
    preprocessing: turns images into model input (``preprocess``) and back (``deprocess``).
    outputs: what the wrapped model returns, ``"logits"`` or ``"probabilities"``.
    layout: what the wrapped model takes, ``"NCHW"`` or ``"NHWC"`` (Keras); methods always give NCHW.
    select: where the class scores are in the model's output (``select_logits``).
    ``training`` is the wrapped net's mode (Quantus, for one, refuses a model that says it trains).
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        *,
        input_size: Sequence[int],
        predict_fn: Callable[[np.ndarray], Any] | None = None,
        labels: Sequence[str] | None = None,
        preprocessing: Preprocessing | None = None,
        outputs: str = "logits",
        layout: str = "NCHW",
        name: str | None = None,
        select: Select = None,
    ) -> None:
        super().__init__()
        if (net is None) == (predict_fn is None):
            raise ValueError("Classifier needs exactly one of net (an nn.Module) or predict_fn (a function)")
        self.input_size = _check_input_size(input_size)
        self.net = net
        self.predict_fn = predict_fn
        self.labels = tuple(str(lab) for lab in labels) if labels is not None else None
        c, h, w = self.input_size
        self.preprocessing = preprocessing or Preprocessing(size=(h, w), mean=(0.0,) * c, std=(1.0,) * c, channels=c)
        self.outputs = check_choice(outputs, "outputs", ("logits", "probabilities"))
        self.layout = check_choice(layout, "layout", ("NCHW", "NHWC"))
        self.name = name or (type(net).__name__ if net is not None else getattr(predict_fn, "__name__", "predict_fn"))
        self.select = _check_select(select)
        self._num_classes: int | None = None
        self._raw_classes: int | None = None  # scores per image the model itself returns (1: binary head)

    @property
    def training(self) -> bool:  # type: ignore[override]
        """The wrapped net's mode (the wrapper's own flag for a black box)."""
        net = self.__dict__.get("_modules", {}).get("net")
        return bool(net.training) if net is not None else self.__dict__.get("_own_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        # nn.Module.__init__ and .train() set the wrapper's flag; .train() then sets the net's own
        self.__dict__["_own_training"] = bool(mode)

    # --- what methods call -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Model-space input (N,C,H,W) -> logits (N,K) (log-probabilities for probability models).

        x of any floating dtype runs in the model's dtype; logits are at least float32. A one-logit
        model gives the two-class view (N,2) (see the module docstring)."""
        if self.net is None:
            return self._black_box(x)
        dtype = self.dtype
        inp = x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
        inp = inp.permute(0, 2, 3, 1) if self.layout == "NHWC" else inp
        return self._as_logits(select_logits(self.net(inp), self.select), x.shape[0])

    def _as_logits(self, out: Tensor, n: int) -> Tensor:
        """The model's scores (N,), (N,K) or (N,...) -> logits (N,K), float32 or wider."""
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(f"model returned scores of shape {tuple(out.shape)} for {n} inputs: expected ({n}, K)")
        out = out.reshape(n, -1)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        self._raw_classes = int(out.shape[1])
        if out.shape[1] == 1:  # binary head: two classes, [0, z] (or [log(1-p), log p])
            if self.outputs == "probabilities":
                p = out.clamp(1e-12, 1 - 1e-12)
                return torch.cat([torch.log1p(-p), p.log()], 1)
            return torch.cat([torch.zeros_like(out), out], 1)
        if self.outputs == "probabilities":
            out = out.clamp_min(1e-12).log()
        return out

    def score(self, x: Tensor, targets: Tensor, output: Output = "logit") -> Tensor:
        """The explained quantity (N,): the target's logit (its log-odds for a binary head), or its
        softmax probability."""
        logits = self(x)
        return target_scores(logits, targets, output, binary=self._raw_classes == 1)

    @property
    def binary(self) -> bool:
        """The model returns one logit per image (its classes are the two-class view, see module docs)."""
        if self._raw_classes is None:
            self.num_classes  # noqa: B018 - the probe records it
        return self._raw_classes == 1

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the wrapped net computes in (its first floating parameter or buffer)."""
        if self.net is not None:
            for tensors in (self.net.parameters(), self.net.buffers()):
                for t in tensors:
                    if t.is_floating_point():
                        return t.dtype
        return torch.float32

    @property
    def differentiable(self) -> bool:
        return self.net is not None

    def require_gradients(self, method: str) -> None:
        """Raise when a gradient method is asked of a black-box predict function."""
        if not self.differentiable:
            raise TypeError(
                f"method {method!r} needs gradients, but model is a black-box predict function; "
                "use a perturbation method instead (occlusion, feature_ablation, lime, kernel_shap, rise)"
            )

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def num_classes(self) -> int:
        if self._num_classes is None or self._raw_classes is None:
            probe = torch.zeros((1, *self.input_size), device=self.device)
            with guard(self), torch.inference_mode():  # eval mode: the probe must not touch BatchNorm statistics
                self._num_classes = int(self(probe).shape[1])
        return self._num_classes

    # --- images in and out --------------------------------------------------------------------
    def preprocess(self, images: Any) -> Tensor:
        """Images (paths, PIL, HWC arrays, tensors in [0,1] or uint8) -> model input (N,C,H,W) on the model's device."""
        return self.preprocessing(images).to(self.device)

    def deprocess(self, x: Tensor) -> np.ndarray:
        """Model input (N,C,H,W) -> displayable images (N,H,W,C) float in [0, 1]."""
        return self.preprocessing.inverse(x)

    @property
    def input_range(self) -> tuple[Tensor, Tensor]:
        """Per-channel (low, high) of valid inputs in model space, each (1,C,1,1) on the model's device."""
        low, high = self.preprocessing.input_range
        return low.to(self.device), high.to(self.device)

    def pixel_baseline(self, value: float) -> Tensor:
        """The model-space value (1,C,1,1) of a constant pixel ``value`` in [0,1]: 0 black, 1 white."""
        return self.preprocessing.to_model_space(value).to(self.device)

    def _black_box(self, x: Tensor) -> Tensor:
        arr = x.detach().float().cpu()
        if self.layout == "NHWC":
            arr = arr.permute(0, 2, 3, 1)
        out = self.predict_fn(np.ascontiguousarray(arr.numpy()))
        out = torch.as_tensor(np.asarray(out), dtype=torch.float32, device=x.device)
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(f"predict_fn returned {tuple(out.shape)} for {x.shape[0]} inputs: expected ({x.shape[0]}, K)")
        return self._as_logits(out, x.shape[0])

    def extra_repr(self) -> str:
        kind = "module" if self.differentiable else "black-box function"
        return f"name={self.name!r}, {kind}, input_size={self.input_size}, outputs={self.outputs!r}"


def wrap(
    model: nn.Module | Callable[[np.ndarray], Any] | Classifier,
    *,
    input_size: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    outputs: str | None = None,
    layout: str | None = None,
    name: str | None = None,
    select: Select = None,
) -> Classifier:
    """Make anything classifier-like explainable.

    * ``nn.Module`` taking (N,C,H,W) (``layout="NHWC"`` for channels-last models) and returning logits.
      A module that returns probabilities is refused with a clear error unless ``outputs="probabilities"``.
    * a function ``numpy (N,C,H,W) float32 -> (N,K)`` (probabilities or logits, detected when
      ``outputs`` is None); works with every black-box method (occlusion, LIME, KernelSHAP, RISE, metrics).
    * a Keras 3 model (torch backend): layout and input_size default to the model's own (``models.keras``).
    * a ``transformers`` image classifier: input size, labels and preprocessing from its config (``models.hf``).
    layout: ``"NCHW"`` (default) or ``"NHWC"``.
    select: where the class scores are when the module returns a tuple, list, dict or object: an index
    (``select=1`` for ``(aux, logits)``), a key or attribute name, or a function ``output -> (N,K)``.
    ``.logits`` / ``["logits"]`` are taken without it; any other tuple or dict is refused, naming ``select``.
    One score per image ((N,) or (N,1)) is a binary head, seen as two classes (module docstring); one
    that is all in [0, 1] on the probe needs ``outputs`` said ("probabilities" for p(positive), or "logits").
    """
    if isinstance(model, Classifier):
        return model
    from .keras import is_keras_model

    if is_keras_model(model):
        from .keras import wrap_keras

        return wrap_keras(model, input_size=input_size, labels=labels, preprocessing=preprocessing,
                          outputs=outputs, layout=layout, name=name)
    from .hf import is_hf_model

    if is_hf_model(model):  # transformers ...ForImageClassification: size, labels, preprocessing from its config
        from .hf import wrap_hf

        return wrap_hf(model, input_size=input_size, labels=labels, preprocessing=preprocessing, name=name)
    layout = layout or "NCHW"
    if input_size is None:
        raise ValueError("input_size is required: the (C,H,W) of one model input, e.g. input_size=(3, 224, 224)")
    size = _check_input_size(input_size)
    if isinstance(model, nn.Module):
        clf = Classifier(model, input_size=size, labels=labels, preprocessing=preprocessing,
                         outputs=outputs or "logits", layout=layout, name=name, select=select)
        if outputs is None and _looks_like_probabilities(clf):
            raise ValueError(
                "model returns probabilities (non-negative rows summing to 1), not logits: gradients of a "
                "softmax output saturate and mislead. Remove the final softmax layer, or pass "
                "outputs='probabilities' to explain the probabilities anyway"
            )
        return _check_labels(clf)
    if callable(model):
        if select is not None:
            raise TypeError("select is for nn.Module outputs; a predict function must return (N,K) or (N,) scores")
        clf = Classifier(predict_fn=model, input_size=size, labels=labels, preprocessing=preprocessing,
                         outputs=outputs or "logits", layout=layout, name=name)
        if outputs is None and _looks_like_probabilities(clf):
            clf.outputs = "probabilities"
        return _check_labels(clf)
    raise TypeError(f"model must be an nn.Module, a Classifier or a predict function, got {type(model).__name__}")


def _check_labels(clf: Classifier) -> Classifier:
    """Refuse fewer class names than the model has outputs: a class beyond the list would have no name
    (and a name target could silently mean another class). More names are allowed (a one-logit head
    may be given the names of both of its classes)."""
    if clf.labels is not None and len(clf.labels) < clf.num_classes:
        raise ValueError(f"labels has {len(clf.labels)} names but the model has {clf.num_classes} outputs; "
                         "pass one name per class (index -> name)")
    return clf


def _looks_like_probabilities(clf: Classifier) -> bool:
    """Probe with inputs in the valid range (two random, all-low, all-high), in the model's own dtype:
    do the rows look like a probability simplex? One score per image all in [0, 1] is ambiguous
    (a sigmoid output or a small logit) and refused, naming ``outputs``."""
    gen = torch.Generator().manual_seed(0)
    low, high = clf.input_range
    shape = (1, *clf.input_size)
    probe = torch.cat([low + (high - low) * torch.rand((2, *clf.input_size), generator=gen).to(low.device),
                       low.expand(shape), high.expand(shape)])
    saved = clf.outputs
    clf.outputs = "logits"  # read the raw output
    try:
        # guard: eval mode (no BatchNorm update), every submodule's own mode restored, also on error
        with guard(clf), torch.inference_mode():
            logits = clf(probe)
            channels_last_safe(clf, probe, logits)  # the layout probe on the same inputs, once per net
    finally:
        clf.outputs = saved
    clf._num_classes = int(logits.shape[1])
    if clf._raw_classes == 1:
        z = logits[:, 1]
        if bool(((z >= 0) & (z <= 1)).all()):
            raise ValueError(
                "model returns one score per image, all in [0, 1] on the probe: pass outputs='probabilities' "
                "if it is the probability of the positive class (a final sigmoid), or outputs='logits' if it is a logit"
            )
        return False
    out = logits.float()
    eps = torch.finfo(clf.dtype).eps if clf.dtype.is_floating_point else 0.0
    atol = max(1e-4, 10 * eps)  # a bfloat16 softmax sums to 1 within a few of its ulps only
    return bool((out >= 0).all() and torch.allclose(out.sum(1), torch.ones(out.shape[0], device=out.device), atol=atol))


# Per net (weakly keyed, plain bools: forgotten with the net): may it take channels-last input?
_channels_last: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def channels_last_safe(model: Classifier, x: Tensor, reference: Tensor | None = None) -> bool:
    """Does ``model`` run channels-last input like x and give its NCHW logits? Decided once per net.

    A model without 2-D convolutions gains nothing (False, no probe). Otherwise the first rows of x
    (at most 4) run in both layouts (``reference``: their NCHW logits when already computed), in
    eval mode, without gradients; an error (``.view()`` on a channels-last activation) or a
    difference beyond rounding (rtol = atol relative to the output scale = sqrt(eps) of the model's
    dtype, 3.5e-4 in float32) keeps NCHW for good. Why a probe: the layout must never change what a
    model computes or whether it runs, and only running it can tell. ``wrap`` probes with its
    logits-vs-probabilities inputs, so explaining adds no forward.
    """
    net = model.net
    if net is None or model.layout != "NCHW":
        return False
    known = _channels_last.get(net)
    if known is not None:
        return known
    safe = False
    if any(isinstance(m, nn.Conv2d) for m in net.modules()):
        probe = x[:4].detach()
        with guard(model), torch.inference_mode():
            if reference is None:
                reference = model(probe.contiguous())
            try:
                fast = model(probe.contiguous(memory_format=torch.channels_last))
            except Exception:  # noqa: BLE001 - any failure means "not safe": the NCHW pass ran fine
                fast = None
        if fast is not None and fast.shape == reference.shape:
            ref, fast = reference.double(), fast.double()
            tol = float(torch.finfo(model.dtype).eps) ** 0.5
            safe = bool(torch.allclose(fast, ref, rtol=tol, atol=tol * (1.0 + float(ref.abs().max()))))
    _channels_last[net] = safe
    return safe


def _check_select(select: Select) -> Select:
    if select is None or callable(select) or isinstance(select, str):
        return select
    if isinstance(select, bool) or not isinstance(select, (int, np.integer)):
        raise TypeError(f"select must be an index, a key or attribute name, or a function, got {type(select).__name__}")
    return int(select)


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be (C,H,W) with positive entries, got {tuple(input_size)!r}")
    return size  # type: ignore[return-value]


# What the probe found for bare modules, per module and input size: (outputs, num_classes, raw classes).
# Plain values only: a cached Classifier would hold its module and keep the weak key alive forever.
_probed: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[str, int, int]]]" = weakref.WeakKeyDictionary()


def as_classifier(model: Any, x: Any = None) -> Classifier:
    """``model`` as a Classifier: passed through, or a bare ``nn.Module`` wrapped for inputs shaped like ``x``.

    What the logits-vs-probabilities probe finds is cached per module and input size (weakly: the
    module stays collectable), so it runs once; the wrapper itself is a fresh, cheap object.
    """
    if isinstance(model, Classifier):
        return model
    if isinstance(model, nn.Module):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError("x must be an (N,C,H,W) tensor when model is a bare nn.Module (or use heatlens.wrap)")
        size = tuple(int(s) for s in x.shape[1:])
        per_module = _probed.setdefault(model, {})
        if size in per_module:
            outputs, num_classes, raw = per_module[size]
            clf = Classifier(model, input_size=size, outputs=outputs)
            clf._num_classes, clf._raw_classes = num_classes, raw
            return clf
        try:
            clf = wrap(model, input_size=size)
        except RuntimeError as err:
            # the probe ran the module on x's shape; channels-last x fails inside the first layer
            if size[-1] in (1, 3) and size[0] not in (1, 3):
                raise ValueError(
                    f"x looks channels-last (N,H,W,C) {tuple(x.shape)} but the model takes (N,C,H,W): "
                    f"it failed with {err}; pass x.permute(0, 3, 1, 2)"
                ) from err
            raise
        per_module[size] = (clf.outputs, clf.num_classes, clf._raw_classes)
        return clf
    if callable(model):
        raise TypeError("a predict function must be wrapped first: heatlens.wrap(predict_fn, input_size=(C, H, W))")
    raise TypeError(f"model must be a heatlens Classifier or an nn.Module, got {type(model).__name__}")



def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(model, x, ...)`` (a metric, a sanity check, ``evaluate``) on ``model`` as a Classifier
    inside ``hooks.guard``: one call at a time per model, eval mode and frozen parameters, all
    restored afterwards, also on error. Methods get the same scope from ``methods.registry.register``."""

    @functools.wraps(fn)
    def call(model: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        if model is None:  # localisation and complexity metrics need no model
            return fn(model, x, *args, **kwargs)
        clf = as_classifier(model, x)
        with guard(clf):
            return fn(clf, x, *args, **kwargs)

    return call
