"""CAM family: reference agreement (Captum, independent reimplementations), localisation on a real
photo, automatic layers on CNN / efficientnet / ViT / Keras, and hooks removed on every path."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import heatlens as hl
from heatlens.methods import METHODS
from heatlens.methods.cam import token_grid
from heatlens.models.hooks import hook_count

CAMS = ["gradcam", "gradcam_pp", "xgradcam", "hirescam", "layercam", "scorecam", "ablationcam", "eigencam"]


# --- models built here ------------------------------------------------------------------------------
def strided_cnn(seed: int = 0) -> nn.Module:
    """conv(stride 2) -> relu1 (6,8,8) -> conv2 -> relu2 (8,8,8) -> pool -> fc (5): maps need upsampling,
    and gradients at relu1 vary over space (conv2 follows), so the variants really differ there."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 6, 3, stride=2, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(6, 8, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(8, 5)),
    ]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.eval()


class TinyViT(nn.Module):
    """Patch embedding conv (4x4 patches), class token, positional embedding, two encoder blocks, head
    on the class token. Input (3,16,24) -> a 4x6 patch grid, 25 tokens."""

    def __init__(self, dim: int = 16, classes: int = 4, norm_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 25, dim) * 0.1)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
            for _ in range(2)
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.eval()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for block in self.blocks:
            t = block(t)
        return self.head(self.norm(t)[:, 0])


@pytest.fixture
def cnn() -> nn.Module:
    return strided_cnn()


@pytest.fixture
def x16() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))


# --- independent references -------------------------------------------------------------------------
def split_forward(net: nn.Sequential, x: torch.Tensor, cut: int, targets: torch.Tensor):
    """Activations after net[:cut] (N,K,h,w), d logit_target / d activations, and logits, by hand."""
    acts = net[:cut](x).detach().requires_grad_(True)
    logits = net[cut:](acts)
    (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), acts)
    return acts.detach().numpy().astype(np.float64), grads.numpy().astype(np.float64), logits.detach()


def np_gradcam_pp(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    s = a.sum((2, 3), keepdims=True)
    den = 2 * g**2 + s * g**3
    alpha = np.where(den != 0, g**2 / np.where(den != 0, den, 1), 0)
    w = (alpha * np.maximum(g, 0)).sum((2, 3), keepdims=True)
    return (w * a).sum(1, keepdims=True)


def np_xgradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    s = a.sum((2, 3), keepdims=True)
    w = np.where(s != 0, (a * g).sum((2, 3), keepdims=True) / np.where(s != 0, s, 1), 0)
    return (w * a).sum(1, keepdims=True)


def relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0)


# --- agreement ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["relu1", "conv2", "relu2"])
@pytest.mark.parametrize("use_relu", [True, False])
def test_gradcam_equals_captum_layergradcam(cnn, x16, layer, use_relu):
    from captum.attr import LayerAttribution, LayerGradCam

    targets = torch.tensor([0, 3, 1])
    e = hl.methods.gradcam(cnn, x16, targets, layer=layer, relu=use_relu)
    ref = LayerGradCam(cnn, getattr(cnn, layer)).attribute(x16, target=targets, relu_attributions=use_relu)
    assert torch.allclose(e.attributions, ref, atol=1e-5)
    up = LayerAttribution.interpolate(ref, (16, 16), interpolate_mode="bilinear")[:, 0]
    assert torch.allclose(e.maps("none"), up, atol=1e-5)
    assert e.params["layer"] == layer


@pytest.mark.slow
def test_gradcam_equals_captum_on_efficientnet(effnet, photos):
    from captum.attr import LayerAttribution, LayerGradCam

    x = effnet.preprocess(photos[:2])
    e = hl.methods.gradcam(effnet, x)  # automatic layer
    assert e.params["layer"] == "_act_head"  # the last conv feature map (1280, 7, 7), before pooling
    ref = LayerGradCam(effnet, effnet.net._act_head).attribute(x, target=e.targets, relu_attributions=True)
    scale = float(ref.detach().abs().max())
    assert e.attributions.shape == (2, 1, 7, 7)
    assert torch.allclose(e.attributions, ref, atol=1e-5 * scale)
    up = LayerAttribution.interpolate(ref, (224, 224), interpolate_mode="bilinear")[:, 0]
    assert torch.allclose(e.maps("none"), up, atol=1e-5 * scale)


