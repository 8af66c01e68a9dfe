// fastvit attention: run-time dispatch from AttentionFwdParams / AttentionBwdParams to the compiled
// (dtype, head-dim bucket) launchers. No kernel code here: the launchers are explicitly instantiated in
// attention_{fwd,bwd}[_varlen][_rope]_hdim<D>_{fp16,bf16}.cu, generated from the kernel table
// (fastvit/runtime/kernel_table.py; attention_launch.cuh declares them).
#include <cstdint>
#include <initializer_list>

#include "attention/attention.h"
#include "attention/attention_launch.cuh"
#include "common/dispatch.cuh"

// FASTVIT_ATTN_HEADDIM_SWITCH(head_dim, kHeadDim, ...): kHeadDim = the bucket (the smallest of
// kAttentionHeadDimBuckets that is >= head_dim), one case per bucket this build compiled
// (FASTVIT_BUILD_ATTENTION_HEAD_DIMS, common/kernel_table.h); head dims whose bucket this build did not compile
// return cudaErrorNotSupported from the enclosing function. A minimal build (FASTVIT_MINIMAL_BUILD) compiles bucket 64
// only (head dims 40..64), so it references no other instantiation and links with the minimal set of files.
#define FASTVIT_ATTN_HEADDIM_CASE(BUCKET, CONST_NAME, ...) \
  case BUCKET: {                                           \
    constexpr int CONST_NAME = BUCKET;                     \
    return __VA_ARGS__();                                  \
  }
#define FASTVIT_ATTN_HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...)                               \
  [&]() -> cudaError_t {                                                                    \
    switch (::fastvit::attention_head_dim_bucket(HEADDIM)) {                                \
      FASTVIT_BUILD_ATTENTION_HEAD_DIMS(FASTVIT_ATTN_HEADDIM_CASE, CONST_NAME, __VA_ARGS__) \
      default: return cudaErrorNotSupported;                                                \
    }                                                                                       \
  }()

namespace fastvit {

int attention_head_dim_bucket(int head_dim) {
  if (head_dim < kAttentionHeadDimMultiple || head_dim > kAttentionMaxHeadDim ||
      head_dim % kAttentionHeadDimMultiple != 0)
    return 0;
  for (int bucket : kAttentionHeadDimBuckets)
    if (head_dim <= bucket) return bucket;
  return 0;
}

bool attention_head_dim_supported(int head_dim) {
  const int bucket = attention_head_dim_bucket(head_dim);
  for (int compiled : {FASTVIT_BUILD_ATTENTION_HEADDIMS})
    if (bucket == compiled) return true;
  return false;
}

bool attention_dtype_supported(DType dtype) {
#define FASTVIT_ATTN_DTYPE_COMPILED(KIND, TYPE, DTYPE) \
  if ((DTYPE) == DType::KIND) return true;
  FASTVIT_BUILD_HALF_TYPES(FASTVIT_ATTN_DTYPE_COMPILED, dtype)
#undef FASTVIT_ATTN_DTYPE_COMPILED
  return false;
}

namespace {

constexpr uintptr_t kAlignBytes = kAttentionAlignment * 2;  // 16-byte vectors of 16-bit elements

bool aligned_ptr(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kAlignBytes == 0; }

// The stride of a dim of size 1 is only ever multiplied by index 0, so it may be anything (the binding's
// vector_aligned() accepts such tensors as they are, e.g. a channels-last (B, 1, N, D) whose head stride is 1).
// `p` gives batch and heads; `seqlen` is the tensor's row count (seqlen_q or seqlen_k). Packed sequences have no
// batch dim (its stride is never read) and T = total_tokens rows.
template <class Params>
bool aligned_strides(const Params& p, int64_t batch_stride, int64_t head_stride, int64_t row_stride, int64_t seqlen) {
  const bool packed = p.cu_seqlens != nullptr;
  const int64_t rows = packed ? p.total_tokens : seqlen;
  return (packed || p.batch <= 1 || batch_stride % kAttentionAlignment == 0) &&
         (p.heads <= 1 || head_stride % kAttentionAlignment == 0) &&
         (rows <= 1 || row_stride % kAttentionAlignment == 0);
}

// Pointers and strides of q, k, v, o, which AttentionFwdParams and AttentionBwdParams share.
template <class Params>
bool aligned_qkvo(const Params& p) {
  return aligned_ptr(p.q) && aligned_ptr(p.k) && aligned_ptr(p.v) && aligned_ptr(p.o) &&
         aligned_strides(p, p.q_batch_stride, p.q_head_stride, p.q_row_stride, p.seqlen_q) &&
         aligned_strides(p, p.k_batch_stride, p.k_head_stride, p.k_row_stride, p.seqlen_k) &&
         aligned_strides(p, p.v_batch_stride, p.v_head_stride, p.v_row_stride, p.seqlen_k) &&
         aligned_strides(p, p.o_batch_stride, p.o_head_stride, p.o_row_stride, p.seqlen_q);
}

// The kernels index tokens with 32-bit ints.
constexpr int64_t kMaxSeqlen = (int64_t{1} << 31) - 256;

// Sizes the kernels can index: every seqlen (packed: also T) below kMaxSeqlen; packed sequences are self-attention
// (one cu_seqlens for queries and keys), so seqlen_q = seqlen_k = max_seqlen.
template <class Params>
bool valid_sizes(const Params& p) {
  if (p.seqlen_q > kMaxSeqlen || p.seqlen_k > kMaxSeqlen) return false;
  return p.cu_seqlens == nullptr || (p.seqlen_q == p.seqlen_k && p.total_tokens >= 0 && p.total_tokens <= kMaxSeqlen);
}

// The rotary table (AttentionRopeParams): absent, or 16-byte aligned with float4-aligned strides (its rows and prefix
// are checked by valid_rope).
bool aligned_rope(const AttentionRopeParams& rope) {
  return rope.table == nullptr ||
         (reinterpret_cast<uintptr_t>(rope.table) % 16 == 0 && rope.head_stride % 4 == 0 && rope.row_stride % 4 == 0);
}
bool valid_rope(const AttentionRopeParams& rope) {
  return rope.table == nullptr || (rope.rows >= 0 && rope.num_prefix >= 0);
}

// No row to compute: no batch (sequence) or head, or -- packed -- no token.
template <class Params>
bool empty_batch(const Params& p) {
  return p.batch <= 0 || p.heads <= 0 || (p.cu_seqlens != nullptr && p.total_tokens <= 0);
}

}  // namespace

size_t attention_bwd_workspace_bytes(const AttentionBwdParams& params) {
  if (empty_batch(params) || params.seqlen_q <= 0) return 0;
  const size_t rows = params.cu_seqlens != nullptr
                          ? static_cast<size_t>(params.total_tokens)
                          : static_cast<size_t>(params.batch) * static_cast<size_t>(params.seqlen_q);
  const size_t bytes = rows * static_cast<size_t>(params.heads) * sizeof(float);
  return (bytes + 255) / 256 * 256;
}

cudaError_t run_attention_fwd(const AttentionFwdParams& params, cudaStream_t stream) {
  if (empty_batch(params) || params.seqlen_q <= 0 || params.seqlen_k <= 0) return cudaSuccess;
  if (!attention_dtype_supported(params.dtype) || !attention_head_dim_supported(params.head_dim))
    return cudaErrorNotSupported;
  if (!valid_sizes(params) || !valid_rope(params.rope)) return cudaErrorInvalidValue;
  if (params.lse == nullptr || !aligned_qkvo(params) || !aligned_rope(params.rope)) return cudaErrorMisalignedAddress;
  return FASTVIT_HALF_SWITCH(params.dtype, Element, [&] {
    return FASTVIT_ATTN_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      const bool varlen = params.cu_seqlens != nullptr, rope = params.rope.table != nullptr;
      if (rope)
        return varlen ? run_attention_fwd_bucket<Element, kHeadDim, true, true>(params, stream)
                      : run_attention_fwd_bucket<Element, kHeadDim, false, true>(params, stream);
      return varlen ? run_attention_fwd_bucket<Element, kHeadDim, true, false>(params, stream)
                    : run_attention_fwd_bucket<Element, kHeadDim, false, false>(params, stream);
    });
  });
}

