"""``python -m fastvit.build``: compile ``csrc/`` into the CUDA extension on request, with progress and a log.

Builds for this machine's GPU by default (``--archs`` overrides; ``"8.0;9.0a"`` without a GPU), minimal with
``--minimal`` (one instantiation per kernel template), into torch's extension cache (``$TORCH_EXTENSIONS_DIR``).
Importing fastvit never builds, but it loads what this command built last (recorded in fastvit's cache folder,
``$FASTVIT_CACHE_DIR`` or ``~/.cache/fastvit``, while torch and ``csrc/`` still match); ``FASTVIT_CUDA_JIT=1`` makes
the import build when neither ``fastvit._C`` nor such a build exists.

Exit status: 0 built and loaded, 1 the build failed (the log's tail is printed), 2 this machine cannot build.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from fastvit.runtime import cuda


def main(argv: list[str] | None = None) -> int:
    """Run the build; see the module docstring for arguments and exit status."""
    parser = argparse.ArgumentParser(prog="python -m fastvit.build", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--archs", default=None, help="';'-separated compute capabilities, e.g. '8.0;9.0a' (default: this GPU's)"
    )
    parser.add_argument(
        "--minimal", action="store_true", help="one instantiation per kernel template (bf16, head-dim bucket 64)"
    )
    parser.add_argument("--log", default=None, help=f"compiler output (default: {cuda.default_log_path()})")
    parser.add_argument("--build-directory", default=None, help="object files (default: torch's extension cache)")
    args = parser.parse_args(argv)
    missing = cuda.missing_for_build()
    if missing:
        print("fastvit.build: cannot build here: " + "; ".join(missing), file=sys.stderr)
        return 2
    archs = args.archs or cuda.local_arch()
    log = args.log or cuda.default_log_path()
    print(
        f"fastvit.build: compiling csrc/ for {archs} ({'minimal' if args.minimal else 'full'}); log: {log}",
        file=sys.stderr,
    )
    start = time.monotonic()
    try:
        built = cuda.jit_build(minimal=args.minimal, archs=archs, log_path=log, build_directory=args.build_directory)
    except Exception as exc:  # noqa: BLE001 -- the compiler's message is the useful part
        print(
            f"fastvit.build: failed after {time.monotonic() - start:.0f} s: {str(exc)[-3000:]}\n(log: {log})",
            file=sys.stderr,
        )
        return 1
    ext = cuda.load(jit=True, minimal=args.minimal, archs=archs, log_path=log, build_directory=args.build_directory)
    record = cuda.record_build(built)  # later imports load this build (when torch and csrc/ still match)
    print(
        f"fastvit.build: built in {time.monotonic() - start:.0f} s (recorded in {record}): "
        f"{json.dumps(dict(ext.build_info()))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
