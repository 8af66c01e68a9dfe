"""Packed variable-length token sequences: S sequences of different lengths in one (T, C) tensor, no padding.

This is NaViT's "Patch n' Pack" (Dehghani et al., 2023, "Patch n' Pack: NaViT, a Vision Transformer for any Aspect
Ratio and Resolution", arXiv:2307.06304, sec. 2.1) in the layout of FlashAttention's ``flash_attn_varlen_*``
functions: sequence ``s`` is rows ``cu_seqlens[s] : cu_seqlens[s + 1]`` of the packed tensor, and
:func:`fastvit.ops.attention` with ``cu_seqlens`` lets each sequence attend only to itself. Everything else in a ViT
block (LayerNorm, the MLP, LayerScale, residual adds) is per token and runs on the packed rows unchanged.

Two ways in:

* from images of different sizes: :meth:`fastvit.nn.VisionTransformer.forward_packed` (and its parts
  ``embed_packed`` / ``forward_features_packed`` / ``forward_head_packed``), which return / take a
  :class:`PackedTokens`;
* from a padded batch with a validity mask (timm's NaFlexVit / SigLIP-2 NaFlex batches, ``patch_valid``):
  :func:`unpad_input` before the blocks and :func:`pad_input` after them (the names of FlashAttention's
  ``bert_padding`` helpers, which do the same).

Vocabulary: S sequences, T = total tokens, C width, R = prefix (cls + register) tokens per sequence.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = ["PackedTokens", "cu_seqlens_from_lengths", "pad_input", "pool_packed", "unpad_input"]


class PackedTokens(NamedTuple):
    """S token sequences packed along dim 0 without padding, with what is needed to run and pool them.

    Fields:
        tokens: (T, C) float, sequence ``s`` in rows ``cu_seqlens[s] : cu_seqlens[s + 1]``; each sequence is its
            R prefix tokens (cls, then registers) followed by its patch tokens in row-major grid order.
        cu_seqlens: int32 (S + 1,) on ``tokens``' device: 0, the running sum of the lengths, T.
        max_seqlen: the longest sequence (python int).
        grid_sizes: per sequence, the (Gh, Gw) patch grid of its image (``Gh·Gw`` patch tokens before patch
            dropout).
        num_prefix_tokens: R, the same for every sequence.
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    grid_sizes: Tuple[Tuple[int, int], ...]
    num_prefix_tokens: int

    @property
    def num_seqs(self) -> int:
        """S, the number of packed sequences."""
        return self.cu_seqlens.shape[0] - 1

    def lengths(self) -> List[int]:
        """The S sequence lengths as python ints (one device-to-host copy)."""
        c = self.cu_seqlens.tolist()
        return [b - a for a, b in zip(c[:-1], c[1:])]

    def split(self, x: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        """``x`` (default ``tokens``), any (T, ...) tensor, cut into its S sequences (views, (n_s, ...) each)."""
        x = self.tokens if x is None else x
        return torch.split(x, self.lengths(), dim=0)

    def replace_tokens(self, tokens: torch.Tensor) -> "PackedTokens":
        """The same packing with new (T, C') ``tokens`` (e.g. after the blocks or a norm)."""
        return self._replace(tokens=tokens)


def cu_seqlens_from_lengths(
    lengths: Union[Sequence[int], torch.Tensor], device: Optional[Union[str, torch.device]] = None
) -> torch.Tensor:
    """int32 (S + 1,) offsets ``[0, n_0, n_0 + n_1, ..., T]`` from S sequence lengths.

    Args:
        lengths: S >= 1 non-negative ints (python ints or an integer tensor).
        device: where the result lives (default: ``lengths``' device for a tensor, else the CPU).

    Raises:
        ValueError: no lengths, a negative length, or a non-1-D tensor.
    """
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.is_floating_point():
            raise ValueError(f"lengths must be a 1-D integer tensor, got shape {tuple(lengths.shape)} {lengths.dtype}")
        if lengths.numel() == 0:
            raise ValueError("lengths must hold at least one sequence length, got an empty tensor")
        device = lengths.device if device is None else device
        out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=device)
        out[1:] = torch.cumsum(lengths.to(device), 0)
        return out
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("lengths must hold at least one sequence length, got none")
    if min(lengths) < 0:
        raise ValueError(f"lengths must be non-negative, got {lengths}")
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def unpad_input(x: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop the padding of a (B, N, C) batch: the rows where ``valid`` is True, packed in batch-major order.

    The NaFlex path of :func:`fastvit.integrations.patch_timm_` calls this with ``valid`` = ``patch_valid`` with
    the prefix tokens prepended as valid (timm ``naflexvit.create_attention_mask``'s rule). Valid rows need not be
    a prefix of each sample: any mask works, row order within a sample is kept.

    Args:
        x: (B, N, C) float.
        valid: (B, N) bool (or 0/1 integer) on ``x``'s device; True for a real token.

    Returns:
        ``(tokens, indices, cu_seqlens, max_seqlen)``: tokens (T, C) = the valid rows; indices int64 (T,) their
        flat positions in ``x.reshape(B * N, C)`` (for :func:`pad_input`); cu_seqlens int32 (B + 1,) (sample b is
        sequence b, possibly empty); max_seqlen the most valid rows of one sample (python int: one host sync).

    Raises:
        ValueError: ``x`` not 3-D or ``valid`` not of shape (B, N).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be a padded batch (B, N, C), got shape {tuple(x.shape)}")
    B, N, C = x.shape
    if tuple(valid.shape) != (B, N):
        raise ValueError(f"valid must have shape ({B}, {N}) to match x {tuple(x.shape)}, got {tuple(valid.shape)}")
    valid = valid.bool()
    lengths = valid.sum(dim=1)
    indices = valid.reshape(-1).nonzero().squeeze(1)
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    max_seqlen = int(lengths.max()) if B else 0
    return x.reshape(B * N, C).index_select(0, indices), indices, cu_seqlens, max_seqlen


def pad_input(tokens: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: scatter packed rows back into a zero-filled (B, N, C) batch.

    Args:
        tokens: (T, C) float.
        indices: int64 (T,) flat row positions in the (B·N) padded rows, as returned by :func:`unpad_input`.
        batch: B. seqlen: N.

    Returns:
        (B, N, C) in ``tokens``' dtype, zeros where no row was scattered (the padding). Differentiable in ``tokens``.

    Raises:
        ValueError: ``tokens`` not 2-D, or ``indices`` not (T,).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be packed (T, C), got shape {tuple(tokens.shape)}")
    if tuple(indices.shape) != (tokens.shape[0],):
        raise ValueError(f"indices must have shape ({tokens.shape[0]},) to match tokens, got {tuple(indices.shape)}")
    out = tokens.new_zeros(batch * seqlen, tokens.shape[1])
    return out.index_copy(0, indices, tokens).reshape(batch, seqlen, tokens.shape[1])


def pool_packed(
    tokens: torch.Tensor, cu_seqlens: torch.Tensor, pool_type: str = "token", num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Global pooling of each packed sequence, as timm's ``global_pool_nlc`` on each sequence alone.

    Args:
        tokens: (T, C) float packed sequences.
        cu_seqlens: int32 (S + 1,) offsets (see :func:`cu_seqlens_from_lengths`).
        pool_type: ``'token'`` -- the first token of each sequence (the cls token); ``'avg'`` -- the mean of each
            sequence's tokens after its first ``num_prefix_tokens`` (timm's default ``reduce_include_prefix=False``);
            ``''`` -- no pooling, ``tokens`` returned as they are.
        num_prefix_tokens: R, excluded from ``'avg'``.

    Returns:
        (S, C) in ``tokens``' dtype (``''``: (T, C)).

    Raises:
        ValueError: an unknown ``pool_type``; for ``'avg'`` a sequence with no token after its prefix.
    """
    if pool_type == "":
        return tokens
    starts = cu_seqlens[:-1].long()
    if pool_type == "token":
        return tokens.index_select(0, starts)
    if pool_type != "avg":
        raise ValueError(f"pool_type must be 'token', 'avg' or '', got {pool_type!r}")
    R = int(num_prefix_tokens)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if R:
        # drop each sequence's first R rows: row t belongs to sequence seg[t] at position t - starts[seg[t]]
        seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=tokens.device), lengths)
        pos = torch.arange(tokens.shape[0], device=tokens.device) - starts.index_select(0, seg)
        tokens = tokens[pos >= R]
        lengths = lengths - R
    if bool((lengths <= 0).any()):
        raise ValueError(f"pool_type='avg' needs at least one token after the {R} prefix tokens in every sequence")
    # segment_reduce sums each run of rows in one pass (no atomics: deterministic on CUDA too)
    return torch.segment_reduce(tokens, "mean", lengths=lengths, axis=0)
