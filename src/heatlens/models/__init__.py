"""Model adapters: ``Classifier`` over torch modules, Keras 3 files and black-box functions."""

from .adapter import Classifier, as_classifier, wrap
from .preprocessing import Preprocessing, load_image

__all__ = ["Classifier", "Preprocessing", "as_classifier", "load_image", "wrap", "load_model"]


def load_model(spec, **kwargs):
    """A model by zoo name, ``.keras``/``.pt2`` file or ``"package.module:function"`` -> Classifier (``zoo.load_model``)."""
    from .zoo import load_model as _load

    return _load(spec, **kwargs)
