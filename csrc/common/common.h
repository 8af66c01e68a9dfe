// fastvit CUDA C++ kernels: what every torch-free kernel file shares.
//
// Rules (docs/ARCHITECTURE.md, "Layers of an op"):
//   * a kernel file (*.cu / *.cuh under csrc/<family>/) never includes a torch header; the family's binding
//     (csrc/<family>/<family>_binding.cpp) fills one plain params struct per op and calls a plain launcher
//     `cudaError_t run_<op>(const <Op>Params&, cudaStream_t)` declared in csrc/<family>/<family>.h;
//   * launchers return the first CUDA error (cudaGetLastError after the launch) instead of throwing;
//   * strides are in elements, never bytes; sizes are int64_t at the interface.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastvit {

// Element type of the floating-point tensors of one call (integer index tensors are always int64).
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
  }
  return "unknown";
}

}  // namespace fastvit

// What this build instantiates: csrc/common/kernel_table.h, generated from the kernel table
// (fastvit/runtime/kernel_table.py). A full build (the default) compiles every (dtype, head-dim bucket);
// FASTVIT_MINIMAL_BUILD (CI, which has no GPU) compiles one instantiation of each kernel template so that the whole
// extension builds and imports in minutes: bf16, head-dim bucket 64. It defines FASTVIT_BUILD_HALF_DTYPES and
// FASTVIT_BUILD_ATTENTION_HEADDIMS (the lists build_info() reports) and the X-macros FASTVIT_BUILD_HALF_TYPES /
// FASTVIT_BUILD_ATTENTION_HEAD_DIMS the switches expand; the binding refuses anything else with a clear error.
#include "common/kernel_table.h"

// Return the CUDA error of the last launch (if any) from a launcher.
#define FASTVIT_RETURN_LAUNCH_ERROR()                     \
  do {                                                    \
    cudaError_t fastvit_err_ = cudaGetLastError();        \
    if (fastvit_err_ != cudaSuccess) return fastvit_err_; \
  } while (0)
