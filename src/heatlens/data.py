"""Sample data that ships inside installed packages, so demos and tests run offline.

``sample_images()``: natural photos from scikit-image (``chelsea`` the cat, ``coffee``, ``rocket``, ...)
as uint8 RGB (H,W,3) arrays. ``digits()``: scikit-learn's 1,797 real 8x8 handwritten digits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .validation import unknown_name

# scikit-image photos whose files are inside the wheel (no pooch download); grey ones are
# returned as RGB so every sample has the same (H,W,3) form
SAMPLES: dict[str, str] = {
    "chelsea": "a tabby cat (ImageNet: Egyptian cat / tabby)",
    "coffee": "a cup of coffee (ImageNet: espresso)",
    "rocket": "a rocket on the launch pad (ImageNet: missile)",
    "astronaut": "astronaut Eileen Collins",
    "camera": "a cameraman (greyscale)",
    "coins": "Greek coins (greyscale)",
    "moon": "the lunar surface (greyscale)",
    "hubble_deep_field": "the Hubble deep field",
    "immunohistochemistry": "an immunohistochemistry stain",
    "retina": "a human retina",
}


def sample_names() -> list[str]:
    """Names ``sample_images`` accepts."""
    return list(SAMPLES)


def sample_images(names: str | Sequence[str] = ("chelsea", "coffee", "rocket")) -> list[np.ndarray]:
    """Photos by name -> list of uint8 RGB arrays (H,W,3); sizes differ (``model.preprocess`` handles that).

    The default three are the ones efficientnet-lite0 classifies as Egyptian cat, espresso and missile.
    """
    from skimage import data as skdata

    if isinstance(names, str):
        names = (names,)
    images = []
    for name in names:
        if not isinstance(name, str) or name not in SAMPLES:
            raise unknown_name("sample image", str(name), list(SAMPLES))
        img = np.asarray(getattr(skdata, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        images.append(np.ascontiguousarray(img[:, :, :3], dtype=np.uint8))
    return images


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: images float32 (1797,8,8) in [0, 1], labels int64 (1797,) in 0..9.

    The raw pixels are counts 0..16 (ink in a 4x4 block of the 32x32 scan); they are divided by 16.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    return images, bunch.target.astype(np.int64)
