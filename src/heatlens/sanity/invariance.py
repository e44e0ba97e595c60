"""Input invariance (Kindermans et al., 2019): a constant shift of the input, absorbed by the first
layer's bias, gives a model that computes exactly the same function; a reliable explanation of that
model at the shifted input equals the original one. Saliency passes, gradient x input does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..explanation import Explanation, SanityResult
from ..methods._autograd import prepare
from ..methods.registry import get_method
from ..models.adapter import Classifier
from ..validation import check_nonnegative
from .randomization import method_name


def first_layer(model: Classifier, x: Tensor) -> tuple[str, nn.Module]:
    """The first Conv2d or Linear the input reaches (found by running one image with hooks)."""
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_pre_hook(lambda _m, _i, name=name: order.append(name)))
    try:
        with torch.inference_mode():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("input_invariance needs a model whose first layer is an nn.Conv2d or nn.Linear")
    name = order[0]
    return name, dict(model.named_modules())[name]


def input_layers(model: Classifier, x: Tensor) -> list[str]:
    """Every Conv2d / Linear fed the input itself (its storage: flatten views included), e.g. a main
    body and an auxiliary head; the first layer reached when none is (the copy is then checked)."""
    seen: list[str] = []
    handles = []
    probe = x[:1].clone()
    ptr = probe.untyped_storage().data_ptr()

    def hook(_m, inputs, name):
        if inputs and isinstance(inputs[0], Tensor) and inputs[0].untyped_storage().data_ptr() == ptr:
            seen.append(name)

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_pre_hook(lambda _m, i, name=name: hook(_m, i, name)))
    try:
        with torch.inference_mode():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(seen)) or [first_layer(model, x)[0]]


class BiasMap(nn.Module):
    """``layer(x) - offset``: the first layer with its response to the input shift taken off.

    offset (1,K,h,w) is one constant per output position, i.e. a bias that is not the same at every
    position: the shift meets the layer's zero padding (``padding=``, or TensorFlow-"SAME" ``F.pad``
    inside a custom forward) only near the borders, so there the response differs from W * shift."""

    def __init__(self, layer: nn.Module, offset: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("offset", offset)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x) - self.offset.to(x.dtype)  # a bfloat16 model must not be promoted


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def _response(layer: nn.Module, shift: Tensor, item_shape: tuple[int, ...]) -> Tensor:
    """layer(shift) - layer(0) on one image (1,K,h,w) or (1,K): what the shift adds to the layer's
    output. Exact for any affine layer, whatever its padding does at the borders."""
    probe = shift.to(next(layer.parameters())).expand(1, *item_shape)
    if isinstance(layer, nn.Linear):
        probe = probe.reshape(1, -1)
        if probe.shape[1] != layer.in_features:
            raise ValueError(f"first Linear layer takes {layer.in_features} features, "
                             f"not the flattened image ({probe.shape[1]})")
    with torch.no_grad():
        return (layer(probe) - layer(torch.zeros_like(probe))).double()


def shift_compensated(model: Classifier, x: Tensor, shift: Tensor) -> Classifier:
    """A deep copy of ``model`` with f'(x + shift) = f(x) exactly (Kindermans et al., 2019).

    shift: (1,C,1,1) in model space. The first layer's response to the shift, layer(shift) - layer(0),
    is subtracted after it: folded into the bias where it is the same at every output position (a
    Linear layer, an unpadded convolution: the paper's b - W * shift), else kept as one constant per
    output position (``BiasMap``), which is what a zero-padded convolution needs at its borders.
    Raises ValueError when the copy does not reproduce the model's logits (the first layer does not
    see the input directly, e.g. a normalisation before it): an inexact copy would blame the method.
    """
    clf = copy.deepcopy(model)
    for name in input_layers(clf, x):
        _compensate(clf, name, shift, tuple(x.shape[1:]))
    _check_exact(model, clf, x, shift)
    return clf


def _compensate(clf: nn.Module, name: str, shift: Tensor, item_shape: tuple[int, ...]) -> None:
    """Subtract layer ``name``'s response to the shift after it (in the bias where exact, else a BiasMap)."""
    layer = dict(clf.named_modules())[name]
    response = _response(layer, shift, item_shape)
    per_channel = response.flatten(2).mean(2) if response.dim() > 2 else response  # (1,K)
    spread = (response - (per_channel[..., None, None] if response.dim() > 2 else per_channel)).abs().max()
    constant = bool(spread <= 1e-7 * response.abs().max().clamp_min(1.0))
    with torch.no_grad():
        if constant:
            offset = per_channel.reshape(-1).to(layer.weight)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(offset), requires_grad=False)
            layer.bias.sub_(offset)
        else:
            _set_module(clf, name, BiasMap(layer, response.to(layer.weight)))


