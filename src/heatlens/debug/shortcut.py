"""Shortcut detection: does a model rely on a planted shortcut? Plus the R255 ablations.

``detect_shortcut`` explains training and test images with several methods, measures where the
relevance falls (on the shortcut, on the digit strokes, on the left vs right digit), compares
accuracies, runs an intervention (plant the shortcut of a wrong label into test images: does the
prediction follow it?) and states the finding in words with the numbers behind it.

The ablations (``lime_ablation``, ``smoothgrad_noise_ablation``, ``smoothgrad_samples_ablation``,
``gradient_x_input``) return an ``Ablation``: the explanations per setting and per-setting statistics
(similarity to the last setting, roughness), with ``.plot()`` for the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..batching import map_batches
from ..explanation import Explanation
from ..models.adapter import Classifier, as_classifier
from ..validation import check_positive_int
from .datasets import DESCRIPTIONS, NUM_CLASSES, DigitSumDataset, plant_shortcut

DEFAULT_METHODS = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "lime", "gradcam", "occlusion")
# settings that keep a 16-image detection run to seconds on 2 CPU cores
DEFAULT_METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"n_samples": 25},
    "integrated_gradients": {"steps": 32},
    "lime": {"num_samples": 500},
}
SUPPORT_RATIO, SUPPORT_MARGIN = 1.5, 0.05  # train share >= 1.5 x test share + 5 points
FOLLOW_THRESHOLD = 0.5  # the intervention is decisive when most predictions follow the planted label
EVEN_THRESHOLD = 0.8  # same_digit: most test predictions are even sums


# --- relevance accounting -------------------------------------------------------------------------

def relevance_shares(e: Explanation, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Share of each image's total |relevance| inside each mask.

    e: an Explanation of N images; its maps are reduced with ``sum_abs`` and upsampled to the input.
    masks: name -> (N,1,H,W) or (N,H,W) bool. Returns name -> (N,) shares in [0,1], NaN for an image
    whose map is all zero (e.g. a CAM whose ReLU removed everything): it says nothing about where.
    """
    maps = e.maps("sum_abs").double().cpu()  # (N,H,W)
    total = maps.flatten(1).sum(1)
    shares = {}
    for name, mask in masks.items():
        m = mask.reshape(maps.shape).to(maps.dtype)
        inside = (maps * m).flatten(1).sum(1)
        shares[name] = torch.where(total > 0, inside / total.clamp_min(1e-300), torch.full_like(total, float("nan")))
    return shares


def _split_masks(data: DigitSumDataset) -> dict[str, Tensor]:
    """The regions measured in every image: shortcut, digit strokes, left and right cell."""
    halves = data.half_masks
    return {"shortcut": data.shortcut_site, "digits": data.stroke_mask, "left": halves[:, :1], "right": halves[:, 1:]}


def predict(model: Classifier, x: Tensor, *, batch_size: int | None = None) -> Tensor:
    """Predicted classes (N,) of images (N,C,H,W), batched by the engine without gradients."""
    x = x.to(model.device)

    def step(start: int, stop: int) -> Tensor:
        return model(x[start:stop]).argmax(1)

    was_training = model.training
    model.eval()
    try:
        return map_batches(step, x.shape[0], batch_size=batch_size, grad=False, model=model,
                           item_shape=model.input_size, desc="predict").cpu()
    finally:
        model.train(was_training)


# --- the report -------------------------------------------------------------------------------------

