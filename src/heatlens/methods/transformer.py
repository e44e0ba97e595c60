"""Transformer family: explanations read from the attention probabilities of a vision transformer.

``attention_rollout`` (Abnar & Zuidema, 2020) multiplies the layers' head-fused attention, each
mixed with the identity for the residual connection (0.5 A + 0.5 I, rows renormalised): it is
class-agnostic. ``attention_relevance`` (Chefer, Gur & Wolf, "Generic Attention-model
Explainability", ICCV 2021, the gradient rule of their CVPR 2021 line of work) weighs each
attention map by the gradient of the explained score: with R = I and, layer by layer from the input,
``A_bar = mean_heads((dS/dA * A)^+)``, ``R <- R + A_bar @ R``.

``legrad`` (Bousselham et al., 2024) reads every chosen layer's tokens through the model's own head
(final layer norm + classifier, a logit lens): S_l = target score of the head applied to layer l's
output, and sums over layers ``mean_heads,queries (dS_l/dA_l)^+``, A_l that layer's attention.

All three return (N,1,h,w) on the patch grid: the class token's row of the final matrix (the mean of all
rows for models without a class token), leading non-patch tokens (class, distillation, registers)
dropped; ``.maps()`` upsamples bilinearly. ``extras["tokens"]`` (N,T) keeps that whole row.

Attention probabilities are read from Hugging Face ViT-style models (``heatlens.wrap(hf_model)``:
ViT, DeiT, DINOv2 with or without registers, BEiT, ...) through hooks on their attention layers,
with eager attention switched on for the call (``models.hf.eager_attention``), so models loaded
with the default ``sdpa`` attention work too. Swin's windowed attention is refused: it is not
global self-attention (use a CAM there). LRP for transformers is not provided.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..batching import map_batches
from ..explanation import Explanation
from ..models.adapter import Classifier
from ..models.hf import attention_layers, eager_attention
from ..models.hooks import _hooks_registered
from ..targets import TargetLike
from ..validation import check_choice
from ._autograd import prepare, score_gradients
from .cam import token_layout
from .gradient import explanation
from .registry import register

__all__ = ["attention_rollout", "attention_relevance", "legrad", "rollout", "chefer_relevance", "recording_attention"]

HEAD_FUSIONS = ("mean", "max", "min")


# --- the maths on attention matrices -------------------------------------------------------------
def fuse_heads(attention: Tensor, head_fusion: str = "mean") -> Tensor:
    """(B,H,T,T) -> (B,T,T): mean, max or min over heads."""
    if head_fusion == "mean":
        return attention.mean(1)
    return attention.amax(1) if head_fusion == "max" else attention.amin(1)


def rollout(attentions: Sequence[Tensor], *, head_fusion: str = "mean", discard_ratio: float = 0.0) -> Tensor:
    """Attention rollout (B,T,T) of per-layer probabilities [(B,H,T,T)] in forward order.

    Per layer: heads fused; the smallest ``discard_ratio`` share of each image's T*T weights set to 0
    (Gildenblat's "discard" denoising; 0 in the paper); ``0.5 A + 0.5 I`` for the residual; rows
    renormalised to sum to 1. Then R = A_L @ ... @ A_1 (computed in float64).
    """
    result = None
    for a in attentions:
        fused = fuse_heads(a.double(), head_fusion)
        if discard_ratio > 0:
            flat = fused.flatten(1)
            k = int(flat.shape[1] * discard_ratio)
            if k:
                drop = flat.topk(k, dim=1, largest=False).indices
                fused = flat.scatter(1, drop, 0.0).view_as(fused)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        mixed = 0.5 * fused + 0.5 * eye
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed if result is None else mixed @ result
    if result is None:
        raise ValueError("attentions is empty: the model ran no attention layer")
    return result


def chefer_relevance(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """Chefer et al.'s relevance (B,T,T): R = I; per layer in forward order
    ``A_bar = mean_heads((grad ⊙ A)^+)`` and ``R <- R + A_bar @ R`` (computed in float64)."""
    relevance = None
    for a, g in zip(attentions, gradients, strict=True):
        weighted = (g.double() * a.double()).clamp_min(0).mean(1)
        if relevance is None:
            relevance = torch.eye(a.shape[-1], dtype=torch.float64, device=a.device).expand_as(weighted).clone()
        relevance = relevance + weighted @ relevance
    if relevance is None:
        raise ValueError("attentions is empty: the model ran no attention layer")
    return relevance


# --- reading attention from the model --------------------------------------------------------------
def _attention_layers(model: Classifier) -> list[tuple[str, nn.Module]]:
    """The model's self-attention layers; TypeError naming a CAM instead when it has none."""
    net = model.net
    layers = attention_layers(net) if net is not None else []
    if not layers:
        kind = type(net).__name__ if net is not None else "a black-box predict function"
        raise TypeError(
            f"transformer methods read the attention probabilities of Hugging Face ViT-style models "
            f"(ViT, DeiT, DINOv2, BEiT: heatlens.wrap(hf_model)); {kind} has no global self-attention layer "
            "they can read (Swin's windowed attention is not one): use a CAM method such as gradcam"
        )
    return layers


@contextmanager
def recording_attention(model: Classifier) -> Iterator[list[Tensor]]:
    """The attention probabilities (B,H,T,T) of every self-attention layer in the latest forward of
    ``model`` inside the block, in call order (in the autograd graph when the forward records one).
    Eager attention is on inside the block; hooks and the attention setting are restored after."""
    net, layers = model.net, _attention_layers(model)
    seen: list[Tensor] = []

    def on_root(_mod: object, _inp: object) -> None:
        seen.clear()

    def on_attention(_mod: object, _inp: object, out: object) -> None:
        weights = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
        if not isinstance(weights, Tensor) or weights.dim() != 4:
            raise RuntimeError(f"attention layer {type(_mod).__name__} returned no (B,H,T,T) attention "
                               "probabilities although eager attention is on")
        seen.append(weights)

    with eager_attention(net), _hooks_registered() as handles:
        handles.append(net.register_forward_pre_hook(on_root))
        handles += [m.register_forward_hook(on_attention) for _, m in layers]
        yield seen


def _checked(seen: list[Tensor], batch: int) -> list[Tensor]:
    shapes = {tuple(a.shape) for a in seen}
    if not seen or len(shapes) != 1 or next(iter(shapes))[0] != batch:
        raise ValueError(f"attention maps of shapes {sorted(shapes)} for {batch} images are not one global "
                         "(B,H,T,T) self-attention per layer; windowed models (Swin) are not supported")
    return seen


def _token_maps(model: Classifier, matrix: Tensor) -> tuple[Tensor, Tensor]:
    """(B,T,T) token-to-token relevance -> (maps (B,1,h,w), the read row (B,T)): the class token's row,
    or the mean row without leading tokens; the patch columns laid out on the patch grid."""
    lay = token_layout(matrix.shape[-1], model)
    if lay is None:
        raise ValueError(f"{matrix.shape[-1]} tokens do not tile the input {model.input_size[1:]} as a patch grid")
    row = matrix[:, 0] if lay.skip > 0 else matrix.mean(1)
    return lay.to_map(row[:, :, None]), row


# --- the methods ---------------------------------------------------------------------------------
def _check_options(head_fusion: str, discard_ratio: float) -> None:
    check_choice(head_fusion, "head_fusion", HEAD_FUSIONS)
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}")


