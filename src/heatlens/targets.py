"""Turn every accepted form of ``target`` into one LongTensor of class indices, shape (N,)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor

from .validation import did_you_mean, is_integer

TargetLike = Union[str, int, Sequence[int], Sequence[str], Tensor, None]


def resolve_target(
    logits: Tensor,
    target: TargetLike,
    labels: Sequence[str] | None = None,
    name: str = "target",
) -> Tensor:
    """Resolve ``target`` against the model's ``logits`` (N,K) at the clean input.

    Accepted: ``"predicted"`` (argmax; ``None`` means the same), an int for every image, a
    per-image list/tuple/tensor of ints, a class name (or list of names) looked up in ``labels``.
    Returns a LongTensor (N,) on ``logits.device``.
    """
    n, num_classes = logits.shape
    if target is None or (isinstance(target, str) and target == "predicted"):
        return logits.argmax(dim=1)
    if isinstance(target, str):
        return torch.full((n,), _class_index(target, labels, name), dtype=torch.long, device=logits.device)
    if isinstance(target, bool):
        raise TypeError(f"{name} must be 'predicted', an int, a class name or a per-image sequence, got a bool")
    if is_integer(target):  # Python or NumPy integer (np.int64 from an array)
        idx = torch.full((n,), int(target), dtype=torch.long, device=logits.device)
    elif isinstance(target, np.ndarray):
        if not np.issubdtype(target.dtype, np.integer):
            raise TypeError(f"{name} must hold integer class indices, got a {target.dtype} array")
        idx = torch.as_tensor(target.reshape(-1), dtype=torch.long, device=logits.device)
        if idx.numel() == 1:
            idx = idx.expand(n).clone()
    elif isinstance(target, Tensor):
        if target.is_floating_point():
            raise TypeError(f"{name} must hold integer class indices, got a {target.dtype} tensor")
        idx = target.reshape(-1).to(device=logits.device, dtype=torch.long)
        if idx.numel() == 1:
            idx = idx.expand(n).clone()
    elif isinstance(target, Sequence):
        items = [_class_index(t, labels, name) if isinstance(t, str) else t for t in target]
        if not all(is_integer(t) for t in items):
            raise TypeError(f"{name} must be a sequence of ints or class names, got {list(target)!r}")
        idx = torch.tensor([int(t) for t in items], dtype=torch.long, device=logits.device)
    else:
        raise TypeError(
            f"{name} must be 'predicted', an int, a class name, a sequence or a LongTensor, got {type(target).__name__}"
        )
    if idx.numel() != n:
        raise ValueError(f"{name} has {idx.numel()} entries but x has {n} images")
    bad = (idx < 0) | (idx >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"{name} {int(idx[bad][0])} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return idx


def _class_index(label: str, labels: Sequence[str] | None, name: str) -> int:
    if labels is None:
        raise ValueError(f"{name}={label!r} is a class name but the model has no class labels; pass an int")
    lowered = [str(lab).lower() for lab in labels]
    key = label.lower()
    if key in lowered:
        return lowered.index(key)
    # ImageNet names come as "tabby, tabby cat": accept any comma-separated synonym
    for i, lab in enumerate(lowered):
        if key in (part.strip() for part in lab.split(",")):
            return i
    raise ValueError(f"{name}={label!r} is not a class name of this model.{did_you_mean(label, labels)}")
