"""Metrics: the curve engine against the CSEP 590B homework definition, closed forms on linear models,
Captum's infidelity, the one-batch memory property, and the errors users see."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens.metrics import compare, deletion, insertion, perturbation_curve
from heatlens.metrics.faithfulness import noisy_linear_imputation
from conftest import recording


# --- the homework's insertion / deletion, written the straightforward way ------------------------------
def homework_curve(model, img, importance, target, baseline, kind, features_per_step, size=8):
    """CSEP 590B 4(c)/(d): one image, 8x8 superpixels inserted / deleted from most to least important.

    img (1,3,H,W); importance (1,H/size,W/size) summed per superpixel; returns (curve, num_feats)."""
    n_feats = importance[0].numel()
    order = torch.argsort(importance[0].flatten(), descending=True, stable=True)
    curve, num_feats = [], []
    k = 0
    while True:
        chosen = torch.zeros(n_feats, dtype=torch.bool)
        chosen[order[:k]] = True
        grid = chosen.view(importance.shape[1:])
        mask = grid.repeat_interleave(size, 0).repeat_interleave(size, 1)[None, None]
        if kind == "insertion":
            probe = torch.where(mask, img, baseline)
        else:
            probe = torch.where(mask, baseline, img)
        with torch.no_grad():
            curve.append(float(model(probe).softmax(1)[0, target]))
        num_feats.append(k)
        if k == n_feats:
            break
        k = min(k + features_per_step, n_feats)
    return np.array(curve), np.array(num_feats)


@pytest.mark.parametrize("kind", ["insertion", "deletion"])
def test_insertion_deletion_equal_homework_reference_on_effnet(effnet, chelsea_x, kind):
    e = hl.explain(effnet, chelsea_x, "saliency")
    importance = torch.nn.functional.avg_pool2d(e.maps()[:, None], 8)[:, 0] * 64  # sum per 8x8 superpixel
    black = effnet.preprocess(np.zeros((224, 224, 3), np.uint8))
    target = int(e.targets[0])
    curve, num_feats = homework_curve(effnet, chelsea_x, importance, target, black, kind, features_per_step=112)
    metric = insertion if kind == "insertion" else deletion
    r = metric(effnet, chelsea_x, e, granularity=8, features_per_step=112, fill="black")
    np.testing.assert_allclose(r.curves[0].numpy(), curve, atol=2e-5)
    np.testing.assert_allclose(r.x.numpy(), num_feats / 784, atol=1e-12)
    assert r.values[0].item() == pytest.approx(np.trapezoid(curve, num_feats / 784), abs=2e-5)
    # the curve starts at the clean image (deletion) / the black image (insertion) and ends at the other
    with torch.no_grad():
        p_clean = float(effnet(chelsea_x).softmax(1)[0, target])
    assert (r.curves[0, 0] if kind == "deletion" else r.curves[0, -1]).item() == pytest.approx(p_clean, abs=1e-5)


@pytest.mark.slow
def test_random_maps_lose_on_insertion_and_on_the_insertion_deletion_gap_but_win_deletion(effnet, photos):
    """Issue 6's check, settled at the CSEP 590B homework's own settings (problem 4): Occlusion with 8x8
    superpixels and the black ("zeros", 2(c)) baseline, SmoothGrad with 50 samples of the softmax
    gradient (its ``calculate_gradients``), Random = N(0,1) per pixel summed per 8x8 superpixel, curves of
    the probability of the class predicted on the clean image, 8x8 superpixels filled with the black
    image (16 of the 784 per step; the homework leaves the step free).

    Measured on chelsea/coffee/rocket, efficientnet-lite0, 16 features per step (AUC means over the
    three photos; random for seeds 0 / 1 / 2; occlusion with the black baseline unless noted):

        fill, metric                  occlusion 8  occlusion 16  smoothgrad  random
        black, insertion (higher)        0.136        0.180        0.278     0.035 / 0.032 / 0.066
        black, deletion (lower)          0.069        0.064        0.069     0.044 / 0.037 / 0.029
        black, insertion - deletion      0.067        0.116        0.209    -0.009 / -0.004 / 0.037
        blur, deletion (lower)           0.255        0.262        0.324     0.233 / 0.280 / 0.238
        blur, insertion (higher)         0.337        0.441        0.360     0.270 / 0.226 / 0.261
        blur, deletion, occlusion
          with the blur baseline         0.111        0.168        0.324     0.233 / 0.280 / 0.238
        blur, insertion, same            0.555        0.489        0.360     0.270 / 0.226 / 0.261
        zeros (model-space grey), del.   0.096        0.099        0.086     0.056 / 0.057 / 0.062
        mean colour, deletion            0.097        0.108        0.124     0.104 / 0.100 / 0.106

    So Random does NOT score worse than both on deletion in any faithful setting (occlusion 8 beats it
    only with the blur fill and the same blur baseline, and narrowly with the mean fill; SmoothGrad
    never does):
    deleting scattered 8x8 squares pushes the image off the data manifold (a grid of holes) and the
    probability collapses faster than when whole objects are removed (Hooker et al., 2019; Rong et al.,
    2022). Random does lose on insertion, and on insertion - deletion, which equals LeRF - MoRF deletion
    (LeRF deletion with a fill is insertion read backwards) and so cancels the off-manifold drop common
    to both orders (Blücher et al., 2024's symmetric relevance gain). The test pins all three facts.
    """
    x = effnet.preprocess(photos)
    table = compare(effnet, x, ["occlusion", "smoothgrad"], ["insertion", "deletion"],
                    method_kwargs={"occlusion": {"superpixel_size": 8, "baseline": "black"},
                                   "smoothgrad": {"n_samples": 50, "noise": 0.15, "output": "probability"}},
                    granularity=8, features_per_step=16, fill="black")
    mean = {(r["method"], r["metric"]): r["mean"] for r in table.rows}
    gap = {m: mean[(m, "insertion")] - mean[(m, "deletion")] for m in table.methods}
    for method in ("occlusion", "smoothgrad"):
        assert mean[("random", "insertion")] < mean[(method, "insertion")]  # insertion: random is worst
        assert gap["random"] < gap[method]  # the off-manifold drop cancelled: random is worst
        assert mean[("random", "deletion")] < mean[(method, "deletion")]  # deletion alone: random "wins"
    assert table.best("insertion") != "random" and table.best("deletion") == "random"


# --- the curve engine in closed form ------------------------------------------------------------------
def test_lerf_deletion_is_insertion_read_backwards(tiny_cnn, tiny_x):
    """Deleting the least relevant k features leaves the most relevant F - k: insertion's image at F - k.
    So insertion - deletion (the Random-map check above) is LeRF - MoRF deletion, the same area."""
    maps = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(9))  # no ties between features
    settings = dict(granularity=4, features_per_step=1, fill="zeros", output="logit")
    lerf = hl.metrics.pixel_flipping(tiny_cnn, tiny_x, maps, order="lerf", **settings)
    ins = insertion(tiny_cnn, tiny_x, maps, **settings)
    torch.testing.assert_close(lerf.curves, ins.curves.flip(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(lerf.values, ins.values, atol=1e-5, rtol=0)


def test_deletion_curve_of_linear_model_is_logit_minus_cumulative_contributions(linear_model):
    """f linear, fill 0, a = w * x: deleting feature set S lowers the logit by exactly sum_S a."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    e = hl.explain(linear_model, x, "input_x_gradient")
    for granularity in (1, 2):
        curves, xs = perturbation_curve(hl.wrap(linear_model, input_size=(3, 4, 4)), x, e.maps("sum"), e.targets,
                                        mode="delete", order="morf", granularity=granularity,
                                        features_per_step=1, fill="zeros", output="logit")
        g = granularity
        contributions = e.attributions.sum(1)  # (N,4,4)
        per_feature = contributions.view(2, 4 // g, g, 4 // g, g).sum((2, 4)).flatten(1)
        ordered = torch.sort(per_feature, dim=1, descending=True, stable=True).values
        logit = e.outputs.gather(1, e.targets[:, None])
        expected = torch.cat([logit, logit - ordered.cumsum(1)], 1)
        torch.testing.assert_close(curves, expected.float(), atol=1e-4, rtol=0)
        torch.testing.assert_close(xs, torch.arange(per_feature.shape[1] + 1, dtype=torch.float64) / per_feature.shape[1])


def test_pixel_flipping_lerf_keeps_score_longer_than_morf(linear_model):
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    e = hl.explain(linear_model, x, "input_x_gradient")
    morf = hl.metrics.pixel_flipping(linear_model, x, e, order="morf", fill="zeros", output="logit", steps=16)
    lerf = hl.metrics.pixel_flipping(linear_model, x, e, order="lerf", fill="zeros", output="logit", steps=16)
    assert bool((lerf.values > morf.values).all())
    assert not morf.higher_is_better and lerf.higher_is_better


def test_segments_rank_by_sum_and_absent_segments_are_never_used(tiny_cnn, tiny_x):
    """Segments as granularity: a 2-segment image ends after 2 features even when another has 4."""
    seg = torch.zeros(2, 16, 16, dtype=torch.long)
    seg[0, :, 8:] = 1
    seg[1] = (torch.arange(16)[:, None] // 8) * 2 + torch.arange(16)[None, :] // 8
    maps = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(5))
    clf = hl.wrap(tiny_cnn, input_size=(3, 16, 16))
    curves, xs = perturbation_curve(clf, tiny_x[:2], maps, torch.tensor([0, 1]), mode="delete",
                                    granularity=seg, features_per_step=1, fill="zeros", output="logit")
    assert curves.shape == (2, 5)
    # image 0 has all features deleted from step 2 on: the score stays at the all-zero input's
    with torch.no_grad():
        zero_score = clf(torch.zeros(1, 3, 16, 16))[0, 0]
    torch.testing.assert_close(curves[0, 2:], zero_score.expand(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(curves[1, 4], clf(torch.zeros(1, 3, 16, 16))[0, 1].detach(), atol=1e-5, rtol=0)


# --- the one-batch memory property ----------------------------------------------------------------------
class Recorder(nn.Module):
    """Wraps a net; records the largest batch and how many earlier inputs are still alive at each call."""

    def __init__(self, net: nn.Module, clean: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.clean = clean.data_ptr()  # the user's x is alive anyway: only perturbed batches count
        self.refs: list[weakref.ref] = []
        self.largest = 0
        self.most_alive = 0
        self.items = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.data_ptr() != self.clean:  # refcounting frees a dropped batch at once: no gc needed
            alive = sum(r() is not None for r in self.refs) + 1  # + this batch
            self.most_alive = max(self.most_alive, alive)
            self.refs.append(weakref.ref(x))
        self.largest = max(self.largest, x.shape[0])
        self.items += x.shape[0]
        return self.net(x)


def test_metrics_on_ten_images_with_8x8_superpixels_hold_one_batch_of_perturbed_images():
    gen = torch.Generator().manual_seed(6)
    net = nn.Sequential(OrderedDict([("conv", nn.Conv2d(3, 4, 3, padding=1)), ("relu", nn.ReLU()),
                                     ("pool", nn.AdaptiveAvgPool2d(2)), ("flat", nn.Flatten()),
                                     ("fc", nn.Linear(16, 5))])).eval()
    x = torch.randn(10, 3, 64, 64, generator=gen)
    maps = torch.randn(10, 64, 64, generator=gen)
    recorder = Recorder(net, x)
    clf = hl.wrap(recorder, input_size=(3, 64, 64))
    recorder.items = recorder.largest = recorder.most_alive = 0  # forget wrap's probes (both layouts)
    recorder.refs.clear()
    steps = {"insertion": 65, "deletion": 65, "faithfulness_correlation": 20}  # 64 superpixels + the start
    results = hl.evaluate(clf, x, maps, list(steps), granularity=8, features_per_step=1, n_runs=20,
                          subset_size=64, batch_size=32)
    assert recorder.largest <= 32
    # every curve point / subset of every image, plus one clean forward per metric to resolve the
    # target and faithfulness correlation's clean score; insertion and deletion run together
    # (one target resolution, x and the filled image scored once for both curves)
    assert recorder.items == sum(10 * s for s in steps.values()) - 10 * 2 + 10 * (len(steps) - 1) + 10
    assert recorder.most_alive == 1  # no earlier batch of perturbed images survives the next call
    assert results["deletion"].curves.shape == (10, 65)


# --- faithfulness: closed forms and reference implementations ---------------------------------------------
def test_completeness_of_integrated_gradients_matches_its_own_gap_and_flags_saliency(tiny_cnn, tiny_x):
    ig = hl.explain(tiny_cnn, tiny_x, "integrated_gradients", steps=64)
    r = hl.metrics.completeness(tiny_cnn, tiny_x, ig)
    torch.testing.assert_close(r.values, ig.extras["completeness_gap"].abs().double(), atol=1e-5, rtol=0)
    assert float(r.values.max()) < 1e-2
    sal = hl.explain(tiny_cnn, tiny_x, "saliency")
    assert float(hl.metrics.completeness(tiny_cnn, tiny_x, sal).values.mean()) > 0.1


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_equals_captum_with_the_same_perturbations(tiny_cnn, tiny_x, normalize):
    from captum.metrics import infidelity as captum_infidelity

    e = hl.explain(tiny_cnn, tiny_x, "saliency")
    seen = []

    class Spy(nn.Module):  # records x - I as heatlens builds it, so Captum can replay the same I
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.net(x)

    spy = Spy().eval()
    ours = hl.metrics.infidelity(hl.wrap(spy, input_size=(3, 16, 16)), tiny_x, e, n_perturbations=6,
                                 noise=0.1, normalize=normalize, batch_size=1000)
    perturbed = seen[-1]  # one engine batch (batch_size=1000) of all x - I, image-major
    perturbations = tiny_x.repeat_interleave(6, 0) - perturbed

    def replay(inputs):
        return perturbations, inputs - perturbations

    theirs = captum_infidelity(tiny_cnn, replay, tiny_x, e.attributions, target=e.targets, n_perturb_samples=6,
                               max_examples_per_batch=24, normalize=normalize)
    torch.testing.assert_close(ours.values, theirs.double(), rtol=1e-4, atol=1e-6)


def test_noisy_linear_imputation_reproduces_a_linear_ramp():
    """The ROAD imputer solves a discrete Laplace-type equation: linear images are its fixed points."""
    yy, xx = np.mgrid[0:12, 0:12].astype(np.float64)
    image = np.stack([0.3 * yy - 0.1 * xx + 1.0, 0.05 * xx])
    hidden = np.zeros((12, 12), bool)
    hidden[3:9, 2:7] = True
    out = noisy_linear_imputation(image, hidden, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(out, image, atol=1e-10)
    noisy = noisy_linear_imputation(image, hidden, 0.5, np.random.default_rng(0))
    np.testing.assert_array_equal(noisy[:, ~hidden], image[:, ~hidden])  # known pixels never move


def test_road_curve_is_the_score_of_the_imputed_image_with_the_top_pixels_hidden(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x, "saliency")
    r = hl.metrics.road(tiny_cnn, tiny_x, e, percentages=(0.2, 0.6), output="logit", noise=0.0)
    maps = e.maps().flatten(1)
    for i in range(4):
        for j, fraction in enumerate((0.2, 0.6)):
            top = torch.argsort(maps[i], descending=True)[: round(fraction * 256)]
            hidden = torch.zeros(256, dtype=torch.bool)
            hidden[top] = True
            image = noisy_linear_imputation(tiny_x[i].numpy(), hidden.view(16, 16).numpy(), 0.0,
                                            np.random.default_rng(0))
            with torch.no_grad():
                expected = tiny_cnn(torch.from_numpy(image)[None])[0, e.targets[i]]
            assert r.curves[i, j].item() == pytest.approx(expected.item(), abs=1e-4)
    assert r.values.tolist() == pytest.approx(r.curves.mean(1).tolist())


# --- robustness ------------------------------------------------------------------------------------------
def test_max_sensitivity_of_saliency_on_a_linear_model_is_zero_and_of_gradient_x_input_exact(linear_model):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    sal = hl.explain(linear_model, x, "saliency")
    r = hl.metrics.max_sensitivity(linear_model, x, sal, n_samples=4, radius=0.05)
    assert float(r.values.abs().max()) < 1e-6  # gradients of a linear model never move
    assert r.params["method"] == "saliency"  # defaults to the explanation's own method
    seen = []
    ixg = hl.explain(linear_model, x, "input_x_gradient")
    r = hl.metrics.max_sensitivity(linear_model, x, ixg, method=recording(hl.methods.input_x_gradient, seen), n_samples=4, radius=0.05,
                                   batch_size=2)
    noisy = torch.cat(seen).view(4, 2, -1)  # draw-major
    w = linear_model[1].weight[ixg.targets]  # (2, 48)
    expected = ((w * (noisy - x.flatten(1))).norm(dim=2) / (w * x.flatten(1)).norm(dim=1)).amax(0)
    torch.testing.assert_close(r.values, expected.double(), rtol=1e-5, atol=1e-7)
    # every draw stays within radius * range of x
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    assert bool(((noisy - x.flatten(1)).abs().amax(2) <= 0.05 * span + 1e-6).all())


def test_robustness_is_seeded_and_independent_of_batch_size(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x, "saliency")
    a = hl.metrics.avg_sensitivity(tiny_cnn, tiny_x, e, n_samples=4, seed=3, batch_size=4)
    b = hl.metrics.avg_sensitivity(tiny_cnn, tiny_x, e, n_samples=4, seed=3, batch_size=16)
    torch.testing.assert_close(a.values, b.values)
    c = hl.metrics.local_lipschitz(tiny_cnn, tiny_x, e, n_samples=4, seed=3)
    assert bool((c.values > 0).all()) and c.extras["ratios"].shape == (4, 4)


# --- evaluate, targets, compare ------------------------------------------------------------------------------
def test_evaluate_scores_the_explained_class_not_the_prediction(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x, "saliency", target=3)
    via_explanation = hl.evaluate(tiny_cnn, tiny_x, e, ["deletion"], granularity=4)["deletion"]
    via_tensor = deletion(tiny_cnn, tiny_x, e.attributions, target=3, granularity=4)
    predicted = deletion(tiny_cnn, tiny_x, e.attributions, granularity=4)
    torch.testing.assert_close(via_explanation.values, via_tensor.values)
    assert not torch.allclose(via_explanation.values, predicted.values)


def test_compare_table_agrees_with_direct_metric_calls(tiny_cnn, tiny_x):
    table = compare(tiny_cnn, tiny_x, ["saliency", "input_x_gradient"], ["deletion", "sparseness"],
                    granularity=4)
    assert [(r["method"], r["metric"]) for r in table.rows] == [
        (m, k) for m in ("saliency", "input_x_gradient", "random") for k in ("deletion", "sparseness")]
    direct = deletion(tiny_cnn, tiny_x, table.explanations["input_x_gradient"], granularity=4)
    row = next(r for r in table.to_dicts() if r["method"] == "input_x_gradient" and r["metric"] == "deletion")
    assert row["mean"] == pytest.approx(direct.mean()) and row["sem"] == pytest.approx(direct.sem())
    md = table.to_markdown().splitlines()
    assert md[0] == "| method | deletion ↓ | sparseness ↑ |" and len(md) == 5
    assert table.to_text().splitlines()[2].startswith("saliency")
    wide = {r["method"]: r for r in table.to_wide()}
    assert list(wide) == ["saliency", "input_x_gradient", "random"]
    assert wide["input_x_gradient"]["deletion ↓"] == f"{direct.mean():.4g} ± {direct.sem():.2g}"


def test_localisation_metrics_on_a_hand_made_map():
    x = torch.zeros(1, 1, 4, 4)
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0], m[0, 0, 1], m[0, 3, 3] = 4.0, 2.0, 1.0
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2] = True
    mask[0, 1, 0] = True
    r = {name: hl.metrics.get_metric(name)(None, x, m, mask=mask)
         for name in ("pointing_game", "relevance_mass", "relevance_rank", "attribution_iou")}
    assert r["pointing_game"].values.item() == 1.0
    assert r["relevance_mass"].values.item() == pytest.approx(6 / 7)
    assert r["relevance_rank"].values.item() == pytest.approx(2 / 3)  # top-3 = (0,0), (0,1), (3,3)
    assert r["attribution_iou"].values.item() == pytest.approx(2 / 4)


# --- errors ---------------------------------------------------------------------------------------------------------
def test_errors_name_the_argument(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x, "saliency")
    with pytest.raises(ValueError, match=r"unknown metric 'delition'\. Did you mean: 'deletion'"):
        hl.evaluate(tiny_cnn, tiny_x, e, ["delition"])
    with pytest.raises(ValueError, match=r"metric 'pointing_game' needs a ground-truth mask"):
        hl.evaluate(tiny_cnn, tiny_x, e, ["pointing_game"])
    with pytest.raises(ValueError, match=r"mask must have shape \(N,H,W\) = \(4, 16, 16\), got \(4, 8, 8\)"):
        hl.metrics.relevance_mass(tiny_cnn, tiny_x, e, mask=torch.ones(4, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"explanation has 2 maps but x has 4 images"):
        deletion(tiny_cnn, tiny_x, e.attributions[:2])
    with pytest.raises(ValueError, match=r"mode must be one of 'insert', 'delete', got 'remove'"):
        perturbation_curve(hl.wrap(tiny_cnn, input_size=(3, 16, 16)), tiny_x, e.maps(), e.targets, mode="remove")
    with pytest.raises(ValueError, match=r"granularity must be an integer >= 1, got 0"):
        deletion(tiny_cnn, tiny_x, e, granularity=0)
    for size in (300, 256):  # a subset of every pixel is the same in every run: 0/0, not NaN
        with pytest.raises(ValueError, match=rf"subset_size must be smaller than the number of pixels 256, got {size}"):
            hl.metrics.faithfulness_correlation(tiny_cnn, tiny_x, e, subset_size=size)
    with pytest.raises(ValueError, match=r"method is required when explanation is a tensor"):
        hl.metrics.max_sensitivity(tiny_cnn, tiny_x, e.attributions)
    with pytest.raises(ValueError, match=r"unknown fill 'blurr'\. Did you mean: 'blur'"):
        deletion(tiny_cnn, tiny_x, e, fill="blurr", granularity=4)


# --- one map policy -------------------------------------------------------------------------------------
LOCATION_METHODS = {"occlusion": {"window": 4}, "feature_ablation": {"superpixel_size": 4},
                    "lime": {"num_samples": 40, "seed": 0}, "kernel_shap": {"n_samples": 40, "seed": 0},
                    "rise": {"n_masks": 20, "seed": 0}, "gradcam": {}}


def test_every_method_records_its_map_kind_in_the_registry_and_the_explanation(tiny_cnn, tiny_x):
    from heatlens.methods import METHODS

    kinds = {e.name: e.meta["map_kind"] for e in METHODS.entries()}
    assert set(kinds.values()) == {"location", "gradient"}
    assert {n for n, k in kinds.items() if k == "location"} >= set(LOCATION_METHODS) | {"scorecam", "eigencam"}
    assert kinds["guided_gradcam"] == kinds["saliency"] == kinds["deeplift"] == kinds["smoothgrad"] == "gradient"
    for name, kw in LOCATION_METHODS.items():
        e = hl.explain(tiny_cnn, tiny_x[:2], name, target=1, **kw)
        assert e.attributions.shape[1] == 1, name  # one score per location, not repeated per channel
        assert e.kind == "location"
        # signed: maps() is the score itself (upsampled for CAMs), never its absolute value
        up = torch.nn.functional.interpolate(e.attributions.float(), size=(16, 16), mode="bilinear",
                                             align_corners=False)[:, 0]
        assert torch.equal(e.maps(), up if name == "gradcam" else e.attributions[:, 0])
    assert hl.explain(tiny_cnn, tiny_x[:2], "saliency").kind == "gradient"
    assert hl.methods.smooth(hl.methods.occlusion, n_samples=2)(tiny_cnn, tiny_x[:1], window=4, seed=0).kind == "location"


def test_lime_maps_and_metrics_keep_the_sign(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x[:2], "lime", target=1, num_samples=60, seed=0)
    assert bool((e.maps() < 0).any()) and torch.equal(e.maps(), e.attributions[:, 0])
    signed = deletion(tiny_cnn, tiny_x[:2], e.attributions[:, 0], target=1, steps=8, fill="zeros")
    assert torch.equal(deletion(tiny_cnn, tiny_x[:2], e, steps=8, fill="zeros").values, signed.values)


def test_one_channel_gradients_are_ranked_by_magnitude_like_any_gradient():
    """Saliency on a grayscale model: maps(), every metric and the sanity checks use |gradient|
    (sum_abs over the one channel), as for RGB and as Quantus does, not the signed gradient."""
    from conftest import make_tiny_cnn

    grey = make_tiny_cnn(channels=1)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    e = hl.explain(grey, x, "saliency", target=2)
    magnitude = e.attributions[:, 0].abs()
    assert bool((e.attributions < 0).any())
    assert torch.equal(e.maps(), magnitude)
    for name in ("deletion", "insertion"):
        got = hl.evaluate(grey, x, e, [name], steps=8, fill="zeros")[name].values
        want = hl.evaluate(grey, x, magnitude, [name], target=2, steps=8, fill="zeros")[name].values
        assert torch.equal(got, want), name
    # a raw (N,C,H,W) tensor is gradient-like too (C = 1 included); a raw (N,H,W) map is taken as is
    assert torch.equal(hl.metrics.as_maps(e.attributions, (16, 16)), magnitude)
    assert torch.equal(hl.metrics.as_maps(e.attributions[:, 0], (16, 16)), e.attributions[:, 0])
    r = hl.sanity.model_randomization(grey, x, "saliency", target=2, layers=["fc"], similarity="spearman")
    assert torch.equal(r.extras["maps"][0], magnitude)


def test_nan_explanations_and_nan_model_outputs_are_named(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x[:2], "saliency")
    bad = e.attributions.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="explanation contains 1 NaN or infinite values"):
        deletion(tiny_cnn, tiny_x[:2], bad, steps=4)

    class Broken(nn.Module):
        def forward(self, z):
            return tiny_cnn(z) * float("nan")

    with pytest.raises(ValueError, match="model outputs at x contain 10 NaN or infinite values"):
        hl.explain(Broken(), tiny_x[:2], "saliency")
    with pytest.raises(ValueError, match="model outputs at x contain 10 NaN or infinite values"):
        deletion(Broken(), tiny_x[:2], e, steps=4)
