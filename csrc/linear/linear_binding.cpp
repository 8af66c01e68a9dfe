// fastvit._C binding of the GEMMs with fused epilogues: linear_gelu_{fwd,bwd}_cuda (bias + GELU),
// linear_residual_{fwd,bwd}_cuda (bias + LayerScale + residual) and linear_glu_{fwd,bwd}_cuda (a gated MLP's fc1:
// gate and value GEMMs with the gating epilogue).
//
// This family's schemas (a TORCH_LIBRARY_FRAGMENT(fastvit): namespace fastvit, suffix _cuda, identical to the Triton
// ops of fastvit/families/linear.py, whose fakes and autograd register against them) and its
// TORCH_LIBRARY_IMPL(fastvit, CUDA) fragment: for every op, input checks that name the argument and what was
// expected, the fill of the kernel's plain params struct (set_params_*), the launch on torch's current stream and its
// CUDA error mapped to a Python exception. The helpers shared by the families are in csrc/common/binding.h.
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "common/binding.h"
#include "linear/linear.h"

namespace {

using namespace fastvit::binding;

constexpr const char* kGeluFwd = "fastvit::linear_gelu_fwd_cuda";
constexpr const char* kGeluBwd = "fastvit::linear_gelu_bwd_cuda";
constexpr const char* kResFwd = "fastvit::linear_residual_fwd_cuda";
constexpr const char* kResBwd = "fastvit::linear_residual_bwd_cuda";
constexpr const char* kGluFwd = "fastvit::linear_glu_fwd_cuda";
constexpr const char* kGluBwd = "fastvit::linear_glu_bwd_cuda";

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

// Checks x (..., K) against weight (N, K); returns the dtype.
fastvit::DType check_linear(const Tensor& x, const Tensor& weight, const char* op) {
  check_cuda(x, op, "x");
  const auto dtype = dtype_of(x, op, "x", /*allow_fp32=*/false);
  check_same(weight, x, op, "weight", "x");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), op,
                    ": x's last dim must equal weight's "
                    "in_features ",
                    weight.size(1), ", got x of shape ", x.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(K % fastvit::kLinearAlignment == 0 && N % fastvit::kLinearAlignment == 0, op, ": in_features (", K,
                    ") and out_features (", N, ") must be multiples of ", fastvit::kLinearAlignment,
                    " for the CUDA GEMMs (weight shape ", weight.sizes(), ")");
  const int64_t M = K ? x.numel() / K : 0;
  TORCH_CHECK_VALUE(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, op,
                    ": the CUTLASS GEMMs take at most 2^31 - 1 "
                    "rows (x has ",
                    M, " rows of ", K, " features; weight has shape ", weight.sizes(), ")");
  return dtype;
}

bool gelu_tanh(const std::string& approximate, const char* op) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", op, ": approximate must be 'none' or 'tanh', got '",
                    approximate, "'");
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
  p.dtype = dtype;
  p.M = M;
  p.N = N;
  p.K = K;
  p.x = x2.data_ptr();
  p.ldx = x2.stride(0);
  p.weight = w.data_ptr();
  p.ldw = w.stride(0);
  p.bias = opt_ptr(bias);
  p.y = y.data_ptr();
  p.ldy = N;
  p.h = save_h ? h.data_ptr() : nullptr;
  p.ldh = N;
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
  p.dtype = dtype;
  p.M = M;
  p.N = N;
  p.K = K;
  p.dy = dy2.data_ptr();
  p.lddy = dy2.stride(0);
  p.x = x2.data_ptr();
  p.ldx = x2.stride(0);
  p.weight = w.data_ptr();
  p.ldw = w.stride(0);
  p.h = h2.data_ptr();
  p.ldh = h2.stride(0);
  p.gelu_tanh = tanh;
  p.has_bias = has_bias;
  p.dx = dx.data_ptr();
  p.lddx = K;
  p.dweight = dw.data_ptr();
  p.lddw = K;
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
  p.dtype = dtype;
  p.M = M;
  p.N = N;
  p.K = K;
  p.x = x2.data_ptr();
  p.ldx = x2.stride(0);
  p.weight = w.data_ptr();
  p.ldw = w.stride(0);
  p.bias = opt_ptr(bias);
  p.gamma = opt_ptr(gamma);
  p.residual = r2.data_ptr();
  p.ldr = r2.stride(0);
  p.y = y.data_ptr();
  p.ldy = N;
  p.z = save_z ? z.data_ptr() : nullptr;
  p.ldz = N;
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
  p.dtype = dtype;
  p.M = M;
  p.N = N;
  p.K = K;
  p.dy = dy2.data_ptr();
  p.lddy = dy2.stride(0);
  p.x = x2.data_ptr();
  p.ldx = x2.stride(0);
  p.weight = w.data_ptr();
  p.ldw = w.stride(0);
  p.gamma = opt_ptr(gamma);
  p.z = z2.has_value() ? z2->data_ptr() : nullptr;
  p.ldz = z2.has_value() ? z2->stride(0) : 0;
  p.has_bias = has_bias;
  p.dx = dx.data_ptr();
  p.lddx = K;
  p.dweight = dw.data_ptr();
  p.lddw = K;
  p.dbias = has_bias ? db.data_ptr() : nullptr;
  p.dgamma = want_dgamma ? dgamma.data_ptr() : nullptr;
  Tensor workspace = alloc_workspace(fastvit::linear_residual_bwd_workspace_bytes(p), x.options(), &p.workspace);
  check_launch(fastvit::run_linear_residual_bwd(p, launch.stream), kResBwd);
  return {dx, dw, db, dgamma};
}

