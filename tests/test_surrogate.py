"""LIME and KernelSHAP: agreement with the lime package, exact Shapley values, efficiency, seeds, black boxes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn

import heatlens as hl
from heatlens.methods.segmentation import segment
from heatlens.methods.surrogate import (
    image_and_mask, kernel_shap, lime, paired_masks, ranking_check, segment_means, weighted_ridge,
)

SIZE = 32


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return make_tiny_cnn(num_classes=5, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def image(photos) -> np.ndarray:
    """A 32x32 photo crop as (H,W,C) float pixels in [0, 1] (lime's image; heatlens's x is its NCHW view)."""
    return photos[0][120:184:2, 160:224:2].astype(np.float64) / 255


@pytest.fixture(scope="module")
def x(image) -> torch.Tensor:
    return torch.from_numpy(image).float().permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def segs(image) -> torch.Tensor:
    return segment(image, "slic", n_segments=12)


def _probabilities(net):
    """lime's classifier_fn: (B,H,W,C) pixels -> (B,K) probabilities of the same network."""
    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            t = torch.as_tensor(np.asarray(batch), dtype=torch.float32).permute(0, 3, 1, 2)
            return net(t).softmax(1).double().numpy()
    return predict


def _lime_reference(net, image, segs, *, num_samples, seed, hide_color=None, num_features=100000,
                    feature_selection="none", regressor=None, label=0):
    from lime.lime_image import LimeImageExplainer

    explainer = LimeImageExplainer(kernel_width=0.25, feature_selection=feature_selection, random_state=seed)
    return explainer.explain_instance(
        image, _probabilities(net), labels=(label,), top_labels=None, hide_color=hide_color,
        num_features=num_features, num_samples=num_samples, batch_size=64,
        segmentation_fn=lambda _img: segs[0].numpy(), random_seed=0, model_regressor=regressor)


def _lime_masks(seed: int, num_samples: int, s: int) -> np.ndarray:
    """lime's draw: RandomState(seed).randint(0, 2, num_samples * S), first row all on."""
    from sklearn.utils import check_random_state

    masks = check_random_state(seed).randint(0, 2, num_samples * s).reshape(num_samples, s)
    masks[0] = 1
    return masks


def _ref_weights(ref, label: int, s: int) -> np.ndarray:
    out = np.zeros(s)
    for f, w in ref.local_exp[label]:
        out[f] = w
    return out


@pytest.mark.parametrize("hide_color, lime_hide", [(None, None), ("zeros", 0)])
def test_lime_matches_the_lime_package(net, image, x, segs, hide_color, lime_hide):
    """Same image, segments and masks: same segment weights (1e-4), intercept, R², local prediction, top segments."""
    s, n, label = int(segs.max()) + 1, 300, 2
    ref = _lime_reference(net, image, segs, num_samples=n, seed=7, hide_color=lime_hide, label=label)
    e = lime(net, x, label, segments=segs, num_samples=n, masks=_lime_masks(7, n, s), hide_color=hide_color)
    expected = _ref_weights(ref, label, s)
    np.testing.assert_allclose(e.extras["weights"][0].numpy(), expected, atol=1e-4)
    assert abs(float(e.extras["intercept"][0]) - ref.intercept[label]) < 1e-4
    assert abs(float(e.extras["r2"][0]) - ref.score) < 1e-4
    assert abs(float(e.extras["local_pred"][0]) - float(ref.local_pred[0])) < 1e-4
    top = [f for f, w in ref.local_exp[label] if w > 0][:5]
    assert e.extras["top_segments"][0].tolist()[: len(top)] == top
    # attributions paint each segment's weight on its pixels
    assert torch.allclose(e.attributions[0, 0], e.extras["weights"][0][segs[0]])


