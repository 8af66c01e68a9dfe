"""The table of what ``csrc/`` instantiates, and the generator of the files that follow from it (stdlib only).

One place names the attention head-dim buckets, the 16-bit dtypes, the kernel kinds of each family and what a
minimal build (``FASTVIT_MINIMAL_BUILD``) keeps. From it come, committed next to the hand-written sources:

* one instantiation file per (kind, dtype[, head-dim bucket]) -- ``csrc/attention/attention_fwd_hdim80_bf16.cu``,
  ``csrc/linear/linear_bwd_fp16.cu``, ... -- so that every template instantiation compiles in its own translation
  unit, in parallel;
* ``csrc/common/kernel_table.h``: the bucket list, and X-macros of what this build compiles, which
  ``common/common.h``, ``common/dispatch.cuh``, ``attention/attention.h`` and the head-dim switch of
  ``attention/attention_api.cu`` use instead of lists of their own.

Regenerate after editing the table: ``python fastvit/runtime/kernel_table.py`` (a script: it needs neither torch nor
an importable fastvit; ``--check`` only compares);
tests/test_kernel_table.py fails while a committed file differs from what the table gives. ``setup.py`` loads
:mod:`fastvit.runtime.cuda_build`, which reads this table, by path before fastvit is importable: hence stdlib only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

#: csrc/ of a source checkout.
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")

#: The script named in every generated file's first line.
GENERATOR = "fastvit/runtime/kernel_table.py"


@dataclasses.dataclass(frozen=True)
class DType:
    """A 16-bit element type of the tensor-core kernels."""

    suffix: str  # in file names: attention_fwd_hdim64_<suffix>.cu
    kind: str  # fastvit::DType enumerator
    element: str  # CUTLASS element type
    name: str  # torch's name, as build_info()["half_dtypes"] reports it


DTYPES = (
    DType("fp16", "kFloat16", "cutlass::half_t", "float16"),
    DType("bf16", "kBFloat16", "cutlass::bfloat16_t", "bfloat16"),
)

#: Attention head-dim buckets, ascending: a head dim runs in the first bucket >= it; the last is the largest head dim.
ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 128)

#: What a minimal build (CI: no GPU, minutes instead of an hour) keeps: one instantiation of each kernel template.
MINIMAL_DTYPES = ("bf16",)
MINIMAL_HEAD_DIMS = (64,)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kernel kind of a family: a template instantiated once per dtype (and per head-dim bucket when
    ``head_dims``), each instantiation in its own generated file."""

    family: str
    stem: str  # file name before the _hdim<D> / _<dtype> suffixes
    include: str  # the header that defines the template (or the instantiation macro)
    what: str  # first comment line of the file, after "<what>, "
    body: str  # the instantiation, with {element} (and {head_dim}) filled in
    head_dims: bool = False
    #: ptxas must report no register spills in its files (python -m fastvit.cuda_check fails on one) although its
    #: family has no such rule: a hand-written kernel whose speed depends on staying in registers.
    no_spill: bool = False


def _attention(direction: str, varlen: bool, rope: bool = False) -> Kind:
    params = "AttentionFwdParams" if direction == "fwd" else "AttentionBwdParams"
    flags = f"{'true' if varlen else 'false'}, {'true' if rope else 'false'}"
    layout = "packed variable-length sequences (cu_seqlens)" if varlen else "dense (B, H, N, D) tensors"
    if rope:
        layout += " with rope"
    return Kind(
        family="attention",
        stem=f"attention_{direction}" + ("_varlen" if varlen else "") + ("_rope" if rope else ""),
        include=f"attention/attention_{direction}.cuh",
        what=f"attention {direction} launcher, {layout}",
        body=(
            "namespace fastvit {{\n"
            f"template cudaError_t run_attention_{direction}_bucket<{{element}}, {{head_dim}}, {flags}>(const {params}&,"
            " cudaStream_t);\n"
            "}}  // namespace fastvit\n"
        ),
        head_dims=True,
    )