def test_hirescam_is_elementwise_gradient_times_activation(cnn, x16):
    targets = torch.tensor([2, 2, 4])
    a, g, _ = split_forward(cnn, x16, 2, targets)  # at relu1, gradients vary over space
    e = hl.methods.hirescam(cnn, x16, targets, layer="relu1", relu=False)
    np.testing.assert_allclose(e.attributions.numpy(), (g * a).sum(1, keepdims=True), atol=1e-6)
    # and it is not Grad-CAM there (the averaging of gradients matters)
    assert not torch.allclose(e.attributions, hl.methods.gradcam(cnn, x16, targets, layer="relu1", relu=False).attributions)


@pytest.mark.parametrize("name, formula", [
    ("gradcam_pp", np_gradcam_pp),
    ("xgradcam", np_xgradcam),
    ("layercam", lambda a, g: (np.maximum(g, 0) * a).sum(1, keepdims=True)),
    ("gradcam", lambda a, g: (g.mean((2, 3), keepdims=True) * a).sum(1, keepdims=True)),
])
def test_gradient_variants_match_their_formulas(cnn, x16, name, formula):
    targets = torch.tensor([1, 0, 3])
    a, g, _ = split_forward(cnn, x16, 2, targets)
    e = hl.explain(cnn, x16, name, targets, layer="relu1")
    np.testing.assert_allclose(e.attributions.numpy(), relu(formula(a, g)), rtol=1e-4, atol=1e-6)


