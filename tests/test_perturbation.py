"""Perturbation family: occlusion, feature_ablation, rise.

Proves agreement with Captum's Occlusion / FeatureAblation, with an independent reimplementation of
the CSEP 590B superpixel occlusion and of RISE, RISE's properties on analytic models, black-box
predict functions giving the same explanations as the module, one engine doing the batching, and
the error messages.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens.baselines import blur, gaussian_blur
from heatlens.batching import call_stats
from heatlens.methods import METHODS
from heatlens.methods.perturbation import feature_ablation, grid_segments, occlusion, rise, rise_masks
from heatlens.models.preprocessing import Preprocessing

captum_attr = pytest.importorskip("captum.attr")


class Softmaxed(nn.Module):
    """The module's softmax output: Captum's forward when heatlens explains probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


def captum_occlusion(forward, x, targets, window, stride, baselines):
    c = x.shape[1]
    with torch.no_grad():
        return captum_attr.Occlusion(forward).attribute(
            x, sliding_window_shapes=(c, *window), strides=(c, *stride), target=targets, baselines=baselines)


# --- occlusion ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("window", "stride", "baseline", "output"),
    [
        (5, 3, "zeros", "logit"),  # overlapping windows, clipped border windows (16 = 3*4 + 4)
        ((4, 6), (2, 3), "mean", "probability"),
        (8, None, 0.7, "logit"),
        (3, 2, blur(1.0), "probability"),
    ],
)
def test_occlusion_equals_captum_on_tiny_cnn(tiny_cnn, tiny_x, window, stride, baseline, output):
    e = occlusion(tiny_cnn, tiny_x, window=window, stride=stride, baseline=baseline, output=output)
    win = (window, window) if isinstance(window, int) else window
    step = win if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
    if baseline == "mean":
        base = tiny_x.mean((2, 3), keepdim=True).expand_as(tiny_x).contiguous()
    elif callable(baseline):
        base = gaussian_blur(tiny_x, 1.0)
    else:
        base = 0.0 if baseline == "zeros" else float(baseline)
    forward = tiny_cnn if output == "logit" else Softmaxed(tiny_cnn)
    ref = captum_occlusion(forward, tiny_x, e.targets, win, step, base)
    assert e.attributions.shape == (tiny_x.shape[0], 1, *tiny_x.shape[2:])  # one score per location
    torch.testing.assert_close(e.attributions.expand_as(ref), ref, atol=1e-5, rtol=0)  # Captum repeats it per channel
    assert e.params["window"] == win and e.params["stride"] == step


@pytest.mark.slow
def test_occlusion_equals_captum_on_efficientnet(effnet, chelsea_x):
    # 112x112 windows at stride (112, 56): 6 forward passes each, overlapping across the width
    e = occlusion(effnet, chelsea_x, window=112, stride=(112, 56), baseline="black", output="logit")
    black = float(effnet.pixel_baseline(0.0).flatten()[0])  # (0 - 0.5) / 0.5 = -1
    ref = captum_occlusion(effnet, chelsea_x, e.targets, (112, 112), (112, 56), black)
    assert int(e.targets) == 285  # Egyptian Mau
    torch.testing.assert_close(e.attributions.expand_as(ref), ref, atol=1e-5, rtol=0)
    assert e.extras["windows"].shape == (1, 2, 3)


def homework_occlusion(imgs, model, target_labels, baseline, superpixel_size=8):
    """CSEP 590B problem 2(c), written the plain way: one forward per superpixel, probability drop."""
    n, _, h, w = imgs.shape
    rows = torch.arange(n)
    with torch.no_grad():
        clean = model(imgs).softmax(1)[rows, target_labels]
        importance = torch.zeros(n, h, w)
        for top in range(0, h, superpixel_size):
            for left in range(0, w, superpixel_size):
                occluded = imgs.clone()
                occluded[:, :, top:top + superpixel_size, left:left + superpixel_size] = \
                    baseline[:, :, top:top + superpixel_size, left:left + superpixel_size]
                drop = clean - model(occluded).softmax(1)[rows, target_labels]
                importance[:, top:top + superpixel_size, left:left + superpixel_size] = drop.view(n, 1, 1)
    return importance


