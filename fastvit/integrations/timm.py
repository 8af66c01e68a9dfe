"""timm interoperability: convert a timm ViT to :class:`fastvit.nn.VisionTransformer`, or run a timm model's own
modules on :mod:`fastvit.ops` in place.

timm is imported lazily (only when these functions are called), so fastvit does not depend on it.
Source of the semantics: timm ``models/vision_transformer.py``, ``models/naflexvit.py`` (NaFlexVit, packed here) and
``layers/{attention,mlp,patch_embed}.py``.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from fastvit import ops
from fastvit.families._checks import amp_dtype
from fastvit.integrations._timm_glu import (
    glu_mlp_forward,
    glu_mlp_reasons,
    swiglu_forward,
    swiglu_reasons,
)
from fastvit.nn.eva import (
    _register_timm_acts,
    eva_block_forward,
    eva_block_fusion_reasons,
    glu_mlp_hidden,
    rope_attention_core,
)
from fastvit.nn.factory import timm_pretrained_cfg  # noqa: F401  (public here too)
from fastvit.nn.layers import (
    _act_mode,
    _branch,
    _skippable,
    _weight_bias,
    _wrapper_param,
    apply_norm,
    attention_core,
    block_forward_fused,
    block_forward_modular,
    block_fusable,
    block_fusion_reasons,
    fsdp_sharded_params,
    fusion_reasons,
    mlp_hidden,
    needs_module_calls,
    register_fusable,
)
from fastvit.nn.packed import pad_input, unpad_input
from fastvit.nn.vit import VisionTransformer

__all__ = ["PatchRecord", "format_patch_report", "from_timm", "patch_report", "patch_timm_", "timm_pretrained_cfg"]


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
        The fastvit model, carrying a copy of ``model.pretrained_cfg`` (``{}`` when it has none) as its
        ``pretrained_cfg`` / ``default_cfg``, so ``timm.data.resolve_data_config(model=...)`` and timm's
        ``auto_group_layers`` see what they see for the timm model.

    Raises:
        ValueError: ``model`` is not a plain timm ``VisionTransformer`` (another architecture, a distilled or
            hybrid/conv-stem ViT), or uses something fastvit does not implement (attention pooling ``'map'``,
            ``'max'`` / ``'avgmax'`` pooling, RMSNorm, SwiGLU, parallel / res-post blocks, patch-embed norm or
            dynamic padding, differing LayerNorm eps, QK/scale norms other than LayerNorm). The message names it.
    """
    _timm()
    from fastvit.integrations._timm_eva import eva_from_timm, is_timm_eva

    if is_timm_eva(model):  # timm's Eva family (EVA-02, DINOv3, PE, RoPE ViTs) -> fastvit.nn.eva.Eva
        return eva_from_timm(model)
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
        raise ValueError(
            f"from_timm: unsupported patch embedding {type(pe).__name__} (hybrid / conv stems are not supported)"
        )
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
            raise ValueError(
                f"from_timm: blocks.{i}.attn is a {type(blk.attn).__name__}; only timm's Attention is supported"
            )
        if _orig_type(blk.mlp) is not TMlp or not isinstance(blk.mlp.fc1, nn.Linear):
            raise ValueError(
                f"from_timm: blocks.{i}.mlp is a {type(blk.mlp).__name__}; only timm's Mlp (Linear) is supported"
            )
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
    out.pretrained_cfg = copy.deepcopy(getattr(model, "pretrained_cfg", None) or {})
    return out


# ----------------------------------------------------------------------------------------------- patch_timm_
_PATCHED: Dict[type, type] = {}

# What each patched forward needs, as reasons it cannot serve a module. The same functions decide at forward time
# (a patched module whose list is non-empty runs timm's own forward) and fill patch_report().
_COVERED = (
    "patch_timm_ covers timm's PatchEmbed, Attention, EvaAttention, AttentionRope, Mlp, SwiGLU, GluMlp, "
    "vision_transformer.Block, EvaBlock, LayerNorm, RmsNorm, RmsNormFp32 and NaFlexVit's packed forward_features"
)


def _norm_reason(m: Optional[nn.Module], what: str) -> Optional[str]:
    if _is_identity(m):
        return None
    if not isinstance(m, nn.LayerNorm):
        return f"{what} is {_orig_type(m).__name__}, not covered (LayerNorm only)"
    if len(m.normalized_shape) != 1:
        return f"{what} normalizes over {len(m.normalized_shape)} dims, not covered (last dim only)"
    return None


def _patch_embed_reasons(m: nn.Module) -> List[str]:
    out = []
    if getattr(m, "dynamic_img_pad", False):
        out.append("dynamic_img_pad=True not covered")
    if not _is_identity(m.norm):
        out.append(f"patch-embed norm ({_orig_type(m.norm).__name__}) not covered")
    if not m.flatten and getattr(m.output_fmt, "value", str(m.output_fmt)) not in ("NHWC", "NCHW", "NLC"):
        out.append(f"output_fmt {getattr(m.output_fmt, 'value', m.output_fmt)!r} not covered")
    return out


def _attn_reasons(m: nn.Module) -> List[str]:
    out = []
    if not getattr(m, "fused_attn", True):
        out.append(
            "fused_attn=False: timm computes the attention matrix explicitly (set_fused_attn(False), exportable "
            "config; e.g. for timm.utils.AttentionExtract), so its own forward runs"
        )
    if getattr(m, "gate", None) is not None:
        out.append("gated attention (gated=True) not covered")
    for n, what in ((m.q_norm, "qk_norm"), (getattr(m, "norm", None), "scale_norm")):
        r = _norm_reason(n, what)
        if r:
            out.append(r)
    return out


def _attn_supported(m: nn.Module) -> bool:
    return not _attn_reasons(m)


