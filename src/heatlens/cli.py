"""The ``heatlens`` command line.

    heatlens explain IMAGES... --model efficientnet-lite0 --method gradcam,smoothgrad,lime --out DIR
    heatlens evaluate IMAGES... --method occlusion --metric insertion,deletion
    heatlens sanity IMAGES... --method saliency --check model_randomization
    heatlens demo [--shortcut same_digit]      the whole debugging story on the embedded digits -> report
    heatlens methods | models

Exit codes scripts can trust: 0 success, 1 the work failed, 2 bad usage or input (one-line reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or input: reported in one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    _configure(args)
    try:
        return int(args.run(args) or EXIT_OK)
    except UsageError as err:
        print(f"heatlens: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, TypeError) as err:
        # heatlens raises these for bad input, with the argument named in the message
        print(f"heatlens: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("heatlens: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI boundary reports every failure in one line
        print(f"heatlens: failed: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heatlens",
        description="Explain, evaluate and debug image classifiers.",
        epilog="Run 'heatlens COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0, help="random seed for sampling methods (default 0)")
    common.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    common.add_argument("--batch-size", type=int, default=None, help="items per model call (default: automatic)")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")

    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("images", nargs="+", help="image files or folders of images")
    model_args.add_argument("--model", default="efficientnet-lite0",
                            help="a zoo model name or a Keras 3 .keras file (default efficientnet-lite0)")
    model_args.add_argument("--target", default="predicted",
                            help="'predicted', a class index or a class name (default predicted)")

    p = sub.add_parser("explain", parents=[model_args, common], help="explain images with one or more methods",
                       description="Explain images and write overlays (PNG) and an HTML report.")
    p.add_argument("--method", default="saliency,integrated_gradients,gradcam",
                   help="comma-separated method names (see 'heatlens methods')")
    p.add_argument("--out", default="heatlens-out", help="output folder (default heatlens-out)")
    p.add_argument("--no-report", action="store_true", help="write the overlays only")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("evaluate", parents=[model_args, common], help="score explanations with metrics",
                       description="Explain images with each method and score the explanations with each metric.")
    p.add_argument("--method", default="saliency,occlusion", help="comma-separated method names")
    p.add_argument("--metric", default="insertion,deletion", help="comma-separated metric names")
    p.add_argument("--json", dest="json_path", default=None, help="also write the table as JSON to this file")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("sanity", parents=[model_args, common], help="run sanity checks on a method",
                       description="Sanity checks (Adebayo et al., Kindermans et al., Ghorbani et al.) for one method.")
    p.add_argument("--method", default="saliency", help="the method to check")
    p.add_argument("--check", default="model_randomization", help="comma-separated checks (see heatlens.sanity)")
    p.add_argument("--out", default=None, help="also write an HTML report into this folder")
    p.set_defaults(run=cmd_sanity)

    p = sub.add_parser("demo", parents=[common], help="the debugging story on the embedded digits, then a report",
                       description="Train the R255 CNN on digit sums with a planted shortcut, show the generalisation "
                                   "gap, find the shortcut with explanations and write an HTML report.")
    p.add_argument("--shortcut", default="same_digit", help="planted shortcut: same_digit, marker, tint or border")
    p.add_argument("--out", default="heatlens-demo", help="output folder (default heatlens-demo)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the story's own)")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("methods", help="list the explanation methods", description="List methods.")
    p.set_defaults(run=cmd_methods)
    p = sub.add_parser("models", help="list the models that ship with heatlens", description="List zoo models.")
    p.set_defaults(run=cmd_models)
    return parser


# --- commands ------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import describe

    rows = describe()
    width = max(len(n) for n, _, _ in rows)
    family_width = max(len(f) for _, f, _ in rows)
    for name, family, text in rows:
        print(f"{name.ljust(width)}  {family.ljust(family_width)}  {text}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from .models.zoo import available_models

    for name in available_models():
        print(name)
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from . import explain
    from .report.html import explanation_section, text_section, write_report

    methods = _split(args.method)
    _check_methods(methods)
    paths = find_images(args.images)
    model = _load_model(args)
    x = model.preprocess([str(p) for p in paths])
    target = _target(args.target)
    explanations = {}
    for m in methods:
        explanations[m] = explain(model, x, m, target=target, **_method_options(m, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = model.deprocess(x)
    written = write_overlays(out, paths, images, explanations)
    first = explanations[methods[0]]
    for p, name, score in zip(paths, first.target_names(), first.outputs.softmax(1).max(1).values.tolist()):
        print(f"{p.name}: {name} ({score:.1%})")
    print(f"wrote {len(written)} overlays to {out}/")
    if not args.no_report:
        sections = [explanation_section("Explanations", images, explanations, labels=model.labels)]
        sections.append(text_section("Settings", f"model: {model.name}; methods: {', '.join(methods)}; "
                                                 f"target: {args.target}; seed: {args.seed}", highlight=False))
        report = write_report(out / "report.html", "heatlens report", sections,
                              subtitle=f"{len(paths)} image(s) explained with {len(methods)} method(s)")
        print(f"report: {report}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import explain
    from .metrics import evaluate

    methods, metrics = _split(args.method), _split(args.metric)
    _check_methods(methods)
    paths = find_images(args.images)
    model = _load_model(args)
    x = model.preprocess([str(p) for p in paths])
    rows = []
    for m in methods:
        e = explain(model, x, m, target=_target(args.target), **_method_options(m, args))
        results = evaluate(model, x, e, metrics, batch_size=args.batch_size)
        for name, r in results.items():
            rows.append({"method": m, "metric": name, "mean": r.mean(), "sem": r.sem(),
                         "higher_is_better": r.higher_is_better, "values": [float(v) for v in r.values]})
    for row in rows:
        arrow = "higher is better" if row["higher_is_better"] else "lower is better"
        print(f"{row['method']:<24} {row['metric']:<26} {row['mean']:.4f} ± {row['sem']:.4f}  ({arrow})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    return EXIT_OK


def cmd_sanity(args: argparse.Namespace) -> int:
    from . import sanity

    paths = find_images(args.images)
    model = _load_model(args)
    x = model.preprocess([str(p) for p in paths])
    _check_methods([args.method])
    results = []
    for check in _split(args.check):
        fn = getattr(sanity, check, None)
        if fn is None or check.startswith("_"):
            from .validation import did_you_mean

            choices = [n for n in getattr(sanity, "__all__", []) if n != "SanityResult"]
            raise UsageError(f"unknown sanity check {check!r}.{did_you_mean(check, choices)} Valid: {', '.join(choices)}")
        results.append(fn(model, x, args.method, seed=args.seed))
    for r in results:
        print(r.to_text())
        print()
    if args.out:
        from .report.html import sanity_section, write_report

        path = write_report(Path(args.out) / "sanity.html", "heatlens sanity checks",
                            [sanity_section("Sanity checks", results)])
        print(f"report: {path}")
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from .report.story import run_demo

    report = run_demo(shortcut=args.shortcut, out=Path(args.out), seed=args.seed, epochs=args.epochs,
                      device=args.device, progress=not args.no_progress)
    print(f"report: {report}")
    return EXIT_OK


# --- helpers -------------------------------------------------------------------------------------
def find_images(items: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); missing paths are usage errors."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"folder {item!r} contains no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise UsageError(f"image file {item!r} does not exist")
    return paths


def write_overlays(out: Path, paths: Sequence[Path], images, explanations: dict) -> list[Path]:
    """One PNG per image and method: the map over the image (signed maps diverging, others sequential)."""
    from PIL import Image

    from .viz.overlay import overlay

    written = []
    for name, e in explanations.items():
        maps = e.maps().detach().cpu().float().numpy()  # the one map rule: signed per-location, sum_abs gradients
        for i, p in enumerate(paths):
            signed = bool((maps[i] < 0).any())
            rgb = overlay(images[i], maps[i], cmap="bwr" if signed else "jet", alpha=0.55)
            target = out / f"{p.stem}_{name}.png"
            Image.fromarray(rgb).save(target)
            written.append(target)
    return written


def _check_methods(methods: Sequence[str]) -> None:
    from .methods import METHODS
    from .validation import did_you_mean

    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}.{did_you_mean(m, METHODS.names())} See 'heatlens methods'")


def _load_model(args: argparse.Namespace):
    from .models import load_model

    model = load_model(args.model)
    return model.to(args.device)


def _method_options(method: str, args: argparse.Namespace) -> dict[str, Any]:
    from .methods import METHODS

    options: dict[str, Any] = {"batch_size": args.batch_size}
    if METHODS.get(method).meta.get("stochastic"):
        options["seed"] = args.seed
    return options


def _target(text: str) -> Any:
    return int(text) if text.lstrip("-").isdigit() else text


def _split(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError("expected a comma-separated list of names")
    return items


def _configure(args: argparse.Namespace) -> None:
    from . import batching

    if getattr(args, "no_progress", False) or os.environ.get("HEATLENS_PROGRESS") == "0":
        batching.set_progress(False)
    import torch

    torch.manual_seed(getattr(args, "seed", 0))
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("heatlens: error: --device cuda asked for but no CUDA device is available")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
