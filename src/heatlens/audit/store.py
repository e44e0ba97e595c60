"""The audit store: one folder holding a Parquet table, a Zarr store and a JSON manifest.

    DIR/manifest.json               model (spec, fingerprint, preprocessing), settings, source, shard list
    DIR/scores/shard-00000.parquet  one part of the table per shard: a row per (image, method)
    DIR/recommendation.parquet      with --recommend: a row per (class, method), heatlens.audit.recommend
    DIR/arrays.zarr/                predictions (N,K) float32, maps/<method> (N,h,w) float16,
                                    inputs (N,C,H,W) float32 for in-memory sources (no paths to re-read)

Work is done in shards of ``shard_size`` consecutive images. A shard's arrays are written first and its
Parquet part last, to a temporary name renamed into place: the part file is the commit, so a shard is
visible only when complete. An interrupted audit (even ``kill -9``) resumes by recomputing the shards
without a part file; chunks of the arrays are aligned with shards, so a redone shard overwrites exactly
the chunks a killed one may have half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

FORMAT = "heatlens-audit/1"
MANIFEST, SCORES, ARRAYS = "manifest.json", "scores", "arrays.zarr"
RECOMMENDATION = "recommendation.parquet"  # written by heatlens.audit.recommend (--recommend)
GRID = 4  # map_cell_{i}_{j}: mass fractions of a GRID x GRID grid
MAP_STATS = ("map_centroid_y", "map_centroid_x", "map_entropy", "map_border_mass",
             *(f"map_cell_{i}_{j}" for i in range(GRID) for j in range(GRID)))
# settings that change the records: resuming with any of them different is refused
RECORD_SETTINGS = ("methods", "metrics", "method_options", "metric_options", "shard_size", "map_size", "seed", "target")


@dataclass(frozen=True)
class ShardResult:
    """What one shard produced (numpy, so it travels between processes cheaply).

    columns: the Parquet columns, a row per (image, method), images in order then methods in order.
    predictions: (n,K) float32 logits (NaN rows for failed images). maps: method -> (n,h,w) float16.
    inputs: (n,C,H,W) float32 model inputs, or None when the source is re-readable from paths.
    notes: method -> the first warning it raised on this shard (the engine reports them once, at the end).
    """

    shard: int
    start: int
    stop: int
    columns: dict[str, Any]
    predictions: np.ndarray
    maps: dict[str, np.ndarray]
    inputs: np.ndarray | None
    failed: int
    notes: dict[str, str] = field(default_factory=dict)


class Store:
    """Writes one audit folder (``Audit`` reads it)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- creating, checking, resuming ---------------------------------------------------------
    def prepare(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> dict[str, Any]:
        """Create the store for ``manifest``, or check an existing one: returns the manifest to use.

        An existing audit is refused unless ``resume`` (same settings required) or ``overwrite``.
        """
        existing = self.read_manifest()
        if existing is not None and overwrite:
            self.remove()
            existing = None
        elif existing is None and self.root.exists() and any(self.root.iterdir()) and not overwrite:
            raise ValueError(f"out={str(self.root)!r} exists and is neither empty nor a heatlens audit; "
                             "choose another folder or pass overwrite=True (--overwrite)")
        if existing is not None:
            if not resume:
                raise ValueError(f"out={str(self.root)!r} already holds an audit; pass resume=True (--resume) to "
                                 "finish it or overwrite=True (--overwrite) to replace it")
            mismatch = differences(existing, manifest)
            if mismatch:
                raise ValueError(f"cannot resume the audit in {str(self.root)!r} with other settings: "
                                 f"{'; '.join(mismatch)}. Use the same settings, or overwrite=True (--overwrite) "
                                 "to start again")
            return existing
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SCORES).mkdir(exist_ok=True)
        self._create_arrays(manifest)
        self.write_manifest(manifest)
        return manifest

    def remove(self) -> None:
        """Delete this store's own files (only them: other files in the folder stay)."""
        for name in (SCORES, ARRAYS):
            if (self.root / name).exists():
                shutil.rmtree(self.root / name)
        if (self.root / RECOMMENDATION).exists():
            (self.root / RECOMMENDATION).unlink()
        (self.root / MANIFEST).unlink(missing_ok=True)

    def _create_arrays(self, m: dict[str, Any]) -> None:
        import zarr

        n, size = m["n_images"], m["settings"]["shard_size"]
        h, w = m["map_shape"]
        group = zarr.open_group(str(self.root / ARRAYS), mode="w")
        group.create_array("predictions", shape=(n, m["num_classes"]), chunks=(size, m["num_classes"]),
                           dtype="float32", fill_value=np.nan)
        for method in m["settings"]["methods"]:
            group.create_array(f"maps/{method}", shape=(n, h, w), chunks=(size, h, w), dtype="float16",
                               fill_value=np.nan)
        if m["store_inputs"]:
            c, ih, iw = m["model"]["input_size"]
            group.create_array("inputs", shape=(n, c, ih, iw), chunks=(size, c, ih, iw), dtype="float32",
                               fill_value=np.nan)

    # --- shards ---------------------------------------------------------------------------------
    def done_shards(self) -> set[int]:
        """Shards whose Parquet part exists (the commit marker)."""
        folder = self.root / SCORES
        if not folder.exists():
            return set()
        return {int(p.stem.split("-")[1]) for p in folder.glob("shard-*.parquet")}

    def commit(self, result: ShardResult, manifest: dict[str, Any]) -> None:
        """Write a shard: arrays first, then the Parquet part atomically, then the manifest's shard list."""
        self.write_arrays(result)
        self.write_part(result)
        entry = {"index": result.shard, "start": result.start, "stop": result.stop,
                 "file": f"{SCORES}/{part_name(result.shard)}", "failed": result.failed, "notes": result.notes}
        shards = [s for s in manifest["shards"] if s["index"] != result.shard] + [entry]
        manifest["shards"] = sorted(shards, key=lambda s: s["index"])
        self.write_manifest(manifest)

    def write_arrays(self, result: ShardResult) -> None:
        import zarr

        group = zarr.open_group(str(self.root / ARRAYS), mode="r+")
        rows = slice(result.start, result.stop)
        group["predictions"][rows] = result.predictions
        for method, maps in result.maps.items():
            group[f"maps/{method}"][rows] = maps
        if result.inputs is not None:
            group["inputs"][rows] = result.inputs

    def write_part(self, result: ShardResult) -> None:
        import pyarrow.parquet as pq

        table = records_table(result.columns)
        final = self.root / SCORES / part_name(result.shard)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=".parquet")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            _fsync(tmp)
            os.replace(tmp, final)  # atomic on POSIX: the shard appears whole or not at all
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # --- manifest ---------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        if not path.exists():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        path = self.root / MANIFEST
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, path)


