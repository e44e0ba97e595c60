"""The HTML report: self-contained, opens in a browser with every image loaded and no console error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import heatlens as hl
from heatlens.explanation import MetricResult, SanityResult
from heatlens.report import explanation_section, metrics_section, sanity_section, text_section, write_report

from conftest import make_tiny_cnn

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]


def _small_report(tmp_path: Path) -> Path:
    model = hl.wrap(make_tiny_cnn(), input_size=(3, 16, 16))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    explanations = hl.explain(model, x, ["saliency", "integrated_gradients"])
    metrics = {"saliency": {"deletion": MetricResult("deletion", torch.tensor([0.2, 0.4]), False)}}
    sanity = [SanityResult("model_randomization", "saliency", [{"layer": "fc", "spearman": 0.31}], True,
                           "maps change when the weights are randomised")]
    sections = [
        explanation_section("Explanations", model.deprocess(x), explanations, true_labels=[0, 1]),
        metrics_section("Metrics", metrics),
        sanity_section("Sanity checks", sanity, plots=False),
        text_section("Finding", "The model relies on the <marker>."),
    ]
    return write_report(tmp_path / "report.html", "test report", sections)


def test_report_is_self_contained_and_escapes_text(tmp_path):
    path = _small_report(tmp_path)
    html = path.read_text()
    assert not re.search(r'src="(?!data:)', html)  # every image embedded, nothing fetched
    assert "http://" not in html and "https://" not in html
    assert html.count('src="data:image/png;base64,') == 2 * 3  # 2 images x (input + 2 methods)
    assert "&lt;marker&gt;" in html  # user text escaped
    assert "0.3 ± 0.1" in html  # metric mean ± standard error
    assert not list(tmp_path.glob("*.part"))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _open_in_chromium(report: Path, tmp_path: Path, screenshot: str) -> tuple[dict, list[str]]:
    """Load ``report`` in headless Chromium -> ({n: images, ok: images decoded}, console error lines).

    Also saves a screenshot to test-artifacts/<screenshot> for a person to look at.
    """
    probe = tmp_path / "probe.html"
    # same page plus a script that reports, after load, how many images decoded
    script = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
              "document.title=JSON.stringify({n:imgs.length,ok:imgs.filter(i=>i.complete&&i.naturalWidth>0).length});"
              "});</script></body>")
    probe.write_text(report.read_text().replace("</body>", script))
    profile = tmp_path / "profile"
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", run.stdout, re.S)
    assert title, run.stderr[-2000:]
    status = json.loads(title.group(1).replace("&quot;", '"'))
    console_errors = [line for line in run.stderr.splitlines() if "CONSOLE" in line and "probe.html" in line]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / screenshot
    subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}2", "--window-size=1280,1600",
                    f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    return status, console_errors


needs_chromium = pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (./dev test installs it on Debian)")


@pytest.mark.slow
@needs_chromium
def test_report_opens_in_headless_chromium_with_all_images_loaded(tmp_path):
    status, console_errors = _open_in_chromium(_small_report(tmp_path), tmp_path, "report.png")
    assert status["n"] == 6 and status["ok"] == 6
    assert console_errors == []


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``heatlens demo --shortcut marker`` with 3 epochs -> (exit code, stdout, output folder)."""
    import contextlib
    import io

    from heatlens.cli import main

    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--shortcut", "marker", "--epochs", "3", "--out", str(out), "--no-progress"])
    return code, printed.getvalue(), out


@pytest.mark.slow
def test_demo_shows_the_gap_and_its_report_states_the_planted_shortcut(demo_run):
    import html as html_lib

    code, printed, out = demo_run
    assert code == 0
    finding = json.loads((out / "finding.json").read_text())
    training = finding["training"]
    assert training["train_acc"] > 0.9 and training["test_acc"] < training["train_acc"] - 0.5
    assert finding["detected"] and finding["shortcut"] == "marker"
    assert finding["finding"].startswith("The model relies on the marker shortcut")
    page = (out / "report.html").read_text()
    assert html_lib.escape(finding["finding"]) in page
    assert f"finding: {finding['finding']}" in printed and f"report: {out / 'report.html'}" in printed
    assert not list(out.glob("*.part"))


@pytest.mark.slow
@needs_chromium
def test_demo_report_opens_in_headless_chromium_with_all_images_loaded(demo_run, tmp_path):
    status, console_errors = _open_in_chromium(demo_run[2] / "report.html", tmp_path, "demo-report.png")
    assert status["n"] >= 20 and status["ok"] == status["n"]
    assert console_errors == []


def test_explanation_section_embeds_lime_outlines_and_percentile_overlays(tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    model = hl.wrap(make_tiny_cnn(), input_size=(3, 16, 16), labels=["ant, emmet, pismire", "b", "c", "d", "e"])
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    from heatlens.methods.segmentation import segment

    cells = segment(x, "grid", cell_size=4)  # 16 squares
    explanations = {"lime": hl.explain(model, x, "lime", num_samples=60, seed=0, segments=cells, num_features=2),
                    "saliency": hl.explain(model, x, "saliency")}
    section = explanation_section("E", model.deprocess(x), explanations, labels=model.labels, names=["a.png", "b.png"])
    pngs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(uri)))) for uri in
            re.findall(r'src="data:image/png;base64,([^"]+)"', section.html)]
    assert len(pngs) == 2 * 3  # per image: input, lime, saliency
    lime_pic = pngs[1]
    assert ((lime_pic == [0, 255, 0]).all(-1) | (lime_pic == [255, 0, 0]).all(-1)).any()  # outlines, lime's colours
    assert "a.png: pred" in section.html and "emmet" not in section.html  # short label names only
