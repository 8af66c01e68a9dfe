"""The numerical test oracle shared by fastvit's tests (eager, Triton, CUDA).

DESIGN.md's rule (FlashAttention's): with ``ref`` computed in float64 and ``pt`` the *same plain computation
in the input precision*, an implementation's ``out`` passes when

    max|out - ref|  <=  2 * max|pt - ref|  +  atol(dtype)

for the forward outputs and for every gradient. ``pt`` measures how much error the input precision forces on
an honest implementation at this shape; a kernel may be up to twice as wrong as that, plus a small absolute
floor (a few ulps at the tensor's magnitude; see ATOL) for elements where ``pt`` happens to be exact.

API (import with ``from oracle import ...``; ``tests/`` is on ``sys.path`` under pytest's rootdir conftest)::

    ATOL, atol_for(dtype)                         absolute floors per dtype
    max_abs_err(a, b)                             max |a - b| in float64 (nan if either has a nan)
    assert_close_oracle(out, ref, pt, dtype, name)
    poison_like(t), poison_(t)                    NaN-filled outputs so an unwritten element fails the oracle
    randn(shape, dtype=..., generator=...)        fresh random inputs (never zeros), drawn on the CPU
    make_inputs({"x": (B, N, C), ...}, ...)       a dict of those
    run_forward_backward(fn, inputs, grad_names, grad_outputs)
    check_op(impls, naive, inputs, grad_names, dtype=..., generator=...)   forward + every gradient, all impls

Typical Triton test::

    inputs = make_inputs({"x": (3, 197, 96), "weight": (96,), "bias": (96,)}, dtype=dtype, generator=generator)
    check_op({"triton": partial(fastvit.ops.layer_norm, backend="triton")}, fastvit.reference.layer_norm,
             inputs, ["x", "weight", "bias"], dtype=dtype, generator=generator, name="layer_norm")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

# Floors, about a few units in the last place at magnitude ~1 (machine epsilon: fp64 2.2e-16, fp32 1.2e-7,
# fp16 9.8e-4, bf16 7.8e-3). fp32 gets 1e-5 (~100 ulp) because kernels legitimately reorder long fp32 sums
# (K up to a few hundred here) where the plain fp32 computation may happen to round better; fp16 gets 1e-3
# (~1 ulp at 1.0) and bf16 1e-2 (~1 ulp at 1.0): one extra rounding of an output compared with a `pt` that
# happened to be exact (a copy, a gather) must not fail.
#
# Deviation from a purely absolute floor (DESIGN.md says atol(dtype)): the floor is scaled by
# max(1, max|ref|), i.e. "a few ulps at the tensor's magnitude". Weight gradients sum B·N terms and reach
# magnitudes of ~100 even at test shapes; there a different (and equally valid) summation order than `pt`'s
# costs ~1e-4 in fp32, which a fixed 1e-5 would flag although nothing is wrong. Real bugs (a wrong index, a
# missing term, a tanh GELU for an erf one) are orders of magnitude larger; tests/test_ops.py checks that the
# oracle still catches them.
ATOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}

#: The factor on ``max|pt - ref|`` (FlashAttention uses 2).
FACTOR = 2.0


def atol_for(dtype: torch.dtype) -> float:
    """The absolute floor of the oracle for inputs of ``dtype``."""
    try:
        return ATOL[dtype]
    except KeyError:
        raise ValueError(f"no oracle tolerance for dtype {dtype}; expected one of {list(ATOL)}") from None


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` computed in float64 on the CPU; ``nan`` if either holds a nan, 0 for empty tensors."""
    d = (a.detach().to(device="cpu", dtype=torch.float64) - b.detach().to(device="cpu", dtype=torch.float64)).abs()
    if d.numel() == 0:
        return 0.0
    if torch.isnan(d).any():
        return math.nan
    return float(d.max())


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
    """Assert ``max|out - ref| <= factor * max|pt - ref| + atol(dtype) * max(1, max|ref|)``.

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
            or the bound violated; the message gives max|out - ref|, max|pt - ref|, the bound and max|ref|.
    """
    dtype = pt.dtype if dtype is None else dtype
    atol = atol_for(dtype) if atol is None else atol
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    assert tuple(pt.shape) == tuple(ref.shape), f"{name}: pt shape {tuple(pt.shape)} != ref {tuple(ref.shape)}"
    if check_dtype:
        assert out.dtype == dtype, f"{name}: dtype {out.dtype} != expected {dtype}"
    assert torch.isfinite(ref.detach()).all(), f"{name}: the float64 reference is not finite (bad test inputs)"
    assert torch.isfinite(pt.detach()).all(), (
        f"{name}: the {pt.dtype} plain computation overflowed (bad test inputs: scale them down)"
    )
    n_bad = int((~torch.isfinite(out.detach())).sum())
    assert n_bad == 0, f"{name}: {n_bad} of {out.numel()} elements are nan/inf (unwritten poisoned output?)"
    err_out = max_abs_err(out, ref)
    err_pt = max_abs_err(pt, ref)
    ref_max = float(ref.detach().abs().max()) if ref.numel() else 0.0
    floor = atol * max(1.0, ref_max)
    bound = factor * err_pt + floor
    if not err_out <= bound:
        d = (out.detach().double().cpu() - ref.detach().double().cpu()).abs()
        where = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape)) if d.dim() else ()
        raise AssertionError(
            f"{name} ({dtype}, shape {tuple(ref.shape)}): max|out - ref| = {err_out:.4g} > bound {bound:.4g} = "
            f"{factor:g} * max|pt - ref| ({err_pt:.4g}) + atol ({atol:.1g}) * max(1, max|ref| = {ref_max:.4g}); "
            f"worst at index {where}: "
            f"out {float(out.detach().double().cpu()[where]):.6g} vs "
            f"ref {float(ref.detach().double().cpu()[where]):.6g}"
        )


