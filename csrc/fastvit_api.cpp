// fastvit._C: the one binding file between torch and the torch-free CUDA kernels of csrc/<family>/.
//
// For every op: TORCH_LIBRARY schema (namespace fastvit, suffix _cuda; the Triton backend registers the same
// schemas without the suffix), input checks that name the argument and what was expected, one set_params_* that
// fills the kernel's plain params struct (FlashAttention's flash_api.cpp pattern), the launch on torch's current
// stream, and the CUDA error mapped to a Python exception. Fake (meta) implementations and autograd are
// registered from Python (fastvit/_cuda.py), which set_python_module below points torch at.
//
// Error types: TORCH_CHECK_TYPE -> TypeError (dtype), TORCH_CHECK_VALUE -> ValueError (shape, device, size),
// TORCH_CHECK_NOT_IMPLEMENTED -> NotImplementedError (a dtype / head dim this build did not compile).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "attention/attention.h"
#include "common/build_info.h"
#include "common/common.h"
#include "layer_norm/layer_norm.h"
#include "linear/linear.h"
#include "mae/mae.h"
#include "patch_embed/patch_embed.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ------------------------------------------------------------------------------------------- checks
void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

void check_same(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; expected the same device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has ", ref.scalar_type(), "; expected the same dtype");
}

void check_shape(const Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

void check_index(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but must be on ",
                    ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D (B, N), got shape ", t.sizes());
}

// fp16 / bf16 (tensor-core ops) or also fp32 (memory-bound ops).
fastvit::DType dtype_of(const Tensor& t, const char* op, const char* name, bool allow_fp32) {
  switch (t.scalar_type()) {
    case at::kHalf: return fastvit::DType::kFloat16;
    case at::kBFloat16: return fastvit::DType::kBFloat16;
    case at::kFloat:
      if (allow_fp32) return fastvit::DType::kFloat32;
      break;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be ",
                   allow_fp32 ? "float16, bfloat16 or float32" : "float16 or bfloat16", ", got ", t.scalar_type());
  return fastvit::DType::kFloat32;  // unreachable
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(err != cudaErrorNotSupported, op,
                              ": this fastvit._C build did not compile the requested dtype / head dim "
                              "(fastvit._C.build_info() lists what it has)");
  TORCH_CHECK_VALUE(err != cudaErrorInvalidValue && err != cudaErrorMisalignedAddress, op,
                    ": the kernel rejected its arguments (", cudaGetErrorString(err),
                    "); this is a bug in the binding's checks, please report it");
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

bool ptr_aligned(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// `t` itself when its last dim is contiguous, its other strides are multiples of `align` elements and its data is
// 16-byte aligned (what the kernels' 128-bit accesses need); otherwise a contiguous, freshly allocated copy.
Tensor vector_aligned(const Tensor& t, int64_t align = 8) {
  bool ok = t.numel() == 0 || ((t.size(-1) <= 1 || t.stride(-1) == 1) && ptr_aligned(t));
  for (int64_t i = 0; ok && i + 1 < t.dim(); ++i) ok = t.size(i) <= 1 || t.stride(i) % align == 0;
  if (ok) return t;
  Tensor c = t.contiguous();
  return (c.data_ptr() == t.data_ptr()) ? t.clone(at::MemoryFormat::Contiguous) : c;
}

// (M, C) view of `t` (..., C) with a unit last stride (a copy only when no such view exists).
Tensor rows(const Tensor& t, int64_t C) {
  Tensor r = t.reshape({-1, C});
  return (C > 1 && r.stride(1) != 1) ? r.contiguous() : r;
}

// A row-major (M, C) GEMM operand from `t` (..., C): leading dimension >= C (an expanded, stride-0 gradient is
// materialised: CUTLASS wants a real matrix), unit column stride, 16-byte aligned.
Tensor gemm_rows(const Tensor& t, int64_t C) {
  Tensor r = rows(t, C);
  if (r.size(0) > 1 && r.stride(0) < C) r = r.contiguous();
  // One row: its stride is never read, but the launchers check it as a leading dimension (>= C, a multiple of 8),
  // and .contiguous() keeps whatever stride a size-1 dim has (e.g. a (1, K) transpose with stride 1).
  if (r.size(0) <= 1 && (r.stride(0) < C || r.stride(0) % 8 != 0)) r = r.as_strided(r.sizes(), {C, 1});
  return vector_aligned(r);
}

// Scratch of `bytes` bytes on `options`' device for a launcher; *ptr gets its address (null when empty). Kept alive
// by the caller until the launch is queued (the caching allocator orders its reuse on the same stream).
Tensor alloc_workspace(size_t bytes, const at::TensorOptions& options, void** ptr) {
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, options.dtype(at::kByte));
  *ptr = bytes ? workspace.data_ptr() : nullptr;
  return workspace;
}

Tensor empty0(const Tensor& like) { return at::empty({0}, like.options()); }

const void* opt_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

struct Launch {  // device guard + current stream for one op
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  explicit Launch(const Tensor& t) : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream().stream()) {}
};

// ------------------------------------------------------------------------------------------- attention
constexpr const char* kAttnFwd = "fastvit::attention_fwd_cuda";
constexpr const char* kAttnBwd = "fastvit::attention_bwd_cuda";
constexpr const char* kSdpaFwd = "fastvit::sdpa_fwd_cuda";
constexpr const char* kSdpaBwd = "fastvit::sdpa_bwd_cuda";

fastvit::DType attention_dtype(const Tensor& t, const char* op, const char* name, int64_t head_dim) {
  check_cuda(t, op, name);
  const auto dtype = dtype_of(t, op, name, /*allow_fp32=*/false);
  TORCH_CHECK_NOT_IMPLEMENTED(fastvit::attention_dtype_supported(dtype), op, ": this build has no ",
                              fastvit::dtype_name(dtype), " attention kernels (build_info()['half_dtypes'])");
  TORCH_CHECK_VALUE(head_dim <= INT32_MAX && fastvit::attention_head_dim_supported(static_cast<int>(head_dim)), op,
                    ": head_dim ", head_dim, " is not supported: it must be a multiple of 8 in [8, ",
                    fastvit::kAttentionMaxHeadDim, "] whose bucket this build compiled "
                    "(build_info()['attention_head_dim_buckets'])");
  return dtype;
}

// The kernels index rows with int32 and round sequence lengths up to a tile.
constexpr int64_t kMaxSeqlen = (1LL << 31) - 256;

// Strides (batch, head, row) of the q / k / v column blocks of a packed qkv (B, N, 3C), or of a (B, N, C) tensor.
struct BhnStrides { int64_t b, h, n; };
BhnStrides packed_strides(const Tensor& t, int64_t D) { return {t.stride(0), D, t.stride(1)}; }
BhnStrides bhnd_strides(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void set_params_attention_fwd(fastvit::AttentionFwdParams& p, const void* q, BhnStrides sq, const void* k,
                              BhnStrides sk, const void* v, BhnStrides sv, void* o, BhnStrides so, float* lse,
                              int64_t B, int64_t H, int64_t n_q, int64_t n_kv, int64_t D, double scale,
                              fastvit::DType dtype) {
  p.q = q; p.k = k; p.v = v; p.o = o; p.lse = lse;
  p.q_batch_stride = sq.b; p.q_head_stride = sq.h; p.q_row_stride = sq.n;
  p.k_batch_stride = sk.b; p.k_head_stride = sk.h; p.k_row_stride = sk.n;
  p.v_batch_stride = sv.b; p.v_head_stride = sv.h; p.v_row_stride = sv.n;
  p.o_batch_stride = so.b; p.o_head_stride = so.h; p.o_row_stride = so.n;
  p.batch = B; p.heads = H; p.seqlen_q = n_q; p.seqlen_k = n_kv;
  p.head_dim = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.dtype = dtype;
}

void set_params_attention_bwd(fastvit::AttentionBwdParams& p, const fastvit::AttentionFwdParams& f, const void* dout,
                              BhnStrides sdo, void* dq, BhnStrides sdq, void* dk, BhnStrides sdk, void* dv,
                              BhnStrides sdv) {
  p.q = f.q; p.k = f.k; p.v = f.v; p.o = f.o; p.lse = f.lse; p.dout = dout;
  p.dq = dq; p.dk = dk; p.dv = dv;
  p.q_batch_stride = f.q_batch_stride; p.q_head_stride = f.q_head_stride; p.q_row_stride = f.q_row_stride;
  p.k_batch_stride = f.k_batch_stride; p.k_head_stride = f.k_head_stride; p.k_row_stride = f.k_row_stride;
  p.v_batch_stride = f.v_batch_stride; p.v_head_stride = f.v_head_stride; p.v_row_stride = f.v_row_stride;
  p.o_batch_stride = f.o_batch_stride; p.o_head_stride = f.o_head_stride; p.o_row_stride = f.o_row_stride;
  p.do_batch_stride = sdo.b; p.do_head_stride = sdo.h; p.do_row_stride = sdo.n;
  p.dq_batch_stride = sdq.b; p.dq_head_stride = sdq.h; p.dq_row_stride = sdq.n;
  p.dk_batch_stride = sdk.b; p.dk_head_stride = sdk.h; p.dk_row_stride = sdk.n;
  p.dv_batch_stride = sdv.b; p.dv_head_stride = sdv.h; p.dv_row_stride = sdv.n;
  p.batch = f.batch; p.heads = f.heads; p.seqlen_q = f.seqlen_q; p.seqlen_k = f.seqlen_k;
  p.head_dim = f.head_dim; p.scale = f.scale; p.dtype = f.dtype;
}

void run_attention_bwd_with_workspace(fastvit::AttentionBwdParams& p, const Tensor& like, const Launch& launch,
                                      const char* op) {
  Tensor workspace = alloc_workspace(fastvit::attention_bwd_workspace_bytes(p), like.options(), &p.workspace);
  check_launch(fastvit::run_attention_bwd(p, launch.stream), op);
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

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& qkv_in, int64_t num_heads, double scale) {
  auto [C, D, N] = packed_geometry(qkv_in, num_heads, kAttnFwd);
  const auto dtype = attention_dtype(qkv_in, kAttnFwd, "qkv", D);
  const int64_t B = qkv_in.size(0);
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
  check_launch(fastvit::run_attention_fwd(p, launch.stream), kAttnFwd);
  return {o, lse};
}

Tensor attention_bwd(const Tensor& dout_in, const Tensor& qkv_in, const Tensor& o_in, const Tensor& lse_in,
                     int64_t num_heads, double scale) {
  auto [C, D, N] = packed_geometry(qkv_in, num_heads, kAttnBwd);
  const auto dtype = attention_dtype(qkv_in, kAttnBwd, "qkv", D);
  const int64_t B = qkv_in.size(0);
  check_same(dout_in, qkv_in, kAttnBwd, "dout", "qkv");
  check_same(o_in, qkv_in, kAttnBwd, "o", "qkv");
  check_shape(dout_in, {B, N, C}, kAttnBwd, "dout");
  check_shape(o_in, {B, N, C}, kAttnBwd, "o");
  check_shape(lse_in, {B, num_heads, N}, kAttnBwd, "lse");
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, kAttnBwd, ": lse must be float32, got ", lse_in.scalar_type());
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
  set_params_attention_fwd(f, base, s, base + C * esize, s, base + 2 * C * esize, s, o.data_ptr(),
                           packed_strides(o, D), lse.data_ptr<float>(), B, num_heads, N, N, D, scale, dtype);
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

std::tuple<Tensor, Tensor> sdpa_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double scale) {
  check_bhnd(q_in, k_in, v_in, kSdpaFwd);
  const int64_t B = q_in.size(0), H = q_in.size(1), n_q = q_in.size(2), n_kv = k_in.size(2), D = q_in.size(3);
  const auto dtype = attention_dtype(q_in, kSdpaFwd, "q", D);
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
  check_launch(fastvit::run_attention_fwd(p, launch.stream), kSdpaFwd);
  return {o, lse};
}

std::tuple<Tensor, Tensor, Tensor> sdpa_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                            const Tensor& v_in, const Tensor& o_in, const Tensor& lse_in,
                                            double scale) {
  check_bhnd(q_in, k_in, v_in, kSdpaBwd);
  const int64_t B = q_in.size(0), H = q_in.size(1), n_q = q_in.size(2), n_kv = k_in.size(2), D = q_in.size(3);
  const auto dtype = attention_dtype(q_in, kSdpaBwd, "q", D);
  check_same(dout_in, q_in, kSdpaBwd, "dout", "q");
  check_same(o_in, q_in, kSdpaBwd, "o", "q");
  check_shape(dout_in, q_in.sizes(), kSdpaBwd, "dout");
  check_shape(o_in, q_in.sizes(), kSdpaBwd, "o");
  check_shape(lse_in, {B, H, n_q}, kSdpaBwd, "lse");
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, kSdpaBwd, ": lse must be float32, got ", lse_in.scalar_type());
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
  fastvit::AttentionBwdParams p;
  set_params_attention_bwd(p, f, dout.data_ptr(), bhnd_strides(dout), dq.data_ptr(), bhnd_strides(dq),
                           dk.data_ptr(), bhnd_strides(dk), dv.data_ptr(), bhnd_strides(dv));
  run_attention_bwd_with_workspace(p, q, launch, kSdpaBwd);
  return {dq, dk, dv};
}