def test_scorecam_equals_a_per_channel_loop(cnn, x16):
    targets = torch.tensor([0, 1, 2])
    e = hl.methods.scorecam(cnn, x16, targets, layer="relu1", batch_size=5)
    acts = cnn[:2](x16).detach()
    cams = []
    for i in range(3):
        total = torch.zeros(8, 8)
        for k in range(acts.shape[1]):
            up = F.interpolate(acts[i : i + 1, k : k + 1], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
            if up.max() == up.min():
                continue  # the authors' code skips channels with no mask to draw
            mask = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                score = cnn(x16[i : i + 1] * mask).softmax(1)[0, targets[i]]
            total += score * acts[i, k]
        cams.append(total.clamp_min(0))
    assert torch.allclose(e.attributions[:, 0], torch.stack(cams), atol=1e-5)
    assert e.params["output"] == "probability"


def test_ablationcam_equals_a_per_channel_loop(cnn, x16):
    targets = torch.tensor([4, 1, 0])
    e = hl.methods.ablationcam(cnn, x16, targets, layer="relu1", relu=False, batch_size=4)
    acts = cnn[:2](x16).detach()
    with torch.no_grad():
        y = cnn[2:](acts).gather(1, targets[:, None])[:, 0]
        weights = torch.zeros(3, acts.shape[1])
        for k in range(acts.shape[1]):
            ablated = acts.clone()
            ablated[:, k] = 0
            weights[:, k] = (y - cnn[2:](ablated).gather(1, targets[:, None])[:, 0]) / y
    assert torch.allclose(e.extras["channel_weights"], weights, atol=1e-5)
    assert torch.allclose(e.attributions, (weights[..., None, None] * acts).sum(1, keepdim=True), atol=1e-5)


def test_eigencam_is_the_first_principal_component_with_a_fixed_sign(cnn, x16):
    e = hl.methods.eigencam(cnn, x16, layer="relu1", relu=False)
    acts = cnn[:2](x16).detach().double()
    for i in range(3):
        m = acts[i].reshape(acts.shape[1], -1).T.numpy()  # (h*w, K)
        m = m - m.mean(0)
        _, _, vt = np.linalg.svd(m, full_matrices=False)
        proj = m @ vt[0]
        got = e.attributions[i, 0].reshape(-1).double().numpy()
        assert np.allclose(np.abs(got @ proj), proj @ proj, rtol=1e-4)  # the same component, up to sign
        assert got @ m.sum(1) > 0  # sign: correlates positively with the summed activations
    # class-agnostic: the target does not change it
    assert torch.equal(e.attributions, hl.methods.eigencam(cnn, x16, 3, layer="relu1", relu=False).attributions)


def test_guided_gradcam_equals_captum(cnn, x16):
    if "guided_backprop" not in METHODS:
        pytest.skip("guided_backprop (methods/propagation.py) is not registered yet")
    from captum.attr import GuidedGradCam

    targets = torch.tensor([1, 2, 3])
    e = hl.methods.guided_gradcam(cnn, x16, targets, layer="relu1")  # 8x8 CAM upsampled to 16x16
    ref = GuidedGradCam(cnn, cnn.relu1).attribute(x16, target=targets, interpolate_mode="bilinear")
    assert torch.allclose(e.attributions, ref, atol=1e-6)
    # Captum's default upsampling is nearest; heatlens follows the paper (bilinear) unless asked
    nearest = hl.methods.guided_gradcam(cnn, x16, targets, layer="relu1", interpolation="nearest")
    assert torch.allclose(nearest.attributions, GuidedGradCam(cnn, cnn.relu1).attribute(x16, target=targets), atol=1e-6)
    assert not torch.allclose(nearest.attributions, e.attributions, atol=1e-3)
    assert nearest.params["interpolation"] == "nearest" and e.params["interpolation"] == "bilinear"
    with pytest.raises(ValueError, match="interpolation must be one of 'bilinear', 'nearest', got 'bicubic'"):
        hl.methods.guided_gradcam(cnn, x16, targets, layer="relu1", interpolation="bicubic")


# --- what a user sees -------------------------------------------------------------------------------
def _cat_box_mass(cam: torch.Tensor, rows: slice, cols: slice) -> tuple[tuple[int, int], float]:
    """(peak row, col) and the mean of the map inside the box over the mean outside it."""
    peak = divmod(int(cam.argmax()), cam.shape[1])
    inside = torch.zeros_like(cam, dtype=torch.bool)
    inside[rows, cols] = True
    return peak, float(cam[inside].mean() / cam[~inside].mean())


@pytest.mark.slow
def test_gradcam_peak_lies_on_the_cat(effnet, chelsea_x):
    from skimage import data, transform

    # chelsea as the model sees it: the face fills the centre, background only at the right edge and top
    e = hl.methods.gradcam(effnet, chelsea_x)
    assert "cat" in e.target_names()[0]
    (r, c), ratio = _cat_box_mass(e.maps()[0], slice(56, 200), slice(24, 190))  # eyes to chin, model coords
    assert 56 <= r < 200 and 24 <= c < 190 and ratio > 2
    # the same cat shrunk onto grass in the bottom-left quarter: the map follows it
    cat = transform.resize(effnet.deprocess(chelsea_x)[0], (112, 112), anti_aliasing=True)
    canvas = np.repeat(data.grass()[:224, :224, None] / 255.0, 3, axis=2)
    canvas[100:212, 12:124] = cat
    e = hl.methods.gradcam(effnet, effnet.preprocess(torch.tensor(canvas).permute(2, 0, 1)[None].float()))
    (r, c), ratio = _cat_box_mass(e.maps()[0], slice(100, 212), slice(12, 124))
    assert 100 <= r < 212 and 12 <= c < 124 and ratio > 3


def test_two_targets_give_different_maps_and_relu_false_keeps_the_sign(cnn, x16):
    a = hl.methods.gradcam(cnn, x16, 0, layer="relu1", relu=False).attributions
    b = hl.methods.gradcam(cnn, x16, 1, layer="relu1", relu=False).attributions
    assert (a - b).abs().amax() > 0.1 * a.abs().amax()
    assert a.min() < 0 and b.min() < 0  # signed maps keep their negative evidence
    assert torch.equal(hl.methods.gradcam(cnn, x16, 0, layer="relu1").attributions, a.clamp_min(0))


def test_targets_are_per_image(cnn, x16):
    together = hl.methods.layercam(cnn, x16, [3, 0, 2], layer="relu1").attributions
    alone = torch.cat([hl.methods.layercam(cnn, x16[i : i + 1], t, layer="relu1").attributions
                       for i, t in enumerate([3, 0, 2])])
    assert torch.allclose(together, alone, atol=1e-6)


def test_gradient_free_cams_run_without_gradients_through_the_engine(cnn, x16):
    seen = []
    clf = hl.wrap(cnn, input_size=(3, 16, 16))
    handle = cnn.register_forward_pre_hook(lambda _m, inp: seen.append((len(inp[0]), torch.is_inference_mode_enabled())))
    try:
        hl.methods.scorecam(clf, x16, layer="relu1", batch_size=5)
    finally:
        handle.remove()
    rows = [n for n, _ in seen]
    assert all(inference for _, inference in seen)
    # prepare (3 rows), activations (3), then 3 images x 6 channels masked, 5 per model call
    assert sum(rows) == 3 + 3 + 18 and rows[-4:] == [5, 5, 5, 3]


# --- layers ------------------------------------------------------------------------------------------
def test_auto_layer_on_the_tiny_cnn_is_its_last_conv_block(tiny_cnn, tiny_x):
    e = hl.methods.gradcam(tiny_cnn, tiny_x)
    assert e.params["layer"] == "relu2"  # conv2 + ReLU, the map global pooling reads
    assert torch.equal(e.attributions, hl.methods.gradcam(tiny_cnn, tiny_x, layer=tiny_cnn.relu2).attributions)


def test_unknown_layer_lists_close_names(tiny_cnn, tiny_x):
    with pytest.raises(ValueError, match=r"unknown layer 'conv3'\. Did you mean: 'conv2', 'conv1'"):
        hl.methods.gradcam(tiny_cnn, tiny_x, layer="conv3")
    with pytest.raises(ValueError, match=r"layer 'fc' outputs a tensor of shape \(4, 5\), which is not a spatial"):
        hl.methods.scorecam(tiny_cnn, tiny_x, layer="fc")


def test_token_grid_drops_the_class_token_and_follows_the_aspect():
    assert token_grid(197, (224, 224)) == (1, (14, 14))
    assert token_grid(196, (224, 224)) == (0, (14, 14))
    assert token_grid(900, (480, 480)) == (0, (30, 30))  # 899 = 29 x 31 is close, but 30 x 30 is exact
    assert token_grid(1 + 12 * 18, (200, 300)) == (1, (12, 18))
    assert token_grid(198, (224, 224)) == (2, (14, 14))  # class + distillation tokens (DeiT)
    assert token_grid(7, (16, 16)) is None


def _manual_vit_gradcam(vit: TinyViT, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM at the last block's norm1 (pre-norm), written out by hand: reshape (N,24,D) -> (N,D,4,6)."""
    block = vit.blocks[1]
    with torch.no_grad():
        t = vit.blocks[0](vit.tokens(x))
    a = block.norm1(t).detach().requires_grad_(True)
    h = t + block.self_attn(a, a, a, need_weights=False)[0]
    h = h + block.linear2(F.relu(block.linear1(block.norm2(h))))
    logits = vit.head(vit.norm(h)[:, 0])
    (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), a)
    grid = lambda t: t[:, 1:].reshape(len(t), 4, 6, -1).permute(0, 3, 1, 2)  # noqa: E731
    return (grid(g).mean((2, 3), keepdim=True) * grid(a.detach())).sum(1, keepdim=True).clamp_min(0)


def test_vit_tokens_are_reshaped_and_gradcam_matches_a_manual_computation():
    vit = TinyViT()
    x = torch.randn(3, 3, 16, 24, generator=torch.Generator().manual_seed(6))
    targets = torch.tensor([0, 1, 3])
    e = hl.methods.gradcam(vit, x, targets)
    assert e.params["layer"] == "blocks.1.norm1"  # in the last block: the tokens the class token still reads
    assert e.attributions.shape == (3, 1, 4, 6)  # 24 patch tokens on the input's 4 x 6 grid, class token dropped
    ref = _manual_vit_gradcam(vit, x, targets)
    assert ref.abs().amax() > 0 and torch.allclose(e.attributions, ref, atol=1e-5)
    assert hook_count(vit) == 0 and torch.backends.mha.get_fastpath_enabled()


def test_vit_auto_layer_skips_tokens_that_no_longer_reach_the_class_token():
    vit = TinyViT(norm_first=False)  # post-norm: nothing in the last block feeds the class token from patches
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(7))
    assert hl.methods.gradcam(vit, x).params["layer"] == "blocks.0"
    assert float(hl.methods.gradcam(vit, x, layer="blocks.1", relu=False).attributions.abs().max()) == 0.0


