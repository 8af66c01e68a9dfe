"""The SASS loop report (``python -m fastvit.kernels.check --loops``): its parts, and the bounds it keeps.

* :mod:`fastvit.kernels.sass` on hand-written SASS (no compiler): loop finding, the instruction classes, occupancy;
* the reference kernel (:mod:`fastvit.kernels.flash_reference`) against float64 math in the interpreter, so the
  yardstick the report compares against computes attention, with and without a key tail;
* compile-only (no GPU): the attention kernels' main loops on sm_90 at D = 64, N = 197 and 1024, each within its
  recorded bound (:data:`fastvit.kernels.check.LOOP_BOUNDS`) -- one subprocess, eight compiles.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastvit.kernels import sass  # noqa: E402  (no triton import at module level)

# A made-up kernel: a setup block, an outer loop holding an inner MMA loop (the main loop) and a peeled block after.
_SASS = """
        .text.k:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ULDC UR4, c[0x0][0x210] ;
.L_x_0:
        /*0020*/                   IADD3 R1, R1, 0x1, RZ ;
.L_x_1:
        /*0030*/                   DEPBAR.LE SB0, 0x1 ;
        /*0040*/                   WARPGROUP.ARRIVE ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ;
        /*0060*/                   FMNMX R2, R24, R25, !PT ;
        /*0070*/                   FFMA R3, R24, R4, -R2 ;
        /*0080*/                   MUFU.EX2 R3, R3 ;
        /*0090*/                   MUFU.RCP R5, R5 ;
        /*00a0*/                   FSEL R6, R3, RZ, P0 ;
        /*00b0*/                   F2FP.BF16.F32.PACK_AB R7, R3, R6 ;
        /*00c0*/                   UIADD3 UR4, UR4, 0x40, URZ ;
        /*00d0*/              @!PT LDS RZ, [RZ] ;
        /*00e0*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR6][R10.64], P1 ;
        /*00f0*/                   ISETP.GE.AND P0, PT, R1, UR4, PT ;
        /*0100*/              @!P0 BRA `(.L_x_1) ;
        /*0110*/                   SHFL.BFLY PT, R8, R2, 0x1, 0x1f ;
        /*0120*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24 ;
        /*0130*/              @P2 BRA `(.L_x_0) ;
        /*0140*/                   EXIT ;
