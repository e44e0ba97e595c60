"""Visualisation: colormaps (numpy, no pyplot), overlays, grids, metric and sanity curves.

Everything returns arrays or matplotlib Figures (pyplot is never imported, nothing is shown):
save a figure with ``save_png(fig, "out.png")`` or display it in a notebook.
"""

from .colormaps import apply_colormap, colorize, is_diverging, lookup_table, png_bytes, png_data_uri
from .curves import plot_metric, plot_metrics, plot_sanity
from .grid import ablation_grid, explanation_grid, frame, shortcut_grid
from .overlay import (explanation_html, explanation_overlay, heat_overlay, lime_boundaries, lime_panels, overlay,
                      plot_explanation, robust_limit, save_png)

__all__ = [
    "ablation_grid", "apply_colormap", "colorize", "explanation_grid", "explanation_html", "explanation_overlay",
    "frame", "heat_overlay", "robust_limit",
    "is_diverging", "lime_boundaries", "lime_panels", "lookup_table", "overlay", "plot_explanation",
    "plot_metric", "plot_metrics", "plot_sanity", "png_bytes", "png_data_uri", "save_png", "shortcut_grid",
]