// ------------------------------------------------------------------------------------------- layer norm
constexpr const char* kLnFwd = "fastvit::layer_norm_fwd_cuda";
constexpr const char* kLnBwd = "fastvit::layer_norm_bwd_cuda";

void check_vector(const OptTensor& t, const Tensor& ref, int64_t C, const char* op, const char* name,
                  const char* ref_name) {
  if (!t.has_value()) return;
  check_same(*t, ref, op, name, ref_name);
  check_shape(*t, {C}, op, name);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight_in,
                                                          const OptTensor& bias_in, const OptTensor& residual,
                                                          double eps) {
  check_cuda(x, kLnFwd, "x");
  const auto dtype = dtype_of(x, kLnFwd, "x", /*allow_fp32=*/true);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, kLnFwd, ": x must have a non-empty last dim, got ", x.sizes());
  TORCH_CHECK_VALUE(eps >= 0, kLnFwd, ": eps must be >= 0, got ", eps);
  const int64_t C = x.size(-1);
  check_vector(weight_in, x, C, kLnFwd, "weight", "x");
  check_vector(bias_in, x, C, kLnFwd, "bias", "x");
  if (residual.has_value()) {
    check_same(*residual, x, kLnFwd, "residual", "x");
    check_shape(*residual, x.sizes(), kLnFwd, "residual");
  }
  Launch launch(x);
  Tensor x2 = rows(x, C);
  const int64_t M = x2.size(0);
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor h = residual.has_value() ? at::empty(x.sizes(), x.options()) : empty0(x);
  Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, h, mean, rstd};
  OptTensor weight = weight_in.has_value() ? OptTensor(weight_in->contiguous()) : std::nullopt;
  OptTensor bias = bias_in.has_value() ? OptTensor(bias_in->contiguous()) : std::nullopt;
  Tensor r2 = residual.has_value() ? rows(*residual, C) : x2;
  fastvit::LayerNormFwdParams p;
  p.x = x2.data_ptr(); p.x_row_stride = x2.stride(0);
  p.residual = residual.has_value() ? r2.data_ptr() : nullptr; p.residual_row_stride = r2.stride(0);
  p.weight = opt_ptr(weight); p.bias = opt_ptr(bias);
  p.y = y.data_ptr(); p.y_row_stride = C;
  p.h_out = residual.has_value() ? h.data_ptr() : nullptr; p.h_row_stride = C;
  p.mean = mean.data_ptr<float>(); p.rstd = rstd.data_ptr<float>();
  p.M = M; p.C = C; p.eps = static_cast<float>(eps); p.dtype = dtype;
  check_launch(fastvit::run_layer_norm_fwd(p, launch.stream), kLnFwd);
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const OptTensor& dh, const Tensor& h,
                                                  const OptTensor& weight_in, const Tensor& mean, const Tensor& rstd,
                                                  bool has_bias) {
  check_cuda(h, kLnBwd, "h");
  const auto dtype = dtype_of(h, kLnBwd, "h", /*allow_fp32=*/true);
  TORCH_CHECK_VALUE(h.dim() >= 1 && h.size(-1) > 0, kLnBwd, ": h must have a non-empty last dim, got ", h.sizes());
  const int64_t C = h.size(-1);
  check_same(dy, h, kLnBwd, "dy", "h");
  check_shape(dy, h.sizes(), kLnBwd, "dy");
  if (dh.has_value()) {
    check_same(*dh, h, kLnBwd, "dh", "h");
    check_shape(*dh, h.sizes(), kLnBwd, "dh");
  }
  check_vector(weight_in, h, C, kLnBwd, "weight", "h");
  const int64_t M = h.numel() / C;
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{mean, "mean"}, {rstd, "rstd"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kLnBwd, ": ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.numel() == M && t.device() == h.device(), kLnBwd, ": ", name, " must hold ", M,
                      " values on ", h.device(), ", got shape ", t.sizes(), " on ", t.device());
  }
  Launch launch(h);
  Tensor h2 = rows(h, C), dy2 = rows(dy, C);
  Tensor dh2 = dh.has_value() ? rows(*dh, C) : dy2;
  Tensor dx = at::empty(h.sizes(), h.options());
  const bool compute_dw = weight_in.has_value();
  Tensor dw = compute_dw ? at::empty({C}, h.options()) : empty0(h);
  Tensor db = has_bias ? at::empty({C}, h.options()) : empty0(h);
  if (M == 0) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  OptTensor weight = compute_dw ? OptTensor(weight_in->contiguous()) : std::nullopt;
  Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  fastvit::LayerNormBwdParams p;
  p.dy = dy2.data_ptr(); p.dy_row_stride = dy2.stride(0);
  p.dh = dh.has_value() ? dh2.data_ptr() : nullptr; p.dh_row_stride = dh2.stride(0);
  p.h = h2.data_ptr(); p.h_row_stride = h2.stride(0);
  p.weight = opt_ptr(weight);
  p.mean = mean_c.data_ptr<float>(); p.rstd = rstd_c.data_ptr<float>();
  p.dx = dx.data_ptr(); p.dx_row_stride = C;
  p.dweight = compute_dw ? dw.data_ptr() : nullptr;
  p.dbias = has_bias ? db.data_ptr() : nullptr;
  p.M = M; p.C = C;
  p.has_weight = compute_dw; p.compute_dw = compute_dw; p.compute_db = has_bias; p.dtype = dtype;
  Tensor workspace = alloc_workspace(fastvit::layer_norm_bwd_workspace_bytes(p), h.options(), &p.workspace);
  check_launch(fastvit::run_layer_norm_bwd(p, launch.stream), kLnBwd);
  return {dx, dw, db};
}

