"""The audit engine: explain and score a whole dataset shard by shard, into an ``Audit`` store.

A shard is ``shard_size`` consecutive images. For each shard the engine reads and preprocesses the
images (in a background thread, one shard ahead, so decoding overlaps model work), runs every method on
the whole shard at once (the methods hand their passes to ``heatlens.batching``, which packs images from
many files into each model call), scores every explanation with every metric, reduces the maps to
statistics and small float16 maps, and commits the shard to the store. ``local`` runs shards in this
process; ``ray`` hands them to a pool of Ray actors (``ray_engine``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.adapter import Classifier, as_classifier
from ..validation import check_choice, check_positive_int
from .data import Source, as_source
from .store import FORMAT, GRID, MAP_STATS, Audit, ShardResult, Store

ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 64
DEFAULT_MAP_SIZE = 64
BORDER = 1 / 8  # map_border_mass: mass whose pixel centre lies in the outer eighth of the height or width


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs to compute any shard (picklable; travels to Ray actors).

    classes: label names (index -> name) for ``label_name``; model_labels: for ``prediction_name``.
    map_shape: (h, w) of the stored maps. store_inputs: keep the model inputs (in-memory sources).
    """

    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    method_options: dict[str, dict[str, Any]]
    metric_options: dict[str, Any]
    shard_size: int
    n_images: int
    map_shape: tuple[int, int]
    seed: int
    batch_size: int | None
    classes: tuple[str, ...] | None
    model_labels: tuple[str, ...] | None
    store_inputs: bool
    num_classes: int
    stochastic: frozenset[str] = field(default_factory=frozenset)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_images / self.shard_size)

    def bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(self.n_images, start + self.shard_size)


@dataclass
class Loaded:
    """One shard's images read and preprocessed: x (k,C,H,W) CPU for the readable ones (``ok`` positions)."""

    shard: int
    start: int
    stop: int
    paths: list[str | None]
    labels: list[int | None]
    errors: list[str | None]
    x: Tensor | None


# --- the public entry point -------------------------------------------------------------------------
def audit(
    model: Any,
    data: Any,
    *,
    methods: Sequence[str],
    metrics: Sequence[str] = (),
    out: str | Path,
    engine: str = "local",
    resume: bool = False,
    overwrite: bool = False,
    batch_size: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    map_size: int = DEFAULT_MAP_SIZE,
    method_options: dict[str, dict[str, Any]] | None = None,
    metric_options: dict[str, Any] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    seed: int = 0,
    weights: str | None = None,
    input_size: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    recommend: bool = False,
    recommend_options: dict[str, Any] | None = None,
) -> Audit:
    """Explain every image of ``data`` with each method, score each explanation with each metric, and
    write the records to ``out`` (see ``heatlens.audit`` and docs/audit.md) -> Audit.

    model: a Classifier / nn.Module, or a spec string (zoo name, ``.keras``/``.pt2`` file,
    ``package.module:function``; the ``ray`` engine needs a spec: each worker loads the model itself).
    data: a folder (ImageFolder or flat), a list of paths, a torch Dataset, a Hugging Face Dataset,
    an array of images or ``(images, labels)``. Each image is explained for its predicted class.
    resume: finish an interrupted audit in ``out`` (same settings required); overwrite: replace it.
    shard_size: images per unit of work and of storage. map_size: the longer side of stored maps.
    method_options: per-method hyperparameters ``{"integrated_gradients": {"steps": 32}}``.
    metric_options: settings for every metric that takes them, per-metric ones under the metric's name.
    workers / ray_address: the Ray actor pool size (default: the CPUs of the cluster) and cluster.
    weights: state-dict file for a ``.pt2`` / ``package.module:function`` spec; input_size: (C,H,W) for a
    function spec returning a bare module (see ``heatlens.load_model``). device: where the model runs.
    recommend: afterwards, run ``hl.recommend_per_class`` on up to 4 images per predicted class with the
    audit's methods and cheap settings (``heatlens.audit.recommend``) -> ``Audit.recommendation``;
    recommend_options: ``hl.recommend`` keywords on top (plus ``per_class``). On resume it is computed
    only if missing.
    """
    check_choice(engine, "engine", ENGINES)
    methods, metrics = _check_methods(methods), _check_metrics(metrics)
    shard_size = check_positive_int(shard_size, "shard_size")
    map_size = check_positive_int(map_size, "map_size", minimum=GRID)
    method_options = _check_method_options(method_options, methods)
    metric_options = dict(metric_options or {})
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    input_size = tuple(int(v) for v in input_size) if input_size is not None else None
    clf, spec = _resolve_model(model, weights, device, input_size)
    if engine == "ray" and spec is None:
        raise ValueError("engine='ray' needs the model as a spec string (a zoo name, a .keras/.pt2 file or "
                         "'package.module:function'): each Ray worker loads the model itself")
    source = as_source(data, model_labels=getattr(clf, "labels", None))
    if not isinstance(clf, Classifier):
        clf = _wrap_for(clf, source)
    plan = make_plan(clf, source, methods, metrics, method_options, metric_options, shard_size, map_size, seed,
                     batch_size)
    store = Store(Path(out))
    manifest = store.prepare(build_manifest(clf, (spec, weights, input_size), source, plan), resume=resume,
                             overwrite=overwrite)
    done = store.done_shards()
    pending = [s for s in range(plan.n_shards) if s not in done]
    if pending:
        if engine == "local":
            run_local(store, manifest, source, clf, plan, pending)
        else:
            from .ray_engine import run_ray

            run_ray(store, manifest, source, (spec, weights, input_size), device, plan, pending, workers=workers,
                    address=ray_address)
    manifest["complete"] = True
    store.write_manifest(manifest)
    _report_notes(manifest)
    if recommend and not (store.root / manifest.get("recommendation", {}).get("file", "-")).exists():
        from .recommend import run_recommendation

        opts = dict(recommend_options or {})
        manifest["recommendation"] = run_recommendation(Audit(store.root), clf, manifest, options=opts,
                                                        per_class=opts.pop("per_class", 4), seed=seed)
        store.write_manifest(manifest)
    return Audit(store.root)


