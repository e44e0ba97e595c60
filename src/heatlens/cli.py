"""The ``heatlens`` command line.

    heatlens explain IMAGES... --model efficientnet-lite0 --method gradcam,smoothgrad:n_samples=20,lime --out DIR
    heatlens evaluate IMAGES... --method occlusion:window=32 --metric insertion,deletion:granularity=16
    heatlens sanity IMAGES... --method saliency --check model_randomization,input_invariance
    heatlens recommend IMAGES... --method saliency,gradcam,occlusion   which method to trust, ranked
    heatlens demo [--shortcut same_digit]      the whole debugging story on the embedded digits -> report
    heatlens audit DATA --model M --method gradcam --metric deletion --out DIR   a whole dataset (docs/audit.md)
    heatlens data digit-sum --shortcut marker --split test --out DIR             export a built-in dataset
    heatlens methods | models

Exit codes scripts can trust (``EXIT_*`` below): 0 success; 1 a sanity check failed; 2 bad usage or
input (one line on stderr naming the argument; checked before any computation where it can be);
3 an internal error (a bug in heatlens or a library: reported as one, with the exception type);
130 interrupted. Nothing half-written is left in ``--out``: files are written to a staging folder
next to it and moved in only when the command succeeded.

Subcommands are registered builders (``@subcommand``): a builder gets the subparsers and the shared
parent parsers and adds one command whose ``run(args) -> exit code`` is set with ``set_defaults``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """Bad arguments or input: reported in one line, exit code 2."""


class CheckFailed(Exception):
    """Not an error: a sanity check ran and failed (exit code 1)."""


@dataclass(frozen=True)
class Parents:
    """Parent parsers a subcommand can inherit: ``common`` (--seed, --device, --batch-size, --no-progress)
    and ``model`` (IMAGES, --model, --weights, --input-size, --target)."""

    common: argparse.ArgumentParser
    model: argparse.ArgumentParser


SUBCOMMANDS: list[Callable[[Any, Parents], None]] = []


def subcommand(builder: Callable[[Any, Parents], None]) -> Callable[[Any, Parents], None]:
    """Register a builder ``builder(subparsers, parents)`` that adds one command (in listing order)."""
    SUBCOMMANDS.append(builder)
    return builder


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse reports bad usage itself (exit 2) and --help (exit 0)
        return int(exit_.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        _configure(args)
        return int(args.run(args) or EXIT_OK)
    except UsageError as err:
        print(f"heatlens: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("heatlens: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the CLI boundary reports every failure in one line
        if _is_input_error(err):
            print(f"heatlens: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"heatlens: internal error: {type(err).__name__}: {_one_line(err)} (not a usage error heatlens "
              "recognised: if the model and inputs fit each other, this is a bug; HEATLENS_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        if os.environ.get("HEATLENS_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        return EXIT_INTERNAL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heatlens",
        description="Explain, evaluate and debug image classifiers.",
        epilog="Run 'heatlens COMMAND --help' for the options of a command. Exit codes: 0 success, 1 a sanity "
               "check failed, 2 bad usage or input, 3 internal error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=_seed, default=0, help="random seed for sampling methods (default 0)")
    common.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1 (default cpu)")
    common.add_argument("--batch-size", type=_positive_int, default=None,
                        help="items per model call (default: automatic)")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")

    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("images", nargs="+", help="image files or folders of images")
    model_args.add_argument("--model", default="efficientnet-lite0",
                            help="a zoo name ('heatlens models'), a Keras 3 .keras file, a torch.export .pt2 file, "
                                 "or package.module:function returning an nn.Module (default efficientnet-lite0)")
    model_args.add_argument("--weights", default=None,
                            help="a state dict (torch.save(net.state_dict(), FILE)) for a .pt2 or "
                                 "package.module:function model, read with torch.load(weights_only=True)")
    model_args.add_argument("--input-size", default=None, type=_input_size, metavar="C,H,W",
                            help="input size of a package.module:function model that does not say, e.g. 3,224,224")
    model_args.add_argument("--target", default="predicted",
                            help="'predicted', a class index or a class name (default predicted)")
    parents = Parents(common=common, model=model_args)
    for builder in SUBCOMMANDS:
        builder(sub, parents)
    return parser


# --- subcommands ---------------------------------------------------------------------------------
METHOD_HELP = ("comma-separated method names, each optionally with settings: 'lime:num_samples=500,"
               "smoothgrad:n_samples=20:noise=0.1' (see 'heatlens methods')")
PARAM_HELP = "a method setting [METHOD:]KEY=VALUE (repeatable; without METHOD it applies to every method taking KEY)"


@subcommand
def _add_explain(sub: Any, parents: Parents) -> None:
    p = sub.add_parser("explain", parents=[parents.model, parents.common], help="explain images with one or more methods",
                       description="Explain images and write overlays (PNG) and an HTML report.")
    p.add_argument("--method", default="saliency,integrated_gradients,gradcam", help=METHOD_HELP)
    p.add_argument("--param", action="append", default=[], metavar="[METHOD:]KEY=VALUE", help=PARAM_HELP)
    p.add_argument("--out", default="heatlens-out", help="output folder (default heatlens-out)")
    p.add_argument("--no-report", action="store_true", help="write the overlays only")
    p.set_defaults(run=cmd_explain)


@subcommand
def _add_evaluate(sub: Any, parents: Parents) -> None:
    p = sub.add_parser("evaluate", parents=[parents.model, parents.common], help="score explanations with metrics",
                       description="Explain images with each method and score the explanations with each metric, "
                                   "next to a Random-map baseline.")
    p.add_argument("--method", default="saliency,occlusion", help=METHOD_HELP)
    p.add_argument("--param", action="append", default=[], metavar="[METHOD:]KEY=VALUE", help=PARAM_HELP)
    p.add_argument("--metric", default="insertion,deletion",
                   help="comma-separated metric names, each optionally with settings, e.g. 'deletion:granularity=16'")
    p.add_argument("--no-random", action="store_true", help="leave out the Random-map baseline")
    p.add_argument("--json", dest="json_path", default=None, help="also write the table as JSON to this file")
    p.set_defaults(run=cmd_evaluate)


@subcommand
def _add_sanity(sub: Any, parents: Parents) -> None:
    p = sub.add_parser("sanity", parents=[parents.model, parents.common], help="run sanity checks on a method",
                       description="Sanity checks (Adebayo et al., Sixt et al., Kindermans et al., Ghorbani et al.) "
                                   "for one method. Exit code 1 when a check fails.")
    p.add_argument("--method", default="saliency", help="the method to check, optionally with settings (as explain)")
    p.add_argument("--param", action="append", default=[], metavar="[METHOD:]KEY=VALUE", help=PARAM_HELP)
    p.add_argument("--check", default="model_randomization",
                   help="comma-separated checks, each optionally with settings (model_randomization:mode=independent): "
                        + ", ".join(_check_names()))
    p.add_argument("--out", default=None, help="also write an HTML report into this folder")
    p.set_defaults(run=cmd_sanity)


@subcommand
def _add_demo(sub: Any, parents: Parents) -> None:
    p = sub.add_parser("demo", parents=[parents.common], help="the debugging story on the embedded digits, then a report",
                       description="Train the R255 CNN on digit sums with a planted shortcut, show the generalisation "
                                   "gap, find the shortcut with explanations and write an HTML report.")
    p.add_argument("--shortcut", default="same_digit", help="planted shortcut: same_digit, marker, tint or border")
    p.add_argument("--out", default="heatlens-demo", help="output folder (default heatlens-demo)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: the story's own)")
    p.set_defaults(run=cmd_demo)


@subcommand
def _add_listings(sub: Any, parents: Parents) -> None:
    p = sub.add_parser("methods", help="list the explanation methods", description="List methods.")
    p.set_defaults(run=cmd_methods)
    p = sub.add_parser("models", help="list the models that ship with heatlens, and how to use your own",
                       description="List zoo models.")
    p.set_defaults(run=cmd_models)


@subcommand
def _add_audit(sub: Any, parents: Parents) -> None:
    from .audit.cli import add_audit_command, add_data_command  # heatlens audit / heatlens data (docs/audit.md)

    add_audit_command(sub, parents)
    add_data_command(sub, parents)


# --- commands ------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import describe

    rows = describe()
    width = max(len(n) for n, _, _ in rows)
    family_width = max(len(f) for _, f, _ in rows)
    for name, family, text in rows:
        print(f"{name.ljust(width)}  {family.ljust(family_width)}  {text}")
    return EXIT_OK


OWN_MODEL_HELP = """\
Your own model (--model also takes):
  path/to/model.pt2          a torch.export program: torch.export.save(torch.export.export(net, (x,)), "model.pt2")
  package.module:function    a function returning an nn.Module, e.g. mymodels:build (looked up from the current
                             folder); add --weights state_dict.pt (torch.load(weights_only=True)) and
                             --input-size 3,224,224 unless the module has an input_size attribute
  path/to/model.keras        a Keras 3 file (run under Keras's torch backend)
In Python: heatlens.wrap(net, input_size=(3, 224, 224), labels=names, preprocessing=...)."""


def cmd_models(args: argparse.Namespace) -> int:
    from .models.zoo import available_models

    models = available_models()
    width = max(len(n) for n in models)
    for name, text in models.items():
        print(f"{name.ljust(width)}  {text}")
    print()
    print(OWN_MODEL_HELP)
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from . import explain
    from .report.html import explanation_section, text_section, write_report

    methods = parse_settings(args.method, "--method", _method_signature)
    _apply_params(methods, args.param)
    out = OutputFolder(args.out)
    paths = find_images(args.images)
    model = _load_model(args)
    x = _preprocess(model, paths)
    target = _target(args.target, model)
    explanations = {m: explain(model, x, m, target=target, **_method_options(m, kw, args))
                    for m, kw in methods.items()}
    images = model.deprocess(x)
    names = unique_names(paths)
    with out.staged() as stage:
        written = write_overlays(stage, names, images, explanations)
        if not args.no_report:
            sections = [explanation_section("Explanations", images, explanations, labels=model.labels, names=names)]
            settings = "; ".join(f"{m}: {_show_settings(kw)}" if kw else m for m, kw in methods.items())
            sections.append(text_section("Settings", f"model: {model.name}; methods: {settings}; "
                                                     f"target: {args.target}; seed: {args.seed}", highlight=False))
            write_report(stage / "report.html", "heatlens report", sections,
                         subtitle=f"{len(paths)} image(s) explained with {len(methods)} method(s)")
    first = explanations[next(iter(methods))]
    probs = first.outputs.softmax(1).gather(1, first.targets.reshape(-1, 1))[:, 0].tolist()
    for name, label, p in zip(names, first.target_names(), probs):
        print(f"{name}: {label} ({p:.1%})")
    print(f"wrote {len(written)} overlays to {out.path}/")
    if not args.no_report:
        print(f"report: {out.path / 'report.html'}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from . import explain
    from .metrics.compare import compare

    methods = parse_settings(args.method, "--method", _method_signature)
    _apply_params(methods, args.param)
    metrics = parse_settings(args.metric, "--metric", _metric_signature)
    json_path = _check_output_file(args.json_path, "--json") if args.json_path else None
    paths = find_images(args.images)
    model = _load_model(args)
    x = _preprocess(model, paths)
    target = _target(args.target, model)
    explanations = {m: explain(model, x, m, target=target, **_method_options(m, kw, args))
                    for m, kw in methods.items()}
    table = compare(model, x, explanations, list(metrics), include_random=not args.no_random, seed=args.seed,
                    batch_size=args.batch_size, **{m: kw for m, kw in metrics.items() if kw})
    print(table.to_text())
    if not args.no_random:
        print("random: a map of Gaussian noise; a method should beat it to be worth reading")
    if json_path:
        rows = [{**r, "values": [float(v) for v in table.results[(r["method"], r["metric"])].values]}
                for r in table.to_dicts()]
        _write_atomic(json_path, json.dumps(rows, indent=2))
    return EXIT_OK


def cmd_sanity(args: argparse.Namespace) -> int:
    from . import sanity

    methods = parse_settings(args.method, "--method", _method_signature)
    _apply_params(methods, args.param)
    if len(methods) != 1:
        raise UsageError(f"--method takes one method for sanity checks, got {', '.join(methods)}")
    (method, method_kwargs), = methods.items()
    checks = parse_settings(args.check, "--check", _check_signature)
    out = OutputFolder(args.out) if args.out else None
    paths = find_images(args.images)
    model = _load_model(args)
    x = _preprocess(model, paths)
    target = _target(args.target, model)
    results = []
    for check, settings in checks.items():
        fn = sanity.CHECKS.get(check).fn
        kwargs = {**_accepted(fn, {"seed": args.seed, "batch_size": args.batch_size}), **settings}
        with _progress(check, method, _expected_calls(check, model, fn), enabled=_progress_on(args)) as counted:
            results.append(fn(model, x, counted(method), target, **kwargs, **method_kwargs))
    for r in results:
        print(r.to_text())
        print()
    if out is not None:
        from .report.html import sanity_section, write_report

        with out.staged() as stage:
            write_report(stage / "sanity.html", "heatlens sanity checks", [sanity_section("Sanity checks", results)])
        print(f"report: {out.path / 'sanity.html'}")
    failed = [r.name for r in results if not r.passed]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .report.story import run_demo

    out = OutputFolder(args.out)
    with out.staged() as stage:
        run_demo(shortcut=args.shortcut, out=stage, seed=args.seed, epochs=args.epochs,
                 device=args.device, progress=_progress_on(args))
    print(f"report: {out.path / 'report.html'}")
    return EXIT_OK


# --- recommend: which method to trust (recommendation.py) ------------------------------------
@subcommand
def _add_recommend(sub: Any, parents: Parents) -> None:
    from .recommendation import DEFAULT_CHECKS, DEFAULT_METHODS, DEFAULT_METRICS

    p = sub.add_parser("recommend", parents=[parents.model, parents.common], help="rank methods: which one to trust",
                       description="Rank explanation methods for this model: faithfulness against a Random map, "
                                   "sanity checks, robustness and cost, with a verdict per method and the "
                                   "ranking's stability. Takes a few minutes for the defaults on 8 photos.")
    p.add_argument("--method", default=",".join(DEFAULT_METHODS), help=METHOD_HELP)
    p.add_argument("--metric", default=",".join(DEFAULT_METRICS),
                   help="faithfulness and robustness metrics (default %(default)s)")
    p.add_argument("--check", default=",".join(DEFAULT_CHECKS), help="sanity checks, or 'none' (default %(default)s)")
    p.add_argument("--fills", default="blur,black", help="fills of the perturbation metrics (default %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=25, help="curve intervals of insertion/deletion (default 25)")
    p.add_argument("--check-images", type=_positive_int, default=4, help="images the checks run on (default 4)")
    p.add_argument("--out", default=None, help="also write recommendation.html, rank.png and table.csv here")
    p.add_argument("--json", dest="json_path", default=None, help="also write the rows as JSON to this file")
    p.set_defaults(run=cmd_recommend)


def cmd_recommend(args: argparse.Namespace) -> int:
    import json

    from .recommendation import recommend

    methods = parse_settings(args.method, "--method", _method_signature)
    checks = [] if args.check.strip().lower() == "none" else _split(args.check, "--check")
    out = OutputFolder(args.out) if args.out else None
    json_path = _check_output_file(args.json_path, "--json") if args.json_path else None
    paths = find_images(args.images)
    model = _load_model(args)
    x = _preprocess(model, paths)
    rec = recommend(model, x, list(methods), _split(args.metric, "--metric"), checks,
                    target=_target(args.target, model), method_kwargs={m: kw for m, kw in methods.items() if kw} or None,
                    fills=_split(args.fills, "--fills"), steps=args.steps, check_images=args.check_images,
                    seed=args.seed, batch_size=args.batch_size, verbose=_progress_on(args))
    print(rec.to_text())
    if json_path:
        _write_atomic(json_path, json.dumps(rec.rows, indent=2, default=str))
    if out is not None:
        from .report.html import write_report

        with out.staged() as stage:
            rec.table.to_csv(stage / "table.csv")
            rec.plot().savefig(stage / "rank.png", dpi=110, bbox_inches="tight")
            write_report(stage / "recommendation.html", "heatlens: which method to trust", [rec.section()],
                         subtitle=f"{model.name}, {len(paths)} image(s)")
        print(f"report: {out.path / 'recommendation.html'}")
    return EXIT_OK if rec.best is not None else EXIT_FAILED


# --- output folders: checked first, written last ------------------------------------------------
class OutputFolder:
    """An output folder checked before any computation and filled atomically.

    The check refuses a path that is a file, lies under a file, or cannot be written (a probe folder
    is created beside it), with a message naming ``flag``. ``staged()`` yields a fresh folder beside
    the target; on success its files are moved into the target (created if needed), on failure the
    staging folder is removed, so a failed run leaves nothing half-written.
    """

    def __init__(self, path: str | os.PathLike, flag: str = "--out") -> None:
        self.path = Path(path)
        self.flag = flag
        self.anchor = _check_output_folder(self.path, flag)

    def staged(self):
        return _Staging(self)


class _Staging:
    def __init__(self, folder: OutputFolder) -> None:
        self.folder = folder
        self.dir: Path | None = None

    def __enter__(self) -> Path:
        self.dir = Path(tempfile.mkdtemp(prefix=".heatlens-", dir=self.folder.anchor))
        return self.dir

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.dir is not None
        try:
            if exc_type is None:
                self.folder.path.mkdir(parents=True, exist_ok=True)
                for item in sorted(self.dir.iterdir()):
                    target = self.folder.path / item.name
                    if target.is_dir() and item.is_dir():
                        shutil.rmtree(target)
                    os.replace(item, target)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        return False


def _check_output_folder(path: Path, flag: str) -> Path:
    """The existing folder in which staging happens (``path`` itself or its nearest existing parent)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a file, not a folder")
    anchor = path if path.is_dir() else None
    if anchor is None:
        for parent in path.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UsageError(f"{flag} {str(path)!r} is under {str(parent)!r}, which is a file")
                anchor = parent
                break
    anchor = anchor or Path.cwd()
    try:
        tempfile.TemporaryDirectory(prefix=".heatlens-probe-", dir=anchor).cleanup()
    except OSError as err:
        raise UsageError(f"{flag} {str(path)!r} is not writable ({err.strerror or err})") from None
    return anchor


def _check_output_file(text: str, flag: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"{flag} {text!r} is a folder, not a file")
    _check_output_folder(path.parent if str(path.parent) else Path("."), flag)
    return path


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- images and names --------------------------------------------------------------------------
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


def unique_names(paths: Sequence[Path]) -> list[str]:
    """One output name per image, never two alike: the file stem, then stem + extension
    (``cat-jpg``, ``cat-png``), then folders + stem (``d1-cat``), then a counter (a file given twice)."""
    resolved = [p.absolute() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved])) if resolved else Path()

    def level(p: Path, k: int) -> str:
        ext = p.suffix.lstrip(".").lower()
        if k == 0:
            return p.stem
        if k == 1:
            return f"{p.stem}-{ext}" if ext else p.stem
        folders = [part for part in p.parent.relative_to(common).parts]
        return "-".join([*folders, p.stem] + ([ext] if ext else []))

    distinct = list(dict.fromkeys(resolved))  # a file given twice is one file here; the counter separates it
    chosen = {}
    for p in distinct:
        for k in range(3):
            mine = level(p, k)
            if sum(level(q, k) == mine for q in distinct) == 1:
                break
        chosen[p] = mine
    names = [chosen[p] for p in resolved]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}-{seen[n]}"
    return names


