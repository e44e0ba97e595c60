"""Data sources for audits: anything that holds images becomes a ``Source`` of numbered items.

``as_source(data)`` accepts

* a folder in ImageFolder layout (``root/<class>/<image>``: labels and class names from the folders),
* a flat folder of images (no labels), a list of image paths (no labels),
* a ``torch.utils.data.Dataset`` yielding ``image`` or ``(image, label)`` (or a dict like below),
* a Hugging Face ``datasets.Dataset`` with an image column and, optionally, a label column
  (class names from its ``ClassLabel`` feature),
* arrays: an (N,...) array / tensor of images, or a tuple ``(images, labels)``.

Images are read one at a time when a shard needs them (``Source.read``), so memory does not grow with
the dataset. Images are in pixel form (paths, PIL, HWC arrays, (C,H,W) tensors in [0,1] or uint8):
the model's own preprocessing turns them into model input.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Item:
    """One image of a source: its position, where it came from, its label and the image itself.

    image: whatever ``Classifier.preprocess`` accepts (path, array, tensor, PIL). label: class index
    in the model's label space, or None when unlabelled.
    """

    index: int
    path: str | None
    label: int | None
    image: Any


@dataclass(frozen=True)
class Source:
    """n numbered images, read lazily.

    reader(i) -> (image, label or None). paths: one per image for file sources (None otherwise).
    classes: class names in label order (folder names, ``ClassLabel`` names) or None.
    description: JSON-able account of the source, stored in the manifest; ``fingerprint`` tells two
    sources apart (paths and sizes, or a hash of in-memory data). labels: known without reading
    the images (file sources), so an unreadable file still has its label.
    """

    n: int
    reader: Callable[[int], tuple[Any, int | None]]
    kind: str
    description: dict[str, Any]
    fingerprint: str
    paths: tuple[str, ...] | None = None
    labels: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None
    labelled: bool = False

    def __len__(self) -> int:
        return self.n

    @property
    def rereadable(self) -> bool:
        """Whether the images can be read again from the manifest alone (file paths)."""
        return self.paths is not None

    def item(self, index: int) -> Item:
        """Item ``index``; reading errors propagate (the engine records them as failed rows)."""
        path = self.paths[index] if self.paths is not None else None
        image, label = self.reader(index)
        return Item(index=index, path=path, label=label, image=image)


def as_source(data: Any, *, model_labels: Sequence[str] | None = None) -> Source:
    """Any supported ``data`` (see the module docstring) -> Source.

    model_labels: the model's class names; folder names that are model labels (or one of their
    comma-separated synonyms, "tabby" for "tabby cat, tabby") index into them, so ``correct`` compares
    like with like. Missing folders and folders without images raise ``FileNotFoundError`` / ``ValueError``.
    """
    if isinstance(data, Source):
        return data
    if isinstance(data, (str, os.PathLike)):
        return folder_source(Path(data), model_labels=model_labels)
    if isinstance(data, (list, tuple)) and data and all(isinstance(p, (str, os.PathLike)) for p in data):
        return paths_source([Path(p) for p in data])
    if isinstance(data, tuple) and len(data) == 2 and _is_array(data[0]):
        return array_source(data[0], data[1])
    if _is_array(data):
        return array_source(data, None)
    if _is_hf_dataset(data):
        return hf_source(data)
    if isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return dataset_source(data)
    if isinstance(data, (list, tuple)) and not data:
        raise ValueError("data is empty: it holds no images")
    raise TypeError(
        "data must be a folder, a list of image paths, a torch Dataset, a Hugging Face datasets.Dataset, "
        f"an (N,...) array of images or an (images, labels) tuple, got {type(data).__name__}"
    )


# --- files ----------------------------------------------------------------------------------------
def folder_source(root: Path, *, model_labels: Sequence[str] | None = None) -> Source:
    """ImageFolder (class sub-folders) or a flat folder of images; files sorted by class index, then name."""
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        return paths_source([root])
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {d.name: _images_in(d) for d in subdirs}
    per_class = {k: v for k, v in per_class.items() if v}
    if per_class:
        index, rule = class_indices(list(per_class), model_labels)
        names = sorted(per_class, key=lambda name: (index[name], name))  # data order: by class, then file name
        paths = [p for name in names for p in per_class[name]]
        labels = [index[name] for name in names for _ in per_class[name]]
        classes = _class_table(index, model_labels)
        src = paths_source(paths, labels=labels, classes=classes)
        desc = {**src.description, "kind": "image_folder", "root": str(root.resolve()), "folders": names,
                "label_rule": rule}
        return _replace(src, kind="image_folder", description=desc)
    flat = _images_in(root)
    if not flat:
        raise ValueError(f"data folder {str(root)!r} contains no images ({', '.join(IMAGE_SUFFIXES)}), "
                         "neither directly nor in class sub-folders")
    src = paths_source(flat)
    return _replace(src, kind="folder", description={**src.description, "kind": "folder", "root": str(root.resolve())})


def paths_source(paths: Sequence[Path], *, labels: Sequence[int] | None = None,
                 classes: Sequence[str] | None = None) -> Source:
    """Image files by path (a missing or unreadable file becomes a failed row, not an error here)."""
    from ..models.preprocessing import load_image

    if not paths:
        raise ValueError("data is empty: it holds no image paths")
    text = tuple(str(p) for p in paths)
    labels_t = tuple(labels) if labels is not None else None

    def read(i: int) -> tuple[Any, int | None]:
        # a writable copy: torch warns on the read-only array PIL hands out
        return np.array(load_image(text[i])), (labels_t[i] if labels_t is not None else None)

    h = hashlib.sha256()
    for p in text:
        stat = os.stat(p) if os.path.exists(p) else None
        h.update(f"{p}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}\n".encode())
    if labels_t is not None:
        h.update(repr(labels_t).encode())
    return Source(n=len(text), reader=read, kind="paths", paths=text, labels=labels_t, fingerprint=h.hexdigest()[:16],
                  classes=tuple(classes) if classes is not None else None, labelled=labels_t is not None,
                  description={"kind": "paths", "n": len(text)})


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_indices(names: Sequence[str], model_labels: Sequence[str] | None) -> tuple[dict[str, int], str]:
    """Folder name -> class index, and the rule used.

    ``model_labels``: every folder is a model label (or one of its comma-separated synonyms); ``integers``: every folder
    is a number (``10`` after ``9``, not after ``1``); otherwise ``sorted`` (torchvision's ImageFolder).
    """
    if model_labels:
        lookup: dict[str, int] = {}
        for i, lab in enumerate(model_labels):
            lookup.setdefault(lab, i)
            for synonym in lab.split(","):  # "tabby cat, tabby": either names class 281
                lookup.setdefault(synonym.strip(), i)
        if all(n in lookup for n in names):
            return {n: lookup[n] for n in names}, "model_labels"
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}, "integers"
    return {n: i for i, n in enumerate(sorted(names))}, "sorted"


def _class_table(index: dict[str, int], model_labels: Sequence[str] | None) -> tuple[str, ...]:
    """Class names by index: folder names where a folder has that index, model labels elsewhere."""
    size = max(max(index.values()) + 1, len(model_labels or ()))
    table = [str(model_labels[i]) if model_labels and i < len(model_labels) else str(i) for i in range(size)]
    for name, i in index.items():
        table[i] = name
    return tuple(table)


# --- in memory ------------------------------------------------------------------------------------
def array_source(images: Any, labels: Any = None) -> Source:
    """(N,...) images (numpy or tensor) with optional (N,) integer labels."""
    n = len(images)
    if n == 0:
        raise ValueError("data is empty: the images array has 0 rows")
    y = None
    if labels is not None:
        y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
        if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be (N,) integers with N={n} (one per image), got {y.dtype} {y.shape}")

    def read(i: int) -> tuple[Any, int | None]:
        return images[i], (int(y[i]) if y is not None else None)

    h = hashlib.sha256()
    arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    h.update(repr((arr.shape, str(arr.dtype))).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    if y is not None:
        h.update(y.tobytes())
    return Source(n=n, reader=read, kind="arrays", fingerprint=h.hexdigest()[:16], labelled=y is not None,
                  description={"kind": "arrays", "n": n, "shape": list(arr.shape), "dtype": str(arr.dtype)})


def dataset_source(ds: Any) -> Source:
    """A map-style dataset: ``ds[i]`` is an image, ``(image, label)`` or a dict with image / label keys."""
    n = len(ds)
    if n == 0:
        raise ValueError("data is empty: the dataset has 0 items")
    classes = getattr(ds, "classes", None)

    def read(i: int) -> tuple[Any, int | None]:
        return _split_item(ds[i])

    first = read(0)
    name = type(ds).__name__
    fp = hashlib.sha256(f"{type(ds).__module__}.{name}|{n}|{_digest(first[0])}|{first[1]}".encode()).hexdigest()[:16]
    return Source(n=n, reader=read, kind="dataset", fingerprint=fp, labelled=first[1] is not None,
                  classes=tuple(str(c) for c in classes) if classes is not None else None,
                  description={"kind": "dataset", "type": f"{type(ds).__module__}.{name}", "n": n})


def hf_source(ds: Any) -> Source:
    """A Hugging Face ``datasets.Dataset`` with an image column (``Image`` feature or named image/img)."""
    features = getattr(ds, "features", {}) or {}
    image_col = next((k for k, f in features.items() if type(f).__name__ == "Image"), None)
    image_col = image_col or next((k for k in ("image", "img", "pixel_values") if k in features), None)
    if image_col is None:
        raise ValueError(f"the Hugging Face dataset has no image column (columns: {', '.join(features)}); "
                         "expected an Image feature or a column named 'image'")
    label_col = next((k for k, f in features.items() if type(f).__name__ == "ClassLabel"), None)
    label_col = label_col or next((k for k in ("label", "labels") if k in features), None)
    classes = getattr(features[label_col], "names", None) if label_col else None
    n = len(ds)
    if n == 0:
        raise ValueError("data is empty: the dataset has 0 rows")

    def read(i: int) -> tuple[Any, int | None]:
        row = ds[i]
        return row[image_col], (int(row[label_col]) if label_col is not None else None)

    fp = getattr(ds, "_fingerprint", None) or hashlib.sha256(f"{n}|{_digest(read(0)[0])}".encode()).hexdigest()[:16]
    return Source(n=n, reader=read, kind="hf_dataset", fingerprint=str(fp), labelled=label_col is not None,
                  classes=tuple(classes) if classes else None,
                  description={"kind": "hf_dataset", "n": n, "image_column": image_col, "label_column": label_col})


def _split_item(item: Any) -> tuple[Any, int | None]:
    if isinstance(item, dict):
        image = next((item[k] for k in ("image", "img", "pixel_values") if k in item), None)
        if image is None:
            raise ValueError(f"dataset items are dicts without an 'image' key (keys: {', '.join(item)})")
        label = next((item[k] for k in ("label", "labels") if k in item), None)
        return image, None if label is None else int(label)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], int(item[1])
    return item, None


def _digest(image: Any) -> str:
    arr = np.asarray(image.cpu() if isinstance(image, Tensor) else image)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def _is_array(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, Tensor))


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets") and hasattr(obj, "features")


def _replace(src: Source, **changes: Any) -> Source:
    import dataclasses

    return dataclasses.replace(src, **changes)