.L_x_2:
        /*0150*/                   BRA `(.L_x_2);
"""


def test_sass_finds_the_innermost_mma_loop_and_classifies_it():
    instrs = sass.parse(_SASS)
    assert [i.addr for i in instrs][:3] == [0, 0x10, 0x20] and len(instrs) == 22
    # three back edges: the inner loop, the outer loop, and the self-loop after EXIT (no MMA)
    assert sorted(sass.loops(instrs)) == [(2, 19), (3, 16), (21, 21)]
    first, last = sass.main_loop(instrs)
    assert (instrs[first].addr, instrs[last].addr) == (0x30, 0x100)
    mix = sass.mix(instrs[first : last + 1])
    expected = dict(mma=1, ex2=1, mufu=1, fmnmx=1, ffma=1, fsel=1, cvt=1, uint=1, int=1, mem=2, sync=3, total=14)
    assert {k: v for k, v in mix.items() if v} == expected
    assert sass.classify("IMAD.MOV.U32") == "int" and sass.classify("HMMA.16816.F32.BF16") == "mma"
    assert sass.classify("BAR.SYNC.DEFER_BLOCKING") == "sync" and sass.classify("LDS", "@!PT") == "sync"


def test_sass_main_loop_without_tensor_cores():
    """fp32 with IEEE dots has no MMA: the loop with the exp2 is the main loop; with neither, there is none."""
    text = "\n".join(line for line in _SASS.splitlines() if "HGMMA" not in line)
    instrs = sass.parse(text)
    first, last = sass.main_loop(instrs)
    assert (instrs[first].addr, instrs[last].addr) == (0x30, 0x100)
    text = "\n".join(line for line in text.splitlines() if "MUFU.EX2" not in line)
    assert sass.main_loop(sass.parse(text)) is None


@pytest.mark.parametrize(
    "arch,regs,shared,warps,ctas",
    [
        (90, 128, 65536, 8, 2),  # 128 x 32 x 8 = 32768 registers per CTA: two fill the 65536
        (90, 129, 65536, 8, 1),  # 136 (allocated in 8s) x 256 threads: one CTA
        (
            90,
            96,
            65536,
            8,
            2,
        ),  # registers would allow 2 (21 warps), so would shared memory (3): threads cap at 2048 / 256
        (90, 64, 114688, 4, 2),  # shared memory: 233472 // (114688 + 1024) = 2
        (80, 64, 98304, 4, 1),  # sm_80: 167936 // 99328 = 1
        (90, 32, 0, 1, 32),  # the 32-CTA limit
    ],
)
def test_occupancy(arch, regs, shared, warps, ctas):
    assert sass.occupancy(arch, regs, shared, warps) == ctas


def _interpret_kernels() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check; on a GPU the compiled kernels are timed")
@pytest.mark.parametrize("n_kv", [48, 37])
def test_reference_kernel_computes_attention(n_kv, generator):
    """The yardstick is a correct FlashAttention-2 forward (else comparing loop counts with it would mean nothing):
    output and log-sum-exp against float64, with only full key blocks (48) and with a masked tail block (37)."""
    if not _interpret_kernels():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)")
    from fastvit.kernels import flash_reference as R

    B, H, n_q, D, scale = 2, 2, 21, 32, 0.3
    q, k, v = (
        torch.randn(B, H, n, D, generator=generator).to(torch.float16) for n in (n_q, n_kv, n_kv)
    )  # fmt: skip
    o = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, n_q), float("nan"))
    grid = (math.ceil(n_q / 16), H, B)
    R.flash2_fwd[grid](
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, n_q, n_kv, D, scale * 1.4426950408889634, BLOCK_M=16, BLOCK_N=16, BLOCK_D=D,
    )  # fmt: skip
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    ref = torch.softmax(s, dim=-1) @ v.double()
    assert (o.double() - ref).abs().max() < 2e-3  # P rounded to fp16 for the PV product, as on the tensor cores
    assert (lse.double() - torch.logsumexp(s, dim=-1)).abs().max() < 1e-5


def test_attention_loops_within_recorded_bounds(tmp_path):
    """Compile-only: fastvit's attention forward, dK/dV and dQ kernels and the reference, sm_90, bf16, D = 64, at
    N = 197 and N = 1024, the first config each pruner keeps; each main loop at or under its recorded bound (on the
    Triton the bounds were recorded with; elsewhere, under the bound plus 10 %, as compilers drift), and the forward
    loop at or under the reference's, with no masking selects and as many CTAs per SM."""
    from fastvit.kernels.check import LOOP_BOUNDS

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "loops.json"
    cmd = [sys.executable, "-m", "fastvit.kernels.check", "--loops", "--head-dims", "64", "--seq-lens", "197", "1024"]
    cmd += ["--kernels", "attn_fwd", "flash2_reference", "attn_bwd_dkdv", "attn_bwd_dq", "--json", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    data = json.loads(out.read_text())
    rows = data["rows"]
    import triton

    exact = triton.__version__.startswith(data["loop_bounds_triton"] + ".")
    assert {r["kernel"] for r in rows} == {"attn_fwd", "flash2_reference", "attn_bwd_dkdv", "attn_bwd_dq"}
    assert len(rows) == 8 and all(r["ok"] for r in rows), res.stdout[-4000:]
    checked = 0
    for r in rows:
        loop = r["loop"]
        assert loop["mma"] > 0 and loop["total"] > loop["mma"]
        bound = LOOP_BOUNDS.get((r["kernel"], r["dim"], r["seq_len"], r["arch"]))
        if bound is not None:
            assert loop["total"] <= (bound if exact else int(bound * 1.1)), (r["kernel"], r["seq_len"], loop, bound)
            checked += 1
    assert checked == 6
    # the target: fastvit's forward loop no longer than the reference's at the same config (on the recorded
    # Triton; another compiles both a little differently -- Triton 3.6 gives 286 against 283 at N = 197 -- so there
    # within 3 %)
    for n in (197, 1024):
        (fwd,) = [r for r in rows if r["kernel"] == "attn_fwd" and r["seq_len"] == n]
        (ref,) = [r for r in rows if r["kernel"] == "flash2_reference" and r["seq_len"] == n]
        assert fwd["config"] == ref["config"]
        limit = ref["loop"]["total"] if exact else int(ref["loop"]["total"] * 1.03)
        assert fwd["loop"]["total"] <= limit, (n, fwd["loop"], ref["loop"])
        assert fwd["loop"]["fsel"] == 0 and fwd["ctas_per_sm"] >= ref["ctas_per_sm"]
    assert res.returncode == (0 if exact else res.returncode), res.stdout[-4000:]
