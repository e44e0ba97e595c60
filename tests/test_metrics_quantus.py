"""Agreement with Quantus (within 1e-4) where it defines the same metric with the same settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import heatlens as hl

from conftest import randomise_, recording

quantus = pytest.importorskip("quantus")


@pytest.fixture
def gray_cnn() -> nn.Module:
    """A single-channel CNN on 12x12 images: Quantus' per-element features are then our pixels."""
    gen = torch.Generator().manual_seed(11)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 3))
    return randomise_(net, gen)


@pytest.fixture
def gray_x() -> torch.Tensor:
    return torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(12))


def _maps_and_masks():
    gen = torch.Generator().manual_seed(13)
    maps = torch.randn(3, 12, 12, generator=gen)
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 7:12, 0:4] = True
    masks[2, 0:12, 10:12] = True
    return maps, masks


@pytest.mark.parametrize("name, cls, kwargs", [
    ("sparseness", "Sparseness", {"abs": True, "normalise": False}),
    ("complexity", "Complexity", {"abs": True, "normalise": False}),
])
def test_complexity_metrics_agree_with_quantus(gray_x, name, cls, kwargs):
    maps, _ = _maps_and_masks()
    ours = hl.metrics.get_metric(name)(None, gray_x, maps)
    theirs = getattr(quantus, cls)(disable_warnings=True, **kwargs)(
        model=None, x_batch=gray_x.numpy(), y_batch=np.zeros(3, int), a_batch=maps[:, None].numpy().copy())
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs, float), atol=1e-4)


@pytest.mark.parametrize("name, cls, kwargs, ours_kwargs", [
    ("pointing_game", "PointingGame", {"abs": False, "normalise": False}, {}),
    ("relevance_mass", "RelevanceMassAccuracy", {"abs": True, "normalise": False}, {}),
    ("relevance_rank", "RelevanceRankAccuracy", {"abs": True, "normalise": False}, {}),
    ("top_k_intersection", "TopKIntersection", {"abs": True, "normalise": False, "k": 20}, {"k": 20}),
])
def test_localisation_metrics_agree_with_quantus(gray_x, name, cls, kwargs, ours_kwargs):
    maps, masks = _maps_and_masks()
    ours = hl.metrics.get_metric(name)(None, gray_x, maps, mask=masks, **ours_kwargs)
    theirs = getattr(quantus, cls)(disable_warnings=True, **kwargs)(
        model=None, x_batch=gray_x.numpy(), y_batch=np.zeros(3, int), a_batch=maps[:, None].numpy().copy(),
        s_batch=masks[:, None].numpy().astype(float))
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs, float), atol=1e-4)


def test_max_sensitivity_agrees_with_quantus_on_the_same_noise(gray_cnn, gray_x):
    """Quantus replays the noisy inputs heatlens explained (its perturb_func is a parameter)."""
    seen = []
    e = hl.explain(gray_cnn, gray_x, "saliency")
    ours = hl.metrics.max_sensitivity(gray_cnn, gray_x, e, method=recording(hl.methods.saliency, seen), n_samples=5, radius=0.1,
                                      batch_size=3)
    draws = iter([d.numpy().reshape(3, -1) for d in seen])  # one chunk per draw: (N, features)

    def replay(arr, indices, **kwargs):
        return next(draws)

    def explain(model, inputs, targets, **kwargs):
        x = torch.as_tensor(inputs, dtype=torch.float32)
        return hl.methods.saliency(gray_cnn, x, torch.as_tensor(targets)).attributions.numpy()

    theirs = quantus.MaxSensitivity(nr_samples=5, perturb_func=replay, abs=False, normalise=False,
                                    disable_warnings=True)(
        model=gray_cnn, x_batch=gray_x.numpy(), y_batch=e.targets.numpy(), a_batch=e.attributions.numpy(),
        explain_func=explain, device="cpu")
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs, float), atol=1e-4)


def test_faithfulness_correlation_agrees_with_quantus_on_the_same_subsets(gray_cnn, gray_x, monkeypatch):
    e = hl.explain(gray_cnn, gray_x, "input_x_gradient")
    black = lambda x: x.flatten(1).amin(1).view(-1, 1, 1, 1).expand_as(x)  # noqa: E731 - Quantus "black"
    # Quantus abs=False: the signed attributions (heatlens' rule would rank the 1-channel gradient by |a|)
    ours = hl.metrics.faithfulness_correlation(gray_cnn, gray_x, e, n_runs=10, subset_size=30, fill=black,
                                               output="logit", seed=5, reduce="sum")
    subsets = ours.extras["subsets"]  # (N, runs, subset)
    calls = iter([(i, r) for r in range(10) for i in range(3)])  # Quantus draws run-major, image-minor

    def fixed_choice(n, size, replace=False):
        i, r = next(calls)
        return subsets[i, r].numpy()

    monkeypatch.setattr(np.random, "choice", fixed_choice)
    theirs = quantus.FaithfulnessCorrelation(nr_runs=10, subset_size=30, perturb_baseline="black", abs=False,
                                             normalise=False, return_aggregate=False, disable_warnings=True)(
        model=gray_cnn, x_batch=gray_x.numpy(), y_batch=e.targets.numpy(), a_batch=e.attributions.numpy(),
        softmax=False, device="cpu")
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs, float), atol=1e-4)