def _macro(family: str, stem: str, impl: str, macro: str, what: str, no_spill: bool = False) -> Kind:
    return Kind(family, stem, f"{family}/{impl}", what, f"{macro}({{element}})\n", no_spill=no_spill)


#: Every generated instantiation kind. Attention: fwd / bwd, dense / packed (varlen), without / with rotary embeddings
#: (rope: q and k rotated as they are loaded, a template flag so that the kernels without it stay as they were), per
#: bucket and dtype; linear and patch_embed: per dtype, through the FASTVIT_INSTANTIATE_* macro of their *_impl.cuh.
KINDS = (
    _attention("fwd", False),
    _attention("bwd", False),
    _attention("fwd", True),
    _attention("bwd", True),
    _attention("fwd", False, rope=True),
    _attention("bwd", False, rope=True),
    _attention("fwd", True, rope=True),
    _attention("bwd", True, rope=True),
    _macro(
        "linear",
        "linear_gelu_fwd",
        "linear_fwd_impl.cuh",
        "FASTVIT_INSTANTIATE_LINEAR_GELU_FWD",
        "linear_gelu forward: 4 EVT GEMMs (erf / tanh GELU x with / without the stored h)",
    ),
    _macro(
        "linear",
        "linear_residual_fwd",
        "linear_fwd_impl.cuh",
        "FASTVIT_INSTANTIATE_LINEAR_RESIDUAL_FWD",
        "linear_residual forward: 2 EVT GEMMs (with / without the stored z)",
    ),
    _macro(
        "linear",
        "linear_glu_fwd",
        "linear_glu_fwd.cuh",
        "FASTVIT_INSTANTIATE_LINEAR_GLU_FWD",
        "linear_glu forward: one CuTe dual GEMM (gate and value accumulators, gating epilogue)",
        no_spill=True,
    ),
    _macro(
        "linear",
        "linear_bwd",
        "linear_bwd_impl.cuh",
        "FASTVIT_INSTANTIATE_LINEAR_BWD",
        "linear_gelu / linear_residual / linear_glu backward (also the NN / TN GEMMs patch_embed reuses)",
    ),
    _macro(
        "patch_embed",
        "patch_embed_fwd",
        "patch_embed_fwd_impl.cuh",
        "FASTVIT_INSTANTIATE_PATCH_EMBED_FWD",
        "patch_embed forward: 2 batched EVT GEMMs (bias + pos-embed rows / bias only) + gathers",
    ),
    _macro(
        "patch_embed",
        "patch_embed_bwd",
        "patch_embed_bwd_impl.cuh",
        "FASTVIT_INSTANTIATE_PATCH_EMBED_BWD",
        "patch_embed backward: SIMT gathers / scatters / batch sums (its GEMMs: linear_bwd_<dtype>.cu)",
    ),
)


@dataclasses.dataclass(frozen=True)
class Family:
    """A folder of csrc/ (an op family: its kernels, params header and binding)."""

    name: str
    #: ptxas must report no register spills in its kernels (python -m fastvit.cuda_check fails on one): the kernels
    #: whose speed depends on staying in registers.
    no_spill: bool = False


#: The op families, one folder of csrc/ each (csrc/common/ is shared code, not a family).
FAMILIES = (
    Family("attention", no_spill=True),
    Family("layer_norm", no_spill=True),
    Family("linear"),
    Family("patch_embed"),
    Family("mae"),
)


def no_spill_families() -> tuple[str, ...]:
    """The families whose kernels must not spill."""
    return tuple(f.name for f in FAMILIES if f.no_spill)


def no_spill_files() -> frozenset[str]:
    """Instantiation files (relative to csrc/, '/'-separated) whose kernels must not spill beyond their families'
    rule: every file of a ``no_spill`` kind."""
    return frozenset(i.path for i in instances() if i.kind.no_spill)


