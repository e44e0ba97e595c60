"""load_model for PyTorch models the user has: torch.export programs (.pt2) and package.module:function."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch
from torch import nn

import heatlens as hl
from conftest import make_tiny_cnn


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module ``usermodels`` on sys.path with ``build()`` (bare module), ``sized()`` and ``wrapped()``."""
    (tmp_path / "usermodels.py").write_text(textwrap.dedent("""
        import heatlens as hl
        from conftest import make_tiny_cnn

        def build():
            return make_tiny_cnn(seed=3).train()   # left in train mode: load_model puts it in eval

        def sized():
            net = make_tiny_cnn(seed=3)
            net.input_size = (3, 16, 16)
            return net

        def wrapped():
            return hl.wrap(make_tiny_cnn(seed=3), input_size=(3, 16, 16), labels=list("abcde"))

        def not_a_model():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usermodels"
    sys.modules.pop("usermodels", None)


def test_pt2_program_explains_like_the_module_it_was_exported_from(tmp_path, tiny_x):
    net = make_tiny_cnn(seed=1)
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (tiny_x,), dynamic_shapes=({0: batch},)), tmp_path / "m.pt2")
    clf = hl.load_model(tmp_path / "m.pt2")
    assert clf.input_size == (3, 16, 16)  # read from the exported example input
    got = hl.explain(clf, tiny_x, "saliency", target=2)
    want = hl.explain(net, tiny_x, "saliency", target=2)
    torch.testing.assert_close(got.attributions, want.attributions)


def test_pt2_with_a_static_batch_runs_any_batch_size(tmp_path, tiny_x):
    net = make_tiny_cnn(seed=1)
    torch.export.save(torch.export.export(net, (tiny_x[:2],)), tmp_path / "static.pt2")  # batch fixed at 2
    clf = hl.load_model(str(tmp_path / "static.pt2"))
    x = torch.cat([tiny_x, tiny_x[:1]])  # 5 rows: chunks of 2, the last padded
    torch.testing.assert_close(clf(x), net(x))
    got = hl.explain(clf, x, "saliency", target=1, batch_size=3)
    torch.testing.assert_close(got.attributions, hl.explain(net, x, "saliency", target=1).attributions)


def test_factory_module_gets_input_size_eval_mode_and_weights(tmp_path, factory_module, tiny_x):
    trained = make_tiny_cnn(seed=9)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    clf = hl.load_model(f"{factory_module}:build", weights=tmp_path / "w.pt", input_size=(3, 16, 16))
    assert not clf.net.training
    torch.testing.assert_close(clf(tiny_x), trained(tiny_x))  # the weights, not build()'s own
    assert hl.load_model(f"{factory_module}:sized").input_size == (3, 16, 16)
    assert hl.load_model(f"{factory_module}:wrapped").labels == tuple("abcde")


def test_pt2_takes_weights_too(tmp_path, tiny_x):
    torch.save(make_tiny_cnn(seed=9).state_dict(), tmp_path / "w.pt")
    torch.export.save(torch.export.export(make_tiny_cnn(seed=1), (tiny_x,)), tmp_path / "m.pt2")
    clf = hl.load_model(tmp_path / "m.pt2", weights=tmp_path / "w.pt")
    torch.testing.assert_close(clf(tiny_x), make_tiny_cnn(seed=9)(tiny_x))


def test_load_model_errors_for_pytorch_models_name_the_problem(tmp_path, factory_module):
    with pytest.raises(ValueError, match=re.escape(f"model '{factory_module}:build': build() returned an nn.Module "
                                                   "without input_size; pass input_size=(C, H, W)")):
        hl.load_model(f"{factory_module}:build")
    with pytest.raises(ValueError, match=re.escape(f"module '{factory_module}' has no function 'bild'. "
                                                   "Did you mean: 'build'?")):
        hl.load_model(f"{factory_module}:bild")
    with pytest.raises(TypeError, match=re.escape("not_a_model() must return a torch.nn.Module or a heatlens "
                                                  "Classifier, got int")):
        hl.load_model(f"{factory_module}:not_a_model")
    with pytest.raises(ValueError, match=re.escape("model 'nowhere.models:build': cannot import module "
                                                   "'nowhere.models'")):
        hl.load_model("nowhere.models:build")
    with pytest.raises(FileNotFoundError, match="weights file '.*nope.pt' does not exist"):
        hl.load_model(f"{factory_module}:sized", weights=tmp_path / "nope.pt")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"weights file '.*other.pt' does not fit the model: .*Missing key"):
        hl.load_model(f"{factory_module}:sized", weights=tmp_path / "other.pt")
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a whole module: weights_only refuses it
    with pytest.raises(ValueError, match=r"weights file '.*pickled.pt' is not a state dict torch.load\(weights_only"):
        hl.load_model(f"{factory_module}:sized", weights=tmp_path / "pickled.pt")
    (tmp_path / "broken.pt2").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"'.*broken.pt2' is not a readable torch.export program \(.pt2\)"):
        hl.load_model(tmp_path / "broken.pt2")
    with pytest.raises(ValueError, match="weights= is for PyTorch models given by file or factory; the zoo model"):
        hl.load_model("efficientnet-lite0", weights=tmp_path / "other.pt")
