"""Rotary tables per sample / per packed sequence in ``fastvit.ops.attention`` and
``fastvit.ops.scaled_dot_product_attention``: ``rope`` of shape (B, 1, N_rot, 2·D) (shared by the heads) or
(B, H, N_rot, 2·D) (per head), as timm's Eva patch dropout (``apply_keep_indices_nlc`` then ``unsqueeze(1)``) and
NaFlexVit (``_generate_rope_naflex``: one table per image, images of different grids) pass them; with ``cu_seqlens``
the leading dim is the number of sequences S and sequence s is rotated with table s.

* The ops against the float64 reference (:func:`fastvit.reference.attention` / ``scaled_dot_product_attention``,
  which broadcast a dense table per sample and pick table s per packed sequence) under the oracle of tests/oracle.py,
  on the eager and the Triton backend (interpreted on the CPU): the output and every gradient -- qkv's (or q's,
  k's, v's) and the table's. Every sample's table differs from the others, so a kernel that ignored the table's
  batch stride (rotating every sample with table 0) fails.
* The reference itself against timm's own ``apply_rot_embed_cat`` applied one sample at a time (an independent check
  of the broadcasting), on tables made by timm's rotary modules and its patch-dropout helper.
* The call description (``Call.rope_per_sample``) and the capability reason of a backend without per-sample tables
  (the CUDA backend's); bad leading dims raise errors naming ``rope``; the kernel launcher's own table check.
"""

from __future__ import annotations

import functools

import pytest
import torch
from oracle import make_inputs, oracle_compare, randn, run_forward_backward

import fastvit.backends
import fastvit.ops as ops
from fastvit import reference
from fastvit.backends import Call, Capabilities
from fastvit.families.attention import rope_table

pytest.importorskip("triton")
timm = pytest.importorskip("timm")

from timm.layers.pos_embed_sincos import (  # noqa: E402
    RotaryEmbeddingCat,
    apply_keep_indices_nlc,
    apply_rot_embed_cat,
)

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py

F32, BF16 = torch.float32, torch.bfloat16
H = 2


# ------------------------------------------------------------------------------------------------ tables
def _per_sample(n: int, n_rot: int, D: int, per_head: bool, half: bool, g: torch.Generator) -> torch.Tensor:
    """``n`` random tables stacked, fp32 (n, H or 1, n_rot, 2·D): one random angle per pair, a different one in
    every sample (a kernel reading sample 0's table for all of them is off by O(1))."""
    tables = torch.stack([rope_table(n_rot, D, H if per_head else None, half, g) for _ in range(n)])
    return tables if per_head else tables[:, None]


def _patch_dropout_table(B: int, grid: tuple[int, int], keep: int, D: int, half: bool, g) -> torch.Tensor:
    """What timm's Eva hands its blocks after patch dropout: ``RotaryEmbeddingCat``'s (N_rot, 2·D) table, the rows of
    each sample's kept patches gathered by ``apply_keep_indices_nlc``, then ``unsqueeze(1)``: (B, 1, keep, 2·D)."""
    emb = RotaryEmbeddingCat(D, in_pixels=False, feat_shape=list(grid), rotate_half=half).get_embed().float()
    n = grid[0] * grid[1]
    keep_indices = torch.stack([torch.randperm(n, generator=g)[:keep] for _ in range(B)])
    x = torch.zeros(B, keep, 1)  # only its batch size is read
    return apply_keep_indices_nlc(x, emb, keep_indices).unsqueeze(1)


def _naflex_tables(grids: list[tuple[int, int]], D: int, half: bool) -> torch.Tensor:
    """One table per image of a NaFlex batch, as ``_generate_rope_naflex`` builds them: timm's table for each image's
    own patch grid, zero-padded to the longest, (S, 1, L, 2·D)."""
    embs = [RotaryEmbeddingCat(D, in_pixels=False, feat_shape=list(gr), rotate_half=half).get_embed() for gr in grids]
    L = max(e.shape[0] for e in embs)
    out = torch.zeros(len(grids), 1, L, 2 * D)
    for s, e in enumerate(embs):
        out[s, 0, : e.shape[0]] = e.float()
    return out


# ------------------------------------------------------------------------------------------------ oracle
def _impls(op: str) -> dict:
    fn = getattr(ops, op)
    return {be: functools.partial(fn, backend=be) for be in ("eager", "triton")}


