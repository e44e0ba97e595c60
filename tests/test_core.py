"""Core pieces: the batching engine, targets, baselines, Explanation views, registry errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens import batching
from heatlens.baselines import gaussian_blur, resolve_baseline
from heatlens.explanation import Explanation, normalize_maps, reduce_channels
from heatlens.targets import resolve_target


class CountingModel(nn.Module):
    """Records the batch size of every forward call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.net(x)


# --- batching engine ---------------------------------------------------------------------------
def test_engine_batches_the_items_and_keeps_order():
    seen = []

    def step(start, stop):
        seen.append((start, stop))
        return torch.arange(start, stop)

    out = batching.map_batches(step, 10, batch_size=4)
    assert seen == [(0, 4), (4, 8), (8, 10)]
    assert torch.equal(out, torch.arange(10))


def test_engine_halves_the_batch_on_out_of_memory_and_retries_the_same_items():
    sizes = []

    def step(start, stop):
        sizes.append(stop - start)
        if stop - start > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.arange(start, stop)

    out = batching.map_batches(step, 10, batch_size=8)
    assert sizes[:3] == [8, 4, 2]  # halved twice, then the rest at the size that fits
    assert torch.equal(out, torch.arange(10))


def test_engine_reraises_errors_that_are_not_out_of_memory():
    def step(start, stop):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        batching.map_batches(step, 4, batch_size=2)


def test_engine_uses_inference_mode_without_gradients_and_autograd_with():
    modes = []

    def step(start, stop):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    batching.map_batches(step, 2, batch_size=1, grad=False)
    batching.map_batches(step, 2, batch_size=1, grad=True)
    assert modes == [(True, False), (True, False), (False, True), (False, True)]


def test_consume_keeps_nothing_and_sees_every_batch():
    total = torch.zeros(())

    def consume(start, stop, out):
        total.add_(out.sum())

    result = batching.map_batches(lambda a, b: torch.arange(a, b).float(), 100, batch_size=7, consume=consume)
    assert result is None and float(total) == sum(range(100))


def test_integrated_gradients_calls_the_model_in_engine_batches(tiny_cnn, tiny_x):
    counting = CountingModel(tiny_cnn)
    model = hl.wrap(counting, input_size=(3, 16, 16))
    counting.calls.clear()  # wrap's one-off logits-vs-probabilities probe
    hl.explain(model, tiny_x, "integrated_gradients", steps=10, batch_size=16)
    # one forward for the target, then 40 path points in batches of 16, then f(x') once
    assert counting.calls == [4, 16, 16, 8, 4]


def test_default_batch_size_follows_the_measured_cpu_optimum():
    assert batching.default_batch_size(None, (3, 224, 224), grad=True) == 8
    assert batching.default_batch_size(None, (3, 224, 224), grad=False) == 8  # forward-only: 8 beats 16 (bench_methods)
    assert batching.default_batch_size(None, (3, 28, 56), grad=True) > 64  # small inputs: bigger batches


def test_invalid_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None, got 0"):
        batching.map_batches(lambda a, b: None, 3, batch_size=0)


