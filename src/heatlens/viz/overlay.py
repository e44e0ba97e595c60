"""Overlays of attribution maps on images, explanation figures, notebook HTML and LIME boundaries.

Arrays first: ``overlay`` and ``lime_boundaries`` return RGB arrays (usable by the HTML report with no
matplotlib); ``plot_explanation`` builds a matplotlib Figure (pyplot imported lazily, never shown).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from .colormaps import apply_colormap, is_diverging, limits, png_data_uri, to_uint8

SIGNED_REDUCTIONS = ("sum", "mean", "none")
POSITIVE, NEGATIVE = (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)  # lime's green / red


def as_image(image: Any) -> np.ndarray:
    """One image -> (H,W,3) float in [0,1].

    Accepts (H,W,3|1) / (H,W) arrays (uint8 or floats in [0,1]) and (3|1,H,W) tensors or arrays.
    """
    arr = image.detach().cpu().double().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H,W,C) or (C,H,W) with C in 1, 3, got shape {arr.shape}")
    arr = arr[..., :3].astype(float) / (255.0 if arr.dtype == np.uint8 else 1.0)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.clip(arr, 0.0, 1.0)


def as_images(images: Any, n: int | None = None) -> list[np.ndarray]:
    """A batch of images (N,H,W,C) array, (N,C,H,W) tensor or a list -> list of (H,W,3) floats."""
    if isinstance(images, (list, tuple)):
        out = [as_image(im) for im in images]
    else:
        arr = images
        if hasattr(arr, "dim") and arr.dim() == 3 or (not hasattr(arr, "dim") and np.asarray(arr).ndim <= 3):
            arr = arr[None]
        out = [as_image(im) for im in arr]
    return out if n is None else out[:n]


def display_inputs(x: Any) -> list[np.ndarray]:
    """Model-space inputs (N,C,H,W) -> displayable images, min-max scaled per image (preprocessing unknown)."""
    arr = x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=float)
    lo = arr.reshape(arr.shape[0], -1).min(1)[:, None, None, None]
    hi = arr.reshape(arr.shape[0], -1).max(1)[:, None, None, None]
    scaled = (arr - lo) / np.where(hi > lo, hi - lo, 1.0)
    return [as_image(im) for im in scaled]


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h,w) map to (H,W) (coarse CAMs onto their image)."""
    if values.shape == tuple(size):
        return values
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(values, dtype=torch.float64)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(
    image: Any,
    values: Any,
    cmap: str = "hot",
    alpha: float | np.ndarray = 0.5,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a colour-mapped (H,W) map onto an image -> (H,W,3) uint8.

    out = round(255 * ((1 - alpha) * image + alpha * cmap(map))), with image in [0,1] and alpha a
    number or an (H,W) array in [0,1]. Diverging maps use symmetric limits (0 at the centre colour);
    a map of another size is resized bilinearly to the image.
    """
    img = as_image(image)
    m = values.detach().cpu().double().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=float)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"values must be an (H,W) map, got shape {m.shape}")
    m = resize_map(m, img.shape[:2])
    a = np.asarray(alpha, dtype=float)
    if a.ndim not in (0, 2) or float(a.min()) < 0 or float(a.max()) > 1:
        raise ValueError(f"alpha must be a number or an (H,W) array in [0, 1], got {alpha!r}" if a.ndim == 0
                         else f"alpha must be a number or an (H,W) array in [0, 1], got shape {a.shape}")
    if a.ndim == 2:
        a = resize_map(a, img.shape[:2])[..., None]
    lo, hi = limits(m, cmap, vmin, vmax)
    colours = apply_colormap(m, cmap, lo, hi)[..., :3]
    return to_uint8((1.0 - a) * img + a * colours)


def robust_limit(values: Any, percentile: float = 99.0) -> float:
    """The ``percentile`` of |values| (PAIR's visualisation clips there), or max |values| when that is 0.

    Gradient maps are heavy-tailed: one pixel several times the 99th percentile makes a min-max scaled
    map almost black, so views clip at a high percentile while the Explanation keeps the raw values.
    """
    v = np.abs(_as_map(values))
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 1.0
    bound = float(np.percentile(v, percentile))
    if bound <= 0:
        bound = float(v.max())
    return bound if bound > 0 else 1.0


def heat_overlay(image: Any, values: Any, *, signed: bool | None = None, percentile: float = 99.0,
                 cmap: str | None = None, smooth: bool = False) -> np.ndarray:
    """A readable overlay -> (H,W,3) uint8, colours scaled to the ``percentile`` of |map| (clipped above).

    Pixel maps (gradients, occlusion; ``smooth=False``): the map's colours over a dimmed grey copy of
    the image, opacity proportional to |value|, so the few strong pixels stand out and the image shows
    where the map is near zero. signed (default: the map has negative values): ``bwr`` centred at 0,
    red supports the target, blue opposes it; otherwise ``hot``. Smooth maps (CAMs, ``smooth=True``):
    the classic ``jet`` overlay at opacity 0.5 over the colour image.
    """
    m = _as_map(values)
    signed = bool((m < 0).any()) if signed is None else signed
    bound = robust_limit(m, percentile)
    lo = -bound if signed else 0.0
    if smooth:
        return overlay(image, m, cmap or ("bwr" if signed else "jet"), 0.5, vmin=lo, vmax=bound)
    img = as_image(image)
    grey = np.repeat(img.mean(-1, keepdims=True), 3, axis=-1) * 0.6 + 0.15  # dimmed, colourless background
    strength = np.clip(np.abs(resize_map(m, img.shape[:2])) / bound, 0.0, 1.0)
    return overlay(grey, m, cmap or ("bwr" if signed else "hot"), 0.9 * strength, vmin=lo, vmax=bound)


def explanation_overlay(explanation: Any, index: int, image: Any, *, reduce: str | None = None,
                        percentile: float = 99.0, num_features: int | None = None) -> np.ndarray:
    """The picture of one image's explanation -> (H,W,3) uint8 (the CLI's PNGs, the HTML report, grids).

    LIME / KernelSHAP (segment weights in ``extras``): lime's picture, outlines of the ``num_features``
    strongest segments over the image (green positive, red negative; default the explanation's own
    ``num_features`` or 5). Other methods: ``heat_overlay`` of ``maps(reduce)`` (default ``sum_abs``
    for colour attributions, the signed map for single-channel ones such as CAMs and occlusion); coarse
    maps (CAMs, smaller than the input) as smooth overlays.
    """
    extras = explanation.extras
    if "segments" in extras and "weights" in extras:
        k = num_features if num_features is not None else int(explanation.params.get("num_features", 5) or 5)
        return to_uint8(lime_boundaries(image, extras["segments"][index], extras["weights"][index],
                                        num_features=k, thick=True))
    if reduce is None:
        reduce = "sum_abs" if explanation.attributions.shape[1] > 1 else "sum"
    m = explanation.maps(reduce)[index].detach().cpu().double().numpy()
    coarse = tuple(explanation.attributions.shape[-2:]) != tuple(m.shape[-2:])
    return heat_overlay(image, m, percentile=percentile, smooth=coarse)


def _as_map(values: Any) -> np.ndarray:
    m = values.detach().cpu().double().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=float)
    return m[0] if m.ndim == 3 and m.shape[0] == 1 else m


def lime_boundaries(
    image: Any,
    segments: Any,
    weights: Any,
    *,
    num_features: int = 5,
    positive_only: bool = False,
    thick: bool = False,
) -> np.ndarray:
    """LIME's picture: boundaries of the ``num_features`` strongest segments, green positive, red negative.

    image (H,W,3); segments (H,W) int labels; weights (S,) one per segment. Segments are ranked by
    |weight| (lime's order); ``positive_only`` keeps positive ones. Boundaries are drawn as
    ``skimage.segmentation.mark_boundaries`` draws them (``thick``: its "thick" mode, readable on
    large photos). Returns (H,W,3) float in [0,1].
    """
    from skimage.segmentation import mark_boundaries

    img = as_image(image)
    segs = np.asarray(segments.detach().cpu() if hasattr(segments, "detach") else segments).astype(np.int64)
    w = np.asarray(weights.detach().cpu() if hasattr(weights, "detach") else weights, dtype=float).ravel()
    if segs.shape != img.shape[:2]:
        raise ValueError(f"segments must be (H,W) = {img.shape[:2]}, got {segs.shape}")
    if segs.max() >= len(w):
        raise ValueError(f"weights must hold one value per segment ({segs.max() + 1}), got {len(w)}")
    chosen = kept_segments(w, num_features, positive_only)
    out = img
    for colour, sign in ((POSITIVE, 1), (NEGATIVE, -1)):
        picked = [s for s in chosen if np.sign(w[s]) == sign]
        labels = np.where(np.isin(segs, picked), segs + 1, 0)
        if picked:
            out = mark_boundaries(out, labels, color=colour, mode="thick" if thick else "outer")
    return np.clip(out, 0.0, 1.0)


def kept_segments(weights: np.ndarray, num_features: int, positive_only: bool = False) -> list[int]:
    """Indices of the ``num_features`` segments with the largest |weight| (positive ones only if asked)."""
    order = np.argsort(-np.abs(weights), kind="stable")
    if positive_only:
        order = [s for s in order if weights[s] > 0]
    return [int(s) for s in order if weights[s] != 0][:num_features]


def explanation_panels(
    explanation: Any,
    images: Any = None,
    *,
    reduce: str | None = None,
    cmap: str | None = None,
    alpha: float | None = None,
    max_images: int = 8,
    percentile: float = 99.0,
) -> list[dict[str, Any]]:
    """Per image: the picture, the map, its overlay (``explanation_overlay``), colour scale and captions.

    reduce: channel reduction (default ``sum_abs`` for colour attributions, the signed map for
    single-channel ones). cmap / alpha: force a plain ``overlay`` with that colormap and opacity
    instead (min-max limits of the old view are not used: limits are the ``percentile`` of |map|).
    "cmap" and "limits" of a panel describe its colour bar; None for LIME outlines.
    """
    n = min(len(explanation), max_images)
    default_reduce = "sum_abs" if explanation.attributions.shape[1] > 1 else "sum"
    maps = explanation.maps(reduce or default_reduce).detach().cpu().double().numpy()[:n]
    pictures = _pictures(explanation, images, n)
    names = explanation.target_names()
    preds = explanation.predictions.tolist()
    labels = explanation.labels
    lime_like = "segments" in explanation.extras and "weights" in explanation.extras and reduce is None
    coarse = tuple(explanation.attributions.shape[-2:]) != tuple(maps.shape[-2:])
    panels = []
    for i in range(n):
        pred = labels[preds[i]] if labels is not None else str(preds[i])
        signed = bool((maps[i] < 0).any())
        bound = robust_limit(maps[i], percentile)
        if cmap is not None or alpha is not None:
            cm = cmap or default_cmap(reduce or default_reduce)
            lo, hi = (-bound, bound) if is_diverging(cm) else (0.0, bound)
            picture = overlay(pictures[i], maps[i], cm, 0.5 if alpha is None else alpha, vmin=lo, vmax=hi)
        else:
            picture = explanation_overlay(explanation, i, pictures[i], reduce=reduce, percentile=percentile)
            cm = "bwr" if signed else ("jet" if coarse else "hot")
            lo, hi = (-bound, bound) if signed else (0.0, bound)
        panels.append({
            "image": pictures[i], "map": maps[i], "overlay": picture, "cmap": None if lime_like else cm,
            "limits": None if lime_like else (lo, hi), "target": names[i], "prediction": pred,
        })
    return panels


def short_label(name: str, width: int = 24) -> str:
    """An ImageNet-style label ("tabby cat, tabby, ...") as its first name, wrapped to ``width`` characters."""
    import textwrap

    first = str(name).split(",")[0].strip()
    return "\n".join(textwrap.wrap(first, width)) or first


def default_cmap(reduce: str) -> str:
    """Signed views get a diverging map centred at 0, magnitudes a sequential one."""
    return "bwr" if reduce in SIGNED_REDUCTIONS else "hot"


def _pictures(explanation: Any, images: Any, n: int) -> list[np.ndarray]:
    if images is not None:
        pics = as_images(images, n)
        if len(pics) < n:
            raise ValueError(f"images must hold at least {n} images for this explanation, got {len(pics)}")
        return pics
    if explanation.inputs is not None:
        return display_inputs(explanation.inputs[:n])
    size = explanation.input_size or tuple(explanation.attributions.shape[-2:])
    return [np.zeros((*size, 3)) for _ in range(n)]


def plot_explanation(
    explanation: Any,
    images: Any = None,
    *,
    reduce: str | None = None,
    cmap: str | None = None,
    alpha: float | None = None,
    max_images: int = 8,
    show_images: bool = True,
    colorbar: bool = True,
    figsize: tuple[float, float] | None = None,
    percentile: float = 99.0,
):
    """Each image (top row) and its explanation (bottom row, ``explanation_overlay``) with a colour bar -> Figure.

    images: displayable images (N,H,W,C) / (N,C,H,W) in [0,1] or uint8; default the explanation's
    inputs min-max scaled. Colours are clipped at the ``percentile`` of |map| (the raw values stay in
    the Explanation); LIME / KernelSHAP show lime's outlines. Titles use the first name of a label,
    wrapped to the panel. Nothing is shown: the caller saves or displays the Figure.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    panels = explanation_panels(explanation, images, reduce=reduce, cmap=cmap, alpha=alpha, max_images=max_images,
                                percentile=percentile)
    rows = 2 if show_images else 1
    h, w = panels[0]["map"].shape if panels else (1, 1)
    width = max(2.4, 2.6 * w / max(h, 1))
    chars = max(12, int(width * 8))  # characters of a 9-pt title that fit the panel
    fig = Figure(figsize=figsize or (width * len(panels), 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, len(panels), squeeze=False)
    for j, p in enumerate(panels):
        if show_images:
            axes[0, j].imshow(p["image"])
            axes[0, j].set_title(short_label(f"predicted {short_label(p['prediction'], 200)}", chars), fontsize=9)
        ax = axes[rows - 1, j]
        ax.imshow(p["overlay"])
        ax.set_title(short_label(f"{explanation.method}: {short_label(p['target'], 200)}", chars), fontsize=9)
        if colorbar and p["limits"] is not None:
            lo, hi = p["limits"]
            bar = fig.colorbar(ScalarMappable(Normalize(lo, hi), p["cmap"]), ax=ax, fraction=0.046, pad=0.02)
            bar.ax.tick_params(labelsize=7)
            bar.formatter.set_powerlimits((-2, 3))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def explanation_html(explanation: Any, images: Any = None, *, max_images: int = 8, min_height: int = 112) -> str:
    """A small self-contained HTML block (embedded PNG overlays) for notebooks' ``_repr_html_``."""
    panels = explanation_panels(explanation, images, max_images=max_images)
    cells = []
    for p in panels:
        img = p["overlay"]
        scale = max(1, int(np.ceil(min_height / img.shape[0])))
        big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)  # nearest: keeps pixels crisp
        caption = html.escape(f"target {p['target']} · predicted {p['prediction']}")
        cells.append(f'<figure style="display:inline-block;margin:4px"><img src="{png_data_uri(big)}" '
                     f'alt="{caption}"/><figcaption style="font-size:11px">{caption}</figcaption></figure>')
    title = html.escape(f"{explanation.method}: {len(explanation)} image(s)")
    return f'<div class="heatlens-explanation"><div><b>{title}</b></div>{"".join(cells)}</div>'


def save_png(figure_or_image: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """Write a matplotlib Figure or an (H,W[,C]) image array as PNG; returns the path."""
    from .colormaps import png_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(figure_or_image, "savefig"):
        figure_or_image.savefig(path, dpi=dpi, format="png")
    else:
        path.write_bytes(png_bytes(np.asarray(figure_or_image)))
    return path


def lime_panels(explanation: Any, images: Any = None, *, num_features: int | None = None,
                positive_only: bool = False, max_images: int = 8) -> list[np.ndarray]:
    """LIME boundary pictures for the images of a lime / kernel_shap Explanation (extras segments, weights)."""
    if "segments" not in explanation.extras or "weights" not in explanation.extras:
        raise ValueError(f"explanation must come from lime or kernel_shap, got method {explanation.method!r}")
    n = min(len(explanation), max_images)
    k = num_features if num_features is not None else int(explanation.params.get("num_features", 5))
    pics = _pictures(explanation, images, n)
    segs, weights = explanation.extras["segments"], explanation.extras["weights"]
    return [lime_boundaries(pics[i], segs[i], weights[i], num_features=k, positive_only=positive_only)
            for i in range(n)]