def _mlp_reasons(m: nn.Module) -> List[str]:
    out = []
    # an adapter (PEFT keeps the wrapped layer as base_layer) or a parametrization keeps the layer's kind
    if any(isinstance(getattr(fc, "base_layer", fc), nn.Conv2d) for fc in (m.fc1, m.fc2)):
        out.append("convolutional MLP (use_conv=True) not covered")
    try:
        _act_mode(m.act)
    except ValueError:
        out.append(f"activation {_orig_type(m.act).__name__} not covered (GELU, tanh GELU, QuickGELU)")
    r = _norm_reason(m.norm, "MLP norm")
    if r:
        out.append(r)
    return out


def _mlp_supported(m: nn.Module) -> bool:
    return not _mlp_reasons(m)


def _rms_norm_classes() -> tuple:
    from timm.layers import RmsNorm, RmsNormFp32

    return (RmsNorm, RmsNormFp32)


def _block_norm_reason(m: nn.Module, what: str) -> Optional[str]:
    # timm's RmsNorm / RmsNormFp32 in a Block: the fused path calls them as modules (apply_norm), so their own
    # (patched) forward runs -- never a LayerNorm
    if not _is_identity(m) and _orig_type(m) in _rms_norm_classes():
        return None
    return _norm_reason(m, what)


@functools.lru_cache(maxsize=None)
def _glu_hidden_table() -> Dict[type, tuple]:
    """timm's gated MLP classes -> (their hidden function before fc2, their reasons). The fused blocks check the
    reasons first (``_block_mlp_reasons``), so the hidden function is the unchecked shared one. Built once."""
    from timm.layers import GluMlp, SwiGLU

    return {SwiGLU: (glu_mlp_hidden, swiglu_reasons), GluMlp: (glu_mlp_hidden, glu_mlp_reasons)}


def _block_mlp_reasons(mlp: nn.Module) -> List[str]:
    """Why a fused block (timm's ``Block`` or ``EvaBlock``) cannot run its ``mlp`` (timm's ``Mlp``, ``SwiGLU`` or
    ``GluMlp``) on fastvit (empty: it can)."""
    from timm.layers import Mlp as TMlp

    cls = _orig_type(mlp)
    if cls is TMlp:
        return [f"mlp: {r}" for r in _mlp_reasons(mlp)]
    glu = _glu_hidden_table().get(cls)
    if glu is not None:
        return [f"mlp: {r}" for r in glu[1](mlp)]
    return [f"mlp is {cls.__name__}, not timm's Mlp, SwiGLU or GluMlp"]


def _block_reasons(m: nn.Module) -> List[str]:
    from timm.layers import Attention as TAttention

    out = [r for r in (_block_norm_reason(m.norm1, "norm1"), _block_norm_reason(m.norm2, "norm2")) if r]
    if _orig_type(m.attn) is not TAttention:
        out.append(f"attn is {_orig_type(m.attn).__name__}, not timm's Attention")
    else:
        out += [f"attn: {r}" for r in _attn_reasons(m.attn)]
    out += _block_mlp_reasons(m.mlp)
    for name in ("ls1", "ls2"):
        ls = getattr(m, name)
        if not (_is_identity(ls) or isinstance(ls._parameters.get("gamma"), torch.Tensor)):  # fx reads params as Proxy
            out.append(f"{name} is {_orig_type(ls).__name__}, not covered (LayerScale with a gamma tensor only)")
    return out


def _block_supported(m: nn.Module) -> bool:
    return not _block_reasons(m)


def _layer_norm_reasons(m: nn.Module) -> List[str]:
    r = _norm_reason(m, "LayerNorm")
    return [r] if r else []


def _rms_norm_reasons(m: nn.Module) -> List[str]:
    if len(m.normalized_shape) != 1:
        return [f"{_orig_type(m).__name__} normalizes over {len(m.normalized_shape)} dims, not covered (last dim only)"]
    return []


def _patch_embed_forward(self, x: torch.Tensor) -> torch.Tensor:
    tracing = isinstance(x, torch.fx.Proxy)  # torch.fx: ops.patch_embed is a leaf; no shapes to check
    if (
        _patch_embed_reasons(self)
        or not (tracing or (isinstance(x, torch.Tensor) and x.dim() == 4))
        or needs_module_calls(self.proj)
        or not _skippable(self.norm)  # a hook on the (Identity) norm: timm calls it
    ):
        return self._fastvit_orig_cls.forward(self, x)
    B, C, H, W = x.shape
    if not tracing and self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
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
    return out.reshape(B, gh * gw, -1)  # NLC (other formats are in _patch_embed_reasons)


def _packed_unsupported(what: str, reasons: List[str], attn_mask, is_causal) -> None:
    # timm's forward has no packed mode to fall back to: say why a packed call cannot run
    if attn_mask is not None or is_causal:
        reasons = reasons + ["attn_mask / is_causal given"]
    if reasons:
        raise ValueError(f"{what} cannot run packed tokens (cu_seqlens given): {'; '.join(reasons)}")


