// Instantiation of the attention bwd launcher for packed variable-length sequences (cu_seqlens), head-dim
// bucket 96, fp16 (its own TU, next to the dense attention_bwd_hdim96_fp16.cu; see attention_launch.cuh).
#include "attention/attention_bwd.cuh"

namespace fastvit {
template cudaError_t run_attention_bwd_bucket<cutlass::half_t, 96, true>(const AttentionBwdParams&, cudaStream_t);
}  // namespace fastvit
