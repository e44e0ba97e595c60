"""Input invariance (Kindermans et al., 2019): a constant shift of the input, absorbed by the first
layer's bias, gives a model that computes exactly the same function; a reliable explanation of that
model at the shifted input equals the original one. Saliency passes, gradient x input does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..explanation import Explanation, SanityResult
from ..methods._autograd import prepare
from ..methods.registry import get_method
from ..models.adapter import Classifier
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


class ShiftPad(nn.Module):
    """Pad with the shift value instead of zeros: F.pad(x - shift) + shift, so the shifted input's
    border sees the same (shifted) zeros as the original and the bias compensation stays exact."""

    def __init__(self, shift: Tensor, padding: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("shift", shift)
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        shift = self.shift.to(x.dtype)  # a bfloat16 model must not be promoted to float32 here
        return F.pad(x - shift, (pw, pw, ph, ph)) + shift


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        raise ValueError(f"input_invariance cannot compensate padding={conv.padding!r}; use explicit padding")
    return (int(conv.padding[0]), int(conv.padding[1]))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def shift_compensated(model: Classifier, x: Tensor, shift: Tensor) -> Classifier:
    """A deep copy of ``model`` with f'(x + shift) = f(x): the first layer's bias absorbs W * shift.

    shift: (1,C,1,1) in model space. Zero-padded convolutions get a ``ShiftPad`` so borders match too.
    """
    clf = copy.deepcopy(model)
    name, layer = first_layer(clf, x)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            flat = shift.expand(1, *x.shape[1:]).reshape(-1)
            if flat.numel() != layer.in_features:
                raise ValueError(f"first Linear layer {name!r} takes {layer.in_features} features, "
                                 f"not the flattened image ({flat.numel()})")
            response = layer.weight @ flat.to(layer.weight)
        else:
            kh = layer.dilation[0] * (layer.kernel_size[0] - 1) + 1
            kw = layer.dilation[1] * (layer.kernel_size[1] - 1) + 1
            patch = shift.to(layer.weight).expand(1, -1, kh, kw)
            response = F.conv2d(patch, layer.weight, dilation=layer.dilation, groups=layer.groups).reshape(-1)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(response), requires_grad=False)
        layer.bias.sub_(response)
    if isinstance(layer, nn.Conv2d) and _conv_padding(layer) != (0, 0):
        if layer.padding_mode != "zeros":
            return clf  # reflect / replicate padding of a constant shift is the shift itself: exact already
        padding = _conv_padding(layer)
        layer.padding = (0, 0)
        _set_module(clf, name, nn.Sequential(ShiftPad(shift.to(x), padding), layer))
    return clf


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
    batch_size: int | None = None,
    **method_kwargs: Any,
) -> SanityResult:
    """Input invariance test (Kindermans et al., 2019).

    Explains (model, x) and (shift-compensated copy, x + shift) for the same targets and compares the
    attributions. table: per image ``relative_difference`` = ||a - a'|| / ||a||, ``max_abs_difference``
    and ``logit_gap`` (how exactly the copy reproduces the model: ~1e-6). passed: every relative
    difference below ``tolerance``. extras: "shift" (1,C,1,1), "attributions" / "shifted_attributions".
    """
    p = prepare(model, x, target)
    delta = _shift(p.model, p.x, shift)
    shifted_model = shift_compensated(p.model, p.x, delta)
    shifted_x = p.x + delta
    with torch.inference_mode():
        gap = (shifted_model(shifted_x) - p.logits).abs().flatten(1).amax(1)
    fn = get_method(method)
    a = fn(p.model, p.x, p.targets, batch_size=batch_size, **method_kwargs).attributions.double()
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
                        verdict=verdict, params={"tolerance": tolerance, **method_kwargs},
                        extras={"shift": delta.cpu(), "attributions": a.float().cpu(),
                                "shifted_attributions": b.float().cpu()})
