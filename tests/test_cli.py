"""The command line: what scripts rely on (exit codes, one-line errors, files written)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from heatlens.cli import main


@pytest.fixture(scope="module")
def chelsea_png(tmp_path_factory, photos):
    path = tmp_path_factory.mktemp("imgs") / "chelsea.png"
    Image.fromarray(photos[0]).save(path)
    return path


def test_methods_lists_every_registered_method_with_a_description(capsys):
    from heatlens.methods import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == METHODS.names()
    assert all(len(line.split()) > 3 for line in out)


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    assert "efficientnet-lite0" in capsys.readouterr().out.split()


@pytest.mark.slow
def test_explain_writes_overlays_and_a_report(tmp_path, chelsea_png, capsys):
    out = tmp_path / "out"
    code = main(["explain", str(chelsea_png), "--model", "efficientnet-lite0", "--method", "gradcam,smoothgrad,lime",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chelsea.png:" in printed and ("cat" in printed.lower() or "tabby" in printed.lower())
    for method in ("gradcam", "smoothgrad", "lime"):
        img = np.asarray(Image.open(out / f"chelsea_{method}.png"))
        assert img.shape == (224, 224, 3) and img.std() > 5  # a real overlay, not a blank
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "gradcam" in html


def test_missing_image_exits_2_with_a_one_line_reason(tmp_path, capsys):
    code = main(["explain", str(tmp_path / "nope.png"), "--method", "saliency", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"heatlens: error: image file '{tmp_path / 'nope.png'}' does not exist"


def test_unknown_method_exits_2_with_suggestions(chelsea_png, tmp_path, capsys):
    code = main(["explain", str(chelsea_png), "--method", "gradcm", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "unknown method 'gradcm'. Did you mean: 'gradcam'" in err


def test_unreadable_image_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    code = main(["explain", str(bad), "--method", "saliency", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err and "is not a readable image" in err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: heatlens" in capsys.readouterr().out
