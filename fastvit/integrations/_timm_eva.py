"""timm ``Eva`` -> :class:`fastvit.nn.eva.Eva`: the configuration read off a timm Eva model's attributes and modules,
and a copy of its weights (what :func:`fastvit.integrations.from_timm` does for the Eva family: EVA-02, DINOv3,
Perception Encoder, RoPE ViTs).

Source of the semantics: timm ``models/eva.py`` (``Eva``, ``EvaBlock``, ``EvaAttention``), ``layers/attention.py``
(``AttentionRope``), ``layers/mlp.py``, ``layers/attention_pool.py``, ``layers/pos_embed_sincos.py``. timm is imported
only when these functions run.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from fastvit.nn.eva import Eva, RmsNorm
from fastvit.nn.layers import _act_mode, _make_act

__all__ = ["eva_from_timm", "is_timm_eva"]


def _orig_type(m: nn.Module) -> type:
    # the timm class behind a module patch_timm_ has swapped to a Fastvit* subclass
    return getattr(m, "_fastvit_orig_cls", type(m))


def _identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _p(m: Optional[nn.Module], attr: str = "p") -> float:
    return 0.0 if _identity(m) else float(getattr(m, attr))


def is_timm_eva(model: nn.Module) -> bool:
    """Whether ``model`` is a ``timm.models.eva.Eva`` (without importing timm when it is not loaded yet)."""
    cls = _orig_type(model)
    return cls.__name__ == "Eva" and cls.__module__ == "timm.models.eva"


def _norm_spec(m: nn.Module, what: str) -> tuple:
    """(kind, eps) of a norm timm's Eva built with its ``norm_layer``.

    Raises:
        ValueError: a norm other than an affine LayerNorm (timm's or torch's) or timm's RmsNorm / RmsNormFp32.
    """
    from timm.layers import RmsNorm as TRmsNorm
    from timm.layers import RmsNormFp32

    cls = _orig_type(m)
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and m.elementwise_affine:
        return ("layer_norm", bool(m.bias is not None), float(m.eps))
    if cls in (TRmsNorm, RmsNormFp32) and m.weight is not None:
        return ("rms_norm", False, float(m.eps))
    raise ValueError(
        f"from_timm: {what} is {cls.__name__}, not covered (affine LayerNorm over the last dim, RmsNorm, RmsNormFp32)"
    )


def _rope_type(rope: nn.Module) -> str:
    from timm.layers import pos_embed_sincos as ps

    table = {"RotaryEmbeddingCat": "cat", "RotaryEmbeddingMixed": "mixed", "RotaryEmbeddingDinoV3": "dinov3"}
    cls = _orig_type(rope)
    if cls.__name__ not in table or getattr(ps, cls.__name__, None) is not cls:
        raise ValueError(
            f"from_timm: rotary embedding {cls.__name__} is not covered (RotaryEmbeddingCat, RotaryEmbeddingMixed, "
            "RotaryEmbeddingDinoV3; MRoPE is not)"
        )
    return table[cls.__name__]


def _attn_pool_cfg(pool: nn.Module, embed_dim: int) -> Dict[str, Any]:
    """``attn_pool_num_heads`` / ``attn_pool_mlp_ratio`` of timm's ``AttentionPoolLatent`` as Eva builds it.

    Raises:
        ValueError: a pool configuration Eva(global_pool='map') would not build.
    """
    from timm.layers import AttentionPoolLatent

    if _orig_type(pool) is not AttentionPoolLatent:
        raise ValueError(f"from_timm: attn_pool is {type(pool).__name__}, not covered (AttentionPoolLatent)")
    if (
        pool.pos_embed is not None
        or pool.latent_len != 1
        or pool.pool != "token"
        or not isinstance(pool.q, nn.Linear)
        or not (_identity(pool.q_norm) and _identity(pool.k_norm))
        or pool.mlp is None
        or pool.out_features != embed_dim
        or pool.latent_dim != embed_dim
    ):
        raise ValueError(
            "from_timm: attn_pool (AttentionPoolLatent) differs from what Eva(global_pool='map') builds "
            "(position embedding, several latents, qk-norm, no q projection, another width or pool type)"
        )
    try:
        if _act_mode(pool.mlp.act) != "gelu":
            raise ValueError
    except ValueError:
        raise ValueError("from_timm: attn_pool.mlp.act must be exact GELU, as Eva builds it") from None
    return dict(attn_pool_num_heads=pool.num_heads, attn_pool_mlp_ratio=pool.mlp.fc1.out_features / embed_dim)


def _block_cfg(i: int, blk: nn.Module, embed_dim: int) -> Dict[str, Any]:
    """The ``Eva`` arguments block ``i`` implies (every block must agree).

    Raises:
        ValueError: a block type or option :class:`fastvit.nn.eva.Eva` does not build (the message names it).
    """
    from timm.layers import AttentionRope, GluMlp, Mlp, SwiGLU
    from timm.models.eva import EvaAttention, EvaBlock

    where = f"blocks.{i}"
    if _orig_type(blk) is not EvaBlock:
        raise ValueError(
            f"from_timm: {where} is {_orig_type(blk).__name__}; only timm's EvaBlock is covered (use_post_norm=True "
            "builds EvaBlockPostNorm, which is not)"
        )
    attn, mlp = blk.attn, blk.mlp
    attn_cls = _orig_type(attn)
    if attn_cls not in (EvaAttention, AttentionRope):
        raise ValueError(f"from_timm: {where}.attn is {attn_cls.__name__}, not EvaAttention or AttentionRope")
    if attn.gate is not None:
        raise ValueError(f"from_timm: {where}.attn is gated, which Eva does not build")
    if getattr(attn, "qkv_bias_separate", False):
        raise ValueError(f"from_timm: {where}.attn has qkv_bias_separate=True, which Eva does not build")
    if attn.head_dim * attn.num_heads != embed_dim or _orig_type(attn.proj) is not nn.Linear:
        raise ValueError(f"from_timm: {where}.attn has attn_head_dim != embed_dim / num_heads")
    if attn_cls is AttentionRope and attn.proj.bias is None:
        raise ValueError(f"from_timm: {where}.attn has proj_bias=False, which Eva does not build")
    fused = attn.qkv is not None
    if attn_cls is EvaAttention:
        qkv_bias = attn.q_bias is not None if fused else attn.q_proj.bias is not None
    else:
        qkv_bias = (attn.qkv if fused else attn.q_proj).bias is not None
    kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
    cfg: Dict[str, Any] = dict(
        num_heads=attn.num_heads,
        attn_type="eva" if attn_cls is EvaAttention else "rope",
        qkv_fused=fused,
        qkv_bias=qkv_bias,
        qk_norm=not _identity(attn.q_norm),
        scale_attn_inner=not _identity(attn.norm),
        rope_rotate_half=bool(getattr(attn, "rotate_half", False)),
        num_kv_heads=None if kv_heads == attn.num_heads else kv_heads,
        proj_drop_rate=_p(attn.proj_drop),
        attn_drop_rate=_p(attn.attn_drop),
    )
    mlp_cls = _orig_type(mlp)
    if mlp_cls is Mlp:
        if not isinstance(mlp.fc1, nn.Linear):
            raise ValueError(f"from_timm: {where}.mlp is convolutional (use_conv=True), not covered")
        try:
            act = _act_mode(mlp.act)
        except ValueError as e:
            raise ValueError(f"from_timm: {where}.mlp.act: {e}") from None
        hidden = mlp.fc1.out_features
        cfg.update(swiglu_mlp=False, scale_mlp=not _identity(mlp.norm), act=act)
    elif mlp_cls is GluMlp:
        if type(mlp.act) is not nn.SiLU or mlp.gate_last or not _identity(mlp.norm) or mlp.chunk_dim != -1:
            raise ValueError(f"from_timm: {where}.mlp is a GluMlp other than Eva's (SiLU, gate first, no norm, Linear)")
        hidden = mlp.fc1.out_features // 2
        cfg.update(swiglu_mlp=True, scale_mlp=False)
    elif mlp_cls is SwiGLU:
        if type(mlp.act) is not nn.SiLU:
            raise ValueError(f"from_timm: {where}.mlp (SwiGLU) has activation {type(mlp.act).__name__}, not SiLU")
        hidden = mlp.fc1_g.out_features
        scale = not _identity(mlp.norm)
        # without a norm timm builds SwiGLU only for swiglu_align_to > 0; 1 keeps the width as it is
        cfg.update(swiglu_mlp=True, scale_mlp=scale, swiglu_align_to=0 if scale else 1)
    else:
        raise ValueError(f"from_timm: {where}.mlp is {mlp_cls.__name__}, not Mlp, GluMlp or SwiGLU")
    if mlp.fc2.bias is None or mlp.fc2.out_features != embed_dim:
        raise ValueError(f"from_timm: {where}.mlp.fc2 differs from Eva's (bias, width {embed_dim})")
    cfg["mlp_ratio"] = hidden / embed_dim
    if int(embed_dim * cfg["mlp_ratio"]) != hidden:
        raise ValueError(f"from_timm: {where}.mlp hidden width {hidden} is not int(embed_dim * mlp_ratio)")
    g1, g2 = blk.gamma_1, blk.gamma_2
    if g1 is None and g2 is not None:
        raise ValueError(f"from_timm: {where} has LayerScale on the MLP branch only, which Eva does not build")
    cfg.update(layer_scale=g1 is not None, attn_only_layer_scale=g1 is not None and g2 is None)
    return cfg


def eva_from_timm(model: nn.Module) -> Eva:
    """A :class:`fastvit.nn.eva.Eva` with a timm ``Eva``'s configuration and a copy of its weights.

    The configuration is read off the model (sizes, attention type and biases, qk / scale norms, MLP kind and width,
    LayerScale, prefix tokens, position embeddings, norms and their eps, pooling, attention pool, dropout rates);
    the rotary module is a deep copy of the timm model's (same class, tables and learnable frequencies); the weights
    load with ``load_state_dict(strict=True)``. The result is on the timm model's device and dtype, in its train /
    eval mode, and carries a copy of its ``pretrained_cfg``.

    Args:
        model: a ``timm.models.eva.Eva`` (e.g. ``timm.create_model('vit_base_patch16_dinov3')``), patched by
            :func:`fastvit.integrations.patch_timm_` or not.

    Returns:
        The fastvit model.

    Raises:
        ValueError: ``model`` is not a timm Eva, or uses something fastvit's Eva does not build (post-norm blocks,
            gated or differently shaped attention, per-block differences, another MLP / norm / pool / rope kind,
            patch dropout with rotary embeddings, patch-embed norm or dynamic padding). The message names it.
    """
    from timm.layers import PatchEmbed as TPatchEmbed

    if not is_timm_eva(model):
        raise ValueError(f"eva_from_timm supports timm.models.eva.Eva only, got {type(model).__name__}")
    pe = model.patch_embed
    if _orig_type(pe) is not TPatchEmbed:
        raise ValueError(f"from_timm: unsupported patch embedding {type(pe).__name__}")
    if not _identity(pe.norm):
        raise ValueError("from_timm: patch_embed.norm is not supported")
    if getattr(pe, "dynamic_img_pad", False):
        raise ValueError("from_timm: dynamic_img_pad=True is not supported")
    if pe.img_size is None:
        raise ValueError("from_timm: patch_embed.img_size=None is not supported")
    if len(model.blocks) == 0:
        raise ValueError("from_timm: an Eva with depth 0 is not supported")
    embed_dim = model.embed_dim

    blocks = [_block_cfg(i, b, embed_dim) for i, b in enumerate(model.blocks)]
    kv_heads = tuple(b.pop("num_kv_heads") for b in blocks)
    first = blocks[0]
    for i, b in enumerate(blocks[1:], 1):
        diff = sorted(k for k in first if b[k] != first[k])
        if diff:
            raise ValueError(f"from_timm: blocks.{i} differs from blocks.0 in {', '.join(diff)}; not covered")

    named_norms: List[tuple] = [(n, getattr(model, n)) for n in ("norm_pre", "norm", "fc_norm")]
    for i, blk in enumerate(model.blocks):
        named_norms += [(f"blocks.{i}.norm1", blk.norm1), (f"blocks.{i}.norm2", blk.norm2)]
        for sub in ("q_norm", "k_norm", "norm"):
            named_norms.append((f"blocks.{i}.attn.{sub}", getattr(blk.attn, sub)))
        named_norms.append((f"blocks.{i}.mlp.norm", blk.mlp.norm))
    if model.attn_pool is not None:
        named_norms.append(("attn_pool.norm", model.attn_pool.norm))
    specs = {_norm_spec(m, n) for n, m in named_norms if not _identity(m)}
    if len(specs) > 1:
        raise ValueError(f"from_timm: norms of different kinds / eps {sorted(specs)} are not covered (one norm_layer)")
    kind, bias, eps = specs.pop() if specs else ("layer_norm", True, 1e-6)
    if kind == "layer_norm":
        norm_layer = partial(nn.LayerNorm, eps=eps, bias=bias) if not bias else partial(nn.LayerNorm, eps=eps)
    else:
        norm_layer = partial(RmsNorm, eps=eps)

    pre_norm = not _identity(model.norm_pre)
    if (pe.proj.bias is None) != pre_norm:
        raise ValueError("from_timm: patch_embed bias must be off exactly when norm_pre is on (timm's rule)")
    cfg: Dict[str, Any] = {}
    if model.global_pool == "map":
        if model.attn_pool is None:
            raise ValueError("from_timm: global_pool='map' without an attention pool is not covered")
        cfg.update(_attn_pool_cfg(model.attn_pool, embed_dim))
    elif model.attn_pool is not None:
        raise ValueError(f"from_timm: an attention pool with global_pool={model.global_pool!r} is not covered")
    rope = model.rope
    if rope is not None:
        cfg["rope_type"] = _rope_type(rope)
    act = first.pop("act", "gelu")
    layer_scale = first.pop("layer_scale")
    cfg.update(
        first,
        img_size=pe.img_size,
        patch_size=pe.patch_size,
        in_chans=pe.proj.in_channels,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        global_pool=model.global_pool,
        embed_dim=embed_dim,
        depth=len(model.blocks),
        num_kv_heads=None if all(k is None for k in kv_heads) else kv_heads,
        drop_rate=_p(model.head_drop),
        pos_drop_rate=_p(model.pos_drop),
        patch_drop_rate=_p(model.patch_drop, "prob"),
        drop_path_rate=max(_p(b.drop_path1, "drop_prob") for b in model.blocks),
        norm_layer=norm_layer,
        init_values=1.0 if layer_scale else None,  # the values come with the weights
        class_token=model.cls_token is not None,
        num_reg_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
        no_embed_class=model.no_embed_class,
        use_abs_pos_emb=model.pos_embed is not None,
        use_rot_pos_emb=rope is not None,
        use_pre_transformer_norm=pre_norm,
        use_post_transformer_norm=not _identity(model.norm),
        use_fc_norm=not _identity(model.fc_norm),
        dynamic_img_size=model.dynamic_img_size,
    )
    # Build on the meta device (no init to throw away), take copies of timm's tensors, and the rope module (its
    # tables are non-persistent buffers, not in the state_dict) as a deep copy: the same class and configuration.
    out = Eva(**cfg, device="meta")
    if act != "gelu":
        for blk in out.blocks:  # timm's Eva takes no act_layer; its blocks' Mlp may still have another GELU
            blk.mlp.act = _make_act(act)
    if rope is not None:
        out.rope = copy.deepcopy(rope)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.load_state_dict(state, strict=True, assign=True)
    for blk in out.blocks:  # EvaAttention's fixed zero k bias is a non-persistent buffer
        a = blk.attn
        if getattr(a, "k_bias", None) is not None:
            a.k_bias = torch.zeros_like(a.q_bias, requires_grad=False).detach()
    out.train(model.training)
    out.pretrained_cfg = copy.deepcopy(getattr(model, "pretrained_cfg", None) or {})
    return out
