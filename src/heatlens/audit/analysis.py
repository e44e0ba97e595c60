"""What an audit finds: per-class statistics, faithfulness against a Random-map baseline, method
disagreement, explanation outliers, right-for-the-wrong-reason candidates, SpRAy clusters and
suspected shortcuts, in one ``AuditAnalysis``.

The core functions take plain arrays (groups (N,) class per image, correct (N,) bool, metric values
(N,), features (N,G) from ``spray.map_features``) so they can be checked on synthetic data.
``analyse(audit)`` is the thin layer over an ``Audit`` (``heatlens.audit``): it reads the scores
table, streams each method's maps from the Zarr store in chunks, reloads the model and the images
the interventions need, and runs the rest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .findings import Finding, colour_dependence, find_shortcuts, sort_findings, _jsonable
from .spray import SprayResult, map_features, spray

OUTLIER_Z = 3.5  # robust z-score (median / MAD) beyond which an explanation is an outlier (Iglewicz-Hoaglin)
N_RANDOM = 16  # images per class scored with Random maps for the faithfulness baseline
N_LIST = 12  # images listed per ranking in the report


# --- per-class statistics --------------------------------------------------------------------------

def mean_sem(values: np.ndarray) -> tuple[float, float, int]:
    """Mean, standard error and count of the finite values (NaN, NaN, 0 when none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), sem, int(len(v))


