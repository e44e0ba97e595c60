"""Shared timing helpers for heatlens benchmarks (``benchmarks/bench_*.py``).

Every benchmark measures heatlens and its peers *in the same process, in alternation*, so that
machine load hits all of them alike, and reports the median of the repeats:

    from benchmarks import _harness as H
    H.setup(threads=2)                                   # pin torch threads before anything runs
    model, x = H.effnet_chelsea("cpu")
    runs = H.compare({"heatlens": f, "captum": g}, repeats=3)   # name -> Timing
    H.print_table(rows, ["method", "seconds", "ratio"])
    H.write_json("bench_occlusion", {"environment": H.environment(), ...})

Memory is read in one extra, instrumented run per contender after the timed ones (the timed runs
carry no instrumentation). ``Timing.peak_rss_mb`` is the process's peak resident set size after the runs (a high-water
mark: it only grows), ``Timing.python_peak_mb`` the peak of Python-level allocations (tracemalloc;
torch tensors are not counted there), ``Timing.peak_delta_mb`` the most the call itself added on top of
what was in use when it started (resident memory sampled every 2 ms on CPU, allocated device memory on
CUDA: the method's own working set) and, on CUDA, ``Timing.cuda_peak_mb`` the peak device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
import threading
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass
class Timing:
    """Wall times of one benchmarked callable. result: what its last run returned (not serialised)."""

    name: str
    times: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    python_peak_mb: float = 0.0
    cuda_peak_mb: float | None = None
    peak_delta_mb: float = 0.0
    result: Any = field(default=None, repr=False)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "result"}  # no deep copy of result
        out.update(median=self.median, best=self.best)
        return out


def setup(threads: int | None = 2, progress: bool = False) -> None:
    """Pin torch's intra-op threads (DESIGN.md's numbers are for 2 cores), silence progress bars and
    apply the engine's allocator tuning now (``HEATLENS_TUNE_ALLOCATOR=0`` leaves it off for all)."""
    if threads:
        torch.set_num_threads(int(threads))
    os.environ["HEATLENS_PROGRESS"] = "1" if progress else "0"
    from heatlens.batching import set_progress, tune_allocator

    set_progress(progress)
    # before anything is timed: the floor, heatlens and its peers then share one allocator setting
    # (process-wide); bench_allocator measures the setting itself, in separate processes
    tune_allocator()


def parser(description: str, *, repeats: int = 3) -> argparse.ArgumentParser:
    """The common command line of every benchmark: --repeats, --threads, --device, --no-json."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs per contender (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/<name>.json")
    return p


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call (CUDA work included) and its result."""
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def measure(name: str, fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (one contender alone)."""
    return compare({name: fn}, repeats=repeats, warmup=warmup)[name]


def compare(contenders: Mapping[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1,
            memory: bool = True) -> dict[str, Timing]:
    """Time several callables in alternation (round-robin), ``repeats`` runs each after ``warmup``.

    Alternating spreads machine load evenly over the contenders; report ``Timing.median``. The timed
    runs carry no instrumentation: tracemalloc and the 2 ms RSS sampler thread slow Python-heavy code
    (measured: efficientnet-lite0 saliency 57 ms plain, 83 ms instrumented, Captum's 61 -> 62 ms), so
    with ``memory`` each contender runs once more afterwards, instrumented, for the memory fields.
    """
    timings = {name: Timing(name) for name in contenders}
    for name, fn in contenders.items():
        for _ in range(warmup):  # allocator, thread pools, lazy imports
            fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            seconds, out = time_once(fn)
            timings[name].times.append(seconds)
            timings[name].result = out
    if memory:
        for name, fn in contenders.items():
            _measure_memory(fn, timings[name])
    return timings


def _measure_memory(fn: Callable[[], Any], t: Timing) -> None:
    """One instrumented run of ``fn``: fills the memory fields of ``t`` (see the module docstring)."""
    tracemalloc.start()
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with MemoryWatch() as watch:
            fn()
        t.peak_delta_mb = watch.peak_delta_mb
        t.python_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        t.peak_rss_mb = peak_rss_mb()
        if torch.cuda.is_available():
            t.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
    finally:
        tracemalloc.stop()


class MemoryWatch:
    """Context manager: ``peak_delta_mb``, the most memory the block added over what was in use at its start.

    On CUDA: peak allocated device memory minus the allocation at entry (exact). On CPU: the resident
    set size sampled every ``interval`` seconds by a thread, minus the RSS at entry (approximate: a
    spike shorter than the interval can be missed, and memory the allocator keeps from earlier calls is
    reused without showing).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_delta_mb = 0.0
        self._stop = threading.Event()
        self._cuda = torch.cuda.is_available()

    def __enter__(self) -> "MemoryWatch":
        if self._cuda:
            torch.cuda.synchronize()
            self._start = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            return self
        self._start = current_rss_mb()
        self._peak = self._start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, current_rss_mb())

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize()
            self.peak_delta_mb = max(0.0, torch.cuda.max_memory_allocated() / 2**20 - self._start)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, current_rss_mb())
        self.peak_delta_mb = max(0.0, self._peak - self._start)


def current_rss_mb() -> float:
    """Resident set size now, MiB (/proc on Linux; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: versions, threads, CPU, load, device."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    for pkg in ("captum", "lime"):
        try:
            env[pkg] = __import__(pkg).__version__
        except (ImportError, AttributeError):
            env[pkg] = None
    return env


def effnet_chelsea(device: str | torch.device = "cpu"):
    """efficientnet-lite0 (shipped weights) and scikit-image's chelsea preprocessed, (1,3,224,224)."""
    from skimage import data

    import heatlens as hl

    model = hl.load_model("efficientnet-lite0").to(device).eval()
    return model, model.preprocess(data.chelsea()).to(device)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Print (and return) rows as an aligned text table; floats with 3 significant decimals."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(name: str, payload: Mapping[str, Any], directory: Path = RESULTS) -> Path:
    """Write ``payload`` to ``benchmarks/results/<name>.json`` (Timings serialised) and return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(_plain(payload), indent=2))
    return path


def _plain(value: Any) -> Any:
    """JSON-friendly copy: Timings as dicts, tensors as lists, tuples as lists."""
    if isinstance(value, Timing):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (torch.device, torch.dtype, Path)):
        return str(value)
    return value
