"""fastvit's benchmark harness and the ``fastvit-bench`` command.

Modules:
    harness     ``do_bench``-style timing (CUDA events, L2 flush, rotated inputs; perf_counter on the CPU), peak
                memory, per-op FLOP / byte models, measured rooflines, environment capture.
    providers   attention providers (fastvit backends, SDPA backends, FlashAttention, xformers), model providers
                (fastvit per backend, timm, timm + torch.compile, Hugging Face), scaling components, and the one
                runner they share (``run_case``: check with :mod:`fastvit.testing`'s oracle, then time).
    overhead    host overhead of dispatch per op and of a host-bound model against timm.
    cli         ``fastvit-bench attention | model | scaling | overhead`` (also ``python -m fastvit.bench``).

Importing this package does not import torch; the submodules do.
"""

__all__ = ["cli", "harness", "providers"]
