"""compare(): methods run here or explanations computed before, scored next to the Random baseline."""

from __future__ import annotations

import pytest
import torch

import heatlens as hl
from heatlens.metrics import compare

from conftest import make_tiny_cnn


def test_compare_scores_given_explanations_exactly_like_the_methods_it_runs():
    model = hl.wrap(make_tiny_cnn(), input_size=(3, 16, 16))
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    options = dict(granularity=4, steps=8)
    ran = compare(model, x, ["saliency", "input_x_gradient"], ["deletion"], **options)
    given = [hl.explain(model, x, "saliency"), hl.explain(model, x, "input_x_gradient")]
    reused = compare(model, x, given, ["deletion"], **options)
    assert reused.methods == ["saliency", "input_x_gradient", "random"]
    for a, b in zip(ran.rows, reused.rows):
        assert a["method"] == b["method"] and a["mean"] == pytest.approx(b["mean"], abs=1e-12)
    named = compare(model, x, {"mine": given[0], "ixg": "input_x_gradient"}, ["deletion"], include_random=False,
                    **options)
    assert named.methods == ["mine", "ixg"] and named.explanations["mine"] is given[0]
    with pytest.raises(ValueError, match="the explanation 'saliency' holds 3 images, x has 2"):
        compare(model, x[:2], given[:1], ["deletion"])


def test_random_baseline_scores_the_class_the_given_explanations_explain():
    model = hl.wrap(make_tiny_cnn(), input_size=(3, 16, 16))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    e = hl.explain(model, x, "saliency", target=4)
    table = compare(model, x, [e], ["deletion"], granularity=4, steps=4)
    assert table.explanations["random"].targets.tolist() == [4, 4]
