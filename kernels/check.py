"""Compile every fastvit Triton kernel for real GPUs without a GPU, and report resources.

Usage::

    python -m fastvit.kernels.check [--arch 80 90] [--json PATH] [--jobs N] [--kernels NAME ...]
    python -m fastvit.kernels.check --loops [--arch 90] [--head-dims 64 80] [--seq-lens 197 1024] [--dtype bf16]
                                    [--all-configs] [--json PATH]

For each target architecture (sm_80 = A100, sm_90 = H100) this builds PTX and cubin with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reports, per compiled variant, the
shared memory Triton allocates (``metadata.shared``) and the registers / spill bytes that Triton's bundled
``ptxas -v`` reports for the PTX. It exits non-zero when a variant fails to compile, when its shared memory
exceeds the per-block limit of the target (sm_80: 166912 B, sm_90: 232448 B), or when a kernel never compiled.
For the attention forward, dK/dV and dQ kernels it also disassembles the cubin and reports the SASS instruction count
of the main loop (``loop``) and the CTAs per SM the resources allow (:mod:`fastvit.kernels.sass`).

``--loops`` prints instead the loop report: each attention kernel's main-loop instruction mix at given head dims and
token counts, beside a reference FlashAttention-2 forward (:mod:`fastvit.kernels.flash_reference`) compiled at the same
config, and fails when a loop exceeds its recorded bound (:data:`LOOP_BOUNDS`). How to read it:
``benchmarks/README.md``, "Static loop report".

Coverage (one compile per line below and per architecture; the full dtype × head-dim × config product would
take far too long on a CI runner with two cores):

* attention forward, dK/dV and dQ: **every autotune config once**, at the widest operands the kernel's pruner
  lets that config see -- the first of fp32 / D = 128 (tf32), fp16 / D = 128, fp32 / D = 64, fp16 / D = 64,
  fp16 / D = 32 that the pruner keeps it for (bf16 has fp16's footprint). Shared memory and register pressure
  grow with element size and BLOCK_D, so this is the worst case each config can meet at run time.
* other dtypes / head dims, on the first config the pruner keeps for N = 197: forward bf16 D = 80 and fp32
  D = 128 with IEEE dots, dK/dV fp16 D = 72 and fp32 D = 128 IEEE, dQ fp32 D = 104 IEEE -- the non-power-of-two
  masks, bf16, and fp32 without TF32 (PyTorch's default precision, which only the smallest tiles serve).
* attention preprocess (delta): fp32 D = 128 and bf16 D = 80.
* packed variable-length attention (``VARLEN=True``, rows ``*_varlen``; the same kernels with the sequence offsets
  read from ``CU_SEQLENS``, an early exit and per-sequence loop bounds): forward, dK/dV and dQ on every autotune
  config at the same widest operands as the dense rows, preprocess bf16 D = 80.
* LayerNorm forward and backward: BLOCK_C = 256, 1024, 2048 and 8192 (C = 192/200, 768, 1536/1664, MAX_C) in
  fp32 with every optional input present, plus fp16 and bf16 at BLOCK_C = 1024.

TRITON_INTERPRET=1 must not be set while compiling (kernels decorated under it are interpreted functions), so
when it is set, or when the kernel modules were already imported under it, the check re-runs itself in a
subprocess without it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from fastvit.kernels import sass

#: Shared memory per block (opt-in maximum) by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_DT = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_ESIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def _needs_subprocess() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return any(
        m in sys.modules
        for m in (
            "fastvit.kernels.attention",
            "fastvit.kernels.layer_norm",
            "fastvit.kernels.linear",
            "fastvit.kernels.mae",
            "fastvit.kernels.patch_embed",
        )
    ) and ("triton.runtime.interpreter" in sys.modules)


# --------------------------------------------------------------------------------------------- variants
class _Fake:
    """Stands in for a tensor argument where the autotune pruners only look at ``element_size()``."""

    def __init__(self, size: int):
        self.size = size

    def element_size(self) -> int:
        return self.size


def _attn_constexprs(cfg, D: int, prec: str, varlen: bool) -> dict:
    """The constexprs an attention kernel compiles with at autotune config ``cfg``, head dim ``D``."""
    from fastvit.kernels import attention as A

    return dict(
        HEAD_DIM=D,
        BLOCK_M=cfg.kwargs["BLOCK_M"],
        BLOCK_N=cfg.kwargs["BLOCK_N"],
        BLOCK_D=A.block_d(D),
        INPUT_PRECISION=prec,
        VARLEN=varlen,
    )


def _variants() -> list[dict]:
    """The list of compiles: dicts with kernel, config label, dtype, head dim / C, constexprs, warps, stages."""
    from fastvit.kernels import attention as A
    from fastvit.kernels import layer_norm as L

    out: list[dict] = []

    def attn(kernel, cfg, dtype, D, prec, label, varlen=False):
        out.append(
            dict(
                family="attention",
                kernel=kernel + ("_varlen" if varlen else ""),
                config=label,
                dtype=dtype,
                dim=D,
                constexprs=_attn_constexprs(cfg, D, prec, varlen),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        )

    sweep = {
        "attn_fwd": [("bf16", 80, "ieee"), ("fp32", 128, "ieee")],
        "attn_bwd_dkdv": [("fp16", 72, "ieee"), ("fp32", 128, "ieee")],
        "attn_bwd_dq": [("fp32", 104, "ieee")],
    }
    for kernel, configs, prune in (
        ("attn_fwd", A.FWD_CONFIGS, A.prune_fwd),
        ("attn_bwd_dkdv", A.BWD_DKDV_CONFIGS, A.prune_dkdv),
        ("attn_bwd_dq", A.BWD_DQ_CONFIGS, A.prune_dq),
    ):
        for cfg in configs:
            # the widest operands the pruner lets this config see (element size x head dim)
            for dtype, D in (("fp32", 128), ("fp16", 128), ("fp32", 64), ("fp16", 64), ("fp16", 32)):
                nargs = dict(Q=_Fake(_ESIZE[dtype]), N_Q=4097, N_KV=4097, HEAD_DIM=D)
                if any(c is cfg for c in prune(configs, nargs, INPUT_PRECISION="tf32")):
                    for varlen in (False, True):
                        attn(kernel, cfg, dtype, D, "tf32" if dtype == "fp32" else "ieee", _label(cfg), varlen)
                    break
            else:
                raise AssertionError(f"{kernel} config {_label(cfg)} is never selected by its pruner")
        for dtype, D, prec in sweep[kernel]:  # on the first config the pruner keeps for it at N = 197
            nargs = dict(Q=_Fake(_ESIZE[dtype]), N_Q=197, N_KV=197, HEAD_DIM=D)
            cfg = prune(configs, nargs, INPUT_PRECISION=prec)[0]
            attn(kernel, cfg, dtype, D, prec, _label(cfg))
    for dtype, D, varlen in (("fp32", 128, False), ("bf16", 80, False), ("bf16", 80, True)):
        out.append(
            dict(
                family="attention",
                kernel="attn_bwd_preprocess" + ("_varlen" if varlen else ""),
                config=f"BM{A.PREPROCESS_BLOCK_M}/w4/s3",
                dtype=dtype,
                dim=D,
                constexprs=dict(HEAD_DIM=D, BLOCK_M=A.PREPROCESS_BLOCK_M, BLOCK_D=A.block_d(D), VARLEN=varlen),
                num_warps=4,
                num_stages=3,
            )
        )
    ln_sizes = [("fp32", 192), ("fp32", 768), ("fp32", 1664), ("fp32", L.MAX_C), ("fp16", 768), ("bf16", 768)]
    ln_flags = {
        "ln_fwd": dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True),
        "ln_bwd": dict(HAS_DH_IN=True, HAS_WEIGHT=True, COMPUTE_DW=True, COMPUTE_DB=True),
        # RMSNorm: the same kernels with RMS=True (no bias, no dbias)
        "rms_fwd": dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=False, RMS=True),
        "rms_bwd": dict(HAS_DH_IN=True, HAS_WEIGHT=True, COMPUTE_DW=True, COMPUTE_DB=False, RMS=True),
    }
    for kernel, flags in ln_flags.items():
        for dtype, C in ln_sizes:
            out.append(
                dict(
                    family="layer_norm",
                    kernel=kernel,
                    config=f"BC{L.block_c(C)}/w{L.num_warps_for(C)}",
                    dtype=dtype,
                    dim=C,
                    constexprs=dict(flags, BLOCK_C=L.block_c(C)),
                    num_warps=L.num_warps_for(C),
                    num_stages=1,
                )
            )
    from fastvit.kernels import linear as LIN

    out.extend(LIN.check_variants())
    out.extend(_mae_variants())
    out.extend(_patch_embed_variants())
    return out


def _mae_variants() -> list[dict]:
    from fastvit.kernels import mae as MAE

    out = []
    for cfg in MAE.UNSHUFFLE_CONFIGS:
        for dtype, C in (("bf16", 512), ("fp32", 200)):
            out.append(
                dict(
                    family="mae",
                    kernel="mae_unshuffle_fwd",
                    config=f"BT{cfg.kwargs['BLOCK_T']}/w{cfg.num_warps}",
                    dtype=dtype,
                    dim=C,
                    constexprs=dict(HAS_POS=True, BLOCK_C=MAE.block_c(C), BLOCK_T=cfg.kwargs["BLOCK_T"]),
                    num_warps=cfg.num_warps,
                    num_stages=1,
                )
            )
    for kernel, bt in (("mae_unshuffle_bwd", MAE.BWD_BLOCK_T), ("mae_sum_over_batch", MAE.SUM_BLOCK_T)):
        for dtype in ("bf16", "fp32"):
            out.append(
                dict(
                    family="mae",
                    kernel=kernel,
                    config=f"BT{bt}/w4",
                    dtype=dtype,
                    dim=512,
                    constexprs=dict(BLOCK_C=MAE.block_c(512), BLOCK_T=bt),
                    num_warps=4,
                    num_stages=1,
                )
            )
    for kernel in ("mae_loss_fwd", "mae_loss_bwd"):
        flags = dict(NORM_PIX=True) if kernel == "mae_loss_fwd" else dict(NORM_PIX=True, COMPUTE_DIMG=True)
        for dtype, K in (("fp32", 768), ("bf16", 768), ("fp16", 588), ("fp32", MAE.MAX_ROW)):
            out.append(
                dict(
                    family="mae",
                    kernel=kernel,
                    config=f"BK{MAE.block_row(K)}/w{MAE.loss_num_warps(K)}",
                    dtype=dtype,
                    dim=K,
                    constexprs=dict(flags, BLOCK_K=MAE.block_row(K)),
                    num_warps=MAE.loss_num_warps(K),
                    num_stages=1,
                )
            )
    return out


def _patch_embed_variants() -> list[dict]:
    from fastvit.kernels import patch_embed as PE

    out = []
    flags_of = {
        "pe_fwd": dict(HAS_BIAS=True, HAS_IDS=True, HAS_POS=True),
        "pe_dw": dict(HAS_IDS=True),
        "pe_dimg": dict(HAS_IDS=True),
    }
    smallest = min(PE.GEMM_CONFIGS, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    fp32_tf32 = PE._prune(
        PE.GEMM_CONFIGS,
        dict(Img=_Fake(4), DImg=_Fake(4), DOut=_Fake(4), m_rows=4096, n_cols=768),
        INPUT_PRECISION="tf32",
    )
    variants = [(cfg, dtype, "ieee") for cfg in PE.GEMM_CONFIGS for dtype in ("fp16", "bf16")]
    variants += [(cfg, "fp32", "tf32") for cfg in fp32_tf32] + [(smallest, "fp32", "ieee")]
    for kernel, flags in flags_of.items():
        for cfg, dtype, prec in variants:
            k = cfg.kwargs
            out.append(
                dict(
                    family="patch_embed",
                    kernel=kernel,
                    config=f"BM{k['BLOCK_M']}/BN{k['BLOCK_N']}/BK{k['BLOCK_K']}/w{cfg.num_warps}/s{cfg.num_stages}",
                    dtype=dtype,
                    dim=768,
                    constexprs=dict(flags, INPUT_PRECISION=prec, **k),
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                )
            )
    out.append(
        dict(
            family="patch_embed",
            kernel="pe_prefix_rows",
            config=f"BE{PE.block_e(768)}/w4",
            dtype="bf16",
            dim=768,
            constexprs=dict(HAS_POS=True, BLOCK_E=PE.block_e(768)),
            num_warps=4,
            num_stages=1,
        )
    )
    out.append(
        dict(
            family="patch_embed",
            kernel="pe_batch_sum",
            config=f"BE{PE.block_e(768)}/BT{PE.SUM_BLOCK_T}/w4",
            dtype="bf16",
            dim=768,
            constexprs=dict(HAS_INV=True, BLOCK_E=PE.block_e(768), BLOCK_T=PE.SUM_BLOCK_T),
            num_warps=4,
            num_stages=1,
        )
    )
    return out


def _label(cfg) -> str:
    return f"BM{cfg.kwargs['BLOCK_M']}/BN{cfg.kwargs['BLOCK_N']}/w{cfg.num_warps}/s{cfg.num_stages}"


def _kernel_fn(name: str):
    from fastvit.kernels import attention as A
    from fastvit.kernels import flash_reference as REF
    from fastvit.kernels import layer_norm as L
    from fastvit.kernels import linear as LIN
    from fastvit.kernels import mae as MAE
    from fastvit.kernels import patch_embed as PE

    return {
        "mae_unshuffle_fwd": MAE.unshuffle_fwd_kernel,
        "mae_unshuffle_bwd": MAE._unshuffle_bwd,
        "mae_sum_over_batch": MAE._sum_over_batch,
        "mae_loss_fwd": MAE._mae_loss_fwd,
        "mae_loss_bwd": MAE._mae_loss_bwd,
        "pe_fwd": PE.pe_fwd_kernel,
        "pe_dw": PE.pe_dw_kernel,
        "pe_dimg": PE.pe_dimg_kernel,
        "pe_prefix_rows": PE._prefix_rows,
        "pe_batch_sum": PE._batch_sum,
        "linear_fwd": LIN.gemm_kernel,
        "linear_dgrad": LIN.gemm_kernel,
        "linear_wgrad": LIN.gemm_kernel,
        "glu_fwd": LIN.glu_kernel,
        "glu_dgrad": LIN.glu_kernel,
        "glu_wgrad": LIN.glu_kernel,
        "attn_fwd": A.attn_fwd_kernel,
        "attn_bwd_dkdv": A.attn_bwd_dkdv_kernel,
        "attn_bwd_dq": A.attn_bwd_dq_kernel,
        "attn_bwd_preprocess": A.attn_bwd_preprocess,
        "attn_fwd_varlen": A.attn_fwd_kernel,
        "attn_bwd_dkdv_varlen": A.attn_bwd_dkdv_kernel,
        "attn_bwd_dq_varlen": A.attn_bwd_dq_kernel,
        "attn_bwd_preprocess_varlen": A.attn_bwd_preprocess,
        "flash2_reference": REF.flash2_fwd,
        "ln_fwd": L._ln_fwd_kernel,
        "ln_bwd": L._ln_bwd_kernel,
        "rms_fwd": L._ln_fwd_kernel,
        "rms_bwd": L._ln_bwd_kernel,
    }[name]


#: Pointer arguments that are always fp32 (statistics, partial sums, the attention kernels' rotary tables).
_FP32_POINTERS = {
    "LSE",
    "Delta",
    "Mean",
    "Rstd",
    "DWp",
    "DBp",
    "RowSum",
    "DMaskP",
    "Loss",
    "DRow",
    "Sum",
    "RowSum1",
    "RowSum2",
    "SIN",
    "COS",
}
_I64_POINTERS = {"Ids", "Inv"}
_I32_POINTERS = {"CU_SEQLENS"}
_FLOAT_SCALARS = {"qk_scale", "sm_scale", "eps"}


#: Upper-case kernel arguments that are sizes, not pointers. In the GEMM kernels M, N, K are the problem sizes;
#: in the attention kernels K is the key pointer.
_INT_ARGS = ("H", "M", "C", "N_Q", "N_KV", "ROWS_PER_PROGRAM")


def _int_args(variant: dict) -> tuple[str, ...]:
    return _INT_ARGS + (("N", "K") if variant["family"] == "linear" else ())


def _signature(fn, variant: dict) -> tuple[dict, dict]:
    """Triton signature and divisibility attributes as a launch on well-aligned ViT tensors would specialise:
    pointers and row / token strides divisible by 16 (C = 768, 3C = 2304), sizes unconstrained -- except the token
    counts of a variant with ``seq_len`` set (the loop report), which Triton's launcher specialises as divisible by 16
    when they are (N = 1024, not N = 197)."""
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name[0].isupper() and name not in _int_args(variant):
            sig[name] = (
                "*fp32"
                if name in _FP32_POINTERS
                else "*i64"
                if name in _I64_POINTERS
                else "*i32"
                if name in _I32_POINTERS
                else _DT[variant["dtype"]]
            )
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_") or (name in ("N_Q", "N_KV") and (variant.get("seq_len") or 1) % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


# --------------------------------------------------------------------------------------------- compile
def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (3.9 uses a newer one, "ptxas-blackwell", for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:
        pass
    try:
        import triton

        return triton.knobs.nvidia.ptxas.path  # Triton >= 3.4
    except Exception:
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_resources(ptx: str, cc: int) -> tuple[int | None, int | None]:
    m = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    arch = m.group(1) if m else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [_ptxas(cc), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
        )
    return _parse_ptxas(res.stdout + res.stderr)


def _parse_ptxas(text: str) -> tuple[int | None, int | None]:
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    n_spill = sum(int(a) + int(b) for a, b in spills) if spills else None
    return (int(regs.group(1)) if regs else None), n_spill


def _compile_one(job: tuple[dict, int]) -> dict:
    variant, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_fn(variant["kernel"])
    row = {k: variant[k] for k in ("family", "kernel", "config", "dtype", "dim")}
    row.update(arch=arch, shared=None, registers=None, spills=None, error=None)
    if "seq_len" in variant:
        row["seq_len"] = variant["seq_len"]
        row["first"] = variant.get("first", True)
    t0 = time.perf_counter()
    try:
        sig, attrs = _signature(fn, variant)
        constexprs = {k: v for k, v in variant["constexprs"].items() if k in fn.arg_names}
        src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        try:  # Triton runs `ptxas -v` itself; have it print the log (Triton >= 3.4) instead of running it twice
            triton.knobs.nvidia.dump_ptxas_log = True
        except Exception:
            pass
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": variant["num_warps"], "num_stages": variant["num_stages"]},
            )
        row["shared"] = int(compiled.metadata.shared)
        row["registers"], row["spills"] = _parse_ptxas(log.getvalue())
        if row["registers"] is None:  # cached compile or older Triton: no log, run ptxas on the PTX
            row["registers"], row["spills"] = _ptxas_resources(compiled.asm["ptx"], arch)
        if variant["kernel"] in LOOP_KERNELS:
            row["ctas_per_sm"] = sass.occupancy(arch, row["registers"], row["shared"], variant["num_warps"])
            try:
                row["loop"] = sass.loop_report(compiled.asm["cubin"])
            except Exception as exc:  # no nvdisasm: the resources still count
                row["loop"] = None
                row["loop_error"] = f"{type(exc).__name__}: {exc}"[:200]
    except Exception as exc:  # report every failure, keep going
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    limit = SHARED_LIMIT.get(arch)
    row["ok"] = row["error"] is None and (limit is None or row["shared"] <= limit)
    if row["ok"] and variant["kernel"] in LOOP_KERNELS and "loop" in row and not row["loop"]:
        row["ok"] = False  # an attention kernel always has an MMA main loop: not finding it is a bug here
        row["error"] = row.get("loop_error") or "no main loop found in the SASS"
    return row


def run(archs: list[int], jobs: int = 2, kernels: list[str] | None = None) -> list[dict]:
    """Compile every variant (of ``kernels`` only, when given) for every arch; returns one row per compile (see the
    module docstring)."""
    work = [(v, a) for a in archs for v in _variants() if kernels is None or v["kernel"] in kernels]
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, work))


def _table(rows: list[dict]) -> str:
    head = (
        f"{'kernel':<20} {'config':<18} {'dtype':<5} {'D/C':>5} {'arch':>5} {'shared B':>9} {'regs':>5} "
        f"{'spills':>6} {'loop':>5} {'CTA/SM':>6}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        status = "ok" if r["ok"] else (r["error"] or f"shared > {SHARED_LIMIT.get(r['arch'])}")
        loop = (r.get("loop") or {}).get("total")
        lines.append(
            f"{r['kernel']:<20} {r['config']:<18} {r['dtype']:<5} {r['dim']:>5} sm{r['arch']:<3} "
            f"{r['shared'] if r['shared'] is not None else '-':>9} {r['registers'] if r['registers'] is not None else '-':>5} "
            f"{r['spills'] if r['spills'] is not None else '-':>6} {loop if loop is not None else '':>5} "
            f"{r.get('ctas_per_sm', ''):>6}  {status}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- loop report
#: Kernels whose compiles get the SASS main-loop analysis (:mod:`fastvit.kernels.sass`): instruction mix of the main
#: loop and CTAs per SM. ``flash2_reference`` is the yardstick (:mod:`fastvit.kernels.flash_reference`).
LOOP_KERNELS = (
    "attn_fwd",
    "attn_bwd_dkdv",
    "attn_bwd_dq",
    "attn_fwd_varlen",
    "attn_bwd_dkdv_varlen",
    "attn_bwd_dq_varlen",
    "flash2_reference",
)

#: Recorded main-loop instruction counts (SASS, sm_90, bf16, the first config the pruner keeps at that N) -- the
#: bounds ``--loops`` enforces and tests/test_kernels_loops.py asserts. Recorded with Triton 3.8 (``LOOP_BOUNDS_TRITON``);
#: another Triton compiles other code, so there they are reported, not enforced (the tests then check fastvit's forward
#: against the reference compiled by the same Triton instead). Lower a bound when a change makes a loop leaner.
LOOP_BOUNDS_TRITON = "3.8"
LOOP_BOUNDS = {
    # (kernel, D, N, arch): instructions
    ("attn_fwd", 64, 197, 90): 289,  # before the lean loops: 391
    ("attn_fwd", 64, 1024, 90): 289,  # 367
    ("attn_fwd_varlen", 64, 197, 90): 289,  # 391
    ("attn_bwd_dkdv", 64, 197, 90): 217,  # 243
    ("attn_bwd_dkdv", 64, 1024, 90): 217,  # 231
    ("attn_bwd_dq", 64, 197, 90): 162,  # 195
    ("attn_bwd_dq", 64, 1024, 90): 162,  # 183
    # D = 80 in head-dim chunks (64 + 16) instead of a 128-wide tile
    ("attn_fwd", 80, 197, 90): 339,  # 466 (padded to 128)
    ("attn_fwd", 80, 1024, 90): 335,  # 442
    ("attn_bwd_dkdv", 80, 197, 90): 260,  # 497 (then at BM64/BN64/w8/s2)
    ("attn_bwd_dq", 80, 197, 90): 218,  # 252
}


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def loop_variants(
    dims=(64, 80),
    seq_lens=(197, 1024),
    dtype: str = "bf16",
    all_configs: bool = False,
    kernels=None,
) -> list[dict]:
    """Compiles of the loop report: each attention kernel (dense and packed) at each head dim and token count, on the
    first config its pruner keeps there (every kept config with ``all_configs``); for ``attn_fwd`` at a power-of-two
    head dim, also the reference kernel at the same config. ``seq_len`` in a variant only decides whether the token
    counts are specialised as divisible by 16 (the rest of the code does not depend on N)."""
    from fastvit.kernels import attention as A

    prec = "tf32" if dtype == "fp32" else "ieee"
    out = []
    for base, configs, prune in (
        ("attn_fwd", A.FWD_CONFIGS, A.prune_fwd),
        ("attn_bwd_dkdv", A.BWD_DKDV_CONFIGS, A.prune_dkdv),
        ("attn_bwd_dq", A.BWD_DQ_CONFIGS, A.prune_dq),
    ):
        for varlen in (False, True):
            kernel = base + ("_varlen" if varlen else "")
            if kernels is not None and kernel not in kernels:
                continue
            for D in dims:
                for n in seq_lens:
                    nargs = dict(Q=_Fake(_ESIZE[dtype]), N_Q=n, N_KV=n, HEAD_DIM=D)
                    kept = prune(configs, nargs, INPUT_PRECISION=prec)
                    for i, cfg in enumerate(kept if all_configs else kept[:1]):
                        constexprs = _attn_constexprs(cfg, D, prec, varlen)
                        common = dict(
                            family="attention", config=_label(cfg), dtype=dtype, dim=D, seq_len=n, first=i == 0
                        )
                        common.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                        out.append(dict(common, kernel=kernel, constexprs=constexprs))
                        if kernel == "attn_fwd" and _pow2(D) and (kernels is None or "flash2_reference" in kernels):
                            out.append(dict(common, kernel="flash2_reference", constexprs=constexprs))
    return out


def run_loops(archs, jobs=2, **kwargs) -> list[dict]:
    """Compile :func:`loop_variants` for every arch; rows as :func:`run`'s, with ``loop`` and ``ctas_per_sm``."""
    work = [(v, a) for a in archs for v in loop_variants(**kwargs)]
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, work))


