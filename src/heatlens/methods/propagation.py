"""Propagation family: DeepLIFT (rescale rule), DeepLIFT-SHAP, Guided Backprop, Deconvnet.

Each method is the ordinary gradient with a different backward rule at the nonlinearities. The
rules are applied through ONE reversible context, ``override_backward(rule, activations)``: a
``TorchFunctionMode`` active during the forward pass only, which replaces every call of an
elementwise nonlinearity (``torch.relu``, ``F.relu`` incl. in-place, ``Tensor.relu``, ``F.relu6`` /
``F.hardtanh`` (``nn.ReLU6``), sigmoid, tanh, ELU, leaky ReLU, softplus, SiLU, GELU, ...) and max
pooling by a custom autograd function whose forward is the same op and whose backward applies the
rule. Every call is handled on its own, so a module reused twice and functional calls are treated
correctly by construction (module hooks, as in Captum, miss or mis-handle both), and no hook is
ever put on the model.

Activation kinds (``activations=``) are the names in ``KINDS``; ``"all"`` means every kind and
``"captum"`` the ones Captum overrides (by module type: ``nn.ReLU`` for guided backprop and
deconvnet; ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus and max pooling for DeepLIFT).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..baselines import BaselineLike, resolve_baseline
from ..batching import map_batches
from ..explanation import Explanation
from ..models.adapter import Classifier, target_scores
from ..targets import TargetLike
from ..validation import check_images, did_you_mean
from ._autograd import Prepared, input_gradients, make_generator, prepare
from .gradient import explanation
from .registry import register

__all__ = [
    "CompletenessWarning", "KINDS", "deconvnet", "deeplift", "deeplift_shap", "guided_backprop",
    "override_backward",
]

Backward = Callable[[Tensor], Tensor]  # grad wrt an op's output -> grad wrt its input
Rule = Callable[[str, Callable[[Tensor], Tensor], Tensor], "Tensor | None"]  # (kind, op, input) -> output


class CompletenessWarning(UserWarning):
    """DeepLIFT met an operation its rules do not cover: the map is not an exact decomposition."""


# --- which calls are intercepted -------------------------------------------------------------
@dataclass(frozen=True)
class _Op:
    kind: str
    pure: Callable[..., Tensor] | None = None  # out-of-place twin of an in-place op
    inplace: bool | None = False  # None: the call takes an ``inplace`` argument


_T = torch.Tensor
_OPS: dict[Callable, _Op] = {}


def _ops(kind: str, *funcs: Callable, pure: Callable | None = None, inplace: bool | None = False) -> None:
    for fn in funcs:
        _OPS[fn] = _Op(kind, pure, inplace)


_ops("relu", F.relu, inplace=None)
_ops("relu", torch.relu, _T.relu)
_ops("relu", F.relu_, torch.relu_, _T.relu_, pure=torch.relu, inplace=True)
_ops("relu6", F.relu6, F.hardtanh, inplace=None)  # nn.ReLU6 is F.hardtanh(x, 0, 6)
_ops("relu6", F.hardtanh_, pure=F.hardtanh, inplace=True)
_ops("leaky_relu", F.leaky_relu, inplace=None)
_ops("leaky_relu", F.leaky_relu_, pure=F.leaky_relu, inplace=True)
_ops("prelu", F.prelu)
_ops("elu", F.elu, inplace=None)
_ops("elu", F.elu_, pure=F.elu, inplace=True)
_ops("selu", F.selu, inplace=None)
_ops("selu", torch.selu)
_ops("selu", torch.selu_, pure=torch.selu, inplace=True)
_ops("celu", F.celu, inplace=None)
_ops("celu", torch.celu)
_ops("celu", torch.celu_, pure=torch.celu, inplace=True)
_ops("gelu", F.gelu)
for _name, _fn in (("silu", F.silu), ("mish", F.mish), ("hardswish", F.hardswish), ("hardsigmoid", F.hardsigmoid)):
    _ops(_name, _fn, inplace=None)
_ops("sigmoid", torch.sigmoid, _T.sigmoid)
_ops("sigmoid", torch.sigmoid_, _T.sigmoid_, pure=torch.sigmoid, inplace=True)
_ops("tanh", torch.tanh, _T.tanh)
_ops("tanh", torch.tanh_, _T.tanh_, pure=torch.tanh, inplace=True)
_ops("softplus", F.softplus)
_ops("logsigmoid", F.logsigmoid)
_ops("clamp", torch.clamp, torch.clip, _T.clamp, _T.clip, torch.clamp_min, torch.clamp_max, _T.clamp_min, _T.clamp_max)
_ops("clamp", torch.clamp_, _T.clamp_, _T.clip_, pure=torch.clamp, inplace=True)
_ops("clamp", torch.clamp_min_, _T.clamp_min_, pure=torch.clamp_min, inplace=True)
_ops("clamp", torch.clamp_max_, _T.clamp_max_, pure=torch.clamp_max, inplace=True)
_ops("exp", torch.exp, _T.exp)
_ops("exp", _T.exp_, pure=torch.exp, inplace=True)
_ops("log", torch.log, _T.log)
_ops("log", _T.log_, pure=torch.log, inplace=True)
_ops("maxpool", F.max_pool1d, F.max_pool2d, F.max_pool3d)

KINDS: tuple[str, ...] = tuple(dict.fromkeys(op.kind for op in _OPS.values()))
ELEMENTWISE = tuple(k for k in KINDS if k != "maxpool")
_CAPTUM = {
    "deeplift": ("relu", "elu", "leaky_relu", "sigmoid", "tanh", "softplus", "maxpool"),
    "guided_backprop": ("relu",), "deconvnet": ("relu",),
}

# Nonlinear ops without a DeepLIFT rule: seeing one with an input-dependent operand means the
# multipliers no longer sum to the output difference (reported, never silent).
_UNSUPPORTED = {
    F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, _T.softmax, _T.log_softmax,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d,
    F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm, F.normalize,
    torch.max, torch.min, torch.amax, torch.amin, _T.max, _T.min, _T.amax, _T.amin, torch.logsumexp,
    _T.logsumexp, torch.norm, _T.norm, torch.topk, _T.topk, torch.sort, _T.sort, torch.sqrt, _T.sqrt,
    torch.rsqrt, _T.rsqrt, torch.abs, _T.abs, torch.square, _T.square, torch.reciprocal, _T.reciprocal,
    torch.sin, torch.cos, torch.erf, F.softsign, F.tanhshrink, F.threshold, F.glu, torch.prod, _T.prod,
}
# Bilinear ops: nonlinear only when two operands depend on the input (x * sigmoid(x), attention).
_PRODUCTS = {
    torch.mul, _T.mul, _T.__mul__, _T.__rmul__, torch.div, _T.div, _T.__truediv__, _T.__rtruediv__,
    torch.matmul, _T.matmul, _T.__matmul__, torch.bmm, _T.bmm, torch.mm, _T.mm, torch.einsum,
    torch.addcmul, torch.addcdiv, torch.pow, _T.pow, _T.__pow__, _T.__rpow__,
}


def resolve_activations(activations: str | Sequence[str], method: str) -> frozenset[str]:
    """``"all"`` | ``"captum"`` | a kind | a sequence of kinds -> the set of kinds given the rule."""
    if isinstance(activations, str):
        if activations == "all":
            return frozenset(KINDS if method == "deeplift" else ELEMENTWISE)
        if activations == "captum":
            return frozenset(_CAPTUM[method])
        activations = (activations,)
    if not isinstance(activations, Sequence) or not all(isinstance(a, str) for a in activations):
        raise TypeError(f"activations must be 'all', 'captum', a kind or a sequence of kinds, got {activations!r}")
    allowed = KINDS if method == "deeplift" else ELEMENTWISE
    for kind in activations:
        if kind not in allowed:
            raise ValueError(
                f"activations: unknown kind {kind!r} for {method}.{did_you_mean(kind, allowed)} "
                f"Valid kinds: {', '.join(allowed)}, or 'all' / 'captum'"
            )
    return frozenset(activations)


# --- the reversible context ------------------------------------------------------------------
class _ReplaceGrad(torch.autograd.Function):
    """Forward: ``value`` (the op's output, computed by the caller). Backward: ``rule(g)`` for ``a``."""

    @staticmethod
    def forward(ctx, a: Tensor, value: Tensor, rule: Backward) -> Tensor:  # noqa: ARG004 - a carries the graph
        ctx.rule = rule
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.rule(grad), None, None


class _PositiveGrad(torch.autograd.Function):
    """Identity forward; backward keeps only the positive part of the gradient."""

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.relu(grad)


class _OverrideMode(TorchFunctionMode):
    """Intercepts the nonlinearities of one forward pass; counts ops the rule cannot cover."""

    def __init__(self, rule: Rule, kinds: frozenset[str]) -> None:
        super().__init__()
        self.rule, self.kinds = rule, kinds
        self.unsupported: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _OPS.get(func)
        if op is None:
            self._note(func, args, kwargs)
            return func(*args, **kwargs)
        a, pure, inplace = _split(func, op, args, kwargs)
        if not (isinstance(a, Tensor) and a.requires_grad and torch.is_grad_enabled()):
            return func(*args, **kwargs)  # a constant or a no-grad region: nothing to override
        if pure is None or op.kind not in self.kinds:
            why = "not in activations" if pure is not None else "with input-dependent arguments"
            self.unsupported[f"{op.kind} ({why})"] += 1
            return func(*args, **kwargs)
        # in-place: the rule's graph must not save ``a``, which is overwritten just below
        out = self.rule(op.kind, pure, a.clone() if inplace else a)
        if out is None:
            return func(*args, **kwargs)
        if inplace:  # keep in-place semantics; autograd routes a's new version through ``out``
            return a.copy_(out)
        return out

    def _note(self, func, args, kwargs) -> None:
        if func in _UNSUPPORTED:
            if any(isinstance(t, Tensor) and t.requires_grad for t in args):
                self.unsupported[_name(func)] += 1
        elif func in _PRODUCTS:
            operands = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.requires_grad]
            if len(operands) >= 2:
                self.unsupported[f"{_name(func)} of input-dependent tensors"] += 1
            elif func in (torch.pow, _T.pow, _T.__pow__) and operands and args and args[0] is operands[0]:
                exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
                if not (isinstance(exponent, (int, float)) and exponent == 1):
                    self.unsupported["pow of an input-dependent tensor"] += 1
        elif func is F.batch_norm and (kwargs.get("training") or (len(args) > 5 and args[5])):
            self.unsupported["batch_norm in training mode"] += 1


