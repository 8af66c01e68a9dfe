"""The CUDA extension built just in time (``torch.utils.cpp_extension.load``) and loaded without a GPU.

A minimal build (one instantiation per kernel template, bf16, head-dim bucket 64, sm_90a only) is compiled once per
session -- minutes on two cores, cached by torch across runs -- and then checked for what needs no GPU:

* ``build_info()`` reports what was compiled;
* every ``fastvit::*_cuda`` schema equals the Triton op's (same arguments, same returns -- the attention ops' trailing
  rotary arguments included), so one autograd glue (:mod:`fastvit.families`) serves both backends;
* the fake (meta) implementations give the real ops' output shapes and dtypes, on a fake CUDA device under
  ``FakeTensorMode`` and on the meta device, forward and backward through the registered autograd (the autograd
  engine wants a CUDA context for fake CUDA tensors, so backward runs on meta tensors);
* a whole ``VisionTransformer`` and ``MaskedAutoencoderViT`` on the meta device dispatch every op to the ``cuda``
  backend and differentiate through it (dispatch made to believe a GPU is present);
* ``torch.library.opcheck`` on meta tensors (schema, fake, autograd registration).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastvit
from fastvit import backends
from fastvit.runtime import cuda as _cuda
from fastvit.runtime import cuda_build as build

pytestmark = pytest.mark.skipif(
    build.find_nvcc() is None
    or build.cutlass_include() is None
    or not os.path.isdir(build.CSRC)
    or torch.version.cuda is None,
    reason="needs nvcc, nvidia-cutlass, a source checkout and a CUDA build of torch",
)

FWD_OPS = (
    "attention",
    "sdpa",
    "layer_norm",
    "rms_norm",
    "linear_gelu",
    "linear_residual",
    "linear_glu",
    "patch_embed",
    "mae_unshuffle",
    "mae_loss",
)


@pytest.fixture(scope="module")
def ext():
    if _cuda._EXT is None:
        _cuda.load(jit=True, minimal=True, archs="9.0a")
    assert _cuda.load_error() is None
    return _cuda._EXT


@pytest.fixture
def as_h100(monkeypatch):
    """Make dispatch believe an sm_90 device is present (the kernels themselves never run: tensors are fake)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_build_info_reports_the_minimal_build(ext):
    info = _cuda.build_info()
    assert info["minimal"] is True
    assert info["archs"] == "900"
    assert info["half_dtypes"] == "bfloat16"
    assert info["attention_head_dim_buckets"] == "64"
    assert info["cuda_runtime_version"] >= 11080
    assert info["cutlass_version"].count(".") == 2


def _signature(schema) -> tuple:
    def norm(t: str) -> str:
        return t.replace("SymInt", "int")

    return (
        tuple((a.name, norm(str(a.type))) for a in schema.arguments),
        tuple(norm(str(r.type)) for r in schema.returns),
    )


@pytest.mark.parametrize("family", FWD_OPS)
def test_cuda_schemas_equal_the_triton_schemas(ext, family):
    """The attention ops included: both backends take the trailing rotary arguments (rope, num_prefix_tokens,
    rotate_half), so one autograd glue serves both."""
    pytest.importorskip("triton")
    for kind in ("fwd", "bwd"):
        cuda = _signature(getattr(torch.ops.fastvit, f"{family}_{kind}_cuda").default._schema)
        triton = _signature(getattr(torch.ops.fastvit, f"{family}_{kind}").default._schema)
        assert cuda == triton, (family, kind)


def test_attention_schemas_end_with_the_rotary_arguments(ext):
    rotary = (("rope", "Optional[Tensor]"), ("num_prefix_tokens", "int"), ("rotate_half", "bool"))
    for stem in ("attention", "sdpa", "attention_varlen", "sdpa_varlen"):
        for kind in ("fwd", "bwd"):
            schema = getattr(torch.ops.fastvit, f"{stem}_{kind}_cuda").default._schema
            assert _signature(schema)[0][-3:] == rotary, (stem, kind)
            assert [str(a.default_value) for a in schema.arguments[-3:]] == ["None", "0", "False"], (stem, kind)
    assert _cuda.build_info()["attention_rope"] == 1


