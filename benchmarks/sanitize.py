"""One small forward + backward of every fastvit kernel on one backend, for ``compute-sanitizer``.

Usage (benchmarks/gpu_suite.sh runs both tools on both backends)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize.py --backend cuda
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitize.py --backend triton

Shapes are small but awkward (token tails, a masked head dim, C not a power of two) so every tail path runs.
Exits non-zero if the backend cannot serve an op (it must not silently fall back to eager).
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastvit
import fastvit.ops as ops


def run(backend: str, dtype: torch.dtype) -> None:
    dev = "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(dev, dtype).requires_grad_(grad)

    with fastvit.use_backend(backend):
        for N, H, D in ((61, 2, 64), (197, 3, 72)):
            qkv = rnd(2, N, 3 * H * D)
            ops.attention(qkv, H).float().sum().backward()
        q, k, v = rnd(2, 2, 33, 64), rnd(2, 2, 20, 64), rnd(2, 2, 20, 64)
        ops.scaled_dot_product_attention(q, k, v).float().sum().backward()
        x, r, w, b = rnd(3, 61, 200), rnd(3, 61, 200), rnd(200), rnd(200)
        y, h = ops.layer_norm(x, w, b, 1e-6, residual=r)
        (y.float().sum() + h.float().sum()).backward()
        x, w1, b1, w2, b2, gamma = rnd(3, 61, 96), rnd(384, 96), rnd(384), rnd(96, 384), rnd(96), rnd(96)
        hid = ops.linear_gelu(x, w1, b1)
        ops.linear_residual(hid, w2, b2, x, gamma=gamma).float().sum().backward()
        images, weight = rnd(2, 3, 64, 48), rnd(96, 3, 16, 16)
        pos, cls = rnd(1, 13, 96), rnd(1, 1, 96)
        ids_keep = torch.rand(2, 12, generator=g).argsort(1)[:, :3].to(dev)
        tokens = ops.patch_embed(images, weight, rnd(96), pos_embed=pos, cls_token=cls, ids_keep=ids_keep)
        tokens.float().sum().backward()
        ids_restore = torch.rand(2, 12, generator=g).argsort(1).to(dev)
        out = ops.mae_unshuffle(rnd(2, 4, 40), rnd(1, 1, 40), ids_restore, pos_embed=rnd(1, 13, 40))
        out.float().sum().backward()
        mask = (torch.rand(2, 12, generator=g) < 0.75).float().to(dev)
        ops.mae_loss(rnd(2, 12, 16 * 16 * 3), rnd(2, 3, 64, 48), mask, 16, norm_pix_loss=True).backward()
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["cuda", "triton"], required=True)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args(argv)
    run(args.backend, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    print(f"sanitize: every op ran forward + backward on backend {args.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
