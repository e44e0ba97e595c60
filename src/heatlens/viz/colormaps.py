"""Colormaps as numpy lookup tables, without pyplot (shared by the figures and the HTML report).

``hot``, ``gray``, ``bwr`` and ``seismic`` are built here from their segment definitions, exactly as
matplotlib builds them (256-entry table, same indexing), so colours match matplotlib's; any other
name (``viridis``, ``magma``, ``coolwarm``, ...) is sampled from matplotlib's colormap registry,
which does not import pyplot. Diverging maps are centred at 0: ``colorize`` puts 0 at the centre
colour by using symmetric limits.
"""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from typing import Any

import numpy as np

N_COLORS = 256
# (x, value) break points per channel, as matplotlib's _cm.py defines them
_SEGMENTS: dict[str, dict[str, tuple[tuple[float, float], ...]]] = {
    "hot": {
        "red": ((0.0, 0.0416), (0.365079, 1.0), (1.0, 1.0)),
        "green": ((0.0, 0.0), (0.365079, 0.0), (0.746032, 1.0), (1.0, 1.0)),
        "blue": ((0.0, 0.0), (0.746032, 0.0), (1.0, 1.0)),
    },
    "gray": {"red": ((0.0, 0.0), (1.0, 1.0)), "green": ((0.0, 0.0), (1.0, 1.0)), "blue": ((0.0, 0.0), (1.0, 1.0))},
    "bwr": {
        "red": ((0.0, 0.0), (0.5, 1.0), (1.0, 1.0)),
        "green": ((0.0, 0.0), (0.5, 1.0), (1.0, 0.0)),
        "blue": ((0.0, 1.0), (0.5, 1.0), (1.0, 0.0)),
    },
    "seismic": {
        "red": ((0.0, 0.0), (0.25, 0.0), (0.5, 1.0), (0.75, 1.0), (1.0, 0.5)),
        "green": ((0.0, 0.0), (0.25, 0.0), (0.5, 1.0), (0.75, 0.0), (1.0, 0.0)),
        "blue": ((0.0, 0.3), (0.25, 1.0), (0.5, 1.0), (0.75, 0.0), (1.0, 0.0)),
    },
}
SEQUENTIAL = ("hot", "viridis", "gray", "magma", "inferno", "plasma", "Reds", "Greens")
DIVERGING = ("bwr", "seismic", "coolwarm", "RdBu_r", "PiYG", "RdYlGn")


def is_diverging(cmap: str) -> bool:
    """Whether ``cmap`` is a diverging map (centred at 0 by ``colorize``)."""
    return cmap in DIVERGING or cmap.rstrip("_r") in DIVERGING


@lru_cache(maxsize=32)
def lookup_table(cmap: str, n: int = N_COLORS) -> np.ndarray:
    """(n,4) RGBA floats in [0,1] sampled at linspace(0, 1, n), like matplotlib's ``_lut``."""
    if not isinstance(cmap, str):
        raise TypeError(f"cmap must be a colormap name, got {type(cmap).__name__}")
    reverse = cmap.endswith("_r") and cmap[:-2] in _SEGMENTS
    base = cmap[:-2] if reverse else cmap
    xs = np.linspace(0.0, 1.0, n)
    if base in _SEGMENTS:
        table = np.ones((n, 4))
        for i, channel in enumerate(("red", "green", "blue")):
            points = np.asarray(_SEGMENTS[base][channel], dtype=float)
            table[:, i] = np.interp(xs, points[:, 0], points[:, 1])
        return table[::-1].copy() if reverse else table
    import matplotlib  # the colormap registry only; pyplot is never imported here

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        from ..validation import unknown_name

        raise unknown_name("cmap", cmap, sorted(set(_SEGMENTS) | set(matplotlib.colormaps))) from None
    return np.asarray(colormap.resampled(n)(xs), dtype=float)


def apply_colormap(values: Any, cmap: str = "hot", vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Map values (...) to RGBA floats (...,4) as ``matplotlib.colormaps[cmap](Normalize(vmin, vmax)(values))``.

    Limits default to the values' min and max. Below vmin -> first colour, above vmax -> last colour,
    NaN -> transparent black (matplotlib's "bad" colour).
    """
    v = _as_array(values)
    lo = float(np.nanmin(v)) if vmin is None else float(vmin)
    hi = float(np.nanmax(v)) if vmax is None else float(vmax)
    if hi < lo:
        raise ValueError(f"vmax must be >= vmin, got vmin={lo}, vmax={hi}")
    table = lookup_table(cmap)
    n = table.shape[0]
    scaled = np.zeros_like(v) if hi == lo else (v - lo) / (hi - lo)
    scaled = scaled * n
    scaled[scaled == n] = n - 1  # exactly vmax is in range (matplotlib's rule)
    bad = np.isnan(scaled)
    with np.errstate(invalid="ignore"):
        index = np.clip(np.floor(np.nan_to_num(scaled, nan=0.0)), 0, n - 1).astype(np.int64)
    out = table[index]
    out[bad] = 0.0
    return out


def limits(values: Any, cmap: str, vmin: float | None = None, vmax: float | None = None) -> tuple[float, float]:
    """Colour limits: given ones, else symmetric +-max|v| for diverging maps (0 at the centre), else min/max."""
    v = _as_array(values)
    if vmin is not None and vmax is not None:
        return float(vmin), float(vmax)
    if is_diverging(cmap):
        bound = float(np.nanmax(np.abs(v))) if v.size else 0.0
        bound = bound if bound > 0 else 1.0
        return (-bound if vmin is None else float(vmin)), (bound if vmax is None else float(vmax))
    lo = float(np.nanmin(v)) if vmin is None else float(vmin)
    hi = float(np.nanmax(v)) if vmax is None else float(vmax)
    return lo, hi


def colorize(values: Any, cmap: str = "hot", vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """A (H,W) map -> (H,W,4) uint8 RGBA image; diverging maps get symmetric limits so 0 is the centre colour."""
    lo, hi = limits(values, cmap, vmin, vmax)
    return to_uint8(apply_colormap(values, cmap, lo, hi))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Floats in [0,1] -> uint8, rounding to nearest."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """(H,W), (H,W,3) or (H,W,4) uint8 (or floats in [0,1]) -> PNG file bytes (Pillow)."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = to_uint8(arr.astype(float))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(image: np.ndarray) -> str:
    """An image as a ``data:image/png;base64,...`` URI for self-contained HTML."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.array(values, dtype=float, copy=True)
