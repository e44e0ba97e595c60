"""heatlens.viz: colormaps equal matplotlib's, exact alpha blending, diverging maps centred at 0,
figures with the right axes and green / red frames, HTML with decodable PNGs, LIME boundaries.
"""

from __future__ import annotations

import base64
import io
import re

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from PIL import Image

import heatlens as hl
from heatlens import viz
from heatlens.explanation import MetricResult, SanityResult

POINTS = np.concatenate([np.linspace(-0.25, 1.25, 1201), [0.0, 0.5, 1.0, 0.365079, 0.746032, 0.25, 0.75]])


@pytest.mark.parametrize("cmap", ["hot", "gray", "bwr", "seismic", "viridis", "hot_r", "coolwarm"])
def test_colormap_values_equal_matplotlib(cmap):
    ours = viz.apply_colormap(POINTS, cmap, vmin=0.0, vmax=1.0)
    theirs = matplotlib.colormaps[cmap](POINTS)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_colormap_limits_and_nan_follow_matplotlib_normalize():
    values = np.array([[-3.0, 0.0, 2.0], [5.0, np.nan, 7.0]])
    ours = viz.apply_colormap(values, "hot", vmin=-1.0, vmax=6.0)
    theirs = matplotlib.colormaps["hot"](matplotlib.colors.Normalize(-1.0, 6.0)(values))
    np.testing.assert_allclose(ours[~np.isnan(values)], theirs[~np.isnan(values)], atol=1e-12)
    assert ours[1, 1].tolist() == [0.0, 0.0, 0.0, 0.0]  # matplotlib's "bad" colour


@pytest.mark.parametrize("cmap", ["bwr", "seismic", "coolwarm"])
def test_diverging_maps_put_zero_at_the_centre_colour(cmap):
    values = np.array([[-1.0, 0.0, 3.0]])  # asymmetric on purpose
    rgba = viz.colorize(values, cmap)
    centre = np.round(np.asarray(matplotlib.colormaps[cmap](0.5)) * 255).astype(np.uint8)
    assert rgba[0, 1].tolist() == centre.tolist()
    top = np.round(np.asarray(matplotlib.colormaps[cmap](1.0)) * 255).astype(np.uint8)
    assert rgba[0, 2].tolist() == top.tolist()  # +max|v| is the last colour, so -1 sits a third of the way down
    assert viz.is_diverging(cmap) and not viz.is_diverging("hot")


