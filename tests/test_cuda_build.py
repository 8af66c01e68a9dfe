"""The CUDA C++ backend without a GPU: sources, the nvcc compile check, the JIT build, schemas and fakes.

What needs a GPU (numerics, speed, the sanitizer) is in tests/test_cuda_ops.py (marked ``gpu``) and
benchmarks/gpu_suite.sh.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from fastvit import cuda_check
from fastvit.runtime import cuda as _cuda
from fastvit.runtime import cuda_build as build
from fastvit.runtime import kernel_table

NVCC = build.find_nvcc()
needs_toolchain = pytest.mark.skipif(
    NVCC is None or build.cutlass_include() is None or not os.path.isdir(build.CSRC),
    reason="needs nvcc, the nvidia-cutlass headers and a source checkout (csrc/)",
)
#: The op families: the kernel table's, which tests/test_kernel_table.py checks against the folders of csrc/.
FAMILIES = tuple(f.name for f in kernel_table.FAMILIES)
#: The torch side of csrc/: the Python module, one binding file per family (next to its kernels: its schemas and its
#: CUDA kernels) and the binding helpers they share. Everything else under csrc/ is a kernel file and must stay
#: torch-free.
BINDING_SOURCES = ("fastvit_module.cpp", *(f"{family}_binding.cpp" for family in FAMILIES))
BINDING_HEADERS = (os.path.join("common", "binding.h"),)


# ------------------------------------------------------------------------------------------- sources
def test_minimal_build_keeps_one_instantiation_per_template():
    full = [os.path.basename(p) for p in build.sources(minimal=False)]
    minimal = [os.path.basename(p) for p in build.sources(minimal=True)]
    for name in BINDING_SOURCES:
        assert name in minimal and name in full, name
    assert "attention_fwd_hdim64_bf16.cu" in minimal and "attention_bwd_hdim64_bf16.cu" in minimal
    for name in ("attention_fwd_hdim80_bf16.cu", "attention_fwd_hdim64_fp16.cu", "attention_bwd_hdim128_bf16.cu"):
        assert name in full and name not in minimal
    assert not [n for n in minimal if "_fp16" in n or re.search(r"_hdim(?!64)\d+", n)]
    for family in FAMILIES:
        assert any(p.split(os.sep)[-2] == family for p in build.sources(minimal=True, kernels_only=True)), family
    assert not [p for p in build.sources(kernels_only=True) if p.endswith(".cpp")]


def test_kernel_files_are_torch_free():
    pattern = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|pybind11)/', re.M)
    offenders = []
    for dirpath, _, files in os.walk(build.CSRC):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.relpath(path, build.CSRC) not in BINDING_HEADERS and name.endswith((".cu", ".cuh", ".h")):
                with open(path) as f:
                    if pattern.search(f.read()):
                        offenders.append(path)
    assert offenders == []


def test_one_binding_file_per_family_declares_and_implements_its_ops():
    """Every .cpp under csrc/ is a binding file: the module at the top, each family's binding next to its kernels.
    A family's binding declares the schemas of its ops (one TORCH_LIBRARY_FRAGMENT(fastvit)) and implements exactly
    those (one TORCH_LIBRARY_IMPL(fastvit, CUDA)); no op is declared twice, nothing claims the whole namespace
    (TORCH_LIBRARY), and the Python module is defined once."""
    cpp = sorted(os.path.relpath(p, build.CSRC) for p in build.sources(minimal=False) if p.endswith(".cpp"))
    assert cpp == sorted(
        ["fastvit_module.cpp", *(os.path.join(family, f"{family}_binding.cpp") for family in FAMILIES)]
    )

    def read(rel):
        with open(os.path.join(build.CSRC, rel)) as f:
            return f.read()

    library = re.compile(r"^TORCH_LIBRARY\(", re.M)
    fragment = re.compile(r"^TORCH_LIBRARY_FRAGMENT\(fastvit, m\) \{$", re.M)
    impl = re.compile(r"^TORCH_LIBRARY_IMPL\(fastvit, CUDA,", re.M)
    assert [rel for rel in cpp if library.search(read(rel))] == []
    assert [rel for rel in cpp if "PYBIND11_MODULE(" in read(rel)] == ["fastvit_module.cpp"]
    assert not fragment.search(read("fastvit_module.cpp")) and not impl.search(read("fastvit_module.cpp"))
    defined = []
    for family in FAMILIES:
        text = read(os.path.join(family, f"{family}_binding.cpp"))
        assert len(fragment.findall(text)) == 1 and len(impl.findall(text)) == 1, family
        ops = re.findall(r'm\.def\("(\w+)\(', text)
        assert ops and all(op.endswith("_cuda") for op in ops), family
        assert sorted(ops) == sorted(re.findall(r'm\.impl\("(\w+)"', text)), family
        defined += ops
    assert len(defined) == len(set(defined))


def test_gencode_flags():
    assert build.gencode_flags("8.0;9.0a") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    with pytest.raises(ValueError, match="FASTVIT_CUDA_ARCHS"):
        build.gencode_flags(" ; ")


# ------------------------------------------------------------------------------------------- ptxas parsing
_LOG = """\
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 368 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_90a'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 356 bytes cmem[0]
"""


def test_parse_ptxas_reads_registers_spills_and_smem():
    a, b = cuda_check.parse_ptxas(_LOG, "csrc/attention/x.cu")
    assert (a.arch, a.registers, a.spill_stores, a.spill_loads, a.stack, a.smem) == ("sm_80", 255, 8, 12, 16, 4096)
    assert (b.arch, b.registers, b.spills, b.smem) == ("sm_90a", 40, 0, 0)
    assert a.kernel.startswith("kernel") or a.kernel == "_Z6kernelPf"


def test_spills_fail_only_in_attention_and_layer_norm():
    spilled = cuda_check.parse_ptxas(_LOG, "csrc/attention/x.cu")[0]
    assert cuda_check._must_not_spill(spilled)
    assert cuda_check._must_not_spill(cuda_check.KernelInfo("csrc/layer_norm/y.cu", "sm_80", "k"))
    assert not cuda_check._must_not_spill(cuda_check.KernelInfo("csrc/linear/z.cu", "sm_80", "k"))
    # and linear_glu's hand-written dual GEMM (a no_spill kind of the kernel table), not the rest of its family
    for name in ("linear_glu_fwd_bf16.cu", "linear_glu_fwd_fp16.cu"):
        assert cuda_check._must_not_spill(cuda_check.KernelInfo(f"csrc/linear/{name}", "sm_90a", "k"))
    assert not cuda_check._must_not_spill(cuda_check.KernelInfo("csrc/linear/linear_bwd_bf16.cu", "sm_80", "k"))


@needs_toolchain
def test_compile_check_flags_a_torch_include(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("#include <torch/extension.h>\n__global__ void k() {}\n")
    result = cuda_check.compile_file(str(bad), "8.0", True, NVCC)
    assert not result.ok and "torch-free" in result.log


# ------------------------------------------------------------------------------------------- nvcc
@needs_toolchain
def test_every_kernel_file_compiles_for_sm80_and_sm90a_without_attention_or_layer_norm_spills():
    """the CUDA compile check of docs/ARCHITECTURE.md, one instantiation per kernel template (the minimal build)."""
    results, failures = cuda_check.run("8.0;9.0a", minimal=True)
    assert failures == []
    assert results and all(r.ok for r in results)
    for family in FAMILIES:
        kernels = [k for r in results for k in r.kernels if f"/{family}/" in "/" + r.file.replace(os.sep, "/")]
        assert {k.arch for k in kernels} == {"sm_80", "sm_90a"}, family
        assert all(0 < k.registers <= 255 for k in kernels), family
    # linear_glu: the dual-GEMM forward and the gated backward prologue (one per activation), spill-free everywhere
    glu = [k for r in results for k in r.kernels if "glu_fwd_kernel" in k.kernel or "glu_bwd_prologue" in k.kernel]
    assert len(glu) == 2 * (1 + 4) and all(k.spills == 0 and k.stack == 0 for k in glu), glu


# ------------------------------------------------------------------------------------------- CuTe layouts
@needs_toolchain
def test_attention_layout_algebra_on_the_host(tmp_path):
    """tests/cuda/attention_layouts.cu enumerates every thread's CuTe partitions of the attention kernels' tiles on
    the CPU (fragment re-layouts, row/column views, quad ownership, transposed shared-memory views)."""
    import subprocess

    src = os.path.join(os.path.dirname(__file__), "cuda", "attention_layouts.cu")
    exe = str(tmp_path / "attention_layouts")
    cmd = [
        NVCC,
        build.CHECK_STD,
        "-O1",
        "--expt-relaxed-constexpr",
        "-x",
        "cu",
        *[f"-I{d}" for d in build.include_dirs()],
        src,
        "-o",
        exe,
    ]
    compiled = subprocess.run(cmd, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True)
    assert run.returncode == 0 and "ALL OK" in run.stdout and "FAIL" not in run.stdout, run.stdout
    # shared memory per CTA within the targets' limits: forward <= 99 KB (two CTAs per SM), backward <= sm_80's 163 KB
    sizes = {
        line.split(":")[0]: [int(x.split(":")[1]) for x in line.split()[2:]]
        for line in run.stdout.splitlines()
        if line.startswith(("fwd smem", "dkdv smem", "dq smem"))
    }
    assert set(sizes) == {"fwd smem", "dkdv smem", "dq smem"} and all(len(v) == 5 for v in sizes.values())
    assert max(sizes["fwd smem"]) <= 99 * 1024
    assert max(sizes["dkdv smem"] + sizes["dq smem"]) <= 163 * 1024


@needs_toolchain
def test_attention_rope_helpers_on_the_host(tmp_path):
    """tests/cuda/attention_rope.cu runs the rotary helpers of the attention kernels (q / k rotated in shared memory,
    dq / dk rotated back as they are stored) thread by thread on the CPU against the rotation written out directly:
    both column layouts, head dims short of their bucket (72, 104), prefix tokens, tails, untouched padding."""
    import subprocess

    src = os.path.join(os.path.dirname(__file__), "cuda", "attention_rope.cu")
    exe = str(tmp_path / "attention_rope")
    cmd = [
        NVCC,
        build.CHECK_STD,
        "-O1",
        "--expt-relaxed-constexpr",
        "-x",
        "cu",
        *[f"-I{d}" for d in build.include_dirs()],
        src,
        "-o",
        exe,
    ]
    compiled = subprocess.run(cmd, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True)
    assert run.returncode == 0 and "ALL OK" in run.stdout and "FAIL" not in run.stdout, run.stdout


@needs_toolchain
@pytest.mark.parametrize("minimal", [False, True], ids=["full", "minimal"])
def test_build_info_reports_the_kernel_facts_on_the_host(tmp_path, minimal):
    """build_info()'s kernel facts (what Python reads instead of copying them), from the torch-free sources alone:
    the bucket table, the head-dim rule, the backward's shared memory per compiled bucket, the GEMM alignment."""
    import subprocess

    src = os.path.join(os.path.dirname(__file__), "cuda", "build_info.cu")
    exe = str(tmp_path / "build_info")
    files = [
        src,
        os.path.join(build.CSRC, "common", "build_info.cu"),
        os.path.join(build.CSRC, "attention", "attention_smem.cu"),
    ]
    cmd = [
        NVCC,
        build.CHECK_STD,
        "-O1",
        "--expt-relaxed-constexpr",
        *build.defines(minimal),
        *[f"-I{d}" for d in build.include_dirs()],
        *files,
        "-o",
        exe,
    ]
    compiled = subprocess.run(cmd, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    info = dict(line.split("=", 1) for line in run.stdout.splitlines())
    assert info["minimal"] == str(int(minimal))
    assert info["attention_head_dim_bucket_bounds"] == "32,64,80,96,128"
    assert (info["attention_head_dim_multiple"], info["attention_max_head_dim"]) == ("8", "128")
    assert info["gemm_alignment"] == "8"
    assert info["attention_varlen"] == "1"  # packed (cu_seqlens) attention ops are compiled
    assert info["attention_rope"] == "1"  # the attention kernels apply rotary embeddings
    compiled_buckets = [int(b) for b in info["attention_head_dim_buckets"].split(",")]
    assert compiled_buckets == ([64] if minimal else [32, 64, 80, 96, 128])
    smem = {int(b): int(n) for b, n in (pair.split(":") for pair in info["attention_bwd_smem_bytes"].split(","))}
    assert list(smem) == compiled_buckets
    assert all(0 < n <= 163 * 1024 for n in smem.values())  # every backward fits sm_80's 163 KB per block
    if not minimal:  # buckets 96 and 128 need more than sm_86 / sm_89's 99 KB: dispatch declines them there
        assert [b for b, n in smem.items() if n > 99 * 1024] == [96, 128]


# ------------------------------------------------------------------------------------------- JIT policy
def test_jit_build_only_on_request(monkeypatch):
    """Importing fastvit never compiles csrc/ behind the user's back: only FASTVIT_CUDA_JIT=1 (or load(jit=True),
    python -m fastvit.build) asks for a build, whatever the machine has."""
    monkeypatch.setenv("FASTVIT_CUDA_JIT", "0")
    assert _cuda._jit_requested() is False
    monkeypatch.setenv("FASTVIT_CUDA_JIT", "1")
    assert _cuda._jit_requested() is True
    monkeypatch.delenv("FASTVIT_CUDA_JIT")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, nvcc and CUTLASS: still no build
    assert _cuda._jit_requested() is False


def test_not_built_reason_suggests_only_what_can_work_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = _cuda._not_built_reason()
    assert "no CUDA device" in reason and "FASTVIT_CUDA_JIT" not in reason and "fastvit.build" not in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda, "missing_for_build", lambda: ["nvcc (the CUDA toolkit) is not found"])
    assert "cannot be built here: nvcc" in _cuda._not_built_reason()
    monkeypatch.setattr(_cuda, "missing_for_build", lambda: [])
    assert "python -m fastvit.build" in _cuda._not_built_reason()


