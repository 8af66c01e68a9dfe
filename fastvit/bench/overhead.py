"""Host overhead of fastvit: what dispatch adds per op, and a host-bound model against timm's (``fastvit-bench
overhead``).

Two measurements, each a pair of variants timed A/B interleaved -- the variants alternate rep by rep (A B, B A,
A B, ...), so drift of a shared machine (frequency, other processes) hits both -- and reported as medians with the
interquartile range over the reps:

* **ops**: for every op of :mod:`fastvit.ops` (each op's declaration gives its tiny calls; ``layer_norm``
  also with the fused residual) on tiny tensors, ``fastvit.ops.<op>(...)`` (argument checks, call description,
  backend selection, then the kernel) against the implementation that selection picks called directly
  (``fastvit.backends.select(op, call)[1](...)`` on the same, already valid, arguments). The difference is the
  host cost of the public entry (reported; no target: checking the operands in Python costs a few µs by itself).
* **model**: a 12-block ViT with embed dim 64 on 32×32 images (timm's ``VisionTransformer(img_size=32,
  patch_size=8, embed_dim=64, depth=12, num_heads=2)``, 17 tokens) against ``fastvit.from_timm`` of it (same
  weights), inference under ``torch.no_grad`` and a training step (forward + backward, no optimizer). At this size
  a step is host-bound, so the ratio fastvit / timm measures host paths; the target is at most 1.10 for both.

Timing: :class:`torch.utils.benchmark.Timer` (``timeit(number)`` per rep, which synchronises CUDA when timing on a
GPU); each rep's sample is the mean of ``number`` calls. The clock (:func:`clock_for`): on a GPU wall time
(``time.perf_counter``); on the CPU by default the calling thread's CPU time (``time.thread_time``) -- the host cost
itself, which time slices lost to other processes of a shared machine do not inflate (with one torch thread, as
``--threads 1`` sets, all the work is on that thread); ``clock="wall"`` measures wall time there too. Differences and ratios are computed per rep pair, then
summarised, so the pairing the interleaving buys is kept.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = [
    "CLOCKS",
    "MODEL_RATIO_TARGET",
    "OpCase",
    "clock_for",
    "interleaved",
    "measure_model",
    "measure_ops",
    "op_cases",
    "summary",
]

#: The target: the fastvit / timm ratio of the host-bound model step (inference and training). The per-op time is
#: reported, with no target: a Python entry that checks its operands costs a few microseconds by itself.
MODEL_RATIO_TARGET = 1.10


#: Clocks :func:`interleaved` can time with.
CLOCKS = ("thread", "wall")


def clock_for(device: torch.device | str, clock: str | None = None) -> tuple[str, Callable[[], float]]:
    """``(name, timer)`` for timing host work on ``device``: ``clock`` (``"thread"``: ``time.thread_time``,
    ``"wall"``: ``time.perf_counter``), or by default thread time on the CPU and wall time elsewhere (a GPU's work
    runs off the host thread, so only wall time sees it).

    Raises:
        ValueError: an unknown ``clock``, or ``"thread"`` for a non-CPU device.
    """
    import time

    device_type = torch.device(device).type
    if clock is None:
        clock = "thread" if device_type == "cpu" else "wall"
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "thread" and device_type != "cpu":
        raise ValueError(f"clock 'thread' measures host CPU time only; use 'wall' on {device_type}")
    return clock, (time.thread_time if clock == "thread" else time.perf_counter)


# ----------------------------------------------------------------------------------------------- statistics
def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summary(values: list[float], scale: float = 1.0, unit: str = "") -> dict[str, Any]:
    """Median, quartiles and IQR of ``values`` times ``scale`` (keys suffixed with ``_{unit}`` when given), plus the
    number of samples ``n``."""
    v = sorted(x * scale for x in values)
    sfx = f"_{unit}" if unit else ""
    q25, q75 = _quantile(v, 0.25), _quantile(v, 0.75)
    return {
        f"median{sfx}": statistics.median(v),
        f"q25{sfx}": q25,
        f"q75{sfx}": q75,
        f"iqr{sfx}": q75 - q25,
        "n": len(v),
    }


def interleaved(
    variants: dict[str, Callable[[], Any]],
    *,
    reps: int,
    number: int,
    warmup: int = 3,
    num_threads: int | None = None,
    timer: Callable[[], float] | None = None,
) -> dict[str, list[float]]:
    """Time two (or more) callables A/B interleaved: ``reps`` rounds, each timing every variant once over ``number``
    calls with :class:`torch.utils.benchmark.Timer`, the order reversed every other round.

    Args:
        variants: name -> zero-argument callable.
        reps: rounds (samples per variant).
        number: calls per sample (the sample is their mean).
        warmup: untimed calls of each variant first.
        num_threads: torch threads while timing (default: the current ``torch.get_num_threads()``).
        timer: the clock (default ``time.perf_counter``; see :func:`clock_for`).

    Returns:
        name -> ``reps`` per-call times in seconds, in round order (so ``times[a][i]`` and ``times[b][i]`` pair up).

    Raises:
        ValueError: ``reps`` or ``number`` below 1.
    """
    from torch.utils.benchmark import Timer

    if reps < 1 or number < 1:
        raise ValueError(f"reps and number must be >= 1, got reps={reps}, number={number}")
    threads = torch.get_num_threads() if num_threads is None else num_threads
    extra = {} if timer is None else {"timer": timer}
    timers = {
        name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, **extra) for name, fn in variants.items()
    }
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timers[name].timeit(number).median)
    return times


# ----------------------------------------------------------------------------------------------- ops
@dataclass(frozen=True)
class OpCase:
    """One op call on tiny tensors: ``fastvit.ops.<op>(*args, **kwargs)``; ``case`` names the row (``op`` plus a
    variant, e.g. ``layer_norm+residual``)."""

    case: str
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: Whether the call's checks read values by design: ``mae_unshuffle+given_ids`` adds the value check of indices
    #: that :func:`fastvit.ops.random_masking` did not make (a sort and a host read).
    value_check: bool = False


def op_cases(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[OpCase]:
    """The tiny calls timed for every declared op (each declaration's ``tiny_calls``: B = 2, N = 5 tokens, C = 8,
    2 heads of 4; patch 4 on 8×8 images), all valid. Index inputs come from :func:`fastvit.ops.random_masking` (as
    in an MAE step); a declaration may add a call on indices given by the caller (value-checked, not targeted).

    Raises:
        RuntimeError: a declared op has no tiny calls (its declaration must give some).
    """
    from fastvit import ops
    from fastvit.declare import DECLARATIONS

    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    # As an MAE step makes them (vouched for: no value check): B = 2, 4 patches (8×8 images, patch 4).
    _, ids_restore, _ = ops.random_masking(2, 4, 0.5, generator=torch.Generator(device).manual_seed(0), device=device)
    missing = [name for name, decl in DECLARATIONS.items() if decl.tiny_calls is None]
    if missing:
        raise RuntimeError(f"op(s) {missing} declare no tiny_calls for fastvit.bench.overhead")
    return [
        OpCase(name + c.variant, name, c.args, c.kwargs, value_check=c.value_check)
        for name, decl in DECLARATIONS.items()
        for c in decl.tiny_calls(t, ids_restore)
    ]


def measure_ops(
    *,
    device: torch.device | str = "cpu",
    reps: int = 30,
    number: int = 200,
    backend: str | None = None,
    progress: Callable[[str], None] | None = None,
    clock: str | None = None,
) -> list[dict[str, Any]]:
    """Dispatch overhead per op: ``fastvit.ops.<op>(...)`` against the selected implementation called directly.

    Args:
        device: where the tiny tensors live.
        reps, number: see :func:`interleaved`.
        backend: force a backend (``fastvit.use_backend``) for both variants; ``None``: automatic selection (on the
            CPU that is eager).
        progress: called with each case name before it is timed.
        clock: see :func:`clock_for`.

    Returns:
        One row per case: ``case``, ``op``, ``backend`` (the one selected), ``clock``, ``variants`` = ``{"fastvit.ops": s,
        "direct": s}`` with ``s`` = :func:`summary` in µs (``median_us``, ``q25_us``, ``q75_us``, ``iqr_us``, ``n``),
        ``added_us`` (the same summary of the per-rep differences) and ``value_check`` (the call's checks read values
        by design, so its added time is no dispatch cost).
    """
    import fastvit
    from fastvit import ops
    from fastvit.backends import select
    from fastvit.bench.providers import _call

    clock, timer = clock_for(device, clock)
    rows = []
    with fastvit.use_backend(backend):
        for c in op_cases(device):
            if progress:
                progress(c.case)
            public = getattr(ops, c.op)
            chosen, impl = select(c.op, _call(c.op, *c.args, **c.kwargs))
            # The same wrapper around both, so only what is inside the two calls differs.
            times = interleaved(
                {
                    "fastvit.ops": lambda f=public, a=c.args, kw=c.kwargs: f(*a, **kw),
                    "direct": lambda f=impl, a=c.args, kw=c.kwargs: f(*a, **kw),
                },
                reps=reps,
                number=number,
                timer=timer,
            )
            added = [a - b for a, b in zip(times["fastvit.ops"], times["direct"])]
            row = {
                "case": c.case,
                "op": c.op,
                "backend": chosen,
                "clock": clock,
                "variants": {name: summary(v, 1e6, "us") for name, v in times.items()},
                "added_us": summary(added, 1e6),
                "value_check": c.value_check,
            }
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- model
#: The host-bound model: timm ``VisionTransformer`` keyword arguments.
MODEL_KWARGS: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 12, "num_heads": 2}


def measure_model(
    *,
    device: torch.device | str = "cpu",
    batch: int = 2,
    reps: int = 30,
    number: int = 3,
    backend: str | None = None,
    progress: Callable[[str], None] | None = None,
    clock: str | None = None,
) -> dict[str, Any]:
    """fastvit (``fastvit.from_timm``, same weights) against timm on :data:`MODEL_KWARGS`, inference and training.

    Inference: ``model(images)`` under ``torch.no_grad`` (eval mode). Training step: ``model(images)``, a
    cross-entropy loss, ``backward()`` and ``zero_grad(set_to_none=True)`` (train mode, no optimizer). Before timing
    both models' inference outputs are judged by the oracle (:class:`fastvit.testing.ModelOracle`, float64 ``ref``).

    Args:
        device, reps, number: where and how long (see :func:`interleaved`; ``number`` steps per sample).
        batch: images per step.
        backend: force a fastvit backend; ``None``: automatic selection.
        clock: see :func:`clock_for`.

    Returns:
        ``{"config": ..., "batch", "params", "clock", "max_abs_diff": {"timm", "fastvit"}, "rows": [...]}`` with one row per mode (``inference``,
        ``train``): ``variants`` = ``{"timm": s, "fastvit": s}`` (:func:`summary` in ms), ``ratio`` (summary of the
        per-rep fastvit / timm ratios), ``target_ratio``, ``within_target``.

    Raises:
        ImportError: timm is not installed. AssertionError: a model fails the oracle.
    """
    import timm.models.vision_transformer as tvit

    import fastvit
    from fastvit.testing import ModelOracle, ref_dtype_for

    torch.manual_seed(0)
    timm_model = tvit.VisionTransformer(**MODEL_KWARGS).to(device)
    ours = fastvit.from_timm(timm_model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, MODEL_KWARGS["img_size"], MODEL_KWARGS["img_size"], generator=g).to(device)
    labels = torch.randint(0, timm_model.num_classes, (batch,), generator=g).to(device)
    models = {"timm": timm_model, "fastvit": ours}

    for m in models.values():
        m.eval()
    oracle = ModelOracle(ours, [images], lambda out: out, ref_dtype=ref_dtype_for(images.dtype))
    diff = {}
    for name, m in models.items():
        (res,) = oracle.judge(m, backend=backend)
        assert res.ok, f"{name}: {res.message}"
        diff[name] = res.err

    clock, timer = clock_for(device, clock)
    with fastvit.use_backend(backend):

        def infer(m: torch.nn.Module) -> Callable[[], Any]:
            def step() -> Any:
                with torch.no_grad():
                    return m(images)

            return step

        def train(m: torch.nn.Module) -> Callable[[], Any]:
            def step() -> None:
                torch.nn.functional.cross_entropy(m(images), labels).backward()
                m.zero_grad(set_to_none=True)

            return step

        rows = []
        for mode, make in (("inference", infer), ("train", train)):
            if progress:
                progress(mode)
            for m in models.values():
                m.train(mode == "train")
            times = interleaved({name: make(m) for name, m in models.items()}, reps=reps, number=number, timer=timer)
            ratios = [f / t for f, t in zip(times["fastvit"], times["timm"])]
            row = {
                "mode": mode,
                "variants": {name: summary(v, 1e3, "ms") for name, v in times.items()},
                "ratio": summary(ratios),
                "target_ratio": MODEL_RATIO_TARGET,
            }
            row["within_target"] = row["ratio"]["median"] <= MODEL_RATIO_TARGET
            rows.append(row)
    return {
        "config": {"timm": "VisionTransformer", **MODEL_KWARGS},
        "batch": batch,
        "clock": clock,
        "params": sum(p.numel() for p in ours.parameters()),
        "max_abs_diff": diff,
        "rows": rows,
    }
