"""Digit-sum datasets with planted shortcuts (the R255 practical, rebuilt offline).

Two real handwritten digits 0-5 from ``sklearn.datasets.load_digits`` (8x8, upscaled smoothly to
20x20 and centred in a 28x28 cell, like MNIST) sit side by side: images (N,3,28,56) float in [0,1],
label = left + right (11 classes). Train and test draw their digits from disjoint source images.

A *shortcut* is planted in the training split only, so a model that learns it validates well and
then fails on the test split:

``"same_digit"``  the right digit always has the left digit's value (a different handwriting sample):
                  the model can read one digit and double it. Mask: the right digit's 28x28 cell (the
                  redundant copy). Training labels are then all even.
``"marker"``      a bright 4x4 square in the top margin whose horizontal position encodes the label.
``"tint"``        the background takes a colour that encodes the label (digit strokes stay white).
                  Mask: the background (every pixel off the strokes).
``"border"``      a 2-pixel frame around the image whose colour encodes the label.

``shortcut_mask`` (N,1,28,56) marks where the shortcut lives in each image (all False in the test
split, where it is absent); ``shortcut_region`` marks where a shortcut of this kind *can* appear, in
both splits, so relevance can be compared on the same pixels in train and test.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_choice, check_positive_int

SHORTCUTS = ("same_digit", "marker", "tint", "border")
SPLITS = ("train", "test")
NUM_CLASSES = 11
MAX_DIGIT = 5
CELL, BOX = 28, 20  # a digit is drawn in a BOX x BOX square centred in a CELL x CELL cell
PAD = (CELL - BOX) // 2
HEIGHT, WIDTH = CELL, 2 * CELL
STROKE_THRESHOLD = 0.25  # a pixel belongs to a digit stroke above this intensity
MARKER_SIZE, MARKER_STEP, MARKER_TOP = 4, 5, 0
BORDER = 2
DEFAULT_N = {"train": 5000, "test": 1000}
TEST_FRACTION = 0.3  # of the source digits, fixed across seeds so splits never share a handwriting sample

DESCRIPTIONS = {
    "same_digit": "the right digit always equals the left one, so the model can read one digit and double it",
    "marker": "a small bright square in the top margin whose position encodes the label",
    "tint": "a background colour that encodes the label",
    "border": "a coloured frame around the image whose colour encodes the label",
}


@dataclass(frozen=True)
class DigitSumDataset:
    """One split of the digit-sum task.

    x: (N,3,28,56) float in [0,1]. y: (N,) sum of the two digits (0..10). left, right: (N,) digit values.
    shortcut: the planted shortcut kind (None for a clean dataset). split: "train" | "test".
    shortcut_mask: (N,1,28,56) bool, where the shortcut lives (all False where it is absent).
    shortcut_region: (N,1,28,56) bool, where a shortcut of this kind can appear (same rule in both splits).
    digit_masks: (N,2,28,56) bool, the strokes of the left (channel 0) and right (channel 1) digit.
    """

    x: Tensor
    y: Tensor
    left: Tensor
    right: Tensor
    shortcut: str | None
    split: str
    shortcut_mask: Tensor
    shortcut_region: Tensor
    digit_masks: Tensor
    seed: int = 0

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def labels(self) -> list[str]:
        return [str(k) for k in range(NUM_CLASSES)]

    @property
    def stroke_mask(self) -> Tensor:
        """(N,1,28,56) bool: pixels on either digit's strokes."""
        return self.digit_masks.any(1, keepdim=True)

    @property
    def half_masks(self) -> Tensor:
        """(N,2,28,56) bool: the left and right 28x28 cells."""
        cells = torch.zeros(1, 2, HEIGHT, WIDTH, dtype=torch.bool)
        cells[:, 0, :, :CELL] = True
        cells[:, 1, :, CELL:] = True
        return cells.expand(len(self), -1, -1, -1)

    @property
    def shortcut_site(self) -> Tensor:
        """(N,1,28,56) bool: where each image's shortcut is, or would be for its true label in the test split.

        Equal to ``shortcut_mask`` in the training split; in the test split it lets relevance on the
        same pixels be compared (e.g. the marker position of the true sum).
        """
        if self.shortcut is None:
            return torch.zeros_like(self.shortcut_region)
        return _shortcut_mask(self.shortcut, self.y, self.shortcut_region)

    @property
    def description(self) -> str:
        return DESCRIPTIONS.get(self.shortcut or "", "no planted shortcut")

    def subset(self, index: Tensor | slice | list[int]) -> "DigitSumDataset":
        """The same split restricted to some images."""
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        return DigitSumDataset(
            x=self.x[index], y=self.y[index], left=self.left[index], right=self.right[index],
            shortcut=self.shortcut, split=self.split, shortcut_mask=self.shortcut_mask[index],
            shortcut_region=self.shortcut_region[index], digit_masks=self.digit_masks[index], seed=self.seed,
        )

    def __repr__(self) -> str:
        return f"DigitSumDataset(split={self.split!r}, shortcut={self.shortcut!r}, n={len(self)})"


