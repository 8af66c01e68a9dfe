"""fastvit's numerical oracle: the one accuracy rule shared by the test suite and ``fastvit-bench``.

The rule is FlashAttention's (Dao et al., 2022; ``tests/test_flash_attn.py`` of the flash-attention repository):
with ``ref`` the computation in high precision -- float64, or float32 for float16 / bfloat16 inputs when float64
is too costly (:func:`ref_dtype_for`) -- and ``pt`` the *same plain computation in the input precision*, an
implementation's ``out`` passes when

    max|out - ref|  <=  FACTOR * max|pt - ref|  +  atol(dtype) * max(1, max|ref|)

for every forward output and every gradient (FACTOR = 2). ``pt`` measures how much error the input precision
forces on an honest implementation at this shape; a kernel may be up to twice as wrong as that, plus a small floor
(a few ulps at the tensor's magnitude, :data:`ATOL`) for elements where ``pt`` happens to be exact.

Public API::

    ATOL, FACTOR, atol_for(dtype), ref_dtype_for(dtype)   tolerances and the reference precision
    max_abs_err(a, b)                                      max |a - b| in float64 (nan if either has a nan)
    OracleResult, oracle_compare(out, ref, pt, dtype, name)   the verdict, without raising
    assert_close_oracle(out, ref, pt, dtype, name)         the verdict as an AssertionError
    poison_(t), poison_like(t)                             NaN-filled outputs so an unwritten element fails
    randn(shape, ...), make_inputs({"x": (B, N, C)}, ...)  fresh random inputs (never zeros), drawn on the CPU
    OpRun, run_forward_backward(fn, inputs, grad_names, grad_outputs)
    check_op(impls, naive, inputs, grad_names, dtype=...)  forward + every gradient of each impl under the oracle
    ModelOracle(model, args, first, ref_dtype=...).judge(model, backend=...)   whole models, without raising
    compare_model_with_eager(model, args, loss_fn, first, backend=..., ref_dtype=...)   the same, asserting

Example (a Triton op against the plain-math reference)::

    from functools import partial
    import torch, fastvit
    from fastvit.testing import check_op, make_inputs

    g = torch.Generator().manual_seed(0)
    inputs = make_inputs({"x": (3, 197, 96), "weight": (96,), "bias": (96,)}, dtype=torch.bfloat16, generator=g)
    check_op({"triton": partial(fastvit.ops.layer_norm, backend="triton")}, fastvit.reference.layer_norm,
             inputs, ["x", "weight", "bias"], dtype=torch.bfloat16, generator=g, name="layer_norm")
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from fastvit.backends import use_backend

__all__ = [
    "ATOL",
    "FACTOR",
    "ModelOracle",
    "OpRun",
    "OracleResult",
    "assert_close_oracle",
    "atol_for",
    "check_op",
    "compare_model_with_eager",
    "make_inputs",
    "max_abs_err",
    "oracle_compare",
    "poison_",
    "poison_like",
    "randn",
    "ref_dtype_for",
    "run_forward_backward",
]

# Floors, about a few units in the last place at magnitude ~1 (machine epsilon: fp64 2.2e-16, fp32 1.2e-7,
# fp16 9.8e-4, bf16 7.8e-3). fp32 gets 1e-5 (~100 ulp) because kernels legitimately reorder long fp32 sums
# (K up to a few hundred here) where the plain fp32 computation may happen to round better; fp16 gets 1e-3
# (~1 ulp at 1.0) and bf16 1e-2 (~1 ulp at 1.0): one extra rounding of an output compared with a `pt` that
# happened to be exact (a copy, a gather) must not fail.
#
# Deviation from a purely absolute floor (docs/ARCHITECTURE.md says atol(dtype)): the floor is scaled by
# max(1, max|ref|), i.e. "a few ulps at the tensor's magnitude". Weight gradients sum B·N terms and reach
# magnitudes of ~100 even at test shapes; there a different (and equally valid) summation order than `pt`'s
# costs ~1e-4 in fp32, which a fixed 1e-5 would flag although nothing is wrong. Real bugs (a wrong index, a
# missing term, a tanh GELU for an erf one) are orders of magnitude larger; tests/test_ops.py checks that the
# oracle still catches them.
#: Absolute floor of the oracle per input dtype (scaled by ``max(1, max|ref|)``).
ATOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}

#: The factor on ``max|pt - ref|`` (FlashAttention uses 2).
FACTOR = 2.0


def atol_for(dtype: torch.dtype) -> float:
    """The absolute floor of the oracle for inputs of ``dtype`` (:data:`ATOL`).

    Raises:
        ValueError: ``dtype`` is not float64, float32, float16 or bfloat16.
    """
    try:
        return ATOL[dtype]
    except KeyError:
        raise ValueError(f"no oracle tolerance for dtype {dtype}; expected one of {list(ATOL)}") from None


def ref_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The precision of ``ref`` for inputs of ``dtype`` where float64 everywhere is too costly (benchmarks on large
    shapes): float64 for float32 / float64 inputs, float32 for float16 / bfloat16 (FlashAttention's choice)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` computed in float64 on the CPU; ``nan`` if either holds a nan, 0 for empty tensors.

    Args:
        a, b: tensors of the same (or a broadcastable) shape, any floating dtype and device.
    """
    d = (a.detach().to(device="cpu", dtype=torch.float64) - b.detach().to(device="cpu", dtype=torch.float64)).abs()
    if d.numel() == 0:
        return 0.0
    if torch.isnan(d).any():
        return math.nan
    return float(d.max())


