"""Masked Autoencoder (MAE) pre-training model on :mod:`fastvit.ops`.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, arXiv:2111.06377, and the reference
implementation facebookresearch/mae ``models_mae.py`` (``MaskedAutoencoderViT``) with ``util/pos_embed.py``.

:class:`MaskedAutoencoderViT` has the reference model's constructor arguments, parameter names, shapes and
registration order -- its ``state_dict`` and the reference's load into each other with ``strict=True`` -- and the
reference's initialisation (which also consumes the global RNG in the same order, so the same seed gives the same
weights). What differs is the execution: the encoder embeds only the kept patches (one
:func:`fastvit.ops.patch_embed` call with ``ids_keep``), the decoder input is built by one
:func:`fastvit.ops.mae_unshuffle`, the blocks run on fastvit's fused ops and the loss is
:func:`fastvit.ops.mae_loss`.

Vocabulary: B batch, C image channels, Hi x Wi image size, P patch size, N = (Hi/P)·(Wi/P) patches,
N_keep = int(N · (1 - mask_ratio)) kept patches, E encoder width, E_dec decoder width.
"""

from __future__ import annotations

from functools import partial
from numbers import Real
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from fastvit import ops
from fastvit.nn.layers import Block, PatchEmbed, apply_norm, embed_patches
from fastvit.nn.pos_embed import get_2d_sincos_pos_embed
from fastvit.nn.vit import run_blocks

__all__ = ["MaskedAutoencoderViT"]


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _size_pair(name: str, value: object) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _positive_int(f"{name}[0]", value[0]), _positive_int(f"{name}[1]", value[1])
    v = _positive_int(name, value)
    return v, v