def test_superpixel_occlusion_equals_the_homework_reimplementation(tiny_cnn):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = hl.wrap(tiny_cnn, input_size=(3, 32, 32),
                    preprocessing=Preprocessing(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3))
    e = occlusion(model, x, superpixel_size=8, baseline="black")  # default output: probability drop
    black_image = torch.full_like(x, -1.0)  # model_transforms(np.zeros(...)): (0 - 0.5) / 0.5
    ref = homework_occlusion(x, tiny_cnn, e.targets, black_image, superpixel_size=8)
    torch.testing.assert_close(e.attributions[:, 0], ref, atol=1e-6, rtol=0)  # one score per location
    torch.testing.assert_close(e.extras["windows"], ref[:, ::8, ::8], atol=1e-6, rtol=0)
    assert e.params["window"] == e.params["stride"] == (8, 8)


def test_occlusion_rows_are_independent_and_batched_by_the_engine(tiny_cnn, tiny_x):
    before = call_stats()
    batched = occlusion(tiny_cnn, tiny_x, window=4, batch_size=5, output="logit")
    after = call_stats()
    # 4 images x 16 windows = 64 occluded copies, in ceil(64 / 5) engine batches
    assert after["items"] - before["items"] == 64
    assert after["batches"] - before["batches"] == math.ceil(64 / 5)
    single = occlusion(tiny_cnn, tiny_x[2:3], window=4, output="logit")
    torch.testing.assert_close(batched.attributions[2:3], single.attributions, atol=1e-6, rtol=0)


# --- feature ablation --------------------------------------------------------------------------------
def irregular_segments(n: int, size: int, seed: int = 4) -> torch.Tensor:
    """Per-image label maps with non-contiguous labels (random 4x4-block labels times 3 plus 1)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 5, (n, size // 4, size // 4), generator=gen)
    return blocks.repeat_interleave(4, 1).repeat_interleave(4, 2) * 3 + 1


@pytest.mark.parametrize("output", ["logit", "probability"])
def test_feature_ablation_equals_captum(tiny_cnn, tiny_x, output):
    segments = irregular_segments(4, 16)
    base = gaussian_blur(tiny_x, 2.0)
    e = feature_ablation(tiny_cnn, tiny_x, segments=segments, baseline=base, output=output)
    forward = tiny_cnn if output == "logit" else Softmaxed(tiny_cnn)
    with torch.no_grad():
        ref = captum_attr.FeatureAblation(forward).attribute(
            tiny_x, target=e.targets, baselines=base, feature_mask=segments[:, None])
    torch.testing.assert_close(e.attributions.expand_as(ref), ref, atol=1e-5, rtol=0)
    # extras: labels renumbered 0..S_i-1 per image, and each pixel's value is its segment's drop
    labels, drops = e.extras["segments"], e.extras["drops"]
    for i in range(4):
        assert labels[i].unique().tolist() == list(range(len(segments[i].unique())))
        torch.testing.assert_close(e.attributions[i, 0], drops[i][labels[i]])
        assert torch.isnan(drops[i, len(segments[i].unique()):]).all()


def test_feature_ablation_grid_default_and_shared_segments(tiny_cnn, tiny_x):
    grid = feature_ablation(tiny_cnn, tiny_x, superpixel_size=4, output="logit")
    shared = feature_ablation(tiny_cnn, tiny_x, segments=grid_segments((16, 16), 4)[0], output="logit")
    torch.testing.assert_close(grid.attributions, shared.attributions, atol=0, rtol=0)
    # a regular grid of squares is exactly non-overlapping occlusion
    occ = occlusion(tiny_cnn, tiny_x, superpixel_size=4, output="logit")
    torch.testing.assert_close(grid.attributions, occ.attributions, atol=1e-6, rtol=0)


# --- RISE --------------------------------------------------------------------------------------------
def test_rise_is_deterministic_under_a_seed_and_independent_of_batch_size(tiny_cnn, tiny_x):
    a = rise(tiny_cnn, tiny_x, n_masks=64, grid=4, seed=7)
    b = rise(tiny_cnn, tiny_x, n_masks=64, grid=4, seed=7, batch_size=11)
    c = rise(tiny_cnn, tiny_x, n_masks=64, grid=4, seed=8)
    torch.testing.assert_close(a.attributions, b.attributions, atol=1e-6, rtol=0)
    assert not torch.allclose(a.attributions, c.attributions)
    assert a.attributions.shape == (4, 1, 16, 16)


def test_rise_equals_an_independent_loop_over_fixed_masks(tiny_cnn, tiny_x):
    n_masks, p_keep = 20, 0.3
    masks = rise_masks(n_masks, (16, 16), grid=(3, 5), p_keep=p_keep, seed=5)
    e = rise(tiny_cnn, tiny_x, n_masks=n_masks, grid=(3, 5), p_keep=p_keep, seed=5, batch_size=7)
    expected = torch.zeros(4, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        for m in range(n_masks):
            for i in range(4):
                prob = tiny_cnn(tiny_x[i:i + 1] * masks[m]).softmax(1)[0, e.targets[i]]
                expected[i] += float(prob) * masks[m].double()
    torch.testing.assert_close(e.attributions.double(), expected / (n_masks * p_keep), atol=1e-5, rtol=0)


def test_rise_masks_are_shifted_upsampled_binary_grids():
    masks = rise_masks(400, (14, 21), grid=(3, 4), p_keep=0.25, seed=0)
    assert masks.shape == (400, 1, 14, 21)
    assert masks.min() >= 0 and masks.max() <= 1
    assert abs(float(masks.mean()) - 0.25) < 0.03  # each cell kept with probability p_keep
    assert len(masks.flatten(1).unique(dim=0)) > 350  # random grids and shifts: almost all masks differ
    torch.testing.assert_close(rise_masks(3, (8, 8), grid=2, p_keep=1.0, seed=1), torch.ones(3, 1, 8, 8),
                               atol=1e-6, rtol=0)  # p_keep=1 keeps every cell


class RegionMean(nn.Module):
    """Class 0's logit is the mean of the input over rows/cols 2..7; class 1's is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, 2:8, 2:8].mean((1, 2, 3))
        return torch.stack([region, torch.zeros_like(region)], 1)


