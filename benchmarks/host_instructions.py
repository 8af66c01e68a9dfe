"""Host instructions per ``fastvit.ops`` call, counted by callgrind: the deterministic companion of
``fastvit-bench overhead``.

On a shared machine the timed medians of ``fastvit-bench overhead`` move by microseconds from run to run; an
instruction count does not. For each tiny call of :func:`fastvit.bench.overhead.op_cases` this runs ``--calls``
calls of ``fastvit.ops.<op>(...)`` and of the implementation dispatch selects, called directly, under
``valgrind --tool=callgrind`` with instrumentation switched on only around those calls (callgrind's client
requests, through a two-function C shim compiled here), and prints instructions per call and their difference --
what the public entry (argument checks, call description, cached selection) executes on the host. It also counts
the two floor variants of ``benchmarks/host_floor.py``: ``forward`` (a Python function that only calls the
implementation) and ``reads`` (the same after reading ``dtype``, ``device`` and ``shape`` of every tensor operand),
i.e. what any Python entry, and any Python check of the operands, would add at the least.

Counts are not times: after a large kernel (a GEMM, a convolution) the same instructions run from cold caches and
take longer, which only the timed benchmark shows.

Usage::

    python benchmarks/host_instructions.py [--calls 200] [--cases layer_norm,attention] [--json PATH]

Needs ``valgrind`` (with its ``valgrind/callgrind.h`` header) and a C compiler (``cc``); a run takes about a minute
(the import of torch under valgrind). Exits 2 with a message when either is missing.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

_SHIM = r"""
#include <valgrind/callgrind.h>
void fastvit_cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void fastvit_cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""

VARIANTS = ("fastvit.ops", "direct", "forward", "reads")  # see host_floor.floor_variants


def _child(shim: str, calls: int, cases: list[str]) -> None:
    """Under valgrind: one instrumented segment per (case, variant), in the order of ``cases`` x :data:`VARIANTS`."""
    import torch
    from host_floor import floor_variants

    from fastvit import backends, ops
    from fastvit.bench.overhead import op_cases

    torch.set_num_threads(1)
    lib = ctypes.CDLL(shim)
    by_name = {c.case: c for c in op_cases()}
    for name in cases:
        c = by_name[name]
        impl = backends.select(c.op, ops.describe_call(c.op, *c.args, **c.kwargs))[1]
        variants = floor_variants(getattr(ops, c.op), impl, c.args, c.kwargs)
        for variant in VARIANTS:
            fn = variants[variant]
            for _ in range(20):  # warm: the dispatch cache is filled, lazy imports are done
                fn()
            lib.fastvit_cg_start()
            for _ in range(calls):
                fn()
            lib.fastvit_cg_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per counted segment (default 200)")
    parser.add_argument(
        "--cases", default=None, help="comma-separated case names (default: all but the value-checked ones)"
    )
    parser.add_argument("--json", default=None, help="write {case: {variant: instructions per call}} to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")

    from fastvit.bench.overhead import op_cases

    known = [c.case for c in op_cases()]
    cases = [c.case for c in op_cases() if not c.value_check] if args.cases is None else args.cases.split(",")
    unknown = [c for c in cases if c not in known]
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; expected some of {known}")
    if args.child:
        _child(args.child, args.calls, cases)
        return 0

    valgrind, cc = shutil.which("valgrind"), shutil.which("cc")
    if valgrind is None or cc is None:
        print("host_instructions: needs valgrind and a C compiler (cc) on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        shim = os.path.join(tmp, "libfastvit_cg.so")
        src = os.path.join(tmp, "shim.c")
        with open(src, "w") as f:
            f.write(_SHIM)
        built = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", shim, src], capture_output=True, text=True)
        if built.returncode:
            print(f"host_instructions: cannot build the callgrind shim:\n{built.stderr}", file=sys.stderr)
            return 2
        out = os.path.join(tmp, "cg.%p.out")
        cmd = [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        cmd += [sys.executable, os.path.abspath(__file__), "--child", shim, "--calls", str(args.calls)]
        cmd += ["--cases", ",".join(cases)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode:
            print(f"host_instructions: the counted run failed:\n{run.stderr[-4000:]}", file=sys.stderr)
            return 1
        dumps = sorted(glob.glob(os.path.join(tmp, "cg.*.out.*")), key=lambda p: int(p.rsplit(".", 1)[1]))
        totals = []
        for path in dumps:
            with open(path) as f:
                totals.append(int(re.search(r"^totals: (\d+)", f.read(), re.M).group(1)) / args.calls)
    if len(totals) != len(cases) * len(VARIANTS):
        print(f"host_instructions: expected {len(cases) * len(VARIANTS)} dumps, got {len(totals)}", file=sys.stderr)
        return 1
    result = {}
    print(f"{'case':30s} {'fastvit.ops':>12s} {'direct':>12s} {'added':>10s} {'forward':>10s} {'reads':>10s}")
    print(f"{'':30s} {'(instructions per call; the last three: added over direct)':>58s}")
    n = len(VARIANTS)
    for i, case in enumerate(cases):
        counts = dict(zip(VARIANTS, totals[n * i : n * (i + 1)]))
        direct = counts["direct"]
        result[case] = {**counts, **{f"{v}_added": counts[v] - direct for v in ("fastvit.ops", "forward", "reads")}}
        result[case]["added"] = result[case].pop("fastvit.ops_added")
        print(
            f"{case:30s} {counts['fastvit.ops']:12.0f} {direct:12.0f} {counts['fastvit.ops'] - direct:+10.0f} "
            f"{counts['forward'] - direct:+10.0f} {counts['reads'] - direct:+10.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calls": args.calls, "python": sys.version.split()[0], "cases": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
