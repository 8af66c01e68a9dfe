"""The ``eager`` backend: PyTorch's own ops, always available, on any device PyTorch runs on, last in the priority
list. The op families register its kernels (their eager implementations) with :data:`ANY_DEVICE` capabilities."""

from __future__ import annotations

from fastvit.backends import Backend, Capabilities, register_backend

#: Capabilities of every eager kernel: any device (cpu, cuda, meta, mps, xpu, ...), any floating dtype.
ANY_DEVICE = Capabilities(devices=None)

BACKEND = register_backend(Backend("eager", "PyTorch eager (reference math; SDPA for attention)"))