// ------------------------------------------------------------------------------------------- linear
constexpr const char* kGeluFwd = "fastvit::linear_gelu_fwd_cuda";
constexpr const char* kGeluBwd = "fastvit::linear_gelu_bwd_cuda";
constexpr const char* kResFwd = "fastvit::linear_residual_fwd_cuda";
constexpr const char* kResBwd = "fastvit::linear_residual_bwd_cuda";

// Checks x (..., K) against weight (N, K); returns the dtype.
fastvit::DType check_linear(const Tensor& x, const Tensor& weight, const char* op) {
  check_cuda(x, op, "x");
  const auto dtype = dtype_of(x, op, "x", /*allow_fp32=*/false);
  check_same(weight, x, op, "weight", "x");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x's last dim must equal weight's "
                    "in_features ", weight.size(1), ", got x of shape ", x.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(K % fastvit::kLinearAlignment == 0 && N % fastvit::kLinearAlignment == 0, op,
                    ": in_features (", K, ") and out_features (", N, ") must be multiples of ",
                    fastvit::kLinearAlignment, " for the CUDA GEMMs (weight shape ", weight.sizes(), ")");
  const int64_t M = K ? x.numel() / K : 0;
  TORCH_CHECK_VALUE(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, op, ": the CUTLASS GEMMs take at most 2^31 - 1 "
                    "rows (x has ", M, " rows of ", K, " features; weight has shape ", weight.sizes(), ")");
  return dtype;
}

