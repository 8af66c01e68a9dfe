"""Read a compiled kernel's SASS: find its main loop, count what the loop issues, and estimate occupancy.

Used by ``python -m fastvit.kernels.check --loops`` (see ``benchmarks/README.md``, "Reading the loop report"). No GPU
is needed: the cubin comes from ``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` and is disassembled with
the ``nvdisasm`` Triton ships (``triton.knobs.nvidia.nvdisasm``, else ``backends/nvidia/bin/nvdisasm``).

**Which loop is the main loop.** A loop in SASS is a backward branch: a ``BRA`` whose target lies at or before the
branch (its *back edge*); the loop's body is the address range ``[target, branch]``. The main loop is the innermost
such range (no other back edge strictly inside it) that holds matrix-multiply instructions (``HGMMA`` on sm_90,
``HMMA`` on sm_80), and among several, the one with the most of them (then the earliest); in a kernel without tensor
cores (fp32 with IEEE dots, where ``tl.dot`` is unrolled FFMAs) the same with ``MUFU.EX2`` instead. This finds the
steady-state K/V loop of a FlashAttention forward whatever ptxas names its labels or how it rotates the loop, and it
ignores a peeled tail block (straight-line code, no back edge) by construction. The count is *static*: every
instruction in the range once, including those a forward branch inside the loop may skip -- for these kernels, one
iteration as one warp issues it.

**Instruction classes** (:data:`CLASSES`, by opcode; ``@!PT``-predicated instructions never execute and are counted
as ``sync``: ptxas emits them as part of fence sequences):

========  ==========================================================================================================
mma       HGMMA, HMMA, IMMA, ... (tensor-core instructions)
ex2       MUFU.EX2 (exp2 on the special-function unit: one per score element per thread, the other hard floor)
mufu      other MUFU (RCP, LG2, ...)
fmul      FMUL
ffma      FFMA
fadd      FADD
fmnmx     FMNMX (row max)
fsel      FSEL (select: in these kernels, masking)
fcmp      FSETP, FSET, FCHK
cvt       F2F, F2FP (fp32 -> bf16/fp16 packing), I2F, F2I
int       integer, address and predicate arithmetic on the vector datapath: IADD3, IMAD*, LEA, LOP3, SHF, ISETP, SEL,
          MOV, PLOP3, R2UR, ...
uint      the same on the uniform datapath (UIADD3, UMOV, ULEA, USEL, ULDC, ...): one per warp, issued beside the
          vector pipes; on sm_90 mostly the bookkeeping of the wgmma shared-memory descriptors
mem       LDG, LDGSTS, LDS, LDSM, STS, STG, ... and their barriers LDGDEPBAR, DEPBAR
shfl      SHFL (row reductions across the quad)
sync      BAR, WARPGROUP.ARRIVE / DEPBAR, MEMBAR, FENCE, NOP, BRA, ...
other     anything else
========  ==========================================================================================================
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

#: Instruction classes in report order.
CLASSES = (
    "mma", "ex2", "mufu", "fmul", "ffma", "fadd", "fmnmx", "fsel", "fcmp", "cvt", "int", "uint", "mem", "shfl", "sync",
    "other",
)  # fmt: skip

_MMA = {"HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA", "UTCMMA"}
_FP = {"FMUL": "fmul", "FFMA": "ffma", "FADD": "fadd", "FMNMX": "fmnmx", "FSEL": "fsel"}
_FCMP = {"FSETP", "FSET", "FCHK"}
_CVT = {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"}
_INT = {
    "IADD3", "IADD", "IADD32I", "IMAD", "IMUL", "ISCADD", "LEA", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR",
    "ISETP", "IMNMX", "VIADD", "VIADDMNMX", "VIMNMX", "VIMNMX3", "IABS", "SEL", "PLOP3", "P2R", "R2P", "POPC",
    "FLO", "BMSK", "BREV", "PRMT", "MOV", "MOV32I", "CS2R", "S2R", "S2UR", "R2UR", "IDP", "IDP4A", "SGXT", "VOTE",
    "VOTEU", "LDC",
}  # fmt: skip
_MEM = {
    "LDG", "LDGSTS", "LDS", "LDSM", "STS", "STG", "STSM", "LDL", "STL", "LD", "ST", "ATOM", "ATOMG", "ATOMS", "RED",
    "LDGDEPBAR", "DEPBAR", "UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "UTMACCTL", "ARRIVES", "SYNCS",
}  # fmt: skip
_SYNC = {
    "BAR", "BRA", "BRX", "JMP", "EXIT", "RET", "CALL", "WARPGROUP", "WARPSYNC", "MEMBAR", "FENCE", "NOP", "BSSY",
    "BSYNC", "YIELD", "ERRBAR", "CCTL", "ELECT", "ACQBULK", "UCGABAR_ARV", "UCGABAR_WAIT", "BPT", "KILL",
}  # fmt: skip


def classify(opcode: str, predicate: str = "") -> str:
    """The class (one of :data:`CLASSES`) of a SASS opcode such as ``"MUFU.EX2"`` or ``"IMAD.MOV.U32"``."""
    if predicate.replace(" ", "") == "@!PT":
        return "sync"
    base = opcode.split(".")[0]
    if base in _MMA:
        return "mma"
    if base == "MUFU":
        return "ex2" if opcode.startswith("MUFU.EX2") else "mufu"
    if base in _FP:
        return _FP[base]
    if base in _FCMP:
        return "fcmp"
    if base in _CVT:
        return "cvt"
    if base in _MEM:
        return "mem"
    if base == "SHFL":
        return "shfl"
    if base in _SYNC:
        return "sync"
    if base in _INT:
        return "int"
    if base.startswith("U") and base[1:] in _INT:
        return "uint"
    return "other"


@dataclass(frozen=True)
class Instr:
    addr: int
    predicate: str
    opcode: str
    operands: str
    target: int | None  # branch target address, for BRA

    @property
    def cls(self) -> str:
        return classify(self.opcode, self.predicate)


_LINE = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L\w+|\.\w+):\s*$")


def nvdisasm_path() -> str:
    try:
        import triton

        return triton.knobs.nvidia.nvdisasm.path
    except Exception:
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c`` of a cubin (the text of its code sections)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([nvdisasm_path(), "-c", path], capture_output=True, text=True, check=True)
    return res.stdout


def parse(sass: str) -> list[Instr]:
    """Instructions of ``nvdisasm -c`` text, with branch targets resolved to addresses (labels or hex)."""
    raw, labels, pending = [], {}, []
    for line in sass.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _LINE.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        raw.append((addr, (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    out = []
    for addr, pred, op, operands in raw:
        target = None
        if op.split(".")[0] in ("BRA", "JMP"):
            t = re.search(r"`?\(?(\.L\w+)\)?", operands)
            if t and t.group(1) in labels:
                target = labels[t.group(1)]
            else:
                h = re.search(r"0x([0-9a-fA-F]+)", operands)
                target = int(h.group(1), 16) if h else None
        out.append(Instr(addr, pred, op, operands, target))
    return out


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """``(first, last)`` index ranges of every loop (a branch back to itself or an earlier address)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    out = []
    for i, ins in enumerate(instrs):
        if ins.target is not None and ins.target <= ins.addr and ins.target in index:
            out.append((index[ins.target], i))
    return out


