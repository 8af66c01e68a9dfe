"""``python -m fastvit.bench``: the same command as ``fastvit-bench`` (see :mod:`fastvit.bench.cli`)."""

import os
import sys


def _drop_repo_root_from_path() -> None:
    """``python -m`` puts the working directory first on ``sys.path``; in the repository root that exposes
    ``kernels/`` as a top-level package and shadows Hugging Face's ``kernels`` (which transformers imports).
    fastvit itself is already imported (and installed), so the entry can go."""
    for entry in list(sys.path):
        root = os.path.abspath(entry or os.curdir)
        if os.path.isfile(os.path.join(root, "kernels", "__init__.py")) and os.path.isdir(
            os.path.join(root, "fastvit")
        ):
            sys.path.remove(entry)


_drop_repo_root_from_path()

from fastvit.bench.cli import main  # noqa: E402

sys.exit(main())