def _check(impls, naive, inputs, grad_names, *, dtype, generator, name):
    """tests/oracle.py's rule on the output and every gradient (ref: ``naive`` in float64, pt: in the input dtype),
    with the fp32 table's gradient judged in its own dtype at ``dtype``'s tolerance (timm's tables stay fp32 under
    autocast, as tests/test_rope_attention.py does)."""
    ref_fwd = run_forward_backward(naive, inputs, (), dtype=torch.float64)
    grad_outputs = [randn(o.shape, dtype=dtype, generator=generator).to(torch.float64) for o in ref_fwd.outputs]
    ref = run_forward_backward(naive, inputs, grad_names, grad_outputs, dtype=torch.float64)
    pt = run_forward_backward(naive, inputs, grad_names, grad_outputs)
    for impl_name, impl in impls.items():
        run = run_forward_backward(impl, inputs, grad_names, grad_outputs)
        pairs = [("out", run.outputs[0], ref.outputs[0], pt.outputs[0])]
        pairs += [(f"grad {g}", run.grads[g], ref.grads[g], pt.grads[g]) for g in grad_names]
        for label, got, r, p in pairs:
            own = label == "grad rope"
            assert got.dtype == (inputs["rope"].dtype if own else dtype), (label, got.dtype)
            if own:
                assert got.shape == inputs["rope"].shape, (label, got.shape)
            result = oracle_compare(got, r, p, dtype, f"{name}[{impl_name}] {label}", check_dtype=not own)
            assert result.ok, result.message


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


# ------------------------------------------------------------------------------------------------ the ops
# (dtype, D, rotate_half, prefix tokens, per-head tables, tokens or packed lengths); packed lengths include an empty
# and a one-token sequence, and N leaves a tail in every block.
ATTENTION = [
    (F32, 32, False, 1, True, 11),
    (BF16, 32, True, 0, False, 9),
    (F32, 32, True, 2, True, (7, 0, 1, 12)),
]


def _ids(v):
    return str(v).replace("torch.", "") if not isinstance(v, tuple) else "x".join(map(str, v))


@pytest.mark.parametrize("dtype,D,half,npt,per_head,n", ATTENTION, ids=_ids)
def test_attention_per_sample_table_matches_reference(dtype, D, half, npt, per_head, n, generator):
    packed = isinstance(n, tuple)
    if packed:
        inputs = make_inputs({"qkv": (sum(n), 3 * H * D)}, dtype=dtype, generator=generator)
        inputs.update(cu_seqlens=_cu(n))
        rope = _per_sample(len(n), max(n) - npt + 1, D, per_head, half, generator)  # one row more than needed
    else:
        inputs = make_inputs({"qkv": (3, n, 3 * H * D)}, dtype=dtype, generator=generator)
        rope = _per_sample(3, n - npt, D, per_head, half, generator)
    inputs.update(num_heads=H, rope=rope, num_prefix_tokens=npt, rotate_half=half)
    _check(
        _impls("attention"),
        functools.partial(reference.attention, plain=True),
        inputs,
        ["qkv", "rope"],
        dtype=dtype,
        generator=generator,
        name=f"attention per-sample rope D={D} half={half} prefix={npt} per_head={per_head} n={n}",
    )


@pytest.mark.parametrize("dtype,per_head,packed", [(BF16, True, False), (F32, False, True)], ids=_ids)
def test_sdpa_per_sample_table_matches_reference(dtype, per_head, packed, generator):
    """``scaled_dot_product_attention(q, k, v, rope=...)`` with a table per sample on strided (B, H, N, D) views of
    one projection (timm's layout), and per packed sequence on (T, H, D) operands."""
    D, npt, half = 32, 1, not per_head
    if packed:
        lens = (6, 13, 2)
        inputs = make_inputs({name: (sum(lens), H, D) for name in "qkv"}, dtype=dtype, generator=generator)
        inputs.update(cu_seqlens=_cu(lens))
        rope = _per_sample(len(lens), max(lens) - npt, D, per_head, half, generator)
    else:
        inputs = make_inputs({name: (3, H, 10, D) for name in "qkv"}, dtype=dtype, generator=generator)
        x = torch.stack([inputs[name] for name in "qkv"]).permute(1, 3, 0, 2, 4).contiguous()  # (B, N, 3, H, D)
        inputs.update(zip("qkv", x.permute(2, 0, 3, 1, 4).unbind(0)))
        rope = _per_sample(3, 10 - npt, D, per_head, half, generator)
    inputs.update(rope=rope, num_prefix_tokens=npt, rotate_half=half)
    _check(
        _impls("scaled_dot_product_attention"),
        functools.partial(reference.scaled_dot_product_attention, plain=True),
        inputs,
        ["q", "k", "v", "rope"],
        dtype=dtype,
        generator=generator,
        name=f"sdpa per-sample rope per_head={per_head} packed={packed}",
    )


