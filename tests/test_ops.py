"""Numerics and input checking of every public op in :mod:`fastvit.ops`.

Each op is checked, forward and every gradient, for two implementations -- ``fastvit.ops.<op>(...,
backend="eager")`` and ``fastvit.reference.<op>`` -- against a *naive formulation written here*, independently
of the library (explicit loops over patches / heads / tokens, formulas spelled out): ``ref`` is that naive code
in float64, ``pt`` the same naive code in the input precision, and the oracle of docs/ARCHITECTURE.md
(``max|out - ref| <= 2 max|pt - ref| + atol``, see ``tests/oracle.py``) decides.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from oracle import assert_close_oracle, check_op, make_inputs, poison_like, randn

import fastvit
from fastvit import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]


def impls(op: str) -> dict:
    """The two implementations under test for ``op``."""
    return {"ops.eager": partial(getattr(fastvit.ops, op), backend="eager"), "reference": getattr(reference, op)}


def noise_masking(B: int, N: int, ratio: float, generator: torch.Generator):
    """ids_keep, ids_restore, mask from :func:`naive_random_masking` with fresh uniform noise."""
    noise = torch.rand(B, N, generator=generator)
    return naive_random_masking(noise, ratio)


# =============================================================================================== naive code
def naive_softmax(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def naive_patch_embed(images, weight, bias, *, pos_embed=None, cls_token=None, reg_tokens=None, ids_keep=None):
    """One GEMV per patch, patches in row-major grid order; positions and prefix tokens by hand."""
    B, C, Hi, Wi = images.shape
    E, _, Ph, Pw = weight.shape
    gh, gw = Hi // Ph, Wi // Pw
    w = weight.reshape(E, C * Ph * Pw)  # (c, p, q) order, as the convolution reads it
    tokens = []
    for i in range(gh):
        for j in range(gw):
            patch = images[:, :, i * Ph : (i + 1) * Ph, j * Pw : (j + 1) * Pw].reshape(B, C * Ph * Pw)
            t = patch @ w.t()
            tokens.append(t + bias if bias is not None else t)
    x = torch.stack(tokens, dim=1)  # (B, Np, E)
    Np = gh * gw
    prefix = []
    if cls_token is not None:
        prefix.append(cls_token.expand(B, 1, E))
    if reg_tokens is not None:
        prefix.append(reg_tokens.expand(B, reg_tokens.shape[1], E))
    R = sum(p.shape[1] for p in prefix)
    if pos_embed is not None:
        if pos_embed.shape[1] == Np + R:  # every token, prefix included, has a position
            at = 0
            for k, p in enumerate(prefix):
                prefix[k] = p + pos_embed[:, at : at + p.shape[1]]
                at += p.shape[1]
            x = x + pos_embed[:, R:]
        else:  # only the patches have positions (timm no_embed_class)
            assert pos_embed.shape[1] == Np
            x = x + pos_embed
    if ids_keep is not None:
        x = torch.stack(
            [torch.stack([x[b, int(n)] for n in ids_keep[b]]) if ids_keep.shape[1] else x[b, :0] for b in range(B)]
        )
    return torch.cat(prefix + [x], dim=1)


def naive_sdpa(q, k, v, *, scale=None):
    """softmax(q kᵀ scale) v, one (batch, head) at a time."""
    B, H, Nq, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = []
    for b in range(B):
        heads = []
        for h in range(H):
            p = naive_softmax((q[b, h] @ k[b, h].t()) * scale)
            heads.append(p @ v[b, h])
        out.append(torch.stack(heads))
    return torch.stack(out)


def naive_attention(qkv, num_heads, *, scale=None):
    """Per head h: q = qkv[..., h·D:(h+1)·D], k = the same columns of the second third, v of the third."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    scale = D**-0.5 if scale is None else scale
    heads = []
    for h in range(num_heads):
        q = qkv[:, :, h * D : (h + 1) * D]
        k = qkv[:, :, C + h * D : C + (h + 1) * D]
        v = qkv[:, :, 2 * C + h * D : 2 * C + (h + 1) * D]
        p = naive_softmax((q @ k.transpose(1, 2)) * scale)
        heads.append(p @ v)  # (B, N, D)
    return torch.cat(heads, dim=-1)


def naive_layer_norm(x, weight, bias, eps=1e-6, *, residual=None):
    h = x + residual if residual is not None else x
    C = h.shape[-1]
    mean = h.sum(dim=-1, keepdim=True) / C
    var = ((h - mean) * (h - mean)).sum(dim=-1, keepdim=True) / C  # biased
    y = (h - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return (y, h) if residual is not None else y


def naive_linear_gelu(x, weight, bias, *, approximate="none"):
    h = x @ weight.t()
    if bias is not None:
        h = h + bias
    if approximate == "tanh":
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h * h * h)))
    return h * 0.5 * (1 + torch.erf(h * (1 / math.sqrt(2))))


def naive_linear_residual(x, weight, bias, residual, *, gamma=None):
    h = x @ weight.t()
    if bias is not None:
        h = h + bias
    if gamma is not None:
        h = h * gamma
    return residual + h


def naive_random_masking(noise: torch.Tensor, mask_ratio: float):
    """A transcription of MAE's models_mae.random_masking for given noise."""
    N, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([N, L])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


def naive_mae_unshuffle(x, mask_token, ids_restore, *, pos_embed=None):
    """Token i of sample b (original order) is the kept token number r = ids_restore[b, i] when r < N_keep,
    else the mask token; the cls token stays first."""
    B, T, C = x.shape
    n_keep = T - 1
    rows = []
    for b in range(B):
        r = ids_restore[b]
        if n_keep:
            kept = x[b, 1 + r.clamp(max=n_keep - 1)]  # (N, C), valid where r < n_keep
            body = torch.where((r < n_keep)[:, None], kept, mask_token[0, 0])
        else:
            body = mask_token[0, 0].expand(r.shape[0], C)
        rows.append(torch.cat([x[b, :1], body], dim=0))
    out = torch.stack(rows)
    return out + pos_embed if pos_embed is not None else out


