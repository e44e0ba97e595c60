"""Suspected shortcuts found without being told where to look, and the interventions that test them.

A SpRAy cluster (``heatlens.audit.spray``) is a *candidate* when its relevance sits where real
evidence rarely does:

* **a fixed patch**: half of its mean relevance lies in a small region (at most ``PATCH_AREA`` of
  the image) that most of its images use too (the same place across many images);
* **an edge**: its relevance is concentrated on the image's outer band (a border, a corner);
* **a private region**: a region the class's other clusters do not use (Lapuschkin et al.'s
  watermark on a subset of the horse images).

A candidate becomes a *finding* only when an intervention confirms that the model depends on the
region: erasing it (each channel filled with the image's median) in the cluster's images changes
the predictions or drops the confidence, and the numbers are reported next to the same erasure in
images of other classes and a transplant (the region pasted into other classes' images: does the
prediction follow it?). Candidates whose regions touch form one finding, so a shortcut whose
position encodes the class (one patch per class along the top edge) is reported once with every
class it drives.

A global colour cue has no region: SpRAy cannot localise it. ``colour_dependence`` tests it by
intervention instead (images turned grey: do predictions change?), and the finding says so.

All functions take arrays and a ``predict`` callable ((k,C,H,W) -> probabilities (k,K)), so they
run on synthetic data; ``heatlens.audit.analysis`` wires them to an ``Audit``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .spray import ClassClusters, Cluster, SprayResult

PEAK_LEVEL = 0.3  # a peak region: connected cells at >= 30% of the mean map's maximum
PATCH_MASS = 0.2  # every suspicious region holds >= 20% of the cluster's mean relevance
PATCH_AREA, PATCH_LIFT = 0.05, 10.0  # a "fixed patch": <= 5% of the image, >= 10x its area share of relevance,
PATCH_SPECIFICITY = 3.0  # and >= 3x the relevance other classes' images put there
EDGE_LIFT, EDGE_SHARE = 1.5, 0.25  # an "edge": the outer band holds >= 25% of the mass, >= 1.5x its area share
PRIVATE_AREA, PRIVATE_CONTRAST = 0.15, 3.0  # a "private region": <= 15%, >= 3x the class's other clusters' mass
CONSISTENCY = 0.5  # and at least half of the cluster's images put at least half that mass there
CONFIRM_CHANGE = 0.25  # erasing the region changes >= 25% of predictions, or
CONFIRM_DROP = 0.25  # drops the predicted class's mean probability by >= 0.25
SPECIFIC_RATIO = 0.5  # ... and the same erasure in other classes' images does at most half of that,
FOLLOW = 0.3  # or pasting the region into them makes >= 30% of them predict the cluster's class
COLOUR_CHANGE = 0.3  # turning images grey changes >= 30% of a class's predictions
MIN_CLUSTER = 10

Predict = Callable[[Tensor], Tensor]  # (k,C,H,W) model-space images -> (k,K) probabilities
LoadImages = Callable[[np.ndarray], Tensor]  # image indices (k,) -> (k,C,H,W)


@dataclass
class Finding:
    """One thing the audit found, for people (``title``, ``text``) and machines (the rest).

    kind: "shortcut" | "colour" | "faithfulness" | "disagreement" | "outliers" | "wrong_reason".
    classes: class indices concerned; images: example image indices; region: None or
    {"name", "box": [top, bottom, left, right] in input pixels, "grid": (gh,gw) 0/1 rows};
    evidence: the numbers behind it; score: how strong (findings are sorted by kind, then score).
    """

    kind: str
    title: str
    text: str
    classes: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    region: dict[str, Any] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    score: float = 0.0
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


KIND_ORDER = ("shortcut", "colour", "wrong_reason", "faithfulness", "disagreement", "outliers")


def sort_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Shortcuts first (the most images affected first), then colour dependence, then the rest."""
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(findings, key=lambda f: (rank.get(f.kind, len(rank)), -f.score))


# --- regions ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """A cluster whose relevance sits in a suspicious region (before any intervention)."""

    cluster: Cluster
    mask: np.ndarray  # (gh,gw) bool
    reasons: tuple[str, ...]
    stats: dict[str, float]


