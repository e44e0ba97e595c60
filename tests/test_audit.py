"""Dataset audits: records equal the single-call API on the same images, the store reopens, bad input
is refused with clear errors, a killed audit resumes to the uninterrupted table, Ray equals local."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import heatlens as hl
from heatlens.audit import engine, store
from heatlens.audit.data import class_indices
from heatlens.cli import main as cli_main

pytest.importorskip("pyarrow")
pytest.importorskip("zarr")
pd = pytest.importorskip("pandas")

import audit_models  # noqa: E402  (tests/ is on the path: a module:function spec any process can load)

TESTS = Path(__file__).resolve().parent
SPEC = "audit_models:digit_cnn"
FAST = dict(methods=["gradcam", "integrated_gradients"], metrics=["insertion", "deletion"], shard_size=8,
            method_options={"integrated_gradients": {"steps": 8}},
            metric_options={"insertion": {"steps": 10}, "deletion": {"steps": 10}})
COLUMNS = ["image", "path", "label", "label_name", "prediction", "prediction_name", "confidence", "correct",
           "method", "error", "insertion", "deletion", *store.MAP_STATS]


def _cli_args(data, out) -> list[str]:
    """`heatlens audit` with the settings of FAST."""
    return ["audit", str(data), "--model", SPEC, "--method", "gradcam,integrated_gradients:steps=8", "--metric",
            "insertion:steps=10,deletion:steps=10", "--shard-size", "8", "--out", str(out)]


def _env() -> dict[str, str]:
    env = dict(os.environ, HEATLENS_PROGRESS="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """20 test-split digit-sum images as ImageFolder PNGs, written by `heatlens data digit-sum`; one file
    in the middle (image 9 in data order) overwritten with garbage."""
    root = tmp_path_factory.mktemp("digits") / "data"
    assert cli_main(["data", "digit-sum", "--shortcut", "marker", "--split", "test", "--n", "20",
                     "--out", str(root)]) == 0
    files = [p for d in sorted(root.iterdir(), key=lambda d: int(d.name)) for p in sorted(d.iterdir())]
    files[9].write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def folder_audit(digits_folder, tmp_path_factory):
    return hl.audit(SPEC, digits_folder, out=tmp_path_factory.mktemp("a") / "audit", **FAST)


def _readable(a, indices):
    """The model and its inputs for some images, read independently of the engine."""
    model = audit_models.digit_cnn()
    paths = a.scores.drop_duplicates("image").set_index("image").loc[indices, "path"]
    return model, model.preprocess(list(paths))


# --- records ----------------------------------------------------------------------------------------
def test_folder_records_match_explain_and_evaluate_on_the_same_images(folder_audit):
    a = folder_audit
    df = a.scores
    assert list(df.columns) == COLUMNS and len(df) == 20 * 2
    assert df["image"].tolist() == [i for i in range(20) for _ in range(2)]
    assert df["method"].tolist() == ["gradcam", "integrated_gradients"] * 20
    ok = [i for i in range(20) if i != 9]
    model, x = _readable(a, ok)
    logits = model(x).detach()
    np.testing.assert_allclose(a.predictions()[ok], logits.numpy(), rtol=1e-5, atol=1e-6)
    per_image = df[df.method == "gradcam"].set_index("image").loc[ok]
    assert per_image["prediction"].tolist() == logits.argmax(1).tolist()
    np.testing.assert_allclose(per_image["confidence"], logits.softmax(1).amax(1).numpy(), rtol=1e-5)
    # shard boundaries (8) do not change a row: the whole dataset in one call gives the same numbers
    for method, opts in (("gradcam", {}), ("integrated_gradients", {"steps": 8})):
        e = hl.explain(model, x, method, **opts)
        np.testing.assert_allclose(a.maps(method)[ok].astype(np.float32), e.maps().numpy(), rtol=2e-3, atol=1e-5)
        scores = hl.evaluate(model, x, e, ["insertion", "deletion"], steps=10)
        rows = df[df.method == method].set_index("image").loc[ok]
        for name, r in scores.items():
            np.testing.assert_allclose(rows[name].to_numpy(), r.numpy(), rtol=1e-5, atol=1e-7)


def test_labels_come_from_the_folders_and_correct_compares_them(folder_audit):
    df = folder_audit.scores
    assert folder_audit.classes == [str(k) for k in range(11)]
    labels = [int(Path(p).parent.name) for p in df["path"]]
    assert df["label"].tolist() == labels and df["label_name"].tolist() == [str(v) for v in labels]
    good = df["error"].isna()
    assert (df.loc[good, "correct"] == (df.loc[good, "label"] == df.loc[good, "prediction"])).all()


def test_an_unreadable_file_in_the_middle_is_a_failed_row_not_a_crash(folder_audit):
    df = folder_audit.scores
    bad = df[df.image == 9]
    assert len(bad) == 2 and bad["error"].str.startswith("ValueError: image file").all()
    assert "is not a readable image" in bad["error"].iloc[0]
    assert bad["prediction"].isna().all() and bad["correct"].isna().all()
    assert bad[["insertion", "deletion", "map_entropy"]].isna().all().all()
    assert bad["label"].notna().all()  # the folder still says which class it is
    assert np.isnan(folder_audit.maps("gradcam")[9].astype(np.float32)).all()
    assert np.isnan(folder_audit.predictions()[9]).all()
    assert df[df.image != 9]["error"].isna().all() and df[df.image != 9]["error"].map(type).eq(type(None)).all()
    assert folder_audit.manifest["shards"][1]["failed"] == 1


def test_map_statistics_of_known_maps():
    h, w = 8, 16
    maps = torch.zeros(3, h, w)
    maps[0, 5, 2] = 3.0                       # one hot pixel: cell (2, 0), off the border
    maps[1] = 1.0                             # uniform
    stats = engine.map_statistics(maps)       # maps[2]: all zero -> undefined
    assert stats["map_centroid_y"][0] == pytest.approx(5.5 / h) and stats["map_centroid_x"][0] == pytest.approx(2.5 / w)
    assert stats["map_entropy"][0] == pytest.approx(0.0) and stats["map_entropy"][1] == pytest.approx(1.0)
    assert stats["map_cell_2_0"][0] == pytest.approx(1.0) and stats["map_border_mass"][0] == pytest.approx(0.0)
    assert all(stats[f"map_cell_{i}_{j}"][1] == pytest.approx(1 / 16) for i in range(4) for j in range(4))
    border = 1 - (6 / 8) * (12 / 16)  # rows 0 and 7, columns 0, 1, 14 and 15 have centres in the outer eighth
    assert stats["map_border_mass"][1] == pytest.approx(border)
    assert all(math.isnan(v[2]) for v in stats.values())


def test_maps_are_area_downsampled_to_map_size():
    maps = torch.arange(2 * 8 * 16, dtype=torch.float32).reshape(2, 8, 16)
    small = engine.downsample(maps, (2, 4))
    assert torch.allclose(small, maps.reshape(2, 2, 4, 4, 4).mean((2, 4)))


def test_images_from_many_files_share_each_model_call(digits_folder, tmp_path):
    """Grad-CAM on a shard of 16 files: one recorded forward+backward over all 16, not 16 calls.

    batch_size is pinned: left to the engine, the first batches of a job measure sizes 4, 8, 16, ...
    (tests/test_performance.py), which packs files too but in a load-dependent number of calls."""
    from heatlens import batching

    before = batching.call_stats()
    hl.audit(SPEC, digits_folder, out=tmp_path / "a", methods=["gradcam"], shard_size=16, batch_size=16)
    after = batching.call_stats()
    # two shards (16 files, 15 readable; 4 files): one engine batch each, holding every readable image
    assert after["batches"] - before["batches"] == 2 and after["items"] - before["items"] == 19


def test_the_next_shard_is_read_while_one_is_computed(digits_folder, tmp_path, monkeypatch):
    events = []
    load, compute = engine.load_shard, engine.compute_shard

    def timed_load(source, clf, plan, shard):
        events.append(("read", shard, time.monotonic()))
        return load(source, clf, plan, shard)

    def slow_compute(clf, loaded, plan):
        time.sleep(0.3)
        out = compute(clf, loaded, plan)
        events.append(("computed", loaded.shard, time.monotonic()))
        return out

    monkeypatch.setattr(engine, "load_shard", timed_load)
    monkeypatch.setattr(engine, "compute_shard", slow_compute)
    hl.audit(SPEC, digits_folder, out=tmp_path / "a", methods=["saliency"], shard_size=8)
    when = {(kind, shard): t for kind, shard, t in events}
    assert when[("read", 1)] < when[("computed", 0)] and when[("read", 2)] < when[("computed", 1)]


# --- the store reopens ----------------------------------------------------------------------------
def test_audit_reopens_with_the_same_records_and_model(folder_audit):
    again = hl.Audit.open(folder_audit.dir)
    pd.testing.assert_frame_equal(again.scores, folder_audit.scores)
    assert again.methods == ["gradcam", "integrated_gradients"] and again.metrics == ["insertion", "deletion"]
    m = again.manifest
    assert m["model"]["spec"] == SPEC and m["n_images"] == 20 and m["heatlens_version"] == hl.__version__
    assert [s["index"] for s in m["shards"]] == [0, 1, 2] and m["complete"] and again.complete
    assert m["settings"]["shard_size"] == 8 and m["source"]["kind"] == "image_folder"
    from heatlens.audit.models import fingerprint

    assert fingerprint(again.model()) == m["model"]["fingerprint"]
    model, x = _readable(again, [3, 12])
    assert torch.equal(again.load_images([3, 12]), x)


def test_in_memory_arrays_keep_their_inputs_and_an_object_model_has_no_spec(tmp_path):
    data = hl.debug.digit_sum_dataset("test", n=10)
    model = audit_models.digit_cnn()
    a = hl.audit(model, (data.x, data.y), out=tmp_path / "a", methods=["saliency"], shard_size=4)
    assert torch.equal(a.load_images([0, 7]), data.x[[0, 7]])
    assert a.scores["path"].map(type).eq(type(None)).all() and a.scores["label"].tolist() == data.y.tolist()
    with pytest.warns(UserWarning, match="in-memory model object: there is no spec"):
        assert a.model() is None
    # a torch Dataset and a Hugging Face dataset of the same images give the same records
    ds = torch.utils.data.TensorDataset(data.x, data.y)
    b = hl.audit(model, ds, out=tmp_path / "b", methods=["saliency"], shard_size=4)
    pd.testing.assert_frame_equal(a.scores, b.scores)
    datasets = pytest.importorskip("datasets")
    pixels = (data.x.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=data.labels)})
    hf = datasets.Dataset.from_dict({"image": list(pixels), "label": data.y.tolist()}, features=features)
    c = hl.audit(model, hf, out=tmp_path / "c", methods=["saliency"], shard_size=4)
    quantised = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(c.load_images(range(10)), quantised)
    assert c.scores["label"].tolist() == data.y.tolist() and c.classes == data.labels


def test_a_model_in_train_mode_is_left_bit_identical(tmp_path):
    """Batch-norm statistics, modes and requires_grad survive an audit (the model contract)."""
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).train()
    model = hl.wrap(net, input_size=(3, 8, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    hl.audit(model, x, out=tmp_path / "a", methods=["saliency", "gradcam"], metrics=["deletion"], shard_size=4)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and all(m.training for m in net.modules()) and all(p.requires_grad for p in net.parameters())


def test_folder_names_index_classes():
    assert class_indices(["0", "1", "10", "2"], None) == ({"0": 0, "1": 1, "10": 10, "2": 2}, "integers")
    assert class_indices(["espresso", "tabby"], ["tabby cat, tabby", "espresso"])[0] == {"espresso": 1, "tabby": 0}
    assert class_indices(["dog", "cat"], None) == ({"cat": 0, "dog": 1}, "sorted")


# --- refusals ---------------------------------------------------------------------------------------
def test_bad_input_gets_clear_errors(tmp_path, folder_audit, digits_folder):
    out = folder_audit.dir
    with pytest.raises(ValueError, match=r"already holds an audit; pass resume=True \(--resume\) to finish it"):
        hl.audit(SPEC, digits_folder, out=out, **FAST)
    other = {**FAST, "metrics": ["deletion"]}
    with pytest.raises(ValueError, match=r"with other settings: metrics was \['insertion', 'deletion'\], now \['deletion'\]"):
        hl.audit(SPEC, digits_folder, out=out, resume=True, **other)
    with pytest.raises(FileNotFoundError, match="data folder '.*nowhere' does not exist"):
        hl.audit(SPEC, tmp_path / "nowhere", out=tmp_path / "x", **FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        hl.audit(SPEC, tmp_path / "empty", out=tmp_path / "x", **FAST)
    with pytest.raises(ValueError, match="unknown method 'gradcamm'. Did you mean: 'gradcam'"):
        hl.audit(SPEC, digits_folder, out=tmp_path / "x", methods=["gradcamm"])
    with pytest.raises(ValueError, match="unknown metric 'delet'. Did you mean: 'deletion'"):
        hl.audit(SPEC, digits_folder, out=tmp_path / "x", methods=["gradcam"], metrics=["delet"])
    with pytest.raises(ValueError, match="engine='ray' needs the model as a spec string"):
        hl.audit(audit_models.digit_cnn(), digits_folder, out=tmp_path / "x", methods=["gradcam"], engine="ray")
    assert not (tmp_path / "x").exists()  # nothing is written before the input is checked


def test_overwrite_replaces_an_audit_and_resume_of_a_complete_one_recomputes_nothing(tmp_path, monkeypatch):
    data = hl.debug.digit_sum_dataset("test", n=6)
    model = audit_models.digit_cnn()
    a = hl.audit(model, (data.x, data.y), out=tmp_path / "a", methods=["saliency"], shard_size=4)
    calls = []
    monkeypatch.setattr(engine, "compute_shard", lambda *args: calls.append(1) or _original(*args))
    b = hl.audit(model, (data.x, data.y), out=tmp_path / "a", methods=["saliency"], shard_size=4, resume=True)
    assert calls == [] and b.scores.equals(a.scores)
    c = hl.audit(model, (data.x, data.y), out=tmp_path / "a", methods=["gradcam"], shard_size=4, overwrite=True)
    assert calls == [1, 1] and c.methods == ["gradcam"] and set(c.scores.method) == {"gradcam"}


_original = engine.compute_shard


def test_cli_audit_and_its_usage_errors(tmp_path, digits_folder, capsys):
    out = tmp_path / "cli"
    args = ["audit", str(digits_folder), "--model", SPEC, "--method", "gradcam", "--metric", "deletion:steps=10",
            "--shard-size", "8", "--out", str(out)]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "audited 20 images with gradcam" in text and "1 image(s) could not be read (first: image 9" in text
    assert hl.Audit.open(out).manifest["settings"]["metric_options"] == {"deletion": {"steps": 10}}
    changed = [a.replace("steps=10", "steps=20") for a in args]
    assert cli_main(changed + ["--resume"]) == 2
    assert "metric_options was {'deletion': {'steps': 10}}, now {'deletion': {'steps': 20}}" in capsys.readouterr().err
    assert cli_main(args) == 2
    assert "already holds an audit; pass resume=True (--resume)" in capsys.readouterr().err
    assert cli_main(["audit", str(tmp_path / "missing"), "--method", "gradcam", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(args[:-2] + ["--method", "gradcam:nope=1", "--out", str(tmp_path / "p")]) == 2
    assert "--method: gradcam has no setting 'nope'" in capsys.readouterr().err


def test_data_digit_sum_exports_an_image_folder(digits_folder):
    data = hl.debug.digit_sum_dataset("test", shortcut="marker", n=20)
    counts = {int(d.name): len(list(d.iterdir())) for d in digits_folder.iterdir()}
    assert counts == {k: int((data.y == k).sum()) for k in range(11)}
    from PIL import Image

    first = sorted((digits_folder / str(int(data.y[0]))).iterdir())[0]
    assert first.name == "test_00.png"
    pixels = torch.from_numpy(np.asarray(Image.open(first).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.allclose(pixels, data.x[0], atol=1 / 255)


# --- kill -9 and resume -----------------------------------------------------------------------------
KILLED = """
    import sys, time
    from pathlib import Path
    from heatlens.audit import store
    from heatlens.cli import main

    write = store.Store.write_arrays

    def write_then_hang(self, result):
        write(self, result)
        if result.shard == 1:  # shard 1's arrays are on disk, its Parquet part is not: kill -9 lands here
            Path(sys.argv[1]).touch()
            time.sleep(120)

    store.Store.write_arrays = write_then_hang
    main(sys.argv[2:])
