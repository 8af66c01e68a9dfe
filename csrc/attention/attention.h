// fastvit fused-QKV flash attention (CUDA C++): the only interface the binding sees.
//
// FlashAttention-2 (Dao, 2023): forward (Algorithm 1) and a deterministic backward (Algorithm 2, with the dQ
// accumulation moved into its own kernel so that every output element has exactly one writer: no atomics).
// Semantics are those of the Triton kernels in kernels/attention.py, element for element:
//
//   S   = (Q Kᵀ) · scale                         fp32, per (batch, head)
//   lse = log(sum_j exp(S_ij))                   natural log, fp32, (B, H, seqlen_q)
//   O   = softmax(S) V                            stored in the input dtype
//   backward: delta = rowsum(dO ∘ O), P = exp(S − lse), dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − delta),
//             dQ = dS K · scale, dK = dSᵀ Q · scale
//
// Every tensor is addressed by (batch, head, row) strides in ELEMENTS with a contiguous head dim (last stride 1),
// which serves both layouts of the binding:
//   * packed qkv (B, N, 3C), C = H·D: q = qkv + 0, k = qkv + C, v = qkv + 2C; strides (N·3C, D, 3C);
//     o (B, N, C): strides (N·C, D, C); dqkv packed like qkv;
//   * per-head (B, H, N, D) tensors with any strides (sdpa); seqlen_q may differ from seqlen_k there.
// Packed variable-length sequences (cu_seqlens != nullptr; the layout of FlashAttention's flash_attn_varlen_func): the
// tensors have no batch dim, their rows are the T = total_tokens packed tokens of all S = batch sequences, and
// sequence s is rows [cu_seqlens[s], cu_seqlens[s + 1]); it attends only to itself (q, k and v share the offsets).
// The (sequence, head) coordinate of the grid then names sequence s, whose row 0 is token cu_seqlens[s] (an offset
// of cu_seqlens[s]·row_stride; the batch strides are unused), whose length cu_seqlens[s + 1] - cu_seqlens[s]
// replaces seqlen_q = seqlen_k (which hold max_seqlen, the longest length, and only size the grid), and whose
// row statistics (lse, delta) live at (H, T): index h·T + token. Blocks past the end of their sequence exit at once.
// The offsets are trusted (fastvit.ops checks them); the kernels only clamp them into [0, T] so that malformed
// offsets can never address memory outside the tensors.
// Head dims that are not a bucket size (72, 88, 104, 16, 24) run in the next bucket (kAttentionHeadDimBuckets); the
// extra columns are zero-filled on every load and skipped on every store (memory is never padded, so the
// neighbouring heads of a packed qkv are neither read into the dot products nor overwritten).
//
// Requirements the binding must check (the kernels do not): head_dim supported (attention_head_dim_supported),
// every base pointer 16-byte aligned and every batch / head / row stride of a dim longer than 1 a multiple of
// kAttentionAlignment elements (the kernels use 16-byte cp.async; the stride of a size-1 dim is never used), dtype
// fp16 or bf16, all sizes >= 0, scale finite.
// Launchers return cudaSuccess without launching anything for empty problems (forward: batch, heads, seqlen_q
// or seqlen_k == 0; backward: batch, heads or both seqlens == 0 -- with only seqlen_k == 0 the backward writes
// dq = 0, with only seqlen_q == 0 it writes dk = dv = 0, as the Triton kernels do; packed: also total_tokens == 0),
// cudaErrorNotSupported for a dtype / head dim this build did not compile, cudaErrorMisalignedAddress when a
// pointer or stride breaks kAttentionAlignment (or the rotary table its 16-byte float4 alignment),
// cudaErrorInvalidValue for a missing lse / workspace, a seqlen or total_tokens >= 2^31 - 256, packed sequences with
// seqlen_q != seqlen_k, or negative rotary rows / prefix, cudaErrorInvalidConfiguration when B·H > 65535², and
// otherwise the first CUDA error of their launches.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/common.h"

