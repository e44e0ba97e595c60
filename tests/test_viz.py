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
    assert np.array_equal(np.asarray(panel), viz.explanation_overlay(sal, 0, picture))
    # which is the map's colours scaled to its 99th percentile over a grey copy of the image
    m = sal.maps()[0].double().numpy()
    bound = np.percentile(np.abs(m), 99)
    grey = np.repeat(picture.mean(-1, keepdims=True), 3, -1) * 0.6 + 0.15
    assert np.array_equal(np.asarray(panel), viz.overlay(grey, m, "hot", 0.9 * np.clip(m / bound, 0, 1), vmin=0, vmax=bound))


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


# --- readable pictures (issue: the first hour of a new user) ---------------------------------------


def _text_boxes(fig):
    """Window extents of every visible, non-empty text of a drawn figure."""
    from matplotlib.text import Text

    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip()]


def _assert_no_overlapping_text(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    boxes = _text_boxes(fig)
    assert boxes
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not box_a.overlaps(box_b), f"texts overlap: {a!r} and {b!r}"


def _long_label_explanation(n=4, method="saliency"):
    from heatlens.models.zoo import imagenet_labels

    labels = imagenet_labels()
    long_ones = sorted(range(len(labels)), key=lambda k: -len(labels[k].split(",")[0]))[:n]
    gen = torch.Generator().manual_seed(0)
    outputs = torch.zeros(n, len(labels))
    outputs[torch.arange(n), torch.tensor(long_ones)] = 5.0
    return hl.Explanation(torch.randn(n, 3, 32, 32, generator=gen), torch.tensor(long_ones[::-1]), outputs, method,
                          labels=labels, inputs=torch.rand(n, 3, 32, 32, generator=gen))


def test_long_imagenet_labels_never_overlap_in_plot_and_grid():
    e = _long_label_explanation()
    _assert_no_overlapping_text(e.plot())
    _assert_no_overlapping_text(viz.explanation_grid({"integrated_gradients": e, "saliency": e}, labels=e.targets))


def test_percentile_scaled_overlay_is_not_mostly_black():
    rng = np.random.default_rng(0)
    values = np.abs(rng.normal(size=(64, 64)))
    values[5, 5] = 50 * np.percentile(values, 99)  # one pixel far above the rest, as gradients have
    grey = np.full((64, 64, 3), 0.5)
    shown = viz.heat_overlay(grey, values).astype(float)
    background = viz.heat_overlay(grey, np.zeros((64, 64))).astype(float)
    coloured = (np.abs(shown - background).max(-1) > 25).mean()
    # the old view: min-max limits (the outlier takes the whole colour range)
    old = viz.overlay(grey, values, "hot", 0.5).astype(float)
    old_bright = (old.max(-1) > 0.5 * 255 * 0.5 + 0.5 * 255 * 0.3).mean()
    assert coloured > 0.4 and old_bright < 0.05
    assert viz.robust_limit(values) == pytest.approx(np.percentile(values, 99))


def test_signed_overlays_keep_the_sign():
    grey = np.full((8, 8, 3), 0.5)
    values = np.zeros((8, 8))
    values[:4] = 1.0
    values[4:] = -1.0
    out = viz.heat_overlay(grey, values)
    assert out[0, 0, 0] > out[0, 0, 2] and out[7, 0, 2] > out[7, 0, 0]  # red supports, blue opposes


def _lime_like():
    segments = torch.zeros(1, 16, 16, dtype=torch.long)
    segments[:, :, 8:] = 1
    segments[:, 8:, :8] = 2
    weights = torch.tensor([[0.9, -0.7, 0.01]])
    attributions = weights[0][segments][:, None].float()
    return hl.Explanation(attributions, torch.tensor([0]), torch.zeros(1, 2), "lime",
                          params={"num_features": 2}, extras={"segments": segments, "weights": weights})


def test_lime_pictures_are_outlines_with_the_sign_kept():
    e = _lime_like()
    image = np.full((16, 16, 3), 0.5)
    pic = viz.explanation_overlay(e, 0, image)
    green = (pic == [0, 255, 0]).all(-1)
    red = (pic == [255, 0, 0]).all(-1)
    assert green.any() and red.any()  # the positive segment outlined green, the negative one red
    assert green[:8, :8].any() and not green[:, 10:].any() and red[:, 8:].any()
    assert (pic[2, 2] == 128).all() and (pic[12, 12] == 128).all()  # inside the segments: the image, no fill
    assert (pic[12, 2] == 128).all()  # the third segment (weight 0.01) is not among num_features=2


def test_sanity_plots_draw_measurements_not_class_indices():
    rl = SanityResult("random_logit", "saliency", [{"image": i, "target": 800 + i, "random_class": 3 * i,
                                                    "ssim": 0.3, "spearman": 0.4} for i in range(4)],
                      True, "ok", params={"threshold": 0.5})
    ax = rl.plot().axes[0]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["spearman", "ssim", "threshold 0.5"]
    rows = [{"layer": f"_blocks.{i}._project_conv", "spearman": 1 - i / 80} for i in range(80)]
    mr = SanityResult("model_randomization", "saliency", rows, True, "ok")
    fig = mr.plot()
    assert len([t for t in fig.axes[0].get_xticklabels() if t.get_text()]) <= 16
    _assert_no_overlapping_text(fig)


def test_metric_curves_count_features_as_well_as_fractions():
    r = MetricResult("deletion", torch.tensor([0.2]), False, curves=torch.linspace(1, 0, 11)[None],
                     x=torch.linspace(0, 1, 11))
    fig = r.plot(n_features=196)
    labels = [a.get_xlabel() for a in fig.axes[0].child_axes]
    assert labels == ["features perturbed"]
    fig = r.plot(n_features=196, x_axis="features")
    FigureCanvas = __import__("matplotlib.backends.backend_agg", fromlist=["FigureCanvasAgg"]).FigureCanvasAgg
    FigureCanvas(fig).draw()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "196" in ticks and fig.axes[0].get_xlabel() == "features perturbed"
    with pytest.raises(ValueError, match="x_axis='features' needs n_features"):
        r.plot(x_axis="features")


def test_superpixel_sum_adds_each_square():
    from heatlens.explanation import superpixel_sum

    m = torch.arange(2 * 5 * 6, dtype=torch.float64).reshape(2, 5, 6)
    small = superpixel_sum(m, 2, expand=False)
    assert small.shape == (2, 3, 3)
    assert small[0, 0, 0] == m[0, :2, :2].sum() and small[1, 2, 2] == m[1, 4:, 4:].sum()  # a partial edge square
    big = superpixel_sum(m, 2)
    assert big.shape == m.shape and big[0, 1, 1] == small[0, 0, 0]
    torch.testing.assert_close(small.sum((1, 2)), m.sum((1, 2)))
    with pytest.raises(ValueError, match="size must be a positive integer"):
        superpixel_sum(m, 0)


def test_standardize_gives_unit_variance_for_small_maps():
    from heatlens.explanation import normalize_maps

    m = torch.randn(2, 224, 224, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-4
    st = normalize_maps(m, "standardize")
    torch.testing.assert_close(st.std((1, 2), unbiased=False), torch.ones(2, dtype=torch.float64))
    assert torch.equal(normalize_maps(torch.ones(1, 3, 3), "standardize"), torch.zeros(1, 3, 3))
