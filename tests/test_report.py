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


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (./dev test installs it on Debian)")
def test_report_opens_in_headless_chromium_with_all_images_loaded(tmp_path):
    report = _small_report(tmp_path)
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
    assert status["n"] == 6 and status["ok"] == 6
    console_errors = [line for line in run.stderr.splitlines() if "CONSOLE" in line and "probe.html" in line]
    assert console_errors == []
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}2", "--window-size=1280,1600",
                    f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
