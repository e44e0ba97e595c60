"""Shared fixtures: tiny models with known structure, the pretrained model, the packaged photos.

Nothing here downloads anything: efficientnet-lite0's weights ship in a pip package and the photos
in scikit-image.
"""

from __future__ import annotations

import os
from collections import OrderedDict

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("HEATLENS_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import heatlens as hl  # noqa: E402

# Share the cores between xdist workers: two workers x two OpenMP threads on 2 cores oversubscribe,
# and oneDNN's spinning threads then stall each other (tiny ops measured at 15-100 ms instead of 0.04).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0


def make_tiny_cnn(num_classes: int = 5, channels: int = 3, size: int = 16, seed: int = 0) -> nn.Module:
    """A 2-conv CNN with named layers (conv1, relu1, conv2, relu2, pool, flatten, fc); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(channels, 6, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(6, 8, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(8, num_classes)),
    ]))
    return randomise_(net, gen)


def randomise_(net: nn.Module, gen: torch.Generator, scale: float = 0.5) -> nn.Module:
    """Every parameter drawn from N(0, scale^2) with ``gen``, in place; returns the net in eval mode."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net.eval()


def recording(method, seen: list):
    """``method`` that also appends each input it is called with to ``seen`` (to replay a metric's noise)."""
    def run(model, inputs, target, **kw):
        seen.append(inputs.detach().clone())
        return method(model, inputs, target, **kw)

    return run


@pytest.fixture
def tiny_cnn() -> nn.Module:
    return make_tiny_cnn()


@pytest.fixture
def tiny_x() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def linear_model() -> nn.Module:
    """f(x) = W flatten(x) + b on (3,4,4) inputs with 3 classes: gradients are W exactly."""
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(3, 48, generator=gen))
        net[1].bias.copy_(torch.randn(3, generator=gen))
    return net.eval()


@pytest.fixture(scope="session")
def effnet():
    """efficientnet-lite0 with its shipped ImageNet weights (loaded once per test process)."""
    return hl.load_model("efficientnet-lite0")


@pytest.fixture(scope="session")
def photos():
    """scikit-image's packaged photos chelsea, coffee, rocket as uint8 HWC arrays."""
    from skimage import data

    return [data.chelsea(), data.coffee(), data.rocket()]


@pytest.fixture(scope="session")
def chelsea_x(effnet, photos):
    """chelsea preprocessed for efficientnet-lite0, (1,3,224,224)."""
    return effnet.preprocess(photos[0])
