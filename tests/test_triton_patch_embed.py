"""Triton patch embedding (fastvit.kernels.patch_embed via fastvit.families.patch_embed) against the oracle.

Runs on the CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), on a
CUDA device otherwise. ``torch.empty`` is NaN-poisoned for every test, so an unwritten output element fails.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from oracle import check_op, make_inputs, randn  # noqa: E402

import fastvit.ops  # noqa: E402
from fastvit import reference  # noqa: E402
from fastvit.families import patch_embed as _family  # noqa: E402,F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py


def _triton_pe(images, weight, bias, pos_embed=None, cls_token=None, reg_tokens=None, ids_keep=None):
    return fastvit.ops.patch_embed(
        images,
        weight,
        bias,
        pos_embed=pos_embed,
        cls_token=cls_token,
        reg_tokens=reg_tokens,
        ids_keep=ids_keep,
        backend="triton",
    )


def _naive_pe(images, weight, bias, pos_embed=None, cls_token=None, reg_tokens=None, ids_keep=None):
    return reference.patch_embed(
        images, weight, bias, pos_embed=pos_embed, cls_token=cls_token, reg_tokens=reg_tokens, ids_keep=ids_keep
    )


def _ids_keep(B: int, Np: int, n_keep: int, generator: torch.Generator) -> torch.Tensor:
    return torch.argsort(torch.rand(B, Np, generator=generator), dim=1)[:, :n_keep]


# name: (B, C, Hi, Wi, Ph, Pw, E, n_keep or None, cls, n_reg, pos: "full" (Np + R) | "patches" (Np) | None)
CASES = {
    "timm": (3, 3, 8, 12, 4, 4, 24, None, True, 0, "full"),
    "no_embed_class_reg": (2, 3, 8, 12, 4, 4, 40, None, True, 2, "patches"),
    "mae_keep": (3, 3, 8, 12, 4, 4, 24, 2, True, 0, "full"),
    "keep_all_rect_patch": (2, 2, 4, 9, 2, 3, 20, 6, False, 2, "full"),
    "keep_one_nopos": (2, 1, 4, 4, 2, 2, 24, 1, False, 0, None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,with_bias", [(c, True) for c in CASES] + [("timm", False), ("mae_keep", False)])
def test_patch_embed_oracle(dtype, case, with_bias, generator, device):
    B, C, Hi, Wi, Ph, Pw, E, n_keep, cls, n_reg, pos = CASES[case]
    Np = (Hi // Ph) * (Wi // Pw)
    R = int(cls) + n_reg
    specs = {
        "images": (B, C, Hi, Wi),
        "weight": ((E, C, Ph, Pw), (C * Ph * Pw) ** -0.5),
        "bias": (E,) if with_bias else None,
        "pos_embed": {"full": (1, Np + R, E), "patches": (1, Np, E), None: None}[pos],
        "cls_token": (1, 1, E) if cls else None,
        "reg_tokens": (1, n_reg, E) if n_reg else None,
        "ids_keep": _ids_keep(B, Np, n_keep, generator) if n_keep is not None else None,
    }
    inputs = make_inputs(specs, dtype=dtype, device=device, generator=generator)
    grads = [n for n in ("images", "weight", "bias", "pos_embed", "cls_token", "reg_tokens") if inputs[n] is not None]
    check_op(
        {"triton": _triton_pe}, _naive_pe, inputs, grads, dtype=dtype, generator=generator, name=f"patch_embed {case}"
    )


def test_patch_embed_weight_grad_only_and_deterministic(generator, device):
    """images without requires_grad: no d(images) work, pixels of dropped patches untouched; bit-reproducible."""
    B, C, Hi, Wi, P, E = 2, 3, 8, 8, 4, 32
    images = randn((B, C, Hi, Wi), generator=generator, device=device, dtype=torch.bfloat16)
    weight = randn((E, C, P, P), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    bias = randn((E,), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    pos = randn((1, 5, E), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    cls = randn((1, 1, E), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    ids = _ids_keep(B, 4, 2, generator).to(device)
    dout = randn((B, 3, E), generator=generator, device=device, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out = _triton_pe(images, weight, bias, pos, cls, None, ids)
        runs.append(torch.autograd.grad(out, [weight, bias, pos, cls], dout))
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


def test_patch_embed_images_grad_zero_on_dropped_patches(generator, device):
    B, C, Hi, Wi, P, E = 1, 2, 4, 4, 2, 16
    images = randn((B, C, Hi, Wi), generator=generator, device=device).requires_grad_()
    weight = randn((E, C, P, P), generator=generator, device=device)
    ids = torch.tensor([[3]], device=device)
    out = _triton_pe(images, weight, None, ids_keep=ids)
    (g,) = torch.autograd.grad(out.sum(), [images])
    assert (g[..., :2, :] == 0).all() and (g[..., 2:, :2] == 0).all() and (g[..., 2:, 2:] != 0).any()


def test_patch_embed_op_fake_shapes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        img = torch.empty(2, 3, 8, 12, dtype=torch.float16, device=device)
        w = torch.empty(24, 3, 4, 4, dtype=torch.float16, device=device)
        b = torch.empty(24, dtype=torch.float16, device=device)
        pos = torch.empty(1, 7, 24, dtype=torch.float16, device=device)
        cls = torch.empty(1, 1, 24, dtype=torch.float16, device=device)
        ids = torch.empty(2, 3, dtype=torch.int64, device=device)
        out = torch.ops.fastvit.patch_embed_fwd(img, w, b, pos, cls, None, ids)
        assert out.shape == (2, 4, 24) and out.dtype == torch.float16
        dimg, dw, db, dpos, dcls, dreg = torch.ops.fastvit.patch_embed_bwd(out, img, w, ids, 7, 1, 0, True)
        assert dimg.shape == img.shape and dw.shape == w.shape and db.shape == (24,)
        assert dpos.shape == pos.shape and dcls.shape == cls.shape and dreg.shape == (1, 0, 24)


OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)


def test_patch_embed_opcheck(generator, device):
    img = randn((2, 2, 4, 4), generator=generator, device=device).requires_grad_()
    w = randn((16, 2, 2, 2), generator=generator, device=device).requires_grad_()
    b = randn((16,), generator=generator, device=device).requires_grad_()
    pos = randn((1, 5, 16), generator=generator, device=device).requires_grad_()
    cls = randn((1, 1, 16), generator=generator, device=device).requires_grad_()
    ids = _ids_keep(2, 4, 3, generator).to(device)
    torch.library.opcheck(torch.ops.fastvit.patch_embed_fwd, (img, w, b, pos, cls, None, ids), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("n_keep", [0, 2])
def test_patch_embed_channels_last_and_empty_keep(n_keep, generator, device):
    """channels_last images are read through their strides; N_keep = 0 leaves only the prefix rows."""
    B, C, Hi, Wi, P, E = 2, 3, 8, 8, 4, 16
    inputs = {
        "images": randn((B, C, Hi, Wi), generator=generator, device=device).to(memory_format=torch.channels_last),
        "weight": randn((E, C, P, P), generator=generator, device=device, scale=0.2),
        "bias": None,
        "pos_embed": randn((1, 5, E), generator=generator, device=device),
        "cls_token": randn((1, 1, E), generator=generator, device=device),
        "ids_keep": _ids_keep(B, 4, n_keep, generator).to(device),
    }
    check_op(
        {"triton": _triton_pe},
        _naive_pe,
        inputs,
        ["images", "weight", "pos_embed", "cls_token"],
        dtype=torch.float32,
        generator=generator,
        name=f"patch_embed channels_last keep={n_keep}",
    )


def test_autotune_key_holds_input_precision():
    """The pruner keeps only the smallest tile for fp32 with IEEE dots, not with TF32: INPUT_PRECISION must be in
    the autotune key (Triton adds the dtypes, not the constexprs), as for the attention and linear kernels."""
    from fastvit.kernels import patch_embed as PE

    for kernel in (PE.pe_fwd, PE.pe_dw, PE.pe_dimg):
        assert "INPUT_PRECISION" in kernel.keys
