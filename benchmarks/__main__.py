"""``python -m benchmarks [names...] [options]``: run some or all benchmarks in one process.

Names (``methods``, ``occlusion``, ``lime`` or ``bench_methods``, ...) come first; every option after
them (``--quick``, ``--device cuda``, ``--repeats 5``, ...) goes to each benchmark's own parser.
``python -m benchmarks --list`` prints the available names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import available, run


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Leading benchmark names, then the options handed to every benchmark."""
    argv = list(argv)
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    return argv[:first_option], argv[first_option:]


def main(argv: Sequence[str] | None = None) -> int:
    names, options = split_args(sys.argv[1:] if argv is None else argv)
    if "--list" in options:
        print("\n".join(available()))
        return 0
    run(names or None, options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
