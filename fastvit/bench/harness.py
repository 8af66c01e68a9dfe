"""Timing, memory, cost models, rooflines and the environment record shared by every ``fastvit-bench`` subcommand.

Accuracy is judged by the test suite's oracle, :mod:`fastvit.testing` (one rule, one tolerance table).

Timing follows ``triton.testing.do_bench``: on CUDA, one pair of CUDA events per repetition, a warm-up sized from a
first estimate, the L2 cache flushed before every repetition by writing a 256 MB buffer, inputs rotated across
repetitions, and the median (plus quantiles) reported. On the CPU the same loop runs with ``time.perf_counter``.

Cost models (:func:`flops`, :func:`bytes_moved`) count the work an op must do (FLOPs) and the minimum traffic it must
move to and from memory (bytes), so a time turns into TFLOP/s, GB/s and a fraction of the roofline whose two ceilings
(copy bandwidth and GEMM rate) :func:`measure_roofline` measures in the same run.

Units everywhere: times in milliseconds (``*_ms``), memory and traffic in bytes, rates in TFLOP/s (1e12 FLOP/s) and
GB/s (1e9 bytes/s).
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "COST_MODELS",
    "MODES",
    "AttentionCost",
    "LayerNormCost",
    "LinearCost",
    "MaeUnshuffleCost",
    "MlpCost",
    "PatchEmbedCost",
    "Record",
    "Roofline",
    "Timing",
    "bytes_moved",
    "device_synchronize",
    "do_bench",
    "element_size",
    "environment",
    "flops",
    "free_memory",
    "measure_peak_memory",
    "measure_roofline",
    "parse_dtype",
    "rates",
    "release_flush_buffer",
]

#: Benchmark modes: forward only, backward only (graph built outside the timed region), forward + backward.
MODES: tuple[str, ...] = ("fwd", "bwd", "fwd_bwd")

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}

L2_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buffer: torch.Tensor | None = None


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``"fp16"`` / ``"fp32"`` / ``"fp64"`` (and their aliases) -> ``torch.dtype``.

    Raises:
        ValueError: an unknown name.
    """
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def device_synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, so the next memory measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _flush_l2(device: torch.device) -> None:
    global _flush_buffer
    if _flush_buffer is None or _flush_buffer.device != device:
        _flush_buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    _flush_buffer.zero_()