# ------------------------------------------------------------------------------------------------ the verdict
@dataclass(frozen=True)
class OracleResult:
    """The oracle's verdict on one tensor (see :func:`oracle_compare`).

    Attributes:
        name: what was compared (``"out"``, ``"grad qkv"``, ...).
        ok: whether ``out`` passed.
        err: ``max|out - ref|`` (``nan`` when ``out`` has a nan; ``None`` on a shape mismatch).
        err_pt: ``max|pt - ref|`` (0 when no ``pt`` was given).
        bound: ``factor * err_pt + atol * max(1, max|ref|)`` (``None`` on a shape mismatch).
        ref_max: ``max|ref|``.
        atol: the floor used (before scaling).
        dtype: the input precision that chose ``atol``.
        shape: ``ref``'s shape.
        message: why it failed, in words (``None`` when ``ok``).
    """

    name: str
    ok: bool
    err: float | None
    err_pt: float
    bound: float | None
    ref_max: float
    atol: float
    dtype: torch.dtype
    shape: tuple[int, ...]
    message: str | None = None


def oracle_compare(
    out: torch.Tensor,
    ref: torch.Tensor,
    pt: torch.Tensor | None,
    dtype: torch.dtype | None = None,
    name: str = "output",
    *,
    atol: float | None = None,
    factor: float = FACTOR,
    check_dtype: bool = True,
) -> OracleResult:
    """Judge ``out`` by ``max|out - ref| <= factor * max|pt - ref| + atol(dtype) * max(1, max|ref|)``; never raises
    for a bad ``out``.

    Args:
        out: the implementation under test, any device.
        ref: the high-precision ground truth (float64, or float32 for half inputs), same shape.
        pt: the plain computation in the input precision, same shape; ``None`` drops the ``factor`` term (the
            bound is the floor alone).
        dtype: the input precision; picks ``atol`` (default ``pt.dtype``, or ``out.dtype`` without ``pt``). With
            ``check_dtype`` ``out`` must have this dtype.
        name: what is compared, for the message.
        atol: override of :data:`ATOL` (still scaled by ``max(1, max|ref|)``).
        factor: the factor on ``max|pt - ref|`` (:data:`FACTOR`).
        check_dtype: require ``out.dtype == dtype``.

    Returns:
        An :class:`OracleResult`; ``ok`` is ``False`` for a shape or dtype mismatch, a nan / inf in ``out`` (e.g. a
        poisoned element left unwritten) or the bound violated, and ``message`` says which.

    Raises:
        ValueError: ``ref`` or ``pt`` is not finite, or ``pt``'s shape differs from ``ref``'s (bad test inputs,
            not a verdict on ``out``); no tolerance for ``dtype`` (:func:`atol_for`).
    """
    dtype = (pt.dtype if pt is not None else out.dtype) if dtype is None else dtype
    atol = atol_for(dtype) if atol is None else atol
    shape = tuple(ref.shape)
    if pt is not None and tuple(pt.shape) != shape:
        raise ValueError(f"{name}: pt shape {tuple(pt.shape)} != ref {shape}")
    if not bool(torch.isfinite(ref.detach()).all()):
        raise ValueError(f"{name}: the {ref.dtype} reference is not finite (bad test inputs)")
    if pt is not None and not bool(torch.isfinite(pt.detach()).all()):
        raise ValueError(f"{name}: the {pt.dtype} plain computation overflowed (bad test inputs: scale them down)")
    ref_max = float(ref.detach().abs().max()) if ref.numel() else 0.0
    err_pt = max_abs_err(pt, ref) if pt is not None else 0.0

    def verdict(ok: bool, err: float | None, bound: float | None, message: str | None) -> OracleResult:
        return OracleResult(name, ok, err, err_pt, bound, ref_max, atol, dtype, shape, message)

    if tuple(out.shape) != shape:
        return verdict(False, None, None, f"{name}: shape {tuple(out.shape)} != expected {shape}")
    if check_dtype and out.dtype != dtype:
        return verdict(False, None, None, f"{name}: dtype {out.dtype} != expected {dtype}")
    err = max_abs_err(out, ref)
    bound = factor * err_pt + atol * max(1.0, ref_max)
    n_bad = int((~torch.isfinite(out.detach())).sum())
    if n_bad:
        return verdict(
            False, err, bound, f"{name}: {n_bad} of {out.numel()} elements are nan/inf (unwritten poisoned output?)"
        )
    if not err <= bound:
        d = (out.detach().double().cpu() - ref.detach().double().cpu()).abs()
        where = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape)) if d.dim() else ()
        return verdict(
            False,
            err,
            bound,
            (
                f"{name} ({dtype}, shape {shape}): max|out - ref| = {err:.4g} > bound {bound:.4g} = "
                f"{factor:g} * max|pt - ref| ({err_pt:.4g}) + atol ({atol:.1g}) * max(1, max|ref| = {ref_max:.4g}); "
                f"worst at index {where}: "
                f"out {float(out.detach().double().cpu()[where]):.6g} vs "
                f"ref {float(ref.detach().double().cpu()[where]):.6g}"
            ),
        )
    return verdict(True, err, bound, None)


