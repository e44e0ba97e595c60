"""Small CNNs for the digit-sum task and a seeded, deterministic training loop.

Training is plain PyTorch (Adam, cross-entropy on logits, shuffled mini-batches): it is not
explanation batching, so it does not go through ``heatlens.batching``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.adapter import Classifier, wrap
from ..validation import check_fraction, check_positive_int
from .datasets import HEIGHT, NUM_CLASSES, WIDTH, DigitSumDataset

INPUT_SIZE = (3, HEIGHT, WIDTH)


def _seeded(net: nn.Module, seed: int) -> nn.Module:
    """Re-initialise ``net`` with PyTorch's default init under ``seed``, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in net.modules():
            if hasattr(m, "reset_parameters") and m is not net:
                m.reset_parameters()
    return net


def seed_cnn(num_classes: int = NUM_CLASSES, *, seed: int = 0) -> nn.Module:
    """The R255 model: 3x3 conv (4 filters, valid) + ReLU, flatten, dense 64 + ReLU, dense ``num_classes``.

    Input (N,3,28,56), output logits (N,num_classes). Layers are named (``conv``, ``fc1``, ``fc2``).
    """
    check_positive_int(num_classes, "num_classes", minimum=2)
    net = nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(3, 4, 3)),
        ("relu", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(4 * (HEIGHT - 2) * (WIDTH - 2), 64)),
        ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(64, num_classes)),
    ]))
    return _seeded(net, seed)