def _report_notes(manifest: dict) -> None:
    """One warning per method that warned on some shards (not one per shard): how often, and the first text."""
    seen: dict[str, list[str]] = {}
    for shard in manifest["shards"]:
        for method, text in (shard.get("notes") or {}).items():
            seen.setdefault(method, []).append(text)
    for method, texts in seen.items():
        warnings.warn(f"{method} warned on {len(texts)} of {manifest['n_shards']} shards (manifest.json has each "
                      f"shard's note); first: {texts[0]}", UserWarning, stacklevel=3)


# --- settings -------------------------------------------------------------------------------------
def _check_methods(methods: Any) -> tuple[str, ...]:
    from ..methods import METHODS

    names = (methods,) if isinstance(methods, str) else tuple(methods or ())
    if not names:
        raise ValueError("methods must name at least one explanation method, e.g. methods=['gradcam']")
    for m in names:
        METHODS.get(m)  # unknown names raise with the closest valid ones
    if len(set(names)) != len(names):
        raise ValueError(f"methods lists a method twice: {list(names)}")
    return names


def _check_metrics(metrics: Any) -> tuple[str, ...]:
    from ..metrics import METRICS

    names = (metrics,) if isinstance(metrics, str) else tuple(metrics or ())
    for m in names:
        if METRICS.get(m).needs_mask:
            raise ValueError(f"metric {m!r} needs ground-truth masks, which an audit does not have")
    if len(set(names)) != len(names):
        raise ValueError(f"metrics lists a metric twice: {list(names)}")
    return names


