"""heatlens benchmarks: speed against the peers (Captum, lime) measured side by side, in one process.

Each ``benchmarks/bench_<name>.py`` module has a ``main(argv=None) -> dict`` that runs, prints a table
with ratios and writes ``benchmarks/results/bench_<name>.json``; ``benchmarks/_harness.py`` holds the
shared timing helpers. ``available()`` lists the benchmark modules and ``run(names, argv)`` runs some
or all of them (what ``python -m benchmarks`` does).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Sequence
from typing import Any

__all__ = ["available", "run"]


def available() -> list[str]:
    """Names of the benchmark modules (``bench_occlusion``, ``bench_lime``, ...), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("bench_"))


def run(names: Sequence[str] | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the named benchmarks (all when None) -> name -> what its ``main`` returned.

    argv: command-line arguments handed to every benchmark's ``main`` that accepts them.
    """
    known = available()
    results: dict[str, Any] = {}
    for name in names or known:
        key = name if name.startswith("bench_") else f"bench_{name}"
        if key not in known:
            raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(known)}")
        main = importlib.import_module(f"{__name__}.{key}").main
        takes_argv = bool(inspect.signature(main).parameters)
        results[key] = main(list(argv or [])) if takes_argv else main()
    return results
