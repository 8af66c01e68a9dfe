// fastvit._C binding of the LayerNorm and the RMSNorm with an optional residual add: layer_norm_{fwd,bwd}_cuda,
// rms_norm_{fwd,bwd}_cuda (the same kernels and params, run_rms_norm_* launchers).
//
// This family's schemas (a TORCH_LIBRARY_FRAGMENT(fastvit): namespace fastvit, suffix _cuda, identical to the Triton
// ops of fastvit/families/layer_norm.py, whose fakes and autograd register against them) and its
// TORCH_LIBRARY_IMPL(fastvit, CUDA) fragment: for every op, input checks that name the argument and what was
// expected, the fill of the kernel's plain params struct (set_params_*), the launch on torch's current stream and its
// CUDA error mapped to a Python exception. The helpers shared by the families are in csrc/common/binding.h.
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <utility>

#include "common/binding.h"
#include "layer_norm/layer_norm.h"

namespace {

using namespace fastvit::binding;

constexpr const char* kLnFwd = "fastvit::layer_norm_fwd_cuda";
constexpr const char* kLnBwd = "fastvit::layer_norm_bwd_cuda";
constexpr const char* kRmsFwd = "fastvit::rms_norm_fwd_cuda";
constexpr const char* kRmsBwd = "fastvit::rms_norm_bwd_cuda";

// The forward of both ops: (y, h, mean, rstd). With rms (RMSNorm: no bias) `mean` is an undefined tensor, which
// rms_norm_fwd drops. `op` names the op in errors.
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x, const OptTensor& weight_in,
                                                    const OptTensor& bias_in, const OptTensor& residual, double eps,
                                                    bool rms, const char* op) {
  check_cuda(x, op, "x");
  const auto dtype = dtype_of(x, op, "x", /*allow_fp32=*/true);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dim, got ", x.sizes());
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const int64_t C = x.size(-1);
  check_vector(weight_in, x, C, op, "weight", "x");
  check_vector(bias_in, x, C, op, "bias", "x");
  if (residual.has_value()) {
    check_same(*residual, x, op, "residual", "x");
    check_shape(*residual, x.sizes(), op, "residual");
  }
  Launch launch(x);
  Tensor x2 = rows(x, C);
  const int64_t M = x2.size(0);
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor h = residual.has_value() ? at::empty(x.sizes(), x.options()) : empty0(x);
  Tensor mean = rms ? Tensor() : at::empty({M}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, h, mean, rstd};
  OptTensor weight = weight_in.has_value() ? OptTensor(weight_in->contiguous()) : std::nullopt;
  OptTensor bias = bias_in.has_value() ? OptTensor(bias_in->contiguous()) : std::nullopt;
  Tensor r2 = residual.has_value() ? rows(*residual, C) : x2;
  fastvit::LayerNormFwdParams p;
  p.x = x2.data_ptr();
  p.x_row_stride = x2.stride(0);
  p.residual = residual.has_value() ? r2.data_ptr() : nullptr;
  p.residual_row_stride = r2.stride(0);
  p.weight = opt_ptr(weight);
  p.bias = opt_ptr(bias);
  p.y = y.data_ptr();
  p.y_row_stride = C;
  p.h_out = residual.has_value() ? h.data_ptr() : nullptr;
  p.h_row_stride = C;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.M = M;
  p.C = C;
  p.eps = static_cast<float>(eps);
  p.dtype = dtype;
  check_launch(rms ? fastvit::run_rms_norm_fwd(p, launch.stream) : fastvit::run_layer_norm_fwd(p, launch.stream), op);
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight,
                                                          const OptTensor& bias, const OptTensor& residual,
                                                          double eps) {
  return norm_fwd(x, weight, bias, residual, eps, /*rms=*/false, kLnFwd);
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x, const OptTensor& weight, const OptTensor& residual,
                                                double eps) {
  auto out = norm_fwd(x, weight, std::nullopt, residual, eps, /*rms=*/true, kRmsFwd);
  return {std::get<0>(out), std::get<1>(out), std::get<3>(out)};  // (y, h, rstd)
}

