"""Keras 3 models under Keras's torch backend: a loaded Keras model *is* a ``torch.nn.Module``.

Keras models take channels-last (N,H,W,C) input; the ``Classifier`` is built with ``layout="NHWC"``
so methods always see (N,C,H,W). Keras is imported lazily, and only with the torch backend
(``KERAS_BACKEND=torch`` is set here when keras has not been imported yet).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .adapter import Classifier, _check_input_size, _looks_like_probabilities
from .preprocessing import Preprocessing


def import_keras() -> Any:
    """The ``keras`` module, imported with the torch backend.

    Raises RuntimeError when keras was already imported with another backend (the backend is
    fixed at keras's first import), ImportError when keras 3 is not installed.
    """
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError:
        raise ImportError("loading Keras models needs Keras 3: pip install 'keras>=3'") from None
    major = int(str(getattr(keras, "__version__", "0")).split(".")[0])
    if major < 3:
        raise ImportError(f"loading Keras models needs Keras 3 (torch backend), found keras {keras.__version__}")
    backend = keras.backend.backend()
    if backend != "torch":
        raise RuntimeError(
            f"keras was already imported with the {backend!r} backend, but heatlens runs Keras models on "
            "the 'torch' backend; set os.environ['KERAS_BACKEND'] = 'torch' before keras is first imported "
            "(the backend cannot change after that)"
        )
    return keras


def is_keras_model(obj: object) -> bool:
    """True for a Keras 3 model or layer object (checked without importing keras)."""
    return any(cls.__module__.split(".")[0] == "keras" for cls in type(obj).__mro__)


def load_keras(
    path: str | os.PathLike,
    *,
    input_size: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    outputs: str | None = None,
) -> Classifier:
    """Load a Keras 3 ``.keras`` file as a Classifier (torch backend, NHWC handled inside).

    A final softmax (a layer's ``activation="softmax"`` or a ``Softmax`` layer) is switched to linear,
    as keras-explainable does, so heatlens explains logits; ``Classifier.softmax_removed`` names the
    layer (None when there was none). input_size (C,H,W) is read from the model's input shape unless
    given. preprocessing defaults to pixels in [0, 1] at the model's size.
    """
    keras = import_keras()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {str(p)!r} does not exist")
    try:
        model = keras.saving.load_model(p, compile=False)
    except Exception as err:  # Keras raises many kinds (zip, JSON, deserialisation errors)
        raise ValueError(f"model file {str(p)!r} is not a readable Keras 3 model: {err}") from err
    removed = strip_softmax(model)
    clf = wrap_keras(model, input_size=input_size, labels=labels, preprocessing=preprocessing,
                     outputs=outputs, name=model.name)
    clf.softmax_removed = removed
    return clf


def wrap_keras(
    model: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    outputs: str | None = None,
    layout: str | None = None,
    name: str | None = None,
) -> Classifier:
    """An in-memory Keras 3 model (torch backend) as a Classifier; ``heatlens.wrap`` calls this.

    layout defaults to Keras's ``image_data_format`` (channels_last -> "NHWC"); input_size (C,H,W) to
    the model's input shape. The model is not edited: one that ends in a softmax is refused, as in
    ``wrap``, unless ``outputs="probabilities"``.
    """
    keras = import_keras()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a Keras 3 model on the torch backend, got {type(model).__name__}")
    if layout is None:
        layout = "NHWC" if keras.config.image_data_format() == "channels_last" else "NCHW"
    size = _keras_input_size(model, layout, input_size)
    clf = Classifier(model, input_size=size, labels=labels, preprocessing=preprocessing,
                     outputs=outputs or "logits", layout=layout, name=name or getattr(model, "name", None))
    clf.softmax_removed = None
    if outputs is None and _looks_like_probabilities(clf):
        raise ValueError(
            "model returns probabilities (non-negative rows summing to 1), not logits: gradients of a "
            "softmax output saturate and mislead. Switch the last layer to linear "
            "(model.layers[-1].activation = keras.activations.linear), load the saved file with "
            "heatlens.load_model(path), which does that, or pass outputs='probabilities'"
        )
    return clf


def strip_softmax(model: Any) -> str | None:
    """Switch a final softmax of ``model`` to linear in place; returns the edited layer's name or None.

    Handles ``Dense(..., activation="softmax")`` (any layer with an ``activation``), ``Activation("softmax")``
    and ``Softmax()`` as the model's last layer.
    """
    keras = import_keras()
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    last = layers[-1]
    if getattr(getattr(last, "activation", None), "__name__", None) == "softmax":
        last.activation = keras.activations.linear
        return last.name
    if isinstance(last, keras.layers.Softmax):
        # a Softmax layer has no activation attribute: make its call the identity (this instance only)
        last.call = lambda inputs, mask=None: inputs
        return last.name
    return None


def _keras_input_size(model: Any, layout: str, input_size: Sequence[int] | None) -> tuple[int, int, int]:
    """(C,H,W) from the model's single input shape, checked against ``input_size`` when both exist."""
    shape = _single_input_shape(model)
    known = None
    if shape is not None and len(shape) == 4 and None not in shape[1:]:
        h_w_c = shape[1:] if layout == "NHWC" else (shape[2], shape[3], shape[1])
        known = (int(h_w_c[2]), int(h_w_c[0]), int(h_w_c[1]))
    if input_size is None:
        if known is None:
            raise ValueError(
                f"input_size is required: the model's input shape {shape} does not fix (C,H,W); "
                "pass input_size=(C, H, W)"
            )
        return known
    size = _check_input_size(input_size)
    if known is not None and size != known:
        raise ValueError(f"input_size {size} does not match the model's input shape {shape} (C,H,W)={known}")
    return size


def _single_input_shape(model: Any) -> tuple | None:
    inputs = getattr(model, "inputs", None)
    if inputs is not None and len(inputs) > 1:
        raise ValueError(f"heatlens explains single-input image models; this Keras model has {len(inputs)} inputs")
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):  # a subclassed model that was never built has none
        return None
    return tuple(shape) if shape is not None else None