@register("attention_rollout", family="transformer", needs_grad=False,
          description="Attention rollout: product of residual-mixed attention over layers (Abnar & Zuidema, 2020)")
def attention_rollout(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    head_fusion: str = "mean", discard_ratio: float = 0.0, batch_size: int | None = None,
) -> Explanation:
    """Attention rollout (Abnar & Zuidema, 2020): attributions (N,1,h,w), non-negative, class-agnostic
    (``target`` only labels the result). head_fusion: "mean" (paper), "max" or "min" over heads.
    discard_ratio: share of the smallest fused weights zeroed per layer before the residual mix."""
    _check_options(head_fusion, discard_ratio)
    p = prepare(model, x, target)

    def step(start: int, stop: int) -> tuple[Tensor, Tensor]:
        with recording_attention(p.model) as seen:
            p.model(p.x[start:stop])
        return _token_maps(p.model, rollout(_checked(seen, stop - start), head_fusion=head_fusion,
                                            discard_ratio=discard_ratio))

    maps, rows = map_batches(step, p.x.shape[0], batch_size=batch_size, grad=False, model=p.model,
                             item_shape=p.model.input_size, desc="attention_rollout")
    return explanation(p, maps.to(p.x.dtype), "attention_rollout",
                       {"head_fusion": head_fusion, "discard_ratio": discard_ratio}, {"tokens": rows})


@register("attention_relevance", family="transformer", needs_grad=True,
          description="Gradient-weighted attention relevance of transformers (Chefer, Gur & Wolf, 2021)")
