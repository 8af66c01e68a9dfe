"""Hugging Face ``transformers`` ViT / ViT-MAE models converted to fastvit modules.

:func:`from_hf` turns

* ``ViTModel``                    into a :class:`fastvit.nn.VisionTransformer` with ``num_classes=0``,
* ``ViTForImageClassification``   into a :class:`fastvit.nn.VisionTransformer` with a classifier head,
* ``ViTMAEForPreTraining``        into a :class:`fastvit.nn.MaskedAutoencoderViT`,

copying the weights (q / k / v projections concatenated into timm's packed ``qkv``) and the configuration
(``layer_norm_eps``, ``qkv_bias``, ``hidden_act``, sizes). Both transformers 4.x module names
(``encoder.layer.{i}.attention.attention.query``, ``intermediate.dense``, ``output.dense`` ...) and the 5.x names
(``layers.{i}.attention.q_proj``, ``mlp.fc1`` ...) are recognised; see :func:`convert_hf_state_dict`.

For Hugging Face models kept as they are, with only their attention on fastvit (DINOv2, SigLIP, CLIP, ViT-MAE, the
vision towers of VLMs, ...), :func:`register_attention` adds ``attn_implementation="fastvit"`` (and
``"fastvit_flash"`` for towers that pass packed sequences only to FlashAttention-style implementations), and
:func:`attention_report` says which attention modules of a model run on fastvit and why the others do not; they live
in :mod:`fastvit.integrations.hf_attention` and are re-exported here.

Sources: Dosovitskiy et al. (2021, arXiv:2010.11929) and transformers' ``models/vit/modeling_vit.py``; He et al.
(2022, arXiv:2111.06377) and ``models/vit_mae/modeling_vit_mae.py``; timm's ``VisionTransformer`` parameter names.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from fastvit.integrations.hf_attention import (
    ATTN_IMPLEMENTATION,
    FLASH_ATTN_IMPLEMENTATION,
    AttentionRecord,
    FastvitAttentionFallbackWarning,
    FastvitAttentionNotCoveredWarning,
    attention_report,
    fastvit_attention_forward,
    format_attention_report,
    register_attention,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FLASH_ATTN_IMPLEMENTATION",
    "AttentionRecord",
    "FastvitAttentionFallbackWarning",
    "FastvitAttentionNotCoveredWarning",
    "attention_report",
    "convert_hf_state_dict",
    "fastvit_attention_forward",
    "format_attention_report",
    "from_hf",
    "hf_config_kwargs",
    "register_attention",
]

#: HF ``hidden_act`` names -> fastvit activation. Every entry computes the same function as HF's (erf GELU, the
#: tanh approximation in its several spellings, or x·sigmoid(1.702x)); anything else is rejected.
_ACTS: Dict[str, str] = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}

_ARCHS = ("ViTModel", "ViTForImageClassification", "ViTMAEForPreTraining")

# Per-layer parameter names: fastvit/timm name <- (transformers 4.x name, transformers 5.x name).
_LAYER_NAMES: Dict[str, Tuple[str, ...]] = {
    "q": ("attention.attention.query", "attention.q_proj"),
    "k": ("attention.attention.key", "attention.k_proj"),
    "v": ("attention.attention.value", "attention.v_proj"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
    "norm1": ("layernorm_before",),
    "norm2": ("layernorm_after",),
}
_LAYER_LOOKUP = {hf: ours for ours, names in _LAYER_NAMES.items() for hf in names}
_ENCODER_LAYER = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_DECODER_LAYER = re.compile(r"^decoder\.decoder_layers?\.(\d+)\.(.+)\.(weight|bias)$")

# Whole-model names (after the ``vit.`` prefix is stripped): fastvit name <- HF name.
_ENCODER_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_DECODER_NAMES = {
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
# HF parameters with no counterpart, dropped on purpose: ViTModel's pooler (dense + tanh on the cls token) and
# the mask token ViTModel(use_mask_token=True) uses for bool_masked_pos.
_DROPPED = re.compile(r"^(?:pooler\.dense\.(?:weight|bias)|embeddings\.mask_token)$")


# ----------------------------------------------------------------------------------------------- config
def _cfg(config: object, name: str, default: object = None, required: bool = True) -> object:
    if hasattr(config, name):
        return getattr(config, name)
    if required:
        raise ValueError(f"config has no field {name!r}; is this a ViTConfig / ViTMAEConfig?")
    return default


def _pair(config: object, name: str) -> Tuple[int, int]:
    v = _cfg(config, name)
    if isinstance(v, Iterable) and not isinstance(v, (str, bytes)):
        v = tuple(v)
        if len(v) != 2:
            raise ValueError(f"config.{name} must be an int or a pair of ints, got {v!r}")
        out = (v[0], v[1])
    else:
        out = (v, v)
    if any(isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in out):
        raise ValueError(f"config.{name} must be a positive int or a pair of positive ints, got {v!r}")
    return out


def _act(config: object) -> str:
    act = _cfg(config, "hidden_act")
    if not isinstance(act, str) or act not in _ACTS:
        raise ValueError(f"config.hidden_act={act!r} is not supported; fastvit runs {sorted(_ACTS)} (GELU variants)")
    return _ACTS[act]


def _ratio(hidden: int, intermediate: int, hidden_name: str, inter_name: str) -> float:
    if isinstance(intermediate, bool) or not isinstance(intermediate, int) or intermediate < 1:
        raise ValueError(f"config.{inter_name} must be a positive int, got {intermediate!r}")
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:  # timm's Mlp width is int(dim * mlp_ratio)
        raise ValueError(
            f"config.{inter_name}={intermediate} cannot be expressed as int({hidden_name} * mlp_ratio) with "
            f"{hidden_name}={hidden}"
        )
    return ratio


def _heads(config: object, hidden_name: str, heads_name: str, head_dim_name: Optional[str]) -> Tuple[int, int]:
    hidden = _cfg(config, hidden_name)
    heads = _cfg(config, heads_name)
    for n, v in ((hidden_name, hidden), (heads_name, heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config.{n} must be a positive int, got {v!r}")
    if hidden % heads:
        raise ValueError(f"config.{hidden_name}={hidden} must be divisible by config.{heads_name}={heads}")
    if head_dim_name is not None:
        head_dim = getattr(config, head_dim_name, None)
        if head_dim is not None and head_dim * heads != hidden:
            raise ValueError(
                f"config.{head_dim_name}={head_dim} must equal {hidden_name} / {heads_name} = {hidden // heads}; "
                "fastvit's attention width is the token width"
            )
    return hidden, heads


def hf_config_kwargs(config: object, arch: str) -> dict:
    """Constructor arguments of the fastvit model equivalent to a Hugging Face ViT / ViT-MAE config.

    Args:
        config: a ``transformers.ViTConfig`` (``arch`` ``'ViTModel'`` / ``'ViTForImageClassification'``) or
            ``ViTMAEConfig`` (``'ViTMAEForPreTraining'``); anything with those attributes.
        arch: one of ``'ViTModel'``, ``'ViTForImageClassification'``, ``'ViTMAEForPreTraining'``.

    Returns:
        kwargs for :class:`fastvit.nn.VisionTransformer` or :class:`fastvit.nn.MaskedAutoencoderViT`.
        ``layer_norm_eps`` becomes ``norm_eps``; ``hidden_act`` becomes ``act_layer``; ``intermediate_size`` /
        ``hidden_size`` becomes ``mlp_ratio``; ``qkv_bias`` is carried; dropout probabilities become timm's
        ``pos_drop_rate`` / ``proj_drop_rate`` / ``attn_drop_rate`` (ViT only).

    Raises:
        ValueError: unknown ``arch``; a field fastvit cannot represent, named in the message -- ``hidden_act``
            other than a GELU variant, ``image_size`` not divisible by ``patch_size``, a non-square ``patch_size``
            or ``image_size`` for MAE, ``hidden_size`` not divisible by ``num_attention_heads``, a ``head_dim``
            other than ``hidden_size / num_attention_heads``, an ``intermediate_size`` not of the form
            ``int(hidden_size * r)``.
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
    act = _act(config)
    image_size = _pair(config, "image_size")
    patch_size = _pair(config, "patch_size")
    if image_size[0] % patch_size[0] or image_size[1] % patch_size[1]:
        raise ValueError(f"config.image_size={image_size} must be divisible by config.patch_size={patch_size}")
    hidden, heads = _heads(config, "hidden_size", "num_attention_heads", "head_dim")
    kwargs = dict(
        in_chans=_cfg(config, "num_channels"),
        embed_dim=hidden,
        depth=_cfg(config, "num_hidden_layers"),
        num_heads=heads,
        mlp_ratio=_ratio(hidden, _cfg(config, "intermediate_size"), "hidden_size", "intermediate_size"),
        norm_eps=float(_cfg(config, "layer_norm_eps")),
        qkv_bias=bool(_cfg(config, "qkv_bias", True, required=False)),
        act_layer=act,
    )
    hidden_p = float(_cfg(config, "hidden_dropout_prob", 0.0, required=False) or 0.0)
    attn_p = float(_cfg(config, "attention_probs_dropout_prob", 0.0, required=False) or 0.0)
    if arch == "ViTMAEForPreTraining":
        if patch_size[0] != patch_size[1]:
            raise ValueError(f"config.patch_size={patch_size} must be square for ViT-MAE (patchify / loss use P x P)")
        if image_size[0] != image_size[1]:
            raise ValueError(f"config.image_size={image_size} must be square for ViT-MAE (its sin-cos grid is square)")
        d_hidden, d_heads = _heads(config, "decoder_hidden_size", "decoder_num_attention_heads", None)
        kwargs.update(
            img_size=image_size[0],
            patch_size=patch_size[0],
            decoder_embed_dim=d_hidden,
            decoder_depth=_cfg(config, "decoder_num_hidden_layers"),
            decoder_num_heads=d_heads,
            decoder_mlp_ratio=_ratio(
                d_hidden, _cfg(config, "decoder_intermediate_size"), "decoder_hidden_size", "decoder_intermediate_size"
            ),
            norm_pix_loss=bool(_cfg(config, "norm_pix_loss", False, required=False)),
        )
        if hidden_p or attn_p:
            warnings.warn(
                "config.hidden_dropout_prob / attention_probs_dropout_prob are non-zero, but MaskedAutoencoderViT "
                "(like the official MAE) has no dropout; training-mode outputs will differ from Hugging Face's",
                stacklevel=3,
            )
        return kwargs
    num_classes = 0
    if arch == "ViTForImageClassification":
        num_classes = int(_cfg(config, "num_labels"))
    kwargs.update(
        img_size=image_size,
        patch_size=patch_size if patch_size[0] != patch_size[1] else patch_size[0],
        num_classes=num_classes,
        global_pool="token",
        class_token=True,
        pos_drop_rate=hidden_p,
        proj_drop_rate=hidden_p,
        attn_drop_rate=attn_p,
    )
    return kwargs


