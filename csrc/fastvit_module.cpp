// fastvit._C, the Python module: build_info() and nothing else. The ops are not here: importing the module runs the
// static registrations of each csrc/<family>/<family>_binding.cpp (its schemas, a TORCH_LIBRARY_FRAGMENT(fastvit),
// and its CUDA kernels), after which they are torch.ops.fastvit.*_cuda.
//
// Its own file because it is the only translation unit that needs pybind11 (torch/extension.h, the heaviest of the
// torch headers): the binding files include only torch/library.h and ATen.
#include <torch/extension.h>

#include <string>

#include "common/build_info.h"

namespace {

// Keys, types and meanings: csrc/common/build_info.h.
pybind11::dict build_info() {
  const fastvit::BuildInfo info = fastvit::build_info();
  pybind11::dict d;
  d["archs"] = std::string(info.archs);
  d["cuda_runtime_version"] = info.cuda_runtime_version;
  d["cutlass_version"] = std::to_string(info.cutlass_major) + "." + std::to_string(info.cutlass_minor) + "." +
                         std::to_string(info.cutlass_patch);
  d["minimal"] = info.minimal;
  d["half_dtypes"] = std::string(info.half_dtypes);
  d["attention_head_dim_buckets"] = std::string(info.attention_head_dim_buckets);
  d["attention_head_dim_bucket_bounds"] = std::string(info.attention_head_dim_bucket_bounds);
  d["attention_head_dim_multiple"] = info.attention_head_dim_multiple;
  d["attention_max_head_dim"] = info.attention_max_head_dim;
  d["attention_bwd_smem_bytes"] = std::string(info.attention_bwd_smem_bytes);
  d["attention_varlen"] = info.attention_varlen;
  d["attention_rope"] = info.attention_rope;
  d["gemm_alignment"] = info.gemm_alignment;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvit CUDA C++ kernels; the ops are registered under torch.ops.fastvit.*_cuda";
  m.def("build_info", &build_info,
        "What this build compiled: archs (nvcc's __CUDA_ARCH_LIST__), cuda_runtime_version, cutlass_version, "
        "minimal, half_dtypes, attention_head_dim_buckets; and the kernel facts dispatch needs: "
        "attention_head_dim_bucket_bounds, attention_head_dim_multiple, attention_max_head_dim, "
        "attention_bwd_smem_bytes, attention_varlen (packed cu_seqlens attention), attention_rope (rotary "
        "embeddings in the attention kernels), gemm_alignment");
}
