"""Triton kernels of fastvit, one module per kernel family.

This folder is installed as ``fastvit.kernels`` (see setup.py's ``package_dir``). It must never be imported
as a top-level package named ``kernels``: that name belongs to Hugging Face's ``kernels`` package.
"""

if __name__ != "fastvit.kernels":
    raise ImportError(
        f"fastvit's Triton kernels were imported as {__name__!r}; import them as 'fastvit.kernels' "
        "(run the tests with `pytest`, not `python -m pytest`, so the repository root is not on sys.path)"
    )
