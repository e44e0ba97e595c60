"""The command line as scripts use it: through a subprocess, with exit codes, stderr and files checked.

A tiny CNN given as ``package.module:function`` (and as a ``torch.export`` file) keeps each run to
the interpreter's start-up; efficientnet-lite0 runs only in the slow test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from heatlens.cli import main, unique_names

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

MODULE = """
import torch
import heatlens as hl
from conftest import make_tiny_cnn

def build():
    return hl.wrap(make_tiny_cnn(seed=4), input_size=(3, 16, 16), labels=["ant", "bee", "cat", "dog", "eel"])

def bare():
    return make_tiny_cnn(seed=4)

class Broken(torch.nn.Module):
    # fine without gradients (the load-time probe), fails inside the first explanation
    def __init__(self):
        super().__init__()
        self.net = make_tiny_cnn(seed=4)

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("boom inside the model")
        return self.net(x)

def broken():
    return hl.wrap(Broken(), input_size=(3, 16, 16))
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with the model module ``climodels`` and images: d1/cat.png, d2/cat.png, cat.jpg, cat.png."""
    root = tmp_path_factory.mktemp("cli")
    (root / "climodels.py").write_text(textwrap.dedent(MODULE))
    gen = np.random.default_rng(0)
    for rel in ("d1/cat.png", "d2/cat.png", "cat.jpg", "cat.png"):
        (root / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(gen.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / rel)
    return root


def run(work: Path, *args: str, progress: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "HEATLENS_PROGRESS": "1" if progress else "0",
           "KERAS_BACKEND": "torch", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "heatlens.cli", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_explain_gives_every_image_its_own_files_and_prints_the_targets_probability(work):
    r = run(work, "explain", "d1/cat.png", "d2/cat.png", "cat.jpg", "cat.png", "cat.png", "--model", "climodels:build",
            "--method", "saliency,smoothgrad:n_samples=3:noise=0.2,lime:num_samples=40", "--target", "bee",
            "--out", "o-explain")
    assert r.returncode == 0, r.stderr
    names = ["d1-cat-png", "d2-cat-png", "cat-jpg", "cat-png", "cat-png-2"]
    want = {f"{n}_{m}.png" for n in names for m in ("saliency", "smoothgrad", "lime")} | {"report.html"}
    assert files(work / "o-explain") == want
    # the probability printed is the target's own (class "bee"), not the top-1's
    sys.path.insert(0, str(work))
    try:
        import climodels

        clf = climodels.build()
    finally:
        sys.path.remove(str(work))
    with torch.no_grad():
        probs = clf(clf.preprocess([str(work / "cat.jpg")])).softmax(1)[0]
    assert int(probs.argmax()) != 1  # the test means something: bee is not the predicted class
    assert f"cat-jpg: bee ({float(probs[1]):.1%})" in r.stdout.splitlines()
    report = (work / "o-explain" / "report.html").read_text()
    assert "smoothgrad: n_samples=3, noise=0.2" in report and "lime: num_samples=40" in report
    assert not [p for p in work.iterdir() if p.name.startswith(".heatlens-")]  # no staging left over


def test_pt2_model_with_weights_from_the_command_line(work, tmp_path):
    from conftest import make_tiny_cnn

    x = torch.rand(2, 3, 16, 16)
    torch.export.save(torch.export.export(make_tiny_cnn(seed=1), (x,)), tmp_path / "m.pt2")
    torch.save(make_tiny_cnn(seed=2).state_dict(), tmp_path / "w.pt")
    r = run(work, "explain", "cat.png", "--model", str(tmp_path / "m.pt2"), "--weights", str(tmp_path / "w.pt"),
            "--method", "saliency", "--out", str(tmp_path / "out"), "--no-report")
    assert r.returncode == 0, r.stderr
    assert files(tmp_path / "out") == {"cat_saliency.png"}


@pytest.mark.parametrize("args, message", [
    (["--out", "cat.png"], "heatlens: error: --out 'cat.png' is a file, not a folder"),
    (["--out", "cat.png/sub"], "heatlens: error: --out 'cat.png/sub' is under"),
    (["--out", "/proc/heatlens-test"], "heatlens: error: --out '/proc/heatlens-test' is not writable"),
    (["--out", "o-bad", "--device", "gpu"], "heatlens: error: --device 'gpu' is not a torch device"),
    (["--out", "o-bad", "--seed", "abc"], "argument --seed: expected an integer, got 'abc'"),
    (["--out", "o-bad", "--method", "lime:num_sample=3"],
     "heatlens: error: --method: lime has no setting 'num_sample'. Did you mean: 'num_samples'"),
    (["--out", "o-bad", "--method", "saliency", "--param", "steps=3"],
     "heatlens: error: --param 'steps=3': none of saliency takes 'steps'"),
    (["--out", "o-bad", "--target", "7"], "heatlens: error: --target 7 is out of range: the model has 5 classes"),
    (["--out", "o-bad", "--target", "zebra"], "heatlens: error: --target='zebra' is not a class name of this model"),
    (["--out", "o-bad", "--model", "climodels:bare"], "input_size=(C, H, W) (command line: --input-size"),
])
def test_bad_usage_exits_2_in_one_line_naming_the_argument_and_writes_nothing(work, args, message):
    r = run(work, "explain", "cat.png", "--model", "climodels:build", "--method", "saliency", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (work / "o-bad").exists()


def test_unavailable_cuda_and_a_demo_out_that_is_a_file_exit_2_before_any_work(work):
    if not torch.cuda.is_available():
        r = run(work, "explain", "cat.png", "--model", "climodels:build", "--device", "cuda", "--out", "o-cuda")
        assert r.returncode == 2 and "--device 'cuda': no CUDA device is available" in r.stderr
    r = run(work, "demo", "--out", "cat.png")
    assert r.returncode == 2 and r.stderr.strip() == "heatlens: error: --out 'cat.png' is a file, not a folder"
    assert r.stdout == ""  # refused before training started


def test_an_internal_error_exits_3_as_one_and_leaves_out_untouched(work):
    out = work / "o-internal"
    out.mkdir()
    (out / "old.txt").write_text("kept")
    r = run(work, "explain", "cat.png", "--model", "climodels:broken", "--method", "saliency", "--out", str(out))
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("heatlens: internal error: RuntimeError: boom inside the model")
    assert files(out) == {"old.txt"}
    assert not [p for p in work.iterdir() if p.name.startswith(".heatlens-")]


def test_sanity_runs_every_check_and_exits_1_only_when_one_fails(work):
    r = run(work, "sanity", "cat.png", "cat.jpg", "--model", "climodels:build", "--method", "saliency",
            "--check", "model_randomization,random_logit,input_invariance,fragility:n_trials=2", "--out", "o-sanity",
            progress=True)
    assert r.returncode in (0, 1), r.stderr
    verdicts = [line for line in r.stdout.splitlines() if line.startswith("verdict: ")]
    assert len(verdicts) == 4
    assert (r.returncode == 1) == any(v.startswith("verdict: FAIL") for v in verdicts)
    assert "model_randomization (saliency)" in r.stderr  # the progress bar of the long check
    assert files(work / "o-sanity") == {"sanity.html"}
    passing = run(work, "sanity", "cat.png", "--model", "climodels:build", "--check", "input_invariance")
    assert passing.returncode == 0 and "verdict: PASS" in passing.stdout, passing.stderr


def test_sanity_lists_only_checks_as_valid(work):
    r = run(work, "sanity", "cat.png", "--model", "climodels:build", "--check", "shift_compensated")
    assert r.returncode == 2
    assert r.stderr.strip() == ("heatlens: error: --check: unknown sanity check 'shift_compensated'. Valid: "
                                "model_randomization, random_logit, input_invariance, fragility")


def test_evaluate_reports_the_random_baseline_and_writes_json(work):
    r = run(work, "evaluate", "cat.png", "cat.jpg", "--model", "climodels:build",
            "--method", "saliency,occlusion:window=4:stride=4", "--metric", "insertion:granularity=2,deletion",
            "--json", "o-eval/scores.json")
    assert r.returncode == 0, r.stderr
    table = r.stdout.splitlines()
    assert table[0].split() == ["method", "insertion", "↑", "deletion", "↓"]
    assert [line.split()[0] for line in table[2:5]] == ["saliency", "occlusion", "random"]
    rows = json.loads((work / "o-eval" / "scores.json").read_text())
    assert {(row["method"], row["metric"]) for row in rows} == {
        (m, k) for m in ("saliency", "occlusion", "random") for k in ("insertion", "deletion")}
    assert all(len(row["values"]) == 2 for row in rows)


def test_constant_and_16_bit_images(work, tmp_path):
    ramp = np.linspace(0, 65535, 20 * 20).reshape(20, 20).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(tmp_path / "white.png")
    r = run(work, "explain", str(tmp_path / "deep.png"), str(tmp_path / "white.png"), "--model", "climodels:build",
            "--method", "saliency", "--out", str(tmp_path / "out"), "--no-report")
    assert r.returncode == 0, r.stderr
    assert "white.png is a constant image" in r.stderr and "deep.png is a constant" not in r.stderr
    assert "not writable" not in r.stderr


def test_load_image_reads_16_bit_at_its_range_without_warnings(tmp_path):
    from heatlens.models.preprocessing import Preprocessing, load_image

    ramp = np.linspace(0, 65535, 8 * 8).reshape(8, 8).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "NumPy array is not writable" warning
        img = load_image(tmp_path / "deep.png")
        x = Preprocessing(size=(8, 8))(str(tmp_path / "deep.png"))
        with Image.open(tmp_path / "deep.png") as pil:
            Preprocessing(size=(8, 8))(np.asarray(pil.convert("RGB")))  # a read-only array
    assert img.dtype == np.float32 and img.shape == (8, 8, 3)
    np.testing.assert_allclose(img[..., 0], ramp / 65535.0, atol=1e-6)
    np.testing.assert_allclose(x[0, 0].numpy(), ramp / 65535.0, atol=1e-6)
    assert load_image(tmp_path / "deep.png").flags.writeable


def test_unique_names_disambiguate_only_where_needed(tmp_path):
    paths = [Path(p) for p in ("a/d1/cat.png", "a/d2/cat.png", "a/cat.jpg", "a/dog.png", "a/dog.png")]
    assert unique_names(paths) == ["d1-cat-png", "d2-cat-png", "cat-jpg", "dog", "dog-2"]


def test_methods_lists_every_registered_method_with_a_description(capsys):
    from heatlens.methods import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == METHODS.names()
    assert all(len(line.split()) > 3 for line in out)


def test_models_lists_the_zoo_and_how_to_bring_your_own(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.split()[0] == "efficientnet-lite0"
    assert "path/to/model.pt2" in out and "package.module:function" in out and "--weights" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: heatlens" in capsys.readouterr().out


@pytest.mark.slow
def test_explain_on_efficientnet_writes_readable_overlays(tmp_path, photos):
    Image.fromarray(photos[0]).save(tmp_path / "chelsea.png")
    r = run(tmp_path, "explain", "chelsea.png", "--method", "gradcam,smoothgrad:n_samples=8,lime:num_samples=200",
            "--out", "out")
    assert r.returncode == 0, r.stderr
    assert "chelsea: " in r.stdout and ("cat" in r.stdout.lower() or "tabby" in r.stdout.lower())
    for method in ("gradcam", "smoothgrad", "lime"):
        img = np.asarray(Image.open(tmp_path / "out" / f"chelsea_{method}.png"))
        assert img.shape == (224, 224, 3) and img.std() > 5  # a real overlay, not a blank
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "gradcam" in html