def test_naflex_tables_packed_match_reference(generator):
    """NaFlexVit's case: images of different patch grids, each with timm's own table for its grid (zero-padded to the
    longest), packed as sequences with one cls token -- forward on both backends, and the table's gradient."""
    D, npt, half = 32, 1, False
    grids = [(2, 3), (3, 3), (1, 2)]
    rope = _naflex_tables(grids, D, half)
    lens = [npt + a * b for a, b in grids]
    qkv = randn((sum(lens), 3 * H * D), generator=generator)
    kw = dict(cu_seqlens=_cu(lens), rope=rope, num_prefix_tokens=npt, rotate_half=half)
    want = reference.attention(qkv.double(), H, **(kw | {"rope": rope.double()}))
    for be in ("eager", "triton"):
        got = ops.attention(qkv, H, backend=be, **kw)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # each sequence alone, with its own table, is timm's EvaAttention on that image
    for s, (a, b) in enumerate(zip(_cu(lens)[:-1].tolist(), _cu(lens)[1:].tolist())):
        one = reference.attention(qkv[a:b][None], H, rope=rope[s, :, : b - a - npt], num_prefix_tokens=npt)[0]
        torch.testing.assert_close(want[a:b].float(), one, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ against timm
@pytest.mark.parametrize("half", [False, True])
def test_reference_is_timm_per_sample(half, generator):
    """The reference on a patch-dropout table (B, 1, keep, 2·D) and a per-head per-sample table (B, H, N_rot, 2·D) is
    timm's EvaAttention math -- ``apply_rot_embed_cat`` past the prefix -- run one sample at a time with that sample's
    table; the eager backend equals it bit for bit, and Triton within fp32 rounding."""
    D, npt, B, keep = 32, 1, 3, 7
    for rope in (
        _patch_dropout_table(B, (3, 4), keep, D, half, generator),
        _per_sample(B, keep, D, True, half, generator),
    ):
        assert rope.shape[0] == B and not torch.equal(rope[0], rope[1])
        qkv = randn((B, npt + keep, 3 * H * D), generator=generator)
        outs = []
        for b in range(B):
            q, k, v = qkv[b : b + 1].reshape(1, npt + keep, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope[b], half=half)], 2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope[b], half=half)], 2)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            outs.append(o.transpose(1, 2).reshape(1, npt + keep, H * D))
        want = torch.cat(outs)
        kw = dict(rope=rope, num_prefix_tokens=npt, rotate_half=half)
        torch.testing.assert_close(reference.attention(qkv, H, **kw), want, atol=2e-6, rtol=0)
        assert torch.equal(ops.attention(qkv, H, backend="eager", **kw), want)
        torch.testing.assert_close(ops.attention(qkv, H, backend="triton", **kw), want, atol=2e-5, rtol=0)


def test_kernel_launcher_takes_per_sample_tables(generator):
    """``fastvit.kernels.rope_launch`` with (B, 1, N_rot, D) sin / cos tables: the forward kernel reads table b for
    sample b (``stride_rope_b``); a leading dim other than B is rejected."""
    from fastvit.kernels.rope_launch import rope_attention_fwd

    D, npt, B, N = 32, 1, 3, 9
    rope = _per_sample(B, N - npt, D, False, True, generator)
    sin, cos = rope.chunk(2, -1)
    qkv = randn((B, N, 3 * H * D), generator=generator)
    out, _ = rope_attention_fwd(qkv, H, sin, cos, npt, D**-0.5, rotate_half=True)
    want = reference.attention(qkv, H, rope=rope, num_prefix_tokens=npt, rotate_half=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="one per sample"):
        rope_attention_fwd(qkv, H, sin[:2], cos[:2], npt, D**-0.5)


