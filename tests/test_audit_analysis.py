"""The audit analysis (heatlens.audit.spray / findings / analysis / report): SpRAy clusters, shortcuts
found without being told, and the report.

Fast tests use synthetic maps and an analytic model whose shortcut is known by construction; the slow
ones train the digit-sum CNN with each planted shortcut (heatlens.debug) over 3 seeds and check that
the first finding names the region and the classes the shortcut drives, and that a clean model gets
no shortcut finding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens.audit.analysis import (
    analyse_arrays, faithfulness_vs_random, method_disagreement, outlier_scores, spearman_rows,
)
from heatlens.audit.findings import (
    colour_dependence, edge_band, erase, find_shortcuts, grid_to_pixels, region_name, transplant,
)
from heatlens.audit.spray import eigengap_k, map_features, spray

H, W = 28, 56


def blob(rng, n, r, c, s=3.0, noise=0.3):
    """(n,H,W) non-negative maps peaked at (r, c) with multiplicative noise."""
    yy, xx = np.mgrid[:H, :W]
    m = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * s * s))
    return m[None] * (1 + noise * rng.random((n, H, W)))


# --- SpRAy --------------------------------------------------------------------------------------------

def test_eigengap_picks_the_number_of_near_zero_eigenvalues():
    assert eigengap_k(np.array([0.0, 0.0, 0.0, 0.6, 0.62, 0.65]), 5) == 3
    assert eigengap_k(np.array([0.0, 0.4, 0.5, 0.55, 0.6]), 4) == 1


def test_spray_separates_two_strategies_and_keeps_one_blob_whole():
    rng = np.random.default_rng(0)
    maps = np.concatenate([blob(rng, 120, 14, 14), blob(rng, 50, 2, 50, s=1.5), blob(rng, 150, 14, 40)])
    groups = np.array([0] * 170 + [1] * 150)
    result = spray(maps, groups, embed=False)
    two, one = result.classes[0], result.classes[1]
    assert two.k == 2 and one.k == 1
    # largest strategy first, membership exactly the planted one
    assert sorted(two.clusters[0].members.tolist()) == list(range(120))
    assert sorted(two.clusters[1].members.tolist()) == list(range(120, 170))
    peak = np.unravel_index(np.argmax(two.clusters[1].mean_map), two.clusters[1].mean_map.shape)
    assert peak[0] <= 1 and peak[1] >= 24  # the small strategy's mean map peaks in the top-right corner
    assert set(two.clusters[1].representatives) <= set(range(120, 170))


class CountingMaps:
    """An (N,h,w) array-like that records every slice read, to prove chunked reading."""

    def __init__(self, data):
        self.data, self.shape, self.reads = data, data.shape, []

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.data[key]


def test_map_features_reads_in_chunks_and_matches_a_zarr_store(tmp_path):
    import zarr

    rng = np.random.default_rng(1)
    data = rng.random((50, H, W)).astype(np.float32)
    data[7] = 0  # a map without relevance
    counting = CountingMaps(data)
    feats, valid, grid = map_features(counting, chunk=16)
    assert max(stop - start for start, stop in counting.reads) <= 16 and len(counting.reads) == 4
    assert grid == (14, 28) and feats.shape == (50, 14 * 28)
    np.testing.assert_allclose(feats[valid].sum(1), 1, rtol=1e-5)
    assert not valid[7] and valid.sum() == 49
    # 2x2 area mean of |map| normalised to unit mass
    ref = data[3].reshape(14, 2, 28, 2).mean((1, 3)).ravel()
    np.testing.assert_allclose(feats[3], ref / ref.sum(), rtol=1e-5)
    store = zarr.open_array(str(tmp_path / "maps.zarr"), mode="w", shape=data.shape, chunks=(16, H, W), dtype="f2")
    store[:] = data.astype(np.float16)
    zfeats, zvalid, _ = map_features(store, chunk=16)
    np.testing.assert_allclose(zfeats, feats, atol=2e-3)
    assert (zvalid == valid).all()


def test_spray_refuses_bad_input_with_the_argument_named():
    with pytest.raises(ValueError, match=r"maps must be \(N,h,w\), got shape \(4, 5\)"):
        map_features(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"groups must be \(N,\) = \(3,\), got shape \(2,\)"):
        spray(np.zeros((3, 4, 4)), np.zeros(2, dtype=int))


# --- regions and interventions -------------------------------------------------------------------------

def test_region_names():
    grid = (14, 28)
    top = np.zeros(grid, bool)
    top[0, 2:26] = True
    assert region_name(top) == "top edge"
    corner = np.zeros(grid, bool)
    corner[12:, :3] = True
    assert region_name(corner) == "bottom-left corner"
    assert region_name(edge_band(grid)).startswith("frame (")
    centre = np.zeros(grid, bool)
    centre[6:8, 12:16] = True
    assert region_name(centre) == "centre"


def test_grid_to_pixels_covers_the_same_place_at_input_resolution():
    mask = np.zeros((14, 28), bool)
    mask[0:2, 3:5] = True  # map pixels rows 0-3, columns 6-9 of a 28x56 map
    px = grid_to_pixels(mask, (28, 56), (56, 112))  # input twice the map's resolution
    rows, cols = np.nonzero(px)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 7, 12, 19)


def test_erase_fills_with_the_median_and_transplant_copies_the_region():
    x = torch.zeros(2, 3, 4, 4)
    x[:, :, 0, 0] = 1.0
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    assert erase(x, mask).abs().sum() == 0
    donors = torch.full((2, 3, 4, 4), 0.5)
    moved = transplant(torch.zeros(2, 3, 4, 4), donors, mask)
    assert moved[:, :, 0, 0].eq(0.5).all() and moved.sum() == 0.5 * 6


class PatchModel(nn.Module):
    """Class 1 when a bright patch sits in the top-left corner (rows 0-3, columns 0-5), else class 0.

    The shortcut is known by construction: its region, and that it drives class 1 only.
    """

    def forward(self, x):
        patch = x[:, :, :4, :6].mean((1, 2, 3))
        return torch.stack([0.5 - patch, patch - 0.5], 1) * 20


def _patch_data(rng, n0=80, n1=80, shortcut=True):
    x = torch.rand(n0 + n1, 3, H, W, generator=torch.Generator().manual_seed(0)) * 0.2
    if shortcut:
        x[n0:, :, :4, :6] = 1.0
    groups = np.array([0] * n0 + [1] * n1)
    patch = np.zeros((n1, H, W))
    patch[:, :4, :6] = 1.0  # relevance covers the patch, with noise and a faint background
    patch = patch * (1 + 0.3 * rng.random((n1, H, W))) + 0.002 * rng.random((n1, H, W))
    maps = np.concatenate([blob(rng, n0, 14, 28, s=6), patch if shortcut else blob(rng, n1, 14, 28, s=6)])
    return x, groups, maps


def _predict(model):
    return lambda x: torch.softmax(model(x), 1)


def test_a_planted_patch_is_found_confirmed_and_named_without_being_told():
    rng = np.random.default_rng(2)
    x, groups, maps = _patch_data(rng)
    model = PatchModel()
    result = spray(maps, groups, embed=False)
    found, rejected = find_shortcuts(result, _predict(model), lambda i: x[torch.as_tensor(i)], groups,
                                     np.ones(len(groups), bool), (H, W), (H, W))
    assert len(found) == 1 and not rejected
    f = found[0]
    assert f.kind == "shortcut" and f.classes == [1]
    assert f.region["name"] == "top-left corner"
    t, b, l, r = f.region["box"]
    assert t == 0 and b <= 6 and l == 0 and r <= 8
    ev = f.evidence
    assert ev["erase_inside"]["changed"] == 1.0  # erasing the patch flips every class-1 prediction
    assert ev["erase_outside"]["changed"] == 0.0  # and no class-0 prediction
    assert ev["transplant"]["follow"] == 1.0  # pasted into class-0 images it makes them class 1
    json.dumps(f.to_dict(), allow_nan=False)


def test_a_patch_the_model_ignores_is_rejected_by_the_intervention():
    rng = np.random.default_rng(3)
    x, groups, maps = _patch_data(rng)

    class Ignores(nn.Module):  # predicts from the image centre: the patch in the maps is not what it uses
        def forward(self, x):
            c = x[:, :, 10:18, 20:36].mean((1, 2, 3))
            return torch.stack([c, -c], 1)

    result = spray(maps, groups, embed=False)
    found, rejected = find_shortcuts(result, _predict(Ignores()), lambda i: x[torch.as_tensor(i)], groups,
                                     None, (H, W), (H, W))
    assert found == [] and len(rejected) == 1 and rejected[0]["class"] == 1


def test_diffuse_maps_give_no_candidate():
    rng = np.random.default_rng(4)
    x, groups, maps = _patch_data(rng, shortcut=False)
    result = spray(maps, groups, embed=False)
    found, rejected = find_shortcuts(result, _predict(PatchModel()), lambda i: x[torch.as_tensor(i)], groups,
                                     None, (H, W), (H, W))
    assert found == [] and rejected == []


def test_colour_dependence_is_tested_by_intervention_and_skipped_on_grey_images():
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    groups = np.array([0] * 20 + [1] * 20)
    x[20:, 0] += 0.6  # class 1 is reddish

    class Red(nn.Module):
        def forward(self, x):
            red = (x[:, 0] - x[:, 1:].mean(1)).mean((1, 2))
            return torch.stack([0.2 - red, red - 0.2], 1) * 20

    finding, note = colour_dependence(_predict(Red()), lambda i: x[torch.as_tensor(i)], groups)
    assert finding is not None and finding.kind == "colour" and finding.classes == [1]
    assert finding.region is None and "not localisable" in finding.text
    assert finding.evidence["per_class"][1]["changed"] == 1.0 and finding.evidence["per_class"][0]["changed"] == 0.0
    grey = x.mean(1, keepdim=True).expand_as(x).clone()
    none, note = colour_dependence(_predict(Red()), lambda i: grey[torch.as_tensor(i)], groups)
    assert none is None and "no colour" in note


# --- tables ----------------------------------------------------------------------------------------------

def test_faithfulness_advantage_is_signed_by_the_metrics_direction():
    groups = np.array([0, 0, 1, 1])
    values = np.array([0.2, 0.2, 0.5, 0.5])
    rand = np.array([0.4, 0.4, 0.4, 0.4])
    rows = faithfulness_vs_random(groups, values, rand, groups, higher_is_better=False)  # deletion-like
    assert [r["class"] for r in rows] == [1, 0]  # weakest first: class 1 is worse than Random
    assert rows[0]["advantage"] == pytest.approx(-0.1) and rows[1]["advantage"] == pytest.approx(0.2)
    rows = faithfulness_vs_random(groups, values, rand, groups, higher_is_better=True)
    assert rows[0]["class"] == 0 and rows[0]["advantage"] == pytest.approx(-0.2)


def test_spearman_and_disagreement_against_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(5)
    a, b = rng.random((6, 30)), rng.random((6, 30))
    np.testing.assert_allclose(spearman_rows(a, b), [spearmanr(a[i], b[i])[0] for i in range(6)], rtol=1e-5)
    groups = np.array([0, 0, 0, 1, 1, 1])
    rows = method_disagreement({"m1": a, "m2": np.concatenate([a[:3], b[3:]])}, groups)
    assert rows[0]["class"] == 1 and rows[-1]["class"] == 0 and rows[-1]["spearman"] == pytest.approx(1.0)


def test_outlier_scores_flag_the_odd_map():
    rng = np.random.default_rng(6)
    maps = blob(rng, 60, 14, 14)
    maps[17] = blob(rng, 1, 2, 50, s=1.5)[0]
    feats, valid, _ = map_features(maps)
    z = outlier_scores(feats, np.zeros(60, dtype=int), valid)
    assert int(np.nanargmax(z)) == 17 and z[17] > 3.5 and np.sum(z > 3.5) == 1


def test_analyse_arrays_refuses_an_unknown_method():
    with pytest.raises(ValueError, match=r"method 'gradcam' has no maps; have \['saliency'\]"):
        analyse_arrays({"saliency": np.zeros((2, 4, 4))}, np.zeros(2), None, {}, method="gradcam")


# --- the digit-sum story, 3 seeds -----------------------------------------------------------------------

def _shortcut_effect(model, data) -> dict[int, float]:
    """Ground truth for the test only (heatlens.debug knows where the shortcut is): per class, how much
    removing the planted shortcut from its images matters: the share of predictions that change, or the
    drop of the predicted class's mean probability, whichever is larger (the same two the finding uses)."""
    from heatlens.debug import remove_shortcut

    with torch.no_grad():
        p0, p1 = torch.softmax(model(data.x), 1), torch.softmax(model(remove_shortcut(data)), 1)
    pred = p0.argmax(1)
    changed = pred != p1.argmax(1)
    drop = p0.gather(1, pred[:, None])[:, 0] - p1.gather(1, pred[:, None])[:, 0]
    return {c: max(float(changed[data.y == c].float().mean()), float(drop[data.y == c].mean()))
            for c in range(11) if bool((data.y == c).any())}