def attention_relevance(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    output: str = "logit", batch_size: int | None = None,
) -> Explanation:
    """Chefer, Gur & Wolf (2021): attributions (N,1,h,w), non-negative, class-specific; one
    forward and backward per batch, gradients of the target's score w.r.t. every attention map."""
    p = prepare(model, x, target, output=output, record=False)

    def step(start: int, stop: int) -> tuple[Tensor, Tensor]:
        xb = p.x[start:stop].detach().requires_grad_(True)  # so the attention maps are in the graph
        with recording_attention(p.model) as seen:
            grads, _ = score_gradients(p.model, xb, p.targets[start:stop], lambda: list(seen), output)
            attentions = [a.detach() for a in _checked(seen, stop - start)]
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(attentions, grads)]
        return _token_maps(p.model, chefer_relevance(attentions, grads))

    maps, rows = map_batches(step, p.x.shape[0], batch_size=batch_size, grad=True, model=p.model,
                             item_shape=p.model.input_size, desc="attention_relevance")
    return explanation(p, maps.to(p.x.dtype), "attention_relevance", {"output": output}, {"tokens": rows})


# --- LeGrad: each layer's tokens through the model's head -------------------------------------------
def _lens_parts(model: Classifier) -> tuple[list[nn.Module], nn.Module]:
    """The encoder layers (in order) and the final layer norm the head reads, of a Hugging Face ViT-style
    model (``_can_record_outputs["hidden_states"]`` and ``<base model>.layernorm``)."""
    net = model.net
    records = getattr(type(net), "_can_record_outputs", None) or {}
    spec = records.get("hidden_states")
    target = getattr(spec, "target_class", spec)
    base = getattr(net, getattr(net, "base_model_prefix", ""), None)
    norm = getattr(base, "layernorm", None)
    layers = [m for m in net.modules() if isinstance(target, type) and isinstance(m, target)]
    if not layers or not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity):
        raise TypeError(f"legrad applies the head of a Hugging Face ViT-style model to every layer's tokens; "
                        f"{type(net).__name__} has no encoder layers and final layernorm it can find")
    return layers, norm


@contextmanager
def _through_head(layer: nn.Module, norm: nn.Module) -> Iterator[None]:
    """Inside the block the final norm (and so the head) reads ``layer``'s output instead of the last layer's."""
    seen: dict[str, Tensor] = {}

    def keep(_mod: nn.Module, _inp: Any, out: Any) -> None:
        seen["tokens"] = out[0] if isinstance(out, (tuple, list)) else out

    def swap(_mod: nn.Module, inp: tuple) -> tuple:
        return (seen["tokens"], *inp[1:])

    with _hooks_registered() as handles:
        handles.append(layer.register_forward_hook(keep))
        handles.append(norm.register_forward_pre_hook(swap))
        yield


@register("legrad", family="transformer", needs_grad=True,
          description="LeGrad: positive gradients of each layer's logit-lens score w.r.t. its attention (Bousselham et al., 2024)")
def legrad(
    model: Classifier, x: Tensor, target: TargetLike = "predicted", *,
    layer_index: int = -2, output: str = "logit", batch_size: int | None = None,
) -> Explanation:
    """LeGrad (Bousselham et al., 2024): attributions (N,1,h,w), non-negative, summed over layers
    ``layer_index`` .. last (negative: counted from the end; -2, the authors' default, is the last two).
    Per layer one forward + backward in which the head reads that layer's tokens. Raw sums: the
    authors' min-max scaling is a view (``Explanation.normalize()``)."""
    p = prepare(model, x, target, output=output, record=False)
    _attention_layers(p.model)
    layers, norm = _lens_parts(p.model)
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not -len(layers) <= layer_index < len(layers):
        raise ValueError(f"layer_index must be an int in [{-len(layers)}, {len(layers)}), got {layer_index!r}")
    chosen = range(layer_index % len(layers), len(layers))

    def step(start: int, stop: int) -> tuple[Tensor, Tensor]:
        xb = p.x[start:stop].detach().requires_grad_(True)
        total = None
        for depth in chosen:  # a loop over layers: each needs its own pass with the head moved there
            with recording_attention(p.model) as seen, _through_head(layers[depth], norm):
                (grad,), _ = score_gradients(p.model, xb, p.targets[start:stop],
                                             lambda: [_checked(seen, stop - start)[depth]], output)
            grad = torch.zeros_like(seen[depth]) if grad is None else grad
            part = grad.double().clamp_min(0).mean((1, 2))  # (B,T): mean over heads and query tokens
            total = part if total is None else total + part
        return _token_maps(p.model, total[:, None, :])

    maps, rows = map_batches(step, p.x.shape[0], batch_size=batch_size, grad=True, model=p.model,
                             item_shape=p.model.input_size, desc="legrad")
    return explanation(p, maps.to(p.x.dtype), "legrad", {"layer_index": layer_index, "output": output},
                       {"tokens": rows})
