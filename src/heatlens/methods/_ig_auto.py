"""Integrated Gradients to a stated completeness tolerance with few passes (``steps="auto"``).

On real CNNs the explained score f(alpha) = f(x' + alpha (x - x')) changes most within a small part
of the path (efficientnet-lite0 from a black baseline: 0.2 -> 8.8 within the first 5%), so uniform or
Gauss-Legendre points spend most of their gradients where nothing happens. Here the points follow the
change, in the spirit of non-uniform interpolation (Kamalov et al., arXiv 2302.11107):

1. **Probe** (forward passes only, ~1/3 of a gradient pass each): f at 4 uniform intervals of
   [0, 1], then intervals whose change |f(b) - f(a)| is above 1/16 of the path's total variation are
   halved, a few rounds, batched over all images.
2. **Gradients** at the midpoint of every interval (midpoint rule on the non-uniform partition).
   Each interval's completeness error is known exactly, e_i = f(b) - f(a) - (b - a) <grad f(m), x - x'>,
   because f is known at both ends; the gap of the whole integral is sum(e_i).
3. **Refine** while the gap is above ``tolerance`` x |f(x) - f(x')|: the intervals with the largest
   |e_i| (half of sum |e_i|) are cut in three. The middle third's midpoint is the old midpoint, so its gradient is kept; the
   outer thirds cost one gradient each, and their new ends one forward each (a third of the width
   cuts a midpoint error ~27x per piece, ~9x for the interval, with nothing thrown away).

Memory: one weighted gradient (C,H,W) per interval is kept, so that a cut interval's term can be
rescaled; ``steps=int`` keeps one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._autograd import Prepared, gradients_over, scores_over

PROBE_INTERVALS = 4  # initial uniform probe; the steep part of the path is then found by halving
PROBE_SHARE = 1 / 16  # an interval is halved in the probe while it carries more of the total change
PROBE_ROUNDS = 7  # halvings of the probe: the finest interval is 1/4/2^7 = 1/512 of the path
ROUNDING = 1e-5  # relative float32 rounding of a score between batch layouts (oneDNN sums in blocks)
MAX_POINTS = 1024  # gradient points per image before giving up (the gap is reported either way)


@dataclass
class _Path:
    """One image's partition of [0, 1]: ends (M+1,) ascending with f there, and per interval its
    weighted gradient (b - a) grad f(m) (C,H,W) and completeness error e_i."""

    ends: list[float]
    scores: list[float]
    terms: list[Tensor | None] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    dots: list[float] = field(default_factory=list)  # <grad f(m_i), x - x'>

    def error(self, k: int) -> float:
        """e_k, or 0 when it is within float rounding of the three numbers it is made of (scores come
        from batches of different sizes: cutting further would chase rounding noise)."""
        a, b, term = self.scores[k], self.scores[k + 1], (self.ends[k + 1] - self.ends[k]) * self.dots[k]
        e = b - a - term
        return 0.0 if abs(e) <= ROUNDING * (abs(a) + abs(b) + abs(term)) else e


def adaptive_gradient_sum(p: Prepared, baselines: Tensor, tolerance: float, output: str,
                          batch_size: int | None) -> tuple[Tensor, Tensor, dict]:
    """sum_i (b_i - a_i) grad f(m_i) per image (N,C,H,W), f(x') (N,), and diagnostics.

    diagnostics: "passes" {"forward", "forward_backward"} (all images), "points" (N,) gradient points
    per image, "error_bound" (N,) sum |e_i| / |f(x) - f(x')|.
    """
    n = p.x.shape[0]
    delta = p.x - baselines
    x_scores = p.scores(output).double().cpu()
    passes = {"forward": 0, "forward_backward": 0}
    paths = [_Path([k / PROBE_INTERVALS for k in range(PROBE_INTERVALS + 1)], []) for _ in range(n)]

    # 1. probe: f at the uniform ends (x' itself included: it is the baseline score), then halve
    todo = [(i, a) for i in range(n) for a in paths[i].ends[:-1]]
    found = _scores(p, baselines, delta, todo, output, batch_size, passes)
    for i, path in enumerate(paths):
        path.scores = [found[(i, a)] for a in path.ends[:-1]] + [float(x_scores[i])]
    for _ in range(PROBE_ROUNDS):
        todo = [(i, 0.5 * (a + b)) for i, path in enumerate(paths) for a, b in _steep(path)]
        if not todo:
            break
        found = _scores(p, baselines, delta, todo, output, batch_size, passes)
        for i, m in todo:
            _insert(paths[i], m, found[(i, m)])

    # 2. gradients at every midpoint
    for path in paths:
        m = len(path.ends) - 1
        path.terms, path.errors, path.dots = [None] * m, [0.0] * m, [0.0] * m
    _gradients(p, baselines, delta, [(i, k) for i, path in enumerate(paths) for k in range(len(path.ends) - 1)],
               paths, output, batch_size, passes)

    # 3. cut the worst intervals in three until the gap meets the tolerance
    span = (x_scores - torch.tensor([path.scores[0] for path in paths], dtype=torch.float64)).abs().clamp_min(1e-12)
    while True:
        cut = {i: ks for i, path in enumerate(paths) if len(path.terms) < MAX_POINTS
               for ks in [_worst(path, tolerance * float(span[i]))] if ks}
        if not cut:
            break
        thirds = [(i, paths[i].ends[k] + j * (paths[i].ends[k + 1] - paths[i].ends[k]) / 3)
                  for i, ks in cut.items() for k in ks for j in (1, 2)]
        found = _scores(p, baselines, delta, thirds, output, batch_size, passes)
        outer = []
        for i, ks in cut.items():
            for k in sorted(ks, reverse=True):  # from the right, so the indices of the rest stay valid
                _trisect(paths[i], i, k, found)
            outer += [(i, k + 2 * r + j) for r, k in enumerate(sorted(ks)) for j in (0, 2)]
        _gradients(p, baselines, delta, outer, paths, output, batch_size, passes)

    total = torch.stack([torch.stack(path.terms).sum(0) for path in paths])
    base_scores = torch.tensor([path.scores[0] for path in paths], dtype=torch.float32, device=p.x.device)
    bound = torch.tensor([sum(abs(e) for e in path.errors) for path in paths], dtype=torch.float64) / span
    info = {"passes": passes, "points": torch.tensor([len(path.terms) for path in paths]),
            "error_bound": bound.float()}
    return total, base_scores, info


def _scores(p: Prepared, baselines: Tensor, delta: Tensor, todo: list[tuple[int, float]], output: str,
            batch_size: int | None, passes: dict) -> dict[tuple[int, float], float]:
    """f at (image, alpha) pairs, forward only, batched by the engine."""
    imgs = torch.tensor([i for i, _ in todo], device=p.x.device)
    alphas = torch.tensor([a for _, a in todo], dtype=torch.float64)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        img = imgs[start:stop]
        a = alphas[start:stop].to(p.x.device, p.x.dtype).view(-1, 1, 1, 1)
        return baselines[img] + a * delta[img], p.targets[img]

    values = scores_over(p.model, len(todo), build, output=output, batch_size=batch_size, desc="IG probe")
    passes["forward"] += len(todo)
    return dict(zip(todo, values.double().cpu().tolist()))


def _gradients(p: Prepared, baselines: Tensor, delta: Tensor, todo: list[tuple[int, int]], paths: list[_Path],
               output: str, batch_size: int | None, passes: dict) -> None:
    """Fill term, <grad, x - x'> and error of intervals (image, k), one gradient pass each."""
    imgs = torch.tensor([i for i, _ in todo], device=p.x.device)
    mids = torch.tensor([0.5 * (paths[i].ends[k] + paths[i].ends[k + 1]) for i, k in todo], dtype=torch.float64)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        img = imgs[start:stop]
        a = mids[start:stop].to(p.x.device, p.x.dtype).view(-1, 1, 1, 1)
        return baselines[img] + a * delta[img], p.targets[img]

    def consume(start: int, stop: int, _inputs: Tensor, grads: Tensor, scores: Tensor) -> None:
        dots = (grads.double() * delta[imgs[start:stop]].double()).flatten(1).sum(1).cpu()
        for j, (i, k) in enumerate(todo[start:stop]):
            path = paths[i]
            path.terms[k] = grads[j] * (path.ends[k + 1] - path.ends[k])
            path.dots[k] = float(dots[j])
            path.errors[k] = path.error(k)

    gradients_over(p.model, len(todo), build, consume, output=output, batch_size=batch_size,
                   desc="integrated gradients")
    passes["forward_backward"] += len(todo)


def _steep(path: _Path) -> list[tuple[float, float]]:
    """Probe intervals where the score changes fast: more than PROBE_SHARE of the path's total change
    and more than twice the average rate (a straight path is not refined: its gradients will tell)."""
    changes = [abs(b - a) for a, b in zip(path.scores[:-1], path.scores[1:])]
    total = sum(changes)
    widths = [b - a for a, b in zip(path.ends[:-1], path.ends[1:])]
    # steep: a large share of the change, and at least twice the path's average rate of change
    return [(path.ends[k], path.ends[k + 1]) for k, c in enumerate(changes)
            if total > 0 and c > PROBE_SHARE * total and c > 2 * widths[k] * total]


def _insert(path: _Path, alpha: float, score: float) -> None:
    k = next(k for k, a in enumerate(path.ends) if a > alpha)
    path.ends.insert(k, alpha)
    path.scores.insert(k, score)


def _worst(path: _Path, allowed: float) -> list[int]:
    """Intervals to cut: none once the gap is within ``allowed``; otherwise the largest |e_i| that
    together make half of sum |e_i| (the worst intervals first, so the map converges, not only its sum)."""
    if abs(sum(path.errors)) <= allowed:
        return []
    order = sorted(range(len(path.errors)), key=lambda k: -abs(path.errors[k]))
    bound, picked, covered = sum(abs(e) for e in path.errors), [], 0.0
    for k in order:
        if covered >= 0.5 * bound or len(path.terms) + 2 * len(picked) >= MAX_POINTS:
            break
        picked.append(k)
        covered += abs(path.errors[k])
    return picked or order[:1]


def _trisect(path: _Path, i: int, k: int, found: dict[tuple[int, float], float]) -> None:
    """Cut interval k in three; the middle third keeps the gradient at the old midpoint (its own
    midpoint), rescaled to its width; the outer thirds wait for theirs (``_gradients``)."""
    a, b = path.ends[k], path.ends[k + 1]
    cuts = [a + (b - a) / 3, a + 2 * (b - a) / 3]
    path.ends[k + 1:k + 1] = cuts
    path.scores[k + 1:k + 1] = [found[(i, c)] for c in cuts]
    term, dot = path.terms[k], path.dots[k]
    path.terms[k:k + 1] = [None, None if term is None else term / 3, None]
    path.dots[k:k + 1] = [0.0, dot, 0.0]
    path.errors[k:k + 1] = [0.0, 0.0, 0.0]
    path.errors[k + 1] = path.error(k + 1)


def relative(gap: Tensor, x_scores: Tensor, base_scores: Tensor) -> Tensor:
    """|gap| / |f(x) - f(x')| (N,)."""
    return gap.abs() / (x_scores - base_scores).abs().clamp_min(1e-12)

