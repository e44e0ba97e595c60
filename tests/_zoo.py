"""A zoo of the model patterns users bring, and a fingerprint that proves a model was left as it was.

``ZOO[name]()`` builds a fresh ``ZooModel``: what the user has (``model``: an nn.Module or a predict
function), the ``wrap`` keyword arguments it needs (``hl.wrap(model, **wrap)``), an input ``x`` and
the torch module to fingerprint (``net``). Add a pattern by adding a builder (e.g. a Hugging Face ViT
from a config); the contract tests in ``test_model_zoo.py`` pick it up for every method, metric
and sanity check.

``model_fingerprint(net)`` / ``assert_unchanged(net, before)``: state_dict tensors (exact), every
module's ``training``, every parameter's ``requires_grad`` and ``.grad``, every hook dict (forward,
forward-pre, backward, full backward, state-dict hooks, the global ones), ReLU ``inplace`` and each
module's attribute names (a patched ``forward`` shows up there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIZE = 8  # every zoo model takes 8x8 images: the whole contract table runs in seconds
CLASSES = 3


@dataclass
class ZooModel:
    """model: what the user has; wrap: kwargs for ``hl.wrap(model, **wrap)``; x: (2,C,8,8);
    net: the torch module behind it (fingerprinted); differentiable: gradient methods apply."""

    model: Any
    wrap: dict[str, Any]
    x: Tensor
    net: nn.Module
    differentiable: bool = True
    notes: dict[str, Any] = field(default_factory=dict)


def _init(net: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net.eval()


def _x(channels: int = 3, seed: int = 4, dtype: torch.dtype = torch.float32) -> Tensor:
    return (torch.rand(2, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


def _cnn(channels: int = 3, classes: int = CLASSES) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))


class ViewNet(nn.Module):
    """Flattens a conv's activation with ``h.view(N, -1)``: fails on channels-last activations."""

    def __init__(self, channels: int = 3, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * SIZE * SIZE, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


class TupleNet(nn.Module):
    """Returns ``(aux, logits)`` (an auxiliary head first, as Inception/GoogLeNet do in training)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _cnn(classes=CLASSES)
        self.aux = nn.Linear(3 * SIZE * SIZE, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.aux(x.flatten(1)), self.body(x)


class DictNet(TupleNet):
    """Returns a dict without a "logits" key (a detection-style head)."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        aux, scores = super().forward(x)
        return {"aux": aux, "scores": scores}


@dataclass
class Output:
    """A Hugging Face style output object: ``.logits`` plus other fields."""

    logits: Tensor
    hidden: Tensor


class LogitsObjectNet(TupleNet):
    def forward(self, x: Tensor) -> Output:  # type: ignore[override]
        aux, scores = super().forward(x)
        return Output(logits=scores, hidden=aux)


class TrainModeNet(nn.Module):
    """Conv, BatchNorm, ReLU, Dropout: left in ``.train()`` by its user."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1)))


class ResidualNet(nn.Module):
    """One ReLU module used twice, a skip connection and a functional ``F.relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.conv1(x))
        h = self.relu(self.conv2(h) + h)
        return self.fc(F.relu(h).mean((2, 3)))


def view_net() -> ZooModel:
    net = _init(ViewNet(), 10)
    return ZooModel(net, {"input_size": (3, SIZE, SIZE)}, _x(), net)


def grayscale() -> ZooModel:
    net = _init(_cnn(channels=1), 11)
    return ZooModel(net, {"input_size": (1, SIZE, SIZE)}, _x(1), net)


def binary_head() -> ZooModel:
    net = _init(_cnn(classes=1), 12, scale=1.0)
    return ZooModel(net, {"input_size": (3, SIZE, SIZE)}, _x(), net)


def tuple_output() -> ZooModel:
    net = _init(TupleNet(), 13)
    return ZooModel(net, {"input_size": (3, SIZE, SIZE), "select": 1}, _x(), net)


def dict_output() -> ZooModel:
    net = _init(DictNet(), 13)
    return ZooModel(net, {"input_size": (3, SIZE, SIZE), "select": "scores"}, _x(), net)


def logits_object() -> ZooModel:
    net = _init(LogitsObjectNet(), 13)
    return ZooModel(net, {"input_size": (3, SIZE, SIZE)}, _x(), net)


def float64() -> ZooModel:
    net = _init(_cnn(), 14).double()
    return ZooModel(net, {"input_size": (3, SIZE, SIZE)}, _x(), net)