cudaError_t run_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  if (empty_batch(params) || (params.seqlen_q <= 0 && params.seqlen_k <= 0)) return cudaSuccess;
  if (!attention_dtype_supported(params.dtype) || !attention_head_dim_supported(params.head_dim))
    return cudaErrorNotSupported;
  if (!valid_sizes(params) || !valid_rope(params.rope)) return cudaErrorInvalidValue;
  if (params.seqlen_q > 0 && (params.workspace == nullptr || params.lse == nullptr)) return cudaErrorInvalidValue;
  if (!aligned_qkvo(params) || !aligned_rope(params.rope) || !aligned_ptr(params.dout) || !aligned_ptr(params.dq) ||
      !aligned_ptr(params.dk) || !aligned_ptr(params.dv) || !aligned_ptr(params.workspace) ||
      !aligned_strides(params, params.do_batch_stride, params.do_head_stride, params.do_row_stride, params.seqlen_q) ||
      !aligned_strides(params, params.dq_batch_stride, params.dq_head_stride, params.dq_row_stride, params.seqlen_q) ||
      !aligned_strides(params, params.dk_batch_stride, params.dk_head_stride, params.dk_row_stride, params.seqlen_k) ||
      !aligned_strides(params, params.dv_batch_stride, params.dv_head_stride, params.dv_row_stride, params.seqlen_k))
    return cudaErrorMisalignedAddress;
  return FASTVIT_HALF_SWITCH(params.dtype, Element, [&] {
    return FASTVIT_ATTN_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      const bool varlen = params.cu_seqlens != nullptr, rope = params.rope.table != nullptr;
      if (rope)
        return varlen ? run_attention_bwd_bucket<Element, kHeadDim, true, true>(params, stream)
                      : run_attention_bwd_bucket<Element, kHeadDim, false, true>(params, stream);
      return varlen ? run_attention_bwd_bucket<Element, kHeadDim, true, false>(params, stream)
                    : run_attention_bwd_bucket<Element, kHeadDim, false, false>(params, stream);
    });
  });
}

}  // namespace fastvit