def release_flush_buffer() -> None:
    """Free the 256 MB L2-flush buffer (it is re-allocated on the next timed CUDA run)."""
    global _flush_buffer
    _flush_buffer = None


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Distribution of per-repetition times of one benchmarked callable.

    Attributes:
        median_ms: median time of one repetition, milliseconds.
        mean_ms, min_ms, max_ms: mean, fastest and slowest repetition, milliseconds.
        q20_ms, q80_ms: 20th and 80th percentiles, milliseconds.
        reps: timed repetitions; warmup: untimed repetitions before them.
        timer: ``"cuda_event"`` or ``"perf_counter"``.
        l2_flushed: whether the L2 cache was flushed before each repetition.
        input_sets: how many input sets were rotated across repetitions.
    """

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    q20_ms: float
    q80_ms: float
    reps: int
    warmup: int
    timer: str
    l2_flushed: bool
    input_sets: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)


def _quantile(sorted_times: list[float], q: float) -> float:
    if len(sorted_times) == 1:
        return sorted_times[0]
    pos = q * (len(sorted_times) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_times) - 1)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (pos - lo)


def do_bench(
    fn: Callable[..., Any],
    *,
    device: torch.device | str,
    inputs: Sequence[Any] | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int | None = None,
    max_reps: int = 1000,
    max_warmup: int = 100,
    flush_l2: bool = True,
    grad_to_none: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]] | None = None,
) -> Timing:
    """Time ``fn`` the way ``triton.testing.do_bench`` does, on CUDA or on the CPU.

    Args:
        fn: the work to time. Called as ``fn(inputs[i % len(inputs)])`` when ``inputs`` is given, else ``fn()``.
        device: where ``fn`` runs; ``cuda`` uses CUDA events, anything else ``time.perf_counter``.
        inputs: input sets rotated across repetitions, so consecutive repetitions do not hit the same addresses.
        warmup_ms: approximate warm-up budget, milliseconds (at least one warm-up call is always made).
        rep_ms: approximate budget of the timed repetitions, milliseconds.
        min_reps, max_reps: bounds on the number of timed repetitions (``min_reps`` default: 5 on CUDA, 3 on the
            CPU); ``max_warmup`` bounds the warm-up calls.
        flush_l2: on CUDA, write a 256 MB buffer before each repetition (outside the timed region) so each
            repetition starts with a cold L2, as a layer inside a real model does.
        grad_to_none: tensors (or a callable returning them) whose ``.grad`` is reset to ``None`` before each
            repetition, outside the timed region -- so backward passes do not accumulate.

    Returns:
        A :class:`Timing` (milliseconds per repetition).
    """
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    sets = list(inputs) if inputs is not None else [None]

    def call(i: int) -> Any:
        return fn(sets[i % len(sets)]) if inputs is not None else fn()

    def reset_grads() -> None:
        if grad_to_none is None:
            return
        for t in grad_to_none() if callable(grad_to_none) else grad_to_none:
            t.grad = None

    # First estimate (also the first warm-up: compiles, autotunes, allocator growth).
    reset_grads()
    call(0)
    device_synchronize(device)
    n_est = 3 if is_cuda else 1
    if min_reps is None:
        min_reps = 5 if is_cuda else 3
    t0 = time.perf_counter()
    for i in range(n_est):
        reset_grads()
        if is_cuda and flush_l2:
            _flush_l2(device)
        call(i)
    device_synchronize(device)
    est_ms = max((time.perf_counter() - t0) * 1e3 / n_est, 1e-4)
    n_warmup = max(1, min(max_warmup, int(warmup_ms / est_ms)))
    n_reps = max(min_reps, min(max_reps, int(rep_ms / est_ms)))

    for i in range(n_warmup):
        reset_grads()
        call(i)
    device_synchronize(device)

    times: list[float] = []
    if is_cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
        for i in range(n_reps):
            reset_grads()
            if flush_l2:
                _flush_l2(device)
            starts[i].record()
            call(i)
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(n_reps):
            reset_grads()
            t = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return Timing(
        median_ms=statistics.median(times),
        mean_ms=statistics.fmean(times),
        min_ms=times[0],
        max_ms=times[-1],
        q20_ms=_quantile(times, 0.2),
        q80_ms=_quantile(times, 0.8),
        reps=n_reps,
        warmup=n_warmup + 1 + n_est,
        timer="cuda_event" if is_cuda else "perf_counter",
        l2_flushed=bool(is_cuda and flush_l2),
        input_sets=len(sets),
    )


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str, *, relative: bool = True) -> int | None:
    """Peak CUDA memory of one call of ``fn``, in bytes (``None`` on the CPU, where it is not measured).

    Args:
        fn: the work; called once. Whatever it returns is dropped after the measurement.
        device: the device ``fn`` runs on.
        relative: ``True`` reports the peak *above* what was allocated just before the call (outputs, workspace and
            saved activations the call adds -- the inputs already exist); ``False`` reports the absolute
            ``torch.cuda.max_memory_allocated`` of the process during the call.
    """
    device = torch.device(device)
    if device.type != "cuda":
        out = fn()
        del out
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return int(peak - base) if relative else int(peak)


# ----------------------------------------------------------------------------------------------- cost models
# Each op family declares its cost models (fastvit.declare.OpDeclaration.costs); they are collected here by name.
from fastvit.declare import DECLARATIONS as _DECLARATIONS  # noqa: E402
from fastvit.families.attention import AttentionCost  # noqa: E402  (re-exported)
from fastvit.families.layer_norm import LayerNormCost  # noqa: E402
from fastvit.families.linear import LinearCost, MlpCost  # noqa: E402
from fastvit.families.mae import MaeUnshuffleCost  # noqa: E402
from fastvit.families.patch_embed import PatchEmbedCost  # noqa: E402

COST_MODELS: dict[str, type] = {name: cls for decl in _DECLARATIONS.values() for name, cls in decl.costs.items()}


def flops(op: str, mode: str = "fwd", **shape: int) -> int:
    """FLOPs of ``op`` in ``mode`` for ``shape`` (the fields of the op's cost class in :data:`COST_MODELS`).

    Example: ``flops("attention", B=2, N=197, H=12, D=64)`` = 4·2·12·197²·64.

    Raises:
        ValueError: unknown op or mode; TypeError: missing or unknown shape fields.
    """
    return _cost(op, shape).flops(mode)


def bytes_moved(op: str, mode: str = "fwd", **shape: int) -> int:
    """Minimum bytes ``op`` moves to/from memory in ``mode`` for ``shape`` (see :func:`flops`)."""
    return _cost(op, shape).bytes(mode)


def _cost(op: str, shape: dict[str, int]) -> Any:
    try:
        cls = COST_MODELS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(COST_MODELS)}") from None
    return cls(**shape)


# ----------------------------------------------------------------------------------------------- rooflines
@dataclass
class Roofline:
    """The two ceilings of the roofline, measured on this device in this run.

    Attributes:
        copy_gbps: device-to-device copy bandwidth, GB/s (bytes read + bytes written per second / 1e9).
        gemm_tflops: dense matmul rate, TFLOP/s, at ``gemm_dtype``.
        gemm_dtype: dtype of the GEMM measurement (``bfloat16`` on CUDA by default, ``float32`` on the CPU).
        copy_bytes: size of the copied buffer, bytes; gemm_size: the square GEMM's side.
        copy_ms, gemm_ms: the median times behind the two numbers, milliseconds.
    """

    copy_gbps: float
    gemm_tflops: float
    gemm_dtype: str
    copy_bytes: int
    gemm_size: int
    copy_ms: float
    gemm_ms: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)


def measure_roofline(device: torch.device | str, gemm_dtype: torch.dtype | None = None) -> Roofline:
    """Measure copy bandwidth and GEMM rate on ``device``.

    On CUDA: copy of a 1 GiB buffer and an 8192³ matmul in ``gemm_dtype`` (default bf16). On the CPU: a 32 MiB
    copy and a 512³ fp32 matmul (small: this is a 2-core box shared with others; the numbers only need to be of
    the right order to put CPU results in context).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if gemm_dtype is None:
        gemm_dtype = torch.bfloat16 if cuda else torch.float32
    copy_bytes = (1 << 30) if cuda else (32 << 20)
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = do_bench(lambda: dst.copy_(src), device=device, flush_l2=False, warmup_ms=10, rep_ms=50 if cuda else 30)
    src = dst = None  # free the buffers before the GEMM ceiling (the lambda above is done with them)
    n = 8192 if cuda else 512
    a = torch.randn(n, n, device=device, dtype=gemm_dtype)
    b = torch.randn(n, n, device=device, dtype=gemm_dtype)
    t_gemm = do_bench(
        lambda: torch.matmul(a, b), device=device, flush_l2=False, warmup_ms=10, rep_ms=50 if cuda else 30
    )
    a = b = None
    free_memory(device)
    return Roofline(
        copy_gbps=2 * copy_bytes / (t_copy.median_ms * 1e-3) / 1e9,
        gemm_tflops=2 * n**3 / (t_gemm.median_ms * 1e-3) / 1e12,
        gemm_dtype=str(gemm_dtype).replace("torch.", ""),
        copy_bytes=copy_bytes,
        gemm_size=n,
        copy_ms=t_copy.median_ms,
        gemm_ms=t_gemm.median_ms,
    )


def rates(ms: float, n_flops: int | None, n_bytes: int | None, roofline: Roofline | None) -> dict[str, float | None]:
    """TFLOP/s, GB/s and the fraction of the roofline reached by a measured time.

    Args:
        ms: measured median time, milliseconds.
        n_flops: FLOPs of the work (``None``: unknown); n_bytes: minimum bytes moved (``None``: unknown).
        roofline: the measured ceilings.

    Returns:
        ``{"tflops", "gbps", "roofline_ms", "roofline_fraction"}`` where ``roofline_ms = max(flops / gemm rate,
        bytes / copy bandwidth)`` is the fastest time the two ceilings allow and ``roofline_fraction =
        roofline_ms / ms`` (1.0 = at the roofline). Entries are ``None`` where an input is missing.
    """
    s = ms * 1e-3
    out: dict[str, float | None] = {
        "tflops": n_flops / s / 1e12 if n_flops is not None and s > 0 else None,
        "gbps": n_bytes / s / 1e9 if n_bytes is not None and s > 0 else None,
        "roofline_ms": None,
        "roofline_fraction": None,
    }
    if roofline is not None and (n_flops is not None or n_bytes is not None) and s > 0:
        t_c = (n_flops or 0) / (roofline.gemm_tflops * 1e12) if roofline.gemm_tflops > 0 else 0.0
        t_m = (n_bytes or 0) / (roofline.copy_gbps * 1e9) if roofline.copy_gbps > 0 else 0.0
        best = max(t_c, t_m)
        out["roofline_ms"] = best * 1e3
        out["roofline_fraction"] = best / s
    return out


# ----------------------------------------------------------------------------------------------- environment
def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if shutil.which("git") is None:
        return None
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = res.stdout.strip().splitlines()
    return lines[0].strip() if res.returncode == 0 and lines else None


def environment(device: torch.device | str) -> dict[str, Any]:
    """Everything needed to reproduce a result: :func:`fastvit.info.collect` plus the run's device details.

    Keys added to ``collect()``'s: ``device_type``, ``device_name``, ``driver`` (NVIDIA driver, CUDA only),
    ``cuda_runtime`` (torch's CUDA version), ``cudnn``, ``compute_capability``, ``gpu_memory_bytes``,
    ``sm_count``, ``git_commit`` (``git rev-parse HEAD`` of the checkout, ``None`` outside git), ``hostname``,
    ``cpu_count``, ``timestamp`` (UTC, ISO 8601) and ``torch_num_threads``.
    """
    from fastvit.info import collect

    device = torch.device(device)
    env = collect()
    env.update(
        device_type=device.type,
        device_name=None,
        driver=None,
        cuda_runtime=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        compute_capability=None,
        gpu_memory_bytes=None,
        sm_count=None,
        git_commit=_git_commit(),
        hostname=platform.node(),
        cpu_count=os.cpu_count(),
        torch_num_threads=torch.get_num_threads(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            driver=_nvidia_driver(),
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=int(props.total_memory),
            sm_count=int(props.multi_processor_count),
        )
    else:
        env["device_name"] = platform.processor() or platform.machine() or "cpu"
    return env


@dataclass
class Record:
    """One row of results: a provider on one configuration (see ``benchmarks/README.md`` for every key).

    ``status`` is ``"ok"`` (timed), ``"FAILED"`` (wrong answer: not timed), ``"skipped"`` (cannot run here;
    ``reason`` says why), ``"error"`` (raised; ``reason`` holds the message) or ``"oom"``.
    """

    provider: str
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON-serialisable dict: provider, status, reason, the config keys, then the metrics."""
        return {"provider": self.provider, "status": self.status, "reason": self.reason, **self.config, **self.metrics}
