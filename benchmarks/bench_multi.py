"""One pass for many methods: ``hl.explain(model, x, [7 methods])`` vs one saliency call and vs Captum.

    python -m benchmarks multi [--quick] [--models effnet,cnn]

Contenders, alternating in one process (median of ``--repeats``): heatlens with the list
saliency, input_x_gradient, gradcam, gradcam_pp, xgradcam, layercam, hirescam (one forward+backward
in all, ``heatlens.methods.multi``); one heatlens saliency call; the same seven methods called one by
one; Captum's Saliency, InputXGradient and LayerGradCam (the three of the seven it has; one pass each).
Target: the list <= 1.3x one saliency call. JSON: benchmarks/results/bench_multi.json.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import _harness as H
from .bench_methods import _layer_module, load

METHODS = ["saliency", "input_x_gradient", "gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam"]
TARGET = 1.3


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = H.parser(__doc__.splitlines()[0], repeats=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=None)
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    H.setup(threads=args.threads)
    warnings.filterwarnings("ignore")
    import captum.attr as ca

    import heatlens as hl

    repeats = 1 if args.quick else args.repeats
    started, results = time.perf_counter(), []
    for model in (args.models or ("cnn" if args.quick else "effnet,cnn")).split(","):
        s = load(model, args.device, args.quick)
        layer = _layer_module(s)
        sal, ixg, gc = ca.Saliency(s.net), ca.InputXGradient(s.net), ca.LayerGradCam(s.net, layer)
        runs = H.compare({
            "heatlens list": lambda: hl.explain(s.clf, s.x, METHODS, target=s.target),
            "heatlens saliency": lambda: hl.explain(s.clf, s.x, "saliency", target=s.target),
            "heatlens one by one": lambda: [hl.explain(s.clf, s.x, m, target=s.target) for m in METHODS],
            "captum 3 methods": lambda: [sal.attribute(s.x, target=s.target, abs=False),
                                         ixg.attribute(s.x, target=s.target),
                                         gc.attribute(s.x, target=s.target, relu_attributions=True)],
        }, repeats=repeats, memory=False)
        med = {k: v.median for k, v in runs.items()}
        results.append({"model": model, "runs": runs, **{k.replace(" ", "_") + "_s": v for k, v in med.items()},
                        "list_vs_saliency": med["heatlens list"] / med["heatlens saliency"],
                        "one_by_one_vs_list": med["heatlens one by one"] / med["heatlens list"],
                        "captum3_vs_list": med["captum 3 methods"] / med["heatlens list"]})
    rows = [{"model": r["model"], "list s": r["heatlens_list_s"], "saliency s": r["heatlens_saliency_s"],
             "one by one s": r["heatlens_one_by_one_s"], "captum 3 s": r["captum_3_methods_s"],
             "list/saliency": r["list_vs_saliency"], "one-by-one/list": r["one_by_one_vs_list"],
             "captum3/list": r["captum3_vs_list"]} for r in results]
    env = H.environment(args.device)
    print(f"\n7 methods in one call, median of {repeats}, load {env['load_average']}")
    H.print_table(rows)
    payload = {"benchmark": "multi", "quick": args.quick, "methods": METHODS, "target": TARGET,
               "environment": env, "results": results, "wall_s": time.perf_counter() - started}
    if not args.no_json:
        directory = Path(args.results) if args.results else H.RESULTS
        suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
        print(f"wrote {H.write_json('bench_multi' + ('_quick' if args.quick else '') + suffix, payload, directory)}")
    return payload


if __name__ == "__main__":
    main()