def peak_region(density: np.ndarray, within: np.ndarray | None = None, rel: float = PEAK_LEVEL) -> np.ndarray:
    """(gh,gw) bool: the connected cells around the maximum of ``density`` that reach ``rel`` x the maximum.

    within: optional (gh,gw) bool restricting where the peak is looked for (the outer band).
    The peak of a cluster's mean map, not its top half: a bright patch stays small even when the
    rest of the relevance is spread over the object.
    """
    from scipy.ndimage import label as components

    d = np.where(within, density, 0) if within is not None else density
    if not np.isfinite(d).all() or d.max() <= 0:
        return np.zeros(d.shape, dtype=bool)
    high = d >= rel * d.max()
    lab, _ = components(high, structure=np.ones((3, 3), bool))
    return lab == lab.flat[int(np.argmax(d))]


def edge_band(grid: tuple[int, int]) -> np.ndarray:
    """(gh,gw) bool: the outer band of the image, about 8% of the shorter side wide (at least a cell)."""
    width = max(1, int(round(0.08 * min(grid))))
    band = np.ones(grid, dtype=bool)
    band[width:-width, width:-width] = False
    return band


def region_stats(cluster_features: np.ndarray, mean_map: np.ndarray, mask: np.ndarray, *,
                 rest_map: np.ndarray | None = None, other_map: np.ndarray | None = None) -> dict[str, float]:
    """Numbers that make a region (``mask`` (gh,gw) bool) of one cluster suspicious.

    cluster_features: (n,G) the members' normalised maps; mean_map: their mean (gh,gw), sums to 1;
    rest_map: the mean map of the class's other clusters; other_map: the mean map of other classes.
    Returns area (fraction of the image), mass (share of the mean relevance in the region), lift
    (mass / area), consistency (share of members putting at least half the mean mass there),
    edge_share / edge_lift (mean relevance on the outer band, and over the band's area share),
    contrast (mass vs the class's other clusters' mass there), specificity (vs other classes').
    """
    g = mask.size
    area = float(mask.sum() / g)
    band = edge_band(mask.shape)
    mass = float(mean_map[mask].sum())
    per_image = cluster_features[:, mask.ravel()].sum(1)
    edge_share = float(mean_map[band].sum())
    ratio = lambda ref: mass / max(float(ref[mask].sum()), 1e-9) if ref is not None else float("nan")  # noqa: E731
    return {
        "area": area, "mass": mass, "lift": mass / max(area, 1e-9),
        "consistency": float((per_image >= 0.5 * mass).mean()) if mass > 0 else 0.0,
        "edge_share": edge_share, "edge_lift": edge_share / float(band.mean()),
        "contrast": ratio(rest_map), "specificity": ratio(other_map),
    }


def _reasons(stats: dict[str, float], kind: str) -> bool:
    """Whether a region's numbers make it a candidate of ``kind`` (thresholds in the module constants)."""
    if stats["consistency"] < CONSISTENCY or stats["mass"] < PATCH_MASS:
        return False
    if kind == "fixed patch":
        return stats["area"] <= PATCH_AREA and stats["lift"] >= PATCH_LIFT and stats["specificity"] >= PATCH_SPECIFICITY
    if kind == "edge":
        return stats["edge_share"] >= EDGE_SHARE and stats["edge_lift"] >= EDGE_LIFT
    return stats["area"] <= PRIVATE_AREA and stats["contrast"] >= PRIVATE_CONTRAST  # "private region"


def shortcut_candidates(result: SprayResult, *, min_size: int = MIN_CLUSTER) -> list[Candidate]:
    """Clusters of ``result`` whose relevance sits on a fixed patch, an edge, or a private region."""
    band = edge_band(result.grid)
    sums = {k: result.features[cc.members].sum(0) for k, cc in result.classes.items()}
    total, count = sum(sums.values()), sum(len(cc.members) for cc in result.classes.values())
    out = []
    for label, cc in result.classes.items():
        n_other = count - len(cc.members)
        other = ((total - sums[label]) / n_other).reshape(result.grid) if n_other else None
        for cl in cc.clusters:
            if cl.size < min_size:
                continue
            rest = _rest_map(result, cc, cl)
            feats, m = result.features[cl.members], cl.mean_map
            regions = {"fixed patch": peak_region(m), "edge": peak_region(m, within=band)}
            if rest is not None:
                regions["private region"] = peak_region(np.clip(m - rest, 0, None))
            found = {}
            for kind, mask in regions.items():
                if mask.any():
                    stats = region_stats(feats, m, mask, rest_map=rest, other_map=other)
                    if _reasons(stats, kind):
                        found[kind] = (mask, stats)
            if found:
                mask = np.logical_or.reduce([mk for mk, _ in found.values()])
                stats = region_stats(feats, m, mask, rest_map=rest, other_map=other)
                out.append(Candidate(cluster=cl, mask=mask, reasons=tuple(found), stats=stats))
    return out


