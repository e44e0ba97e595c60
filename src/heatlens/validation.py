"""All input checks and their error texts live here, so every message names the argument.

Each check raises ``ValueError`` (wrong value or shape) or ``TypeError`` (wrong kind of object)
with the argument's name first, what was expected, and what was received.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' Did you mean: a, b?' for the closest valid names, or '' when none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""


def unknown_name(kind: str, name: str, choices: Sequence[str]) -> ValueError:
    """The error for an unknown method / metric / layer name, with suggestions."""
    shown = ", ".join(sorted(choices)[:40]) + (" ..." if len(choices) > 40 else "")
    return ValueError(f"unknown {kind} {name!r}.{did_you_mean(name, choices)} Valid {kind}s: {shown}")


def check_images(
    x: object,
    name: str = "x",
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """Check that ``x`` is a finite float (N,C,H,W) tensor matching the model's input.

    ``channels`` / ``size`` are the model's expected C and (H, W) when known. A tensor whose
    *last* axis has ``channels`` entries is reported as channels-last (NHWC) input.
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (N,C,H,W), got {type(x).__name__}; "
            "use model.preprocess(images) to turn images or arrays into one"
        )
    if x.dim() == 3:
        raise ValueError(
            f"{name} must have shape (N,C,H,W), got a 3-D tensor {tuple(x.shape)}; "
            f"add the batch axis with {name}.unsqueeze(0)"
        )
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N,C,H,W), got a {x.dim()}-D tensor {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; "
            "use model.preprocess(images) for uint8 images"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has 0 images")
    if channels is not None and x.shape[1] != channels:
        if x.shape[-1] == channels:
            raise ValueError(
                f"{name} looks channels-last (N,H,W,C) {tuple(x.shape)} but the model takes (N,C,H,W) "
                f"with C={channels}; pass {name}.permute(0, 3, 1, 2)"
            )
        raise ValueError(f"{name} has {x.shape[1]} channels but the model expects {channels}: shape {tuple(x.shape)}")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise ValueError(
            f"{name} has spatial size {tuple(x.shape[-2:])} but the model expects {tuple(size)}; "
            "use model.preprocess(images) to resize"
        )
    check_finite(x, name)
    return x


def check_finite(x: Tensor, name: str) -> Tensor:
    """Raise when ``x`` holds NaN or infinite values (they poison every attribution silently)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite values")
    return x


def is_integer(value: object) -> bool:
    """An integer, Python or NumPy (``np.int64(3)`` from an array counts), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_number(value: object) -> bool:
    """A finite real number, Python or NumPy, but not a bool (NaN and infinities are not numbers here)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"
            and math.isfinite(float(value)))


def check_outputs(logits: Tensor, where: str = "x") -> Tensor:
    """Raise when the model's own outputs are NaN or infinite: every score built on them would be too,
    and the fault is the model's (or the input's), not the explanation's."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(f"model outputs at {where} contain {bad} NaN or infinite values: "
                         "the model itself fails on this input (check its weights and x)")
    return logits


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """An integer hyperparameter such as ``steps`` or ``n_samples`` (NumPy integers accepted) -> int."""
    if not is_integer(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """A string option such as ``reduce`` or ``method``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.{did_you_mean(str(value), choices)}")
    return str(value)


def check_fraction(value: object, name: str, *, low: float = 0.0, high: float = 1.0) -> float:
    """A finite number in [low, high] (NaN is refused by name, not passed on)."""
    if not is_number(value) or not (low <= float(value) <= high):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_nonnegative(value: object, name: str, *, strict: bool = False) -> float:
    """A finite number >= 0 (> 0 when ``strict``), such as a noise level or a radius."""
    if not is_number(value) or float(value) < 0 or (strict and float(value) == 0):  # type: ignore[arg-type]
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]
