"""Execute the example notebooks top to bottom and keep their outputs (``./dev notebooks``).

    python examples/execute.py [NAME.ipynb ...]     # default: every notebook in examples/

Each notebook runs in a fresh kernel with the current environment; its outputs are written back so
the committed notebook renders on a code host (and in the docs) without running. The run time of
each notebook is printed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TIMEOUT_PER_CELL = 600  # seconds; a whole notebook is meant to take under 2 minutes on 2 cores


def execute(path: Path, *, write: bool = True) -> float:
    """Run ``path`` in a fresh python3 kernel (cwd = examples/) -> seconds taken; outputs written back."""
    book = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(book, timeout=TIMEOUT_PER_CELL, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    if write:
        nbformat.write(book, path)
    return seconds


def main(argv: list[str]) -> int:
    paths = [HERE / name for name in argv] if argv else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: {execute(path):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
