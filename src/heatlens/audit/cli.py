"""``heatlens audit ...`` and ``heatlens data ...``, registered in ``heatlens.cli`` as subcommand builders.

    heatlens audit DATA --model M --method gradcam,integrated_gradients:steps=32 --metric insertion,deletion
                   --out DIR [--engine local|ray] [--resume | --overwrite] [--shard-size 64] [--map-size 64]
                   [--workers N] [--ray-address ADDR] [--recommend] [--weights FILE] [--input-size C,H,W] [--param KEY=VALUE]
    heatlens data digit-sum --shortcut marker --split test --out DIR [--n 1000] [--seed 0]

Method and metric settings use the CLI's own syntax (``NAME:KEY=VALUE``, ``--param [METHOD:]KEY=VALUE``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_audit_command(sub: Any, parents: Any) -> None:
    """The ``audit`` subcommand (``parents``: the CLI's shared parent parsers)."""
    from ..cli import METHOD_HELP, PARAM_HELP, _input_size

    p = sub.add_parser("audit", parents=[parents.common], help="explain and score a whole dataset into a resumable store",
                       description="Explain every image of a dataset with each method, score each explanation "
                                   "with each metric and write a Parquet table, Zarr maps and a manifest to --out.")
    p.add_argument("data", nargs="+", help="a folder (ImageFolder class sub-folders or flat) or image files")
    p.add_argument("--model", default="efficientnet-lite0",
                   help="zoo name, .keras / .pt2 file or package.module:function (default efficientnet-lite0)")
    p.add_argument("--weights", default=None, help="state-dict file for a .pt2 or package.module:function model")
    p.add_argument("--input-size", default=None, type=_input_size, metavar="C,H,W",
                   help="input size of a package.module:function model that does not say, e.g. 3,224,224")
    p.add_argument("--method", default="gradcam", help=METHOD_HELP)
    p.add_argument("--param", action="append", default=[], metavar="[METHOD:]KEY=VALUE", help=PARAM_HELP)
    p.add_argument("--metric", default="", help="comma-separated metric names, each optionally with settings, "
                                                "e.g. 'insertion,deletion:steps=50' (default: none)")
    p.add_argument("--out", required=True, help="the audit folder")
    p.add_argument("--engine", default="local", choices=("local", "ray"), help="local (default) or ray")
    p.add_argument("--resume", action="store_true", help="finish an interrupted audit in --out (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an audit already in --out")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard (default 64)")
    p.add_argument("--map-size", type=int, default=64, help="longer side of the stored maps (default 64)")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: the cluster's CPUs)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one here")
    p.add_argument("--recommend", action="store_true",
                   help="afterwards, rank the methods per class on up to 4 images each (hl.recommend_per_class) "
                        "into DIR/recommendation.parquet and the report")
    p.set_defaults(run=cmd_audit)


def add_data_command(sub: Any, parents: Any) -> None:
    """The ``data`` subcommand: export built-in datasets as image folders."""
    p = sub.add_parser("data", help="export heatlens' built-in datasets as image folders",
                       description="Write a built-in dataset as PNG files in ImageFolder layout (DIR/<label>/).")
    data_sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    d = data_sub.add_parser("digit-sum", help="the digit-sum task with a planted shortcut (heatlens.debug)",
                            description="Two handwritten digits side by side, label = their sum (0-10); the "
                                        "shortcut is planted in the train split only.")
    d.add_argument("--shortcut", default=None, help="same_digit, marker, tint or border (default: none)")
    d.add_argument("--split", default="test", choices=("train", "test"), help="train or test (default test)")
    d.add_argument("--n", type=int, default=None, help="number of images (default 5000 train, 1000 test)")
    d.add_argument("--seed", type=int, default=0, help="which digit pairs are drawn (default 0)")
    d.add_argument("--out", required=True, help="output folder")
    d.set_defaults(run=cmd_data_digit_sum)


def cmd_audit(args: argparse.Namespace) -> int:
    from ..cli import _apply_params, _method_signature, _metric_signature, parse_settings
    from .engine import audit

    # one argument: a folder (or one file); several: image files, each a row (missing ones fail as rows)
    data: Any = args.data[0] if len(args.data) == 1 else list(args.data)
    methods = parse_settings(args.method, "--method", _method_signature)
    _apply_params(methods, args.param)
    metrics = parse_settings(args.metric, "--metric", _metric_signature) if args.metric.strip() else {}
    result = audit(args.model, data, methods=list(methods), metrics=list(metrics), out=args.out, engine=args.engine,
                   resume=args.resume, overwrite=args.overwrite, batch_size=args.batch_size,
                   shard_size=args.shard_size, map_size=args.map_size,
                   method_options={m: kw for m, kw in methods.items() if kw},
                   metric_options={m: kw for m, kw in metrics.items() if kw}, workers=args.workers,
                   ray_address=args.ray_address, seed=args.seed, weights=args.weights, input_size=args.input_size,
                   device=args.device, recommend=args.recommend)
    print(summary(result))
    return 0


def summary(a: Any) -> str:
    """A few lines for the terminal: images, failures, accuracy, mean metric per method."""
    df = a.scores
    per_image = df.drop_duplicates("image")
    lines = [f"audited {a.n_images} images with {', '.join(a.methods)} -> {a.dir}/"]
    failed = per_image["error"].notna().sum()
    if failed:
        first = per_image.loc[per_image["error"].notna()].iloc[0]
        lines.append(f"{failed} image(s) could not be read (first: image {first['image']}: {first['error']})")
    labelled = per_image["correct"].dropna()
    if len(labelled):
        lines.append(f"accuracy {labelled.astype(float).mean():.1%} on {len(labelled)} labelled images")
    for name in a.metrics:
        means = df.groupby("method", sort=False)[name].mean()
        lines.append(f"{name}: " + ", ".join(f"{m} {v:.4f}" for m, v in means.items()))
    rec = a.recommendation
    if rec is not None:
        best = rec.drop_duplicates("class")
        lines.append(f"recommended ({a.dir}/recommendation.parquet): " +
                     (", ".join(f"class {c}: {b}" for c, b in zip(best["class"], best["best"])) or "no class had 2 images"))
    return "\n".join(lines)


def cmd_data_digit_sum(args: argparse.Namespace) -> int:
    written = export_digit_sum(Path(args.out), split=args.split, shortcut=args.shortcut, n=args.n, seed=args.seed)
    print(f"wrote {written} images to {args.out}/ (ImageFolder layout: one folder per sum 0-10)")
    return 0


def export_digit_sum(out: Path, *, split: str = "test", shortcut: str | None = None, n: int | None = None,
                     seed: int = 0) -> int:
    """Write a digit-sum split as PNGs ``out/<sum>/<split>_<index>.png`` (28x56 RGB) -> number written."""
    import numpy as np
    import torch
    from PIL import Image

    from ..debug import digit_sum_dataset

    data = digit_sum_dataset(split, shortcut=shortcut, n=n, seed=seed)
    pixels = (data.x.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    for k in range(len(data.labels)):
        (out / str(k)).mkdir(parents=True, exist_ok=True)
    width = len(str(len(data) - 1))
    for i, (img, label) in enumerate(zip(pixels, data.y.tolist())):
        Image.fromarray(np.ascontiguousarray(img)).save(out / str(label) / f"{split}_{i:0{width}d}.png")
    return len(data)
