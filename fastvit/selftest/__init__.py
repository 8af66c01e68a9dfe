"""``python -m fastvit.selftest``: check every op of a kernel backend on the device at hand before trusting it.

No fastvit kernel is trusted on a device (GPU model, driver, CUDA runtime, torch, Triton, fastvit build) until it
has been seen to compute the right answer there. This module runs each op of each requested kernel backend at small,
awkward shapes (N = 1, 61, 197 tokens; D = 32, 72, 80; batch 3; every dtype the backend declares for the op), forward
and every gradient, against :mod:`fastvit.reference` under the test oracle (docs/ARCHITECTURE.md, "Numerics and the test oracle")::

    max|out - ref|  <=  2 * max|pt - ref|  +  atol(dtype) * max(1, max|ref|)

with ``ref`` the reference computed in float64 on the inputs converted to float64, and ``pt`` the eager backend in
the input precision (for the attention ops: plain softmax(q kᵀ) v in the input precision without any upcast,
FlashAttention's rule, as ``tests/test_triton_attention.py`` does -- SDPA's fused CPU/GPU kernels are more accurate
than any tensor-core flash kernel needs to be). Outputs are poisoned (``torch.empty`` NaN-filled while the kernel
runs), so an element a kernel never writes fails.

Command line::

    python -m fastvit.selftest [--backend triton] [--backend cuda] [--ops attention,layer_norm] [--json PATH]
                               [--device cuda:0] [--full]

Exit status 0 only when every case that ran passed. Without a GPU the ``triton`` backend runs in Triton's
interpreter when ``TRITON_INTERPRET=1`` is set before the import (that is how CI tests it); there the case list is
cut to 25 cases for the whole backend -- the mid-size shape in float32, the smallest in bfloat16 and float16 --
because the interpreter executes every program instance in Python (``--full`` runs all 78; see :func:`cases`).

Python API::

    report = fastvit.selftest.run(backends=["triton"], ops=None, device=None)
    report.passed            # bool: every case that ran passed
    report.results           # [CaseResult(op, backend, case, passed, detail, dtype, seconds), ...]
    report.skipped           # cases the backend does not support here (reason in .detail)

Results are also what :mod:`fastvit.backends` consults before automatic dispatch first uses a kernel backend for an
op on a device (the self-test gate, see :class:`Gate`): they are cached on disk, in ``$FASTVIT_CACHE_DIR/selftest``
(default ``$XDG_CACHE_HOME/fastvit/selftest`` or ``~/.cache/fastvit/selftest``), one JSON file per key of what can
change the answer (:func:`environment`): the device (GPU name, compute capability, driver; on the CPU "cpu" and
whether Triton interprets), the CUDA runtime, torch, Triton, the fastvit version and a hash of its sources, and the
``fastvit._C`` build. ``FASTVIT_SELFTEST=0`` turns the gate off (kernels are trusted unchecked).

The comparison is the test suite's own oracle, :mod:`fastvit.testing`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from fastvit import backends, ops, testing
from fastvit.backends import OPS, PRIORITY, get_backend
from fastvit.declare import DECLARATIONS, differentiable
from fastvit.runtime import cache_root

__all__ = [
    "CaseResult",
    "Gate",
    "SelfTestReport",
    "cache_dir",
    "cache_key",
    "cases",
    "environment",
    "main",
    "run",
]

#: Kernel backends the self-test checks by default (eager is the baseline it compares against).
KERNEL_BACKENDS: tuple[str, ...] = tuple(name for name in PRIORITY if name != "eager")

_VERSION = "0.1.0"  # fastvit.__version__; not imported from the package root (fastvit/__init__ imports this module)


# ------------------------------------------------------------------------------------------------ oracle (mirror)
# Mirrors tests/oracle.py (ATOL, FACTOR, assert_close_oracle) until it moves into fastvit.testing.
def _oracle_error(out: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, dtype: torch.dtype, name: str) -> str | None:
    """``None`` when ``out`` passes the test oracle (:func:`fastvit.testing.oracle_compare`) against ``ref`` (float64)
    and ``pt`` (input precision), else why."""
    return (
        testing.oracle_compare(out, ref, pt, dtype, name, check_dtype=False).message
        if out.dtype == pt.dtype
        else (f"{name}: dtype {out.dtype} != expected {pt.dtype}")
    )


def _run(
    fn: Callable[..., Any],
    inputs: dict[str, Any],
    grad_names: Sequence[str],
    grad_outputs: Sequence[torch.Tensor] | None,
    dtype: torch.dtype | None = None,
):
    """``fn(**inputs)`` on fresh leaf copies (cast to ``dtype``), backpropagating ``grad_outputs``: (outputs, grads)."""
    leaves: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(dtype=dtype or value.dtype).clone().requires_grad_(name in grad_names)
        leaves[name] = value
    with torch.enable_grad():
        out = fn(**leaves)
    outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    grads: dict[str, torch.Tensor] = {}
    if grad_outputs is not None and grad_names:
        pairs = [(o, g.to(o.device, o.dtype)) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
        if not pairs:
            raise RuntimeError("no output requires grad: the implementation detached its result from the inputs")
        got = torch.autograd.grad(
            [o for o, _ in pairs], [leaves[n] for n in grad_names], [g for _, g in pairs], allow_unused=True
        )
        for name, g in zip(grad_names, got):
            if g is None:
                raise RuntimeError(f"no gradient reached input {name!r}")
            grads[name] = g
    return tuple(o.detach() for o in outputs), grads


@contextlib.contextmanager
def _poisoned_empty() -> Iterator[None]:
    """``torch.empty`` returns NaN-filled memory inside (as tests/conftest.py's ``poisoned_empty``)."""
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warn_only's "this op is not deterministic" notes
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
            torch.utils.deterministic.fill_uninitialized_memory = prev[2]


@contextlib.contextmanager
def _isolated(device: torch.device) -> Iterator[None]:
    """The caller's numerics settings do not leak into a check the gate runs in the middle of their code: no autocast
    (it would run the float64 reference in bf16), no inference mode (no autograd), and IEEE fp32 matmuls (kernels read
    ``allow_tf32`` to pick TF32; the oracle's floors are for IEEE)."""
    prev_tf32 = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        for kind in {"cpu", device.type}:
            with contextlib.suppress(RuntimeError):
                stack.enter_context(torch.autocast(kind, enabled=False))
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_tf32[:2]
            torch.set_float32_matmul_precision(prev_tf32[2])


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One self-test case: ``op`` at one shape and dtype. ``make(generator)`` returns ``specs``, which
    maps argument names to shapes (random inputs in ``dtype``), ``(shape, scale)``, tensors (index tensors
    kept as they are, floating ones cast) or plain values."""

    op: str
    label: str
    dtype: torch.dtype
    make: Callable[[torch.Generator], dict[str, Any]] = field(compare=False, repr=False)
    #: Whether the case is in the short list run under Triton's interpreter.
    quick: bool = False

    @property
    def name(self) -> str:
        return f"{self.label} {str(self.dtype).removeprefix('torch.')}"


def _interpreted(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def cases(op: str, backend: str, device: torch.device | str | None = None, *, quick: bool | None = None) -> list[Case]:
    """The cases of ``op`` for ``backend``: every shape its declaration lists (:attr:`fastvit.declare.OpDeclaration.selftest`) in every dtype the backend's kernel
    declares (``Capabilities.dtypes``; float64 excluded: no kernel backend computes in it).

    ``quick`` (default: whether ``device`` is the CPU under ``TRITON_INTERPRET=1``) runs the shape(s) marked quick
    (tails in every block dimension, N = 61 or so) in float32 and the first, smallest shape in each other dtype: the
    interpreter executes every program instance as Python (a case at N = 197 takes 5-12 s there, one at N = 61 1-3 s,
    one at N = 1 0.1-0.5 s on one core), and the whole backend must check in well under a minute. On a GPU every shape
    runs in every dtype.
    """
    device = _device(device)
    if quick is None:
        quick = _interpreted(device)
    kernel = get_backend(backend).kernels.get(op)
    declared = kernel.capabilities.dtypes if kernel is not None else frozenset({torch.float32})
    order = (torch.float32, torch.bfloat16, torch.float16)
    dtypes = [d for d in order if d in declared] or [torch.float32]
    shapes = DECLARATIONS[op].selftest
    if not quick:
        return [Case(op, s.label, dtype, s.make, s.quick) for s in shapes for dtype in dtypes]
    first, rest = dtypes[0], dtypes[1:]
    picked = [Case(op, s.label, first, s.make, True) for s in shapes if s.quick]
    return picked + [Case(op, shapes[0].label, dtype, shapes[0].make, True) for dtype in rest]


# ------------------------------------------------------------------------------------------------ results
@dataclass
class CaseResult:
    """One checked (or skipped) case. ``detail``: the first oracle violation or exception, the reason a case was
    skipped, or the largest error ratio seen when it passed."""

    op: str
    backend: str
    case: str
    passed: bool
    detail: str = ""
    dtype: str = ""
    seconds: float = 0.0
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SelfTestReport:
    """What :func:`run` found. ``passed``: every case that ran passed (``skipped`` cases do not count)."""

    results: list[CaseResult]
    skipped: list[CaseResult]
    device: str
    environment: dict[str, Any]
    key: str
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "device": self.device,
            "key": self.key,
            "environment": self.environment,
            "seconds": round(self.seconds, 3),
            "results": [r.as_dict() for r in self.results],
            "skipped": [r.as_dict() for r in self.skipped],
        }

    def table(self) -> str:
        """The results as a text table: one row per (backend, op, case), then a summary line."""
        rows = [
            (r.backend, r.op, r.case, "PASS" if r.passed else "FAIL", f"{r.seconds:.2f}", r.detail)
            for r in self.results
        ]
        rows += [(r.backend, r.op, r.case, "skip", "", r.detail) for r in self.skipped]
        head = ("backend", "op", "case", "result", "s", "detail")
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head[:-1])]
        fmt = "  ".join(f"{{:{w}}}" for w in widths) + "  {}"
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths), "-" * 6)]
        lines += [fmt.format(*row[:-1], _short(row[-1], 110)) for row in rows]
        n_fail = len(self.failures())
        verdict = "FAILED" if n_fail else ("PASSED" if self.results else "NOTHING RAN (every case skipped)")
        lines.append(
            f"{len(self.results) - n_fail} passed, {n_fail} failed, {len(self.skipped)} skipped on "
            f"{self.device} in {self.seconds:.1f} s -- {verdict}"
        )
        return "\n".join(lines)


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cpu_inputs(case: Case) -> tuple[dict[str, Any], list[str], torch.Generator]:
    """The case's inputs drawn on the CPU in float32 (same numbers on every device), its gradient names, and the
    generator (seeded from the case's name) that then draws the upstream gradients."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.op}/{case.label}/{case.dtype}".encode()))
    specs = case.make(g)
    grad_names = differentiable(DECLARATIONS[case.op], specs)
    inputs: dict[str, Any] = {}
    for name, spec in specs.items():
        if isinstance(spec, torch.Tensor):
            inputs[name] = spec
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], tuple) and isinstance(spec[1], float):
            inputs[name] = torch.randn(spec[0], generator=g) * spec[1]
        elif isinstance(spec, tuple) and all(isinstance(s, int) for s in spec):
            inputs[name] = torch.randn(spec, generator=g)
        else:
            inputs[name] = spec
    return inputs, grad_names, g