def test_lime_feature_selection_and_lasso_match_the_lime_package(net, image, x, segs):
    """lime's 'highest_weights' selection (num_features > 6) and a Lasso regressor, same masks."""
    from sklearn.linear_model import Lasso

    s, n = int(segs.max()) + 1, 200
    ref = _lime_reference(net, image, segs, num_samples=n, seed=1, num_features=7, feature_selection="highest_weights")
    e = lime(net, x, 0, segments=segs, num_samples=n, masks=_lime_masks(1, n, s), num_features=7,
             feature_selection="highest_weights")
    np.testing.assert_allclose(e.extras["weights"][0].numpy(), _ref_weights(ref, 0, s), atol=1e-4)
    assert int((e.extras["weights"][0] != 0).sum()) == 7
    ref = _lime_reference(net, image, segs, num_samples=n, seed=1, regressor=Lasso(alpha=1e-4))
    e = lime(net, x, 0, segments=segs, num_samples=n, masks=_lime_masks(1, n, s), regressor="lasso", alpha=1e-4)
    np.testing.assert_allclose(e.extras["weights"][0].numpy(), _ref_weights(ref, 0, s), atol=1e-4)


def test_image_and_mask_matches_lime(net, image, x, segs):
    s, n = int(segs.max()) + 1, 200
    ref = _lime_reference(net, image, segs, num_samples=n, seed=3, label=1)
    e = lime(net, x, 1, segments=segs, num_samples=n, masks=_lime_masks(3, n, s))
    for kwargs in ({"positive_only": True, "num_features": 3, "hide_rest": True},
                   {"positive_only": False, "num_features": 4, "hide_rest": False},
                   {"positive_only": False, "negative_only": True, "num_features": 2}):
        img_ref, mask_ref = ref.get_image_and_mask(1, **kwargs)
        img, mask = image_and_mask(e, 0, image=image, **kwargs)
        np.testing.assert_array_equal(mask, mask_ref)
        np.testing.assert_allclose(img, img_ref)


def test_lime_several_labels_equal_separate_calls(net, x, segs):
    both = lime(net, x, 0, segments=segs, num_samples=150, seed=5, labels=[3])
    alone = lime(net, x, 3, segments=segs, num_samples=150, seed=5)
    assert torch.allclose(both.extras["label_weights"][0, 0], alone.extras["weights"][0], atol=1e-6)
    assert torch.allclose(both.extras["label_r2"][0, 0], alone.extras["r2"][0], atol=1e-6)
    img_a, mask_a = image_and_mask(both, 0, label=3)
    img_b, mask_b = image_and_mask(alone, 0)
    np.testing.assert_array_equal(mask_a, mask_b)


def test_segment_means_are_per_segment_channel_averages(x, segs):
    means = segment_means(x, segs)
    for s in range(int(segs.max()) + 1):
        inside = segs[0] == s
        expected = x[0][:, inside].mean(1)
        assert torch.allclose(means[0][:, inside], expected[:, None].expand(-1, int(inside.sum())), atol=1e-6)


# --- KernelSHAP -----------------------------------------------------------------------------------

def _brute_force_shapley(net, x, segs, baseline, target):
    """Exact Shapley values of the segment game v(S) = p_target(x with only S shown), by the formula."""
    s = int(segs.max()) + 1
    coalitions = list(itertools.product([0, 1], repeat=s))
    inputs = torch.stack([torch.where(torch.tensor(c, dtype=torch.bool)[segs[0]], x[0], baseline) for c in coalitions])
    with torch.no_grad():
        values = net(inputs).softmax(1)[:, target].double()
    v = {c: float(val) for c, val in zip(coalitions, values)}
    phi = np.zeros(s)
    for i in range(s):
        for c in coalitions:
            if c[i]:
                continue
            k = sum(c)
            with_i = c[:i] + (1,) + c[i + 1:]
            phi[i] += math.factorial(k) * math.factorial(s - k - 1) / math.factorial(s) * (v[with_i] - v[c])
    return phi, v[(0,) * s], v[(1,) * s]