# ----------------------------------------------------------------------------------------------- weights
def _layer_key(block_prefix: str, i: str, sub: str, kind: str, key: str) -> str:
    ours = _LAYER_LOOKUP.get(sub)
    if ours is None:
        raise ValueError(f"unrecognised Hugging Face parameter {key!r} (layer sub-module {sub!r})")
    return f"{block_prefix}.{int(i)}.{ours}.{kind}"


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor], arch: str) -> Dict[str, torch.Tensor]:
    """Rename (and pack) a Hugging Face ViT / ViT-MAE ``state_dict`` into fastvit's (timm's / MAE's) names.

    Recognises transformers 4.x names (``encoder.layer.{i}.attention.attention.{query,key,value}``,
    ``attention.output.dense``, ``intermediate.dense``, ``output.dense``) and 5.x names
    (``layers.{i}.attention.{q,k,v,o}_proj``, ``mlp.fc1``, ``mlp.fc2``); ``layernorm_before`` / ``layernorm_after``
    become ``norm1`` / ``norm2``; each layer's q, k, v weights (3 x (C, C)) and biases are concatenated, in that
    order, into ``qkv`` ((3C, C), (3C,)). ViTModel's ``pooler`` and ``embeddings.mask_token`` are dropped.

    Args:
        state_dict: the HF model's ``state_dict()``; keys with or without the ``vit.`` prefix.
        arch: ``'ViTModel'``, ``'ViTForImageClassification'`` or ``'ViTMAEForPreTraining'``.

    Returns:
        A new dict (tensors shared, q/k/v concatenated into new tensors) with fastvit's keys.

    Raises:
        ValueError: unknown ``arch``; a key that is not recognised (listed in the message, nothing is dropped
            silently); a layer with only some of q, k, v (or their biases).
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
    mae = arch == "ViTMAEForPreTraining"
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, int, str], Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        name = key[4:] if key.startswith("vit.") else key
        if name in _ENCODER_NAMES:
            out[_ENCODER_NAMES[name]] = value
            continue
        if mae and name in _DECODER_NAMES:
            out[_DECODER_NAMES[name]] = value
            continue
        if not mae and arch == "ViTForImageClassification" and name in ("classifier.weight", "classifier.bias"):
            out["head." + name.split(".")[1]] = value
            continue
        if _DROPPED.match(name):
            continue
        m = _ENCODER_LAYER.match(name)
        block = "blocks"
        if m is None and mae:
            m = _DECODER_LAYER.match(name)
            block = "decoder_blocks"
        if m is None:
            unknown.append(key)
            continue
        i, sub, kind = m.groups()
        ours = _layer_key(block, i, sub, kind, key)
        head = ours.split(".")[2]
        if head in ("q", "k", "v"):
            qkv.setdefault((block, int(i), kind), {})[head] = value
        else:
            out[ours] = value
    if unknown:
        raise ValueError(f"unrecognised Hugging Face parameters for {arch}: {unknown}")
    for (block, i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{block}.{i}: found only {sorted(parts)} of the q / k / v {kind}s")
        out[f"{block}.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ----------------------------------------------------------------------------------------------- models
def _arch_of(model: object) -> str:
    names = [c.__name__ for c in type(model).__mro__]
    for arch in _ARCHS:
        if arch in names:
            return arch
    raise TypeError(f"from_hf supports transformers' {', '.join(_ARCHS)}, got {type(model).__name__}")


def from_hf(model: nn.Module) -> nn.Module:
    """Build the fastvit model equivalent to a Hugging Face ViT / ViT-MAE model, with its weights.

    * ``ViTModel`` -> :class:`fastvit.nn.VisionTransformer` with ``num_classes=0``:
      ``forward_features(pixel_values)`` equals HF's ``last_hidden_state`` (B, 1 + N, C). ViTModel's pooler
      (``pooler.dense`` + tanh on the cls token, ``pooler_output``) is **not** carried over.
    * ``ViTForImageClassification`` -> :class:`fastvit.nn.VisionTransformer` with ``num_classes=config.num_labels``
      (``head`` = HF's ``classifier``, on the cls token): ``forward(pixel_values)`` equals HF's ``logits``
      (B, num_labels).
    * ``ViTMAEForPreTraining`` -> :class:`fastvit.nn.MaskedAutoencoderViT`: ``forward(imgs, mask_ratio, noise)``
      returns ``(loss, pred, mask)`` equal to HF's ``loss``, ``logits`` (B, N, P·P·C) and ``mask`` (B, N) for the
      same ``noise`` (B, N). HF takes the mask ratio from ``config.mask_ratio``; fastvit takes it as an argument
      (default 0.75) -- pass ``config.mask_ratio`` when it differs. ``norm_pix_loss`` is carried over. The frozen
      sin-cos tables are copied from the HF model, not recomputed (HF 5.x builds them in float64, the official
      code partly in float32).

    Carried from the config: ``layer_norm_eps`` (HF's default 1e-12, not timm's 1e-6), ``qkv_bias``,
    ``hidden_act`` (erf GELU, tanh-approximated GELU variants, quick_gelu), ``num_channels``, sizes, and for ViT
    the dropout probabilities (timm's dropout sits in slightly different places, so only eval-mode outputs match
    exactly). The result is in the HF model's train / eval mode, dtype and device.

    Args:
        model: a ``transformers`` ``ViTModel``, ``ViTForImageClassification`` or ``ViTMAEForPreTraining``
            (transformers 4.x or 5.x module names).

    Returns:
        ``fastvit.nn.VisionTransformer`` or ``fastvit.nn.MaskedAutoencoderViT``.

    Raises:
        TypeError: any other model class.
        ValueError: a config fastvit cannot represent (the message names the field; see :func:`hf_config_kwargs`),
            or a state_dict with unrecognised parameters.

    Example::

        hf = transformers.ViTForImageClassification.from_pretrained("google/vit-base-patch16-224")
        model = fastvit.integrations.from_hf(hf).eval()
        logits = model(pixel_values)
    """
    arch = _arch_of(model)
    kwargs = hf_config_kwargs(model.config, arch)
    state = convert_hf_state_dict(model.state_dict(), arch)
    if arch == "ViTMAEForPreTraining":
        from fastvit.nn.mae import MaskedAutoencoderViT

        ours = MaskedAutoencoderViT(**kwargs)
    else:
        from fastvit.nn.vit import VisionTransformer

        ours = VisionTransformer(**kwargs, weight_init="skip")
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        ours.to(device=ref.device, dtype=ref.dtype)
    ours.load_state_dict(state, strict=True)
    ours.train(model.training)
    return ours
