"""Grids: images x methods with correct / mispredicted frames (the R255 practical), ablation grids,
and the shortcut report's training-vs-test grid. Every function returns a matplotlib Figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .colormaps import apply_colormap, is_diverging
from .overlay import as_images, default_cmap, display_inputs, lime_boundaries, robust_limit, short_label

CORRECT, WRONG = "green", "red"
FRAME_WIDTH = 6


def frame(ax: Any, correct: bool, *, label: bool = True, width: float = FRAME_WIDTH) -> None:
    """Colour the axes' spines green (correct) or red (mispredicted), as the practical's helpers do."""
    colour = CORRECT if correct else WRONG
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)
    if label:
        ax.set_xlabel("Correctly Predicted" if correct else "Mispredicted", fontsize=8)


def _bare(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _map_image(explanation: Any, i: int, reduce: str, cmap: str | None, picture: np.ndarray | None,
               lime_features: int | None, percentile: float = 99.0) -> np.ndarray:
    """What one cell shows: LIME boundaries for segment explanations, else the colour-mapped map with
    colours clipped at the ``percentile`` of |map| (one extreme pixel no longer blackens the rest)."""
    if lime_features is not None and "segments" in explanation.extras and "weights" in explanation.extras \
            and picture is not None:
        return lime_boundaries(picture, explanation.extras["segments"][i], explanation.extras["weights"][i],
                               num_features=lime_features)
    m = explanation.maps(reduce)[i].detach().cpu().double().numpy()
    return _colour_map(m, cmap or default_cmap(reduce), percentile)


def _colour_map(values: np.ndarray, cmap: str, percentile: float = 99.0) -> np.ndarray:
    bound = robust_limit(values, percentile)
    lo = -bound if is_diverging(cmap) else (0.0 if float(np.nanmin(values)) >= 0 else float(np.nanmin(values)))
    return apply_colormap(values, cmap, lo, bound)[..., :3]


# the report shows figures about this wide (1200 px at 110 dpi): text is sized for it
REPORT_WIDTH_IN = 10.5


def explanation_grid(
    explanations: Mapping[str, Any] | Sequence[Any],
    images: Any = None,
    labels: Any = None,
    *,
    reduce: str = "sum_abs",
    cmap: str | None = None,
    max_images: int = 8,
    show_images: bool = True,
    lime_features: int | None = 1,
    row_labels: Sequence[str] | None = None,
    cell_size: float = 2.0,
):
    """Rows = images, columns = [image] + methods -> Figure.

    explanations: name -> Explanation (or a list, named by ``.method``) of the same images.
    labels: true classes (N,); when given, each explanation cell is framed green if the model's
    prediction is correct and red if mispredicted, with the practical's captions.
    lime_features: LIME / KernelSHAP cells show the boundaries of that many strongest superpixels
    (green positive, red negative); None shows their maps like any other method.
    row_labels: a label per image row (e.g. "Training" / "Test").
    """
    from matplotlib.figure import Figure

    named = dict(explanations) if isinstance(explanations, Mapping) else {e.method: e for e in explanations}
    if not named:
        raise ValueError("explanations must hold at least one Explanation")
    first = next(iter(named.values()))
    n = min(len(first), max_images)
    pictures = as_images(images, n) if images is not None else (
        display_inputs(first.inputs[:n]) if first.inputs is not None else None)
    truth = None if labels is None else np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).ravel()
    cols = len(named) + (1 if show_images and pictures is not None else 0)
    h, w = first.maps(reduce).shape[-2:]
    cell_w = cell_size * max(1.0, w / h)
    chars = max(10, int(cell_w * 11))  # characters of an 8-pt title that fit a cell
    fig = Figure(figsize=(cols * cell_w, n * cell_size + 0.3), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        c = 0
        if cols > len(named):
            axes[i, 0].imshow(pictures[i])
            title = "" if truth is None else f"label {truth[i]}"
            axes[i, 0].set_title(title, fontsize=8)
            if row_labels is not None:
                axes[i, 0].set_ylabel(row_labels[i], fontsize=9)
            _bare(axes[i, 0])
            c = 1
        for j, (name, e) in enumerate(named.items()):
            ax = axes[i, c + j]
            pic = pictures[i] if pictures is not None else None
            ax.imshow(_map_image(e, i, reduce, cmap, pic, lime_features))
            pred = int(e.predictions[i])
            shown = short_label(e.labels[pred], chars) if e.labels is not None else str(pred)
            head = short_label(name.replace("_", " "), chars)
            ax.set_title(f"{head}\npred {shown}" if i == 0 else f"pred {shown}", fontsize=8)
            _bare(ax)
            if truth is not None:
                frame(ax, pred == int(truth[i]))
    return fig


def ablation_grid(ablation: Any, images: Any = None, *, cmap: str | None = None, max_images: int = 4,
                  cell_size: float | None = None, stats: bool = True, width: float = REPORT_WIDTH_IN):
    """Rows = images, columns = [image] + one per setting of an ``Ablation`` -> Figure.

    Column titles name the setting; with ``stats`` each shows the similarity to the last setting.
    The figure is ``width`` inches wide (the report's width) unless ``cell_size`` is given, so titles
    stay readable however many settings there are. LIME ablations show lime's outlines.
    """
    from matplotlib.figure import Figure

    maps = ablation.maps
    n = min(int(maps[0].shape[0]), max_images)
    pictures = as_images(images, n) if images is not None else (
        display_inputs(ablation.images[:n]) if ablation.images is not None and len(ablation.images) else None)
    cols = len(maps) + (1 if pictures is not None else 0)
    h, w = maps[0].shape[-2:]
    aspect = max(1.0, w / h)
    cell_w = cell_size * aspect if cell_size is not None else width / cols
    fig = Figure(figsize=(cols * cell_w, n * cell_w / aspect + 0.9), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    signed = bool(any(float(m.min()) < 0 for m in maps))
    cm = cmap or ("bwr" if signed else "hot")
    offset = 1 if pictures is not None else 0
    outlines = _lime_outlines(ablation, pictures)
    # "name=value" while it fits a cell, else the values alone (the name goes into the title)
    short_titles = all(len(f"{ablation.parameter}={v}") <= cell_w * 9 for v in ablation.values)
    for i in range(n):
        if pictures is not None:
            axes[i, 0].imshow(pictures[i])
            _bare(axes[i, 0])
        for j, m in enumerate(maps):
            values = m[i].detach().cpu().double().numpy() if hasattr(m, "detach") else np.asarray(m[i], dtype=float)
            cell = outlines(i, j) if outlines is not None else _colour_map(values, cm)
            axes[i, offset + j].imshow(cell)
            _bare(axes[i, offset + j])
            if i == 0:
                title = f"{ablation.parameter}={ablation.values[j]}" if short_titles else str(ablation.values[j])
                if stats:
                    title += f"\nsim {ablation.stats[j]['similarity_to_last']:.2f}"
                axes[i, offset + j].set_title(title, fontsize=8)
    heading = ablation.name.replace("_", " ")
    fig.suptitle(heading if short_titles else f"{heading} ({ablation.parameter})", fontsize=10)
    return fig


def _lime_outlines(ablation: Any, pictures: list[np.ndarray] | None):
    """For LIME ablations, a cell function (image i, setting j) -> lime's outline picture, else None."""
    exps = ablation.explanations
    if pictures is None or not exps or not all("segments" in e.extras and "weights" in e.extras for e in exps):
        return None

    def cell(i: int, j: int) -> np.ndarray:
        e = exps[j]
        if ablation.parameter == "num_features":
            k = int(ablation.values[j])
        else:
            k = int(e.params.get("num_features", 5) or 5)
        return lime_boundaries(pictures[i], e.extras["segments"][i], e.extras["weights"][i], num_features=k)

    return cell


def shortcut_grid(report: Any, *, methods: Sequence[str] | None = None, max_images: int = 4,
                  lime_features: int | None = 1, cell_size: float | None = None, width: float = REPORT_WIDTH_IN,
                  title: str | None = None):
    """A ``ShortcutReport`` as two stacked grids: training images then test images, x methods -> Figure.

    Frames: green correct / red mispredicted against the true sums. The figure is ``width`` inches
    wide (the report's width) unless ``cell_size`` is given, so labels stay readable. title: default
    a short one (the finding itself is printed next to the figure in the report).
    """
    from matplotlib.figure import Figure

    methods = list(methods) if methods is not None else list(report.explanations["train"])
    if not methods:
        raise ValueError("the report holds no explanations to draw")
    n = min(max_images, len(report.images["train"]), len(report.images["test"]))
    rows = 2 * n
    cols = len(methods) + 1
    h, w = report.images["train"].x.shape[-2:]
    cell_w = cell_size * w / h if cell_size is not None else width / cols
    chars = max(8, int(cell_w * 11))
    fig = Figure(figsize=(cols * cell_w, rows * (cell_w * h / w + 0.3) + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for block, split in enumerate(("train", "test")):
        data = report.images[split]
        pictures = as_images(data.x[:n])
        for i in range(n):
            r = block * n + i
            axes[r, 0].imshow(pictures[i])
            axes[r, 0].set_ylabel("training" if split == "train" else "test", fontsize=8)
            axes[r, 0].set_title(f"sum {int(data.y[i])}", fontsize=8)
            _bare(axes[r, 0])
            for j, name in enumerate(methods):
                e = report.explanations[split][name]
                ax = axes[r, j + 1]
                ax.imshow(_map_image(e, i, "sum_abs", None, pictures[i], lime_features))
                pred = int(e.predictions[i])
                head = short_label(name.replace("_", " "), chars)
                ax.set_title(f"{head}\npred {pred}" if r == 0 else f"pred {pred}", fontsize=8)
                _bare(ax)
                frame(ax, pred == int(data.y[i]), label=False, width=3)
    fig.suptitle(title or "training images (top) and test images (bottom): frames green = correct, red = wrong",
                 fontsize=9)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
