// fastvit._C binding of the fused-QKV flash attention: attention_{fwd,bwd}_cuda (packed qkv) and sdpa_{fwd,bwd}_cuda
// ((B, H, N, D) tensors), and their packed variable-length forms attention_varlen_{fwd,bwd}_cuda (qkv (T, 3C)) and
// sdpa_varlen_{fwd,bwd}_cuda (q, k, v (T, H, D)): S sequences of T tokens in all, sequence s the rows
// cu_seqlens[s] : cu_seqlens[s + 1] (FlashAttention's flash_attn_varlen_func convention, one cu_seqlens for queries
// and keys), LSE (H, T) fp32.
//
// This family's schemas (a TORCH_LIBRARY_FRAGMENT(fastvit): namespace fastvit, suffix _cuda, identical to the Triton
// ops of fastvit/families/attention.py, whose fakes and autograd register against them) and its
// TORCH_LIBRARY_IMPL(fastvit, CUDA) fragment: for every op, input checks that name the argument and what was
// expected, the fill of the kernel's plain params struct (set_params_*), the launch on torch's current stream and its
// CUDA error mapped to a Python exception. The helpers shared by the families are in csrc/common/binding.h.
//
// Every op takes the Triton ops' trailing rotary arguments (rope Tensor?, num_prefix_tokens, rotate_half): timm's
// cat([sin, cos], -1) table, (N_rot, 2D) or (1 or H, N_rot, 2D), any float dtype (read as fp32), applied to q and k
// as the kernels load them (attention.h, AttentionRopeParams); without a table the other two are ignored, as the
// Triton ops do.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "attention/attention.h"
#include "common/binding.h"

