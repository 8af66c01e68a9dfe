"""Benchmark providers: the implementations ``fastvit-bench`` puts side by side, and the runners that time them.

Attention providers all start from the packed ``qkv`` (B, N, 3·C) a ViT's ``qkv`` Linear produces and end at the
(B, N, C) input of ``proj``, so layout copies (timm's reshape/permute, the transpose of the output) are part of what
is timed. Model providers build the same ViT configuration in fastvit (per backend), timm and Hugging Face
transformers. Scaling components time single fastvit ops with a model's shapes as the image size grows.

The three runners share one loop, :func:`run_case` (prepare, check, time, classify what went wrong). It checks accuracy
before timing: a provider whose output (and gradients, when the mode has a backward) fails the test suite's oracle
(:mod:`fastvit.testing`: ``max|out − ref| ≤ 2·max|pt − ref| + atol(dtype)·max(1, max|ref|)``) is reported ``FAILED``
and not timed. Every dispatch call description the benchmark needs comes from one helper, :func:`_call`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastvit import reference
from fastvit.bench import harness
from fastvit.bench.harness import Record, Roofline
from fastvit.testing import ModelOracle, OracleResult, oracle_compare, ref_dtype_for

__all__ = [
    "AttentionProvider",
    "AttentionSpec",
    "ModelSpec",
    "Skip",
    "attention_providers",
    "model_config",
    "run_attention_case",
    "run_case",
    "run_model",
    "run_scaling_point",
    "scaling_components",
    "vit_flops",
]

FASTVIT_BACKENDS: tuple[str, ...] = ("eager", "triton", "cuda")


def _first_line(exc: BaseException | str, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    if isinstance(exc, BaseException):
        msg = f"{type(exc).__name__}: {msg}"
    return msg[:limit]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _unsupported_message(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return (
        any(
            s in msg
            for s in ("no available kernel", "no viable backend", "not supported", "cannot run", "backendnotsupported")
        )
        or type(exc).__name__ == "BackendNotSupportedError"
    )


# =============================================================================================== dispatch calls
def _call(op: str, *args: Any, **kwargs: Any) -> Any:
    """The call description ``fastvit.ops.<op>(*args, **kwargs)`` dispatches on (what ``backends.select`` takes): the
    one place the benchmark builds one, by :func:`fastvit.ops.describe_call` (the op's own checks and typed
    :class:`fastvit.backends.Call`)."""
    from fastvit.ops import describe_call

    return describe_call(op, *args, **kwargs)


def _fastvit_reasons(backend: str, op: str, call: Any) -> list[str]:
    from fastvit.backends import get_backend

    return list(get_backend(backend).not_supported_reasons(op, call))


# =============================================================================================== the runner
class Skip(Exception):
    """Raised by a case's ``prepare`` when the provider cannot run here; the message is the reason."""


def _closeness(r: OracleResult) -> float:
    """How close a result is to failing (err / bound; inf when it failed without numbers)."""
    if r.err is None or r.bound is None or not math.isfinite(r.err):
        return math.inf
    return r.err / r.bound if r.bound > 0 else (math.inf if r.err > 0 else 0.0)


def _accuracy_metrics(results: list[OracleResult]) -> dict[str, Any]:
    """``max_abs_diff`` / ``tolerance`` of the first result (the output) and ``max_abs_diff_grad`` /
    ``tolerance_grad`` of the gradient closest to failing among the rest."""
    if not results:
        return {}
    out = {"max_abs_diff": results[0].err, "tolerance": results[0].bound}
    if len(results) > 1:
        worst = max(results[1:], key=_closeness)
        out.update(max_abs_diff_grad=worst.err, tolerance_grad=worst.bound)
    return out