def _conv_blocks(width: int) -> list[tuple[str, nn.Module]]:
    """Two (3x3 conv, ReLU, 2x2 max-pool) blocks, 3 -> width -> 2*width channels, H and W quartered."""
    return [
        ("conv1", nn.Conv2d(3, width, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(width, 2 * width, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
    ]


def conv_net(num_classes: int = NUM_CLASSES, *, width: int = 16, seed: int = 0) -> nn.Module:
    """Two conv blocks (3x3 conv, ReLU, 2x2 max-pool), then dense 64 and the output layer.

    A slightly deeper model with a spatial last conv layer (``conv2``, 7x14) for CAM methods.
    """
    check_positive_int(num_classes, "num_classes", minimum=2)
    check_positive_int(width, "width")
    net = nn.Sequential(OrderedDict([
        *_conv_blocks(width),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(2 * width * (HEIGHT // 4) * (WIDTH // 4), 64)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(64, num_classes)),
    ]))
    return _seeded(net, seed)


def gap_cnn(num_classes: int = NUM_CLASSES, *, width: int = 16, seed: int = 0) -> nn.Module:
    """Three 3x3 conv layers and global average pooling into a linear layer (the classic CAM shape).

    Last conv layer: ``conv3`` (7x14).
    """
    check_positive_int(num_classes, "num_classes", minimum=2)
    check_positive_int(width, "width")
    net = nn.Sequential(OrderedDict([
        *_conv_blocks(width),
        ("conv3", nn.Conv2d(2 * width, 4 * width, 3, padding=1)),
        ("relu3", nn.ReLU()),
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(4 * width, num_classes)),
    ]))
    return _seeded(net, seed)


def tiny_vit(num_classes: int = NUM_CLASSES, *, seed: int = 0) -> nn.Module:
    """A small Hugging Face ``ViTForImageClassification`` for (N,3,28,56) digit sums, randomly initialised
    under ``seed``: 7x7 patches (a 4x8 grid + class token), width 32, 2 layers of 2 heads (needs transformers).
    Wrapped by ``heatlens.wrap`` (labels "0".."num_classes-1"), so it trains with ``train_classifier``."""
    check_positive_int(num_classes, "num_classes", minimum=2)
    try:
        from transformers import ViTConfig, ViTForImageClassification
    except ImportError:
        raise ImportError("tiny_vit needs transformers: pip install 'heatlens[hf]'") from None
    config = ViTConfig(image_size=(HEIGHT, WIDTH), patch_size=7, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=num_classes,
                       id2label={i: str(i) for i in range(num_classes)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ViTForImageClassification(config)
    return wrap(net.eval())


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"seed_cnn": seed_cnn, "conv_net": conv_net, "gap_cnn": gap_cnn,
                                                      "tiny_vit": tiny_vit}


@dataclass
class TrainResult:
    """A trained model and how it did.

    model: the trained network as a ``heatlens.Classifier`` (labels "0".."10", eval mode).
    history: one dict per epoch (epoch, loss, train_acc, val_acc, seconds).
    train_acc / val_acc / test_acc: accuracies in [0,1] (test_acc None without a test split).
    """

    model: Classifier
    history: list[dict[str, float]]
    train_acc: float
    val_acc: float
    test_acc: float | None
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """Validation minus test accuracy: the generalisation gap a shortcut causes."""
        return None if self.test_acc is None else self.val_acc - self.test_acc

    def summary(self) -> str:
        test = "n/a" if self.test_acc is None else f"{self.test_acc:.1%}"
        return (f"train {self.train_acc:.1%}, validation {self.val_acc:.1%}, test {test} "
                f"({len(self.history)} epochs, {self.seconds:.1f} s)")


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int | None = None) -> float:
    """Fraction of images (N,C,H,W) whose argmax logit equals y (N,), in eval mode, batched by the engine."""
    from ..batching import map_batches

    if len(y) == 0:
        return float("nan")

    def step(start: int, stop: int) -> Tensor:
        return (model(x[start:stop]).argmax(1) == y[start:stop]).sum().reshape(1)

    was_training = model.training
    model.eval()
    try:
        correct = map_batches(step, len(y), batch_size=batch_size, grad=False, model=model,
                              item_shape=tuple(x.shape[1:]), desc="accuracy")
    finally:
        model.train(was_training)
    return int(correct.sum()) / len(y)


def train_classifier(
    model: nn.Module | str,
    train: DigitSumDataset,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    val_fraction: float = 0.1,
    seed: int = 0,
    test: DigitSumDataset | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train`` with Adam and cross-entropy on logits (the R255 recipe).

    model: an ``nn.Module`` or ``Classifier`` (trained in place; a Classifier, e.g. ``heatlens.wrap(hf_vit)``,
    keeps its own labels) or an architecture name ("seed_cnn", "conv_net", "gap_cnn").
    val_fraction: the last part of a seeded shuffle is held out for validation (Keras' validation_split).
    seed: fixes the split, the batch order and (for names) the initial weights: same seed, same model.
    progress: print one line per epoch (None: follow ``heatlens.batching``'s progress setting); the
    accuracy passes inside an epoch show no bars of their own. on_epoch: called with each epoch's row.
    """
    net = _as_network(model, seed)
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    check_fraction(val_fraction, "val_fraction", high=0.9)
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(train, DigitSumDataset):
        raise TypeError(f"train must be a DigitSumDataset (heatlens.debug.digit_sum_dataset), got {type(train).__name__}")
    if progress is None:
        from ..batching import progress_enabled

        progress = progress_enabled()
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    n_val = int(round(val_fraction * len(train)))
    fit_idx, val_idx = order[: len(train) - n_val], order[len(train) - n_val:]
    x, y = train.x.to(device), train.y.to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    net.train()
    for epoch in range(1, epochs + 1):
        tic = time.perf_counter()
        loss = _epoch(net, optimiser, x[fit_idx], y[fit_idx], batch_size, gen)
        with _quiet_batches():  # two accuracy passes per epoch: a bar each would flood the terminal
            row = {"epoch": epoch, "loss": loss, "train_acc": accuracy(net, x[fit_idx], y[fit_idx]),
                   "val_acc": accuracy(net, x[val_idx], y[val_idx]), "seconds": time.perf_counter() - tic}
        history.append(row)
        if progress:
            _print_line(f"epoch {epoch}/{epochs}: loss {loss:.3f}, train {row['train_acc']:.1%}, "
                        f"val {row['val_acc']:.1%}")
        if on_epoch is not None:
            on_epoch(row)
    net.eval()
    with _quiet_batches():
        test_acc = accuracy(net, test.x.to(device), test.y.to(device)) if test is not None else None
    clf = wrap(net, input_size=INPUT_SIZE, labels=[str(k) for k in range(NUM_CLASSES)], outputs="logits",
               name=type(model).__name__ if not isinstance(model, str) else model)
    return TrainResult(
        model=clf, history=history, train_acc=history[-1]["train_acc"], val_acc=history[-1]["val_acc"],
        test_acc=test_acc, seconds=time.perf_counter() - start,
        params={"epochs": epochs, "batch_size": batch_size, "lr": lr, "val_fraction": val_fraction, "seed": seed,
                "shortcut": train.shortcut, "n_train": len(train)},
    )


@contextmanager
def _quiet_batches() -> Iterator[None]:
    """No per-call progress bars from ``heatlens.batching`` inside (restored afterwards, also on error)."""
    from .. import batching

    was = batching.progress_enabled()
    batching.set_progress(False)
    try:
        yield
    finally:
        batching.set_progress(was)


def _print_line(text: str) -> None:
    """Print above an active tqdm bar (the demo's one progress display) without breaking it."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(text)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(text)


def _as_network(model: nn.Module | str, seed: int) -> nn.Module:
    if isinstance(model, str):
        if model not in ARCHITECTURES:
            from ..validation import unknown_name

            raise unknown_name("architecture", model, list(ARCHITECTURES))
        return ARCHITECTURES[model](seed=seed)
    if isinstance(model, Classifier):
        if model.net is None:
            raise TypeError("model is a black-box predict function; train_classifier needs an nn.Module")
        return model  # its forward gives logits for any wrapped module (Hugging Face outputs, NHWC Keras)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or an architecture name, got {type(model).__name__}")
    return model


def _epoch(net: nn.Module, optimiser: torch.optim.Optimizer, x: Tensor, y: Tensor, batch_size: int,
           gen: torch.Generator) -> float:
    """One shuffled pass over (x, y); returns the mean training loss."""
    perm = torch.randperm(len(y), generator=gen).to(x.device)
    total = 0.0
    for i in range(0, len(y), batch_size):
        idx = perm[i:i + batch_size]
        optimiser.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        optimiser.step()
        total += float(loss.detach()) * len(idx)
    return total / len(y)
