"""``recommend``: the verdicts it must get right (Adebayo et al.'s guided backprop, a random map below
Grad-CAM, Kindermans et al.'s gradient x input), the stability it reports, and that it leaves the
model alone and refuses bad arguments by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens.methods import input_x_gradient
from heatlens.metrics import random_explanation
from heatlens.models.hooks import hook_count
from heatlens.recommendation import Recommendation, per_class_table, recommend_per_class

FAST = {"steps": 8, "n_bootstrap": 200, "fills": ("blur", "black")}


def random_map(model, x, target="predicted", *, batch_size=None):
    """A method that ignores the model: N(0,1) per pixel (seed 7, not the reference's seeds)."""
    return dataclasses.replace(random_explanation(model, x, target, seed=7), method="random_map")


def signed(name: str, signs: list[float]):
    """Gradient x input summed over channels (signed, so the metrics keep the sign), the map of image i
    multiplied by signs[i] (-1: the worst possible order)."""
    def method(model, x, target="predicted", *, batch_size=None):
        e = input_x_gradient(model, x, target, batch_size=batch_size)
        s = torch.tensor(signs[: x.shape[0]], dtype=e.attributions.dtype).view(-1, 1, 1, 1)
        # a per-location map (kept signed by the metrics); map_kind says so where Explanation records it
        kind = {"map_kind": "location"} if "map_kind" in {f.name for f in dataclasses.fields(e)} else {}
        return dataclasses.replace(e, attributions=e.attributions.sum(1, keepdim=True) * s, method=name, **kind)

    method.__name__ = name
    return method


@pytest.fixture(scope="module")
def photos_x(effnet):
    return effnet.preprocess(hl.data.sample_images(["chelsea", "coffee", "rocket"]))


@pytest.fixture(scope="module")
def effnet_rec(effnet, photos_x):
    state = {k: v.clone() for k, v in effnet.state_dict().items()}
    rec = hl.recommend(effnet, photos_x, ["guided_backprop", "gradcam", random_map], ("insertion", "deletion"),
                       ("model_randomization",), check_images=2, **FAST)
    assert all(torch.equal(state[k], v) for k, v in effnet.state_dict().items())
    return rec


@pytest.mark.slow
def test_guided_backprop_fails_model_randomisation_and_is_not_recommended(effnet_rec):
    row = effnet_rec.table.loc["guided_backprop"]
    assert row["model_randomization"] == "fail" and row["model_randomization_value"] > 0.9  # Adebayo et al.
    assert row["tier"] == "not recommended"
    assert "fails model randomisation: shows edges, not the model" in effnet_rec.verdicts["guided_backprop"]
    assert effnet_rec.table.loc["gradcam", "model_randomization"] == "pass"
    assert effnet_rec.best != "guided_backprop"


@pytest.mark.slow
def test_random_map_ranks_below_gradcam_on_insertion_minus_deletion(effnet_rec):
    t = effnet_rec.table
    assert t.loc["gradcam", "ins_minus_del"] > t.loc["random_map", "ins_minus_del"] + 0.05
    assert t.loc["gradcam", "rank"] < t.loc["random_map", "rank"]
    assert "no better than a random map on insertion − deletion" in effnet_rec.verdicts["random_map"]
    assert abs(t.loc["random_map", "vs_random"]) < 2 * t.loc["random_map", "vs_random_sem"] + 1e-3


def test_gradient_x_input_fails_input_invariance_where_saliency_passes(tiny_cnn, tiny_x):
    rec = hl.recommend(tiny_cnn, tiny_x, ["saliency", "input_x_gradient"], ("insertion", "deletion"),
                       ("input_invariance",), granularity=2, **FAST)
    t = rec.table
    assert t.loc["saliency", "input_invariance"] == "pass" and t.loc["saliency", "input_invariance_value"] < 1e-3
    assert t.loc["input_x_gradient", "input_invariance"] == "fail"
    assert "fails input invariance" in rec.verdicts["input_x_gradient"]
    assert "input invariance" not in rec.verdicts["saliency"]


def _linear() -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(3, 192, generator=gen))
        net[1].bias.zero_()
    return net.eval()


def test_stability_drops_when_the_images_disagree():
    # on a linear model with a zero fill, gradient x input orders features exactly; its negation worst
    net = _linear()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    settings = dict(metrics=("insertion", "deletion"), checks=(), granularity=2, steps=16, fills=("zeros",),
                    output="logit", n_bootstrap=500)
    agree = hl.recommend(net, x, [signed("a", [1] * 8), signed("b", [-1] * 8), random_map], **settings)
    disagree = hl.recommend(net, x, [signed("a", [1] * 4 + [-1] * 4), signed("b", [-1] * 4 + [1] * 4), random_map],
                            **settings)
    assert agree.stability["bootstrap_tau"] == 1.0 and agree.stability["label"] == "stable"
    assert agree.best == "a" and agree.stability["best_share"] == 1.0
    assert disagree.stability["bootstrap_tau"] < 0.6 and disagree.stability["label"] != "stable"
    assert disagree.best is None  # on average neither beats the Random map: no winner to recommend
    spread = {m: disagree.table.loc[m, "rank_high"] - disagree.table.loc[m, "rank_low"] for m in ("a", "b")}
    assert max(spread.values()) >= 1  # the intervals show it too