def run_case(
    provider: str,
    config: dict[str, Any],
    *,
    prepare: Callable[[Record], Any],
    check: Callable[[Any], list[OracleResult]],
    time: Callable[[Any], dict[str, Any]],
    device: torch.device,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Record:
    """Check, then time, one provider on one configuration: the loop every runner (attention, model, scaling) shares.

    Steps, all inside ``context()`` (e.g. an SDPA backend restriction) with warnings recorded:

    1. ``state = prepare(record)`` builds what is timed (a callable, a model); it may annotate ``record`` (config,
       metrics) and raises :class:`Skip` (``skipped``, the record's metrics dropped) when the provider cannot run here.
    2. ``check(state)`` returns the oracle's verdicts (:func:`fastvit.testing.oracle_compare`): output first, then
       gradients. Any failure: ``FAILED`` (not timed), the reason naming the first failing tensor.
    3. ``time(state)`` returns the timing metrics.

    An exception anywhere is classified: ``oom`` (CUDA out of memory), ``skipped`` (the provider says it cannot run
    the call: "No available kernel", :class:`fastvit.BackendNotSupportedError`, ...) or ``error``; the reason is its
    first line plus the warnings it emitted (SDPA explains there why a backend declined). ``state`` is dropped and
    memory freed before returning, so nothing of this provider counts in the next one's peak memory.

    Returns:
        The :class:`Record`: ``config``, ``metrics`` (start value ``metrics``) plus
        ``max_abs_diff``, ``tolerance`` (and ``max_abs_diff_grad``, ``tolerance_grad`` with gradients), the timing
        metrics and ``warnings`` (up to 5 distinct first lines) when any were emitted.
    """
    rec = Record(provider, "ok", dict(config), None, dict(metrics or {}))
    caught: list = []
    state = None
    try:
        with (
            context() if context is not None else contextlib.nullcontext(),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            state = prepare(rec)
            results = check(state)
            rec.metrics.update(_accuracy_metrics(results))
            bad = [r for r in results if not r.ok]
            if bad:
                rec.status = "FAILED"
                rec.reason = f"differs from the reference beyond tolerance: {bad[0].message}"[:500]
                return rec
            rec.metrics.update(time(state))
            if caught:
                rec.metrics["warnings"] = sorted({_first_line(str(w.message)) for w in caught})[:5]
    except Skip as exc:
        rec.status, rec.reason, rec.metrics = "skipped", str(exc), {}
    except Exception as exc:  # noqa: BLE001 -- report, do not abort the sweep
        why = "; ".join(dict.fromkeys(_first_line(str(w.message), 200) for w in caught or []))
        rec.reason = _first_line(exc) + (f" ({why})" if why else "")
        rec.status = "oom" if _is_oom(exc) else ("skipped" if _unsupported_message(exc) else "error")
    finally:
        state = None  # drop the provider's model / callable before measuring the next one
        harness.free_memory(device)
    return rec


def _timing_metrics(
    t: harness.Timing, n_flops: int | None, n_bytes: int | None, roofline: Roofline | None
) -> dict[str, Any]:
    r = harness.rates(t.median_ms, n_flops, n_bytes, roofline)
    return {
        "ms": t.median_ms,
        "ms_q20": t.q20_ms,
        "ms_q80": t.q80_ms,
        "ms_min": t.min_ms,
        "tflops": r["tflops"],
        "gbps": r["gbps"],
        "roofline_ms": r["roofline_ms"],
        "roofline_fraction": r["roofline_fraction"],
        "reps": t.reps,
        "timer": t.timer,
        "l2_flushed": t.l2_flushed,
        "input_sets": t.input_sets,
    }


# =============================================================================================== attention
@dataclass(frozen=True)
class AttentionSpec:
    """One attention configuration: B batch, N tokens, H heads, D head dim, dtype, device; with ``rope``, rotary
    position embeddings on q and k (timm's ``cat([sin, cos], -1)`` table, see :meth:`rope_table`) after
    ``num_prefix_tokens`` unrotated tokens (cls, registers), as timm's ``EvaAttention`` computes them."""

    B: int
    N: int
    H: int
    D: int
    dtype: torch.dtype
    device: torch.device
    rope: bool = False
    num_prefix_tokens: int = 0

    def rope_table(self) -> torch.Tensor | None:
        """The rotary table of a ``rope`` spec: fp32 (N - num_prefix_tokens, 2·D) ``cat([sin, cos], -1)`` on the
        spec's device, the 1D RoPE of RoFormer (Su et al., 2021: angle ``p · 10000^(-2i/D)`` for token p and pair
        i) in timm's interleaved layout (each angle repeated for the two columns of its pair). Time and memory do
        not depend on the angles, so a 1D table stands for timm's 2D ones. ``None`` without ``rope``."""
        if not self.rope:
            return None
        n = max(self.N - self.num_prefix_tokens, 0)
        inv_freq = 10000.0 ** (-torch.arange(0, self.D, 2, dtype=torch.float64) / self.D)
        angles = (torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]).repeat_interleave(2, dim=1)
        return torch.cat([angles.sin(), angles.cos()], -1).to(device=self.device, dtype=torch.float32)

    def rope_kwargs(self) -> dict[str, Any]:
        """The rotary keyword arguments of :func:`fastvit.ops.attention` for this spec (empty without ``rope``)."""
        if not self.rope:
            return {}
        return {"rope": self.rope_table(), "num_prefix_tokens": self.num_prefix_tokens}

    @property
    def C(self) -> int:
        """Embed dim H·D."""
        return self.H * self.D

    def config(self) -> dict[str, Any]:
        """JSON-friendly description (B, N, H, D, C, dtype; ``rope`` and ``num_prefix_tokens`` with rope)."""
        out = {
            "B": self.B,
            "N": self.N,
            "H": self.H,
            "D": self.D,
            "C": self.C,
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        if self.rope:
            out.update(rope=True, num_prefix_tokens=self.num_prefix_tokens)
        return out


class AttentionProvider:
    """One attention implementation taking packed qkv (B, N, 3·C) to (B, N, C).

    Subclasses set ``name`` and implement :meth:`reasons` (why it cannot run a spec; empty when it can) and
    :meth:`build` (the callable to time). :meth:`context` wraps both the accuracy check and the timing loop (SDPA
    backend selection lives there, outside the timed call).
    """

    name = "?"
    description = ""

    def reasons(self, spec: AttentionSpec, mode: str) -> list[str]:
        """Why this provider cannot run ``spec`` in ``mode`` here (empty list: it can)."""
        return []

    def build(self, spec: AttentionSpec) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable ``qkv (B, N, 3·C) -> out (B, N, C)``."""
        raise NotImplementedError

    def context(self) -> contextlib.AbstractContextManager:
        """Context entered around the accuracy check and the timing loop."""
        return contextlib.nullcontext()


class FastvitAttention(AttentionProvider):
    """``fastvit.ops.attention(qkv, H, backend=...)`` on one fastvit backend (eager, triton or cuda)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"fastvit-{backend}"
        self.description = f"fastvit.ops.attention(qkv, H, backend={backend!r})"

    def reasons(self, spec: AttentionSpec, mode: str) -> list[str]:
        qkv = torch.empty(spec.B, spec.N, 3 * spec.C, device=spec.device, dtype=spec.dtype)  # what the call sees
        return _fastvit_reasons(self.backend, "attention", _call("attention", qkv, spec.H, **spec.rope_kwargs()))

    def build(self, spec: AttentionSpec) -> Callable[[torch.Tensor], torch.Tensor]:
        from fastvit import ops

        H, backend, kw = spec.H, self.backend, spec.rope_kwargs()  # with rope: q and k rotated inside the kernel
        return lambda qkv: ops.attention(qkv, H, backend=backend, **kw)


_SDPA_NAMES = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


class SdpaAttention(AttentionProvider):
    """timm's attention path: reshape/permute packed qkv, ``F.scaled_dot_product_attention`` restricted to one
    SDPA backend with ``torch.nn.attention.sdpa_kernel``, transpose + reshape the output (the copies timm pays).
    With rope, q and k are rotated first by separate ops, as timm's ``EvaAttention`` does (prefix tokens split off,
    the rotation computed in fp32 against the fp32 table, concatenated back and cast to v's dtype)."""

    def __init__(self, short: str) -> None:
        self.short = short
        self.name = f"sdpa-{short}"
        self.description = f"timm path, SDPBackend.{_SDPA_NAMES[short]}"

    def _backend(self) -> Any:
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, _SDPA_NAMES[self.short], None)

    def reasons(self, spec: AttentionSpec, mode: str) -> list[str]:
        try:
            from torch.nn.attention import sdpa_kernel  # noqa: F401
        except ImportError as exc:
            return [f"torch.nn.attention.sdpa_kernel unavailable: {exc}"]
        if self._backend() is None:
            return [f"this torch has no SDPBackend.{_SDPA_NAMES[self.short]}"]
        if spec.device.type == "cpu" and self.short in ("efficient", "cudnn"):
            return [f"SDPA {_SDPA_NAMES[self.short]} has no CPU kernel"]
        return []

    def context(self) -> contextlib.AbstractContextManager:
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self._backend())

    def build(self, spec: AttentionSpec) -> Callable[[torch.Tensor], torch.Tensor]:
        H, D, C = spec.H, spec.D, spec.C
        table, npt = spec.rope_table(), spec.num_prefix_tokens

        def fn(qkv: torch.Tensor) -> torch.Tensor:
            B, N, _ = qkv.shape
            q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            if table is not None:  # timm's unfused rotation: separate ops, rotated copies of q and k
                q = reference.rotary(q, table, npt, plain=True)  # in q's dtype, as timm's .type_as(v)
                k = reference.rotary(k, table, npt, plain=True)
            o = F.scaled_dot_product_attention(q, k, v)
            return o.transpose(1, 2).reshape(B, N, C)

        return fn