def check_case(backend: str, case: Case, device: torch.device | str | None = None) -> CaseResult:
    """Run one case of ``backend`` on ``device`` under the oracle; never raises for a failing kernel."""
    device = _device(device)
    start = time.perf_counter()
    dtype_name = str(case.dtype).removeprefix("torch.")
    result = CaseResult(case.op, backend, case.name, False, dtype=dtype_name)
    try:
        cpu, grad_names, g = _cpu_inputs(case)
        # Inputs in the case's dtype on the device; "ref" sees the same values in float64.
        inputs = {
            n: (v.to(device, case.dtype if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor) else v)
            for n, v in cpu.items()
        }
        call = ops.describe_call(case.op, **inputs)
        reasons = get_backend(backend).not_supported_reasons(case.op, call)
        if reasons:
            result.passed, result.skipped, result.detail = True, True, "not supported: " + "; ".join(reasons)
            return result
        decl = DECLARATIONS[case.op]
        public, naive = decl.function, decl.reference
        pt_fn = decl.pt or (lambda **kw: public(**kw, backend="eager"))
        with backends.verifying(), _isolated(device):
            ref_out, _ = _run(naive, inputs, (), None, torch.float64)
            grad_outputs = [torch.randn(o.shape, generator=g).to(case.dtype).to(torch.float64) for o in ref_out]
            ref = _run(naive, inputs, grad_names, grad_outputs, torch.float64)
            pt = _run(pt_fn, inputs, grad_names, grad_outputs)
            try:
                with _poisoned_empty():
                    out = _run(lambda **kw: public(**kw, backend=backend), inputs, grad_names, grad_outputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # a launch that fails is a failed case, not a crash of the self-test
                result.detail = f"raised {type(exc).__name__}: {exc}"
                return result
        names = [f"out{i}" if len(ref[0]) > 1 else "out" for i in range(len(ref[0]))]
        if len(out[0]) != len(ref[0]):
            result.detail = f"{len(out[0])} outputs, expected {len(ref[0])}"
            return result
        worst = 0.0
        for label, o, r, p in [
            *zip(names, out[0], ref[0], pt[0]),
            *((f"grad {n}", out[1][n], ref[1][n], pt[1][n]) for n in grad_names),
        ]:
            error = _oracle_error(o, r, p, case.dtype, label)
            if error is not None:
                result.detail = error
                return result
            bound = testing.FACTOR * testing.max_abs_err(p, r) + testing.atol_for(case.dtype) * max(
                1.0, float(r.abs().max()) if r.numel() else 0
            )
            worst = max(worst, testing.max_abs_err(o, r) / bound if bound else 0.0)
        result.passed, result.detail = True, f"max err / bound = {worst:.2f}"
        return result
    except Exception as exc:  # the case itself could not be set up or compared: report, do not crash
        result.detail = f"self-test error {type(exc).__name__}: {exc}"
        return result
    finally:
        result.seconds = time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ progress
class _Progress:
    """tqdm when importable (and ``enabled``), else one plain line per case (``lines``) or nothing."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, lines: bool = True, file=None):
        self.file = file or sys.stderr
        self.bar = None
        self.lines = enabled and lines
        self.total, self.done = total, 0
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc, file=self.file, leave=False, dynamic_ncols=True)
                self.lines = False

    def update(self, result: CaseResult) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{result.backend} {result.op}", refresh=False)
            self.bar.update(1)
        elif self.lines:
            status = "skip" if result.skipped else ("ok" if result.passed else "FAIL")
            print(
                f"[{self.done}/{self.total}] {result.backend} {result.op} {result.case}: {status}",
                file=self.file,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------ run
def run(
    backends: Sequence[str] | str | None = None,
    ops: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    *,
    quick: bool | None = None,
    progress: bool = False,
    store: bool = True,
) -> SelfTestReport:
    """Check every op of each kernel backend in ``backends`` (default: ``cuda`` and ``triton``) on ``device`` (default:
    the current CUDA device, else the CPU), forward and every gradient, against :mod:`fastvit.reference`.

    A backend that cannot run here at all contributes one skipped record per op (with its reasons); cases outside a
    kernel's declared capabilities are skipped too. ``quick`` picks the short case list (see :func:`cases`).
    ``store`` writes the per-op verdicts to the disk cache the dispatch gate reads (only for full, unfiltered case
    lists: a quick run verifies the interpreter, not the full list).

    Raises:
        ValueError: an unknown backend or op name.
    """
    names = _names(backends, KERNEL_BACKENDS, PRIORITY, "backend")
    op_names = _names(ops, OPS, OPS, "op")
    dev = _device(device)
    start = time.perf_counter()
    plan: list[tuple[str, str, list[Case] | None, list[str]]] = []
    for name in names:
        unavailable = get_backend(name).unavailable_reasons()
        for op in op_names:
            plan.append((name, op, None if unavailable else cases(op, name, dev, quick=quick), unavailable))
    total = sum(len(c) if c is not None else 1 for _, _, c, _ in plan)
    bar = _Progress(total, f"fastvit selftest on {dev}", enabled=progress)
    results: list[CaseResult] = []
    skipped: list[CaseResult] = []
    try:
        for name, op, op_cases, unavailable in plan:
            if op_cases is None:
                rec = CaseResult(
                    op, name, "(all)", True, "backend unavailable: " + "; ".join(unavailable), skipped=True
                )
                skipped.append(rec)
                bar.update(rec)
                continue
            op_results = []
            for case in op_cases:
                rec = check_case(name, case, dev)
                (skipped if rec.skipped else results).append(rec)
                op_results.append(rec)
                bar.update(rec)
            if store:
                GATE.record(name, op, dev, op_results)
    finally:
        bar.close()
    env = environment(dev)
    return SelfTestReport(results, skipped, str(dev), env, cache_key(env), time.perf_counter() - start)


def _names(given: Sequence[str] | str | None, default: Sequence[str], known: Sequence[str], what: str) -> list[str]:
    if given is None:
        return list(default)
    if isinstance(given, str):
        given = [g for g in given.replace(",", " ").split() if g]
    unknown = [g for g in given if g not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; expected one of {list(known)}")
    return list(dict.fromkeys(given))


# ------------------------------------------------------------------------------------------------ cache
def cache_dir() -> str:
    """Where verdicts are stored: ``selftest`` in fastvit's cache folder (:func:`fastvit.runtime.cache_root`:
    ``$FASTVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastvit``, else ``~/.cache/fastvit``)."""
    return os.path.join(cache_root(), "selftest")


def _driver_version() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            for token in f.readline().split():
                if token[:1].isdigit() and "." in token:
                    return token
    except OSError:
        pass
    try:
        return f"cuda-driver-api-{torch._C._cuda_getDriverVersion()}"
    except Exception:
        return None


def _extension_hash() -> str | None:
    from fastvit.runtime import cuda as cuda_rt

    if cuda_rt.load_error() is not None:
        return None
    h = hashlib.sha256(json.dumps(cuda_rt.build_info(), sort_keys=True, default=str).encode())
    path = getattr(cuda_rt._EXT, "__file__", None)
    if path and os.path.exists(path):
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


_SOURCE_HASH: str | None = None


def _source_hash() -> str:
    """A hash of fastvit's Python sources and Triton kernels: a development checkout changes its kernels without
    changing the version number."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        h = hashlib.sha256()
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        roots = [package]
        try:
            import fastvit.kernels as _kernels  # noqa: PLC0415  (Triton's kernel sources, mapped from kernels/)

            roots.append(os.path.dirname(os.path.abspath(_kernels.__file__)))
        except Exception:
            pass
        for root in roots:
            for dirpath, dirnames, files in sorted(os.walk(root)):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                for name in sorted(files):
                    if name.endswith((".py", ".cu", ".cuh", ".cpp", ".h")):
                        with open(os.path.join(dirpath, name), "rb") as f:
                            h.update(name.encode() + b"\0" + f.read())
        _SOURCE_HASH = h.hexdigest()[:16]
    return _SOURCE_HASH


