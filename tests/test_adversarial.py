"""FGSM and PGD: agreement with Captum's attacks, an independent L2 PGD, the epsilon ball and the
valid range on efficientnet-lite0, batch independence, restored model state, exact errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.robust import FGSM, PGD

import heatlens as hl
from heatlens.methods.adversarial import fgsm, pgd

# Captum warns that it switched requires_grad on for our inputs
pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


@pytest.fixture
def tiny(tiny_cnn):
    """The tiny CNN on 16x16 inputs with valid range [0, 1] (the default preprocessing)."""
    return hl.wrap(tiny_cnn, input_size=(3, 16, 16), labels=[f"class{k}" for k in range(5)])


@pytest.fixture
def unit_x():
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _captum_loss(outputs, target):
    return F.cross_entropy(outputs, target, reduction="none")


def _captum(attack):
    """Captum's FGSM leaves pixels with |gradient| below zero_thresh (1e-6) untouched, where sign()
    moves them; with the threshold at 0 both are the textbook update."""
    (attack.fgsm if isinstance(attack, PGD) else attack).zero_thresh = 0.0
    return attack


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_matches_captum(tiny, unit_x, targeted):
    target = torch.tensor([1, 2, 3, 4]) if targeted else tiny(unit_x).argmax(1)
    ours = fgsm(tiny, unit_x, target, epsilon=0.05, targeted=targeted)
    ref = _captum(FGSM(tiny, loss_func=_captum_loss, lower_bound=0.0, upper_bound=1.0)).perturb(
        unit_x, epsilon=0.05, target=target, targeted=targeted)
    assert torch.allclose(ours.x_adv, ref, atol=1e-6)


@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_linf_matches_captum(tiny, unit_x, targeted):
    target = torch.tensor([4, 3, 2, 1]) if targeted else tiny(unit_x).argmax(1)
    ours = pgd(tiny, unit_x, target, epsilon=0.1, step_size=0.02, steps=8, targeted=targeted, random_start=False)
    ref = _captum(PGD(tiny, loss_func=_captum_loss, lower_bound=0.0, upper_bound=1.0)).perturb(
        unit_x, radius=0.1, step_size=0.02, step_num=8, target=target, targeted=targeted)
    assert torch.allclose(ours.x_adv, ref, atol=1e-5)


def test_pgd_l2_matches_independent_implementation(tiny, unit_x):
    """Madry et al.'s L2 PGD written out here: normalised-gradient ascent, renorm to the ball, clamp."""
    eps, step, steps = 0.5, 0.1, 6
    labels = tiny(unit_x).argmax(1)
    x_adv = unit_x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(tiny(x_adv), labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x_adv = (unit_x + torch.renorm(x_adv - unit_x, 2, 0, eps)).clamp(0, 1)
    ours = pgd(tiny, unit_x, epsilon=eps, step_size=step, steps=steps, norm="l2", random_start=False)
    assert torch.allclose(ours.x_adv, x_adv, atol=1e-5)
    assert torch.equal(ours.target, labels)


def test_fgsm_flips_efficientnet_within_the_ball(effnet, chelsea_x):
    eps = 0.02  # model space of (v - 0.5) / 0.5: about 2.5 pixel levels of 255
    clean = int(effnet(chelsea_x).argmax(1))
    r = fgsm(effnet, chelsea_x, epsilon=eps)
    delta = r.x_adv - chelsea_x
    new = int(effnet(r.x_adv).argmax(1))
    assert new != clean and bool(r.success[0]) and int(r.new_pred[0]) == new
    assert float(delta.abs().max()) <= eps + 1e-6
    assert float(r.x_adv.min()) >= -1 - 1e-6 and float(r.x_adv.max()) <= 1 + 1e-6  # valid range of the model
    assert torch.allclose(r.linf, delta.flatten(1).abs().amax(1)) and torch.allclose(r.l2, delta.flatten(1).norm(dim=1))


@pytest.mark.slow
@pytest.mark.parametrize("norm, eps, step", [("linf", 0.03, 0.01), ("l2", 3.0, 1.0)])
def test_pgd_reaches_chosen_class_on_efficientnet(effnet, chelsea_x, norm, eps, step):
    goal = 100  # black swan, far from the Egyptian cat the photo shows
    r = pgd(effnet, chelsea_x, goal, epsilon=eps, step_size=step, steps=10, norm=norm, targeted=True, seed=0)
    delta = (r.x_adv - chelsea_x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert int(effnet(r.x_adv).argmax(1)) == goal and bool(r.success[0])
    assert float(size) <= eps * (1 + 1e-5)
    low, high = effnet.input_range
    assert bool(((r.x_adv >= low - 1e-6) & (r.x_adv <= high + 1e-6)).all())


def test_rows_are_independent_and_seeded(tiny, unit_x):
    whole = pgd(tiny, unit_x, epsilon=0.1, step_size=0.03, steps=4, seed=7)
    one_by_one = pgd(tiny, unit_x, epsilon=0.1, step_size=0.03, steps=4, seed=7, batch_size=1)
    other_seed = pgd(tiny, unit_x, epsilon=0.1, step_size=0.03, steps=4, seed=8)
    assert torch.allclose(whole.x_adv, one_by_one.x_adv, atol=1e-6)
    assert not torch.allclose(whole.x_adv, other_seed.x_adv)
    single = fgsm(tiny, unit_x[2:3], epsilon=0.05)
    assert torch.allclose(fgsm(tiny, unit_x, epsilon=0.05).x_adv[2:3], single.x_adv, atol=1e-6)


def test_random_start_stays_in_the_l2_ball(tiny, unit_x):
    r = pgd(tiny, unit_x, epsilon=0.3, step_size=0.05, steps=1, norm="l2", seed=0)
    assert bool((r.l2 <= 0.3 + 1e-5).all()) and bool(((r.x_adv >= 0) & (r.x_adv <= 1)).all())


def test_model_state_is_restored(tiny_cnn, unit_x):
    tiny_cnn.train()
    flags = [p.requires_grad for p in tiny_cnn.parameters()]
    fgsm(tiny_cnn, unit_x, epsilon=0.05)
    assert tiny_cnn.training and [p.requires_grad for p in tiny_cnn.parameters()] == flags
    assert all(p.grad is None for p in tiny_cnn.parameters())


def test_plot_names_the_classes(tiny, unit_x):
    r = fgsm(tiny, unit_x[:2], epsilon=0.2)
    fig = r.plot()
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 6
    assert titles[0] == f"original: class{int(r.original_pred[0])}"
    assert titles[1] == f"adversarial: class{int(r.new_pred[0])}"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_errors(tiny, unit_x):
    with pytest.raises(ValueError, match=r"^epsilon must be a positive number, got 0$"):
        fgsm(tiny, unit_x, epsilon=0)
    with pytest.raises(ValueError, match=r"^epsilon must be a positive number, got -0\.1$"):
        pgd(tiny, unit_x, epsilon=-0.1, step_size=0.01)
    with pytest.raises(ValueError, match=r"^norm must be one of 'linf', 'l2', got 'inf'\. Did you mean: 'linf'\?$"):
        fgsm(tiny, unit_x, epsilon=0.1, norm="inf")
    with pytest.raises(ValueError, match=r"^step_size must be a positive number, got 0\.0$"):
        pgd(tiny, unit_x, epsilon=0.1, step_size=0.0)
    with pytest.raises(ValueError, match=r"^target is required when targeted=True"):
        pgd(tiny, unit_x, epsilon=0.1, step_size=0.01, targeted=True)
    with pytest.raises(ValueError, match=r"^target 7 is out of range: the model has 5 classes"):
        fgsm(tiny, unit_x, 7, epsilon=0.1, targeted=True)
    blackbox = hl.wrap(lambda a: torch.ones(a.shape[0], 2).numpy() / 2, input_size=(3, 16, 16))
    with pytest.raises(TypeError, match=r"^method 'fgsm' needs gradients, but model is a black-box predict function"):
        fgsm(blackbox, unit_x, epsilon=0.1)
