// Instantiation of the attention bwd launcher for packed variable-length sequences (cu_seqlens), head-dim
// bucket 80, bf16 (its own TU, next to the dense attention_bwd_hdim80_bf16.cu; see attention_launch.cuh).
#include "attention/attention_bwd.cuh"

namespace fastvit {
template cudaError_t run_attention_bwd_bucket<cutlass::bfloat16_t, 80, true>(const AttentionBwdParams&, cudaStream_t);
}  // namespace fastvit
