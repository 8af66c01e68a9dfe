"""What any Python entry would add per op: the floor under ``fastvit-bench overhead``'s per-op numbers.

For each tiny call (but the value-checked ones) of :func:`fastvit.bench.overhead.op_cases` this times four variants A/B interleaved
(:func:`fastvit.bench.overhead.interleaved`, the thread clock on the CPU) and reports, per variant, the median of the
per-round differences from ``direct``:

* ``direct``: the implementation dispatch selects, called directly (as ``fastvit-bench overhead``);
* ``forward``: a Python function that only calls it (one more frame: the least a public entry costs);
* ``reads``: the same, after reading ``dtype``, ``device`` and ``shape`` of every tensor operand (the least a check
  of those operands costs, with no comparison at all);
* ``fastvit.ops``: the public op (its checks, call description and cached selection).

``host``, timed the same way but without the implementation (``fastvit.ops``' prepare step and selection alone, warm),
shows what the public entry costs when no large kernel runs between calls, as on a GPU, where the implementation is a
kernel launch.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/host_floor.py [--reps 60] [--number 200] [--cases layer_norm,attention]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import torch


def floor_variants(public: Callable, impl: Callable, args: tuple, kwargs: dict) -> dict[str, Callable[[], Any]]:
    """The four variants of one call (see the module docstring), as zero-argument callables: ``direct``,
    ``forward``, ``reads`` and ``fastvit.ops`` (``public``)."""
    tensors = tuple(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))

    def forward(*a, **kw):
        return impl(*a, **kw)

    def reads(*a, **kw):
        for t in tensors:
            _ = t.dtype, t.device, t.shape
        return impl(*a, **kw)

    return {
        "direct": lambda: impl(*args, **kwargs),
        "forward": lambda: forward(*args, **kwargs),
        "reads": lambda: reads(*args, **kwargs),
        "fastvit.ops": lambda: public(*args, **kwargs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=60, help="A/B rounds (default 60)")
    parser.add_argument("--number", type=int, default=200, help="calls per sample (default 200)")
    parser.add_argument(
        "--cases", default=None, help="comma-separated case names (default: all but the value-checked ones)"
    )
    parser.add_argument("--json", default=None, help="write {case: {variant: median added us}} to this file")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.number < 1:
        parser.error(f"--reps and --number must be >= 1, got {args.reps} and {args.number}")

    from fastvit import backends, ops
    from fastvit.bench.overhead import clock_for, interleaved, op_cases, summary
    from fastvit.declare import DECLARATIONS

    known = {c.case: c for c in op_cases()}
    names = [c.case for c in known.values() if not c.value_check] if args.cases is None else args.cases.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; expected some of {sorted(known)}")

    torch.set_num_threads(1)
    _, timer = clock_for("cpu")
    select = backends._select
    result = {}
    print(f"{'case':30s} {'forward':>8s} {'reads':>8s} {'fastvit.ops':>12s} {'host':>8s}   (us added over direct)")
    for name in names:
        c = known[name]
        a, kw = c.args, c.kwargs
        impl = backends.select(c.op, ops.describe_call(c.op, *a, **kw))[1]
        public = getattr(ops, c.op)
        variants = floor_variants(public, impl, a, kw)
        variants["nothing"] = lambda: None
        # fastvit.ops.<op>'s host path alone: its prepare step and the cached selection, no implementation.
        variants["host"] = lambda op=c.op, p=DECLARATIONS[c.op].prepare, a=a, kw=kw: select(op, p(*a, **kw)[0], None)
        times = interleaved(variants, reps=args.reps, number=args.number, timer=timer)
        added = {
            v: summary([x - y for x, y in zip(times[v], times["direct"])], 1e6)["median"]
            for v in ("forward", "reads", "fastvit.ops")
        }
        added["host"] = summary([x - y for x, y in zip(times["host"], times["nothing"])], 1e6)["median"]
        result[name] = added
        print(
            f"{name:30s} {added['forward']:+8.2f} {added['reads']:+8.2f} {added['fastvit.ops']:+12.2f} "
            f"{added['host']:8.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reps": args.reps, "number": args.number, "cases": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
