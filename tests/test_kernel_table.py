"""The kernel table (fastvit/runtime/kernel_table.py) and the csrc/ files generated from it."""

from __future__ import annotations

import os
import re

import pytest

from fastvit.runtime import cuda_build as build
from fastvit.runtime import kernel_table as table

pytestmark = pytest.mark.skipif(not os.path.isdir(build.CSRC), reason="needs a source checkout (csrc/)")


def _read(rel: str) -> str:
    with open(os.path.join(build.CSRC, rel), encoding="utf-8", newline="") as f:
        return f.read()


def test_committed_files_are_what_the_table_generates():
    """Regenerating reproduces every generated file byte for byte, and no file with the generator's banner is left
    over from an older table (run ``python fastvit/runtime/kernel_table.py`` after editing the table)."""
    assert table.stale_files() == ([], [])


def test_generator_writes_into_an_empty_tree_and_then_has_nothing_to_do(tmp_path):
    root = str(tmp_path)
    assert table.write(root) == sorted(table.generated_files())
    assert table.stale_files(root) == ([], []) and table.write(root) == []
    for rel, text in table.generated_files().items():
        with open(os.path.join(root, rel), encoding="utf-8", newline="") as f:
            assert f.read() == text == _read(rel), rel
    stray = tmp_path / "attention" / "attention_fwd_hdim48_bf16.cu"  # a bucket the table no longer has
    stray.write_text(table.generated_files()["attention/attention_fwd_hdim64_bf16.cu"])
    (tmp_path / "attention" / "attention_fwd_hdim64_bf16.cu").write_text("// edited by hand\n")
    assert table.stale_files(root) == (
        ["attention/attention_fwd_hdim64_bf16.cu"],
        ["attention/attention_fwd_hdim48_bf16.cu"],
    )
    assert table.main(["--check", "--root", root]) == 1
    table.write(root)
    assert not stray.exists() and table.main(["--check", "--root", root]) == 0


def test_every_generated_file_says_so_and_every_instantiation_file_is_generated():
    """The banner marks the generated files; a file named like an instantiation (``_fp16`` / ``_bf16`` /
    ``_hdim<D>``) is one the table generates, so that the minimal build's selection (the table's) covers it."""
    generated = table.generated_files()
    for rel in generated:
        assert table.is_generated(_read(rel)) and "do not edit" in _read(rel).splitlines()[0], rel
    named = {
        os.path.relpath(p, build.CSRC).replace(os.sep, "/")
        for p in build.sources(minimal=False, kernels_only=True)
        if re.search(r"_(fp16|bf16)$|_hdim\d+", os.path.basename(p)[: -len(".cu")])
    }
    assert named == {i.path for i in table.instances()}


def test_instantiation_counts():
    """8 attention kinds (fwd / bwd, dense / varlen, without / with rope) x 5 buckets x 2 dtypes, 4 linear and 2
    patch_embed kinds x 2 dtypes; a minimal build keeps bf16 and bucket 64: one instantiation of each template."""
    assert table.ATTENTION_HEAD_DIMS == (32, 64, 80, 96, 128)
    assert len(table.instances()) == 8 * 5 * 2 + 4 * 2 + 2 * 2
    minimal = table.instances(minimal=True)
    assert len(minimal) == len(table.KINDS)
    assert all(i.dtype.suffix == "bf16" and i.head_dim in (None, 64) for i in minimal)
    assert "attention/attention_bwd_varlen_hdim64_bf16.cu" in {i.path for i in minimal}
    assert "attention/attention_fwd_varlen_rope_hdim64_bf16.cu" in {i.path for i in minimal}


def test_header_lists_follow_the_table():
    text = _read(table.HEADER)
    assert "#define FASTVIT_ATTENTION_HEAD_DIM_BUCKETS 32, 64, 80, 96, 128\n" in text
    minimal, full = text.split("#ifdef FASTVIT_MINIMAL_BUILD\n")[1].split("#else\n")
    assert re.findall(r"X\((\d+), __VA_ARGS__\)", full) == ["32", "64", "80", "96", "128"]
    assert re.findall(r"X\((\d+), __VA_ARGS__\)", minimal) == ["64"]
    assert re.findall(r"X\((k\w+), ", full) == ["kFloat16", "kBFloat16"]
    assert re.findall(r"X\((k\w+), ", minimal) == ["kBFloat16"]
    assert '"float16,bfloat16"' in full and '"bfloat16"' in minimal


def test_no_hand_list_of_buckets_left_in_the_attention_sources():
    """The buckets are written once (the table): common.h, attention.h and the dispatch in attention_api.cu read
    the generated header instead of a list of their own."""
    for rel in ("common/common.h", "attention/attention.h", "attention/attention_api.cu", "common/dispatch.cuh"):
        text = _read(rel)
        assert not re.search(r"\b32, 64, 80, 96, 128\b|case (32|64|80|96|128):", text), rel
    assert '#include "common/kernel_table.h"' in _read("common/common.h")
    assert "FASTVIT_BUILD_ATTENTION_HEAD_DIMS(" in _read("attention/attention_api.cu")
    assert "FASTVIT_BUILD_HALF_TYPES(" in _read("common/dispatch.cuh")


def test_families_are_the_folders_of_csrc():
    folders = {d for d in os.listdir(build.CSRC) if os.path.isdir(os.path.join(build.CSRC, d))}
    assert folders - {"common"} == {f.name for f in table.FAMILIES}
    assert table.no_spill_families() == ("attention", "layer_norm")
    # beyond the families' rule: linear_glu's hand-written dual GEMM, in every dtype
    assert table.no_spill_files() == {"linear/linear_glu_fwd_bf16.cu", "linear/linear_glu_fwd_fp16.cu"}
    assert {k.family for k in table.KINDS} <= {f.name for f in table.FAMILIES}