def _check_method_options(options: Any, methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    options = dict(options or {})
    for name, kwargs in options.items():
        if name not in methods:
            raise ValueError(f"method_options names {name!r}, which is not among methods {list(methods)}")
        if not isinstance(kwargs, dict):
            raise TypeError(f"method_options[{name!r}] must be a dict of hyperparameters, got {type(kwargs).__name__}")
    return options


def make_plan(clf: Classifier, source: Source, methods: tuple[str, ...], metrics: tuple[str, ...],
              method_options: dict, metric_options: dict, shard_size: int, map_size: int, seed: int,
              batch_size: int | None) -> Plan:
    from ..methods import METHODS
    from ..models.hooks import frozen

    _, h, w = clf.input_size
    with frozen(clf):  # the probe forward must not touch a model left in train mode (batch-norm statistics)
        num_classes = clf.num_classes
    scale = min(1.0, map_size / max(h, w))
    labels = tuple(clf.labels) if clf.labels is not None else None
    return Plan(
        methods=methods, metrics=metrics, method_options=method_options, metric_options=metric_options,
        shard_size=shard_size, n_images=source.n, map_shape=(max(1, round(h * scale)), max(1, round(w * scale))),
        seed=seed, batch_size=batch_size, classes=source.classes or labels, model_labels=labels or source.classes,
        store_inputs=not source.rereadable, num_classes=num_classes,
        stochastic=frozenset(m for m in methods if METHODS.get(m).meta.get("stochastic")),
    )


def build_manifest(clf: Classifier, loadable: tuple, source: Source, plan: Plan) -> dict[str, Any]:
    """The manifest of a new audit. loadable: (spec, weights, input_size) to load the model again."""
    from .. import __version__
    from .models import fingerprint

    settings = {
        "methods": list(plan.methods), "metrics": list(plan.metrics),
        "method_options": _jsonable(plan.method_options), "metric_options": _jsonable(plan.metric_options),
        "shard_size": plan.shard_size, "map_size": max(plan.map_shape), "seed": plan.seed, "target": "predicted",
        "batch_size": plan.batch_size,
    }
    spec, weights, input_size = loadable
    model = {
        "spec": spec, "weights": str(Path(weights).resolve()) if weights is not None else None,
        "input_size_arg": list(input_size) if input_size is not None else None, "name": clf.name,
        "fingerprint": fingerprint(clf), "input_size": list(clf.input_size),
        "preprocessing": _jsonable(dataclasses.asdict(clf.preprocessing)),
        "labels": list(clf.labels) if clf.labels is not None else None,
    }
    return {
        "format": FORMAT, "heatlens_version": __version__, "model": model,
        "source": {**source.description, "fingerprint": source.fingerprint, "labelled": source.labelled},
        "settings": settings, "n_images": plan.n_images, "n_shards": plan.n_shards,
        "classes": list(plan.classes) if plan.classes is not None else None,
        "num_classes": plan.num_classes, "map_shape": list(plan.map_shape), "store_inputs": plan.store_inputs,
        "shards": [], "complete": False,
    }


def _jsonable(value: Any) -> Any:
    """A JSON form of settings (tensors and callables by description) so they can be compared on resume."""
    from ..metrics import describe

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(describe(value))


def _resolve_model(model: Any, weights: str | None, device: Any, input_size: Any) -> tuple[nn.Module, str | None]:
    from .models import load_spec, model_spec

    if isinstance(model, (str, Path)):
        return load_spec(str(model), weights=weights, device=device, input_size=input_size), str(model)
    if weights is not None or input_size is not None:
        raise ValueError("weights= and input_size= are for a model given as a spec string, not a model object")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a heatlens Classifier, an nn.Module or a model spec string, "
                        f"got {type(model).__name__}")
    if device is not None:
        model = model.to(device)
    return model, model_spec(model)


def _wrap_for(module: nn.Module, source: Source) -> Classifier:
    """A bare module, wrapped for the size of the first image (its channels from the first conv layer)."""
    from ..models.preprocessing import to_unit_batch

    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    first = to_unit_batch(source.item(0).image, channels)
    return as_classifier(module, first)


# --- one shard ------------------------------------------------------------------------------------
def load_shard(source: Source, clf: Classifier, plan: Plan, shard: int) -> Loaded:
    """Read and preprocess a shard's images (CPU); an unreadable image becomes a recorded error."""
    start, stop = plan.bounds(shard)
    paths, labels, errors, xs = [], [], [], []
    for i in range(start, stop):
        path = source.paths[i] if source.paths is not None else None
        try:
            item = source.item(i)
            x = clf.preprocessing(item.image)
            if x.shape[0] != 1:
                raise ValueError(f"item {i} holds {x.shape[0]} images, expected one")
            labels.append(item.label)
            errors.append(None)
            xs.append(x)
        except Exception as err:  # noqa: BLE001 - any failure to read one image is that row's error
            labels.append(source.labels[i] if source.labels is not None else None)  # known without the image
            errors.append(f"{type(err).__name__}: {' '.join(str(err).split())}")
        paths.append(path)
    return Loaded(shard, start, stop, paths, labels, errors, torch.cat(xs) if xs else None)


