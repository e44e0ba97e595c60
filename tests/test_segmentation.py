"""Segmentation: label maps are contiguous (N,H,W), equal scikit-image's own output, grid cells are squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import segmentation as sk

import heatlens as hl
from heatlens.methods.segmentation import grid, n_segments, relabel, segment, segment_masks


@pytest.fixture(scope="module")
def pixels(photos) -> np.ndarray:
    """Two 64x64 photo crops as (N,H,W,C) uint8."""
    return np.stack([photos[0][100:164, 150:214], photos[1][150:214, 200:264]])


def _contiguous(labels: torch.Tensor) -> bool:
    return all(torch.equal(torch.unique(s), torch.arange(int(s.max()) + 1)) for s in labels)


@pytest.mark.parametrize("method, params, sk_fn", [
    ("quickshift", {}, lambda img: sk.quickshift(img, kernel_size=4, max_dist=200, ratio=0.2)),
    ("slic", {"n_segments": 30}, lambda img: sk.slic(img, n_segments=30, compactness=10.0)),
    ("felzenszwalb", {"scale": 50.0}, lambda img: sk.felzenszwalb(img, scale=50.0, sigma=0.8, min_size=50)),
])
def test_equals_scikit_image_and_is_contiguous(pixels, method, params, sk_fn):
    labels = segment(pixels, method, **params)
    assert labels.dtype == torch.long and labels.shape == (2, 64, 64)
    assert _contiguous(labels)
    for img, got in zip(pixels, labels):
        expected = relabel(sk_fn(img.astype(np.float64) / 255))
        np.testing.assert_array_equal(got.numpy(), expected)
        # the same partition as scikit-image's labels, whatever their numbering
        raw = sk_fn(img.astype(np.float64) / 255)
        assert len(np.unique(raw)) == int(got.max()) + 1


def test_model_input_is_deprocessed_to_pixels(effnet, chelsea_x):
    """A model-space tensor with model= segments the same pixels as the deprocessed numpy image."""
    got = segment(chelsea_x, "slic", model=effnet, n_segments=40)
    expected = relabel(sk.slic(effnet.deprocess(chelsea_x)[0].astype(np.float64), n_segments=40, compactness=10.0))
    np.testing.assert_array_equal(got[0].numpy(), expected)


def test_uint8_and_unit_float_pixels_agree(pixels):
    a = segment(pixels, "slic", n_segments=20)
    b = segment(torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255, "slic", n_segments=20)
    assert torch.equal(a, b)


def test_grid_cells_are_exact_squares():
    labels = segment(np.zeros((1, 48, 64, 3), np.uint8), "grid", cell_size=16)[0]
    assert int(labels.max()) + 1 == 3 * 4
    for s in range(12):
        rows, cols = torch.nonzero(labels == s, as_tuple=True)
        assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15 and len(rows) == 256
        assert int(rows.min()) == 16 * (s // 4) and int(cols.min()) == 16 * (s % 4)  # row-major numbering


def test_grid_clips_the_last_row_and_column():
    labels = grid((20, 20), cell_size=8)
    assert int(labels.max()) + 1 == 9
    assert int((labels == 8).sum()) == 4 * 4  # the corner cell is 4x4


def test_n_segments_and_masks_partition_the_image(pixels):
    labels = segment(pixels, "felzenszwalb")
    counts = n_segments(labels)
    assert counts.tolist() == [int(s.max()) + 1 for s in labels]
    masks = segment_masks(labels)
    assert masks.shape == (2, int(counts.max()), 64, 64)
    assert torch.equal(masks.sum(1), torch.ones(2, 64, 64, dtype=torch.long))  # every pixel in exactly one segment
    for i in range(2):  # padding masks beyond an image's own count are empty, its own are not
        assert not masks[i, int(counts[i]):].any() and masks[i, : int(counts[i])].flatten(1).any(1).all()


def test_grey_images_segment():
    grey = np.random.default_rng(0).random((1, 32, 32, 1))
    for method in ("quickshift", "slic", "felzenszwalb"):
        assert _contiguous(segment(grey, method))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="method must be one of 'quickshift', 'slic', 'felzenszwalb', 'grid', got 'slick'"):
        segment(np.zeros((1, 8, 8, 3)), "slick")
    with pytest.raises(ValueError, match=r"images must be an \(N,C,H,W\) tensor, got shape \(3, 8, 8\)"):
        segment(torch.zeros(3, 8, 8), "grid")
    with pytest.raises(TypeError, match="images must be an"):
        segment([1, 2, 3], "grid")
    with pytest.raises(ValueError, match="cell_size must be an integer >= 1, got 0"):
        segment(np.zeros((1, 8, 8, 3)), "grid", cell_size=0)
    with pytest.raises(TypeError, match="segments must hold integer labels"):
        n_segments(torch.zeros(1, 4, 4))


def test_exported_from_methods():
    assert hl.methods.segment is segment
    assert "segment" not in hl.methods.names()  # a utility, not an explanation method