# --- targets -----------------------------------------------------------------------------------
_REFAULTS = """
import resource, sys, torch
from heatlens import batching
batching.map_batches(lambda a, b: torch.zeros(b - a), 4)  # the engine's first run tunes the allocator
block = torch.ones(2**24)  # 64 MiB, freed; then 32 MiB written (a later, smaller batch)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.ones(2**23)
print(batching.tune_allocator(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_engine_keeps_freed_memory_for_the_next_batch_unless_told_not_to():
    """32 MiB written after a 64 MiB block was freed: with the tuned allocator the freed pages are
    reused (no new page faults); with HEATLENS_TUNE_ALLOCATOR=0 glibc unmapped them and all 8192
    pages of the new block fault in."""
    def run(flag: str) -> tuple[str, int]:
        env = {**os.environ, "HEATLENS_TUNE_ALLOCATOR": flag}
        out = subprocess.run([sys.executable, "-c", _REFAULTS], env=env, capture_output=True, text=True, check=True)
        tuned, faults = out.stdout.split()
        return tuned, int(faults)

    tuned, faults_tuned = run("1")
    untouched, faults_default = run("0")
    assert (tuned, untouched) == ("True", "False")
    assert faults_tuned < 1000 < 8000 < faults_default


def test_targets_every_accepted_form():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    labels = ("cat", "tabby, tabby cat", "dog")
    assert resolve_target(logits, "predicted").tolist() == [1, 0]
    assert resolve_target(logits, None).tolist() == [1, 0]
    assert resolve_target(logits, 2).tolist() == [2, 2]
    assert resolve_target(logits, [0, 2]).tolist() == [0, 2]
    assert resolve_target(logits, torch.tensor([2, 1])).tolist() == [2, 1]
    assert resolve_target(logits, "dog", labels).tolist() == [2, 2]
    assert resolve_target(logits, "tabby cat", labels).tolist() == [1, 1]
    assert resolve_target(logits, ["cat", "dog"], labels).tolist() == [0, 2]


def test_target_errors_name_the_argument():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"target 3 is out of range: the model has 3 classes \(0..2\)"):
        resolve_target(logits, 3)
    with pytest.raises(ValueError, match="target has 3 entries but x has 2 images"):
        resolve_target(logits, [0, 1, 2])
    with pytest.raises(ValueError, match="target='dgo' is not a class name of this model. Did you mean: 'dog'"):
        resolve_target(logits, "dgo", ("cat", "dog", "cow"))
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        resolve_target(logits, torch.tensor([0.5, 1.0]))


def test_numpy_integers_are_integers(tiny_cnn, tiny_x):
    """Indices read from arrays (np.int64) are accepted wherever an int is: targets, steps, n_samples."""
    logits = torch.zeros(2, 3)
    assert resolve_target(logits, np.int64(2)).tolist() == [2, 2]
    assert resolve_target(logits, [np.int64(0), np.int32(1)]).tolist() == [0, 1]
    assert resolve_target(logits, np.array([2, 0])).tolist() == [2, 0]
    ref = hl.explain(tiny_cnn, tiny_x, "integrated_gradients", target=1, steps=8)
    e = hl.explain(tiny_cnn, tiny_x, "integrated_gradients", target=np.int64(1), steps=np.int64(8))
    assert torch.equal(e.attributions, ref.attributions)
    s = hl.explain(tiny_cnn, tiny_x, "smoothgrad", n_samples=np.int64(3), noise=np.float32(0.1), seed=0)
    assert torch.equal(s.attributions, hl.explain(tiny_cnn, tiny_x, "smoothgrad", n_samples=3,
                                                  noise=float(np.float32(0.1)), seed=0).attributions)
    with pytest.raises(TypeError, match="target must hold integer class indices, got a float64 array"):
        resolve_target(logits, np.array([0.5, 1.0]))


@pytest.mark.parametrize("noise", [float("nan"), float("inf"), -0.1])
def test_smoothing_noise_that_is_not_a_finite_fraction_is_blamed_on_noise(tiny_cnn, tiny_x, noise):
    with pytest.raises(ValueError, match=f"noise must be a non-negative fraction of the input range, got {noise!r}"):
        hl.explain(tiny_cnn, tiny_x, "smoothgrad", n_samples=2, noise=noise)


def test_wrap_refuses_fewer_labels_than_classes(tiny_cnn):
    with pytest.raises(ValueError, match="labels has 3 names but the model has 5 outputs; pass one name per class"):
        hl.wrap(tiny_cnn, input_size=(3, 16, 16), labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="labels has 1 names but the model has 5 outputs"):
        hl.wrap(lambda a: np.ones((a.shape[0], 5)) / 5, input_size=(3, 16, 16), labels=["a"])
    assert hl.wrap(tiny_cnn, input_size=(3, 16, 16), labels=list("abcde")).labels == tuple("abcde")


# --- baselines ---------------------------------------------------------------------------------
def test_blur_baseline_is_a_normalised_gaussian_and_keeps_constants():
    x = torch.full((1, 3, 20, 20), 0.7)
    assert torch.allclose(gaussian_blur(x, 2.0), x, atol=1e-6)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1
    blurred = gaussian_blur(impulse, 2.0)
    assert abs(float(blurred.sum()) - 1) < 1e-5
    r = torch.arange(-10, 11).float()
    expected_row = torch.exp(-0.5 * (r / 2) ** 2) * (r.abs() <= 6)  # kernel truncated at 3 sigma
    assert torch.allclose(blurred[0, 0, 10] / blurred[0, 0, 10].max(), expected_row / expected_row.max(), atol=1e-5)


def test_named_baselines_in_model_space(tiny_x):
    wrapped = hl.wrap(nn.Sequential(nn.Flatten(), nn.Linear(768, 2)), input_size=(3, 16, 16),
                      preprocessing=hl.models.Preprocessing(size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3))
    assert torch.allclose(resolve_baseline(wrapped, tiny_x, "black"), torch.full_like(tiny_x, -2.0))
    assert torch.allclose(resolve_baseline(wrapped, tiny_x, "white"), torch.full_like(tiny_x, 2.0))
    mean = resolve_baseline(wrapped, tiny_x, "mean")
    assert torch.allclose(mean[:, :, 0, 0], tiny_x.mean((2, 3)))
    u = resolve_baseline(wrapped, tiny_x, "uniform", generator=torch.Generator().manual_seed(0))
    assert float(u.min()) >= -2 and float(u.max()) <= 2
    with pytest.raises(ValueError, match="unknown baseline 'blurr'. Did you mean: 'blur'"):
        resolve_baseline(wrapped, tiny_x, "blurr")


# --- Explanation views -------------------------------------------------------------------------
def test_channel_reductions_match_their_definitions():
    a = torch.randn(2, 3, 4, 5)
    assert torch.allclose(reduce_channels(a, "sum_abs"), a.abs().sum(1))
    assert torch.allclose(reduce_channels(a, "mean"), a.mean(1))
    assert torch.allclose(reduce_channels(a, "max_abs"), a.abs().max(1).values)
    assert torch.allclose(reduce_channels(a, "sum"), a.sum(1))
    with pytest.raises(ValueError, match="reduce must be one of"):
        reduce_channels(a, "median")


def test_normalisations_are_per_image():
    m = torch.stack([torch.linspace(-2, 4, 12).reshape(3, 4), torch.linspace(0, 1, 12).reshape(3, 4)])
    mm = normalize_maps(m, "minmax")
    assert torch.allclose(mm.amin((1, 2)), torch.zeros(2)) and torch.allclose(mm.amax((1, 2)), torch.ones(2))
    am = normalize_maps(m, "absmax")
    assert torch.allclose(am[0], m[0] / 4)
    st = normalize_maps(m, "standardize")
    # tf.image.per_image_standardization: zero mean, unit (population) std
    assert torch.allclose(st.mean((1, 2)), torch.zeros(2), atol=1e-6)
    assert torch.allclose(st.std((1, 2), unbiased=False), torch.ones(2), atol=1e-5)
    pc = normalize_maps(m, "percentile", percentile=50)
    assert float(pc.abs().max()) == 1.0
    q = np.percentile(np.abs(m[0].numpy()), 50)
    assert np.allclose(pc[0].numpy(), np.clip(m[0].numpy() / q, -1, 1), atol=1e-6)


def test_coarse_maps_are_upsampled_bilinearly_to_the_input_size():
    coarse = torch.arange(4.0).reshape(1, 1, 2, 2)
    e = Explanation(coarse, torch.tensor([0]), torch.zeros(1, 2), "gradcam", input_size=(8, 8))
    up = e.maps("sum")
    assert up.shape == (1, 8, 8)
    ref = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(up, ref)


def test_select_keeps_per_image_extras(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x, "integrated_gradients", steps=4)
    one = e.select(2)
    assert torch.equal(one.attributions[0], e.attributions[2])
    assert torch.equal(one.extras["completeness_gap"], e.extras["completeness_gap"][2:3])


# --- registry and public API -------------------------------------------------------------------
def test_unknown_method_name_suggests_close_names(tiny_cnn, tiny_x):
    with pytest.raises(ValueError, match="unknown method 'integrated_gradient'. Did you mean: 'integrated_gradients'"):
        hl.explain(tiny_cnn, tiny_x, "integrated_gradient")


def test_explain_with_several_methods_returns_a_dict(tiny_cnn, tiny_x):
    out = hl.explain(tiny_cnn, tiny_x, ["saliency", "input_x_gradient"], target=1)
    assert set(out) == {"saliency", "input_x_gradient"}
    assert torch.allclose(out["input_x_gradient"].attributions, out["saliency"].attributions * tiny_x)


def test_bad_hyperparameters_name_themselves(tiny_cnn, tiny_x):
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        hl.explain(tiny_cnn, tiny_x, "integrated_gradients", steps=0)
    with pytest.raises(ValueError, match="method must be one of"):
        hl.explain(tiny_cnn, tiny_x, "integrated_gradients", method="simpson")
    with pytest.raises(ValueError, match="output must be one of 'logit', 'probability', got 'logits'"):
        hl.explain(tiny_cnn, tiny_x, "saliency", output="logits")
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1, got 0"):
        hl.explain(tiny_cnn, tiny_x, "smoothgrad", n_samples=0)
