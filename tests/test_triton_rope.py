"""Rotary position embeddings inside the Triton attention kernels (``ROPE``, fastvit.kernels.attention, launched by
fastvit.kernels.rope_launch) against timm's own math under the oracle.

The reference is timm's ``EvaAttention`` with RoPE: ``apply_rot_embed_cat`` on q and k past the prefix tokens (cls,
registers), then plain softmax attention; ``ref`` runs it in float64, ``pt`` in the input dtype with the fp32 tables
(timm's promotion: the rotation in fp32, rounded once to the input dtype), and the kernels must be within the oracle of
tests/oracle.py (2 x |pt - ref| + atol) on the output and on dqkv. Tables come from timm's own rotary modules:
``RotaryEmbeddingCat`` (shared by the heads, both layouts) and ``RotaryEmbeddingMixed`` (per head, interleaved); per-head
half-layout tables stack ``RotaryEmbeddingCat`` tables of different temperatures.

Packed sequences (``cu_seqlens``): every sequence is its own EvaAttention call -- its token at position p (counted from
the sequence's first row) reads table row p - num_prefix_tokens.

Runs in the Triton interpreter on the CPU (tiny B, H, N: the whole file takes about a minute and a half on two cores)
or on CUDA; one compile-only test builds the rotary kernels for sm_90 (no GPU needed) and reads their main loops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from oracle import check_op, make_inputs, randn

pytest.importorskip("triton")
pytest.importorskip("timm")

from timm.layers.pos_embed_sincos import (  # noqa: E402
    RotaryEmbeddingCat,
    RotaryEmbeddingMixed,
    apply_rot_embed_cat,
)

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py

H = 2


# ------------------------------------------------------------------------------------------------ tables
def _tables(D: int, grid: tuple[int, int], half: bool, per_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) fp32 from timm's rotary modules for a ``grid`` of patches: (N_rot, D) shared, or (H, N_rot, D)."""
    if per_head and not half:  # timm's per-head tables: RotaryEmbeddingMixed (interleaved only)
        emb = RotaryEmbeddingMixed(dim=D * H, depth=1, num_heads=H, feat_shape=list(grid)).get_embed()[0]
    elif per_head:
        emb = torch.stack(
            [
                RotaryEmbeddingCat(
                    D, in_pixels=False, feat_shape=list(grid), rotate_half=True, temperature=t
                ).get_embed()
                for t in (10000.0, 100.0)[:H]
            ]
        )
    else:
        emb = RotaryEmbeddingCat(D, in_pixels=False, feat_shape=list(grid), rotate_half=half).get_embed()
    sin, cos = (t.float().contiguous() for t in emb.detach().chunk(2, -1))
    # the kernels read one angle per rotation pair: every timm table holds it in both columns of the pair
    first, second = (slice(None, D // 2), slice(D // 2, None)) if half else (slice(0, None, 2), slice(1, None, 2))
    for t in (sin, cos):
        assert torch.equal(t[..., first], t[..., second])
    return sin, cos


# ------------------------------------------------------------------------------------------------ reference
def _rotate(x, sin, cos, num_prefix_tokens, half):
    """timm's EvaAttention on (B, H, N, D) q or k: prefix tokens as they are, the rest by ``apply_rot_embed_cat``."""
    npt = num_prefix_tokens
    emb = torch.cat([sin, cos], -1)[..., : x.shape[2] - npt, :]
    return torch.cat([x[:, :, :npt], apply_rot_embed_cat(x[:, :, npt:], emb, half=half)], dim=2).type_as(x)


def _naive_dense(qkv, sin, cos, num_heads, num_prefix_tokens, half, scale, cu_seqlens=None, max_seqlen=None):
    B, N, C3 = qkv.shape
    D = C3 // 3 // num_heads
    q, k, v = qkv.reshape(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    q = _rotate(q, sin, cos, num_prefix_tokens, half)
    k = _rotate(k, sin, cos, num_prefix_tokens, half)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, C3 // 3)


def _naive(qkv, sin, cos, num_heads, num_prefix_tokens, half, scale, cu_seqlens=None, max_seqlen=None):
    """The float64 / input-dtype reference: dense (B, N, 3C), or packed (T, 3C) one sequence at a time."""
    if cu_seqlens is None:
        return _naive_dense(qkv, sin, cos, num_heads, num_prefix_tokens, half, scale)
    bounds = cu_seqlens.tolist()
    outs = [
        _naive_dense(qkv[a:b][None], sin, cos, num_heads, num_prefix_tokens, half, scale)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, 0)


def _kernels(qkv, sin, cos, num_heads, num_prefix_tokens, half, scale, cu_seqlens=None, max_seqlen=None):
    from fastvit.kernels.rope_launch import rope_attention

    return rope_attention(qkv, num_heads, sin, cos, num_prefix_tokens, scale, cu_seqlens, max_seqlen, rotate_half=half)


def _check(dtype, D, half, npt, per_head, grid, generator, device, batch=1, lens=None):
    sin, cos = _tables(D, grid, half, per_head)
    n_rot = grid[0] * grid[1]
    if lens is None:
        spec = {"qkv": (batch, npt + n_rot, 3 * H * D)}
        packed = {}
    else:
        assert max(lens) - npt <= n_rot
        spec = {"qkv": (sum(lens), 3 * H * D)}
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        packed = {"cu_seqlens": cu, "max_seqlen": max(lens)}
    inputs = make_inputs(spec, dtype=dtype, device=device, generator=generator)
    inputs.update(sin=sin.to(device), cos=cos.to(device), num_heads=H, num_prefix_tokens=npt, half=half)
    inputs.update(scale=D**-0.5, **packed)
    check_op(
        {"triton": _kernels},
        _naive,
        inputs,
        ["qkv"],
        dtype=dtype,
        generator=generator,
        name=f"rope attention D={D} half={half} prefix={npt} per_head={per_head} lens={lens}",
    )


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (dtype, D, rotate_half, prefix tokens, per-head tables, patch grid): every dtype, head dim, layout, prefix count and
# table kind at least twice, not the full product (the interpreter is slow). D = 72 / 80 / 96 split into column chunks
# (64 + 16, 64 + 16, 64 + 32) whose pairs straddle the chunks in the half layout.
DENSE = [
    (F32, 64, True, 0, False, (4, 5)),
    (F16, 64, False, 1, True, (4, 5)),
    (BF16, 64, True, 5, True, (3, 5)),
    (F32, 80, False, 5, False, (4, 4)),
    (F16, 80, True, 1, False, (4, 5)),
    (BF16, 80, False, 0, True, (4, 5)),
    (F32, 72, True, 1, True, (3, 4)),
    (BF16, 96, False, 1, False, (3, 4)),
    (F16, 96, True, 5, True, (3, 4)),
]


@pytest.mark.parametrize(
    "dtype,D,half,npt,per_head,grid",
    DENSE,
    ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else "x".join(map(str, v)),
)
def test_rope_attention_dense(dtype, D, half, npt, per_head, grid, generator, device):
    _check(dtype, D, half, npt, per_head, grid, generator, device)


def test_rope_attention_batch_and_whole_blocks(generator, device):
    """Two batch rows, and 32 tokens: whole blocks only in the interpreter (no peeled tail in any kernel)."""
    _check(torch.float16, 64, True, 0, False, (4, 8), generator, device, batch=2)


# (dtype, D, rotate_half, prefix tokens, per-head tables, patch grid, sequence lengths): lengths of one and several
# blocks, with and without a tail, one sequence whose length is exactly max_seqlen and one barely past its prefix.
PACKED = [
    (F32, 64, True, 1, False, (4, 5), (9, 21, 16)),
    (BF16, 80, False, 5, True, (4, 5), (25, 7, 16)),
    (F16, 64, False, 0, False, (4, 5), (20, 3, 11)),
]


@pytest.mark.parametrize(
    "dtype,D,half,npt,per_head,grid,lens",
    PACKED,
    ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else "x".join(map(str, v)),
)
def test_rope_attention_packed(dtype, D, half, npt, per_head, grid, lens, generator, device):
    _check(dtype, D, half, npt, per_head, grid, generator, device, lens=lens)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_rope_lse(packed, generator, device):
    """The saved log-sum-exp is that of the rotated, scaled scores: (B, H, N) dense, (H, T) packed."""
    from fastvit.kernels.rope_launch import rope_attention_fwd

    D, npt, scale = 64, 1, 0.2
    sin, cos = _tables(D, (3, 4), True, False)
    lens = [13, 6] if packed else [13]
    qkv = randn((sum(lens), 3 * H * D), generator=generator, device=device)
    if packed:
        cu = torch.tensor([0, 13, 19], dtype=torch.int32, device=device)
        _, lse = rope_attention_fwd(qkv, H, sin.to(device), cos.to(device), npt, scale, cu, 13)
        assert lse.shape == (H, 19)
    else:
        _, lse = rope_attention_fwd(qkv[None], H, sin.to(device), cos.to(device), npt, scale)
        assert lse.shape == (1, H, 13)
        lse = lse[0]
    start = 0
    for n in lens:
        x = qkv[start : start + n].double().reshape(1, n, 3, H, D).permute(2, 0, 3, 1, 4)
        q = _rotate(x[0], sin.double(), cos.double(), npt, True)
        k = _rotate(x[1], sin.double(), cos.double(), npt, True)
        ref = torch.logsumexp((q @ k.transpose(-2, -1)) * scale, dim=-1)[0]
        assert lse.dtype == torch.float32
        assert (lse[:, start : start + n].double().cpu() - ref.cpu()).abs().max() < 1e-5
        start += n


# ------------------------------------------------------------------------------------------------ ROPE off
def _fwd_bwd(launch_fwd, launch_bwd, qkv, do):
    out, lse = launch_fwd(qkv)
    return out, lse, launch_bwd(do, qkv, out, lse)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_rope_off_is_todays_kernels(packed, generator, device):
    """``ROPE=False`` -- the launcher's ``rope=False``, which passes the tables' arguments and ROPE explicitly -- gives
    bit for bit what the registered ops compute with the kernels' defaults (no rotary arguments at all)."""
    from fastvit.kernels.rope_launch import rope_attention_bwd, rope_attention_fwd

    D, scale = 80, 0.15
    sin, cos = _tables(D, (3, 4), False, False)
    sin, cos = sin.to(device), cos.to(device)
    kw = dict(cu_seqlens=None, max_seqlen=None)
    if packed:
        qkv = randn((30, 3 * H * D), generator=generator, device=device, dtype=torch.bfloat16)
        do = randn((30, H * D), generator=generator, device=device, dtype=torch.bfloat16)
        cu = torch.tensor([0, 17, 30], dtype=torch.int32, device=device)
        kw = dict(cu_seqlens=cu, max_seqlen=17)
        ops = _fwd_bwd(
            lambda x: torch.ops.fastvit.attention_varlen_fwd(x, cu, 17, H, scale),
            lambda g, x, o, lse: torch.ops.fastvit.attention_varlen_bwd(g, x, cu, 17, o, lse, H, scale),
            qkv,
            do,
        )
    else:
        qkv = randn((2, 17, 3 * H * D), generator=generator, device=device, dtype=torch.bfloat16)
        do = randn((2, 17, H * D), generator=generator, device=device, dtype=torch.bfloat16)
        ops = _fwd_bwd(
            lambda x: torch.ops.fastvit.attention_fwd(x, H, scale),
            lambda g, x, o, lse: torch.ops.fastvit.attention_bwd(g, x, o, lse, H, scale),
            qkv,
            do,
        )
    launcher = _fwd_bwd(
        lambda x: rope_attention_fwd(x, H, sin, cos, 0, scale, rope=False, **kw),
        lambda g, x, o, lse: rope_attention_bwd(g, x, o, lse, H, sin, cos, 0, scale, rope=False, **kw),
        qkv,
        do,
    )
    for a, b in zip(ops, launcher):
        assert torch.equal(a, b)


@pytest.mark.parametrize("what", ["identity tables", "all prefix"])
def test_rope_without_rotation_is_bit_identical(what, generator, device):
    """``ROPE=True`` with nothing to rotate -- tables of sin 0 and cos 1, or every token a prefix token -- gives bit
    for bit the ``ROPE=False`` output, lse and dqkv (interleaved layout: its chunks keep the natural column order, so
    the dots sum in the same order; the half layout reorders the columns within a chunk)."""
    from fastvit.kernels.rope_launch import rope_attention_bwd, rope_attention_fwd

    D, N, scale = 64, 21, 0.125
    if what == "identity tables":
        sin, cos, npt = torch.zeros(N, D, device=device), torch.ones(N, D, device=device), 1
    else:
        sin, cos = (t.to(device) for t in _tables(D, (3, 4), False, False))
        npt = N
    qkv = randn((1, N, 3 * H * D), generator=generator, device=device, dtype=torch.float16)
    do = randn((1, N, H * D), generator=generator, device=device, dtype=torch.float16)
    runs = [
        _fwd_bwd(
            lambda x, r=rope: rope_attention_fwd(x, H, sin, cos, npt, scale, rotate_half=False, rope=r),
            lambda g, x, o, lse, r=rope: rope_attention_bwd(
                g, x, o, lse, H, sin, cos, npt, scale, rotate_half=False, rope=r
            ),
            qkv,
            do,
        )
        for rope in (False, True)
    ]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_rope_launcher_rejects_bad_tables(device):
    from fastvit.kernels.rope_launch import rope_attention_fwd

    qkv = torch.randn(1, 9, 3 * H * 64, device=device)
    sin = cos = torch.zeros(8, 64, device=device)
    with pytest.raises(ValueError, match="rows"):  # 9 tokens, 0 prefix: 9 rows needed
        rope_attention_fwd(qkv, H, sin, cos, 0, 0.125)
    rope_attention_fwd(qkv, H, sin, cos, 1, 0.125)  # 1 prefix token: 8 rows suffice
    with pytest.raises(ValueError, match="heads"):
        rope_attention_fwd(qkv, H, sin[None].expand(3, 8, 64), cos[None].expand(3, 8, 64), 1, 0.125)
    with pytest.raises(ValueError, match="even head dim"):
        odd = torch.randn(1, 9, 3 * H * 33, device=device)
        rope_attention_fwd(odd, H, torch.zeros(9, 33), torch.zeros(9, 33), 0, 0.125)


# ------------------------------------------------------------------------------------------------ sm_90 compile
#: Main-loop SASS instructions of the rotary kernels (sm_90, bf16, D = 64, N = 197, the first config each pruner keeps;
#: ``python -m fastvit.kernels.check --loops`` counts, Triton 3.8), by layout (rotate_half, interleaved). ROPE off:
#: 289 / 217 / 162 (check.LOOP_BOUNDS). The rotation is 4 FMUL/FFMA per pair and the bf16 <-> fp32 conversions around
#: it, on every streamed block (k in the forward and dQ, q in dK/dV).
ROPE_LOOP_BOUNDS = {
    "attn_fwd": (388, 426),
    "attn_bwd_dkdv": (262, 267),
    "attn_bwd_dq": (221, 229),
}

_COMPILE = """
import json, multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor
from fastvit.kernels import check as C
assert {"SIN", "COS"} <= C._FP32_POINTERS  # the rotary tables are fp32
work = []
for v in C.loop_variants(dims=(64,), seq_lens=(197,), kernels=list(sys.argv[2:])):
    for half in (True, False):
        cx = dict(v["constexprs"], ROPE=True, ROPE_HALF=half)
        work.append((dict(v, constexprs=cx, config=v["config"] + ("/half" if half else "/interleaved")), 90))
with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
    rows = list(pool.map(C._compile_one, work))
json.dump(rows, open(sys.argv[1], "w"))
"""


def test_rope_kernels_compile_for_sm90(tmp_path):
    """Compile-only: the ROPE=True forward, dK/dV and dQ kernels build for sm_90 at D = 64 in both layouts (the
    interpreter does not lower the reshape / split / join of the rotation to GPU layouts), with no register spills,
    an MMA main loop, and that loop within its recorded bound (:data:`ROPE_LOOP_BOUNDS`; +10 % on another Triton)."""
    import triton

    from fastvit.kernels.check import LOOP_BOUNDS_TRITON

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rope.json"
    kernels = sorted(ROPE_LOOP_BOUNDS)
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(out), *kernels], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(out.read_text())
    exact = triton.__version__.startswith(LOOP_BOUNDS_TRITON + ".")
    assert len(rows) == 2 * len(kernels)
    for r in rows:
        assert r["ok"], (r["kernel"], r["config"], r["error"])
        assert r["spills"] == 0, (r["kernel"], r["config"], r["spills"])
        loop = r["loop"]
        assert loop["mma"] > 0 and loop["total"] > loop["mma"]
        bound = ROPE_LOOP_BOUNDS[r["kernel"]][0 if r["config"].endswith("/half") else 1]
        assert loop["total"] <= (bound if exact else int(bound * 1.1)), (r["kernel"], r["config"], loop, bound)