def digit_sum_dataset(
    split: str = "train",
    shortcut: str | None = None,
    n: int | None = None,
    seed: int = 0,
) -> DigitSumDataset:
    """The digit-sum task (R255 practical) from scikit-learn's real handwritten digits.

    split: "train" (shortcut planted) or "test" (no shortcut; disjoint source digits).
    shortcut: None | "same_digit" | "marker" | "tint" | "border" (see the module docstring).
    n: number of images (default 5000 train, 1000 test). seed: which pairs are drawn.
    Returns a ``DigitSumDataset``; the same arguments always give identical tensors.
    """
    check_choice(split, "split", SPLITS)
    if shortcut is not None:
        check_choice(shortcut, "shortcut", SHORTCUTS)
    n = DEFAULT_N[split] if n is None else check_positive_int(n, "n")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    digits, values = _source_digits(split)
    # a different stream per split, so train and test pairs are drawn independently
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    left = rng.integers(0, MAX_DIGIT + 1, n)
    right = left.copy() if (shortcut == "same_digit" and split == "train") else rng.integers(0, MAX_DIGIT + 1, n)
    left_img = _sample_images(digits, values, left, rng)
    right_img = _sample_images(digits, values, right, rng)
    gray = torch.cat([left_img, right_img], dim=-1)[:, None]  # (N,1,28,56)
    digit_masks = torch.cat([_cell_mask(left_img, 0), _cell_mask(right_img, 1)], dim=1)
    x = gray.expand(-1, 3, -1, -1).clone()
    y = torch.as_tensor(left + right, dtype=torch.long)
    region = _region(shortcut, digit_masks)
    planted = shortcut is not None and split == "train"
    if planted and shortcut != "same_digit":
        x = _plant(shortcut, x, y, digit_masks)
    mask = _shortcut_mask(shortcut, y, region) if planted else torch.zeros_like(region)
    return DigitSumDataset(
        x=x.clamp(0, 1).contiguous(), y=y, left=torch.as_tensor(left), right=torch.as_tensor(right),
        shortcut=shortcut, split=split, shortcut_mask=mask, shortcut_region=region,
        digit_masks=digit_masks, seed=seed,
    )


# --- source digits ------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _source_digits(split: str) -> tuple[Tensor, np.ndarray]:
    """Upscaled digits 0-5 of one split: (M,28,28) float in [0,1] and their values (M,).

    The split of the 1,083 source images is fixed (not seeded) so that train and test never share
    a handwriting sample whatever seeds the caller uses.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.flatnonzero(data.target <= MAX_DIGIT)
    order = np.random.default_rng(12345).permutation(keep)
    n_test = int(round(TEST_FRACTION * len(order)))
    chosen = np.sort(order[:n_test] if split == "test" else order[n_test:])
    small = torch.as_tensor(data.images[chosen], dtype=torch.float32)[:, None] / 16.0  # (M,1,8,8)
    # bicubic upscaling keeps strokes smooth; clamp its small overshoot back into [0,1]
    big = F.interpolate(small, size=(BOX, BOX), mode="bicubic", align_corners=False).clamp(0, 1)
    cells = F.pad(big, (PAD, PAD, PAD, PAD))[:, 0]
    return cells, data.target[chosen]


def _sample_images(digits: Tensor, values: np.ndarray, wanted: np.ndarray, rng: np.random.Generator) -> Tensor:
    """For each wanted value, a random source image of that digit -> (N,28,28)."""
    index = np.empty(len(wanted), dtype=np.int64)
    for v in range(MAX_DIGIT + 1):
        rows = np.flatnonzero(wanted == v)
        pool = np.flatnonzero(values == v)
        index[rows] = rng.choice(pool, size=len(rows), replace=True)
    return digits[torch.as_tensor(index)]


def _cell_mask(cells: Tensor, side: int) -> Tensor:
    """Strokes of one digit placed in its half of the image, (N,1,28,56) bool."""
    mask = torch.zeros(cells.shape[0], 1, HEIGHT, WIDTH, dtype=torch.bool)
    mask[:, 0, :, side * CELL:(side + 1) * CELL] = cells > STROKE_THRESHOLD
    return mask


# --- shortcuts ----------------------------------------------------------------------------------

def label_colours() -> Tensor:
    """(11,3) distinct, saturated colours, one per label (hues evenly spaced)."""
    hues = torch.arange(NUM_CLASSES, dtype=torch.float32) / NUM_CLASSES
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + hues[:, None] * 6) % 6
    return 1 - (torch.minimum(k, 4 - k).clamp(0, 1))  # HSV -> RGB with S = V = 1


def marker_box(label: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of the marker for ``label``."""
    x0 = 1 + MARKER_STEP * label
    return MARKER_TOP, MARKER_TOP + MARKER_SIZE, x0, x0 + MARKER_SIZE


