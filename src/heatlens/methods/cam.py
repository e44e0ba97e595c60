"""CAM family: class activation maps at a layer, one skeleton and a combine function per variant.

``cam_method(name, combine)`` builds a registered method that captures the activations (and, for
gradient CAMs, the gradients of the explained score) at ``layer`` through hooks removed in
``finally``, maps them to (N,K,h,w), calls ``combine(acts, grads, ctx) -> (N,1,h,w)`` and applies
the ReLU of Selvaraju et al. (``relu=False`` keeps the signed map). Attributions stay coarse
(N,1,h,w); ``Explanation.maps()`` upsamples them bilinearly to the input size.

Layers: a dotted name (``"features.12"``), a module, or ``None``: the last layer whose output is a
spatial map the prediction depends on (see ``find_layer``). Token outputs (N, 1+h*w, D) of vision
transformers are turned into (N,D,h,w) here: leading non-patch tokens dropped, grid inferred from
the token count and the input's aspect ratio. Keras models (channels-last) give (N,h,w,C) maps,
read as such.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batching import map_batches
from ..explanation import Explanation
from ..models.adapter import Classifier, target_scores
from ..models.hooks import resolve_layer, tap, trace_layers
from ..targets import TargetLike
from ..validation import check_choice
from ._autograd import Prepared, prepare, score_gradients, scores_over, take_recorded
from .gradient import explanation
from .registry import METHODS, get_method, register

__all__ = [
    "cam_method", "find_layer", "gradcam", "gradcam_pp", "xgradcam", "hirescam", "layercam",
    "scorecam", "ablationcam", "eigencam", "guided_gradcam",
]

LayerLike = str | nn.Module | None
# The automatic layer found per model (weakly keyed: forgotten with the model).
_auto_layers: weakref.WeakKeyDictionary[nn.Module, Site] = weakref.WeakKeyDictionary()
# Leading tokens that are not patches, in order of preference: class token (ViT), none, class + distillation (DeiT).
_TOKEN_SKIPS = (1, 0, 2)


# --- where a CAM looks ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """A layer to explain: its user-facing name, the module, which call of it per forward (None: last)."""

    name: str
    module: nn.Module
    call: int | None = None


@dataclass(frozen=True)
class Layout:
    """How a layer's output (B,...) maps to (B,K,h,w): "nchw", "nhwc" (Keras), "tokens" (B,T,D) or
    "windows" (Swin's (B*nW, window*window, D) attention windows of an h x w map, cyclically shifted by
    ``shift`` and padded to whole windows)."""

    kind: str
    grid: tuple[int, int]
    skip: int = 0
    window: int = 0
    shift: int = 0

    def to_map(self, out: Tensor) -> Tensor:
        """(B,...) layer output -> (B,K,h,w)."""
        if self.kind == "nchw":
            return out
        if self.kind == "nhwc":
            return out.permute(0, 3, 1, 2)
        if self.kind == "windows":
            return self._unwindow(out)
        return out[:, self.skip:].transpose(1, 2).reshape(out.shape[0], -1, *self.grid)

    def _unwindow(self, out: Tensor) -> Tensor:
        # Swin's window_partition read backwards: (b, i, j, r, c, D) -> (b, D, i*ws + r, j*ws + c), then the
        # cyclic shift undone (Swin rolls by -shift before partitioning) and the padding cut off
        ws, (h, w) = self.window, self.grid
        rows, cols = -(-h // ws), -(-w // ws)
        if out.dim() != 3 or out.shape[1] != ws * ws or out.shape[0] % (rows * cols):
            raise ValueError(f"a windowed layer's output of shape {tuple(out.shape)} does not tile {rows}x{cols} "
                             f"windows of {ws}x{ws} tokens")
        maps = out.reshape(-1, rows, cols, ws, ws, out.shape[-1]).permute(0, 5, 1, 3, 2, 4)
        maps = maps.reshape(maps.shape[0], maps.shape[1], rows * ws, cols * ws)
        if self.shift:
            maps = torch.roll(maps, shifts=(self.shift, self.shift), dims=(2, 3))
        return maps[:, :, :h, :w]

    def take(self, out: Tensor, images: Tensor) -> Tensor:
        """The rows of ``out`` (B,...) that belong to ``images`` (M,): all their windows for "windows"."""
        if self.kind != "windows":
            return out[images]
        n_win = -(-self.grid[0] // self.window) * -(-self.grid[1] // self.window)
        return out.view(-1, n_win, *out.shape[1:])[images].flatten(0, 1)

    def zero_channel(self, out: Tensor, channels: Tensor) -> Tensor:
        """A copy of ``out`` with channel ``channels[b]`` of row b zeroed (patch tokens only for tokens);
        rows with a negative entry are left whole."""
        rows = (channels >= 0).nonzero()[:, 0]
        out, channels = out.clone(), channels[rows]
        if self.kind == "nchw":
            out[rows, channels] = 0
        elif self.kind == "nhwc":
            out[rows, :, :, channels] = 0
        elif self.kind == "windows":  # every window of image b
            n_win = -(-self.grid[0] // self.window) * -(-self.grid[1] // self.window)
            win = (rows[:, None] * n_win + torch.arange(n_win, device=rows.device)).flatten()
            out[win, :, channels.repeat_interleave(n_win)] = 0
        else:
            out[rows, self.skip:, channels] = 0
        return out


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, tuple[int, int]] | None:
    """(leading tokens to drop, (h, w)) so that h*w patch tokens tile an input of ``size`` (H, W).

    An exact aspect match (h*W == w*H) wins over an approximate one (patch grids of sizes that do
    not divide evenly), then the order of ``_TOKEN_SKIPS``. None when no grid fits within 10%.
    """
    height, width = size
    best: tuple[float, int, tuple[int, int]] | None = None
    for rank, skip in enumerate(_TOKEN_SKIPS):
        n = tokens - skip
        for h in (d for d in range(1, n + 1) if n >= 2 and n % d == 0):
            w = n // h
            error = abs(math.log((h * width) / (w * height)))
            if error == 0:
                return skip, (h, w)
            if error < 0.1 and (best is None or (error, rank) < best[:2]):
                best = (error, rank, (h, w))
    return None if best is None else (_TOKEN_SKIPS[best[1]], best[2])


def token_layout(tokens: int, model: Classifier) -> Layout | None:
    """The patch grid of a (B, tokens, D) output: the model's declared leading non-patch tokens first
    (``token_prefix``, set for Hugging Face models: class, distillation and register tokens), then
    ``token_grid``'s guess. None when no grid fits."""
    size = model.input_size[1:]
    prefix = getattr(model, "token_prefix", None)
    if prefix is not None and tokens > prefix:
        n, (height, width) = tokens - prefix, size
        h = round(math.sqrt(n * height / width))
        for rows in (h, h - 1, h + 1):  # exact factorisation closest to the input's aspect
            if rows >= 1 and n % rows == 0 and abs(math.log((rows * width) / ((n // rows) * height))) < 0.1:
                return Layout("tokens", (rows, n // rows), prefix)
    found = token_grid(tokens, size)
    return None if found is None else Layout("tokens", found[1], found[0])


def layout_of(out: Tensor, model: Classifier, name: str = "layer") -> Layout:
    """Read a layer's output (B,...) as a spatial map; ValueError naming the layer otherwise."""
    if out.dim() == 4:
        kind = "nhwc" if model.layout == "NHWC" else "nchw"
        grid = tuple(out.shape[1:3]) if kind == "nhwc" else tuple(out.shape[2:])
        if grid[0] * grid[1] >= 2:
            return Layout(kind, grid)  # type: ignore[arg-type]
    elif out.dim() == 3:
        declared = (getattr(model, "layer_layouts", None) or {}).get(_public(name))
        if declared is not None:  # e.g. Swin's windowed attention (models.hf)
            return declared(out)
        found = token_layout(out.shape[1], model)
        if found is not None:
            return found
    raise ValueError(
        f"layer {name!r} outputs a tensor of shape {tuple(out.shape)}, which is not a spatial feature map "
        "(N,C,h,w) with h*w > 1 nor a token sequence (N,[1+]h*w,D) matching the input's aspect ratio; "
        "pick an earlier layer (layer=None finds one)"
    )


def find_layer(model: Classifier, x: Tensor, target: Tensor) -> Site:
    """The layer a CAM looks at by default, from one traced forward and backward of ``x[:1]``.

    Candidates are layer outputs that are spatial maps (4-D with h, w > 1, or patch tokens) on which
    the target score depends at two or more positions ("alive": this skips a ViT's last patch
    tokens, which no longer reach the class token). The last alive token output is chosen when the
    model has any (transformers), otherwise the last alive feature map (the one before global pooling).
    """
    x1 = x[:1].detach().clone().requires_grad_(True)
    found: list[tuple[str, int, Tensor, Layout]] = []

    def candidates() -> list[Tensor]:
        for name, call, out in calls:
            if out.requires_grad and out.shape[0] == 1 and out.dim() in (3, 4):
                try:
                    lay = layout_of(out, model, name)
                except ValueError:
                    continue
                if min(lay.grid) > 1 or lay.kind == "tokens":
                    found.append((name, call, out, lay))
        return [c[2] for c in found]

    with torch.enable_grad(), trace_layers(model) as calls:
        grads, _ = score_gradients(model, x1, target[:1], candidates)
    alive = [(c, g) for c, g in zip(found, grads) if g is not None and _positions(c[3], g) >= 2]
    tokens = [c for c, _ in alive if c[3].kind == "tokens"]
    pick = tokens[-1] if tokens else (alive[-1][0] if alive else None)
    if pick is None:
        raise ValueError("layer=None found no spatial feature map the prediction depends on; pass layer= explicitly")
    name, call, _, _ = pick
    n_calls = sum(1 for n, _, _ in calls if n == name)
    return Site(_public(name), resolve_layer(model, name)[1], None if call == n_calls - 1 else call)


def _positions(lay: Layout, grads: Tensor) -> int:
    """Number of spatial positions where the gradient is non-zero."""
    return int((lay.to_map(grads).abs().sum(1) > 0).sum())


def _public(name: str) -> str:
    """A layer name as the user writes it (without the Classifier's ``net.`` prefix)."""
    return name[4:] if name.startswith("net.") else name


def resolve_site(p: Prepared, layer: LayerLike) -> Site:
    """``layer`` (name, module, None) -> Site; unknown names raise with the closest valid ones."""
    site = known_site(p.model, layer)
    if site is None:  # one trace per model: repeated calls (smoothing, sanity checks) reuse it
        site = _auto_layers[p.model.net] = find_layer(p.model, p.x, p.targets)
    return site


def known_site(model: Classifier, layer: LayerLike) -> Site | None:
    """The Site of an explicit ``layer``, or of the automatic layer already found for this model while
    it is still there; None when finding it needs a traced pass (``find_layer``)."""
    if model.net is None:
        raise TypeError("CAM methods hook a layer, but model is a black-box predict function; wrap the nn.Module instead")
    if layer is None:
        cached = _auto_layers.get(model.net)  # per net: a fresh wrapper of the same module reuses it
        return cached if cached is not None and _layer_or_none(model, cached.name) is cached.module else None
    name, module = resolve_layer(model, layer)
    return Site(_public(name), module)


def _layer_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return resolve_layer(model, name)[1]
    except ValueError:
        return None


def _picked(outputs: list[Tensor], site: Site) -> Tensor:
    """The tapped output of the site's call; ValueError when the layer did not run."""
    if not outputs:
        raise ValueError(f"layer {site.name!r} was not called during the model's forward pass")
    return outputs[-1 if site.call is None else site.call]


# --- the skeleton ---------------------------------------------------------------------------------
@dataclass
class CamContext:
    """What a combine function may need beyond (acts, grads): the prepared call, for extra forward passes.

    extras: diagnostics a combine function adds to the Explanation (e.g. channel weights (N,K)).
    """

    p: Prepared
    site: Site
    output: str
    batch_size: int | None
    layout: Layout | None = None
    native: Tensor | None = None  # the layer's raw outputs (N,...) from the activation pass
    extras: dict[str, Any] = field(default_factory=dict)


Combine = Callable[[Tensor, Tensor | None, CamContext], Tensor]


class _TappedPass:
    """The model's forward with the CAM layer tapped as a gradient leaf: handed to ``prepare(through=)``
    so the clean pass is the CAM's own (one forward in all; the graph starts at the layer)."""

    input_grad = False  # the backward stops at the layer

    def __init__(self, model: Classifier, site: Site) -> None:
        self.model, self.site, self.outputs = model, site, []

    def __call__(self, x: Tensor) -> Tensor:
        with tap(self.site.module, root=self.model, leaf=True) as seen:
            logits = self.model(x)
        self.outputs = seen.outputs
        return logits


def _gradient_cams(ctx: CamContext, combine: Combine, tapped: _TappedPass | None = None) -> Tensor:
    """combine(acts, grads) per engine batch of images -> (N,1,h,w); backward stops at the layer.
    tapped: the pass ``prepare`` ran, reused for the first batch when it covered it."""
    p, site = ctx.p, ctx.site

    def step(start: int, stop: int) -> Tensor:
        recorded = None if tapped is None else take_recorded(tapped, p.x[start:stop])
        if recorded is not None:
            scores = target_scores(recorded[1], p.targets[start:stop], ctx.output, binary=p.model.binary)
            acts = _picked(tapped.outputs, site)
            (grads,) = torch.autograd.grad(scores.sum(), [acts], allow_unused=True)
        else:
            with tap(site.module, root=p.model, leaf=True) as seen:
                (grads,), _ = score_gradients(p.model, p.x[start:stop], p.targets[start:stop],
                                              lambda: [_picked(seen.outputs, site)], ctx.output)
            acts = _picked(seen.outputs, site)
        acts = acts.detach()
        ctx.layout = lay = layout_of(acts, p.model, site.name)
        grads = torch.zeros_like(acts) if grads is None else grads.detach()
        return combine(lay.to_map(acts), lay.to_map(grads), ctx)

    return map_batches(step, p.x.shape[0], batch_size=ctx.batch_size, grad=True, model=p.model,
                       item_shape=p.model.input_size, desc=site.name)


def _activations(ctx: CamContext) -> Tensor:
    """The layer's activations as maps (N,K,h,w), forward only; fixes ``site.call`` to a concrete index."""
    p, site = ctx.p, ctx.site

    def step(start: int, stop: int) -> Tensor:
        with tap(site.module, root=p.model) as seen:
            p.model(p.x[start:stop])
        out = _picked(seen.outputs, site)
        ctx.layout = layout_of(out, p.model, site.name)
        if site.call is None:
            ctx.site = Site(site.name, site.module, len(seen.outputs) - 1)
        return ctx.layout.to_map(out).clone(), out.clone()

    maps, ctx.native = map_batches(step, p.x.shape[0], batch_size=ctx.batch_size, grad=False, model=p.model,
                                   item_shape=p.model.input_size, desc=site.name)
    return maps


def cam_method(name: str, combine: Combine, *, gradients: bool = True, output: str = "logit",
               description: str) -> Callable[..., Explanation]:
    """Register a CAM variant: the skeleton around ``combine(acts, grads, ctx) -> (N,1,h,w)``.

    acts, grads: (N,K,h,w) at the layer (grads None when ``gradients=False``: the method then runs
    forward passes only, through the batching engine with no gradients). output: default explained score.
    """
    default_output = output

    def method(
        model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
        layer: LayerLike = None, relu: bool = True, output: str = default_output, batch_size: int | None = None,
    ) -> Explanation:
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be True or False, got {relu!r}")
        site = known_site(model, layer)
        tapped = _TappedPass(model, site) if gradients and site is not None else None
        p = prepare(model, x, target, output=output, through=tapped)
        ctx = CamContext(p, site or resolve_site(p, layer), output, batch_size)
        cams = _gradient_cams(ctx, combine, tapped) if gradients else combine(_activations(ctx), None, ctx)
        cams = cams.clamp_min(0) if relu else cams
        params = {"layer": ctx.site.name, "relu": relu, "output": output}
        if ctx.site.call is not None and gradients:
            params["layer_call"] = ctx.site.call
        return explanation(p, cams.to(p.x.dtype), name, params, ctx.extras)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = (
        f"{description}.\n\nattributions (N,1,h,w) at ``layer`` (None: ``find_layer``), ReLU'd unless ``relu=False``; "
        "``.maps()`` upsamples bilinearly. params['layer'] names the layer used. See ``heatlens.methods.cam``."
    )
    registered = register(name, family="cam", needs_grad=gradients, description=description)(method)
    registered.combine = combine  # type: ignore[attr-defined]  # methods.multi runs several CAMs from one pass
    return registered


# --- variants: how channels are weighed -----------------------------------------------------------
def _spatial_sum(t: Tensor) -> Tensor:
    return t.sum((2, 3), keepdim=True)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den == 0 (a channel that is zero everywhere carries no weight)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _gradcam(acts: Tensor, grads: Tensor, _ctx: CamContext) -> Tensor:
    # Selvaraju et al.: channel weight = global average of the gradient
    return (grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True)


def _gradcam_pp(acts: Tensor, grads: Tensor, _ctx: CamContext) -> Tensor:
    # Chattopadhyay et al., eq. 19 with exp(score) (higher derivatives as powers of the gradient)
    g2 = grads.pow(2)
    alpha = _safe_div(g2, 2 * g2 + _spatial_sum(acts) * grads.pow(3))
    return (_spatial_sum(alpha * grads.clamp_min(0)) * acts).sum(1, keepdim=True)


def _xgradcam(acts: Tensor, grads: Tensor, _ctx: CamContext) -> Tensor:
    # Fu et al.: weights = sum(A * dS/dA) / sum(A), from the sensitivity and conservation axioms
    return (_safe_div(_spatial_sum(acts * grads), _spatial_sum(acts)) * acts).sum(1, keepdim=True)


def _hirescam(acts: Tensor, grads: Tensor, _ctx: CamContext) -> Tensor:
    # Draelos & Carin: elementwise gradient x activation, summed over channels (no spatial averaging)
    return (grads * acts).sum(1, keepdim=True)


def _layercam(acts: Tensor, grads: Tensor, _ctx: CamContext) -> Tensor:
    # Jiang et al.: positive gradients weigh each location separately
    return (grads.clamp_min(0) * acts).sum(1, keepdim=True)


def _eigencam(acts: Tensor, _grads: None, _ctx: CamContext) -> Tensor:
    """Muhammad & Yeasin: projection of the (h*w, K) activations on their first principal component.

    An SVD's sign is arbitrary; it is fixed so the map correlates positively with the summed
    activations (then with its largest entry positive), so runs and platforms agree.
    """
    n, _, h, w = acts.shape
    a = acts.flatten(2).transpose(1, 2).double()  # (N, h*w, K)
    a = a - a.mean(1, keepdim=True)
    vh = torch.linalg.svd(a, full_matrices=False).Vh  # (N, min, K)
    proj = (a @ vh[:, 0, :, None])[..., 0]  # (N, h*w)
    sign = torch.sign((proj * a.sum(2)).sum(1))
    peak = proj.gather(1, proj.abs().argmax(1, keepdim=True))[:, 0]
    sign = torch.where(sign == 0, torch.sign(peak), sign)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (proj * sign[:, None]).reshape(n, 1, h, w).to(acts.dtype)


def _scorecam(acts: Tensor, _grads: None, ctx: CamContext) -> Tensor:
    """Wang et al.: weight = score of x masked by each upsampled, min-max normalised channel."""
    weights = _masked_scores(ctx, acts)
    ctx.extras["channel_weights"] = weights
    return (weights[..., None, None] * acts).sum(1, keepdim=True)


def _ablationcam(acts: Tensor, _grads: None, ctx: CamContext) -> Tensor:
    """Desai & Ramaswamy: weight = relative drop of the score when the channel is zeroed, (y - y_k) / y."""
    scores = _ablated_scores(ctx, acts.shape[1])
    base = scores[:, -1:]  # (N,1): the score with nothing zeroed, computed the same way as the others
    weights = _safe_div(base - scores[:, :-1], base.expand(-1, acts.shape[1]))
    ctx.extras["channel_weights"] = weights
    return (weights[..., None, None] * acts).sum(1, keepdim=True)


def _masked_scores(ctx: CamContext, acts: Tensor) -> Tensor:
    """Scores (N,K) of x * M_k for every image and channel, M_k the channel upsampled to the input
    and min-max normalised to [0,1]; constant channels (no mask to draw) get weight 0, as in the authors' code."""
    p, k = ctx.p, acts.shape[1]

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(start, stop, device=acts.device)
        img = idx // k
        up = F.interpolate(acts[img, idx % k][:, None], size=p.x.shape[-2:], mode="bilinear", align_corners=False)
        flat = up.flatten(1)
        low, span = flat.amin(1), flat.amax(1) - flat.amin(1)
        mask = _safe_div(up - low.view(-1, 1, 1, 1), span.view(-1, 1, 1, 1).expand_as(up))
        return p.x[img] * mask, p.targets[img]

    scores = scores_over(p.model, acts.shape[0] * k, build, output=ctx.output, batch_size=ctx.batch_size,
                         desc=ctx.site.name).view(-1, k)
    constant = acts.flatten(2).amax(2) == acts.flatten(2).amin(2)
    return scores.masked_fill(constant, 0.0)


def _ablated_scores(ctx: CamContext, k: int) -> Tensor:
    """Scores (N,K+1): column c with channel c of the layer zeroed, the last column with nothing zeroed.

    One (image, column) pair per engine item. The layer's output is replaced by the activations of
    the activation pass (edited), so every column sees the very same upstream numbers and the small
    differences y - y_k do not drown in batch-size-dependent rounding.
    """
    p, site, lay, native = ctx.p, ctx.site, ctx.layout, ctx.native
    assert lay is not None and site.call is not None and native is not None  # set by _activations

    def step(start: int, stop: int) -> Tensor:
        idx = torch.arange(start, stop, device=p.x.device)
        img, channels = idx // (k + 1), idx % (k + 1)
        channels = torch.where(channels == k, -1, channels)

        def ablate(call: int, out: Tensor) -> Tensor:
            return lay.zero_channel(lay.take(native, img), channels) if call == site.call else out

        with tap(site.module, root=p.model, edit=ablate):
            return p.model.score(p.x[img], p.targets[img], ctx.output).float()

    scores = map_batches(step, p.x.shape[0] * (k + 1), batch_size=ctx.batch_size, grad=False, model=p.model,
                         item_shape=p.model.input_size, desc=site.name)
    return scores.view(-1, k + 1)


gradcam = cam_method("gradcam", _gradcam,
                     description="Grad-CAM: activations weighted by spatially averaged gradients (Selvaraju et al., 2017)")
gradcam_pp = cam_method("gradcam_pp", _gradcam_pp,
                        description="Grad-CAM++: positive gradients weighted by higher-order terms (Chattopadhyay et al., 2018)")
xgradcam = cam_method("xgradcam", _xgradcam,
                      description="XGrad-CAM: activation-normalised gradient x activation weights (Fu et al., 2020)")
hirescam = cam_method("hirescam", _hirescam,
                      description="HiResCAM: elementwise gradient x activation summed over channels (Draelos & Carin, 2020)")
layercam = cam_method("layercam", _layercam,
                      description="LayerCAM: activations weighted by their positive gradients per location (Jiang et al., 2021)")
scorecam = cam_method("scorecam", _scorecam, gradients=False, output="probability",
                      description="Score-CAM: channels weighted by the softmax score of the input they mask (Wang et al., 2020)")
ablationcam = cam_method("ablationcam", _ablationcam, gradients=False,
                         description="Ablation-CAM: channels weighted by the score drop when each is zeroed (Desai & Ramaswamy, 2020)")
eigencam = cam_method("eigencam", _eigencam, gradients=False,
                      description="Eigen-CAM: first principal component of the activations, class-agnostic (Muhammad & Yeasin, 2020)")


@register("guided_gradcam", family="cam", needs_grad=True, map_kind="gradient",
          description="Guided Grad-CAM: guided backpropagation times upsampled Grad-CAM (Selvaraju et al., 2017)")
def guided_gradcam(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    layer: LayerLike = None, interpolation: str = "bilinear", output: str = "logit",
    batch_size: int | None = None,
) -> Explanation:
    """Guided Grad-CAM: attributions (N,C,H,W) = guided backprop x Grad-CAM upsampled to the input.

    interpolation: how the coarse Grad-CAM is upsampled: "bilinear" (the paper's, Selvaraju et al.;
    and ``Explanation.maps``) or "nearest" (Captum's ``GuidedGradCam`` default, blocky cell edges).
    extras["gradcam"]: the coarse Grad-CAM (N,1,h,w) used. Needs the ``guided_backprop`` method.
    """
    check_choice(interpolation, "interpolation", ("bilinear", "nearest"))
    if "guided_backprop" not in METHODS:
        raise ValueError("guided_gradcam needs the 'guided_backprop' method (heatlens.methods.propagation), "
                         "which is not registered")
    cam = gradcam(model, x, target, layer=layer, output=output, batch_size=batch_size)
    guided = get_method("guided_backprop")(model, x, cam.targets, output=output, batch_size=batch_size)
    size = tuple(cam.inputs.shape[-2:])
    up = (F.interpolate(cam.attributions, size=size, mode="bilinear", align_corners=False)
          if interpolation == "bilinear" else F.interpolate(cam.attributions, size=size, mode="nearest"))
    p = Prepared(model=model, x=cam.inputs, targets=cam.targets, logits=cam.outputs)
    params = {**cam.params, "interpolation": interpolation, "output": output}
    return explanation(p, guided.attributions * up, "guided_gradcam", params,
                       {"gradcam": cam.attributions})