_ENV: dict[str, dict[str, Any]] = {}


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What can change a kernel's answer on ``device``: the cache key's fields.

    ``device`` ("cpu" or "cuda"), ``gpu`` (name), ``compute_capability``, ``driver``, ``triton_interpret`` (CPU),
    ``cuda_runtime`` (``torch.version.cuda``), ``torch``, ``triton``, ``fastvit``, ``source`` (hash of the package and
    kernel sources) and ``extension`` (hash of ``fastvit._C``'s build info and file, ``None`` when not loaded).
    """
    dev = _device(device)
    memo = str(dev)
    if memo not in _ENV:
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        env: dict[str, Any] = {"device": dev.type}
        if dev.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(dev)
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
            env["driver"] = _driver_version()
        else:
            env["processor"] = platform.machine()
            env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
        env.update(
            {
                "cuda_runtime": torch.version.cuda,
                "torch": torch.__version__,
                "triton": triton_version,
                "fastvit": _VERSION,
                "source": _source_hash(),
                "extension": _extension_hash(),
            }
        )
        _ENV[memo] = env
    return dict(_ENV[memo])


def cache_key(env: dict[str, Any]) -> str:
    """The file name (without ``.json``) the verdicts of ``env`` (:func:`environment`) are stored under."""
    return hashlib.sha256(json.dumps(env, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _kernel_id(backend: str, op: str) -> str:
    """Which implementation a verdict is about: a kernel registered later (a plugin, a test's fake) is not trusted
    on the strength of another's verdict."""
    kernel = get_backend(backend).kernels.get(op)
    return _fn_id(kernel.fn) if kernel is not None else "-"


def _fn_id(fn: Any, depth: int = 0) -> str:
    """``module.qualname``, a hash of the bytecode, and (two levels deep) the same for the functions a closure
    wraps: stable across processes, different for two closures made by one factory around different functions."""
    out = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    code = getattr(fn, "__code__", None)
    if code is not None:
        out += ":" + hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:8]
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if _filled(c)]
    inner = [_fn_id(c, depth + 1) for c in cells if callable(c) and depth < 2]
    return out + (f"({','.join(inner)})" if inner else "")