class FlashAttnProvider(AttentionProvider):
    """FlashAttention's ``flash_attn_qkvpacked_func`` on a (B, N, 3, H, D) view of the packed qkv (no copy)."""

    name = "flash-attn"
    description = "flash_attn.flash_attn_qkvpacked_func"

    def reasons(self, spec: AttentionSpec, mode: str) -> list[str]:
        if spec.rope:
            return ["rope: timm's cat([sin, cos]) tables are not benchmarked through flash_attn's rotary layout"]
        try:
            import flash_attn  # noqa: F401
        except Exception as exc:  # ImportError, or a broken build raising at import
            return [f"flash_attn is not importable ({_first_line(exc)})"]
        out = []
        if spec.device.type != "cuda":
            out.append("flash_attn needs a CUDA device")
        if spec.dtype not in (torch.float16, torch.bfloat16):
            out.append(f"flash_attn supports fp16/bf16 only, got {spec.dtype}")
        if spec.D > 256:
            out.append(f"flash_attn supports head_dim <= 256, got {spec.D}")
        return out

    def build(self, spec: AttentionSpec) -> Callable[[torch.Tensor], torch.Tensor]:
        from flash_attn import flash_attn_qkvpacked_func

        H, D, C = spec.H, spec.D, spec.C

        def fn(qkv: torch.Tensor) -> torch.Tensor:
            B, N, _ = qkv.shape
            return flash_attn_qkvpacked_func(qkv.view(B, N, 3, H, D)).reshape(B, N, C)

        return fn


class XformersProvider(AttentionProvider):
    """xformers' ``memory_efficient_attention`` on strided (B, N, H, D) views of the packed qkv."""

    name = "xformers"
    description = "xformers.ops.memory_efficient_attention"

    def reasons(self, spec: AttentionSpec, mode: str) -> list[str]:
        if spec.rope:
            return ["rope: xformers has no rotary attention"]
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:
            return [f"xformers is not importable ({_first_line(exc)})"]
        if spec.device.type != "cuda":
            return ["xformers memory_efficient_attention is benchmarked on CUDA only"]
        return []

    def build(self, spec: AttentionSpec) -> Callable[[torch.Tensor], torch.Tensor]:
        import xformers.ops as xops

        H, D, C = spec.H, spec.D, spec.C

        def fn(qkv: torch.Tensor) -> torch.Tensor:
            B, N, _ = qkv.shape
            q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
            return xops.memory_efficient_attention(q, k, v).reshape(B, N, C)

        return fn


def attention_providers() -> list[AttentionProvider]:
    """Every attention provider, in report order: fastvit backends, SDPA backends, FlashAttention, xformers."""
    return (
        [FastvitAttention(b) for b in FASTVIT_BACKENDS]
        + [SdpaAttention(s) for s in _SDPA_NAMES]
        + [FlashAttnProvider(), XformersProvider()]
    )


