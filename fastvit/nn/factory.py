"""Named model configurations: timm's ViT classifiers and MAE's pre-training models.

Sources: timm ``models/vision_transformer.py`` (``vit_*`` entry points and their default ``num_classes`` /
input size) and facebookresearch/mae ``models_mae.py`` (``mae_vit_*_dec512d8b``). No weights are downloaded:
load them with :func:`fastvit.integrations.from_timm`, :func:`fastvit.integrations.from_hf` or ``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
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

_MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_eps=1e-6)
_MAE_CONFIGS: Dict[str, Dict[str, Any]] = {
    "mae_vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, **_MAE_DECODER),
    "mae_vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_MAE_DECODER),
    "mae_vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_MAE_DECODER),
}


def list_models() -> List[str]:
    """Sorted names accepted by :func:`create_model`."""
    return sorted([*_VIT_CONFIGS, *_MAE_CONFIGS])


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a named configuration with random init.

    Args:
        name: one of :func:`list_models` -- ``vit_*`` gives a :class:`fastvit.nn.VisionTransformer` with timm's
            configuration (timm's ``timm.create_model(name)`` has the same ``state_dict`` keys and shapes);
            ``mae_vit_*`` gives a :class:`fastvit.nn.MaskedAutoencoderViT` with MAE's (decoder 512 wide, 8 deep,
            16 heads, mlp_ratio 4, LayerNorm eps 1e-6).
        pretrained: must be False -- fastvit has no weight hub.
        **overrides: constructor arguments replacing the configuration's (e.g. ``num_classes=10``, ``img_size=...``).

    Returns:
        The model, in training mode, on the current default device and dtype.

    Raises:
        ValueError: unknown ``name`` (the message lists the known names), or ``pretrained=True``.
        TypeError: an override the model's constructor does not accept.
    """
    if not isinstance(name, str) or name not in _VIT_CONFIGS and name not in _MAE_CONFIGS:
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