@contextmanager
def override_backward(rule: Rule, activations: str | Sequence[str] = ("relu", "relu6"), *,
                      method: str = "guided_backprop") -> Iterator[_OverrideMode]:
    """Apply ``rule`` at the nonlinearities of every forward run inside the block.

    rule(kind, f, a) -> Tensor | None: given the op kind, the op as a pure function ``f`` and its
    input ``a``, return the op's output f(a) carrying the rule's backward (None: leave the op as
    it is). Only the forward needs to run inside the block; the backward may run after it. The
    mode is removed on exit, also when the forward raises. The yielded object's ``unsupported``
    counts the ops no rule covered.
    """
    mode = _OverrideMode(rule, resolve_activations(activations, method))
    with mode:
        yield mode


# --- rules -----------------------------------------------------------------------------------
def guided_rule(kind: str, f: Callable[[Tensor], Tensor], a: Tensor) -> Tensor:
    """Guided backprop (Springenberg et al., 2015): relu(g * f'(a)); for ReLU, input > 0 AND grad > 0."""
    return f(_PositiveGrad.apply(a))  # the op's own backward gives g * f'(a), then relu


def deconvnet_rule(kind: str, f: Callable[[Tensor], Tensor], a: Tensor) -> Tensor:
    """Deconvnet (Zeiler & Fergus, 2014): relu(g), whatever the input."""
    with torch.no_grad():
        value = f(a)
    return _ReplaceGrad.apply(a, value, torch.relu)