def test_rise_map_is_larger_inside_the_region_the_model_looks_at():
    x = torch.ones(1, 3, 24, 24)
    e = rise(RegionMean(), x, 0, n_masks=300, grid=6, output="logit", seed=0)
    sal = e.attributions[0, 0]
    inside = torch.zeros(24, 24, dtype=torch.bool)
    inside[2:8, 2:8] = True
    far = torch.zeros(24, 24, dtype=torch.bool)
    far[14:, 14:] = True
    assert sal[inside].min() > sal[far].max()
    assert inside.flatten()[sal.flatten().argmax()]


def test_rise_of_a_constant_score_is_the_coverage_and_p_keep_one_gives_the_score(tiny_cnn, tiny_x):
    const = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    with torch.no_grad():
        const[1].weight.zero_()
        const[1].bias.copy_(torch.tensor([1.5, 0.0]))
    e = rise(const, tiny_x, 0, n_masks=50, grid=4, p_keep=0.4, output="logit", seed=3)
    torch.testing.assert_close(e.attributions, 1.5 * e.extras["coverage"] / 0.4, atol=1e-5, rtol=0)
    full = rise(tiny_cnn, tiny_x, n_masks=5, p_keep=1.0, grid=4, seed=0)  # every mask keeps everything
    clean = tiny_cnn(tiny_x).softmax(1).gather(1, full.targets[:, None]).detach()
    torch.testing.assert_close(full.attributions, clean.view(4, 1, 1, 1).expand(-1, 1, 16, 16), atol=1e-6, rtol=0)


# --- every model kind --------------------------------------------------------------------------------
def test_black_box_predict_function_gets_the_same_explanations(tiny_cnn, tiny_x):
    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return tiny_cnn(torch.from_numpy(images)).softmax(1).numpy()

    box = hl.wrap(predict, input_size=(3, 16, 16))
    assert box.outputs == "probabilities" and not box.differentiable
    segments = irregular_segments(4, 16, seed=9)
    pairs = [
        (occlusion, {"window": 5, "stride": 3, "baseline": "mean"}),
        (feature_ablation, {"segments": segments}),
        (rise, {"n_masks": 30, "grid": 4, "seed": 2}),
    ]
    for method, kwargs in pairs:
        ours = method(box, tiny_x, **kwargs)
        ref = method(tiny_cnn, tiny_x, **kwargs)
        torch.testing.assert_close(ours.attributions, ref.attributions, atol=1e-6, rtol=0)
        assert torch.equal(ours.targets, ref.targets)


