"""The audit report: one self-contained HTML file (``DIR/report.html``) and ``DIR/findings.json``.

Findings come first, each with its evidence pictures (the cluster's mean map with the region drawn
on it, example images with their maps, before/after the intervention); then the per-class table,
the SpRAy cluster galleries with mean maps, the embedding plot, and the weakest and outlier images.
Images are thumbnails (at most ``THUMB`` pixels on a side, embedded as PNG data URIs) and galleries
are paginated, so a report over a large dataset embeds a bounded number of pictures and opens fast.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .analysis import AuditAnalysis, N_LIST, outliers
from .findings import Finding, grey, grid_to_pixels

THUMB = 112  # longest side of an embedded thumbnail, in pixels
PAGE = 12  # thumbnails per gallery page
GALLERY = 24  # members shown per cluster (representatives first)
BOX_COLOUR = np.array([0, 229, 255], dtype=np.uint8)  # cyan: visible on the hot colour map and on photos

Display = Callable[[np.ndarray], np.ndarray]  # indices (k,) -> (k,H,W,3) floats in [0,1]


class Pictures:
    """Thumbnails for the report, cached per (image, kind) so an image shown twice is encoded once.

    display: indices -> (k,H,W,3) images in [0,1]; maps: (N,h,w) array-like of the clustered method.
    """

    def __init__(self, display: Display, maps: Any, size: int = THUMB):
        self.display, self.maps, self.size = display, maps, size
        self._cache: dict[tuple, str] = {}
        self._images: dict[int, np.ndarray] = {}
        self._maps: dict[int, np.ndarray] = {}

    def prefetch(self, indices: Sequence[int], chunk: int = 256) -> None:
        """Load the images and maps that will be shown, ``chunk`` at a time (one call, not one per picture)."""
        idx = sorted({int(i) for i in indices} - set(self._images))
        for start in range(0, len(idx), chunk):
            part = np.asarray(idx[start:start + chunk], dtype=np.int64)
            for i, img in zip(part, np.asarray(self.display(part), dtype=np.float64)):
                self._images[int(i)] = np.clip(img, 0, 1)
            rows = _read_rows(self.maps, part)
            for i, m in zip(part, rows):
                self._maps[int(i)] = np.nan_to_num(np.abs(np.asarray(m, dtype=np.float32)))

    def _image(self, i: int) -> np.ndarray:
        if i not in self._images:
            self.prefetch([i])
        return self._images[i]

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self.prefetch([i])
        return self._maps[i]

    def image(self, i: int, *, heat: bool = True, box: Sequence[int] | None = None) -> str:
        """Data URI of image ``i`` (with its map blended on when ``heat``; a cyan ``box`` [t,b,l,r) drawn)."""
        key = (int(i), heat, tuple(box) if box else None)
        if key not in self._cache:
            from ..viz.overlay import overlay

            img = self._image(int(i))
            out = overlay(img, self._map(i), cmap="hot", alpha=0.55) if heat else (img * 255).round().astype(np.uint8)
            self._cache[key] = self._encode(_draw_box(out, box) if box else out)
        return self._cache[key]

    def array(self, rgb: np.ndarray, *, box: Sequence[int] | None = None) -> str:
        arr = rgb if rgb.dtype == np.uint8 else (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
        return self._encode(_draw_box(arr, box) if box else arr)

    def mean_map(self, mean_map: np.ndarray, image_shape: Sequence[int], *, region: np.ndarray | None = None) -> str:
        """A cluster's mean map (gh,gw) coloured, at the images' aspect, with the region outlined."""
        from ..viz.colormaps import colorize

        rgb = colorize(mean_map, "hot")[..., :3]
        h, w = int(image_shape[0]), int(image_shape[1])
        rows = np.minimum(np.arange(h) * mean_map.shape[0] // h, mean_map.shape[0] - 1)
        cols = np.minimum(np.arange(w) * mean_map.shape[1] // w, mean_map.shape[1] - 1)
        big = rgb[rows][:, cols].copy()
        if region is not None:  # (H,W) bool at image resolution
            big[_outline(region)] = BOX_COLOUR
        return self._encode(big)

    def _encode(self, rgb: np.ndarray) -> str:
        from PIL import Image

        from ..viz.colormaps import png_data_uri

        h, w = rgb.shape[:2]
        if max(h, w) > self.size:  # thumbnails: large photos are shrunk, small images embedded as they are
            scale = self.size / max(h, w)
            rgb = np.asarray(Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                         Image.LANCZOS))
        return png_data_uri(rgb)


def _read_rows(maps: Any, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (sorted) of an (N,h,w) array-like: Zarr's orthogonal selection reads each chunk once."""
    if hasattr(maps, "oindex"):
        return np.asarray(maps.oindex[idx])
    if hasattr(maps, "detach"):
        return maps[torch.as_tensor(idx)].detach().cpu().float().numpy()
    return np.asarray(maps)[idx]