def test_recommend_leaves_the_model_alone_and_measures_cost(tiny_cnn, tiny_x):
    state = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    flags = [p.requires_grad for p in tiny_cnn.parameters()]
    hooks, training = hook_count(tiny_cnn), tiny_cnn.training
    rec = hl.recommend(tiny_cnn, tiny_x, ["saliency", "gradcam"], granularity=2, check_images=2,
                       sensitivity_samples=2, randomization_steps=3, **FAST)
    assert all(torch.equal(state[k], v) for k, v in tiny_cnn.state_dict().items())
    assert [p.requires_grad for p in tiny_cnn.parameters()] == flags
    assert hook_count(tiny_cnn) == hooks and tiny_cnn.training == training
    t = rec.table
    assert list(t.index) == [*rec.methods, "random"] and sorted(t.loc[rec.methods, "rank"]) == [1, 2]
    assert (t.loc[rec.methods, "seconds_per_image"] > 0).all()
    assert set(rec.checks) == {(m, c) for m in ("saliency", "gradcam")
                               for c in ("model_randomization", "random_logit", "input_invariance")}
    assert rec.results[("saliency", "max_sensitivity", None)].values.shape == (2,)  # on the check images
    assert rec.params["randomization_layers"] == ["net.fc", "net.conv2", "net.conv1"]


def test_recommendation_views(tiny_cnn, tiny_x):
    rec = hl.recommend(tiny_cnn, tiny_x, ["saliency", "gradcam"], ("insertion", "deletion"), (), granularity=2,
                       **FAST)
    assert isinstance(rec, Recommendation) and rec.verdicts["random"].startswith("reference")
    md = rec.to_markdown()
    assert md.startswith("| rank | method | verdict | ins − del ± se | vs random ± se |")
    assert "stability:" in md and "Kendall τ" in rec.to_text()
    fig = rec.plot()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [f"{i}. {m}" for i, m in enumerate(rec.methods, 1)]
    html = rec._repr_html_()
    assert "<table>" in html and "data:image/png;base64" in html and "Kendall τ" in html
    assert rec.section().title == "Which method to trust"


def test_recommend_per_class_groups_images_and_skips_small_classes(tiny_cnn, tiny_x):
    classes = [0, 0, 1, 2]
    recs = recommend_per_class(tiny_cnn, tiny_x, classes, methods=["saliency", "gradcam"],
                               metrics=("insertion", "deletion"), checks=(), granularity=2, **FAST)
    assert list(recs) == ["0"]  # classes 1 and 2 have one image each
    assert recs["0"].params["n_images"] == 2
    assert bool((recs["0"].explanations["saliency"].targets == 0).all())  # explained for its own class
    table = per_class_table(recs)
    assert list(table.columns[:4]) == ["class", "images", "best", "verdict"]


def test_recommend_errors_name_the_argument(tiny_cnn, tiny_x):
    with pytest.raises(ValueError, match=r"unknown method 'salency'\. Did you mean: 'saliency'"):
        hl.recommend(tiny_cnn, tiny_x, ["salency"])
    with pytest.raises(ValueError, match="'sparseness' is a complexity metric"):
        hl.recommend(tiny_cnn, tiny_x, ["saliency"], ["insertion", "sparseness"])
    with pytest.raises(ValueError, match="at least one faithfulness metric"):
        hl.recommend(tiny_cnn, tiny_x, ["saliency"], ["max_sensitivity"])
    with pytest.raises(ValueError, match=r"unknown sanity check 'model_random'\. Did you mean"):
        hl.recommend(tiny_cnn, tiny_x, ["saliency"], checks=["model_random"])
    with pytest.raises(ValueError, match="method_kwargs names methods that are not in methods: gradcam"):
        hl.recommend(tiny_cnn, tiny_x, ["saliency"], method_kwargs={"gradcam": {}})
    with pytest.raises(ValueError, match="methods must name at least one"):
        hl.recommend(tiny_cnn, tiny_x, [])
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        hl.recommend(tiny_cnn, tiny_x, ["saliency"], steps=0)
    with pytest.raises(ValueError, match="classes has 3 entries but x has 4 images"):
        recommend_per_class(tiny_cnn, tiny_x, [0, 1, 2])


def test_cli_recommend_refuses_an_unknown_method_with_exit_2(tmp_path, capsys):
    from PIL import Image

    from heatlens.cli import main

    path = tmp_path / "a.png"
    Image.fromarray(hl.data.sample_images("coffee")[0]).save(path)
    assert main(["recommend", str(path), "--method", "saliency,gradcm", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'gradcm'" in err[0] and "'gradcam'" in err[0]


@pytest.mark.slow
def test_cli_recommend_prints_the_ranking_and_writes_the_report(tmp_path, capsys):
    from PIL import Image

    from heatlens.cli import main

    for name, image in zip(("chelsea", "coffee"), hl.data.sample_images(["chelsea", "coffee"])):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    code = main(["recommend", str(tmp_path), "--method", "gradcam,saliency", "--metric", "insertion,deletion",
                 "--check", "none", "--steps", "4", "--fills", "black", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code in (0, 1) and "stability:" in printed and "gradcam" in printed
    assert {p.name for p in out.iterdir()} == {"recommendation.html", "rank.png", "table.csv"}
    assert "Which method to trust" in (out / "recommendation.html").read_text()