def rescale_rule(rows: int, eps: float = 1e-10) -> Rule:
    """DeepLIFT's rescale rule for a forward of paired rows [x; x'] (``rows`` = 2B).

    Elementwise ops: multiplier (f(a) - f(a')) / (a - a'), the plain derivative where |a - a'| < eps
    (as Captum). Max pooling: Captum's rule, the output difference routed through the argmax of
    x and of x' and divided by the input difference. Only the x half carries gradient.
    """

    def rule(kind: str, f: Callable[[Tensor], Tensor], a: Tensor) -> Tensor:
        if a.dim() == 0 or a.shape[0] != rows:
            raise ValueError(
                f"deeplift pairs each image with its baseline along the batch axis, but a {kind} input has "
                f"shape {tuple(a.shape)} (expected {rows} rows): the model must keep the batch as axis 0"
            )
        if kind == "maxpool":
            return _maxpool(f, a, eps)
        with torch.no_grad():
            out = f(a)
            (a_x, a_r), (out_x, out_r) = a.chunk(2), out.chunk(2)
            d_in = a_x - a_r
            tiny = d_in.abs() < eps
            ratio = torch.where(tiny, torch.zeros_like(d_in), (out_x - out_r) / d_in)
            multiplier = torch.cat([ratio, torch.zeros_like(ratio)])
            plain = torch.cat([tiny, torch.zeros_like(tiny)])
        rescaled = _ReplaceGrad.apply(a, out, lambda g: g * multiplier)
        # where a == a' the op's own derivative, taken by autograd (no sync, no extra backward call)
        return torch.where(plain, f(a), rescaled)

    return rule