def _attention_forward(
    self,
    x: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    if cu_seqlens is not None:
        _packed_unsupported(type(self).__name__, _attn_reasons(self), attn_mask, is_causal)
        return self.proj_drop(self.proj(attention_core(self, x, cu_seqlens, max_seqlen)))
    if attn_mask is not None or is_causal or not _attn_supported(self):
        return self._fastvit_orig_cls.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    return self.proj_drop(self.proj(attention_core(self, x)))


def _rope_attn_reasons(m: nn.Module) -> List[str]:
    """Why an ``EvaAttention`` / ``AttentionRope`` runs timm's forward (empty: the patched one runs)."""
    out = []
    if not getattr(m, "fused_attn", True):
        out.append(
            "fused_attn=False: timm computes the attention matrix explicitly (set_fused_attn(False), exportable "
            "config; e.g. for timm.utils.AttentionExtract), so its own forward runs"
        )
    return out


def _rope_call_reason(m: nn.Module, x, rope, attn_mask, is_causal) -> Optional[str]:
    """Why this call of a patched rotary attention runs timm's forward (None: the patched one runs)."""
    if attn_mask is not None or is_causal:
        return "attn_mask / is_causal given"
    if isinstance(x, torch.fx.Proxy) or isinstance(rope, torch.fx.Proxy):
        return "torch.fx symbolic trace (the rope table's shape is not known)"
    return None


def _rope_attention_forward(
    self,
    x: torch.Tensor,
    rope: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    mods = self._modules
    if cu_seqlens is not None:  # packed tokens (NaFlexVit): timm's forward has no packed mode to fall back to
        _packed_unsupported(type(self).__name__, _rope_attn_reasons(self), attn_mask, is_causal)
        return mods["proj_drop"](mods["proj"](rope_attention_core(self, x, rope, cu_seqlens, max_seqlen)))
    if _rope_attn_reasons(self) or _rope_call_reason(self, x, rope, attn_mask, is_causal):
        return self._fastvit_orig_cls.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    return mods["proj_drop"](mods["proj"](rope_attention_core(self, x, rope)))  # the gate applied inside, as timm


def _eva_block_reasons(m: nn.Module) -> List[str]:
    """Why a patched timm ``EvaBlock`` runs timm's forward (empty: :func:`fastvit.nn.eva.eva_block_forward`)."""
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    out = [r for r in (_block_norm_reason(m.norm1, "norm1"), _block_norm_reason(m.norm2, "norm2")) if r]
    attn_cls = _orig_type(m.attn)
    if attn_cls not in (EvaAttention, AttentionRope):
        out.append(f"attn is {attn_cls.__name__}, not timm's EvaAttention or AttentionRope")
    else:
        out += [f"attn: {r}" for r in _rope_attn_reasons(m.attn)]
    out += _block_mlp_reasons(m.mlp)
    return out


def _eva_block_forward(
    self,
    x: torch.Tensor,
    rope: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    mods = self._modules
    glu = _glu_hidden_table().get(_orig_type(mods["mlp"]))
    hidden = glu[0] if glu is not None else mlp_hidden
    if cu_seqlens is not None:  # packed tokens (NaFlexVit): timm's forward has no packed mode to fall back to
        _packed_unsupported(type(self).__name__, _eva_block_reasons(self), attn_mask, is_causal)
        return eva_block_forward(self, x, rope, mlp_hidden=hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if _eva_block_reasons(self) or _rope_call_reason(mods["attn"], x, rope, attn_mask, is_causal):
        # timm's own forward calls the submodules as modules; the patched ones among them still run on fastvit
        return self._fastvit_orig_cls.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    return eva_block_forward(self, x, rope, mlp_hidden=hidden)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _mlp_supported(self):
        return self._fastvit_orig_cls.forward(self, x)
    return self.drop2(self.fc2(mlp_hidden(self, x)))


def _block_forward(
    self,
    x: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    if cu_seqlens is not None:
        _packed_unsupported(type(self).__name__, _block_reasons(self), attn_mask, is_causal)
        if not block_fusable(self):
            return block_forward_modular(self, x, cu_seqlens, max_seqlen)
        return _block_fused(self, x, cu_seqlens, max_seqlen)
    if attn_mask is not None or is_causal or not _block_supported(self) or not block_fusable(self):
        # timm's own forward calls the submodules as modules; the patched ones among them still run on fastvit
        return self._fastvit_orig_cls.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    return _block_fused(self, x)


def _block_fused(
    m: nn.Module, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None
) -> torch.Tensor:
    """The fused path of a timm ``Block`` whose reasons are empty: :func:`block_forward_fused` for timm's ``Mlp``;
    for a gated MLP (``SwiGLU`` / ``GluMlp``) the same with fc1 + gating through :func:`fastvit.ops.linear_glu`.
    Norms go through :func:`apply_norm` (an RmsNorm is called as a module: its patched forward runs)."""
    mods = m._modules  # submodules read from the dict, as block_forward_fused does
    attn, mlp = mods["attn"], mods["mlp"]
    glu = _glu_hidden_table().get(_orig_type(mlp))
    if glu is None:
        return block_forward_fused(m, x, cu_seqlens, max_seqlen)
    am, mm = attn._modules, mlp._modules
    h = attention_core(attn, apply_norm(mods["norm1"], x), cu_seqlens, max_seqlen)
    x = _branch(x, h, am["proj"], am["proj_drop"], mods["ls1"], mods["drop_path1"], cu_seqlens)
    h = glu[0](mlp, apply_norm(mods["norm2"], x))
    return _branch(x, h, mm["fc2"], mm["drop2"], mods["ls2"], mods["drop_path2"], cu_seqlens)


def _layer_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if len(self.normalized_shape) != 1 or _wrapper_param(self):  # DTensor weight (tensor / sequence parallelism)
        return self._fastvit_orig_cls.forward(self, x)
    weight, bias = _weight_bias(self)  # a parametrized weight / bias: read through its property
    return ops.layer_norm(x, weight, bias, self.eps)


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ``RmsNorm`` / ``RmsNormFp32`` on :func:`fastvit.ops.rms_norm` (fp32 statistics, one rounding: exactly
    ``RmsNormFp32``; ``RmsNorm``, which timm computes with ``torch.rms_norm`` in the input dtype, within rounding).
    Output dtypes are timm's: the input's (a weight of another dtype outside autocast: computed in the promoted
    dtype, rounded to the input's); under CUDA autocast ``RmsNorm`` gives fp32, as ``torch.rms_norm`` does there."""
    if len(self.normalized_shape) != 1 or _wrapper_param(self) or isinstance(x, torch.fx.Proxy):
        return self._fastvit_orig_cls.forward(self, x)
    w, dtype = self.weight, x.dtype
    autocast = amp_dtype(x) is not None  # False on the meta device, which autocast does not know
    if w is not None and w.dtype != x.dtype and not autocast:
        acc = torch.promote_types(x.dtype, w.dtype)
        x, w = x.to(acc), w.to(acc)
    y = ops.rms_norm(x, w, float(self.eps))
    if autocast and self._fastvit_orig_cls.__name__ != "RmsNormFp32":
        return y
    return y.to(dtype)


# ----------------------------------------------------------------------------------------------- NaFlexVit
#: timm's rotary table modules whose NaFlex tables (``_generate_rope_naflex``) the packed path takes.
_NAFLEX_ROPES = ("RotaryEmbeddingCat", "RotaryEmbeddingMixed", "RotaryEmbeddingDinoV3")


def _naflex_reasons(m: nn.Module) -> List[str]:
    """Why a NaFlexVit's NaFlex batches cannot run their blocks packed (empty: they can)."""
    from timm.models.eva import EvaBlock
    from timm.models.vision_transformer import Block as TBlock

    out = []
    rope = getattr(m, "rope", None)
    if rope is not None:
        name = _orig_type(rope).__name__
        if name not in _NAFLEX_ROPES or not hasattr(m, "_generate_rope_naflex"):
            out.append(
                f"rotary position embeddings ({name}) not covered ({', '.join(_NAFLEX_ROPES)} only): NaFlexVit passes "
                "rope to its blocks, so they run timm's masked attention"
            )
    by_reason: Dict[str, List[int]] = {}
    for i, blk in enumerate(m.blocks):
        cls = _orig_type(blk)
        if cls not in (TBlock, EvaBlock):
            r = f"{cls.__name__}, not timm's vision_transformer.Block or EvaBlock (parallel / post-norm blocks)"
        elif type(blk) is not _PATCHED.get(cls):
            r = "not patched by patch_timm_"
        else:
            r = "; ".join(_block_reasons(blk) if cls is TBlock else _eva_block_reasons(blk))
        if r:
            by_reason.setdefault(r, []).append(i)
    for r, idx in by_reason.items():
        out.append(f"blocks {idx}: {r}")
    return out


def _front_valid(table: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A NaFlex rotary table (B, 1 or H, L, 2·D), one row per padded patch slot, with each image's valid patches'
    rows moved to the front in token order (``order``: (B, L), valid slots first): row i of image b is then the
    table of its i-th valid patch, which is the i-th token after the prefix of packed sequence b."""
    B, heads, L, W = table.shape
    return table.gather(2, order[:, None, :, None].expand(B, heads, L, W))


def _naflex_forward_features(
    self,
    patches: torch.Tensor,
    patch_coord: Optional[torch.Tensor] = None,
    patch_valid: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
):
    # NaFlex batch: unpad by patch_valid, the blocks on packed (T, C) tokens with cu_seqlens, repad with zeros
    # before the final norm; timm's own code for everything else (see patch_timm_). With rope, timm's per-image
    # tables (after patch dropout's keep indices, as timm applies them) are passed per packed sequence.
    if patch_coord is None or attn_mask is not None or _naflex_reasons(self):
        return self._fastvit_orig_cls.forward_features(
            self, patches, patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=attn_mask
        )
    x, _ = self.embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid)
    ropes = None
    if self.rope is not None:  # axial: (B, 1, L, 2·D); mixed: one (B, H, L, 2·D) per block
        ropes = self._generate_rope_naflex(x, patch_coord)
        ropes = list(ropes) if self.rope_is_mixed else [ropes] * len(self.blocks)
    if self.training and self.patch_drop is not None:
        x, keep_indices = self.patch_drop(x)
        if keep_indices is not None:
            if patch_valid is not None:
                patch_valid = patch_valid.gather(1, keep_indices)
            if ropes is not None:
                from timm.layers import apply_keep_indices_nlc

                ropes = [apply_keep_indices_nlc(x, r, keep_indices, pos_embed_has_batch=True) for r in ropes]
    x = self.norm_pre(x)
    checkpointed = self.grad_checkpointing and not torch.jit.is_scripting()
    ropes = ropes if ropes is not None else [None] * len(self.blocks)
    if patch_valid is None:  # timm attends to every token then (no mask): the dense fastvit path
        for blk, rope in zip(self.blocks, ropes):
            kw = {} if rope is None else {"rope": rope}
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False, **kw) if checkpointed else blk(x, **kw)
    else:
        B, L, _ = x.shape
        R = self.num_prefix_tokens
        valid = patch_valid.bool()
        if ropes[0] is not None:  # each image's valid patches' table rows first, in token order
            order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
            ropes = [_front_valid(r, order) for r in ropes]
        if R:  # prefix tokens are always valid (timm's create_attention_mask)
            valid = torch.cat([valid.new_ones(B, R), valid], dim=1)
        tokens, indices, cu_seqlens, max_seqlen = unpad_input(x, valid)
        for blk, rope in zip(self.blocks, ropes):
            kw = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
            if rope is not None:
                kw["rope"] = rope
            if checkpointed:
                tokens = torch.utils.checkpoint.checkpoint(blk, tokens, use_reentrant=False, **kw)
            else:
                tokens = blk(tokens, **kw)
        x = pad_input(tokens, indices, B, L)
    x = self.norm(x)
    return {"patches": x, "patch_valid": patch_valid}


_REASONS = {
    _patch_embed_forward: _patch_embed_reasons,
    _attention_forward: _attn_reasons,
    _rope_attention_forward: _rope_attn_reasons,
    _eva_block_forward: _eva_block_reasons,
    _mlp_forward: _mlp_reasons,
    _block_forward: _block_reasons,
    _layer_norm_forward: _layer_norm_reasons,
    _rms_norm_forward: _rms_norm_reasons,
    swiglu_forward: swiglu_reasons,
    glu_mlp_forward: glu_mlp_reasons,
    _naflex_forward_features: _naflex_reasons,
}


def _mlp_modular_reasons(m: nn.Module, ignore: frozenset) -> List[str]:
    return fusion_reasons(m, ["fc1", "act"], ignore)


def _swiglu_modular_reasons(m: nn.Module, ignore: frozenset) -> List[str]:
    return fusion_reasons(m, ["fc1_g", "fc1_x", "act"], ignore)


def _glu_mlp_modular_reasons(m: nn.Module, ignore: frozenset) -> List[str]:
    return fusion_reasons(m, ["fc1", "act"], ignore)


def _patch_embed_modular_reasons(m: nn.Module, ignore: frozenset) -> List[str]:
    return fusion_reasons(m, ["proj", "norm"], ignore)


def _layer_norm_modular_reasons(m: nn.Module, ignore: frozenset) -> List[str]:
    return ["a DTensor / tensor-subclass parameter (e.g. tensor parallelism)"] if _wrapper_param(m, ignore) else []


# What is attached to the submodules a patched forward would read (hooks, adapters, sharding, DTensor parameters)
# now, and the status that gives: 'modular' (its fused parts call those submodules as modules; patched children
# still run on fastvit) or 'fallback' (timm's own forward runs). Each takes the module and the ids of parameters to
# ignore (FSDP2's: DTensors between forwards, unsharded while the forward runs).
_ATTACHED = {
    _patch_embed_forward: (_patch_embed_modular_reasons, "fallback"),
    _mlp_forward: (_mlp_modular_reasons, "modular"),
    _block_forward: (block_fusion_reasons, "modular"),
    _eva_block_forward: (eva_block_fusion_reasons, "modular"),
    _layer_norm_forward: (_layer_norm_modular_reasons, "fallback"),
    _rms_norm_forward: (_layer_norm_modular_reasons, "fallback"),
    swiglu_forward: (_swiglu_modular_reasons, "modular"),
    glu_mlp_forward: (_glu_mlp_modular_reasons, "modular"),
}
# The method a patched class overrides, where it is not ``forward``.
_METHOD = {_naflex_forward_features: "forward_features"}


def _patched_class(cls: type, fn) -> type:
    new = _PATCHED.get(cls)
    if new is None:
        name = f"Fastvit{cls.__name__}"
        attrs = {_METHOD.get(fn, "forward"): fn, "_fastvit_fn": fn, "_fastvit_orig_cls": cls, "__module__": __name__}
        new = type(name, (cls,), attrs)
        _PATCHED[cls] = new
        # a fused parent may read a patched module's parameters as it reads the timm class's
        register_fusable(new, kind="layer_norm" if fn is _layer_norm_forward else None)
    return new


def _register_timm_fusable() -> None:
    """timm's plain layer classes whose parameters fastvit's fused paths read (timm's LayerNorm is F.layer_norm)."""
    import timm.layers as tl

    register_fusable(tl.LayerNorm, kind="layer_norm")
    register_fusable(tl.DropPath, kind="dropout")
    register_fusable(tl.Attention, tl.Mlp, tl.LayerScale, tl.SwiGLU, tl.GluMlp)
    # RMSNorms: no 'layer_norm' kind (they are not F.layer_norm); fused paths call them as modules (apply_norm)
    register_fusable(tl.RmsNorm, tl.RmsNormFp32)
    register_fusable(*(getattr(tl, n) for n in ("GELU", "GELUTanh", "QuickGELU") if hasattr(tl, n)))
    _register_timm_acts()  # the gated MLPs' activations (Swish, Sigmoid, ...)


def _patch_table() -> Dict[type, object]:
    from timm.layers import Attention as TAttention
    from timm.layers import GluMlp, RmsNorm, RmsNormFp32, SwiGLU
    from timm.layers import Mlp as TMlp
    from timm.layers import PatchEmbed as TPatchEmbed
    from timm.models.vision_transformer import Block as TBlock

    _register_timm_fusable()
    table = {
        TPatchEmbed: _patch_embed_forward,
        TAttention: _attention_forward,
        TMlp: _mlp_forward,
        SwiGLU: swiglu_forward,
        GluMlp: glu_mlp_forward,  # SwiGLUPacked is GluMlp(act_layer=nn.SiLU, gate_last=False), not a class
        RmsNorm: _rms_norm_forward,
        RmsNormFp32: _rms_norm_forward,
        TBlock: _block_forward,
    }
    try:
        from timm.layers import AttentionRope
    except ImportError:  # timm before AttentionRope
        pass
    else:
        table[AttentionRope] = _rope_attention_forward
    try:
        from timm.models.eva import EvaAttention, EvaBlock
    except ImportError:  # pragma: no cover
        pass
    else:
        table[EvaAttention] = _rope_attention_forward
        table[EvaBlock] = _eva_block_forward
    try:
        from timm.models.naflexvit import NaFlexVit
    except ImportError:  # timm before NaFlexVit (1.0.16)
        return table
    table[NaFlexVit] = _naflex_forward_features
    return table


def _class_forward(cls: type):
    """The fastvit forward patch_timm_ gives ``cls``, or None when the class is not covered."""
    fwd = _patch_table().get(cls)
    if (
        fwd is None
        and issubclass(cls, nn.LayerNorm)
        and cls.forward in (nn.LayerNorm.forward,) + _timm_layer_norm_forwards()
    ):
        fwd = _layer_norm_forward
    return fwd


def _patchable_forward(m: nn.Module):
    """The fastvit forward patch_timm_ gives ``m``'s class, or None when the class is not covered."""
    return _class_forward(type(m))


def patch_timm_(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Run a timm model's ``PatchEmbed``, ``Attention``, rotary attentions (``EvaAttention``, ``AttentionRope``),
    ``Mlp``, gated MLPs (``SwiGLU``, ``GluMlp``), ViT ``Block``, ``EvaBlock``, ``LayerNorm`` and RMSNorm
    (``RmsNorm``, ``RmsNormFp32``) modules on :mod:`fastvit.ops`, in place.

    Each matching module's class is swapped for a subclass that overrides only ``forward`` (e.g. ``Attention`` ->
    ``FastvitAttention``); parameters, buffers, ``state_dict`` keys and tensors and ``isinstance`` checks are
    untouched. Matching is by exact class, so other timm variants (``EvaBlockPostNorm``, ``ResPostBlock``, ``SimpleNorm``...)
    are left on timm's forward; a patched module falls back to timm's own forward for configurations fastvit does not
    cover (gated attention and RMSNorm qk-norm in timm's ``Attention``, conv MLPs, other activations, patch-embed
    norms or padding, ``fused_attn=False``) and for calls with ``attn_mask`` / ``is_causal``. Patching twice is a
    no-op. Outputs and gradients equal the unpatched model's (fp32 eager: bit for bit up to float reassociation).

    **Rotary attention** (EVA-02, DINOv3, Perception Encoder, ``vit_*_rope_*`` and ``*_rope_mixed_*``: timm's
    ``EvaAttention`` and ``AttentionRope``, whose ``forward(x, rope=...)`` takes the table their ``EvaBlock``
    passes): the rotation and the attention run in one :func:`fastvit.ops.attention` call on the fused ``qkv``
    projection (``rope=``, ``num_prefix_tokens=``, ``rotate_half=`` from the module), or, with qk-norm or separate
    q / k / v projections, in :func:`fastvit.ops.scaled_dot_product_attention` after the norms (LayerNorm through
    :func:`fastvit.ops.layer_norm`, other norms called as modules) and the projections (called as modules);
    grouped-query k / v heads (``num_kv_heads``) are repeated as timm repeats them. EvaAttention's q / v biases
    are applied as timm applies them (``F.linear`` on ``qkv.weight``, or after the ``qkv`` call with
    ``qkv_bias_separate``) -- except that while something is attached to ``qkv`` (a LoRA adapter, a hook) it is
    called as a module and the biases added after, so the adapter applies (timm's own forward reads ``qkv.weight``
    and skips it); the scale norm, the sigmoid gate, ``proj`` and ``proj_drop`` as timm's forward does,
    submodules called as modules. A learnable rope table (``RotaryEmbeddingMixed``) gets its gradient; a table per
    sample (timm's patch dropout, NaFlexVit) rotates each sample with its own. Calls with ``attn_mask`` /
    ``is_causal`` or under a ``torch.fx`` trace, and modules with ``fused_attn=False``, run timm's forward. The rotary table modules run timm's code.
    ``EvaBlock`` runs :func:`fastvit.nn.eva.eva_block_forward`, the forward of fastvit's own ``EvaBlock``: the
    attention up to ``proj``, the MLP up to ``fc2``, then ``proj`` / ``fc2`` + ``gamma_1`` / ``gamma_2`` + residual as
    one :func:`fastvit.ops.linear_residual` each (timm's forward for the configurations its attention or MLP patch
    does not cover).

    **The module tree stays meaningful.** A fused forward reads its submodules' parameters only while nothing is
    attached to them; a forward or backward hook (module-local or global), a PEFT / LoRA adapter or another wrapper
    class, a parametrization, FSDP2 sharding or a DTensor parameter (tensor parallelism) on a submodule makes it call
    that submodule as a module instead (timm's own forward for a ``Block`` or ``PatchEmbed``), so hooks fire where
    they fire on timm and adapters train; :func:`patch_report` says which modules run that way and why. ``qkv`` and
    ``proj`` of an attention are always called as modules. Order: PEFT wrapping and hooks before or after
    ``patch_timm_``; DDP before or after; FSDP2's ``fully_shard`` and tensor parallelism's ``parallelize_module``
    after ``patch_timm_`` (it raises ``RuntimeError`` on a module ``fully_shard`` already wrapped). A ``torch.fx``
    symbolic trace records each :mod:`fastvit.ops` call as one leaf node, so the ``GraphModule`` computes what the
    eager forward computes (timm's ``forward(x, attn_mask=None, is_causal=False)``: trace with
    ``concrete_args={'attn_mask': None, 'is_causal': False}`` to record the fused path; a symbolic ``attn_mask``
    records timm's masked path, the same numbers). Under timm's ``scriptable`` or ``exportable`` layer config
    (TorchScript / export) ``patch_timm_`` patches nothing, warns, and :func:`patch_report` gives the reason.

    **NaFlexVit** (``timm.models.naflexvit``; NaViT, Dehghani et al., 2023, arXiv:2307.06304; SigLIP 2's NaFlex,
    Tschannen et al., 2025, arXiv:2502.14786): the model's class becomes ``FastvitNaFlexVit``, overriding only
    ``forward_features``. For a NaFlex batch (``model({'patches', 'patch_coord', 'patch_valid'})`` or
    ``forward_features(patches, patch_coord, patch_valid)``, as ``timm.data``'s NaFlex collator makes it) it runs
    timm's ``NaFlexEmbeds``, patch dropout and ``norm_pre``, then drops the padding -- the rows where
    ``patch_valid`` is False; prefix (cls / register) tokens are always kept -- and runs the blocks on the packed
    (T, C) tokens with ``cu_seqlens`` (:func:`fastvit.ops.attention`: each image attends only to itself; no
    (B, 1, N, N) mask is built), with grad checkpointing as timm (non-reentrant). The tokens are scattered back into
    a zero-padded (B, N, C) tensor before the final ``norm``, so timm's own pooling (``global_pool_naflex`` with
    ``patch_valid``, or the masked ``AttentionPoolLatent`` for ``'map'``), ``fc_norm`` and head run unchanged. Valid
    tokens, pooled logits and gradients equal timm's; padding rows of ``forward_features`` hold ``norm(0)`` instead
    of timm's values there (which no pooling reads). Forward hooks on the blocks see the packed (T, C) tokens. It
    costs one host sync per batch (the longest sequence), so ``torch.compile`` graph-breaks there.

    With rotary embeddings (``rope_type`` ``'axial'``, ``'mixed'`` or ``'dinov3'``: ``EvaBlock`` blocks), timm's
    per-image tables (``_generate_rope_naflex``, gathered by patch dropout's keep indices as timm gathers them;
    mixed: one per block) reach the packed attention as one table per sequence, each image's valid-patch rows first
    in token order, so every token is rotated by its own row.

    What stays on timm's path (the NaFlexVit row of :func:`patch_report` says which and why):

    * MRoPE (``rope_type='mrope'``) and any block that is not timm's ``vision_transformer.Block`` / ``EvaBlock`` or
      that its patch does not cover (``ParallelScalingBlock``, ``fused_attn=False``, activations other than the
      covered ones) -- the whole ``forward_features`` then runs timm's masked attention;
    * calls with an explicit ``attn_mask``, ``forward_intermediates`` (timm's, masked; the blocks fall back), and
      plain (B, C, H, W) images (no padding: the blocks run fastvit's dense path);
    * ``NaFlexEmbeds`` (patch projection and per-image position-embedding resampling) and attention pooling
      (``'map'``: timm's ``AttentionPoolLatent`` with its key mask, after the packed blocks).

    To see what was patched and what was left on timm's forward, and why: :func:`patch_report` (``model``'s current
    state, any time), or ``verbose=True`` here, which prints that report as a table after patching.

    Args:
        model: any ``nn.Module`` holding timm layers (typically ``timm.create_model('vit_...')``).
        verbose: print :func:`format_patch_report` of the patched model (stdout).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: a module ``patch_timm_`` would patch is already wrapped by FSDP2's ``fully_shard``.
        ImportError: timm is not installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _timm()
    skip = _script_config_reason()
    if skip:
        warnings.warn(f"patch_timm_ left the model on timm: {skip}", stacklevel=2)
        model._fastvit_unpatched_reason = skip
    else:
        todo = []
        for name, m in model.named_modules():
            if hasattr(type(m), "_fastvit_fn"):  # patched already (FSDP2's subclass of a patched class too)
                continue
            fwd = _patchable_forward(m)
            if fwd is not None:
                todo.append((m, fwd))
            elif _sharded_patchable(m):
                raise RuntimeError(
                    f"patch_timm_: {name or 'model'} ({type(m).__name__}) is already wrapped by FSDP2's fully_shard, "
                    "which swaps its class; call patch_timm_ on the model first, then fully_shard (DDP wrapping, "
                    "before or after, is fine)"
                )
        for m, fwd in todo:
            m.__class__ = _patched_class(type(m), fwd)
    if verbose:
        print(format_patch_report(patch_report(model)))
    return model


def _script_config_reason() -> Optional[str]:
    """Why timm's layer config rules patching out (TorchScript / export), or None."""
    from timm.layers import is_exportable, is_scriptable

    if is_scriptable():
        return (
            "timm's scriptable layer config is set (set_scriptable / set_layer_config(scriptable=True)): "
            "TorchScript cannot compile fastvit's forwards"
        )
    if is_exportable():
        return "timm's exportable layer config is set (set_exportable / set_layer_config(exportable=True))"
    return None


def _sharded_patchable(m: nn.Module) -> bool:
    """``m`` is a class patch_timm_ covers that FSDP2's fully_shard has already swapped for ``FSDP<cls>``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return False
    return isinstance(m, FSDPModule) and _class_forward(type(m).__bases__[-1]) is not None


def _timm_layer_norm_forwards() -> tuple:
    from timm.layers import LayerNorm as TLayerNorm

    return (TLayerNorm.forward,)


# ----------------------------------------------------------------------------------------------- patch_report
class PatchRecord(NamedTuple):
    """One row of :func:`patch_report`.

    Fields:
        name: the module's qualified name in the model (``model.get_submodule(name)``); ``''`` for the model itself
            (listed only for a NaFlexVit).
        class_name: its timm / torch class (the original class for patched modules, e.g. ``'Attention'``).
        status: ``'patched'`` (its forward runs on :mod:`fastvit.ops`), ``'modular'`` (patched, but something is
            attached to submodules its fused path would read -- a hook, a PEFT / LoRA adapter, a parametrization,
            FSDP2 or tensor parallelism -- so it calls them as modules; its patched children still run on fastvit),
            ``'fallback'`` (patched, but its configuration, or what is attached to it, sends every call to timm's own
            forward), ``'unpatched'`` (a class ``patch_timm_`` covers, not patched yet; the reason says why when
            ``patch_timm_`` declined, e.g. under timm's scriptable config) or ``'not covered'`` (a class
            ``patch_timm_`` leaves on timm's forward).
        reason: why it is not ``'patched'`` (``''`` when it is; several reasons joined by ``'; '``).
    """

    name: str
    class_name: str
    status: str
    reason: str


# Classes patch_timm_ leaves alone that users ask about, by name (timm is not imported for this).
_KNOWN_UNCOVERED = (
    (
        ("EvaBlockPostNorm",),
        "{cls} not covered (only the pre-norm EvaBlock); its attention, MLP and norms are listed separately",
    ),
    (
        ("SimpleNorm", "SimpleNormFp32"),
        "{cls} not covered (LayerNorm, RmsNorm and RmsNormFp32 over the last dim only)",
    ),
    (("GatedMlp", "ConvMlp", "GlobalResponseNormMlp"), "{cls} not covered (Mlp, SwiGLU and GluMlp only)"),
    (
        ("LayerNorm2d", "LayerNorm2dFp32", "RmsNorm2d", "RmsNorm2dFp32", "GroupNorm", "GroupNorm1", "BatchNorm2d"),
        "channels-first norm ({cls}) not covered",
    ),
    (
        ("ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock", "DiffBlock"),
        "{cls} not covered (only timm's pre-norm vision_transformer.Block); its submodules are listed separately",
    ),
    (("AttentionPoolLatent", "AttentionPool2d", "MultiheadAttention"), "attention pooling / {cls} not covered"),
    (
        ("NaFlexEmbeds",),
        "NaFlex embedding ({cls}: patch Linear, per-image position-embedding resampling, prefix tokens) runs timm's "
        "own code; NaFlexVit's blocks run packed on fastvit.ops",
    ),
)
_REPORTED_NAMES = re.compile(r"Attention|Attn|Mlp|GLU|Norm|Block|Embed|Rope|Rotary|Pool")


def _uncovered_reason(m: nn.Module) -> Optional[str]:
    cls = type(m).__name__
    if "Rope" in cls or "Rotary" in cls:
        return f"rotary table module ({cls}) runs timm's own code; the patched attention modules apply its table"
    for names, text in _KNOWN_UNCOVERED:
        if cls in names:
            return text.format(cls=cls)
    if isinstance(m, nn.LayerNorm):
        return f"{cls} overrides LayerNorm.forward; not covered"
    if _REPORTED_NAMES.search(cls):
        return f"{cls} not covered ({_COVERED})"
    return None


def patch_report(model: nn.Module) -> List[PatchRecord]:
    """What of ``model`` runs on :mod:`fastvit.ops` after :func:`patch_timm_`, and what runs timm's own forward
    and why -- read off the model's current state (call it before patching to see what is left to patch).

    Listed, in ``model.named_modules()`` order: every module of a class ``patch_timm_`` covers (status
    ``'patched'``, ``'modular'``, ``'fallback'`` or ``'unpatched'``) and every other attention / MLP / norm / block /
    embedding / pooling module (``'not covered'``, e.g. ``SwiGLU``: "gated MLP (SwiGLU) not covered"). Plain layers
    (``Linear``, ``Conv2d``, dropout, activations, LayerScale, containers) and ``model`` itself are not listed:
    they run PyTorch's / timm's own code either way, and inside a patched module their work is fused.

    A ``NaFlexVit`` is listed itself, under the name ``''`` (``'(model)'`` in :func:`format_patch_report`):
    ``'patched'`` when NaFlex batches run their blocks packed, ``'fallback'`` with the reason (rotary embeddings,
    uncovered or unpatched blocks) when its ``forward_features`` runs timm's masked path.

    The configuration and what is attached now (hooks, adapters, sharding, global module hooks) are read at the
    call, so register hooks or wrap with PEFT first, then ask. At forward time a patched module also falls back for
    calls fastvit does not cover:
    ``attn_mask`` / ``is_causal`` given, a patch embedding called on a non-4-D tensor, a NaFlexVit called on plain
    images (its blocks then run fastvit's dense path) or through ``forward_intermediates``.

    Args:
        model: any ``nn.Module``.

    Returns:
        A list of :class:`PatchRecord` ``(name, class_name, status, reason)`` named tuples.
        :func:`format_patch_report` renders it as a table.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ImportError: timm is not installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _timm()
    out: List[PatchRecord] = []
    fsdp_params = fsdp_sharded_params(model)
    for name, m in model.named_modules():
        cls = type(m)
        fn = getattr(cls, "_fastvit_fn", None)  # a patched class, or FSDP2's subclass of one
        if m is model and fn is None and _patchable_forward(m) is None:
            continue  # the model itself is listed only when patch_timm_ covers its class (NaFlexVit)
        if fn is not None:
            reasons, status = _REASONS[fn](m), "fallback"
            if not reasons and fn in _ATTACHED:
                attached, status = _ATTACHED[fn]
                reasons = attached(m, fsdp_params)
            out.append(PatchRecord(name, _orig_type(m).__name__, status if reasons else "patched", "; ".join(reasons)))
        elif _patchable_forward(m) is not None:
            why = getattr(model, "_fastvit_unpatched_reason", None) or "patch_timm_ has not been applied to it"
            out.append(PatchRecord(name, cls.__name__, "unpatched", why))
        else:
            reason = _uncovered_reason(m)
            if reason is not None:
                out.append(PatchRecord(name, cls.__name__, "not covered", reason))
    return out


def format_patch_report(report: List[PatchRecord]) -> str:
    """:func:`patch_report`'s rows as a fixed-width text table (module, class, status, reason) followed by a line
    counting each status. An empty report gives a header and ``'0 modules'``."""
    rows = [("module", "class", "status", "reason")] + [(r.name or "(model)",) + tuple(r)[1:] for r in report]
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r[:3], widths)) + "  " + str(r[3]) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    counts: Dict[str, int] = {}
    for r in report:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items()) if counts else "0 modules"
    return "\n".join(lines + [summary])


# ----------------------------------------------------------------------------------------------- pretrained cfgs
