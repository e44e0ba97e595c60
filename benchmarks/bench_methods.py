"""Every heatlens method against Captum at matching settings, and against the hardware floor.

    python -m benchmarks methods [--quick] [--device cpu|cuda] [--models effnet,cnn] [--methods saliency,...]

Models: efficientnet-lite0 (shipped weights, scikit-image's chelsea, 224x224) and the seed's small CNN
(``heatlens.debug.seed_cnn``, untrained and seeded, one random 3x28x56 input). For each model the
benchmark first measures the **pass floor**: the time per item of one forward pass (``inference_mode``)
and of one forward+backward pass (input gradient, frozen parameters) at several batch sizes, in NCHW
and channels-last layouts, keeping the fastest. Then, for every method, alternating in one process:

* heatlens with the engine's automatic batch size (what a user gets),
* Captum at its default settings, and at each value of its batch knob (``internal_batch_size``,
  ``nt_samples_batch_size``, ``perturbations_per_eval``) in ``SWEEP``: the best of those is "Captum tuned",
  and prints median seconds per explanation, Captum default / heatlens and Captum tuned / heatlens
  (above 1: heatlens faster), the **overhead ratio** = heatlens time / (passes the method needs x the
  fastest per-item pass time), the **feasible overhead** (the same, with each pass priced at the
  best batch size the method's pass count allows: one image's single backward cannot be batched),
  the memory the call added (``MemoryWatch``), and the largest attribution difference to Captum for
  the deterministic methods (same maths, so it should be rounding). JSON goes to
  ``benchmarks/results/bench_methods[_cuda].json`` (``--results DIR`` elsewhere).

``--quick``: the small CNN only, one repeat, few steps and samples, one Captum knob value: well under a
minute, for the tests.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _harness as H

SWEEP = (4, 8, 16, 32)  # Captum batch-knob values tried for "Captum tuned"
FLOOR_BATCHES = {"effnet": (1, 2, 4, 8, 16), "cnn": (1, 8, 32, 128, 512)}  # 32 is slower than 16 on CPU
TARGETS = {"overhead": 1.15, "vs_captum_default": 2.0, "vs_captum_tuned": 1.2}


# --- the models ---------------------------------------------------------------------------------
@dataclass
class Setup:
    """One model under test and the settings every method uses on it (the same for both libraries)."""

    name: str
    clf: Any  # heatlens Classifier
    net: torch.nn.Module  # the raw module Captum gets (no wrapper overhead)
    x: Tensor  # (1,C,H,W)
    target: int
    background: Tensor  # (M,C,H,W) references for GradientSHAP / DeepLIFT-SHAP
    segments: Tensor  # (1,H,W) grid superpixels for feature ablation, LIME, KernelSHAP
    settings: dict[str, Any]


def settings(model: str, quick: bool) -> dict[str, Any]:
    """Hyperparameters per model; ``quick`` shrinks every count so the whole run takes seconds."""
    big = model == "effnet"
    s = {
        "steps": 50, "n_samples_smooth": 50, "n_samples_gshap": 5, "n_background": 4,
        "window": 32 if big else 8, "stride": 16 if big else 4, "cell": 16 if big else 4,
        "n_masks": 1000 if big else 4000, "lime_samples": 1000, "shap_samples": 500 if big else 2000,
    }
    if quick:
        s.update(steps=8, n_samples_smooth=8, n_background=2, window=14, stride=14, cell=14,
                 n_masks=64, lime_samples=64, shap_samples=64)
    return s


def load(model: str, device: str, quick: bool) -> Setup:
    """Build the model, its input, target, background and segments on ``device``."""
    import heatlens as hl
    from heatlens.methods.perturbation import grid_segments

    gen = torch.Generator().manual_seed(0)
    if model == "effnet":
        clf, x = H.effnet_chelsea(device)
    elif model == "cnn":
        from heatlens.debug.training import INPUT_SIZE, seed_cnn

        clf = hl.wrap(seed_cnn(seed=0).eval(), input_size=INPUT_SIZE).to(device)
        x = torch.rand((1, *INPUT_SIZE), generator=gen).to(device)
    else:
        raise ValueError(f"unknown model {model!r}; use effnet or cnn")
    cfg = settings(model, quick)
    low, high = clf.input_range
    background = (low + (high - low) * torch.rand((cfg["n_background"], *x.shape[1:]), generator=gen).to(device))
    with torch.inference_mode():
        target = int(clf(x).argmax(1))
    segments = grid_segments(tuple(x.shape[-2:]), cfg["cell"], 1).to(device)
    return Setup(model, clf, clf.net, x, target, background, segments, cfg)


# --- the pass floor -----------------------------------------------------------------------------
def pass_floor(s: Setup, batches: Sequence[int], repeats: int) -> dict[str, Any]:
    """Per-item seconds of one forward and one forward+backward pass at each batch size and layout.

    Returns {"forward": {layout: {batch: s/item}}, "backward": {...}, "best_forward", "best_backward"}.
    The backward pass is what heatlens runs: input gradient of the target score, parameters frozen.
    """
    from heatlens.models.hooks import frozen

    table: dict[str, dict[str, dict[int, float]]] = {"forward": {}, "backward": {}}
    with frozen(s.clf):
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for kind in ("forward", "backward"):
                row = table[kind].setdefault(layout, {})
                for b in batches:
                    xb = s.x.expand(b, -1, -1, -1).contiguous(memory_format=fmt)
                    tb = torch.full((b,), s.target, dtype=torch.long, device=s.x.device)
                    fn = _forward(s.clf, xb) if kind == "forward" else _backward(s.clf, xb, tb)
                    row[b] = _median_time(fn, repeats) / b
    best = {k: min(min(r.values()) for r in v.values()) for k, v in table.items()}
    return {**table, "best_forward": best["forward"], "best_backward": best["backward"]}


def _forward(clf, xb: Tensor) -> Callable[[], Any]:
    def run() -> Tensor:
        with torch.inference_mode():
            return clf(xb)

    return run


def _backward(clf, xb: Tensor, tb: Tensor) -> Callable[[], Any]:
    def run() -> Tensor:
        with torch.enable_grad():
            xg = xb.detach().requires_grad_(True)
            return torch.autograd.grad(clf.score(xg, tb).sum(), xg)[0]

    return run


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(max(1, repeats)):
        seconds, _ = H.time_once(fn)
        times.append(seconds)
    return statistics.median(times)


def floor_seconds(floor: dict[str, Any], passes: tuple[int, int], feasible: bool) -> float:
    """Seconds the method's passes (forward items, forward+backward items) cost at the floor.

    feasible: price c passes at the fastest per-item cost among batch sizes <= c (a method with one
    backward cannot run it at batch 8); otherwise at the overall fastest (the issue's definition).
    """
    total = 0.0
    for kind, count in zip(("forward", "backward"), passes):
        if count <= 0:
            continue
        if not feasible:
            total += count * floor[f"best_{kind}"]
            continue
        per_item = min(cost for row in floor[kind].values() for b, cost in row.items() if b <= max(count, 1))
        total += count * per_item
    return total


# --- the methods --------------------------------------------------------------------------------
@dataclass
class Case:
    """One method: how heatlens and Captum call it, how many passes it needs, which Captum knob to sweep."""

    name: str
    heatlens: Callable[[Setup], Callable[[], Tensor]]
    passes: Callable[[Setup, Any], tuple[int, int]]  # (forward items, forward+backward items) for one image
    captum: Callable[[Setup, int | None], Callable[[], Tensor]] | None = None
    knob: str | None = None  # Captum's batch parameter, swept over SWEEP
    deterministic: bool = True  # compare attributions with Captum's


def _hl(name: str, **kwargs: Any) -> Callable[[Setup], Callable[[], Tensor]]:
    def make(s: Setup) -> Callable[[], Tensor]:
        from heatlens.methods import get_method

        method = get_method(name)
        extra = {key: (value(s) if callable(value) else value) for key, value in kwargs.items()}

        def run():
            return method(s.clf, s.x, s.target, **extra)

        return run

    return make


def _captum(cls_name: str, build: Callable[[Setup, Any, int | None], dict[str, Any]], *,
            wrapper: str | None = None, layer: bool = False, grad: bool = True):
    """A Captum contender: ``cls(net)`` (or ``NoiseTunnel(cls(net))``, ``LayerGradCam(net, layer)``)."""

    def make(s: Setup, knob: int | None) -> Callable[[], Tensor]:
        import captum.attr as ca

        cls = getattr(ca, cls_name)
        algo = cls(s.net, _layer_module(s)) if layer else cls(s.net)
        if wrapper is not None:
            algo = getattr(ca, wrapper)(algo)
        kwargs = build(s, algo, knob)

        def run() -> Tensor:
            if grad:
                return algo.attribute(s.x, target=s.target, **kwargs)
            with torch.no_grad():  # Captum's fastest use of forward-only methods
                return algo.attribute(s.x, target=s.target, **kwargs)

        return run

    return make


def _layer_module(s: Setup) -> torch.nn.Module:
    """The layer heatlens' CAMs pick by default, as a module of the raw net (for LayerGradCam)."""
    from heatlens.methods.cam import gradcam
    from heatlens.models.hooks import resolve_layer

    name = gradcam(s.clf, s.x, s.target).params["layer"]
    return resolve_layer(s.net, name)[1]


def _knob(name: str, knob: int | None) -> dict[str, Any]:
    return {} if knob is None else {name: knob}


def _cam_channels(s: Setup) -> int:
    """Channels K of the default CAM layer (Score-CAM and Ablation-CAM run one forward per channel)."""
    seen: list[int] = []
    handle = _layer_module(s).register_forward_hook(lambda _m, _i, out: seen.append(int(out.shape[1])))
    try:
        with torch.inference_mode():
            s.net(s.x)
    finally:
        handle.remove()
    return seen[-1]


def _windows(s: Setup) -> int:
    from heatlens.methods.perturbation import window_counts

    nh, nw = window_counts(tuple(s.x.shape[-2:]), (s.settings["window"],) * 2, (s.settings["stride"],) * 2)
    return nh * nw


def _n_segments(s: Setup) -> int:
    return int(s.segments.max()) + 1


def _sigma(s: Setup) -> float:
    return 0.15 * float(s.x.max() - s.x.min())


def cases() -> list[Case]:
    """Every benchmarked method (Captum-shared ones first), settings matched between the libraries.

    The propagation methods run with ``activations="captum"``: Captum hooks ``nn.ReLU`` (and, for
    DeepLIFT, a few more module types) but not ``nn.ReLU6``, so on efficientnet-lite0 it computes the
    plain gradient there; heatlens' default also gives ReLU6 the rule, which is different work.
    """
    sal = dict(output="logit")
    one_backward = lambda s, e: (0, 1)  # noqa: E731
    return [
        Case("saliency", _hl("saliency"), one_backward,
             _captum("Saliency", lambda s, a, k: {"abs": False})),
        Case("input_x_gradient", _hl("input_x_gradient"), one_backward,
             _captum("InputXGradient", lambda s, a, k: {})),
        Case("integrated_gradients",
             _hl("integrated_gradients", steps=lambda s: s.settings["steps"], baseline="zeros"),
             lambda s, e: (0, s.settings["steps"]),
             _captum("IntegratedGradients", lambda s, a, k: {
                 "baselines": 0.0, "n_steps": s.settings["steps"], "method": "gausslegendre",
                 **_knob("internal_batch_size", k)}), knob="internal_batch_size"),
        Case("gradient_shap",
             _hl("gradient_shap", background=lambda s: s.background, n_samples=lambda s: s.settings["n_samples_gshap"],
                 noise=0.0, seed=0),
             lambda s, e: (0, s.settings["n_samples_gshap"]),
             _captum("GradientShap", lambda s, a, k: {"baselines": s.background,
                                                      "n_samples": s.settings["n_samples_gshap"], "stdevs": 0.0}),
             deterministic=False),
        Case("deeplift", _hl("deeplift", baseline="zeros", activations="captum"), lambda s, e: (0, 2),
             _captum("DeepLift", lambda s, a, k: {"baselines": 0.0})),
        Case("deeplift_shap", _hl("deeplift_shap", background=lambda s: s.background, activations="captum"),
             lambda s, e: (0, 2 * s.background.shape[0]),
             _captum("DeepLiftShap", lambda s, a, k: {"baselines": s.background}), deterministic=False),
        Case("guided_backprop", _hl("guided_backprop", activations="captum"), one_backward,
             _captum("GuidedBackprop", lambda s, a, k: {})),
        Case("deconvnet", _hl("deconvnet", activations="captum"), one_backward,
             _captum("Deconvolution", lambda s, a, k: {})),
        Case("smoothgrad",
             _hl("smoothgrad", n_samples=lambda s: s.settings["n_samples_smooth"], noise=0.15, seed=0),
             lambda s, e: (0, s.settings["n_samples_smooth"]),
             _captum("Saliency", lambda s, a, k: {
                 "nt_type": "smoothgrad", "nt_samples": s.settings["n_samples_smooth"], "stdevs": _sigma(s),
                 "abs": False, **_knob("nt_samples_batch_size", k)}, wrapper="NoiseTunnel"),
             knob="nt_samples_batch_size", deterministic=False),
        Case("gradcam", _hl("gradcam", relu=True), one_backward,
             _captum("LayerGradCam", lambda s, a, k: {"relu_attributions": True}, layer=True)),
        Case("occlusion",
             _hl("occlusion", window=lambda s: s.settings["window"], stride=lambda s: s.settings["stride"],
                 baseline="zeros", **sal),
             lambda s, e: (_windows(s) + 1, 0),
             _captum("Occlusion", lambda s, a, k: {
                 "sliding_window_shapes": (s.x.shape[1], s.settings["window"], s.settings["window"]),
                 "strides": (s.x.shape[1], s.settings["stride"], s.settings["stride"]), "baselines": 0.0,
                 **_knob("perturbations_per_eval", k)}, grad=False), knob="perturbations_per_eval"),
        Case("feature_ablation",
             _hl("feature_ablation", segments=lambda s: s.segments, baseline="zeros", **sal),
             lambda s, e: (_n_segments(s) + 1, 0),
             _captum("FeatureAblation", lambda s, a, k: {
                 "feature_mask": s.segments[:, None], "baselines": 0.0,
                 **_knob("perturbations_per_eval", k)}, grad=False), knob="perturbations_per_eval"),
        # heatlens only (no Captum twin at matching settings): overhead ratio alone
        *[Case(name, _hl(name), one_backward) for name in ("gradcam_pp", "xgradcam", "hirescam", "layercam")],
        Case("eigencam", _hl("eigencam"), lambda s, e: (1, 0)),
        Case("scorecam", _hl("scorecam"), lambda s, e: (_cam_channels(s) + 1, 0)),
        Case("ablationcam", _hl("ablationcam"), lambda s, e: (_cam_channels(s) + 1, 0)),
        Case("rise", _hl("rise", n_masks=lambda s: s.settings["n_masks"], seed=0, **sal),
             lambda s, e: (s.settings["n_masks"], 0)),
        Case("kernel_shap",
             _hl("kernel_shap", segments=lambda s: s.segments, n_samples=lambda s: s.settings["shap_samples"], seed=0),
             lambda s, e: (int(e.extras["n_evaluations"].sum()), 0)),
        Case("lime", _hl("lime", segments=lambda s: s.segments, num_samples=lambda s: s.settings["lime_samples"],
                         seed=0), lambda s, e: (s.settings["lime_samples"], 0)),
    ]


# --- running ------------------------------------------------------------------------------------
def bench_case(case: Case, s: Setup, floor: dict[str, Any], repeats: int, sweep: Sequence[int]) -> dict[str, Any]:
    """Time one method on one model: heatlens, Captum default and each Captum knob value, in alternation."""
    contenders = {"heatlens": case.heatlens(s)}
    if case.captum is not None:
        contenders["captum default"] = case.captum(s, None)
        for k in (sweep if case.knob else ()):
            contenders[f"captum {case.knob}={k}"] = case.captum(s, k)
    runs = H.compare(contenders, repeats=repeats)
    ours = runs["heatlens"]
    explanation = ours.result
    passes = case.passes(s, explanation)
    ideal, feasible = floor_seconds(floor, passes, False), floor_seconds(floor, passes, True)
    out: dict[str, Any] = {
        "method": case.name, "model": s.name, "runs": runs, "heatlens_s": ours.median,
        "passes": {"forward": passes[0], "forward_backward": passes[1]},
        "floor_s": ideal, "feasible_floor_s": feasible,
        "overhead_ratio": ours.median / ideal, "feasible_overhead_ratio": ours.median / feasible,
        "heatlens_memory_mb": ours.peak_delta_mb,
    }
    if case.captum is not None:
        default = runs["captum default"]
        tuned_name = min((n for n in runs if n.startswith("captum")), key=lambda n: runs[n].median)
        tuned = runs[tuned_name]
        out.update(captum_default_s=default.median, captum_tuned_s=tuned.median, captum_tuned=tuned_name,
                   speedup_vs_captum_default=default.median / ours.median,
                   speedup_vs_captum_tuned=tuned.median / ours.median, captum_memory_mb=tuned.peak_delta_mb)
        if case.deterministic:
            ref = tuned.result.detach()
            mine = explanation.attributions.detach()
            # per-location methods return (N,1,H,W); Captum repeats the score over channels
            mine = mine.expand_as(ref) if mine.dim() == ref.dim() and mine.shape[1] == 1 else mine.reshape(ref.shape)
            out["max_rel_difference"] = float((mine - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    return out


def row(res: dict[str, Any]) -> dict[str, Any]:
    """One line of the printed table."""
    return {
        "model": res["model"], "method": res["method"], "heatlens s": res["heatlens_s"],
        "captum dflt s": res.get("captum_default_s"), "captum tuned s": res.get("captum_tuned_s"),
        "x dflt": res.get("speedup_vs_captum_default"), "x tuned": res.get("speedup_vs_captum_tuned"),
        "passes f/fb": f"{res['passes']['forward']}/{res['passes']['forward_backward']}",
        "overhead": res["overhead_ratio"], "feasible ovh": res["feasible_overhead_ratio"],
        "mem MB": res["heatlens_memory_mb"], "captum mem MB": res.get("captum_memory_mb"),
        "rel diff": res.get("max_rel_difference"),
    }


def verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Which of the issue's targets hold, per method and model, and the worst offenders."""
    def failing(key: str, bad: Callable[[float], bool]) -> list[str]:
        return [f"{r['model']}/{r['method']} {r[key]:.2f}" for r in results if key in r and bad(r[key])]

    return {
        "overhead_above_1.15": failing("overhead_ratio", lambda v: v > TARGETS["overhead"]),
        "feasible_overhead_above_1.15": failing("feasible_overhead_ratio", lambda v: v > TARGETS["overhead"]),
        "below_2x_captum_default": failing("speedup_vs_captum_default", lambda v: v < TARGETS["vs_captum_default"]),
        "below_1.2x_captum_tuned": failing("speedup_vs_captum_tuned", lambda v: v < TARGETS["vs_captum_tuned"]),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = H.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--quick", action="store_true", help="small CNN only, 1 repeat, few steps: seconds")
    p.add_argument("--models", default=None, help="comma-separated: effnet,cnn (default both; --quick: cnn)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default all)")
    p.add_argument("--results", default=None, help="directory for the JSON (default benchmarks/results)")
    p.add_argument("--sweep", default=None, help="Captum batch-knob values, comma-separated (default 4,8,16,32)")
    args = p.parse_args(argv)
    H.setup(threads=args.threads)
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")  # Captum's note
    repeats = 1 if args.quick else args.repeats
    sweep = tuple(int(v) for v in args.sweep.split(",")) if args.sweep else ((8,) if args.quick else SWEEP)
    models = (args.models or ("cnn" if args.quick else "effnet,cnn")).split(",")
    chosen = cases()
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - {c.name for c in chosen})
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; benchmarked: {', '.join(c.name for c in chosen)}")
        chosen = [c for c in chosen if c.name in wanted]
    started = time.perf_counter()
    results, floors = [], {}
    for model in models:
        s = load(model, args.device, args.quick)
        batches = FLOOR_BATCHES[model][:3] if args.quick else FLOOR_BATCHES[model]
        floors[model] = floor = pass_floor(s, batches, repeats=max(3, repeats))
        print(f"{model}: fastest per-item forward {floor['best_forward'] * 1e3:.3f} ms, "
              f"forward+backward {floor['best_backward'] * 1e3:.3f} ms")
        for case in chosen:
            results.append(bench_case(case, s, floor, repeats, sweep))
            print(f"  {model}/{case.name}: {results[-1]['heatlens_s']:.4f} s", flush=True)
    rows = [row(r) for r in results]
    print(f"\nheatlens methods vs Captum, device {args.device}, {torch.get_num_threads()} threads, "
          f"median of {repeats}; x = Captum time / heatlens time")
    H.print_table(rows)
    checks = verdict(results)
    for key, items in checks.items():
        print(f"{key}: {', '.join(items) if items else 'none'}")
    payload = {
        "benchmark": "methods", "quick": args.quick, "repeats": repeats, "captum_sweep": list(sweep),
        "environment": H.environment(args.device), "targets": TARGETS, "floors": floors,
        "results": results, "verdict": checks, "wall_s": time.perf_counter() - started,
    }
    if not args.no_json:
        suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
        directory = Path(args.results) if args.results else H.RESULTS
        print(f"wrote {H.write_json('bench_methods' + suffix, payload, directory)}")
    return payload


if __name__ == "__main__":
    main()