namespace {

using namespace fastvit::binding;

constexpr const char* kAttnFwd = "fastvit::attention_fwd_cuda";
constexpr const char* kAttnBwd = "fastvit::attention_bwd_cuda";
constexpr const char* kSdpaFwd = "fastvit::sdpa_fwd_cuda";
constexpr const char* kSdpaBwd = "fastvit::sdpa_bwd_cuda";
constexpr const char* kAttnVarlenFwd = "fastvit::attention_varlen_fwd_cuda";
constexpr const char* kAttnVarlenBwd = "fastvit::attention_varlen_bwd_cuda";
constexpr const char* kSdpaVarlenFwd = "fastvit::sdpa_varlen_fwd_cuda";
constexpr const char* kSdpaVarlenBwd = "fastvit::sdpa_varlen_bwd_cuda";

fastvit::DType attention_dtype(const Tensor& t, const char* op, const char* name, int64_t head_dim) {
  check_cuda(t, op, name);
  const auto dtype = dtype_of(t, op, name, /*allow_fp32=*/false);
  TORCH_CHECK_NOT_IMPLEMENTED(fastvit::attention_dtype_supported(dtype), op, ": this build has no ",
                              fastvit::dtype_name(dtype), " attention kernels (build_info()['half_dtypes'])");
  TORCH_CHECK_VALUE(head_dim <= INT32_MAX && fastvit::attention_head_dim_supported(static_cast<int>(head_dim)), op,
                    ": head_dim ", head_dim, " is not supported: it must be a multiple of 8 in [8, ",
                    fastvit::kAttentionMaxHeadDim,
                    "] whose bucket this build compiled "
                    "(build_info()['attention_head_dim_buckets'])");
  return dtype;
}

// The kernels index rows with int32 and round sequence lengths up to a tile.
constexpr int64_t kMaxSeqlen = (1LL << 31) - 256;

// Strides (batch, head, row) of the q / k / v column blocks of a packed qkv (B, N, 3C), or of a (B, N, C) tensor.
struct BhnStrides {
  int64_t b, h, n;
};
BhnStrides packed_strides(const Tensor& t, int64_t D) { return {t.stride(0), D, t.stride(1)}; }
BhnStrides bhnd_strides(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void set_params_attention_fwd(fastvit::AttentionFwdParams& p, const void* q, BhnStrides sq, const void* k,
                              BhnStrides sk, const void* v, BhnStrides sv, void* o, BhnStrides so, float* lse,
                              int64_t B, int64_t H, int64_t n_q, int64_t n_kv, int64_t D, double scale,
                              fastvit::DType dtype) {
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = o;
  p.lse = lse;
  p.q_batch_stride = sq.b;
  p.q_head_stride = sq.h;
  p.q_row_stride = sq.n;
  p.k_batch_stride = sk.b;
  p.k_head_stride = sk.h;
  p.k_row_stride = sk.n;
  p.v_batch_stride = sv.b;
  p.v_head_stride = sv.h;
  p.v_row_stride = sv.n;
  p.o_batch_stride = so.b;
  p.o_head_stride = so.h;
  p.o_row_stride = so.n;
  p.batch = B;
  p.heads = H;
  p.seqlen_q = n_q;
  p.seqlen_k = n_kv;
  p.head_dim = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.dtype = dtype;
}

void set_params_attention_bwd(fastvit::AttentionBwdParams& p, const fastvit::AttentionFwdParams& f, const void* dout,
                              BhnStrides sdo, void* dq, BhnStrides sdq, void* dk, BhnStrides sdk, void* dv,
                              BhnStrides sdv) {
  p.q = f.q;
  p.k = f.k;
  p.v = f.v;
  p.o = f.o;
  p.lse = f.lse;
  p.dout = dout;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.q_batch_stride = f.q_batch_stride;
  p.q_head_stride = f.q_head_stride;
  p.q_row_stride = f.q_row_stride;
  p.k_batch_stride = f.k_batch_stride;
  p.k_head_stride = f.k_head_stride;
  p.k_row_stride = f.k_row_stride;
  p.v_batch_stride = f.v_batch_stride;
  p.v_head_stride = f.v_head_stride;
  p.v_row_stride = f.v_row_stride;
  p.o_batch_stride = f.o_batch_stride;
  p.o_head_stride = f.o_head_stride;
  p.o_row_stride = f.o_row_stride;
  p.do_batch_stride = sdo.b;
  p.do_head_stride = sdo.h;
  p.do_row_stride = sdo.n;
  p.dq_batch_stride = sdq.b;
  p.dq_head_stride = sdq.h;
  p.dq_row_stride = sdq.n;
  p.dk_batch_stride = sdk.b;
  p.dk_head_stride = sdk.h;
  p.dk_row_stride = sdk.n;
  p.dv_batch_stride = sdv.b;
  p.dv_head_stride = sdv.h;
  p.dv_row_stride = sdv.n;
  p.batch = f.batch;
  p.heads = f.heads;
  p.seqlen_q = f.seqlen_q;
  p.seqlen_k = f.seqlen_k;
  p.head_dim = f.head_dim;
  p.scale = f.scale;
  p.dtype = f.dtype;
  p.cu_seqlens = f.cu_seqlens;
  p.total_tokens = f.total_tokens;
  p.rope = f.rope;
}

void run_attention_bwd_with_workspace(fastvit::AttentionBwdParams& p, const Tensor& like, const Launch& launch,
                                      const char* op) {
  Tensor workspace = alloc_workspace(fastvit::attention_bwd_workspace_bytes(p), like.options(), &p.workspace);
  check_launch(fastvit::run_attention_bwd(p, launch.stream), op);
}

// The rotary table of a call, checked and in the kernels' form (fp32, contiguous, 16-byte aligned); `table` keeps
// the (possibly converted) tensor alive until the launch returns.
struct RopeTable {
  Tensor table;
  fastvit::AttentionRopeParams params;
};

// rope: (N_rot, 2D) or (1 or H, N_rot, 2D) on ref's device, floating; n: tokens of the longest sequence, of which the
// last n - num_prefix_tokens need a table row each.
RopeTable rope_table(const OptTensor& rope, int64_t num_prefix_tokens, bool rotate_half, const Tensor& ref,
                     const char* ref_name, int64_t H, int64_t D, int64_t n, const char* op) {
  RopeTable out;
  if (!rope.has_value()) return out;
  const Tensor& r = *rope;
  TORCH_CHECK_VALUE(r.device() == ref.device(), op, ": rope is on ", r.device(), " but ", ref_name, " is on ",
                    ref.device(), "; expected the same device");
  TORCH_CHECK_TYPE(at::isFloatingType(r.scalar_type()), op, ": rope must be a floating-point tensor, got ",
                   r.scalar_type());
  TORCH_CHECK_VALUE((r.dim() == 2 || (r.dim() == 3 && (r.size(0) == 1 || r.size(0) == H))) && r.size(-1) == 2 * D, op,
                    ": rope must have shape (N_rot, ", 2 * D, ") or (", H, ", N_rot, ", 2 * D,
                    ") (timm's cat([sin, cos], -1) for head dim ", D, "), got ", r.sizes());
  TORCH_CHECK_VALUE(num_prefix_tokens >= 0 && num_prefix_tokens < kMaxSeqlen, op,
                    ": num_prefix_tokens must lie in [0, ", kMaxSeqlen, "), got ", num_prefix_tokens);
  const int64_t rows = r.size(-2);
  TORCH_CHECK_VALUE(rows >= n - num_prefix_tokens, op, ": rope has ", rows, " rows but the ", n - num_prefix_tokens,
                    " tokens after the num_prefix_tokens=", num_prefix_tokens, " prefix tokens need as many");
  out.table = r.to(at::kFloat).contiguous();
  if (reinterpret_cast<uintptr_t>(out.table.data_ptr()) % 16 != 0) out.table = out.table.clone();  // float4 reads
  auto& p = out.params;
  p.table = out.table.data_ptr<float>();
  p.head_stride = out.table.dim() == 3 && out.table.size(0) > 1 ? out.table.stride(0) : 0;
  p.row_stride = out.table.stride(-2);
  p.rows = static_cast<int>(std::min<int64_t>(rows, kMaxSeqlen));
  p.num_prefix = static_cast<int>(num_prefix_tokens);
  p.rotate_half = rotate_half;
  return out;
}

std::tuple<int64_t, int64_t, int64_t> packed_geometry(const Tensor& qkv, int64_t num_heads, const char* op) {
  TORCH_CHECK_VALUE(qkv.dim() == 3, op, ": qkv must have shape (B, N, 3*C), got ", qkv.sizes());
  TORCH_CHECK_VALUE(num_heads >= 1, op, ": num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK_VALUE(qkv.size(2) > 0 && qkv.size(2) % (3 * num_heads) == 0, op, ": qkv's last dim (", qkv.size(2),
                    ") must be a positive multiple of 3 * num_heads = ", 3 * num_heads);
  TORCH_CHECK_VALUE(qkv.size(1) < kMaxSeqlen, op, ": at most ", kMaxSeqlen - 1, " tokens, got qkv of shape ",
                    qkv.sizes());
  const int64_t C = qkv.size(2) / 3;
  return {C, C / num_heads, qkv.size(1)};
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& qkv_in, int64_t num_heads, double scale, const OptTensor& rope,
                                         int64_t num_prefix_tokens, bool rotate_half) {
  auto [C, D, N] = packed_geometry(qkv_in, num_heads, kAttnFwd);
  const auto dtype = attention_dtype(qkv_in, kAttnFwd, "qkv", D);
  const int64_t B = qkv_in.size(0);
  const RopeTable rt = rope_table(rope, num_prefix_tokens, rotate_half, qkv_in, "qkv", num_heads, D, N, kAttnFwd);
  Launch launch(qkv_in);
  Tensor qkv = vector_aligned(qkv_in);
  Tensor o = at::empty({B, N, C}, qkv.options());
  Tensor lse = at::empty({B, num_heads, N}, qkv.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  const auto* base = static_cast<const char*>(qkv.data_ptr());
  const int64_t esize = qkv.element_size();
  fastvit::AttentionFwdParams p;
  set_params_attention_fwd(p, base, packed_strides(qkv, D), base + C * esize, packed_strides(qkv, D),
                           base + 2 * C * esize, packed_strides(qkv, D), o.data_ptr(), packed_strides(o, D),
                           lse.data_ptr<float>(), B, num_heads, N, N, D, scale, dtype);
  p.rope = rt.params;
  check_launch(fastvit::run_attention_fwd(p, launch.stream), kAttnFwd);
  return {o, lse};
}

Tensor attention_bwd(const Tensor& dout_in, const Tensor& qkv_in, const Tensor& o_in, const Tensor& lse_in,
                     int64_t num_heads, double scale, const OptTensor& rope, int64_t num_prefix_tokens,
                     bool rotate_half) {
  auto [C, D, N] = packed_geometry(qkv_in, num_heads, kAttnBwd);
  const auto dtype = attention_dtype(qkv_in, kAttnBwd, "qkv", D);
  const int64_t B = qkv_in.size(0);
  check_same(dout_in, qkv_in, kAttnBwd, "dout", "qkv");
  check_same(o_in, qkv_in, kAttnBwd, "o", "qkv");
  check_shape(dout_in, {B, N, C}, kAttnBwd, "dout");
  check_shape(o_in, {B, N, C}, kAttnBwd, "o");
  check_shape(lse_in, {B, num_heads, N}, kAttnBwd, "lse");
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, kAttnBwd, ": lse must be float32, got ", lse_in.scalar_type());
  const RopeTable rt = rope_table(rope, num_prefix_tokens, rotate_half, qkv_in, "qkv", num_heads, D, N, kAttnBwd);
  Launch launch(qkv_in);
  Tensor qkv = vector_aligned(qkv_in), dout = vector_aligned(dout_in), o = vector_aligned(o_in);
  Tensor lse = lse_in.contiguous();
  Tensor dqkv = at::empty({B, N, 3 * C}, qkv.options());
  if (dqkv.numel() == 0) return dqkv;
  const int64_t esize = qkv.element_size();
  const auto* base = static_cast<const char*>(qkv.data_ptr());
  auto* dbase = static_cast<char*>(dqkv.data_ptr());
  const BhnStrides s = packed_strides(qkv, D), ds = packed_strides(dqkv, D);
  fastvit::AttentionFwdParams f;
  set_params_attention_fwd(f, base, s, base + C * esize, s, base + 2 * C * esize, s, o.data_ptr(), packed_strides(o, D),
                           lse.data_ptr<float>(), B, num_heads, N, N, D, scale, dtype);
  f.rope = rt.params;
  fastvit::AttentionBwdParams p;
  set_params_attention_bwd(p, f, dout.data_ptr(), packed_strides(dout, D), dbase, ds, dbase + C * esize, ds,
                           dbase + 2 * C * esize, ds);
  run_attention_bwd_with_workspace(p, qkv, launch, kAttnBwd);
  return dqkv;
}

void check_bhnd(const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must have shape (B, H, Nq, D), got ", q.sizes());
  check_same(k, q, op, "k", "q");
  check_same(v, q, op, "v", "q");
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
                    ": k must have shape (", q.size(0), ", ", q.size(1), ", Nk, ", q.size(3), "), got ", k.sizes());
  check_shape(v, k.sizes(), op, "v");
  TORCH_CHECK_VALUE(q.size(2) < kMaxSeqlen && k.size(2) < kMaxSeqlen, op, ": at most ", kMaxSeqlen - 1,
                    " tokens, got q of shape ", q.sizes(), " and k of shape ", k.sizes());
}

// Rotary embeddings need one position per token of q and k: self-attention.
void check_rope_self_attention(const OptTensor& rope, int64_t n_q, int64_t n_kv, const char* op) {
  TORCH_CHECK_VALUE(!rope.has_value() || n_q == n_kv, op,
                    ": rope needs self-attention (one position per token for q and k): q has ", n_q, " tokens and k ",
                    n_kv);
}

std::tuple<Tensor, Tensor> sdpa_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double scale,
                                    const OptTensor& rope, int64_t num_prefix_tokens, bool rotate_half) {
  check_bhnd(q_in, k_in, v_in, kSdpaFwd);
  const int64_t B = q_in.size(0), H = q_in.size(1), n_q = q_in.size(2), n_kv = k_in.size(2), D = q_in.size(3);
  const auto dtype = attention_dtype(q_in, kSdpaFwd, "q", D);
  check_rope_self_attention(rope, n_q, n_kv, kSdpaFwd);
  const RopeTable rt = rope_table(rope, num_prefix_tokens, rotate_half, q_in, "q", H, D, n_q, kSdpaFwd);
  Launch launch(q_in);
  Tensor q = vector_aligned(q_in), k = vector_aligned(k_in), v = vector_aligned(v_in);
  Tensor o = at::empty({B, H, n_q, D}, q.options());
  Tensor lse = at::empty({B, H, n_q}, q.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  if (n_kv == 0) {  // softmax over no keys: eager attention gives zeros; the log-sum-exp of nothing is -inf
    o.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {o, lse};
  }
  fastvit::AttentionFwdParams p;
  set_params_attention_fwd(p, q.data_ptr(), bhnd_strides(q), k.data_ptr(), bhnd_strides(k), v.data_ptr(),
                           bhnd_strides(v), o.data_ptr(), bhnd_strides(o), lse.data_ptr<float>(), B, H, n_q, n_kv, D,
                           scale, dtype);
  p.rope = rt.params;
  check_launch(fastvit::run_attention_fwd(p, launch.stream), kSdpaFwd);
  return {o, lse};
}

std::tuple<Tensor, Tensor, Tensor> sdpa_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                            const Tensor& v_in, const Tensor& o_in, const Tensor& lse_in, double scale,
                                            const OptTensor& rope, int64_t num_prefix_tokens, bool rotate_half) {
  check_bhnd(q_in, k_in, v_in, kSdpaBwd);
  const int64_t B = q_in.size(0), H = q_in.size(1), n_q = q_in.size(2), n_kv = k_in.size(2), D = q_in.size(3);
  const auto dtype = attention_dtype(q_in, kSdpaBwd, "q", D);
  check_same(dout_in, q_in, kSdpaBwd, "dout", "q");
  check_same(o_in, q_in, kSdpaBwd, "o", "q");
  check_shape(dout_in, q_in.sizes(), kSdpaBwd, "dout");
  check_shape(o_in, q_in.sizes(), kSdpaBwd, "o");
  check_shape(lse_in, {B, H, n_q}, kSdpaBwd, "lse");
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, kSdpaBwd, ": lse must be float32, got ", lse_in.scalar_type());
  check_rope_self_attention(rope, n_q, n_kv, kSdpaBwd);
  const RopeTable rt = rope_table(rope, num_prefix_tokens, rotate_half, q_in, "q", H, D, n_q, kSdpaBwd);
  Launch launch(q_in);
  Tensor q = vector_aligned(q_in), k = vector_aligned(k_in), v = vector_aligned(v_in);
  Tensor o = vector_aligned(o_in), dout = vector_aligned(dout_in), lse = lse_in.contiguous();
  Tensor dq = at::empty({B, H, n_q, D}, q.options());
  Tensor dk = at::empty({B, H, n_kv, D}, q.options());
  Tensor dv = at::empty({B, H, n_kv, D}, q.options());
  if (n_kv == 0) {  // no keys: the output was undefined-free zeros of nothing; every gradient is zero
    dq.zero_();
    return {dq, dk, dv};
  }
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  fastvit::AttentionFwdParams f;
  set_params_attention_fwd(f, q.data_ptr(), bhnd_strides(q), k.data_ptr(), bhnd_strides(k), v.data_ptr(),
                           bhnd_strides(v), o.data_ptr(), bhnd_strides(o), lse.data_ptr<float>(), B, H, n_q, n_kv, D,
                           scale, dtype);
  f.rope = rt.params;
  fastvit::AttentionBwdParams p;
  set_params_attention_bwd(p, f, dout.data_ptr(), bhnd_strides(dout), dq.data_ptr(), bhnd_strides(dq), dk.data_ptr(),
                           bhnd_strides(dk), dv.data_ptr(), bhnd_strides(dv));
  run_attention_bwd_with_workspace(p, q, launch, kSdpaBwd);
  return {dq, dk, dv};
}