fastvit::GluActivation glu_activation(const std::string& activation, const char* op) {
  if (activation == "silu") return fastvit::GluActivation::kSilu;
  if (activation == "gelu") return fastvit::GluActivation::kGeluErf;
  if (activation == "gelu_tanh") return fastvit::GluActivation::kGeluTanh;
  TORCH_CHECK_VALUE(activation == "sigmoid", op, ": activation must be 'silu', 'gelu', 'gelu_tanh' or 'sigmoid', got '",
                    activation, "'");
  return fastvit::GluActivation::kSigmoid;
}

// linear_glu's weights: weight_gate (N, K) as check_linear checks it, weight_value the same shape and dtype.
fastvit::DType check_glu(const Tensor& x, const Tensor& weight_gate, const Tensor& weight_value, const char* op) {
  const auto dtype = check_linear(x, weight_gate, op);
  check_same(weight_value, weight_gate, op, "weight_value", "weight_gate");
  check_shape(weight_value, weight_gate.sizes(), op, "weight_value");
  TORCH_CHECK_VALUE(2 * weight_gate.size(0) <= INT32_MAX, op, ": the gated width (", weight_gate.size(0),
                    ") must be at most 2^30 - 1 for the CUTLASS GEMMs of the backward");
  return dtype;
}

std::tuple<Tensor, Tensor> linear_glu_fwd(const Tensor& x, const Tensor& weight_gate, const OptTensor& bias_gate,
                                          const Tensor& weight_value, const OptTensor& bias_value,
                                          const std::string& activation, bool save_h) {
  const auto dtype = check_glu(x, weight_gate, weight_value, kGluFwd);
  const auto act = glu_activation(activation, kGluFwd);
  const int64_t N = weight_gate.size(0), K = weight_gate.size(1);
  check_vector(bias_gate, x, N, kGluFwd, "bias_gate", "x");
  check_vector(bias_value, x, N, kGluFwd, "bias_value", "x");
  Launch launch(x);
  Tensor x2 = gemm_rows(x, K), wg = gemm_rows(weight_gate, K), wx = gemm_rows(weight_value, K);
  OptTensor bg = bias_gate.has_value() ? OptTensor(vector_aligned(bias_gate->contiguous())) : std::nullopt;
  OptTensor bx = bias_value.has_value() ? OptTensor(vector_aligned(bias_value->contiguous())) : std::nullopt;
  const int64_t M = x2.size(0);
  Tensor y = at::empty(out_shape(x, N), x.options());
  Tensor h = save_h ? at::empty(out_shape(x, 2 * N), x.options()) : empty0(x);
  if (y.numel() == 0) return {y, h};
  fastvit::LinearGluFwdParams p;
  p.dtype = dtype;
  p.M = M;
  p.N = N;
  p.K = K;
  p.x = x2.data_ptr();
  p.ldx = x2.stride(0);
  p.weight = wg.data_ptr();
  p.ldw = wg.stride(0);
  p.bias = opt_ptr(bg);
  p.weight_value = wx.data_ptr();
  p.ldwv = wx.stride(0);
  p.bias_value = opt_ptr(bx);
  p.y = y.data_ptr();
  p.ldy = N;
  p.h = save_h ? h.data_ptr() : nullptr;
  p.ldh = 2 * N;
  p.activation = act;
  check_launch(fastvit::run_linear_glu_fwd(p, launch.stream), kGluFwd);
  return {y, h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_glu_bwd(const Tensor& dy, const Tensor& x,
                                                                  const Tensor& weight_gate, const Tensor& weight_value,
                                                                  const Tensor& h, const std::string& activation,
                                                                  bool has_bias) {
  const auto dtype = check_glu(x, weight_gate, weight_value, kGluBwd);
  const auto act = glu_activation(activation, kGluBwd);
  const int64_t N = weight_gate.size(0), K = weight_gate.size(1);
  check_same(dy, x, kGluBwd, "dy", "x");
  check_shape(dy, out_shape(x, N), kGluBwd, "dy");
  check_same(h, x, kGluBwd, "h", "x");
  check_shape(h, out_shape(x, 2 * N), kGluBwd, "h");
  Launch launch(x);
  Tensor x2 = gemm_rows(x, K), wg = gemm_rows(weight_gate, K), wx = gemm_rows(weight_value, K);
  Tensor dy2 = gemm_rows(dy, N), h2 = gemm_rows(h, 2 * N);
  const int64_t M = x2.size(0);
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dwg = at::empty({N, K}, x.options());
  Tensor dwx = at::empty({N, K}, x.options());
  Tensor dbg = has_bias ? at::empty({N}, x.options()) : empty0(x);
  Tensor dbx = has_bias ? at::empty({N}, x.options()) : empty0(x);
  fastvit::LinearGluBwdParams p;
  p.dtype = dtype;
  p.M = M;
  p.N = N;
  p.K = K;
  p.dy = dy2.data_ptr();
  p.lddy = dy2.stride(0);
  p.x = x2.data_ptr();
  p.ldx = x2.stride(0);
  p.weight = wg.data_ptr();
  p.ldw = wg.stride(0);
  p.weight_value = wx.data_ptr();
  p.ldwv = wx.stride(0);
  p.h = h2.data_ptr();
  p.ldh = h2.stride(0);
  p.activation = act;
  p.has_bias = has_bias;
  p.dx = dx.data_ptr();
  p.lddx = K;
  p.dweight = dwg.data_ptr();
  p.lddw = K;
  p.dweight_value = dwx.data_ptr();
  p.lddwv = K;
  p.dbias = has_bias ? dbg.data_ptr() : nullptr;
  p.dbias_value = has_bias ? dbx.data_ptr() : nullptr;
  Tensor workspace = alloc_workspace(fastvit::linear_glu_bwd_workspace_bytes(p), x.options(), &p.workspace);
  check_launch(fastvit::run_linear_glu_bwd(p, launch.stream), kGluBwd);
  return {dx, dwg, dwx, dbg, dbx};
}

}  // namespace

// Schemas of this family's ops, declared once (here); the kernels below implement them.
TORCH_LIBRARY_FRAGMENT(fastvit, m) {
  m.def("linear_gelu_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, str approximate, bool save_h) "
        "-> (Tensor, Tensor)");
  m.def("linear_gelu_bwd_cuda(Tensor dy, Tensor x, Tensor weight, Tensor h, str approximate, bool has_bias) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_residual_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor? gamma, "
        "bool save_z) -> (Tensor, Tensor)");
  m.def("linear_residual_bwd_cuda(Tensor dy, Tensor x, Tensor weight, Tensor? gamma, Tensor? z, bool has_bias) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_glu_fwd_cuda(Tensor x, Tensor weight_gate, Tensor? bias_gate, Tensor weight_value, "
        "Tensor? bias_value, str activation, bool save_h) -> (Tensor, Tensor)");
  m.def("linear_glu_bwd_cuda(Tensor dy, Tensor x, Tensor weight_gate, Tensor weight_value, Tensor h, "
        "str activation, bool has_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("linear_gelu_fwd_cuda", &linear_gelu_fwd);
  m.impl("linear_gelu_bwd_cuda", &linear_gelu_bwd);
  m.impl("linear_residual_fwd_cuda", &linear_residual_fwd);
  m.impl("linear_residual_bwd_cuda", &linear_residual_bwd);
  m.impl("linear_glu_fwd_cuda", &linear_glu_fwd);
  m.impl("linear_glu_bwd_cuda", &linear_glu_bwd);
}
