"""Contracts every registered method keeps (Captum's config table / xplique's test_common, as data).

For each name in the registry: shapes and dtype, rows explained independently, "predicted" equal to
the argmax ints, seeded determinism, the user's model left exactly as it was, NaN input refused.
"""

from __future__ import annotations

import pytest
import torch

import heatlens as hl
from heatlens.methods import METHODS
from heatlens.models.hooks import hook_count

from conftest import make_tiny_cnn

# Small settings so the whole table runs in seconds; a name missing here runs with its defaults.
FAST: dict[str, dict] = {
    "integrated_gradients": {"steps": 8},
    "expected_gradients": {"n_samples": 6},
    "gradient_shap": {"n_samples": 4},
    "smoothgrad": {"n_samples": 4},
    "smoothgrad_sq": {"n_samples": 4},
    "vargrad": {"n_samples": 4},
    "deeplift_shap": {},
    "scorecam": {},
    "occlusion": {"window": 4},
    "feature_ablation": {},
    "lime": {"num_samples": 40},
    "kernel_shap": {"n_samples": 64},
    "rise": {"n_masks": 64},
    "extremal_perturbation": {"steps": 5},
}


def _kwargs(name: str, x: torch.Tensor) -> dict:
    kw = dict(FAST.get(name, {}))
    if name in ("expected_gradients", "gradient_shap", "deeplift_shap"):
        kw["background"] = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(9))
    if METHODS.get(name).meta.get("stochastic"):
        kw["seed"] = 0
    return kw


def _x(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1


# The transformer family reads attention probabilities, which the tiny CNN has none of: its contract runs
# on tiny Hugging Face transformers in tests/test_hf.py.
NAMES = [n for n in METHODS.names() if METHODS.get(n).meta.get("family") != "transformer"]


@pytest.mark.parametrize("name", NAMES)
def test_output_contract(name):
    model, x = make_tiny_cnn(), _x()
    e = hl.explain(model, x, name, **_kwargs(name, x))
    a = e.attributions
    assert a.dtype == torch.float32 and a.device == x.device
    assert a.shape[0] == 3 and (a.shape[1:] == x.shape[1:] or a.shape[1] == 1)
    assert bool(torch.isfinite(a).all())
    assert e.maps().shape == (3, 16, 16)
    assert torch.equal(e.targets, model(x).argmax(1))  # "predicted" is the clean argmax
    assert torch.allclose(e.outputs, model(x), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_predicted_target_equals_explicit_argmax(name):
    model, x = make_tiny_cnn(), _x(2)
    kw = _kwargs(name, x)
    a = hl.explain(model, x, name, target="predicted", **kw).attributions
    b = hl.explain(model, x, name, target=model(x).argmax(1).tolist(), **kw).attributions
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if not METHODS.get(n).meta.get("stochastic")])
def test_rows_are_explained_independently(name):
    """A batch explains like its rows one by one (no batch statistics, no cross-row leakage)."""
    model, x = make_tiny_cnn(), _x(3)
    kw = _kwargs(name, x)
    together = hl.explain(model, x, name, target=1, **kw).attributions
    alone = torch.cat([hl.explain(model, x[i : i + 1], name, target=1, **kw).attributions for i in range(3)])
    # float32 kernels differ slightly with batch size: compare relative to the map's scale
    scale = float(alone.abs().max()) + 1e-12
    assert float((together - alone).abs().max()) <= 1e-5 * scale + 1e-6


@pytest.mark.parametrize("name", [n for n in NAMES if METHODS.get(n).meta.get("stochastic")])
def test_seeded_methods_are_reproducible(name):
    model, x = make_tiny_cnn(), _x(2)
    kw = _kwargs(name, x)
    a = hl.explain(model, x, name, **kw).attributions
    b = hl.explain(model, x, name, **kw).attributions
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_model_is_left_as_it_was(name):
    model = make_tiny_cnn().train()
    model.conv2.weight.requires_grad_(False)  # a user's frozen layer must stay frozen, the rest trainable
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x = _x(2)
    hl.explain(model, x, name, **_kwargs(name, x))
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert hook_count(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_model_is_restored_after_an_error_inside_the_method(name):
    model = make_tiny_cnn().train()
    x = _x(2)
    calls = {"n": 0}

    def explode(_module, _inp, out):
        calls["n"] += 1
        if calls["n"] > 1:  # let the first (target-resolving) forward pass, fail inside the method
            raise RuntimeError("boom")
        return out

    handle = model.fc.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        hl.explain(model, x, name, **_kwargs(name, x))
    handle.remove()
    assert model.training and hook_count(model) == 0
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_nan_input_is_refused_naming_x(name):
    x = _x(2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 NaN or infinite values"):
        hl.explain(make_tiny_cnn(), x, name, **_kwargs(name, x))


@pytest.mark.parametrize("name", NAMES)
def test_target_out_of_range_is_refused(name):
    x = _x(2)
    with pytest.raises(ValueError, match=r"target 7 is out of range: the model has 5 classes"):
        hl.explain(make_tiny_cnn(), x, name, target=7, **_kwargs(name, x))


def test_channels_last_input_is_reported_as_such():
    model = hl.wrap(make_tiny_cnn(), input_size=(3, 16, 16))
    with pytest.raises(ValueError, match=r"x looks channels-last \(N,H,W,C\)"):
        hl.explain(model, _x(2).permute(0, 2, 3, 1), "saliency")