def write_overlays(out: Path, names: Sequence[str], images, explanations: dict) -> list[Path]:
    """One PNG per image and method (``<name>_<method>.png``): see ``viz.explanation_overlay``."""
    from PIL import Image

    from .viz.overlay import explanation_overlay

    written = []
    for method, e in explanations.items():
        for i, name in enumerate(names):
            target = out / f"{name}_{_file_safe(method)}.png"
            Image.fromarray(explanation_overlay(e, i, images[i])).save(target)
            written.append(target)
    return written


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _preprocess(model, paths: Sequence[Path]):
    import numpy as np

    x = model.preprocess([str(p) for p in paths])
    for p, image in zip(paths, model.deprocess(x)):
        if float(np.ptp(image)) < 1 / 512:  # under half a grey level: resizing leaves float dust
            print(f"heatlens: warning: {p} is a constant image (every pixel {image.reshape(-1)[0]:.3g}); "
                  "its explanation says nothing", file=sys.stderr)
    return x


# --- settings: "name:key=value:key=value,name2" -------------------------------------------------
def parse_settings(text: str, flag: str, signature: Callable[[str], tuple[set[str] | None, list[str]]]
                   ) -> dict[str, dict[str, Any]]:
    """``"lime:num_samples=500,smoothgrad:n_samples=20:noise=0.1"`` -> {name: {key: value}}.

    Items are comma-separated; ``key=value`` items without a name continue the previous name's
    settings. Values are Python literals (``500``, ``0.1``, ``True``, ``(8, 8)``) or plain strings.
    Names and keys are checked against the registry and the function's keyword arguments.
    """
    out: dict[str, dict[str, Any]] = {}
    last: str | None = None
    for item in _split(text, flag):
        head, *settings = item.split(":")
        if "=" in head and last is not None and not settings:
            settings, head = [head], last
        elif "=" in head:
            raise UsageError(f"{flag}: {item!r} sets a value before naming what it is for; write NAME:KEY=VALUE")
        else:
            head = head.strip()
            keys, valid = signature(head)  # raises UsageError for unknown names
            if head in out:
                raise UsageError(f"{flag}: {head!r} is given twice")
            out[head] = {}
            last = head
        for s in settings:
            key, value = _key_value(s, flag)
            _check_key(head, key, signature(head)[0], flag)
            out[head][key] = value
    return out