// ------------------------------------------------------------------------------------------- packed (varlen)
// Strides (batch, head, row) of a packed (T, ...) operand: no batch dim (the kernels never read its stride).
BhnStrides varlen_packed_strides(const Tensor& t, int64_t D) { return {0, D, t.stride(0)}; }  // (T, 3C) / (T, C)
BhnStrides varlen_thd_strides(const Tensor& t) { return {0, t.stride(1), t.stride(0)}; }      // (T, H, D)

// cu_seqlens: int32 (S + 1,) offsets, S >= 1, contiguous, on `ref`'s device; max_seqlen: the longest sequence,
// >= 1 unless there is no token (the grid covers it). Returns S. The offsets' values stay on the device (reading
// them would synchronise): fastvit.ops checks them (0, non-decreasing, ending at T, no length above max_seqlen),
// and the kernels clamp them into [0, T], so malformed offsets can give wrong rows but never touch memory outside
// the tensors.
int64_t check_cu_seqlens(const Tensor& cu_seqlens, int64_t max_seqlen, const Tensor& ref, const char* ref_name,
                         int64_t total, const char* op) {
  TORCH_CHECK_VALUE(cu_seqlens.device() == ref.device(), op, ": cu_seqlens is on ", cu_seqlens.device(), " but ",
                    ref_name, " is on ", ref.device(), "; expected the same device");
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
                   cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2, op,
                    ": cu_seqlens must have shape (S + 1,) with S >= 1 sequences, got ", cu_seqlens.sizes());
  TORCH_CHECK_VALUE(cu_seqlens.is_contiguous(), op, ": cu_seqlens must be contiguous, got strides ",
                    cu_seqlens.strides());
  TORCH_CHECK_VALUE(max_seqlen >= 0 && max_seqlen < kMaxSeqlen, op, ": max_seqlen must lie in [0, ", kMaxSeqlen,
                    "), got ", max_seqlen);
  TORCH_CHECK_VALUE(max_seqlen >= 1 || total == 0, op, ": max_seqlen must be >= 1 (the longest sequence) for ", total,
                    " packed tokens, got ", max_seqlen);
  TORCH_CHECK_VALUE(total < kMaxSeqlen, op, ": at most ", kMaxSeqlen - 1, " packed tokens, got ", ref_name, " with ",
                    total);
  return cu_seqlens.size(0) - 1;
}

