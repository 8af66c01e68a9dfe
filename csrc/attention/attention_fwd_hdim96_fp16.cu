// Instantiation of the attention fwd launcher for head-dim bucket 96, fp16 (one TU per instantiation to
// keep compile times parallel and bounded; see attention_launch.cuh).
#include "attention/attention_fwd.cuh"

namespace fastvit {
template cudaError_t run_attention_fwd_bucket<cutlass::half_t, 96, false>(const AttentionFwdParams&, cudaStream_t);
}  // namespace fastvit