def _outline(mask: np.ndarray) -> np.ndarray:
    """(H,W) bool: the pixels of ``mask`` on its boundary."""
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def _draw_box(rgb: np.ndarray, box: Sequence[int]) -> np.ndarray:
    out = rgb.copy()
    t, b, l, r = (int(v) for v in box)
    h, w = out.shape[:2]
    t, b, l, r = max(0, t), min(h, b), max(0, l), min(w, r)
    if b <= t or r <= l:
        return out
    out[t, l:r] = out[b - 1, l:r] = BOX_COLOUR
    out[t:b, l] = out[t:b, r - 1] = BOX_COLOUR
    return out


# --- what the template shows --------------------------------------------------------------------------

def _thumbs(pics: Pictures, indices: Sequence[int], caption: Callable[[int], str], **kw: Any) -> list[dict[str, str]]:
    return [{"src": pics.image(int(i), **kw), "caption": caption(int(i)), "alt": f"image {int(i)}"} for i in indices]


def _pages(items: list[dict], size: int = PAGE) -> list[list[dict]]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


def _finding_view(f: Finding, analysis: AuditAnalysis, pics: Pictures, caption: Callable[[int], str],
                  image_shape: Sequence[int], map_shape: Sequence[int], load_images: Any, display_model: Any) -> dict:
    view: dict[str, Any] = {"kind": f.kind, "title": f.title, "text": f.text, "pictures": [], "table": [], "cards": []}
    if f.kind == "shortcut":
        by_class: dict[int, list[dict]] = {}
        for c in f.evidence["clusters"]:
            by_class.setdefault(c["class"], []).append(c)
        cards = []
        for label, rows in list(by_class.items())[:12]:
            c = max(rows, key=lambda r: r["size"])  # the class's largest suspicious cluster
            cl = analysis.spray.classes[c["class"]].clusters[c["cluster"]]
            region_px = grid_to_pixels(np.asarray(c["grid"], dtype=bool), map_shape, image_shape)
            items = [{"src": pics.mean_map(cl.mean_map, image_shape, region=region_px), "caption": "cluster mean map",
                      "alt": f"class {label} mean map"}]
            items += _thumbs(pics, cl.representatives[:2], caption, box=c["box"])
            cards.append({"label": f"class {_cname(label, analysis)}", "items": items})
            view["table"].append(_shortcut_row(label, rows, analysis))
        view["cards"] = cards
    elif f.kind == "colour" and load_images is not None:
        idx = np.asarray(f.images[:8], dtype=np.int64)
        if len(idx):
            grey_imgs = display_model(grey(load_images(idx)))
            items = []
            for i, g in zip(idx, grey_imgs):
                items.append({"src": pics.image(int(i), heat=False), "caption": caption(int(i)), "alt": f"image {int(i)}"})
                items.append({"src": pics.array(np.asarray(g)), "caption": "turned grey", "alt": f"image {int(i)} grey"})
            view["pictures"].append({"label": "images and their grey versions", "items": items})
        view["table"] = [{"class": _cname(int(k), analysis), "images": r["n"], "changed": f"{r['changed']:.0%}",
                          "confidence": f"{r['confidence_before']:.2f} → {r['confidence_after']:.2f}"}
                         for k, r in f.evidence["per_class"].items()]
    elif f.images:
        view["pictures"].append({"label": "images", "items": _thumbs(pics, f.images[:N_LIST], caption)})
    for row in f.evidence.get("rows", [])[:8] if f.kind in ("faithfulness", "disagreement") else []:
        view["table"].append({k: _fmt(v) for k, v in row.items()})
    return view


