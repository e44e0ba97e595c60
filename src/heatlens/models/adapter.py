"""``Classifier``: one interface over PyTorch modules, Keras 3 models and black-box predict functions.

Methods only ever see a ``Classifier``: ``forward(x)`` takes model-space (N,C,H,W) float tensors and
returns logits (N,K); models that output probabilities are wrapped with ``outputs="probabilities"``
and expose log-probabilities as logits, so ``softmax(logits)`` is their output exactly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..validation import check_choice
from .hooks import frozen
from .preprocessing import Preprocessing

Output = Literal["logit", "probability"]


def target_scores(logits: Tensor, targets: Tensor, output: Output = "logit") -> Tensor:
    """The explained quantity (N,) from logits (N,K) already computed: the target's logit, or its
    softmax probability (``Classifier.score`` without running the model)."""
    if output == "probability":
        logits = logits.softmax(1)
    elif output != "logit":
        check_choice(output, "output", ("logit", "probability"))
    return logits.gather(1, targets.reshape(-1, 1)).squeeze(1)


class Classifier(nn.Module):
    """A classifier heatlens can explain.

    net: an ``nn.Module`` (differentiable) or ``None`` when ``predict_fn`` is a black box.
    input_size: (C,H,W) of one model input. labels: class names (index -> name) or None.
    preprocessing: turns images into model input (``preprocess``) and back (``deprocess``).
    outputs: what the wrapped model returns, ``"logits"`` or ``"probabilities"``.
    layout: what the wrapped model takes, ``"NCHW"`` or ``"NHWC"`` (Keras); methods always give NCHW.
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
        self._num_classes: int | None = None

    # --- what methods call -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Model-space input (N,C,H,W) -> logits (N,K) (log-probabilities for probability models)."""
        if self.net is None:
            return self._black_box(x)
        inp = x.permute(0, 2, 3, 1) if self.layout == "NHWC" else x
        out = self.net(inp)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.dim() != 2:
            out = out.reshape(out.shape[0], -1)
        if self.outputs == "probabilities":
            out = out.clamp_min(1e-12).log()
        return out

    def score(self, x: Tensor, targets: Tensor, output: Output = "logit") -> Tensor:
        """The explained quantity (N,): the target's logit, or its softmax probability."""
        return target_scores(self(x), targets, output)

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
        if self._num_classes is None:
            probe = torch.zeros((1, *self.input_size), device=self.device)
            with torch.inference_mode():
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
        if out.dim() == 1:
            out = out[:, None]
        if out.shape[0] != x.shape[0]:
            raise ValueError(f"predict_fn returned {out.shape[0]} rows for {x.shape[0]} inputs")
        if self.outputs == "probabilities":
            out = out.clamp_min(1e-12).log()
        return out

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
) -> Classifier:
    """Make anything classifier-like explainable.

    * ``nn.Module`` taking (N,C,H,W) (``layout="NHWC"`` for channels-last models) and returning logits.
      A module that returns probabilities is refused with a clear error unless ``outputs="probabilities"``.
    * a function ``numpy (N,C,H,W) float32 -> (N,K)`` (probabilities or logits, detected when
      ``outputs`` is None); works with every black-box method (occlusion, LIME, KernelSHAP, RISE, metrics).
    * a Keras 3 model (torch backend): layout and input_size default to the model's own (``models.keras``).
    layout: ``"NCHW"`` (default) or ``"NHWC"``.
    """
    if isinstance(model, Classifier):
        return model
    from .keras import is_keras_model

    if is_keras_model(model):
        from .keras import wrap_keras

        return wrap_keras(model, input_size=input_size, labels=labels, preprocessing=preprocessing,
                          outputs=outputs, layout=layout, name=name)
    layout = layout or "NCHW"
    if input_size is None:
        raise ValueError("input_size is required: the (C,H,W) of one model input, e.g. input_size=(3, 224, 224)")
    size = _check_input_size(input_size)
    if isinstance(model, nn.Module):
        clf = Classifier(model, input_size=size, labels=labels, preprocessing=preprocessing,
                         outputs=outputs or "logits", layout=layout, name=name)
        if outputs is None and _looks_like_probabilities(clf):
            raise ValueError(
                "model returns probabilities (non-negative rows summing to 1), not logits: gradients of a "
                "softmax output saturate and mislead. Remove the final softmax layer, or pass "
                "outputs='probabilities' to explain the probabilities anyway"
            )
        return _check_labels(clf)
    if callable(model):
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
    """Probe with two inputs in the valid range: do the rows look like a probability simplex?"""
    gen = torch.Generator().manual_seed(0)
    low, high = clf.input_range
    probe = (low + (high - low) * torch.rand((2, *clf.input_size), generator=gen).to(low.device))
    saved = clf.outputs
    clf.outputs = "logits"  # read the raw output
    try:
        # frozen restores every submodule's own mode (a mixed train/eval tree too), also on error
        with frozen(clf), torch.inference_mode():
            out = clf(probe).float()
    finally:
        clf.outputs = saved
    if out.shape[1] < 2:
        return False
    return bool((out >= 0).all() and torch.allclose(out.sum(1), torch.ones(out.shape[0], device=out.device), atol=1e-4))


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be (C,H,W) with positive entries, got {tuple(input_size)!r}")
    return size  # type: ignore[return-value]


# wrappers of bare modules, per module and input size (the probability probe runs once)
_wrapped: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Classifier]]" = weakref.WeakKeyDictionary()


def as_classifier(model: Any, x: Any = None) -> Classifier:
    """``model`` as a Classifier: passed through, or a bare ``nn.Module`` wrapped for inputs shaped like ``x``.

    Wrappers of bare modules are cached per module and input size, so the logits-vs-probabilities
    probe runs once.
    """
    if isinstance(model, Classifier):
        return model
    if isinstance(model, nn.Module):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError("x must be an (N,C,H,W) tensor when model is a bare nn.Module (or use heatlens.wrap)")
        size = tuple(int(s) for s in x.shape[1:])
        per_module = _wrapped.setdefault(model, {})
        if size not in per_module:
            try:
                per_module[size] = wrap(model, input_size=size)
            except RuntimeError as err:
                # the probe ran the module on x's shape; channels-last x fails inside the first layer
                if size[-1] in (1, 3) and size[0] not in (1, 3):
                    raise ValueError(
                        f"x looks channels-last (N,H,W,C) {tuple(x.shape)} but the model takes (N,C,H,W): "
                        f"it failed with {err}; pass x.permute(0, 3, 1, 2)"
                    ) from err
                raise
        return per_module[size]
    if callable(model):
        raise TypeError("a predict function must be wrapped first: heatlens.wrap(predict_fn, input_size=(C, H, W))")
    raise TypeError(f"model must be a heatlens Classifier or an nn.Module, got {type(model).__name__}")

