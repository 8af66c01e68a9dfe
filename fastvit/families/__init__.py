"""The op families, one module each -- the same five as ``kernels/`` and ``csrc/``: :mod:`.patch_embed`,
:mod:`.attention`, :mod:`.layer_norm`, :mod:`.linear`, :mod:`.mae`.

A family module holds everything of its ops but the public checked signatures (:mod:`fastvit.ops`) and the kernels:
the op names (declared once, with :func:`fastvit.backends.declare_ops`), the eager implementations, the autograd
shared by both kernel backends, the Triton op registration and dispatch entries, the CUDA ops' fakes and dispatch
entries (registered when the extension loads), and each backend's capability checks. Adding an op family means one
module here, its kernels, its tests, and its public function in :mod:`fastvit.ops`.

Importing this package registers every family with every backend that can run here.
"""

from fastvit.families import patch_embed, attention, layer_norm, linear, mae  # noqa: F401,I001  (dispatch order of OPS)

__all__ = ["attention", "layer_norm", "linear", "mae", "patch_embed"]
