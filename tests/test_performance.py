"""Fewer passes for the same answer (issue 18): the shared multi-method pass, Integrated Gradients to a
stated tolerance (``steps="auto"``), measured batch sizes, insertion and deletion together."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens import batching
from heatlens.methods import multi

from conftest import make_tiny_cnn

SHARED = ["saliency", "input_x_gradient", "gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam"]


def _same(a: hl.Explanation, b: hl.Explanation) -> None:
    """Bit-identical results: attributions, targets, clean logits, params."""
    assert a.method == b.method and a.params == b.params
    assert torch.equal(a.attributions, b.attributions), (a.method, (a.attributions - b.attributions).abs().max())
    assert torch.equal(a.targets, b.targets) and torch.equal(a.outputs, b.outputs)


# --- one pass for many methods ------------------------------------------------------------------
@pytest.mark.parametrize("layer", [None, "conv2", "relu1"])
def test_one_pass_equals_each_method_alone(tiny_cnn, tiny_x, layer):
    hyper = {} if layer is None else {"layer": layer}
    cams = [m for m in SHARED if m not in multi.INPUT_GRADIENT]
    names = SHARED if layer is None else cams  # saliency takes no layer=
    together = hl.explain(tiny_cnn, tiny_x, names, **hyper)
    assert list(together) == names
    for name in names:
        _same(together[name], hl.explain(tiny_cnn, tiny_x, name, **hyper))


def test_one_pass_runs_one_forward_and_one_backward(tiny_cnn, tiny_x):
    calls = {"forward": 0}
    handle = tiny_cnn.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    hl.explain(tiny_cnn, tiny_x, ["gradcam"])  # finds and caches the automatic layer first
    calls["forward"] = 0
    before = batching.call_stats()["batches"]
    try:
        hl.explain(tiny_cnn, tiny_x, SHARED)
    finally:
        handle.remove()
    assert calls["forward"] == 1 and batching.call_stats()["batches"] - before == 1
    assert len(tiny_cnn._forward_hooks) == 0 and all(p.requires_grad for p in tiny_cnn.parameters())


def test_one_pass_over_several_engine_batches_equals_alone(tiny_cnn):
    x = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    together = hl.explain(tiny_cnn, x, ["saliency", "gradcam", "layercam"], batch_size=3, target=2)
    for name in ("saliency", "gradcam", "layercam"):
        _same(together[name], hl.explain(tiny_cnn, x, name, batch_size=3, target=2))


def test_other_methods_in_a_list_explain_the_class_the_first_resolved(tiny_cnn, tiny_x):
    out = hl.explain(tiny_cnn, tiny_x, ["gradcam", "occlusion", "saliency"], target="predicted")
    assert list(out) == ["gradcam", "occlusion", "saliency"]
    assert torch.equal(out["occlusion"].targets, out["gradcam"].targets)
    _same(out["occlusion"], hl.explain(tiny_cnn, tiny_x, "occlusion"))


def test_one_pass_refuses_a_method_it_cannot_share(tiny_cnn, tiny_x):
    with pytest.raises(ValueError, match="one_pass runs saliency"):
        multi.one_pass(tiny_cnn, tiny_x, ["saliency", "occlusion"])


def test_a_hyperparameter_some_method_lacks_still_fails_by_name(tiny_cnn, tiny_x):
    with pytest.raises(TypeError, match="layer"):
        hl.explain(tiny_cnn, tiny_x, ["saliency", "gradcam"], layer="conv2")


# --- Integrated Gradients to a tolerance ----------------------------------------------------------
class Jump(nn.Module):
    """f(x)_0 = 6 sigmoid(k (z - c)) + 0.5 z with z = <v, x>: on the path from 0 to x (z(x) = 1) the
    score jumps within the first ``c`` of the path. IG is known in closed form: the gradient is always
    parallel to v, so IG_i = v_i x_i / z(x) * (f(x) - f(0))."""

    def __init__(self, k: float = 300.0, c: float = 0.03) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(3 * 8 * 8, generator=torch.Generator().manual_seed(0)))
        self.k, self.c = k, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.v
        return torch.stack([6 * torch.sigmoid(self.k * (z - self.c)) + 0.5 * z, -z], 1)


@pytest.fixture
def jump():
    net = Jump()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.1
    with torch.no_grad():
        x = x / (x.flatten(1) @ net.v).view(-1, 1, 1, 1)  # z(x) = 1 for every image
        f = net(x)[:, 0] - net(torch.zeros_like(x))[:, 0]
    exact = net.v.detach().view(1, 3, 8, 8) * x * f.view(-1, 1, 1, 1)
    return hl.wrap(net, input_size=(3, 8, 8)), x, exact


@pytest.mark.parametrize("tolerance", [0.01, 0.002])
def test_auto_steps_meet_the_tolerance_on_a_jump_near_the_baseline(jump, tolerance):
    model, x, exact = jump
    e = hl.explain(model, x, "integrated_gradients", target=0, steps="auto", tolerance=tolerance)
    assert bool((e.extras["relative_gap"] <= tolerance).all()), e.extras["relative_gap"]
    # the attributions themselves, not only their sum, are within the tolerance of the exact IG
    error = (e.attributions - exact).abs().flatten(1).sum(1) / exact.abs().flatten(1).sum(1)
    assert bool((error <= tolerance).all()), error
    passes = e.extras["passes"]
    assert passes["forward_backward"] == int(e.extras["points"].sum()) and passes["forward"] > 0  # no gradient thrown away
    assert e.params["steps"] == "auto" and e.params["tolerance"] == tolerance


@pytest.mark.slow
def test_auto_steps_need_fewer_passes_than_uniform_points_for_the_same_gap(jump):
    """Gauss-Legendre needs many more gradients here: the jump sits in the first 3% of the path."""
    model, x, _ = jump
    e = hl.explain(model, x, "integrated_gradients", target=0, steps="auto", tolerance=0.01)
    cost = e.extras["passes"]["forward_backward"] + e.extras["passes"]["forward"] / 3  # a forward ~1/3 of a pass
    smallest = next(n for n in range(8, 2000, 8)
                    if bool((hl.explain(model, x, "integrated_gradients", target=0, steps=n)
                             .extras["relative_gap"] <= 0.01).all()))
    assert cost * 1.5 < smallest * x.shape[0], (cost, smallest)


@pytest.mark.slow
def test_auto_steps_on_a_cnn_agree_with_a_long_uniform_integral(tiny_cnn, tiny_x):
    """The tolerance bounds the completeness gap, a sum in which per-pixel errors can cancel: on a
    ReLU CNN (the gradient jumps at every kink) the L1 error to a 2000-step integral measured 3-4% at
    a 0.5% gap (docs/performance.md); bounded here at 10x the tolerance."""
    e = hl.explain(tiny_cnn, tiny_x, "integrated_gradients", steps="auto", tolerance=0.005)
    ref = hl.explain(tiny_cnn, tiny_x, "integrated_gradients", steps=2000, target=e.targets)
    assert bool((e.extras["relative_gap"] <= 0.005).all())
    scale = ref.attributions.abs().flatten(1).sum(1)
    error = (e.attributions - ref.attributions).abs().flatten(1).sum(1) / scale
    assert bool((error < 10 * 0.005).all()), error


@pytest.mark.parametrize("steps, tolerance, message", [
    ("many", 0.01, "steps must be a positive integer or 'auto'"),
    ("auto", 0.0, r"tolerance must be a number in \(0, 1\)"),
    ("auto", 1.5, r"tolerance must be a number in \(0, 1\)"),
])
def test_auto_steps_bad_arguments(tiny_cnn, tiny_x, steps, tolerance, message):
    with pytest.raises(ValueError, match=message):
        hl.explain(tiny_cnn, tiny_x, "integrated_gradients", steps=steps, tolerance=tolerance)


def test_fixed_steps_report_their_passes(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x, "integrated_gradients", steps=12)
    assert e.extras["passes"] == {"forward": 4, "forward_backward": 48}


# --- measured batch sizes ---------------------------------------------------------------------------
@pytest.fixture
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(batching, "_measurements", {})
    monkeypatch.setattr(batching, "_measure_enabled", True)
    monkeypatch.delenv("HEATLENS_BATCH_CACHE", raising=False)
    return batching


def _sizes(model, fn):
    """Batch sizes the engine ran for ``fn()`` (recorded at the model's forward; a bare module is
    wrapped first, so wrap's own probe is not recorded)."""
    from heatlens.models.adapter import as_classifier

    if not isinstance(model, hl.Classifier):
        as_classifier(model, torch.zeros(1, 3, 16, 16))
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_measurement_tries_sizes_then_keeps_the_fastest_for_the_process(fresh_measurements, tiny_cnn, tiny_x):
    x = tiny_x[:1]
    first = _sizes(tiny_cnn, lambda: hl.explain(tiny_cnn, x, "integrated_gradients", steps=200))
    # the clean pass, then a warm-up batch of 4 and 4, 8, 16, ... (each real path points), then the best
    assert first[1:4] == [4, 4, 8]
    (key, m), = [(k, v) for k, v in batching._measurements.items() if k[2]]  # the gradient key
    assert m.best in m.per_item and sum(first[1:-1]) == 200  # the last forward: f(baseline)
    measured, best = m.done, m.best  # read before the second call, which may go on measuring otherwise
    second = _sizes(tiny_cnn, lambda: hl.explain(tiny_cnn, x, "integrated_gradients", steps=200))
    if measured:  # measured: every later batch runs at the best size (the last one holds the remainder)
        path = second[1:-1]
        assert set(path[:-1]) <= {best} and 0 < path[-1] <= best and sum(path) == 200
    assert batching.default_batch_size(hl.wrap(tiny_cnn, input_size=(3, 16, 16)), (3, 16, 16), grad=True) == m.best
    assert key[0] == batching.model_fingerprint(make_tiny_cnn())  # same architecture, same key: no model kept


def test_measurement_does_not_change_results(fresh_measurements, tiny_cnn, tiny_x):
    """The probe's batches are real work; results equal a fixed batch size's up to float rounding
    of a different batch layout (none here: the tiny CNN's rows are computed alike at any size)."""
    measured = hl.explain(tiny_cnn, tiny_x, "integrated_gradients", steps=60)
    fixed = hl.explain(tiny_cnn, tiny_x, "integrated_gradients", steps=60, batch_size=7)
    torch.testing.assert_close(measured.attributions, fixed.attributions, rtol=1e-6, atol=1e-7)
    s1 = hl.explain(tiny_cnn, tiny_x[:1], "smoothgrad", n_samples=40, seed=3)
    s2 = hl.explain(tiny_cnn, tiny_x[:1], "smoothgrad", n_samples=40, seed=3, batch_size=5)
    torch.testing.assert_close(s1.attributions, s2.attributions, rtol=1e-6, atol=1e-7)  # noise does not follow the chunking


def test_batch_size_argument_and_pins_override_the_measurement(fresh_measurements, tiny_cnn, tiny_x):
    sizes = _sizes(tiny_cnn, lambda: hl.explain(tiny_cnn, tiny_x[:1], "integrated_gradients", steps=20, batch_size=6))
    assert sizes[1:-1] == [6, 6, 6, 2] and not fresh_measurements._measurements  # last: f(baseline)
    clf = hl.wrap(tiny_cnn, input_size=(3, 16, 16))
    batching.set_batch_size(clf, (3, 16, 16), True, 5)
    sizes = _sizes(tiny_cnn, lambda: hl.explain(clf, tiny_x[:1], "integrated_gradients", steps=20))
    assert sizes[1:-1] == [5, 5, 5, 5] and not fresh_measurements._measurements


@pytest.mark.slow
def test_measurements_persist_on_disk_by_fingerprint(fresh_measurements, tiny_cnn, tiny_x, tmp_path, monkeypatch):
    path = tmp_path / "batch.json"
    monkeypatch.setenv("HEATLENS_BATCH_CACHE", str(path))
    monkeypatch.setattr(batching, "_disk_loaded", None)
    for _ in range(2):  # 4 + 4 + 8 + ... + 512 items in the first call, 1024 in the second
        hl.explain(tiny_cnn, tiny_x[:1], "integrated_gradients", steps=1200)
    done = {k: v for k, v in batching.measured_batch_sizes().items() if v["done"]}
    assert done and path.exists()
    monkeypatch.setattr(batching, "_measurements", {})
    monkeypatch.setattr(batching, "_disk_loaded", None)
    other = make_tiny_cnn(seed=5)  # another model of the same architecture reads the saved sizes
    sizes = _sizes(other, lambda: hl.explain(other, tiny_x[:1], "integrated_gradients", steps=64))
    best = next(iter(done.values()))
    expected = min(best["per_item"], key=best["per_item"].get)
    assert sizes[1] == min(64, int(expected))


def test_the_cache_keeps_no_model_alive(fresh_measurements, tiny_x):
    import gc
    import weakref

    net = make_tiny_cnn()
    ref = weakref.ref(net)
    hl.explain(net, tiny_x, "integrated_gradients", steps=40)
    del net
    gc.collect()
    assert ref() is None and fresh_measurements._measurements


# --- insertion and deletion together --------------------------------------------------------------
def test_insertion_and_deletion_together_equal_each_alone(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x, "saliency")
    together = hl.evaluate(tiny_cnn, tiny_x, e, ["deletion", "insertion"], granularity=4, steps=10, fill="blur")
    assert list(together) == ["deletion", "insertion"]
    for name in ("insertion", "deletion"):
        alone = hl.evaluate(tiny_cnn, tiny_x, e, [name], granularity=4, steps=10, fill="blur")[name]
        r = together[name]
        assert r.params == alone.params and r.higher_is_better == alone.higher_is_better
        # the same images; one engine run lays them out in other batches (float rounding only)
        torch.testing.assert_close(r.curves, alone.curves, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r.values, alone.values, rtol=1e-5, atol=1e-6)


def test_insertion_and_deletion_together_score_the_shared_images_once(tiny_cnn, tiny_x):
    e = hl.explain(tiny_cnn, tiny_x, "saliency")
    before = batching.call_stats()["items"]
    out = hl.evaluate(tiny_cnn, tiny_x, e, ["insertion", "deletion"], granularity=4, steps=10)
    points = out["insertion"].curves.shape[1]
    assert batching.call_stats()["items"] - before == tiny_x.shape[0] * (2 * points - 2)
    # different settings per metric: computed apart, as asked
    apart = hl.evaluate(tiny_cnn, tiny_x, e, ["insertion", "deletion"], granularity=4, steps=10,
                        deletion={"fill": "blur"})
    assert apart["deletion"].params["fill"] == "blur" and apart["insertion"].params["fill"] == "black"


def test_compare_shares_the_gradient_pass_and_scores_like_alone(tiny_cnn, tiny_x):
    from heatlens.metrics import compare

    c = compare(tiny_cnn, tiny_x, ["saliency", "gradcam", "occlusion"], ["insertion", "deletion"],
                granularity=4, steps=8, include_random=False)
    for name in ("saliency", "gradcam", "occlusion"):
        _same(c.explanations[name], hl.explain(tiny_cnn, tiny_x, name))
    alone = hl.evaluate(tiny_cnn, tiny_x, c.explanations["gradcam"], ["deletion"], granularity=4, steps=8)["deletion"]
    torch.testing.assert_close(c.results[("gradcam", "deletion")].values, alone.values, rtol=1e-5, atol=1e-6)
