"""The model contract: every registered method, metric and sanity check on every model pattern of
``_zoo.ZOO`` gives finite, correctly shaped, non-constant results (agreeing with Captum where that is
cheap) and leaves the model bit-identical, also after an error in the middle; patterns that cannot be
supported are refused with an exact message. Plus the pieces of the contract one by one: channels-last
only where proven safe, binary heads, output selectors, dtypes, one guarded entry, threads, no leak.
"""

from __future__ import annotations

import functools
import gc
import threading
import weakref

import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens.methods import METHODS
from heatlens.metrics import METRICS
from heatlens.models.hooks import frozen
from heatlens.sanity import CHECKS

from _zoo import SIZE, ZOO, ViewNet, assert_unchanged, model_fingerprint

# Cheap settings: the whole table runs in about a minute on one core.
METHOD_KW: dict[str, dict] = {
    "integrated_gradients": {"steps": 4},
    "expected_gradients": {"n_samples": 4},
    "gradient_shap": {"n_samples": 4},
    "smoothgrad": {"n_samples": 3},
    "smoothgrad_sq": {"n_samples": 3},
    "vargrad": {"n_samples": 3},
    "occlusion": {"window": 4},
    "feature_ablation": {},
    "lime": {"num_samples": 30},
    "kernel_shap": {"n_samples": 40},
    "rise": {"n_masks": 32},
    "scorecam": {},
    "extremal_perturbation": {"steps": 3},
}
SLOW_METHODS = {"extremal_perturbation"}  # seconds per call even on 8x8 (its mask pyramid)
# what a black-box predict function cannot do, and the exact refusal
CAM_NAMES = set(METHODS.names(family="cam"))
LAYER_REFUSAL = "CAM methods hook a layer, but model is a black-box predict function; wrap the nn.Module instead"
TRANSFORMER_NAMES = set(METHODS.names(family="transformer"))  # they read attention probabilities (hf_* patterns)
ATTENTION_REFUSAL = "has no global self-attention layer they can read"


def grad_refusal(name: str) -> str:
    return (f"method {name!r} needs gradients, but model is a black-box predict function; "
            "use a perturbation method instead (occlusion, feature_ablation, lime, kernel_shap, rise)")


def method_kwargs(name: str, x: torch.Tensor) -> dict:
    kw = dict(METHOD_KW.get(name, {}))
    if name in ("expected_gradients", "gradient_shap", "deeplift_shap"):
        kw["background"] = torch.rand(3, *x.shape[1:], generator=torch.Generator().manual_seed(9)) * 2 - 1
    if METHODS.get(name).meta.get("stochastic"):
        kw["seed"] = 0
    return kw


def wrapped(pattern: str):
    z = ZOO[pattern]()
    return z, hl.wrap(z.model, **z.wrap)


def _param(name: str, slow: set[str]):
    return pytest.param(name, marks=pytest.mark.slow) if name in slow else name


PATTERNS = list(ZOO)
ALL_METHODS = [_param(n, SLOW_METHODS) for n in METHODS.names()]


# --- 1. every method on every pattern -------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_method_on_every_pattern(pattern, method):
    z, clf = wrapped(pattern)
    before = model_fingerprint(z.net)
    info = METHODS.get(method)
    if method in TRANSFORMER_NAMES and not z.notes.get("attention") and (z.differentiable or not info.needs_grad):
        with pytest.raises(TypeError, match=ATTENTION_REFUSAL):  # no attention probabilities to read
            hl.explain(clf, z.x, method, **method_kwargs(method, z.x))
    elif not z.differentiable and (info.needs_grad or method in CAM_NAMES):
        message = grad_refusal(method) if info.needs_grad else LAYER_REFUSAL
        with pytest.raises(TypeError, match=f"^{_re(message)}$"):
            hl.explain(clf, z.x, method, **method_kwargs(method, z.x))
    else:
        e = hl.explain(clf, z.x, method, **method_kwargs(method, z.x))
        a = e.attributions
        n, c = z.x.shape[:2]
        assert a.shape[0] == n and (tuple(a.shape[1:]) == (c, SIZE, SIZE) or a.shape[1] == 1)
        assert bool(torch.isfinite(a).all())
        assert float(a.float().std()) > 0, "attributions are constant"
        assert e.maps().shape == (n, SIZE, SIZE)
        with frozen(clf), torch.no_grad():  # eval mode: a train-mode model's BatchNorm must not move
            logits = clf(z.x)
        assert torch.equal(e.targets, logits.argmax(1))
    assert_unchanged(z.net, before)