def compute_shard(clf: Classifier, loaded: Loaded, plan: Plan) -> ShardResult:
    """Explain and score one loaded shard -> ShardResult (records, logits, small maps).

    The model is frozen (eval mode, no parameter gradients) for the whole shard and restored after:
    metrics run the model too, and a model left in train mode must not update batch-norm statistics."""
    from ..models.hooks import frozen

    with frozen(clf):
        return _compute_shard(clf, loaded, plan)


def _compute_shard(clf: Classifier, loaded: Loaded, plan: Plan) -> ShardResult:
    from .. import explain
    from ..metrics import evaluate

    n = loaded.stop - loaded.start
    ok = [i for i, e in enumerate(loaded.errors) if e is None]
    logits = np.full((n, plan.num_classes), np.nan, dtype=np.float32)
    maps = {m: np.full((n, *plan.map_shape), np.nan, dtype=np.float16) for m in plan.methods}
    values = {m: {name: np.full(n, np.nan) for name in plan.metrics} for m in plan.methods}
    stats = {m: {name: np.full(n, np.nan) for name in MAP_STATS} for m in plan.methods}
    inputs, notes = None, {}
    if loaded.x is not None:
        x = loaded.x.to(clf.device)
        if plan.store_inputs:
            inputs = np.full((n, *x.shape[1:]), np.nan, dtype=np.float32)
            inputs[ok] = x.detach().cpu().float().numpy()
        for method in plan.methods:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                e = explain(clf, x, method, "predicted", **_method_kwargs(method, plan, loaded.shard))
            if caught:
                notes[method] = str(caught[0].message)
            logits[ok] = e.outputs.detach().float().cpu().numpy()
            small = downsample(e.maps().detach().float(), plan.map_shape)
            maps[method][ok] = small.cpu().numpy().astype(np.float16)
            for name, col in map_statistics(small).items():
                stats[method][name][ok] = col
            if plan.metrics:
                results = evaluate(clf, x, e, list(plan.metrics), batch_size=plan.batch_size, **plan.metric_options)
                for name, r in results.items():
                    values[method][name][ok] = r.values.numpy()
    columns = _records(loaded, plan, logits, values, stats)
    return ShardResult(shard=loaded.shard, start=loaded.start, stop=loaded.stop, columns=columns,
                       predictions=logits, maps=maps, inputs=inputs, failed=n - len(ok), notes=notes)


def _method_kwargs(method: str, plan: Plan, shard: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"batch_size": plan.batch_size, **plan.method_options.get(method, {})}
    if method in plan.stochastic and "seed" not in kwargs:
        kwargs["seed"] = plan.seed + shard  # each shard its own stream, the same on every engine and resume
    return kwargs


def _records(loaded: Loaded, plan: Plan, logits: np.ndarray, values: dict, stats: dict) -> dict[str, list]:
    """The Parquet columns of one shard: a row per (image, method), images in order, then methods."""
    n, methods = loaded.stop - loaded.start, plan.methods
    finite = np.isfinite(logits).all(1)
    shifted = logits - np.where(finite[:, None], logits.max(1, keepdims=True), 0)
    probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
    cols: dict[str, list] = {c: [] for c in ("image", "path", "label", "label_name", "prediction",
                                             "prediction_name", "confidence", "correct", "method", "error")}
    cols.update({name: [] for name in plan.metrics})
    cols.update({name: [] for name in MAP_STATS})
    for i in range(n):
        label = loaded.labels[i]
        pred = int(logits[i].argmax()) if finite[i] else None
        for method in methods:
            cols["image"].append(loaded.start + i)
            cols["path"].append(loaded.paths[i])
            cols["label"].append(label)
            cols["label_name"].append(_name(plan.classes, label))
            cols["prediction"].append(pred)
            cols["prediction_name"].append(_name(plan.model_labels, pred))
            cols["confidence"].append(float(probs[i, pred]) if pred is not None else None)
            cols["correct"].append(None if label is None or pred is None else bool(label == pred))
            cols["method"].append(method)
            cols["error"].append(loaded.errors[i])
            for name in plan.metrics:
                cols[name].append(float(values[method][name][i]))
            for name in MAP_STATS:
                cols[name].append(float(stats[method][name][i]))
    return cols