def _maxpool(pool: Callable[[Tensor], Tensor], a: Tensor, eps: float) -> Tensor:
    """Captum's maxpool rule (DeepLIFT paper, sec. 3.5), with the pool's own backward as the router."""
    with torch.enable_grad():
        t = a.detach().clone().requires_grad_(True)
        out = pool(t)
    a_x, a_r = t.detach().chunk(2)
    d_in = a_x - a_r
    out_x, out_r = out.detach().chunk(2)
    top = torch.maximum(out_x, out_r)
    parts = torch.cat([top - out_r, out_x - top])  # routed through x's argmax, then x''s

    def backward(g: Tensor) -> Tensor:
        g_x = g.chunk(2)[0]
        both = torch.cat([g_x, g_x])
        routed, plain = (torch.autograd.grad(out, t, grad, retain_graph=True)[0].chunk(2)
                         for grad in (both * parts, both))
        new_x = torch.where(d_in.abs() < eps, plain[0], (routed[0] + routed[1]) / d_in)
        return torch.cat([new_x, torch.zeros_like(new_x)])

    return _ReplaceGrad.apply(a, out.detach(), backward)


# --- call parsing ----------------------------------------------------------------------------
_SIGNATURES: dict[Callable, inspect.Signature] = {}


def _split(func: Callable, op: _Op, args: tuple, kwargs: dict) -> tuple[object, Callable[[Tensor], Tensor] | None, bool]:
    """(the op's input, the op as an out-of-place function of it or None when unsupported, in-place?)."""
    if op.inplace is None:
        sig = _SIGNATURES.setdefault(func, inspect.signature(func))
        bound = sig.bind(*args, **kwargs)
        inplace = bool(bound.arguments.get("inplace", False))
        if "inplace" in bound.arguments:
            bound.arguments["inplace"] = False
        rest, kw = bound.args[1:], bound.kwargs
        a = bound.args[0] if bound.args else None
    else:
        a, rest, kw, inplace = (args[0] if args else None), args[1:], kwargs, bool(op.inplace)
    others = [v for v in (*rest, *kw.values()) if isinstance(v, Tensor)]
    if any(t.requires_grad for t in others):
        return a, None, inplace  # e.g. clamp with input-dependent bounds: not elementwise in a alone
    if op.kind == "maxpool" and (kw.get("return_indices") or (len(rest) > 5 and rest[5])):
        return a, None, inplace
    target = op.pure or func
    return a, (lambda t: target(t, *rest, **kw)), inplace


def _name(func: Callable) -> str:
    return getattr(func, "__name__", str(func)).strip("_")


# --- DeepLIFT --------------------------------------------------------------------------------
class _PairedScorer:
    """Scores x with its references riding along in the same forward: rows [x; x'] (one batch)."""

    def __init__(self, model: Classifier, kinds: frozenset[str], output: str) -> None:
        self.model, self.kinds, self.output = model, kinds, output
        self.net, self.layout = model.net, model.layout  # fast_layout reads these: channels-last on CPU
        self.refs: Tensor | None = None
        self.scores: tuple[Tensor, Tensor] | None = None  # f(x), f(x') of the last batch
        self.unsupported: Counter[str] = Counter()

    def score(self, x: Tensor, targets: Tensor, output: str) -> Tensor:
        assert self.refs is not None
        # same memory layout for both halves: a channels_last x must not be run as NCHW (float32
        # gradients of ReLU6 nets differ by ~0.5% between layouts, so parity with peers needs it)
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        refs = self.refs.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        stacked = torch.cat([x, refs])
        with override_backward(rescale_rule(stacked.shape[0]), tuple(self.kinds), method="deeplift") as mode:
            logits = self.model(stacked)
        self.unsupported.update(mode.unsupported)
        z_x, z_r = logits.chunk(2)
        weights, f_x, f_r = _top_multipliers(z_x.detach(), z_r.detach(), targets, output, binary=self.model.binary)
        self.scores = (f_x, f_r)
        return (weights * z_x).sum(1)  # d/dz_x = the multipliers of the explained output