def _re(text: str) -> str:
    import re

    return re.escape(text)


# --- 1. every metric on every pattern --------------------------------------------------------------------
METRIC_KW: dict[str, dict] = {
    "insertion": {"steps": 8}, "deletion": {"steps": 8}, "pixel_flipping": {"steps": 8},
    "irof": {}, "faithfulness_correlation": {"n_runs": 8, "subset_size": 8}, "infidelity": {"n_perturbations": 8},
    "road": {"percentages": (0.25, 0.5, 0.75)}, "max_sensitivity": {"n_samples": 2},
    "avg_sensitivity": {"n_samples": 2}, "local_lipschitz": {"n_samples": 2},
    "top_k_intersection": {"k": 8},
}
CURVE_METRICS = {"insertion", "deletion", "pixel_flipping"}


@functools.cache
def _explanation(pattern: str):
    """The explanation every metric scores on a pattern: saliency (occlusion for a black box)."""
    z, clf = wrapped(pattern)
    method = "saliency" if z.differentiable else "occlusion"
    return hl.explain(clf, z.x, method, **method_kwargs(method, z.x))


def _segments(n: int) -> torch.Tensor:
    cells = torch.arange(16).reshape(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)  # 2x2-pixel cells
    return cells.expand(n, SIZE, SIZE).clone()


def metric_kwargs(name: str, n: int) -> dict:
    kw = dict(METRIC_KW.get(name, {}))
    if METRICS.get(name).needs_mask:
        mask = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
        mask[:, :4, :4] = True
        kw["mask"] = mask
    if name == "irof":
        kw["segments"] = _segments(n)
    return kw


@pytest.mark.parametrize("metric", METRICS.names())
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_metric_on_every_pattern(pattern, metric):
    e = _explanation(pattern)
    z, clf = wrapped(pattern)
    before = model_fingerprint(z.net)
    r = METRICS.get(metric).fn(clf, z.x, e, **metric_kwargs(metric, z.x.shape[0]))
    assert r.values.shape == (z.x.shape[0],)
    assert bool(torch.isfinite(r.values).all()), r.values
    if metric in CURVE_METRICS:  # a softmax over one logit made these constant
        assert bool((r.curves.std(1) > 0).all()), "the curve is flat"
    assert_unchanged(z.net, before)


# --- 1. every sanity check on every pattern --------------------------------------------------------------
CHECK_KW = {"fragility": {"n_trials": 2}}
BLACK_BOX_REFUSALS = {
    "model_randomization": (ValueError, "model has no parameters to randomise (a black-box predict function?)"),
    "input_invariance": (ValueError, "input_invariance needs a model whose first layer is an nn.Conv2d or nn.Linear"),
}


@pytest.mark.parametrize("check", CHECKS.names())
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_sanity_check_on_every_pattern(pattern, check):
    z, clf = wrapped(pattern)
    before = model_fingerprint(z.net)
    method, kw = ("saliency", {}) if z.differentiable else ("occlusion", {"window": 4})
    fn = CHECKS.get(check).fn
    if not z.differentiable and check in BLACK_BOX_REFUSALS:
        kind, message = BLACK_BOX_REFUSALS[check]
        with pytest.raises(kind, match=f"^{_re(message)}$"):
            fn(clf, z.x, method, **CHECK_KW.get(check, {}), **kw)
    else:
        r = fn(clf, z.x, method, **CHECK_KW.get(check, {}), **kw)
        assert isinstance(r.passed, bool) and r.verdict and r.table
        numbers = [v for row in r.table for v in row.values() if isinstance(v, float)]
        assert numbers and all(v == v and abs(v) != float("inf") for v in numbers), r.table
    assert_unchanged(z.net, before)


