"""fastvit inside the training loops people run (issue 11, section 4): timm's ``train.py`` and MAE's ``main_pretrain.py``.

Each test runs the same K-step loop, on real data (scikit-learn's 8x8 digits upscaled to 16x16, three channels,
ImageNet-normalised), with the same seeds for everything random, on three models that start from the same weights:

* ``ref``: the independent implementation (timm's ``VisionTransformer`` / a transcription of the official MAE) in
  float64 without autocast -- the ground truth of the trajectory;
* ``pt``: that implementation in fp32 under the same ``torch.autocast`` as the model under test -- what a user gets
  today, and the measure of how far honest mixed-precision rounding moves a trajectory from ``ref``;
* ``out``: fastvit (``fastvit.from_timm`` / ``fastvit.patch_timm_`` / fastvit's MAE) under that autocast.

The oracle is docs/ARCHITECTURE.md's, applied to whole trajectories: for the per-step loss (a K-vector), the per-step gradient
norm (MAE) and, at the end, every parameter and every EMA weight (their change from the shared initial weights, so
the common start does not hide the error) and the EMA model's eval logits, ``max|out - ref| <= 2 * max|pt - ref| +
atol`` with fp32's atol (1e-5, scaled by ``max(1, max|ref|)``): losses, parameters and EMA weights are fp32 under
autocast, and the factor-2 term already carries the autocast rounding. Run with ``-s`` to see the measured errors. Each loop also asserts
that every optimizer step changed every trainable parameter, and one fp16 case forces a non-finite step and
asserts the scaler skips it (nothing moves, the scale halves) while ``ref`` simply omits that update.

Tiny models and 8 steps: the file must run in well under 90 s on a shared 2-core CPU.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import atol_for, oracle_compare

import fastvit

timm = pytest.importorskip("timm")
pytest.importorskip("sklearn")
from timm.data import Mixup  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import CosineLRScheduler  # noqa: E402
from timm.utils import ModelEmaV3, NativeScaler  # noqa: E402

K = 8  # optimizer steps per run
BATCH = 16  # even, as timm's Mixup requires
IMG = 16  # digits upscaled 8 -> 16 px
AMP = [torch.bfloat16, torch.float16]
AMP_IDS = ["bf16", "fp16"]
LOSS_ATOL = atol_for(torch.float32)  # the losses are fp32 under autocast (log_softmax / MAE's loss autocast to fp32)
WEIGHT_ATOL = atol_for(torch.float32)  # parameters and EMA weights are fp32


# ----------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(K * BATCH, 3, IMG, IMG) float32 images and (K * BATCH,) int64 labels: the first training digits of
    ``examples/digits_data.py``'s fixed split, bilinearly upscaled, grey replicated to RGB and normalised with
    ImageNet's mean / std (as timm's data config does)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "digits_data.py"
    spec = importlib.util.spec_from_file_location("_fastvit_digits_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, y, _, _ = mod.load_data()
    n = K * BATCH + BATCH  # K training batches + one held-out evaluation batch
    x = torch.nn.functional.interpolate(x[:n], size=(IMG, IMG), mode="bilinear", align_corners=False).expand(
        -1, 3, -1, -1
    )
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(), y[:n].clone()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    sl = slice(step * BATCH, (step + 1) * BATCH)
    return x[sl].clone(), y[sl].clone()  # clones: Mixup mixes in place


# ----------------------------------------------------------------------------------------------- helpers
def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _trainable(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _assert_step(model, before: dict[str, torch.Tensor], skipped: bool, what: str) -> None:
    """A taken optimizer step changes every trainable parameter (AdamW: every one has a gradient or weight decay);
    a step the scaler skipped changes none."""
    names = _trainable(model)
    changed = [n for n in names if not torch.equal(before[n], dict(model.named_parameters())[n].detach())]
    if skipped:
        assert not changed, f"{what}: the scaler skipped the step but {changed} changed"
    else:
        assert set(changed) == set(names), (
            f"{what}: the optimizer step left {sorted(set(names) - set(changed))} unchanged"
        )


@dataclass
class Trajectory:
    losses: list[float] = field(default_factory=list)  # per step, fp32 loss as float
    grad_norms: list[float] = field(default_factory=list)  # per step (MAE loop; unscaled)
    skipped: list[bool] = field(default_factory=list)  # per step: the scaler skipped the update
    scales: list[float] = field(default_factory=list)  # per step: the loss scale after the update (fp16)
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # at the end
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # at the end (ViT loop)
    ema_logits: torch.Tensor | None = None  # the EMA model's eval-mode logits on a held-out batch (ViT loop)
    eval_loss: tuple = ()  # (before, after) on a held-out batch (MAE loop)


def _judge(name: str, out, ref, pt, atol: float, errors: dict[str, tuple]) -> None:
    """Record ``(err, err_pt, bound)`` of ``out`` under the oracle; collect failures instead of raising at once."""
    out, ref, pt = (torch.as_tensor(v, dtype=torch.float64) for v in (out, ref, pt))
    r = oracle_compare(out, ref, pt, torch.float32, name, atol=atol, check_dtype=False)
    errors[name] = (r.err, r.err_pt, r.bound, r.ok, r.message, float((out - pt).abs().max()))


def _check(errors: dict[str, tuple]) -> None:
    bad = [v[4] for v in errors.values() if not v[3]]
    assert not bad, "\n".join(bad)


def _summary(errors: dict[str, tuple], keys=("loss", "logits", "grad-norm", "ema", "param")) -> dict[str, tuple]:
    """Worst (err, err_pt) per kind, for the report printed with ``-s``."""
    out = {}
    for k in keys:
        vals = [v for n, v in errors.items() if n.startswith(k)]
        if vals:
            worst = max(vals, key=lambda v: v[0] / v[2] if v[2] else 0.0)
            out[k] = (
                max(v[0] for v in vals),
                max(v[1] for v in vals),
                worst[0] / worst[2] if worst[2] else 0.0,
                max(v[5] for v in vals),
            )
    return out


# ----------------------------------------------------------------------------------------------- timm train.py
LR = 2e-3
VIT_KW = {
    "img_size": IMG,
    "patch_size": 4,
    "in_chans": 3,
    "num_classes": 10,
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "drop_rate": 0.1,
    "drop_path_rate": 0.2,  # train.py's --drop / --drop-path; block 0 (rate 0) takes the fused branch
}


def _timm_vit(seed: int) -> TimmViT:
    torch.manual_seed(seed)
    return TimmViT(**VIT_KW)


def _train_vit(
    model: torch.nn.Module, amp: torch.dtype | None, dtype: torch.dtype = torch.float32, seed: int = 0, steps: int = K
) -> Trajectory:
    """timm ``train.py``'s ``train_one_epoch`` for ``steps`` updates, on ``model`` (modified in place).

    As ``train.py --amp [--amp-dtype float16] --channels-last --grad-checkpointing --model-ema --model-ema-decay 0.9
    --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --opt adamw --weight-decay 0.05 --layer-decay 0.75 --sched cosine
    --warmup-epochs ... --drop 0.1 --drop-path 0.2`` does: channels_last model and input, Mixup / CutMix with
    soft targets, loss under autocast, timm's ``NativeScaler`` for fp16 (``None`` for bf16, as train.py),
    per-update ``step_update`` of the cosine schedule (which applies the layer-decay ``lr_scale``), EMA update per
    step. Before each step NumPy (Mixup's ``lam`` / CutMix box) and torch (dropout / drop_path) are seeded, so every
    model draws the same. ``amp=None``: no autocast, no scaler (the float64 reference).
    """
    model.to(dtype=dtype, memory_format=torch.channels_last)
    model.set_grad_checkpointing(True)
    model.train()
    optimizer = create_optimizer_v2(model, "adamw", lr=LR, weight_decay=0.05, layer_decay=0.75)
    scheduler = CosineLRScheduler(optimizer, t_initial=steps, warmup_t=2, warmup_lr_init=LR / 10, t_in_epochs=False)
    ema = ModelEmaV3(model, decay=0.9)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    loss_fn = SoftTargetCrossEntropy()
    scaler = NativeScaler(device="cpu") if amp == torch.float16 else None
    traj = Trajectory()
    for step in range(steps):
        x, y = _batch(step)
        np.random.seed(seed + step)
        torch.manual_seed(seed + 1000 + step)
        x, y = mixup(x, y)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            output = model(x)
            loss = loss_fn(output, y)
        before = _snapshot(model)
        scale = scaler._scaler.get_scale() if scaler else None
        if scaler is not None:
            scaler(loss, optimizer)
        else:
            loss.backward()
            optimizer.step()
        skipped = scaler is not None and scaler._scaler.get_scale() < scale
        _assert_step(model, before, skipped, f"step {step}")
        optimizer.zero_grad()
        ema.update(model, step=step + 1)
        scheduler.step_update(num_updates=step + 1)
        traj.losses.append(loss.item())
        traj.skipped.append(skipped)
        traj.scales.append(scaler._scaler.get_scale() if scaler else 1.0)
    traj.params = {n: p.detach().double() for n, p in model.named_parameters()}
    traj.ema = {n: p.detach().double() for n, p in ema.module.named_parameters()}
    x_eval, _ = _digits()
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        traj.ema_logits = ema.module.eval()(x_eval[K * BATCH :].to(dtype).contiguous(memory_format=torch.channels_last))
    return traj


def _compare_vit_runs(init: TimmViT, out: Trajectory, ref: Trajectory, pt: Trajectory) -> dict[str, tuple]:
    assert not any(pt.skipped) and not any(out.skipped), (pt.skipped, out.skipped)  # no overflow in these runs
    errors: dict[str, tuple] = {}
    _judge("loss trajectory", out.losses, ref.losses, pt.losses, LOSS_ATOL, errors)
    assert out.ema_logits.dtype == pt.ema_logits.dtype
    _judge("logits of the EMA model", out.ema_logits, ref.ema_logits, pt.ema_logits, LOSS_ATOL, errors)
    start = {n: p.detach().double() for n, p in init.named_parameters()}
    assert set(out.params) == set(ref.params) == set(out.ema)
    for n, p0 in start.items():
        # the change from the shared start: the start itself would otherwise dwarf the error in the bound's floor
        _judge(f"param {n}", out.params[n] - p0, ref.params[n] - p0, pt.params[n] - p0, WEIGHT_ATOL, errors)
        _judge(f"ema {n}", out.ema[n] - p0, ref.ema[n] - p0, pt.ema[n] - p0, WEIGHT_ATOL, errors)
    return errors


@pytest.fixture(scope="module")
def vit_reference_runs():
    """The shared start, ``ref`` (timm in float64) and ``pt`` (timm under each autocast), computed once."""
    init = _timm_vit(0)
    ref = _train_vit(copy.deepcopy(init), None, torch.float64)
    pt = {amp: _train_vit(copy.deepcopy(init), amp) for amp in AMP}
    return init, ref, pt


def _show(label: str, errors: dict[str, tuple]) -> None:
    for kind, (err, err_pt, frac, d) in _summary(errors).items():
        print(
            f"\n[{label}] {kind}: max err {err:.3g}, max pt err {err_pt:.3g}, worst err/bound {frac:.2f}, "
            f"max|out - pt| {d:.3g}",
            end="",
        )


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("how", ["from_timm", "patch_timm_"])
def test_timm_train_loop_follows_timms_trajectory(how, amp, vit_reference_runs):
    """timm ``train.py``'s loop (see :func:`_train_vit`) on a ViT with head dropout and drop_path (0, .1, .2 over
    the 3 blocks: block 0 runs fastvit's fused projection + residual, blocks 1-2 the unfused drop_path branch):
    (a) timm's own model under autocast is ``pt``, the same model in float64 without autocast is ``ref``, and
    (b) ``fastvit.from_timm`` / (c) ``fastvit.patch_timm_`` of deep copies of the same initial model under the same
    autocast are ``out``. Compared: the K-step loss trajectory, every parameter's change and every ``ModelEmaV3``
    weight's change after K steps, and the EMA model's eval-mode logits on a held-out batch (same dtype as timm's),
    each by ``max|out - ref| <= 2 max|pt - ref| + 1e-5 * max(1, max|ref|)``.
    Exact trajectories need fastvit to consume the RNG as timm does (same dropout / drop_path masks from the same
    seed); :func:`test_train_mode_draws_timms_masks` checks that separately, bit for bit."""
    init, ref, pt = vit_reference_runs
    model = copy.deepcopy(init)
    model = fastvit.from_timm(model) if how == "from_timm" else fastvit.patch_timm_(model)
    out = _train_vit(model, amp)
    errors = _compare_vit_runs(init, out, ref, pt[amp])
    _show(f"{how} {amp}", errors)
    _check(errors)


def test_train_mode_draws_timms_masks():
    """Train mode, fp32, every stochastic part on (head / proj / attn / pos dropout, drop_path, patch dropout): from
    one seed, fastvit's model and the patched timm model draw timm's masks -- outputs and gradients match timm's to
    fp32 reassociation, while another seed gives a visibly different output (so the masks matter)."""
    torch.manual_seed(0)
    kw = {"proj_drop_rate": 0.1, "attn_drop_rate": 0.1, "pos_drop_rate": 0.1, "patch_drop_rate": 0.25}
    timm_model = TimmViT(**{**VIT_KW, **kw}).train()
    models = [timm_model, fastvit.from_timm(copy.deepcopy(timm_model)), fastvit.patch_timm_(copy.deepcopy(timm_model))]
    x, _ = _batch(0)
    outs, grads = [], []
    for m in models:
        torch.manual_seed(7)
        o = m(x)
        o.square().sum().backward()
        outs.append(o.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for o, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(o, outs[0], rtol=0, atol=1e-5)
        for n in grads[0]:
            torch.testing.assert_close(g[n], grads[0][n], rtol=0, atol=1e-5, msg=n)
    torch.manual_seed(8)
    assert (timm_model(x) - outs[0]).abs().max() > 1e-2


def test_trajectory_oracle_catches_different_masks(vit_reference_runs):
    """The oracle is not vacuous: fastvit's model trained on a different dropout / drop_path seed (everything else
    equal, so only the masks differ) falls outside the loss-trajectory bound."""
    init, ref, pt = vit_reference_runs
    out = _train_vit(fastvit.from_timm(copy.deepcopy(init)), torch.bfloat16, seed=1)
    errors: dict[str, tuple] = {}
    _judge("loss trajectory", out.losses, ref.losses, pt[torch.bfloat16].losses, LOSS_ATOL, errors)
    assert not errors["loss trajectory"][3], errors["loss trajectory"]


# ----------------------------------------------------------------------------------------------- MAE main_pretrain.py
MAE_KW = {
    "img_size": IMG,
    "patch_size": 4,
    "in_chans": 3,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
    "mlp_ratio": 4.0,
}
MAE_LR = 2e-3
MASK_RATIO = 0.75
NUM_PATCHES = (IMG // 4) ** 2


def _mae_pair(seed: int = 0):
    """The official MAE (``tests/test_mae.py``'s transcription, timm ``Block`` s, official init, norm_pix_loss as
    the pre-training recipe) and fastvit's MAE holding its weights."""
    from functools import partial

    from test_mae import OfficialMAE

    torch.manual_seed(seed)
    official = OfficialMAE(**MAE_KW, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=True)
    ours = fastvit.create_model("mae_vit_base_patch16", **MAE_KW, norm_pix_loss=True)
    ours.load_state_dict(official.state_dict(), strict=True)
    # The same weight-decay groups for both: timm's create_optimizer_v2 reads model.no_weight_decay(), which the
    # official model lacks (its script's add_weight_decay passes no skip list and so decays cls_token / mask_token);
    # without this the trajectories would differ by configuration, not by numerics.
    official.no_weight_decay = ours.no_weight_decay
    return official, ours


def _noise(step: int) -> torch.Tensor:
    return torch.rand(BATCH, NUM_PATCHES, generator=torch.Generator().manual_seed(10_000 + step))


def _mae_lr(optimizer, it: float, warmup: float = 2.0) -> None:
    """MAE's ``util/lr_sched.adjust_learning_rate``: linear warm-up, then half-cycle cosine (min_lr 0), per iteration
    ``it`` in (0, K] (the official counts from 0, whose lr 0 would make the first step a no-op: shifted by one)."""
    lr = (
        MAE_LR * it / warmup
        if it < warmup
        else MAE_LR * 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (K + 1 - warmup)))
    )
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _grad_norm(parameters) -> float:
    """MAE's ``util/misc.get_grad_norm_`` (norm_type 2) of the unscaled gradients."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()


@torch.no_grad()
def _mae_eval(model, dtype) -> float:
    x, _ = _digits()
    with torch.autocast("cpu", enabled=False):
        loss, _, _ = model(x[K * BATCH :].to(dtype), mask_ratio=MASK_RATIO, noise=_noise(-1).to(dtype))
    return loss.item()


def _train_mae(
    model,
    amp: torch.dtype | None,
    dtype: torch.dtype = torch.float32,
    bad_step: int | None = None,
    run_bad_step: bool = True,
) -> Trajectory:
    """MAE ``main_pretrain.py``'s ``train_one_epoch`` for K steps: per-iteration lr (warm-up + half-cycle cosine),
    ``loss, _, _ = model(samples, mask_ratio=0.75)`` under autocast (here with a fixed ``noise`` per step, so every
    model masks the same patches), its ``NativeScalerWithGradNormCount`` (``GradScaler`` scale -> backward ->
    ``unscale_`` -> grad norm -> ``step`` -> ``update``; fp16 only, bf16 needs none), AdamW (betas 0.9, 0.95, weight
    decay 0.05 off biases, norms and ``no_weight_decay()`` names via ``timm.optim.create_optimizer_v2``, asserted).

    ``bad_step``: that step's batch gets an ``inf`` pixel (a corrupt sample); with ``run_bad_step=False`` the step is
    omitted instead -- what ``ref`` does, since a skipped step is an omitted update.
    """
    model.to(dtype)
    model.train()
    optimizer = create_optimizer_v2(model, "adamw", lr=MAE_LR, weight_decay=0.05, betas=(0.9, 0.95))
    no_decay = {
        n
        for g in optimizer.param_groups
        if g["weight_decay"] == 0.0
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert {"cls_token", "mask_token"} <= no_decay and all(
        p.ndim <= 1 for n, p in model.named_parameters() if n in no_decay - {"cls_token", "mask_token"}
    )
    scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
    traj = Trajectory()
    eval_before = _mae_eval(model, dtype)
    for step in range(K):
        _mae_lr(optimizer, step + 1)
        samples, _ = _batch(step)
        if step == bad_step:
            if not run_bad_step:
                traj.losses.append(math.nan)
                traj.grad_norms.append(math.nan)
                traj.skipped.append(True)
                continue
            samples[3, 1, 5, 7] = math.inf
        samples = samples.to(dtype)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss, _, _ = model(samples, mask_ratio=MASK_RATIO, noise=_noise(step).to(dtype))
        before = _snapshot(model)
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norm = _grad_norm(model.parameters())
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.get_scale() < scale
            traj.scales.append(scaler.get_scale())
            if skipped:
                assert scaler.get_scale() == scale * 0.5, "the scale backs off by the default factor 0.5"
        else:
            loss.backward()
            norm = _grad_norm(model.parameters())
            optimizer.step()
            skipped = False
        _assert_step(model, before, skipped, f"step {step}")
        optimizer.zero_grad()
        traj.losses.append(loss.item())
        traj.grad_norms.append(norm)
        traj.skipped.append(skipped)
    traj.params = {n: p.detach().double() for n, p in model.named_parameters()}
    traj.eval_loss = (eval_before, _mae_eval(model, dtype))
    return traj


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
def test_mae_pretrain_loop_follows_official_trajectory(amp):
    """MAE ``main_pretrain.py``'s loop (see :func:`_train_mae`, norm_pix_loss): ``ref`` the official MAE in float64,
    ``pt`` the official MAE under autocast (+ GradScaler for fp16), ``out`` fastvit's MAE (automatic dispatch: on a
    CPU the eager backend, plain PyTorch) with the same weights and per-step noise. Compared: the per-step loss and
    gradient-norm trajectories and every parameter's change after K steps, by the oracle; plus the held-out loss
    (fixed batch, fixed noise) decreases over the K steps for fastvit as for the reference."""
    official, ours = _mae_pair()
    ref = _train_mae(copy.deepcopy(official), None, torch.float64)
    pt = _train_mae(copy.deepcopy(official), amp)
    start = {n: p.detach().double() for n, p in ours.named_parameters()}
    out = _train_mae(ours, amp)
    assert not any(pt.skipped) and not any(out.skipped), (pt.skipped, out.skipped)
    errors: dict[str, tuple] = {}
    _judge("loss trajectory", out.losses, ref.losses, pt.losses, LOSS_ATOL, errors)
    _judge("grad-norm trajectory", out.grad_norms, ref.grad_norms, pt.grad_norms, LOSS_ATOL, errors)
    assert set(out.params) == set(ref.params)
    for n, p0 in start.items():
        _judge(f"param {n}", out.params[n] - p0, ref.params[n] - p0, pt.params[n] - p0, WEIGHT_ATOL, errors)
    _show(f"mae {amp}", errors)
    print(f"\n[mae {amp}] held-out loss before -> after: ref {ref.eval_loss}, out {out.eval_loss}", end="")
    _check(errors)
    assert ref.eval_loss[1] < ref.eval_loss[0] - 0.05  # the recipe learns on these K steps ...
    assert out.eval_loss[1] < out.eval_loss[0] - 0.05  # ... and so does fastvit under autocast
    assert abs(out.eval_loss[1] - ref.eval_loss[1]) <= 2 * abs(pt.eval_loss[1] - ref.eval_loss[1]) + LOSS_ATOL


def test_mae_fp16_scaler_skips_a_forced_non_finite_step():
    """fp16 + GradScaler with one corrupt batch (an ``inf`` pixel at step 3): fastvit's MAE and the official MAE both
    produce non-finite gradients there, the scaler skips the update (no parameter moves, the scale halves; asserted
    in the loop) and training goes on; the resulting trajectory is ``ref``'s with that update omitted, by the oracle
    on the finite steps' losses and on every parameter's change."""
    bad = 3
    official, ours = _mae_pair(1)
    ref = _train_mae(copy.deepcopy(official), None, torch.float64, bad_step=bad, run_bad_step=False)
    pt = _train_mae(copy.deepcopy(official), torch.float16, bad_step=bad)
    start = {n: p.detach().double() for n, p in ours.named_parameters()}
    out = _train_mae(ours, torch.float16, bad_step=bad)
    expected = [i == bad for i in range(K)]
    assert pt.skipped == expected and out.skipped == expected, (pt.skipped, out.skipped)
    assert not math.isfinite(out.losses[bad]) and not math.isfinite(out.grad_norms[bad])
    assert out.scales == pt.scales and out.scales[bad] == out.scales[0] * 0.5
    keep = [i for i in range(K) if i != bad]
    errors: dict[str, tuple] = {}
    _judge(
        "loss trajectory",
        [out.losses[i] for i in keep],
        [ref.losses[i] for i in keep],
        [pt.losses[i] for i in keep],
        LOSS_ATOL,
        errors,
    )
    for n, p0 in start.items():
        _judge(f"param {n}", out.params[n] - p0, ref.params[n] - p0, pt.params[n] - p0, WEIGHT_ATOL, errors)
    _show("mae fp16 forced skip", errors)
    _check(errors)