def test_overlay_alpha_blending_is_exact():
    rng = np.random.default_rng(0)
    image = rng.random((6, 9, 3))
    values = rng.normal(size=(6, 9))
    for alpha in (0.0, 0.3, 1.0):
        out = viz.overlay(image, values, "viridis", alpha)
        colours = matplotlib.colormaps["viridis"](matplotlib.colors.Normalize(values.min(), values.max())(values))[..., :3]
        expected = np.round(np.clip((1 - alpha) * image + alpha * colours, 0, 1) * 255).astype(np.uint8)
        assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert np.array_equal(viz.overlay(image, values, "hot", 0.0), np.round(image * 255).astype(np.uint8))
    # per-pixel alpha, and a signed map on a diverging colormap with symmetric limits
    a = rng.random((6, 9))
    out = viz.overlay(image, values, "bwr", a)
    bound = np.abs(values).max()
    colours = matplotlib.colormaps["bwr"](matplotlib.colors.Normalize(-bound, bound)(values))[..., :3]
    expected = np.round(np.clip((1 - a[..., None]) * image + a[..., None] * colours, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_overlay_accepts_uint8_and_chw_tensors_and_resizes_coarse_maps():
    rng = np.random.default_rng(1)
    image = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    chw = torch.as_tensor(image).permute(2, 0, 1).double() / 255
    coarse = np.ones((2, 2))
    a = viz.overlay(image, coarse, "hot", 0.5, vmin=0, vmax=1)
    b = viz.overlay(chw, torch.ones(8, 8), "hot", 0.5, vmin=0, vmax=1)
    assert np.array_equal(a, b)  # a constant coarse map upsamples to the same constant


def test_overlay_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"values must be an \(H,W\) map, got shape \(2, 3, 4\)"):
        viz.overlay(np.zeros((3, 4, 3)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="alpha must be a number or an"):
        viz.overlay(np.zeros((3, 4, 3)), np.zeros((3, 4)), alpha=1.5)
    with pytest.raises(ValueError, match="unknown cmap 'hott'.*Did you mean: 'hot'"):
        viz.colorize(np.zeros((2, 2)), "hott")


@pytest.fixture
def explained(tiny_cnn, tiny_x):
    clf = hl.wrap(tiny_cnn, input_size=(3, 16, 16))
    return clf, hl.explain(clf, tiny_x, "saliency"), hl.explain(clf, tiny_x, "input_x_gradient")


def _spine_colour(ax):
    return to_rgba(ax.spines["left"].get_edgecolor())


def test_explanation_grid_frames_green_for_correct_and_red_for_mispredicted(explained):
    _, sal, ixg = explained
    pred = sal.predictions
    labels = pred.clone()
    labels[1] = (labels[1] + 1) % 5  # image 1 is now mispredicted
    labels[3] = (labels[3] + 2) % 5
    fig = viz.explanation_grid({"saliency": sal, "input_x_gradient": ixg}, labels=labels, max_images=4)
    axes = np.array(fig.axes).reshape(4, 3)
    for i in range(4):
        want = to_rgba("red") if i in (1, 3) else to_rgba("green")
        for ax in axes[i, 1:]:
            assert _spine_colour(ax) == want
            assert ax.get_xlabel() == ("Mispredicted" if i in (1, 3) else "Correctly Predicted")
        assert _spine_colour(axes[i, 0]) != to_rgba("red")  # the image column is not framed
    assert axes[0, 1].get_title().startswith("saliency")


def test_plot_explanation_has_images_overlays_and_colour_bars(explained):
    _, sal, _ = explained
    fig = sal.plot()
    assert len(fig.axes) == 3 * len(sal)  # image row, overlay row, one colour bar per overlay
    fig = viz.plot_explanation(sal, max_images=2, show_images=False, colorbar=False)
    assert len(fig.axes) == 2
    # the overlay shown is exactly viz.overlay of the displayed input and the map
    panel = fig.axes[0].get_images()[0].get_array()
    x = sal.inputs[0]
    picture = ((x - x.min()) / (x.max() - x.min())).permute(1, 2, 0).double().numpy()
    assert np.array_equal(np.asarray(panel), viz.overlay(picture, sal.maps()[0], "hot", 0.5))


def test_signed_views_use_a_diverging_colour_bar_centred_at_zero(explained):
    _, _, ixg = explained
    fig = viz.plot_explanation(ixg, reduce="sum", max_images=1)
    bar = fig.axes[-1]
    lo, hi = bar.get_ylim()
    assert lo == pytest.approx(-hi) and hi > 0


def test_explanation_html_embeds_decodable_pngs(explained):
    _, sal, _ = explained
    text = sal._repr_html_()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(uris) == len(sal)
    img = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert img.size[0] >= 16 and img.size[1] >= 112  # upscaled, crisp small images
    assert "saliency" in text and "target" in text


def test_lime_boundaries_are_green_for_positive_and_red_for_negative():
    from skimage.segmentation import mark_boundaries

    image = np.full((12, 12, 3), 0.5)
    segments = np.zeros((12, 12), dtype=int)
    segments[:, 6:] = 1
    segments[8:, :] = 2
    weights = np.array([0.9, -0.5, 0.01])
    out = viz.lime_boundaries(image, segments, weights, num_features=2)
    pos = mark_boundaries(image, np.where(segments == 0, 1, 0), color=(0, 1, 0))
    both = mark_boundaries(pos, np.where(segments == 1, 2, 0), color=(1, 0, 0))
    np.testing.assert_allclose(out, both)
    assert (out == [0, 1, 0]).all(-1).any() and (out == [1, 0, 0]).all(-1).any()
    only_pos = viz.lime_boundaries(image, segments, weights, num_features=2, positive_only=True)
    assert not (only_pos == [1, 0, 0]).all(-1).any()


def test_plot_metric_draws_curves_with_auc_in_the_legend():
    curves = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.8, 0.2]])
    result = MetricResult("deletion", values=torch.tensor([0.5, 0.7]), higher_is_better=False,
                          curves=curves, x=torch.tensor([0.0, 0.5, 1.0]))
    fig = result.plot()
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3  # two images + the mean
    np.testing.assert_allclose(ax.get_lines()[-1].get_ydata(), curves.mean(0).numpy())
    legend = ax.get_legend().get_texts()[0].get_text()
    assert "AUC 0.600" in legend and "lower is better" in ax.get_title()


def test_plot_sanity_draws_each_numeric_column_with_the_verdict():
    table = [{"layer": "fc", "spearman": 0.9, "ssim": 0.8}, {"layer": "conv2", "spearman": 0.3, "ssim": 0.2},
             {"layer": "conv1", "spearman": 0.1, "ssim": 0.05}]
    result = SanityResult("model_randomization", "saliency", table, passed=True, verdict="maps decay")
    fig = result.plot()
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["spearman", "ssim"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fc", "conv2", "conv1"]
    assert "PASS" in ax.get_title() and to_rgba(ax.title.get_color()) == to_rgba("green")


def test_save_png_round_trips(tmp_path, explained):
    image = (np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    path = viz.save_png(image, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(path)), image)
    fig = explained[1].plot()
    assert Image.open(viz.save_png(fig, tmp_path / "sub" / "fig.png")).size[0] > 100


def test_no_pyplot_import():
    import os
    import subprocess
    import sys

    code = ("import heatlens as hl, torch, sys; from heatlens import viz; "
            "clf = hl.wrap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), input_size=(3, 2, 2)); "
            "e = hl.explain(clf, torch.rand(2, 3, 2, 2), 'saliency'); e.plot(); e._repr_html_(); "
            "print('matplotlib.pyplot' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "HEATLENS_PROGRESS": "0"})
    assert out.stdout.strip().splitlines()[-1] == "False"
