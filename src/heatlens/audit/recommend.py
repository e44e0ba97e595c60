"""``heatlens audit --recommend``: which attribution method to trust, per class, on a sample of the audit.

After the shards, ``hl.recommend_per_class`` runs on up to ``per_class`` images of each predicted class
(a seeded sample of the readable images, re-read with ``Audit.load_images``), with the audit's own
methods and cheap settings (``DEFAULT_OPTIONS``). The result is one table, a row per (class, method)
plus each class's Random-map reference, written atomically to ``DIR/recommendation.parquet`` and
recorded under ``"recommendation"`` in the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..validation import check_positive_int

from .store import RECOMMENDATION
# cheap on purpose: recommend's defaults take minutes on 8 photos; an audit adds this once, per class
DEFAULT_OPTIONS: dict[str, Any] = {"metrics": ("insertion", "deletion"), "checks": ("model_randomization",),
                                   "steps": 10, "check_images": 2, "n_bootstrap": 200}
PER_CLASS = 4
COLUMNS = ("rank", "method", "tier", "verdict")  # first, then the evidence columns rec.rows hold


def sample_per_class(scores: Any, per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """Up to ``per_class`` readable images per predicted class, drawn with ``seed`` -> (indices, classes),
    sorted by image index. scores: ``Audit.scores``."""
    per_image = scores.drop_duplicates("image")
    per_image = per_image[per_image["error"].isna() & per_image["prediction"].notna()]
    rng = np.random.default_rng(seed)
    picked: list[tuple[int, int]] = []
    for cls, group in per_image.groupby("prediction", sort=True):
        images = group["image"].to_numpy()
        chosen = rng.choice(images, size=min(per_class, len(images)), replace=False)
        picked += [(int(i), int(cls)) for i in chosen]
    picked.sort()
    return [i for i, _ in picked], [c for _, c in picked]


def recommendation_table(recs: Mapping[str, Any]):
    """{class name: Recommendation} -> DataFrame, a row per (class, method) in rank order, Random last.

    Columns: class, images, best (the class's best method), stability (its label), then the method's
    row of ``rec.table`` (rank, method, tier, verdict and the evidence; scalars only)."""
    import pandas as pd

    rows = []
    for name, rec in recs.items():
        head = {"class": name, "images": rec.params["n_images"], "best": rec.best,
                "stability": rec.stability["label"]}
        for r in rec.rows:
            rows.append({**head, **{k: v for k, v in r.items()
                                    if v is None or isinstance(v, (bool, int, float, str, np.floating))}})
    df = pd.DataFrame(rows)
    first = ["class", "images", "best", "stability", *COLUMNS]
    return df[[c for c in first if c in df] + [c for c in df if c not in first]] if rows else df


def run_recommendation(audit: Any, model: Any, manifest: dict[str, Any], *, options: Mapping[str, Any] | None,
                       per_class: int = PER_CLASS, seed: int = 0) -> dict[str, Any]:
    """Recommend per class on a sample of ``audit``, write ``DIR/recommendation.parquet`` -> the manifest
    entry {"file", "images", "options", "per_class", "classes", "seconds"}."""
    import time

    from ..recommendation import recommend_per_class

    check_positive_int(per_class, "per_class", minimum=2)
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"recommend_options must be a dict of hl.recommend keywords, got {type(options).__name__}")
    settings = manifest["settings"]
    opts = {**DEFAULT_OPTIONS, "methods": tuple(settings["methods"]), "seed": seed,
            "batch_size": settings.get("batch_size"), **dict(options or {})}
    method_options = settings.get("method_options") or {}
    if method_options and "method_kwargs" not in (options or {}):
        opts["method_kwargs"] = method_options
    start = time.perf_counter()
    idx, classes = sample_per_class(audit.scores, per_class, seed)
    recs = recommend_per_class(model, audit.load_images(idx), classes, **opts) if idx else {}
    table = recommendation_table(recs)
    _write_atomic(table, audit.dir / RECOMMENDATION)
    from .engine import _jsonable

    return {"file": RECOMMENDATION, "images": idx, "per_class": per_class, "classes": list(recs),
            "options": _jsonable(opts), "seconds": round(time.perf_counter() - start, 2)}


def _write_atomic(table: Any, path: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".tmp-{path.name}")
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp)
    os.replace(tmp, path)
