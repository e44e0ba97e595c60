"""Measured batch sizes: heatlens' engine (probe included) vs every fixed size and Captum's best knob.

    python -m benchmarks batch [--quick] [--models effnet,cnn] [--methods integrated_gradients,smoothgrad,occlusion]

For each model (efficientnet-lite0 on chelsea; the seed's small CNN on a random 3x28x56 input) and
method (IG 32 steps, SmoothGrad 32 samples, occlusion), alternating in one process (round-robin,
median of ``--repeats``):

* ``heatlens measured``: the engine's choice with its measurements **cleared before every run**, so
  each timed call pays for its own probe (its first batches run at 4, 8, 16, ... items);
* ``heatlens batch_size=b`` for b in ``SIZES``: the fixed sizes the target names;
* Captum at each value of its batch knob in ``SIZES`` (``internal_batch_size``,
  ``nt_samples_batch_size``, ``perturbations_per_eval``): its best is "Captum best".

Reports measured / fastest fixed (target <= 1.05) and Captum best / measured (target >= 1: level).
JSON: benchmarks/results/bench_batch.json.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import _harness as H
from .bench_methods import load

SIZES = (4, 8, 16, 32, 64)
TARGETS = {"vs_fastest_fixed": 1.05, "vs_captum_best": 1.0}


def contenders(method: str, s, sizes: Sequence[int], quick: bool) -> dict[str, Callable[[], Any]]:
    import captum.attr as ca

    import heatlens as hl
    from heatlens import batching

    n = 8 if quick else 32
    window, stride = s.settings["window"], s.settings["stride"]
    sigma = 0.15 * float(s.x.max() - s.x.min())
    if method == "integrated_gradients":
        kw = {"steps": n, "baseline": "zeros"}
        algo = ca.IntegratedGradients(s.net)
        captum = lambda b: algo.attribute(s.x, target=s.target, baselines=0.0, n_steps=n,  # noqa: E731
                                          method="gausslegendre", internal_batch_size=b)
    elif method == "smoothgrad":
        kw = {"n_samples": n, "noise": 0.15, "seed": 0}
        algo = ca.NoiseTunnel(ca.Saliency(s.net))
        captum = lambda b: algo.attribute(s.x, target=s.target, nt_type="smoothgrad", nt_samples=n,  # noqa: E731
                                          stdevs=sigma, abs=False, nt_samples_batch_size=b)
    elif method == "occlusion":
        kw = {"window": window, "stride": stride, "baseline": "zeros", "output": "logit"}
        algo = ca.Occlusion(s.net)

        def captum(b: int):
            with torch.no_grad():
                return algo.attribute(s.x, target=s.target, sliding_window_shapes=(s.x.shape[1], window, window),
                                      strides=(s.x.shape[1], stride, stride), baselines=0.0,
                                      perturbations_per_eval=b)
    else:
        raise ValueError(f"unknown method {method!r}; use integrated_gradients, smoothgrad, occlusion")
    fn = hl.methods.get_method(method)

    def measured():
        batching.clear_measurements()  # every timed call pays for its own probe
        return fn(s.clf, s.x, s.target, **kw)

    out: dict[str, Callable[[], Any]] = {"heatlens measured": measured}
    out.update({f"heatlens batch_size={b}": (lambda b=b: fn(s.clf, s.x, s.target, batch_size=b, **kw)) for b in sizes})
    out.update({f"captum knob={b}": (lambda b=b: captum(b)) for b in sizes})
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = H.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--quick", action="store_true", help="small CNN, 8 steps, 1 repeat: seconds")
    p.add_argument("--models", default=None)
    p.add_argument("--methods", default="integrated_gradients,smoothgrad,occlusion")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    H.setup(threads=args.threads)
    warnings.filterwarnings("ignore")
    from heatlens import batching

    repeats = 1 if args.quick else args.repeats
    sizes = (4, 8) if args.quick else SIZES
    started = time.perf_counter()
    results = []
    for model in (args.models or ("cnn" if args.quick else "effnet,cnn")).split(","):
        s = load(model, args.device, args.quick)
        for method in args.methods.split(","):
            runs = H.compare(contenders(method, s, sizes, args.quick), repeats=repeats, memory=False)
            fixed = {k: v.median for k, v in runs.items() if k.startswith("heatlens batch_size")}
            captum = {k: v.median for k, v in runs.items() if k.startswith("captum")}
            ours = runs["heatlens measured"].median
            fastest, best_captum = min(fixed, key=fixed.get), min(captum, key=captum.get)
            chosen = batching.measured_batch_sizes()
            results.append({
                "model": model, "method": method, "runs": runs, "heatlens_measured_s": ours,
                "fastest_fixed": fastest, "fastest_fixed_s": fixed[fastest],
                "vs_fastest_fixed": ours / fixed[fastest], "captum_best": best_captum,
                "captum_best_s": captum[best_captum], "vs_captum_best": captum[best_captum] / ours,
                "measurements": chosen,
            })
            r = results[-1]
            print(f"  {model}/{method}: measured {ours:.4f} s, fastest fixed {fastest} {fixed[fastest]:.4f} s, "
                  f"Captum best {best_captum} {captum[best_captum]:.4f} s", flush=True)
    rows = [{"model": r["model"], "method": r["method"], "measured s": r["heatlens_measured_s"],
             "fastest fixed": r["fastest_fixed"].split("=")[1], "fixed s": r["fastest_fixed_s"],
             "measured/fixed": r["vs_fastest_fixed"], "captum best": r["captum_best"].split("=")[1],
             "captum s": r["captum_best_s"], "captum/measured": r["vs_captum_best"]} for r in results]
    env = H.environment(args.device)
    print(f"\nmeasured batch sizes (probe in every timed call), median of {repeats}, load {env['load_average']}")
    H.print_table(rows)
    payload = {"benchmark": "batch", "quick": args.quick, "repeats": repeats, "sizes": list(sizes),
               "targets": TARGETS, "environment": env, "results": results,
               "wall_s": time.perf_counter() - started}
    if not args.no_json:
        directory = Path(args.results) if args.results else H.RESULTS
        suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
        print(f"wrote {H.write_json('bench_batch' + ('_quick' if args.quick else '') + suffix, payload, directory)}")
    return payload


if __name__ == "__main__":
    main()