# --- Keras 3 (torch backend) -----------------------------------------------------------------------------
def _keras_cnn():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported with another backend than torch")
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(h)
    out = keras.layers.Dense(3, name="fc")(keras.layers.GlobalAveragePooling2D(name="gap")(h))
    return keras, keras.Model(inp, out)


def _keras_manual_gradcam(keras, model, layer: str, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    sub = keras.Model(model.inputs, [model.get_layer(layer).output, model.outputs[0]])
    xh = x.permute(0, 2, 3, 1).clone().requires_grad_(True)  # Keras takes NHWC
    acts, logits = sub(xh)
    (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), acts)
    a, g = acts.detach().permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    return (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp_min(0)


def test_keras_model_gradcam_matches_a_manual_computation():
    keras, model = _keras_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    clf = hl.wrap(model)
    targets = torch.tensor([0, 2])
    e = hl.methods.gradcam(clf, x, targets)
    assert e.params["layer"] == "c2" and e.attributions.shape == (2, 1, 8, 8)
    assert torch.allclose(e.attributions, _keras_manual_gradcam(keras, model, "c2", x, targets), atol=1e-5)
    e1 = hl.methods.gradcam(clf, x, targets, layer="c1")
    assert torch.allclose(e1.attributions, _keras_manual_gradcam(keras, model, "c1", x, targets), atol=1e-5)
    assert hook_count(model) == 0 and all(hook_count(layer) == 0 for layer in model.layers)


def test_keras_file_loaded_by_load_model(tmp_path):
    keras, model = _keras_cnn()
    try:
        from heatlens.models import keras as _loader  # noqa: F401
    except ImportError:
        pytest.skip("heatlens.models.keras (the Keras loader) is not there yet")
    path = tmp_path / "cnn.keras"
    model.save(path)
    clf = hl.load_model(str(path))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    e = hl.methods.gradcam(clf, x, [1, 2])
    reference = hl.methods.gradcam(hl.wrap(model), x, [1, 2])
    assert e.params["layer"] == "c2" and torch.allclose(e.attributions, reference.attributions, atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown layer 'c3'\. Did you mean: 'fc', 'c2', 'c1'"):
        hl.methods.gradcam(clf, x, layer="c3")


# --- hooks and model state ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", CAMS + ["guided_gradcam"])
def test_hooks_are_removed_after_every_call_and_on_error(cnn, x16, name):
    if name == "guided_gradcam" and "guided_backprop" not in METHODS:
        pytest.skip("guided_backprop is not registered yet")
    hl.explain(cnn, x16, name)
    hl.explain(cnn, x16, name, layer="relu1")
    assert hook_count(cnn) == 0
    with pytest.raises(ValueError, match="not a spatial feature map"):
        hl.explain(cnn, x16, name, layer="flatten")
    assert hook_count(cnn) == 0
    calls = {"n": 0}

    def explode(_module, _inp, out):  # fail on a forward inside the method, after target resolution
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("boom")
        return out

    handle = cnn.fc.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        hl.explain(cnn, x16, name, layer="relu1", batch_size=1)
    handle.remove()
    assert hook_count(cnn) == 0 and torch.backends.mha.get_fastpath_enabled()
    assert all(p.requires_grad for p in cnn.parameters())


def test_black_box_models_are_refused(x16):
    clf = hl.wrap(lambda a: np.ones((len(a), 3)) / 3, input_size=(3, 16, 16))
    with pytest.raises(TypeError, match="CAM methods hook a layer, but model is a black-box predict function"):
        hl.methods.scorecam(clf, x16)
    with pytest.raises(TypeError, match="method 'gradcam' needs gradients"):
        hl.methods.gradcam(clf, x16)


def test_relu_must_be_a_bool(cnn, x16):
    with pytest.raises(TypeError, match="relu must be True or False, got 'yes'"):
        hl.methods.gradcam(cnn, x16, relu="yes")
