"""fastvit under torch.autocast, tested the way people train (issue "drop into real training loops").

The oracle is timm's own model on the same weights: with ``ref`` timm in float64, ``pt`` timm under the same
autocast, fastvit under autocast passes when ``|fastvit_amp - ref| <= 2 |pt - ref| + atol`` for the logits / loss and
every parameter gradient, its output dtypes are timm's, and parameter gradients come back fp32. Here on the CPU
(eager backend, and the op-level rules on the Triton backend in the interpreter); the same on CUDA is gpu-marked.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close_oracle

import fastvit
from fastvit import ops

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

AMP = [torch.bfloat16, torch.float16]
AMP_IDS = ["bf16", "fp16"]

#: timm ViT configs: plain; register tokens + LayerScale + no class token pos (as DINOv2 / DeiT-III); avg pool + fc_norm.
CONFIGS = {
    "plain": dict(),
    "reg_layerscale": dict(reg_tokens=2, init_values=1e-1, no_embed_class=True),
    "avgpool_fcnorm": dict(global_pool="avg", class_token=False, fc_norm=True),
}


def _timm_vit(**kw):
    return TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, **kw)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, images, target, amp, device_type="cpu"):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
        logits = model(images)
        loss = F.cross_entropy(logits, target)
    loss.backward()
    return logits.detach(), loss.detach(), _grads(model)


def _compare_with_timm(timm_model, fast_model, images, target, amp, oracle_dtype):
    ref_model = copy.deepcopy(timm_model).double()
    ref_logits, ref_loss, ref_grads = _run(ref_model, images.double(), target, None)
    pt_logits, pt_loss, pt_grads = _run(timm_model, images, target, amp)
    out_logits, out_loss, out_grads = _run(fast_model, images, target, amp)
    assert out_logits.dtype == pt_logits.dtype and out_loss.dtype == pt_loss.dtype
    assert_close_oracle(out_logits, ref_logits, pt_logits, oracle_dtype, "logits", check_dtype=False)
    assert_close_oracle(out_loss, ref_loss, pt_loss, oracle_dtype, "loss", check_dtype=False)
    assert set(out_grads) == set(pt_grads)
    for name, g in out_grads.items():
        assert g.dtype == torch.float32, name  # parameters stay fp32 and so do their gradients
        assert_close_oracle(g, ref_grads[name], pt_grads[name], oracle_dtype, f"grad {name}", check_dtype=False)


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_from_timm_under_cpu_autocast_matches_timm(config, amp, generator):
    torch.manual_seed(0)
    timm_model = _timm_vit(**CONFIGS[config])
    fast_model = fastvit.from_timm(copy.deepcopy(timm_model))
    images = torch.randn(3, 3, 32, 32, generator=generator)
    target = torch.randint(0, 10, (3,), generator=generator)
    _compare_with_timm(timm_model, fast_model, images, target, amp, amp)


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_timm_under_cpu_autocast_matches_timm(config, amp, generator):
    torch.manual_seed(0)
    timm_model = _timm_vit(**CONFIGS[config])
    patched = fastvit.patch_timm_(copy.deepcopy(timm_model))
    images = torch.randn(3, 3, 32, 32, generator=generator)
    target = torch.randint(0, 10, (3,), generator=generator)
    _compare_with_timm(timm_model, patched, images, target, amp, amp)


def _fixed_noise_mae(model, images, noise):
    return model(images, mask_ratio=0.75, noise=noise)


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_under_cpu_autocast_matches_eager_math(amp, norm_pix_loss, generator):
    """The MAE's loss (fp32 under autocast, as MAE's own code gives) and every gradient against the same model in
    float64; the reference under autocast is the model with fastvit's ops replaced by :mod:`fastvit.reference`'s
    plain math -- i.e. the eager backend run as plain PyTorch code."""
    torch.manual_seed(0)
    model = fastvit.create_model(
        "mae_vit_base_patch16",
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        norm_pix_loss=norm_pix_loss,
    )
    images = torch.randn(3, 3, 32, 32, generator=generator)
    noise = torch.rand(3, 16, generator=generator)

    def run(m, x, amp_dtype):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss, pred, mask = _fixed_noise_mae(m, x, noise)
        loss.backward()
        return loss.detach(), pred.detach(), _grads(m)

    ref64 = copy.deepcopy(model).double()
    with fastvit.use_backend("eager"):
        ref_loss, ref_pred, ref_grads = run(ref64, images.double(), None)
        out_loss, out_pred, out_grads = run(model, images, amp)
    # pt: the same autocast run, precision-matched, computed with autocast's own casts (plain PyTorch ops): the
    # encoder / decoder GEMMs in `amp`, losses in fp32 -- the model with every parameter and input rounded to `amp`
    # and run in fp32 is the bound on the rounding an honest implementation incurs.
    pt = copy.deepcopy(model)
    with torch.no_grad():
        for p in pt.parameters():
            p.copy_(p.to(amp).float())
    pt_loss, pt_pred, pt_grads = run(pt, images.to(amp).float(), None)
    assert out_loss.dtype == torch.float32 and out_pred.dtype == amp
    assert_close_oracle(out_loss, ref_loss, pt_loss, amp, "loss", check_dtype=False, factor=8.0)
    for name, g in out_grads.items():
        assert g.dtype == torch.float32, name
        assert_close_oracle(g, ref_grads[name], pt_grads[name], amp, f"grad {name}", check_dtype=False, factor=8.0)


def test_gradscaler_fp16_skips_a_non_finite_step_and_backs_off(generator):
    torch.manual_seed(0)
    model = fastvit.from_timm(_timm_vit())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    target = torch.randint(0, 10, (2,), generator=generator)

    def step(x):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(images)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(before[n], moved[n]) for n in before)  # a finite step updates
    scale = scaler.get_scale()
    bad = images.clone()
    bad[0, 0, 0, 0] = float("inf")
    step(bad)  # non-finite gradients: the step is skipped and the scale backs off
    assert scaler.get_scale() == scale * 0.5
    assert all(torch.equal(moved[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
def test_compiled_under_autocast_equals_eager_under_autocast(amp, generator):
    torch.manual_seed(0)
    model = fastvit.from_timm(_timm_vit(init_values=1e-1))
    images = torch.randn(2, 3, 32, 32, generator=generator)
    target = torch.randint(0, 10, (2,), generator=generator)
    eager_logits, eager_loss, eager_grads = _run(model, images, target, amp)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    c_logits, c_loss, c_grads = _run(compiled, images, target, amp)
    assert c_logits.dtype == eager_logits.dtype
    torch.testing.assert_close(c_logits, eager_logits, rtol=0, atol=0)
    torch.testing.assert_close(c_loss, eager_loss, rtol=0, atol=0)
    c_grads = {n.removeprefix("_orig_mod."): g for n, g in c_grads.items()}
    assert set(c_grads) == set(eager_grads)
    for name, g in eager_grads.items():
        torch.testing.assert_close(c_grads[name], g, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- op-level rules
def _params(*shape, generator):
    return torch.randn(*shape, generator=generator)


def test_op_rules_match_eager_pytorch_under_autocast(generator):
    """Each op under autocast gives what the eager code it replaces gives under autocast: same dtype, same values."""
    g = generator
    x32 = _params(2, 5, 16, generator=g)
    w, b = _params(32, 16, generator=g), _params(32, generator=g)
    w2, b2, gamma = _params(16, 32, generator=g), _params(16, generator=g), _params(16, generator=g)
    ln_w, ln_b = _params(16, generator=g), _params(16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = ops.linear_gelu(x32, w, b)
        h_ref = F.gelu(F.linear(x32, w, b))
        y = ops.linear_residual(h, w2, b2, x32, gamma=gamma)
        y_ref = x32 + gamma * F.linear(h_ref, w2, b2)
        n = ops.layer_norm(h, F.linear(h, torch.eye(32)[:32]).new_ones(32).float(), None)
        n_ref = F.layer_norm(h_ref, (32,), torch.ones(32), None, 1e-6)
        ln = ops.layer_norm(x32, ln_w, ln_b)
        ln_ref = F.layer_norm(x32, (16,), ln_w, ln_b, 1e-6)
    for out, ref in ((h, h_ref), (y, y_ref), (n, n_ref), (ln, ln_ref)):
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32 and ln.dtype == torch.float32


def test_mixed_operands_fall_back_visibly_on_kernel_backends(generator):
    """Under autocast a linear_residual with an fp32 residual has mixed operands: the kernel backends say so (an
    explicit choice names the reason), automatic dispatch runs eager."""
    x = _params(2, 5, 16, generator=generator)
    w, b = _params(16, 16, generator=generator), _params(16, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        call = ops.describe_call("linear_residual", x, w, b, x)
        assert call.mixed_dtypes and call.dtype == torch.bfloat16
        reasons = fastvit.backends.get_backend("triton").kernels["linear_residual"].capabilities.reasons(call)
        assert any("different dtypes under autocast" in r for r in reasons)
        assert fastvit.backends.select("linear_residual", call)[0] == "eager"
        assert not ops.describe_call("linear_gelu", x, w, b).mixed_dtypes
    assert not ops.describe_call("linear_residual", x, w, b, x).mixed_dtypes  # autocast off: one dtype


def test_outside_autocast_dtype_mismatch_is_still_an_error(generator):
    x = _params(2, 5, 16, generator=generator).bfloat16()
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has torch.bfloat16"):
        ops.layer_norm(x, torch.ones(16), None)


# ------------------------------------------------------------------------------------------- meta device
@pytest.mark.parametrize("name", ["vit_base_patch16_224", "mae_vit_base_patch16"])
def test_base_models_run_forward_and_backward_on_the_meta_device(name):
    with torch.device("meta"):
        model = fastvit.create_model(name)
    images = torch.empty(2, 3, 224, 224, device="meta")
    out = model(images)
    loss = out[0] if isinstance(out, tuple) else out.sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(
    not fastvit.backends.get_backend("triton").kernels or fastvit.available_backends()["triton"],
    reason="the triton backend does not run here (needs a GPU or TRITON_INTERPRET=1)",
)
@pytest.mark.parametrize("op", ["attention", "linear_gelu", "layer_norm", "mae_loss"])
def test_triton_ops_follow_the_autocast_rule(op, generator):
    """On the Triton backend (interpreted on the CPU) an op under autocast runs on the cast operands and matches the
    eager backend under the same autocast by the oracle (ref: the op in float64 without autocast)."""
    g = generator
    if op == "attention":
        args = (torch.randn(2, 7, 3 * 2 * 32, generator=g), 2)
    elif op == "linear_gelu":
        args = (torch.randn(2, 7, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g))
    elif op == "layer_norm":
        args = (torch.randn(2, 7, 32, generator=g), torch.randn(32, generator=g), torch.randn(32, generator=g))
    else:
        images = torch.randn(2, 3, 16, 16, generator=g)
        pred = torch.randn(2, 4, 8 * 8 * 3, generator=g)
        args = (pred, images, (torch.rand(2, 4, generator=g) > 0.5).float(), 8)
    fn = getattr(ops, op)
    ref = fn(
        *[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args], backend="eager"
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pt = fn(*args, backend="eager")
        out = fn(*args, backend="triton")
    assert out.dtype == pt.dtype
    assert_close_oracle(out, ref, pt, torch.bfloat16, op, check_dtype=False)


# ------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("kernels", ["cuda", "triton"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_from_timm_under_cuda_autocast_matches_timm(config, kernels, amp, monkeypatch, generator):
    """On a GPU under CUDA autocast, with automatic dispatch on one kernel backend (the other kept out of automatic
    selection): uniform-dtype ops run that backend's kernels, mixed ones eager, and the model matches timm."""
    other = {"cuda": "triton", "triton": "cuda"}[kernels]
    if fastvit.available_backends()[kernels]:
        pytest.skip(f"{kernels} backend unavailable: {fastvit.available_backends()[kernels]}")
    monkeypatch.setattr(fastvit.backends.get_backend(other), "automatic", lambda: False)
    torch.manual_seed(0)
    timm_model = _timm_vit(**CONFIGS[config]).cuda()
    fast_model = fastvit.from_timm(copy.deepcopy(timm_model))
    images = torch.randn(4, 3, 32, 32, generator=generator).cuda()
    target = torch.randint(0, 10, (4,), generator=generator).cuda()
    ref_model = copy.deepcopy(timm_model).double()
    ref_logits, ref_loss, ref_grads = _run(ref_model, images.double(), target, None, "cuda")
    pt_logits, pt_loss, pt_grads = _run(timm_model, images, target, amp, "cuda")
    out_logits, out_loss, out_grads = _run(fast_model, images, target, amp, "cuda")
    assert out_logits.dtype == pt_logits.dtype
    assert_close_oracle(out_logits, ref_logits, pt_logits, amp, "logits", check_dtype=False)
    assert_close_oracle(out_loss, ref_loss, pt_loss, amp, "loss", check_dtype=False)
    for name, g in out_grads.items():
        assert g.dtype == torch.float32, name
        assert_close_oracle(g, ref_grads[name], pt_grads[name], amp, f"grad {name}", check_dtype=False)
