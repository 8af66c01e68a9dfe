"""Triton MAE decoder un-shuffle and reconstruction loss (fastvit.kernels.mae via fastvit.families.mae) vs the oracle.

Runs on the CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), on a
CUDA device otherwise. ``torch.empty`` is NaN-poisoned for every test, so an output element a kernel forgets to
write fails the oracle's finiteness check.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from oracle import check_op, make_inputs, randn  # noqa: E402

import fastvit.ops  # noqa: E402
from fastvit import reference  # noqa: E402
from fastvit.backends import BackendNotSupportedError  # noqa: E402
from fastvit.families import mae as _family  # noqa: E402,F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py


def _ids_restore(B: int, N: int, generator: torch.Generator) -> torch.Tensor:
    """MAE's random_masking: argsort of noise is ids_shuffle; argsort of that is ids_restore."""
    ids_shuffle = torch.argsort(torch.rand(B, N, generator=generator), dim=1)
    return torch.argsort(ids_shuffle, dim=1)


def _triton_unshuffle(x, mask_token, ids_restore, pos_embed=None):
    return fastvit.ops.mae_unshuffle(x, mask_token, ids_restore, pos_embed=pos_embed, backend="triton")


def _naive_unshuffle(x, mask_token, ids_restore, pos_embed=None):
    return reference.mae_unshuffle(x, mask_token, ids_restore, pos_embed=pos_embed)


