"""The engine's allocator tuning, measured in fresh processes: what a user of each library gets.

    python -m benchmarks.bench_allocator [--repeats 3] [--threads 2] [--quick]

``heatlens.batching.tune_allocator`` raises glibc's mmap and trim thresholds, process-wide, on the
engine's first run. Inside one process it therefore speeds up Captum too, so ``bench_methods`` (peers
in one process, the issue's rule) shows the algorithmic ratios only. This benchmark answers the
other question: each contender in its own fresh Python process, as a user would run it, on
efficientnet-lite0 (chelsea, 224x224): heatlens as shipped, heatlens with
``HEATLENS_TUNE_ALLOCATOR=0``, and Captum at its default and at its best batch knob (a process that
never runs the heatlens engine: glibc's defaults). Median of ``--repeats`` after one warm-up, per
process. JSON to benchmarks/results/bench_allocator.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _harness as H

# method -> (heatlens keywords, Captum's call, Captum's batch knob)
CASES = {
    "integrated_gradients": ("steps=50, baseline='zeros'",
                             "IntegratedGradients(net).attribute(x, target=t, n_steps=50, method='gausslegendre'{knob})",
                             "internal_batch_size"),
    "smoothgrad": ("n_samples=50, noise=0.15, seed=0",
                   "NoiseTunnel(Saliency(net)).attribute(x, target=t, nt_type='smoothgrad', nt_samples=50, "
                   "stdevs=0.15 * float(x.max() - x.min()), abs=False{knob})",
                   "nt_samples_batch_size"),
    "occlusion": ("window=32, stride=16, baseline='zeros', output='logit'",
                  "Occlusion(net).attribute(x, target=t, sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), "
                  "baselines=0.0{knob})",
                  "perturbations_per_eval"),
}

_PRELUDE = """
import statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads({threads})
from skimage import data
import heatlens as hl
clf = hl.load_model("efficientnet-lite0")
x = clf.preprocess(data.chelsea()); net = clf.net.eval(); t = 285
for p in net.parameters():
    p.requires_grad_(False)
def timed(fn, repeats={repeats}):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)
"""


def _run(code: str, tune: bool) -> float:
    """Seconds printed by ``code`` run in a fresh interpreter (allocator tuning on or off)."""
    env = {**os.environ, "HEATLENS_TUNE_ALLOCATOR": "1" if tune else "0", "HEATLENS_PROGRESS": "0"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_case(name: str, threads: int, repeats: int, knobs: Sequence[int]) -> dict[str, Any]:
    ours, theirs, knob = CASES[name]
    prelude = _PRELUDE.format(threads=threads, repeats=repeats)
    heatlens_code = prelude + f"print(timed(lambda: hl.explain(clf, x, {name!r}, target=t, {ours})))"
    captum = "from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion, Saliency\n"
    result = {"heatlens": _run(heatlens_code, True), "heatlens untuned": _run(heatlens_code, False)}
    for k in (None, *knobs):
        call = theirs.format(knob="" if k is None else f", {knob}={k}")
        label = "captum default" if k is None else f"captum {knob}={k}"
        result[label] = _run(prelude + captum + f"print(timed(lambda: {call}))", False)
    best = min(v for k, v in result.items() if k.startswith("captum"))
    result.update(tuning_speedup=result["heatlens untuned"] / result["heatlens"],
                  vs_captum_default=result["captum default"] / result["heatlens"], vs_captum_best=best / result["heatlens"])
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="occlusion only, one repeat, one Captum knob value")
    args = p.parse_args(argv)
    names = ["occlusion"] if args.quick else list(CASES)
    repeats, knobs = (1, (8,)) if args.quick else (args.repeats, (8, 16, 32))
    results = {name: bench_case(name, args.threads, repeats, knobs) for name in names}
    rows = [{"method": n, "heatlens s": r["heatlens"], "untuned s": r["heatlens untuned"],
             "captum default s": r["captum default"], "tuning x": r["tuning_speedup"],
             "x captum default": r["vs_captum_default"], "x captum best": r["vs_captum_best"]} for n, r in results.items()]
    print(f"each contender in a fresh process, efficientnet-lite0, {args.threads} threads, median of {repeats}")
    H.print_table(rows)
    payload = {"benchmark": "allocator", "repeats": repeats, "quick": args.quick,
               "environment": H.environment("cpu"), "results": results}
    if not args.no_json:
        print(f"wrote {H.write_json('bench_allocator' + ('_quick' if args.quick else ''), payload)}")
    return json.loads(json.dumps(payload))


if __name__ == "__main__":
    main()
