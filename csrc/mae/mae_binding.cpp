// fastvit._C binding of the MAE masked-token ops: mae_unshuffle_{fwd,bwd}_cuda and mae_loss_{fwd,bwd}_cuda.
//
// This family's schemas (a TORCH_LIBRARY_FRAGMENT(fastvit): namespace fastvit, suffix _cuda, identical to the Triton
// ops of fastvit/families/mae.py, whose fakes and autograd register against them) and its
// TORCH_LIBRARY_IMPL(fastvit, CUDA) fragment: for every op, input checks that name the argument and what was
// expected, the fill of the kernel's plain params struct (set_params_*), the launch on torch's current stream and its
// CUDA error mapped to a Python exception. The helpers shared by the families are in csrc/common/binding.h.
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/binding.h"
#include "mae/mae.h"

namespace {

using namespace fastvit::binding;

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
  p.x = x.data_ptr();
  p.x_stride_b = x.stride(0);
  p.x_stride_t = x.stride(1);
  p.mask_token = mt.data_ptr();
  p.ids_restore = ids.data_ptr<int64_t>();
  p.ids_stride_b = ids.stride(0);
  p.pos_embed = opt_ptr(pos);
  p.pos_stride_t = C;
  p.out = out.data_ptr();
  p.out_stride_b = out.stride(0);
  p.out_stride_t = out.stride(1);
  p.B = B;
  p.N = N;
  p.N_keep = T - 1;
  p.C = C;
  p.dtype = dtype;
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
  p.dout = dout.data_ptr();
  p.dout_stride_b = dout.stride(0);
  p.dout_stride_t = dout.stride(1);
  p.ids_restore = ids.data_ptr<int64_t>();
  p.ids_stride_b = ids.stride(0);
  p.dx = dx.data_ptr();
  p.dx_stride_b = dx.stride(0);
  p.dx_stride_t = dx.stride(1);
  p.dmask_token = dmask.data_ptr();
  p.dpos = has_pos ? dpos.data_ptr() : nullptr;
  p.dpos_stride_t = C;
  p.B = B;
  p.N = N;
  p.N_keep = n_keep;
  p.C = C;
  p.has_pos = has_pos;
  p.dtype = dtype;
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
  p.pred = pred.data_ptr();
  p.pred_stride_b = pred.stride(0);
  p.pred_stride_n = pred.stride(1);
  p.images = images.data_ptr();
  p.img_stride_b = images.stride(0);
  p.img_stride_c = images.stride(1);
  p.img_stride_h = images.stride(2);
  p.img_stride_w = images.stride(3);
  p.row_loss = row.data_ptr<float>();
  p.B = B;
  p.N = N;
  p.C = images.size(1);
  p.Hi = images.size(2);
  p.Wi = images.size(3);
  p.P = patch_size;
  p.norm_pix = norm_pix;
  p.dtype = dtype;
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
  p.drow = drow.data_ptr<float>();
  p.drow_stride_b = drow.stride(0);
  p.drow_stride_n = drow.stride(1);
  p.pred = pred.data_ptr();
  p.pred_stride_b = pred.stride(0);
  p.pred_stride_n = pred.stride(1);
  p.images = images.data_ptr();
  p.img_stride_b = images.stride(0);
  p.img_stride_c = images.stride(1);
  p.img_stride_h = images.stride(2);
  p.img_stride_w = images.stride(3);
  p.dpred = dpred.data_ptr();
  p.dpred_stride_b = dpred.stride(0);
  p.dpred_stride_n = dpred.stride(1);
  if (compute_dimages) {
    p.dimages = dimg.data_ptr();
    p.dimg_stride_b = dimg.stride(0);
    p.dimg_stride_c = dimg.stride(1);
    p.dimg_stride_h = dimg.stride(2);
    p.dimg_stride_w = dimg.stride(3);
  }
  p.B = B;
  p.N = N;
  p.C = images.size(1);
  p.Hi = images.size(2);
  p.Wi = images.size(3);
  p.P = patch_size;
  p.norm_pix = norm_pix;
  p.compute_dimages = compute_dimages;
  p.dtype = dtype;
  check_launch(fastvit::run_mae_loss_bwd(p, launch.stream), kLossBwd);
  return {dpred, dimg};
}

}  // namespace

// Schemas of this family's ops, declared once (here); the kernels below implement them.
TORCH_LIBRARY_FRAGMENT(fastvit, m) {
  m.def("mae_unshuffle_fwd_cuda(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor");
  m.def("mae_unshuffle_bwd_cuda(Tensor dout, Tensor ids_restore, int n_keep, bool has_pos) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mae_loss_fwd_cuda(Tensor pred, Tensor images, int patch_size, bool norm_pix) -> Tensor");
  m.def("mae_loss_bwd_cuda(Tensor drow, Tensor pred, Tensor images, int patch_size, bool norm_pix, "
        "bool compute_dimages) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("mae_unshuffle_fwd_cuda", &mae_unshuffle_fwd);
  m.impl("mae_unshuffle_bwd_cuda", &mae_unshuffle_bwd);
  m.impl("mae_loss_fwd_cuda", &mae_loss_fwd);
  m.impl("mae_loss_bwd_cuda", &mae_loss_bwd);
}
