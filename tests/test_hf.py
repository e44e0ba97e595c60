"""Hugging Face transformers image classifiers: wrapping, loading, token grids, transformer methods.

Every model is tiny and randomly initialised from a config (nothing is downloaded). References are
computed here from the formulas, through transformers' own ``output_attentions`` path (not the hooks
heatlens uses): rollout (Abnar & Zuidema), Chefer et al.'s relevance, HiResCAM on the patch tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import heatlens as hl
from heatlens.methods import METHODS
from heatlens.methods.cam import Layout, layout_of
from heatlens.methods.transformer import chefer_relevance, rollout
from heatlens.models.hooks import hook_count

transformers = pytest.importorskip("transformers")

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=4)


def _build(kind: str, seed: int = 0, **extra) -> torch.nn.Module:
    T = transformers
    torch.manual_seed(seed)
    cfg = {**TINY, **extra}
    if kind == "vit":
        net = T.ViTForImageClassification(T.ViTConfig(**cfg))
    elif kind == "deit":
        net = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**cfg))
    elif kind == "registers":
        cfg.pop("intermediate_size")
        net = T.Dinov2WithRegistersForImageClassification(
            T.Dinov2WithRegistersConfig(**cfg, mlp_ratio=2, num_register_tokens=4))
    elif kind == "swin":
        net = T.SwinForImageClassification(T.SwinConfig(
            image_size=extra.pop("image_size", 32), patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
            window_size=4, num_labels=4, **extra))
    else:
        raise KeyError(kind)
    return net.eval()


def _x(n: int = 3, size: int = 32, seed: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- wrapping and loading ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind, prefix", [("vit", 1), ("deit", 2), ("registers", 5), ("swin", 0)])
def test_wrap_reads_size_labels_and_prefix_tokens_from_the_config(kind, prefix):
    net = _build(kind)
    net.config.id2label = {i: f"class {i}" for i in range(4)}
    clf = hl.wrap(net)
    assert clf.input_size == (3, 32, 32) and clf.labels == ("class 0", "class 1", "class 2", "class 3")
    assert clf.token_prefix == prefix
    x = _x()
    with torch.no_grad():
        assert torch.equal(clf(x), net(pixel_values=x).logits)
    assert hl.explain(clf, x, "saliency", target="class 2").targets.tolist() == [2, 2, 2]


def test_wrap_refuses_a_model_that_is_not_an_image_classifier():
    T = transformers
    with pytest.raises(TypeError, match=r"heatlens.wrap takes transformers image classifiers "
                                        r"\(...ForImageClassification\), got ViTModel"):
        hl.wrap(T.ViTModel(T.ViTConfig(**{k: v for k, v in TINY.items() if k != "num_labels"})))


def _chelsea() -> np.ndarray:
    from skimage import data

    return data.chelsea()


@pytest.mark.parametrize("kind, processor", [
    ("vit", "ViTImageProcessorPil"),
    ("deit", "DeiTImageProcessorPil"),  # resize 40x40 bicubic, centre-crop 32x32
])
def test_load_model_reads_a_saved_folder_offline_with_its_processor(tmp_path, kind, processor):
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    net = _build(kind)
    if kind == "vit":
        proc = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    else:
        proc = DeiTImageProcessorPil(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32})
    assert type(proc).__name__ == processor
    net.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    clf = hl.load_model(str(tmp_path))
    image = _chelsea()
    ours = clf.preprocess(image)
    theirs = proc(image, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    # PIL vs torch antialiased resampling: same geometry and normalisation, rounding-level pixel differences
    assert float((ours - theirs).abs().mean()) < 0.02 / min(proc.image_std)
    with torch.no_grad():
        assert torch.allclose(clf(theirs), net(pixel_values=theirs).logits, atol=1e-5)
    assert clf.device.type == "cpu" and not clf.net.training


def test_preprocessing_from_a_processor_whose_size_does_not_match_is_refused():
    from heatlens.models.hf import processor_preprocessing

    with pytest.raises(ValueError, match="the image processor produces 48x48 images but the model takes 32x32"):
        processor_preprocessing({"size": {"height": 48, "width": 48}}, (3, 32, 32))
    short = processor_preprocessing({"size": {"shortest_edge": 32}, "crop_pct": 0.875, "resample": 3,
                                     "do_center_crop": True, "crop_size": {"height": 32, "width": 32}}, (3, 32, 32))
    assert short.resize == 36 and short.resample == "bicubic" and short.mean == (0.5, 0.5, 0.5)


# --- token grids for CAMs ---------------------------------------------------------------------------
def _manual_hirescam(net, clf, x, targets, layer_name):
    """HiResCAM (sum over channels of gradient x activation) on the patch tokens, prefix dropped by hand."""
    module = dict(net.named_modules())[layer_name]
    seen = {}
    handle = module.register_forward_hook(lambda _m, _i, out: seen.update(a=out[0] if isinstance(out, tuple) else out))
    try:
        logits = net(pixel_values=x).logits
    finally:
        handle.remove()
    acts = seen["a"]
    (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), acts)
    cam = (grads * acts).sum(-1)[:, clf.token_prefix:]
    return cam.reshape(x.shape[0], 1, 4, 4)


@pytest.mark.parametrize("kind, layer", [
    ("vit", "vit.layers.1.layernorm_before"),
    ("deit", "deit.layers.1.layernorm_before"),
    ("registers", "dinov2_with_registers.encoder.layer.1.norm1"),
])
def test_cams_drop_class_distillation_and_register_tokens(kind, layer):
    net = _build(kind)
    clf, x = hl.wrap(net), _x()
    targets = torch.tensor([0, 1, 3])
    e = hl.methods.hirescam(clf, x, targets, layer=layer, relu=False)
    assert e.attributions.shape == (3, 1, 4, 4)
    assert torch.allclose(e.attributions, _manual_hirescam(net, clf, x, targets, layer), atol=1e-5)


@pytest.mark.slow
def test_every_cam_finds_a_layer_on_each_transformer():
    for kind in ("vit", "deit", "registers", "swin"):
        clf = hl.wrap(_build(kind))
        e = hl.methods.gradcam(clf, _x(2))
        assert e.attributions.shape[-2:] == ((8, 8) if kind == "swin" else (4, 4)), kind
        assert float(e.attributions.abs().sum()) > 0, kind


@pytest.mark.parametrize("size", [32, 28])  # 28: a 14x14 map padded to whole 4x4 windows
def test_swin_windows_are_mapped_back_to_the_image(size):
    """The windowed attention output, laid out by heatlens, equals what Swin adds to its residual stream
    after undoing the windows, the cyclic shift (odd blocks) and the padding."""
    net = _build("swin", image_size=size)
    clf = hl.wrap(net)
    for stage, block in ((0, 0), (0, 1), (1, 1)):
        layer = net.swin.encoder.layers[stage].blocks[block]
        name = f"swin.encoder.layers.{stage}.blocks.{block}.attention"
        seen = {}
        h1 = layer.attention.register_forward_hook(lambda _m, _i, out: seen.update(win=out[0]))
        h2 = layer.drop_path.register_forward_pre_hook(lambda _m, inp: seen.update(merged=inp[0]))
        try:
            with torch.no_grad():
                net(pixel_values=_x(2, size))
        finally:
            h1.remove(), h2.remove()
        lay = layout_of(seen["win"], clf, name)
        h, w = layer.input_resolution
        assert lay.kind == "windows" and lay.grid == (h, w) and lay.shift == (2 if block == 1 and h > 4 else 0)
        expected = seen["merged"].reshape(2, h, w, -1).permute(0, 3, 1, 2)
        assert torch.equal(lay.to_map(seen["win"]), expected)
        channels = torch.tensor([3, -1])
        zeroed = lay.to_map(lay.zero_channel(seen["win"], channels))
        expected[0, 3] = 0
        assert torch.equal(zeroed, expected)


def test_cams_on_a_swin_windowed_layer_run_on_the_stage_grid():
    clf = hl.wrap(_build("swin"))
    e = hl.methods.ablationcam(clf, _x(2), layer="swin.encoder.layers.1.blocks.1.attention")
    assert e.attributions.shape == (2, 1, 8, 8)


# --- attention rollout and Chefer's relevance -------------------------------------------------------
def test_rollout_of_identity_attention_is_the_identity_and_its_map_uniform():
    eye = torch.eye(17).expand(2, 3, 17, 17)
    r = rollout([eye, eye, eye])
    assert torch.equal(r, torch.eye(17, dtype=torch.float64).expand(2, 17, 17))
    uniform = torch.full((2, 3, 17, 17), 1 / 17)
    # uniform attention mixed with the identity: every patch column of the class row gets the same share
    row = rollout([uniform, uniform])[:, 0, 1:]
    assert torch.allclose(row, row[:, :1].expand_as(row), atol=1e-15)


def test_rollout_on_a_vit_with_uniform_attention_is_uniform():
    net = _build("vit")
    with torch.no_grad():  # zero queries and keys: every attention row is uniform over the tokens
        for layer in net.vit.layers:
            for proj in (layer.attention.q_proj, layer.attention.k_proj):
                proj.weight.zero_(), proj.bias.zero_()
    a = hl.methods.attention_rollout(hl.wrap(net), _x()).attributions
    assert a.shape == (3, 1, 4, 4)
    # two layers of 0.5 * 1/17 + 0.5 * I: the class row's patch entries are 1/34 + 1/(2*17*2) each
    assert torch.allclose(a, torch.full_like(a, 0.5 / 17 + 0.25 / 17), atol=1e-6)


def _reference_attentions(net, x, targets=None):
    """Attention probabilities through transformers' own output_attentions (eager), with gradients."""
    with torch.enable_grad():
        net.set_attn_implementation("eager")
        try:
            xl = x.clone().requires_grad_(True)
            out = net(pixel_values=xl, output_attentions=True)
        finally:
            net.set_attn_implementation("sdpa")
        grads = None
        if targets is not None:
            grads = torch.autograd.grad(out.logits.gather(1, targets[:, None]).sum(), list(out.attentions))
    return [a.detach() for a in out.attentions], grads


