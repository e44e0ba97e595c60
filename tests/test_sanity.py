"""Sanity checks: Adebayo et al.'s randomisation on efficientnet-lite0, Kindermans et al.'s input
invariance on small models, Ghorbani et al.'s fragility, and that the user's model is never touched."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens.models.hooks import hook_count
from heatlens.sanity import shift_compensated, spearman


def snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training, hook_count(model))


def assert_unchanged(model: nn.Module, before) -> None:
    state, flags, training, hooks = before
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training == training and hook_count(model) == hooks


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam"])
def test_cascading_randomisation_of_effnet_destroys_the_map_and_leaves_the_model_alone(effnet, chelsea_x, method):
    if method not in hl.methods.names():
        pytest.skip(f"{method} is not registered yet (methods/cam.py)")
    before = snapshot(effnet)
    r = hl.sanity.model_randomization(effnet, chelsea_x, method, layers=["_fc", "_conv_head", "_blocks.15"],
                                      similarity=("spearman", "ssim", "hog"), seed=0)
    curve = r.extras["curve"]["spearman"]
    assert curve[0] == 1.0 and float(curve[-1]) < float(curve[0]) - 0.3  # similarity falls
    assert r.passed and [row["layer"] for row in r.table] == ["_fc", "_conv_head", "_blocks.15"]
    assert set(r.table[0]) == {"layer", "spearman", "ssim", "hog", "prediction_changed"}
    assert r.extras["maps"].shape == (4, 1, 224, 224)
    assert_unchanged(effnet, before)
    assert "verdict: PASS" in r.to_text()


def test_cascading_and_independent_agree_on_the_top_layer_and_differ_below(tiny_cnn, tiny_x):
    before = snapshot(tiny_cnn)
    casc = hl.sanity.model_randomization(tiny_cnn, tiny_x, "saliency", layers=["fc", "conv2", "conv1"], seed=1)
    indep = hl.sanity.model_randomization(tiny_cnn, tiny_x, "saliency", mode="independent",
                                          layers=["conv1", "fc", "conv2"], seed=1)
    assert [r["layer"] for r in indep.table] == ["fc", "conv2", "conv1"]  # sorted top first
    assert casc.table[0]["spearman"] == pytest.approx(indep.table[0]["spearman"])  # same first edit
    assert casc.table[2]["spearman"] != pytest.approx(indep.table[2]["spearman"])
    assert casc.extras["per_image"]["ssim"].shape == (3, 4)
    assert_unchanged(tiny_cnn, before)


def test_spearman_equals_scipy_on_absolute_maps_with_ties():
    from scipy.stats import spearmanr

    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, 8, 8, generator=gen).clamp_min(0)  # many tied zeros, like ReLU CAMs
    b = torch.randn(3, 8, 8, generator=gen)
    expected = [spearmanr(a[i].abs().flatten(), b[i].abs().flatten()).statistic for i in range(3)]
    np.testing.assert_allclose(spearman(a, b).numpy(), expected, atol=1e-10)


def test_random_logit_explains_another_class_reproducibly(linear_model):
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    r = hl.sanity.random_logit(linear_model, x, "saliency", seed=4)
    again = hl.sanity.random_logit(linear_model, x, "saliency", seed=4)
    assert [row["random_class"] for row in r.table] == [row["random_class"] for row in again.table]
    assert all(row["random_class"] != row["target"] for row in r.table)
    # saliency of a linear model is its weight row: compare the random class's row directly
    w = linear_model[1].weight.detach().view(3, 3, 4, 4).abs().sum(1)
    for row in r.table:
        expected = spearman(w[row["target"]][None], w[row["random_class"]][None])
        assert row["spearman"] == pytest.approx(float(expected))


def mlp() -> nn.Module:
    """Kindermans et al.'s setting: a small MLP whose first layer is Linear."""
    gen = torch.Generator().manual_seed(5)
    net = nn.Sequential(OrderedDict([("flat", nn.Flatten()), ("fc1", nn.Linear(48, 16)), ("relu", nn.ReLU()),
                                     ("fc2", nn.Linear(16, 3))]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.eval()


@pytest.mark.parametrize("make", ["mlp", "padded_cnn"])
def test_input_invariance_passes_saliency_and_flags_gradient_x_input(make, tiny_cnn, tiny_x):
    net, x = (mlp(), torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(6))) if make == "mlp" \
        else (tiny_cnn, tiny_x)
    before = snapshot(net)
    sal = hl.sanity.input_invariance(net, x, "saliency")
    ixg = hl.sanity.input_invariance(net, x, "input_x_gradient")
    assert sal.passed and not ixg.passed
    assert max(r["relative_difference"] for r in sal.table) < 1e-5
    assert min(r["relative_difference"] for r in ixg.table) > 1e-2
    assert max(r["logit_gap"] for r in sal.table) < 1e-4  # the copy computes the same function
    assert_unchanged(net, before)


def test_shift_compensated_copy_reproduces_the_model_everywhere(tiny_cnn, tiny_x):
    clf = hl.wrap(tiny_cnn, input_size=(3, 16, 16))
    shift = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    copy = shift_compensated(clf, tiny_x, shift)
    probe = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(copy(probe + shift), clf(probe), atol=1e-4, rtol=1e-5)
        assert not torch.allclose(clf(probe + shift), clf(probe), atol=1e-2)


def test_fragility_reports_the_predictions_it_kept(tiny_cnn, tiny_x):
    seen = []

    def recording_saliency(model, inputs, target, **kw):
        seen.append(inputs.detach().clone())
        return hl.methods.saliency(model, inputs, target, **kw)

    r = hl.sanity.fragility(tiny_cnn, tiny_x, recording_saliency, noise=0.3, n_trials=4, top_k=20, batch_size=16)
    with torch.no_grad():
        predicted = tiny_cnn(tiny_x).argmax(1)
        noisy = torch.cat(seen[1:]).view(4, 4, 3, 16, 16)  # seen[0] is the clean explanation; draw-major
        kept = (tiny_cnn(noisy.flatten(0, 1)).argmax(1).view(4, 4) == predicted).T
    torch.testing.assert_close(r.extras["kept"], kept)
    assert [row["prediction_kept"] for row in r.table] == pytest.approx(kept.double().mean(1).tolist())
    calm = hl.sanity.fragility(tiny_cnn, tiny_x, "saliency", noise=1e-6, n_trials=2, top_k=20)
    assert calm.passed and all(row["prediction_kept"] == 1.0 and row["top_k_overlap"] > 0.9 for row in calm.table)


@pytest.mark.slow
def test_fragility_on_effnet_keeps_the_prediction_for_small_noise(effnet, chelsea_x):
    r = hl.sanity.fragility(effnet, chelsea_x, "saliency", noise=0.01, n_trials=2, top_k=0.05)
    assert r.table[0]["prediction_kept"] == 1.0
    assert 0.0 <= r.table[0]["top_k_overlap"] <= 1.0 and r.params["top_k"] == round(0.05 * 224 * 224)


def test_sanity_errors_name_the_argument(tiny_cnn, tiny_x):
    with pytest.raises(ValueError, match=r"mode must be one of 'cascading', 'independent', got 'cascade'"):
        hl.sanity.model_randomization(tiny_cnn, tiny_x, "saliency", mode="cascade")
    with pytest.raises(ValueError, match=r"similarity must be one of .* got 'ssmi'"):
        hl.sanity.model_randomization(tiny_cnn, tiny_x, "saliency", similarity="ssmi")
    with pytest.raises(ValueError, match=r"unknown layer 'conv3'\. Did you mean: 'conv2', 'conv1'"):
        hl.sanity.model_randomization(tiny_cnn, tiny_x, "saliency", layers=["conv3"])
    with pytest.raises(ValueError, match=r"shift must be a number or one value per channel \(3\), got \(2,\)"):
        hl.sanity.input_invariance(tiny_cnn, tiny_x, "saliency", shift=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"top_k must select between 1 and 256 pixels, got 0"):
        hl.sanity.fragility(tiny_cnn, tiny_x, "saliency", top_k=0)