def _top_multipliers(z_x: Tensor, z_r: Tensor, targets: Tensor, output: str, nodes: int = 16, *,
                     binary: bool = False):
    """Multipliers (B,K) of the explained score at the logits, and the scores at x and x' (B,).

    logit: one-hot (a binary head's log-odds z_t - z_(1-t): +1 and -1, ``adapter.class_scores``). probability: softmax_t is a function of all K logits, so its difference is
    split over them by Integrated Gradients along z' -> z, keeping the chain of multipliers complete.
    The integral is composite Gauss-Legendre in float64 with one 16-point panel per 2 units of logit
    spread (softmax changes faster the larger the logit differences), exact to ~1e-12.
    """
    onehot = F.one_hot(targets, z_x.shape[1]).to(z_x.dtype)
    if output == "logit":
        weights = onehot - onehot.flip(1) if binary else onehot
        return weights, (weights * z_x).sum(1).float(), (weights * z_r).sum(1).float()
    zx, zr, hot = z_x.double(), z_r.double(), onehot.double()
    delta = zx - zr
    panels = int(min(512, max(1, math.ceil(float((delta.amax(1) - delta.amin(1)).max()) / 2))))
    t, w = np.polynomial.legendre.leggauss(nodes)
    grad = torch.zeros_like(zx)
    for k in range(panels):  # memory stays (nodes, B, K) whatever the spread
        alphas = torch.tensor((k + 0.5 * (t + 1)) / panels, dtype=torch.float64, device=zx.device).view(-1, 1, 1)
        weights = torch.tensor(0.5 * w / panels, dtype=torch.float64, device=zx.device).view(-1, 1, 1)
        p = (zr + alphas * delta).softmax(-1)  # (S,B,K)
        p_t = (p * hot).sum(-1, keepdim=True)
        grad += (weights * p_t * (hot - p)).sum(0)  # d softmax_t / dz = p_t (e_t - p)
    prob = lambda z: z.softmax(1).gather(1, targets[:, None]).squeeze(1).float()  # noqa: E731
    return grad.to(z_x.dtype), prob(z_x), prob(z_r)


def _deeplift_pairs(
    p: Prepared, n_items: int, build: Callable[[int, int], tuple[Tensor, Tensor, Tensor]],
    consume: Callable[[int, int, Tensor], None], kinds: frozenset[str], output: str,
    batch_size: int | None, desc: str,
) -> tuple[Tensor, Tensor, Counter]:
    """DeepLIFT for ``n_items`` (x, x', target) triples built lazily, one engine batch at a time.

    build(start, stop) -> (x (B,C,H,W), x' (B,C,H,W), targets (B,)); consume(start, stop, attributions
    (B,C,H,W)). Returns f(x), f(x') per item (n_items,) and the unsupported-op counts.
    """
    scorer = _PairedScorer(p.model, kinds, output)
    f_x, f_r = torch.empty(n_items), torch.empty(n_items)

    def step(start: int, stop: int) -> None:
        xb, rb, tb = build(start, stop)
        scorer.refs = rb
        grads, _ = input_gradients(scorer, xb, tb, output)  # type: ignore[arg-type]
        f_x[start:stop], f_r[start:stop] = (s.cpu() for s in scorer.scores)
        consume(start, stop, (xb - rb) * grads)

    c, h, w = p.model.input_size  # each item is a pair of rows
    map_batches(step, n_items, batch_size=batch_size, grad=True, model=p.model, item_shape=(2 * c, h, w),
                consume=lambda *_: None, desc=desc)
    return f_x.to(p.x.device), f_r.to(p.x.device), scorer.unsupported


