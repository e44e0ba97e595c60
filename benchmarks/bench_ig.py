"""Integrated Gradients to a completeness gap: heatlens ``steps="auto"`` vs Captum's fixed rules.

    python -m benchmarks ig [--photos 6] [--baselines black,zeros,blur] [--tolerance 0.01]
                            [--reference-steps 2000] [--reference-cases 3] [--rules gausslegendre,riemann_trapezoid]

For every photo (``heatlens.data.sample_images``, efficientnet-lite0, the predicted class) and
baseline, the **cost** to reach a relative completeness gap |f(x) - f(x') - sum(a)| / |f(x) - f(x')|
of at most ``--tolerance``: passes priced at their measured per-item times (forward in
``inference_mode`` and forward+backward, both at batch 8, measured in this run). Pass counts are
exact, so the ratios do not depend on machine load; only the price of a forward relative to a
forward+backward does.

* heatlens: ``integrated_gradients(steps="auto", tolerance=...)``; its ``extras["passes"]`` plus one
  forward for f(x) (Captum is charged nothing for f(x) and f(x'), which it needs to know its gap).
* Captum: ``IntegratedGradients.attribute(n_steps=n, method=rule)`` for n on a doubling ladder 4, 8,
  16, ... until the gap is reached, then bisection between the last failing and first passing n
  (``--bisect`` rounds): the smallest n found, and the largest failing one (the bracket).
* Accuracy: on the first ``--reference-cases`` cases, the L1 distance of both attributions to a
  ``--reference-steps`` Gauss-Legendre reference, relative to the reference's L1 norm.

``--quick``: the seed's small CNN and 2 random inputs, tolerance 5%, reference 200 steps: seconds.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _harness as H

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera", "coins", "moon", "hubble_deep_field")
TARGET_RATIO = 3.0


def prices(clf, x: Tensor, target: int, batch: int = 8, repeats: int = 3) -> dict[str, float]:
    """Seconds per item of a forward (inference_mode) and a forward+backward at ``batch``."""
    from heatlens.methods._autograd import fast_layout
    from heatlens.models.hooks import frozen

    xb = fast_layout(clf, x[:1].expand(batch, -1, -1, -1).contiguous())
    tb = torch.full((batch,), target, dtype=torch.long, device=x.device)

    def fwd() -> Any:
        with torch.inference_mode():
            return clf(xb)

    def fb() -> Any:
        leaf = xb.detach().requires_grad_(True)
        return torch.autograd.grad(clf.score(leaf, tb).sum(), leaf)[0]

    with frozen(clf):
        runs = H.compare({"forward": fwd, "forward_backward": fb}, repeats=repeats, memory=False)
    return {k: v.median / batch for k, v in runs.items()}


def relative_gap(net, x: Tensor, base: Tensor, target: int, attr: Tensor) -> float:
    with torch.inference_mode():
        f = net(torch.cat([x, base]))[:, target].double()
    return float((f[0] - f[1] - attr.double().sum()).abs() / (f[0] - f[1]).abs().clamp_min(1e-12))


def captum_search(net, x: Tensor, base: Tensor, target: int, rule: str, tolerance: float, bisect: int,
                  max_steps: int) -> dict[str, Any]:
    """Smallest n_steps (ladder then bisection) at which Captum's ``rule`` reaches ``tolerance``."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(net)
    tried: dict[int, float] = {}
    attrs: dict[int, Tensor] = {}

    def gap(n: int) -> float:
        if n not in tried:
            a = ig.attribute(x, baselines=base, target=target, n_steps=n, method=rule, internal_batch_size=16)
            tried[n], attrs[n] = relative_gap(net, x, base, target, a), a.detach()
        return tried[n]

    n, low = 4, 0
    while n <= max_steps and gap(n) > tolerance:
        low, n = n, 2 * n
    if n > max_steps:
        return {"rule": rule, "n_steps": None, "largest_failing": low, "tried": tried, "attr": None}
    high = n
    for _ in range(bisect):
        mid = (low + high) // 2
        if mid <= low or mid >= high:
            break
        if gap(mid) <= tolerance:
            high = mid
        else:
            low = mid
    return {"rule": rule, "n_steps": high, "largest_failing": low, "tried": tried, "attr": attrs[high],
            "gap": tried[high], "evaluated_passes": sum(tried)}