void set_params_varlen(fastvit::AttentionFwdParams& p, const Tensor& cu_seqlens, int64_t total) {
  p.cu_seqlens = cu_seqlens.data_ptr<int>();
  p.total_tokens = total;
}

std::tuple<int64_t, int64_t, int64_t> packed_varlen_geometry(const Tensor& qkv, int64_t num_heads, const char* op) {
  TORCH_CHECK_VALUE(qkv.dim() == 2, op, ": qkv must have shape (T, 3*C) (packed sequences), got ", qkv.sizes());
  TORCH_CHECK_VALUE(num_heads >= 1, op, ": num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK_VALUE(qkv.size(1) > 0 && qkv.size(1) % (3 * num_heads) == 0, op, ": qkv's last dim (", qkv.size(1),
                    ") must be a positive multiple of 3 * num_heads = ", 3 * num_heads);
  const int64_t C = qkv.size(1) / 3;
  return {C, C / num_heads, qkv.size(0)};
}

std::tuple<Tensor, Tensor> attention_varlen_fwd(const Tensor& qkv_in, const Tensor& cu_seqlens, int64_t max_seqlen,
                                                int64_t num_heads, double scale, const OptTensor& rope,
                                                int64_t num_prefix_tokens, bool rotate_half) {
  auto [C, D, T] = packed_varlen_geometry(qkv_in, num_heads, kAttnVarlenFwd);
  const auto dtype = attention_dtype(qkv_in, kAttnVarlenFwd, "qkv", D);
  const int64_t S = check_cu_seqlens(cu_seqlens, max_seqlen, qkv_in, "qkv", T, kAttnVarlenFwd);
  const RopeTable rt =
      rope_table(rope, num_prefix_tokens, rotate_half, qkv_in, "qkv", num_heads, D, max_seqlen, kAttnVarlenFwd);
  Launch launch(qkv_in);
  Tensor qkv = vector_aligned(qkv_in);
  Tensor o = at::empty({T, C}, qkv.options());
  Tensor lse = at::empty({num_heads, T}, qkv.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  const auto* base = static_cast<const char*>(qkv.data_ptr());
  const int64_t esize = qkv.element_size();
  const BhnStrides s = varlen_packed_strides(qkv, D);
  fastvit::AttentionFwdParams p;
  set_params_attention_fwd(p, base, s, base + C * esize, s, base + 2 * C * esize, s, o.data_ptr(),
                           varlen_packed_strides(o, D), lse.data_ptr<float>(), S, num_heads, max_seqlen, max_seqlen, D,
                           scale, dtype);
  set_params_varlen(p, cu_seqlens, T);
  p.rope = rt.params;
  check_launch(fastvit::run_attention_fwd(p, launch.stream), kAttnVarlenFwd);
  return {o, lse};
}

Tensor attention_varlen_bwd(const Tensor& dout_in, const Tensor& qkv_in, const Tensor& cu_seqlens, int64_t max_seqlen,
                            const Tensor& o_in, const Tensor& lse_in, int64_t num_heads, double scale,
                            const OptTensor& rope, int64_t num_prefix_tokens, bool rotate_half) {
  auto [C, D, T] = packed_varlen_geometry(qkv_in, num_heads, kAttnVarlenBwd);
  const auto dtype = attention_dtype(qkv_in, kAttnVarlenBwd, "qkv", D);
  const int64_t S = check_cu_seqlens(cu_seqlens, max_seqlen, qkv_in, "qkv", T, kAttnVarlenBwd);
  check_same(dout_in, qkv_in, kAttnVarlenBwd, "dout", "qkv");
  check_same(o_in, qkv_in, kAttnVarlenBwd, "o", "qkv");
  check_shape(dout_in, {T, C}, kAttnVarlenBwd, "dout");
  check_shape(o_in, {T, C}, kAttnVarlenBwd, "o");
  check_shape(lse_in, {num_heads, T}, kAttnVarlenBwd, "lse");
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, kAttnVarlenBwd, ": lse must be float32, got ",
                   lse_in.scalar_type());
  const RopeTable rt =
      rope_table(rope, num_prefix_tokens, rotate_half, qkv_in, "qkv", num_heads, D, max_seqlen, kAttnVarlenBwd);
  Launch launch(qkv_in);
  Tensor qkv = vector_aligned(qkv_in), dout = vector_aligned(dout_in), o = vector_aligned(o_in);
  Tensor lse = lse_in.contiguous();
  Tensor dqkv = at::empty({T, 3 * C}, qkv.options());
  if (dqkv.numel() == 0) return dqkv;
  const int64_t esize = qkv.element_size();
  const auto* base = static_cast<const char*>(qkv.data_ptr());
  auto* dbase = static_cast<char*>(dqkv.data_ptr());
  const BhnStrides s = varlen_packed_strides(qkv, D), ds = varlen_packed_strides(dqkv, D);
  fastvit::AttentionFwdParams f;
  set_params_attention_fwd(f, base, s, base + C * esize, s, base + 2 * C * esize, s, o.data_ptr(),
                           varlen_packed_strides(o, D), lse.data_ptr<float>(), S, num_heads, max_seqlen, max_seqlen, D,
                           scale, dtype);
  set_params_varlen(f, cu_seqlens, T);
  f.rope = rt.params;
  fastvit::AttentionBwdParams p;
  set_params_attention_bwd(p, f, dout.data_ptr(), varlen_packed_strides(dout, D), dbase, ds, dbase + C * esize, ds,
                           dbase + 2 * C * esize, ds);
  run_attention_bwd_with_workspace(p, qkv, launch, kAttnVarlenBwd);
  return dqkv;
}

