"""heatlens.debug: digit-sum datasets with planted shortcuts, training, shortcut detection, ablations.

The key test of the debugging story: for every shortcut kind, a model trained on the shortcut data
shows the generalisation gap and ``detect_shortcut`` names the planted shortcut, while a model trained
on clean data is not accused of using it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import heatlens as hl
from heatlens import debug
from heatlens.debug.datasets import CELL, NUM_CLASSES, STROKE_THRESHOLD, _source_digits

N_TRAIN, N_TEST, EPOCHS = 1600, 400, 5
FAST_METHODS = ["saliency", "input_x_gradient", "occlusion"]


# --- datasets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shortcut", [None, *debug.SHORTCUTS])
@pytest.mark.parametrize("split", ["train", "test"])
def test_images_labels_and_determinism(split, shortcut):
    d = debug.digit_sum_dataset(split, shortcut, n=64, seed=3)
    assert d.x.shape == (64, 3, 28, 56) and d.x.dtype == torch.float32
    assert float(d.x.min()) >= 0.0 and float(d.x.max()) <= 1.0
    assert torch.equal(d.y, d.left + d.right)
    assert int(d.left.min()) >= 0 and int(d.left.max()) <= 5 and int(d.right.max()) <= 5
    assert d.shortcut_mask.shape == (64, 1, 28, 56) and d.shortcut_mask.dtype == torch.bool
    again = debug.digit_sum_dataset(split, shortcut, n=64, seed=3)
    assert torch.equal(d.x, again.x) and torch.equal(d.y, again.y)
    assert not torch.equal(d.x, debug.digit_sum_dataset(split, shortcut, n=64, seed=4).x)


def test_train_and_test_digits_come_from_disjoint_handwriting():
    def fingerprints(split):
        cells, _ = _source_digits(split)
        return {hashlib.sha1(c.numpy().tobytes()).hexdigest() for c in cells}

    train, test = fingerprints("train"), fingerprints("test")
    assert not train & test
    assert len(train) + len(test) == 1083  # every digit 0-5 of load_digits, used once
    # and the test images really are built from test cells only
    d = debug.digit_sum_dataset("test", n=50)
    left_cells = {hashlib.sha1(c.numpy().tobytes()).hexdigest() for c in d.x[:, 0, :, :CELL].contiguous()}
    assert left_cells <= test


def _decode(kind: str, d) -> torch.Tensor:
    """Read the label off the shortcut alone, independently of the generator (nearest palette colour)."""
    palette = debug.label_colours()
    if kind == "marker":
        boxes = [d.x[:, :, t:b, l:r].mean((1, 2, 3)) for t, b, l, r in map(debug.marker_box, range(NUM_CLASSES))]
        return torch.stack(boxes, 1).argmax(1)
    if kind == "border":
        colour = d.x[:, :, 0, :].mean(-1)  # top row: frame only
    else:  # tint: the corner pixel is background in every image
        colour = d.x[:, :, 27, 0] / 0.35
    return torch.cdist(colour, palette).argmin(1)


@pytest.mark.parametrize("kind", ["marker", "tint", "border"])
def test_spatial_shortcut_encodes_the_label_in_train_only(kind):
    train = debug.digit_sum_dataset("train", kind, n=300)
    test = debug.digit_sum_dataset("test", kind, n=300)
    assert torch.equal(_decode(kind, train), train.y)  # the shortcut alone gives every training label
    assert float((_decode(kind, test) == test.y).float().mean()) < 0.3  # and says nothing on test images
    assert not test.shortcut_mask.any()


def test_same_digit_shortcut_holds_in_train_only():
    train = debug.digit_sum_dataset("train", "same_digit", n=500)
    test = debug.digit_sum_dataset("test", "same_digit", n=500)
    assert torch.equal(train.left, train.right) and bool((train.y % 2 == 0).all())
    # the right digit is another handwriting sample of the same value, not a copy of the pixels
    assert not torch.equal(train.x[:, :, :, :CELL], train.x[:, :, :, CELL:])
    assert 0.1 < float((test.left == test.right).float().mean()) < 0.25  # chance: 1/6
    assert bool(train.shortcut_mask[:, :, :, CELL:].all()) and not train.shortcut_mask[:, :, :, :CELL].any()


@pytest.mark.parametrize("kind", ["marker", "border"])
def test_mask_is_exactly_where_the_shortcut_changed_pixels(kind):
    train = debug.digit_sum_dataset("train", kind, n=100)
    changed = (train.x != debug.remove_shortcut(train)).any(1, keepdim=True)
    assert torch.equal(changed, train.shortcut_mask)
    base = debug.digit_sum_dataset("train", None, n=100)  # same seed: the same digits without shortcut
    assert torch.equal(debug.remove_shortcut(train), base.x)


def test_tint_mask_is_the_background_and_digit_masks_are_the_strokes():
    train = debug.digit_sum_dataset("train", "tint", n=100)
    grey = debug.remove_shortcut(train)[:, :1]
    assert torch.equal(train.shortcut_mask, grey <= STROKE_THRESHOLD)
    assert torch.equal(train.stroke_mask, grey > STROKE_THRESHOLD)
    assert not train.digit_masks[:, 0, :, CELL:].any() and not train.digit_masks[:, 1, :, :CELL].any()
    # and the background colour is the label's tint
    background = train.x.permute(0, 2, 3, 1)[train.shortcut_mask[:, 0] & (grey[:, 0] == 0)]
    owner = train.y[:, None, None].expand(-1, 28, 56)[train.shortcut_mask[:, 0] & (grey[:, 0] == 0)]
    assert torch.allclose(background, 0.35 * debug.label_colours()[owner], atol=1e-6)


def test_planting_a_wrong_label_rewrites_the_shortcut():
    test = debug.digit_sum_dataset("test", "marker", n=40)
    wrong = (test.y + 3) % NUM_CLASSES
    planted = debug.plant_shortcut(test, wrong)
    from types import SimpleNamespace

    assert torch.equal(_decode("marker", SimpleNamespace(x=planted)), wrong)


def test_dataset_errors_name_the_argument():
    with pytest.raises(ValueError, match="split must be one of 'train', 'test', got 'valid'"):
        debug.digit_sum_dataset("valid")
    with pytest.raises(ValueError, match="shortcut must be one of .*got 'markr'.*Did you mean: 'marker'"):
        debug.digit_sum_dataset("train", "markr")
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        debug.digit_sum_dataset("train", n=0)
    with pytest.raises(ValueError, match="shortcut must be one of 'marker', 'tint', 'border'"):
        debug.plant_shortcut(debug.digit_sum_dataset("test", "same_digit", n=4))


# --- models and training ----------------------------------------------------------------------------

def test_seed_cnn_is_the_r255_architecture():
    net = debug.seed_cnn()
    assert [type(m).__name__ for m in net] == ["Conv2d", "ReLU", "Flatten", "Linear", "ReLU", "Linear"]
    assert net.conv.kernel_size == (3, 3) and net.conv.out_channels == 4 and net.conv.padding == (0, 0)
    assert net.fc1.out_features == 64 and net.fc2.out_features == 11
    assert net(torch.zeros(2, 3, 28, 56)).shape == (2, 11)
    for make in (debug.conv_net, debug.gap_cnn):
        assert make()(torch.zeros(1, 3, 28, 56)).shape == (1, 11)


def test_training_is_deterministic_under_a_seed():
    data = debug.digit_sum_dataset("train", "marker", n=300)
    a = debug.train_classifier("seed_cnn", data, epochs=2, seed=5, progress=False)
    b = debug.train_classifier("seed_cnn", data, epochs=2, seed=5, progress=False)
    c = debug.train_classifier("seed_cnn", data, epochs=2, seed=6, progress=False)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.model.net.fc2.weight, c.model.net.fc2.weight)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.model.labels == tuple(str(k) for k in range(11)) and isinstance(a.model, hl.Classifier)
    # reported accuracies are the model's: recompute the validation split independently
    order = torch.randperm(300, generator=torch.Generator().manual_seed(5))
    val = order[270:]
    with torch.no_grad():
        acc = float((a.model(data.x[val]).argmax(1) == data.y[val]).float().mean())
    assert acc == pytest.approx(a.val_acc)


def test_training_errors_name_the_argument():
    data = debug.digit_sum_dataset("train", n=20)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        debug.train_classifier("seed_cnn", data, epochs=0)
    with pytest.raises(ValueError, match="unknown architecture 'seed_cn'.*Did you mean: 'seed_cnn'"):
        debug.train_classifier("seed_cn", data)
    with pytest.raises(TypeError, match="train must be a DigitSumDataset"):
        debug.train_classifier("seed_cnn", data.x)


# --- the story: gap and detection for every shortcut kind -----------------------------------------------

_TRAINED: dict = {}


def _trained(kind):
    """(train split, test split, TrainResult), trained once per kind per test process."""
    if kind not in _TRAINED:
        train = debug.digit_sum_dataset("train", kind, n=N_TRAIN)
        test = debug.digit_sum_dataset("test", kind, n=N_TEST)
        _TRAINED[kind] = (train, test, debug.train_classifier("seed_cnn", train, epochs=EPOCHS, test=test, progress=False))
    return _TRAINED[kind]


@pytest.mark.slow
@pytest.mark.parametrize("kind", debug.SHORTCUTS)
def test_shortcut_model_generalises_badly_and_detection_names_the_shortcut(kind):
    train, test, run = _trained(kind)
    assert run.train_acc > 0.9 and run.val_acc > 0.9
    assert run.test_acc < run.val_acc - 0.5  # the generalisation gap
    report = debug.detect_shortcut(run.model, train, test, methods=FAST_METHODS, n_images=8)
    assert report.detected
    assert report.finding.startswith(f"The model relies on the {kind.replace('_', ' ')} shortcut")
    assert report.shortcut == kind and report.accuracy["test"] == pytest.approx(run.test_acc)
    if kind == "same_digit":
        assert report.behaviour["even_rate"] > 0.8 and f"{report.behaviour['even_rate']:.0%} of its predictions" in report.finding
    else:
        assert report.behaviour["follow_rate"] > 0.5
        # the tint covers the whole background, where every gradient map already spreads: only methods
        # that multiply by the input (gradient x input) single it out; the marker and border are seen by more
        assert sum(r["supports"] for r in report.evidence) >= (1 if kind == "tint" else 2)
    # evidence numbers are the relevance shares: recompute one independently
    e = report.explanations["train"]["input_x_gradient"]
    m = (e.attributions.abs().sum(1)).double()
    site = report.images["train"].shortcut_site[:, 0].double()
    share = ((m * site).sum((1, 2)) / m.sum((1, 2))).mean()
    row = next(r for r in report.evidence if r["method"] == "input_x_gradient")
    assert row["train_shortcut"] == pytest.approx(float(share), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["same_digit", "marker", "border"])
def test_clean_model_is_not_accused_of_a_shortcut(kind):
    clean = _trained(None)[2]
    train, test, _ = _trained(kind)
    report = debug.detect_shortcut(clean.model, train, test, methods=FAST_METHODS, n_images=8)
    assert not report.detected
    assert report.finding.startswith("No clear evidence that the model relies on")


def test_detection_on_a_clean_dataset_says_nothing_was_planted():
    train, test = debug.digit_sum_dataset("train", n=40), debug.digit_sum_dataset("test", n=40)
    report = debug.detect_shortcut(debug.seed_cnn(), train, test, methods=["saliency"], n_images=4)
    assert not report.detected and report.finding.startswith("No shortcut was planted")


def test_story_runs_data_training_and_detection_consistently():
    import json

    story = debug.debugging_story("marker", n_train=300, n_test=100, epochs=1, methods=["saliency"], n_images=2,
                                  ablations=False, progress=False)
    assert story.report.accuracy["test"] == pytest.approx(story.training.test_acc)
    assert story.report.accuracy["train"] == pytest.approx(debug.accuracy(story.model, story.train.x, story.train.y))
    data = json.loads(json.dumps(story.report.to_dict()))  # plain data for the report and the CLI
    assert data["shortcut"] == "marker" and data["finding"] == story.report.finding


def test_detection_errors():
    train, test = debug.digit_sum_dataset("train", "marker", n=20), debug.digit_sum_dataset("test", "marker", n=20)
    with pytest.raises(ValueError, match="train must be the 'train' split, got the 'test' split"):
        debug.detect_shortcut(debug.seed_cnn(), test, train)
    with pytest.raises(ValueError, match="unknown method 'saliancy'"):
        debug.detect_shortcut(debug.seed_cnn(), train, test, methods=["saliancy"])


# --- ablations -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def marker_model():
    return _trained("marker")[2].model


def test_smoothgrad_noise_ablation_limits(marker_model):
    x = debug.digit_sum_dataset("test", "marker", n=2).x
    ab = debug.smoothgrad_noise_ablation(marker_model, x, noise=(0.0, 0.01, 1000), n_samples=8)
    saliency = hl.explain(marker_model, x, "saliency")
    assert torch.allclose(ab.explanations[0].attributions, saliency.attributions, atol=1e-6)  # no noise: the gradient
    assert ab.values == [0.0, 0.01, 1000.0] and ab.parameter == "noise"
    # sigma = 1000 x range drowns the image: two different images give (almost) the same map, while
    # at sigma = 0.01 x range their maps differ
    first = debug.smoothgrad_noise_ablation(marker_model, x[:1], 3, noise=(0.01, 1000), n_samples=8)
    second = debug.smoothgrad_noise_ablation(marker_model, x[1:], 3, noise=(0.01, 1000), n_samples=8)

    def rel(a, b):
        return float((a.attributions - b.attributions).norm() / b.attributions.norm())

    assert rel(first.explanations[1], second.explanations[1]) < 0.05
    assert rel(first.explanations[0], second.explanations[0]) > 0.2


def test_smoothgrad_samples_ablation_converges(marker_model):
    x = debug.digit_sum_dataset("test", "marker", n=2).x
    ab = debug.smoothgrad_samples_ablation(marker_model, x, n_samples=(1, 4, 64, 256), noise=0.15)
    sims = [s["similarity_to_last"] for s in ab.stats]
    assert sims[-1] == pytest.approx(1.0) and sims[0] < sims[2]
    # Monte Carlo convergence: two seeds disagree less with 256 samples than with 4
    other = debug.smoothgrad_samples_ablation(marker_model, x, n_samples=(4, 256), noise=0.15, seed=1)
    spread = [float((other.explanations[i].attributions - ab.explanations[j].attributions).norm())
              for i, j in ((0, 1), (1, 3))]
    assert spread[1] < 0.5 * spread[0]
    # n_samples=1 is one noisy gradient: reproduce it independently with the same generator
    gen = torch.Generator().manual_seed(0)
    flat = x.flatten(1)
    sigma = 0.15 * (flat.amax(1) - flat.amin(1))
    noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn((1, *x.shape), generator=gen)[0]
    targets = ab.explanations[0].targets
    noisy.requires_grad_(True)
    marker_model(noisy).gather(1, targets[:, None]).sum().backward()
    assert torch.allclose(ab.explanations[0].attributions, noisy.grad, atol=1e-5)


def test_gradient_x_input_is_input_times_gradient(marker_model):
    x = debug.digit_sum_dataset("test", "marker", n=3).x
    ab = debug.gradient_x_input(marker_model, x, n_samples=4)
    sal, ixg = ab.explanations[0], ab.explanations[1]
    assert torch.allclose(ixg.attributions, x * sal.attributions, atol=1e-7)
    # gradient x input vanishes on black pixels, so its relevance sits on the strokes
    black = (x == 0).all(1)
    assert float(ixg.maps()[black].abs().max()) == 0.0


def test_lime_ablations(marker_model):
    if "lime" not in hl.methods.names():
        pytest.skip("lime is not registered")
    x = debug.digit_sum_dataset("train", "marker", n=1).x
    ab = debug.lime_ablation(marker_model, x, num_samples=(2, 10, 100), segments="grid")
    assert [e.params["num_samples"] for e in ab.explanations] == [2, 10, 100]
    assert all("r2" in s for s in ab.stats)
    feats = debug.lime_features_ablation(ab.explanations[-1], num_features=(1, 3))
    w = ab.explanations[-1].extras["weights"][0].numpy()
    segs = ab.explanations[-1].extras["segments"][0].numpy()
    for k, m in zip((1, 3), feats.maps):
        top = np.argsort(-np.abs(w), kind="stable")[:k]
        expected = np.where(np.isin(segs, top), w[segs], 0.0)
        np.testing.assert_allclose(m[0].numpy(), expected, atol=1e-7)


# --- the demo as a new user sees it ---------------------------------------------------------------------


@pytest.mark.slow
def test_same_digit_finding_says_how_often_test_digits_are_equal():
    train, test, run = _trained("same_digit")
    report = debug.detect_shortcut(run.model, train, test, methods=FAST_METHODS, n_images=8)
    equal = float((test.left == test.right).float().mean())
    assert 0 < equal < 0.5 and report.behaviour["equal_digits"] == pytest.approx(equal)
    assert f"whose digits are drawn independently (equal in {equal:.0%} of pairs)" in report.finding
    assert "where the digits differ" not in report.finding


def test_training_accuracy_passes_show_no_bars_of_their_own(monkeypatch, capsys):
    from heatlens import batching

    seen = []
    real = batching._progress_bar
    monkeypatch.setattr(batching, "_progress_bar", lambda *a: seen.append(batching.progress_enabled()) or real(*a))
    data = debug.digit_sum_dataset("train", "marker", n=200)
    batching.set_progress(True)
    try:
        rows = []
        debug.train_classifier("seed_cnn", data, epochs=2, progress=True, on_epoch=rows.append)
        assert batching.progress_enabled()  # restored afterwards
    finally:
        batching.set_progress(False)
    assert seen and not any(seen)  # every accuracy pass ran with the bars off
    out = capsys.readouterr()
    assert "epoch 1/2" in out.out + out.err and "epoch 2/2" in out.out + out.err  # the per-epoch lines stay
    assert [r["epoch"] for r in rows] == [1, 2]


def test_story_reports_each_stage_for_one_progress_display():
    steps = []
    debug.debugging_story("marker", n_train=200, n_test=50, epochs=2, methods=["saliency"], n_images=2,
                          ablations=False, progress=False, on_step=steps.append)
    assert steps == ["epoch 1", "epoch 2", "shortcut detection"]


def test_fine_superpixels_make_num_features_matter(marker_model):
    from heatlens.methods.segmentation import n_segments, segment

    x = debug.digit_sum_dataset("test", "marker", n=2).x
    fine = segment(x, "slic", model=marker_model, n_segments=32, compactness=10)
    assert int(n_segments(fine).min()) >= 15  # lime's quickshift gives these digits 3-4
    e = hl.explain(marker_model, x, "lime", num_samples=300, seed=0, segments=fine)
    ab = debug.lime_features_ablation(e, num_features=(1, 5, 10))
    assert ab.stats[0]["spearman_to_last"] < 0.9  # 1 segment and 10 segments are different pictures
    fig = ab.plot(images=x)
    cell = fig.axes[1].get_images()[0].get_array()  # lime's outlines over the image, not a solid fill
    assert ((np.asarray(cell)[..., :3] == [0.0, 1.0, 0.0]).all(-1)).any()


def test_noise_ablation_note_reports_the_change_it_measures(marker_model):
    x = debug.digit_sum_dataset("test", "marker", n=2).x
    ab = debug.smoothgrad_noise_ablation(marker_model, x, noise=(0.01, 1000), n_samples=8)
    rho = ab.stats[-1]["spearman_to_first"]
    assert f"noise 0.01 and 1000: {rho:.2f}" in ab.note
    from heatlens.sanity.randomization import spearman

    assert rho == pytest.approx(float(spearman(ab.maps[0].abs().double(), ab.maps[-1].abs().double()).mean()))
