"""Sanity checks: does an explanation method respond to what it claims to explain?

Each check is ``check(model, x, method="saliency", target="predicted", *, <settings>, **method_kwargs)
-> SanityResult`` (a table of rows, ``passed`` and a one-sentence ``verdict``; ``.to_text()``, ``.plot()``).
The user's model is never edited: checks that change weights work on a deep copy. Every check runs
guarded as methods do (``models.adapter.guarded``: one call at a time per model, eval mode, frozen
parameters, all restored afterwards, also on error).

* ``model_randomization`` — cascading / independent parameter randomisation (Adebayo et al., 2018)
* ``random_logit`` — explanation of a random other class (Sixt et al., 2020)
* ``input_invariance`` — constant input shift absorbed by the first layer (padded convolutions included) (Kindermans et al., 2019)
* ``fragility`` — small noise that keeps the prediction but moves the map (Ghorbani et al., 2019)
"""

from __future__ import annotations

from ..methods.registry import Registry
from ..models.adapter import guarded
from .fragility import fragility
from .invariance import input_invariance, shift_compensated
from .randomization import SIMILARITIES, hog, model_randomization, random_logit, spearman, spearman_signed, ssim

# the public checks are the guarded ones (the bodies in the submodules stay plain functions)
model_randomization, random_logit = guarded(model_randomization), guarded(random_logit)
input_invariance, fragility = guarded(input_invariance), guarded(fragility)

CHECKS: Registry = Registry("sanity check")
for _fn in (model_randomization, random_logit, input_invariance, fragility):
    CHECKS.add(_fn.__name__, _fn)

__all__ = ["CHECKS", "SIMILARITIES", "model_randomization", "random_logit", "input_invariance", "fragility",
           "shift_compensated", "spearman", "spearman_signed", "ssim", "hog"]