def assert_close_oracle(
    out: torch.Tensor,
    ref: torch.Tensor,
    pt: torch.Tensor,
    dtype: torch.dtype | None = None,
    name: str = "output",
    *,
    atol: float | None = None,
    factor: float = FACTOR,
    check_dtype: bool = True,
) -> None:
    """Assert ``max|out - ref| <= factor * max|pt - ref| + atol(dtype) * max(1, max|ref|)`` (:func:`oracle_compare`).

    Args:
        out: the implementation under test.
        ref: the float64 ground truth (same shape).
        pt: the plain computation in the input precision (same shape).
        dtype: the input precision; picks ``atol`` (default ``pt.dtype``). With ``check_dtype`` ``out`` must
            have this dtype.
        name: what is compared ("out", "grad qkv", ...), for the message.
        atol: override of :data:`ATOL` (still scaled by ``max(1, max|ref|)``).

    Raises:
        AssertionError: shape or dtype mismatch, a nan / inf in ``out`` (e.g. a poisoned element left unwritten),
            the bound violated (the message gives max|out - ref|, max|pt - ref|, the bound and max|ref|), or a
            non-finite ``ref`` / ``pt`` (bad test inputs).
    """
    try:
        result = oracle_compare(out, ref, pt, dtype, name, atol=atol, factor=factor, check_dtype=check_dtype)
    except ValueError as exc:
        raise AssertionError(str(exc)) from None
    if not result.ok:
        raise AssertionError(result.message)


# ------------------------------------------------------------------------------------------------ poison
def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with a value no kernel writes: nan for floats, the dtype's max for integers, ``True`` for
    bools. Returns ``t``."""
    if t.is_floating_point() or t.is_complex():
        return t.fill_(math.nan)
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).max)


def poison_like(
    t: torch.Tensor, *, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A new tensor on ``t``'s device with ``t``'s shape and dtype (or ``shape`` / ``dtype``), poisoned with
    :func:`poison_`."""
    shape = t.shape if shape is None else shape
    return poison_(torch.empty(shape, dtype=dtype or t.dtype, device=t.device))