namespace fastvit {

// Elements: every base pointer and every stride except the last (which must be 1) must be a multiple of this
// (strides of dims of size 1 excepted).
constexpr int kAttentionAlignment = 8;
// Head dims are multiples of this (one 16-byte chunk of 16-bit elements), from 8 to kAttentionMaxHeadDim.
constexpr int kAttentionHeadDimMultiple = 8;
// The head-dim buckets, ascending: a head dim runs in the first bucket >= it (attention_head_dim_bucket). Each
// bucket has its own kernel instantiations (attention_{fwd,bwd}[_varlen]_hdim<bucket>_<dtype>.cu); the list and
// which of them a build compiled (FASTVIT_BUILD_ATTENTION_HEADDIMS) come from the kernel table
// (fastvit/runtime/kernel_table.py, generated into common/kernel_table.h).
constexpr int kAttentionHeadDimBuckets[] = {FASTVIT_ATTENTION_HEAD_DIM_BUCKETS};
constexpr int kAttentionNumHeadDimBuckets = sizeof(kAttentionHeadDimBuckets) / sizeof(kAttentionHeadDimBuckets[0]);
// Largest head dim any bucket serves: the last bucket.
constexpr int kAttentionMaxHeadDim = kAttentionHeadDimBuckets[kAttentionNumHeadDimBuckets - 1];
constexpr bool attention_head_dim_buckets_valid() {
  for (int i = 0; i < kAttentionNumHeadDimBuckets; ++i)
    if (kAttentionHeadDimBuckets[i] % kAttentionHeadDimMultiple != 0 ||
        (i > 0 && kAttentionHeadDimBuckets[i] <= kAttentionHeadDimBuckets[i - 1]))
      return false;
  return true;
}
static_assert(attention_head_dim_buckets_valid(), "the buckets ascend and are multiples of kAttentionHeadDimMultiple");

// Rotary position embeddings (RoFormer, Su et al. 2021; 2D as in EVA-02 / DINOv3: timm's apply_rot_embed_cat) applied
// to q and k as the kernels load them: nothing rotated is ever written to global memory. The table is timm's
// cat([sin, cos], -1) in fp32: row r of head h starts at table + h·head_stride + r·row_stride and holds sin in columns
// [0, head_dim) and cos in [head_dim, 2·head_dim). The token at position p of its sequence (its row; packed: counted
// from cu_seqlens[s]) is rotated by row p - num_prefix when num_prefix <= p < num_prefix + rows, and left as it is
// otherwise (the prefix tokens: cls, registers). Column pairs (a, b): rotate_half pairs column j < head_dim/2 with
// j + head_dim/2 (timm's half layout), otherwise 2i with 2i + 1 (interleaved); with s_c, c_c the table's values at
// column c,
//   rotated:    y_a = x_a·c_a − x_b·s_a,     y_b = x_b·c_b + x_a·s_b          (timm's x·cos + rot(x)·sin)
//   backward:   dx_a = dy_a·c_a + dy_b·s_b,  dx_b = dy_b·c_b − dy_a·s_a       (the transpose)
// in fp32; the rotated q and k are rounded once to the element type (they are MMA operands), the gradients once as
// they are stored. The forward computes with the rotated q, k; the backward returns dq, dk with respect to the
// unrotated q, k (dv is unchanged). Requirements (the launchers check them): table 16-byte aligned, head_stride and
// row_stride multiples of 4 (float4 loads), rows >= 0, num_prefix >= 0, head_dim even (it is: a multiple of 8).
struct AttentionRopeParams {
  const float* table = nullptr;  // nullptr: no rotation (the kernels then skip every rotary step)
  int64_t head_stride = 0;       // 0 for a table shared by the heads ((N_rot, 2·D)); else (H, N_rot, 2·D)
  int64_t row_stride = 0;
  int rows = 0;                  // N_rot: table rows; tokens past num_prefix + rows stay unrotated (never read)
  int num_prefix = 0;            // unrotated tokens at the start of every sequence
  bool rotate_half = false;      // pairs (j, j + D/2) (timm's half layout) instead of (2i, 2i + 1)
};

struct AttentionFwdParams {
  // Inputs, element type `dtype` (fp16 or bf16), logical shapes (batch, heads, seqlen, head_dim), head dim
  // contiguous. q: (B, H, seqlen_q, D); k, v: (B, H, seqlen_k, D).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Output, element type `dtype`, (B, H, seqlen_q, D) addressed with the o strides. Rows >= seqlen_q and
  // columns >= head_dim are never touched.
  void* o = nullptr;
  // Output: (B, H, seqlen_q) contiguous fp32 (index (b·H + h)·seqlen_q + i), natural-log log-sum-exp of the
  // SCALED scores of query row i. Packed: (H, total_tokens), index h·T + token.
  float* lse = nullptr;

  // Strides in elements (batch, head, row); the head-dim stride is 1.
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;
  int64_t o_batch_stride = 0, o_head_stride = 0, o_row_stride = 0;

