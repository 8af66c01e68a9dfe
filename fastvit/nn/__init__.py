"""Drop-in ViT modules on :mod:`fastvit.ops`, with timm's parameter names (see :mod:`fastvit.nn.layers`)."""

from fastvit.nn.factory import create_model, list_models
from fastvit.nn.layers import Attention, Block, DropPath, LayerScale, Mlp, PatchDropout, PatchEmbed
from fastvit.nn.mae import MaskedAutoencoderViT
from fastvit.nn.pos_embed import get_2d_sincos_pos_embed, resample_abs_pos_embed
from fastvit.nn.vit import VisionTransformer

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "MaskedAutoencoderViT",
    "Mlp",
    "PatchDropout",
    "PatchEmbed",
    "VisionTransformer",
    "create_model",
    "get_2d_sincos_pos_embed",
    "list_models",
    "resample_abs_pos_embed",
]