@pytest.mark.parametrize("head_fusion, discard_ratio", [("mean", 0.0), ("max", 0.5), ("min", 0.2)])
def test_rollout_matches_the_formula_on_a_tiny_vit(head_fusion, discard_ratio):
    net = _build("vit", num_hidden_layers=3)
    x = _x()
    attentions, _ = _reference_attentions(net, x)
    expected = torch.eye(17, dtype=torch.float64).expand(3, 17, 17)
    for a in attentions:  # Abnar & Zuidema: A' = 0.5 A + 0.5 I, rows renormalised, multiplied up the layers
        fused = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[head_fusion].double()
        flat = fused.reshape(3, -1).clone()
        k = int(flat.shape[1] * discard_ratio)
        for i in range(3):
            flat[i, flat[i].argsort()[:k]] = 0
        mixed = 0.5 * flat.reshape(3, 17, 17) + 0.5 * torch.eye(17, dtype=torch.float64)
        expected = (mixed / mixed.sum(-1, keepdim=True)) @ expected
    e = hl.methods.attention_rollout(hl.wrap(net), x, head_fusion=head_fusion, discard_ratio=discard_ratio)
    assert e.attributions.shape == (3, 1, 4, 4)
    assert torch.allclose(e.attributions.double(), expected[:, 0, 1:].reshape(3, 1, 4, 4), atol=1e-6)
    assert torch.allclose(e.extras["tokens"], expected[:, 0], atol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "deit", "registers"])