def _rest_map(result: SprayResult, cc: ClassClusters, cl: Cluster) -> np.ndarray | None:
    others = np.setdiff1d(cc.members, cl.members)
    if len(others) == 0:
        return None
    return result.features[others].mean(0).reshape(result.grid)


def region_name(mask: np.ndarray) -> str:
    """Words for a (gh,gw) region: "frame (all four edges)", "top edge", "bottom-left corner", "centre", ..."""
    gh, gw = mask.shape
    band = edge_band(mask.shape)
    width = max(1, int(round(0.08 * min(mask.shape))))
    sides = {"top": mask[:width].any(), "bottom": mask[-width:].any(),
             "left": mask[:, :width].any(), "right": mask[:, -width:].any()}
    if mask[band].sum() >= 0.6 * mask.sum():
        touched = [s for s, v in sides.items() if v]
        if len(touched) >= 3 and mask[band].sum() >= 0.3 * band.sum():
            return "frame (" + ", ".join(touched) + " edges)"
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min() / gh, (rows.max() + 1) / gh, cols.min() / gw, (cols.max() + 1) / gw
    vert = "top" if r1 <= 0.34 else "bottom" if r0 >= 0.66 else "middle"
    horiz = "left" if c1 <= 0.34 else "right" if c0 >= 0.66 else "centre"
    if vert != "middle" and c1 - c0 >= 0.5:
        return f"{vert} edge"
    if horiz != "centre" and r1 - r0 >= 0.5:
        return f"{horiz} edge"
    if vert == "middle" and horiz == "centre":
        return "centre"
    if vert == "middle":
        return f"{horiz} side"
    if horiz == "centre":
        return f"{vert} centre"
    return f"{vert}-{horiz} corner"