def part_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences that make resuming wrong: settings, model, source, number of images."""
    out = []
    for key in RECORD_SETTINGS:
        a, b = old["settings"].get(key), new["settings"].get(key)
        if a != b:
            out.append(f"{key} was {a!r}, now {b!r}")
    if old["model"]["fingerprint"] != new["model"]["fingerprint"]:
        out.append(f"the model differs (fingerprint {old['model']['fingerprint']} vs {new['model']['fingerprint']})")
    if old["source"]["fingerprint"] != new["source"]["fingerprint"] or old["n_images"] != new["n_images"]:
        out.append(f"the data differs ({old['n_images']} images, fingerprint {old['source']['fingerprint']} vs "
                   f"{new['n_images']} images, fingerprint {new['source']['fingerprint']})")
    return out


def records_table(columns: dict[str, Any]):
    """Parquet columns -> pyarrow Table with the audit schema (nullable ints and booleans)."""
    import pyarrow as pa

    types = {"image": pa.int64(), "path": pa.string(), "label": pa.int64(), "label_name": pa.string(),
             "prediction": pa.int64(), "prediction_name": pa.string(), "confidence": pa.float64(),
             "correct": pa.bool_(), "method": pa.string(), "error": pa.string()}
    arrays = {k: pa.array(v, type=types.get(k, pa.float64())) for k, v in columns.items()}
    return pa.table(arrays)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading --------------------------------------------------------------------------------------
class Audit:
    """An audit on disk: ``Audit.open(dir)``; what ``heatlens.audit(...)`` returns.

    dir: the folder. manifest: the JSON manifest as a dict. classes: class names (index -> name) or None.
    methods / metrics: what was run. scores: pandas DataFrame, a row per (image, method).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        manifest = Store(self.dir).read_manifest()
        if manifest is None:
            if not self.dir.exists():
                raise FileNotFoundError(f"audit folder {str(self.dir)!r} does not exist")
            raise ValueError(f"{str(self.dir)!r} is not a heatlens audit (no {MANIFEST})")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{str(self.dir)!r} holds audit format {manifest.get('format')!r}, expected {FORMAT!r}")
        self.manifest: dict[str, Any] = manifest

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Audit":
        """Open an audit folder written by ``heatlens.audit`` / ``heatlens audit``."""
        return cls(directory)

    @property
    def classes(self) -> list[str] | None:
        c = self.manifest.get("classes")
        return list(c) if c is not None else None

    @property
    def methods(self) -> list[str]:
        return list(self.manifest["settings"]["methods"])

    @property
    def metrics(self) -> list[str]:
        return list(self.manifest["settings"]["metrics"])

    @property
    def n_images(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def complete(self) -> bool:
        """Whether every shard is written (False for an interrupted audit not yet resumed)."""
        return len(Store(self.dir).done_shards()) == int(self.manifest["n_shards"])

    @cached_property
    def scores(self):
        """pandas DataFrame, one row per (image, method), sorted by image then method order.

        Columns: image, path, label (Int64), label_name, prediction (Int64, <NA> for failed images),
        prediction_name, confidence, correct (boolean), method, error, one float column per metric and
        the map statistics ``map_*`` (see docs/audit.md).
        """
        import pandas as pd
        import pyarrow.parquet as pq

        parts = sorted((self.dir / SCORES).glob("shard-*.parquet"))
        if not parts:
            return pd.DataFrame(columns=["image", "path", "label", "label_name", "prediction", "prediction_name",
                                         "confidence", "correct", "method", "error", *self.metrics, *MAP_STATS])
        df = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
        df["label"] = df["label"].astype("Int64")
        df["prediction"] = df["prediction"].astype("Int64")
        df["correct"] = df["correct"].astype("boolean")
        for col in ("path", "error"):  # str or None (pandas' string dtype would show NaN)
            df[col] = df[col].astype(object).where(df[col].notna(), None)
        order = {m: i for i, m in enumerate(self.methods)}
        df = df.sort_values(["image", "method"], key=lambda s: s.map(order) if s.name == "method" else s,
                            kind="stable").reset_index(drop=True)
        return df

    @cached_property
    def _paths(self) -> dict[int, str]:
        """image -> path, for the images already in the table."""
        per_image = self.scores.drop_duplicates("image")
        return dict(zip(per_image["image"].tolist(), per_image["path"].tolist()))

    def _arrays(self):
        import zarr

        return zarr.open_group(str(self.dir / ARRAYS), mode="r")

    def maps(self, method: str):
        """Lazy zarr array (N,h,w) float16 of ``method``'s maps (``Explanation.maps()``, area-downsampled
        to at most ``map_size`` on the longer side); row i is image i, NaN for failed or missing images."""
        if method not in self.methods:
            from ..validation import unknown_name

            raise unknown_name("audited method", method, self.methods)
        return self._arrays()[f"maps/{method}"]

    @cached_property
    def recommendation(self):
        """pandas DataFrame, a row per (class, method), from ``audit(..., recommend=True)``; None when
        it was not run (columns: ``heatlens.audit.recommend.recommendation_table``)."""
        entry = self.manifest.get("recommendation")
        if entry is None or not (self.dir / entry["file"]).exists():
            return None
        import pyarrow.parquet as pq

        return pq.read_table(self.dir / entry["file"]).to_pandas()

    def predictions(self):
        """Lazy zarr array (N,K) float32 of logits at each image (NaN rows for failed images)."""
        return self._arrays()["predictions"]

    def load_images(self, indices: Sequence[int] | int) -> Tensor:
        """Images ``indices`` as model input (k,C,H,W): re-read from their paths with the model's
        preprocessing (file sources), or read from the stored inputs (in-memory sources)."""
        idx = [int(indices)] if isinstance(indices, (int, np.integer)) else [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < self.n_images]
        if bad:
            raise ValueError(f"indices must be in [0, {self.n_images}), got {bad}")
        if self.manifest["store_inputs"]:
            arr = self._arrays()["inputs"]
            return torch.from_numpy(np.stack([arr[i] for i in idx])) if idx else torch.empty(0)
        from ..models.preprocessing import Preprocessing

        prep = self.manifest["model"]["preprocessing"]
        prep = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in prep.items()})
        paths = self._paths
        missing = [i for i in idx if i not in paths]
        if missing:
            raise ValueError(f"images {missing} are not in the audit yet (interrupted: resume it first)")
        return torch.cat([prep(paths[i]) for i in idx]) if idx else torch.empty(0)

    def model(self):
        """The audited model loaded again from the spec in the manifest, or None (with a warning) when the
        audit was given an in-memory model object (there is no spec to load it from)."""
        spec = self.manifest["model"].get("spec")
        if spec is None:
            import warnings

            warnings.warn("this audit was run on an in-memory model object: there is no spec to load it again "
                          "from; audit a zoo name, a .keras/.pt2 file or 'package.module:function' to have one",
                          stacklevel=2)
            return None
        from .models import load_spec

        m = self.manifest["model"]
        return load_spec(spec, weights=m.get("weights"), input_size=m.get("input_size_arg"))

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (f"Audit({str(self.dir)!r}, {self.n_images} images, methods={self.methods}, "
                f"metrics={self.metrics}, {state})")
