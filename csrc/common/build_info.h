// What this build of fastvit._C compiled, reported by the binding's build_info() (torch-free).
#pragma once

namespace fastvit {

struct BuildInfo {
  const char* archs;              // nvcc's __CUDA_ARCH_LIST__ of the kernel files, e.g. "800,900"
  int cuda_runtime_version;       // CUDART_VERSION the kernels were compiled against, e.g. 13000
  int cutlass_major, cutlass_minor, cutlass_patch;
  bool minimal;                   // FASTVIT_MINIMAL_BUILD: one instantiation per kernel template
  const char* half_dtypes;        // dtypes of the tensor-core ops (attention, linear, patch_embed), comma-separated
  const char* attention_head_dim_buckets;  // e.g. "32,64,80,96,128"
};

BuildInfo build_info();

}  // namespace fastvit
