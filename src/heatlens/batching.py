"""The batching engine: the only place in heatlens with a loop over batches.

Every method and metric that evaluates many inputs (noise draws, path steps, occluded copies,
LIME perturbations, curve steps) describes *one batch* as ``step(start, stop)`` over a flat
range of ``n`` items and hands it to ``map_batches``. The engine

* picks the batch size for throughput (not the largest that fits: on a 2-core CPU a mid-sized
  batch of 8-16 224x224 images is fastest per image, larger ones get slower),
* recovers from out-of-memory errors by halving the batch and retrying the same items,
* runs under ``torch.inference_mode()`` unless gradients are needed,
* shows a progress bar on long runs (``set_progress(False)`` or ``HEATLENS_PROGRESS=0`` turns it off),
* concatenates the per-batch results, or hands each to a ``consume`` callback so that nothing but
  the running reduction is kept (memory constant in ``n``),
* keeps freed CPU memory in the process for the next batch (``tune_allocator``: glibc otherwise
  returns every large tensor's pages to the system and faults them in again on each batch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

BatchResult = Union[Tensor, Sequence[Tensor], None]

# Items per batch for a 3x224x224 input on CPU (DESIGN.md: forward+backward best at 8; forward-only
# occlusion ran 1.3x faster at 4-8 than at 16, docs/perturbation.md). Other sizes scale by element
# count so a 3x28x56 digit gets far larger batches.
_CPU_REFERENCE_ELEMENTS = 3 * 224 * 224
_CPU_GRAD_BATCH, _CPU_INFER_BATCH = 8, 8
_GPU_GRAD_BATCH, _GPU_INFER_BATCH = 64, 128
_MAX_BATCH = 1024

_progress_enabled = os.environ.get("HEATLENS_PROGRESS", "1") not in ("0", "false", "False", "")
_tuned: dict[tuple, int] = {}
_stats = {"batches": 0, "items": 0}
_forward_only_listeners: list[Callable[[], None]] = []


# glibc's mallopt parameters (malloc.h) and the value heatlens sets both to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_THRESHOLD = 1 << 30  # 1 GiB: every per-batch tensor of a 224x224 model stays in the heap
_allocator_state: bool | None = None  # None: not tried yet


def tune_allocator(enabled: bool | None = None) -> bool:
    """Make glibc keep freed memory for reuse instead of giving large blocks back to the system.

    By default glibc serves each allocation above its mmap threshold with fresh pages and unmaps
    them on free, so every batch's activations page-fault in anew: efficientnet-lite0 IG with 50
    steps took 2.7-2.9 s on 2 CPU cores, 1.6-1.8 s with the thresholds raised (docs/performance.md).
    The cost: the process keeps its peak heap (resident memory does not shrink after a large run).
    The engine calls this once, on its first run; ``HEATLENS_TUNE_ALLOCATOR=0`` or
    ``tune_allocator(False)`` beforehand leaves the allocator alone. Process-wide (it also speeds up
    any other library in the process). Returns whether the thresholds are set (False off glibc).
    """
    global _allocator_state
    if enabled is False:
        if _allocator_state is None:
            _allocator_state = False
        return bool(_allocator_state)
    if _allocator_state is not None:
        return _allocator_state
    _allocator_state = False
    if os.environ.get("HEATLENS_TUNE_ALLOCATOR", "1") in ("0", "false", "False") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _allocator_state = bool(mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR_THRESHOLD)
                            and mallopt(_M_TRIM_THRESHOLD, _ALLOCATOR_THRESHOLD))
    return _allocator_state


def on_forward_only(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever a forward-only run starts (``methods._autograd`` then releases the
    clean pass it recorded for reuse, so that memory holds one batch at most)."""
    _forward_only_listeners.append(listener)


def set_progress(enabled: bool) -> None:
    """Show (True) or hide (False) progress bars for long runs."""
    global _progress_enabled
    _progress_enabled = bool(enabled)


def progress_enabled() -> bool:
    return _progress_enabled


def set_batch_size(model: nn.Module | None, item_shape: Sequence[int], grad: bool, batch_size: int) -> None:
    """Pin the batch size the engine uses for ``model`` and items of ``item_shape`` (e.g. after tuning)."""
    _tuned[_key(model, item_shape, grad)] = int(batch_size)