def _shortcut_row(label: int, rows: list[dict], analysis: AuditAnalysis) -> dict[str, Any]:
    """One class of a shortcut finding: its suspicious clusters' numbers, weighted by tested images."""
    def mean(key: str, field: str) -> float | None:
        got = [(r["test"][key][field], r["test"][key]["n"]) for r in rows if r["test"].get(key)]
        return float(np.average([v for v, _ in got], weights=[n for _, n in got])) if got else None

    acc_in = [r["accuracy_inside"] for r in rows if r.get("accuracy_inside") is not None]
    acc_out = [r["accuracy_outside"] for r in rows if r.get("accuracy_outside") is not None]
    pct = lambda v: "–" if v is None else f"{v:.0%}"  # noqa: E731
    return {
        "class": _cname(label, analysis), "clusters": len(rows), "images": sum(r["size"] for r in rows),
        "region": ", ".join(sorted({r["region"] for r in rows})), "box (t,b,l,r)": ",".join(str(v) for v in rows[0]["box"]),
        "why": ", ".join(sorted({s for r in rows for s in r["reasons"]})),
        "accuracy in / out": f"{pct(np.mean(acc_in) if acc_in else None)} / {pct(np.mean(acc_out) if acc_out else None)}",
        "erased: changed": pct(mean("erase_inside", "changed")),
        "erased: confidence": f"{mean('erase_inside', 'confidence_before'):.2f} → {mean('erase_inside', 'confidence_after'):.2f}",
        "erased in other classes: changed": pct(mean("erase_outside", "changed")),
        "pasted into other classes: predicted this class": pct(mean("transplant", "follow")),
    }


def _pair(a: Any, b: Any) -> str:
    f = lambda v: "–" if v is None else f"{v:.0%}"  # noqa: E731
    return f"{f(a)} / {f(b)}"


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.3g}"
    return v


def _cname(k: int, analysis: AuditAnalysis) -> str:
    names = analysis.class_names
    return names[k] if names is not None and 0 <= k < len(names) else str(k)


def _class_rows(analysis: AuditAnalysis) -> tuple[list[str], list[list[str]]]:
    advantage = {}
    for key, rows in analysis.faithfulness.items():
        for r in rows:
            advantage[(key, r["class"])] = r
    keys = [k for k in (analysis.classes[0] if analysis.classes else {}) if isinstance(analysis.classes[0][k], dict)]
    head = ["class", "images", "accuracy", *keys, *(f"{k} vs Random" for k in analysis.faithfulness), "clusters"]
    body = []
    for row in analysis.classes:
        cells = [row["name"], str(row["n"]), "–" if row["accuracy"] is None else f"{row['accuracy']:.1%}"]
        cells += [_mean_sem(row[k]) for k in keys]
        for key in analysis.faithfulness:
            r = advantage.get((key, row["class"]))
            cells.append("–" if r is None else f"{r['advantage']:+.3g} ± {r['sem']:.2g}")
        cells.append(str(row.get("clusters", "–")))
        body.append(cells)
    return head, body


def _mean_sem(d: dict[str, float]) -> str:
    m, s = d["mean"], d["sem"]
    if not np.isfinite(m):
        return "–"
    return f"{m:.3g} ± {s:.2g}" if np.isfinite(s) else f"{m:.3g}"


