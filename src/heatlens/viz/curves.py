"""Metric curves (insertion / deletion with AUC in the legend) and sanity-check decay plots."""

from __future__ import annotations

from typing import Any

import numpy as np


def _axes(ax: Any, figsize: tuple[float, float] = (5.0, 3.5)):
    """(figure, axes): the given axes' figure, or a new Figure with one axes (no pyplot)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=float)


def plot_metric(result: Any, ax: Any = None, *, label: str | None = None, show_images: bool = True,
                color: str | None = None, n_features: int | None = None, x_axis: str = "fraction"):
    """A ``MetricResult``: its curves (one thin line per image, the mean bold) with the AUC in the legend,
    or, for curve-less metrics, the per-image values as points with the mean -> Figure.

    n_features: features per image (e.g. (224 // 8) ** 2 for 8x8 superpixels; default
    ``result.extras["n_features"]`` when the metric records it). With it, a second x axis on top
    counts features perturbed (``x_axis="fraction"``, the default), or the main axis does
    (``x_axis="features"``).
    """
    fig, ax = _axes(ax)
    values = _numpy(result.values)
    arrow = "higher is better" if result.higher_is_better else "lower is better"
    name = label or result.name
    if result.curves is not None:
        curves = _numpy(result.curves)
        xs = _numpy(result.x) if result.x is not None else np.linspace(0, 1, curves.shape[1])
        if show_images and curves.shape[0] > 1:
            for c in curves:
                ax.plot(xs, c, color=color or "C0", alpha=0.2, linewidth=0.8)
        mean_line, = ax.plot(xs, curves.mean(0), color=color or "C0", linewidth=2,
                             label=f"{name} (AUC {result.mean():.3f} ± {result.sem():.3f})")
        ax.fill_between(xs, curves.mean(0), alpha=0.1, color=mean_line.get_color())
        ax.set_xlabel("fraction of features")
        ax.set_ylabel(str(result.params.get("output", "score")))
        ax.set_xlim(float(xs.min()), float(xs.max()))
        _feature_axis(ax, result, n_features, x_axis)
    else:
        ax.plot(np.arange(len(values)), values, "o", color=color or "C0", label=f"{name} (mean {result.mean():.3g})")
        ax.axhline(result.mean(), color=color or "C0", linewidth=1, linestyle="--")
        ax.set_xlabel("image")
        ax.set_ylabel(name)
    ax.set_title(f"{result.name} ({arrow})", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _feature_axis(ax: Any, result: Any, n_features: int | None, x_axis: str) -> None:
    """Label the curve's x axis in features perturbed as well as (or instead of) fractions."""
    from ..validation import check_choice

    check_choice(x_axis, "x_axis", ("fraction", "features"))
    total = n_features if n_features is not None else result.extras.get("n_features")
    if total is None:
        if x_axis == "features":
            raise ValueError("x_axis='features' needs n_features (features per image), e.g. n_features=(224 // 8) ** 2")
        return
    total = float(total.max() if hasattr(total, "max") else total)
    if x_axis == "features":
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v * total:.0f}"))
        ax.set_xlabel("features perturbed")
        return
    top = ax.secondary_xaxis("top", functions=(lambda f: f * total, lambda k: k / total))
    top.set_xlabel("features perturbed", fontsize=8)
    top.tick_params(labelsize=7)


def plot_sanity(result: Any, ax: Any = None, *, columns: list[str] | None = None):
    """A ``SanityResult``: each numeric column of its table against the rows (e.g. similarity to the
    original explanation as layers are randomised, top to bottom), verdict in the title -> Figure.
    """
    fig, ax = _axes(ax, (6.0, 3.5))
    table = result.table
    if not table:
        ax.text(0.5, 0.5, result.verdict, ha="center", va="center", wrap=True)
        ax.set_axis_off()
        return fig
    keys = list(table[0])
    x_key = next((k for k in keys if isinstance(table[0][k], str)), None)
    if x_key is None and "image" in keys:
        x_key = "image"
    # identifiers (image index, class indices) are not measurements: never drawn as lines
    numeric = columns or [k for k in keys if k != x_key and k not in ID_COLUMNS
                          and all(_is_number(r.get(k)) for r in table)]
    if not numeric:
        raise ValueError(f"the sanity table has no numeric column to plot (columns: {keys})")
    xs = np.arange(len(table))
    per_image = x_key == "image"
    for k in numeric:
        ax.plot(xs, [float(r[k]) for r in table], marker="o", linestyle="none" if per_image else "-", label=k)
    if "threshold" in result.params:
        ax.axhline(float(result.params.get("threshold", 0.5)), color="grey", linestyle="--", linewidth=1,
                   label=f"threshold {float(result.params.get('threshold', 0.5)):g}")
    if x_key is not None:
        labels = [str(r[x_key]) for r in table]
        step = max(1, int(np.ceil(len(labels) / MAX_TICK_LABELS)))  # many layers: label every step-th one
        ax.set_xticks(xs[::step])
        # long layer names stand upright: slanted ones overlap their neighbours' boxes
        upright = not per_image and max(len(t) for t in labels) > 6
        ax.set_xticklabels(labels[::step], rotation=90 if upright else 0, ha="center", fontsize=7)
        ax.set_xlabel(x_key if not per_image else "image")
    ax.set_ylabel("value")
    verdict = "PASS" if result.passed else "FAIL"
    ax.set_title(f"{result.name} · {result.method}: {verdict}", fontsize=10,
                 color="green" if result.passed else "red")
    ax.legend(fontsize=8, loc="best")
    return fig


ID_COLUMNS = ("image", "target", "random_class", "layer_index")
MAX_TICK_LABELS = 16


def plot_metrics(results: dict[str, Any], ax: Any = None):
    """Several ``MetricResult`` curves (e.g. insertion and deletion of one method) on one axes -> Figure."""
    fig, ax = _axes(ax)
    for i, (name, r) in enumerate(results.items()):
        plot_metric(r, ax=ax, label=name, show_images=False, color=f"C{i}")
    ax.set_title(", ".join(results), fontsize=10)
    return fig


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
