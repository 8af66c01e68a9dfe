"""fastvit's benchmark harness and the ``fastvit-bench`` command.

Modules:
    harness     ``do_bench``-style timing (CUDA events, L2 flush, rotated inputs; perf_counter on the CPU), peak
                memory, per-op FLOP / byte models, measured rooflines, accuracy checks, environment capture.
    providers   attention providers (fastvit backends, SDPA backends, FlashAttention, xformers), model providers
                (fastvit per backend, timm, timm + torch.compile, Hugging Face), scaling components.
    cli         ``fastvit-bench attention | model | scaling`` (also ``python -m fastvit.bench``).

Importing this package does not import torch; the submodules do.
"""

__all__ = ["cli", "harness", "providers"]