def test_chefer_relevance_matches_the_formula_on_a_tiny_transformer(kind):
    net = _build(kind, num_hidden_layers=3)
    clf, x = hl.wrap(net), _x()
    targets = torch.tensor([2, 0, 3])
    attentions, grads = _reference_attentions(net, x, targets)
    t = attentions[0].shape[-1]
    r = torch.eye(t, dtype=torch.float64).repeat(3, 1, 1)
    for a, g in zip(attentions, grads):  # Chefer et al.: R <- R + E_h[(grad * A)^+] R, R starting at I
        r = r + (g * a).clamp(min=0).mean(1).double() @ r
    e = hl.methods.attention_relevance(clf, x, targets)
    assert e.attributions.shape == (3, 1, 4, 4)
    expected = r[:, 0, clf.token_prefix:].reshape(3, 1, 4, 4)
    assert torch.allclose(e.attributions.double(), expected, rtol=1e-5, atol=1e-7)
    assert float(e.attributions.abs().max()) > 0
    # the pure function agrees with the method given the same tensors
    assert torch.allclose(chefer_relevance(attentions, grads), r)


def test_chefer_relevance_depends_on_the_class_and_rollout_does_not():
    clf, x = hl.wrap(_build("vit")), _x(2)
    a0 = hl.methods.attention_relevance(clf, x, 0).attributions
    a1 = hl.methods.attention_relevance(clf, x, 1).attributions
    assert not torch.allclose(a0, a1)
    assert torch.equal(hl.methods.attention_rollout(clf, x, 0).attributions,
                       hl.methods.attention_rollout(clf, x, 1).attributions)