def class_table(groups: np.ndarray, correct: np.ndarray | None, values: Mapping[str, np.ndarray], *,
                class_names: Sequence[str] | None = None, clusters: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """One row per class: n, accuracy, mean ± sem of every ``values`` column ("method/metric" -> (N,)), clusters."""
    rows = []
    for label in np.unique(groups[groups >= 0]):
        idx = np.flatnonzero(groups == label)
        row: dict[str, Any] = {"class": int(label), "name": _name(int(label), class_names), "n": int(len(idx))}
        row["accuracy"] = float(np.mean(correct[idx])) if correct is not None else None
        for key, v in values.items():
            m, s, _ = mean_sem(v[idx])
            row[key] = {"mean": m, "sem": s}
        if clusters is not None:
            row["clusters"] = clusters.get(int(label))
        rows.append(row)
    return rows


def faithfulness_vs_random(groups: np.ndarray, values: np.ndarray, random_values: np.ndarray,
                           random_groups: np.ndarray, *, higher_is_better: bool) -> list[dict[str, Any]]:
    """Per class: how much better than Random maps a method scores on one faithfulness metric.

    values (N,) the method's metric per image; random_values (M,) the same metric with Random maps on
    a sample of images whose classes are random_groups (M,). advantage = method - random (sign flipped
    for lower-is-better metrics, so positive is always better than chance), with its standard error.
    Sorted weakest first.
    """
    sign = 1.0 if higher_is_better else -1.0
    rows = []
    for label in np.unique(groups[groups >= 0]):
        m, s, n = mean_sem(values[groups == label])
        r, rs, rn = mean_sem(random_values[random_groups == label])
        if n == 0 or rn == 0:
            continue
        sem = float(np.sqrt(np.nan_to_num(s) ** 2 + np.nan_to_num(rs) ** 2))
        rows.append({"class": int(label), "method": m, "random": r, "advantage": sign * (m - r), "sem": sem, "n": n})
    return sorted(rows, key=lambda r: r["advantage"])


def random_baseline(model: Any, load_images: Any, groups: np.ndarray, metrics: Sequence[str], *,
                    n: int = N_RANDOM, seed: int = 0, options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Score Random maps (``heatlens.metrics.compare.random_explanation``) on up to ``n`` images per class.

    Returns (the sampled image indices (M,), metric -> values (M,)). options: the audit's metric settings.
    """
    from ..metrics import evaluate
    from ..metrics.compare import random_explanation

    rng = np.random.default_rng(seed)
    idx = np.concatenate([_sample(np.flatnonzero(groups == k), n, rng) for k in np.unique(groups[groups >= 0])])
    idx = np.sort(idx).astype(np.int64)
    x = load_images(idx)
    e = random_explanation(model, x, "predicted", seed=seed)
    results = evaluate(model, x, e, list(metrics), **dict(options or {}))
    return idx, {k: r.values.numpy() for k, r in results.items()}


# --- method disagreement ---------------------------------------------------------------------------

def rank_rows(x: np.ndarray) -> np.ndarray:
    """Ranks (average of ties not needed: maps are continuous) of every row of x (n,d), float32."""
    order = np.argsort(x, axis=1, kind="stable")
    ranks = np.empty_like(order, dtype=np.float32)
    np.put_along_axis(ranks, order, np.arange(x.shape[1], dtype=np.float32)[None], axis=1)
    return ranks


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of matching rows of a, b (n,d) -> (n,)."""
    ra, rb = rank_rows(a), rank_rows(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1), np.nan)


def method_disagreement(features: Mapping[str, np.ndarray], groups: np.ndarray) -> list[dict[str, Any]]:
    """Per class and method pair: mean Spearman correlation of the downsampled maps; least agreement first.

    features: method -> (N,G) normalised maps on one grid (``map_features`` with the same side).
    """
    names = list(features)
    rows = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = features[names[i]], features[names[j]]
            if a.shape != b.shape:
                continue  # maps of different resolution: compared on a common grid by the caller
            rho = spearman_rows(a, b)
            for label in np.unique(groups[groups >= 0]):
                m, s, n = mean_sem(rho[groups == label])
                rows.append({"class": int(label), "methods": f"{names[i]} vs {names[j]}", "spearman": m, "sem": s, "n": n})
    return sorted(rows, key=lambda r: (np.nan_to_num(r["spearman"], nan=2.0)))


# --- outliers and wrong reasons --------------------------------------------------------------------

def outlier_scores(features: np.ndarray, groups: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(N,) robust z-score of each map's distance to its class's median map (NaN where not valid).

    distance = L1 between normalised maps (total variation of relevance mass), z = 0.6745 (d - median) / MAD.
    """
    z = np.full(len(groups), np.nan)
    ok = np.ones(len(groups), bool) if valid is None else valid
    for label in np.unique(groups[groups >= 0]):
        idx = np.flatnonzero((groups == label) & ok)
        if len(idx) < 5:
            continue
        centre = np.median(features[idx], axis=0)
        d = np.abs(features[idx] - centre).sum(1)
        mad = np.median(np.abs(d - np.median(d)))
        z[idx] = 0.6745 * (d - np.median(d)) / max(mad, 1e-12)
    return z


def outliers(z: np.ndarray, *, threshold: float = OUTLIER_Z, limit: int = N_LIST) -> np.ndarray:
    """Indices whose robust z exceeds ``threshold``, largest first (at most ``limit``)."""
    idx = np.flatnonzero(np.nan_to_num(z, nan=-np.inf) > threshold)
    return idx[np.argsort(-z[idx], kind="stable")][:limit]


def wrong_reason_candidates(features: np.ndarray, correct: np.ndarray | None, shortcuts: Sequence[Finding], *,
                            limit: int = N_LIST) -> list[dict[str, Any]]:
    """Correct predictions whose own map puts most relevance on a confirmed shortcut region.

    For every cluster of every shortcut finding, each member's share of relevance inside the
    cluster's region; correct members with share >= 0.5 are listed, largest share first.
    """
    if correct is None or not shortcuts:
        return []
    rows = []
    for f in shortcuts:
        for c in f.evidence.get("clusters", []):
            grid = np.asarray(c["grid"], dtype=bool).ravel()
            members = np.asarray(c["members"], dtype=np.int64)
            share = features[members][:, grid].sum(1)
            for i, s in zip(members, share):
                if correct[i] and s >= 0.5:
                    rows.append({"image": int(i), "class": int(c["class"]), "share": float(s), "region": f.region["name"]})
    rows.sort(key=lambda r: -r["share"])
    return rows[:limit] if limit else rows


def _sample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(idx if len(idx) <= n else rng.choice(idx, n, replace=False))


def _name(k: int, class_names: Sequence[str] | None) -> str:
    return class_names[k] if class_names is not None and 0 <= k < len(class_names) else str(k)


# --- predictions through the engine -----------------------------------------------------------------

def predict_probabilities(model: Any, x: Tensor, *, batch_size: int | None = None) -> Tensor:
    """Softmax probabilities (N,K) of images (N,C,H,W), batched by ``heatlens.batching`` without gradients."""
    from ..batching import map_batches
    from ..models.adapter import as_classifier

    clf = as_classifier(model, x)
    x = x.to(clf.device)

    def step(start: int, stop: int) -> Tensor:
        return torch.softmax(clf(x[start:stop]).float(), 1).cpu()

    was_training = clf.training
    clf.eval()
    try:
        return map_batches(step, x.shape[0], batch_size=batch_size, grad=False, model=clf,
                           item_shape=tuple(x.shape[1:]), desc="intervention")
    finally:
        clf.train(was_training)


# --- the analysis of an Audit ------------------------------------------------------------------------

@dataclass
class AuditAnalysis:
    """Everything ``analyse`` found. ``findings`` are sorted (shortcuts first); ``to_json()`` for machines.

    summary: dataset numbers; classes: per-class rows; spray: SprayResult of ``method``; faithfulness:
    metric -> per-class rows vs Random (weakest first); disagreement: per class and method pair;
    outlier_z: (N,) robust z of ``method``'s maps; wrong_reason: rows; rejected: candidates the
    intervention did not confirm; notes: what could not be tested and why; seconds: time per stage.
    """

    method: str
    summary: dict[str, Any]
    classes: list[dict[str, Any]]
    findings: list[Finding]
    spray: SprayResult = field(repr=False)
    faithfulness: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    disagreement: list[dict[str, Any]] = field(default_factory=list)
    outlier_z: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    wrong_reason: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    class_names: list[str] | None = None

    @property
    def shortcuts(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in ("shortcut", "colour")]

    def to_json(self) -> dict[str, Any]:
        clusters = [{"class": c.label, "cluster": c.index, "size": c.size, "representatives": c.representatives,
                     "boundary": c.boundary} for cc in self.spray.classes.values() for c in cc.clusters]
        return _jsonable({
            "method": self.method, "summary": self.summary, "findings": [f.to_dict() for f in self.findings],
            "classes": self.classes, "clusters": clusters, "faithfulness": self.faithfulness,
            "disagreement": self.disagreement[:50], "wrong_reason": self.wrong_reason,
            "outliers": [{"image": int(i), "z": float(self.outlier_z[i])} for i in outliers(self.outlier_z)],
            "rejected_candidates": [{k: v for k, v in r.items() if k not in ("grid", "members")} for r in self.rejected],
            "notes": self.notes, "seconds": self.seconds,
        })

    def write_json(self, path: str | Path) -> Path:
        """findings.json: written to a temporary file first, so a half-written file never replaces a good one."""
        path = Path(path)
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path


def analyse_arrays(
    maps: Mapping[str, Any],
    groups: np.ndarray,
    correct: np.ndarray | None,
    values: Mapping[str, np.ndarray],
    *,
    method: str | None = None,
    model: Any = None,
    load_images: Any = None,
    input_size: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    higher_is_better: Mapping[str, bool] | None = None,
    metric_options: Mapping[str, Any] | None = None,
    embed: bool = True,
    seed: int = 0,
    n_intervention: int = 64,
) -> AuditAnalysis:
    """The whole analysis on arrays.

    maps: method -> (N,h,w) array-like (Zarr, NumPy; read in chunks). groups: (N,) class per image
    (label, or prediction when unlabelled; -1 to leave an image out). correct: (N,) bool or None.
    values: "method/metric" -> (N,) metric values. method: the method SpRAy clusters (default the first).
    model / load_images ((k,) indices -> (k,C,H,W)) / input_size (H,W): needed for the interventions
    and the Random baseline; without them findings are candidates only (a note says so).
    """
    if not maps:
        raise ValueError("maps must name at least one method's (N,h,w) maps")
    method = method or next(iter(maps))
    if method not in maps:
        raise ValueError(f"method {method!r} has no maps; have {sorted(maps)}")
    groups = np.asarray(groups, dtype=np.int64)
    seconds: dict[str, float] = {}
    tic = time.perf_counter()
    feats = {m: map_features(a) for m, a in maps.items()}
    seconds["features"] = time.perf_counter() - tic
    tic = time.perf_counter()
    result = spray(maps[method], groups, method=method, embed=embed, seed=seed, features=feats[method])
    seconds["spray"] = time.perf_counter() - tic
    features, valid, grid = feats[method]
    notes: list[str] = []
    findings: list[Finding] = []
    rejected: list[dict] = []
    tic = time.perf_counter()
    if model is not None and load_images is not None:
        predict = lambda x: predict_probabilities(model, x)  # noqa: E731
        size = input_size or tuple(load_images(np.array([0])).shape[-2:])
        found, rejected = find_shortcuts(result, predict, load_images, groups, correct, maps[method].shape[-2:], size,
                                         class_names=class_names, n=n_intervention, seed=seed)
        colour, note = colour_dependence(predict, load_images, groups, class_names=class_names, seed=seed, localised=found)
        notes.append(f"colour test: {note}")
        findings += found + ([colour] if colour is not None else [])
        if not found:
            notes.append(_no_shortcut_note(rejected))
    else:
        notes.append("no model or images were given, so no intervention ran and no shortcut can be confirmed")
    seconds["findings"] = time.perf_counter() - tic
    for f in findings:  # members of each cluster, for the wrong-reason list (kept out of findings.json)
        for c in f.evidence.get("clusters", []):
            cl = result.classes[c["class"]].clusters[c["cluster"]]
            c["members"] = cl.members
    tic = time.perf_counter()
    z = outlier_scores(features, groups, valid)
    wrong = wrong_reason_candidates(features, correct, [f for f in findings if f.kind == "shortcut"])
    common = {m: f for m, (f, _, g) in feats.items() if g == grid}
    disagreement = method_disagreement(common, groups) if len(common) > 1 else []
    if len(common) < len(feats):
        notes.append("methods with maps of another resolution were left out of the disagreement table")
    faith = _faithfulness(groups, values, higher_is_better or {}, model, load_images, metric_options, seed, notes)
    seconds["tables"] = time.perf_counter() - tic
    findings += _secondary_findings(faith, disagreement, z, wrong, class_names, method)
    for f in findings:
        for c in f.evidence.get("clusters", []):
            c.pop("members", None)
    clusters = {k: cc.k for k, cc in result.classes.items()}
    table = class_table(groups, correct, values, class_names=class_names, clusters=clusters)
    summary = {
        "images": int(len(groups)), "classes": int(len(np.unique(groups[groups >= 0]))), "methods": list(maps),
        "metrics": sorted({k.split("/", 1)[1] for k in values if "/" in k}),
        "accuracy": float(np.mean(correct[groups >= 0])) if correct is not None and (groups >= 0).any() else None,
        "clustered_method": method, "clusters": int(sum(clusters.values())),
        "maps_without_relevance": int((~valid).sum()), "grid": list(grid),
    }
    return AuditAnalysis(method=method, summary=summary, classes=table, findings=sort_findings(findings),
                         spray=result, faithfulness=faith, disagreement=disagreement, outlier_z=z, wrong_reason=wrong,
                         rejected=rejected, notes=notes, seconds=seconds,
                         class_names=list(class_names) if class_names is not None else None)


def _no_shortcut_note(rejected: list[dict]) -> str:
    if not rejected:
        return "no cluster's relevance sits on a fixed patch, an edge or a region its class's other images do not use"
    return (f"{len(rejected)} suspicious cluster(s) were tested and not confirmed: erasing their region did not change "
            "predictions for that class more than for the others, and pasting it elsewhere did not move predictions")


def _faithfulness(groups, values, hib, model, load_images, options, seed, notes) -> dict[str, list[dict]]:
    """Per metric and method: per-class advantage over Random maps (weakest first)."""
    metrics = sorted({k.split("/", 1)[1] for k in values if "/" in k and k.split("/", 1)[1] in hib})
    if not metrics:
        return {}
    if model is None or load_images is None:
        notes.append("the Random-map baseline needs the model and images; faithfulness was not compared with it")
        return {}
    try:
        idx, rand = random_baseline(model, load_images, groups, metrics, seed=seed, options=options)
    except (ValueError, TypeError, RuntimeError) as err:  # a metric that needs more than maps (e.g. a mask)
        notes.append(f"Random-map baseline not computed: {err}")
        return {}
    out = {}
    for key, v in values.items():
        if "/" not in key:
            continue
        method, metric = key.split("/", 1)
        if metric in rand:
            out[key] = faithfulness_vs_random(groups, v, rand[metric], groups[idx], higher_is_better=hib[metric])
    return out


def _secondary_findings(faith, disagreement, z, wrong, class_names, method) -> list[Finding]:
    """Weakest faithfulness, most disagreeing methods, outliers, wrong-reason candidates as findings."""
    out = []
    for key, rows in faith.items():
        weak = [r for r in rows if r["advantage"] <= 2 * r["sem"]]
        if weak:
            names = ", ".join(_name(r["class"], class_names) for r in weak[:5])
            out.append(Finding(kind="faithfulness", title=f"{key}: no better than Random maps in {len(weak)} class(es)",
                               text=f"For {key} the explanations of classes {names} score within two standard errors "
                                    f"of Random maps (or worse): their faithfulness is weakest.",
                               classes=[r["class"] for r in weak], evidence={"rows": weak}, score=float(len(weak))))
        elif rows:
            r = rows[0]
            out.append(Finding(kind="faithfulness", title=f"{key}: weakest class {_name(r['class'], class_names)}",
                               text=f"Every class beats Random maps on {key}; the smallest margin is class "
                                    f"{_name(r['class'], class_names)} ({r['advantage']:.3g} ± {r['sem']:.2g}).",
                               classes=[r["class"]], evidence={"rows": rows[:3]}, score=0.0))
    if disagreement:
        r = disagreement[0]
        out.append(Finding(kind="disagreement", title=f"Methods disagree most on class {_name(r['class'], class_names)}",
                           text=f"{r['methods']}: mean Spearman correlation {r['spearman']:.2f} over {r['n']} images of class "
                                f"{_name(r['class'], class_names)} (lowest of all classes and method pairs).",
                           classes=[r["class"]], evidence={"rows": disagreement[:5]}, score=float(1 - r["spearman"])))
    top = outliers(z)
    if len(top):
        out.append(Finding(kind="outliers", title=f"{int((np.nan_to_num(z, nan=-1) > OUTLIER_Z).sum())} explanations are outliers in their class",
                           text=f"Their {method} maps are far from their class's median map (robust z > {OUTLIER_Z}); "
                                "look at them: unusual images, label errors or a different strategy.",
                           images=[int(i) for i in top], evidence={"z": [float(z[i]) for i in top]}, method=method,
                           score=float(len(top))))
    if wrong:
        out.append(Finding(kind="wrong_reason", title=f"{len(wrong)} correct predictions rest on the suspected shortcut",
                           text="These images are classified correctly, but at least half of their relevance lies in a "
                                "shortcut region: right, possibly for the wrong reason.",
                           classes=sorted({r["class"] for r in wrong}), images=[r["image"] for r in wrong],
                           evidence={"rows": wrong}, method=method, score=float(len(wrong))))
    return out


def analyse(audit: Any, *, method: str | None = None, embed: bool = True, seed: int = 0,
            n_intervention: int = 64, model: Any = None) -> AuditAnalysis:
    """Analyse an ``Audit`` (``heatlens.audit``): the thin layer over ``analyse_arrays``.

    method: the method whose maps SpRAy clusters (default the audit's first). model: the model for the
    interventions (default ``audit.model()``; pass it when it cannot be reloaded).
    """
    scores = audit.scores
    methods = list(audit.methods)
    first = scores[scores["method"] == methods[0]].sort_values("image")
    n = int(first["image"].max()) + 1 if len(first) else 0
    labels = first["label"].to_numpy(dtype="float64", na_value=np.nan)
    preds = first["prediction"].to_numpy(dtype="float64", na_value=np.nan)
    labelled = np.isfinite(labels)
    groups = np.where(labelled, labels, preds)
    groups = np.where(np.isfinite(groups), groups, -1).astype(np.int64)
    if "error" in first:
        groups[first["error"].notna().to_numpy()] = -1  # failed rows carry no map
    correct = first["correct"].to_numpy(dtype=bool, na_value=False) if labelled.any() else None
    values: dict[str, np.ndarray] = {}
    hib = {}
    from ..metrics import metric_info

    for m in methods:
        rows = scores[scores["method"] == m].sort_values("image")
        for metric in audit.metrics:
            if metric in rows:
                values[f"{m}/{metric}"] = rows[metric].to_numpy(dtype="float64", na_value=np.nan)
                info = metric_info(metric)
                if info is not None:
                    hib[metric] = bool(info.higher_is_better)
    maps = {m: audit.maps(m) for m in methods}
    if model is None:
        try:
            model = audit.model()
        except Exception as err:  # noqa: BLE001 - a model that cannot be reloaded still leaves the tables
            model = None
            reason = f"{type(err).__name__}: {err}"
    else:
        reason = ""
    load = audit.load_images if model is not None else None
    options = (audit.manifest.get("settings", {}) or {}).get("metric_kwargs") if isinstance(audit.manifest, dict) else None
    result = analyse_arrays(maps, groups[:n], correct, values, method=method, model=model, load_images=load,
                            class_names=audit.classes, higher_is_better=hib, metric_options=options, embed=embed,
                            seed=seed, n_intervention=n_intervention)
    if model is None:
        result.notes.append(f"the model could not be reloaded ({reason})")
    return result
