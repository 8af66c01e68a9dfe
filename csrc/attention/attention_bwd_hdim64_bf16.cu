// Instantiation of the attention bwd launcher for head-dim bucket 64, bf16 (one TU per instantiation to
// keep compile times parallel and bounded; see attention_launch.cuh).
#include "attention/attention_bwd.cuh"

namespace fastvit {
template cudaError_t run_attention_bwd_bucket<cutlass::bfloat16_t, 64, false>(const AttentionBwdParams&, cudaStream_t);
}  // namespace fastvit