bool gelu_tanh(const std::string& approximate, const char* op) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", op,
                    ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

std::vector<int64_t> out_shape(const Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = N;
  return s;
}

std::tuple<Tensor, Tensor> linear_gelu_fwd(const Tensor& x, const Tensor& weight_in, const OptTensor& bias_in,
                                           const std::string& approximate, bool save_h) {
  const auto dtype = check_linear(x, weight_in, kGeluFwd);
  const bool tanh = gelu_tanh(approximate, kGeluFwd);
  const int64_t N = weight_in.size(0), K = weight_in.size(1);
  check_vector(bias_in, x, N, kGeluFwd, "bias", "x");
  Launch launch(x);
  Tensor x2 = gemm_rows(x, K), w = gemm_rows(weight_in, K);
  OptTensor bias = bias_in.has_value() ? OptTensor(vector_aligned(bias_in->contiguous())) : std::nullopt;
  const int64_t M = x2.size(0);
  Tensor y = at::empty(out_shape(x, N), x.options());
  Tensor h = save_h ? at::empty(out_shape(x, N), x.options()) : empty0(x);
  if (y.numel() == 0) return {y, h};
  fastvit::LinearGeluFwdParams p;
  p.dtype = dtype; p.M = M; p.N = N; p.K = K;
  p.x = x2.data_ptr(); p.ldx = x2.stride(0);
  p.weight = w.data_ptr(); p.ldw = w.stride(0);
  p.bias = opt_ptr(bias);
  p.y = y.data_ptr(); p.ldy = N;
  p.h = save_h ? h.data_ptr() : nullptr; p.ldh = N;
  p.gelu_tanh = tanh;
  check_launch(fastvit::run_linear_gelu_fwd(p, launch.stream), kGeluFwd);
  return {y, h};
}

