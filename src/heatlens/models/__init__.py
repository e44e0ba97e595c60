"""Model adapters: ``Classifier`` over torch modules, Keras 3 files and black-box functions."""

from .adapter import Classifier, as_classifier, wrap
from .preprocessing import Preprocessing, load_image

__all__ = ["Classifier", "Preprocessing", "as_classifier", "load_image", "wrap", "load_model"]


def load_model(name_or_path, **kwargs):
    """A pretrained model by name (``"efficientnet-lite0"``) or a Keras 3 ``.keras`` file -> Classifier."""
    from .zoo import load_model as _load

    return _load(name_or_path, **kwargs)
