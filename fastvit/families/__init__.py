"""The op families, one module each -- the same five as ``kernels/`` and ``csrc/``: :mod:`.patch_embed`,
:mod:`.attention`, :mod:`.layer_norm`, :mod:`.linear`, :mod:`.mae`.

A family module holds everything of its ops but the kernels: each op's declaration (:func:`fastvit.declare.declare`:
arguments, call description, reference, oracle, self-test shapes, benchmark calls, cost models), its check step and
checked public function (re-exported by :mod:`fastvit.ops`), the eager implementation, the autograd shared by both
kernel backends, the Triton op registration and dispatch entries, the CUDA ops' fakes and dispatch entries
(registered when the extension loads), and each backend's capability checks. Adding an op means its family module,
its kernels, its tests and one import line in :mod:`fastvit.ops` (docs/ARCHITECTURE.md has the checklist).

Importing this package registers every family with every backend that can run here; the import order below is the
order of :data:`fastvit.backends.OPS`.
"""

from fastvit.families import patch_embed, attention, layer_norm, linear, mae  # noqa: F401,I001  (dispatch order of OPS)

__all__ = ["attention", "layer_norm", "linear", "mae", "patch_embed"]
