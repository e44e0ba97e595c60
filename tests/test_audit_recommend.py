"""``heatlens audit --recommend``: a per-class recommendation on a sample of the audit, stored, reloaded,
kept on resume and shown in the report."""

from __future__ import annotations

import pytest

import heatlens as hl
from heatlens.audit.recommend import sample_per_class
from heatlens.cli import main as cli_main

pytest.importorskip("pyarrow")
pytest.importorskip("zarr")
pd = pytest.importorskip("pandas")

import audit_models  # noqa: E402

SPEC = "audit_models:digit_cnn"
CHEAP = {"steps": 5, "n_bootstrap": 50, "checks": ()}
SETTINGS = dict(methods=["gradcam", "saliency"], shard_size=8)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "data"
    assert cli_main(["data", "digit-sum", "--split", "test", "--n", "12", "--out", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def rec_audit(digits, tmp_path_factory):
    return hl.audit(SPEC, digits, out=tmp_path_factory.mktemp("a") / "audit", recommend=True,
                    recommend_options=CHEAP, **SETTINGS)


def test_the_table_has_a_row_per_class_and_method_and_reloads(rec_audit):
    table = rec_audit.recommendation
    per_image = rec_audit.scores.drop_duplicates("image")
    counts = per_image["prediction_name"].value_counts()
    classes = sorted(str(c) for c, n in counts.items() if n >= 2)  # recommend needs 2 images per class
    assert classes, "the test data must give some predicted class 2 images"
    assert sorted(table["class"].unique()) == classes
    for c, g in table.groupby("class"):
        assert g["method"].tolist()[-1] == "random" and sorted(g["method"][:-1]) == ["gradcam", "saliency"]
        assert g["images"].iloc[0] == min(4, counts[c])
    entry = rec_audit.manifest["recommendation"]
    assert (rec_audit.dir / entry["file"]).exists() and entry["options"]["steps"] == 5
    # the sampled images are of the class they are grouped under
    pred = per_image.set_index("image")["prediction_name"]
    assert sorted({str(pred[i]) for i in entry["images"]}) == sorted(str(c) for c in counts.index)
    pd.testing.assert_frame_equal(hl.Audit.open(rec_audit.dir).recommendation, table)


def test_an_audit_without_recommend_has_none(digits, tmp_path):
    assert hl.audit(SPEC, digits, out=tmp_path / "a", **SETTINGS).recommendation is None


def test_resume_recomputes_the_recommendation_only_if_missing(rec_audit, digits, monkeypatch):
    import heatlens.audit.recommend as rec_mod

    calls = []
    real = rec_mod.run_recommendation
    monkeypatch.setattr(rec_mod, "run_recommendation", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = hl.audit(SPEC, digits, out=rec_audit.dir, resume=True, recommend=True, recommend_options=CHEAP,
                     **SETTINGS)
    assert calls == [] and again.recommendation.equals(rec_audit.recommendation)
    (rec_audit.dir / "recommendation.parquet").unlink()
    again = hl.audit(SPEC, digits, out=rec_audit.dir, resume=True, recommend=True, recommend_options=CHEAP,
                     **SETTINGS)
    assert calls == [1]
    timeless = lambda t: t.drop(columns=[c for c in t if c.startswith("seconds")])  # noqa: E731
    pd.testing.assert_frame_equal(timeless(again.recommendation), timeless(rec_audit.recommendation))  # seeded


def test_the_sample_is_seeded_and_capped_per_class():
    scores = pd.DataFrame({"image": range(10), "prediction": [0] * 7 + [1] * 3, "error": [None] * 9 + ["bad"]})
    a, b = sample_per_class(scores, 4, 0), sample_per_class(scores, 4, 0)
    assert a == b and a[1].count(0) == 4 and a[1].count(1) == 2 and 9 not in a[0]


def test_the_report_shows_the_per_class_table(rec_audit):
    from heatlens.audit.report import write_audit_report

    report, _ = write_audit_report(rec_audit, model=audit_models.digit_cnn())
    html = report.read_text(encoding="utf-8")
    assert "Which method to trust, per class" in html
    for c in rec_audit.recommendation["class"].unique():
        assert f"class {c} ·" in html


def test_cli_recommend_writes_the_table(digits, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["audit", str(digits), "--model", SPEC, "--method", "gradcam", "--shard-size", "8",
                     "--out", str(out), "--recommend"]) == 0
    assert (out / "recommendation.parquet").exists()
    assert "recommended (" in capsys.readouterr().out
    assert set(hl.Audit.open(out).recommendation["method"]) == {"gradcam", "random"}