@dataclass
class ShortcutReport:
    """What ``detect_shortcut`` found.

    shortcut / description: the planted shortcut the data declares (None: a clean dataset).
    detected: whether the evidence says the model relies on it. finding: the conclusion in words.
    evidence: one row per method (shares of |relevance| in train and test images, ``supports``).
    accuracy: train / test accuracy on the whole splits and on the explained images.
    behaviour: intervention numbers (``follow_rate``, ``even_rate``, ...). explanations: split ->
    method -> Explanation. images: split -> the explained DigitSumDataset subset. skipped: method -> why.
    """

    shortcut: str | None
    description: str
    detected: bool
    finding: str
    evidence: list[dict[str, Any]]
    accuracy: dict[str, float]
    behaviour: dict[str, float]
    explanations: dict[str, dict[str, Explanation]] = field(repr=False)
    images: dict[str, DigitSumDataset] = field(repr=False)
    skipped: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return [row["method"] for row in self.evidence]

    def table(self) -> str:
        """The per-method evidence as aligned text."""
        cols = ["method", "train_shortcut", "test_shortcut", "train_digits", "test_digits",
                "train_left", "train_right", "test_left", "test_right", "supports"]
        fmt = lambda v: f"{v:.1%}" if isinstance(v, float) else str(v)  # noqa: E731
        rows = [[fmt(r[c]) for c in cols] for r in self.evidence]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)

    def to_text(self) -> str:
        acc = ", ".join(f"{k} {v:.1%}" for k, v in self.accuracy.items())
        skipped = "".join(f"\nskipped {k}: {v}" for k, v in self.skipped.items())
        return f"{self.finding}\n\naccuracy: {acc}\n\n{self.table()}{skipped}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (no tensors) for JSON, the HTML report and the command line."""
        return {"shortcut": self.shortcut, "description": self.description, "detected": self.detected,
                "finding": self.finding, "evidence": [dict(r) for r in self.evidence],
                "accuracy": dict(self.accuracy), "behaviour": dict(self.behaviour), "skipped": dict(self.skipped),
                "params": {k: v for k, v in self.params.items() if k != "method_kwargs"}}

    def plot(self, **kwargs: Any):
        """Training and test images x methods, frames green (correct) / red (mispredicted) -> Figure."""
        from ..viz.grid import shortcut_grid

        return shortcut_grid(self, **kwargs)

    def __repr__(self) -> str:
        return f"ShortcutReport(shortcut={self.shortcut!r}, detected={self.detected}, methods={self.methods})"


def detect_shortcut(
    model: Any,
    train: DigitSumDataset,
    test: DigitSumDataset,
    *,
    methods: Sequence[str] | None = None,
    n_images: int = 16,
    seed: int = 0,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
) -> ShortcutReport:
    """Explain training vs test images and decide whether ``model`` relies on the training shortcut.

    model: a Classifier (or nn.Module) for (N,3,28,56) digit-sum images. train / test: the splits of
    ``digit_sum_dataset`` (the train split declares the planted shortcut and where it lives).
    methods: registry names; default: those of ``DEFAULT_METHODS`` registered at call time (methods
    that cannot run on this model, e.g. a CAM without a spatial layer, are listed in ``skipped``).
    n_images: images explained per split, drawn with ``seed``. method_kwargs: name -> hyperparameters
    (merged over ``DEFAULT_METHOD_KWARGS``).
    """
    from .. import explain
    from ..methods import METHODS

    _check_split(train, "train", "train")
    _check_split(test, "test", "test")
    check_positive_int(n_images, "n_images")
    model = as_classifier(model, train.x[:1])
    names = _choose_methods(methods, METHODS)
    kwargs = {k: dict(v) for k, v in DEFAULT_METHOD_KWARGS.items()}
    for k, v in (method_kwargs or {}).items():
        kwargs[k] = {**kwargs.get(k, {}), **dict(v)}

    gen = torch.Generator().manual_seed(seed)
    images = {split: data.subset(torch.randperm(len(data), generator=gen)[: min(n_images, len(data))])
              for split, data in (("train", train), ("test", test))}
    explanations: dict[str, dict[str, Explanation]] = {"train": {}, "test": {}}
    skipped: dict[str, str] = {}
    for name in names:
        hyper = dict(kwargs.get(name, {}))
        if METHODS.get(name).meta.get("stochastic"):
            hyper.setdefault("seed", seed)
        try:
            for split, data in images.items():
                explanations[split][name] = explain(model, data.x.to(model.device), name, "predicted",
                                                    batch_size=batch_size, **hyper)
        except (ValueError, TypeError, RuntimeError) as err:  # e.g. no spatial layer for a CAM
            skipped[name] = f"{type(err).__name__}: {err}".splitlines()[0]
            for split in explanations:
                explanations[split].pop(name, None)

    evidence = [_evidence_row(name, explanations, images, train.shortcut) for name in explanations["train"]]
    accuracy = {
        "train": _accuracy(model, train, batch_size), "test": _accuracy(model, test, batch_size),
        "train_explained": _accuracy(model, images["train"], batch_size),
        "test_explained": _accuracy(model, images["test"], batch_size),
    }
    behaviour = _behaviour(model, test, train.shortcut, seed, batch_size)
    detected = _decide(train.shortcut, evidence, behaviour)
    finding = _finding(train.shortcut, detected, evidence, accuracy, behaviour)
    return ShortcutReport(
        shortcut=train.shortcut, description=DESCRIPTIONS.get(train.shortcut or "", "no planted shortcut"),
        detected=detected, finding=finding, evidence=evidence, accuracy=accuracy, behaviour=behaviour,
        explanations=explanations, images=images, skipped=skipped,
        params={"methods": list(names), "n_images": n_images, "seed": seed, "method_kwargs": kwargs},
    )