@pytest.fixture(scope="module")
def six_segments() -> torch.Tensor:
    """A 2x3 grid over 32x32 -> 6 segments (uneven cells)."""
    rows = (torch.arange(SIZE) >= 16).long()
    cols = torch.bucketize(torch.arange(SIZE), torch.tensor([10, 21]), right=True)
    return (rows[:, None] * 3 + cols[None, :])[None]


def test_kernel_shap_exact_equals_brute_force_shapley(net, x, six_segments):
    e = kernel_shap(net, x, 4, segments=six_segments, baseline=0.5)
    phi, empty, full = _brute_force_shapley(net, x, six_segments, torch.full_like(x[0], 0.5), 4)
    assert bool(e.extras["exact"][0]) and int(e.extras["n_evaluations"][0]) == 2**6
    np.testing.assert_allclose(e.extras["weights"][0].double().numpy(), phi, atol=1e-6)
    assert abs(float(e.extras["base_value"][0]) - empty) < 1e-6 and abs(float(e.extras["value"][0]) - full) < 1e-6
    # efficiency: the values add up to f(x) - f(all hidden)
    assert abs(float(e.extras["weights"][0].double().sum()) - (full - empty)) < 1e-5


def test_kernel_shap_sampled_keeps_efficiency_and_approaches_exact(net, x, six_segments):
    exact = kernel_shap(net, x, 4, segments=six_segments, baseline=0.5)
    sampled = kernel_shap(net, x, 4, segments=six_segments, baseline=0.5, n_samples=40, seed=0)
    assert not bool(sampled.extras["exact"][0]) and int(sampled.extras["n_evaluations"][0]) == 42
    gap = float(sampled.extras["value"][0] - sampled.extras["base_value"][0])
    assert abs(float(sampled.extras["weights"][0].double().sum()) - gap) < 1e-5
    err = (sampled.extras["weights"] - exact.extras["weights"]).abs().max()
    assert err < 0.2 * exact.extras["weights"].abs().max()


def test_kernel_shap_many_segments_samples_with_efficiency(net, x):
    grid = segment(x, "grid", cell_size=8)  # 16 segments > 12: sampled
    e = kernel_shap(net, x, segments=grid, n_samples=200, seed=1)
    assert not bool(e.extras["exact"][0]) and int(e.extras["n_evaluations"][0]) == 202
    gap = float(e.extras["value"][0] - e.extras["base_value"][0])
    assert abs(float(e.extras["weights"][0].double().sum()) - gap) < 1e-5


# --- seeds, black boxes, batching, errors -----------------------------------------------------------

def test_seeded_determinism(net, x, segs):
    a = lime(net, x, segments=segs, num_samples=100, seed=11)
    b = lime(net, x, segments=segs, num_samples=100, seed=11)
    c = lime(net, x, segments=segs, num_samples=100, seed=12)
    assert torch.equal(a.attributions, b.attributions) and not torch.equal(a.attributions, c.attributions)
    grid = segment(x, "grid", cell_size=8)
    k1 = kernel_shap(net, x, segments=grid, n_samples=60, seed=2)
    k2 = kernel_shap(net, x, segments=grid, n_samples=60, seed=2)
    assert torch.equal(k1.attributions, k2.attributions)


def test_black_box_predict_function_gets_the_same_explanations(net, x, segs, six_segments):
    def predict(batch: np.ndarray) -> np.ndarray:  # numpy in, probabilities out
        with torch.no_grad():
            return net(torch.from_numpy(batch)).softmax(1).numpy()

    box = hl.wrap(predict, input_size=(3, SIZE, SIZE))
    for method, kwargs in ((lime, {"num_samples": 120, "seed": 0, "segments": segs}),
                           (kernel_shap, {"baseline": "blur", "segments": six_segments})):
        ours = method(box, x, **kwargs)
        torch_ = method(net, x, **kwargs)
        assert torch.equal(ours.targets, torch_.targets)
        torch.testing.assert_close(ours.extras["weights"], torch_.extras["weights"], atol=1e-5, rtol=0)


