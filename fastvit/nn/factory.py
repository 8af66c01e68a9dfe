"""Named model configurations: timm's ViT classifiers, timm's Eva family and MAE's pre-training models.

Sources: timm ``models/vision_transformer.py`` (``vit_*`` entry points and their default ``num_classes`` /
input size), timm ``models/eva.py`` (``eva02_*``, ``vit_*_dinov3``, ``vit_pe_core_*``, ``vit_*_rope_*``: the entry
points' arguments, ``num_classes`` and input size of their default pretrained config) and facebookresearch/mae
``models_mae.py`` (``mae_vit_*_dec512d8b``). No weights are downloaded:
load them with :func:`fastvit.integrations.from_timm`, :func:`fastvit.integrations.from_hf` or ``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Dict, List

import torch.nn as nn

__all__ = ["create_model", "list_models"]


def _vit(img: int, patch: int, dim: int, depth: int, heads: int, num_classes: int = 1000) -> Dict[str, Any]:
    return dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, num_classes=num_classes)


# timm's architectures; num_classes as timm's default pretrained config (ViT-H/14's is the in21k one, 0 = no head).
_VIT_CONFIGS: Dict[str, Dict[str, Any]] = {
    "vit_tiny_patch16_224": _vit(224, 16, 192, 12, 3),
    "vit_tiny_patch16_384": _vit(384, 16, 192, 12, 3),
    "vit_small_patch16_224": _vit(224, 16, 384, 12, 6),
    "vit_small_patch16_384": _vit(384, 16, 384, 12, 6),
    "vit_base_patch16_224": _vit(224, 16, 768, 12, 12),
    "vit_base_patch16_384": _vit(384, 16, 768, 12, 12),
    "vit_large_patch16_224": _vit(224, 16, 1024, 24, 16),
    "vit_large_patch16_384": _vit(384, 16, 1024, 24, 16),
    "vit_large_patch14_224": _vit(224, 14, 1024, 24, 16),
    "vit_huge_patch14_224": _vit(224, 14, 1280, 32, 16, num_classes=0),
}

# timm's Eva entry points (models/eva.py). norm_eps stands for timm's norm_layer=partial(LayerNorm, eps=...); the
# default is timm's LayerNorm (eps 1e-6). img_size / num_classes are those of the default pretrained config.
_EVA02 = dict(patch_size=14, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16))
_DINOV3 = dict(
    img_size=256,
    patch_size=16,
    num_classes=0,
    dynamic_img_size=True,
    qkv_bias=False,
    init_values=1e-5,
    rope_type="dinov3",
    rope_temperature=100,
    rope_rotate_half=True,
    use_rot_pos_emb=True,
    use_abs_pos_emb=False,
    num_reg_tokens=4,
    use_fc_norm=False,
    norm_eps=1e-5,
)
_PE_CORE = dict(
    patch_size=16,
    mlp_ratio=4.0,
    global_pool="map",
    attn_type="rope",
    use_pre_transformer_norm=True,
    use_rot_pos_emb=True,
    rope_grid_offset=1.0,
    rope_grid_indexing="xy",
    attn_pool_num_heads=8,
    attn_pool_mlp_ratio=4.0,
    norm_eps=1e-5,
)
_ROPE_VIT = dict(
    img_size=224,
    patch_size=16,
    mlp_ratio=4,
    attn_type="rope",
    qkv_bias=True,
    init_values=1e-5,
    class_token=True,
    global_pool="token",
    use_abs_pos_emb=False,
    use_rot_pos_emb=True,
    rope_grid_indexing="xy",
    num_classes=1000,
)
_EVA_CONFIGS: Dict[str, Dict[str, Any]] = {
    "eva02_tiny_patch14_224": dict(_EVA02, img_size=224, embed_dim=192, depth=12, num_heads=3, num_classes=0),
    "eva02_small_patch14_224": dict(_EVA02, img_size=224, embed_dim=384, depth=12, num_heads=6, num_classes=0),
    "eva02_base_patch14_224": dict(
        _EVA02, img_size=224, embed_dim=768, depth=12, num_heads=12, qkv_fused=False, scale_mlp=True, num_classes=0
    ),
    "vit_small_patch16_dinov3": dict(_DINOV3, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_dinov3": dict(_DINOV3, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_dinov3": dict(_DINOV3, embed_dim=1024, depth=24, num_heads=16),
    "vit_pe_core_tiny_patch16_384": dict(
        _PE_CORE, img_size=384, embed_dim=192, depth=12, num_heads=3, ref_feat_shape=(24, 24), num_classes=512
    ),
    "vit_pe_core_small_patch16_384": dict(
        _PE_CORE, img_size=384, embed_dim=384, depth=12, num_heads=6, ref_feat_shape=(24, 24), num_classes=512
    ),
    "vit_pe_core_base_patch16_224": dict(
        _PE_CORE, img_size=224, embed_dim=768, depth=12, num_heads=12, ref_feat_shape=(14, 14), num_classes=1024
    ),
    "vit_base_patch16_rope_224": dict(
        _ROPE_VIT, embed_dim=768, depth=12, num_heads=12, use_fc_norm=False, rope_temperature=100.0
    ),
    "vit_base_patch16_rope_mixed_224": dict(
        _ROPE_VIT, embed_dim=768, depth=12, num_heads=12, rope_temperature=10.0, rope_type="mixed"
    ),
}

_MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_eps=1e-6)
_MAE_CONFIGS: Dict[str, Dict[str, Any]] = {
    "mae_vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, **_MAE_DECODER),
    "mae_vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_MAE_DECODER),
    "mae_vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_MAE_DECODER),
}


def list_models() -> List[str]:
    """Sorted names accepted by :func:`create_model`."""
    return sorted([*_VIT_CONFIGS, *_EVA_CONFIGS, *_MAE_CONFIGS])


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a named configuration with random init.

    Args:
        name: one of :func:`list_models` -- ``vit_*`` gives a :class:`fastvit.nn.VisionTransformer` with timm's
            configuration (timm's ``timm.create_model(name)`` has the same ``state_dict`` keys and shapes);
            ``eva02_*``, ``vit_*_dinov3``, ``vit_pe_core_*``, ``vit_*_rope_*`` give a :class:`fastvit.nn.Eva` with
            timm's configuration (the same; a model with rotary embeddings needs timm installed for its rope tables);
            ``mae_vit_*`` gives a :class:`fastvit.nn.MaskedAutoencoderViT` with MAE's (decoder 512 wide, 8 deep,
            16 heads, mlp_ratio 4, LayerNorm eps 1e-6).
        pretrained: must be False -- fastvit has no weight hub.
        **overrides: constructor arguments replacing the configuration's (e.g. ``num_classes=10``, ``img_size=...``).

    Returns:
        The model, in training mode, on the current default device and dtype.

    Raises:
        ValueError: unknown ``name`` (the message lists the known names), or ``pretrained=True``.
        ImportError: an Eva configuration with rotary embeddings without timm installed.
        TypeError: an override the model's constructor does not accept.
    """
    if not isinstance(name, str) or name not in _VIT_CONFIGS and name not in _EVA_CONFIGS and name not in _MAE_CONFIGS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(list_models())}")
    if pretrained:
        raise ValueError(
            "pretrained=True is not supported: fastvit downloads no weights. Build the model and load weights with "
            "fastvit.from_timm(timm_model) / fastvit.from_hf(hf_model) or model.load_state_dict(state_dict)"
        )
    if name in _VIT_CONFIGS:
        from fastvit.nn.vit import VisionTransformer

        model = VisionTransformer(**{**_VIT_CONFIGS[name], **overrides})
        model.pretrained_cfg = timm_pretrained_cfg(name) or {}  # what timm.create_model(name) attaches
        return model
    if name in _EVA_CONFIGS:
        from fastvit.nn.eva import Eva  # lazy, as the others

        cfg = {**_EVA_CONFIGS[name], **overrides}
        eps = cfg.pop("norm_eps", None)
        if eps is not None and "norm_layer" not in overrides:
            cfg["norm_layer"] = partial(nn.LayerNorm, eps=eps)
        model = Eva(**cfg)
        model.pretrained_cfg = timm_pretrained_cfg(name) or {}
        return model
    from fastvit.nn.mae import MaskedAutoencoderViT  # lazy: fastvit.nn.mae is built on this package's layers

    return MaskedAutoencoderViT(**{**_MAE_CONFIGS[name], **overrides})


def timm_pretrained_cfg(name: str) -> dict | None:
    """The ``pretrained_cfg`` dict ``timm.create_model(name)`` attaches to its model, or ``None`` when timm is not
    installed or has no configuration registered for ``name`` (e.g. MAE's ``mae_vit_*``).

    As timm's builder: ``timm.models.get_pretrained_cfg(name)`` (the default tag), ``architecture`` filled in,
    ``.to_dict()``. A fresh dict each call.

    Raises:
        RuntimeError: ``name`` has a pretrained tag timm does not know (timm's error).
    """
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        return None
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if not cfg.architecture:
        cfg = dataclasses.replace(cfg, architecture=name)
    return cfg.to_dict()
