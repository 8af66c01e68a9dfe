"""Eager PyTorch implementations of every fastvit op: the numerical ground truth.

Plain math, written to be read: fp16 / bf16 inputs are computed in fp32 and the result is cast back to the
input dtype (fp32 accumulation everywhere, as the kernels do); fp32 and fp64 inputs are computed in their own
precision. Everything is differentiable with PyTorch autograd. The functions assume validated inputs; the
public, checked entry points are in :mod:`fastvit.ops`.

Sources: ViT (Dosovitskiy et al., 2021, arXiv:2010.11929) and timm's ``VisionTransformer``; MAE (He et al.,
2022, arXiv:2111.06377) and facebookresearch/mae ``models_mae.py``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def _acc(t: torch.Tensor | None) -> torch.Tensor | None:
    """Upcast half precision to fp32 for accumulation."""
    if t is None:
        return None
    return t.float() if t.dtype in _HALF else t


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    reg_tokens: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patchify ``images`` (B, C, Hi, Wi) with ``weight`` (E, C, Ph, Pw), add ``pos_embed``, keep ``ids_keep``,
    prepend the prefix tokens. See :func:`fastvit.ops.patch_embed` for the full contract."""
    dtype = images.dtype
    B, C, Hi, Wi = images.shape
    E, _, Ph, Pw = weight.shape
    gh, gw = Hi // Ph, Wi // Pw
    # im2col: (B, C, gh, Ph, gw, Pw) -> (B, gh, gw, C, Ph, Pw) -> (B, gh*gw, C*Ph*Pw)
    cols = _acc(images).reshape(B, C, gh, Ph, gw, Pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * Ph * Pw)
    x = cols @ _acc(weight).reshape(E, C * Ph * Pw).t()
    if bias is not None:
        x = x + _acc(bias)
    return embed_tokens(
        x, pos_embed=pos_embed, cls_token=cls_token, reg_tokens=reg_tokens, ids_keep=ids_keep, cast=_acc
    ).to(dtype)


def embed_tokens(
    x: torch.Tensor,
    *,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    reg_tokens: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
    cast=lambda t: t,
) -> torch.Tensor:
    """What :func:`patch_embed` does after the projection, on projected patch tokens ``x`` (B, Np, E): add
    ``pos_embed`` (with entries for the prefix tokens when it has R + Np rows, timm's default and MAE's; patches only
    otherwise), keep the ``ids_keep`` patches, prepend cls / register tokens. ``cast`` is applied to every operand
    (the reference's accumulation dtype; the identity for a module's unfused path)."""
    B, N, E = x.shape
    prefix = [t for t in (cls_token, reg_tokens) if t is not None]
    num_prefix = sum(t.shape[1] for t in prefix)
    prefix = [cast(t).expand(B, -1, -1) for t in prefix]
    if pos_embed is not None:
        pos = cast(pos_embed)
        if pos.shape[1] == N + num_prefix:  # timm default / MAE: prefix tokens have position entries
            prefix = [t + pos[:, i : i + t.shape[1]] for i, t in zip(_offsets(prefix), prefix)]
            x = x + pos[:, num_prefix:]
        else:  # no_embed_class: only the patches get a position
            x = x + pos
    if ids_keep is not None:
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, E))
    if prefix:
        x = torch.cat([*prefix, x], dim=1)
    return x


def _offsets(tokens: list[torch.Tensor]) -> list[int]:
    out, at = [], 0
    for t in tokens:
        out.append(at)
        at += t.shape[1]
    return out


def per_sequence(fn, cu_seqlens: torch.Tensor, *packed: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each sequence's rows ``cu_seqlens[s] : cu_seqlens[s + 1]`` of the ``packed`` tensors, the
    results concatenated along dim 0: packed variable-length attention one sequence at a time (one host read of
    ``cu_seqlens``; on the meta device, one sequence of all T tokens, which has the output's shape)."""
    if cu_seqlens.device.type == "meta":
        return fn(*packed)
    bounds = cu_seqlens.tolist()
    return torch.cat([fn(*(t[a:b] for t in packed)) for a, b in zip(bounds[:-1], bounds[1:])])


def sequence_tables(rope: torch.Tensor | None):
    """The rotary table of each packed sequence in turn, for :func:`per_sequence` loops: table ``s`` of a table per
    sequence -- 4-D (S, 1 or H, N_rot, 2·D) with S > 1 -- for sequence ``s``, else ``rope`` itself (shared by every
    sequence: (N_rot, 2·D), (H, N_rot, 2·D), a leading-1 form of these, or ``None``) for each sequence.

    Returns an iterator; each sequence's function takes the next table (``next(tables)``), in sequence order."""
    if rope is not None and rope.dim() == 4 and rope.shape[0] != 1:
        return iter(rope.unbind(0))
    return itertools.repeat(rope)


def per_sequence_sdpa(fn, q, k, v, cu_seqlens):
    """``fn`` (a (B, H, N, D) attention) on each sequence of packed (T, H, D) ``q``, ``k``, ``v``."""

    def one(q, k, v):
        return fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])[0].transpose(0, 1)

    return per_sequence(one, cu_seqlens, q, k, v)