COMPLETENESS_TOLERANCE = 1e-3  # relative gap |gap| / (|f(x)| + |f(x')|) above which DeepLIFT warns


def _relative_gap(gap: Tensor, f_x: Tensor, f_r: Tensor) -> float:
    return float((gap.abs() / (f_x.abs() + f_r.abs() + 1e-6)).max())


def _needs_float64(p: Prepared, gap: Tensor, f_x: Tensor, f_r: Tensor, unsupported: Counter) -> bool:
    """Retry in float64 when every op had a rule but the gap is not ~0 in float32: then it is rounding.
    Captum's SoftmaxDeepLiftModel has logits near 3.1e5, where float32's step is 0.03 logits, so the
    probability's decomposition misses by 1.7e-3 (1.5% of f(x)) although the rules are exact."""
    return (not unsupported and p.x.dtype == torch.float32 and p.model.differentiable
            and _relative_gap(gap, f_x, f_r) > COMPLETENESS_TOLERANCE)


def _float64_rerun(method: Callable[..., Explanation], p: Prepared, name: str, **kwargs: Any) -> Explanation | None:
    """The method on a float64 copy of the model (the same weights, exactly representable), packaged
    as a result for the float32 call: attributions cast back, the float64 gap and scores in extras.
    None when the model cannot be copied to float64 (the float32 result then stands, with its warning)."""
    try:
        wide = copy.deepcopy(p.model).double()
    except Exception:  # a model that cannot be copied or cast (some wrapped frameworks): keep float32
        return None
    e = method(wide, p.x.double(), p.targets, **kwargs)
    extras = {k: (v.float() if isinstance(v, Tensor) and v.is_floating_point() else v) for k, v in e.extras.items()}
    extras["precision"] = "float64"
    return explanation(p, e.attributions.float(), name, e.params, extras)


def _completeness(name: str, attributions: Tensor, f_x: Tensor, f_r: Tensor, unsupported: Counter,
                  warn: bool = True) -> Tensor:
    """f(x) - f(x') - sum(attributions) per image; warns when it is not ~0 or an op had no rule."""
    gap = (f_x.double() - f_r.double() - attributions.flatten(1).double().sum(1)).to(f_x.dtype)
    worst = _relative_gap(gap, f_x, f_r)
    if warn and (unsupported or worst > COMPLETENESS_TOLERANCE):
        ops = ", ".join(f"{k} ({v} calls)" for k, v in unsupported.items()) or (
            "an operation heatlens does not intercept (a custom autograd.Function or a non-elementwise nonlinearity)")
        warnings.warn(
            f"{name}: the model uses {ops}, which DeepLIFT's rules do not cover: the attributions are not an exact "
            f"decomposition (largest completeness gap {float(gap.abs().max()):.3g}, {worst:.2%} of |f(x)| + |f(x')|; "
            "see extras['completeness_gap'])", CompletenessWarning, stacklevel=4,
        )
    return gap


@register("deeplift", family="propagation", needs_grad=True, per_sample=("baseline",),
          description="DeepLIFT rescale rule: contributions of x - x' through per-op difference ratios (Shrikumar et al., 2017)")
