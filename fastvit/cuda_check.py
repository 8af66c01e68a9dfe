"""Compile check of the CUDA C++ kernels: ``python -m fastvit.cuda_check``.

Compiles every torch-free kernel file of ``csrc/`` (``*.cu``; the binding is left out) with ``nvcc`` alone, for each
target architecture, with ``-Xptxas -v``, and prints a table of registers, spills and static shared memory per
kernel. No GPU and no torch headers are involved: the include path is ``csrc/`` plus CUTLASS, so a kernel file that
reaches for ``at::Tensor`` fails here (docs/ARCHITECTURE.md, "Verifying GPU code without a GPU").

Exit status 1 on a compile error, on a torch / ATen / c10 include in a kernel file, or on register spills in the
attention and LayerNorm kernels and linear_glu's dual GEMM (whose speed depends on staying in registers: the kernel
table's ``no_spill`` families and kinds); spills elsewhere are reported only.

By default one instantiation per kernel template is compiled (bf16, head-dim bucket 64: the minimal build of the
kernel table, ``fastvit/runtime/kernel_table.py``), which is what CI runs; ``--all`` compiles every instantiation. The
attention kernels come in a dense and a packed variable-length (``*_varlen_*``) instantiation of the same template
body, each without and with rotary embeddings of q and k (``*_rope_*``: a template flag, so ``--baseline`` shows the
kernels without it unchanged and the rotary ones as new); all are listed.

``--baseline OLD.json`` (a ``--json`` file of an earlier run, e.g. before a change) compares every kernel compiled in
both runs, by architecture and name: a kernel whose registers, spills, stack frame or static shared memory changed is
a failure (a change meant to add a code path must leave the existing kernels as they were); kernels the baseline does
not have are listed as new.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from fastvit.runtime import cuda_build as build
from fastvit.runtime import kernel_table

#: Families whose kernels must not spill (path components under csrc/): the kernel table's ``no_spill`` families.
NO_SPILL_FAMILIES = kernel_table.no_spill_families()
#: Further files whose kernels must not spill (relative to csrc/): those of the kernel table's ``no_spill`` kinds
#: (linear_glu's hand-written dual GEMM).
NO_SPILL_FILES = kernel_table.no_spill_files()

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
_PROPS = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")
_TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.M)


@dataclasses.dataclass
class KernelInfo:
    """ptxas's numbers for one kernel on one architecture."""

    file: str
    arch: str
    kernel: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclasses.dataclass
class FileResult:
    """Outcome of compiling one file for all architectures."""

    file: str
    ok: bool
    seconds: float
    kernels: list[KernelInfo]
    log: str


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(name: str, width: int = 90) -> str:
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def parse_ptxas(log: str, file: str) -> list[KernelInfo]:
    """Kernels (entry functions) with their registers, spills, stack and smem from ``nvcc -Xptxas -v`` output."""
    kernels: list[KernelInfo] = []
    current: KernelInfo | None = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = KernelInfo(file, m["arch"], m["name"])
            kernels.append(current)
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = int(m["stack"]), int(m["st"]), int(m["ld"])
            continue
        m = _USED.search(line)
        if m:
            current.registers = int(m["regs"])
            current.smem = int(m["smem"] or 0)
            current = None
    names = _demangle(sorted({k.kernel for k in kernels}))
    for k in kernels:
        k.kernel = names.get(k.kernel, k.kernel)
    return kernels


def compile_file(path: str, archs: str, minimal: bool, nvcc: str) -> FileResult:
    """Compile one kernel file to an object in a temporary directory; never raises on a compile error."""
    rel = os.path.relpath(path, os.path.dirname(build.CSRC))
    with open(path) as f:
        if _TORCH_INCLUDE.search(f.read()):
            return FileResult(
                rel,
                False,
                0.0,
                [],
                f"{rel} includes a torch / ATen / c10 header; kernel files must be "
                "torch-free (the binding fills a params struct)",
            )
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            nvcc,
            "-c",
            build.CHECK_STD,
            *build.NVCC_FLAGS,
            *build.defines(minimal),
            *build.gencode_flags(archs),
            "-Xptxas",
            "-v",
            *[f"-I{d}" for d in build.include_dirs()],
            path,
            "-o",
            os.path.join(tmp, "out.o"),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    return FileResult(rel, proc.returncode == 0, seconds, parse_ptxas(log, rel), log)


def _must_not_spill(k: KernelInfo) -> bool:
    parts = k.file.replace(os.sep, "/").split("/")
    return any(f in parts for f in NO_SPILL_FAMILIES) or "/".join(parts[-2:]) in NO_SPILL_FILES