def _apply_params(methods: dict[str, dict[str, Any]], params: Sequence[str]) -> None:
    for text in params:
        name, sep, rest = text.partition(":")
        if sep and "=" not in name:
            if name not in methods:
                raise UsageError(f"--param {text!r}: {name!r} is not among --method ({', '.join(methods)})")
            key, value = _key_value(rest, "--param")
            _check_key(name, key, _method_signature(name)[0], "--param")
            methods[name][key] = value
        else:
            key, value = _key_value(text, "--param")
            takers = [m for m in methods if _takes(_method_signature(m)[0], key)]
            if not takers:
                raise UsageError(f"--param {text!r}: none of {', '.join(methods)} takes {key!r}")
            for m in takers:
                methods[m][key] = value


def _key_value(text: str, flag: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise UsageError(f"{flag}: expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()  # a plain string: baseline=blur, layer=_blocks.15
    return key, value


def _check_key(name: str, key: str, keys: set[str] | None, flag: str) -> None:
    if not _takes(keys, key):
        from .validation import did_you_mean

        raise UsageError(f"{flag}: {name} has no setting {key!r}.{did_you_mean(key, sorted(keys or ()))} "
                         f"Valid: {', '.join(sorted(keys or ()))}")


def _takes(keys: set[str] | None, key: str) -> bool:
    return keys is None or key in keys


RESERVED = {"model", "x", "target", "explanation", "batch_size", "seed", "kwargs", "options", "method_kwargs"}


def _keyword_names(fn: Callable[..., Any]) -> set[str] | None:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - RESERVED


def _method_signature(name: str) -> tuple[set[str] | None, list[str]]:
    from .methods import METHODS
    from .validation import did_you_mean

    if name not in METHODS:
        raise UsageError(f"--method: unknown method {name!r}.{did_you_mean(name, METHODS.names())} "
                         "See 'heatlens methods'")
    entry = METHODS.get(name)
    keys = _keyword_names(entry.fn)
    if keys is None and entry.meta.get("family") == "smoothing":
        # smooth(saliency): its own settings plus the inner method's
        own = {p for p in inspect.signature(entry.fn).parameters} - RESERVED
        keys = own | (_keyword_names(METHODS.get("saliency").fn) or set())
    return keys, METHODS.names()


def _metric_signature(name: str) -> tuple[set[str] | None, list[str]]:
    from .metrics import METRICS
    from .validation import did_you_mean

    if name not in METRICS:
        raise UsageError(f"--metric: unknown metric {name!r}.{did_you_mean(name, METRICS.names())}")
    keys = _keyword_names(METRICS.get(name).fn)
    return (None if keys is None else keys - {"mask"}), METRICS.names()


def _show_settings(kw: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


def _method_options(method: str, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from .methods import METHODS

    options: dict[str, Any] = {"batch_size": args.batch_size, **settings}
    if METHODS.get(method).meta.get("stochastic"):
        options.setdefault("seed", args.seed)
    return options


# --- sanity checks: names, arguments, progress ---------------------------------------------------
def _check_names() -> list[str]:
    from .sanity import CHECKS

    return CHECKS.names()


def _check_signature(name: str) -> tuple[set[str] | None, list[str]]:
    from .sanity import CHECKS
    from .validation import did_you_mean

    valid = CHECKS.names()
    if name not in CHECKS:
        raise UsageError(f"--check: unknown sanity check {name!r}.{did_you_mean(name, valid)} Valid: {', '.join(valid)}")
    fn = CHECKS.get(name).fn
    params = inspect.signature(fn).parameters.values()
    keys = {p.name for p in params if p.kind is p.KEYWORD_ONLY} - RESERVED
    return keys, valid


def _accepted(fn: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The options ``fn`` declares (a check without ``seed`` must not get one: it would reach the method)."""
    declared = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in declared and declared[k].kind is not inspect.Parameter.VAR_KEYWORD}


def _expected_calls(check: str, model: Any, fn: Callable[..., Any]) -> int | None:
    """How many times a check calls the method (the progress total), where it is known up front."""
    if check == "model_randomization":
        from .sanity.randomization import parameter_layers

        return 1 + len(parameter_layers(model))
    if check in ("random_logit", "input_invariance"):
        return 2
    return None


class _progress:
    """A progress bar counting a sanity check's explanation calls (each is one step of the check)."""

    def __init__(self, check: str, method: str, total: int | None, *, enabled: bool) -> None:
        self.desc, self.total, self.enabled, self.bar = f"{check} ({method})", total, enabled, None

    def __enter__(self) -> Callable[[str], Any]:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="explanation", file=sys.stderr, leave=False)
        return self._counted

    def _counted(self, method: str) -> Any:
        import functools

        from .methods.registry import get_method

        fn = get_method(method)
        if self.bar is None:
            return method

        @functools.wraps(fn)
        def counted(*a: Any, **kw: Any) -> Any:
            out = fn(*a, **kw)
            self.bar.update(1)
            return out

        counted.__name__ = method  # the check names the method in its verdict
        return counted

    def __exit__(self, *exc: Any) -> bool:
        if self.bar is not None:
            self.bar.close()
        return False


# --- helpers -------------------------------------------------------------------------------------
def _load_model(args: argparse.Namespace):
    from .models import load_model

    # a console script does not put the working folder on sys.path; 'mymodels:build' is looked up there
    # first, as ``python -m`` would
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        model = load_model(args.model, weights=args.weights, input_size=args.input_size)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        raise UsageError(f"--model {args.model!r}: {_one_line(err)}") from err
    return model.to(args.device)


def _target(text: str, model: Any) -> Any:
    """--target as the API takes it; a class name is checked against the model's labels now."""
    if text == "predicted":
        return text
    if text.lstrip("-").isdigit():
        index = int(text)
        k = model.num_classes
        if not 0 <= index < k:
            raise UsageError(f"--target {index} is out of range: the model has {k} classes (0..{k - 1})")
        return index
    import torch

    from .targets import resolve_target

    try:
        resolve_target(torch.zeros(1, model.num_classes), text, model.labels, name="--target")
    except (ValueError, TypeError) as err:
        raise UsageError(_one_line(err)) from err
    return text


def _input_size(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected C,H,W as three positive integers, e.g. 3,224,224, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..2**63-1, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _split(text: str, flag: str = "argument") -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{flag}: expected a comma-separated list of names")
    return items


def _progress_on(args: argparse.Namespace) -> bool:
    from .batching import progress_enabled

    return progress_enabled() and not getattr(args, "no_progress", False)


def _configure(args: argparse.Namespace) -> None:
    from . import batching

    if getattr(args, "no_progress", False) or os.environ.get("HEATLENS_PROGRESS") == "0":
        batching.set_progress(False)
    import torch

    torch.manual_seed(getattr(args, "seed", 0))
    if hasattr(args, "device"):
        _check_device(args.device)


def _check_device(text: str) -> None:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {text!r}: no CUDA device is available (this torch build or machine has none)")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {text!r}: only {count} CUDA device(s), numbered 0..{count - 1}")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {text!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {text!r}: heatlens runs on cpu, cuda or mps")


CALL_ERRORS = ("unexpected keyword argument", "required positional argument", "positional argument",
               "object is not callable", "object has no attribute")


def _is_input_error(err: BaseException) -> bool:
    """A deliberate heatlens refusal of the user's input (ValueError / TypeError / FileNotFoundError raised
    by heatlens code, naming the argument), as opposed to a bug surfacing from deeper down."""
    if isinstance(err, FileNotFoundError):
        return True
    if not isinstance(err, (ValueError, TypeError)):
        return False
    if isinstance(err, TypeError) and any(s in str(err) for s in CALL_ERRORS):
        return False  # a call that does not fit a signature: heatlens called something wrongly
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    package = os.path.dirname(os.path.abspath(__file__))
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(package + os.sep)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
