"""Randomisation tests: an explanation that survives destroying the model or the label explains nothing.

``model_randomization`` (Adebayo et al., 2018): re-initialise layers from the top (cascading) or one
at a time (independent) on a deep copy of the model and compare the maps with the original by
Spearman rank correlation of |map|, SSIM and HOG similarity. ``random_logit`` (Sixt et al., 2020):
compare the explanation of the target with that of a random other class.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..explanation import Explanation, SanityResult
from ..methods._autograd import make_generator, prepare
from ..methods.registry import get_method, method_info
from ..models.hooks import resolve_layer
from ..validation import check_choice, check_fraction

SIMILARITIES = ("spearman", "spearman_signed", "ssim", "hog", "pearson")
# Adebayo et al. (2018) compare maps by Spearman rank correlation of the absolute and of the signed
# maps, SSIM and HOG similarity; model_randomization's verdict uses all four.
PAPER_SIMILARITIES = ("spearman", "spearman_signed", "ssim", "hog")
# A map "still looks like the trained model's" when a similarity stays at or above this. 0.5 separates
# the two groups on efficientnet-lite0 (chelsea, full cascade; docs/sanity.md): gradient-based maps
# end at |Spearman| 0.0-0.2, SSIM 0.1-0.3, while a model-independent map (an edge detector) stays at
# 1.0 and randomising only the top layer leaves saliency's SSIM at 0.78.
DEFAULT_THRESHOLD = 0.5


# --- map similarities, one value per image ----------------------------------------------------------
def _ranks(a: Tensor) -> Tensor:
    """Average ranks along dim 1 of (N,P) (ties share their mean rank, as scipy.stats.rankdata)."""
    order = torch.argsort(a, dim=1, stable=True)
    ranks = torch.empty_like(a, dtype=torch.float64)
    ranks.scatter_(1, order, torch.arange(a.shape[1], dtype=torch.float64).expand(a.shape[0], -1))
    out = torch.empty_like(ranks)
    for i in range(a.shape[0]):  # average tied ranks (maps with flat regions: ReLU CAMs)
        _, inverse, counts = torch.unique(a[i], return_inverse=True, return_counts=True)
        sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, ranks[i])
        out[i] = (sums / counts)[inverse]
    return out


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of |a| and |b|, (N,H,W) x2 -> (N,) (Adebayo et al.'s absolute variant)."""
    return _pearson(_ranks(a.flatten(1).abs().double().cpu()), _ranks(b.flatten(1).abs().double().cpu()))