# ------------------------------------------------------------------------------------------- instantiations
@dataclasses.dataclass(frozen=True)
class Instance:
    """One generated instantiation file."""

    kind: Kind
    dtype: DType
    head_dim: int | None = None

    @property
    def path(self) -> str:
        """Relative to csrc/, '/'-separated."""
        hdim = f"_hdim{self.head_dim}" if self.head_dim is not None else ""
        return f"{self.kind.family}/{self.kind.stem}{hdim}_{self.dtype.suffix}.cu"

    @property
    def minimal(self) -> bool:
        """Whether a minimal build compiles it."""
        return self.dtype.suffix in MINIMAL_DTYPES and (self.head_dim is None or self.head_dim in MINIMAL_HEAD_DIMS)

    def text(self) -> str:
        bucket = f" head-dim bucket {self.head_dim}," if self.head_dim is not None else ""
        return (
            _banner()
            + f"// {self.kind.what};{bucket} {self.dtype.name}.\n"
            + f'#include "{self.kind.include}"\n\n'
            + "".join(
                _fit(line)
                for line in self.kind.body.format(element=self.dtype.element, head_dim=self.head_dim).splitlines(True)
            )
        )


#: .clang-format's ColumnLimit: generated files pass ``clang-format --dry-run --Werror`` as the hand-written ones do.
COLUMN_LIMIT = 120


def _fit(line: str) -> str:
    """A generated declaration line as clang-format lays it out: unchanged within :data:`COLUMN_LIMIT`, otherwise
    broken after the comma that ends its parameter list's first argument, the rest aligned under that argument (the
    attention launchers' explicit instantiations, whose four template arguments make most of them too long)."""
    body = line.rstrip("\n")
    if len(body) <= COLUMN_LIMIT or "(" not in body:
        return line
    open_paren = body.rindex("(")
    comma = body.find(", ", open_paren)
    if comma < 0:
        return line
    return body[: comma + 1] + "\n" + " " * (open_paren + 1) + body[comma + 2 :] + line[len(body) :]


def instances(minimal: bool = False) -> list[Instance]:
    """Every instantiation file of a full build (``minimal``: of a minimal build), in table order."""
    out = []
    for kind in KINDS:
        for head_dim in ATTENTION_HEAD_DIMS if kind.head_dims else (None,):
            for dtype in DTYPES:
                inst = Instance(kind, dtype, head_dim)
                if inst.minimal or not minimal:
                    out.append(inst)
    return out


def not_minimal_files() -> frozenset[str]:
    """Paths (relative to csrc/, '/'-separated) of the instantiation files a minimal build leaves out."""
    return frozenset(i.path for i in instances() if not i.minimal)


# ------------------------------------------------------------------------------------------- header
HEADER = "common/kernel_table.h"


def _banner() -> str:
    return f"// generated by {GENERATOR}; do not edit (python fastvit/runtime/kernel_table.py rewrites it).\n"


def _x_macro(head: str, items: list[str]) -> str:
    """``#define head X(item, __VA_ARGS__) ...``, one X per line, the backslashes aligned as clang-format aligns them."""
    one_line = f"#define {head} " + " ".join(f"X({item}, __VA_ARGS__)" for item in items)
    if len(one_line) <= 120:  # .clang-format's ColumnLimit
        return one_line
    lines = [f"#define {head}", *(f"  X({item}, __VA_ARGS__)" for item in items)]
    width = max(len(line) for line in lines[:-1])
    return "".join(line.ljust(width) + " \\\n" for line in lines[:-1]) + lines[-1]