def test_transformer_methods_leave_an_sdpa_model_as_it_was():
    net = _build("vit").train()
    assert net.config._attn_implementation == "sdpa"
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for name in ("attention_rollout", "attention_relevance", "legrad"):
        hl.explain(hl.wrap(net), _x(2), name)
    assert net.config._attn_implementation == "sdpa" and net.training and hook_count(net) == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("name", ["attention_rollout", "attention_relevance", "legrad"])
def test_transformer_methods_refuse_models_without_global_attention(name):
    with pytest.raises(TypeError, match="Swin's windowed attention is not one\\): use a CAM method such as gradcam"):
        hl.explain(hl.wrap(_build("swin")), _x(2), name)
    with pytest.raises(TypeError, match="Sequential has no global self-attention layer"):
        hl.explain(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)), _x(2, 4), name)


def test_bad_rollout_options_are_refused_by_name():
    clf = hl.wrap(_build("vit"))
    with pytest.raises(ValueError, match="head_fusion"):
        hl.methods.attention_rollout(clf, _x(1), head_fusion="median")
    with pytest.raises(ValueError, match=r"discard_ratio must be a number in \[0, 1\), got 1.0"):
        hl.methods.attention_rollout(clf, _x(1), discard_ratio=1.0)


def test_batched_like_rows_one_by_one():
    clf, x = hl.wrap(_build("deit")), _x(3)
    for name in ("attention_rollout", "attention_relevance", "legrad"):
        together = hl.explain(clf, x, name, target=1, batch_size=3).attributions
        alone = torch.cat([hl.explain(clf, x[i:i + 1], name, target=1).attributions for i in range(3)])
        assert torch.allclose(together, alone, atol=1e-6)


# --- the model-zoo contract on transformers: every method, metric and sanity check ------------------
from test_contracts import _kwargs  # noqa: E402  (the same fast settings as the CNN contract)

ZOO = ("vit", "deit", "swin")
METRIC_ZOO = ("deit", "swin")  # the ViT is DeiT without its distillation token
_MODELS: dict = {}