def _bounds_enforced() -> bool:
    import triton

    return triton.__version__.startswith(LOOP_BOUNDS_TRITON + ".") or triton.__version__ == LOOP_BOUNDS_TRITON


def loop_bound(row: dict) -> int | None:
    """The recorded bound of a loop-report row (:data:`LOOP_BOUNDS`: the first config the pruner keeps), or None."""
    if row.get("dtype") != "bf16" or not row.get("first", True):
        return None
    return LOOP_BOUNDS.get((row["kernel"], row["dim"], row.get("seq_len"), row["arch"]))


def reference_of(row: dict, rows: list[dict]) -> dict | None:
    """The reference-kernel row compiled at the same config, dtype, D, N and arch as an ``attn_fwd`` row."""
    for r in rows:
        if r["kernel"] == "flash2_reference" and all(
            r.get(k) == row.get(k) for k in ("config", "dtype", "dim", "seq_len", "arch")
        ):
            return r
    return None


_LOOP_COLS = ("mma", "ex2", "fmul", "ffma", "fadd", "fmnmx", "fsel", "cvt", "int", "uint", "mem", "shfl", "sync")


def _loop_table(rows: list[dict]) -> str:
    head = (
        f"{'kernel':<21} {'config':<17} {'D':>3} {'N':>5} {'arch':>4} {'loop':>5} "
        + " ".join(f"{c:>5}" for c in _LOOP_COLS)
        + f" {'other':>5} {'regs':>4} {'shared':>6} {'CTA/SM':>6} {'bound':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lp = r.get("loop") or {}
        bound = loop_bound(r)
        name = "  reference" if r["kernel"] == "flash2_reference" else r["kernel"]
        cells = " ".join(f"{lp.get(c, '-'):>5}" for c in _LOOP_COLS)
        lines.append(
            f"{name:<21} {r['config']:<17} {r['dim']:>3} {r.get('seq_len') or '-':>5} sm{r['arch']:<2} "
            f"{lp.get('total', '-'):>5} {cells} {lp.get('other', '-'):>5} {r['registers'] or '-':>4} "
            f"{r['shared'] if r['shared'] is not None else '-':>6} {r.get('ctas_per_sm', '-'):>6} "
            f"{bound if bound is not None else '':>5}" + ("" if r["ok"] else f"  {r['error']}")
        )
    return "\n".join(lines)


def loop_verdicts(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(lines to print, failures): each fastvit forward loop against the reference at the same config, each loop
    against its recorded bound (failures only where the bounds are enforced, :data:`LOOP_BOUNDS_TRITON`)."""
    lines, failures = [], []
    enforced = _bounds_enforced()
    for r in rows:
        total = (r.get("loop") or {}).get("total")
        if total is None:
            continue
        where = f"{r['kernel']} {r['config']} {r['dtype']} D={r['dim']} N={r.get('seq_len')} sm_{r['arch']}"
        ref = reference_of(r, rows) if r["kernel"] == "attn_fwd" else None
        if ref is not None and (ref.get("loop") or {}).get("total") is not None:
            rt = ref["loop"]["total"]
            lines.append(f"{where}: main loop {total} instructions, reference {rt} ({total - rt:+d})")
        bound = loop_bound(r)
        if bound is not None and total > bound:
            msg = f"{where}: main loop {total} instructions > recorded bound {bound}"
            lines.append(("OVER BOUND: " if enforced else "over bound (not enforced on this Triton): ") + msg)
            if enforced:
                failures.append(msg)
    return lines, failures


ALL_KERNELS = (
    "attn_fwd",
    "attn_bwd_preprocess",
    "attn_bwd_dkdv",
    "attn_bwd_dq",
    "attn_fwd_varlen",
    "attn_bwd_preprocess_varlen",
    "attn_bwd_dkdv_varlen",
    "attn_bwd_dq_varlen",
    "ln_fwd",
    "ln_bwd",
    "rms_fwd",
    "rms_bwd",
    "linear_fwd",
    "linear_dgrad",
    "linear_wgrad",
    "glu_fwd",
    "glu_dgrad",
    "glu_wgrad",
    "mae_unshuffle_fwd",
    "mae_unshuffle_bwd",
    "mae_sum_over_batch",
    "mae_loss_fwd",
    "mae_loss_bwd",
    "pe_fwd",
    "pe_dw",
    "pe_dimg",
    "pe_prefix_rows",
    "pe_batch_sum",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit.kernels.check", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=None, help="compute capabilities (default 80 90; with --loops 90)"
    )
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=ALL_KERNELS + ("flash2_reference",),
        metavar="NAME",
        help=f"compile only these kernels (default: all of {', '.join(ALL_KERNELS)})",
    )
    loops = parser.add_argument_group("loop report (--loops; see benchmarks/README.md, 'Reading the loop report')")
    loops.add_argument(
        "--loops",
        action="store_true",
        help="instead of the full check: the attention kernels' SASS main loops beside the reference kernel's",
    )
    loops.add_argument("--head-dims", type=int, nargs="+", default=[64, 80], help="head dims D (default 64 80)")
    loops.add_argument("--seq-lens", type=int, nargs="+", default=[197, 1024], help="token counts N (default 197 1024)")
    loops.add_argument("--dtype", choices=sorted(_DT), default="bf16", help="input dtype (default bf16)")
    loops.add_argument("--all-configs", action="store_true", help="every config the pruner keeps, not the first")
    args = parser.parse_args(argv)
    archs = args.arch or ([90] if args.loops else [80, 90])

    if _needs_subprocess():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "fastvit.kernels.check", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode

    t0 = time.perf_counter()
    if args.loops:
        rows = run_loops(
            archs,
            args.jobs,
            dims=args.head_dims,
            seq_lens=args.seq_lens,
            dtype=args.dtype,
            all_configs=args.all_configs,
            kernels=args.kernels,
        )
        print(_loop_table(rows))
        lines, over = loop_verdicts(rows)
        print()
        print("\n".join(lines))
        failed = [r for r in rows if not r["ok"]]
        print(
            f"\n{len(rows)} compiles in {time.perf_counter() - t0:.0f} s: {len(failed)} failed, "
            f"{len(over)} loops over their recorded bound"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"archs": archs, "loop_bounds_triton": LOOP_BOUNDS_TRITON, "rows": rows}, f, indent=1)
        return 1 if failed or over else 0

    rows = run(archs, args.jobs, args.kernels)
    print(_table(rows))
    failed = [r for r in rows if not r["ok"]]
    missing = [
        (k, a)
        for a in archs
        for k in (args.kernels or ALL_KERNELS)
        if not any(r["kernel"] == k and r["arch"] == a and r["ok"] for r in rows)
    ]
    spilled = sum(1 for r in rows if r["spills"])
    print(
        f"\n{len(rows)} compiles for {', '.join(f'sm_{a}' for a in archs)} in {time.perf_counter() - t0:.0f} s: "
        f"{len(rows) - len(failed)} ok, {len(failed)} failed, {spilled} with register spills; "
        f"max shared {max((r['shared'] or 0) for r in rows)} B"
    )
    for k, a in missing:
        print(f"MISSING: no successful compile of {k} for sm_{a}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": archs, "shared_limit": SHARED_LIMIT, "rows": rows}, f, indent=1)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
