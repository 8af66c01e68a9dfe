"""Packed against padded variable-resolution ViT batches (``fastvit-bench varlen``).

A NaFlex batch -- images of different sizes and aspect ratios, patchified one by one and padded to the longest
patch sequence by timm's own data pipeline (``timm.data.naflex_transforms.patchify_image`` and
``timm.data.naflex_dataset.NaFlexCollator``) -- runs through timm's ``NaFlexVit`` twice, with the same weights:

* ``timm padded``: timm's forward, which attends over the padded sequences with an additive mask (every padded
  token costs full attention and MLP compute);
* ``fastvit packed``: the same model after :func:`fastvit.integrations.patch_timm_`, whose blocks run on the valid
  tokens only, packed into one sequence with ``cu_seqlens`` (NaViT, Dehghani et al., 2023).

Each provider is checked against timm's logits before it is timed (the benchmark convention of
:mod:`fastvit.bench.providers`: check, then time), for inference (``fwd``, under ``torch.no_grad``) and a training
step without optimizer (``fwd_bwd``: cross-entropy on random labels -- the mean square of the output for a model
without classifier -- and backward). Reported per provider: the median
time (:func:`fastvit.bench.harness.do_bench`), the tokens the blocks process (padded: ``B·(N_max + prefix)``;
packed: the valid patches plus each image's prefix tokens), images/s, and on a GPU the peak memory the step adds.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["VarlenSpec", "image_sizes", "naflex_batch", "run_varlen"]


@dataclass(frozen=True)
class VarlenSpec:
    """One ``fastvit-bench varlen`` run.

    Attributes:
        model: a timm NaFlexVit model name (``timm.list_models("naflexvit*")``).
        num_images: images in the batch (B).
        min_side, max_side: image sides in pixels are drawn uniformly from ``[min_side, max_side]``, height and width
            independently (so aspect ratios vary), then rounded down to a multiple of the patch size.
        dtype: ``torch.float32``, or the autocast dtype (bf16 / fp16; the weights stay fp32).
        device: where the model runs.
        seed: seeds the sizes, pixels and labels.
        model_kwargs: extra ``timm.create_model`` arguments (the CPU default shrinks the model).
    """

    model: str
    num_images: int
    min_side: int
    max_side: int
    dtype: torch.dtype
    device: torch.device
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def image_sizes(num_images: int, min_side: int, max_side: int, patch_size: int, seed: int = 0) -> list[tuple[int, int]]:
    """``num_images`` (height, width) pairs, each side uniform in ``[min_side, max_side]`` and rounded down to a
    multiple of ``patch_size`` (at least one patch).

    Raises:
        ValueError: ``min_side > max_side``, or a side below ``patch_size``.
    """
    if min_side > max_side:
        raise ValueError(f"min_side ({min_side}) must not exceed max_side ({max_side})")
    if min_side < patch_size:
        raise ValueError(f"min_side ({min_side}) must be at least the patch size {patch_size}")
    rng = random.Random(seed)

    def side() -> int:
        return rng.randint(min_side, max_side) // patch_size * patch_size

    return [(side(), side()) for _ in range(num_images)]


def naflex_batch(images: list[torch.Tensor], patch_size: int) -> dict[str, torch.Tensor]:
    """The NaFlexVit input dict of ``images`` ((C, H_i, W_i) each), built by timm's NaFlex pipeline: each image
    patchified (``patchify_image``: (n_i, P·P·C) patches, (y, x) coordinates, valid flags), then padded to the longest
    by ``NaFlexCollator``.

    Returns:
        ``{"patches": (B, N_max, P·P·C) fp32, "patch_coord": (B, N_max, 2) int64, "patch_valid": (B, N_max) bool}``.
    """
    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import patchify_image

    samples = []
    for img in images:
        patches, coord, valid = patchify_image(img, (patch_size, patch_size))
        samples.append(({"patches": patches, "patch_coord": coord, "patch_valid": valid}, 0))
    longest = max(s[0]["patches"].shape[0] for s in samples)
    batch, _ = NaFlexCollator(max_seq_len=longest)(samples)
    return {k: batch[k] for k in ("patches", "patch_coord", "patch_valid")}


def _autocast(spec: VarlenSpec):
    if spec.dtype == torch.float32:
        return torch.autocast(spec.device.type, enabled=False)
    return torch.autocast(spec.device.type, dtype=spec.dtype)


def run_varlen(
    spec: VarlenSpec, modes: list[str], *, bench: dict[str, float] | None = None, progress=None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time timm's padded NaFlexVit against the same model patched by fastvit (packed), per mode.

    Args:
        spec: the run.
        modes: ``"fwd"`` and / or ``"fwd_bwd"``.
        bench: ``do_bench`` budgets (``warmup_ms``, ``rep_ms``).
        progress: called with a label after each measurement.

    Returns:
        ``(rows, info)``: one row per (mode, provider) -- ``provider``, ``mode``, ``status`` (``ok``, ``FAILED``
        with a ``reason`` when its logits or loss differ from timm's beyond the oracle's tolerance, ``oom``,
        ``skipped`` when ``patch_timm_`` leaves the model on timm's path, e.g. rotary embeddings),
        ``ms``, ``images_per_s``, ``tokens``, ``peak_mem_bytes``, ``max_abs_diff``, ``speedup`` (timm's time /
        this one) -- and ``info`` about the batch (sizes, valid and padded token counts) and the model.
    """
    import timm

    from fastvit.bench import harness
    from fastvit.integrations import patch_report, patch_timm_
    from fastvit.testing import atol_for

    bench = bench or {}
    torch.manual_seed(spec.seed)
    timm_model = timm.create_model(spec.model, pretrained=False, **spec.model_kwargs).to(spec.device)
    packed_model = patch_timm_(copy.deepcopy(timm_model))
    model_row = next((r for r in patch_report(packed_model) if r.name == ""), None)
    not_packed = (
        "patch_timm_ left this NaFlexVit on timm's padded path: "
        + (model_row.reason if model_row is not None else "no NaFlexVit patch")
        if model_row is None or model_row.status != "patched"
        else ""
    )
    P = timm_model.embeds.patch_size[0]
    prefix = timm_model.num_prefix_tokens
    sizes = image_sizes(spec.num_images, spec.min_side, spec.max_side, P, spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    images = [torch.randn(3, h, w, generator=gen) for h, w in sizes]
    batch = {k: v.to(spec.device) for k, v in naflex_batch(images, P).items()}
    num_classes = timm_model.num_classes  # 0 for feature models (RADIO): their loss is the mean square of the output
    labels = torch.randint(0, max(num_classes, 1), (len(images),), generator=gen).to(spec.device)
    valid = int(batch["patch_valid"].sum())
    B, n_max = batch["patch_valid"].shape
    tokens = {"timm padded": B * (n_max + prefix), "fastvit packed": valid + B * prefix}
    info = {
        "model": spec.model,
        "params": sum(p.numel() for p in timm_model.parameters()),
        "patch_size": P,
        "num_prefix_tokens": prefix,
        "image_sizes": sizes,
        "valid_patches": valid,
        "padded_patches": B * n_max,
        "valid_fraction": valid / (B * n_max),
    }
    models = {"timm padded": timm_model, "fastvit packed": packed_model}
    atol = atol_for(spec.dtype) * 10  # logits of a whole network, summed over blocks

    rows: list[dict[str, Any]] = []
    for mode in modes:
        for m in models.values():
            m.train(mode == "fwd_bwd")  # drop_path / dropout are 0 in the default configs either way

        def step(model, mode=mode):
            if mode == "fwd":
                with torch.no_grad(), _autocast(spec):
                    return model(batch)
            with _autocast(spec):
                out = model(batch).float()
                loss = torch.nn.functional.cross_entropy(out, labels) if num_classes else out.square().mean()
            loss.backward()
            return loss.detach()

        reference = None
        base_ms = None
        for name, model in models.items():
            row: dict[str, Any] = {"provider": name, "mode": mode, "tokens": tokens[name], "reason": ""}
            if name == "fastvit packed" and not_packed:
                row.update(status="skipped", reason=not_packed)
                rows.append(row)
                continue
            try:
                model.zero_grad(set_to_none=True)
                out = step(model).float()
                if reference is None:
                    reference = out
                diff = float((out - reference).abs().max()) if out.numel() else 0.0
                row["max_abs_diff"] = diff
                if not math.isfinite(diff) or diff > atol:
                    row.update(status="FAILED", reason=f"max |out - timm| = {diff:.3g} > {atol:.3g}")
                    rows.append(row)
                    continue
                row["peak_mem_bytes"] = harness.measure_peak_memory(lambda m=model: step(m), spec.device)
                params = [p for p in model.parameters() if p.requires_grad]
                timing = harness.do_bench(
                    lambda m=model: step(m),
                    device=spec.device,
                    grad_to_none=params if mode == "fwd_bwd" else None,
                    **bench,
                )
                row.update(status="ok", ms=timing.median_ms, images_per_s=B / (timing.median_ms / 1e3))
                base_ms = base_ms or timing.median_ms
                row["speedup"] = base_ms / timing.median_ms
            except torch.OutOfMemoryError as exc:
                row.update(status="oom", reason=str(exc).splitlines()[0])
            rows.append(row)
            if progress is not None:
                progress(f"{mode} {name}")
            harness.free_memory(spec.device)
    return rows, info