def _zoo(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = hl.wrap(_build(kind))
    return _MODELS[kind]


def _refuses(kind: str, name: str) -> bool:
    return kind == "swin" and METHODS.get(name).meta.get("family") == "transformer"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ZOO)
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_runs_on_the_transformer_and_leaves_it_as_it_was(kind, name):
    clf, x = _zoo(kind), _x(2)
    clf.net.train()  # a model left in train mode must come back in train mode
    before = {k: v.clone() for k, v in clf.net.state_dict().items()}
    try:
        if _refuses(kind, name):
            with pytest.raises(TypeError, match="no global self-attention layer"):
                hl.explain(clf, x, name, **_kwargs(name, x))
            return
        e = hl.explain(clf, x, name, **_kwargs(name, x))
    finally:
        training = clf.net.training and all(m.training for m in clf.net.modules())
        clf.net.eval()
    assert training and hook_count(clf) == 0 and clf.net.config._attn_implementation == "sdpa"
    assert all(torch.equal(before[k], v) for k, v in clf.net.state_dict().items())
    a = e.attributions
    assert a.shape[0] == 2 and (a.shape[1:] == x.shape[1:] or a.shape[1] == 1) and bool(torch.isfinite(a).all())
    assert e.maps().shape == (2, 32, 32)
    with torch.no_grad():
        assert torch.equal(e.targets, clf(x).argmax(1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", METRIC_ZOO)
def test_every_metric_scores_a_transformer_explanation(kind):
    from heatlens.metrics import METRICS

    clf, x = _zoo(kind), _x(2)
    e = hl.methods.integrated_gradients(clf, x, steps=8)  # input-shaped, so completeness applies too
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[:, 8:20, 8:20] = True
    options = {"mask": mask, "steps": 8, "n_samples": 4, "n_perturbations": 4}
    results = hl.evaluate(clf, x, e, METRICS.names(), **options)
    assert set(results) == set(METRICS.names())
    for name, r in results.items():
        assert r.values.shape == (2,) and bool(torch.isfinite(torch.as_tensor(r.values)).all()), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ZOO)
@pytest.mark.parametrize("method", ["saliency", "gradcam", "attention_rollout", "attention_relevance"])
def test_every_sanity_check_runs_on_a_transformer(kind, method):
    from heatlens.sanity import CHECKS

    if _refuses(kind, method):
        pytest.skip("Swin has no global attention (refusal tested above)")
    clf, x = _zoo(kind), _x(2)
    settings = {"model_randomization": {"layers": [_top_block(kind)], "similarity": "spearman"},
                "random_logit": {"similarity": "spearman"}, "fragility": {"n_trials": 2}, "input_invariance": {}}
    for check in CHECKS.names():
        result = CHECKS.get(check).fn(clf, x, method, **settings.get(check, {}))
        assert isinstance(result.passed, bool) and result.table, check
    assert hook_count(clf) == 0


def _top_block(kind: str) -> str:
    return {"vit": "vit.layers.1", "deit": "deit.layers.1", "swin": "swin.encoder.layers.1"}[kind]


# --- a ViT trained on the marker shortcut: the debugging story on a transformer -------------------
@pytest.mark.slow
def test_the_story_finds_the_marker_shortcut_in_a_trained_vit():
    from heatlens import debug
    from heatlens.sanity import model_randomization, random_logit

    train = debug.digit_sum_dataset("train", shortcut="marker", n=3000)
    test = debug.digit_sum_dataset("test", shortcut="marker", n=600)
    run = debug.train_classifier("tiny_vit", train, epochs=16, lr=3e-3, test=test, progress=False)
    assert run.train_acc > 0.85 and run.test_acc < 0.3  # it learnt the shortcut, not the sums (99.8% / 14.7% in the docs run)
    assert type(run.model.net).__name__ == "ViTForImageClassification" and run.model.labels[10] == "10"
    report = debug.detect_shortcut(run.model, train, test, methods=["attention_rollout", "attention_relevance"],
                                   n_images=8)
    assert report.detected and report.behaviour["follow_rate"] > 0.6 and not report.skipped
    x = train.x[:8]
    # rollout is class-agnostic by construction: a random other class gets the very same map
    assert random_logit(run.model, x, "attention_rollout", similarity="spearman").table[0]["spearman"] == pytest.approx(1.0)
    assert model_randomization(run.model, x, "attention_relevance", similarity="spearman").passed


def test_legrad_matches_the_formula_on_a_tiny_vit():
    """LeGrad: the head (final norm + classifier on the class token) applied to each of the last two
    layers' tokens; positive gradients w.r.t. that layer's attention, averaged over heads and queries."""
    net = _build("vit", num_hidden_layers=3)
    clf, x, targets = hl.wrap(net), _x(), torch.tensor([1, 3, 0])
    net.set_attn_implementation("eager")
    try:
        out = net(pixel_values=x.clone().requires_grad_(True), output_attentions=True, output_hidden_states=True)
    finally:
        net.set_attn_implementation("sdpa")
    offset = len(out.hidden_states) - 3  # the embeddings come first
    total = torch.zeros(3, 17, dtype=torch.float64)
    for layer in (1, 2):
        head = net.classifier(net.vit.layernorm(out.hidden_states[layer + offset])[:, 0])
        (grad,) = torch.autograd.grad(head.gather(1, targets[:, None]).sum(), out.attentions[layer], retain_graph=True)
        total += grad.clamp(min=0).mean((1, 2)).double()
    e = hl.methods.legrad(clf, x, targets)
    assert e.attributions.shape == (3, 1, 4, 4) and float(e.attributions.max()) > 0
    assert torch.allclose(e.attributions.double(), total[:, 1:].reshape(3, 1, 4, 4), rtol=1e-5, atol=1e-9)
    # all layers, and the last layer only: the sum grows with the layers it covers
    every = hl.methods.legrad(clf, x, targets, layer_index=0).attributions
    assert bool((every >= e.attributions - 1e-9).all())
    with pytest.raises(ValueError, match=r"layer_index must be an int in \[-3, 3\), got 3"):
        hl.methods.legrad(clf, x, targets, layer_index=3)
