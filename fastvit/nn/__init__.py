"""Drop-in ViT modules on :mod:`fastvit.ops`, with timm's parameter names (see :mod:`fastvit.nn.layers`; timm's Eva
family in :mod:`fastvit.nn.eva`)."""

from fastvit.nn.eva import Eva, EvaBlock
from fastvit.nn.factory import create_model, list_models
from fastvit.nn.layers import Attention, Block, DropPath, LayerScale, Mlp, PatchDropout, PatchEmbed
from fastvit.nn.mae import MaskedAutoencoderViT
from fastvit.nn.packed import PackedTokens, cu_seqlens_from_lengths, pad_input, pool_packed, unpad_input
from fastvit.nn.pos_embed import get_2d_sincos_pos_embed, resample_abs_pos_embed
from fastvit.nn.vit import VisionTransformer

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "Eva",
    "EvaBlock",
    "LayerScale",
    "MaskedAutoencoderViT",
    "Mlp",
    "PackedTokens",
    "PatchDropout",
    "PatchEmbed",
    "VisionTransformer",
    "create_model",
    "cu_seqlens_from_lengths",
    "get_2d_sincos_pos_embed",
    "list_models",
    "pad_input",
    "pool_packed",
    "resample_abs_pos_embed",
    "unpad_input",
]
