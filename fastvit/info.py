"""``python -m fastvit.info``: what fastvit was built with, which backends run here, and why the rest do not."""

from __future__ import annotations

import json
import platform
import sys

import torch

from fastvit import __version__, selftest
from fastvit.backends import OPS, PRIORITY, get_backend, selftest_enabled


def collect() -> dict:
    """Environment and backend report as a JSON-serialisable dict.

    Keys: ``fastvit``, ``python``, ``torch``, ``torch_cuda``, ``triton``, ``device``, ``extension``
    (``fastvit._C`` build info or the import error), ``selftest`` (the dispatch gate: ``enabled``, ``cache``, ``key``)
    and ``backends`` (per backend: ``available``, ``reasons``, per op the reasons it cannot serve a default call on
    this machine's device, and -- for the kernel backends -- ``selftest``: per op ``{"status": "verified" | "failed" |
    "unverified" | "excluded", "detail": ...}``; "failed" and "excluded" ops are not used by automatic dispatch).
    """
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from fastvit.runtime import cuda as _cuda

    extension = (
        {"built": True, **_cuda.build_info()}
        if _cuda.load_error() is None
        else {"built": False, "error": _cuda.load_error()}
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gate = selftest.status(device)
    backends = {}
    for name in PRIORITY:
        backend = get_backend(name)
        reasons = backend.unavailable_reasons()
        ops = {op: backend.not_supported_reasons(op, {"device": device}) for op in OPS}
        backends[name] = {
            "description": backend.description,
            "available": not reasons,
            "reasons": reasons,
            "ops": ops,
            "automatic": bool(backend.automatic()),
        }
        if name in gate:
            backends[name]["selftest"] = gate[name]
    env = selftest.environment(device)
    return {
        "fastvit": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "extension": extension,
        "selftest": {
            "enabled": selftest_enabled(),
            "cache": selftest.cache_dir(),
            "key": selftest.cache_key(env),
            "environment": env,
        },
        "backends": backends,
    }


def main(argv: list[str] | None = None) -> int:
    """Print the report (``--json`` for machine-readable output)."""
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"fastvit {info['fastvit']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})"
        f"  triton {info['triton']}"
    )
    print(f"device: {info['device']}")
    ext = info["extension"]
    print(
        f"extension fastvit._C: {'built ' + json.dumps(ext) if ext.get('built', True) and 'error' not in ext else 'not built'}"
    )
    gate = info["selftest"]
    print(
        f"self-test gate: {'on' if gate['enabled'] else 'off (FASTVIT_SELFTEST=0: kernels trusted unchecked)'}"
        f" -- verdicts in {gate['cache']}/{gate['key']}.json"
    )
    for name, b in info["backends"].items():
        status = "runs here" if b["available"] else "unavailable: " + "; ".join(b["reasons"])
        print(f"\n[{name}] {b['description']} -- {status}")
        if b["available"]:
            for op, reasons in b["ops"].items():
                line = "ok" if not reasons else "; ".join(reasons)
                check = b.get("selftest", {}).get(op)
                if check is not None and not reasons:
                    line = _SELFTEST_LINE[check["status"]].format(detail=check["detail"])
                    if check["status"] == "unverified" and not b["automatic"]:
                        line = "ok, not verified here (explicit use only: automatic dispatch does not pick it here)"
                print(f"  {op:30s} {line}")
    return 0


_SELFTEST_LINE = {
    "verified": "ok, self-test passed ({detail})",
    "unverified": "ok, not verified here yet (the self-test runs at first automatic use)",
    "failed": "EXCLUDED from automatic dispatch: self-test failed at {detail}",
    "excluded": "EXCLUDED from automatic dispatch in this process: {detail}",
}


if __name__ == "__main__":
    sys.exit(main())