def l1_error(a: Tensor, ref: Tensor) -> float:
    return float((a.double() - ref.double()).abs().sum() / ref.double().abs().sum())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = H.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--quick", action="store_true", help="small CNN, 2 inputs, tolerance 5%%: seconds")
    p.add_argument("--photos", type=int, default=6)
    p.add_argument("--baselines", default="black,zeros,blur")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--rules", default="gausslegendre,riemann_trapezoid")
    p.add_argument("--bisect", type=int, default=3, help="bisection rounds after the doubling ladder")
    p.add_argument("--max-steps", type=int, default=2048)
    p.add_argument("--reference-steps", type=int, default=2000)
    p.add_argument("--reference-cases", type=int, default=3, help="cases checked against the reference")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    H.setup(threads=args.threads)
    warnings.filterwarnings("ignore")
    import heatlens as hl

    started = time.perf_counter()
    if args.quick:
        from heatlens.debug.training import INPUT_SIZE, seed_cnn

        clf = hl.wrap(seed_cnn(seed=0).eval(), input_size=INPUT_SIZE).to(args.device)
        xs = torch.rand((2, *INPUT_SIZE), generator=torch.Generator().manual_seed(0)).to(args.device)
        names = ["rand0", "rand1"]
        args.tolerance, args.reference_steps, args.reference_cases, args.max_steps = 0.05, 200, 1, 256
    else:
        clf = hl.load_model("efficientnet-lite0").to(args.device).eval()
        names = list(PHOTOS[: args.photos])
        xs = clf.preprocess(hl.data.sample_images(names)).to(args.device)
    net = clf.net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    with torch.inference_mode():
        targets = clf(xs).argmax(1).tolist()
    price = prices(clf, xs, targets[0], repeats=args.repeats)
    cost = lambda fwd, fb: fwd * price["forward"] + fb * price["forward_backward"]  # noqa: E731
    rules = args.rules.split(",")
    cases: list[dict[str, Any]] = []
    from heatlens.baselines import resolve_baseline

    bases = {b_name: resolve_baseline(clf, xs, b_name) for b_name in args.baselines.split(",")}
    for i, name in enumerate(names):  # photo by photo, every baseline: a cut-short run covers them all
        for b_name, base_all in bases.items():
            x, base, t = xs[i:i + 1], base_all[i:i + 1], targets[i]
            e = hl.explain(clf, x, "integrated_gradients", target=t, baseline=base, steps="auto",
                           tolerance=args.tolerance)
            passes = dict(e.extras["passes"])
            passes["forward"] += 1  # f(x), the clean pass
            case = {"photo": name, "baseline": b_name, "target": t,
                    "heatlens": {"passes": passes, "gap": float(e.extras["relative_gap"][0]),
                                 "gap_captum_formula": relative_gap(net, x, base, t, e.attributions),
                                 "cost_s": cost(passes["forward"], passes["forward_backward"])}}
            best = None
            for rule in rules:
                found = captum_search(net, x, base, t, rule, args.tolerance, args.bisect, args.max_steps)
                attr = found.pop("attr")
                if found["n_steps"] is not None:
                    found["cost_s"] = cost(0, found["n_steps"])
                    found["cost_lower_s"] = cost(0, found["largest_failing"] + 1)
                    if best is None or found["cost_s"] < best[0]["cost_s"]:
                        best = (found, attr)
                case[rule] = found
            if best is not None:
                case["captum_best_rule"] = best[0]["rule"]
                case["ratio"] = best[0]["cost_s"] / case["heatlens"]["cost_s"]
                case["ratio_lower"] = best[0]["cost_lower_s"] / case["heatlens"]["cost_s"]
            if len(cases) < args.reference_cases:
                ref = hl.explain(clf, x, "integrated_gradients", target=t, baseline=base,
                                 steps=args.reference_steps).attributions
                case["heatlens"]["error_vs_reference"] = l1_error(e.attributions, ref)
                if best is not None:
                    case["captum_error_vs_reference"] = l1_error(best[1], ref)
                case["reference_gap"] = relative_gap(net, x, base, t, ref)
            cases.append(case)
            if not args.no_json:  # partial results survive an interrupted run
                H.write_json("bench_ig_partial" + ("_quick" if args.quick else ""),
                             {"cases": cases, "prices": price, "environment": H.environment(args.device)},
                             Path(args.results) if args.results else H.RESULTS)
            print(f"  {b_name}/{name}: heatlens {passes} gap {case['heatlens']['gap']:.4f}; "
                  + ", ".join(f"{r} n={case[r]['n_steps']}" for r in rules)
                  + (f"; ratio {case['ratio']:.2f} (>= {case['ratio_lower']:.2f})" if "ratio" in case else ""),
                  flush=True)
    ratios = [c["ratio"] for c in cases if "ratio" in c]
    rows = [{"baseline": c["baseline"], "photo": c["photo"],
             "hl fwd/fb": f"{c['heatlens']['passes']['forward']}/{c['heatlens']['passes']['forward_backward']}",
             "hl gap": c["heatlens"]["gap"], "hl cost s": c["heatlens"]["cost_s"],
             **{f"{r} n": c[r]["n_steps"] for r in rules},
             "captum best s": c.get(c.get("captum_best_rule", ""), {}).get("cost_s"),
             "ratio": c.get("ratio"), "ratio low": c.get("ratio_lower"),
             "hl err": c["heatlens"].get("error_vs_reference"), "captum err": c.get("captum_error_vs_reference")}
            for c in cases]
    print(f"\nIG to a {100 * args.tolerance:g}% completeness gap; prices: forward "
          f"{price['forward'] * 1e3:.2f} ms, forward+backward {price['forward_backward'] * 1e3:.2f} ms per item")
    H.print_table(rows)
    summary = {"median_ratio": statistics.median(ratios) if ratios else None,
               "min_ratio": min(ratios) if ratios else None, "target_ratio": TARGET_RATIO,
               "cases_reaching_target": sum(r >= TARGET_RATIO for r in ratios), "cases": len(cases),
               "heatlens_all_within_tolerance": all(c["heatlens"]["gap"] <= args.tolerance for c in cases)}
    print(summary)
    payload = {"benchmark": "ig", "quick": args.quick, "tolerance": args.tolerance, "prices": price,
               "environment": H.environment(args.device), "cases": cases, "summary": summary,
               "reference_steps": args.reference_steps, "wall_s": time.perf_counter() - started}
    if not args.no_json:
        directory = Path(args.results) if args.results else H.RESULTS
        print(f"wrote {H.write_json('bench_ig' + ('_quick' if args.quick else ''), payload, directory)}")
    return payload


if __name__ == "__main__":
    main()