def test_fake_attention_on_a_fake_cuda_device(ext):
    with FakeTensorMode():
        qkv = torch.empty(3, 197, 3 * 2 * 64, device="cuda", dtype=torch.bfloat16)
        o, lse = torch.ops.fastvit.attention_fwd_cuda(qkv, 2, 0.125)
        assert o.shape == (3, 197, 128) and o.dtype == torch.bfloat16 and o.device.type == "cuda"
        assert lse.shape == (3, 2, 197) and lse.dtype == torch.float32
        dqkv = torch.ops.fastvit.attention_bwd_cuda(o, qkv, o, lse, 2, 0.125)
        assert dqkv.shape == qkv.shape and dqkv.device.type == "cuda"


def test_fake_attention_forward_and_backward(ext):
    qkv = torch.empty(3, 197, 3 * 2 * 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    o, lse = torch.ops.fastvit.attention_fwd_cuda(qkv, 2, 0.125)
    assert o.shape == (3, 197, 128) and o.dtype == torch.bfloat16
    assert lse.shape == (3, 2, 197) and lse.dtype == torch.float32
    o.sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.dtype == torch.bfloat16


def _rope_inputs(B, N, H, D, npt, per_head, *, packed=False):
    """Meta qkv (B, N, 3C) -- packed: (B·N, 3C) with B sequences of N tokens -- and an fp32 table (timm keeps it fp32
    under autocast), both requiring grad."""
    shape = (B * N, 3 * H * D) if packed else (B, N, 3 * H * D)
    qkv = torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True)
    rope = torch.empty(((H,) if per_head else ()) + (N - npt, 2 * D), device="meta", requires_grad=True)
    return qkv, rope


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_fake_attention_with_rope_forward_and_backward(ext, per_head):
    """The rotary arguments through the CUDA ops' fakes and their autograd: dqkv from the backward op, the table's
    gradient (fp32, its shape) from the shared autograd glue."""
    qkv, rope = _rope_inputs(3, 197, 2, 64, 1, per_head)
    o, lse = torch.ops.fastvit.attention_fwd_cuda(qkv, 2, 0.125, rope, 1, True)
    assert o.shape == (3, 197, 128) and lse.shape == (3, 2, 197)
    o.sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.dtype == torch.bfloat16
    assert rope.grad.shape == rope.shape and rope.grad.dtype == torch.float32

    q = torch.empty(2, 2, 50, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    table = torch.empty(49, 128, device="meta", requires_grad=True)
    o, lse = torch.ops.fastvit.sdpa_fwd_cuda(q, q, q, 0.125, table, 1, False)
    assert o.shape == q.shape and lse.shape == (2, 2, 50)
    o.sum().backward()
    assert q.grad.shape == q.shape and table.grad.shape == table.shape

    qkv, rope = _rope_inputs(3, 20, 2, 64, 0, per_head, packed=True)
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    o, lse = torch.ops.fastvit.attention_varlen_fwd_cuda(qkv, cu, 20, 2, 0.125, rope, 0, True)
    assert o.shape == (60, 128) and lse.shape == (2, 60)


def test_rope_calls_dispatch_to_the_cuda_backend(ext, as_h100, monkeypatch):
    """A rope call (shared or per-head table, dense or packed, attention or sdpa) selects the cuda backend where a
    plain call would -- automatically, not only when asked for -- and differentiates through it."""
    chosen = _record_backends(monkeypatch)
    for per_head in (False, True):
        qkv, rope = _rope_inputs(2, 50, 2, 64, 1, per_head)
        out = fastvit.ops.attention(qkv, 2, rope=rope, num_prefix_tokens=1, rotate_half=per_head)
        assert out.shape == (2, 50, 128)
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape and rope.grad.shape == rope.shape
        qkv, rope = _rope_inputs(3, 17, 2, 64, 0, per_head, packed=True)
        cu = torch.tensor([0, 17, 34, 51], dtype=torch.int32).to("meta")
        out = fastvit.ops.attention(qkv, 2, cu_seqlens=cu, max_seqlen=17, rope=rope)
        assert out.shape == (51, 128)
    q = torch.empty(2, 2, 50, 64, device="meta", dtype=torch.bfloat16)
    table = torch.empty(49, 128, device="meta")
    assert fastvit.ops.scaled_dot_product_attention(q, q, q, rope=table, num_prefix_tokens=1).shape == q.shape
    assert chosen and {name for _, name in chosen} == {"cuda"}, chosen


def test_fake_layer_norm_and_linear_backward(ext):
    if True:  # meta tensors (see the module docstring)
        x = torch.empty(2, 50, 96, device="meta", dtype=torch.float32, requires_grad=True)
        r = torch.empty(2, 50, 96, device="meta", dtype=torch.float32, requires_grad=True)
        w = torch.empty(96, device="meta", dtype=torch.float32, requires_grad=True)
        y, h, mean, rstd = torch.ops.fastvit.layer_norm_fwd_cuda(x, w, None, r, 1e-6)
        assert y.shape == h.shape == x.shape and mean.shape == rstd.shape == (100,)
        (y.sum() + h.sum()).backward()
        assert x.grad.shape == r.grad.shape == x.shape and w.grad.shape == (96,)

        a = torch.empty(2, 50, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        fc1 = torch.empty(256, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        b1 = torch.empty(256, device="meta", dtype=torch.bfloat16, requires_grad=True)
        fc2 = torch.empty(64, 256, device="meta", dtype=torch.bfloat16, requires_grad=True)
        gamma = torch.empty(64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        hid, pre = torch.ops.fastvit.linear_gelu_fwd_cuda(a, fc1, b1, "none", True)
        assert hid.shape == pre.shape == (2, 50, 256)
        out, z = torch.ops.fastvit.linear_residual_fwd_cuda(hid, fc2, None, a, gamma, True)
        assert out.shape == z.shape == (2, 50, 64)
        out.sum().backward()
        assert (a.grad.shape, fc1.grad.shape, b1.grad.shape, fc2.grad.shape, gamma.grad.shape) == (
            a.shape,
            fc1.shape,
            b1.shape,
            fc2.shape,
            gamma.shape,
        )


def test_fake_linear_glu_forward_and_backward(ext):
    """Both weight layouts through the CUDA op's fake and its registered autograd (meta tensors): the split weights
    and biases, and a packed (2·M, K) weight with its (2·M,) bias, gate last, get gradients of their own shapes."""
    meta = {"device": "meta", "dtype": torch.bfloat16, "requires_grad": True}
    x = torch.empty(2, 50, 64, **meta)
    wg, wx = torch.empty(96, 64, **meta), torch.empty(96, 64, **meta)
    bg = torch.empty(96, **meta)
    y, h = torch.ops.fastvit.linear_glu_fwd_cuda(x, wg, bg, wx, None, "silu", True)
    assert y.shape == (2, 50, 96) and h.shape == (2, 50, 192) and y.dtype == h.dtype == torch.bfloat16
    y.sum().backward()
    assert (x.grad.shape, wg.grad.shape, bg.grad.shape, wx.grad.shape) == (x.shape, wg.shape, bg.shape, wx.shape)
    y, h = torch.ops.fastvit.linear_glu_fwd_cuda(x, wg, None, wx, None, "gelu", False)
    assert y.shape == (2, 50, 96) and h.shape == (0,)
    dx, dwg, dwx, dbg, dbx = torch.ops.fastvit.linear_glu_bwd_cuda(y, x, wg, wx, h.new_empty(2, 50, 192), "gelu", True)
    assert dx.shape == x.shape and dwg.shape == dwx.shape == wg.shape and dbg.shape == dbx.shape == (96,)

    from fastvit.families import linear

    w, b = torch.empty(192, 64, **meta), torch.empty(192, **meta)
    y = linear.linear_glu_cuda(x, w, b, activation="sigmoid", gate_last=True)
    assert y.shape == (2, 50, 96)
    y.sum().backward()
    assert w.grad.shape == w.shape and b.grad.shape == b.shape


def test_linear_glu_dispatches_to_cuda_when_the_features_are_aligned(ext, as_h100, monkeypatch):
    """With the extension loaded the cuda backend serves linear_glu (either layout) on a GPU; a gated width or
    in_features that is not a multiple of 8 is refused with the reason (automatic dispatch then falls back)."""
    monkeypatch.setattr(backends.get_backend("cuda"), "availability", lambda: [])
    chosen = _record_backends(monkeypatch)
    meta = {"device": "meta", "dtype": torch.bfloat16}
    x, w, b = torch.empty(3, 61, 72, **meta), torch.empty(160, 72, **meta), torch.empty(160, **meta)
    assert fastvit.ops.linear_glu(x, w, b, activation="gelu", gate_last=True).shape == (3, 61, 80)
    assert fastvit.ops.linear_glu(x, w[:80], b[:80], w[80:], b[80:], activation="silu").shape == (3, 61, 80)
    assert chosen == [("linear_glu", "cuda")] * 2
    with pytest.raises(backends.BackendNotSupportedError, match="out_features = 20 is not a multiple of 8"):
        fastvit.ops.linear_glu(x, w[:40], None, backend="cuda")
    x16 = torch.empty(3, 61, 72, device="meta", dtype=torch.float16)  # the minimal build compiles bf16 only
    with pytest.raises(backends.BackendNotSupportedError, match="float16"):
        fastvit.ops.linear_glu(x16, w.half(), None, backend="cuda")


def test_fake_rms_norm_backward(ext):
    x = torch.empty(2, 50, 96, device="meta", dtype=torch.bfloat16, requires_grad=True)
    r = torch.empty(2, 50, 96, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(96, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y, h, rstd = torch.ops.fastvit.rms_norm_fwd_cuda(x, w, r, 1e-6)
    assert y.shape == h.shape == x.shape and y.dtype == h.dtype == torch.bfloat16
    assert rstd.shape == (100,) and rstd.dtype == torch.float32
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == r.grad.shape == x.shape and w.grad.shape == (96,)

    x = torch.empty(7, 80, device="meta", dtype=torch.float32, requires_grad=True)
    y, h, rstd = torch.ops.fastvit.rms_norm_fwd_cuda(x, None, None, 1e-6)
    assert y.shape == x.shape and h.shape == (0,) and rstd.shape == (7,)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_fake_patch_embed_and_mae_backward(ext):
    if True:  # meta tensors (see the module docstring)
        images = torch.empty(2, 3, 32, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(64, 3, 8, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.empty(1, 17, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        cls = torch.empty(1, 1, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        ids = torch.empty(2, 4, device="meta", dtype=torch.int64)
        out = torch.ops.fastvit.patch_embed_fwd_cuda(images, weight, None, pos, cls, None, ids)
        assert out.shape == (2, 5, 64)
        out.sum().backward()
        assert images.grad.shape == images.shape and pos.grad.shape == pos.shape and cls.grad.shape == cls.shape

        x = torch.empty(2, 5, 32, device="meta", dtype=torch.float32, requires_grad=True)
        mask_token = torch.empty(1, 1, 32, device="meta", dtype=torch.float32, requires_grad=True)
        ids_restore = torch.empty(2, 16, device="meta", dtype=torch.int64)
        dec = torch.ops.fastvit.mae_unshuffle_fwd_cuda(x, mask_token, ids_restore, None)
        assert dec.shape == (2, 17, 32)
        dec.sum().backward()
        assert x.grad.shape == x.shape and mask_token.grad.shape == (1, 1, 32)

        pred = torch.empty(2, 16, 8 * 8 * 3, device="meta", dtype=torch.float32, requires_grad=True)
        imgs = torch.empty(2, 3, 32, 32, device="meta", dtype=torch.float32)
        row = torch.ops.fastvit.mae_loss_fwd_cuda(pred, imgs, 8, True)
        assert row.shape == (2, 16) and row.dtype == torch.float32
        row.sum().backward()
        assert pred.grad.shape == pred.shape


def _record_backends(monkeypatch) -> list:
    chosen = []
    original = backends.select

    def select(op, call, backend=None):
        name, fn = original(op, call, backend)
        chosen.append((op, name))
        return name, fn

    monkeypatch.setattr(backends, "select", select)
    for name in backends.OPS:  # what each op's public function (in its family module) dispatches through
        monkeypatch.setattr(sys.modules[fastvit.ops.DECLARATIONS[name].function.__module__], "_select", select)
    return chosen


@pytest.mark.parametrize("compiled", [False, True], ids=["eager_mode", "compiled"])
def test_vision_transformer_runs_wholly_on_cuda_backend_with_fakes(ext, monkeypatch, compiled):
    """compiled: under torch.compile(fullgraph=True) with AOTAutograd (``aot_eager``), which traces the dispatch,
    the ``*_cuda`` ops' fakes and their registered autograd into forward and backward graphs.

    Only the backend's "no CUDA device" check is lifted (meta tensors skip the compute-capability check): with
    ``as_h100``'s global ``torch.cuda.is_available() == True``, Dynamo itself would try to initialise CUDA."""
    monkeypatch.setattr(backends.get_backend("cuda"), "availability", lambda: [])
    chosen = _record_backends(monkeypatch)
    model = fastvit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=10, init_values=1e-5
    ).to(torch.bfloat16)
    model = model.to("meta")
    images = torch.empty(4, 3, 32, 32, device="meta", dtype=torch.bfloat16)
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    with fastvit.use_backend("cuda"):
        logits = run(images)
        logits.float().sum().backward()
    assert logits.shape == (4, 10)
    assert {name for _, name in chosen} == {"cuda"}
    assert {op for op, _ in chosen} >= {"patch_embed", "attention", "layer_norm", "linear_gelu", "linear_residual"}
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_masked_autoencoder_runs_wholly_on_cuda_backend_with_fakes(ext, as_h100, monkeypatch):
    chosen = _record_backends(monkeypatch)
    model = fastvit.MaskedAutoencoderViT(
        img_size=32,
        patch_size=8,
        embed_dim=128,
        depth=1,
        num_heads=2,
        decoder_embed_dim=64,
        decoder_depth=1,
        decoder_num_heads=1,
        norm_pix_loss=True,
    ).to(torch.bfloat16)
    model = model.to("meta")
    images = torch.empty(2, 3, 32, 32, device="meta", dtype=torch.bfloat16)
    with fastvit.use_backend("cuda"):
        loss, pred, mask = model(images, mask_ratio=0.75)
        loss.backward()
    assert loss.shape == () and pred.shape == (2, 16, 8 * 8 * 3)
    assert {name for _, name in chosen} == {"cuda"}
    assert {op for op, _ in chosen} >= {"patch_embed", "attention", "mae_unshuffle", "mae_loss"}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unbuilt_head_dim_is_refused_with_reasons(ext, as_h100):
    qkv = torch.empty(1, 10, 3 * 80, device="meta", dtype=torch.bfloat16)
    with pytest.raises(backends.BackendNotSupportedError, match="head_dim 80"):
        fastvit.ops.attention(qkv, 1, backend="cuda")
    x = torch.empty(1, 10, 3 * 64, device="meta", dtype=torch.float16)
    with pytest.raises(backends.BackendNotSupportedError, match="float16"):
        fastvit.ops.attention(x, 1, backend="cuda")


@pytest.mark.parametrize(
    "case", ["attention", "attention_rope", "layer_norm", "rms_norm", "linear_residual", "linear_glu", "mae_unshuffle"]
)
def test_opcheck_on_meta_tensors(ext, case):
    meta = {"device": "meta"}
    if case == "attention":
        op, args = (
            torch.ops.fastvit.attention_fwd_cuda.default,
            (torch.randn(2, 9, 3 * 64, dtype=torch.bfloat16, **meta).requires_grad_(), 1, 0.125),
        )
    elif case == "attention_rope":
        op, args = (
            torch.ops.fastvit.attention_fwd_cuda.default,
            (
                torch.randn(2, 9, 3 * 64, dtype=torch.bfloat16, **meta).requires_grad_(),
                1,
                0.125,
                torch.randn(8, 128, **meta).requires_grad_(),
                1,
                True,
            ),
        )
    elif case == "layer_norm":
        op, args = (
            torch.ops.fastvit.layer_norm_fwd_cuda.default,
            (torch.randn(4, 96, **meta).requires_grad_(), torch.randn(96, **meta).requires_grad_(), None, None, 1e-6),
        )
    elif case == "rms_norm":
        op, args = (
            torch.ops.fastvit.rms_norm_fwd_cuda.default,
            (
                torch.randn(4, 96, **meta).requires_grad_(),
                torch.randn(96, **meta).requires_grad_(),
                torch.randn(4, 96, **meta).requires_grad_(),
                1e-6,
            ),
        )
    elif case == "linear_residual":
        op, args = (
            torch.ops.fastvit.linear_residual_fwd_cuda.default,
            (
                torch.randn(5, 64, dtype=torch.bfloat16, **meta),
                torch.randn(32, 64, dtype=torch.bfloat16, **meta),
                None,
                torch.randn(5, 32, dtype=torch.bfloat16, **meta),
                None,
                False,
            ),
        )
    elif case == "linear_glu":
        op, args = (
            torch.ops.fastvit.linear_glu_fwd_cuda.default,
            (
                torch.randn(5, 64, dtype=torch.bfloat16, **meta).requires_grad_(),
                torch.randn(32, 64, dtype=torch.bfloat16, **meta).requires_grad_(),
                torch.randn(32, dtype=torch.bfloat16, **meta).requires_grad_(),
                torch.randn(32, 64, dtype=torch.bfloat16, **meta).requires_grad_(),
                None,
                "gelu_tanh",
                True,
            ),
        )
    else:
        op, args = (
            torch.ops.fastvit.mae_unshuffle_fwd_cuda.default,
            (
                torch.randn(2, 3, 16, **meta),
                torch.randn(1, 1, 16, **meta),
                torch.empty(2, 6, dtype=torch.int64, **meta),
                None,
            ),
        )
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_python_m_fastvit_build_is_loaded_by_a_later_import(ext, tmp_path, monkeypatch):
    """`python -m fastvit.build` (here the same minimal build as the fixture's, so ninja has nothing to redo) records
    its extension; a fresh process importing fastvit loads it without building anything."""
    import json
    import subprocess
    import sys

    from fastvit import build as build_cli

    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    assert build_cli.main(["--minimal", "--archs", "9.0a", "--log", str(tmp_path / "build.log")]) == 0
    record = json.loads((tmp_path / "cuda-build.json").read_text())
    assert record["name"] == "fastvit_C_minimal" and os.path.isfile(record["path"])
    script = (
        "import json, fastvit; from fastvit.runtime import cuda; "
        "print(json.dumps([cuda.load_error(), cuda.build_info()['minimal'] if cuda.load_error() is None else None]))"
    )
    env = {**os.environ, "FASTVIT_CACHE_DIR": str(tmp_path), "FASTVIT_CUDA_JIT": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [None, True]