def _filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ the gate
class Gate:
    """The verifier :mod:`fastvit.backends` asks before automatic dispatch first uses a kernel backend for an op on a
    device (registered with :func:`fastvit.backends.set_verifier` when this module is imported).

    ``lookup`` answers from memory or the disk cache only; ``verify`` runs the op's cases when nothing is cached for
    the current key (once per key and process: a lock serialises concurrent first uses), with a one-line notice and
    progress on stderr, and stores the verdict. A verdict is ``(passed, detail)``: ``detail`` names the first failing
    case (or says how many cases passed).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._files: dict[str, dict[str, Any]] = {}

    # -- storage
    def _path(self, key: str) -> str:
        return os.path.join(cache_dir(), f"{key}.json")

    def _load(self, key: str) -> dict[str, Any]:
        path = self._path(key)
        data = self._files.get(path)
        if data is None:
            try:
                with open(path) as f:
                    data = json.load(f)
                if not isinstance(data.get("verdicts"), dict):
                    raise ValueError("no verdicts")
            except (OSError, ValueError):
                data = {"verdicts": {}}
            self._files[path] = data
        return data

    def _store(self, key: str, env: dict[str, Any], entry_key: str, entry: dict[str, Any]) -> None:
        path = self._path(key)
        with self._lock:
            self._files.pop(path, None)  # re-read: another process may have added verdicts
            data = self._load(key)
            data["environment"] = env
            data["verdicts"][entry_key] = entry
            self._files[path] = data
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except OSError as exc:  # a read-only home: the verdict still holds for this process
                warnings.warn(
                    f"fastvit: could not write the self-test cache {path}: {exc}", RuntimeWarning, stacklevel=3
                )

    def record(self, backend: str, op: str, device: torch.device | str, results: Sequence[CaseResult]) -> None:
        """Store the verdict of a full (non-quick) run of ``op``'s cases; a run with no case that ran stores
        nothing."""
        ran = [r for r in results if not r.skipped]
        if not ran:
            return
        dev = _device(device)
        failed = [r for r in ran if not r.passed]
        if not failed and not {c.name for c in cases(op, backend, dev, quick=False)} <= {r.case for r in results}:
            return  # a partial (quick or filtered) pass does not verify the op; a failure anywhere fails it
        env = environment(dev)
        detail = f"{failed[0].case}: {failed[0].detail}" if failed else f"{len(ran)} cases passed"
        self._store(
            cache_key(env),
            env,
            self._entry_key(backend, op, dev),
            {
                "passed": not failed,
                "detail": detail,
                "kernel": _kernel_id(backend, op),
                "cases": len(ran),
                "failed": len(failed),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )

    @staticmethod
    def _entry_key(backend: str, op: str, device: torch.device) -> str:
        return f"{backend}/{op}/{device.type}"

    # -- the two questions dispatch asks
    def lookup(self, backend: str, op: str, device: torch.device | str) -> tuple[bool | None, str]:
        """The cached verdict for ``backend``'s ``op`` on ``device``, or ``(None, why)`` when there is none."""
        dev = _device(device)
        env = environment(dev)
        entry = self._load(cache_key(env))["verdicts"].get(self._entry_key(backend, op, dev))
        if entry is None:
            return None, "no self-test result for this device, driver, toolkit, torch, Triton and fastvit build"
        if entry.get("kernel") != _kernel_id(backend, op):
            return None, f"the cached result is about another kernel ({entry.get('kernel')})"
        return bool(entry.get("passed")), str(entry.get("detail", ""))

    def verify(self, backend: str, op: str, device: torch.device | str) -> tuple[bool, str]:
        """The verdict for ``backend``'s ``op`` on ``device``, running its cases first when none is cached."""
        dev = _device(device)
        with self._lock:
            passed, detail = self.lookup(backend, op, dev)
            if passed is not None:
                return passed, detail
            op_cases = cases(op, backend, dev, quick=False)
            print(
                f"fastvit: checking the {backend} kernels of {op} on {_describe_device(dev)} against the reference "
                f"before first use ({len(op_cases)} cases; cached in {cache_dir()}; FASTVIT_SELFTEST=0 skips this)",
                file=sys.stderr,
                flush=True,
            )
            bar = _Progress(len(op_cases), f"fastvit selftest {backend} {op}", lines=False)
            results = []
            try:
                for case in op_cases:
                    results.append(check_case(backend, case, dev))
                    bar.update(results[-1])
            finally:
                bar.close()
            ran = [r for r in results if not r.skipped]
            if not ran:
                return False, "no self-test case of this op is supported by the kernel here"
            self.record(backend, op, dev, results)
            failed = [r for r in ran if not r.passed]
            if failed:
                return False, f"{failed[0].case}: {failed[0].detail}"
            return True, f"{len(ran)} cases passed"

    def forget(self) -> None:
        """Drop what was read from disk (the next lookup reads the files again)."""
        self._files.clear()


