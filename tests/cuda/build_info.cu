// Prints fastvit::build_info() on the host (no GPU, no torch): compiled with csrc/common/build_info.cu and
// csrc/attention/attention_smem.cu by tests/test_cuda_build.py, which checks the kernel facts it reports.
#include <cstdio>

#include "common/build_info.h"

int main() {
  const fastvit::BuildInfo info = fastvit::build_info();
  std::printf("minimal=%d\n", int(info.minimal));
  std::printf("attention_head_dim_buckets=%s\n", info.attention_head_dim_buckets);
  std::printf("attention_head_dim_bucket_bounds=%s\n", info.attention_head_dim_bucket_bounds);
  std::printf("attention_head_dim_multiple=%d\n", info.attention_head_dim_multiple);
  std::printf("attention_max_head_dim=%d\n", info.attention_max_head_dim);
  std::printf("attention_bwd_smem_bytes=%s\n", info.attention_bwd_smem_bytes);
  std::printf("attention_varlen=%d\n", info.attention_varlen);
  std::printf("attention_rope=%d\n", info.attention_rope);
  std::printf("gemm_alignment=%d\n", info.gemm_alignment);
  return 0;
}
