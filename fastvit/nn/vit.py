"""Vision Transformer with timm's constructor, methods and ``state_dict`` layout, running on :mod:`fastvit.ops`.

Source: Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021, arXiv:2010.11929) and timm's
``timm.models.vision_transformer.VisionTransformer`` (class token / register tokens -- Darcet et al., 2024,
arXiv:2309.16588 --, ``no_embed_class`` as DeiT III, ``pre_norm`` as CLIP, ``fc_norm`` with average pooling as
BEiT / MAE fine-tuning).

The whole embedding (patch projection, prefix tokens, position add) is one :func:`fastvit.ops.patch_embed` call;
blocks are :class:`fastvit.nn.layers.Block`.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from fastvit.nn.layers import Block, PatchDropout, PatchEmbed, apply_norm, resolve_act
from fastvit.nn.pos_embed import resample_abs_pos_embed

__all__ = ["VisionTransformer", "checkpoint_filter_fn"]

_POOLS = ("token", "avg", "")


def _trunc_normal_(t: torch.Tensor, std: float = 0.02) -> None:
    # timm's trunc_normal_ cuts at +-2 (absolute), which for std .02 is +-100 std: effectively a plain normal.
    nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


class VisionTransformer(nn.Module):
    """Vision Transformer classifier with timm's arguments, defaults, methods and parameter names.

    Args (timm's names and defaults):
        img_size: input size, int or (Hi, Wi); must be divisible by ``patch_size``.
        patch_size: P. in_chans: image channels. num_classes: head outputs (0: no head, ``nn.Identity``).
        global_pool: ``'token'`` (cls token), ``'avg'`` (mean of the patch tokens) or ``''`` (no pooling).
        embed_dim: C. depth: number of blocks. num_heads: H (C must be divisible by H). mlp_ratio: MLP width / C.
        qkv_bias, qk_norm, proj_bias, init_values (LayerScale), class_token, reg_tokens, no_embed_class,
        pre_norm, final_norm: as timm.
        pos_embed: ``'learn'`` (default) or ``'none'``.
        fc_norm: norm after pooling instead of before; ``None`` means ``global_pool == 'avg'`` (timm's rule).
        dynamic_img_size: accept any image size divisible by P, resampling ``pos_embed`` to the input's grid.
        drop_rate (head), pos_drop_rate, patch_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate
        (linearly increasing over depth, as timm).
        norm_eps: LayerNorm eps (timm's ViT: 1e-6). norm_layer: optional ``nn.LayerNorm`` constructor overriding it.
        act_layer: ``'gelu'`` (default), ``'gelu_tanh'``, ``'quick_gelu'`` or an equivalent module class.
        weight_init: ``''`` (timm's default init) or ``'skip'``.

    Shapes: ``forward`` (B, in_chans, Hi, Wi) float -> (B, num_classes) logits in the input dtype;
    ``forward_features`` -> (B, R + Np, C), R = ``num_prefix_tokens``.

    Raises:
        ValueError: at construction, ``embed_dim`` not divisible by ``num_heads``, an unknown ``global_pool`` /
            ``act_layer`` / ``pos_embed``, ``global_pool='token'`` without a class token, ``img_size`` not divisible
            by ``patch_size``; at forward, an input with the wrong channel count, a size not divisible by the patch
            size, or a size other than ``img_size`` without ``dynamic_img_size``.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = True,
        pos_embed: str = "learn",
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        norm_layer=None,
        act_layer: object = "gelu",
        weight_init: str = "",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' or ''")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive int divisible by num_heads ({num_heads})")
        if pos_embed not in ("learn", "", "none"):
            raise ValueError(f"pos_embed must be 'learn' or 'none', got {pos_embed!r}")
        if weight_init not in ("", "skip"):
            raise ValueError(f"weight_init must be '' or 'skip', got {weight_init!r}")
        if isinstance(reg_tokens, bool) or not isinstance(reg_tokens, int) or reg_tokens < 0:
            raise ValueError(f"reg_tokens must be a non-negative int, got {reg_tokens!r}")
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        act = resolve_act(act_layer)
        use_fc_norm = (global_pool == "avg") if fc_norm is None else bool(fc_norm)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=norm_eps)
        dd = {"device": device, "dtype": dtype}

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.pool_include_prefix = False
        self.act_layer = act

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            bias=not pre_norm, strict_img_size=not dynamic_img_size, **dd,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.empty(1, embed_len, embed_dim, **dd)) if pos_embed == "learn" else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.patch_drop = (
            PatchDropout(patch_drop_rate, num_prefix_tokens=self.num_prefix_tokens) if patch_drop_rate > 0 else nn.Identity()
        )
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                    proj_bias=proj_bias, init_values=init_values, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                    drop_path=dpr[i], norm_layer=norm_layer, act_layer=act, depth=i, **dd,
                )
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = None
        self.fc_norm = norm_layer(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        for n in (self.norm_pre, self.norm, self.fc_norm):
            if not isinstance(n, nn.Identity) and (device is not None or dtype is not None):
                n.to(**{k: v for k, v in dd.items() if v is not None})
        if weight_init != "skip":
            self.init_weights()

    # ------------------------------------------------------------------------------------------- setup
    def init_weights(self) -> None:
        """timm's default ViT init: truncated normal (std .02) for ``pos_embed`` and every Linear weight, zero
        Linear biases, normal (std 1e-6) for the cls / register tokens; LayerNorm ones/zeros, conv as PyTorch."""
        if self.pos_embed is not None:
            _trunc_normal_(self.pos_embed)
        for t in (self.cls_token, self.reg_token):
            if t is not None:
                nn.init.normal_(t, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names that timm excludes from weight decay."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def get_classifier(self) -> nn.Module:
        """The classifier head (``nn.Linear`` or ``nn.Identity``)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh ``nn.Linear(embed_dim, num_classes)`` (``nn.Identity`` for 0) and
        optionally change ``global_pool``; the fc_norm / norm placement is kept, as timm.

        Raises:
            ValueError: unknown ``global_pool``, or ``'token'`` without a class token.
        """
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.patch_embed.proj.weight
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 else nn.Identity()
        )
        self.head.train(self.training)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Change the model's fixed input size, resampling ``pos_embed`` (bicubic, antialias, as timm's
        ``set_input_size``).

        Raises:
            ValueError: ``img_size`` not divisible by the patch size.
        """
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size)
        if self.pos_embed is not None and self.patch_embed.grid_size != old_grid:
            new = resample_abs_pos_embed(
                self.pos_embed.detach(), self.patch_embed.grid_size, old_size=old_grid,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            )
            self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)

    def resample_pos_embed(self, grid_size: Tuple[int, int], *, antialias: bool = True) -> Optional[torch.Tensor]:
        """``pos_embed`` resampled (differentiably) to a ``grid_size`` token grid; the parameter is not changed.

        Returns:
            (1, L', C) or ``None`` when the model has no position embedding.
        """
        if self.pos_embed is None:
            return None
        return resample_abs_pos_embed(
            self.pos_embed, grid_size, old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens, antialias=antialias,
        )

    # ------------------------------------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self.patch_embed.check_input(x)
        pos = self.pos_embed
        if self.dynamic_img_size and pos is not None:
            pos = self.resample_pos_embed(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        x = self.patch_embed(x, pos_embed=pos, cls_token=self.cls_token, reg_tokens=self.reg_token)
        return self.pos_drop(x) if pos is not None else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, Hi, Wi) -> (B, R + Np, C) token features after the final norm (timm's ``forward_features``)."""
        x = self._embed(x)
        x = self.patch_drop(x)
        x = apply_norm(self.norm_pre, x)
        x = self.blocks(x)
        return apply_norm(self.norm, x)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """(B, N, C) -> (B, C) (``'token'`` / ``'avg'``) or (B, N, C) (``''``)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        if pool_type == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, fc_norm, dropout and (unless ``pre_logits``) the classifier: (B, N, C) -> (B, num_classes)."""
        x = self.pool(x)
        x = apply_norm(self.fc_norm, x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(
    state_dict: Dict[str, torch.Tensor],
    model: VisionTransformer,
    antialias: bool = True,
    interpolation: str = "bicubic",
) -> Dict[str, torch.Tensor]:
    """Adapt a timm ViT ``state_dict`` to ``model``: strip a DDP ``module.`` prefix and resample ``pos_embed`` to
    the model's token grid (square source grid assumed, as timm's loader).

    ``antialias=True`` reproduces timm's ``checkpoint_filter_fn``; ``antialias=False`` MAE's ``interpolate_pos_embed``.

    Args:
        state_dict: name -> tensor, timm's key names.
        model: the target :class:`VisionTransformer`.

    Returns:
        A new dict ready for ``model.load_state_dict``.

    Raises:
        ValueError: a ``pos_embed`` whose grid part is not square, or whose width differs from the model's.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        if k == "pos_embed" and model.pos_embed is not None and v.shape != model.pos_embed.shape:
            if v.shape[-1] != model.pos_embed.shape[-1]:
                raise ValueError(f"pos_embed width {v.shape[-1]} != model embed_dim {model.pos_embed.shape[-1]}")
            R = 0 if model.no_embed_class else model.num_prefix_tokens
            v = resample_abs_pos_embed(
                v, model.patch_embed.grid_size, num_prefix_tokens=R, interpolation=interpolation, antialias=antialias
            )
        out[k] = v
    return out