def _check_split(data: Any, name: str, split: str) -> None:
    if not isinstance(data, DigitSumDataset):
        raise TypeError(f"{name} must be a DigitSumDataset (heatlens.debug.digit_sum_dataset), got {type(data).__name__}")
    if data.split != split:
        raise ValueError(f"{name} must be the {split!r} split, got the {data.split!r} split")


def _choose_methods(methods: Sequence[str] | None, registry: Any) -> list[str]:
    if methods is None:
        return [m for m in DEFAULT_METHODS if m in registry]
    if isinstance(methods, str):
        methods = [methods]
    names = list(methods)
    if not names:
        raise ValueError("methods must name at least one registered method")
    for m in names:
        registry.get(m)  # unknown names raise with suggestions
    return names


def _evidence_row(name: str, explanations: dict, images: dict, shortcut: str | None) -> dict[str, Any]:
    """Mean shares of |relevance| per region for one method in both splits."""
    row: dict[str, Any] = {"method": name}
    for split in ("train", "test"):
        shares = relevance_shares(explanations[split][name], _split_masks(images[split]))
        for region, values in shares.items():
            row[f"{split}_{region}"] = float(values.nanmean())
    row["shortcut_area"] = float(images["train"].shortcut_mask.float().mean())
    row["enrichment"] = row["train_shortcut"] / row["shortcut_area"] if row["shortcut_area"] > 0 else float("nan")
    if shortcut in ("marker", "tint", "border"):
        # relevance moves onto the shortcut where it is present, compared with the same pixels without it
        row["supports"] = row["train_shortcut"] >= SUPPORT_RATIO * row["test_shortcut"] + SUPPORT_MARGIN
    else:
        # same_digit is a relation between the digits, not a region: relevance maps cannot single it
        # out (both digits carry relevance either way), so the decision rests on the predictions
        row["supports"] = None
    return row


def _accuracy(model: Classifier, data: DigitSumDataset, batch_size: int | None) -> float:
    return float((predict(model, data.x, batch_size=batch_size) == data.y).float().mean())


def _behaviour(model: Classifier, test: DigitSumDataset, shortcut: str | None, seed: int,
               batch_size: int | None) -> dict[str, float]:
    """Method-free evidence on the test split: what the predictions follow."""
    pred = predict(model, test.x, batch_size=batch_size)
    out = {"even_rate": float((pred % 2 == 0).float().mean()), "even_labels": float((test.y % 2 == 0).float().mean()),
           "twice_left": float((pred == 2 * test.left).float().mean()),
           "twice_right": float((pred == 2 * test.right).float().mean()),
           "true_sum": float((pred == test.y).float().mean()),
           "equal_digits": float((test.left == test.right).float().mean())}
    if shortcut in ("marker", "tint", "border"):
        gen = torch.Generator().manual_seed(seed + 1)
        wrong = (test.y + torch.randint(1, NUM_CLASSES, test.y.shape, generator=gen)) % NUM_CLASSES
        followed = predict(model, plant_shortcut(test, wrong, shortcut=shortcut), batch_size=batch_size)
        out["follow_rate"] = float((followed == wrong).float().mean())
        out["true_sum_with_wrong_shortcut"] = float((followed == test.y).float().mean())
    return out


