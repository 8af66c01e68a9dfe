// Declarations of the per-(dtype, head-dim bucket) attention launchers. Their definitions live in
// attention_fwd.cuh / attention_bwd.cuh and are explicitly instantiated once each in
// attention_{fwd,bwd}[_varlen][_rope]_hdim<D>_{fp16,bf16}.cu (dense / packed, without / with rotary embeddings),
// files generated from the kernel table (fastvit/runtime/kernel_table.py); attention_api.cu sees only these
// declarations, so every instantiation is compiled exactly once (in its own translation unit, in parallel).
#pragma once

#include <cutlass/numeric_types.h>

#include "attention/attention.h"

namespace fastvit {

// Element = cutlass::half_t | cutlass::bfloat16_t; kHeadDim = bucket (kAttentionHeadDimBuckets) >= params.head_dim;
// kVarlen = params.cu_seqlens != nullptr (packed variable-length sequences: the *_varlen_* files); kRope =
// params.rope.table != nullptr (rotary position embeddings of q and k: the *_rope_* files).
template <typename Element, int kHeadDim, bool kVarlen, bool kRope>
cudaError_t run_attention_fwd_bucket(const AttentionFwdParams& params, cudaStream_t stream);

template <typename Element, int kHeadDim, bool kVarlen, bool kRope>
cudaError_t run_attention_bwd_bucket(const AttentionBwdParams& params, cudaStream_t stream);

}  // namespace fastvit
