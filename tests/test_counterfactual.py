"""Counterfactual explanations on the digit-sum seed CNN: region swapping (Goyal et al.) flips to the
distractor's class editing only inked cells and the exhaustive search is minimal (checked by brute
force here); the optimisation counterfactual needs fewer changed pixels than FGSM of the same
success; extremal perturbations keep more score than random masks of the same area; exact errors."""

from __future__ import annotations

import itertools

import numpy as np

import pytest
import torch

import heatlens as hl
from heatlens.baselines import gaussian_blur
from heatlens.methods.adversarial import fgsm
from heatlens.methods.counterfactual import cell_masks, extremal_perturbation, optimize_counterfactual, region_swap

THRESHOLD = 0.01  # a pixel is changed when some channel moves by more than this (range is [0, 1])


@pytest.fixture(scope="module")
def digits():
    """The R255 seed CNN trained briefly on the digit-sum task (heatlens.debug), and a test split."""
    torch.manual_seed(0)
    from heatlens import debug

    train = debug.digit_sum_dataset("train", n=2000, seed=0)
    test = debug.digit_sum_dataset("test", n=400, seed=0)
    run = debug.train_classifier("seed_cnn", train, epochs=6, lr=3e-3, batch_size=64, seed=0, progress=False)
    with torch.inference_mode():
        correct = run.model(test.x).argmax(1) == test.y
    return run.model, test, correct


@pytest.fixture(scope="module")
def pair(digits):
    """A correctly classified image of sum 3 (query) and one of sum 8 (distractor)."""
    model, test, correct = digits
    query = test.x[(test.y == 3) & correct][:1]
    distractor = test.x[(test.y == 8) & correct][:1]
    assert len(query) == 1 and len(distractor) == 1
    return model, query, distractor


def _predict(model, x):
    with torch.inference_mode():
        return model(x).argmax(1)


def _compose(query, distractor, masks, cells):
    m = masks[list(cells)].any(0) if cells else torch.zeros_like(masks[0])
    return torch.where(m, distractor, query)


def test_region_swap_flips_to_distractor_editing_only_inked_cells(pair):
    model, query, distractor = pair
    r = region_swap(model, query, distractor, grid=(4, 8))
    assert bool(r.success[0]) and int(r.class_after[0]) == 8 and int(r.class_before[0]) == 3
    assert int(_predict(model, r.counterfactual)) == 8
    masks = cell_masks((28, 56), (4, 8))  # 7x7 cells
    ink = [bool((query[0, :, m] > 0).any() or (distractor[0, :, m] > 0).any()) for m in masks]
    assert not all(ink)  # blank margin cells exist, so the property below has teeth
    assert r.edited_cells and all(ink[row * 8 + col] for row, col in r.edited_cells)
    # the counterfactual is the query with exactly those cells taken from the distractor
    expected = _compose(query, distractor, masks, [row * 8 + col for row, col in r.edited_cells])
    assert torch.equal(r.counterfactual, expected)
    assert r.cell_mask.sum() == len(r.edited_cells)
    # the edit is minimal: without any one of its cells the prediction is not the distractor's
    cells = [row * 8 + col for row, col in r.edited_cells]
    for drop in cells:
        assert int(_predict(model, _compose(query, distractor, masks, [c for c in cells if c != drop]))) != 8
    assert len(cells) <= r.extras["greedy_cells"]
    assert r.extras["fraction_changed"][0] == pytest.approx(int(r.changed_pixels[0]) / (28 * 56))


def test_region_swap_needs_no_gradients(pair):
    """A black-box predict function gives the same counterfactual as the module it wraps."""
    model, query, distractor = pair

    def predict(a):
        with torch.inference_mode():
            return model(torch.from_numpy(a)).numpy()

    blackbox = hl.wrap(predict, input_size=(3, 28, 56), outputs="logits", labels=model.labels)
    ours = region_swap(blackbox, query, distractor, grid=(4, 8))
    assert ours.edited_cells == region_swap(model, query, distractor, grid=(4, 8)).edited_cells
    assert bool(ours.success[0])


