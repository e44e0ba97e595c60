"""heatlens ``occlusion`` vs Captum's ``Occlusion`` on efficientnet-lite0 (chelsea, 224x224).

    python -m benchmarks.bench_occlusion [--repeats 3] [--threads 2] [--device cpu] [--quick]

Two settings: a 32x32 window at stride 16 (169 windows) and the CSEP 590B superpixel form with
16x16 squares (196 windows). Both libraries explain the same logit of the same image with the zero
baseline; Captum runs under ``torch.no_grad()`` (its fastest use) at ``perturbations_per_eval`` 1 (its
default) and 4, 8, 16, 32, heatlens with the engine's automatic batch size and at 4 and 8. All contenders are timed
in alternation in one process; the table reports medians and Captum / heatlens time ratios, plus the
largest attribution difference between the two. JSON goes to benchmarks/results/bench_occlusion.json.
``--quick``: the first setting only, one repeat, Captum at ppe 1 and 8, heatlens automatic (a smoke test).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import _harness as H

SETTINGS = {
    "window 32 stride 16": {"window": 32, "stride": 16},
    "superpixel 16": {"window": 16, "stride": 16},
}
PPE = (1, 4, 8, 16, 32)
BATCH = (None, 4, 8)  # heatlens: the engine's automatic choice, and two fixed sizes (best of reported too)


def _captum(model, x: torch.Tensor, target: int, window: int, stride: int, ppe: int):
    from captum.attr import Occlusion

    occ = Occlusion(model)
    c = x.shape[1]

    def run() -> torch.Tensor:
        with torch.no_grad():
            return occ.attribute(x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                 target=target, baselines=0.0, perturbations_per_eval=ppe)

    return run


def _heatlens(model, x: torch.Tensor, target: int, window: int, stride: int, batch_size: int | None):
    from heatlens.methods.perturbation import occlusion

    def run() -> torch.Tensor:
        return occlusion(model, x, target, window=window, stride=stride, baseline="zeros", output="logit",
                         batch_size=batch_size).attributions

    return run


def bench_setting(model, x: torch.Tensor, target: int, window: int, stride: int, repeats: int,
                  ppe: tuple[int, ...] = PPE, batch: tuple[int | None, ...] = BATCH) -> dict[str, Any]:
    """Time heatlens and Captum at every ``perturbations_per_eval`` for one window / stride."""
    contenders = {_name(b): _heatlens(model, x, target, window, stride, b) for b in batch}
    contenders.update({f"captum ppe={k}": _captum(model, x, target, window, stride, k) for k in ppe})
    runs = H.compare(contenders, repeats=repeats)
    ours = runs[_name(None)]
    best_batch = min(batch, key=lambda b: runs[_name(b)].median)
    best_ppe = min(ppe[1:], key=lambda k: runs[f"captum ppe={k}"].median)
    captum_best = runs[f"captum ppe={best_ppe}"]
    reference = captum_best.result
    return {
        "runs": runs,
        "best_captum_ppe": best_ppe,
        "best_heatlens_batch": best_batch,
        "speedup_vs_captum_default": runs["captum ppe=1"].median / ours.median,
        "speedup_vs_captum_best": captum_best.median / ours.median,
        "best_vs_best": captum_best.median / runs[_name(best_batch)].median,
        "max_abs_difference": float((ours.result - reference).abs().max()),
        "max_abs_attribution": float(reference.abs().max()),
    }


def _name(batch_size: int | None) -> str:
    return "heatlens auto" if batch_size is None else f"heatlens bs={batch_size}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="first setting, 1 repeat, ppe 1 and 8: a smoke test")
    args = p.parse_args(argv)
    H.setup(threads=args.threads)
    settings = dict(list(SETTINGS.items())[:1]) if args.quick else SETTINGS
    ppe, batch = ((1, 8), (None,)) if args.quick else (PPE, BATCH)
    repeats = 1 if args.quick else args.repeats
    model, x = H.effnet_chelsea(args.device)
    with torch.inference_mode():
        target = int(model(x).argmax(1))
    results, rows = {}, []
    for label, cfg in settings.items():
        res = bench_setting(model, x, target, cfg["window"], cfg["stride"], repeats, ppe, batch)
        results[label] = res
        ours = res["runs"][_name(None)].median
        for name, timing in res["runs"].items():
            rows.append({"setting": label, "contender": name, "median s": timing.median, "best s": timing.best,
                         "time / heatlens auto": timing.median / ours})
    print(f"occlusion on efficientnet-lite0, chelsea 224x224, target {target}, device {args.device}, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    H.print_table(rows, ["setting", "contender", "median s", "best s", "time / heatlens auto"])
    for label, res in results.items():
        print(f"{label}: heatlens (auto batch) is {res['speedup_vs_captum_default']:.2f}x Captum's default speed and "
              f"{res['speedup_vs_captum_best']:.2f}x its best (ppe={res['best_captum_ppe']}); best vs best "
              f"(bs={res['best_heatlens_batch']}): {res['best_vs_best']:.2f}x; "
              f"max |difference| {res['max_abs_difference']:.2e} (attributions up to {res['max_abs_attribution']:.2f})")
    payload = {"benchmark": "occlusion", "model": "efficientnet-lite0", "image": "chelsea 224x224",
               "target": target, "repeats": repeats, "quick": args.quick, "environment": H.environment(args.device),
               "settings": results}
    if not args.no_json:
        suffix = "_quick" if args.quick else ("" if args.device == "cpu" else f"_{torch.device(args.device).type}")
        print(f"wrote {H.write_json('bench_occlusion' + suffix, payload)}")
    return payload


if __name__ == "__main__":
    main()
