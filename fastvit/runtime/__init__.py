"""Per-backend runtime infrastructure with no op knowledge: each module registers its backend with
:mod:`fastvit.backends` and gives the op families (:mod:`fastvit.families`) what they need to register kernels.

* :mod:`fastvit.runtime.eager` -- the ``eager`` backend (PyTorch; always available).
* :mod:`fastvit.runtime.triton` -- the Triton import guard, launch wrapping (``wrap_triton`` or the interpreter),
  ``triton_op`` registration once per process, the ``triton`` backend.
* :mod:`fastvit.runtime.cuda` -- loading ``fastvit._C`` (never building it at import), the kernel facts of its
  build, load hooks for the families, the ``cuda`` backend.
* :mod:`fastvit.runtime.cuda_build` -- how ``csrc/`` is compiled (stdlib only; shared with ``setup.py``).
"""

import os


def cache_root() -> str:
    """fastvit's cache folder (recorded CUDA builds, self-test verdicts): ``$FASTVIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fastvit``, else ``~/.cache/fastvit``."""
    root = os.environ.get("FASTVIT_CACHE_DIR")
    if root:
        return root
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastvit")