COMPENSATION_TOLERANCE = 1e-4  # largest logit gap of the copy, relative to the largest |logit|


def _check_exact(model: Classifier, shifted: Classifier, x: Tensor, shift: Tensor) -> None:
    with torch.inference_mode():
        want = model(x).double()
        got = shifted(x + shift).double()
    gap = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not gap <= COMPENSATION_TOLERANCE * scale:
        raise ValueError(
            f"input_invariance cannot build an exactly shift-compensated copy of this model: its logits "
            f"miss the original's by {gap:.3g} (the first layer must be a Conv2d or Linear that sees the "
            "input directly, with nothing non-linear before it)")


def _shift(model: Classifier, x: Tensor, shift: float | Tensor | None) -> Tensor:
    """(1,C,1,1) shift: default minus half the valid input range per channel (Kindermans et al. move
    [0, 1] pixels to [-1, 0])."""
    c = x.shape[1]
    if shift is None:
        low, high = model.input_range
        return (-(high - low) / 2).to(x).reshape(1, c, 1, 1)
    value = torch.as_tensor(shift, dtype=x.dtype, device=x.device)
    if value.numel() not in (1, c):
        raise ValueError(f"shift must be a number or one value per channel ({c}), got {tuple(value.shape)}")
    return value.reshape(1, -1, 1, 1).expand(1, c, 1, 1).clone()


def input_invariance(
    model: Any,
    x: Tensor,
    method: str | Callable[..., Explanation] = "saliency",
    target: Any = "predicted",
    *,
    shift: float | Tensor | None = None,
    tolerance: float = 1e-3,
    dtype: torch.dtype | None = torch.float64,
    batch_size: int | None = None,
    **method_kwargs: Any,
) -> SanityResult:
    """Input invariance test (Kindermans et al., 2019).

    Explains (model, x) and (shift-compensated copy, x + shift) for the same targets and compares the
    attributions. table: per image ``relative_difference`` = ||a - a'|| / ||a||, ``max_abs_difference``
    and ``logit_gap`` (how exactly the copy reproduces the model: ~1e-6, refused above 1e-4 relative;
    padded convolutions included, see ``shift_compensated``). passed: every relative
    difference below ``tolerance``. extras: "shift" (1,C,1,1), "attributions" / "shifted_attributions".
    dtype: both models are explained as copies in this dtype (default float64; None keeps the
    model's). Why: in float32 the rounding of x + shift alone flips ReLU6 units of efficientnet-lite0
    and moves its saliency by 0.2-3% (as much as a 1e-7 input perturbation does), so the float32
    verdict would measure rounding; in float64 the compensated copy's saliency is identical.
    """
    tolerance = check_nonnegative(tolerance, "tolerance", strict=True)
    p = prepare(model, x, target)
    base, xb = p.model, p.x
    if dtype is not None and dtype != p.x.dtype:
        base, xb = copy.deepcopy(p.model).to(dtype), p.x.to(dtype)
    delta = _shift(base, xb, shift)
    shifted_model = shift_compensated(base, xb, delta)
    shifted_x = xb + delta
    with torch.inference_mode():
        gap = (shifted_model(shifted_x) - base(xb)).abs().flatten(1).amax(1)
    fn = get_method(method)
    a = fn(base, xb, p.targets, batch_size=batch_size, **method_kwargs).attributions.double()
    b = fn(shifted_model, shifted_x, p.targets, batch_size=batch_size, **method_kwargs).attributions.double()
    diff = (a - b).flatten(1)
    relative = diff.norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-30)
    rows = [{"image": i, "relative_difference": float(relative[i]), "max_abs_difference": float(diff[i].abs().max()),
             "logit_gap": float(gap[i])} for i in range(p.x.shape[0])]
    passed = bool((relative < tolerance).all())
    worst = float(relative.max())
    verdict = (f"{method_name(method)}: attributions of the shift-compensated model differ by up to "
               f"{worst:.2g} (relative); " + ("input invariant" if passed
                                              else f"above {tolerance:g}: the explanation follows the input shift, "
                                                   "not the function"))
    return SanityResult(name="input_invariance", method=method_name(method), table=rows, passed=passed,
                        verdict=verdict, params={"tolerance": tolerance, "dtype": str(dtype), **method_kwargs},
                        extras={"shift": delta.cpu(), "attributions": a.float().cpu(),
                                "shifted_attributions": b.float().cpu()})