def spearman_signed(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of the signed maps, (N,H,W) x2 -> (N,) (Adebayo et al.'s signed variant)."""
    return _pearson(_ranks(a.flatten(1).double().cpu()), _ranks(b.flatten(1).double().cpu()))


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the signed maps, (N,H,W) x2 -> (N,)."""
    return _pearson(a.flatten(1).double().cpu(), b.flatten(1).double().cpu())


def _unit(m: np.ndarray) -> np.ndarray:
    """|map| min-max scaled to [0, 1] (SSIM and HOG compare shapes, not scales)."""
    m = np.abs(m)
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Structural similarity (scikit-image) of the [0,1]-scaled |maps|, (N,H,W) x2 -> (N,)."""
    from skimage.metrics import structural_similarity

    a_np, b_np = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    side = min(7, *a_np.shape[1:])
    if side < 3:
        raise ValueError(f"ssim needs maps of at least 3x3 pixels, got {a_np.shape[1:]}; use similarity='spearman'")
    win = side if side % 2 else side - 1  # odd window no larger than the map
    return torch.tensor([structural_similarity(_unit(p), _unit(q), data_range=1.0, win_size=win)
                         for p, q in zip(a_np, b_np)], dtype=torch.float64)


def hog(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of HOG descriptors (scikit-image) of the [0,1]-scaled |maps|, (N,) (Adebayo et al.)."""
    from skimage.feature import hog as hog_features

    def features(m: np.ndarray) -> np.ndarray:
        cell = max(2, min(m.shape) // 8)
        return hog_features(_unit(m), orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))

    a_np, b_np = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    fa = torch.tensor(np.stack([features(m) for m in a_np]))
    fb = torch.tensor(np.stack([features(m) for m in b_np]))
    return _pearson(fa, fb)


SIMILARITY_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "spearman": spearman, "spearman_signed": spearman_signed, "ssim": ssim, "hog": hog, "pearson": pearson,
}
SIGNED_SIMILARITIES = ("spearman_signed", "pearson")  # compared on signed maps; the others take |map|


def similarities(a: Tensor, b: Tensor, names: Sequence[str], signed: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """{name: (N,) similarity} between two sets of (N,H,W) maps; ``signed`` (the signed maps of both)
    feeds the signed measures when the maps themselves are magnitudes."""
    sa, sb = signed if signed is not None else (a, b)
    return {name: SIMILARITY_FUNCTIONS[name](*((sa, sb) if name in SIGNED_SIMILARITIES else (a, b))) for name in names}


def check_thresholds(threshold: float | Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """One threshold per similarity, each a finite number in [-1, 1] (correlations and SSIM live there)."""
    given = dict(threshold) if isinstance(threshold, Mapping) else {n: threshold for n in names}
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"threshold names {sorted(unknown)} that are not among the similarities {list(names)}")
    out = {}
    for n in names:
        out[n] = check_fraction(given.get(n, DEFAULT_THRESHOLD), f"threshold[{n!r}]" if isinstance(threshold, Mapping)
                                else "threshold", low=-1.0, high=1.0)
    return out


def check_similarities(similarity: str | Sequence[str]) -> tuple[str, ...]:
    names = (similarity,) if isinstance(similarity, str) else tuple(similarity)
    if not names:
        raise ValueError(f"similarity must name at least one of {SIMILARITIES}")
    for name in names:
        check_choice(name, "similarity", SIMILARITIES)
    return names


def method_name(method: Any) -> str:
    info = method_info(method)
    return info.name if info is not None else getattr(method, "__name__", str(method))


# --- model randomisation -----------------------------------------------------------------------------
def parameter_layers(model: nn.Module) -> list[str]:
    """Names of the leaf modules that own parameters, in definition order (bottom to top)."""
    return [name for name, m in model.named_modules()
            if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False))]


def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameter under ``module`` in place: weights ~ N(0, std of the trained weights)
    (scale kept, structure destroyed, as Adebayo et al.'s truncated-normal re-init), biases likewise;
    normalisation layers also forget their running statistics."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.reset_running_stats()
            for p in m.parameters(recurse=False):
                std = float(p.detach().float().std()) if p.numel() > 1 else 0.0
                std = std if std > 0 else 0.02
                p.copy_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * std)


def _layer_groups(clf: nn.Module, layers: Sequence[str | nn.Module] | None) -> list[str]:
    """The layers to randomise, top first: given ones resolved by name, else every parameterised leaf."""
    if layers is None:
        names = parameter_layers(clf)
        if not names:
            raise ValueError("model has no parameters to randomise (a black-box predict function?)")
        return names[::-1]
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    resolved = [resolve_layer(clf, layer)[0] for layer in layers]
    order = {name: i for i, (name, _) in enumerate(clf.named_modules())}
    return sorted(resolved, key=lambda name: -order[name])  # top (late) first


def _maps(e: Explanation) -> Tensor:
    return e.maps().detach().float().cpu()  # the one map rule (Explanation.maps)


def _signed_maps(e: Explanation) -> Tensor:
    """The signed map: per-location maps as they are, gradient attributions summed over channels."""
    return e.maps(None if e.kind == "location" else "sum").detach().float().cpu()


def _parameter_share(model: nn.Module, names: Sequence[str]) -> float:
    """Fraction of the model's parameters (by count) that live under the modules ``names``."""
    total = sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    seen = {id(p): p.numel() for n in names for p in modules[n].parameters()}
    return sum(seen.values()) / max(total, 1)


def model_randomization(
    model: Any,
    x: Tensor,
    method: str | Callable[..., Explanation] = "saliency",
    target: Any = "predicted",
    *,
    mode: str = "cascading",
    layers: Sequence[str | nn.Module] | None = None,
    similarity: str | Sequence[str] = PAPER_SIMILARITIES,
    threshold: float | Mapping[str, float] = DEFAULT_THRESHOLD,
    seed: int = 0,
    batch_size: int | None = None,
    **method_kwargs: Any,
) -> SanityResult:
    """Model parameter randomisation test (Adebayo et al., 2018).

    mode: "cascading" (randomise the top layer, then the next too, ... down to the input) or
    "independent" (one layer at a time, the others trained). layers: names or modules (blocks allowed),
    default every parameterised leaf layer. The user's model is never touched: a deep copy is edited.
    Targets are resolved once on the trained model and kept. table: one row per step with the mean
    similarity of each kind, the share of the model's parameters randomised and the share of
    predictions changed. similarity: the paper's four by default, Spearman of |maps| ("spearman") and
    of signed maps ("spearman_signed"), SSIM and HOG of the [0,1]-scaled |maps|.

    Verdict: the map depends on the weights when EVERY similarity's mean falls below its ``threshold``
    (one number for all, or {similarity: value}; default 0.5, see ``DEFAULT_THRESHOLD``). cascading:
    judged after the last step (the whole listed cascade randomised); the result says which share of
    the parameters that was, and the step where all similarities first fell (extras "falls_at").
    independent: passes when randomising some single listed layer drives every similarity below
    threshold. A cascade that stops at the top layer while the maps keep their structure (saliency on
    efficientnet-lite0: Spearman 0.3, SSIM 0.78) fails. extras: "curve" {similarity: (L+1,) from 1.0
    at the trained model}, "per_image" {similarity: (L, N)}, "maps" (L+1, N, H, W), "layers", "thresholds".
    """
    check_choice(mode, "mode", ("cascading", "independent"))
    names = check_similarities(similarity)
    thresholds = check_thresholds(threshold, names)
    p = prepare(model, x, target)
    fn = get_method(method)
    original = fn(p.model, p.x, p.targets, batch_size=batch_size, **method_kwargs)
    reference, reference_signed = _maps(original), _signed_maps(original)
    groups = _layer_groups(p.model, layers)
    gen = make_generator(seed)
    edited = copy.deepcopy(p.model)
    per_image: dict[str, list[Tensor]] = {k: [] for k in names}
    rows, all_maps, done = [], [reference], []
    for name in groups:
        if mode == "independent":
            edited, done = copy.deepcopy(p.model), []
        randomize_(dict(edited.named_modules())[name], gen)
        done.append(name)
        e = fn(edited, p.x, p.targets, batch_size=batch_size, **method_kwargs)
        maps = _maps(e)
        all_maps.append(maps)
        sims = similarities(reference, maps, names, signed=(reference_signed, _signed_maps(e)))
        with torch.inference_mode():
            changed = (edited(p.x).argmax(1) != p.logits.argmax(1)).double().mean()
        row = {"layer": name[4:] if name.startswith("net.") else name}
        for k, v in sims.items():
            per_image[k].append(v)
            row[k] = float(torch.nan_to_num(v, nan=0.0).mean())
        row["parameters_randomized"] = _parameter_share(edited, done)
        row["prediction_changed"] = float(changed)
        rows.append(row)
    below = [all(r[k] < thresholds[k] for k in names) for r in rows]
    falls_at = next((r["layer"] for r, b in zip(rows, below) if b), None)
    passed = below[-1] if mode == "cascading" else any(below)
    verdict = _randomization_verdict(method_name(method), mode, rows, names, thresholds, passed, falls_at)
    extras = {
        "curve": {k: torch.tensor([1.0] + [r[k] for r in rows], dtype=torch.float64) for k in names},
        "per_image": {k: torch.stack(v) for k, v in per_image.items()},
        "maps": torch.stack(all_maps), "layers": [r["layer"] for r in rows], "mode": mode,
        "thresholds": thresholds, "falls_at": falls_at,
    }
    params = {"mode": mode, "similarity": names, "threshold": thresholds, "seed": seed, **method_kwargs}
    return SanityResult(name="model_randomization", method=method_name(method), table=rows, passed=passed,
                        verdict=verdict, params=params, extras=extras)


def _randomization_verdict(method: str, mode: str, rows: list[dict[str, Any]], names: Sequence[str],
                           thresholds: dict[str, float], passed: bool, falls_at: str | None) -> str:
    last = rows[-1]
    values = ", ".join(f"{k} {last[k]:.2f} (< {thresholds[k]:g}?)" for k in names)
    if mode == "cascading":
        share = last["parameters_randomized"]
        head = (f"{method}: after randomising {len(rows)} layer(s) from the top ({100 * share:.0f}% of the "
                f"parameters), similarity to the trained model's maps is {values}; ")
        if passed:
            return head + f"all fell below their thresholds (first at {falls_at!r}): the maps depend on the learned weights"
        return head + ("some stay at or above threshold: the maps barely depend on the weights randomised"
                       + (" (randomise more of the cascade to judge the method)" if share < 0.5 else
                          " (like an edge detector)"))
    if passed:
        return f"{method}: randomising {falls_at!r} alone drives every similarity below threshold: the maps depend on it"
    return (f"{method}: no single randomised layer drives every similarity below threshold ({values} for the "
            "last): the maps barely depend on any one layer's weights")


def random_logit(
    model: Any,
    x: Tensor,
    method: str | Callable[..., Explanation] = "saliency",
    target: Any = "predicted",
    *,
    similarity: str | Sequence[str] = ("ssim", "spearman"),
    threshold: float = 0.5,
    seed: int = 0,
    batch_size: int | None = None,
    **method_kwargs: Any,
) -> SanityResult:
    """Random logit test (Sixt et al., 2020; Quantus ``RandomLogit``): explain a random other class
    and compare with the target's map. Class-sensitive methods give dissimilar maps.

    table: one row per image (target, random class, similarities). passed: mean of the first
    similarity below ``threshold``. extras["random_targets"] (N,).
    """
    names = check_similarities(similarity)
    threshold = check_fraction(threshold, "threshold", low=-1.0, high=1.0)
    p = prepare(model, x, target)
    k = p.logits.shape[1]
    if k < 2:
        raise ValueError("random_logit needs a model with at least 2 classes")
    gen = make_generator(seed)
    offsets = torch.randint(1, k, (p.x.shape[0],), generator=gen).to(p.targets.device)
    others = (p.targets + offsets) % k  # uniform over the other classes
    fn = get_method(method)
    a = _maps(fn(p.model, p.x, p.targets, batch_size=batch_size, **method_kwargs))
    b = _maps(fn(p.model, p.x, others, batch_size=batch_size, **method_kwargs))
    sims = similarities(a, b, names)
    rows = [{"image": i, "target": int(p.targets[i]), "random_class": int(others[i]),
             **{n: float(sims[n][i]) for n in names}} for i in range(p.x.shape[0])]
    score = float(torch.nan_to_num(sims[names[0]], nan=0.0).mean())
    passed = score < threshold
    verdict = (f"{method_name(method)}: mean {names[0]} between target and random-class maps is {score:.2f}; "
               + ("the map depends on the class explained" if passed else "the map hardly depends on the class"))
    return SanityResult(name="random_logit", method=method_name(method), table=rows, passed=passed,
                        verdict=verdict, params={"similarity": names, "threshold": threshold, "seed": seed},
                        extras={"random_targets": others.cpu(), "similarities": sims})