def rotary(
    x: torch.Tensor,
    rope: torch.Tensor,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
    *,
    plain: bool = False,
) -> torch.Tensor:
    """Rotary position embeddings (RoFormer, Su et al., 2021, arXiv:2104.09864; 2D / axial as timm's EVA-02, DINOv3,
    Perception Encoder and RoPE-ViT) on q or k ``x`` (B, H, N, D): timm's ``EvaAttention`` / ``AttentionRope`` step
    ``cat([x[:, :, :npt], apply_rot_embed_cat(x[:, :, npt:], rope, half=rotate_half)], 2)``.

    ``rope`` is timm's ``cat([sin, cos], -1)`` table, (N_rot, 2·D) shared by the heads or (H, N_rot, 2·D) per head,
    or one table per sample (B, 1 or H, N_rot, 2·D) (timm's NaFlexVit and patch dropout; a leading 1 is shared by the
    batch), broadcast against ``x`` as timm's ``apply_rot_embed_cat`` does;
    the token at position p >= ``num_prefix_tokens`` is rotated by row ``p - num_prefix_tokens`` (N_rot may exceed
    the N - npt rows used), the first ``num_prefix_tokens`` tokens (cls, registers) are not rotated. Layout:
    ``rotate_half`` pairs column j with j + D/2 (``rope_rotate_half``), else columns 2i and 2i + 1 (``rot``).

    The rotation runs in the promoted precision of ``x`` and the table (timm's: a bf16 ``x`` with an fp32 table in
    fp32; ``plain=False`` also upcasts a half table), and the result is cast to ``x``'s dtype, as timm does."""
    npt = num_prefix_tokens
    n = max(x.shape[-2] - npt, 0)
    table = rope[..., :n, :] if plain else _acc(rope[..., :n, :])
    sin, cos = table.chunk(2, -1)
    t = x[..., npt:, :]
    if rotate_half:
        t1, t2 = t.chunk(2, -1)
        r = torch.cat([-t2, t1], -1)
    else:
        r = torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
    if not plain:
        t, r = _acc(t), _acc(r)
    out = (t * cos + r * sin).to(x.dtype)
    return torch.cat([x[..., :npt, :], out], -2)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
    plain: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for (B, H, N, D) inputs, fp32 softmax for half inputs (Vaswani et al., 2017); with
    ``cu_seqlens``, (T, H, D) inputs packed as :func:`fastvit.ops.scaled_dot_product_attention` takes them. With
    ``rope``, q and k are rotated first (:func:`rotary`; self-attention, Nq = Nk); a table per packed sequence
    (S, 1 or H, N_rot, 2·D) rotates sequence ``s`` with table ``s`` (:func:`sequence_tables`).

    ``plain=True`` computes everything in the input precision, without any upcast: the test oracle's ``pt`` for
    attention (FlashAttention's rule: a fused kernel is judged against the plain math in the same precision, since
    PyTorch's own fused SDPA kernels are more accurate than that)."""
    rope_kw = dict(num_prefix_tokens=num_prefix_tokens, rotate_half=rotate_half)
    if cu_seqlens is not None:
        tables = sequence_tables(rope)  # sequence s: table s of a table per sequence
        return per_sequence_sdpa(
            lambda q, k, v: scaled_dot_product_attention(
                q, k, v, scale=scale, dropout_p=dropout_p, plain=plain, rope=next(tables), **rope_kw
            ),
            q,
            k,
            v,
            cu_seqlens,
        )
    dtype = q.dtype
    if rope is not None:
        q, k = (rotary(t, rope, num_prefix_tokens, rotate_half, plain=plain) for t in (q, k))
    acc = (lambda t: t) if plain else _acc
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (acc(q) @ acc(k).transpose(-2, -1)) * scale
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return (p @ acc(v)).to(dtype)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k, v (each (B, H, N, D)) into packed ``qkv`` (B, N, 3·H·D) laid out as timm's qkv Linear."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    return qkv.reshape(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)


def attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
    plain: bool = False,
) -> torch.Tensor:
    """Multi-head self-attention on packed ``qkv`` (B, N, 3·C) -> (B, N, C), or with ``cu_seqlens`` (T, 3·C) ->
    (T, C) one sequence at a time; see :func:`fastvit.ops.attention` (``rope``: :func:`rotary` on q and k first, a
    table per packed sequence picked by :func:`sequence_tables`; ``plain``: see :func:`scaled_dot_product_attention`)."""
    rope_kw = dict(num_prefix_tokens=num_prefix_tokens, rotate_half=rotate_half)
    if cu_seqlens is not None:
        tables = sequence_tables(rope)  # sequence s: table s of a table per sequence
        return per_sequence(
            lambda part: attention(
                part[None], num_heads, scale=scale, dropout_p=dropout_p, plain=plain, rope=next(tables), **rope_kw
            )[0],
            cu_seqlens,
            qkv,
        )
    B, N, C3 = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    o = scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p, plain=plain, rope=rope, **rope_kw)
    return o.transpose(1, 2).reshape(B, N, C3 // 3)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim (Ba et al., 2016), biased variance, fp32 statistics; optional residual add."""
    dtype = x.dtype
    if residual is not None:
        x = x + residual
    h = _acc(x)
    mean = h.mean(dim=-1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _acc(weight)
    if bias is not None:
        y = y + _acc(bias)
    y = y.to(dtype)
    return y if residual is None else (y, x)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim (Zhang & Sennrich, 2019): ``h * rsqrt(mean(h²) + eps) * weight``, fp32 statistics;
    optional residual add (``h = x + residual``)."""
    dtype = x.dtype
    if residual is not None:
        x = x + residual
    h = _acc(x)
    y = h * torch.rsqrt((h * h).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _acc(weight)
    y = y.to(dtype)
    return y if residual is None else (y, x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU (Hendrycks & Gimpel, 2016): exact x·Φ(x) with erf, or the tanh approximation."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, approximate: str = "none"
) -> torch.Tensor:
    """GELU(x Wᵀ + b) with fp32 accumulation."""
    h = _acc(x) @ _acc(weight).t()
    if bias is not None:
        h = h + _acc(bias)
    return gelu(h, approximate).to(x.dtype)


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    *,
    gamma: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + gamma · (x Wᵀ + b) with fp32 accumulation (gamma: LayerScale, Touvron et al., 2021)."""
    h = _acc(x) @ _acc(weight).t()
    if bias is not None:
        h = h + _acc(bias)
    if gamma is not None:
        h = h * _acc(gamma)
    return (_acc(residual) + h).to(x.dtype)


def linear_glu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_value: torch.Tensor | None = None,
    bias_value: torch.Tensor | None = None,
    *,
    activation: str = "silu",
    gate_last: bool = False,
) -> torch.Tensor:
    """act(x W_gᵀ + b_g) ⊙ (x W_xᵀ + b_x) with fp32 accumulation (Shazeer, 2020); the layouts of
    :func:`fastvit.ops.linear_glu` (split gate / value weights, or packed (2·M, K) halves, gate first unless
    ``gate_last``)."""
    if weight_value is None:
        M = weight.shape[0] // 2
        halves = [
            (weight[:M], bias[:M] if bias is not None else None),
            (weight[M:], bias[M:] if bias is not None else None),
        ]
        (wg, bg), (wx, bx) = halves[::-1] if gate_last else halves
    else:
        wg, bg, wx, bx = weight, bias, weight_value, bias_value
    hg = _acc(x) @ _acc(wg).t()
    hx = _acc(x) @ _acc(wx).t()
    if bg is not None:
        hg = hg + _acc(bg)
    if bx is not None:
        hx = hx + _acc(bx)
    if activation == "silu":
        a = F.silu(hg)
    elif activation == "sigmoid":
        a = torch.sigmoid(hg)
    else:
        a = gelu(hg, "tanh" if activation == "gelu_tanh" else "none")
    return (a * hx).to(x.dtype)


def random_masking(
    batch_size: int,
    seq_len: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking by argsort of uniform noise; see :func:`fastvit.ops.random_masking`."""
    len_keep = int(seq_len * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch_size, seq_len, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch_size, seq_len, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def mae_unshuffle(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, *, pos_embed: torch.Tensor | None = None
) -> torch.Tensor:
    """MAE decoder input: append mask tokens, undo the shuffle with ``ids_restore``, keep cls first, add pos."""
    B, T, C = x.shape
    N = ids_restore.shape[1]
    mask_tokens = mask_token.to(x.dtype).expand(B, N + 1 - T, C)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, C))
    out = torch.cat([x[:, :1], x_], dim=1)
    if pos_embed is not None:
        out = (_acc(out) + _acc(pos_embed)).to(x.dtype)
    return out


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, Hi, Wi) -> (B, N, P·P·C) in MAE's (p, q, c) order within each patch, patches row-major."""
    B, C, Hi, Wi = images.shape
    P = patch_size
    h, w = Hi // P, Wi // P
    x = images.reshape(B, C, h, P, w, P)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, P * P * C)


def unpatchify(x: torch.Tensor, patch_size: int, in_chans: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, P·P·C) -> (B, C, h·P, w·P)."""
    B = x.shape[0]
    P = patch_size
    h, w = grid_size
    x = x.reshape(B, h, w, P, P, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, in_chans, h * P, w * P)


def mae_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    norm_pix_loss: bool = False,
) -> torch.Tensor:
    """MAE's masked MSE on patchified pixels (optionally per-patch normalised, unbiased variance)."""
    target = _acc(patchify(images, patch_size))
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((_acc(pred) - target) ** 2).mean(dim=-1)
    mask = _acc(mask)
    return ((loss * mask).sum() / mask.sum()).to(pred.dtype)