# ------------------------------------------------------------------------------------------------ poison
def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with a value no kernel writes: nan for floats, the dtype's max for integers."""
    if t.is_floating_point() or t.is_complex():
        return t.fill_(math.nan)
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).max)


def poison_like(
    t: torch.Tensor, *, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A new tensor like ``t`` (optionally another shape / dtype), poisoned with :func:`poison_`."""
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
    """``offset + scale * N(0, 1)`` drawn in float32 on the CPU (same numbers on every device), then cast."""
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

    Each spec is a shape (drawn with ``scale``), ``(shape, scale)``, a tensor (moved to ``device``; floating
    tensors cast to ``dtype``) or anything else (passed through: ``None``, ints, strings).
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


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class OpRun:
    """The outputs of one forward (always a tuple) and the gradients by input name."""

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
    cast to each output's dtype; ``None`` runs the forward only.
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
    are backpropagated through all runs. Returns the runs by name (``"ref"``, ``"pt"`` and each impl).
    """
    ref_fwd = run_forward_backward(naive, inputs, (), dtype=torch.float64)
    grad_outputs = [
        randn(o.shape, dtype=dtype, generator=generator).to(torch.float64) for o in ref_fwd.outputs
    ]
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


def _model_run(model, args, backend: str, loss_fn, compile_backend: str | None = None
               ) -> tuple[Any, dict[str, torch.Tensor]]:
    import fastvit  # tests/oracle.py is imported before fastvit in some modules; keep the dependency local

    model.zero_grad(set_to_none=True)
    run = model if compile_backend is None else torch.compile(model, fullgraph=True, backend=compile_backend)
    with fastvit.use_backend(backend):
        out = run(*args)
        loss_fn(out).float().backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


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
    """A whole model on ``backend`` against eager under the oracle, output and every parameter gradient.

    ``out``: the model as given on ``backend`` (wrapped in ``torch.compile(model, fullgraph=True,
    backend=compile_backend)`` when ``compile_backend`` is given); ``pt``: the same model and inputs on ``eager``,
    uncompiled; ``ref``: a copy of the model and the floating inputs in ``ref_dtype`` on ``eager``. ``loss_fn(out)`` is
    backpropagated; ``first(out)`` picks the tensor whose forward values are compared. Tolerances follow the model's
    parameter dtype.
    """
    import copy

    dtype = next(model.parameters()).dtype
    ref_model = copy.deepcopy(model).to(ref_dtype)
    ref_args = [a.to(ref_dtype) if torch.is_floating_point(a) else a for a in args]
    out, grads = _model_run(model, args, backend, loss_fn, compile_backend)
    pt, pt_grads = _model_run(model, args, "eager", loss_fn)
    ref, ref_grads = _model_run(ref_model, ref_args, "eager", loss_fn)
    assert_close_oracle(first(out), first(ref), first(pt), dtype, "output")
    assert set(grads) == set(pt_grads) == set(ref_grads) and grads
    for name in grads:
        assert_close_oracle(grads[name], ref_grads[name], pt_grads[name], dtype, f"grad {name}")


class FixedMaskMAE(torch.nn.Module):
    """``mae(imgs, mask_ratio, noise)`` as a module of ``(imgs, noise)``: with the noise an input, every run (each
    backend, compiled or not, any dtype) masks the same patches, so whole-MAE runs can be compared."""

    def __init__(self, mae: torch.nn.Module, mask_ratio: float = 0.75):
        super().__init__()
        self.mae = mae
        self.mask_ratio = mask_ratio

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor):
        return self.mae(imgs, self.mask_ratio, noise)
