"""The GPU path: every registered method gives the CPU's attributions on CUDA, seeded methods included.

Skipped without a CUDA device (CI has none); run on the lent GPU machine. Noise, masks and random
starts are drawn on the CPU and moved, so a seed means the same samples on either device; what
remains is floating-point order and cuDNN's TF32 convolutions (on by default in PyTorch), hence the
tolerances below, which are relative to the largest attribution.
"""

from __future__ import annotations

import pytest
import torch

import heatlens as hl
from heatlens.methods.registry import METHODS

from conftest import make_tiny_cnn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Methods whose output passes through a fit or an optimisation: small logit differences move them
# slightly more than a straight gradient or forward.
LOOSER = {"lime": 5e-2, "kernel_shap": 5e-2, "extremal_perturbation": 5e-2, "rise": 1e-2}
OPTIONS = {
    "smoothgrad": {"n_samples": 4, "seed": 0}, "smoothgrad_sq": {"n_samples": 4, "seed": 0},
    "vargrad": {"n_samples": 4, "seed": 0}, "integrated_gradients": {"steps": 16},
    "expected_gradients": {"n_samples": 8, "seed": 0}, "gradient_shap": {"n_samples": 8, "seed": 0},
    "rise": {"n_masks": 64, "seed": 0}, "lime": {"num_samples": 64, "seed": 0},
    "kernel_shap": {"n_samples": 64, "seed": 0}, "occlusion": {"window": 4, "stride": 4},
    "extremal_perturbation": {"steps": 20},
}


@pytest.fixture(scope="module")
def gpu_effnet():
    return hl.load_model("efficientnet-lite0", device="cuda")


def _relative_gap(cpu: torch.Tensor, gpu: torch.Tensor) -> float:
    gpu = gpu.detach().cpu().float()
    return float((cpu - gpu).abs().max() / cpu.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("method", METHODS.names())
def test_each_method_agrees_between_cpu_and_cuda(method):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    options = OPTIONS.get(method, {})
    on_cpu = hl.explain(hl.wrap(make_tiny_cnn(), input_size=(3, 16, 16)), x, method, target=[0, 3], **options)
    on_gpu = hl.explain(hl.wrap(make_tiny_cnn().cuda(), input_size=(3, 16, 16)), x.cuda(), method, target=[0, 3], **options)
    assert on_gpu.attributions.device.type == "cuda"
    assert _relative_gap(on_cpu.attributions.detach(), on_gpu.attributions) < LOOSER.get(method, 2e-3)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gradcam", "occlusion", "lime"])
def test_efficientnet_on_cuda_matches_cpu(method, effnet, gpu_effnet, photos):
    options = {"integrated_gradients": {"steps": 32, "baseline": "blur"}, "occlusion": {"window": 32, "stride": 32},
               "lime": {"num_samples": 200, "seed": 0}}.get(method, {})
    x = effnet.preprocess(photos[0])
    on_cpu = hl.explain(effnet, x, method, **options)
    on_gpu = hl.explain(gpu_effnet, x.cuda(), method, **options)
    assert int(on_gpu.targets[0]) == int(on_cpu.targets[0])
    # TF32 convolutions through 60 layers: agreement at the percent level, far below method differences
    assert _relative_gap(on_cpu.maps(), on_gpu.maps()) < LOOSER.get(method, 3e-2)


def test_metrics_stream_on_cuda(effnet, gpu_effnet, photos):
    x = effnet.preprocess(photos[0])
    ex = hl.explain(effnet, x, "saliency")
    on_cpu = hl.evaluate(effnet, x, ex, ["insertion", "deletion"], granularity=16)
    on_gpu = hl.evaluate(gpu_effnet, x.cuda(), ex, ["insertion", "deletion"], granularity=16)
    for name in ("insertion", "deletion"):
        assert float(on_gpu[name].values[0]) == pytest.approx(float(on_cpu[name].values[0]), abs=1e-2)
