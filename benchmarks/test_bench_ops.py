"""pytest-benchmark suite: each fastvit op on each backend that can serve it, with ViT-B shapes.

Run (not part of ``tests/``; needs ``pytest-benchmark``)::

    pytest benchmarks/test_bench_ops.py --benchmark-only                  # GPU: ViT-B/16 at 224, batch 64, bf16
    pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-json out.json

On the CPU the shapes shrink (batch 1, 64x64 images, fp32). Backends that cannot serve a call are skipped with
``fastvit.backends.get_backend(b).not_supported_reasons(op, fastvit.ops.describe_call(op, ...))``. Each benchmarked call synchronises the device,
so the times include the kernel, not just its launch. For medians with CUDA events, L2 flushing, roofline
fractions and accuracy checks use ``fastvit-bench`` (``benchmarks/README.md``); this suite is for quick,
pytest-benchmark-style comparisons and regression tracking.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fastvit.backends import get_backend  # noqa: E402
from fastvit.bench.harness import device_synchronize  # noqa: E402
from fastvit.bench.providers import scaling_components  # noqa: E402
from fastvit.ops import describe_call  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH = 64 if CUDA else 1
IMG = 224 if CUDA else 64

# ViT-B/16 (and MAE-B decoder) shapes.
VIT_B = {
    "embed_dim": 768,
    "num_heads": 12,
    "head_dim": 64,
    "patch_size": 16,
    "mlp_hidden": 3072,
    "in_chans": 3,
    "num_prefix_tokens": 1,
    "is_mae": True,
    "mask_ratio": 0.75,
    "decoder_embed_dim": 512,
}
COMPONENTS = {c.name: c for c in scaling_components(VIT_B)}


@pytest.mark.parametrize("backend", ["eager", "triton", "cuda"])
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_op(benchmark, component, backend, mode):
    comp = COMPONENTS[component]
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for k, v in comp.make(BATCH, IMG, gen).items():
        v = v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE)
        if mode == "fwd_bwd" and v.is_floating_point() and k != "images":
            v.requires_grad_(True)
        inputs[k] = v
    args, kwargs = comp.args(inputs)
    reasons = get_backend(backend).not_supported_reasons(comp.op, describe_call(comp.op, *args, **kwargs))
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    out = comp.run(inputs, backend)
    grad = torch.randn_like(out)

    def run() -> None:
        y = comp.run(inputs, backend)
        if mode == "fwd_bwd":
            y.backward(grad)
            for v in inputs.values():
                v.grad = None
        device_synchronize(DEVICE)

    benchmark.extra_info.update(
        component=component, backend=backend, mode=mode, batch=BATCH, img_size=IMG, dtype=str(DTYPE), device=str(DEVICE)
    )
    benchmark(run)
