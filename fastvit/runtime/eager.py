"""The ``eager`` backend: PyTorch's own ops, always available, on any device PyTorch runs on, last in the priority
list. The op families register its kernels (their eager implementations) with :data:`ANY_DEVICE` capabilities."""

from __future__ import annotations

from fastvit.backends import Backend, Capabilities, register_backend

#: Capabilities of every eager kernel: any device (cpu, cuda, meta, mps, xpu, ...), any floating dtype, and the
#: mixed dtypes autocast leaves (eager PyTorch promotes them as the code it replaces does), and packed
#: variable-length attention (one SDPA call per sequence).
ANY_DEVICE = Capabilities(devices=None, mixed_dtypes=True, varlen=True)

BACKEND = register_backend(Backend("eager", "PyTorch eager (reference math; SDPA for attention)"))