  int64_t batch = 0;     // B (packed: S, the number of sequences)
  int64_t heads = 0;     // H
  int64_t seqlen_q = 0;  // query tokens (rows of q, o, lse); packed: max_seqlen
  int64_t seqlen_k = 0;  // key / value tokens (rows of k, v); >= 1 for a non-empty problem; packed: max_seqlen
  int head_dim = 0;      // D, % 8 == 0, 8 <= D <= 128
  float scale = 0.f;     // softmax scale applied to Q Kᵀ in fp32 (usually D^-0.5)
  DType dtype = DType::kBFloat16;  // kFloat16 or kBFloat16

  // Packed variable-length sequences (see the top of this file), or nullptr for the dense (B, H, N, D) problem:
  // int32 (batch + 1,) device offsets, cu_seqlens[0] = 0 <= ... <= cu_seqlens[batch] = total_tokens, every
  // length <= seqlen_q. With them, lse is (H, total_tokens) fp32 and the batch strides are ignored.
  const int* cu_seqlens = nullptr;
  int64_t total_tokens = 0;  // T: rows of q, k, v, o with cu_seqlens (unused without)

  // Rotary position embeddings of q and k (table == nullptr: none); see AttentionRopeParams.
  AttentionRopeParams rope;
};

struct AttentionBwdParams {
  // Forward inputs / outputs (same shapes, dtypes and strides as in AttentionFwdParams).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;    // forward output O, (B, H, seqlen_q, D)
  const float* lse = nullptr; // forward LSE, (B, H, seqlen_q) contiguous fp32, natural log
  // Incoming gradient dO, element type `dtype`, (B, H, seqlen_q, D).
  const void* dout = nullptr;
  // Outputs, element type `dtype`: dq (B, H, seqlen_q, D), dk and dv (B, H, seqlen_k, D). Every element
  // (row < seqlen, column < head_dim) is written exactly once; nothing else is touched. dq / dk / dv may be
  // the column slices of one packed dqkv; they must not overlap q, k, v, o, dout.
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // Workspace of attention_bwd_workspace_bytes(params) bytes (16-byte aligned), allocated by the caller, no
  // initialisation needed. The launcher stores delta = rowsum(dO ∘ O) there: (B, H, seqlen_q) contiguous fp32.
  void* workspace = nullptr;

  // Strides in elements (batch, head, row); the head-dim stride is 1.
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;
  int64_t o_batch_stride = 0, o_head_stride = 0, o_row_stride = 0;
  int64_t do_batch_stride = 0, do_head_stride = 0, do_row_stride = 0;
  int64_t dq_batch_stride = 0, dq_head_stride = 0, dq_row_stride = 0;
  int64_t dk_batch_stride = 0, dk_head_stride = 0, dk_row_stride = 0;
  int64_t dv_batch_stride = 0, dv_head_stride = 0, dv_row_stride = 0;

  int64_t batch = 0;
  int64_t heads = 0;
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  int head_dim = 0;
  float scale = 0.f;  // the forward's softmax scale
  DType dtype = DType::kBFloat16;

  // Packed variable-length sequences, as in AttentionFwdParams: lse and the workspace's delta are then
  // (H, total_tokens) fp32, and dq / dk / dv have total_tokens rows.
  const int* cu_seqlens = nullptr;
  int64_t total_tokens = 0;

  // The forward's rotary position embeddings (AttentionRopeParams): q and k are rotated as they are loaded, and dq,
  // dk rotated back (the transpose) before they are stored.
  AttentionRopeParams rope;
};

// Bytes of workspace run_attention_bwd needs (B·H·seqlen_q fp32 for delta -- packed: H·total_tokens --, rounded up
// to 256 bytes; 0 for an empty problem).
size_t attention_bwd_workspace_bytes(const AttentionBwdParams& params);

// Head-dim bucket (one of kAttentionHeadDimBuckets) a head dim runs in, or 0 when unsupported.
int attention_head_dim_bucket(int head_dim);

// Dynamic shared memory per block, in bytes, of the largest backward kernel (dK/dV or dQ) of head-dim bucket
// `bucket` (the same for fp16 and bf16; whether the bucket is compiled or not), or 0 for a size that is no bucket.
// GPUs whose shared_memory_per_block_optin is smaller cannot run that bucket's backward.
int attention_bwd_smem_bytes(int bucket);

// head_dim % 8 == 0, 8 <= head_dim <= 128, and its bucket compiled into this build (a minimal build has only
// bucket 64, i.e. head dims 40..64).
bool attention_head_dim_supported(int head_dim);

// Whether this build compiled `dtype` for attention (a minimal build: bf16 only).
bool attention_dtype_supported(DType dtype);

cudaError_t run_attention_fwd(const AttentionFwdParams& params, cudaStream_t stream);
cudaError_t run_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

}  // namespace fastvit