def test_batch_rows_are_independent_and_batched(net, x, segs, six_segments):
    """Two images with different segment counts in one call explain like two calls, in engine batches."""
    x2, segs2 = torch.cat([x, x.flip(-1)]), torch.cat([six_segments, segs])
    before = hl.batching.call_stats()["batches"]
    joint = kernel_shap(net, x2, 0, segments=segs2, n_samples=64, seed=3, batch_size=32)
    n_eval = int(joint.extras["n_evaluations"].sum())
    assert hl.batching.call_stats()["batches"] - before == math.ceil(n_eval / 32)
    assert joint.extras["exact"].tolist() == [True, False]  # 2^6 <= 64 + 2 evaluations, 2^12 is not
    first = kernel_shap(net, x, 0, segments=six_segments, n_samples=64)
    second = kernel_shap(net, x2[1:], 0, segments=segs, n_samples=64, seed=3)  # exact rows draw nothing
    torch.testing.assert_close(joint.extras["weights"][0, :6], first.extras["weights"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(joint.extras["weights"][1], second.extras["weights"][0], atol=1e-6, rtol=0)
    assert not joint.extras["weights"][0, 6:].any()  # padding beyond the first image's 6 segments
    with pytest.raises(ValueError, match=r"masks must be \(num_samples, S\) or \(N, num_samples, S\)"):
        lime(net, x2, 0, segments=segs2, num_samples=80, masks=np.ones((80, 6)))  # segment counts differ


def test_bad_arguments_name_themselves(net, x, segs):
    with pytest.raises(ValueError, match=r"segments has shape \(1, 8, 8\) but x needs \(1, 32, 32\)"):
        lime(net, x, segments=torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="segments must be one of 'quickshift', 'slic', 'felzenszwalb', 'grid', got 'slik'"):
        kernel_shap(net, x, segments="slik")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2, got 1"):
        lime(net, x, segments=segs, num_samples=1)
    with pytest.raises(ValueError, match="regressor must be one of 'ridge', 'lasso', got 'ols'"):
        lime(net, x, segments=segs, regressor="ols")
    with pytest.raises(ValueError, match="kernel_width must be a positive number, got 0"):
        lime(net, x, segments=segs, kernel_width=0)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\], got \[7\]"):
        lime(net, x, segments=segs, labels=[7])
    with pytest.raises(ValueError, match="n_samples must be an integer >= 2, got 'many'"):
        kernel_shap(net, x, segments=segs, n_samples="many")
    e = lime(net, x, 0, segments=segs, num_samples=20, seed=0)
    with pytest.raises(ValueError, match="label 3 was not explained"):
        image_and_mask(e, 0, label=3)


# --- lime(num_samples="auto"): antithetic rounds that stop when the top segments settle ---------------

TOP5 = [3, 9, 12, 0, 6]  # segment ids of the five largest weights, in order


def _segment_game(size: int = SIZE, cell: int = 8):
    """A model linear in the segment coalition: on an all-ones image with hidden segments at 0, the
    class-0 logit is sum_j a_j z_j + b exactly (z_j = 1 when grid cell j is shown), class 1's is 0.

    Returns (model, x, grid segments, a (S,)). The top five a are clear of the rest.
    """
    x = torch.ones(1, 3, size, size)
    grid = segment(x, "grid", cell_size=cell)
    s = int(grid.max()) + 1
    a = torch.linspace(-0.4, 0.4, s)[torch.randperm(s, generator=torch.Generator().manual_seed(0))]
    a[TOP5] = torch.tensor([2.0, 1.6, 1.3, 1.0, 0.8])
    counts = torch.bincount(grid.flatten(), minlength=s).float()
    linear = torch.nn.Linear(3 * size * size, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0] = (a / (3 * counts))[grid[0]].flatten().repeat(3)  # channel-major like Flatten
        linear.bias.copy_(torch.tensor([-float(a.sum()) / 2, 0.0]))  # p(class 0) near 1/2 at half the cells
    return torch.nn.Sequential(torch.nn.Flatten(), linear).eval(), x, grid, a


def test_lime_auto_stops_early_with_the_true_top_segments():
    """Scores linear in the coalition: the top-5 is clear, so the rounds stop at the second check."""
    model, x, grid, a = _segment_game()
    e = lime(model, x, 0, segments=grid, num_samples="auto", hide_color="zeros", output="logit", seed=0)
    assert e.extras["stop_reason"][0] in ("separated", "agreement")
    # the image itself + a first round of 4(S+1) = 68 samples, then `patience` = 2 checks 32 samples apart
    assert int(e.extras["n_samples"][0]) == 1 + 68 + 32
    assert e.extras["top_segments"][0].tolist() == TOP5
    assert float(e.extras["agreement"][0]) > 4.5 and float(e.extras["ceiling"][0]) > 4.5
    # the weights are the slopes a up to the ridge's shrinkage
    assert torch.nn.functional.cosine_similarity(e.extras["weights"][0].double(), a.double(), 0) > 0.99


def test_lime_auto_converges_to_the_full_sample_answer():
    """Probabilities (a sigmoid of the linear game: curvature and interactions): the early answer has the
    top-5 of an 8,000-sample fit; run on to max_samples, the weights approach that fit like plain lime's."""
    model, x, grid, _ = _segment_game()
    kw = {"segments": grid, "hide_color": "zeros", "output": "probability"}
    reference = lime(model, x, 0, num_samples=8000, seed=1, **kw).extras["weights"][0]
    auto = lime(model, x, 0, num_samples="auto", seed=2, **kw)
    plain = lime(model, x, 0, num_samples=500, seed=2, **kw)
    assert int(auto.extras["n_samples"][0]) < 200
    assert set(auto.extras["top_segments"][0].tolist()) == set(TOP5) == set(plain.extras["top_segments"][0].tolist())
    full = lime(model, x, 0, num_samples="auto", seed=2, patience=10**6, max_samples=500, **kw)  # runs to the end
    assert full.extras["stop_reason"] == ("max_samples",) and int(full.extras["n_samples"][0]) == 499
    errors = [float((e.extras["weights"][0] - reference).abs().max()) for e in (auto, full, plain)]
    # more samples, closer; here the response is mostly odd (a sigmoid around 1/2), which pairing does
    # not cancel, so paired sampling is no better than plain at the same count (ranking_check's ratio > 1)
    assert errors[1] < errors[0] / 1.4 and errors[1] < 0.1 * float(reference.abs().max())
    assert errors[1] < 3 * errors[2] and float(full.extras["precision_ratio"][0]) > 1


def test_lime_auto_is_deterministic_under_a_seed(net, x, segs):
    a = lime(net, x, 0, segments=segs, num_samples="auto", seed=4)
    b = lime(net, x, 0, segments=segs, num_samples="auto", seed=4)
    c = lime(net, x, 0, segments=segs, num_samples="auto", seed=5)
    assert torch.equal(a.attributions, b.attributions) and a.extras["stop_reason"] == b.extras["stop_reason"]
    assert torch.equal(a.extras["n_samples"], b.extras["n_samples"])
    assert not torch.equal(a.attributions, c.attributions)
    assert a.params["num_samples"] == "auto" and a.params["max_samples"] == 1000 and a.params["tolerance"] == 0.5
    plain = lime(net, x, 0, segments=segs, num_samples=120, seed=4)
    assert plain.extras["n_samples"].tolist() == [120] and "stop_reason" not in plain.extras


def test_paired_masks_are_lime_draws_with_their_complements():
    rows = paired_masks(9, 2000, torch.Generator().manual_seed(0))
    assert torch.equal(rows[1::2], ~rows[0::2])
    # every row alone is lime's draw: each segment on with probability 1/2, independently
    first = rows[0::2].double()
    assert float((first.mean(0) - 0.5).abs().max()) < 0.04
    assert float((torch.corrcoef(first.T) - torch.eye(9)).abs().max()) < 0.08


def test_ranking_check_standard_errors_are_calibrated():
    """Over 200 independent runs, the cluster-robust standard error of the weakest contrast matches its
    actual spread, and the reported variance ratio matches paired vs plain sampling.

    The game (±1 coding) is linear plus an even pairwise term (which pairing cancels) and an odd
    three-way term (which it does not), so pairing's variance ratio is 2 o² / (e² + o²) = 0.2.
    """
    s, m, k = 8, 161, 3
    a = torch.tensor([1.5, 1.2, 1.0, 0.4, 0.3, 0.0, -0.3, -0.6], dtype=torch.float64)

    def game(z: torch.Tensor) -> torch.Tensor:
        sg = 2 * z - 1
        return 0.1 * sg @ a + 0.15 * sg[:, 6] * sg[:, 7] + 0.05 * sg[:, 0] * sg[:, 1] * sg[:, 2]

    def run(seed: int, paired: bool) -> tuple[float, float, float, bool]:
        gen = torch.Generator().manual_seed(seed)
        draws = paired_masks(s, m // 2, gen) if paired else torch.randint(0, 2, (m - 1, s), generator=gen).bool()
        z = torch.cat([torch.ones(1, s, dtype=torch.bool), draws]).double()
        clusters = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.arange(m - 1) // (2 if paired else 1)])
        w = torch.ones(m, dtype=torch.float64)
        top, zval, ratio, _, _ = ranking_check(z, game(z), w, clusters, 1.0, k, True)
        ridge, _ = weighted_ridge(z, game(z)[:, None], w, 1.0)
        gap = float(ridge[2, 0] - ridge[3, 0])  # the weakest contrast: third member vs best outsider
        return gap, gap / zval, ratio, top == [0, 1, 2]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 8x8 algebra: a thread pool only adds overhead
    try:
        paired = np.array([run(i, True) for i in range(200)])
        plain = np.array([run(1000 + i, False) for i in range(200)])
    finally:
        torch.set_num_threads(threads)
    assert paired[:, 3].mean() > 0.95  # the top-3 is found, so the weakest contrast is the 3-vs-4 gap
    assert 0.85 < paired[:, 1].mean() / paired[:, 0].std() < 1.15
    empirical_ratio = paired[:, 0].var() / plain[:, 0].var()
    assert 0.15 < empirical_ratio < 0.3  # pairing cancels the even term's noise, not the odd one's
    assert 0.75 < paired[:, 2].mean() / empirical_ratio < 1.3
    assert abs(plain[:, 2].mean() - 1) < 1e-9  # one row per cluster: the two estimates coincide


def test_lime_auto_bad_arguments(net, x, segs):
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2 or 'auto', got 'many'"):
        lime(net, x, segments=segs, num_samples="many")
    with pytest.raises(ValueError, match="masks cannot be combined with num_samples='auto'"):
        lime(net, x, segments=segs, num_samples="auto", masks=np.ones((10, 12)))
    with pytest.raises(ValueError, match="max_samples must be an integer >= 3, got 2"):
        lime(net, x, segments=segs, num_samples="auto", max_samples=2)
    with pytest.raises(ValueError, match="z_stop must be a positive number, got -1"):
        lime(net, x, segments=segs, num_samples="auto", z_stop=-1)
    with pytest.raises(ValueError, match="tolerance must be a positive number, got nan"):
        lime(net, x, segments=segs, num_samples="auto", tolerance=float("nan"))