# (B, N, N_keep, C): N = 1, 50, 61; N_keep = 0 and = N; C = 24, 200 (not a power of two, > one 128 chunk)
UNSHUFFLE_CASES = [(3, 1, 0, 24), (3, 1, 1, 24), (3, 50, 12, 200), (3, 61, 0, 24), (2, 61, 61, 24), (3, 61, 15, 24)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,n_keep,C", UNSHUFFLE_CASES)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
def test_mae_unshuffle_oracle(dtype, B, N, n_keep, C, with_pos, generator, device):
    specs = {
        "x": (B, 1 + n_keep, C),
        "mask_token": (1, 1, C),
        "ids_restore": _ids_restore(B, N, generator),
        "pos_embed": (1, N + 1, C) if with_pos else None,
    }
    inputs = make_inputs(specs, dtype=dtype, device=device, generator=generator)
    grads = ["x", "mask_token"] + (["pos_embed"] if with_pos else [])
    check_op(
        {"triton": _triton_unshuffle},
        _naive_unshuffle,
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name=f"mae_unshuffle N={N} keep={n_keep} C={C}",
    )


def test_mae_unshuffle_strided_x(generator, device):
    """A token slice of a wider tensor (non-contiguous batch / token strides) is read in place."""
    B, N, nk, C = 2, 9, 4, 24
    wide = randn((B, 1 + nk + 3, C), generator=generator, device=device)
    x = wide[:, 2 : 2 + 1 + nk]
    mt = randn((1, 1, C), generator=generator, device=device)
    ids = _ids_restore(B, N, generator).to(device)
    got = _triton_unshuffle(x, mt, ids)
    assert torch.equal(got, _naive_unshuffle(x, mt, ids))


def test_mae_unshuffle_backward_deterministic(generator, device):
    B, N, nk, C = 3, 50, 12, 200
    x = randn((B, 1 + nk, C), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    mt = randn((1, 1, C), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    pos = randn((1, N + 1, C), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    ids = _ids_restore(B, N, generator).to(device)
    dout = randn((B, N + 1, C), generator=generator, device=device, dtype=torch.bfloat16)
    runs = [torch.autograd.grad(_triton_unshuffle(x, mt, ids, pos), [x, mt, pos], dout) for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


# ---------------------------------------------------------------------------------------------- loss
def _triton_loss(pred, images, mask, patch_size, norm_pix_loss=False):
    return fastvit.ops.mae_loss(pred, images, mask, patch_size, norm_pix_loss=norm_pix_loss, backend="triton")


def _naive_loss(pred, images, mask, patch_size, norm_pix_loss=False):
    return reference.mae_loss(pred, images, mask, patch_size, norm_pix_loss=norm_pix_loss)


# (B, C, Hi, Wi, P): rectangular grids, C = 1 and 3, a 1-patch image
LOSS_CASES = [(3, 3, 8, 12, 4), (2, 1, 6, 6, 2), (2, 3, 5, 5, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,Hi,Wi,P", LOSS_CASES)
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
def test_mae_loss_oracle(dtype, B, C, Hi, Wi, P, norm_pix, generator, device):
    N = (Hi // P) * (Wi // P)
    mask = (torch.rand(B, N, generator=generator) < 0.75).float()
    mask[0, 0] = 1.0  # at least one removed patch
    specs = {
        "pred": (B, N, P * P * C),
        "images": (B, C, Hi, Wi),
        "mask": mask,
        "patch_size": P,
        "norm_pix_loss": norm_pix,
    }
    inputs = make_inputs(specs, dtype=dtype, device=device, generator=generator)
    check_op(
        {"triton": _triton_loss},
        _naive_loss,
        inputs,
        ["pred", "images", "mask"],
        dtype=dtype,
        generator=generator,
        name=f"mae_loss {B}x{C}x{Hi}x{Wi} P={P} norm_pix={norm_pix}",
    )


def test_mae_loss_pred_only_grad_and_deterministic(generator, device):
    """images without requires_grad get no gradient work; the backward is bit-reproducible."""
    B, C, Hi, Wi, P = 2, 3, 8, 8, 4
    pred = randn((B, 4, P * P * C), generator=generator, device=device, dtype=torch.float16).requires_grad_()
    images = randn((B, C, Hi, Wi), generator=generator, device=device, dtype=torch.float16)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]], device=device, dtype=torch.float16)
    runs = [torch.autograd.grad(_triton_loss(pred, images, mask, P, True), [pred]) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.isfinite(runs[0][0]).all()


def test_mae_fp64_rejected_with_reasons(device):
    x = torch.randn(2, 3, 24, dtype=torch.float64, device=device)
    mt = torch.randn(1, 1, 24, dtype=torch.float64, device=device)
    ids = torch.arange(4, device=device).repeat(2, 1)
    with pytest.raises(BackendNotSupportedError, match="dtype"):
        _triton_unshuffle(x, mt, ids)


def test_mae_ops_fake_shapes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 40, dtype=torch.bfloat16, device=device)
        mt = torch.empty(1, 1, 40, dtype=torch.bfloat16, device=device)
        ids = torch.empty(2, 9, dtype=torch.int64, device=device)
        pos = torch.empty(1, 10, 40, dtype=torch.bfloat16, device=device)
        out = torch.ops.fastvit.mae_unshuffle_fwd(x, mt, ids, pos)
        assert out.shape == (2, 10, 40) and out.dtype == torch.bfloat16
        dx, dmt, dpos = torch.ops.fastvit.mae_unshuffle_bwd(out, ids, 3, True)
        assert dx.shape == x.shape and dmt.shape == (1, 1, 40) and dpos.shape == (1, 10, 40)
        pred = torch.empty(2, 6, 48, dtype=torch.float16, device=device)
        img = torch.empty(2, 3, 8, 12, dtype=torch.float16, device=device)
        row = torch.ops.fastvit.mae_loss_fwd(pred, img, 4, True)
        assert row.shape == (2, 6) and row.dtype == torch.float32
        dpred, dimg = torch.ops.fastvit.mae_loss_bwd(row, pred, img, 4, True, True)
        assert dpred.shape == pred.shape and dimg.shape == img.shape


#: Under the interpreter wrap_triton hands back the interpreted kernel, so AOT dispatch runs on CUDA only.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)


def test_mae_opcheck(generator, device):
    B, N, nk, C = 2, 5, 2, 16
    x = randn((B, 1 + nk, C), generator=generator, device=device).requires_grad_()
    mt = randn((1, 1, C), generator=generator, device=device).requires_grad_()
    pos = randn((1, N + 1, C), generator=generator, device=device).requires_grad_()
    ids = _ids_restore(B, N, generator).to(device)
    torch.library.opcheck(torch.ops.fastvit.mae_unshuffle_fwd, (x, mt, ids, pos), test_utils=OPCHECK_UTILS)
    pred = randn((2, 4, 12), generator=generator, device=device).requires_grad_()
    img = randn((2, 3, 4, 4), generator=generator, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.fastvit.mae_loss_fwd, (pred, img, 2, True), test_utils=OPCHECK_UTILS)


def test_mae_loss_mixed_dtypes_channels_last(generator, device):
    """bf16 pred against fp32 channels_last images (the ops contract does not tie their dtypes)."""
    B, C, Hi, Wi, P = 2, 3, 8, 8, 4
    pred = randn((B, 4, P * P * C), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    images = randn((B, C, Hi, Wi), generator=generator, device=device).to(memory_format=torch.channels_last)
    images.requires_grad_()
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]], device=device)
    for norm_pix in (False, True):
        got = _triton_loss(pred, images, mask, P, norm_pix)
        want = _naive_loss(pred.double(), images.double(), mask.double(), P, norm_pix)
        assert got.dtype == torch.bfloat16
        assert abs(float(got.detach()) - float(want.detach())) <= 1e-2 * max(1.0, abs(float(want.detach())))
        gp, gi = torch.autograd.grad(got, [pred, images])
        wp, wi = torch.autograd.grad(want, [pred, images])
        assert gi.dtype == torch.float32 and gp.dtype == torch.bfloat16
        assert (gp.double() - wp).abs().max() <= 1e-2 * max(1.0, float(wp.abs().max()))
        assert (gi.double() - wi).abs().max() <= 1e-2 * max(1.0, float(wi.abs().max()))