def _attention_reference(
    qkv: torch.Tensor, dout: torch.Tensor | None, H: int, rope_kwargs: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Reference output (and dqkv) in high precision, plus the same math in the input precision (with
    ``rope_kwargs``: the rotary arguments of :meth:`AttentionSpec.rope_kwargs`)."""
    out: dict[str, torch.Tensor] = {}
    for key, dt in (("ref", ref_dtype_for(qkv.dtype)), ("pt", qkv.dtype)):
        x = qkv.detach().to(dt).requires_grad_(dout is not None)
        o = reference.attention(x, H, plain=True, **(rope_kwargs or {}))  # the oracle's pt: no upcast
        out[key] = o.detach()
        if dout is not None:
            (g,) = torch.autograd.grad(o, x, dout.to(dt))
            out[key + "_grad"] = g
    return out


def _check_batch(spec: AttentionSpec, budget_bytes: int) -> int:
    """Largest batch whose fp32/fp64 reference N×N matrices fit ``budget_bytes`` (accuracy is checked on it)."""
    per_sample = spec.H * spec.N * spec.N * harness.element_size(ref_dtype_for(spec.dtype)) * 4
    return max(1, min(spec.B, budget_bytes // max(per_sample, 1)))


def run_attention_case(
    spec: AttentionSpec,
    mode: str,
    providers: list[AttentionProvider],
    roofline: Roofline | None,
    *,
    bench: dict[str, Any] | None = None,
    check_budget_bytes: int = 2 << 30,
    input_budget_bytes: int = 1 << 30,
    seed: int = 0,
) -> list[Record]:
    """Check, then time, every provider on one attention configuration and mode (:func:`run_case` per provider).

    Args:
        spec: the shape, dtype and device.
        mode: ``"fwd"``, ``"bwd"`` (backward only; the forward graph is built outside the timed region and
            ``backward(retain_graph=True)`` is timed) or ``"fwd_bwd"``.
        providers: from :func:`attention_providers`.
        roofline: the measured ceilings (for ``roofline_fraction``), or ``None``.
        bench: extra keyword arguments for :func:`fastvit.bench.harness.do_bench` (``warmup_ms``, ``rep_ms``).
        check_budget_bytes: memory allowed for the reference of the accuracy check; larger batches are checked on
            their first ``check_batch`` samples (reported).
        input_budget_bytes: memory allowed for the rotated input copies (1 to 4 sets).

    Returns:
        One :class:`Record` per provider (skipped ones first). Metrics of a timed one: ``ms`` (median), ``ms_q20``,
        ``ms_q80``, ``tflops``, ``gbps``, ``roofline_fraction``, ``peak_mem_bytes`` (CUDA; memory the call adds above
        its inputs), ``flops``, ``bytes``, ``max_abs_diff``, ``tolerance``, ``max_abs_diff_grad``, timing details.
    """
    bench = dict(bench or {})
    dev, dt = spec.device, spec.dtype
    cfg = {**spec.config(), "mode": mode}
    cost = harness.AttentionCost(spec.B, spec.N, spec.H, spec.D, harness.element_size(dt))
    n_flops, n_bytes = cost.flops(mode), cost.bytes(mode)
    need_grad = mode != "fwd"
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=dev, dtype=dt)

    records: list[Record] = []
    runnable = []
    for p in providers:
        reasons = p.reasons(spec, mode)
        if reasons:
            records.append(Record(p.name, "skipped", cfg, "; ".join(reasons)))
        else:
            runnable.append(p)
    if not runnable:
        return records

    # Accuracy inputs and reference (on a batch slice when the reference would not fit).
    bc = _check_batch(spec, check_budget_bytes)
    qkv_c = randn(bc, spec.N, 3 * spec.C)
    dout_c = randn(bc, spec.N, spec.C) if need_grad else None
    try:
        ref = _attention_reference(qkv_c, dout_c, spec.H, spec.rope_kwargs())
    except Exception as exc:  # noqa: BLE001 -- report, do not abort the sweep
        status = "oom" if _is_oom(exc) else "error"
        for p in runnable:
            records.append(Record(p.name, status, cfg, f"reference failed: {_first_line(exc)}"))
        harness.free_memory(dev)
        return records

    per_set = spec.B * spec.N * 3 * spec.C * harness.element_size(dt) * (2 if need_grad else 1)
    n_sets = max(1, min(4, input_budget_bytes // max(per_set, 1)))

    def check(fn: Callable[[torch.Tensor], torch.Tensor]) -> list[OracleResult]:
        x = qkv_c.clone().requires_grad_(need_grad)
        o = fn(x)
        results = [oracle_compare(o.detach(), ref["ref"], ref["pt"], dt, "output")]
        if need_grad:
            o.backward(dout_c)
            results.append(oracle_compare(x.grad, ref["ref_grad"], ref["pt_grad"], dt, "grad qkv"))
        return results

    def time(fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        sets = [randn(spec.B, spec.N, 3 * spec.C).requires_grad_(need_grad) for _ in range(n_sets)]
        if mode == "fwd":
            do_inputs: list[Any] = sets

            def step(qkv: torch.Tensor) -> torch.Tensor:
                return fn(qkv)

            def one() -> Any:
                return fn(sets[0])
        elif mode == "bwd":
            douts = [randn(spec.B, spec.N, spec.C) for _ in range(n_sets)]
            outs = [fn(s) for s in sets]
            do_inputs = list(range(n_sets))

            def step(i: int) -> None:
                outs[i].backward(douts[i], retain_graph=True)

            def one() -> Any:
                sets[0].grad = None
                outs[0].backward(douts[0], retain_graph=True)
                return sets[0].grad
        else:
            douts = [randn(spec.B, spec.N, spec.C) for _ in range(n_sets)]
            do_inputs = list(range(n_sets))

            def step(i: int) -> None:
                fn(sets[i]).backward(douts[i])

            def one() -> Any:
                sets[0].grad = None
                fn(sets[0]).backward(douts[0])
                return sets[0].grad

        t = harness.do_bench(step, device=dev, inputs=do_inputs, grad_to_none=sets, **bench)
        return {
            "peak_mem_bytes": harness.measure_peak_memory(one, dev),
            **_timing_metrics(t, n_flops, n_bytes, roofline),
        }

    for p in runnable:
        records.append(
            run_case(
                p.name,
                cfg,
                prepare=lambda rec, p=p: p.build(spec),
                check=check,
                time=time,
                context=p.context,
                device=dev,
                metrics={"flops": n_flops, "bytes": n_bytes, "check_batch": bc},
            )
        )
    return records


# =============================================================================================== models
def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        cur = obj
        ok = True
        for part in name.split("."):
            if cur is None or not hasattr(cur, part):
                ok = False
                break
            cur = getattr(cur, part)
        if ok and cur is not None:
            return cur
    return default


def _pair_first(v: Any) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def model_config(model: torch.nn.Module) -> dict[str, Any]:
    """Shapes of a timm-style ViT or MAE model (fastvit's and timm's modules share these attribute names).

    Returns:
        ``embed_dim`` (C), ``depth``, ``num_heads`` (H), ``head_dim`` (D), ``mlp_hidden`` (F: the gated width for
        a gated MLP), ``mlp_gated`` (fc1 computes gate and value, 2·F wide), ``patch_size`` (P), ``in_chans``,
        ``img_size``, ``num_prefix_tokens``, ``num_classes``, ``is_mae``, ``is_eva`` (timm's / fastvit's ``Eva``),
        and for MAE models
        ``decoder_embed_dim``, ``decoder_depth``, ``decoder_num_heads``, ``decoder_mlp_hidden``, ``mask_ratio``,
        ``norm_pix_loss``.

    Raises:
        ValueError: the model does not look like a ViT (no ``blocks`` / ``patch_embed``).
    """
    blocks = _get(model, "blocks")
    pe = _get(model, "patch_embed")
    if blocks is None or pe is None or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} does not look like a ViT (needs .blocks and .patch_embed)")
    b0 = blocks[0]
    H = int(_get(b0, "attn.num_heads"))
    qkv = _get(b0, "attn.qkv")
    if qkv is not None:
        C = int(_get(model, "embed_dim", default=qkv.in_features))
        attn_dim = qkv.out_features // 3
    else:  # separate q / k / v projections (timm's Eva with qkv_fused=False, e.g. EVA-02 B)
        C = int(_get(model, "embed_dim", default=b0.attn.q_proj.in_features))
        attn_dim = b0.attn.q_proj.out_features
    # gated MLPs (Eva's GluMlp / SwiGLU): F is the gated width, and fc1 computes two F-wide halves
    gated = _get(b0, "mlp.fc1_g") is not None or hasattr(_get(b0, "mlp"), "gate_last")
    F_ = _get(b0, "mlp.fc1_g.out_features", "mlp.fc1.out_features", default=4 * C)
    F_ = int(F_) // 2 if gated and _get(b0, "mlp.fc1_g") is None else int(F_)
    proj = _get(pe, "proj")
    P = _pair_first(_get(pe, "patch_size", default=proj.kernel_size if proj is not None else 16))
    cfg: dict[str, Any] = {
        "embed_dim": C,
        "depth": len(blocks),
        "num_heads": H,
        "head_dim": attn_dim // H,
        "mlp_hidden": F_,
        "mlp_gated": bool(gated),
        "patch_size": P,
        "in_chans": int(
            proj.in_channels if proj is not None and hasattr(proj, "in_channels") else _get(pe, "in_chans", default=3)
        ),
        "img_size": _pair_first(_get(pe, "img_size", default=224)),
        "num_prefix_tokens": int(
            _get(model, "num_prefix_tokens", default=1 if _get(model, "cls_token") is not None else 0)
        ),
        "num_classes": int(_get(model, "num_classes", default=0) or 0),
        "is_mae": _get(model, "decoder_blocks") is not None,
        # timm's Eva family (rotary attention, gated MLPs, registers): transformers' ViT is another architecture
        "is_eva": type(model).__name__ == "Eva",
    }
    if cfg["is_mae"]:
        dblocks = _get(model, "decoder_blocks")
        d0 = dblocks[0]
        cfg.update(
            decoder_embed_dim=int(
                _get(model, "decoder_embed.out_features", "decoder_embed_dim", default=d0.attn.qkv.in_features)
            ),
            decoder_depth=len(dblocks),
            decoder_num_heads=int(_get(d0, "attn.num_heads")),
            decoder_mlp_hidden=int(_get(d0, "mlp.fc1.out_features")),
            mask_ratio=float(_get(model, "mask_ratio", default=0.75)),
            norm_pix_loss=bool(_get(model, "norm_pix_loss", default=False)),
        )
    return cfg


def vit_flops(cfg: dict[str, Any], img_size: int, batch: int, mode: str = "fwd") -> int:
    """Matmul FLOPs of one ViT / MAE forward (or train step) on ``batch`` images of ``img_size``².

    Counts the patch-embedding GEMM, per block the qkv, attention (4·N²·C), proj and the two MLP GEMMs, the
    classifier head, and for MAE the encoder on the kept tokens plus decoder embed, decoder blocks on all tokens
    and the pixel predictor. ``mode="fwd_bwd"`` (a train step) counts 3× the forward (backward = 2× forward).
    """
    P, C, F_, depth = cfg["patch_size"], cfg["embed_dim"], cfg["mlp_hidden"], cfg["depth"]
    cin = cfg["in_chans"]
    Np = (img_size // P) ** 2
    pre = cfg["num_prefix_tokens"]

    def blocks(n: int, c: int, f: int, d: int, attn_dim: int, gated: bool = False) -> int:
        mlp = (3 if gated else 2) * 2 * n * c * f  # fc1 (gate and value halves when gated) and fc2
        per = 2 * n * c * 3 * attn_dim + 4 * n * n * attn_dim + 2 * n * attn_dim * c + mlp
        return d * per

    attn_dim = cfg["num_heads"] * cfg["head_dim"]
    if cfg.get("is_mae"):
        nk = int(Np * (1 - cfg["mask_ratio"]))
        fl = 2 * nk * C * cin * P * P + blocks(nk + pre, C, F_, depth, attn_dim)
        Cd = cfg["decoder_embed_dim"]
        fl += 2 * (nk + pre) * C * Cd
        fl += blocks(Np + pre, Cd, cfg["decoder_mlp_hidden"], cfg["decoder_depth"], Cd)
        fl += 2 * (Np + pre) * Cd * cin * P * P
    else:
        fl = 2 * Np * C * cin * P * P + blocks(Np + pre, C, F_, depth, attn_dim, cfg.get("mlp_gated", False))
        fl += 2 * C * cfg["num_classes"]
    fl *= batch
    return {"fwd": fl, "fwd_bwd": 3 * fl}[mode]


@dataclass
class ModelSpec:
    """A model benchmark: model name, batch size, image size (``None``: the model's default), dtype (autocast when
    not fp32), device, and whether to include ``torch.compile`` providers."""

    name: str
    batch: int
    img_size: int | None
    dtype: torch.dtype
    device: torch.device
    compile: bool = False
    force_compile: bool = False
    num_classes: int | None = None


def _autocast(spec: ModelSpec) -> contextlib.AbstractContextManager:
    if spec.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=spec.device.type, dtype=spec.dtype)


def _loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """A scalar training loss from whatever a model returns (MAE's ``(loss, pred, mask)``, HF outputs, logits)."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, (tuple, list)):
        for t in out:
            if isinstance(t, torch.Tensor) and t.dim() == 0:
                return t
    if not isinstance(out, torch.Tensor):
        out = _primary(out)
    if isinstance(out, torch.Tensor):
        if out.dim() == 0:
            return out
        if out.dim() == 2 and out.shape[0] == labels.shape[0]:
            return F.cross_entropy(out.float(), labels % out.shape[1])
        return out.float().pow(2).mean()
    raise TypeError(f"cannot derive a loss from a model output of type {type(out).__name__}")


def _primary(out: Any) -> torch.Tensor:
    """The tensor to compare across providers: logits, or the largest tensor of a tuple / HF output."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)):
        tensors = [t for t in out if isinstance(t, torch.Tensor)]
        if tensors:
            return max(tensors, key=lambda t: t.numel())
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


class _Built:
    def __init__(
        self,
        model: torch.nn.Module,
        call: Callable[[torch.nn.Module, torch.Tensor], Any],
        note: str | None = None,
        compare: bool = True,
    ) -> None:
        self.model, self.call, self.note, self.compare = model, call, note, compare


def _fastvit_model(spec: ModelSpec) -> torch.nn.Module:
    import fastvit

    kwargs: dict[str, Any] = {}
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    return fastvit.create_model(spec.name, **kwargs)


def _timm_model(spec: ModelSpec) -> torch.nn.Module:
    import timm

    if not timm.is_model(spec.name):
        raise LookupError(f"timm has no model named {spec.name!r}")
    kwargs: dict[str, Any] = {"pretrained": False}
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    return timm.create_model(spec.name, **kwargs)


def _hf_model(cfg: dict[str, Any], img_size: int) -> tuple[torch.nn.Module, str]:
    if cfg.get("is_mae"):
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        hc = ViTMAEConfig(
            hidden_size=cfg["embed_dim"],
            num_hidden_layers=cfg["depth"],
            num_attention_heads=cfg["num_heads"],
            intermediate_size=cfg["mlp_hidden"],
            image_size=img_size,
            patch_size=cfg["patch_size"],
            num_channels=cfg["in_chans"],
            decoder_hidden_size=cfg["decoder_embed_dim"],
            decoder_num_hidden_layers=cfg["decoder_depth"],
            decoder_num_attention_heads=cfg["decoder_num_heads"],
            decoder_intermediate_size=cfg["decoder_mlp_hidden"],
            mask_ratio=cfg["mask_ratio"],
            norm_pix_loss=cfg["norm_pix_loss"],
            layer_norm_eps=1e-6,
            qkv_bias=True,
        )
        return ViTMAEForPreTraining(hc), "transformers.ViTMAEForPreTraining"
    from transformers import ViTConfig, ViTForImageClassification

    hc = ViTConfig(
        hidden_size=cfg["embed_dim"],
        num_hidden_layers=cfg["depth"],
        num_attention_heads=cfg["num_heads"],
        intermediate_size=cfg["mlp_hidden"],
        image_size=img_size,
        patch_size=cfg["patch_size"],
        num_channels=cfg["in_chans"],
        num_labels=max(cfg["num_classes"], 1),
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    return ViTForImageClassification(hc), "transformers.ViTForImageClassification"


def _plain_call(model: torch.nn.Module, x: torch.Tensor) -> Any:
    return model(x)


def _hf_call(model: torch.nn.Module, x: torch.Tensor) -> Any:
    return model(pixel_values=x)


def model_provider_names(spec: ModelSpec) -> list[str]:
    """Provider names in report order for ``spec``."""
    names = [f"fastvit-{b}" for b in FASTVIT_BACKENDS] + ["fastvit-auto"]
    names += ["fastvit-compile", "timm-eager", "timm-compile", "hf-eager"]
    return names


def _model_calls(spec: ModelSpec, cfg: dict[str, Any], img: int) -> list[tuple[str, Any]]:
    """``(op, call)`` for every distinct way the model calls a fastvit op, at batch ``spec.batch`` in the run's dtype
    on the run's device: recorded (:func:`fastvit.backends.recording`) from one training-mode forward of the same
    model built on the meta device (no memory, no compute), with the calls' device set to the run's."""
    import fastvit
    from fastvit import backends

    with torch.device("meta"):
        model = _fastvit_model(spec).to(spec.dtype)
    images = torch.empty(spec.batch, cfg["in_chans"], img, img, device="meta", dtype=spec.dtype)
    with fastvit.use_backend("eager"), backends.recording() as calls:
        model.train()(images)
    return list(dict.fromkeys((op, call._replace(device=spec.device)) for op, call in calls))


def _backend_model_reasons(backend: str, calls: list[tuple[str, Any]]) -> list[str]:
    """Why ``backend`` cannot serve every op call of the model (empty: it can)."""
    reasons: dict[str, None] = {}
    for op, call in calls:
        r = _fastvit_reasons(backend, op, call)
        if r:
            reasons[f"{op}: {'; '.join(r)}"] = None
    # collapse "backend unavailable" repeated per op into one line
    uniq = sorted({r.split(": ", 1)[1] for r in reasons})
    if reasons and len(uniq) == 1:
        return uniq
    return list(reasons)


def _auto_choices(calls: list[tuple[str, Any]]) -> dict[str, str]:
    """The backend automatic selection picks for each op of the model (``"a/b"`` when its calls differ)."""
    from fastvit.backends import select

    picked: dict[str, dict[str, None]] = {}
    for op, call in calls:
        picked.setdefault(op, {})[select(op, call)[0]] = None
    return {op: "/".join(names) for op, names in picked.items()}


#: Images of a model's accuracy check: a slice of the batch (every output row depends on its own image only), so the
#: float64 reference of a large model at a large batch stays affordable.
MODEL_CHECK_BATCH = 8


def run_model(
    spec: ModelSpec,
    roofline: Roofline | None,
    *,
    providers: list[str] | None = None,
    bench: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Record], dict[str, Any]]:
    """Train-step and inference throughput of one model configuration across providers (:func:`run_case` each).

    A train step is forward + loss + backward + ``AdamW.step()`` + ``zero_grad``; inference is a forward under
    ``torch.inference_mode``. Both under ``torch.autocast(dtype)`` when ``dtype`` is not fp32. Before timing, each
    fastvit provider's (and timm's, when it can load the same weights) inference output on the first
    :data:`MODEL_CHECK_BATCH` images is judged by the oracle (:class:`fastvit.testing.ModelOracle`): ``ref`` is the
    fastvit model on eager in float64 (float32 under autocast), ``pt`` the same on eager in the run's precision.

    Returns:
        ``(records, model_info)``: per provider a :class:`Record` with ``train_ms``, ``train_images_per_s``,
        ``train_tflops``, ``train_mfu`` (fraction of the measured GEMM rate), ``train_peak_mem_bytes`` (CUDA:
        absolute peak during a step, weights and optimizer state included), ``infer_*`` likewise, and accuracy
        fields; ``model_info`` holds the model's shapes (:func:`model_config`), parameter count and FLOPs per step.
    """
    import fastvit

    bench = {"flush_l2": False, "min_reps": 3, "max_reps": 50, **(bench or {})}
    dev = spec.device
    base = _fastvit_model(spec)
    cfg = model_config(base)
    img = spec.img_size or cfg["img_size"]
    info = {
        "config": cfg,
        "img_size": img,
        "params": sum(p.numel() for p in base.parameters()),
        "fwd_flops": vit_flops(cfg, img, spec.batch, "fwd"),
        "train_flops": vit_flops(cfg, img, spec.batch, "fwd_bwd"),
    }
    common = {"model": spec.name, "B": spec.batch, "img_size": img, "dtype": str(spec.dtype).replace("torch.", "")}
    wanted = providers or model_provider_names(spec)

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(spec.batch, cfg["in_chans"], img, img, generator=gen).to(dev)
    labels = torch.randint(0, max(cfg["num_classes"], 1), (spec.batch,), generator=gen).to(dev)

    compile_reason = None
    if dev.type != "cuda" and not spec.force_compile:
        compile_reason = "torch.compile providers run on CUDA only by default (pass --force-compile on the CPU)"
    if not spec.compile:
        compile_reason = "torch.compile providers are opt-in (pass --compile)"

    timm_model = None
    weights_shared = False
    timm_reason = None
    if "timm-eager" in wanted or ("timm-compile" in wanted and not compile_reason):
        try:
            timm_model = _timm_model(spec)
            try:
                base.load_state_dict(timm_model.state_dict(), strict=True)
                weights_shared = True
            except Exception:  # noqa: BLE001 -- different parameter sets: compare nothing, time anyway
                weights_shared = False
        except Exception as exc:  # noqa: BLE001
            timm_reason = _first_line(exc)

    calls = _model_calls(spec, cfg, img) if any(n.startswith("fastvit-") for n in wanted) else []
    harness.free_memory(dev)

    def build(name: str) -> _Built:
        """The model for ``name``; raises :class:`Skip` with the reason it cannot run here."""
        if name.startswith("fastvit-") and name[8:] in FASTVIT_BACKENDS:
            backend = name[8:]
            reasons = _backend_model_reasons(backend, calls)
            if reasons:
                raise Skip("; ".join(reasons))
            return _Built(copy.deepcopy(base), _plain_call, note=f"fastvit.use_backend({backend!r})")
        if name == "fastvit-auto":
            choices = _auto_choices(calls)
            if set(choices.values()) == {"eager"}:
                raise Skip("automatic selection picks eager for every op here (same as fastvit-eager)")
            return _Built(copy.deepcopy(base), _plain_call, note=f"automatic selection {choices}")
        if name == "fastvit-compile":
            if compile_reason:
                raise Skip(compile_reason)
            return _Built(torch.compile(copy.deepcopy(base)), _plain_call, note="torch.compile(fastvit, auto backend)")
        if name in ("timm-eager", "timm-compile"):
            if name == "timm-compile" and compile_reason:
                raise Skip(compile_reason)
            if timm_reason:
                raise Skip(timm_reason)
            if name == "timm-compile":
                return _Built(
                    torch.compile(copy.deepcopy(timm_model)), _plain_call, "torch.compile(timm)", compare=weights_shared
                )
            return _Built(
                copy.deepcopy(timm_model),
                _plain_call,
                note="same weights as fastvit" if weights_shared else "own random weights",
                compare=weights_shared,
            )
        if name == "hf-eager":
            if cfg.get("is_eva"):
                raise Skip("no transformers counterpart for timm's Eva family here (an HF ViT is another architecture)")
            try:
                m, what = _hf_model(cfg, img)
            except Exception as exc:  # noqa: BLE001
                raise Skip(f"transformers model unavailable ({_first_line(exc)})") from None
            impl = getattr(m.config, "_attn_implementation", None)
            return _Built(m, _hf_call, note=f"{what}, attn_implementation={impl}, own random weights", compare=False)
        raise Skip(f"unknown provider {name!r}")

    # The oracle's ref and pt, computed once on the shared weights when the first compared provider needs them.
    bc = min(spec.batch, MODEL_CHECK_BATCH)
    check_images = images[:bc]
    oracle: list[ModelOracle] = []

    def model_oracle() -> ModelOracle:
        if not oracle:
            base.to(dev).eval()
            oracle.append(
                ModelOracle(
                    base,
                    [check_images],
                    _primary,
                    ref_dtype=ref_dtype_for(spec.dtype),
                    dtype=spec.dtype,
                    context=lambda: _autocast(spec),
                    seed=0,
                )
            )
            base.cpu()
            harness.free_memory(dev)
        return oracle[0]

    def prepare(rec: Record, name: str) -> _Built:
        built = build(name)
        rec.metrics["note"] = built.note
        rec.metrics["compared_with"] = "fastvit-eager" if built.compare else None
        if built.compare:
            rec.metrics.update(check_batch=bc, reference_dtype=str(ref_dtype_for(spec.dtype)).replace("torch.", ""))
        built.model.to(dev)
        return built

    def check(built: _Built, backend: str | None) -> list[OracleResult]:
        if not built.compare:
            return []
        built.model.eval()
        return model_oracle().judge(built.model, backend=backend)

    def time(built: _Built, backend: str | None) -> dict[str, Any]:
        def infer() -> Any:
            with torch.inference_mode(), _autocast(spec), fastvit.use_backend(backend):
                return built.call(built.model, images)

        built.model.eval()
        t_inf = harness.do_bench(infer, device=dev, **bench)
        mem_inf = _absolute_peak(infer, dev)

        built.model.train()
        opt = torch.optim.AdamW(built.model.parameters(), lr=1e-4)

        def train_step() -> None:
            with _autocast(spec), fastvit.use_backend(backend):
                loss = _loss(built.call(built.model, images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t_tr = harness.do_bench(train_step, device=dev, **bench)
        mem_tr = _absolute_peak(train_step, dev)
        opt.zero_grad(set_to_none=True)
        out: dict[str, Any] = {}
        for prefix, t, mem, fl in (
            ("infer", t_inf, mem_inf, info["fwd_flops"]),
            ("train", t_tr, mem_tr, info["train_flops"]),
        ):
            r = harness.rates(t.median_ms, fl, None, roofline)
            out.update(
                {
                    f"{prefix}_ms": t.median_ms,
                    f"{prefix}_ms_q20": t.q20_ms,
                    f"{prefix}_ms_q80": t.q80_ms,
                    f"{prefix}_images_per_s": spec.batch / (t.median_ms * 1e-3),
                    f"{prefix}_tflops": r["tflops"],
                    f"{prefix}_mfu": r["roofline_fraction"],
                    f"{prefix}_peak_mem_bytes": mem,
                    f"{prefix}_reps": t.reps,
                }
            )
        return out

    records: list[Record] = []
    for name in wanted:
        if progress:
            progress(name)
        backend = name[8:] if name.startswith("fastvit-") and name[8:] in FASTVIT_BACKENDS else None
        records.append(
            run_case(
                name,
                common,
                device=dev,
                prepare=lambda rec, name=name: prepare(rec, name),
                check=lambda built, backend=backend: check(built, backend),
                time=lambda built, backend=backend: time(built, backend),
            )
        )
    return records, info


def _absolute_peak(fn: Callable[[], Any], dev: torch.device) -> int | None:
    return harness.measure_peak_memory(fn, dev, relative=False)


# =============================================================================================== scaling
@dataclass(frozen=True)
class Component:
    """One op of a model timed by ``scaling``: ``make(B, S, gen)`` builds its inputs, ``run(inputs, backend)``
    calls :mod:`fastvit.ops`, ``args(inputs)`` gives the ``(args, kwargs)`` of the call of ``op`` that ``run`` makes
    (for backend selection), ``cost(B, S, elem)`` gives its cost model, ``op`` names the dispatched op,
    ``tokens(S)`` the tokens it processes at image side S (fewer than N for MAE's kept tokens), ``patch_size`` /
    ``prefix`` give N = (S/P)² + prefix."""

    name: str
    op: str
    make: Callable[..., dict[str, torch.Tensor]]
    run: Callable[[dict[str, torch.Tensor], str | None], torch.Tensor]
    args: Callable[[dict[str, torch.Tensor]], tuple[tuple[Any, ...], dict[str, Any]]]
    cost: Callable[[int, int, int], Any]
    tokens: Callable[[int], int]
    patch_size: int = 0
    prefix: int = 1


def scaling_components(cfg: dict[str, Any]) -> list[Component]:
    """The components of a model (from :func:`model_config`) whose cost ``scaling`` sweeps against N.

    patch_embed (with cls token and position embedding), attention (packed qkv), layer_norm (with the fused
    residual add), mlp (fc1 + GELU, fc2 + residual) and, for MAE models, mae_gather (patch embedding of the kept
    patches via ``ids_keep``) and mae_unshuffle (decoder input: mask tokens, ``ids_restore`` scatter, pos-embed).
    """
    from fastvit import ops

    C, H, D, P, Fh = cfg["embed_dim"], cfg["num_heads"], cfg["head_dim"], cfg["patch_size"], cfg["mlp_hidden"]
    cin = cfg["in_chans"]
    pre = max(cfg["num_prefix_tokens"], 1)
    attn_dim = H * D

    def np_(S: int) -> int:
        return (S // P) ** 2

    def n_(S: int) -> int:
        return np_(S) + pre

    def rnd(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def one_op(
        fn: Callable[..., Any],
        args: Callable[[dict[str, torch.Tensor]], tuple[tuple[Any, ...], dict[str, Any]]],
        pick: Callable[[Any], torch.Tensor] = lambda o: o,
    ) -> dict[str, Any]:
        """``op``, ``run`` and ``args`` of a component that is a single call of the public op ``fn``."""
        op = fn.__name__

        def run(t: dict[str, torch.Tensor], be: str | None) -> torch.Tensor:
            a, kw = args(t)
            return pick(fn(*a, **kw, backend=be))

        return {"op": op, "run": run, "args": args}

    def patch_args(t: dict[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = {"pos_embed": t["pos_embed"], "cls_token": t["cls_token"]}
        if "ids_keep" in t:
            kw["ids_keep"] = t["ids_keep"]
        return (t["images"], t["weight"], t["bias"]), kw

    def mlp(t: dict[str, torch.Tensor], be: str | None) -> torch.Tensor:
        return ops.linear_residual(
            ops.linear_gelu(t["x"], t["w1"], t["b1"], backend=be), t["w2"], t["b2"], t["x"], backend=be
        )

    comps = [
        Component(
            "patch_embed",
            **one_op(ops.patch_embed, patch_args),
            make=lambda B, S, g: {
                "images": rnd(g, B, cin, S, S),
                "weight": rnd(g, C, cin, P, P, scale=0.02),
                "bias": rnd(g, C, scale=0.02),
                "pos_embed": rnd(g, 1, n_(S) - pre + 1, C, scale=0.02),
                "cls_token": rnd(g, 1, 1, C, scale=0.02),
            },
            cost=lambda B, S, e: harness.PatchEmbedCost(B, cin, S, P, C, 1, None, e),
            tokens=n_,
        ),
        Component(
            "attention",
            **one_op(ops.attention, lambda t: ((t["qkv"], H), {})),
            make=lambda B, S, g: {"qkv": rnd(g, B, n_(S), 3 * attn_dim)},
            cost=lambda B, S, e: harness.AttentionCost(B, n_(S), H, D, e),
            tokens=n_,
        ),
        Component(
            "layer_norm",
            **one_op(
                ops.layer_norm,
                lambda t: ((t["x"], t["weight"], t["bias"], 1e-6), {"residual": t["residual"]}),
                pick=lambda o: o[0],
            ),
            make=lambda B, S, g: {
                "x": rnd(g, B, n_(S), C),
                "residual": rnd(g, B, n_(S), C),
                "weight": 1 + rnd(g, C, scale=0.1),
                "bias": rnd(g, C, scale=0.1),
            },
            cost=lambda B, S, e: harness.LayerNormCost(B * n_(S), C, e, True),
            tokens=n_,
        ),
        Component(
            "mlp",
            ops.linear_gelu.__name__,
            run=mlp,
            args=lambda t: ((t["x"], t["w1"], t["b1"]), {}),
            make=lambda B, S, g: {
                "x": rnd(g, B, n_(S), C),
                "w1": rnd(g, Fh, C, scale=C**-0.5),
                "b1": rnd(g, Fh, scale=0.02),
                "w2": rnd(g, C, Fh, scale=Fh**-0.5),
                "b2": rnd(g, C, scale=0.02),
            },
            cost=lambda B, S, e: harness.MlpCost(B * n_(S), C, Fh, e),
            tokens=n_,
        ),
    ]
    if cfg.get("is_mae"):
        ratio = cfg["mask_ratio"]
        Cd = cfg["decoder_embed_dim"]

        def nk(S: int) -> int:
            return max(1, int(np_(S) * (1 - ratio)))

        def keep_ids(B: int, S: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            noise = torch.rand(B, np_(S), generator=g)
            shuffle = noise.argsort(1)
            return shuffle[:, : nk(S)].contiguous(), shuffle.argsort(1)

        comps += [
            Component(
                "mae_gather",
                **one_op(ops.patch_embed, patch_args),
                make=lambda B, S, g: {
                    "images": rnd(g, B, cin, S, S),
                    "weight": rnd(g, C, cin, P, P, scale=0.02),
                    "bias": rnd(g, C, scale=0.02),
                    "pos_embed": rnd(g, 1, np_(S) + 1, C, scale=0.02),
                    "cls_token": rnd(g, 1, 1, C, scale=0.02),
                    "ids_keep": keep_ids(B, S, g)[0],
                },
                cost=lambda B, S, e: harness.PatchEmbedCost(B, cin, S, P, C, 1, nk(S), e),
                tokens=lambda S: nk(S) + 1,
            ),
            Component(
                "mae_unshuffle",
                **one_op(
                    ops.mae_unshuffle,
                    lambda t: ((t["x"], t["mask_token"], t["ids_restore"]), {"pos_embed": t["pos_embed"]}),
                ),
                make=lambda B, S, g: {
                    "x": rnd(g, B, 1 + nk(S), Cd),
                    "mask_token": rnd(g, 1, 1, Cd, scale=0.02),
                    "ids_restore": keep_ids(B, S, g)[1],
                    "pos_embed": rnd(g, 1, 1 + np_(S), Cd, scale=0.02),
                },
                cost=lambda B, S, e: harness.MaeUnshuffleCost(B, np_(S), nk(S), Cd, e),
                tokens=lambda S: 1 + np_(S),
            ),
        ]
    return [dataclasses.replace(c, patch_size=P, prefix=pre) for c in comps]


def _cast(t: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, grad: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in t.items():
        if v.is_floating_point():
            v = v.to(device=device, dtype=dtype)
            if grad and k not in ("images",):
                v.requires_grad_(True)
        else:
            v = v.to(device)
        out[k] = v
    return out


def run_scaling_point(
    comp: Component,
    B: int,
    S: int,
    dtype: torch.dtype,
    device: torch.device,
    mode: str,
    backend: str | None,
    roofline: Roofline | None,
    *,
    bench: dict[str, Any] | None = None,
    seed: int = 0,
) -> Record:
    """Check, then time one component at image size ``S`` (N tokens follow from the model's patch size), with
    :func:`run_case`.

    The backend is ``backend`` when given, else the one automatic selection picks for the component's call
    (recorded as ``backend``; ``skipped`` when ``backend`` cannot serve it). Accuracy: the output (and, for
    ``fwd_bwd``, every input gradient) under the oracle, ``ref`` being the eager backend on inputs upcast to fp64
    (fp32 inputs) or fp32 (half inputs) and ``pt`` the eager backend in the input precision. Metrics as in
    :func:`run_attention_case`.
    """
    from fastvit.backends import select

    bench = dict(bench or {})
    gen = torch.Generator().manual_seed(seed)
    raw = comp.make(B, S, gen)
    cost = comp.cost(B, S, harness.element_size(dtype))
    need_grad = mode != "fwd"
    n_flops, n_bytes = cost.flops(mode), cost.bytes(mode)
    full = (S // comp.patch_size) ** 2 + comp.prefix if comp.patch_size else comp.tokens(S)
    cfg = {
        "component": comp.name,
        "img_size": S,
        "N": full,
        "tokens": comp.tokens(S),
        "B": B,
        "dtype": str(dtype).replace("torch.", ""),
        "mode": mode,
    }

    def outputs(t: dict[str, torch.Tensor], be: str) -> list[torch.Tensor]:
        o = comp.run(t, be)
        if not need_grad:
            return [o.detach()]
        go = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1)).to(o)
        leaves = [v for v in t.values() if v.requires_grad]
        grads = torch.autograd.grad(o, leaves, go, allow_unused=True)
        return [o.detach()] + [g if g is not None else torch.zeros_like(v) for g, v in zip(grads, leaves)]

    def prepare(rec: Record) -> str:
        t = _cast(raw, dtype, device, False)
        args, kwargs = comp.args(t)
        try:
            chosen = select(comp.op, _call(comp.op, *args, **kwargs), backend)[0]
        except Exception as exc:  # noqa: BLE001 -- the forced backend cannot serve this call
            raise Skip(_first_line(exc)) from None
        rec.config["backend"] = chosen
        return chosen

    def check(chosen: str) -> list[OracleResult]:
        names = ["output"] + [
            f"grad {k}" for k, v in raw.items() if need_grad and v.is_floating_point() and k != "images"
        ]  # _cast's leaves
        ref = outputs(_cast(raw, ref_dtype_for(dtype), device, need_grad), "eager")
        pt = outputs(_cast(raw, dtype, device, need_grad), "eager")
        got = outputs(_cast(raw, dtype, device, need_grad), chosen)
        return [oracle_compare(a, r, p, dtype, n) for n, a, r, p in zip(names, got, ref, pt)]

    def time(chosen: str) -> dict[str, Any]:
        t = _cast(raw, dtype, device, need_grad)
        leaves = [v for v in t.values() if v.requires_grad]
        if need_grad:
            probe = comp.run(t, chosen)
            go = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed + 1)).to(probe)
            del probe

            def step() -> None:
                comp.run(t, chosen).backward(go)
        else:

            def step() -> torch.Tensor:
                return comp.run(t, chosen)

        timing = harness.do_bench(step, device=device, grad_to_none=leaves, **bench)
        for v in leaves:
            v.grad = None
        return {
            "peak_mem_bytes": harness.measure_peak_memory(step, device),
            **_timing_metrics(timing, n_flops, n_bytes, roofline),
        }

    return run_case(
        comp.name,
        cfg,
        prepare=prepare,
        check=check,
        time=time,
        device=device,
        metrics={"flops": n_flops, "bytes": n_bytes},
    )
