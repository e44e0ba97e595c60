"""The batching engine: the only place in heatlens with a loop over batches.

Every method and metric that evaluates many inputs (noise draws, path steps, occluded copies,
LIME perturbations, curve steps) describes *one batch* as ``step(start, stop)`` over a flat
range of ``n`` items and hands it to ``map_batches``. The engine

* picks the batch size for throughput (not the largest that fits: on a 2-core CPU a mid-sized
  batch of 8-16 224x224 images is fastest per image, larger ones get slower) by *measuring* it:
  the first batches of a job for a new (model, item shape, gradient or not, device, threads) run at
  sizes 4, 8, 16, ... (real work, nothing thrown away), the fastest per item is kept for the process
  (and on disk with ``HEATLENS_BATCH_CACHE=path.json``), keyed by a fingerprint of the model's
  architecture, so the cache holds no model,
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
import hashlib
import json
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

from .validation import is_integer

BatchResult = Union[Tensor, Sequence[Tensor], None]

# Items per batch for a 3x224x224 input on CPU (DESIGN.md: forward+backward best at 8; forward-only
# occlusion ran 1.3x faster at 4-8 than at 16, docs/perturbation.md). Other sizes scale by element
# count so a 3x28x56 digit gets far larger batches.
_CPU_REFERENCE_ELEMENTS = 3 * 224 * 224
_CPU_GRAD_BATCH, _CPU_INFER_BATCH = 8, 8
_GPU_GRAD_BATCH, _GPU_INFER_BATCH = 64, 128
_MAX_BATCH = 1024

_progress_enabled = os.environ.get("HEATLENS_PROGRESS", "1") not in ("0", "false", "False", "")
# sizes pinned by set_batch_size, per model (weak: a pin does not keep the model alive)
_tuned: "weakref.WeakKeyDictionary[Any, dict[tuple, int]]" = weakref.WeakKeyDictionary()
_tuned_global: dict[tuple, int] = {}  # pins for model=None
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
    """Pin the batch size the engine uses for ``model`` and items of ``item_shape`` (no measurement then)."""
    key = (tuple(int(s) for s in item_shape), bool(grad))
    if model is None:
        _tuned_global[key] = int(batch_size)
    else:
        _tuned.setdefault(model, {})[key] = int(batch_size)


def default_batch_size(
    model: nn.Module | None = None,
    item_shape: Sequence[int] = (3, 224, 224),
    *,
    grad: bool = False,
    device: torch.device | str | None = None,
) -> int:
    """The batch size used when a caller passes ``batch_size=None``.

    A size pinned by ``set_batch_size`` wins; then the size measured for this model's architecture,
    item shape, gradient mode, device and thread count (``measured_batch_sizes``); otherwise the CPU
    optimum measured for 224x224 on the reference machine, scaled by the item's element count.
    """
    pinned = _pinned(model, item_shape, grad)
    if pinned is not None:
        return pinned
    device = torch.device(device) if device is not None else _model_device(model)
    m = _measurements.get(_measure_key(model, item_shape, grad, device)) if model is not None else None
    if m is not None and m.best is not None:
        return m.best
    return _formula(item_shape, grad, device)


def _formula(item_shape: Sequence[int], grad: bool, device: torch.device) -> int:
    if device.type == "cuda":
        base = _GPU_GRAD_BATCH if grad else _GPU_INFER_BATCH
    else:
        base = _CPU_GRAD_BATCH if grad else _CPU_INFER_BATCH
    elements = max(1, math.prod(int(s) for s in item_shape))  # no tensor: this runs on every call
    scaled = base * max(1.0, _CPU_REFERENCE_ELEMENTS / elements) ** 0.75
    return int(max(1, min(_MAX_BATCH, scaled)))


def _pinned(model: Any, item_shape: Sequence[int], grad: bool) -> int | None:
    key = (tuple(int(s) for s in item_shape), bool(grad))
    if model is None:
        return _tuned_global.get(key)
    try:
        return _tuned.get(model, {}).get(key)
    except TypeError:  # not weak-referenceable
        return None


# --- measured batch sizes ---------------------------------------------------------------------------
_measure_enabled = os.environ.get("HEATLENS_MEASURE_BATCH", "1") not in ("0", "false", "False")
_SLOWER = 1.15  # a size this much slower per item than the best ends the search (per-item time is U-shaped)


@dataclass
class Measurement:
    """Seconds per item at each batch size tried for one key; ``best`` once any is measured.

    candidates: the sizes tried, ascending (4, 8, ..., 64 for a 224x224 image; up to 8x the
    scaled formula for small items). done: no more sizes to try (the next was slower, or all tried).
    """

    candidates: tuple[int, ...]
    per_item: dict[int, float] = field(default_factory=dict)
    warmed: bool = False
    done: bool = False

    @property
    def best(self) -> int | None:
        return min(self.per_item, key=self.per_item.__getitem__) if self.per_item else None

    def next_size(self, remaining: int) -> int | None:
        """The size to try next when ``remaining`` items are left, or None (use ``best``)."""
        if self.done:
            return None
        if not self.warmed:  # first batch of this key: kernels, allocator, caches; not timed
            return self.candidates[0] if self.candidates[0] <= remaining else None
        todo = [c for c in self.candidates if c not in self.per_item]
        if not todo:
            self.done = True
            return None
        return todo[0] if todo[0] <= remaining else None

    def record(self, size: int, seconds: float) -> None:
        if not self.warmed:
            self.warmed = True
            return
        self.per_item[size] = seconds / size
        best = self.per_item[self.best]
        if self.per_item[size] > _SLOWER * best or size == self.candidates[-1]:
            self.done = True

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": list(self.candidates), "per_item": {str(k): v for k, v in self.per_item.items()},
                "done": self.done}


_measurements: dict[tuple, Measurement] = {}  # key: architecture fingerprint, no model reference
_fingerprints: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_disk_loaded: str | None = None


def measure_batch_sizes(enabled: bool) -> None:
    """Turn batch-size measurement on (default) or off (then the scaled formula is used);
    ``HEATLENS_MEASURE_BATCH=0`` turns it off at import."""
    global _measure_enabled
    _measure_enabled = bool(enabled)


def measured_batch_sizes() -> dict[str, dict[str, Any]]:
    """What the engine measured in this process: key text -> candidates, seconds per item, done."""
    return {"|".join(map(str, k)): m.to_dict() for k, m in _measurements.items()}


def clear_measurements() -> None:
    """Forget every measured batch size (benchmarks time the first call, probe included)."""
    _measurements.clear()


def model_fingerprint(model: Any) -> str:
    """A short hash of what decides a model's speed: module types, parameter and buffer shapes and
    dtypes (not their values: a randomised copy runs as fast). Cached per model, weakly."""
    try:
        cached = _fingerprints.get(model)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    net = getattr(model, "net", None) if hasattr(model, "input_size") else model
    h = hashlib.sha1()
    if isinstance(net, nn.Module):
        for name, m in net.named_modules():
            h.update(f"{name}:{type(m).__name__};".encode())
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    else:  # a black-box predict function
        fn = getattr(model, "predict_fn", model)
        h.update(f"fn:{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}".encode())
    text = h.hexdigest()[:16]
    try:
        _fingerprints[model] = text
    except TypeError:  # not weak-referenceable (e.g. a plain function object): hashed again next time
        pass
    return text


def _measure_key(model: Any, item_shape: Sequence[int], grad: bool, device: torch.device) -> tuple:
    return (model_fingerprint(model), tuple(int(s) for s in item_shape), bool(grad), device.type,
            torch.get_num_threads())


def _candidates(item_shape: Sequence[int], grad: bool, device: torch.device) -> tuple[int, ...]:
    """4, 8, ... up to 64, or up to 8x the scaled formula for small items (a 3x28x56 digit: 1024)."""
    top = min(_MAX_BATCH, max(64, 8 * _formula(item_shape, grad, device)))
    sizes, size = [], 4
    while size <= top:
        sizes.append(size)
        size *= 2
    return tuple(sizes)


def _measurement_for(model: Any, item_shape: Sequence[int], grad: bool) -> tuple[tuple, Measurement] | None:
    if not _measure_enabled or model is None or _pinned(model, item_shape, grad) is not None:
        return None
    _load_disk()
    device = _model_device(model)
    key = _measure_key(model, item_shape, grad, device)
    m = _measurements.get(key)
    if m is None:
        m = _measurements[key] = Measurement(_candidates(item_shape, grad, device))
    return key, m


def _disk_path() -> str | None:
    return os.environ.get("HEATLENS_BATCH_CACHE") or None


def _load_disk() -> None:
    """Read measurements saved by earlier processes (``HEATLENS_BATCH_CACHE``), once per path."""
    global _disk_loaded
    path = _disk_path()
    if path is None or path == _disk_loaded:
        return
    _disk_loaded = path
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    for text, d in saved.items():
        fp, shape, grad, dev, threads = text.split("|")
        key = (fp, tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), grad == "True", dev, int(threads))
        _measurements.setdefault(key, Measurement(tuple(d["candidates"]), {int(k): v for k, v in d["per_item"].items()},
                                                  warmed=True, done=bool(d["done"])))


def _save_disk() -> None:
    path = _disk_path()
    if path is None:
        return
    done = {k: v for k, v in measured_batch_sizes().items() if v["done"]}
    try:
        with open(path, "w") as f:
            json.dump(done, f, indent=1)
    except OSError:  # a read-only cache is not an error: the process still has its measurements
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    if not is_integer(size) or size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    size = min(int(size), n)
    measuring = _measurement_for(model, item_shape, grad) if batch_size is None else None
    device = _model_device(model)
    results: list[Any] = []
    bar = _progress_bar(n, size, desc)
    start = 0
    try:
        while start < n:
            probe = measuring[1].next_size(n - start) if measuring is not None else None
            if measuring is not None and probe is None:  # measured (or too few items left to try a size)
                size = min(n, measuring[1].best or size)
            this = probe or size
            stop = min(n, start + this)
            try:
                if probe is not None:
                    _sync(device)
                    began = time.perf_counter()
                with (torch.enable_grad() if grad else torch.inference_mode()):
                    out = step(start, stop)
                if probe is not None:
                    _sync(device)
                    measuring[1].record(probe, time.perf_counter() - began)
                    if measuring[1].done:
                        _save_disk()
            except Exception as err:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not _is_oom(err) or this == 1:
                    raise
                if probe is not None:  # this size and larger do not fit: the search ends below it
                    m = measuring[1]
                    m.candidates = tuple(c for c in m.candidates if c < probe) or (1,)
                    m.done = m.done or bool(m.per_item) and max(m.candidates) <= max(m.per_item)
                size = max(1, this // 2)  # halve and retry the same items
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