def test_exhaustive_finds_a_smallest_flipping_set(pair):
    model, query, distractor = pair
    r = region_swap(model, query, distractor, grid=(2, 4), strategy="exhaustive")
    masks = cell_masks((28, 56), (2, 4))
    smallest = next(k for k in range(1, 9)
                    if any(int(_predict(model, _compose(query, distractor, masks, s))) == 8
                           for s in itertools.combinations(range(8), k)))
    assert bool(r.success[0]) and len(r.edited_cells) == smallest
    greedy = region_swap(model, query, distractor, grid=(2, 4), strategy="greedy")
    assert len(greedy.edited_cells) >= smallest


def test_optimised_counterfactual_changes_fewer_pixels_than_fgsm(pair):
    model, query, _ = pair
    cf = optimize_counterfactual(model, query, 8, seed=0)
    assert bool(cf.success[0]) and int(_predict(model, cf.counterfactual)) == 8
    assert float(cf.counterfactual.min()) >= 0 and float(cf.counterfactual.max()) <= 1
    changed = int(((cf.counterfactual - query).abs() > THRESHOLD).any(1).sum())
    assert int(cf.changed_pixels[0]) == changed
    # FGSM with the smallest epsilon (of a grid) that reaches the same class
    for eps in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
        adv = fgsm(model, query, 8, epsilon=eps, targeted=True)
        if bool(adv.success[0]):
            break
    assert bool(adv.success[0])
    fgsm_changed = int(((adv.x_adv - query).abs() > THRESHOLD).any(1).sum())
    assert changed < fgsm_changed / 2, (changed, fgsm_changed, eps)


def _score(model, x, target):
    with torch.inference_mode():
        return model(x)[torch.arange(len(x)), target]


def _top_fraction(maps, area):
    """Binary masks (N,1,H,W) of the ``area`` fraction of highest values of each map."""
    flat = maps.flatten(1)
    k = int(round(area * flat.shape[1]))
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(k, dim=1).indices, True)
    return keep.view_as(maps)


def _random_masks(n, area, gen):
    """Random smooth blobs of exactly the same area: coarse noise upsampled, top fraction kept."""
    noise = torch.rand(n, 1, 7, 14, generator=gen)
    return _top_fraction(torch.nn.functional.interpolate(noise, size=(28, 56), mode="bilinear"), area)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["preservation", "deletion"])
def test_extremal_mask_beats_random_masks_of_the_same_area(digits, mode):
    model, test, correct = digits
    x = test.x[correct][:2]
    area = 0.1
    e = hl.explain(model, x, "extremal_perturbation", area=area, mode=mode, steps=200)
    assert e.method == "extremal_perturbation" and e.attributions.shape == (2, 1, 28, 56)
    mask = e.attributions
    fraction = (mask > 0.5).flatten(1).float().mean(1)
    assert torch.allclose(e.extras["area"], fraction)
    assert bool(((fraction - area).abs() <= 0.015).all()), fraction  # the area constraint holds
    assert bool(((mask.flatten(1).mean(1) - area).abs() <= 0.04).all())  # smooth edges add a little
    blurred = gaussian_blur(x, 5.0)  # the default "blur" baseline

    def perturbed_score(m):
        m = m.float()
        kept = m * x + (1 - m) * blurred if mode == "preservation" else (1 - m) * x + m * blurred
        return _score(model, kept, e.targets)

    ours = perturbed_score(_top_fraction(mask, area))
    gen = torch.Generator().manual_seed(0)
    random = torch.stack([perturbed_score(_random_masks(2, area, gen)) for _ in range(10)])
    if mode == "preservation":
        assert bool((ours > random.max(0).values).all()), (ours, random)
    else:
        assert bool((ours < random.min(0).values).all()), (ours, random)


def test_extremal_rows_are_independent(digits):
    model, test, correct = digits
    x = test.x[correct][:2]
    both = extremal_perturbation(model, x, steps=20)
    alone = extremal_perturbation(model, x[1:], steps=20, batch_size=1)
    assert torch.allclose(both.attributions[1:], alone.attributions, atol=1e-5)