# --- 1. reference agreement where cheap ------------------------------------------------------------------
def _raw_logits(pattern: str, net: nn.Module):
    """The pattern's class scores computed without heatlens: (N,K) float32, eval mode."""
    pick = {"tuple_output": lambda o: o[1], "dict_output": lambda o: o["scores"],
            "logits_object": lambda o: o.logits}.get(pattern, (lambda o: o.logits) if pattern.startswith("hf_") else (lambda o: o))
    dtype = next(net.parameters()).dtype
    return lambda x: pick(net(x.to(dtype))).float()


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if ZOO[p]().differentiable])
def test_saliency_agrees_with_captum_on_every_differentiable_pattern(pattern):
    from captum.attr import Saliency

    z, clf = wrapped(pattern)
    e = hl.explain(clf, z.x, "saliency", target=1)
    reference_net = z.net
    if pattern == "train_mode":  # heatlens explains the model in eval mode: so does the reference
        import copy

        reference_net = copy.deepcopy(z.net).eval()
    forward = _raw_logits(pattern, reference_net)
    x = z.x.clone().requires_grad_(True)
    ref = Saliency(forward).attribute(x, target=0 if pattern == "binary_head" else 1, abs=False)
    tol = 2e-2 if pattern == "bfloat16" else 1e-5
    scale = float(ref.abs().max())
    assert float((e.attributions - ref).abs().max()) <= tol * scale


# --- 1./6. the model restored after an error in the middle ----------------------------------------------
class Bomb(nn.Module):
    """Wraps a model; once armed, its ``fuse``-th forward and every later one raise."""

    def __init__(self, inner: nn.Module, fuse: int = 2) -> None:
        super().__init__()
        self.inner, self.fuse, self.armed, self.calls = inner, fuse, False, 0

    def arm(self) -> None:
        self.armed, self.calls = True, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.calls += 1
            if self.calls >= self.fuse:
                raise RuntimeError("boom")
        return self.inner(x)


def _bomb(fuse: int = 2):
    z = ZOO["train_mode"]()
    net = Bomb(z.net, fuse)
    z.net.conv.weight.requires_grad_(False)  # a user's frozen layer must stay frozen
    clf = hl.wrap(net, input_size=(3, SIZE, SIZE))
    clf.num_classes  # noqa: B018 - the probes run before the fuse is armed
    return net, clf, z.x


@pytest.mark.parametrize("method", [_param(n, SLOW_METHODS) for n in METHODS.names() if n not in TRANSFORMER_NAMES])
def test_model_unchanged_after_an_error_inside_every_method(method):  # transformer family: tests/test_hf.py
    net, clf, x = _bomb()
    hl.explain(clf, x, method, **method_kwargs(method, x))  # once unarmed: warms the layout probe
    before = model_fingerprint(net)
    net.arm()
    try:
        hl.explain(clf, x, method, **method_kwargs(method, x))
    except RuntimeError as err:
        assert str(err) == "boom"
    net.armed = False
    assert_unchanged(net, before)
    assert net.training and not net.inner.conv.weight.requires_grad and net.inner.fc.weight.requires_grad


@pytest.mark.parametrize("entry", ["deletion", "max_sensitivity", "evaluate", "compare", *CHECKS.names()])
def test_model_unchanged_after_an_error_inside_metrics_and_checks(entry):
    net, clf, x = _bomb(fuse=3)
    e = hl.explain(clf, x, "saliency")
    before = model_fingerprint(net)
    net.arm()
    one = {"batch_size": 1}  # one item per forward: the third forward is in the middle of the run
    with pytest.raises(RuntimeError, match="^boom$"):
        if entry == "evaluate":
            hl.evaluate(clf, x, e, ["deletion"], steps=8, **one)
        elif entry == "compare":
            hl.metrics.compare(clf, x, ["saliency", "occlusion"], ["deletion"], steps=8, **one)
        elif entry in METRICS:
            METRICS.get(entry).fn(clf, x, e, **metric_kwargs(entry, 2), **one)
        else:
            CHECKS.get(entry).fn(clf, x, "saliency", **CHECK_KW.get(entry, {}), **one)
    net.armed = False
    assert_unchanged(net, before)