def grid_to_pixels(mask: np.ndarray, map_shape: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """(gh,gw) grid mask -> (H,W) bool at input resolution (the grid covers the (h,w) map, padded)."""
    gh, gw = mask.shape
    h, w = int(map_shape[-2]), int(map_shape[-1])
    fh, fw = int(np.ceil(h / gh)), int(np.ceil(w / gw))
    H, W = int(size[-2]), int(size[-1])
    rows = np.minimum((np.arange(H) * h / H // fh).astype(int), gh - 1)
    cols = np.minimum((np.arange(W) * w / W // fw).astype(int), gw - 1)
    return mask[rows][:, cols]


def pixel_box(mask: np.ndarray) -> list[int]:
    """[top, bottom, left, right) bounds of a (H,W) bool mask."""
    rows, cols = np.nonzero(mask)
    return [int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1]


# --- interventions ---------------------------------------------------------------------------------

def erase(x: Tensor, mask: Tensor) -> Tensor:
    """x (k,C,H,W) with the (H,W) ``mask`` filled, per image and channel, with that image's median."""
    fill = x.flatten(2).median(2).values[:, :, None, None]
    return torch.where(mask.to(x.device)[None, None], fill.expand_as(x), x)


def transplant(x: Tensor, donors: Tensor, mask: Tensor) -> Tensor:
    """x (k,C,H,W) with the (H,W) ``mask`` region copied from ``donors`` (k,C,H,W)."""
    return torch.where(mask.to(x.device)[None, None], donors.to(x.device), x)


def grey(x: Tensor) -> Tensor:
    """x (k,C,H,W) with every pixel replaced by its mean over channels (colour removed)."""
    return x.mean(1, keepdim=True).expand_as(x).clone()


def is_grey(x: Tensor, tol: float = 1e-3) -> bool:
    """True when (nearly) every pixel of x (k,C,H,W) has equal channels: there is no colour to test."""
    if x.shape[1] < 2:
        return True
    spread = (x.amax(1) - x.amin(1)).flatten(1)
    scale = (x.amax() - x.amin()).clamp_min(1e-12)
    return bool(((spread / scale) > tol).float().mean() < 0.01)


def effect(predict: Predict, before: Tensor, after: Tensor) -> dict[str, Any]:
    """How predictions change from ``before`` to ``after`` images (k,C,H,W).

    Returns changed (share of predictions that change), confidence_before / _after (mean probability
    of the original prediction), drop (their difference), predictions_after (k,) ints.
    """
    p0, p1 = predict(before).float().cpu(), predict(after).float().cpu()
    pred0, pred1 = p0.argmax(1), p1.argmax(1)
    c0 = p0.gather(1, pred0[:, None])[:, 0]
    c1 = p1.gather(1, pred0[:, None])[:, 0]
    return {"n": int(len(pred0)), "changed": float((pred0 != pred1).float().mean()),
            "confidence_before": float(c0.mean()), "confidence_after": float(c1.mean()),
            "drop": float((c0 - c1).mean()), "predictions_after": pred1.tolist()}


def probe_region(predict: Predict, load_images: LoadImages, members: np.ndarray, others: np.ndarray,
                mask_px: np.ndarray, label: int, *, n: int = 64, seed: int = 0) -> dict[str, Any]:
    """The intervention for one cluster and region (``mask_px`` (H,W) bool at input resolution).

    members: the cluster's images; others: images of other classes. Erases the region in up to ``n``
    of each (erase_inside / erase_outside) and pastes it from the cluster's images into the others
    (transplant: ``follow`` = share now predicted as ``label``).
    """
    rng = np.random.default_rng(seed)
    inside = _sample(members, n, rng)
    mask = torch.as_tensor(mask_px)
    x_in = load_images(inside)
    out: dict[str, Any] = {"erase_inside": _public(effect(predict, x_in, erase(x_in, mask)))}
    if len(others):
        outside = _sample(others, n, rng)
        x_out = load_images(outside)
        out["erase_outside"] = _public(effect(predict, x_out, erase(x_out, mask)))
        donors = x_in[torch.as_tensor(rng.integers(0, len(inside), len(outside)))]
        moved = effect(predict, x_out, transplant(x_out, donors, mask))
        out["transplant"] = {**_public(moved), "follow": float(np.mean(np.asarray(moved["predictions_after"]) == label))}
    return out


def confirmed(test: dict[str, Any]) -> bool:
    """The model depends on the region *for this class*.

    Erasing it changes enough predictions (or drops enough confidence) in the cluster's images, and
    either the same erasure matters far less in other classes' images (the region is evidence for
    this class only) or pasting it into them makes the model predict the class. Erasing an object
    part that every class reads (a digit) fails both: it matters everywhere and transplants nothing.
    """
    e = test["erase_inside"]
    if not (e["changed"] >= CONFIRM_CHANGE or e["drop"] >= CONFIRM_DROP):
        return False
    out, moved = test.get("erase_outside"), test.get("transplant")
    if out is None:
        return True
    specific = out["changed"] <= SPECIFIC_RATIO * e["changed"] and out["drop"] <= SPECIFIC_RATIO * max(e["drop"], 0.0)
    return specific or (moved is not None and moved["follow"] >= FOLLOW)


def _sample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.asarray(idx)
    return np.sort(idx if len(idx) <= n else rng.choice(idx, n, replace=False))


def _public(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if k != "predictions_after"}


# --- findings ----------------------------------------------------------------------------------------

def find_shortcuts(result: SprayResult, predict: Predict, load_images: LoadImages, groups: np.ndarray,
                   correct: np.ndarray | None, map_shape: Sequence[int], input_size: Sequence[int], *,
                   class_names: Sequence[str] | None = None, n: int = 64, seed: int = 0) -> tuple[list[Finding], list[dict]]:
    """Suspected shortcuts: candidates confirmed by intervention, regions that touch merged into one.

    groups: (N,) class per image (as given to ``spray``); correct: (N,) bool or None (unlabelled).
    map_shape: (h,w) of the stored maps; input_size: (H,W) of the model's input.
    Returns (findings, rejected) where rejected lists candidates the intervention did not confirm.
    """
    groups = np.asarray(groups)
    accepted, rejected = [], []
    for cand in shortcut_candidates(result):
        cl = cand.cluster
        mask_px = grid_to_pixels(cand.mask, map_shape, input_size)
        others = np.flatnonzero((groups != cl.label) & (groups >= 0))
        test = probe_region(predict, load_images, cl.members, others, mask_px, cl.label, n=n, seed=seed)
        row = {"class": cl.label, "cluster": cl.index, "size": cl.size, "reasons": list(cand.reasons),
               "region": region_name(cand.mask), "box": pixel_box(mask_px), "grid": cand.mask.astype(int).tolist(), **{k: round(v, 4) for k, v in cand.stats.items()},
               **_accuracy_split(cl, result.classes[cl.label], correct), "test": test}
        (accepted if confirmed(test) else rejected).append((cand, row))
    groups_ = _touching(accepted)
    rejected = _attach(groups_, rejected)
    findings = [_shortcut_finding(group, result, map_shape, input_size, class_names) for group in groups_]
    return findings, [row for _, row in rejected]


def _attach(groups: list[list[tuple[Candidate, dict]]], rejected: list[tuple[Candidate, dict]]) -> list:
    """Add to a confirmed shortcut the rejected candidates of other classes that rely on the same region.

    A cue every class reads (a frame whose colour encodes the class) fails the specificity test in
    some classes: erasing it matters everywhere. Once the region is confirmed as a shortcut for some
    classes, a class whose cluster sits on a touching region and whose predictions depend on it
    (erasing changes them, the first half of ``confirmed``) is driven by the same shortcut.
    """
    from scipy.ndimage import binary_dilation

    left = []
    for cand, row in rejected:
        e = row["test"]["erase_inside"]
        depends = e["changed"] >= CONFIRM_CHANGE or e["drop"] >= CONFIRM_DROP
        home = next((g for g in groups if depends and any(
            (binary_dilation(c.mask, structure=np.ones((3, 3), bool)) & cand.mask).any() for c, _ in g)), None)
        if home is None:
            left.append((cand, row))
        else:
            row["reasons"] = [*row["reasons"], "same region as a confirmed shortcut"]
            home.append((cand, row))
    return left


def _accuracy_split(cl: Cluster, cc: ClassClusters, correct: np.ndarray | None) -> dict[str, Any]:
    if correct is None:
        return {"accuracy_inside": None, "accuracy_outside": None}
    rest = np.setdiff1d(cc.members, cl.members)
    acc = lambda idx: float(np.mean(correct[idx])) if len(idx) else None  # noqa: E731
    return {"accuracy_inside": acc(cl.members), "accuracy_outside": acc(rest)}


def _touching(items: list[tuple[Candidate, dict]]) -> list[list[tuple[Candidate, dict]]]:
    """Group candidates whose regions touch (8-neighbourhood): one shortcut, possibly many classes."""
    from scipy.ndimage import binary_dilation

    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    grown = [binary_dilation(c.mask, structure=np.ones((3, 3), bool)) for c, _ in items]
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if (grown[i] & items[j][0].mask).any():
                parent[root(i)] = root(j)
    groups: dict[int, list] = {}
    for i in range(len(items)):
        groups.setdefault(root(i), []).append(items[i])
    return list(groups.values())


def _shortcut_finding(group: list[tuple[Candidate, dict]], result: SprayResult, map_shape: Sequence[int],
                      input_size: Sequence[int], class_names: Sequence[str] | None) -> Finding:
    union = np.logical_or.reduce([c.mask for c, _ in group])
    name = region_name(union)
    box = pixel_box(grid_to_pixels(union, map_shape, input_size))
    rows = sorted((r for _, r in group), key=lambda r: r["class"])
    classes = sorted({r["class"] for r in rows})
    n_images = sum(r["size"] for r in rows)
    erase_in = _weighted(rows, "erase_inside")
    erase_out = _weighted([r for r in rows if "erase_outside" in r["test"]], "erase_outside")
    follow = _weighted([r for r in rows if "transplant" in r["test"]], "transplant", "follow")
    per_class = len({tuple(r["box"]) for r in rows}) > 1
    cname = lambda k: class_names[k] if class_names is not None and k < len(class_names) else str(k)  # noqa: E731
    names = ", ".join(cname(k) for k in classes)
    reasons = sorted({s for r in rows for s in r["reasons"]})
    text = (f"In {n_images} images of {len(classes)} class{'es' if len(classes) > 1 else ''} ({names}) the explanations "
            f"concentrate on the {name} (pixels rows {box[0]}-{box[1]}, columns {box[2]}-{box[3]}"
            f"{', at a different place for each class' if per_class else ''}): {', '.join(reasons)}. "
            f"Erasing that region changes {erase_in['changed']:.0%} of these predictions (confidence "
            f"{erase_in['confidence_before']:.2f} -> {erase_in['confidence_after']:.2f})")
    if erase_out is not None:
        text += f", against {erase_out['changed']:.0%} in images of other classes"
    if follow is not None:
        text += f"; pasted into other classes' images it makes the model predict its class in {follow['follow']:.0%}"
    text += ". The model uses this region as evidence for the class: a suspected shortcut (check what is there)."
    examples = [int(i) for c, _ in group for i in c.cluster.representatives[:3]]
    score = n_images * erase_in["changed"] + n_images * erase_in["drop"]
    return Finding(
        kind="shortcut", title=f"Suspected shortcut: the {name} drives {len(classes)} class{'es' if len(classes) > 1 else ''}",
        text=text, classes=classes, images=examples, method=result.method,
        region={"name": name, "box": box, "grid": union.astype(int).tolist(), "per_class": per_class},
        evidence={"images": n_images, "erase_inside": erase_in, "erase_outside": erase_out, "transplant": follow,
                  "clusters": rows},
        score=float(score),
    )


def _weighted(rows: list[dict], key: str, *fields: str) -> dict[str, float] | None:
    """Image-weighted mean of the intervention numbers of several clusters."""
    if not rows:
        return None
    fields = fields or ("changed", "confidence_before", "confidence_after", "drop")
    w = np.array([r["test"][key]["n"] for r in rows], dtype=float)
    out = {f: float(np.average([r["test"][key][f] for r in rows], weights=w)) for f in fields}
    out["n"] = int(w.sum())
    return out


def colour_dependence(predict: Predict, load_images: LoadImages, groups: np.ndarray, *,
                      class_names: Sequence[str] | None = None, n: int = 32, seed: int = 0,
                      localised: Sequence[Finding] = ()) -> tuple[Finding | None, str]:
    """Turn up to ``n`` images per class grey: classes whose predictions change depend on colour.

    A global cue (a background tint) has no region for SpRAy to find; this intervention tests it.
    Returns (finding or None, a note saying what was tested).
    """
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    per_class, sampled = {}, []
    for label in np.unique(groups[groups >= 0]):
        idx = _sample(np.flatnonzero(groups == label), n, rng)
        x = load_images(idx)
        sampled.append(x[:4])
        per_class[int(label)] = (idx, x)
    if not per_class:
        return None, "no images to test"
    if is_grey(torch.cat(sampled)):
        return None, "the images have no colour (every channel equal), so colour dependence was not tested"
    rows = {k: _public(effect(predict, x, grey(x))) for k, (idx, x) in per_class.items()}
    hit = [k for k, r in rows.items() if r["changed"] >= COLOUR_CHANGE]
    note = f"images turned grey change {np.mean([r['changed'] for r in rows.values()]):.0%} of predictions on average"
    if not hit:
        return None, note
    cname = lambda k: class_names[k] if class_names is not None and k < len(class_names) else str(k)  # noqa: E731
    changed = float(np.average([rows[k]["changed"] for k in hit], weights=[rows[k]["n"] for k in hit]))
    n_imgs = int(sum(rows[k]["n"] for k in hit))
    covered = set().union(*(f.classes for f in localised)) if localised else set()
    text = (f"Turning the images grey changes {changed:.0%} of the predictions in {len(hit)} classes "
            f"({', '.join(cname(k) for k in hit)}; {n_imgs} images tested). The model depends on colour. "
            "This cue is not localisable: no region of the explanations carries it (a tint or colour cast spreads "
            "over the whole image), so SpRAy cannot show it; the grey intervention is the evidence.")
    if covered & set(hit):
        text += " Part of it may be the coloured region of the shortcut above."
    examples = [int(i) for k in hit for i in per_class[k][0][:2]]
    return Finding(kind="colour", title=f"Colour drives {len(hit)} classes (not localisable)", text=text,
                   classes=hit, images=examples, evidence={"per_class": rows, "changed": changed, "images": n_imgs},
                   score=changed * n_imgs), note


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if np.isfinite(f) else None
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v