def naive_mae_loss(pred, images, mask, patch_size, *, norm_pix_loss=False):
    """Per patch (row-major): target = pixels in (p, q, c) order; mean squared error; mean over removed ones."""
    B, C, Hi, Wi = images.shape
    P = patch_size
    losses = []
    for i in range(Hi // P):
        for j in range(Wi // P):
            t = images[:, :, i * P : (i + 1) * P, j * P : (j + 1) * P].permute(0, 2, 3, 1).reshape(B, P * P * C)
            if norm_pix_loss:
                K = t.shape[1]
                mean = t.sum(dim=1, keepdim=True) / K
                var = ((t - mean) ** 2).sum(dim=1, keepdim=True) / (K - 1)  # unbiased, as torch.var
                t = (t - mean) / torch.sqrt(var + 1e-6)
            n = i * (Wi // P) + j
            losses.append(((pred[:, n] - t) ** 2).sum(dim=1) / (P * P * C))
    loss = torch.stack(losses, dim=1)  # (B, N)
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum()


# =============================================================================================== oracle self-tests
def test_oracle_accepts_a_correct_result_and_rejects_perturbed_or_poisoned_ones(generator):
    x = randn((4, 33), dtype=torch.float16, generator=generator)
    ref = torch.softmax(x.double(), -1)
    pt = naive_softmax(x)
    out = torch.softmax(x.float(), -1).half()  # fp32 softmax rounded once: better than pt
    assert_close_oracle(out, ref, pt, torch.float16, "softmax")
    bad = out.clone()
    bad[2, 7] += 0.01
    with pytest.raises(AssertionError, match=r"max\|out - ref\|.*max\|pt - ref\|"):
        assert_close_oracle(bad, ref, pt, torch.float16, "softmax")
    poisoned = poison_like(out)
    poisoned[:, :-1] = out[:, :-1]  # one column left unwritten
    assert torch.isnan(poisoned).sum() == 4
    with pytest.raises(AssertionError, match="nan"):
        assert_close_oracle(poisoned, ref, pt, torch.float16, "softmax")
    with pytest.raises(AssertionError, match="dtype"):
        assert_close_oracle(out.float(), ref, pt, torch.float16, "softmax")
    with pytest.raises(AssertionError, match="shape"):
        assert_close_oracle(out[:, 1:], ref, pt, torch.float16, "softmax")


def test_oracle_catches_gelu_tanh_instead_of_erf(generator):
    """Sensitivity: the tanh GELU (up to 4.7e-4 from erf) must not pass for an erf op in fp32."""
    inputs = make_inputs(
        {"x": ((3, 7, 40), 2.0), "weight": ((64, 40), 0.3), "bias": (64,)}, dtype=torch.float32, generator=generator
    )
    wrong = {"tanh": partial(naive_linear_gelu, approximate="tanh")}
    with pytest.raises(AssertionError, match="max"):
        check_op(wrong, naive_linear_gelu, inputs, ["x"], dtype=torch.float32, generator=generator, name="gelu")


# =============================================================================================== patch_embed
# (name, images (B, C, Hi, Wi), patch (Ph, Pw), E, bias, cls, n_reg, pos: None | "all" | "patches", n_keep)
PATCH_CASES = [
    ("N1", (3, 3, 4, 4), (4, 4), 16, True, False, 0, None, None),
    ("N1-pos", (3, 5, 4, 4), (4, 4), 24, True, False, 0, "patches", None),
    ("N50-cls-pos", (3, 3, 14, 14), (2, 2), 24, True, True, 0, "all", None),
    ("N50-cls-posnoembedclass", (3, 3, 14, 14), (2, 2), 24, True, True, 0, "patches", None),
    ("N61-cls-reg4-pos", (3, 3, 14, 16), (2, 2), 40, True, True, 4, "all", None),
    ("N61-reg5-posnoembedclass", (3, 3, 14, 16), (2, 2), 40, True, False, 5, "patches", None),
    ("N197-cls-pos", (3, 3, 28, 28), (2, 2), 40, True, True, 0, "all", None),
    ("nonsquare-patch-nobias", (3, 3, 8, 12), (2, 3), 20, False, True, 0, "all", None),
    ("mae-keep12-cls-pos", (3, 3, 14, 14), (2, 2), 24, True, True, 0, "all", 12),
    ("keep-reg2-posnoembedclass", (3, 3, 12, 8), (4, 4), 24, True, True, 2, "patches", 3),
    ("keep1-noprefix-pos", (3, 3, 8, 8), (2, 2), 24, True, False, 0, "all", 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", PATCH_CASES, ids=[c[0] for c in PATCH_CASES])
def test_patch_embed(case, dtype, generator, device):
    _, img, (Ph, Pw), E, has_bias, has_cls, n_reg, pos, n_keep = case
    B, C, Hi, Wi = img
    Np = (Hi // Ph) * (Wi // Pw)
    R = int(has_cls) + n_reg
    specs = {
        "images": img,
        "weight": ((E, C, Ph, Pw), (C * Ph * Pw) ** -0.5),
        "bias": (E,) if has_bias else None,
        "pos_embed": {None: None, "all": (1, Np + R, E), "patches": (1, Np, E)}[pos],
        "cls_token": (1, 1, E) if has_cls else None,
        "reg_tokens": (1, n_reg, E) if n_reg else None,
        "ids_keep": torch.argsort(torch.rand(B, Np, generator=generator), dim=1)[:, :n_keep] if n_keep else None,
    }
    inputs = make_inputs(specs, dtype=dtype, device=device, generator=generator)
    grads = [n for n in ("images", "weight", "bias", "pos_embed", "cls_token", "reg_tokens") if inputs[n] is not None]
    runs = check_op(
        impls("patch_embed"), naive_patch_embed, inputs, grads, dtype=dtype, generator=generator, name="patch_embed"
    )
    assert runs["ops.eager"].outputs[0].shape == (B, R + (n_keep or Np), E)


# =============================================================================================== attention
# (B, N, H, D, scale)
ATTN_CASES = [(3, 1, 2, 32, None), (3, 50, 2, 64, None), (3, 61, 3, 80, None), (2, 197, 2, 32, 0.3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B,N,H,D,scale", ATTN_CASES, ids=[f"B{c[0]}-N{c[1]}-H{c[2]}-D{c[3]}" for c in ATTN_CASES])
def test_attention(B, N, H, D, scale, dtype, generator, device):
    inputs = make_inputs(
        {"qkv": (B, N, 3 * H * D), "num_heads": H, "scale": scale}, dtype=dtype, device=device, generator=generator
    )
    check_op(impls("attention"), naive_attention, inputs, ["qkv"], dtype=dtype, generator=generator, name="attention")


def test_attention_heads_are_not_interleaved(generator):
    """Head h of the output depends only on head h's columns of q, k and v (head-major layout in each third)."""
    B, N, H, D = 2, 5, 3, 32
    qkv = randn((B, N, 3 * H * D), generator=generator)
    out = fastvit.ops.attention(qkv, H, backend="eager")
    qkv2 = qkv.clone()
    C = H * D
    for third in range(3):  # change everything that belongs to head 1
        qkv2[:, :, third * C + D : third * C + 2 * D] = randn((B, N, D), generator=generator)
    out2 = fastvit.ops.attention(qkv2, H, backend="eager")
    assert torch.equal(out[..., :D], out2[..., :D]) and torch.equal(out[..., 2 * D :], out2[..., 2 * D :])
    assert not torch.allclose(out[..., D : 2 * D], out2[..., D : 2 * D])


# =============================================================================================== sdpa
def _sdpa_packed(q_src, kv_src, *, scale=None, fn):
    """q, k, v as strided views of packed tensors: q_src (B, Nq, H, D) or (B, Nq, 3, H, D); kv_src (B, Nk, 2, H, D)."""
    q = (q_src[:, :, 0] if q_src.dim() == 5 else q_src).transpose(1, 2)
    k = kv_src[:, :, 0].transpose(1, 2)
    v = kv_src[:, :, 1].transpose(1, 2)
    return fn(q, k, v, scale=scale)


# (B, H, Nq, Nk, D, scale)
SDPA_PACKED_CASES = [(3, 2, 61, 61, 80, None), (3, 2, 1, 197, 32, None), (2, 3, 197, 50, 64, 0.2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(
    "B,H,Nq,Nk,D,scale",
    SDPA_PACKED_CASES,
    ids=[f"B{c[0]}-H{c[1]}-Nq{c[2]}-Nk{c[3]}-D{c[4]}" for c in SDPA_PACKED_CASES],
)
def test_sdpa_strided_views(B, H, Nq, Nk, D, scale, dtype, generator, device):
    q_shape = (B, Nq, 3, H, D) if Nq == Nk else (B, Nq, H, D)
    inputs = make_inputs(
        {"q_src": q_shape, "kv_src": (B, Nk, 2, H, D), "scale": scale}, dtype=dtype, device=device, generator=generator
    )
    k = inputs["kv_src"][:, :, 0].transpose(1, 2)
    assert not k.is_contiguous() and k.stride(-1) == 1  # the point of the test
    if Nq > 1:
        q = (inputs["q_src"][:, :, 0] if Nq == Nk else inputs["q_src"]).transpose(1, 2)
        assert not q.is_contiguous() and q.stride(-1) == 1
    impl = {name: partial(_sdpa_packed, fn=fn) for name, fn in impls("scaled_dot_product_attention").items()}
    check_op(
        impl,
        partial(_sdpa_packed, fn=naive_sdpa),
        inputs,
        ["q_src", "kv_src"],
        dtype=dtype,
        generator=generator,
        name="sdpa",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_sdpa_contiguous(dtype, generator, device):
    B, H, N, D = 3, 2, 50, 64
    inputs = make_inputs(
        {"q": (B, H, N, D), "k": (B, H, N, D), "v": (B, H, N, D)}, dtype=dtype, device=device, generator=generator
    )
    check_op(
        impls("scaled_dot_product_attention"),
        naive_sdpa,
        inputs,
        ["q", "k", "v"],
        dtype=dtype,
        generator=generator,
        name="sdpa",
    )


# =============================================================================================== layer_norm
# (shape, affine, residual, eps)
LN_CASES = [
    ((3, 1, 40), True, False, 1e-6),
    ((3, 61, 96), True, True, 1e-6),
    ((2, 197, 200), True, True, 1e-12),
    ((3, 50, 24), False, True, 1e-5),
    ((7, 72), True, False, 1e-6),
]

# PyTorch's CPU LayerNorm backward sums dweight/dbias in the input precision; the eager backend runs half-precision
# LayerNorm in fp32 on the CPU for that reason. The many-rows case below is where the difference shows.


def _ln_params():
    for shape, affine, residual, eps in LN_CASES:
        for dtype, dt_id in zip(DTYPES, DT_IDS):
            for impl in ("ops.eager", "reference"):
                case_id = (
                    f"{'x'.join(map(str, shape))}-{'affine' if affine else 'plain'}"
                    f"{'-residual' if residual else ''}-eps{eps:g}-{dt_id}-{impl}"
                )
                yield pytest.param(shape, affine, residual, eps, dtype, impl, id=case_id)


def _check_layer_norm(shape, affine, residual, eps, dtype, impl, generator, device, offset=0.5):
    C = shape[-1]
    inputs = make_inputs(
        {
            "x": shape,
            "weight": (C,) if affine else None,
            "bias": (C,) if affine else None,
            "eps": eps,
            "residual": shape if residual else None,
        },
        dtype=dtype,
        device=device,
        generator=generator,
    )
    inputs["x"] = inputs["x"] + offset  # a non-zero mean to subtract
    grads = [n for n in ("x", "weight", "bias", "residual") if inputs[n] is not None]
    runs = check_op(
        {impl: impls("layer_norm")[impl]},
        naive_layer_norm,
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name="layer_norm",
        output_names=["y", "h"] if residual else None,
    )
    assert len(runs[impl].outputs) == (2 if residual else 1)


@pytest.mark.parametrize("shape,affine,residual,eps,dtype,impl", list(_ln_params()))
def test_layer_norm(shape, affine, residual, eps, dtype, impl, generator, device):
    _check_layer_norm(shape, affine, residual, eps, dtype, impl, generator, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layer_norm_half_weight_grad_many_rows_eager_cpu(dtype, generator, device):
    """8·197 rows (a batch of 8 ViT-B sequences): eager's dweight/dbias are far outside the oracle."""
    _check_layer_norm((8, 197, 96), True, True, 1e-6, dtype, "ops.eager", generator, device)


# =============================================================================================== linear_gelu
# (x shape, M, bias)
LIN_CASES = [((3, 1, 40), 100, True), ((3, 50, 24), 96, True), ((2, 197, 40), 72, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(
    "shape,M,has_bias",
    LIN_CASES,
    ids=[f"{'x'.join(map(str, c[0]))}-M{c[1]}{'-bias' if c[2] else ''}" for c in LIN_CASES],
)
def test_linear_gelu(shape, M, has_bias, approximate, dtype, generator, device):
    K = shape[-1]
    inputs = make_inputs(
        {
            "x": (shape, 1.5),
            "weight": ((M, K), K**-0.5),
            "bias": (M,) if has_bias else None,
            "approximate": approximate,
        },
        dtype=dtype,
        device=device,
        generator=generator,
    )
    grads = ["x", "weight"] + (["bias"] if has_bias else [])
    check_op(
        impls("linear_gelu"),
        naive_linear_gelu,
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name=f"linear_gelu[{approximate}]",
    )


def test_gelu_variants_differ_as_documented(generator):
    """erf vs tanh GELU really are different ops (so the two parametrizations test different code)."""
    x = randn((1, 2000), dtype=torch.float64, generator=generator, scale=3.0)
    w = torch.eye(2000, dtype=torch.float64)  # identity Linear: GELU(x) itself
    a = fastvit.ops.linear_gelu(x, w, None, approximate="none", backend="eager")
    b = fastvit.ops.linear_gelu(x, w, None, approximate="tanh", backend="eager")
    assert 1e-5 < float((a - b).abs().max()) < 5e-4


# =============================================================================================== linear_residual
# (x shape, M, bias, gamma)
LINRES_CASES = [
    ((3, 1, 40), 24, True, True),
    ((3, 50, 96), 24, False, True),
    ((2, 61, 24), 72, True, False),
    ((3, 197, 40), 40, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(
    "shape,M,has_bias,has_gamma",
    LINRES_CASES,
    ids=[
        f"{'x'.join(map(str, c[0]))}-M{c[1]}{'-bias' if c[2] else ''}{'-gamma' if c[3] else ''}" for c in LINRES_CASES
    ],
)
def test_linear_residual(shape, M, has_bias, has_gamma, dtype, generator, device):
    K = shape[-1]
    inputs = make_inputs(
        {
            "x": shape,
            "weight": ((M, K), K**-0.5),
            "bias": (M,) if has_bias else None,
            "residual": (*shape[:-1], M),
            "gamma": (M,) if has_gamma else None,
        },
        dtype=dtype,
        device=device,
        generator=generator,
    )
    grads = [n for n in ("x", "weight", "bias", "residual", "gamma") if inputs[n] is not None]
    check_op(
        impls("linear_residual"),
        naive_linear_residual,
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name="linear_residual",
    )


# =============================================================================================== random_masking
MASK_CASES = [(3, 196, 0.75), (2, 49, 0.5), (3, 1, 0.0), (2, 50, 0.9), (1, 61, 0.3), (3, 10, 0.05)]


@pytest.mark.parametrize("B,L,ratio", MASK_CASES, ids=[f"B{c[0]}-L{c[1]}-r{c[2]}" for c in MASK_CASES])
def test_random_masking(B, L, ratio, generator):
    noise = torch.rand(B, L, generator=generator)
    ids_keep, ids_restore, mask = fastvit.ops.random_masking(B, L, ratio, noise=noise)
    n_keep = int(L * (1 - ratio))
    assert ids_keep.shape == (B, n_keep) and ids_keep.dtype == torch.int64
    assert ids_restore.shape == (B, L) and ids_restore.dtype == torch.int64
    assert mask.shape == (B, L) and mask.dtype == torch.float32
    for b in range(B):
        # ids_restore is a permutation, and the inverse of the shuffle: kept token k sits at rank k
        assert sorted(ids_restore[b].tolist()) == list(range(L))
        assert ids_restore[b, ids_keep[b]].tolist() == list(range(n_keep))
        # the kept patches are the n_keep smallest noise values, in increasing noise order
        assert ids_keep[b].tolist() == sorted(range(L), key=lambda i: float(noise[b, i]))[:n_keep]
        # mask: exactly the kept positions are 0, the rest 1
        expected = torch.ones(L)
        expected[ids_keep[b]] = 0
        assert torch.equal(mask[b], expected)
        assert int((mask[b] == 0).sum()) == n_keep
    naive = naive_random_masking(noise, ratio)
    for got, want, name in zip((ids_keep, ids_restore, mask), naive, ("ids_keep", "ids_restore", "mask")):
        assert torch.equal(got, want), name


def test_random_masking_draws_noise_from_generator(seed):
    a = fastvit.ops.random_masking(3, 49, 0.75, generator=torch.Generator().manual_seed(seed))
    b = fastvit.ops.random_masking(3, 49, 0.75, generator=torch.Generator().manual_seed(seed))
    c = fastvit.ops.random_masking(3, 49, 0.75, generator=torch.Generator().manual_seed(seed + 1))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[1], c[1])
    noise = torch.rand(3, 49, generator=torch.Generator().manual_seed(seed))
    for x, y in zip(a, naive_random_masking(noise, 0.75)):
        assert torch.equal(x, y)
    # per-sample masks differ (the shuffle is per sample)
    assert not torch.equal(a[2][0], a[2][1]) or not torch.equal(a[2][1], a[2][2])


# =============================================================================================== mae_unshuffle
# (B, N, n_keep, C, pos)
UNSHUFFLE_CASES = [
    (3, 1, 1, 24, True),
    (3, 1, 0, 24, False),
    (3, 49, 12, 40, True),
    (3, 196, 49, 24, True),
    (2, 60, 60, 40, False),
    (3, 61, 15, 24, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(
    "B,N,n_keep,C,pos",
    UNSHUFFLE_CASES,
    ids=[f"B{c[0]}-N{c[1]}-keep{c[2]}-C{c[3]}{'-pos' if c[4] else ''}" for c in UNSHUFFLE_CASES],
)
def test_mae_unshuffle(B, N, n_keep, C, pos, dtype, generator, device):
    _, ids_restore, _ = noise_masking(B, N, 1 - n_keep / N, generator)
    inputs = make_inputs(
        {
            "x": (B, 1 + n_keep, C),
            "mask_token": (1, 1, C),
            "ids_restore": ids_restore,
            "pos_embed": (1, N + 1, C) if pos else None,
        },
        dtype=dtype,
        device=device,
        generator=generator,
    )
    grads = ["x", "mask_token"] + (["pos_embed"] if pos else [])
    runs = check_op(
        impls("mae_unshuffle"),
        naive_mae_unshuffle,
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name="mae_unshuffle",
    )
    if not pos:  # a pure permutation + fill: bit exact
        assert torch.equal(runs["ops.eager"].outputs[0], runs["pt"].outputs[0])


# =============================================================================================== mae_loss
# (images, P, mask ratio)
LOSS_CASES = [((3, 3, 8, 8), 2, 0.75), ((3, 3, 14, 14), 2, 0.5), ((2, 3, 12, 16), 4, 0.75), ((3, 5, 4, 4), 4, 0.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("norm_pix_loss", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize(
    "img,P,ratio", LOSS_CASES, ids=[f"{'x'.join(map(str, c[0]))}-P{c[1]}-r{c[2]}" for c in LOSS_CASES]
)
def test_mae_loss(img, P, ratio, norm_pix_loss, dtype, generator, device):
    B, C, Hi, Wi = img
    N = (Hi // P) * (Wi // P)
    if ratio == 0.0:  # nothing removed would divide by zero: use a hand-made mask with one removed patch
        mask = torch.zeros(B, N)
        mask[1, 0] = 1
    else:
        mask = noise_masking(B, N, ratio, generator)[2]
    inputs = make_inputs(
        {"pred": (B, N, P * P * C), "images": img, "patch_size": P, "norm_pix_loss": norm_pix_loss},
        dtype=dtype,
        device=device,
        generator=generator,
    )
    inputs["mask"] = mask.to(device)  # float32, as MAE makes it, whatever the model's dtype
    check_op(impls("mae_loss"), naive_mae_loss, inputs, ["pred"], dtype=dtype, generator=generator, name="mae_loss")


def test_mae_loss_ignores_kept_patches(generator):
    """Changing pred on kept (mask == 0) patches leaves the loss unchanged; on a removed patch it changes it."""
    images = randn((2, 3, 8, 8), generator=generator)
    pred = randn((2, 16, 12), generator=generator)
    _, _, mask = noise_masking(2, 16, 0.75, generator)
    loss = fastvit.ops.mae_loss(pred, images, mask, 2, backend="eager")
    kept = mask == 0
    pred2 = pred.clone()
    pred2[kept] += 10
    assert torch.equal(fastvit.ops.mae_loss(pred2, images, mask, 2, backend="eager"), loss)
    pred2[~kept] += 1
    assert not torch.allclose(fastvit.ops.mae_loss(pred2, images, mask, 2, backend="eager"), loss)


# =============================================================================================== bad input
def _t(*shape, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(shape, dtype=dtype, device=device)
        if dtype.is_floating_point
        else torch.ones(shape, dtype=dtype, device=device)
    )


def _pe(**kw):
    args = {"images": _t(2, 3, 8, 8), "weight": _t(16, 3, 4, 4), "bias": _t(16)}
    args.update(kw)
    return lambda: fastvit.ops.patch_embed(**args, backend="eager")


def _attn(qkv, num_heads=2, **kw):
    return lambda: fastvit.ops.attention(qkv, num_heads, backend="eager", **kw)


def _sdpa(q=None, k=None, v=None, **kw):
    q = _t(2, 2, 5, 32) if q is None else q
    k = _t(2, 2, 7, 32) if k is None else k
    v = _t(2, 2, 7, 32) if v is None else v
    return lambda: fastvit.ops.scaled_dot_product_attention(q, k, v, backend="eager", **kw)


def _ln(x=None, weight=None, bias=None, **kw):
    x = _t(2, 5, 24) if x is None else x
    weight = _t(24) if weight is None else weight
    bias = _t(24) if bias is None else bias
    return lambda: fastvit.ops.layer_norm(x, weight, bias, backend="eager", **kw)


def _lg(x=None, weight=None, bias=None, **kw):
    x = _t(2, 5, 24) if x is None else x
    weight = _t(40, 24) if weight is None else weight
    bias = _t(40) if bias is None else bias
    return lambda: fastvit.ops.linear_gelu(x, weight, bias, backend="eager", **kw)


def _lr(x=None, weight=None, bias=None, residual=None, **kw):
    x = _t(2, 5, 24) if x is None else x
    weight = _t(40, 24) if weight is None else weight
    bias = _t(40) if bias is None else bias
    residual = _t(2, 5, 40) if residual is None else residual
    return lambda: fastvit.ops.linear_residual(x, weight, bias, residual, backend="eager", **kw)


def _ids(B=2, N=16, dtype=torch.int64):
    return torch.stack([torch.randperm(N) for _ in range(B)]).to(dtype)


def _un(x=None, mask_token=None, ids_restore=None, **kw):
    x = _t(2, 5, 24) if x is None else x
    mask_token = _t(1, 1, 24) if mask_token is None else mask_token
    ids_restore = _ids() if ids_restore is None else ids_restore
    return lambda: fastvit.ops.mae_unshuffle(x, mask_token, ids_restore, backend="eager", **kw)


def _loss(pred=None, images=None, mask=None, patch_size=2, **kw):
    pred = _t(2, 16, 12) if pred is None else pred
    images = _t(2, 3, 8, 8) if images is None else images
    mask = torch.ones(2, 16) if mask is None else mask
    return lambda: fastvit.ops.mae_loss(pred, images, mask, patch_size, backend="eager", **kw)


def _rm(B=2, L=16, ratio=0.5, **kw):
    return lambda: fastvit.ops.random_masking(B, L, ratio, **kw)


META = "meta"  # a real second device on any machine: checks the device checks without a GPU

BAD_INPUTS = [
    # patch_embed
    ("pe-images-rank", _pe(images=_t(3, 8, 8)), ValueError, r"images must be 4-D.*\(3, 8, 8\)"),
    ("pe-images-not-tensor", _pe(images=[[1.0]]), TypeError, r"images must be a torch\.Tensor"),
    ("pe-images-int", _pe(images=_t(2, 3, 8, 8, dtype=torch.int32)), TypeError, r"images must be float.*int32"),
    ("pe-weight-rank", _pe(weight=_t(16, 48)), ValueError, r"weight must be 4-D"),
    (
        "pe-weight-dtype",
        _pe(weight=_t(16, 3, 4, 4, dtype=torch.float16)),
        TypeError,
        r"weight has dtype torch\.float16",
    ),
    ("pe-weight-device", _pe(weight=_t(16, 3, 4, 4, device=META)), ValueError, r"weight is on meta"),
    ("pe-channels", _pe(weight=_t(16, 4, 4, 4)), ValueError, r"images has 3 channels but weight expects 4"),
    ("pe-not-divisible", _pe(images=_t(2, 3, 8, 10)), ValueError, r"images spatial size 8x10 is not divisible"),
    ("pe-bias-shape", _pe(bias=_t(15)), ValueError, r"bias must have shape \(16,\)"),
    ("pe-bias-dtype", _pe(bias=_t(16, dtype=torch.float64)), TypeError, r"bias has dtype"),
    ("pe-cls-shape", _pe(cls_token=_t(1, 2, 16)), ValueError, r"cls_token must have shape \(1, 1, 16\)"),
    ("pe-reg-shape", _pe(reg_tokens=_t(2, 4, 16)), ValueError, r"reg_tokens must have shape"),
    (
        "pe-pos-length",
        _pe(pos_embed=_t(1, 6, 16), cls_token=_t(1, 1, 16)),
        ValueError,
        r"pos_embed must have shape.*\[4, 5\].*\(1, 6, 16\)",
    ),
    ("pe-pos-width", _pe(pos_embed=_t(1, 4, 15)), ValueError, r"pos_embed must have shape"),
    ("pe-pos-rank", _pe(pos_embed=_t(4, 16)), ValueError, r"pos_embed must have shape"),
    ("pe-ids-high", _pe(ids_keep=torch.tensor([[0, 4], [1, 2]])), ValueError, r"ids_keep values must lie in \[0, 4\)"),
    ("pe-ids-negative", _pe(ids_keep=torch.tensor([[0, -1], [1, 2]])), ValueError, r"ids_keep values must lie in"),
    ("pe-ids-float", _pe(ids_keep=torch.zeros(2, 2)), TypeError, r"ids_keep must be an int64"),
    ("pe-ids-batch", _pe(ids_keep=torch.zeros(3, 2, dtype=torch.long)), ValueError, r"ids_keep must have shape \(2, "),
    ("pe-ids-too-many", _pe(ids_keep=torch.zeros(2, 5, dtype=torch.long)), ValueError, r"ids_keep must have shape"),
    ("pe-ids-rank", _pe(ids_keep=torch.zeros(2, dtype=torch.long)), ValueError, r"ids_keep must be 2-D"),
    ("pe-ids-repeat", _pe(ids_keep=torch.tensor([[0, 1], [2, 2]])), ValueError, r"ids_keep must not repeat an index"),
    # attention
    ("attn-rank", _attn(_t(2, 5, 3, 24)), ValueError, r"qkv must be 3-D"),
    ("attn-width", _attn(_t(2, 5, 3 * 2 * 32 + 2)), ValueError, r"qkv's last dim \(194\).*3 \* num_heads = 6"),
    ("attn-width-heads", _attn(_t(2, 5, 96), num_heads=5), ValueError, r"qkv's last dim \(96\).*= 15"),
    ("attn-int", _attn(_t(2, 5, 96, dtype=torch.int64)), TypeError, r"qkv must be float"),
    ("attn-heads-zero", _attn(_t(2, 5, 96), num_heads=0), ValueError, r"num_heads must be >= 1"),
    ("attn-heads-float", _attn(_t(2, 5, 96), num_heads=2.0), TypeError, r"num_heads must be an int"),
    ("attn-dropout", _attn(_t(2, 5, 96), dropout_p=1.0), ValueError, r"dropout_p must lie in \[0, 1\)"),
    # scaled_dot_product_attention
    ("sdpa-q-rank", _sdpa(q=_t(2, 5, 32)), ValueError, r"q must be 4-D"),
    ("sdpa-k-dtype", _sdpa(k=_t(2, 2, 7, 32, dtype=torch.bfloat16)), TypeError, r"k has dtype torch\.bfloat16"),
    ("sdpa-v-dtype", _sdpa(v=_t(2, 2, 7, 32, dtype=torch.float16)), TypeError, r"v has dtype"),
    ("sdpa-v-device", _sdpa(v=_t(2, 2, 7, 32, device=META)), ValueError, r"v is on meta"),
    ("sdpa-v-shape", _sdpa(v=_t(2, 2, 6, 32)), ValueError, r"v must have shape \(2, 2, 7, 32\)"),
    ("sdpa-k-headdim", _sdpa(k=_t(2, 2, 7, 16), v=_t(2, 2, 7, 16)), ValueError, r"k must have shape \(2, 2, Nk, 32\)"),
    ("sdpa-k-heads", _sdpa(k=_t(2, 3, 7, 32), v=_t(2, 3, 7, 32)), ValueError, r"k must have shape"),
    ("sdpa-q-int", _sdpa(q=_t(2, 2, 5, 32, dtype=torch.int32)), TypeError, r"q must be float"),
    (
        "sdpa-q-strided-last",
        _sdpa(q=_t(2, 2, 32, 5).transpose(-1, -2)),
        ValueError,
        r"q must have a contiguous last dimension",
    ),
    ("sdpa-k-strided-last", _sdpa(k=_t(2, 2, 7, 64)[..., ::2]), ValueError, r"k must have a contiguous last dimension"),
    ("sdpa-dropout", _sdpa(dropout_p=-0.1), ValueError, r"dropout_p must lie in"),
    # layer_norm
    ("ln-x-int", _ln(x=_t(2, 5, 24, dtype=torch.int64)), TypeError, r"x must be float"),
    ("ln-x-scalar", _ln(x=_t()), ValueError, r"x must have a non-empty last dimension"),
    ("ln-weight-shape", _ln(weight=_t(23)), ValueError, r"weight must have shape \(24,\)"),
    ("ln-bias-dtype", _ln(bias=_t(24, dtype=torch.float16)), TypeError, r"bias has dtype torch\.float16"),
    ("ln-residual-shape", _ln(residual=_t(2, 4, 24)), ValueError, r"residual must have shape \(2, 5, 24\)"),
    ("ln-residual-dtype", _ln(residual=_t(2, 5, 24, dtype=torch.bfloat16)), TypeError, r"residual has dtype"),
    ("ln-eps", _ln(eps=-1e-6), ValueError, r"eps must be >= 0"),
    # linear_gelu
    ("lg-k-mismatch", _lg(weight=_t(40, 23)), ValueError, r"x's last dim \(24\) must equal weight's in_features"),
    ("lg-weight-rank", _lg(weight=_t(40, 24, 1)), ValueError, r"weight must be 2-D"),
    ("lg-weight-dtype", _lg(weight=_t(40, 24, dtype=torch.float16)), TypeError, r"weight has dtype"),
    ("lg-bias-shape", _lg(bias=_t(24)), ValueError, r"bias must have shape \(40,\)"),
    ("lg-approximate", _lg(approximate="erf"), ValueError, r"approximate must be 'none' or 'tanh'"),
    ("lg-x-int", _lg(x=_t(2, 5, 24, dtype=torch.int32)), TypeError, r"x must be float"),
    # linear_residual
    ("lr-residual-shape", _lr(residual=_t(2, 5, 24)), ValueError, r"residual must have shape \(2, 5, 40\)"),
    ("lr-residual-dtype", _lr(residual=_t(2, 5, 40, dtype=torch.float64)), TypeError, r"residual has dtype"),
    ("lr-gamma-shape", _lr(gamma=_t(24)), ValueError, r"gamma must have shape \(40,\)"),
    ("lr-gamma-dtype", _lr(gamma=_t(40, dtype=torch.bfloat16)), TypeError, r"gamma has dtype"),
    ("lr-k-mismatch", _lr(x=_t(2, 5, 25)), ValueError, r"x's last dim \(25\)"),
    ("lr-bias-shape", _lr(bias=_t(41)), ValueError, r"bias must have shape"),
    # random_masking
    ("rm-ratio-one", _rm(ratio=1.0), ValueError, r"mask_ratio must lie in \[0, 1\), got 1\.0"),
    ("rm-ratio-negative", _rm(ratio=-0.25), ValueError, r"mask_ratio must lie in"),
    ("rm-seq-len-zero", _rm(L=0), ValueError, r"seq_len must be a positive int"),
    ("rm-batch-float", _rm(B=2.0), ValueError, r"batch_size must be a positive int"),
    ("rm-noise-shape", _rm(noise=torch.rand(2, 15)), ValueError, r"noise must have shape \(2, 16\)"),
    ("rm-noise-int", _rm(noise=torch.ones(2, 16, dtype=torch.int64)), TypeError, r"noise must be float"),
    ("rm-noise-rank", _rm(noise=torch.rand(32)), ValueError, r"noise must be 2-D"),
    # mae_unshuffle
    ("un-x-rank", _un(x=_t(5, 24)), ValueError, r"x must be 3-D"),
    (
        "un-ids-not-permutation",
        _un(ids_restore=torch.tensor([[0, 1, 2, 3], [0, 1, 1, 3]])),
        ValueError,
        r"ids_restore must not repeat an index",
    ),
    ("un-x-int", _un(x=_t(2, 5, 24, dtype=torch.int32)), TypeError, r"x must be float"),
    ("un-mask-token-shape", _un(mask_token=_t(1, 24)), ValueError, r"mask_token must have shape \(1, 1, 24\)"),
    ("un-mask-token-dtype", _un(mask_token=_t(1, 1, 24, dtype=torch.float16)), TypeError, r"mask_token has dtype"),
    ("un-ids-float", _un(ids_restore=torch.zeros(2, 16)), TypeError, r"ids_restore must be an int64"),
    ("un-ids-rank", _un(ids_restore=torch.zeros(16, dtype=torch.long)), ValueError, r"ids_restore must be 2-D"),
    ("un-ids-batch", _un(ids_restore=_ids(B=3)), ValueError, r"ids_restore must have shape \(2, N\)"),
    ("un-ids-range", _un(ids_restore=_ids() + 1), ValueError, r"ids_restore values must lie in \[0, 16\)"),
    ("un-ids-device", _un(ids_restore=_ids().to(META)), ValueError, r"ids_restore is on meta"),
    ("un-too-many-tokens", _un(x=_t(2, 18, 24)), ValueError, r"x must hold 1 \+ N_keep tokens.*N = 16, got 18"),
    ("un-no-cls", _un(x=_t(2, 0, 24)), ValueError, r"x must hold 1 \+ N_keep tokens"),
    ("un-pos-shape", _un(pos_embed=_t(1, 16, 24)), ValueError, r"pos_embed must have shape \(1, 17, 24\)"),
    # mae_loss
    ("loss-pred-shape", _loss(pred=_t(2, 16, 13)), ValueError, r"pred must have shape \(2, 16, 12\)"),
    ("loss-pred-rank", _loss(pred=_t(32, 12)), ValueError, r"pred must be 3-D"),
    ("loss-pred-int", _loss(pred=_t(2, 16, 12, dtype=torch.int64)), TypeError, r"pred must be float"),
    ("loss-images-rank", _loss(images=_t(3, 8, 8)), ValueError, r"images must be 4-D"),
    (
        "loss-not-divisible",
        _loss(images=_t(2, 3, 8, 9)),
        ValueError,
        r"images spatial size 8x9 is not divisible by patch_size 2",
    ),
    ("loss-channels", _loss(images=_t(2, 4, 8, 8)), ValueError, r"pred must have shape \(2, 16, 16\)"),
    ("loss-mask-shape", _loss(mask=torch.ones(2, 15)), ValueError, r"mask must have shape \(2, 16\)"),
    ("loss-mask-bool", _loss(mask=torch.ones(2, 16, dtype=torch.bool)), TypeError, r"mask must be float"),
    ("loss-patch-size", _loss(patch_size=0), ValueError, r"patch_size must be a positive int"),
    ("loss-images-device", _loss(images=_t(2, 3, 8, 8, device=META)), ValueError, r"images is on meta"),
    ("loss-patch-size-bool", _loss(patch_size=True), ValueError, r"patch_size must be a positive int"),
    # near misses of the ops' fast paths (valid-looking calls that only the full checks may answer)
    ("pe-pos-prefix-without-cls", _pe(pos_embed=_t(1, 5, 16)), ValueError, r"pos_embed must have shape.*\[4\]"),
    ("pe-cls-device", _pe(cls_token=_t(1, 1, 16, device=META)), ValueError, r"cls_token is on meta"),
    ("pe-ids-device", _pe(ids_keep=torch.zeros(2, 2, dtype=torch.long, device=META)), ValueError, r"ids_keep is on"),
    ("attn-heads-bool", _attn(_t(2, 5, 96), num_heads=True), TypeError, r"num_heads must be an int"),
    ("attn-empty", _attn(_t(2, 5, 0)), ValueError, r"qkv's last dim \(0\) must be a positive multiple"),
    ("sdpa-k-device", _sdpa(k=_t(2, 2, 7, 32, device=META)), ValueError, r"k is on meta"),
    ("sdpa-k-batch", _sdpa(k=_t(3, 2, 7, 32), v=_t(3, 2, 7, 32)), ValueError, r"k must have shape \(2, 2, Nk, 32\)"),
    ("sdpa-v-strided-last", _sdpa(v=_t(2, 2, 7, 64)[..., ::2]), ValueError, r"v must have a contiguous last dim"),
    ("ln-residual-broadcast", _ln(residual=_t(1, 5, 24)), ValueError, r"residual must have shape \(2, 5, 24\)"),
    ("ln-weight-device", _ln(weight=_t(24, device=META)), ValueError, r"weight is on meta"),
    ("ln-bias-rank", _ln(bias=_t(1, 24)), ValueError, r"bias must have shape \(24,\)"),
    ("lg-bias-device", _lg(bias=_t(40, device=META)), ValueError, r"bias is on meta"),
    ("lg-weight-device", _lg(weight=_t(40, 24, device=META)), ValueError, r"weight is on meta"),
    ("lr-residual-broadcast", _lr(residual=_t(1, 5, 40)), ValueError, r"residual must have shape \(2, 5, 40\)"),
    ("lr-residual-rank", _lr(residual=_t(5, 40)), ValueError, r"residual must have shape \(2, 5, 40\)"),
    ("lr-residual-tokens", _lr(residual=_t(2, 4, 40)), ValueError, r"residual must have shape \(2, 5, 40\)"),
    ("lr-residual-device", _lr(residual=_t(2, 5, 40, device=META)), ValueError, r"residual is on meta"),
    ("lr-gamma-device", _lr(gamma=_t(40, device=META)), ValueError, r"gamma is on meta"),
    ("un-mask-token-device", _un(mask_token=_t(1, 1, 24, device=META)), ValueError, r"mask_token is on meta"),
    ("un-pos-dtype", _un(pos_embed=_t(1, 17, 24, dtype=torch.float64)), TypeError, r"pos_embed has dtype"),
    ("loss-mask-device", _loss(mask=torch.ones(2, 16, device=META)), ValueError, r"mask is on meta"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_good_versions_of_the_bad_input_calls_run():
    """The helpers above build valid calls by default: the errors come from the one bad argument."""
    for make in (_pe, _attn, _sdpa, _ln, _lg, _lr, _un, _loss, _rm):
        call = make(_t(2, 5, 96)) if make is _attn else make()
        out = call()
        assert all(torch.isfinite(o).all() for o in (out if isinstance(out, tuple) else (out,)))


def test_indices_from_random_masking_skip_the_value_check_until_written(monkeypatch):
    """ids from ops.random_masking are valid by construction and skip mae_unshuffle's / patch_embed's value check (a
    host sync per MAE step); any other indices, or those written to in place since, are checked."""
    ops = fastvit.ops
    checked = []
    real = fastvit.families._checks.check_index_rows
    for family in (fastvit.families.mae, fastvit.families.patch_embed):  # the two ops that take indices
        monkeypatch.setattr(family, "check_index_rows", lambda name, *a: (checked.append(name), real(name, *a)))
    B, N, C = 2, 8, 4
    ids_keep, ids_restore, _ = ops.random_masking(B, N, 0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(B, 1 + ids_keep.shape[1], C)
    mask_token = torch.randn(1, 1, C)
    out = ops.mae_unshuffle(x, mask_token, ids_restore)
    torch.testing.assert_close(out, fastvit.reference.mae_unshuffle(x, mask_token, ids_restore))
    weight = torch.randn(C, 3, 4, 4)
    images = torch.randn(B, 3, 8, 16)  # 2 x 4 = 8 patches of 4 x 4
    ops.patch_embed(images, weight, None, ids_keep=ids_keep)
    assert checked == []
    ops.mae_unshuffle(x, mask_token, ids_restore.clone())  # a copy is not vouched for
    assert checked == ["ids_restore"]
    ids_restore[0, 0] = ids_restore[0, 1]  # an in-place write: checked again, and the repeat is found
    with pytest.raises(ValueError, match="ids_restore must not repeat an index"):
        ops.mae_unshuffle(x, mask_token, ids_restore)
    ids_keep[1, 0] = N  # the view's writes bump the shared version counter too
    with pytest.raises(ValueError, match=r"ids_keep values must lie in \[0, 8\)"):
        ops.patch_embed(images, weight, None, ids_keep=ids_keep)


def _valid_calls():
    """Valid calls of every dispatched op, as (op, args, kwargs): the common cases, and the variants (missing LayerNorm
    affine operands, register tokens, int32 or caller-made indices, dropout, packed attention, a 4-D linear input)."""
    ids_keep, ids_restore, mask = fastvit.ops.random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    x, w, b = _t(2, 5, 24), _t(24), _t(24)
    qkv = _t(2, 7, 96)
    q, k, v = qkv.view(2, 7, 3, 2, 16).permute(2, 0, 3, 1, 4)  # strided views, last dim contiguous
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    images = _t(2, 3, 16, 16)
    pe = (images, _t(8, 3, 4, 4), _t(8))
    return [
        ("patch_embed", pe, {}),
        ("patch_embed", pe, {"pos_embed": _t(1, 17, 8), "cls_token": _t(1, 1, 8)}),
        ("patch_embed", pe, {"pos_embed": _t(1, 16, 8), "cls_token": _t(1, 1, 8)}),
        ("patch_embed", pe, {"pos_embed": _t(1, 17, 8), "cls_token": _t(1, 1, 8), "ids_keep": ids_keep}),
        ("patch_embed", pe, {"pos_embed": _t(1, 16, 8), "ids_keep": ids_keep.clone()}),
        ("patch_embed", pe, {"cls_token": _t(1, 1, 8), "reg_tokens": _t(1, 4, 8)}),
        ("patch_embed", (images, _t(8, 3, 4, 4), None), {"ids_keep": ids_keep.int()}),
        ("attention", (qkv, 2), {}),
        ("attention", (qkv, 4), {"scale": 0.5}),
        ("attention", (qkv, 2), {"dropout_p": 0.1}),
        ("attention", (qkv.view(14, 96), 2), {"cu_seqlens": torch.tensor([0, 5, 14], dtype=torch.int32)}),
        ("scaled_dot_product_attention", (q, k, v), {}),
        (
            "scaled_dot_product_attention",
            (_t(2, 2, 5, 16), _t(2, 2, 9, 16), _t(2, 2, 9, 16)),
            {"dropout_p": 0.2},
        ),
        ("scaled_dot_product_attention", (q[0].transpose(0, 1),) * 3, {"cu_seqlens": cu}),
        ("layer_norm", (x, w, b), {}),
        ("layer_norm", (x, w, b, 1e-12), {"residual": _t(2, 5, 24)}),
        ("layer_norm", (x, None, None), {}),
        ("layer_norm", (x[0], w, None), {}),
        ("linear_gelu", (x, _t(40, 24), _t(40)), {}),
        ("linear_gelu", (x, _t(40, 24), None), {"approximate": "tanh"}),
        ("linear_gelu", (_t(24), _t(40, 24), _t(40)), {}),
        ("linear_residual", (x, _t(40, 24), _t(40), _t(2, 5, 40)), {}),
        ("linear_residual", (x[0], _t(40, 24), None, _t(5, 40)), {"gamma": _t(40)}),
        ("linear_residual", (_t(2, 3, 5, 24), _t(40, 24), _t(40), _t(2, 3, 5, 40)), {}),
        ("mae_unshuffle", (_t(2, 5, 24), _t(1, 1, 24), ids_restore), {"pos_embed": _t(1, 17, 24)}),
        ("mae_unshuffle", (_t(2, 5, 24), _t(1, 1, 24), ids_restore), {}),
        ("mae_unshuffle", (_t(2, 5, 24), _t(1, 1, 24), ids_restore.clone().int()), {}),
        ("mae_loss", (_t(2, 16, 12), _t(2, 3, 8, 8), mask, 2), {}),
        (
            "mae_loss",
            (_t(2, 16, 12), _t(2, 3, 8, 8, dtype=torch.float64), mask.half(), 2),
            {"norm_pix_loss": True},
        ),
    ]


@pytest.mark.parametrize("i", range(len(_valid_calls())))
def test_valid_calls_are_described_by_the_declared_fields(i):
    """Every op has one check step (its declaration's ``prepare``): a valid call is described by a
    :class:`fastvit.backends.Call` that sets only ``device``, ``dtype`` and the op's declared ``call_fields`` (plus
    ``mixed_dtypes`` / ``varlen``), hands the kernel the caller's operands, and dispatches as
    :func:`fastvit.backends.select` does for that description."""
    from fastvit.declare import DECLARATIONS

    op, args, kwargs = _valid_calls()[i]
    decl = DECLARATIONS[op]
    prepared = decl.prepare(*args, **kwargs)
    call = prepared[0]
    assert type(call) is fastvit.backends.Call
    assert call.device == args[0].device and call.dtype == args[0].dtype
    allowed = {"device", "dtype", "mixed_dtypes", "varlen", *decl.call_fields}
    defaults = fastvit.backends.Call()
    assert {f for f in call._fields if getattr(call, f) != getattr(defaults, f)} <= allowed
    assert all(getattr(call, f) is not None for f in decl.call_fields)
    given = [*args, *kwargs.values()]
    for operand in prepared[1:]:  # the caller's operands (index operands may come back converted to int64)
        assert operand is None or any(operand is v for v in given) or operand.dtype == torch.int64
    assert fastvit.backends._select(op, call, None) == fastvit.backends.select(op, call)
    assert fastvit.ops.describe_call(op, *args, **kwargs) == call
