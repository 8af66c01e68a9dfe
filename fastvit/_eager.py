"""The ``eager`` backend: PyTorch's own ops, always available and always last in the priority list.

Where PyTorch has a fused op that computes exactly the reference math (SDPA, ``F.layer_norm``, ``F.linear``,
``F.gelu``) the eager backend uses it, as timm does -- that makes ``fastvit`` modules on ``eager`` give timm's
outputs bit for bit. Everything else is :mod:`fastvit.reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvit import reference
from fastvit.backends import register_kernel


def scaled_dot_product_attention(q, k, v, *, scale=None, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def attention(qkv, num_heads, *, scale=None, dropout_p=0.0):
    B, N, C3 = qkv.shape
    q, k, v = reference.split_qkv(qkv, num_heads)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return o.transpose(1, 2).reshape(B, N, C3 // 3)


def layer_norm(x, weight, bias, eps=1e-6, *, residual=None):
    if residual is not None:
        x = x + residual
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # PyTorch's CPU LayerNorm backward sums dweight / dbias in the input precision; go through fp32 instead.
        w = None if weight is None else weight.float()
        b = None if bias is None else bias.float()
        y = F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)
    else:
        y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return y if residual is None else (y, x)


def linear_gelu(x, weight, bias, *, approximate="none"):
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def linear_residual(x, weight, bias, residual, *, gamma=None):
    h = F.linear(x, weight, bias)
    return residual + (h * gamma if gamma is not None else h)


def patch_embed(images, weight, bias, *, pos_embed=None, cls_token=None, reg_tokens=None, ids_keep=None):
    B = images.shape[0]
    E = weight.shape[0]
    x = F.conv2d(images, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)
    prefix = [t.expand(B, -1, -1) for t in (cls_token, reg_tokens) if t is not None]
    num_prefix = sum(t.shape[1] for t in prefix)
    if pos_embed is not None and pos_embed.shape[1] == x.shape[1] + num_prefix:
        if ids_keep is None:  # timm's order: concatenate, then add
            return torch.cat([*prefix, x], dim=1) + pos_embed if prefix else x + pos_embed
        x = x + pos_embed[:, num_prefix:]
        prefix = [torch.cat(prefix, dim=1) + pos_embed[:, :num_prefix]] if prefix else []
    elif pos_embed is not None:
        x = x + pos_embed
    if ids_keep is not None:
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, E))
    return torch.cat([*prefix, x], dim=1) if prefix else x


for _name, _fn in {
    "patch_embed": patch_embed,
    "attention": attention,
    "scaled_dot_product_attention": scaled_dot_product_attention,
    "layer_norm": layer_norm,
    "linear_gelu": linear_gelu,
    "linear_residual": linear_residual,
    "mae_unshuffle": reference.mae_unshuffle,
    "mae_loss": reference.mae_loss,
}.items():
    register_kernel("eager", _name, _fn)
