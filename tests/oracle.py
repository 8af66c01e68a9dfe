"""The numerical test oracle of fastvit's tests: a thin re-export of :mod:`fastvit.testing` plus test-only helpers.

The oracle itself (docs/ARCHITECTURE.md's rule, FlashAttention's: ``max|out - ref| <= 2 * max|pt - ref| + atol(dtype)`` for
outputs and every gradient), its tolerance table and the op / model comparison machinery live in
:mod:`fastvit.testing`, shared with ``fastvit-bench``, so the tests and the benchmark judge by the same rule.

API (import with ``from oracle import ...``; ``tests/`` is on ``sys.path`` under pytest's rootdir conftest)::

    ATOL, FACTOR, atol_for(dtype), ref_dtype_for(dtype)
    max_abs_err(a, b), oracle_compare(...), OracleResult, assert_close_oracle(out, ref, pt, dtype, name)
    poison_like(t), poison_(t), randn(shape, ...), make_inputs({...}, ...)
    OpRun, run_forward_backward(...), check_op(impls, naive, inputs, grad_names, dtype=..., generator=...)
    ModelOracle(...), compare_model_with_eager(model, args, loss_fn, first, backend=..., ref_dtype=...)
    FixedMaskMAE(mae, mask_ratio)               test-only: MAE with the masking noise as an input
    seeded_step(model, seed, forward, loss_fn), assert_same_step(got, want, atol)
                                                test-only: same random draws, same output and gradients
"""

from __future__ import annotations

import torch

import fastvit.ops
from fastvit.testing import (  # noqa: F401  (re-exported for the test modules)
    ATOL,
    FACTOR,
    ModelOracle,
    OpRun,
    OracleResult,
    assert_close_oracle,
    atol_for,
    check_op,
    compare_model_with_eager,
    make_inputs,
    max_abs_err,
    oracle_compare,
    poison_,
    poison_like,
    randn,
    ref_dtype_for,
    run_forward_backward,
)


class FixedMaskMAE(torch.nn.Module):
    """``mae(imgs, mask_ratio, noise)`` as a module of ``(imgs, noise)``: with the noise an input, every run (each
    backend, compiled or not, any dtype) masks the same patches, so whole-MAE runs can be compared."""

    def __init__(self, mae: torch.nn.Module, mask_ratio: float = 0.75):
        super().__init__()
        self.mae = mae
        self.mask_ratio = mask_ratio

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor):
        return self.mae(imgs, self.mask_ratio, noise)


#: The fastvit.ops a ViT's embedding and blocks use.
BLOCK_OPS = ("patch_embed", "attention", "scaled_dot_product_attention", "layer_norm", "linear_gelu", "linear_residual")


def spy_ops(monkeypatch) -> dict:
    """Count calls of the fastvit.ops a ViT block uses (op name -> calls), through ``monkeypatch``."""
    calls: dict[str, int] = {}
    for name in BLOCK_OPS:
        orig = getattr(fastvit.ops, name)

        def spy(*a, _orig=orig, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _orig(*a, **k)

        monkeypatch.setattr(fastvit.ops, name, spy)
    return calls


def seeded_step(model: torch.nn.Module, seed: int, forward, loss_fn, inputs: dict | None = None) -> tuple:
    """Test-only: one forward + backward of ``model`` right after ``torch.manual_seed(seed)``, so that its random
    layers (patch dropout, drop path) draw what another model's step with the same seed draws. ``forward(model,
    inputs)`` gives the output, ``loss_fn(output)`` the scalar to differentiate; ``inputs`` maps names to tensors
    (copied as leaves requiring grad). Returns ``(output, {name: grad})`` over the parameters that require grad and
    the inputs (a parameter the loss does not reach has ``None``)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in (inputs or {}).items()}
    torch.manual_seed(seed)
    out = forward(model, leaves)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wrt = {**params, **leaves}
    grads = torch.autograd.grad(loss_fn(out), list(wrt.values()), allow_unused=True)
    return out.detach(), dict(zip(wrt, grads))


def assert_same_step(got: tuple, want: tuple, atol: float) -> None:
    """Test-only: two :func:`seeded_step` results agree -- output and every gradient within ``atol`` (``None``
    gradients on the same parameters)."""
    (out, g_out), (ref, g_ref) = got, want
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    assert set(g_out) == set(g_ref)
    for k, g in g_ref.items():
        if g is None:
            assert g_out[k] is None, k
        else:
            torch.testing.assert_close(g_out[k], g, rtol=0, atol=atol, msg=f"grad {k}")
