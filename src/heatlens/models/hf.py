"""Hugging Face ``transformers`` image classifiers (``...ForImageClassification``) as Classifiers.

``wrap_hf(model)`` reads what heatlens needs from the model's own config: the input size
(``image_size``, ``num_channels``), class names (``id2label``), how many leading tokens are not
patches (class, distillation and register tokens: CAMs and the transformer methods drop them) and,
for Swin, how windowed layers map back to the image. Preprocessing follows the image processor's
saved configuration (``preprocessor_config.json``: size, crop, mean/std, resample), done with
heatlens' own torch code (``Preprocessing``): the processor classes are not needed.
``load_hf(folder)`` loads a folder written by ``save_pretrained`` offline (``local_files_only``).

``eager_attention(net)`` and ``attention_layers(net)`` let the transformer methods read attention
probabilities: a model loaded with ``attn_implementation="sdpa"`` (the default) runs with eager
attention inside the block (same maths, probabilities materialised) and gets its setting back after.
transformers is imported only by ``load_hf``; nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import Classifier, _check_input_size
from .preprocessing import Preprocessing

# PIL resampling codes used in Hugging Face processor configs -> heatlens' torch resampling
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "bicubic", 4: "bilinear", 5: "bicubic"}
_HEADS = ("ForImageClassification", "ForImageClassificationWithTeacher")


def is_hf_model(obj: object) -> bool:
    """True for a ``transformers`` ``PreTrainedModel`` (checked without importing transformers)."""
    return isinstance(obj, nn.Module) and any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.") for cls in type(obj).__mro__)


def wrap_hf(
    model: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    preprocessing: Preprocessing | dict | Any | None = None,
    name: str | None = None,
) -> Classifier:
    """A ``transformers`` image classifier -> Classifier (logits from the output's ``.logits``).

    preprocessing: a heatlens ``Preprocessing``, an image processor (anything with ``to_dict()``) or
    its config dict; None reads ``preprocessor_config.json`` beside the model's ``name_or_path``
    when that is a local folder, else the ViT processor's defaults (resize to the input size,
    mean = std = 0.5). input_size / labels default to the config's.
    """
    kind = type(model).__name__
    if not kind.endswith(_HEADS):
        raise TypeError(
            f"heatlens.wrap takes transformers image classifiers (...ForImageClassification), got {kind}; "
            "for other models wrap an nn.Module that maps (N,C,H,W) pixels to logits"
        )
    config = model.config
    size = _check_input_size(input_size) if input_size is not None else _config_input_size(config)
    if labels is None and getattr(config, "id2label", None):
        labels = [str(config.id2label[i]) for i in sorted(config.id2label)]
    if not isinstance(preprocessing, Preprocessing):
        settings = _processor_settings(preprocessing, getattr(config, "name_or_path", "") or "")
        preprocessing = processor_preprocessing(settings, size)
    clf = Classifier(model, input_size=size, labels=labels, preprocessing=preprocessing, outputs="logits",
                     name=name or getattr(config, "name_or_path", None) or kind)
    clf.token_prefix = prefix_tokens(model)  # read by the CAM token layouts and the transformer methods
    clf.layer_layouts = window_layouts(model)
    return clf


def load_hf(path: str | os.PathLike, device: str | torch.device | None = None) -> Classifier:
    """A folder saved with ``save_pretrained`` (config.json + weights [+ preprocessor_config.json]) ->
    Classifier, loaded offline (``local_files_only=True``)."""
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise ImportError("loading Hugging Face models needs transformers: pip install 'heatlens[hf]'") from None
    folder = Path(path)
    net = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
    net = net.to(torch.device(device) if device is not None else "cpu").eval()
    return wrap_hf(net, name=folder.name)


# --- what the config says ----------------------------------------------------------------------
def _config_input_size(config: Any) -> tuple[int, int, int]:
    side = getattr(config, "image_size", None)
    if side is None:
        raise ValueError(f"the model's config ({type(config).__name__}) has no image_size; pass input_size=(C, H, W)")
    h, w = (side, side) if isinstance(side, int) else tuple(side)[-2:]
    return _check_input_size((getattr(config, "num_channels", 3), h, w))


def prefix_tokens(model: nn.Module) -> int:
    """Leading tokens that are not patches: the embeddings' learned class / distillation / register
    tokens (parameters (1, k, D) named ``*_token(s)``; the mask token of masked modelling excluded)."""
    count = 0
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if ".embeddings." in f".{name}" and leaf.endswith(("token", "tokens")) and leaf != "mask_token" and p.dim() == 3:
            count += p.shape[1]
    return count


def _processor_settings(given: Any, name_or_path: str) -> dict:
    if given is None:
        saved = Path(name_or_path) / "preprocessor_config.json" if name_or_path else None
        return json.loads(saved.read_text(encoding="utf-8")) if saved is not None and saved.is_file() else {}
    if isinstance(given, dict):
        return given
    if hasattr(given, "to_dict"):
        return given.to_dict()
    raise TypeError(
        "preprocessing must be a heatlens Preprocessing, an image processor or its config dict, "
        f"got {type(given).__name__}"
    )


def processor_preprocessing(settings: dict, input_size: Sequence[int]) -> Preprocessing:
    """A Hugging Face image processor's config (``to_dict()`` / preprocessor_config.json) -> Preprocessing.

    Reads do_resize/size ({height, width} or {shortest_edge}), crop_pct, do_center_crop/crop_size,
    resample (PIL codes), do_normalize/image_mean/image_std. The final size must be the model's.
    """
    c, h, w = input_size
    resample = settings.get("resample", 2)
    resample = _RESAMPLE.get(int(getattr(resample, "value", resample)), "bilinear")
    resize: int | tuple[int, int] | None = None
    size = settings.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if settings.get("do_resize", True) and size:
        if "shortest_edge" in size:
            short = int(size["shortest_edge"])
            resize = int(short / settings["crop_pct"]) if settings.get("crop_pct") and short < 384 else short
        elif "height" in size:
            resize = (int(size["height"]), int(size["width"]))
    crop = settings.get("crop_size") if settings.get("do_center_crop") else None
    final = (int(crop["height"]), int(crop["width"])) if crop else resize if isinstance(resize, tuple) else None
    if final is not None and final != (h, w):
        raise ValueError(
            f"the image processor produces {final[0]}x{final[1]} images but the model takes {h}x{w}; "
            "pass input_size= or preprocessing= to match"
        )
    if resize == (h, w):
        resize = None  # straight to the model's size
    normalize = settings.get("do_normalize", True)
    mean = tuple(settings.get("image_mean", (0.5,) * c)) if normalize else (0.0,) * c
    std = tuple(settings.get("image_std", (0.5,) * c)) if normalize else (1.0,) * c
    return Preprocessing(size=(h, w), resize=resize, mean=mean, std=std, channels=c, resample=resample)


# --- Swin: windowed layers back on the image -----------------------------------------------------
def window_layouts(model: nn.Module) -> dict[str, Callable[[Tensor], Any]]:
    """Layer name -> ``f(output) -> Layout`` for layers whose outputs are windows (B*nW, ws*ws, C):
    the attention inside each Swin block and its sublayers. Read lazily, after a forward, because
    Swin sets its window and shift per input resolution inside ``forward``."""
    layouts: dict[str, Callable[[Tensor], Any]] = {}
    for name, block in model.named_modules():
        if not all(hasattr(block, a) for a in ("window_size", "shift_size", "input_resolution", "attention")):
            continue
        for sub, _ in block.attention.named_modules():
            layouts[f"{name}.attention{'.' + sub if sub else ''}"] = _window_layout(block)
    return layouts


def _window_layout(block: nn.Module) -> Callable[[Tensor], Any]:
    def layout(_out: Tensor) -> Any:
        from ..methods.cam import Layout

        grid = tuple(int(s) for s in block.input_resolution)
        return Layout("windows", grid, window=int(block.window_size), shift=int(block.shift_size))

    return layout


# --- attention probabilities ----------------------------------------------------------------------
def attention_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules whose output tuple carries the attention probabilities (B,H,T,T)
    as its second element, in definition order (the model's ``_can_record_outputs["attentions"]``)."""
    records = getattr(type(net), "_can_record_outputs", None) or {}
    spec = records.get("attentions")
    target = getattr(spec, "target_class", spec)
    if not isinstance(target, type) or getattr(spec, "index", 1) != 1:
        return []
    return [(name, m) for name, m in net.named_modules() if isinstance(m, target)]


@contextmanager
def eager_attention(net: nn.Module) -> Iterator[None]:
    """Run ``net`` with eager attention inside the block (the softmax probabilities are then materialised
    and returned by each attention layer), restoring every config's own implementation in ``finally``."""
    configs = {}
    for m in net.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs[id(config)] = config
    saved = {key: c._attn_implementation_internal for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation_internal = "eager"
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation_internal = saved[key]