def default_batch_size(
    model: nn.Module | None = None,
    item_shape: Sequence[int] = (3, 224, 224),
    *,
    grad: bool = False,
    device: torch.device | str | None = None,
) -> int:
    """The batch size used when a caller passes ``batch_size=None``.

    A size pinned by ``set_batch_size`` (benchmarks tune and cache one per model and input size)
    wins; otherwise the measured CPU optimum for 224x224 scaled by the item's element count.
    """
    tuned = _tuned.get(_key(model, item_shape, grad))
    if tuned is not None:
        return tuned
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "cuda":
        base = _GPU_GRAD_BATCH if grad else _GPU_INFER_BATCH
    else:
        base = _CPU_GRAD_BATCH if grad else _CPU_INFER_BATCH
    elements = max(1, math.prod(int(s) for s in item_shape))  # no tensor: this runs on every call
    scaled = base * max(1.0, _CPU_REFERENCE_ELEMENTS / elements) ** 0.75
    return int(max(1, min(_MAX_BATCH, scaled)))


def map_batches(
    step: Callable[[int, int], BatchResult],
    n: int,
    *,
    batch_size: int | None = None,
    grad: bool = False,
    model: nn.Module | None = None,
    item_shape: Sequence[int] = (3, 224, 224),
    consume: Callable[[int, int, Any], None] | None = None,
    desc: str | None = None,
) -> Any:
    """Evaluate ``step(start, stop)`` over ``range(n)`` in batches.

    step: builds and evaluates items ``[start, stop)``; returns a Tensor (B,...), a tuple of them, or None.
    n: number of items. grad: run with autograd enabled (otherwise ``inference_mode``).
    model / item_shape: let the engine pick the batch size when ``batch_size`` is None.
    consume: when given, called as ``consume(start, stop, result)`` after each batch and nothing is
    kept (constant memory); otherwise the results are concatenated along dim 0 and returned.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if _allocator_state is None:
        tune_allocator()
    if not grad:
        for listener in _forward_only_listeners:
            listener()
    size = batch_size if batch_size is not None else default_batch_size(model, item_shape, grad=grad)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    size = min(size, n)
    results: list[Any] = []
    bar = _progress_bar(n, size, desc)
    start = 0
    try:
        while start < n:
            stop = min(n, start + size)
            try:
                with (torch.enable_grad() if grad else torch.inference_mode()):
                    out = step(start, stop)
            except Exception as err:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not _is_oom(err) or size == 1:
                    raise
                size = max(1, size // 2)  # halve and retry the same items
                _empty_cache()
                continue
            _stats["batches"] += 1
            _stats["items"] += stop - start
            if consume is not None:
                consume(start, stop, out)
            elif out is not None:
                results.append(out)
            if bar is not None:
                bar.update(stop - start)
            start = stop
    finally:
        if bar is not None:
            bar.close()
    if consume is not None or not results:
        return None
    return _concat(results)


def call_stats() -> dict[str, int]:
    """Counters of batches and items evaluated since import (tests use them to prove batching)."""
    return dict(_stats)


def _concat(results: list[Any]) -> Any:
    first = results[0]
    if isinstance(first, Tensor):
        return torch.cat(results, 0)
    if isinstance(first, (tuple, list)):
        return type(first)(torch.cat([r[i] for r in results], 0) for i in range(len(first)))
    raise TypeError(f"step must return a Tensor, a tuple of Tensors or None, got {type(first).__name__}")


def _key(model: nn.Module | None, item_shape: Sequence[int], grad: bool) -> tuple:
    return (id(model) if model is not None else None, tuple(int(s) for s in item_shape), bool(grad))


def _model_device(model: nn.Module | None) -> torch.device:
    if model is None:
        return torch.device("cpu")
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and ("out of memory" in text or isinstance(err, MemoryError))


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress_bar(n: int, size: int, desc: str | None):
    # only worth a bar when there are several batches of real work
    if not _progress_enabled or n <= size * 4:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=n, desc=desc or "heatlens", unit="it", leave=False)