def test_registered_as_perturbation_methods_without_gradients(tiny_cnn, tiny_x):
    for name in ("occlusion", "feature_ablation", "rise"):
        entry = METHODS.get(name)
        assert entry.family == "perturbation" and entry.needs_grad is False
    assert METHODS.get("rise").stochastic and not METHODS.get("occlusion").stochastic
    e = hl.explain(tiny_cnn, tiny_x, "occlusion", target=2, window=4)
    torch.testing.assert_close(e.attributions, occlusion(tiny_cnn, tiny_x, 2, window=4).attributions)
    assert e.targets.tolist() == [2, 2, 2, 2] and e.method == "occlusion"


# --- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"window": 17}, ValueError, r"window \(17, 17\) is larger than the image \(16, 16\)"),
        ({"window": 4, "stride": 0}, ValueError, r"stride must be >= 1 in both dimensions, got \(0, 0\)"),
        ({"window": 4, "stride": (2, -1)}, ValueError, r"stride must be >= 1 in both dimensions, got \(2, -1\)"),
        ({"window": 4, "stride": 5}, ValueError, r"stride \(5, 5\) is larger than window \(4, 4\)"),
        ({"window": 2.5}, ValueError, r"window must be a positive int or a \(height, width\) pair, got 2.5"),
        ({"superpixel_size": 4, "window": 4}, ValueError, "pass either superpixel_size or window/stride"),
        ({"baseline": "blurr"}, ValueError, r"unknown baseline 'blurr'\. Did you mean: 'blur'\?"),
        ({"output": "prob"}, ValueError, r"output must be one of 'logit', 'probability', got 'prob'"),
    ],
)
def test_occlusion_bad_input(tiny_cnn, tiny_x, kwargs, error, message):
    with pytest.raises(error, match=message):
        occlusion(tiny_cnn, tiny_x, **kwargs)


@pytest.mark.parametrize(
    ("method", "kwargs", "error", "message"),
    [
        (feature_ablation, {"segments": torch.zeros(4, 8, 8, dtype=torch.long)}, ValueError,
         r"segments must have shape \(N,H,W\) = \(4, 16, 16\) \(or \(H,W\) for all images\), got \(4, 8, 8\)"),
        (feature_ablation, {"segments": torch.zeros(4, 16, 16)}, TypeError,
         "segments must hold integer labels, got dtype torch.float32"),
        (feature_ablation, {"segments": [[0]]}, TypeError, "segments must be an \\(N,H,W\\) integer tensor"),
        (rise, {"p_keep": 0.0}, ValueError, r"p_keep must be a probability in \(0, 1\], got 0.0"),
        (rise, {"n_masks": 0}, ValueError, "n_masks must be an integer >= 1, got 0"),
        (rise, {"grid": 17}, ValueError, r"grid \(17, 17\) has more cells than the image \(16, 16\)"),
        (rise, {"grid": 4, "cell_size": 4}, ValueError, "pass either grid or cell_size, not both"),
    ],
)
def test_feature_ablation_and_rise_bad_input(tiny_cnn, tiny_x, method, kwargs, error, message):
    with pytest.raises(error, match=message):
        method(tiny_cnn, tiny_x, **kwargs)


def test_gradient_free_methods_leave_the_model_as_it_was(tiny_cnn, tiny_x):
    tiny_cnn.train()
    flags = [p.requires_grad for p in tiny_cnn.parameters()]
    with pytest.raises(ValueError):
        occlusion(tiny_cnn, tiny_x, window=99)
    rise(tiny_cnn, tiny_x, n_masks=4, grid=4, seed=0)
    assert tiny_cnn.training and [p.requires_grad for p in tiny_cnn.parameters()] == flags
