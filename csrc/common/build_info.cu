// Compiled by nvcc so that __CUDA_ARCH_LIST__ (the -gencode targets of this build) is known.
#include "common/build_info.h"

#include <cutlass/version.h>

#include <string>

#include "attention/attention.h"
#include "common/common.h"
#include "linear/linear.h"
#include "patch_embed/patch_embed.h"

#define FASTVIT_STR2(...) #__VA_ARGS__
#define FASTVIT_STR(...) FASTVIT_STR2(__VA_ARGS__)

namespace fastvit {

namespace {

constexpr int kCompiledAttentionBuckets[] = {FASTVIT_BUILD_ATTENTION_HEADDIMS};

static_assert(kLinearAlignment == kPatchEmbedAlignment, "one gemm_alignment serves linear and patch_embed");

std::string join(const int* values, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::to_string(values[i]);
  return s;
}

std::string bwd_smem_bytes() {
  std::string s;
  for (int bucket : kCompiledAttentionBuckets)
    s += (s.empty() ? "" : ",") + std::to_string(bucket) + ":" + std::to_string(attention_bwd_smem_bytes(bucket));
  return s;
}

}  // namespace

BuildInfo build_info() {
  // Formatted once; the pointers stay valid for the life of the process.
  static const std::string bucket_bounds = join(kAttentionHeadDimBuckets, kAttentionNumHeadDimBuckets);
  static const std::string bwd_smem = bwd_smem_bytes();
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
  info.attention_head_dim_bucket_bounds = bucket_bounds.c_str();
  info.attention_head_dim_multiple = kAttentionHeadDimMultiple;
  info.attention_max_head_dim = kAttentionMaxHeadDim;
  info.attention_bwd_smem_bytes = bwd_smem.c_str();
  info.attention_varlen = 1;
  info.attention_rope = 1;
  info.gemm_alignment = kLinearAlignment;
  return info;
}

}  // namespace fastvit
