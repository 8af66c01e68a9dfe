"""``python -m fastvit.info``: what fastvit was built with, which backends run here, and why the rest do not."""

from __future__ import annotations

import json
import platform
import sys

import torch

from fastvit import __version__
from fastvit.backends import OPS, PRIORITY, get_backend


def collect() -> dict:
    """Environment and backend report as a JSON-serialisable dict.

    Keys: ``fastvit``, ``python``, ``torch``, ``torch_cuda``, ``triton``, ``device``, ``extension``
    (``fastvit._C`` build info or the import error) and ``backends`` (per backend: ``available``, ``reasons``,
    and per op the reasons it cannot serve a default call on this machine's device).
    """
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from fastvit.runtime import cuda as _cuda

    extension = {"built": True, **_cuda.build_info()} if _cuda.load_error() is None else {
        "built": False, "error": _cuda.load_error()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = {}
    for name in PRIORITY:
        backend = get_backend(name)
        reasons = backend.unavailable_reasons()
        ops = {op: backend.not_supported_reasons(op, {"device": device}) for op in OPS}
        backends[name] = {"description": backend.description, "available": not reasons, "reasons": reasons, "ops": ops}
    return {
        "fastvit": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "extension": extension,
        "backends": backends,
    }


def main(argv: list[str] | None = None) -> int:
    """Print the report (``--json`` for machine-readable output)."""
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    print(f"fastvit {info['fastvit']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})"
          f"  triton {info['triton']}")
    print(f"device: {info['device']}")
    ext = info["extension"]
    print(f"extension fastvit._C: {'built ' + json.dumps(ext) if ext.get('built', True) and 'error' not in ext else 'not built'}")
    for name, b in info["backends"].items():
        status = "runs here" if b["available"] else "unavailable: " + "; ".join(b["reasons"])
        print(f"\n[{name}] {b['description']} -- {status}")
        if b["available"]:
            for op, reasons in b["ops"].items():
                print(f"  {op:30s} {'ok' if not reasons else '; '.join(reasons)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