// The backward of both ops: (dx, dweight, dbias). `mean` is required for the LayerNorm and absent with rms (RMSNorm:
// has_bias false, dbias empty, which rms_norm_bwd drops). `op` names the op in errors.
std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy, const OptTensor& dh, const Tensor& h,
                                            const OptTensor& weight_in, const OptTensor& mean, const Tensor& rstd,
                                            bool has_bias, bool rms, const char* op) {
  check_cuda(h, op, "h");
  const auto dtype = dtype_of(h, op, "h", /*allow_fp32=*/true);
  TORCH_CHECK_VALUE(h.dim() >= 1 && h.size(-1) > 0, op, ": h must have a non-empty last dim, got ", h.sizes());
  const int64_t C = h.size(-1);
  check_same(dy, h, op, "dy", "h");
  check_shape(dy, h.sizes(), op, "dy");
  if (dh.has_value()) {
    check_same(*dh, h, op, "dh", "h");
    check_shape(*dh, h.sizes(), op, "dh");
  }
  check_vector(weight_in, h, C, op, "weight", "h");
  const int64_t M = h.numel() / C;
  TORCH_INTERNAL_ASSERT(mean.has_value() != rms);  // the LayerNorm has a mean, the RMSNorm none
  auto check_stat = [&](const Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.numel() == M && t.device() == h.device(), op, ": ", name, " must hold ", M, " values on ",
                      h.device(), ", got shape ", t.sizes(), " on ", t.device());
  };
  if (mean.has_value()) check_stat(*mean, "mean");
  check_stat(rstd, "rstd");
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
  Tensor mean_c = mean.has_value() ? mean->contiguous() : Tensor(), rstd_c = rstd.contiguous();
  fastvit::LayerNormBwdParams p;
  p.dy = dy2.data_ptr();
  p.dy_row_stride = dy2.stride(0);
  p.dh = dh.has_value() ? dh2.data_ptr() : nullptr;
  p.dh_row_stride = dh2.stride(0);
  p.h = h2.data_ptr();
  p.h_row_stride = h2.stride(0);
  p.weight = opt_ptr(weight);
  p.mean = mean.has_value() ? mean_c.data_ptr<float>() : nullptr;
  p.rstd = rstd_c.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dx_row_stride = C;
  p.dweight = compute_dw ? dw.data_ptr() : nullptr;
  p.dbias = has_bias ? db.data_ptr() : nullptr;
  p.M = M;
  p.C = C;
  p.has_weight = compute_dw;
  p.compute_dw = compute_dw;
  p.compute_db = has_bias;
  p.dtype = dtype;
  Tensor workspace = alloc_workspace(fastvit::layer_norm_bwd_workspace_bytes(p), h.options(), &p.workspace);
  check_launch(rms ? fastvit::run_rms_norm_bwd(p, launch.stream) : fastvit::run_layer_norm_bwd(p, launch.stream), op);
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const OptTensor& dh, const Tensor& h,
                                                  const OptTensor& weight, const Tensor& mean, const Tensor& rstd,
                                                  bool has_bias) {
  return norm_bwd(dy, dh, h, weight, mean, rstd, has_bias, /*rms=*/false, kLnBwd);
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const OptTensor& dh, const Tensor& h, const OptTensor& weight,
                                        const Tensor& rstd) {
  auto out = norm_bwd(dy, dh, h, weight, std::nullopt, rstd, /*has_bias=*/false, /*rms=*/true, kRmsBwd);
  return {std::get<0>(out), std::get<1>(out)};  // (dx, dweight)
}

}  // namespace

// Schemas of this family's ops, declared once (here); the kernels below implement them.
TORCH_LIBRARY_FRAGMENT(fastvit, m) {
  m.def("layer_norm_fwd_cuda(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd_cuda(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd_cuda(Tensor x, Tensor? weight, Tensor? residual, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd_cuda(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("layer_norm_fwd_cuda", &layer_norm_fwd);
  m.impl("layer_norm_bwd_cuda", &layer_norm_bwd);
  m.impl("rms_norm_fwd_cuda", &rms_norm_fwd);
  m.impl("rms_norm_bwd_cuda", &rms_norm_bwd);
}
