"""The audit analysis on 10,000 stored maps: SpRAy per class, findings with interventions, tables.

    python -m benchmarks.bench_audit_analysis [--n 10000] [--classes 10] [--size 64] [--threads 2]
                                              [--repeats 1] [--quick] [--no-json]

Synthetic maps (a diffuse object blob per class, and in three classes a second strategy: a fixed
bright patch in a corner on a third of the images) are written to a Zarr array (N,64,64) float16
chunked by 256 rows, like an audit's store, and read back in chunks by the analysis. The images the
interventions load are generated per index, and the model is analytic (it reads the patch), so the
timing is the analysis itself, not a network. Target (issue 16): under a minute on 2 cores for
10,000 maps. Reported: seconds per stage (features, spray incl. t-SNE, findings, tables), the total,
peak RSS, and whether the planted patches were found. ``--quick``: 2,000 maps.
JSON: benchmarks/results/bench_audit_analysis.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Sequence

os.environ.setdefault("HEATLENS_PROGRESS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

try:  # run as ``python -m benchmarks.bench_audit_analysis`` or as a script
    from benchmarks import _harness as H
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import _harness as H

PATCH = 8  # the planted patch: rows 0-7, columns 0-7 of a 64x64 image
SHORTCUT_CLASSES = (1, 4, 7)


def synthetic_store(path: str, n: int, classes: int, size: int, seed: int = 0):
    """Write (n,size,size) float16 maps to a Zarr array chunked by 256 rows -> (zarr array, groups, patched)."""
    import zarr

    rng = np.random.default_rng(seed)
    groups = rng.integers(0, classes, n)
    patched = np.isin(groups, SHORTCUT_CLASSES) & (rng.random(n) < 1 / 3)
    store = zarr.open_array(path, mode="w", shape=(n, size, size), chunks=(256, size, size), dtype="f2")
    yy, xx = np.mgrid[:size, :size]
    for start in range(0, n, 256):
        g = groups[start:start + 256]
        # the class's object sits at a class-specific place in the middle; maps are noisy around it
        cy = size / 2 + 6 * np.sin(g)[:, None, None]
        cx = size / 2 + 6 * np.cos(g)[:, None, None]
        m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
        m = m * (1 + 0.5 * rng.random(m.shape))
        p = patched[start:start + 256]
        m[p, :PATCH, :PATCH] = 3.0 * (1 + 0.3 * rng.random((int(p.sum()), PATCH, PATCH)))
        store[start:start + len(g)] = m.astype(np.float16)
    return store, groups, patched


class PatchReader(nn.Module):
    """Logits: class k's score is 1 - |mean brightness - k/classes|; a patch brighter than the background adds to class 1.

    Enough for the interventions to have something to flip, at negligible cost per image.
    """

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        level = x.mean((1, 2, 3))[:, None]
        k = torch.arange(self.classes, dtype=x.dtype)[None] / self.classes
        logits = 10 * (1 - (level - k).abs())
        patch = x[:, :, :PATCH, :PATCH].mean((1, 2, 3)) - x.median(3).values.median(2).values.mean(1)
        logits[:, 1] += 20 * patch  # a patch brighter than the image's background votes for class 1
        return logits


def images(groups: np.ndarray, patched: np.ndarray, classes: int, size: int):
    """load_images(indices) -> (k,3,size,size): a flat image at the class's brightness, the patch where planted."""
    def load(idx):
        idx = np.asarray(idx, dtype=np.int64)
        x = torch.full((len(idx), 3, size, size), 0.0)
        x += torch.as_tensor(groups[idx] / classes, dtype=torch.float32)[:, None, None, None]
        x[torch.as_tensor(patched[idx]), :, :PATCH, :PATCH] = 1.0
        return x
    return load


def main(argv: Sequence[str] | None = None) -> dict:
    p = H.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--quick", action="store_true", help="2,000 maps: a smoke test of the script")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)
    H.setup(threads=args.threads)
    n = 2_000 if args.quick else args.n
    from heatlens.audit.analysis import analyse_arrays

    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        store, groups, patched = synthetic_store(os.path.join(tmp, "maps.zarr"), n, args.classes, args.size)
        write_s = time.perf_counter() - tic
        correct = np.ones(n, dtype=bool)
        model = PatchReader(args.classes)
        load = images(groups, patched, args.classes, args.size)

        def run():
            return analyse_arrays({"gradcam": store}, groups, correct, {}, model=model, load_images=load,
                                  input_size=(args.size, args.size), embed=True)

        timing = H.measure("analysis", run, repeats=args.repeats, warmup=0)
    analysis = timing.result
    shortcut = [f for f in analysis.findings if f.kind == "shortcut"]
    found = sorted(set(shortcut[0].classes)) if shortcut else []
    rows = [{"maps": n, "seconds": round(timing.median, 2), **{k: round(v, 2) for k, v in analysis.seconds.items()},
             "peak_rss_mb": round(H.peak_rss_mb(), 0), "found_classes": found,
             "region": shortcut[0].region["name"] if shortcut else None}]
    H.print_table(rows)
    print(f"(synthetic store written in {write_s:.1f} s; target: under 60 s for 10,000 maps on 2 cores; "
          f"planted shortcut classes {list(SHORTCUT_CLASSES)})")
    payload = {"environment": H.environment(), "rows": rows, "planted": list(SHORTCUT_CLASSES),
               "load_average": os.getloadavg()}
    if not args.no_json:
        H.write_json("bench_audit_analysis", payload)
    return payload


if __name__ == "__main__":
    main()