def bfloat16() -> ZooModel:
    net = _init(_cnn(), 14).to(torch.bfloat16)
    return ZooModel(net, {"input_size": (3, SIZE, SIZE)}, _x(), net)


def train_mode() -> ZooModel:
    net = _init(TrainModeNet(), 15).train()
    with torch.no_grad():
        net.bn.running_var.fill_(1.0)  # a BatchNorm with sane statistics (random init gives negative var)
        net.bn.weight.abs_()
    return ZooModel(net, {"input_size": (3, SIZE, SIZE)}, _x(), net)


def residual() -> ZooModel:
    net = _init(ResidualNet(), 16)
    return ZooModel(net, {"input_size": (3, SIZE, SIZE)}, _x(), net)


def black_box_binary() -> ZooModel:
    """A numpy predict function returning (N,) logits of the positive class."""
    net = _init(_cnn(classes=1), 17, scale=1.0)

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(batch)).reshape(-1).numpy()

    return ZooModel(predict, {"input_size": (3, SIZE, SIZE)}, _x(), net, differentiable=False)


def _hf(kind: str) -> ZooModel:
    """A tiny randomly initialised Hugging Face classifier (8x8 input, 2x2 patches) built from its config;
    notes["attention"]: it has global self-attention (the transformer methods apply)."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(image_size=SIZE, patch_size=2, num_labels=CLASSES)
    if kind == "swin":
        net = T.SwinForImageClassification(T.SwinConfig(**common, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                                        window_size=2))
    else:
        config = dict(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
        net = (T.ViTForImageClassification(T.ViTConfig(**config)) if kind == "vit"
               else T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**config)))
    return ZooModel(net.eval(), {}, _x(), net, notes={"attention": kind != "swin"})


def _hf_patterns() -> dict[str, Callable[[], ZooModel]]:
    try:
        import transformers  # noqa: F401
    except ImportError:  # the hf extra is not installed: the zoo runs without these patterns
        return {}
    return {f"hf_{kind}": (lambda kind=kind: _hf(kind)) for kind in ("vit", "deit", "swin")}


ZOO: dict[str, Callable[[], ZooModel]] = {
    "view_net": view_net,
    "grayscale": grayscale,
    "binary_head": binary_head,
    "tuple_output": tuple_output,
    "dict_output": dict_output,
    "logits_object": logits_object,
    "float64": float64,
    "bfloat16": bfloat16,
    "train_mode": train_mode,
    "residual": residual,
    "black_box_binary": black_box_binary,
    **_hf_patterns(),  # ViT, DeiT (distillation token), Swin (windowed attention): models/hf.py
}


# --- the model left as it was ------------------------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def model_fingerprint(net: nn.Module) -> dict[str, Any]:
    """Everything heatlens could change on ``net``, as comparable values (tensors cloned)."""
    from torch.nn.modules import module as torch_module

    modules = dict(net.named_modules())
    return {
        "state": {k: v.detach().clone() for k, v in net.state_dict(keep_vars=True).items()},
        "dtypes": {k: v.dtype for k, v in net.state_dict().items()},
        "training": {n: m.training for n, m in modules.items()},
        "requires_grad": {n: p.requires_grad for n, p in net.named_parameters()},
        "grads": {n: p.grad is None for n, p in net.named_parameters()},
        "hooks": {n: {h: list(getattr(m, h, {}) or {}) for h in _HOOK_DICTS} for n, m in modules.items()},
        "full_backward": {n: getattr(m, "_is_full_backward_hook", None) for n, m in modules.items()},
        "global_hooks": {h: list(getattr(torch_module, h, {}) or {}) for h in _GLOBAL_HOOKS},
        "inplace": {n: getattr(m, "inplace", None) for n, m in modules.items()},
        "attributes": {n: sorted(vars(m)) for n, m in modules.items()},
        "forward": {n: type(m).forward for n, m in modules.items()},
        "fastpath": torch.backends.mha.get_fastpath_enabled(),
    }


def assert_unchanged(net: nn.Module, before: dict[str, Any]) -> None:
    """Fail naming what changed on ``net`` since ``before = model_fingerprint(net)``."""
    after = model_fingerprint(net)
    for key in before:
        if key == "state":
            assert before["state"].keys() == after["state"].keys(), "state_dict keys changed"
            for name, t in before["state"].items():
                assert torch.equal(t, after["state"][name]), f"state_dict[{name!r}] changed"
        else:
            assert before[key] == after[key], f"model {key} changed: {before[key]} -> {after[key]}"
