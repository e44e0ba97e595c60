"""heatlens ``lime`` vs the ``lime`` package's LimeImageExplainer on efficientnet-lite0 (chelsea, 224x224).

    python -m benchmarks.bench_lime [--num-samples 1000] [--repeats 2] [--lime-batch 16] [--device cpu]

Both explain the same image with the same quickshift segments (lime gets them through
``segmentation_fn``), the same ``num_samples``, hide_color=None (segment means) and kernel width;
lime calls the model in batches of ``--lime-batch`` (16: the measured forward optimum on CPU).
Timed in alternation, best of ``--repeats``. Also measured: the forward passes alone (the floor for
both), and heatlens with lime's own random masks to show that the weights are the same.
Prints the time ratio and the top-5 segment agreement; writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HEATLENS_PROGRESS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import heatlens as hl  # noqa: E402
from heatlens.methods.segmentation import segment  # noqa: E402
from heatlens.methods.surrogate import lime  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls and the last result."""
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), out


def lime_classifier(model: hl.Classifier):
    """lime's classifier_fn: (B,H,W,C) [0,1] pixels -> (B,K) probabilities, model in inference mode."""
    def predict(images: np.ndarray) -> np.ndarray:
        x = model.preprocess(np.asarray(images, dtype=np.float32)).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return model(x).softmax(1).float().cpu().numpy()
    return predict


def lime_masks(seed: int, num_samples: int, s: int) -> np.ndarray:
    """The masks LimeImageExplainer(random_state=seed) draws (first row all on)."""
    masks = np.random.RandomState(seed).randint(0, 2, num_samples * s).reshape(num_samples, s)
    masks[0] = 1
    return masks


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lime-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lime.lime_image import LimeImageExplainer
    from skimage import data

    model = hl.load_model("efficientnet-lite0").to(args.device).eval()
    x = model.preprocess(data.chelsea())
    # float pixels in [0, 1]: with uint8 lime would round its segment-mean colours to integers
    pixels = model.deprocess(x)[0].astype(np.float64)  # the 224x224 crop lime sees
    t_seg, segs = best_of(lambda: segment(x, "quickshift", model=model), 1)
    s = int(segs.max()) + 1
    target = int(model(x).argmax())
    n, seed = args.num_samples, 0
    predict = lime_classifier(model)

    def run_lime():
        explainer = LimeImageExplainer(kernel_width=0.25, feature_selection="none", random_state=seed)
        return explainer.explain_instance(
            pixels, predict, labels=(target,), top_labels=None, hide_color=None, num_features=s,
            num_samples=n, batch_size=args.lime_batch, segmentation_fn=lambda _img: segs[0].cpu().numpy(),
            random_seed=0)

    def run_heatlens(**kw):
        return lime(model, x, target, segments=segs, num_samples=n, seed=seed, **kw)

    def run_forward():  # the same number of forward passes on the clean image: the floor for both
        from heatlens.batching import map_batches
        xb = x.contiguous(memory_format=torch.channels_last)
        # a real (copied) channels-last batch, as both explainers feed: an expanded view takes slow paths
        return map_batches(lambda a, b: model(xb.expand(b - a, -1, -1, -1).contiguous(memory_format=torch.channels_last)),
                           n, model=model, item_shape=model.input_size)

    run_lime.__name__, run_heatlens.__name__ = "lime", "heatlens"
    run_heatlens(), run_forward()  # warm-up (allocator, thread pools)
    times = {"lime": [], "heatlens": [], "forward": []}
    for _ in range(args.repeats):  # alternate so that machine load hits both alike
        for name, fn in (("lime", run_lime), ("heatlens", run_heatlens), ("forward", run_forward)):
            t, out = best_of(fn, 1)
            times[name].append(t)
            if name == "lime":
                ref = out
            elif name == "heatlens":
                ours = out
    ref_w = np.zeros(s)
    for f, w in ref.local_exp[target]:
        ref_w[f] = w
    same_masks = run_heatlens(masks=lime_masks(seed, n, s))
    max_err = float(np.abs(same_masks.extras["weights"][0].numpy() - ref_w).max())
    top_ref = [int(i) for i in np.argsort(-ref_w)[:5]]
    top_ours = ours.extras["weights"][0].argsort(descending=True)[:5].tolist()
    top_same = same_masks.extras["weights"][0].argsort(descending=True)[:5].tolist()
    t_lime, t_ours, t_fwd = min(times["lime"]), min(times["heatlens"]), min(times["forward"])
    result = {
        "benchmark": "lime", "model": "efficientnet-lite0", "image": "chelsea 224x224", "num_samples": n,
        "segments": s, "target": target, "lime_batch_size": args.lime_batch, "device": str(model.device),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "seconds": {"lime_package": t_lime, "heatlens": t_ours, "forward_only": t_fwd, "quickshift": t_seg,
                    "all_runs": times},
        "speedup_vs_lime": t_lime / t_ours,
        "heatlens_overhead_over_forward": t_ours - t_fwd, "lime_overhead_over_forward": t_lime - t_fwd,
        "same_masks_max_abs_weight_error": max_err,
        "top5_lime": top_ref, "top5_heatlens_same_masks": top_same, "top5_heatlens_own_seed": top_ours,
        "top5_overlap_own_seed": len(set(top_ref) & set(top_ours)),
        "top5_identical_same_masks": top_ref == top_same,
        "r2": {"lime": float(ref.score), "heatlens": float(ours.extras["r2"][0])},
    }
    print(f"lime package {t_lime:.2f} s | heatlens {t_ours:.2f} s | forward passes alone {t_fwd:.2f} s "
          f"| {s} segments, {n} samples, {torch.get_num_threads()} threads on {model.device}")
    print(f"speed-up vs lime: {t_lime / t_ours:.2f}x; overhead over the forward passes: heatlens "
          f"{t_ours - t_fwd:.2f} s, lime {t_lime - t_fwd:.2f} s")
    print(f"same masks: max |weight difference| {max_err:.2e}, top-5 identical: {top_ref == top_same}; "
          f"own seed: top-5 overlap {len(set(top_ref) & set(top_ours))}/5 (lime {top_ref}, heatlens {top_ours})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
    (RESULTS / f"bench_lime{suffix}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