def _decide(shortcut: str | None, evidence: list[dict], behaviour: dict[str, float]) -> bool:
    """Relies on the shortcut: the intervention says so, or a majority of the methods do."""
    if shortcut is None:
        return False
    if shortcut == "same_digit":
        return behaviour["even_rate"] >= max(EVEN_THRESHOLD, behaviour["even_labels"] + 0.2)
    support = sum(bool(r["supports"]) for r in evidence)
    majority = bool(evidence) and support * 2 > len(evidence)
    return behaviour.get("follow_rate", 0.0) >= FOLLOW_THRESHOLD or majority


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _per_method(evidence: list[dict], key: str) -> str:
    return ", ".join(f"{r['method']} {r[key]:.0%}" for r in evidence)


def _finding(shortcut: str | None, detected: bool, evidence: list[dict], acc: dict[str, float],
             behaviour: dict[str, float]) -> str:
    """The conclusion in words, with the numbers that support it."""
    drop = f"accuracy drops from {acc['train']:.0%} on training images to {acc['test']:.0%} on test images"
    digits_test = _median([r["test_digits"] for r in evidence])
    digits_train = _median([r["train_digits"] for r in evidence])
    if shortcut is None:
        return (f"No shortcut was planted in the training data. Training accuracy {acc['train']:.0%}, test accuracy "
                f"{acc['test']:.0%}; the digit strokes receive a median {digits_train:.0%} of the relevance in "
                f"training images and {digits_test:.0%} in test images.")
    name = f"the {shortcut.replace('_', ' ')} shortcut ({DESCRIPTIONS[shortcut]})"
    support = sum(bool(r["supports"]) for r in evidence)
    if shortcut == "same_digit":
        left, right = _median([r["train_left"] for r in evidence]), _median([r["train_right"] for r in evidence])
        reading = "reads the pair as one repeated digit" if abs(left - right) < 0.25 else \
            f"reads mainly the {'left' if left > right else 'right'} digit"
        body = (f"in training images relevance is split {left:.0%} / {right:.0%} between the left and right digit "
                f"(on the left digit: {_per_method(evidence, 'train_left')}), so the model {reading}; "
                f"on test images, whose digits are drawn independently (equal in {behaviour['equal_digits']:.0%} of "
                f"pairs), {behaviour['even_rate']:.0%} of its predictions are even "
                f"sums (twice one digit) against {behaviour['even_labels']:.0%} of the true labels, they equal twice "
                f"the left digit in {behaviour['twice_left']:.0%} and twice the right one in "
                f"{behaviour['twice_right']:.0%} of cases, and {drop}.")
    else:
        share = _median([r["train_shortcut"] for r in evidence])
        area = evidence[0]["shortcut_area"] if evidence else float("nan")
        test_share = _median([r["test_shortcut"] for r in evidence])
        follow = behaviour.get("follow_rate", float("nan"))
        body = (f"in training images {support} of {len(evidence)} methods put more relevance on it than on the same "
                f"pixels of test images (median {share:.0%} of the relevance on {area:.0%} of the image; per method: "
                f"{_per_method(evidence, 'train_shortcut')}); on test images, where it is absent, those pixels get "
                f"{test_share:.0%}, the digit strokes {digits_test:.0%} (vs {digits_train:.0%} in training), and "
                f"{drop}. Planting the {shortcut} of a wrong label into test images makes the model predict that "
                f"label in {follow:.0%} of cases.")
    if detected:
        return f"The model relies on {name}: {body}"
    return f"No clear evidence that the model relies on {name}: {body}"


# --- ablations ----------------------------------------------------------------------------------------