class MaskedAutoencoderViT(nn.Module):
    """MAE: a ViT encoder on the visible patches and a light ViT decoder that reconstructs the masked pixels
    (He et al., 2022, arXiv:2111.06377, sec. 3; facebookresearch/mae ``models_mae.MaskedAutoencoderViT``).

    Args:
        img_size: Hi = Wi (int) or (Hi, Wi); divisible by ``patch_size``.
        patch_size: P (int, or a square pair).
        in_chans: C.
        embed_dim: E, a multiple of ``num_heads`` and of 4 (the 2-D sin-cos table splits it in four).
        depth: encoder blocks.
        num_heads: encoder heads.
        decoder_embed_dim: E_dec, a multiple of ``decoder_num_heads`` and of 4.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder heads.
        mlp_ratio: MLP width / token width, encoder and decoder (hidden width ``int(dim · mlp_ratio)``, as timm).
        norm_pix_loss: regress per-patch normalised pixels (paper, sec. 4 / Table 3).
        norm_eps: LayerNorm eps everywhere. The reference class defaults to ``nn.LayerNorm``'s 1e-5, but every
            reference model (``mae_vit_base_patch16`` ...) passes ``partial(nn.LayerNorm, eps=1e-6)``; 1e-6 is the
            default here.
        decoder_mlp_ratio: keyword-only; decoder MLP ratio when it differs from ``mlp_ratio`` (Hugging Face's
            ``decoder_intermediate_size`` allows that); default ``mlp_ratio``.
        qkv_bias: keyword-only; bias in the ``qkv`` projections (the reference always has it).
        act_layer: keyword-only; MLP activation as :func:`fastvit.nn.layers.resolve_act` accepts (default exact
            erf GELU, as the reference; ``'gelu_tanh'`` for Hugging Face's tanh-approximated variants).

    Parameters (``state_dict`` keys, as the reference): ``cls_token`` (1, 1, E), ``pos_embed`` (1, 1 + N, E) frozen
    sin-cos, ``mask_token`` (1, 1, E_dec), ``decoder_pos_embed`` (1, 1 + N, E_dec) frozen sin-cos,
    ``patch_embed.proj.{weight,bias}``, ``blocks.{i}.*`` (timm ``Block`` names), ``norm.*``, ``decoder_embed.*``,
    ``decoder_blocks.{i}.*``, ``decoder_norm.*``, ``decoder_pred.*`` (E_dec -> P·P·C).

    Raises:
        TypeError: a non-int size, depth or head count.
        ValueError: non-positive sizes, ``img_size`` not divisible by ``patch_size``, a non-square patch,
            ``embed_dim`` / ``decoder_embed_dim`` not divisible by the head count or by 4, ``mlp_ratio`` <= 0,
            negative depths, an unsupported ``act_layer``.

    Example::

        model = MaskedAutoencoderViT(embed_dim=768, depth=12, num_heads=12)   # mae_vit_base_patch16
        loss, pred, mask = model(images)          # images (B, 3, 224, 224); pred (B, 196, 768); mask (B, 196)
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        norm_eps: float = 1e-6,
        *,
        decoder_mlp_ratio: Optional[float] = None,
        qkv_bias: bool = True,
        act_layer: object = None,
    ) -> None:
        super().__init__()
        ph, pw = _size_pair("patch_size", patch_size)
        if ph != pw:
            raise ValueError(f"patch_size must be square (MAE's patchify and loss assume P x P), got {patch_size!r}")
        hi, wi = _size_pair("img_size", img_size)
        if hi % ph or wi % pw:
            raise ValueError(f"img_size {(hi, wi)} must be divisible by patch_size {ph}")
        _positive_int("in_chans", in_chans)
        for dim_name, dim, heads_name, heads in (
            ("embed_dim", embed_dim, "num_heads", num_heads),
            ("decoder_embed_dim", decoder_embed_dim, "decoder_num_heads", decoder_num_heads),
        ):
            _positive_int(dim_name, dim)
            _positive_int(heads_name, heads)
            if dim % heads:
                raise ValueError(f"{dim_name} ({dim}) must be divisible by {heads_name} ({heads})")
            if dim % 4:
                raise ValueError(f"{dim_name} ({dim}) must be a multiple of 4 for the 2-D sin-cos position table")
        _positive_int("depth", depth, 0)
        _positive_int("decoder_depth", decoder_depth, 0)
        decoder_mlp_ratio = mlp_ratio if decoder_mlp_ratio is None else decoder_mlp_ratio
        for name, r in (("mlp_ratio", mlp_ratio), ("decoder_mlp_ratio", decoder_mlp_ratio)):
            if isinstance(r, bool) or not isinstance(r, Real):
                raise TypeError(f"{name} must be a number, got {type(r).__name__}")
            if not r > 0:
                raise ValueError(f"{name} must be > 0, got {r}")
        if not float(norm_eps) >= 0:
            raise ValueError(f"norm_eps must be >= 0, got {norm_eps}")

        self.patch_size = ph
        self.in_chans = in_chans
        self.img_size = (hi, wi)
        self.grid_size = (hi // ph, wi // pw)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = embed_dim
        self.decoder_embed_dim = decoder_embed_dim
        self.norm_eps = float(norm_eps)
        norm_layer = partial(nn.LayerNorm, eps=self.norm_eps)

        # Registration order follows models_mae.py, so state_dict keys come out in the same order and the
        # constructors draw from the global RNG in the same sequence.
        # ---- encoder
        self.patch_embed = PatchEmbed((hi, wi), ph, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, act_layer=act_layer, norm_layer=norm_layer)
                for _ in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        # ---- decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(
                    decoder_embed_dim,
                    decoder_num_heads,
                    decoder_mlp_ratio,
                    qkv_bias=qkv_bias,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, ph * ph * in_chans, bias=True)

        self.norm_pix_loss = bool(norm_pix_loss)
        self.grad_checkpointing = False
        self.pretrained_cfg: Dict[str, Any] = {}
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        """The reference initialisation (``models_mae.initialize_weights``), in the reference's RNG order.

        ``pos_embed`` / ``decoder_pos_embed``: the fixed 2-D sin-cos tables with a zero cls row
        (:func:`fastvit.nn.pos_embed.get_2d_sincos_pos_embed`); ``patch_embed.proj.weight``: xavier-uniform on its
        (E, C·P·P) view, like a Linear; ``cls_token`` and ``mask_token``: normal, std 0.02; every ``nn.Linear``:
        xavier-uniform weight, zero bias; every ``nn.LayerNorm``: weight 1, bias 0.
        """
        with torch.no_grad():
            table = get_2d_sincos_pos_embed(self.embed_dim, self.grid_size, cls_token=True)
            self.pos_embed.copy_(table.unsqueeze(0))
            table = get_2d_sincos_pos_embed(self.decoder_embed_dim, self.grid_size, cls_token=True)
            self.decoder_pos_embed.copy_(table.unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------- training APIs
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Names of parameters excluded from weight decay by timm's optimizer factory (tokens and position tables).

        ``timm.optim.create_optimizer_v2(model, 'adamw', weight_decay=...)`` reads this hook, as for timm's ViT
        (whose list this extends by MAE's ``mask_token`` / ``decoder_pos_embed``); the position tables are frozen
        (``requires_grad=False``) and so are in no optimizer group anyway. The MAE reference's pre-training script
        (``optim_factory.add_weight_decay(model, wd)``) passes no such list and so decays ``cls_token`` /
        ``mask_token``; use ``timm.optim.param_groups_weight_decay(model, wd)`` to reproduce that.
        """
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Regexes mapping parameter names to layer groups, in timm's ``group_matcher`` format.

        The encoder is grouped exactly as timm's ``VisionTransformer.group_matcher`` (its names are timm's):
        ``stem`` (``cls_token``, ``pos_embed``, ``patch_embed``) is group 0, ``blocks.{i}`` group i + 1, the
        encoder ``norm`` joins the last block; every decoder parameter (``decoder_*``, ``mask_token``) is
        unmatched and so lands in the last group, the place timm gives a classifier head. With
        ``timm.optim.create_optimizer_v2(model, ..., layer_decay=d)`` the decoder therefore trains at the full
        learning rate and encoder block i at ``d ** (depth - i)``. ``coarse`` changes nothing, as in timm's ViT.
        """
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the encoder and decoder blocks on or off (timm's method name).

        With it on, each block of :meth:`forward_encoder` / :meth:`forward_decoder` is one non-reentrant
        ``torch.utils.checkpoint`` segment: only its input is kept for the backward, where its forward runs again.
        Outputs and gradients are those without checkpointing.
        """
        self.grad_checkpointing = bool(enable)

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """Alias of ``pretrained_cfg`` (timm's backward-compatible name); ``{}`` unless set."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    # ------------------------------------------------------------------------------------------- checks
    def _check_imgs(self, imgs: object) -> torch.Tensor:
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor (B, {self.in_chans}, Hi, Wi), got {type(imgs).__name__}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype}")
        expected = (self.in_chans, *self.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"imgs must have shape (B, {', '.join(map(str, expected))}), got {tuple(imgs.shape)}")
        if imgs.shape[0] < 1:
            raise ValueError("imgs must hold at least one image, got batch size 0")
        return imgs

    # ------------------------------------------------------------------------------------------- pixels
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Cut images into flattened patches (``models_mae.patchify``).

        Args:
            imgs: (B, C, Hi, Wi) float, the model's ``in_chans`` and ``img_size``.

        Returns:
            (B, N, P·P·C), patches in row-major grid order, each flattened in (row-in-patch, column, channel) order
            -- the layout of ``pred`` and of the loss target. A view-compatible copy in ``imgs``' dtype.

        Raises:
            TypeError / ValueError: ``imgs`` not a float tensor of shape (B, C, Hi, Wi).
        """
        self._check_imgs(imgs)
        B, C = imgs.shape[:2]
        P = self.patch_size
        gh, gw = self.grid_size
        x = imgs.reshape(B, C, gh, P, gw, P).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, P, P, C)
        return x.reshape(B, gh * gw, P * P * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify` (``models_mae.unpatchify``).

        Args:
            x: (B, N, P·P·C) float.

        Returns:
            (B, C, Hi, Wi) in ``x``'s dtype.

        Raises:
            TypeError: ``x`` not a tensor. ValueError: ``x`` not of shape (B, N, P·P·C).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        P, C = self.patch_size, self.in_chans
        gh, gw = self.grid_size
        if x.dim() != 3 or tuple(x.shape[1:]) != (gh * gw, P * P * C):
            raise ValueError(f"x must have shape (B, {gh * gw}, {P * P * C}), got {tuple(x.shape)}")
        B = x.shape[0]
        imgs = x.reshape(B, gh, gw, P, P, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, P, gw, P)
        return imgs.reshape(B, C, gh * P, gw * P)

    # ------------------------------------------------------------------------------------------- masking
    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking of a token sequence (``models_mae.random_masking``) via
        :func:`fastvit.ops.random_masking`: the ``N_keep`` tokens with the smallest noise survive.

        The model itself does not call this (its encoder masks inside the patch embedding); it is kept for code
        written against the reference API.

        Args:
            x: (B, N, D) tokens.
            mask_ratio: fraction to remove, in [0, 1).
            noise: (B, N) float, or ``None`` to draw ``torch.rand(B, N)`` from the global generator, as the
                reference does.

        Returns:
            ``x_masked`` (B, N_keep, D), ``mask`` (B, N) float32 (1 = removed), ``ids_restore`` (B, N) int64.

        Raises:
            TypeError: ``x`` not a tensor. ValueError: ``x`` not 3-D, ``mask_ratio`` outside [0, 1), ``noise``
                of the wrong shape.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}")
        B, N, D = x.shape
        ids_keep, ids_restore, mask = ops.random_masking(B, N, mask_ratio, noise=noise, device=x.device)
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------------------------------- model
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches (``models_mae.forward_encoder``).

        Patch embedding, ``pos_embed``, the kept-patch gather and the cls token are one
        :func:`fastvit.ops.patch_embed` call with ``ids_keep``: the removed patches are never embedded.

        Args:
            imgs: (B, C, Hi, Wi) float.
            mask_ratio: fraction of patches to remove, in [0, 1).
            noise: (B, N) float, or ``None`` to draw ``torch.rand(B, N)`` from the global generator.

        Returns:
            ``latent`` (B, 1 + N_keep, E) in the parameters' dtype (cls token first), ``mask`` (B, N) float32
            (0 = kept, 1 = removed, original patch order) and ``ids_restore`` (B, N) int64.

        Raises:
            TypeError / ValueError: bad ``imgs`` (type, rank, channels, size), ``mask_ratio`` outside [0, 1),
                ``noise`` not a float tensor of shape (B, N).
        """
        self._check_imgs(imgs)
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, Real):
            raise TypeError(f"mask_ratio must be a float in [0, 1), got {type(mask_ratio).__name__}")
        if noise is not None and isinstance(noise, torch.Tensor) and noise.device != imgs.device:
            raise ValueError(f"noise is on {noise.device} but imgs is on {imgs.device}; expected the same device")
        ids_keep, ids_restore, mask = ops.random_masking(
            imgs.shape[0], self.num_patches, float(mask_ratio), noise=noise, device=imgs.device
        )
        x = embed_patches(self.patch_embed, imgs, pos_embed=self.pos_embed, cls_token=self.cls_token, ids_keep=ids_keep)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        x = apply_norm(self.norm, x)
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Reconstruct every patch from the encoded visible ones (``models_mae.forward_decoder``).

        ``decoder_embed``, then one :func:`fastvit.ops.mae_unshuffle` (mask tokens in the removed slots, the
        shuffle undone, ``decoder_pos_embed`` added), the decoder blocks, ``decoder_norm`` and ``decoder_pred``.
        The cls token is dropped before the last norm and projection (row-wise ops, so the result is the
        reference's ``x[:, 1:]`` after them).

        Args:
            latent: (B, 1 + N_keep, E) from :meth:`forward_encoder`.
            ids_restore: (B, N) int64 from :meth:`forward_encoder`.

        Returns:
            ``pred`` (B, N, P·P·C) in ``latent``'s dtype, in :meth:`patchify`'s layout.

        Raises:
            TypeError / ValueError: ``latent`` not (B, 1 + N_keep, E) with N_keep <= N, ``ids_restore`` not an
                integer tensor of shape (B, N) with values in [0, N).
        """
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if latent.dim() != 3 or latent.shape[-1] != self.embed_dim or not 1 <= latent.shape[1] <= self.num_patches + 1:
            raise ValueError(
                f"latent must have shape (B, 1 + N_keep, {self.embed_dim}) with N_keep <= {self.num_patches}, "
                f"got {tuple(latent.shape)}"
            )
        if not isinstance(ids_restore, torch.Tensor):
            raise TypeError(f"ids_restore must be a torch.Tensor, got {type(ids_restore).__name__}")
        if tuple(ids_restore.shape) != (latent.shape[0], self.num_patches):
            raise ValueError(
                f"ids_restore must have shape ({latent.shape[0]}, {self.num_patches}), got {tuple(ids_restore.shape)}"
            )
        x = self.decoder_embed(latent)
        x = ops.mae_unshuffle(x, self.mask_token, ids_restore, pos_embed=self.decoder_pos_embed)
        x = run_blocks(self.decoder_blocks, x, self.grad_checkpointing)
        x = apply_norm(self.decoder_norm, x[:, 1:])
        return self.decoder_pred(x)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the removed patches (``models_mae.forward_loss``) via :func:`fastvit.ops.mae_loss`.

        With ``norm_pix_loss`` each target patch is normalised by its mean and unbiased variance (+1e-6).

        Args:
            imgs: (B, C, Hi, Wi) float.
            pred: (B, N, P·P·C) float.
            mask: (B, N), 1 = removed (scored), 0 = kept.

        Returns:
            0-D tensor in ``pred``'s dtype. (All-kept masks give 0/0 = nan, as the reference.)

        Raises:
            TypeError / ValueError: bad ``imgs``; ``pred`` / ``mask`` shapes or devices inconsistent with it.
        """
        self._check_imgs(imgs)
        return ops.mae_loss(pred, imgs, mask, self.patch_size, norm_pix_loss=self.norm_pix_loss)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode, score (``models_mae.forward``).

        Args:
            imgs: (B, C, Hi, Wi) float.
            mask_ratio: fraction of patches to remove, in [0, 1); the paper's default 0.75.
            noise: (B, N) float, or ``None`` to draw ``torch.rand(B, N)`` from the global generator. Equal noise
                gives equal masks in this model, the reference, and Hugging Face's ``ViTMAEForPreTraining``.

        Returns:
            ``loss`` (0-D), ``pred`` (B, N, P·P·C) and ``mask`` (B, N) float32 (1 = removed).

        Raises:
            TypeError / ValueError: as :meth:`forward_encoder`.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise=noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask
