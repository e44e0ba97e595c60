"""Build one self-contained HTML file (every image embedded as a data URI; no server, no network).

A report is a list of ``Section`` (title + HTML). Helpers turn heatlens results into sections:
``explanation_section`` (images x methods overlays with prediction frames), ``metrics_section``
(method x metric table), ``sanity_section`` (tables + verdicts + plots), ``text_section`` (findings).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..explanation import Explanation, MetricResult, SanityResult


@dataclass(frozen=True)
class Section:
    """One titled block of the report; ``html`` is trusted markup built by the helpers below."""

    title: str
    html: str

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section"


def render_report(title: str, sections: Sequence[Section], *, subtitle: str | None = None) -> str:
    """The report's HTML text."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    from .. import __version__

    env = Environment(loader=PackageLoader("heatlens.report", "templates"), autoescape=select_autoescape(["html", "j2"]))
    created = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return env.get_template("report.html.j2").render(
        title=title, subtitle=subtitle, sections=list(sections), version=__version__, created=created
    )


def write_report(path: str | Path, title: str, sections: Sequence[Section], *, subtitle: str | None = None) -> Path:
    """Render and write the report atomically (a half-written file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(title, sections, subtitle=subtitle)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# --- building blocks -----------------------------------------------------------------------------
def png_data_uri(image: np.ndarray) -> str:
    """(H,W,3|4) uint8 or float in [0,1] -> 'data:image/png;base64,...'."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_data_uri(fig: Any, dpi: int = 110) -> str:
    """A matplotlib Figure -> PNG data URI (the figure is closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(uri: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{w}>'


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, digits: int = 4) -> str:
    """A list of row dicts -> an HTML table (numbers right-aligned, floats to ``digits`` significant digits)."""
    if not rows:
        return "<p><em>(empty)</em></p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, (float, np.floating)):
                cells.append(f'<td class="num">{float(v):.{digits}g}</td>')
            elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{int(v)}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def text_section(title: str, text: str, *, evidence: Sequence[Mapping[str, Any]] | None = None,
                 highlight: bool = True) -> Section:
    """A finding or note: paragraphs of text (escaped) and an optional evidence table."""
    paras = "".join(f"<p>{html.escape(p)}</p>" for p in str(text).split("\n\n") if p.strip())
    body = f'<div class="finding">{paras}</div>' if highlight else paras
    if evidence:
        body += table_html(evidence)
    return Section(title, body)


def figure_section(title: str, figures: Iterable[tuple[Any, str]]) -> Section:
    """Matplotlib figures with captions."""
    parts = [f"<figure>{img_tag(figure_data_uri(fig), caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
             for fig, caption in figures]
    return Section(title, "".join(parts))


def explanation_section(
    title: str,
    images: np.ndarray,
    explanations: Mapping[str, Explanation],
    *,
    labels: Sequence[str] | None = None,
    true_labels: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    reduce: str | None = None,
    cell_width: int = 180,
) -> Section:
    """A grid: one row per image (original first), one column per method, overlays embedded.

    images: (N,H,W,3) floats in [0,1] (``model.deprocess(x)``). With ``true_labels`` each row is framed
    green when the prediction is right and red when it is wrong, as in the R255 practical. names: a
    caption line per image (e.g. file names). Each picture is ``viz.explanation_overlay``: colours
    scaled to the 99th percentile of |map|, LIME as outlined segments.
    """
    from ..viz.overlay import explanation_overlay

    methods = list(explanations)
    first = explanations[methods[0]] if methods else None
    n = images.shape[0]
    head = "<div class='cell'>input</div>" + "".join(f"<div class='cell'><b>{html.escape(m)}</b></div>" for m in methods)
    rows = [head]
    for i in range(n):
        pred = int(first.predictions[i]) if first is not None else None
        target = int(first.targets[i]) if first is not None else None
        frame = ""
        if true_labels is not None and pred is not None:
            frame = "frame-good" if pred == int(true_labels[i]) else "frame-bad"
        caption = _caption(pred, target, labels, None if true_labels is None else int(true_labels[i]))
        if names is not None:
            caption = f"{names[i]}: {caption}"
        cells = [f"<div class='{frame}'>{img_tag(png_data_uri(images[i]), 'input', cell_width)}"
                 f"<div class='cell caption'>{html.escape(caption)}</div></div>"]
        for m in methods:
            rgb = explanation_overlay(explanations[m], i, images[i], reduce=reduce)
            cells.append(f"<div>{img_tag(png_data_uri(rgb), m, cell_width)}</div>")
        rows.append("".join(cells))
    style = f"grid-template-columns: repeat({len(methods) + 1}, minmax(0, {cell_width}px));"
    body = "".join(f"<div class='grid' style='{style}'>{r}</div>" for r in rows)
    legend = ("<p class='subtitle'>Pixel maps: signed ones blue-white-red (red supports the explained class, blue "
              "opposes it), magnitudes black-red-yellow, over a grey copy of the image, opaque where relevance is "
              "high; colours are clipped at the 99th percentile of |map|. CAMs: jet. LIME / KernelSHAP: outlines of "
              "the strongest superpixels, green for the class, red against. Frames: green = correct prediction, "
              "red = mispredicted.</p>")
    return Section(title, legend + body)


def metrics_section(title: str, results: Mapping[str, Mapping[str, MetricResult]] | Sequence[Mapping[str, Any]],
                    *, figures: Iterable[tuple[Any, str]] = ()) -> Section:
    """method -> metric -> MetricResult (or ready rows) as a table of mean ± standard error."""
    if isinstance(results, Mapping):
        rows = []
        for method, per_metric in results.items():
            row: dict[str, Any] = {"method": method}
            for metric, r in per_metric.items():
                arrow = "↑" if r.higher_is_better else "↓"
                row[f"{metric} {arrow}"] = f"{r.mean():.4g} ± {r.sem():.2g}"
            rows.append(row)
    else:
        rows = list(results)
    body = table_html(rows) + "<p class='subtitle'>↑ higher is better, ↓ lower is better; mean ± standard error over images.</p>"
    body += "".join(f"<figure>{img_tag(figure_data_uri(f), c)}<figcaption>{html.escape(c)}</figcaption></figure>"
                    for f, c in figures)
    return Section(title, body)


def sanity_section(title: str, results: Sequence[SanityResult], *, plots: bool = True) -> Section:
    """Each sanity check: verdict, table, and its plot when it has one."""
    parts = []
    for r in results:
        verdict = f"<span class='{'pass' if r.passed else 'fail'}'>{'PASS' if r.passed else 'FAIL'}</span>"
        parts.append(f"<h3>{html.escape(r.name)} — {html.escape(r.method)}: {verdict}</h3>"
                     f"<p>{html.escape(r.verdict)}</p>{table_html(r.table)}")
        if plots:
            try:
                fig = r.plot()
            except (ValueError, KeyError, TypeError):  # a check without a curve has nothing to draw
                fig = None
            if fig is not None:
                fig = getattr(fig, "figure", fig)
                parts.append(f"<figure>{img_tag(figure_data_uri(fig), r.name)}</figure>")
    return Section(title, "".join(parts))


def _caption(pred: int | None, target: int | None, labels: Sequence[str] | None, truth: int | None) -> str:
    # the first comma-separated part: ImageNet labels carry their WordNet synonyms after it
    name = lambda k: (labels[k].split(",")[0] if labels is not None and 0 <= k < len(labels) else str(k))  # noqa: E731
    parts = []
    if pred is not None:
        parts.append(f"pred {name(pred)}")
    if truth is not None:
        parts.append(f"true {name(truth)}")
    if target is not None and target != pred:
        parts.append(f"explained {name(target)}")
    return " · ".join(parts)