def test_plot_shows_classes_and_edits(pair):
    model, query, distractor = pair
    r = region_swap(model, query, distractor, grid=(4, 8))
    fig = r.plot()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == f"original: 3\np(8) = {float(r.score_before[0]):.2f}"
    assert titles[1] == f"counterfactual: 8\np(8) = {float(r.score_after[0]):.2f}"
    assert titles[2] == f"difference: {len(r.edited_cells)} cells"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_errors(pair, digits):
    model, query, distractor = pair
    with pytest.raises(ValueError, match=r"^target_class 3 \('3'\) is already the predicted class of image 0; "
                                         r"a counterfactual needs another class$"):
        optimize_counterfactual(model, query, 3)
    other_three = digits[1].x[(digits[1].y == 3) & digits[2]][1:2]
    with pytest.raises(ValueError, match=r"^distractor is predicted as class 3 \('3'\), the same class as query; "
                                         r"choose a distractor that the model puts in another class$"):
        region_swap(model, query, other_three)
    with pytest.raises(ValueError, match=r"^query and distractor must have the same shape, got query \(1, 3, 28, 56\) "
                                         r"and distractor \(1, 3, 28, 28\)$"):
        region_swap(model, query, distractor[..., :28])
    with pytest.raises(ValueError, match=r"^strategy must be one of 'greedy', 'exhaustive', got 'greedi'\. "
                                         r"Did you mean: 'greedy'\?$"):
        region_swap(model, query, distractor, strategy="greedi")
    with pytest.raises(ValueError, match=r"^an exhaustive search over up to (\d+) of \1 differing cells needs \d+ "
                                         r"model evaluations \(limit 200000\); pass a smaller max_cells"):
        region_swap(model, query, distractor, grid=(4, 8), strategy="exhaustive", max_cells=32)
    with pytest.raises(ValueError, match=r"^grid must be \(rows, cols\) of positive integers, got \(0, 4\)$"):
        region_swap(model, query, distractor, grid=(0, 4))
    with pytest.raises(ValueError, match=r"^area must be strictly between 0 and 1, got 1\.0$"):
        extremal_perturbation(model, query, area=1.0)
    with pytest.raises(ValueError, match=r"^mode must be one of 'preservation', 'deletion', got 'delete'\. "
                                         r"Did you mean: 'deletion'\?$"):
        extremal_perturbation(model, query, mode="delete")
    with pytest.raises(ValueError, match=r"^target_class 11 is out of range: the model has 11 classes \(0\.\.10\)$"):
        optimize_counterfactual(model, query, 11)
    with pytest.raises(ValueError, match=r"^l1 must be a number in \[0\.0, 1\.0\], got 2$"):
        optimize_counterfactual(model, query, 8, l1=2)


def test_region_swap_that_needs_the_whole_distractor_is_no_success():
    """A model that says "distractor" only for the distractor itself: greedy swaps all 16 of 16 cells,
    which is the distractor, not a counterfactual of the query."""
    gen = torch.Generator().manual_seed(0)
    query, distractor = torch.rand(1, 3, 8, 8, generator=gen), torch.rand(1, 3, 8, 8, generator=gen)

    def predict(a):
        far = np.abs(a - distractor.numpy()).reshape(a.shape[0], -1).max(1)
        return np.stack([far, 1e-3 - far], 1)  # class 1 only where x == distractor

    r = region_swap(hl.wrap(predict, input_size=(3, 8, 8), outputs="logits"), query, distractor, grid=(4, 4))
    assert int(r.class_after[0]) == 1 and len(r.edited_cells) == 16
    assert r.extras["whole_image"] and not bool(r.success[0])
    assert float(r.extras["fraction_changed"][0]) == 1.0 and r.extras["cells_fraction"] == 1.0


def test_region_swap_drops_cells_the_flip_does_not_need():
    """Greedy first takes the best single cell A, which the flip turns out not to need: B and C
    together flip the prediction (an interaction), A with either alone does not. Pruning puts A back."""
    query, distractor = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)

    def predict(a):
        a = torch.from_numpy(a)[:, 0]
        cell_a, cell_b, cell_c = a[:, :2, :2].mean((1, 2)), a[:, 2:4, 2:4].mean((1, 2)), a[:, 4:6, 4:6].mean((1, 2))
        other = 1.3 * cell_a + 1.2 * cell_b + 1.2 * cell_c + 0.7 * cell_b * cell_c  # class 1 above 3
        return torch.stack([torch.full_like(other, 3.0), other], 1).numpy()

    r = region_swap(hl.wrap(predict, input_size=(1, 8, 8), outputs="logits"), query, distractor, grid=(4, 4))
    assert r.extras["greedy_cells"] == 3 and r.edited_cells == [(1, 1), (2, 2)] and bool(r.success[0])
    assert float(r.extras["fraction_changed"][0]) == 8 / 64
