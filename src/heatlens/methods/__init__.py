"""Explanation methods. Every method has the same shape::

    method(model, x, target="predicted", *, <hyperparameters>, batch_size=None, seed=None) -> Explanation

Shared arguments (documented here once):

model
    A ``heatlens.Classifier`` (``heatlens.wrap`` / ``heatlens.load_model``) or a bare ``nn.Module``
    taking (N,C,H,W) and returning logits. Black-box predict functions work with the perturbation
    and surrogate methods; gradient methods refuse them with a clear error.
x
    (N,C,H,W) float tensor in model input space (``model.preprocess(images)``).
target
    ``"predicted"`` (argmax at the clean x), an int for all images, a per-image sequence or LongTensor
    (N,), or a class name. Resolved once, at the clean input.
output
    The explained quantity: ``"logit"`` (default) or ``"probability"`` (softmax) of the target.
batch_size
    Items per model call; None lets ``heatlens.batching`` choose for throughput.
seed
    int, ``torch.Generator`` or None, for methods that sample. Same seed -> identical attributions.

Attributions are raw and signed: (N,C,H,W) in input space, or (N,1,h,w) for CAMs. Reduction,
upsampling and normalisation are views: ``Explanation.maps(reduce=...)`` / ``.normalize()``.
"""

from __future__ import annotations

import importlib

from .registry import METHODS, get_method, method_info, register
from .smoothing import smooth, smoothgrad, smoothgrad_sq, vargrad
from .gradient import input_x_gradient, saliency
from .path import expected_gradients, gradient_shap, integrated_gradients

# Families added by later modules register themselves on import; a missing optional family must not
# break the ones that are there.
_FAMILIES = ("propagation", "cam", "perturbation", "surrogate", "segmentation", "adversarial", "counterfactual",
             "transformer")
for _family in _FAMILIES:
    try:
        _module = importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as _err:  # the family file is not there yet
        if _err.name != f"{__name__}.{_family}":
            raise
        continue
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)


def names(**where: object) -> list[str]:
    """Registered method names, optionally filtered by metadata (``names(family="cam")``)."""
    return METHODS.names(**where)


def describe() -> list[tuple[str, str, str]]:
    """(name, family, one-line description) for every registered method."""
    return [(e.name, e.meta.get("family", ""), e.description) for e in METHODS.entries()]
