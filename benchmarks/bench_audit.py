"""Dataset audit throughput: ``heatlens.audit`` against the loop a Captum + Quantus user writes.

    python -m benchmarks audit [--quick] [--images 256] [--effnet-images 32] [--repeats 3] [--no-ray]

The job, on image files in a folder (decoding included): explain every image's predicted class with
Grad-CAM and Integrated Gradients (50 steps, zero baseline, Gauss-Legendre on both sides), and score each
explanation with insertion and deletion (patches of ``patch`` pixels, about 100 model evaluations per
curve, black fill, softmax probability). Models: efficientnet-lite0 (224x224, patch 8) and the digit-sum
conv net (``heatlens.debug.conv_net``, seeded weights, 28x56, patch 4) on ``heatlens data digit-sum`` PNGs.

Contenders, alternating in one process (``_harness.compare``), images per second from the median:

* ``heatlens audit``: ``hl.audit(model, folder, ...)`` with its defaults (shards of 64, automatic batch
  sizes), records written to Parquet/Zarr;
* ``captum+quantus default``: the loop of the tutorials: a DataLoader-style loop at its default batch of
  1 image, Captum ``LayerGradCam`` (upsampled with ``LayerAttribution.interpolate``) and
  ``IntegratedGradients`` at ``internal_batch_size=None``, Quantus ``RegionPerturbation`` (``order="morf"``:
  deletion, one region per step) at its default ``batch_size``. Quantus has no insertion metric: the
  loop gets it from the same ``RegionPerturbation`` run on the black image with a ``perturb_func`` that
  inserts the original pixels (same cost as its deletion);
* ``captum+quantus bs=B ibs=I``: the same loop at tuned knobs (B images per iteration and per Quantus
  call, Captum's ``internal_batch_size`` I); the fastest is "tuned".

The records the loop keeps in memory are the same quantities (prediction, both maps, four curves). Quantus
perturbs one region per step and evaluates the first ``regions`` regions; heatlens' curve reaches every
patch in ~100 steps: the same number of model evaluations, not the same curve.

Also measured: peak RSS of a fresh process auditing 1x and 10x the images (Grad-CAM only, so that 10x
stays short: memory must not grow with the dataset), and, unless ``--no-ray``, the Ray engine (2
workers on this machine, startup included) against local on the digit set. JSON:
``benchmarks/results/bench_audit[_quick|_<models>].json``. ``--quick``: 16 digit images, 1 repeat, no efficientnet,
no Ray, RSS at 16 vs 160 digits: a smoke test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _harness as H

IG_STEPS = 50
TUNED = {"effnet": ((8, 8), (8, 32), (16, 16)), "cnn": ((32, 256), (128, 1024), (256, 2048))}


# --- data and models -------------------------------------------------------------------------------
def photo_folder(root: Path, n: int) -> Path:
    """n JPEG files made from scikit-image's packaged photos (flipped / cropped variants beyond 10)."""
    from PIL import Image

    import heatlens as hl

    photos = hl.data.sample_images(hl.data.sample_names())
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        variant = i // len(photos)
        if variant % 2:
            img = img[:, ::-1]
        crop = (variant // 2) * 8
        img = img[crop: img.shape[0] - crop or None, crop: img.shape[1] - crop or None]
        Image.fromarray(np.ascontiguousarray(img)).save(root / f"photo_{i:05d}.jpg", quality=92)
    return root


def digit_folder(root: Path, n: int) -> Path:
    from heatlens.audit.cli import export_digit_sum

    export_digit_sum(root, split="test", shortcut="marker", n=n)
    return root


def digit_model():
    import heatlens as hl
    from heatlens.debug import conv_net
    from heatlens.debug.training import INPUT_SIZE

    return hl.wrap(conv_net(), input_size=INPUT_SIZE, labels=[str(k) for k in range(11)], name="digit_cnn").eval()


def files(folder: Path) -> list[str]:
    from heatlens.audit.data import as_source

    return list(as_source(folder).paths)


def cam_layer(model, x: torch.Tensor):
    """The layer heatlens' Grad-CAM picks by default, as (name, module), so Captum explains the same one."""
    from heatlens.methods.cam import find_layer
    from heatlens.models.hooks import resolve_layer

    with torch.no_grad():
        target = model(x).argmax(1)
    site = find_layer(model, x, target)
    return site.name, resolve_layer(model, site.name)[1]


# --- contenders --------------------------------------------------------------------------------------
def heatlens_audit(model, folder: Path, out: Path, patch: int, methods=("gradcam", "integrated_gradients"),
                   metrics=("insertion", "deletion"), **settings: Any):
    import heatlens as hl

    curve = {"granularity": patch, "steps": 100, "fill": "black"}

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # IG's completeness warning on an untrained CNN
            return hl.audit(model, folder, methods=list(methods), metrics=list(metrics), out=out, overwrite=True,
                            method_options={"integrated_gradients": {"steps": IG_STEPS}},
                            metric_options={m: curve for m in metrics}, **settings)

    return run


def _insert(arr: np.ndarray, indices: np.ndarray, indexed_axes=None, source: np.ndarray | None = None,
            **kwargs: Any) -> np.ndarray:
    """Quantus ``perturb_func`` for insertion: copy the original pixels at ``indices`` into ``arr`` (B, F)."""
    out = arr.copy()
    rows = np.arange(arr.shape[0])[:, None]
    out[rows, indices] = source.reshape(arr.shape[0], -1)[rows, indices]
    return out


def captum_quantus_loop(model, paths: list[str], layer, patch: int, batch: int, internal_batch_size: int | None,
                        quantus_batch: int | None):
    """The loop a Captum + Quantus user writes, over ``paths`` in batches of ``batch`` images."""
    import quantus
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    gradcam, ig = LayerGradCam(model, layer), IntegratedGradients(model)
    h, w = model.input_size[1:]
    regions = -(-h // patch) * -(-w // patch)
    regions = min(100, regions)

    def curves(x: torch.Tensor, target: np.ndarray, a: np.ndarray) -> tuple[list, list]:
        kw = {} if quantus_batch is None else {"batch_size": quantus_batch}
        common = dict(patch_size=patch, order="morf", regions_evaluation=regions, disable_warnings=True,
                      display_progressbar=False)
        xb = x.numpy()
        deletion = quantus.RegionPerturbation(perturb_baseline="black", **common)(
            model=model, x_batch=xb, y_batch=target, a_batch=a, device="cpu", **kw)
        black = np.broadcast_to(xb.min(axis=(1, 2, 3), keepdims=True), xb.shape).copy()
        insertion = quantus.RegionPerturbation(perturb_func=_insert, perturb_func_kwargs={"source": xb}, **common)(
            model=model, x_batch=black, y_batch=target, a_batch=a, device="cpu", **kw)
        return insertion, deletion

    def run():
        records = []
        for start in range(0, len(paths), batch):
            x = model.preprocess(paths[start:start + batch])
            with torch.no_grad():
                logits = model(x)
            target = logits.argmax(1)
            cam = LayerAttribution.interpolate(gradcam.attribute(x, target=target), (h, w), "bilinear")
            attr = ig.attribute(x, target=target, n_steps=IG_STEPS, internal_batch_size=internal_batch_size)
            maps = {"gradcam": cam.detach(), "integrated_gradients": attr.detach().abs().sum(1, keepdim=True)}
            tgt = target.numpy()
            for name, m in maps.items():
                ins, dele = curves(x, tgt, m.numpy())
                records.append({"method": name, "prediction": tgt, "insertion": ins, "deletion": dele,
                                "map": m.numpy().astype(np.float16)})
        return records

    return run


# --- one model ---------------------------------------------------------------------------------------
def bench_model(name: str, model, folder: Path, patch: int, repeats: int, tuned: tuple, work: Path,
                default_images: int | None = None) -> dict[str, Any]:
    paths = files(folder)
    x0 = model.preprocess(paths[:1])
    layer_name, layer = cam_layer(model, x0)
    contenders = {"heatlens audit": heatlens_audit(model, folder, work / f"{name}-audit", patch)}
    # the default loop goes one image at a time, so its images/s does not depend on how many it gets:
    # on a loaded machine it may run on the first default_images only
    n_default = min(len(paths), default_images or len(paths))
    contenders["captum+quantus default"] = captum_quantus_loop(model, paths[:n_default], layer, patch, 1, None, None)
    for b, ibs in tuned:
        contenders[f"captum+quantus bs={b} ibs={ibs}"] = captum_quantus_loop(model, paths, layer, patch, b, ibs, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = H.compare(contenders, repeats=repeats, warmup=0, memory=False)
    n = len(paths)
    counts = {k: (n_default if k == "captum+quantus default" else n) for k in runs}
    rate = {k: counts[k] / v.median for k, v in runs.items()}
    ours = rate["heatlens audit"]
    best = max((k for k in rate if k.startswith("captum") and k != "captum+quantus default"), key=rate.get)
    return {
        "model": name, "images": n, "images_per_contender": counts, "layer": layer_name, "patch": patch,
        "runs": runs, "images_per_s": rate, "speedup_vs_default": ours / rate["captum+quantus default"],
        "speedup_vs_tuned": ours / rate[best], "tuned": best,
    }


# --- memory: fresh processes at 1x and 10x -----------------------------------------------------------
RSS_SCRIPT = """
import json, resource, sys, warnings
sys.path.insert(0, sys.argv[4])
import torch
torch.set_num_threads(int(sys.argv[5]))
import heatlens as hl
from benchmarks.bench_audit import digit_model
model = hl.load_model("efficientnet-lite0") if sys.argv[1] == "effnet" else digit_model()
warnings.simplefilter("ignore")
hl.audit(model, sys.argv[2], methods=["gradcam"], out=sys.argv[3], overwrite=True)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss(model: str, folder: Path, out: Path, threads: int) -> float:
    env = dict(os.environ, HEATLENS_PROGRESS="0")
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, model, str(folder), str(out), root, str(threads)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def bench_memory(work: Path, sizes: dict[str, int], threads: int) -> dict[str, Any]:
    results = {}
    for name, n in sizes.items():
        make = photo_folder if name == "effnet" else digit_folder
        small, large = make(work / f"rss-{name}-1x", n), make(work / f"rss-{name}-10x", 10 * n)
        one, ten = peak_rss(name, small, work / "rss-a", threads), peak_rss(name, large, work / "rss-b", threads)
        results[name] = {"images_1x": n, "images_10x": 10 * n, "peak_rss_mb_1x": one, "peak_rss_mb_10x": ten,
                         "ratio": ten / one}
    return results


# --- Ray vs local ------------------------------------------------------------------------------------
def bench_ray(folder: Path, work: Path, patch: int) -> dict[str, Any]:
    import ray

    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
                                       "OMP_NUM_THREADS": "1"}})
    spec = "benchmarks.bench_audit:digit_model"
    try:
        ray_s, _ = H.time_once(heatlens_audit(spec, folder, work / "ray", patch, engine="ray", workers=2))
    finally:
        ray.shutdown()
    local_s, _ = H.time_once(heatlens_audit(spec, folder, work / "local", patch))
    n = len(files(folder))
    return {"images": n, "ray_s": ray_s, "local_s": local_s, "ray_images_per_s": n / ray_s,
            "local_images_per_s": n / local_s, "ray_over_local_time": ray_s / local_s, "workers": 2}


def _partial(results: dict[str, Any], args: Any) -> None:
    """Print each model's numbers as soon as they exist (a long run on a loaded machine may be cut short)."""
    for name, r in results.items():
        print(f"[partial] {name}: " + ", ".join(f"{k} {v:.3f} images/s" for k, v in r["images_per_s"].items()),
              flush=True)


def _tuned(text: str | None, quick: bool) -> dict[str, tuple]:
    """``--tuned 'cnn:32x256,32x1024;effnet:4x8'`` -> model -> ((B, ibs), ...); TUNED by default."""
    if text is None:
        return {k: v[:1] for k, v in TUNED.items()} if quick else dict(TUNED)
    out = dict(TUNED)
    for part in text.split(";"):
        model, _, knobs = part.partition(":")
        out[model.strip()] = tuple(tuple(int(v) for v in k.split("x")) for k in knobs.split(","))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 digit images, 1 repeat, no efficientnet, no Ray")
    p.add_argument("--images", type=int, default=256, help="digit images (default 256)")
    p.add_argument("--effnet-images", type=int, default=32, help="efficientnet-lite0 images (default 32)")
    p.add_argument("--rss-images", type=int, default=None, help="1x size of the memory runs (default: --images)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray engine run")
    p.add_argument("--models", default="cnn,effnet", help="throughput on these models (cnn, effnet; '' for none)")
    p.add_argument("--no-rss", action="store_true", help="skip the 1x / 10x memory runs")
    p.add_argument("--default-images", type=int, default=None,
                   help="run the batch-1 default loop on this many images only (its images/s is per image)")
    p.add_argument("--tuned", default=None, help="peer knobs to try, e.g. 'cnn:32x256,32x1024;effnet:4x8' (B x ibs)")
    args = p.parse_args(argv)
    H.setup(threads=args.threads)
    quick = args.quick
    repeats = 1 if quick else args.repeats
    n_digits = 16 if quick else args.images
    work = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        digits = digit_folder(work / "digits", n_digits)
        tuned = _tuned(args.tuned, quick)
        models = [m for m in args.models.split(",") if m]
        if "cnn" in models:
            results["cnn"] = bench_model("cnn", digit_model(), digits, 4, repeats, tuned["cnn"], work,
                                         args.default_images)
            _partial(results, args)
        if "effnet" in models and not quick:
            import heatlens as hl

            photos = photo_folder(work / "photos", args.effnet_images)
            results["effnet"] = bench_model("effnet", hl.load_model("efficientnet-lite0").eval(), photos, 8, repeats,
                                            tuned["effnet"], work, args.default_images)
            _partial(results, args)
        rss_n = 16 if quick else (args.rss_images or n_digits)
        sizes = {"cnn": rss_n} if quick else {"cnn": rss_n, "effnet": max(8, args.effnet_images)}
        memory = {} if args.no_rss else bench_memory(work, sizes, args.threads)
        ray_result = None if (quick or args.no_ray) else bench_ray(digits, work, 4)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, r in results.items():
        for contender, timing in r["runs"].items():
            rows.append({"model": name, "images": r["images_per_contender"][contender], "contender": contender,
                         "median s": timing.median, "images/s": r["images_per_s"][contender],
                         "heatlens speedup": r["images_per_s"]["heatlens audit"] / r["images_per_s"][contender]})
    print(f"audit throughput: gradcam + integrated_gradients({IG_STEPS}) + insertion/deletion, "
          f"{torch.get_num_threads()} threads, median of {repeats}, load average {load_before} -> {os.getloadavg()}")
    H.print_table(rows, ["model", "images", "contender", "median s", "images/s", "heatlens speedup"])
    for name, r in results.items():
        print(f"{name}: heatlens audit {r['images_per_s']['heatlens audit']:.2f} images/s = "
              f"{r['speedup_vs_default']:.2f}x the Captum+Quantus loop at defaults, {r['speedup_vs_tuned']:.2f}x "
              f"at its best knobs ({r['tuned']})")
    for name, m in memory.items():
        print(f"peak RSS {name}: {m['peak_rss_mb_1x']:.0f} MiB at {m['images_1x']} images, "
              f"{m['peak_rss_mb_10x']:.0f} MiB at {m['images_10x']} ({m['ratio']:.2f}x)")
    if ray_result:
        print(f"ray (2 workers, startup included) {ray_result['ray_s']:.1f} s vs local {ray_result['local_s']:.1f} s "
              f"on {ray_result['images']} digit images ({ray_result['ray_over_local_time']:.2f}x the time)")
    payload = {"benchmark": "audit", "quick": quick, "repeats": repeats, "ig_steps": IG_STEPS,
               "environment": H.environment(args.device), "load_average_before": list(load_before),
               "load_average_after": list(os.getloadavg()), "seconds": seconds, "models": results,
               "memory": memory, "ray": ray_result}
    if not args.no_json:
        suffix = "_quick" if quick else ("" if args.models == "cnn,effnet" else "_" + args.models.replace(",", "_"))
        print(f"wrote {H.write_json('bench_audit' + suffix, payload)}")
    return payload


if __name__ == "__main__":
    main()