// q, k, v: (T, H, D), one shape, dtype and device (packed self-attention: one cu_seqlens for all three).
void check_thd(const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must have shape (T, H, D) (packed sequences), got ", q.sizes());
  check_same(k, q, op, "k", "q");
  check_same(v, q, op, "v", "q");
  check_shape(k, q.sizes(), op, "k");
  check_shape(v, q.sizes(), op, "v");
}

std::tuple<Tensor, Tensor> sdpa_varlen_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                           const Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                                           const OptTensor& rope, int64_t num_prefix_tokens, bool rotate_half) {
  check_thd(q_in, k_in, v_in, kSdpaVarlenFwd);
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  const auto dtype = attention_dtype(q_in, kSdpaVarlenFwd, "q", D);
  const int64_t S = check_cu_seqlens(cu_seqlens, max_seqlen, q_in, "q", T, kSdpaVarlenFwd);
  const RopeTable rt = rope_table(rope, num_prefix_tokens, rotate_half, q_in, "q", H, D, max_seqlen, kSdpaVarlenFwd);
  Launch launch(q_in);
  Tensor q = vector_aligned(q_in), k = vector_aligned(k_in), v = vector_aligned(v_in);
  Tensor o = at::empty({T, H, D}, q.options());
  Tensor lse = at::empty({H, T}, q.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  fastvit::AttentionFwdParams p;
  set_params_attention_fwd(p, q.data_ptr(), varlen_thd_strides(q), k.data_ptr(), varlen_thd_strides(k), v.data_ptr(),
                           varlen_thd_strides(v), o.data_ptr(), varlen_thd_strides(o), lse.data_ptr<float>(), S, H,
                           max_seqlen, max_seqlen, D, scale, dtype);
  set_params_varlen(p, cu_seqlens, T);
  p.rope = rt.params;
  check_launch(fastvit::run_attention_fwd(p, launch.stream), kSdpaVarlenFwd);
  return {o, lse};
}

std::tuple<Tensor, Tensor, Tensor> sdpa_varlen_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                   const Tensor& v_in, const Tensor& cu_seqlens, int64_t max_seqlen,
                                                   const Tensor& o_in, const Tensor& lse_in, double scale,
                                                   const OptTensor& rope, int64_t num_prefix_tokens, bool rotate_half) {
  check_thd(q_in, k_in, v_in, kSdpaVarlenBwd);
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  const auto dtype = attention_dtype(q_in, kSdpaVarlenBwd, "q", D);
  const int64_t S = check_cu_seqlens(cu_seqlens, max_seqlen, q_in, "q", T, kSdpaVarlenBwd);
  check_same(dout_in, q_in, kSdpaVarlenBwd, "dout", "q");
  check_same(o_in, q_in, kSdpaVarlenBwd, "o", "q");
  check_shape(dout_in, q_in.sizes(), kSdpaVarlenBwd, "dout");
  check_shape(o_in, q_in.sizes(), kSdpaVarlenBwd, "o");
  check_shape(lse_in, {H, T}, kSdpaVarlenBwd, "lse");
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, kSdpaVarlenBwd, ": lse must be float32, got ",
                   lse_in.scalar_type());
  const RopeTable rt = rope_table(rope, num_prefix_tokens, rotate_half, q_in, "q", H, D, max_seqlen, kSdpaVarlenBwd);
  Launch launch(q_in);
  Tensor q = vector_aligned(q_in), k = vector_aligned(k_in), v = vector_aligned(v_in);
  Tensor o = vector_aligned(o_in), dout = vector_aligned(dout_in), lse = lse_in.contiguous();
  Tensor dq = at::empty({T, H, D}, q.options());
  Tensor dk = at::empty({T, H, D}, q.options());
  Tensor dv = at::empty({T, H, D}, q.options());
  if (dq.numel() == 0) return {dq, dk, dv};
  fastvit::AttentionFwdParams f;
  set_params_attention_fwd(f, q.data_ptr(), varlen_thd_strides(q), k.data_ptr(), varlen_thd_strides(k), v.data_ptr(),
                           varlen_thd_strides(v), o.data_ptr(), varlen_thd_strides(o), lse.data_ptr<float>(), S, H,
                           max_seqlen, max_seqlen, D, scale, dtype);
  set_params_varlen(f, cu_seqlens, T);
  f.rope = rt.params;
  fastvit::AttentionBwdParams p;
  set_params_attention_bwd(p, f, dout.data_ptr(), varlen_thd_strides(dout), dq.data_ptr(), varlen_thd_strides(dq),
                           dk.data_ptr(), varlen_thd_strides(dk), dv.data_ptr(), varlen_thd_strides(dv));
  run_attention_bwd_with_workspace(p, q, launch, kSdpaVarlenBwd);
  return {dq, dk, dv};
}

}  // namespace