# ------------------------------------------------------------------------------------------------ dispatch
def test_call_description_and_capability_reason():
    """A table per sample sets ``Call.rope_per_sample`` (a leading 1 does not: shared); capabilities without it -- the
    default, and the CUDA backend's -- decline it with a reason naming the per-sample table; Triton and eager serve
    it."""
    from fastvit.families import attention as fam

    qkv = torch.randn(2, 9, 3 * H * 32)
    g = torch.Generator().manual_seed(0)
    per_sample = _per_sample(2, 8, 32, False, False, g)
    call = ops.describe_call("attention", qkv, H, rope=per_sample, num_prefix_tokens=1)
    assert call.rope is True and call.rope_per_sample is True
    assert ops.describe_call("attention", qkv, H, rope=per_sample[:1], num_prefix_tokens=1).rope_per_sample is False
    assert ops.describe_call("attention", qkv, H).rope_per_sample is False
    packed = ops.describe_call(
        "attention", torch.randn(9, 3 * H * 32), H, cu_seqlens=_cu((4, 5)), rope=per_sample, num_prefix_tokens=1
    )
    assert packed.varlen and packed.rope_per_sample
    q = torch.randn(2, H, 9, 32)
    sdpa = ops.describe_call("scaled_dot_product_attention", q, q, q, rope=per_sample, num_prefix_tokens=1)
    assert sdpa.rope_per_sample is True
    assert Call().rope_per_sample is False and Capabilities().rope_per_sample is False  # new last fields
    reason = Capabilities(rope=True).reasons(call)
    assert len(reason) == 1 and "rotary table per sample" in reason[0]
    assert Capabilities(rope=True, rope_per_sample=True).reasons(call) == []
    assert Capabilities(rope=True).reasons(call._replace(rope_per_sample=False)) == []
    facts = {  # a full CUDA build's kernel facts (tests/test_varlen_cuda.py)
        "attention_head_dim_bucket_bounds": "32,64,80,96,128",
        "attention_head_dim_buckets": "32,64,80,96,128",
        "attention_bwd_smem_bytes": "32:41984,64:74752,80:91136,96:107520,128:104960",
        "attention_head_dim_multiple": 8,
        "attention_max_head_dim": 128,
        "half_dtypes": "float16,bfloat16",
        "gemm_alignment": 8,
        "attention_varlen": 1,
    }
    half_call = call._replace(dtype=torch.bfloat16, device=torch.device("meta"))
    cuda_reasons = fam.cuda_caps_for(facts).reasons(half_call)
    assert cuda_reasons and all("rope" in r or "rotary" in r for r in cuda_reasons)
    for name in ("triton", "eager"):
        assert fastvit.backends.get_backend(name).not_supported_reasons("attention", call) == []
        assert fastvit.backends.get_backend(name).not_supported_reasons("scaled_dot_product_attention", sdpa) == []


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_per_sample_tables_raise_naming_rope():
    D = 32
    qkv = torch.randn(2, 9, 3 * H * D)
    bad = [
        (torch.rand(3, 1, 8, 2 * D), "rope's leading dim is 3 .* table per sample .* batch B = 2"),
        (torch.rand(2, 3, 8, 2 * D), r"rope has 3 heads \(shape \(2, 3, 8, 64\): a table per sample\)"),
        (torch.rand(2, 1, 7, 2 * D), "rope has 7 rows"),
        (torch.rand(2, 1, 8, D), "rope's last dim must be 2·D"),
        (torch.rand(3, 8, 2 * D), r"rope has 3 heads .* a table per sample is \(B, 1 or H"),
        (torch.rand(2, 1, 1, 8, 2 * D), "rope must be"),
    ]
    for rope, match in bad:
        with pytest.raises(ValueError, match=match):
            ops.attention(qkv, H, rope=rope, num_prefix_tokens=1)
        with pytest.raises(ValueError, match=match):
            q = qkv[..., : H * D].reshape(2, 9, H, D).transpose(1, 2)
            ops.scaled_dot_product_attention(q, q, q, rope=rope, num_prefix_tokens=1)
    cu = _cu((4, 5, 0))
    with pytest.raises(ValueError, match="rope's leading dim is 2 .* table per sequence .* packed sequences S = 3"):
        ops.attention(torch.randn(9, 3 * H * D), H, cu_seqlens=cu, rope=torch.rand(2, 1, 4, 2 * D), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="rope's leading dim is 4 .* S = 3"):
        t = torch.randn(9, H, D)
        ops.scaled_dot_product_attention(t, t, t, cu_seqlens=cu, rope=torch.rand(4, H, 4, 2 * D), num_prefix_tokens=1)
