"""timm interoperability: convert a timm ViT to :class:`fastvit.nn.VisionTransformer`, or run a timm model's own
modules on :mod:`fastvit.ops` in place.

timm is imported lazily (only when these functions are called), so fastvit does not depend on it.
Source of the semantics: timm ``models/vision_transformer.py`` and ``layers/{attention,mlp,patch_embed}.py``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from fastvit import ops
from fastvit.nn.layers import _act_mode, attention_core, block_forward, mlp_hidden
from fastvit.nn.vit import VisionTransformer

__all__ = ["from_timm", "patch_timm_"]


def _timm():
    try:
        import timm  # noqa: F401
        import timm.layers
        import timm.models.vision_transformer
    except ImportError as e:  # pragma: no cover
        raise ImportError("fastvit.integrations.timm needs timm (pip install timm)") from e
    return timm


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _orig_type(m: nn.Module) -> type:
    # the timm class behind a module patch_timm_ has swapped to a Fastvit* subclass
    return getattr(m, "_fastvit_orig_cls", type(m))


def _p(m: Optional[nn.Module], attr: str = "p") -> float:
    return 0.0 if _is_identity(m) else float(getattr(m, attr))


# ----------------------------------------------------------------------------------------------- from_timm
def from_timm(model: nn.Module) -> VisionTransformer:
    """A :class:`fastvit.nn.VisionTransformer` with a timm ViT's configuration and a copy of its weights.

    The configuration is read off the timm model's attributes and modules (sizes, biases, qk-norm, LayerScale,
    prefix tokens, norms and their eps, activation, pooling, dropout rates); the weights are loaded with
    ``load_state_dict(strict=True)``. The result is on the timm model's device and dtype, in its train/eval mode,
    and gives its outputs (fp32 eager: bit for bit up to float reassociation).

    Args:
        model: a ``timm.models.vision_transformer.VisionTransformer`` (e.g. from ``timm.create_model('vit_...')``).

    Returns:
        The fastvit model.

    Raises:
        ValueError: ``model`` is not a plain timm ``VisionTransformer`` (another architecture, a distilled or
            hybrid/conv-stem ViT), or uses something fastvit does not implement (attention pooling ``'map'``,
            ``'max'`` / ``'avgmax'`` pooling, RMSNorm, SwiGLU, parallel / res-post blocks, patch-embed norm or
            dynamic padding, differing LayerNorm eps, QK/scale norms other than LayerNorm). The message names it.
    """
    _timm()
    from timm.layers import Attention as TAttention
    from timm.layers import LayerScale as TLayerScale
    from timm.layers import Mlp as TMlp
    from timm.layers import PatchEmbed as TPatchEmbed
    from timm.models.vision_transformer import Block as TBlock
    from timm.models.vision_transformer import VisionTransformer as TViT

    if type(model) is not TViT:
        raise ValueError(
            f"from_timm supports timm.models.vision_transformer.VisionTransformer only, got {type(model).__name__}"
        )
    pe = model.patch_embed
    if _orig_type(pe) is not TPatchEmbed:
        raise ValueError(f"from_timm: unsupported patch embedding {type(pe).__name__} (hybrid / conv stems are not supported)")
    if not _is_identity(pe.norm):
        raise ValueError("from_timm: patch_embed.norm (embed_norm_layer) is not supported")
    if getattr(pe, "dynamic_img_pad", False):
        raise ValueError("from_timm: dynamic_img_pad=True is not supported")
    if pe.img_size is None:
        raise ValueError("from_timm: patch_embed.img_size=None is not supported")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"from_timm: attention pooling (global_pool={model.global_pool!r}) is not supported")
    if model.global_pool not in ("token", "avg", ""):
        raise ValueError(f"from_timm: global_pool={model.global_pool!r} is not supported (token, avg or '')")
    if getattr(model, "pool_include_prefix", False):
        raise ValueError("from_timm: pool_include_prefix=True is not supported")
    if len(model.blocks) == 0:
        raise ValueError("from_timm: a model with depth 0 is not supported")

    embed_dim = model.embed_dim
    norms = [m for m in (model.norm_pre, model.norm, model.fc_norm) if not _is_identity(m)]
    blk0 = model.blocks[0]
    for i, blk in enumerate(model.blocks):
        if _orig_type(blk) is not TBlock:
            raise ValueError(f"from_timm: blocks.{i} is a {type(blk).__name__}; only timm's Block is supported")
        if _orig_type(blk.attn) is not TAttention:
            raise ValueError(f"from_timm: blocks.{i}.attn is a {type(blk.attn).__name__}; only timm's Attention is supported")
        if _orig_type(blk.mlp) is not TMlp or not isinstance(blk.mlp.fc1, nn.Linear):
            raise ValueError(f"from_timm: blocks.{i}.mlp is a {type(blk.mlp).__name__}; only timm's Mlp (Linear) is supported")
        if getattr(blk.attn, "gate", None) is not None or not _is_identity(getattr(blk.attn, "norm", None)):
            raise ValueError(f"from_timm: blocks.{i}.attn uses gating or scale_norm, which is not supported")
        if not _is_identity(blk.mlp.norm):
            raise ValueError(f"from_timm: blocks.{i}.mlp.norm (scale_mlp_norm) is not supported")
        if blk.attn.head_dim * blk.attn.num_heads != embed_dim:
            raise ValueError(f"from_timm: blocks.{i}.attn has attn_head_dim != embed_dim / num_heads")
        for ls in (blk.ls1, blk.ls2):
            if not _is_identity(ls) and not isinstance(ls, TLayerScale):
                raise ValueError(f"from_timm: blocks.{i} has an unsupported layer scale {type(ls).__name__}")
        try:
            _act_mode(blk.mlp.act)
        except ValueError as e:
            raise ValueError(f"from_timm: blocks.{i}.mlp.act: {e}") from None
        norms += [blk.norm1, blk.norm2] + [m for m in (blk.attn.q_norm, blk.attn.k_norm) if not _is_identity(m)]
    for m in norms:
        if not isinstance(m, nn.LayerNorm):
            raise ValueError(f"from_timm: norm layer {type(m).__name__} is not supported (LayerNorm only)")
    eps = {float(m.eps) for m in norms}
    if len(eps) != 1:
        raise ValueError(f"from_timm: LayerNorms with different eps {sorted(eps)} are not supported")
    pre_norm = not _is_identity(model.norm_pre)
    if (pe.proj.bias is None) != pre_norm:
        raise ValueError("from_timm: patch_embed bias must be off exactly when pre_norm is on (timm's rule)")
    if len({type(b.ls1) for b in model.blocks}) != 1 or len({b.attn.q_norm.__class__ for b in model.blocks}) != 1:
        raise ValueError("from_timm: blocks with differing LayerScale / qk_norm settings are not supported")

    ls = blk0.ls1
    dprs = [_p(b.drop_path1, "drop_prob") for b in model.blocks]
    fc_norm_on = not _is_identity(model.fc_norm)
    cfg = dict(
        img_size=pe.img_size,
        patch_size=pe.patch_size,
        in_chans=pe.proj.in_channels,
        num_classes=model.num_classes if not _is_identity(model.head) else 0,
        global_pool=model.global_pool,
        embed_dim=embed_dim,
        depth=len(model.blocks),
        num_heads=blk0.attn.num_heads,
        mlp_ratio=blk0.mlp.fc1.out_features / embed_dim,
        qkv_bias=blk0.attn.qkv.bias is not None,
        qk_norm=not _is_identity(blk0.attn.q_norm),
        proj_bias=blk0.attn.proj.bias is not None,
        init_values=(float(ls.init_values) or 1e-5) if not _is_identity(ls) else None,
        class_token=model.cls_token is not None,
        pos_embed="learn" if model.pos_embed is not None else "none",
        no_embed_class=model.no_embed_class,
        reg_tokens=model.num_reg_tokens,
        pre_norm=pre_norm,
        final_norm=fc_norm_on or not _is_identity(model.norm),
        fc_norm=fc_norm_on,
        dynamic_img_size=model.dynamic_img_size,
        drop_rate=_p(model.head_drop),
        pos_drop_rate=_p(model.pos_drop),
        patch_drop_rate=_p(model.patch_drop, "prob"),
        proj_drop_rate=_p(blk0.attn.proj_drop),
        attn_drop_rate=_p(blk0.attn.attn_drop),
        drop_path_rate=max(dprs),
        norm_eps=eps.pop(),
        act_layer=_act_mode(blk0.mlp.act),
        weight_init="skip",
    )
    if int(cfg["mlp_ratio"] * embed_dim) != blk0.mlp.fc1.out_features:
        raise ValueError(f"from_timm: MLP hidden width {blk0.mlp.fc1.out_features} is not int(embed_dim * mlp_ratio)")
    # Build on the meta device (no random init to throw away), then take copies of timm's tensors.
    out = VisionTransformer(**cfg, device="meta")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.load_state_dict(state, strict=True, assign=True)
    out.train(model.training)
    return out


# ----------------------------------------------------------------------------------------------- patch_timm_
_PATCHED: Dict[type, type] = {}


def _patch_embed_forward(self, x: torch.Tensor) -> torch.Tensor:
    if getattr(self, "dynamic_img_pad", False) or not _is_identity(self.norm) or not isinstance(x, torch.Tensor) or x.dim() != 4:
        return self._fastvit_orig_cls.forward(self, x)
    B, C, H, W = x.shape
    if self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
        raise ValueError(
            f"x has image size {H}x{W} but the model's img_size is {tuple(self.img_size)}; expected shape "
            f"(B, {C}, {self.img_size[0]}, {self.img_size[1]})"
        )
    out = ops.patch_embed(x, self.proj.weight, self.proj.bias)  # (B, Np, E); checks channels / divisibility
    if self.flatten:
        return out
    gh, gw = H // self.patch_size[0], W // self.patch_size[1]
    fmt = getattr(self.output_fmt, "value", str(self.output_fmt))
    out = out.reshape(B, gh, gw, -1)
    if fmt == "NHWC":
        return out
    if fmt == "NCHW":
        return out.permute(0, 3, 1, 2)
    if fmt == "NLC":
        return out.reshape(B, gh * gw, -1)
    return self._fastvit_orig_cls.forward(self, x)


def _attn_supported(m: nn.Module) -> bool:
    norms_ok = all(_is_identity(n) or isinstance(n, nn.LayerNorm) for n in (m.q_norm, m.k_norm, getattr(m, "norm", None)))
    return getattr(m, "gate", None) is None and norms_ok


def _attention_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    if attn_mask is not None or is_causal or not _attn_supported(self):
        return self._fastvit_orig_cls.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    return self.proj_drop(self.proj(attention_core(self, x)))


def _mlp_supported(m: nn.Module) -> bool:
    try:
        _act_mode(m.act)
    except ValueError:
        return False
    return isinstance(m.fc1, nn.Linear) and isinstance(m.fc2, nn.Linear) and (_is_identity(m.norm) or isinstance(m.norm, nn.LayerNorm))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _mlp_supported(self):
        return self._fastvit_orig_cls.forward(self, x)
    return self.drop2(self.fc2(mlp_hidden(self, x)))


def _block_supported(m: nn.Module) -> bool:
    from timm.layers import Attention as TAttention
    from timm.layers import Mlp as TMlp

    if not (isinstance(m.norm1, nn.LayerNorm) and isinstance(m.norm2, nn.LayerNorm)):
        return False
    if getattr(m.attn, "_fastvit_orig_cls", type(m.attn)) is not TAttention or not _attn_supported(m.attn):
        return False
    if getattr(m.mlp, "_fastvit_orig_cls", type(m.mlp)) is not TMlp or not _mlp_supported(m.mlp):
        return False
    return all(_is_identity(ls) or isinstance(getattr(ls, "gamma", None), torch.Tensor) for ls in (m.ls1, m.ls2))


def _block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    if attn_mask is not None or is_causal or not _block_supported(self):
        return self._fastvit_orig_cls.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    return block_forward(self, x)


def _layer_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if len(self.normalized_shape) != 1:
        return self._fastvit_orig_cls.forward(self, x)
    return ops.layer_norm(x, self.weight, self.bias, self.eps)


def _patched_class(cls: type, forward) -> type:
    new = _PATCHED.get(cls)
    if new is None:
        name = f"Fastvit{cls.__name__}"
        new = type(name, (cls,), {"forward": forward, "_fastvit_orig_cls": cls, "__module__": __name__})
        _PATCHED[cls] = new
    return new


def patch_timm_(model: nn.Module) -> nn.Module:
    """Run a timm model's ``PatchEmbed``, ``Attention``, ``Mlp``, ViT ``Block`` and ``LayerNorm`` modules on
    :mod:`fastvit.ops`, in place.

    Each matching module's class is swapped for a subclass that overrides only ``forward`` (e.g. ``Attention`` ->
    ``FastvitAttention``); parameters, buffers, ``state_dict`` keys and tensors, hooks and ``isinstance`` checks are
    untouched. Matching is by exact class, so timm variants (``AttentionRope``, ``SwiGLU``, ``ResPostBlock``...) are
    left alone; a patched module falls back to timm's own forward for calls fastvit does not cover (``attn_mask`` /
    ``is_causal``, gated attention, conv MLPs, patch-embed norms or padding). Patching twice is a no-op. Outputs and
    gradients equal the unpatched model's (fp32 eager: bit for bit up to float reassociation).

    Args:
        model: any ``nn.Module`` holding timm layers (typically ``timm.create_model('vit_...')``).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _timm()
    from timm.layers import Attention as TAttention
    from timm.layers import Mlp as TMlp
    from timm.layers import PatchEmbed as TPatchEmbed
    from timm.models.vision_transformer import Block as TBlock

    table = {TPatchEmbed: _patch_embed_forward, TAttention: _attention_forward, TMlp: _mlp_forward, TBlock: _block_forward}
    for m in model.modules():
        cls = type(m)
        if cls in _PATCHED.values():
            continue
        if cls in table:
            m.__class__ = _patched_class(cls, table[cls])
        elif isinstance(m, nn.LayerNorm) and cls.forward in (nn.LayerNorm.forward,) + _timm_layer_norm_forwards():
            m.__class__ = _patched_class(cls, _layer_norm_forward)
    return model


def _timm_layer_norm_forwards() -> tuple:
    from timm.layers import LayerNorm as TLayerNorm

    return (TLayerNorm.forward,)