// Schemas of this family's ops, declared once (here); the kernels below implement them.
TORCH_LIBRARY_FRAGMENT(fastvit, m) {
  // Every op ends with the Triton ops' rotary arguments (see the top of this file).
#define FASTVIT_ROPE_ARGS "Tensor? rope=None, int num_prefix_tokens=0, bool rotate_half=False"
  m.def("attention_fwd_cuda(Tensor qkv, int num_heads, float scale, " FASTVIT_ROPE_ARGS ") -> (Tensor, Tensor)");
  m.def("attention_bwd_cuda(Tensor do, Tensor qkv, Tensor o, Tensor lse, int num_heads, float scale, " FASTVIT_ROPE_ARGS
        ") -> Tensor");
  m.def("sdpa_fwd_cuda(Tensor q, Tensor k, Tensor v, float scale, " FASTVIT_ROPE_ARGS ") -> (Tensor, Tensor)");
  m.def("sdpa_bwd_cuda(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale, " FASTVIT_ROPE_ARGS
        ") -> (Tensor, Tensor, Tensor)");
  // Packed variable-length sequences (cu_seqlens int32 (S + 1,), FlashAttention's flash_attn_varlen_func layout):
  // qkv (T, 3C) -> o (T, C), lse (H, T) fp32; q, k, v (T, H, D) -> o (T, H, D), lse (H, T) fp32.
  m.def("attention_varlen_fwd_cuda(Tensor qkv, Tensor cu_seqlens, int max_seqlen, int num_heads, float "
        "scale, " FASTVIT_ROPE_ARGS ") -> (Tensor, Tensor)");
  m.def("attention_varlen_bwd_cuda(Tensor do, Tensor qkv, Tensor cu_seqlens, int max_seqlen, Tensor o, Tensor lse, "
        "int num_heads, float scale, " FASTVIT_ROPE_ARGS ") -> Tensor");
  m.def("sdpa_varlen_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float "
        "scale, " FASTVIT_ROPE_ARGS ") -> (Tensor, Tensor)");
  m.def("sdpa_varlen_bwd_cuda(Tensor do, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, Tensor o, "
        "Tensor lse, float scale, " FASTVIT_ROPE_ARGS ") -> (Tensor, Tensor, Tensor)");
#undef FASTVIT_ROPE_ARGS
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("attention_fwd_cuda", &attention_fwd);
  m.impl("attention_bwd_cuda", &attention_bwd);
  m.impl("sdpa_fwd_cuda", &sdpa_fwd);
  m.impl("sdpa_bwd_cuda", &sdpa_bwd);
  m.impl("attention_varlen_fwd_cuda", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd_cuda", &attention_varlen_bwd);
  m.impl("sdpa_varlen_fwd_cuda", &sdpa_varlen_fwd);
  m.impl("sdpa_varlen_bwd_cuda", &sdpa_varlen_bwd);
}