def _describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev}" + (" (Triton interpreter)" if _interpreted(dev) else "")


#: The gate dispatch consults (registered below).
GATE = Gate()
backends.set_verifier(GATE)


def status(device: torch.device | str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """For each kernel backend and op, what the gate knows on ``device``: ``{"status": "verified" | "failed" |
    "unverified", "detail": ...}`` from the disk cache, or ``"excluded"`` with the reason for what this process
    excluded (a failed self-test or a kernel launch that raised)."""
    dev = _device(device)
    excluded = backends.excluded()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in KERNEL_BACKENDS:
        per_op = {}
        for op in OPS:
            passed, detail = GATE.lookup(name, op, dev)
            state = "unverified" if passed is None else ("verified" if passed else "failed")
            why = [why for (b, o, d), why in excluded.items() if b == name and o == op and d.split(":")[0] == dev.type]
            if why:
                state, detail = "excluded", "; ".join(why)
            per_op[op] = {"status": state, "detail": detail}
        out[name] = per_op
    return out


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastvit.selftest``; returns the exit status (0: everything that ran passed)."""
    parser = argparse.ArgumentParser(prog="python -m fastvit.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", action="append", choices=KERNEL_BACKENDS, help="kernel backend to check (repeatable; default: all)"
    )
    parser.add_argument("--ops", help=f"comma-separated ops (default: all of {', '.join(OPS)})")
    parser.add_argument("--device", help="device to check on (default: the current CUDA device, else cpu)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH")
    parser.add_argument("--full", action="store_true", help="every shape, also under the Triton interpreter")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar / lines on stderr")
    args = parser.parse_args(argv)
    try:
        report = run(
            args.backend, args.ops, args.device, quick=False if args.full else None, progress=not args.no_progress
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(report.table())
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report.as_dict(), f, indent=2)
    return 0 if report.passed else 1
