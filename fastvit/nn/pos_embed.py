"""Absolute position embeddings: resampling learned tables to a new grid, and MAE's fixed 2-D sin-cos table.

Sources: timm ``layers/pos_embed.py`` (``resample_abs_pos_embed``), facebookresearch/mae ``util/pos_embed.py``
(``get_2d_sincos_pos_embed``, ``interpolate_pos_embed``), and the sin-cos encoding of Vaswani et al. (2017, sec. 3.5)
applied per axis as in MoCo v3 / MAE (He et al., 2022, arXiv:2111.06377).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["get_2d_sincos_pos_embed", "resample_abs_pos_embed"]


def _size2(v: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    """``v`` as a pair of positive ints (an int means a square); TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        out = (v, v)
    else:
        try:
            out = tuple(int(a) for a in v)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(out) != 2 or out[0] < 1 or out[1] < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return out


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_size: Union[int, Sequence[int]],
    old_size: Optional[Union[int, Sequence[int]]] = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a learned absolute position table (1, R + Gh·Gw, C) to a new token grid.

    The first ``num_prefix_tokens`` rows (cls / register tokens) are kept as they are; the remaining rows are
    viewed as a (Gh, Gw) image with C channels and resized with ``F.interpolate`` in fp32, then cast back.

    ``antialias=True`` is timm's ``resample_abs_pos_embed`` (its default); ``antialias=False`` is MAE's
    ``interpolate_pos_embed`` and Hugging Face's ``interpolate_pos_encoding`` (bicubic, no antialias). The two differ
    even when upsampling: PyTorch's antialiased bicubic uses PIL's kernel (a = -0.5), the plain one a = -0.75.

    Args:
        pos_embed: (1, R + Gh·Gw, C) float (any float dtype; computed in fp32).
        new_size: (Gh', Gw') target grid, or an int for a square grid.
        old_size: (Gh, Gw); default: a square grid inferred from the number of rows.
        num_prefix_tokens: R, rows that carry no grid position.
        interpolation: ``F.interpolate`` mode (``'bicubic'``, ``'bilinear'``, ...).
        antialias: passed to ``F.interpolate``.

    Returns:
        (1, R + Gh'·Gw', C) in ``pos_embed``'s dtype; ``pos_embed`` itself when the grid does not change.

    Raises:
        TypeError: ``pos_embed`` not a floating tensor.
        ValueError: ``pos_embed`` not (1, L, C); ``old_size`` inconsistent with L; a non-square inferred grid;
            negative ``num_prefix_tokens``.
    """
    if not isinstance(pos_embed, torch.Tensor) or not pos_embed.is_floating_point():
        raise TypeError(f"pos_embed must be a floating-point torch.Tensor, got {type(pos_embed).__name__}")
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, L, C), got {tuple(pos_embed.shape)}")
    if num_prefix_tokens < 0 or num_prefix_tokens > pos_embed.shape[1]:
        raise ValueError(f"num_prefix_tokens must lie in [0, {pos_embed.shape[1]}], got {num_prefix_tokens}")
    new_size = _size2(new_size, "new_size")
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(math.isqrt(num_grid))
        if side * side != num_grid:
            raise ValueError(
                f"pos_embed has {num_grid} grid rows (after {num_prefix_tokens} prefix tokens), not a square; pass old_size"
            )
        old_size = (side, side)
    else:
        old_size = _size2(old_size, "old_size")
        if old_size[0] * old_size[1] != num_grid:
            raise ValueError(
                f"old_size {old_size} has {old_size[0] * old_size[1]} positions but pos_embed {tuple(pos_embed.shape)} "
                f"has {num_grid} grid rows after {num_prefix_tokens} prefix tokens"
            )
    if tuple(old_size) == tuple(new_size):
        return pos_embed
    C = pos_embed.shape[-1]
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.float().reshape(1, old_size[0], old_size[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    # omega_i = 1 / 10000^(i / (dim/2)), i < dim/2, in float64; out = [sin(pos ⊗ omega) | cos(pos ⊗ omega)]
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: Union[int, Sequence[int]], cls_token: bool = False
) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table (facebookresearch/mae ``util/pos_embed.py``).

    For a grid of Gh rows and Gw columns, row t = r·Gw + c holds ``[enc(c) | enc(r)]`` where
    ``enc(p) = [sin(p·ω), cos(p·ω)]`` with ``ω_i = 10000^(-i / (C/4))``, i < C/4 -- i.e. the first half of the
    channels encodes the column (MAE's ``meshgrid(w, h)`` puts w first). Computed in float64 as MAE's numpy code
    (positions in float32, frequencies in float64), then returned as float32, as MAE's
    ``torch.from_numpy(...).float()``.

    Args:
        embed_dim: C, divisible by 4.
        grid_size: int Gh = Gw, or (Gh, Gw).
        cls_token: prepend an all-zero row for the cls token.

    Returns:
        float32 CPU tensor (Gh·Gw, C), or (1 + Gh·Gw, C) with ``cls_token``. (MAE returns the numpy array;
        use ``.unsqueeze(0)`` for a (1, L, C) ``pos_embed``.)

    Raises:
        ValueError: ``embed_dim`` not a positive multiple of 4, a bad ``grid_size``.
    """
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0 or embed_dim % 4:
        raise ValueError(f"embed_dim must be a positive multiple of 4, got {embed_dim!r}")
    gh, gw = _size2(grid_size, "grid_size")
    rows = np.arange(gh, dtype=np.float32)
    cols = np.arange(gw, dtype=np.float32)
    col_grid, row_grid = np.meshgrid(cols, rows)  # each (gh, gw); column index first, as MAE
    emb = np.concatenate([_sincos_1d(embed_dim // 2, col_grid), _sincos_1d(embed_dim // 2, row_grid)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return torch.from_numpy(emb).float()