@dataclass
class Ablation:
    """Explanations of the same images under several settings of one hyperparameter.

    parameter: what varies. values: its settings. explanations: one Explanation per setting.
    stats: one dict per setting (``similarity_to_last``: mean cosine similarity of the |maps| with the
    last setting's; ``spearman_to_first`` / ``spearman_to_last``: mean rank correlation of the |maps|
    with the first / last setting's; ``roughness``: mean absolute difference of neighbouring pixels of
    the max-normalised |map|, high for noisy maps; plus method diagnostics such as LIME's ``r2``).
    note: what the reader should know about the result (the demo prints it under the grid).
    """

    name: str
    parameter: str
    values: list[Any]
    explanations: list[Explanation] = field(repr=False)
    stats: list[dict[str, float]]
    images: Tensor | None = field(default=None, repr=False)
    maps: list[Tensor] | None = field(default=None, repr=False)
    note: str = ""

    def titles(self) -> list[str]:
        return [f"{self.parameter}={v}" for v in self.values]

    def plot(self, images: Any = None, **kwargs: Any):
        """The ablation grid: images x settings -> Figure."""
        from ..viz.grid import ablation_grid

        return ablation_grid(self, images=images, **kwargs)


def map_statistics(maps: Sequence[Tensor]) -> list[dict[str, float]]:
    """Similarity to the last map, rank correlation with the first and last, and roughness for a
    sequence of (N,H,W) maps (see ``Ablation``)."""
    from ..sanity.randomization import spearman

    last = maps[-1].abs().flatten(1).double()
    out = []
    for m in maps:
        a = m.abs().double()
        flat = a.flatten(1)
        cos = (flat * last).sum(1) / (flat.norm(dim=1) * last.norm(dim=1)).clamp_min(1e-12)
        norm = a / a.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        rough = ((norm[:, 1:] - norm[:, :-1]).abs().mean((1, 2)) + (norm[:, :, 1:] - norm[:, :, :-1]).abs().mean((1, 2))) / 2
        out.append({"similarity_to_last": float(cos.mean()), "roughness": float(rough.mean()),
                    # cosine of non-negative maps is high for any two maps; ranks show changes it hides
                    "spearman_to_first": float(spearman(maps[0].abs().double(), a).mean()),
                    "spearman_to_last": float(spearman(maps[-1].abs().double(), a).mean())})
    return out


def _ablation(name: str, parameter: str, values: Sequence[Any], explanations: list[Explanation], x: Tensor,
              reduce: str = "sum_abs", maps: list[Tensor] | None = None) -> Ablation:
    maps = maps if maps is not None else [e.maps(reduce).detach().cpu() for e in explanations]
    stats = map_statistics(maps)
    for s, e in zip(stats, explanations):
        if "r2" in e.extras:
            s["r2"] = float(torch.as_tensor(e.extras["r2"]).float().mean())
    return Ablation(name=name, parameter=parameter, values=list(values), explanations=explanations,
                    stats=stats, images=x.detach().cpu(), maps=maps)


def lime_ablation(
    model: Any, x: Tensor, target: Any = "predicted", *,
    num_samples: Sequence[int] = (2, 10, 100, 1000, 2500),
    seed: int = 0, batch_size: int | None = None, **lime_kwargs: Any,
) -> Ablation:
    """LIME vs the number of perturbed samples (R255 exercise 2.1a): {2, 10, 100, 1000, 2500}.

    Few samples give an unstable, arbitrary surrogate (low ``r2``, maps unlike the converged one).
    The maps are the signed superpixel weights; ``stats`` adds LIME's ``r2`` per setting.
    """
    from .. import explain

    values = [check_positive_int(v, "num_samples", minimum=2) for v in num_samples]
    if not values:
        raise ValueError("num_samples must hold at least one setting")
    exps = [explain(model, x, "lime", target, num_samples=v, seed=seed, batch_size=batch_size, **lime_kwargs)
            for v in values]
    return _ablation("lime_num_samples", "num_samples", values, exps, x, reduce="sum")


def lime_features_ablation(
    explanation: Explanation, *, num_features: Sequence[int] = (1, 2, 3, 5, 10), positive_only: bool = False,
) -> Ablation:
    """LIME vs ``num_features`` (R255 exercise 2.1c): how many superpixels are shown.

    num_features is a view of one LIME explanation (lime's ``get_image_and_mask``), so nothing is
    re-fitted: each setting keeps the ``k`` segments with the largest |weight| (positive ones only with
    ``positive_only``). Maps are the kept weights, zero elsewhere.
    """
    if "segments" not in explanation.extras or "weights" not in explanation.extras:
        raise ValueError(f"explanation must come from lime or kernel_shap (segment weights), got {explanation.method!r}")
    values = [check_positive_int(v, "num_features") for v in num_features]
    segs = torch.as_tensor(explanation.extras["segments"]).cpu().long()  # (N,H,W)
    weights = torch.as_tensor(explanation.extras["weights"]).cpu().float()  # (N,S)
    maps = [_top_segments_map(weights, segs, k, positive_only) for k in values]
    exps = [explanation] * len(values)
    inputs = explanation.inputs if explanation.inputs is not None else torch.zeros(0)
    return _ablation("lime_num_features", "num_features", values, exps, inputs, maps=maps)


def _top_segments_map(weights: Tensor, segments: Tensor, k: int, positive_only: bool) -> Tensor:
    """(N,H,W) map of the k strongest segment weights per image (lime's ordering by |weight|)."""
    ranked = weights.clamp_min(0) if positive_only else weights.abs()
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :k]
    keep = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, order, True) & (ranked > 0)
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    return kept.gather(1, segments.flatten(1)).reshape(segments.shape)


def smoothgrad_noise_ablation(
    model: Any, x: Tensor, target: Any = "predicted", *,
    noise: Sequence[float] = (0.01, 0.1, 1, 10, 100, 1000), n_samples: int = 50,
    method: str = "saliency", seed: int = 0, batch_size: int | None = None,
) -> Ablation:
    """SmoothGrad vs noise level (R255 exercise 3.2.2): {0.01, 0.1, 1, 10, 100, 1000}.

    noise is heatlens' relative sigma: sigma = noise x (max - min) of each image, so 0.01 is almost
    the plain gradient and 10 and above drown the image (the maps stop depending on it). The R255
    notebook used an absolute std on 0-255 pixels; relative levels make the sweep scale-free.
    """
    from ..methods.smoothing import smooth

    values = [_check_noise(v) for v in noise]
    smoothed = smooth(method)
    exps = [smoothed(model, x, target, n_samples=n_samples, noise=v, seed=seed, batch_size=batch_size) for v in values]
    ablation = _ablation("smoothgrad_noise", "noise", values, exps, x)
    first, last = ablation.stats[0]["spearman_to_last"], ablation.stats[-1]["spearman_to_first"]
    ablation.note = (
        f"Rank correlation of the maps at noise {values[0]:g} and {values[-1]:g}: {last:.2f}. "
        "Noise only switches ReLUs on and off; what it cannot change is the part of the gradient that is "
        "the model's own weights pulled back to the input, which in a model whose first dense layer sees "
        "every pixel is most of the map. From about noise 10 the image is drowned and the maps are set by "
        "the noise draws alone (the same seed gives the same draws at every level, hence similarity 1.00 "
        "between the large levels)." if values[-1] >= 10 else "")
    return ablation


def smoothgrad_samples_ablation(
    model: Any, x: Tensor, target: Any = "predicted", *,
    n_samples: Sequence[int] = (1, 2, 4, 16, 64, 256, 512), noise: float = 0.15,
    method: str = "saliency", seed: int = 0, batch_size: int | None = None,
) -> Ablation:
    """SmoothGrad vs number of noisy samples (R255 exercise 3.2.3): {1, 2, 4, 16, 64, 256, 512}.

    The maps converge (``similarity_to_last`` -> 1) and get smoother (``roughness`` falls) as n grows.
    """
    from ..methods.smoothing import smooth

    values = [check_positive_int(v, "n_samples") for v in n_samples]
    smoothed = smooth(method)
    exps = [smoothed(model, x, target, n_samples=v, noise=noise, seed=seed, batch_size=batch_size) for v in values]
    return _ablation("smoothgrad_n_samples", "n_samples", values, exps, x)


def gradient_x_input(
    model: Any, x: Tensor, target: Any = "predicted", *,
    n_samples: int = 50, noise: float = 0.15, seed: int = 0, batch_size: int | None = None,
) -> Ablation:
    """Gradient vs gradient x input, each plain and smoothed (R255 exercise 3.3.5).

    Settings: saliency, input_x_gradient, smoothgrad, smooth(input_x_gradient) - SmoothGrad applies to
    any method. Gradient x input is zero on black pixels, so its maps sit on the strokes.
    """
    from .. import explain
    from ..methods.smoothing import smooth

    exps = [
        explain(model, x, "saliency", target, batch_size=batch_size),
        explain(model, x, "input_x_gradient", target, batch_size=batch_size),
        smooth("saliency")(model, x, target, n_samples=n_samples, noise=noise, seed=seed, batch_size=batch_size),
        smooth("input_x_gradient")(model, x, target, n_samples=n_samples, noise=noise, seed=seed, batch_size=batch_size),
    ]
    values = ["saliency", "input_x_gradient", "smoothgrad", "smooth(input_x_gradient)"]
    return _ablation("gradient_x_input", "method", values, exps, x)


def _check_noise(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"noise must be non-negative fractions of the input range, got {value!r}")
    return float(value)


# --- the whole story ------------------------------------------------------------------------------------

@dataclass
class Story:
    """The debugging story end to end: data, training, detection and (optionally) the ablations."""

    train: DigitSumDataset = field(repr=False)
    test: DigitSumDataset = field(repr=False)
    training: Any  # TrainResult
    report: ShortcutReport
    ablations: dict[str, Ablation] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> Classifier:
        return self.training.model


def debugging_story(
    shortcut: str | None = "same_digit",
    *,
    architecture: str = "seed_cnn",
    n_train: int | None = None,
    n_test: int | None = None,
    epochs: int = 10,
    methods: Sequence[str] | None = None,
    n_images: int = 16,
    ablations: bool = True,
    seed: int = 0,
    progress: bool | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Story:
    """Build the shortcut data, train ``architecture``, detect the shortcut and run the ablations.

    The R255 practical in one call (``heatlens demo`` runs it): the defaults train the seed CNN on
    5000 images for 10 epochs (seconds to a minute on 2 CPU cores). Ablations explain two test images:
    SmoothGrad vs noise and vs samples, gradient x input, and LIME vs samples and vs ``num_features``
    (on SLIC superpixels fine enough for the setting to matter) when lime is registered.
    on_step: called with a short description after each stage (an epoch, the detection, each
    ablation), e.g. to drive one progress display for the whole story.
    """
    from ..methods import METHODS
    from .datasets import digit_sum_dataset
    from .training import train_classifier

    train = digit_sum_dataset("train", shortcut, n=n_train, seed=seed)
    test = digit_sum_dataset("test", shortcut, n=n_test, seed=seed)
    step = on_step or (lambda _what: None)
    run = train_classifier(architecture, train, epochs=epochs, test=test, seed=seed, progress=progress,
                           on_epoch=lambda row: step(f"epoch {row['epoch']}"))
    report = detect_shortcut(run.model, train, test, methods=methods, n_images=n_images, seed=seed)
    step("shortcut detection")
    found: dict[str, Ablation] = {}
    if ablations:
        x = test.x[:2]
        found["smoothgrad_noise"] = smoothgrad_noise_ablation(run.model, x, seed=seed)
        step("SmoothGrad noise ablation")
        found["smoothgrad_n_samples"] = smoothgrad_samples_ablation(run.model, x, seed=seed)
        step("SmoothGrad samples ablation")
        found["gradient_x_input"] = gradient_x_input(run.model, x, seed=seed)
        step("gradient x input")
        if "lime" in METHODS:
            found["lime_num_samples"] = lime_ablation(run.model, x, seed=seed)
            # lime's quickshift gives these 28x56 digits 3-4 superpixels, where showing 1, 2, 3, 5 or 10 of
            # them looks the same; ~30 SLIC superpixels make num_features a real choice
            from ..methods.segmentation import segment

            fine = segment(x, "slic", model=run.model, n_segments=32, compactness=10, start_label=0)
            lime_fine = lime_ablation(run.model, x, num_samples=(1000,), seed=seed, segments=fine).explanations[0]
            found["lime_num_features"] = lime_features_ablation(lime_fine, num_features=(1, 2, 3, 5, 10))
            step("LIME ablations")
    return Story(train=train, test=test, training=run, report=report, ablations=found)

STORY_STEPS = 5  # on_step calls after training: detection, three ablations, LIME