def _digit_audit(kind: str | None, seed: int):
    from heatlens import debug

    train = debug.digit_sum_dataset("train", kind, n=1500, seed=seed)
    run = debug.train_classifier("seed_cnn", train, epochs=3 if kind else 6, seed=seed, progress=False)
    data = debug.digit_sum_dataset("train", kind, n=500, seed=seed + 100)  # images the model was not trained on
    e = hl.explain(run.model, data.x, "input_x_gradient")
    pred = e.predictions.numpy()
    y = data.y.numpy()
    analysis = analyse_arrays({"input_x_gradient": e.maps("sum_abs").float().numpy()}, y, pred == y, {},
                              model=run.model, load_images=lambda i: data.x[torch.as_tensor(i)], embed=False, seed=seed)
    return run.model, data, analysis


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["marker", "border", "tint"])
def test_the_first_finding_names_the_planted_shortcut(kind, seed):
    model, data, analysis = _digit_audit(kind, seed)
    first = analysis.findings[0]
    effect = _shortcut_effect(model, data)
    driven = {c for c, v in effect.items() if v >= 0.5}  # classes the shortcut clearly drives
    assert len(driven) >= 4, effect  # the shortcut was learnt
    named = set(first.classes)
    # it names (almost) no class the shortcut leaves alone, and most of the classes it drives
    assert sum(effect[c] >= 0.1 for c in named) >= 0.8 * len(named), (named, effect)
    assert len(named & driven) >= 0.5 * len(driven), (named, effect)
    if kind == "marker":
        assert first.kind == "shortcut" and "top" in first.region["name"]
        t, b, l, r = first.region["box"]
        assert t == 0 and b <= 6 and r - l >= 28  # the top margin, across the markers' positions
    elif kind == "border":
        assert first.kind == "shortcut" and first.region["name"].startswith("frame")
        grid = np.asarray(first.region["grid"], bool)
        assert grid[edge_band(grid.shape)].sum() >= 0.9 * grid.sum()  # the region is the outer band
    else:  # a global tint has no region: the colour intervention reports it
        assert first.kind == "colour" and first.region is None
        assert not [f for f in analysis.findings if f.kind == "shortcut"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_clean_model_gets_no_shortcut_finding(seed):
    _, _, analysis = _digit_audit(None, seed)
    assert not [f for f in analysis.findings if f.kind in ("shortcut", "colour")], [f.title for f in analysis.findings]
    assert any("no cluster" in n or "not confirmed" in n for n in analysis.notes)


# --- the demo through the engine, and its report in a browser -------------------------------------------

@pytest.fixture(scope="module")
def audit_demo(tmp_path_factory):
    from heatlens.audit.demo import run_audit_demo

    return run_audit_demo("marker", out=tmp_path_factory.mktemp("audit-demo"), n_train=1500, n_audit=500,
                          progress=False)


@pytest.mark.slow
def test_demo_audit_report_and_findings_json_name_the_shortcut_first(audit_demo):
    data = json.loads(audit_demo.findings.read_text())
    first = data["findings"][0]
    assert first["kind"] == "shortcut" and "top" in first["region"]["name"] and len(first["classes"]) >= 8
    assert first["region"]["box"][0] == 0 and first["region"]["box"][1] <= 6
    html = audit_demo.report.read_text()
    assert html.index(first["title"].replace("&", "&amp;")) < html.index('id="classes"')  # findings come first
    assert 'src="http' not in html and "<script src" not in html  # self-contained
    assert data["summary"]["images"] == 500 and data["summary"]["clustered_method"] == "input_x_gradient"
    # the audit reopens and the analysis gives the same first finding from the store alone
    from heatlens.audit import Audit
    from heatlens.audit.analysis import analyse

    again = analyse(Audit.open(audit_demo.audit.dir), embed=False)
    assert again.findings[0].title == first["title"]


@pytest.mark.slow
def test_demo_audit_report_opens_in_headless_chromium(audit_demo, tmp_path):
    from test_report import _chromium, _open_in_chromium

    if _chromium() is None:
        pytest.skip("chromium is not installed")
    status, console_errors = _open_in_chromium(audit_demo.report, tmp_path, "audit-report.png")
    assert status["n"] > 50 and status["ok"] == status["n"], status
    assert console_errors == []


def test_cli_demo_audit_runs_the_audit_demo_with_the_chosen_shortcut(monkeypatch, tmp_path):
    import heatlens.audit.demo as demo
    from heatlens.cli import main

    calls = []

    class Done:
        report, findings = tmp_path / "report.html", tmp_path / "findings.json"

    monkeypatch.setattr(demo, "run_audit_demo", lambda shortcut, **kw: calls.append((shortcut, kw)) or Done())
    assert main(["demo", "--audit", "--out", str(tmp_path), "--no-progress"]) == 0
    assert main(["demo", "--audit", "--shortcut", "none", "--out", str(tmp_path), "--no-progress"]) == 0
    assert [c[0] for c in calls] == ["marker", None] and calls[0][1]["out"] == tmp_path