std::tuple<Tensor, Tensor, Tensor> linear_gelu_bwd(const Tensor& dy, const Tensor& x, const Tensor& weight_in,
                                                   const Tensor& h, const std::string& approximate, bool has_bias) {
  const auto dtype = check_linear(x, weight_in, kGeluBwd);
  const bool tanh = gelu_tanh(approximate, kGeluBwd);
  const int64_t N = weight_in.size(0), K = weight_in.size(1);
  const auto shape = out_shape(x, N);
  check_same(dy, x, kGeluBwd, "dy", "x");
  check_shape(dy, shape, kGeluBwd, "dy");
  check_same(h, x, kGeluBwd, "h", "x");
  check_shape(h, shape, kGeluBwd, "h");
  Launch launch(x);
  Tensor x2 = gemm_rows(x, K), w = gemm_rows(weight_in, K);
  Tensor dy2 = gemm_rows(dy, N), h2 = gemm_rows(h, N);
  const int64_t M = x2.size(0);
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dw = at::empty({N, K}, x.options());
  Tensor db = has_bias ? at::empty({N}, x.options()) : empty0(x);
  fastvit::LinearGeluBwdParams p;
  p.dtype = dtype; p.M = M; p.N = N; p.K = K;
  p.dy = dy2.data_ptr(); p.lddy = dy2.stride(0);
  p.x = x2.data_ptr(); p.ldx = x2.stride(0);
  p.weight = w.data_ptr(); p.ldw = w.stride(0);
  p.h = h2.data_ptr(); p.ldh = h2.stride(0);
  p.gelu_tanh = tanh; p.has_bias = has_bias;
  p.dx = dx.data_ptr(); p.lddx = K;
  p.dweight = dw.data_ptr(); p.lddw = K;
  p.dbias = has_bias ? db.data_ptr() : nullptr;
  Tensor workspace = alloc_workspace(fastvit::linear_gelu_bwd_workspace_bytes(p), x.options(), &p.workspace);
  check_launch(fastvit::run_linear_gelu_bwd(p, launch.stream), kGeluBwd);
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor> linear_residual_fwd(const Tensor& x, const Tensor& weight_in, const OptTensor& bias_in,
                                               const Tensor& residual, const OptTensor& gamma_in, bool save_z) {
  const auto dtype = check_linear(x, weight_in, kResFwd);
  const int64_t N = weight_in.size(0), K = weight_in.size(1);
  const auto shape = out_shape(x, N);
  check_vector(bias_in, x, N, kResFwd, "bias", "x");
  check_vector(gamma_in, x, N, kResFwd, "gamma", "x");
  check_same(residual, x, kResFwd, "residual", "x");
  check_shape(residual, shape, kResFwd, "residual");
  Launch launch(x);
  Tensor x2 = gemm_rows(x, K), w = gemm_rows(weight_in, K), r2 = gemm_rows(residual, N);
  OptTensor bias = bias_in.has_value() ? OptTensor(vector_aligned(bias_in->contiguous())) : std::nullopt;
  OptTensor gamma = gamma_in.has_value() ? OptTensor(vector_aligned(gamma_in->contiguous())) : std::nullopt;
  const int64_t M = x2.size(0);
  Tensor y = at::empty(shape, x.options());
  Tensor z = save_z ? at::empty(shape, x.options()) : empty0(x);
  if (y.numel() == 0) return {y, z};
  fastvit::LinearResidualFwdParams p;
  p.dtype = dtype; p.M = M; p.N = N; p.K = K;
  p.x = x2.data_ptr(); p.ldx = x2.stride(0);
  p.weight = w.data_ptr(); p.ldw = w.stride(0);
  p.bias = opt_ptr(bias); p.gamma = opt_ptr(gamma);
  p.residual = r2.data_ptr(); p.ldr = r2.stride(0);
  p.y = y.data_ptr(); p.ldy = N;
  p.z = save_z ? z.data_ptr() : nullptr; p.ldz = N;
  check_launch(fastvit::run_linear_residual_fwd(p, launch.stream), kResFwd);
  return {y, z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_residual_bwd(const Tensor& dy, const Tensor& x,
                                                               const Tensor& weight_in, const OptTensor& gamma_in,
                                                               const OptTensor& z_in, bool has_bias) {
  const auto dtype = check_linear(x, weight_in, kResBwd);
  const int64_t N = weight_in.size(0), K = weight_in.size(1);
  const auto shape = out_shape(x, N);
  check_same(dy, x, kResBwd, "dy", "x");
  check_shape(dy, shape, kResBwd, "dy");
  check_vector(gamma_in, x, N, kResBwd, "gamma", "x");
  if (z_in.has_value()) {
    check_same(*z_in, x, kResBwd, "z", "x");
    check_shape(*z_in, shape, kResBwd, "z");
  }
  Launch launch(x);
  Tensor x2 = gemm_rows(x, K), w = gemm_rows(weight_in, K), dy2 = gemm_rows(dy, N);
  OptTensor gamma = gamma_in.has_value() ? OptTensor(vector_aligned(gamma_in->contiguous())) : std::nullopt;
  OptTensor z2 = z_in.has_value() ? OptTensor(gemm_rows(*z_in, N)) : std::nullopt;
  const bool want_dgamma = gamma.has_value() && z2.has_value();
  const int64_t M = x2.size(0);
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dw = at::empty({N, K}, x.options());
  Tensor db = has_bias ? at::empty({N}, x.options()) : empty0(x);
  Tensor dgamma = want_dgamma ? at::empty({N}, x.options()) : empty0(x);
  fastvit::LinearResidualBwdParams p;
  p.dtype = dtype; p.M = M; p.N = N; p.K = K;
  p.dy = dy2.data_ptr(); p.lddy = dy2.stride(0);
  p.x = x2.data_ptr(); p.ldx = x2.stride(0);
  p.weight = w.data_ptr(); p.ldw = w.stride(0);
  p.gamma = opt_ptr(gamma);
  p.z = z2.has_value() ? z2->data_ptr() : nullptr; p.ldz = z2.has_value() ? z2->stride(0) : 0;
  p.has_bias = has_bias;
  p.dx = dx.data_ptr(); p.lddx = K;
  p.dweight = dw.data_ptr(); p.lddw = K;
  p.dbias = has_bias ? db.data_ptr() : nullptr;
  p.dgamma = want_dgamma ? dgamma.data_ptr() : nullptr;
  Tensor workspace = alloc_workspace(fastvit::linear_residual_bwd_workspace_bytes(p), x.options(), &p.workspace);
  check_launch(fastvit::run_linear_residual_bwd(p, launch.stream), kResBwd);
  return {dx, dw, db, dgamma};
}

// ------------------------------------------------------------------------------------------- patch embed
constexpr const char* kPeFwd = "fastvit::patch_embed_fwd_cuda";
constexpr const char* kPeBwd = "fastvit::patch_embed_bwd_cuda";

struct PatchGeometry { int64_t B, C, Hi, Wi, E, Ph, Pw, Np; };

PatchGeometry check_patch(const Tensor& images, const Tensor& weight, const char* op) {
  check_cuda(images, op, "images");
  dtype_of(images, op, "images", /*allow_fp32=*/false);
  check_same(weight, images, op, "weight", "images");
  TORCH_CHECK_VALUE(images.dim() == 4, op, ": images must have shape (B, C, H, W), got ", images.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == images.size(1), op,
                    ": weight must have shape (E, ", images.size(1), ", Ph, Pw), got ", weight.sizes());
  PatchGeometry g{images.size(0), images.size(1), images.size(2), images.size(3),
                  weight.size(0), weight.size(2), weight.size(3), 0};
  TORCH_CHECK_VALUE(g.Ph > 0 && g.Pw > 0 && g.Hi % g.Ph == 0 && g.Wi % g.Pw == 0, op, ": images spatial size ", g.Hi,
                    "x", g.Wi, " is not divisible by the patch size ", g.Ph, "x", g.Pw);
  TORCH_CHECK_VALUE(g.E % 8 == 0, op, ": the embed dim E (weight.shape[0] = ", g.E, ") must be a multiple of 8");
  TORCH_CHECK_VALUE(g.B <= 65535, op, ": at most 65535 images per call (the batched GEMM puts the batch on the CUDA ",
                    "grid's z dimension), got a batch of ", g.B);
  g.Np = (g.Hi / g.Ph) * (g.Wi / g.Pw);
  return g;
}

// N_keep: ids_keep's (B, N_keep <= Np) second dim, or Np without ids_keep.
int64_t check_ids_keep(const OptTensor& ids_keep, const Tensor& images, const PatchGeometry& g, const char* op) {
  if (!ids_keep.has_value()) return g.Np;
  check_index(*ids_keep, images, op, "ids_keep");
  TORCH_CHECK_VALUE(ids_keep->size(0) == g.B && ids_keep->size(1) <= g.Np, op, ": ids_keep must have shape (", g.B,
                    ", N_keep <= ", g.Np, "), got ", ids_keep->sizes());
  return ids_keep->size(1);
}

Tensor patch_embed_fwd(const Tensor& images, const Tensor& weight_in, const OptTensor& bias_in,
                       const OptTensor& pos_in, const OptTensor& cls_in, const OptTensor& reg_in,
                       const OptTensor& ids_in) {
  const auto g = check_patch(images, weight_in, kPeFwd);
  const auto dtype = dtype_of(images, kPeFwd, "images", false);
  check_vector(bias_in, images, g.E, kPeFwd, "bias", "images");
  const int64_t n_cls = cls_in.has_value() ? 1 : 0;
  int64_t n_reg = 0;
  if (cls_in.has_value()) {
    check_same(*cls_in, images, kPeFwd, "cls_token", "images");
    check_shape(*cls_in, {1, 1, g.E}, kPeFwd, "cls_token");
  }
  if (reg_in.has_value()) {
    check_same(*reg_in, images, kPeFwd, "reg_tokens", "images");
    TORCH_CHECK_VALUE(reg_in->dim() == 3 && reg_in->size(0) == 1 && reg_in->size(2) == g.E, kPeFwd,
                      ": reg_tokens must have shape (1, R, ", g.E, "), got ", reg_in->sizes());
    n_reg = reg_in->size(1);
  }
  const int64_t R = n_cls + n_reg;
  int64_t pos_len = 0;
  if (pos_in.has_value()) {
    check_same(*pos_in, images, kPeFwd, "pos_embed", "images");
    pos_len = pos_in->dim() == 3 ? pos_in->size(1) : -1;
    TORCH_CHECK_VALUE(pos_in->dim() == 3 && pos_in->size(0) == 1 && pos_in->size(2) == g.E &&
                          (pos_len == g.Np || pos_len == g.Np + R),
                      kPeFwd, ": pos_embed must have shape (1, L, ", g.E, ") with L = ", g.Np, " or ", g.Np + R,
                      ", got ", pos_in->sizes());
  }
  const int64_t n_keep = check_ids_keep(ids_in, images, g, kPeFwd);
  Launch launch(images);
  // Read as one flat (E, K) matrix: only its start must be aligned (align 1: K = C * Ph * Pw may be odd, and a
  // stride check would copy the weight on every call).
  Tensor weight = vector_aligned(weight_in.contiguous(), /*align=*/1);
  OptTensor bias = bias_in.has_value() ? OptTensor(vector_aligned(bias_in->contiguous())) : std::nullopt;
  OptTensor pos = pos_in.has_value() ? OptTensor(vector_aligned(pos_in->contiguous())) : std::nullopt;
  OptTensor cls = cls_in.has_value() ? OptTensor(cls_in->contiguous()) : std::nullopt;
  OptTensor reg = reg_in.has_value() ? OptTensor(reg_in->contiguous()) : std::nullopt;
  OptTensor ids = ids_in.has_value() ? OptTensor(ids_in->contiguous()) : std::nullopt;
  Tensor out = at::empty({g.B, R + n_keep, g.E}, images.options());
  if (out.numel() == 0) return out;
  fastvit::PatchEmbedFwdParams p;
  p.dtype = dtype;
  p.B = g.B; p.C = g.C; p.Hi = g.Hi; p.Wi = g.Wi; p.E = g.E; p.Ph = g.Ph; p.Pw = g.Pw;
  p.images = images.data_ptr();
  p.img_stride_b = images.stride(0); p.img_stride_c = images.stride(1);
  p.img_stride_h = images.stride(2); p.img_stride_w = images.stride(3);
  p.weight = weight.data_ptr();
  p.bias = opt_ptr(bias);
  p.pos_embed = opt_ptr(pos); p.pos_len = pos_len; p.pos_stride_t = g.E;
  p.cls_token = opt_ptr(cls);
  p.reg_tokens = opt_ptr(reg); p.n_reg = n_reg;
  p.ids_keep = ids.has_value() ? ids->data_ptr<int64_t>() : nullptr;
  p.ids_stride_b = ids.has_value() ? ids->stride(0) : 0;
  p.n_keep = n_keep;
  p.out = out.data_ptr(); p.out_stride_b = out.stride(0); p.out_stride_t = out.stride(1);
  Tensor workspace = alloc_workspace(fastvit::patch_embed_fwd_workspace_bytes(p), images.options(), &p.workspace);
  check_launch(fastvit::run_patch_embed_fwd(p, launch.stream), kPeFwd);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> patch_embed_bwd(
    const Tensor& dout_in, const Tensor& images, const Tensor& weight_in, const OptTensor& ids_in, int64_t pos_len,
    int64_t n_cls, int64_t n_reg, bool compute_dimages) {
  const auto g = check_patch(images, weight_in, kPeBwd);
  const auto dtype = dtype_of(images, kPeBwd, "images", false);
  TORCH_CHECK_VALUE(n_cls == 0 || n_cls == 1, kPeBwd, ": n_cls must be 0 or 1, got ", n_cls);
  TORCH_CHECK_VALUE(n_reg >= 0, kPeBwd, ": n_reg must be >= 0, got ", n_reg);
  const int64_t R = n_cls + n_reg;
  TORCH_CHECK_VALUE(pos_len == 0 || pos_len == g.Np || pos_len == g.Np + R, kPeBwd, ": pos_len must be 0, ", g.Np,
                    " or ", g.Np + R, ", got ", pos_len);
  const int64_t n_keep = check_ids_keep(ids_in, images, g, kPeBwd);
  check_same(dout_in, images, kPeBwd, "dout", "images");
  check_shape(dout_in, {g.B, R + n_keep, g.E}, kPeBwd, "dout");
  Launch launch(images);
  Tensor dout = vector_aligned(dout_in.contiguous());
  // Read as one flat (E, K) matrix: only its start must be aligned (align 1: K = C * Ph * Pw may be odd, and a
  // stride check would copy the weight on every call).
  Tensor weight = vector_aligned(weight_in.contiguous(), /*align=*/1);
  OptTensor ids = ids_in.has_value() ? OptTensor(ids_in->contiguous()) : std::nullopt;
  const auto opts = images.options();
  Tensor dimg = compute_dimages ? at::empty(images.sizes(), opts) : empty0(images);
  Tensor dw = at::empty(weight.sizes(), opts);
  Tensor db = at::empty({g.E}, opts);
  Tensor dpos = pos_len ? at::empty({1, pos_len, g.E}, opts) : empty0(images);
  Tensor dcls = at::empty({1, n_cls, g.E}, opts);
  Tensor dreg = at::empty({1, n_reg, g.E}, opts);
  fastvit::PatchEmbedBwdParams p;
  p.dtype = dtype;
  p.B = g.B; p.C = g.C; p.Hi = g.Hi; p.Wi = g.Wi; p.E = g.E; p.Ph = g.Ph; p.Pw = g.Pw;
  p.dout = dout.data_ptr(); p.dout_stride_b = dout.stride(0); p.dout_stride_t = dout.stride(1);
  p.images = images.data_ptr();
  p.img_stride_b = images.stride(0); p.img_stride_c = images.stride(1);
  p.img_stride_h = images.stride(2); p.img_stride_w = images.stride(3);
  p.weight = weight.data_ptr();
  p.ids_keep = ids.has_value() ? ids->data_ptr<int64_t>() : nullptr;
  p.ids_stride_b = ids.has_value() ? ids->stride(0) : 0;
  p.n_keep = n_keep; p.n_cls = n_cls; p.n_reg = n_reg; p.pos_len = pos_len;
  if (compute_dimages) {
    p.dimages = dimg.data_ptr();
    p.dimg_stride_b = dimg.stride(0); p.dimg_stride_c = dimg.stride(1);
    p.dimg_stride_h = dimg.stride(2); p.dimg_stride_w = dimg.stride(3);
  }
  p.dweight = dw.data_ptr();
  p.dbias = db.data_ptr();
  p.dpos = pos_len ? dpos.data_ptr() : nullptr;
  p.dcls = n_cls ? dcls.data_ptr() : nullptr;
  p.dreg = n_reg ? dreg.data_ptr() : nullptr;
  Tensor workspace = alloc_workspace(fastvit::patch_embed_bwd_workspace_bytes(p), opts, &p.workspace);
  check_launch(fastvit::run_patch_embed_bwd(p, launch.stream), kPeBwd);
  return {dimg, dw, db, dpos, dcls, dreg};
}

// ------------------------------------------------------------------------------------------- MAE
constexpr const char* kUnFwd = "fastvit::mae_unshuffle_fwd_cuda";
constexpr const char* kUnBwd = "fastvit::mae_unshuffle_bwd_cuda";
constexpr const char* kLossFwd = "fastvit::mae_loss_fwd_cuda";
constexpr const char* kLossBwd = "fastvit::mae_loss_bwd_cuda";

Tensor mae_unshuffle_fwd(const Tensor& x_in, const Tensor& mask_token, const Tensor& ids_in, const OptTensor& pos_in) {
  check_cuda(x_in, kUnFwd, "x");
  const auto dtype = dtype_of(x_in, kUnFwd, "x", true);
  TORCH_CHECK_VALUE(x_in.dim() == 3, kUnFwd, ": x must have shape (B, 1 + N_keep, C), got ", x_in.sizes());
  const int64_t B = x_in.size(0), T = x_in.size(1), C = x_in.size(2);
  check_same(mask_token, x_in, kUnFwd, "mask_token", "x");
  check_shape(mask_token, {1, 1, C}, kUnFwd, "mask_token");
  check_index(ids_in, x_in, kUnFwd, "ids_restore");
  const int64_t N = ids_in.size(1);
  TORCH_CHECK_VALUE(ids_in.size(0) == B && T >= 1 && T <= N + 1, kUnFwd, ": ids_restore must have shape (", B,
                    ", N) with x holding 1 + N_keep <= 1 + N tokens; got ids_restore ", ids_in.sizes(), ", x ",
                    x_in.sizes());
  if (pos_in.has_value()) {
    check_same(*pos_in, x_in, kUnFwd, "pos_embed", "x");
    check_shape(*pos_in, {1, N + 1, C}, kUnFwd, "pos_embed");
  }
  Launch launch(x_in);
  Tensor x = (C <= 1 || x_in.stride(2) == 1) ? x_in : x_in.contiguous();  // the kernel takes (b, t) strides
  Tensor mt = mask_token.reshape({C}).contiguous();
  Tensor ids = ids_in.contiguous();
  OptTensor pos = pos_in.has_value() ? OptTensor(pos_in->reshape({N + 1, C}).contiguous()) : std::nullopt;
  Tensor out = at::empty({B, N + 1, C}, x.options());
  if (out.numel() == 0) return out;
  fastvit::MaeUnshuffleFwdParams p;
  p.x = x.data_ptr(); p.x_stride_b = x.stride(0); p.x_stride_t = x.stride(1);
  p.mask_token = mt.data_ptr();
  p.ids_restore = ids.data_ptr<int64_t>(); p.ids_stride_b = ids.stride(0);
  p.pos_embed = opt_ptr(pos); p.pos_stride_t = C;
  p.out = out.data_ptr(); p.out_stride_b = out.stride(0); p.out_stride_t = out.stride(1);
  p.B = B; p.N = N; p.N_keep = T - 1; p.C = C; p.dtype = dtype;
  check_launch(fastvit::run_mae_unshuffle_fwd(p, launch.stream), kUnFwd);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> mae_unshuffle_bwd(const Tensor& dout_in, const Tensor& ids_in, int64_t n_keep,
                                                     bool has_pos) {
  check_cuda(dout_in, kUnBwd, "dout");
  const auto dtype = dtype_of(dout_in, kUnBwd, "dout", true);
  TORCH_CHECK_VALUE(dout_in.dim() == 3, kUnBwd, ": dout must have shape (B, 1 + N, C), got ", dout_in.sizes());
  const int64_t B = dout_in.size(0), T = dout_in.size(1), C = dout_in.size(2), N = T - 1;
  check_index(ids_in, dout_in, kUnBwd, "ids_restore");
  check_shape(ids_in, {B, N}, kUnBwd, "ids_restore");
  TORCH_CHECK_VALUE(n_keep >= 0 && n_keep <= N, kUnBwd, ": n_keep must lie in [0, ", N, "], got ", n_keep);
  Launch launch(dout_in);
  Tensor dout = dout_in.contiguous();
  Tensor ids = ids_in.contiguous();
  const auto opts = dout.options();
  Tensor dx = at::empty({B, 1 + n_keep, C}, opts);
  Tensor dmask = at::empty({1, 1, C}, opts);
  Tensor dpos = has_pos ? at::empty({1, T, C}, opts) : empty0(dout);
  if (B == 0 || C == 0) {
    dmask.zero_();
    if (has_pos) dpos.zero_();
    return {dx, dmask, dpos};
  }
  fastvit::MaeUnshuffleBwdParams p;
  p.dout = dout.data_ptr(); p.dout_stride_b = dout.stride(0); p.dout_stride_t = dout.stride(1);
  p.ids_restore = ids.data_ptr<int64_t>(); p.ids_stride_b = ids.stride(0);
  p.dx = dx.data_ptr(); p.dx_stride_b = dx.stride(0); p.dx_stride_t = dx.stride(1);
  p.dmask_token = dmask.data_ptr();
  p.dpos = has_pos ? dpos.data_ptr() : nullptr; p.dpos_stride_t = C;
  p.B = B; p.N = N; p.N_keep = n_keep; p.C = C; p.has_pos = has_pos; p.dtype = dtype;
  Tensor workspace = alloc_workspace(fastvit::mae_unshuffle_bwd_workspace_bytes(p), opts, &p.workspace);
  check_launch(fastvit::run_mae_unshuffle_bwd(p, launch.stream), kUnBwd);
  return {dx, dmask, dpos};
}

// Patch grid of a (pred, images, patch_size) triple; checks the shapes.
std::tuple<int64_t, int64_t> check_loss(const Tensor& pred, const Tensor& images, int64_t P, const char* op) {
  check_cuda(pred, op, "pred");
  check_same(images, pred, op, "images", "pred");
  TORCH_CHECK_VALUE(P >= 1, op, ": patch_size must be >= 1, got ", P);
  TORCH_CHECK_VALUE(images.dim() == 4 && images.size(2) % P == 0 && images.size(3) % P == 0, op,
                    ": images must have shape (B, C, H, W) with H and W divisible by patch_size ", P, ", got ",
                    images.sizes());
  const int64_t B = images.size(0), C = images.size(1), N = (images.size(2) / P) * (images.size(3) / P);
  check_shape(pred, {B, N, P * P * C}, op, "pred");
  return {B, N};
}

Tensor mae_loss_fwd(const Tensor& pred_in, const Tensor& images, int64_t patch_size, bool norm_pix) {
  auto [B, N] = check_loss(pred_in, images, patch_size, kLossFwd);
  const auto dtype = dtype_of(pred_in, kLossFwd, "pred", true);
  Launch launch(pred_in);
  Tensor pred = (pred_in.size(2) <= 1 || pred_in.stride(2) == 1) ? pred_in : pred_in.contiguous();
  Tensor row = at::empty({B, N}, pred.options().dtype(at::kFloat));
  if (row.numel() == 0) return row;
  fastvit::MaeLossFwdParams p;
  p.pred = pred.data_ptr(); p.pred_stride_b = pred.stride(0); p.pred_stride_n = pred.stride(1);
  p.images = images.data_ptr();
  p.img_stride_b = images.stride(0); p.img_stride_c = images.stride(1);
  p.img_stride_h = images.stride(2); p.img_stride_w = images.stride(3);
  p.row_loss = row.data_ptr<float>();
  p.B = B; p.N = N; p.C = images.size(1); p.Hi = images.size(2); p.Wi = images.size(3); p.P = patch_size;
  p.norm_pix = norm_pix; p.dtype = dtype;
  check_launch(fastvit::run_mae_loss_fwd(p, launch.stream), kLossFwd);
  return row;
}

std::tuple<Tensor, Tensor> mae_loss_bwd(const Tensor& drow_in, const Tensor& pred_in, const Tensor& images,
                                        int64_t patch_size, bool norm_pix, bool compute_dimages) {
  auto [B, N] = check_loss(pred_in, images, patch_size, kLossBwd);
  const auto dtype = dtype_of(pred_in, kLossBwd, "pred", true);
  TORCH_CHECK_VALUE(drow_in.device() == pred_in.device(), kLossBwd, ": drow is on ", drow_in.device(),
                    " but pred is on ", pred_in.device());
  check_shape(drow_in, {B, N}, kLossBwd, "drow");
  Launch launch(pred_in);
  Tensor drow = drow_in.to(at::kFloat).contiguous();
  Tensor pred = pred_in.contiguous();
  Tensor dpred = at::empty(pred.sizes(), pred.options());
  Tensor dimg = compute_dimages ? at::empty(images.sizes(), images.options()) : empty0(images);
  if (pred.numel() == 0) return {dpred, dimg.zero_()};
  fastvit::MaeLossBwdParams p;
  p.drow = drow.data_ptr<float>(); p.drow_stride_b = drow.stride(0); p.drow_stride_n = drow.stride(1);
  p.pred = pred.data_ptr(); p.pred_stride_b = pred.stride(0); p.pred_stride_n = pred.stride(1);
  p.images = images.data_ptr();
  p.img_stride_b = images.stride(0); p.img_stride_c = images.stride(1);
  p.img_stride_h = images.stride(2); p.img_stride_w = images.stride(3);
  p.dpred = dpred.data_ptr(); p.dpred_stride_b = dpred.stride(0); p.dpred_stride_n = dpred.stride(1);
  if (compute_dimages) {
    p.dimages = dimg.data_ptr();
    p.dimg_stride_b = dimg.stride(0); p.dimg_stride_c = dimg.stride(1);
    p.dimg_stride_h = dimg.stride(2); p.dimg_stride_w = dimg.stride(3);
  }
  p.B = B; p.N = N; p.C = images.size(1); p.Hi = images.size(2); p.Wi = images.size(3); p.P = patch_size;
  p.norm_pix = norm_pix; p.compute_dimages = compute_dimages; p.dtype = dtype;
  check_launch(fastvit::run_mae_loss_bwd(p, launch.stream), kLossBwd);
  return {dpred, dimg};
}

// ------------------------------------------------------------------------------------------- build info
pybind11::dict build_info() {
  const fastvit::BuildInfo info = fastvit::build_info();
  pybind11::dict d;
  d["archs"] = std::string(info.archs);
  d["cuda_runtime_version"] = info.cuda_runtime_version;
  d["cutlass_version"] = std::to_string(info.cutlass_major) + "." + std::to_string(info.cutlass_minor) + "." +
                         std::to_string(info.cutlass_patch);
  d["minimal"] = info.minimal;
  d["half_dtypes"] = std::string(info.half_dtypes);
  d["attention_head_dim_buckets"] = std::string(info.attention_head_dim_buckets);
  return d;
}

}  // namespace

// Schemas: identical to the Triton ops of fastvit/_triton*.py, with the _cuda suffix.
TORCH_LIBRARY(fastvit, m) {
  m.set_python_module("fastvit._cuda");
  m.def("attention_fwd_cuda(Tensor qkv, int num_heads, float scale) -> (Tensor, Tensor)");
  m.def("attention_bwd_cuda(Tensor do, Tensor qkv, Tensor o, Tensor lse, int num_heads, float scale) -> Tensor");
  m.def("sdpa_fwd_cuda(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("sdpa_bwd_cuda(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_fwd_cuda(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd_cuda(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("linear_gelu_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, str approximate, bool save_h) "
        "-> (Tensor, Tensor)");
  m.def("linear_gelu_bwd_cuda(Tensor dy, Tensor x, Tensor weight, Tensor h, str approximate, bool has_bias) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_residual_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor? gamma, "
        "bool save_z) -> (Tensor, Tensor)");
  m.def("linear_residual_bwd_cuda(Tensor dy, Tensor x, Tensor weight, Tensor? gamma, Tensor? z, bool has_bias) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("patch_embed_fwd_cuda(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? cls_token, "
        "Tensor? reg_tokens, Tensor? ids_keep) -> Tensor");
  m.def("patch_embed_bwd_cuda(Tensor dout, Tensor images, Tensor weight, Tensor? ids_keep, int pos_len, int n_cls, "
        "int n_reg, bool compute_dimages) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mae_unshuffle_fwd_cuda(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor");
  m.def("mae_unshuffle_bwd_cuda(Tensor dout, Tensor ids_restore, int n_keep, bool has_pos) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mae_loss_fwd_cuda(Tensor pred, Tensor images, int patch_size, bool norm_pix) -> Tensor");
  m.def("mae_loss_bwd_cuda(Tensor drow, Tensor pred, Tensor images, int patch_size, bool norm_pix, "
        "bool compute_dimages) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("attention_fwd_cuda", &attention_fwd);
  m.impl("attention_bwd_cuda", &attention_bwd);
  m.impl("sdpa_fwd_cuda", &sdpa_fwd);
  m.impl("sdpa_bwd_cuda", &sdpa_bwd);
  m.impl("layer_norm_fwd_cuda", &layer_norm_fwd);
  m.impl("layer_norm_bwd_cuda", &layer_norm_bwd);
  m.impl("linear_gelu_fwd_cuda", &linear_gelu_fwd);
  m.impl("linear_gelu_bwd_cuda", &linear_gelu_bwd);
  m.impl("linear_residual_fwd_cuda", &linear_residual_fwd);
  m.impl("linear_residual_bwd_cuda", &linear_residual_bwd);
  m.impl("patch_embed_fwd_cuda", &patch_embed_fwd);
  m.impl("patch_embed_bwd_cuda", &patch_embed_bwd);
  m.impl("mae_unshuffle_fwd_cuda", &mae_unshuffle_fwd);
  m.impl("mae_unshuffle_bwd_cuda", &mae_unshuffle_bwd);
  m.impl("mae_loss_fwd_cuda", &mae_loss_fwd);
  m.impl("mae_loss_bwd_cuda", &mae_loss_bwd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvit CUDA C++ kernels; the ops are registered under torch.ops.fastvit.*_cuda";
  m.def("build_info", &build_info,
        "What this build compiled: archs (nvcc's __CUDA_ARCH_LIST__), cuda_runtime_version, cutlass_version, "
        "minimal, half_dtypes, attention_head_dim_buckets");
}
