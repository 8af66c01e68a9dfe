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
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint

from fastvit.nn.layers import Block, PatchDropout, PatchEmbed, apply_norm, embed_patches, resolve_act
from fastvit.nn.packed import PackedTokens, cu_seqlens_from_lengths, pool_packed
from fastvit.nn.pos_embed import resample_abs_pos_embed

__all__ = ["VisionTransformer", "checkpoint_filter_fn", "feature_take_indices"]

_POOLS = ("token", "avg", "")


def feature_take_indices(
    num_features: int, indices: Optional[Union[int, Sequence[int]]] = None
) -> Tuple[List[int], int]:
    """Absolute block indices to take, as timm's ``timm.models._features.feature_take_indices``.

    Args:
        num_features: how many blocks there are.
        indices: ``None`` -> all; an int n -> the last n; a sequence of ints -> those (negative ones count from the
            end), in the order given.

    Returns:
        (take_indices, max_index): a list of non-negative ints and its maximum.

    Raises:
        ValueError: ``n`` outside 1..num_features, or an index outside -num_features..num_features-1 (timm raises
            AssertionError with the same message).
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {idx} is out of range (0 to {num_features - 1})")
            take.append(int(idx))
        if not take:
            raise ValueError("indices is an empty sequence; pass None (all blocks), an int n (last n) or indices")
    return take, max(take)


def run_blocks(
    blocks: Iterable[nn.Module],
    x: torch.Tensor,
    checkpointed: bool,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Run ``blocks`` in order; with ``checkpointed`` each block is one non-reentrant
    ``torch.utils.checkpoint.checkpoint`` segment (timm's ``checkpoint_seq(blocks, x)`` with ``every=1``): its
    activations are dropped after the forward and recomputed in the backward (RNG state preserved, so dropout /
    drop-path masks are the same both times).

    With ``cu_seqlens`` ``x`` is packed (T, C) and every block is called as ``blk(x, cu_seqlens, max_seqlen)``
    (:class:`fastvit.nn.layers.Block`'s packed forward)."""
    if cu_seqlens is None and not checkpointed and isinstance(blocks, nn.Sequential):
        return blocks(x)  # one module call, as timm's forward_features makes it (hooks on ``blocks`` fire)
    args = () if cu_seqlens is None else (cu_seqlens, max_seqlen)
    if checkpointed:
        for blk in blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, *args, use_reentrant=False)
        return x
    for blk in blocks:
        x = blk(x, *args)
    return x


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
    ``forward_features`` -> (B, R + Np, C), R = ``num_prefix_tokens``. Images of different sizes in one pass, packed
    without padding (NaViT): ``forward_packed(list of (in_chans, H_s, W_s))`` -> (S, num_classes), with its parts
    ``embed_packed`` / ``forward_features_packed`` (-> :class:`fastvit.nn.packed.PackedTokens`) /
    ``forward_head_packed``.

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
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=not pre_norm,
            strict_img_size=not dynamic_img_size,
            **dd,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.empty(1, embed_len, embed_dim, **dd)) if pos_embed == "learn" else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.patch_drop = (
            PatchDropout(patch_drop_rate, num_prefix_tokens=self.num_prefix_tokens)
            if patch_drop_rate > 0
            else nn.Identity()
        )
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    proj_bias=proj_bias,
                    init_values=init_values,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    act_layer=act,
                    depth=i,
                    **dd,
                )
                for i in range(depth)
            ]
        )
        # what timm's feature wrappers (features_only, FeatureGetterNet) and forward_intermediates users read
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = None
        self.grad_checkpointing = False
        self.pretrained_cfg: Dict[str, Any] = {}
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

    # ------------------------------------------------------------------------------------------- training APIs
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameter names excluded from weight decay, exactly timm's ``VisionTransformer.no_weight_decay``
        (``timm.optim.create_optimizer_v2`` reads it; names the model lacks are ignored there)."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Regexes that map parameter names to layer groups, exactly timm's ``VisionTransformer.group_matcher``.

        ``stem`` (tokens, ``pos_embed``, ``patch_embed``, ``norm_pre``) is group 0, ``blocks.{i}`` is group i + 1,
        the final ``norm`` follows the last block, and everything unmatched (``fc_norm``, ``head``) is the last
        group. ``timm.optim.create_optimizer_v2(model, ..., layer_decay=...)`` and
        ``timm.models.group_parameters`` use it; ``coarse`` is accepted and, as in timm, changes nothing.
        """
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation (gradient) checkpointing of the blocks on or off, as timm's ``set_grad_checkpointing``.

        With it on, :meth:`forward_features` / :meth:`forward_intermediates` run each block as one non-reentrant
        ``torch.utils.checkpoint`` segment (timm: ``checkpoint_seq(self.blocks, x)``): a block keeps only its input
        for the backward and runs its forward again there. Outputs and gradients are those without checkpointing
        (RNG state is restored for the recomputation, so dropout masks match).
        """
        self.grad_checkpointing = bool(enable)

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """Alias of ``pretrained_cfg`` (timm's backward-compatible name)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

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
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
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
                self.pos_embed.detach(),
                self.patch_embed.grid_size,
                old_size=old_grid,
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
            self.pos_embed,
            grid_size,
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            antialias=antialias,
        )

    # ------------------------------------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self.patch_embed.check_input(x)
        pos = self.pos_embed
        if self.dynamic_img_size and pos is not None:
            pos = self.resample_pos_embed(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        x = embed_patches(self.patch_embed, x, pos_embed=pos, cls_token=self.cls_token, reg_tokens=self.reg_token)
        return self.pos_drop(x) if pos is not None else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, Hi, Wi) -> (B, R + Np, C) token features after the final norm (timm's ``forward_features``)."""
        x = self._embed(x)
        x = self.patch_drop(x)
        x = apply_norm(self.norm_pre, x)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return apply_norm(self.norm, x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]], Dict[str, Any]]:
        """Features plus the outputs of selected blocks, as timm's ``VisionTransformer.forward_intermediates``
        (same signature, defaults, output structure and values).

        Args:
            x: (B, in_chans, Hi, Wi) float images.
            indices: which blocks' outputs to return: ``None`` all, an int n the last n, a list of indices
                (negative ones count from the end); returned in block order whatever the list's order, as timm.
            return_prefix_tokens: pair each intermediate with its prefix tokens (B, R, C) (R =
                ``num_prefix_tokens``; ignored when R = 0, as timm).
            norm: apply the final ``norm`` to each intermediate (``nn.Identity`` for fc_norm models, as timm).
            stop_early: do not run the blocks after the last requested one.
            output_fmt: ``'NCHW'`` -> each intermediate (B, C, Hi/P, Wi/P), contiguous; ``'NLC'`` -> (B, Np, C).
            intermediates_only: return only the list of intermediates.
            output_dict: return ``{'image_intermediates': [...], 'image_features': (B, N, C)}`` (features left out
                with ``intermediates_only``; ``'image_intermediates_prefix'`` added with ``return_prefix_tokens``).
            attn_mask, is_causal: accepted for timm's signature; fastvit's blocks have no masked attention.

        Returns:
            ``(features, intermediates)`` with ``features`` = ``norm(x)`` after the blocks run (B, N, C) -- with
            ``stop_early`` after the last requested block, as timm; or the intermediates list alone, or the dict.
            Each intermediate is a tensor, or a ``(spatial, prefix)`` tuple with ``return_prefix_tokens``. Dtype of
            the computation (autocast dtype under autocast).

        Raises:
            ValueError: ``output_fmt`` not ``'NCHW'`` / ``'NLC'``, ``indices`` out of range, ``attn_mask`` or
                ``is_causal`` given, or a bad image (see :meth:`forward`).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise ValueError("forward_intermediates: attn_mask / is_causal are not supported by fastvit's blocks")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.patch_embed.check_input(x)
        B, _, height, width = x.shape
        x = self._embed(x)
        x = self.patch_drop(x)
        x = apply_norm(self.norm_pre, x)

        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = run_blocks((blk,), x, self.grad_checkpointing)
            if i in take_indices:
                intermediates.append(apply_norm(self.norm, x) if norm else x)
        R = self.num_prefix_tokens
        prefix_tokens = [y[:, :R] for y in intermediates] if R else None
        if R:
            intermediates = [y[:, R:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if output_dict:
            out: Dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = apply_norm(self.norm, x)
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return apply_norm(self.norm, x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop what :meth:`forward_intermediates` with these ``indices`` does not need, as timm's
        ``VisionTransformer.prune_intermediate_layers``: the blocks after the last index, the final ``norm``
        (``prune_norm``) and ``fc_norm`` plus the classifier (``prune_head``: ``reset_classifier(0, '')``).

        Returns:
            The absolute indices kept (list of int), as :func:`feature_take_indices`.

        Raises:
            ValueError: ``indices`` out of range.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: Union[int, List[int], Tuple[int, ...]] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> List[Any]:
        """DINO-style interface, as timm's ``get_intermediate_layers``: :meth:`forward_intermediates` with
        ``intermediates_only=True`` and ``output_fmt='NCHW' if reshape else 'NLC'``."""
        return self.forward_intermediates(
            x,
            n,
            return_prefix_tokens=return_prefix_tokens,
            norm=norm,
            output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
            attn_mask=attn_mask,
        )

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

    # ------------------------------------------------------------------------------------------- packed (NaViT)
    def _check_images(self, images: Sequence[torch.Tensor]) -> None:
        if isinstance(images, torch.Tensor) or not isinstance(images, (list, tuple)):
            raise TypeError(
                f"images must be a list or tuple of (C, H, W) tensors, got {type(images).__name__}"
                + (" (for a dense (B, C, H, W) batch call forward)" if isinstance(images, torch.Tensor) else "")
            )
        if not images:
            raise ValueError("images must hold at least one (C, H, W) image, got an empty sequence")
        Ph, Pw = self.patch_embed.patch_size
        first = images[0]
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or not img.is_floating_point():
                raise TypeError(
                    f"images[{i}] must be a floating-point torch.Tensor (C, H, W), got {type(img).__name__}"
                    + (f" of dtype {img.dtype}" if isinstance(img, torch.Tensor) else "")
                )
            if img.dim() != 3 or img.shape[0] != self.in_chans:
                raise ValueError(f"images[{i}] must have shape ({self.in_chans}, H, W), got {tuple(img.shape)}")
            H, W = img.shape[1:]
            if H % Ph or W % Pw or H == 0 or W == 0:
                raise ValueError(
                    f"images[{i}] has size {H}x{W}, not a positive multiple of patch_size {(Ph, Pw)} "
                    f"(shape {tuple(img.shape)}); resize or crop it first"
                )
            if img.dtype != first.dtype or img.device != first.device:
                raise ValueError(
                    f"images[{i}] is {img.dtype} on {img.device} but images[0] is {first.dtype} on {first.device}; "
                    "all images must share dtype and device"
                )

    def embed_packed(self, images: Sequence[torch.Tensor]) -> PackedTokens:
        """Embed images of different sizes into one packed token sequence (NaViT's "Patch n' Pack", Dehghani et al.,
        2023, arXiv:2307.06304, sec. 2.1): per image, the patch projection, the prefix tokens (cls, registers) and
        ``pos_embed`` resampled to that image's patch grid -- what :meth:`forward_features` does before the blocks
        for one image at its own size with ``dynamic_img_size=True`` -- then position dropout and patch dropout
        (per image, as the dense path) and the sequences concatenated.

        Images of the same size share one :func:`fastvit.ops.patch_embed` call. ``pos_embed`` is resampled (timm's
        ``resample_abs_pos_embed``: bicubic, antialias) to each image's grid whatever ``dynamic_img_size`` says:
        packing exists to mix sizes.

        Args:
            images: S >= 1 float tensors (in_chans, H_s, W_s), each H_s, W_s a positive multiple of the patch size,
                all of one dtype and device.

        Returns:
            :class:`fastvit.nn.packed.PackedTokens` with ``tokens`` (T, C), T = sum over images of
            R + (H_s/Ph)·(W_s/Pw) (fewer in training with patch dropout), in the images' dtype (autocast dtype under
            autocast), R = ``num_prefix_tokens``.

        Raises:
            TypeError: ``images`` not a list / tuple of floating tensors (a (B, C, H, W) tensor: use
                :meth:`forward`).
            ValueError: no images; an image not (in_chans, H, W); H or W not a multiple of the patch size (the
                message names ``images[i]``); images of different dtypes or devices.
        """
        self._check_images(images)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape[1:]), []).append(i)
        per_image: List[Optional[torch.Tensor]] = [None] * len(images)
        grids: List[Tuple[int, int]] = [(0, 0)] * len(images)
        for (H, W), idx in groups.items():
            grid = self.patch_embed.dynamic_feat_size((H, W))
            pos = self.resample_pos_embed(grid) if self.pos_embed is not None else None
            x = images[idx[0]][None] if len(idx) == 1 else torch.stack([images[i] for i in idx])
            x = self.patch_embed.embed(x, pos_embed=pos, cls_token=self.cls_token, reg_tokens=self.reg_token)
            if pos is not None:
                x = self.pos_drop(x)
            x = self.patch_drop(x)  # (b, R + N_keep, C); the identity in eval mode
            for j, i in enumerate(idx):
                per_image[i] = x[j]
                grids[i] = grid
        tokens = per_image[0] if len(images) == 1 else torch.cat(per_image, dim=0)
        lengths = [t.shape[0] for t in per_image]
        cu_seqlens = cu_seqlens_from_lengths(lengths, device=tokens.device)
        return PackedTokens(tokens, cu_seqlens, max(lengths), tuple(grids), self.num_prefix_tokens)

    def forward_features_packed(self, images: Union[Sequence[torch.Tensor], PackedTokens]) -> PackedTokens:
        """Token features of images of different sizes, packed without padding: :meth:`embed_packed`, ``norm_pre``,
        the blocks on packed tokens (attention per image through :func:`fastvit.ops.attention` with
        ``cu_seqlens``; grad checkpointing as :meth:`forward_features`), the final ``norm``.

        Equal, image by image, to ``forward_features(images[s][None])`` with ``dynamic_img_size=True`` (up to float
        reassociation); no padding tokens are computed or attended to.

        Args:
            images: as :meth:`embed_packed`, or an already embedded :class:`~fastvit.nn.packed.PackedTokens`.

        Returns:
            :class:`~fastvit.nn.packed.PackedTokens` whose ``tokens`` (T, C) are the features; ``split()`` gives
            each image's (R + Np_s, C).

        Raises:
            TypeError, ValueError: as :meth:`embed_packed`.
        """
        packed = images if isinstance(images, PackedTokens) else self.embed_packed(images)
        x = apply_norm(self.norm_pre, packed.tokens)
        x = run_blocks(self.blocks, x, self.grad_checkpointing, packed.cu_seqlens, packed.max_seqlen)
        return packed.replace_tokens(apply_norm(self.norm, x))

    def pool_packed(self, packed: PackedTokens, pool_type: Optional[str] = None) -> torch.Tensor:
        """:meth:`pool` per packed sequence: (T, C) -> (S, C) for ``'token'`` / ``'avg'`` (mean of each image's
        patch tokens), the (T, C) tokens for ``''`` (see :func:`fastvit.nn.packed.pool_packed`)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        return pool_packed(packed.tokens, packed.cu_seqlens, pool_type, self.num_prefix_tokens)

    def forward_head_packed(self, packed: PackedTokens, pre_logits: bool = False) -> torch.Tensor:
        """:meth:`forward_head` on packed features: pool each sequence, ``fc_norm``, dropout, the classifier.

        Args:
            packed: the output of :meth:`forward_features_packed`.
            pre_logits: stop before the classifier.

        Returns:
            (S, num_classes) logits (``pre_logits``: (S, C)); with ``global_pool=''`` one row per token, (T, ...).
        """
        x = self.pool_packed(packed)
        x = apply_norm(self.fc_norm, x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_packed(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Classify images of different sizes in one pass without padding (NaViT, Dehghani et al., 2023; the packed
        counterpart of timm NaFlexVit's padded + masked batches): ``forward_head_packed(forward_features_packed(
        images))``.

        Equivalent to ``torch.cat([model.forward(img[None]) for img in images])`` on a ``dynamic_img_size=True``
        model (up to float reassociation; dropout masks differ), at the cost of one pass whose attention is
        block-diagonal over the images.

        Args:
            images: S >= 1 float tensors (in_chans, H_s, W_s), H_s and W_s multiples of the patch size, one dtype
                and device.

        Returns:
            (S, num_classes) logits in the images' dtype (autocast dtype under autocast).

        Raises:
            TypeError, ValueError: as :meth:`embed_packed` (the message names ``images[i]``).
        """
        return self.forward_head_packed(self.forward_features_packed(images))


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
