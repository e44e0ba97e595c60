"""Keras 3 models under the torch backend: a `.keras` file gets the same logits and the same saliency
as the same weights in an equivalent PyTorch module (the R255 practical's CNN), NHWC is handled
inside the adapter, and a final softmax is switched to linear so heatlens explains logits."""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens.models.hooks import hook_count
from heatlens.models.keras import import_keras, is_keras_model

pytest.importorskip("keras")
keras = import_keras()

H, W, C, CLASSES = 28, 56, 3, 11


def build_r255_cnn(final_activation: str | None = "softmax", seed: int = 0):
    """The R255 practical's CNN: Conv2D(4, 3x3, relu) on (28,56,3), Flatten, Dense(64, relu), Dense(11)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((H, W, C)),
        keras.layers.Conv2D(4, (3, 3), strides=(1, 1), padding="valid", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(CLASSES, activation=final_activation),
    ])


def torch_twin(model) -> nn.Module:
    """The same network in PyTorch with the Keras weights copied over.

    Keras kernels are HWIO (conv) and (in, out) (dense); Keras flattens NHWC in (h, w, c) order,
    PyTorch flattens NCHW in (c, h, w) order, so the first dense kernel's rows are permuted.
    """
    conv, _, dense1, dense2 = model.layers
    oh, ow = H - 2, W - 2
    net = nn.Sequential(nn.Conv2d(C, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * oh * ow, 64), nn.ReLU(),
                        nn.Linear(64, CLASSES))

    def t(v) -> torch.Tensor:
        return torch.as_tensor(keras.ops.convert_to_numpy(v))

    with torch.no_grad():
        net[0].weight.copy_(t(conv.kernel).permute(3, 2, 0, 1))
        net[0].bias.copy_(t(conv.bias))
        k1 = t(dense1.kernel).reshape(oh, ow, 4, 64).permute(2, 0, 1, 3).reshape(-1, 64)
        net[3].weight.copy_(k1.T)
        net[3].bias.copy_(t(dense1.bias))
        net[5].weight.copy_(t(dense2.kernel).T)
        net[5].bias.copy_(t(dense2.bias))
    return net.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path of the saved softmax model, the in-memory model, its torch twin)."""
    model = build_r255_cnn("softmax")
    path = tmp_path_factory.mktemp("keras") / "m.keras"
    model.save(path)
    return path, model, torch_twin(model)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(4, C, H, W, generator=torch.Generator().manual_seed(0))


def test_loaded_keras_model_matches_its_torch_twin(saved, x):
    path, original, twin = saved
    clf = hl.load_model(path)
    assert clf.layout == "NHWC" and clf.input_size == (C, H, W) and clf.labels is None
    with torch.inference_mode():
        logits = clf(x)
        torch.testing.assert_close(logits, twin(x), atol=1e-5, rtol=1e-5)
        # the softmax was removed: the file's model gave softmax(logits)
        torch.testing.assert_close(logits.softmax(1), original(x.permute(0, 2, 3, 1)), atol=1e-6, rtol=1e-5)
    assert clf.softmax_removed == original.layers[-1].name
    assert not torch.allclose(logits.sum(1), torch.ones(len(x)))


def test_keras_saliency_equals_torch_saliency(saved, x):
    path, _, twin = saved
    clf = hl.load_model(path)
    target = [0, 3, 7, 10]
    ek = hl.explain(clf, x, "saliency", target=target)
    et = hl.explain(twin, x, "saliency", target=target)
    assert ek.attributions.shape == x.shape  # NCHW although the Keras model takes NHWC
    torch.testing.assert_close(ek.attributions, et.attributions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ek.outputs, et.outputs, atol=1e-5, rtol=1e-5)
    assert ek.targets.tolist() == target


def test_keras_model_explained_with_int_target_and_left_as_it_was(saved, x):
    path, _, twin = saved
    clf = hl.load_model(path)
    flags = [p.requires_grad for p in clf.parameters()]
    e = hl.explain(clf, x, "saliency", target=5)
    assert e.targets.tolist() == [5] * len(x)
    # independent check: the gradient of logit 5 w.r.t. the NCHW input, through the NHWC model
    xg = x.clone().requires_grad_(True)
    clf.net(xg.permute(0, 2, 3, 1))[:, 5].sum().backward()
    torch.testing.assert_close(e.attributions, xg.grad, atol=1e-6, rtol=1e-5)
    assert [p.requires_grad for p in clf.parameters()] == flags and hook_count(clf) == 0
    with pytest.raises(ValueError, match=re.escape(
            "target='tabby' is a class name but the model has no class labels; pass an int")):
        hl.explain(clf, x, "saliency", target="tabby")


def test_wrap_in_memory_keras_model(saved, x):
    _, original, twin = saved
    assert is_keras_model(original) and not is_keras_model(twin)
    with pytest.raises(ValueError, match=re.escape(
            "model returns probabilities (non-negative rows summing to 1), not logits")):
        hl.wrap(original)
    probs = hl.wrap(original, outputs="probabilities")
    assert probs.input_size == (C, H, W) and probs.layout == "NHWC"
    linear = build_r255_cnn(None)
    clf = hl.wrap(linear, labels=[f"class {i}" for i in range(CLASSES)])
    with torch.inference_mode():
        torch.testing.assert_close(probs(x).softmax(1), twin(x).softmax(1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(clf(x), torch_twin(linear)(x), atol=1e-5, rtol=1e-5)
    reference = hl.explain(torch_twin(linear), x, "saliency", target=2).attributions
    e = hl.explain(clf, x, "saliency", target="class 2")
    torch.testing.assert_close(e.attributions, reference, atol=1e-5, rtol=1e-5)
    # a bare Keras model given straight to explain is wrapped from x's (N,C,H,W) shape
    bare = hl.explain(linear, x, "saliency", target=2)
    torch.testing.assert_close(bare.attributions, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=re.escape("input_size (3, 28, 28) does not match the model's input shape")):
        hl.wrap(linear, input_size=(3, 28, 28))


def test_softmax_layer_at_the_end_is_removed_on_load(tmp_path, x):
    keras.utils.set_random_seed(1)
    inp = keras.Input((H, W, C))
    hidden = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inp))
    out = keras.layers.Softmax(name="probs")(keras.layers.Dense(CLASSES)(hidden))
    model = keras.Model(inp, out)
    model.save(tmp_path / "f.keras")
    clf = hl.load_model(tmp_path / "f.keras")
    assert clf.softmax_removed == "probs"
    with torch.inference_mode():
        torch.testing.assert_close(clf(x).softmax(1), model(x.permute(0, 2, 3, 1)), atol=1e-6, rtol=1e-5)


def test_unreadable_keras_file_names_the_path(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=re.escape(f"model file {str(bad)!r} is not a readable Keras 3 model")):
        hl.load_model(bad)


def test_keras_imported_with_another_backend_is_refused(monkeypatch):
    fake = types.SimpleNamespace(__version__="3.9.0", backend=types.SimpleNamespace(backend=lambda: "jax"))
    monkeypatch.setitem(sys.modules, "keras", fake)
    with pytest.raises(RuntimeError, match=re.escape(
            "keras was already imported with the 'jax' backend, but heatlens runs Keras models on the 'torch' "
            "backend; set os.environ['KERAS_BACKEND'] = 'torch' before keras is first imported")):
        import_keras()