# ------------------------------------------------------------------------------------------------ inputs
def randn(
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    offset: float = 0.0,
) -> torch.Tensor:
    """``offset + scale * N(0, 1)`` of ``shape``, drawn in float32 on the CPU with ``generator`` (the same numbers on
    every device and for every dtype), then cast to ``dtype`` and moved to ``device``."""
    t = torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * scale + offset
    return t.to(device=device, dtype=dtype)


def make_inputs(
    specs: Mapping[str, Sequence[int] | tuple[Sequence[int], float] | torch.Tensor | None | Any],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Random inputs by name.

    Each spec is a shape (drawn by :func:`randn` with ``scale``), ``(shape, scale)``, a tensor (moved to ``device``;
    floating tensors cast to ``dtype``) or anything else (passed through: ``None``, ints, strings).

    Example: ``make_inputs({"qkv": (3, 197, 3 * 64), "num_heads": 1}, dtype=torch.bfloat16, generator=g)``.
    """
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if isinstance(spec, torch.Tensor):
            out[name] = spec.to(device=device, dtype=dtype if spec.is_floating_point() else spec.dtype)
        elif (
            isinstance(spec, tuple)
            and len(spec) == 2
            and isinstance(spec[0], (tuple, list, torch.Size))
            and isinstance(spec[1], (int, float))
        ):
            out[name] = randn(spec[0], dtype=dtype, device=device, generator=generator, scale=float(spec[1]))
        elif isinstance(spec, (tuple, list, torch.Size)) and all(isinstance(s, int) for s in spec):
            out[name] = randn(spec, dtype=dtype, device=device, generator=generator, scale=scale)
        else:
            out[name] = spec
    return out


# ------------------------------------------------------------------------------------------------ op runs
@dataclass
class OpRun:
    """The outputs of one forward (always a tuple, detached) and the gradients by input name."""

    outputs: tuple[torch.Tensor, ...]
    grads: dict[str, torch.Tensor]


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def run_forward_backward(
    fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    grad_names: Sequence[str],
    grad_outputs: Sequence[torch.Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> OpRun:
    """Call ``fn(**inputs)`` on fresh leaf copies and backpropagate ``grad_outputs`` (one per output).

    Floating tensors are copied (cast to ``dtype`` when given; other tensors and values pass unchanged); the
    ones named in ``grad_names`` require grad and each of them must receive a gradient. ``grad_outputs`` are
    cast to each output's dtype and device; ``None`` runs the forward only.

    Raises:
        ValueError: a name in ``grad_names`` is not a floating tensor input, or ``grad_outputs`` has the wrong
            length.
        AssertionError: no output requires grad, or an input named in ``grad_names`` received no gradient.
    """
    leaves: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(dtype=dtype or value.dtype).clone()
            value.requires_grad_(name in grad_names)
        leaves[name] = value
    missing = [n for n in grad_names if not isinstance(leaves.get(n), torch.Tensor)]
    if missing:
        raise ValueError(f"grad_names {missing} are not floating tensor inputs")
    with torch.enable_grad():
        outputs = _as_tuple(fn(**leaves))
    grads: dict[str, torch.Tensor] = {}
    if grad_outputs is not None and grad_names:
        if len(grad_outputs) != len(outputs):
            raise ValueError(f"{len(grad_outputs)} grad_outputs for {len(outputs)} outputs")
        pairs = [(o, g.to(device=o.device, dtype=o.dtype)) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
        assert pairs, "no output requires grad: the implementation detached its result from the inputs"
        got = torch.autograd.grad(
            [o for o, _ in pairs], [leaves[n] for n in grad_names], [g for _, g in pairs], allow_unused=True
        )
        for name, g in zip(grad_names, got):
            assert g is not None, f"no gradient reached input {name!r}"
            grads[name] = g
    return OpRun(tuple(o.detach() for o in outputs), grads)


def check_op(
    impls: Mapping[str, Callable[..., Any]],
    naive: Callable[..., Any],
    inputs: Mapping[str, Any],
    grad_names: Sequence[str],
    *,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
    name: str = "op",
    atol: float | None = None,
    output_names: Sequence[str] | None = None,
) -> dict[str, OpRun]:
    """Check every implementation in ``impls`` against ``naive`` under the oracle, forward and every gradient.

    ``ref`` is ``naive`` on the inputs converted to float64, ``pt`` is ``naive`` on the inputs as given (in
    ``dtype``). The same random upstream gradients (rounded to ``dtype`` first, so all runs see the same values)
    are backpropagated through all runs.

    Args:
        impls: the implementations under test by name; each is called with ``inputs`` as keyword arguments.
        naive: the plain computation (e.g. a :mod:`fastvit.reference` function).
        inputs: from :func:`make_inputs`.
        grad_names: the inputs whose gradients are compared.
        dtype: the input precision (picks :data:`ATOL`).
        output_names: labels of the outputs in messages (default ``out`` or ``out0``, ``out1``, ...).

    Returns:
        The runs by name (``"ref"``, ``"pt"`` and each impl).

    Raises:
        AssertionError: an implementation fails the oracle on an output or a gradient (see
            :func:`assert_close_oracle`) or returns another number of outputs.
    """
    ref_fwd = run_forward_backward(naive, inputs, (), dtype=torch.float64)
    grad_outputs = [randn(o.shape, dtype=dtype, generator=generator).to(torch.float64) for o in ref_fwd.outputs]
    runs = {"ref": run_forward_backward(naive, inputs, grad_names, grad_outputs, dtype=torch.float64)}
    runs["pt"] = run_forward_backward(naive, inputs, grad_names, grad_outputs)
    for impl_name, impl in impls.items():
        runs[impl_name] = run_forward_backward(impl, inputs, grad_names, grad_outputs)
    ref_run, pt_run = runs["ref"], runs["pt"]
    outs = list(output_names) if output_names is not None else [f"out{i}" for i in range(len(ref_run.outputs))]
    if len(ref_run.outputs) == 1 and output_names is None:
        outs = ["out"]
    for impl_name in impls:
        run = runs[impl_name]
        assert len(run.outputs) == len(ref_run.outputs), (
            f"{name}[{impl_name}]: {len(run.outputs)} outputs, expected {len(ref_run.outputs)}"
        )
        for i, label in enumerate(outs):
            assert_close_oracle(
                run.outputs[i], ref_run.outputs[i], pt_run.outputs[i], dtype, f"{name}[{impl_name}] {label}", atol=atol
            )
        for g in grad_names:
            assert_close_oracle(
                run.grads[g], ref_run.grads[g], pt_run.grads[g], dtype, f"{name}[{impl_name}] grad {g}", atol=atol
            )
    return runs


# ------------------------------------------------------------------------------------------------ models
def _model_run(
    model: torch.nn.Module,
    args: Sequence[Any],
    backend: str | None,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    compile_backend: str | None = None,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
    seed: int | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    run = model if compile_backend is None else torch.compile(model, fullgraph=True, backend=compile_backend)
    if seed is not None:
        torch.manual_seed(seed)
    with use_backend(backend), context() if context is not None else contextlib.nullcontext():
        if loss_fn is None:
            with torch.no_grad():
                return run(*args), {}
        out = run(*args)
        loss_fn(out).float().backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class ModelOracle:
    """``ref`` and ``pt`` of one model on one input, computed once; :meth:`judge` then puts any number of runs (each
    backend, compiled or not, another module with the same weights) under the oracle against them.

    ``pt``: the model and inputs as given on ``eager``, inside ``context()``; ``ref``: a deep copy of the model and the
    floating inputs in ``ref_dtype`` on ``eager``, outside ``context``. With ``loss_fn`` every run is backpropagated
    and every parameter gradient is compared too; without it the forward runs under ``torch.no_grad``. Under
    autocast pass ``context=lambda: torch.autocast(device_type, torch.bfloat16)``, ``ref_dtype=torch.float32`` and
    ``dtype=torch.bfloat16`` (the tolerance of the autocast dtype).

    Args:
        model: any ``nn.Module`` built from fastvit ops (eager is the reference either way); set its train/eval mode
            first.
        args: the model's positional inputs (floating tensors are cast to ``ref_dtype`` for ``ref``).
        first: picks the compared tensor from the model's output (e.g. ``lambda out: out[1]`` for MAE's pred).
        ref_dtype: float64, or float32 for half / autocast runs (see :func:`ref_dtype_for`).
        loss_fn: maps the output to a scalar to backpropagate, or ``None`` (forward only).
        dtype: the precision that picks the tolerance (default: the model's parameter dtype).
        context: a context manager factory entered around ``pt`` and every judged run.
        seed: ``torch.manual_seed(seed)`` before each run, for models that draw random numbers (MAE's masking).

    Raises:
        ValueError: the reference or ``pt`` is not finite (bad inputs; raised by :meth:`judge`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: Sequence[Any],
        first: Callable[[Any], torch.Tensor],
        *,
        ref_dtype: torch.dtype,
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        context: Callable[[], contextlib.AbstractContextManager] | None = None,
        seed: int | None = None,
    ) -> None:
        self.args, self.first, self.loss_fn, self.context, self.seed = list(args), first, loss_fn, context, seed
        self.dtype = next(model.parameters()).dtype if dtype is None else dtype
        ref_model = copy.deepcopy(model).to(ref_dtype)
        ref_args = [a.to(ref_dtype) if isinstance(a, torch.Tensor) and torch.is_floating_point(a) else a for a in args]
        pt, self.pt_grads = _model_run(model, self.args, "eager", loss_fn, context=context, seed=seed)
        self.pt = first(pt).detach()
        del pt
        ref, self.ref_grads = _model_run(ref_model, ref_args, "eager", loss_fn, seed=seed)
        self.ref = first(ref).detach()
        del ref, ref_model

    def judge(
        self,
        model: torch.nn.Module,
        *,
        backend: str | None,
        compile_backend: str | None = None,
        check_dtype: bool = False,
    ) -> list[OracleResult]:
        """Run ``model`` on ``backend`` (``None``: automatic selection; compiled with ``torch.compile(model,
        fullgraph=True, backend=compile_backend)`` when given) and judge it.

        Args:
            check_dtype: require the compared tensors to have the tolerance dtype (off by default: under autocast
                an output may come back in either precision).

        Returns:
            :class:`OracleResult` of the output, then of every parameter gradient; a run whose gradients cover
            other parameters than ``pt``'s and ``ref``'s (or none) gets a failed result named ``"gradients"``.
        """
        out, grads = _model_run(model, self.args, backend, self.loss_fn, compile_backend, self.context, self.seed)
        dt = self.dtype
        rows = [oracle_compare(self.first(out), self.ref, self.pt, dt, "output", check_dtype=check_dtype)]
        if self.loss_fn is None:
            return rows
        if not (set(grads) == set(self.pt_grads) == set(self.ref_grads) and grads):
            diff = sorted((set(grads) ^ set(self.pt_grads)) | (set(self.pt_grads) ^ set(self.ref_grads)))
            return rows + [
                OracleResult(
                    "gradients",
                    False,
                    None,
                    0.0,
                    None,
                    0.0,
                    atol_for(dt),
                    dt,
                    (),
                    f"gradients: the runs' parameter gradients differ ({diff or 'none'})",
                )
            ]
        return rows + [
            oracle_compare(grads[n], self.ref_grads[n], self.pt_grads[n], dt, f"grad {n}", check_dtype=check_dtype)
            for n in grads
        ]


def compare_model_with_eager(
    model: torch.nn.Module,
    args: Sequence[torch.Tensor],
    loss_fn: Callable[[Any], torch.Tensor],
    first: Callable[[Any], torch.Tensor],
    *,
    backend: str,
    ref_dtype: torch.dtype,
    compile_backend: str | None = None,
) -> None:
    """A whole model on ``backend`` against eager under the oracle, output and every parameter gradient
    (:class:`ModelOracle` with ``loss_fn``, asserting).

    ``out``: the model as given on ``backend`` (wrapped in ``torch.compile(model, fullgraph=True,
    backend=compile_backend)`` when ``compile_backend`` is given); ``pt``: the same model and inputs on ``eager``,
    uncompiled; ``ref``: a copy of the model and the floating inputs in ``ref_dtype`` on ``eager``. ``loss_fn(out)``
    is backpropagated; ``first(out)`` picks the tensor whose forward values are compared. Tolerances follow the
    model's parameter dtype, and the compared tensors must have that dtype.

    Raises:
        AssertionError: the output or a parameter gradient fails the oracle, or the runs' gradients cover different
            parameters (or none).
    """
    try:
        oracle = ModelOracle(model, args, first, ref_dtype=ref_dtype, loss_fn=loss_fn)
        results = oracle.judge(model, backend=backend, compile_backend=compile_backend, check_dtype=True)
    except ValueError as exc:
        raise AssertionError(str(exc)) from None
    for r in results:
        assert r.ok, r.message