def _build_lists(minimal: bool) -> list[str]:
    dtypes = [d for d in DTYPES if d.suffix in MINIMAL_DTYPES or not minimal]
    head_dims = [d for d in ATTENTION_HEAD_DIMS if d in MINIMAL_HEAD_DIMS or not minimal]
    return [
        f'#define FASTVIT_BUILD_HALF_DTYPES "{",".join(d.name for d in dtypes)}"',
        f"#define FASTVIT_BUILD_ATTENTION_HEADDIMS {', '.join(map(str, head_dims))}",
        _x_macro("FASTVIT_BUILD_HALF_TYPES(X, ...)", [f"{d.kind}, {d.element}" for d in dtypes]),
        _x_macro("FASTVIT_BUILD_ATTENTION_HEAD_DIMS(X, ...)", [str(d) for d in head_dims]),
    ]


def header_text() -> str:
    """``csrc/common/kernel_table.h``."""
    lines = [
        _banner().rstrip("\n"),
        "//",
        "// The kernel table as the C++ side sees it. Included by common/common.h; torch-free and CUTLASS-free (the",
        "// element types below are only named, for the files that expand FASTVIT_BUILD_HALF_TYPES).",
        "#pragma once",
        "",
        "// Every attention head-dim bucket, ascending, compiled or not: a head dim runs in the first bucket >= it.",
        f"#define FASTVIT_ATTENTION_HEAD_DIM_BUCKETS {', '.join(map(str, ATTENTION_HEAD_DIMS))}",
        "",
        "// What this build compiles: the 16-bit dtypes (names for build_info(); X(kind, element type, ...) per dtype)",
        "// and the attention head-dim buckets (a list; X(bucket, ...) per bucket). A full build compiles every",
        "// (dtype, bucket); FASTVIT_MINIMAL_BUILD one instantiation of each kernel template.",
        "#ifdef FASTVIT_MINIMAL_BUILD",
        *_build_lists(minimal=True),
        "#else",
        *_build_lists(minimal=False),
        "#endif",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- files
def generated_files() -> dict[str, str]:
    """Every generated file: path relative to csrc/ ('/'-separated) -> contents."""
    files = {HEADER: header_text()}
    for inst in instances():
        files[inst.path] = inst.text()
    return files


def is_generated(text: str) -> bool:
    """Whether a file's contents start with the generator's banner."""
    return text.startswith(f"// generated by {GENERATOR}")


def stale_files(root: str = CSRC) -> tuple[list[str], list[str]]:
    """``(differing, orphaned)``: generated files under ``root`` whose contents are not what the table gives (or that
    are missing), and files carrying the generator's banner that the table no longer names."""
    files = generated_files()
    differing = []
    for rel, text in files.items():
        try:
            with open(os.path.join(root, rel), encoding="utf-8", newline="") as f:
                same = f.read() == text
        except OSError:
            same = False
        if not same:
            differing.append(rel)
    orphaned = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel in files or not name.endswith((".cu", ".cuh", ".h", ".cpp")):
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                if is_generated(f.read(200)):
                    orphaned.append(rel)
    return sorted(differing), sorted(orphaned)


def write(root: str = CSRC) -> list[str]:
    """Write every generated file that differs, delete generated files the table no longer names; returns the paths
    changed (relative to ``root``)."""
    differing, orphaned = stale_files(root)
    files = generated_files()
    for rel in differing:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(files[rel])
    for rel in orphaned:
        os.remove(os.path.join(root, rel))
    return differing + orphaned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python fastvit/runtime/kernel_table.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="only report stale files (exit status 1 if any)")
    parser.add_argument("--root", default=CSRC, help="the csrc/ directory (default: this checkout's)")
    args = parser.parse_args(argv)
    if args.check:
        differing, orphaned = stale_files(args.root)
        for rel in differing:
            print(f"stale: {rel}")
        for rel in orphaned:
            print(f"no longer in the table: {rel}")
        return 1 if differing or orphaned else 0
    changed = write(args.root)
    for rel in changed:
        print(f"wrote {rel}" if os.path.exists(os.path.join(args.root, rel)) else f"removed {rel}")
    print(f"kernel_table: {len(generated_files())} generated files, {len(changed)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