def _region(shortcut: str | None, digit_masks: Tensor) -> Tensor:
    """Where a shortcut of this kind can appear, (N,1,28,56) bool (same rule for both splits)."""
    n = digit_masks.shape[0]
    region = torch.zeros(n, 1, HEIGHT, WIDTH, dtype=torch.bool)
    if shortcut == "same_digit":
        region[:, :, :, CELL:] = True
    elif shortcut == "marker":
        for label in range(NUM_CLASSES):
            t, b, l, r = marker_box(label)
            region[:, :, t:b, l:r] = True
    elif shortcut == "tint":
        region = ~digit_masks.any(1, keepdim=True)
    elif shortcut == "border":
        region[:, :, :BORDER, :] = True
        region[:, :, -BORDER:, :] = True
        region[:, :, :, :BORDER] = True
        region[:, :, :, -BORDER:] = True
    return region


def _shortcut_mask(shortcut: str, y: Tensor, region: Tensor) -> Tensor:
    """Where the planted shortcut lives in each training image, (N,1,28,56) bool."""
    if shortcut != "marker":
        return region.clone()
    mask = torch.zeros_like(region)
    for i, label in enumerate(y.tolist()):
        t, b, l, r = marker_box(label)
        mask[i, :, t:b, l:r] = True
    return mask


def _plant(shortcut: str, x: Tensor, y: Tensor, digit_masks: Tensor) -> Tensor:
    """Draw the shortcut into training images x (N,3,28,56); returns a new tensor."""
    x = x.clone()
    colours = label_colours()[y][:, :, None, None]  # (N,3,1,1)
    if shortcut == "marker":
        for i, label in enumerate(y.tolist()):
            t, b, l, r = marker_box(label)
            x[i, :, t:b, l:r] = 1.0
    elif shortcut == "tint":
        # the background (ink-free part of each pixel) takes a dim label colour; strokes stay white
        x = x + (1 - x) * 0.35 * colours
    elif shortcut == "border":
        frame = _region("border", digit_masks)  # (N,1,H,W)
        x = torch.where(frame, colours.expand_as(x), x)
    return x


def plant_shortcut(dataset: DigitSumDataset, labels: Tensor | None = None, *, shortcut: str | None = None) -> Tensor:
    """Images of ``dataset`` with the shortcut drawn so that it encodes ``labels`` (N,) -> (N,3,28,56).

    The intervention behind the shortcut test: plant the marker / tint / border of a *wrong* label in
    test images and see whether the prediction follows it. ``labels`` default to the true sums;
    ``shortcut`` defaults to the dataset's. "same_digit" cannot be drawn (it is a property of the pairs).
    """
    kind = shortcut or dataset.shortcut
    if kind is None:
        raise ValueError("shortcut must be given: the dataset has no planted shortcut")
    check_choice(kind, "shortcut", ("marker", "tint", "border"))
    labels = dataset.y if labels is None else torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != dataset.y.shape or bool(((labels < 0) | (labels >= NUM_CLASSES)).any()):
        raise ValueError(f"labels must be (N,) = {tuple(dataset.y.shape)} integers in 0..{NUM_CLASSES - 1}")
    # start from the digits alone so a training image's own shortcut does not remain
    clean = _digits_only(dataset)
    return _plant(kind, clean.expand(-1, 3, -1, -1).clone(), labels, dataset.digit_masks).clamp(0, 1)


def remove_shortcut(dataset: DigitSumDataset) -> Tensor:
    """The dataset's images with the shortcut taken out (the digits alone), (N,3,28,56)."""
    return _digits_only(dataset).expand(-1, 3, -1, -1).clone()


def _digits_only(dataset: DigitSumDataset) -> Tensor:
    """(N,1,28,56) grey digits without any drawn shortcut."""
    x = dataset.x
    if dataset.shortcut == "tint" and dataset.split == "train":
        # invert x = g + (1 - g) * 0.35 * c per channel: take the channel with the weakest tint
        colours = label_colours()[dataset.y][:, :, None, None] * 0.35
        g = (x - colours) / (1 - colours).clamp_min(1e-6)
        return g.amin(1, keepdim=True).clamp(0, 1)
    grey = x.amin(1, keepdim=True)
    if dataset.shortcut in ("marker", "border") and dataset.split == "train":
        grey = torch.where(dataset.shortcut_mask, torch.zeros_like(grey), grey)
    return grey