def run(
    archs: str = build.DEFAULT_ARCHS, minimal: bool = True, jobs: int | None = None, files: list[str] | None = None
) -> tuple[list[FileResult], list[str]]:
    """Compile ``files`` (default: every kernel file of the chosen build) and return (results, failures).

    Raises:
        FileNotFoundError: no ``nvcc``, no CUTLASS headers, or no ``csrc/`` (an installed wheel without sources).
    """
    nvcc = build.find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if build.cutlass_include() is None:
        raise FileNotFoundError("CUTLASS headers not found: pip install nvidia-cutlass")
    if files is None:
        if not os.path.isdir(build.CSRC):
            raise FileNotFoundError(f"no csrc/ at {build.CSRC}: the compile check needs a source checkout")
        files = build.sources(minimal=minimal, kernels_only=True)
    jobs = jobs or build.max_jobs()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda p: compile_file(p, archs, minimal, nvcc), files))
    failures = []
    for r in results:
        if not r.ok:
            failures.append(f"{r.file}: compile error\n{r.log[-4000:]}")
        for k in r.kernels:
            if k.spills and _must_not_spill(k):
                failures.append(
                    f"{r.file} [{k.arch}] {_short(k.kernel)}: spills {k.spill_stores} B stores / "
                    f"{k.spill_loads} B loads (attention, LayerNorm and linear_glu forward kernels must not spill)"
                )
    return results, failures


def _without_false_flag(kernel: str) -> str:
    """The name a kernel had before its template gained a trailing ``bool`` parameter whose ``false`` is the old code
    path: ``k<Cfg, false>(Params)`` -> ``k<Cfg>(Params)`` (the dense attention forward, which gained ``kVarlen``)."""
    return re.sub(r", false>\(", ">(", _norm(kernel))


def _norm(kernel: str) -> str:
    """A demangled name without the blanks between closing brackets (``> >``, which demanglers differ on)."""
    return re.sub(r"\s+>", ">", kernel)


#: What must match between a kernel and its baseline.
_COMPARED = ("registers", "spill_stores", "spill_loads", "stack", "smem")


def compare_with_baseline(results: list[FileResult], baseline: list[dict]) -> tuple[list[str], list[str]]:
    """Compare ``results`` with ``baseline`` (the ``--json`` list of an earlier run) kernel by kernel, keyed by
    (architecture, demangled name).

    Returns:
        ``(changed, new)``: one line per kernel of both runs whose ptxas numbers (:data:`_COMPARED`) differ, and one
        line per kernel the baseline lacks.
    """
    old = {(k["arch"], _norm(k["kernel"])): k for r in baseline for k in r.get("kernels", [])}
    changed, new = [], []
    for r in results:
        for k in r.kernels:
            before = old.get((k.arch, _norm(k.kernel))) or old.get((k.arch, _without_false_flag(k.kernel)))
            if before is None:
                new.append(f"{r.file} [{k.arch}] {_short(k.kernel)}")
                continue
            diffs = [f"{f} {before[f]} -> {getattr(k, f)}" for f in _COMPARED if before.get(f) != getattr(k, f)]
            if diffs:
                changed.append(f"{r.file} [{k.arch}] {_short(k.kernel)}: " + ", ".join(diffs))
    return changed, new


def main(argv: list[str] | None = None) -> int:
    """Command line: compile, print the table, return 0 (all good), 1 (a failure) or 2 (no toolchain)."""
    parser = argparse.ArgumentParser(prog="python -m fastvit.cuda_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=build.DEFAULT_ARCHS, help="';'-separated, default %(default)s")
    parser.add_argument("--all", action="store_true", help="every instantiation, not one per kernel template")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument(
        "--baseline",
        metavar="PATH",
        help="a --json file of an earlier run: fail when a kernel compiled in both runs changed its ptxas numbers",
    )
    parser.add_argument("files", nargs="*", help="compile only these files")
    args = parser.parse_args(argv)
    try:
        results, failures = run(args.archs, minimal=not args.all, jobs=args.jobs, files=args.files or None)
    except FileNotFoundError as exc:
        print(f"cuda_check: {exc}", file=sys.stderr)
        return 2
    print(f"{'file':44} {'arch':7} {'regs':>4} {'spill st/ld':>12} {'smem':>7}  kernel")
    for r in results:
        for k in r.kernels:
            print(
                f"{r.file:44} {k.arch:7} {k.registers:4d} {k.spill_stores:6d}/{k.spill_loads:<5d} {k.smem:7d}  "
                f"{_short(k.kernel, 70)}"
            )
        print(f"{r.file:44} {'ok' if r.ok else 'FAILED'} in {r.seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**dataclasses.asdict(r), "log": None} for r in results], f, indent=1)
    if args.baseline:
        with open(args.baseline) as f:
            changed, new = compare_with_baseline(results, json.load(f))
        for line in new:
            print(f"new (not in the baseline): {line}")
        print(f"cuda_check: {len(changed)} kernels changed against {args.baseline}, {len(new)} new")
        failures += [f"changed against the baseline: {line}" for line in changed]
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    n_kernels = sum(len(r.kernels) for r in results)
    print(f"cuda_check: {len(results)} files, {n_kernels} kernel x arch entries, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
