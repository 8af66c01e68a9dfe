// fastvit._C binding of the LayerNorm with an optional residual add: layer_norm_{fwd,bwd}_cuda.
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
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.M = M;
  p.C = C;
  p.eps = static_cast<float>(eps);
  p.dtype = dtype;
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
    TORCH_CHECK_VALUE(t.numel() == M && t.device() == h.device(), kLnBwd, ": ", name, " must hold ", M, " values on ",
                      h.device(), ", got shape ", t.sizes(), " on ", t.device());
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
  p.dy = dy2.data_ptr();
  p.dy_row_stride = dy2.stride(0);
  p.dh = dh.has_value() ? dh2.data_ptr() : nullptr;
  p.dh_row_stride = dh2.stride(0);
  p.h = h2.data_ptr();
  p.h_row_stride = h2.stride(0);
  p.weight = opt_ptr(weight);
  p.mean = mean_c.data_ptr<float>();
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
  check_launch(fastvit::run_layer_norm_bwd(p, launch.stream), kLnBwd);
  return {dx, dw, db};
}

}  // namespace

// Schemas of this family's ops, declared once (here); the kernels below implement them.
TORCH_LIBRARY_FRAGMENT(fastvit, m) {
  m.def("layer_norm_fwd_cuda(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd_cuda(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool has_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("layer_norm_fwd_cuda", &layer_norm_fwd);
  m.impl("layer_norm_bwd_cuda", &layer_norm_bwd);
}