def embedding_figure(analysis: AuditAnalysis, *, max_classes: int = 12):
    """t-SNE of each class's maps, coloured by SpRAy cluster -> Figure (None when nothing was embedded)."""
    import matplotlib.pyplot as plt

    classes = [cc for cc in analysis.spray.classes.values() if np.isfinite(cc.embedding).any()]
    classes = sorted(classes, key=lambda cc: -len(cc.members))[:max_classes]
    if not classes:
        return None
    cols = min(4, len(classes))
    rows = int(np.ceil(len(classes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, cc in zip(axes.ravel(), classes):
        ok = np.isfinite(cc.embedding[:, 0])
        ax.scatter(cc.embedding[ok, 0], cc.embedding[ok, 1], c=cc.assignment[ok], cmap="tab10", vmin=0, vmax=9, s=6)
        ax.set_title(f"class {_cname(cc.label, analysis)}: {cc.k} cluster{'s' if cc.k > 1 else ''}", fontsize=9)
    fig.suptitle(f"t-SNE of the {analysis.method} maps per class, coloured by SpRAy cluster", fontsize=10)
    fig.tight_layout()
    return fig


def render(analysis: AuditAnalysis, *, display: Display, maps: Any, scores: Any = None, load_images: Any = None,
           display_model: Callable[[torch.Tensor], np.ndarray] | None = None, title: str = "heatlens audit",
           captions: Callable[[int], str] | None = None, weakest: Sequence[int] = (), recommendation: Any = None) -> str:
    """The report's HTML text from an analysis and callables that produce the pictures.

    display: indices -> (k,H,W,3) in [0,1]; maps: the clustered method's (N,h,w) maps; load_images and
    display_model (model-space tensor -> (k,H,W,3)) show interventions; weakest: image indices with the
    least faithful explanations. recommendation: ``Audit.recommendation`` (a row per class and method) or None.
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    from .. import __version__
    from ..report.html import figure_data_uri

    pics = Pictures(display, maps)
    caption = captions or (lambda i: f"#{i}")
    pics.prefetch(_shown(analysis, weakest))
    first = np.asarray(display(np.array([0])))[0]
    image_shape, map_shape = first.shape[:2], tuple(maps.shape[-2:])
    findings = [_finding_view(f, analysis, pics, caption, image_shape, map_shape, load_images, display_model)
                for f in analysis.findings]
    head, body = _class_rows(analysis)
    galleries = []
    for cc in analysis.spray.classes.values():
        for cl in cc.clusters:
            shown = list(dict.fromkeys([*cl.representatives.tolist(), *cl.members.tolist()]))[:GALLERY]
            galleries.append({
                "title": f"class {_cname(cc.label, analysis)} · cluster {cl.index} · {cl.size} images",
                "mean": pics.mean_map(cl.mean_map, image_shape),
                "pages": _pages(_thumbs(pics, shown, caption)),
                "boundary": _thumbs(pics, cl.boundary[:6], caption),
            })
    fig = embedding_figure(analysis)
    embedding = figure_data_uri(fig) if fig is not None else None
    top = outliers(analysis.outlier_z)
    env = Environment(loader=PackageLoader("heatlens.audit", "templates"), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("audit_report.html.j2").render(
        title=title, summary=analysis.summary, findings=findings, class_head=head, class_rows=body,
        galleries=galleries, embedding=embedding, notes=analysis.notes, version=__version__,
        outliers=_thumbs(pics, top, lambda i: f"{caption(i)} · z {analysis.outlier_z[i]:.1f}"),
        weakest=_thumbs(pics, list(weakest)[:N_LIST], caption), method=analysis.method,
        rejected=analysis.rejected, created=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        seconds={k: f"{v:.1f}" for k, v in analysis.seconds.items()},
        recommendation=_recommendation_rows(recommendation),
    )


def _recommendation_rows(table: Any) -> list[dict[str, Any]] | None:
    """The per-class recommendation for the report: one block per class, its methods in rank order."""
    if table is None:
        return None
    key = "ins_minus_del" if "ins_minus_del" in table else None
    out = []
    for name, g in table.groupby("class", sort=False):
        first = g.iloc[0]
        rows = [{"rank": "–" if r["rank"] is None or r["rank"] != r["rank"] else int(r["rank"]), "method": r["method"],
                 "verdict": r["verdict"], "score": _fmt(r[key]) if key else "–"} for _, r in g.iterrows()]
        out.append({"name": name, "images": int(first["images"]), "best": first["best"] or "no method passed",
                    "stability": first["stability"], "rows": rows})
    return out


def _shown(analysis: AuditAnalysis, weakest: Sequence[int]) -> list[int]:
    """Every image index the report will show (so they are loaded in a few batched calls)."""
    idx = [0, *weakest[:N_LIST], *outliers(analysis.outlier_z).tolist()]
    for f in analysis.findings:
        idx += f.images[:N_LIST]
    for cc in analysis.spray.classes.values():
        for cl in cc.clusters:
            idx += [*cl.representatives.tolist(), *cl.members[:GALLERY].tolist(), *cl.boundary[:6].tolist()]
    return idx


def write(out: str | Path, analysis: AuditAnalysis, **kwargs: Any) -> tuple[Path, Path]:
    """Write ``out/report.html`` and ``out/findings.json`` (each atomically) -> their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = render(analysis, **kwargs)
    path = out / "report.html"
    tmp = path.with_suffix(".html.part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path, analysis.write_json(out / "findings.json")


def write_audit_report(audit: Any, analysis: AuditAnalysis | None = None, *, model: Any = None,
                       title: str | None = None, **analyse_kwargs: Any) -> tuple[Path, Path]:
    """Analyse ``audit`` (unless ``analysis`` is given) and write ``DIR/report.html`` + ``DIR/findings.json``.

    model: the audited model (default ``audit.model()``; needed to show the images as the model sees them).
    """
    from .analysis import analyse

    model = model if model is not None else audit.model()
    if model is None:
        raise ValueError("model must be given: this audit cannot reload its model (it was audited as an object)")
    analysis = analysis or analyse(audit, model=model, **analyse_kwargs)
    scores = audit.scores
    rows = scores[scores["method"] == analysis.method].sort_values("image").reset_index(drop=True)

    def display(idx: np.ndarray) -> np.ndarray:
        return np.asarray(model.deprocess(audit.load_images(np.asarray(idx))))

    def caption(i: int) -> str:
        r = rows.iloc[i]
        label = r.get("label_name") if r.get("label_name") is not None else None
        pred = r.get("prediction_name") if r.get("prediction_name") is not None else r.get("prediction")
        text = f"#{i} pred {pred}"
        return text + (f" · true {label}" if label is not None and str(label) != "<NA>" else "")

    weakest = _weakest(rows, audit)
    return write(audit.dir, analysis, display=display, maps=audit.maps(analysis.method), load_images=audit.load_images,
                 display_model=lambda x: np.asarray(model.deprocess(x)), title=title or f"heatlens audit: {Path(audit.dir).name}",
                 captions=caption, weakest=weakest, recommendation=audit.recommendation)


def _weakest(rows: Any, audit: Any) -> list[int]:
    """Images whose explanations are least faithful on the audit's first faithfulness metric."""
    from ..metrics import metric_info

    for metric in audit.metrics:
        info = metric_info(metric)
        if metric in rows and info is not None and info.category == "faithfulness":
            v = rows[metric].to_numpy(dtype="float64", na_value=np.nan)
            order = np.argsort(v if info.higher_is_better else -v, kind="stable")
            return [int(rows["image"].iloc[i]) for i in order if np.isfinite(v[i])][:N_LIST]
    return []