# --- 2. channels-last only where proven safe ------------------------------------------------------------
def test_layout_probe_keeps_nchw_for_view_nets_and_uses_channels_last_where_safe():
    from heatlens.models.adapter import _channels_last as _channels_last_safe

    view, cnn = ZOO["view_net"](), ZOO["residual"]()
    for z in (view, cnn):
        hl.explain(hl.wrap(z.model, **z.wrap), z.x, "saliency")
    assert _channels_last_safe[view.net] is False
    assert _channels_last_safe[cnn.net] is True


class LayoutSensitive(nn.Module):
    """Runs channels-last without error but computes something else there (strides leak into values)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * SIZE * SIZE, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        flat = torch.as_strided(h, (h.shape[0], h[0].numel()), (h.stride(0), 1))  # memory order, not NCHW order
        return self.fc(flat)


def test_a_model_that_computes_differently_channels_last_keeps_nchw():
    from heatlens.models.adapter import _channels_last as _channels_last_safe

    net = LayoutSensitive().eval()
    x = ZOO["view_net"]().x
    e = hl.explain(net, x, "saliency", target=0)
    assert _channels_last_safe[net] is False
    xr = x.clone().requires_grad_(True)
    net(xr)[:, 0].sum().backward()
    assert torch.allclose(e.attributions, xr.grad, atol=1e-6)


# --- 4. binary heads: the two-class view -----------------------------------------------------------------
def test_one_logit_head_is_two_classes_with_sigmoid_probability_and_signed_log_odds():
    z, clf = wrapped("binary_head")
    with torch.no_grad():
        logit = z.net(z.x)[:, 0]
    assert clf.num_classes == 2 and clf.binary
    assert torch.allclose(clf(z.x).softmax(1)[:, 1], torch.sigmoid(logit), atol=1e-6)
    assert torch.equal(hl.explain(clf, z.x, "saliency").targets, (logit > 0).long())

    def grad_of(f):
        x = z.x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(z.net(x)[:, 0]).sum(), x)
        return g

    cases = {("logit", 1): lambda v: v, ("logit", 0): lambda v: -v,
             ("probability", 1): torch.sigmoid, ("probability", 0): lambda v: 1 - torch.sigmoid(v)}
    for (output, target), f in cases.items():
        got = hl.explain(clf, z.x, "saliency", target=target, output=output).attributions
        assert torch.allclose(got, grad_of(f), atol=1e-6), (output, target)


def test_binary_deletion_curve_follows_the_sigmoid_not_a_constant():
    z, clf = wrapped("binary_head")
    e = hl.explain(clf, z.x, "saliency")
    r = hl.metrics.deletion(clf, z.x, e, steps=8)
    with torch.no_grad():
        p = torch.sigmoid(z.net(z.x)[:, 0])
    clean = torch.where(e.targets == 1, p, 1 - p)
    assert torch.allclose(r.curves[:, 0].float(), clean, atol=1e-5)
    assert bool((r.curves.std(1) > 1e-3).all())


def test_one_value_in_unit_interval_is_refused_naming_outputs():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 1), nn.Sigmoid())
    message = ("model returns one score per image, all in [0, 1] on the probe: pass outputs='probabilities' "
               "if it is the probability of the positive class (a final sigmoid), or outputs='logits' if it is a logit")
    with pytest.raises(ValueError, match=f"^{_re(message)}$"):
        hl.wrap(net, input_size=(3, SIZE, SIZE))
    clf = hl.wrap(net, input_size=(3, SIZE, SIZE), outputs="probabilities")
    x = ZOO["view_net"]().x
    with torch.no_grad():
        p = net(x)[:, 0]
    assert torch.allclose(clf(x).softmax(1)[:, 1], p, atol=1e-6)
    assert torch.allclose(clf.score(x, torch.ones(2, dtype=torch.long), "logit"), torch.logit(p), atol=1e-4)


def test_black_box_returning_n_values_is_a_binary_head():
    z, clf = wrapped("black_box_binary")
    with torch.no_grad():
        logit = z.net(z.x)[:, 0]
    assert clf.binary and torch.allclose(clf(z.x), torch.stack([torch.zeros_like(logit), logit], 1), atol=1e-6)


# --- 4. tuple / dict / .logits outputs --------------------------------------------------------------------
def test_tuple_output_without_select_is_refused_with_what_to_pass():
    z = ZOO["tuple_output"]()
    message = ("model returns a tuple of 2 outputs ((4, 2), (4, 3)); heatlens does not guess which holds the "
               "logits: pass its index, e.g. heatlens.wrap(model, input_size=(C, H, W), select=1)")
    with pytest.raises(TypeError, match=f"^{_re(message)}$"):
        hl.wrap(z.model, input_size=(3, SIZE, SIZE))
    with pytest.raises(TypeError, match=f"^{_re(message)}$"):
        hl.explain(z.model, z.x, "saliency")  # a bare module: same refusal, nothing taken silently


def test_dict_output_without_logits_key_is_refused_naming_select():
    z = ZOO["dict_output"]()
    message = ("model returns a dict with keys ['aux', 'scores'] and no 'logits': pass the key of the class "
               "scores, e.g. heatlens.wrap(model, input_size=(C, H, W), select='aux')")
    with pytest.raises(TypeError, match=f"^{_re(message)}$"):
        hl.wrap(z.model, input_size=(3, SIZE, SIZE))


def test_selectors_pick_the_same_logits():
    z = ZOO["tuple_output"]()
    body = z.net.body
    ref = hl.explain(hl.wrap(body, input_size=(3, SIZE, SIZE)), z.x, "saliency", target=2).attributions
    for select in (1, -1, lambda out: out[1]):
        got = hl.explain(hl.wrap(z.net, input_size=(3, SIZE, SIZE), select=select), z.x, "saliency", target=2)
        assert torch.equal(got.attributions, ref)
    obj = ZOO["logits_object"]()  # .logits is taken without select
    obj.net.load_state_dict(z.net.state_dict())
    assert torch.equal(hl.explain(obj.model, z.x, "saliency", target=2).attributions, ref)
    with pytest.raises(TypeError, match=r"^select must be an index, a key or attribute name, or a function, got float$"):
        hl.wrap(z.net, input_size=(3, SIZE, SIZE), select=1.0)


# --- 5. dtypes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_models_of_other_dtypes_explain_like_their_float32_twin(dtype):
    z = ZOO["float64"]()
    twin = z.net.float()  # same weights, float32
    ref = hl.explain(hl.wrap(twin, input_size=(3, SIZE, SIZE)), z.x, "saliency", target=1).attributions
    net = ZOO["float64"]().net.to(dtype)
    clf = hl.wrap(net, input_size=(3, SIZE, SIZE))
    assert clf.dtype == dtype
    for x in (z.x, z.x.double()):  # any floating x: cast to the model's dtype, gradients in x's dtype
        e = hl.explain(clf, x, "saliency", target=1)
        assert e.attributions.dtype == x.dtype
        tol = {torch.float64: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
        assert float((e.attributions.float() - ref).abs().max()) <= tol * float(ref.abs().max())


def test_probability_probe_runs_in_the_models_dtype():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 4), nn.Softmax(1)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="model returns probabilities"):
        hl.wrap(net, input_size=(3, SIZE, SIZE))  # bfloat16 rows sum to 1 only within its precision


def test_classifier_reports_the_wrapped_nets_training_mode():
    z = ZOO["train_mode"]()
    clf = hl.wrap(z.net, input_size=(3, SIZE, SIZE))
    assert clf.training is True
    z.net.eval()
    assert clf.training is False
    clf.train()
    assert z.net.training and clf.training


# --- 6. one guarded entry: a train-mode model is not changed by metrics ---------------------------------
def test_deletion_on_a_train_mode_model_keeps_batchnorm_and_is_deterministic():
    z = ZOO["train_mode"]()
    e = hl.explain(z.net, z.x, "saliency")
    stats = {k: v.clone() for k, v in z.net.bn.state_dict().items()}
    a = hl.metrics.deletion(z.net, z.x, e, steps=8)
    b = hl.metrics.deletion(z.net, z.x, e, steps=8)
    assert torch.equal(a.curves, b.curves)  # no dropout
    for k, v in z.net.bn.state_dict().items():
        assert torch.equal(v, stats[k]), k  # no BatchNorm update
    assert z.net.training


def test_evaluate_and_compare_leave_a_train_mode_model_as_it_was():
    z = ZOO["train_mode"]()
    e = hl.explain(z.net, z.x, "saliency")
    before = model_fingerprint(z.net)
    hl.evaluate(z.net, z.x, e, ["insertion", "deletion", "sparseness"], steps=8)
    hl.metrics.compare(z.net, z.x, ["saliency", "occlusion"], ["deletion"], steps=8, method_kwargs={"occlusion": {"window": 4}})
    assert_unchanged(z.net, before)


# --- 7. threads ---------------------------------------------------------------------------------------------
def _jobs(model, x, e):
    return {
        "saliency": lambda: hl.explain(model, x, "saliency").attributions,
        "gradcam": lambda: hl.explain(model, x, "gradcam").attributions,
        "integrated_gradients": lambda: hl.explain(model, x, "integrated_gradients", steps=8).attributions,
        "occlusion": lambda: hl.explain(model, x, "occlusion", window=4).attributions,
        "deletion": lambda: hl.metrics.deletion(model, x, e, steps=8).curves,
    }


def test_four_threads_of_mixed_methods_on_one_model_equal_the_sequential_results():
    z = ZOO["residual"]()
    net = z.net.train()  # train mode: a missed freeze or restore shows up in the results and the flags
    net.conv2.weight.requires_grad_(False)
    xs = [z.x + 0.1 * i for i in range(4)]  # each thread its own batch: a crossed result shows
    e = [hl.explain(net, xb, "saliency") for xb in xs]
    expected = [{k: f() for k, f in _jobs(net, xb, eb).items()} for xb, eb in zip(xs, e)]
    before = model_fingerprint(net)
    results: list[dict] = [{} for _ in xs]
    errors: list[BaseException] = []
    start = threading.Barrier(len(xs))

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                for k, f in _jobs(net, xs[i], e[i]).items():
                    got = f()
                    results[i].setdefault(k, []).append(got)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, per_job in enumerate(results):
        for k, runs in per_job.items():
            for got in runs:
                assert torch.allclose(got, expected[i][k], atol=1e-6), (i, k)
    assert_unchanged(net, before)


# --- 8. no leak ---------------------------------------------------------------------------------------------
def test_bare_modules_and_wrappers_are_collectable_after_use():
    z = ZOO["residual"]()
    net, x = z.net, z.x
    e = hl.explain(net, x, "saliency")
    hl.explain(net, x, "gradcam")
    hl.metrics.deletion(net, x, e, steps=8)
    ref = weakref.ref(net)
    del net, z
    gc.collect()
    assert ref() is None, "a bare module passed to explain is kept alive"

    net = ViewNet().eval()
    clf = hl.wrap(net, input_size=(3, SIZE, SIZE))
    hl.explain(clf, x, "integrated_gradients", steps=4)
    refs = weakref.ref(net), weakref.ref(clf)
    del net, clf
    gc.collect()
    assert refs[0]() is None and refs[1]() is None, "a wrapper or its module is kept alive"