"""


@pytest.mark.slow
def test_kill_9_mid_shard_then_resume_gives_the_uninterrupted_table(tmp_path, digits_folder, folder_audit, monkeypatch):
    out, flag = tmp_path / "killed", tmp_path / "in-shard-1"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED), str(flag), *_cli_args(digits_folder, out)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the audit never reached shard 1"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    half = hl.Audit.open(out)
    assert not half.complete and sorted(store.Store(out).done_shards()) == [0]
    assert half.scores["image"].max() == 7 and not half.manifest["complete"]
    assert not np.isnan(half.maps("gradcam")[8:16].astype(np.float32)).all()  # the killed shard's chunks were written
    calls = []
    monkeypatch.setattr(engine, "compute_shard", lambda *args: calls.append(args[1].shard) or _original(*args))
    assert cli_main(_cli_args(digits_folder, out) + ["--resume"]) == 0
    assert calls == [1, 2]  # only what was missing
    resumed = hl.Audit.open(out)
    pd.testing.assert_frame_equal(resumed.scores, folder_audit.scores, check_exact=False, rtol=1e-6)
    for m in ("gradcam", "integrated_gradients"):
        np.testing.assert_allclose(resumed.maps(m)[:].astype(np.float32), folder_audit.maps(m)[:].astype(np.float32),
                                   rtol=1e-3, equal_nan=True)
    assert json.loads((out / "manifest.json").read_text())["complete"]


# --- Ray ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_engine_on_a_local_two_worker_cluster_equals_local(tmp_path, digits_folder, folder_audit):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": _env()["PYTHONPATH"], "OMP_NUM_THREADS": "1"}})
    try:
        r = hl.audit(SPEC, digits_folder, out=tmp_path / "ray", engine="ray", workers=2, **FAST)
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(r.scores, folder_audit.scores, check_exact=False, rtol=1e-5, atol=1e-7)
    for m in ("gradcam", "integrated_gradients"):
        np.testing.assert_allclose(r.maps(m)[:].astype(np.float32), folder_audit.maps(m)[:].astype(np.float32),
                                   rtol=2e-3, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(r.predictions()[:], folder_audit.predictions()[:], rtol=1e-5, atol=1e-6, equal_nan=True)