def test_failed_requested_jit_build_leaves_the_backend_unavailable_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(_cuda, "_EXT", None)
    monkeypatch.setattr(_cuda, "_LOAD_ERROR", "not loaded yet")
    monkeypatch.setenv("FASTVIT_CUDA_JIT", "1")
    monkeypatch.setenv("FASTVIT_BUILD_LOG", str(tmp_path / "build.log"))
    monkeypatch.setattr(_cuda, "local_arch", lambda: "9.0a")

    calls = []

    def broken_build(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("nvcc: error: something went wrong")

    monkeypatch.setattr(_cuda, "jit_build", broken_build)
    if _cuda.importlib.util.find_spec("fastvit._C") is not None:
        pytest.skip("fastvit._C is built here, so no JIT build is attempted")
    with pytest.warns(RuntimeWarning, match="something went wrong"):
        assert _cuda.load() is None
    assert calls == [{"archs": "9.0a", "log_path": str(tmp_path / "build.log")}]  # for this GPU, logged
    assert "just-in-time build of csrc/ failed" in _cuda.load_error()
    assert "something went wrong" in _cuda.load_error() and "build.log" in _cuda.load_error()
    with pytest.raises(RuntimeError, match="something went wrong"):  # an explicit request surfaces the error
        _cuda.load(jit=True)
    monkeypatch.delenv("FASTVIT_CUDA_JIT")
    assert _cuda.load() is None and len(calls) == 2  # not requested: no build


#: The kernel facts a full build reports (build_info(), as tests/cuda/build_info.cu checks them on the host): the
#: dK/dV kernel of bucket 96 needs 107,520 B of shared memory per block, more than sm_86 / sm_89 allow.
FULL_BUILD_FACTS = {
    "attention_head_dim_bucket_bounds": "32,64,80,96,128",
    "attention_head_dim_buckets": "32, 64, 80, 96, 128",
    "attention_bwd_smem_bytes": "32:41984,64:74752,80:91136,96:107520,128:104960",
    "attention_head_dim_multiple": 8,
    "attention_max_head_dim": 128,
    "gemm_alignment": 8,
}


def test_attention_backward_shared_memory_gates_head_dims_above_80(monkeypatch):
    """sm_86 / sm_89 allow 99 KB of shared memory per block, less than the dK/dV kernel of the 96 / 128 buckets needs:
    the backend must decline those head dims there (dispatch then falls back) instead of failing at launch."""
    from fastvit.backends import Call
    from fastvit.families import attention

    class Props:
        shared_memory_per_block_optin = 101_376  # an RTX 4090 (sm_89)

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    check = attention.cuda_check_for(FULL_BUILD_FACTS)
    call = Call(device=torch.device("cuda", 0), num_tokens=197, num_kv_tokens=197)
    assert check(call._replace(head_dim=80)) == []
    for d in (88, 96, 128):
        (reason,) = check(call._replace(head_dim=d))
        assert f"head_dim {d}" in reason and "101376 B" in reason
    Props.shared_memory_per_block_optin = 232_448  # an H100 (sm_90)
    assert check(call._replace(head_dim=128)) == []


def test_linear_check_declines_empty_and_unaligned_features():
    from fastvit.families import linear

    check = linear.cuda_check_for(FULL_BUILD_FACTS)
    assert check({"in_features": 768, "out_features": 3072}) == []
    (reason,) = check({"in_features": 0, "out_features": 64})
    assert "in_features = 0" in reason
    (reason,) = check({"in_features": 64, "out_features": 100})
    assert "out_features = 100 is not a multiple of 8" in reason


def test_a_recorded_build_is_loaded_only_while_it_matches(monkeypatch, tmp_path):
    """python -m fastvit.build records where it put the extension; import loads that build only for the same torch
    and the same csrc/ (else the backend keeps saying it is not built)."""
    import json

    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    assert _cuda._load_recorded_build() is None  # no record
    fake = tmp_path / "fastvit_C_minimal.so"
    fake.write_bytes(b"not an ELF file")
    record = {
        "path": str(fake),
        "name": "fastvit_C_minimal",
        "torch": torch.__version__,
        "sources": _cuda._sources_digest(),
    }
    (tmp_path / "cuda-build.json").write_text(json.dumps(record))
    assert _cuda._load_recorded_build() is None  # matches, but the file does not load: no crash, no module
    for key, value in (("torch", "0.0.1"), ("sources", "0" * 16), ("path", str(tmp_path / "missing.so"))):
        (tmp_path / "cuda-build.json").write_text(json.dumps({**record, key: value}))
        assert _cuda._load_recorded_build() is None, key
    (tmp_path / "cuda-build.json").write_text("{broken")
    assert _cuda._load_recorded_build() is None
