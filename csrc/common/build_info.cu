// Compiled by nvcc so that __CUDA_ARCH_LIST__ (the -gencode targets of this build) is known.
#include "common/build_info.h"

#include <cutlass/version.h>

#include "common/common.h"

#define FASTVIT_STR2(...) #__VA_ARGS__
#define FASTVIT_STR(...) FASTVIT_STR2(__VA_ARGS__)

namespace fastvit {

BuildInfo build_info() {
  BuildInfo info{};
#ifdef __CUDA_ARCH_LIST__
  info.archs = FASTVIT_STR(__CUDA_ARCH_LIST__);
#else
  info.archs = "";
#endif
  info.cuda_runtime_version = CUDART_VERSION;
  info.cutlass_major = CUTLASS_MAJOR;
  info.cutlass_minor = CUTLASS_MINOR;
  info.cutlass_patch = CUTLASS_PATCH;
#ifdef FASTVIT_MINIMAL_BUILD
  info.minimal = true;
#else
  info.minimal = false;
#endif
  info.half_dtypes = FASTVIT_BUILD_HALF_DTYPES;
  info.attention_head_dim_buckets = FASTVIT_STR(FASTVIT_BUILD_ATTENTION_HEADDIMS);
  return info;
}

}  // namespace fastvit