def main_loop(instrs: list[Instr]) -> tuple[int, int] | None:
    """The index range of the main loop (see the module docstring), or None when no loop holds an MMA or an exp2."""
    all_loops = loops(instrs)

    def count(r, cls):
        return sum(1 for ins in instrs[r[0] : r[1] + 1] if ins.cls == cls)

    for cls in ("mma", "ex2"):  # no tensor cores (fp32 with IEEE dots): the dot is FFMAs, the loop still has exp2
        hot = [r for r in all_loops if count(r, cls)]
        inner = [r for r in hot if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in hot)]
        if inner:
            return max(inner, key=lambda r: (count(r, cls), -r[0]))
    return None


def mix(instrs: list[Instr]) -> dict[str, int]:
    """Instruction count per class (:data:`CLASSES`), plus ``total``."""
    out = dict.fromkeys(CLASSES, 0)
    for ins in instrs:
        out[ins.cls] += 1
    out["total"] = len(instrs)
    return out


def loop_report(cubin: bytes) -> dict | None:
    """The main loop's instruction mix (:func:`mix`) plus ``loops`` (how many loops hold an MMA, nested ones
    included) and ``kernel`` (the whole kernel's instruction count); None when no loop holds an MMA or an exp2."""
    instrs = parse(disassemble(cubin))
    r = main_loop(instrs)
    if r is None:
        return None
    out = mix(instrs[r[0] : r[1] + 1])
    out["loops"] = sum(1 for lo in loops(instrs) if any(i.cls == "mma" for i in instrs[lo[0] : lo[1] + 1]))
    out["kernel"] = len(instrs)
    return out


# --------------------------------------------------------------------------------------------- occupancy
#: Per-SM limits by compute capability: (registers, shared memory bytes, threads, CTAs). Each CTA also takes 1 KiB
#: of shared memory the driver reserves; registers are allocated per warp in units of 256.
SM_LIMITS = {80: (65536, 167936, 2048, 32), 86: (65536, 102400, 1536, 16), 89: (65536, 102400, 1536, 24)}
SM_LIMITS[90] = (65536, 233472, 2048, 32)


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """CTAs per SM that registers, shared memory and threads allow (the CUDA occupancy calculator's rule)."""
    regs_sm, smem_sm, threads_sm, ctas_sm = SM_LIMITS.get(arch, SM_LIMITS[90])
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (regs_sm // regs_per_warp) // num_warps
    by_smem = smem_sm // (shared + 1024)
    by_threads = threads_sm // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, ctas_sm))