def deeplift(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    baseline: BaselineLike = "zeros", activations: str | Sequence[str] = "all",
    output: str = "logit", batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """DeepLIFT with the rescale rule (Shrikumar et al., 2017).

    attributions (N,C,H,W) = (x - x') * multipliers, signed, where each nonlinearity's multiplier is
    (f(a) - f(a')) / (a - a') and max pooling uses Captum's rule. x and x' run in one forward.
    baseline: any ``heatlens.baselines`` form (``seed`` drives "uniform" / "gaussian").
    activations: kinds given the rule ("all", "captum", or names from ``KINDS``); others keep their
    gradient. extras["completeness_gap"] (N,) = f(x) - f(x') - sum(attributions), ~0 when every
    nonlinearity has a rule; a ``CompletenessWarning`` names the ops that break it otherwise.
    Precision: when every op had a rule but the float32 gap exceeds ``COMPLETENESS_TOLERANCE`` (1e-3
    relative; huge logits, e.g. Captum's softmax test model at 3.1e5 where float32 steps by 0.03), the
    call is rerun on a float64 copy of the model (same weights) and extras["precision"] = "float64".
    """
    kinds = resolve_activations(activations, "deeplift")
    p = prepare(model, x, target, output=output, record=False)  # the paired pass below cannot reuse it
    refs = resolve_baseline(p.model, p.x, baseline, generator=make_generator(seed))
    attributions = torch.empty_like(p.x)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        return p.x[start:stop], refs[start:stop], p.targets[start:stop]

    def consume(start: int, stop: int, attr: Tensor) -> None:
        attributions[start:stop] = attr

    f_x, f_r, unsupported = _deeplift_pairs(p, p.x.shape[0], build, consume, kinds, output, batch_size, "deeplift")
    gap = _completeness("deeplift", attributions, f_x, f_r, unsupported, warn=False)
    if _needs_float64(p, gap, f_x, f_r, unsupported):
        wide = _float64_rerun(deeplift, p, "deeplift", baseline=_wide(refs), activations=activations,
                              output=output, batch_size=batch_size)
        if wide is not None:
            return wide
    gap = _completeness("deeplift", attributions, f_x, f_r, unsupported)
    params = {"baseline": _describe(baseline), "activations": _describe(activations), "output": output}
    extras = {"completeness_gap": gap, "baseline_scores": f_r, "scores": f_x, "unsupported_ops": dict(unsupported)}
    return explanation(p, attributions, "deeplift", params, extras)


@register("deeplift_shap", family="propagation", needs_grad=True,
          description="DeepLIFT-SHAP: DeepLIFT averaged over every reference of a background set (Lundberg & Lee, 2017)")
def deeplift_shap(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    background: Tensor | BaselineLike = "zeros", activations: str | Sequence[str] = "all",
    output: str = "logit", batch_size: int | None = None, seed: int | torch.Generator | None = None,
) -> Explanation:
    """DeepLIFT-SHAP (Captum's DeepLiftShap): the mean over references r of DeepLIFT(x, r).

    background: (M,C,H,W) reference images shared by all inputs (every one is used, no sampling),
    or any baseline form (one reference per image, M = 1). attributions (N,C,H,W), signed; they sum
    to f(x) - mean_r f(r): extras["completeness_gap"] (N,), extras["background_scores"] (N,).
    Precision: as ``deeplift`` (a float64 rerun when float32 rounding breaks completeness).
    """
    kinds = resolve_activations(activations, "deeplift")
    p = prepare(model, x, target, output=output, record=False)  # the paired pass below cannot reuse it
    refs = _background(p, background, seed)  # (N, M, C, H, W), a view for a shared set
    n, m = refs.shape[:2]
    total = torch.zeros_like(p.x)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.arange(start, stop, device=p.x.device)
        img, j = idx // m, idx % m  # image-major, as Captum's repeat_interleave
        return p.x[img], refs[img, j], p.targets[img]

    def consume(start: int, stop: int, attr: Tensor) -> None:
        total.index_add_(0, torch.arange(start, stop, device=p.x.device) // m, attr)

    f_x, f_r, unsupported = _deeplift_pairs(p, n * m, build, consume, kinds, output, batch_size, "deeplift_shap")
    attributions = total / m
    f_x, f_r = f_x.view(n, m)[:, 0], f_r.view(n, m).mean(1)
    gap = _completeness("deeplift_shap", attributions, f_x, f_r, unsupported, warn=False)
    if _needs_float64(p, gap, f_x, f_r, unsupported):
        shared = isinstance(background, Tensor) and background.dim() == 4
        own = _wide(refs[:, 0])  # one reference per image: passed as a callable, not as a shared set
        wide = _float64_rerun(deeplift_shap, p, "deeplift_shap",
                              background=_wide(refs[0]) if shared else (lambda _x: own),
                              activations=activations, output=output, batch_size=batch_size)
        if wide is not None:
            return wide
    gap = _completeness("deeplift_shap", attributions, f_x, f_r, unsupported)
    params = {"background": _describe(background), "activations": _describe(activations), "output": output}
    extras = {"completeness_gap": gap, "background_scores": f_r, "scores": f_x, "unsupported_ops": dict(unsupported)}
    return explanation(p, attributions, "deeplift_shap", params, extras)


def _wide(refs: Tensor) -> Tensor:
    """Resolved references for the float64 rerun (the draws of "uniform" etc. are kept, not redrawn)."""
    return refs.double().contiguous()


def _background(p: Prepared, background: Tensor | BaselineLike, seed: int | torch.Generator | None) -> Tensor:
    """References (N, M, C, H, W): a shared (M,C,H,W) set broadcast to every image, or one per image."""
    n = p.x.shape[0]
    if isinstance(background, Tensor) and background.dim() == 4:
        c, h, w = p.model.input_size
        bg = check_images(background, "background", channels=c, size=(h, w)).to(p.x.device, p.x.dtype).detach()
        return bg.unsqueeze(0).expand(n, *bg.shape)
    refs = resolve_baseline(p.model, p.x, background, name="background", generator=make_generator(seed))
    return refs.unsqueeze(1)


# --- Guided backprop and deconvnet -----------------------------------------------------------
class _RuleScorer:
    """The model with its forward run inside ``override_backward`` (the backward runs after): the
    same values, the rule's gradients. Passed to ``prepare(through=)`` so the clean pass is this one."""

    def __init__(self, model: Classifier, rule: Rule, kinds: frozenset[str], method: str) -> None:
        self.model, self.rule, self.kinds, self.method = model, rule, kinds, method
        self.net, self.layout = model.net, model.layout  # fast_layout reads these

    def __call__(self, x: Tensor) -> Tensor:
        with override_backward(self.rule, tuple(self.kinds), method=self.method):
            return self.model(x)

    def score(self, x: Tensor, targets: Tensor, output: str) -> Tensor:
        return target_scores(self(x), targets, output, binary=self.model.binary)


def _modified_gradients(p: Prepared, scorer: _RuleScorer, output: str, batch_size: int | None) -> Tensor:
    """The gradient of the explained score with the scorer's rule at its activations, (N,C,H,W)."""
    grads = torch.empty_like(p.x)

    def step(start: int, stop: int) -> None:
        grads[start:stop] = input_gradients(scorer, p.x[start:stop], p.targets[start:stop], output)[0]  # type: ignore[arg-type]

    map_batches(step, p.x.shape[0], batch_size=batch_size, grad=True, model=p.model,
                item_shape=p.model.input_size, consume=lambda *_: None, desc=scorer.method)
    return grads


@register("guided_backprop", family="propagation", needs_grad=True,
          description="Guided backpropagation: only positive gradients through active ReLUs (Springenberg et al., 2015)")
def guided_backprop(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    activations: str | Sequence[str] = ("relu", "relu6"), output: str = "logit", batch_size: int | None = None,
) -> Explanation:
    """Guided Backpropagation (Springenberg et al., 2015): attributions (N,C,H,W) = the gradient with
    relu(g * f'(a)) at each chosen activation (for ReLU: pass g where a > 0 and g > 0).

    activations: kinds given the rule. Default ReLU and ReLU6 (``nn.ReLU6`` / ``F.hardtanh``, e.g.
    efficientnet-lite); ``"captum"`` is ReLU only, as Captum, which hooks ``nn.ReLU`` modules alone.
    """
    scorer = _RuleScorer(model, guided_rule, resolve_activations(activations, "guided_backprop"), "guided_backprop")
    p = prepare(model, x, target, output=output, through=scorer)
    grads = _modified_gradients(p, scorer, output, batch_size)
    return explanation(p, grads, "guided_backprop", {"activations": _describe(activations), "output": output})


@register("deconvnet", family="propagation", needs_grad=True,
          description="Deconvnet: positive gradients only, whatever the ReLU's input (Zeiler & Fergus, 2014)")
def deconvnet(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    activations: str | Sequence[str] = ("relu", "relu6"), output: str = "logit", batch_size: int | None = None,
) -> Explanation:
    """Deconvnet (Zeiler & Fergus, 2014): attributions (N,C,H,W) = the gradient with relu(g) in place of
    each chosen activation's derivative. activations: as ``guided_backprop``."""
    scorer = _RuleScorer(model, deconvnet_rule, resolve_activations(activations, "deconvnet"), "deconvnet")
    p = prepare(model, x, target, output=output, through=scorer)
    grads = _modified_gradients(p, scorer, output, batch_size)
    return explanation(p, grads, "deconvnet", {"activations": _describe(activations), "output": output})


def _describe(value: object) -> object:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return list(value)
    return getattr(value, "__name__", value)