def _name(names: Sequence[str] | None, index: int | None) -> str | None:
    if index is None:
        return None
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


# --- maps -----------------------------------------------------------------------------------------
def downsample(maps: Tensor, shape: tuple[int, int]) -> Tensor:
    """(N,H,W) -> (N,h,w) by area averaging (each stored pixel is the mean of the pixels it covers)."""
    if tuple(maps.shape[-2:]) == tuple(shape):
        return maps
    return F.interpolate(maps[:, None], size=shape, mode="area")[:, 0]


def map_statistics(maps: Tensor) -> dict[str, np.ndarray]:
    """Statistics of the mass |m| of each map (N,h,w) -> name -> (N,) float64 (NaN for an all-zero map).

    centroid_y / centroid_x: mass centre in [0,1] (pixel centres at (i+0.5)/h). entropy: Shannon entropy
    of the normalised mass over log(h*w), 1 = uniform, 0 = one pixel. border_mass: fraction in pixels whose
    centre is in the outer eighth of the height or width. cell_i_j: fraction in row i, column j of a 4x4 grid.
    """
    m = maps.detach().double().abs()
    n, h, w = m.shape
    total = m.flatten(1).sum(1)
    p = m / total.clamp_min(1e-300)[:, None, None]
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    out = {"map_centroid_y": (p.sum(2) * ys).sum(1), "map_centroid_x": (p.sum(1) * xs).sum(1)}
    flat = p.flatten(1)
    ent = -(flat * flat.clamp_min(1e-300).log()).sum(1)
    out["map_entropy"] = ent / math.log(h * w) if h * w > 1 else torch.zeros(n, dtype=torch.float64)
    border = ((ys < BORDER) | (ys > 1 - BORDER))[:, None] | ((xs < BORDER) | (xs > 1 - BORDER))[None, :]
    out["map_border_mass"] = (p * border).flatten(1).sum(1)
    rows, cols = (ys * GRID).long().clamp(max=GRID - 1), (xs * GRID).long().clamp(max=GRID - 1)
    for i in range(GRID):
        for j in range(GRID):
            cell = (rows == i)[:, None] & (cols == j)[None, :]
            out[f"map_cell_{i}_{j}"] = (p * cell).flatten(1).sum(1)
    empty = ~(total > 0)
    return {k: v.masked_fill(empty, math.nan).numpy() for k, v in out.items()}


# --- the local engine -----------------------------------------------------------------------------
def run_local(store: Store, manifest: dict, source: Source, clf: Classifier, plan: Plan,
              pending: Sequence[int]) -> None:
    """Compute the pending shards in this process, reading the next shard while computing one."""
    bar = _progress(plan, manifest)
    try:
        for loaded in prefetch(lambda s: load_shard(source, clf, plan, s), pending):
            result = compute_shard(clf, loaded, plan)
            store.commit(result, manifest)
            if bar is not None:
                bar.update(result.stop - result.start)
    finally:
        if bar is not None:
            bar.close()


def prefetch(load: Callable[[int], Loaded], shards: Sequence[int]) -> Iterator[Loaded]:
    """Yield ``load(s)`` for each shard, with the next shard loading in a thread meanwhile (decoding
    overlaps model work; at most two shards of images are in memory)."""
    if not shards:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="heatlens-audit-read") as pool:
        future = pool.submit(load, shards[0])
        for nxt in list(shards[1:]) + [None]:
            loaded = future.result()
            if nxt is not None:
                future = pool.submit(load, nxt)
            yield loaded


def _progress(plan: Plan, manifest: dict):
    from ..batching import progress_enabled

    if not progress_enabled():
        return None
    from tqdm.auto import tqdm

    done = sum(s["stop"] - s["start"] for s in manifest["shards"])
    return tqdm(total=plan.n_images, initial=done, unit="img", desc="audit")

