// fastvit._C binding of the patch embedding: patch_embed_{fwd,bwd}_cuda (im2col + GEMM + bias + pos-embed +
// cls / register tokens, optional MAE ids_keep).
//
// This family's schemas (a TORCH_LIBRARY_FRAGMENT(fastvit): namespace fastvit, suffix _cuda, identical to the Triton
// ops of fastvit/families/patch_embed.py, whose fakes and autograd register against them) and its
// TORCH_LIBRARY_IMPL(fastvit, CUDA) fragment: for every op, input checks that name the argument and what was
// expected, the fill of the kernel's plain params struct (set_params_*), the launch on torch's current stream and its
// CUDA error mapped to a Python exception. The helpers shared by the families are in csrc/common/binding.h.
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/binding.h"
#include "patch_embed/patch_embed.h"

namespace {

using namespace fastvit::binding;

constexpr const char* kPeFwd = "fastvit::patch_embed_fwd_cuda";
constexpr const char* kPeBwd = "fastvit::patch_embed_bwd_cuda";

struct PatchGeometry {
  int64_t B, C, Hi, Wi, E, Ph, Pw, Np;
};

PatchGeometry check_patch(const Tensor& images, const Tensor& weight, const char* op) {
  check_cuda(images, op, "images");
  dtype_of(images, op, "images", /*allow_fp32=*/false);
  check_same(weight, images, op, "weight", "images");
  TORCH_CHECK_VALUE(images.dim() == 4, op, ": images must have shape (B, C, H, W), got ", images.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == images.size(1), op, ": weight must have shape (E, ",
                    images.size(1), ", Ph, Pw), got ", weight.sizes());
  PatchGeometry g{images.size(0), images.size(1), images.size(2), images.size(3),
                  weight.size(0), weight.size(2), weight.size(3), 0};
  TORCH_CHECK_VALUE(g.Ph > 0 && g.Pw > 0 && g.Hi % g.Ph == 0 && g.Wi % g.Pw == 0, op, ": images spatial size ", g.Hi,
                    "x", g.Wi, " is not divisible by the patch size ", g.Ph, "x", g.Pw);
  TORCH_CHECK_VALUE(g.E % fastvit::kPatchEmbedAlignment == 0, op, ": the embed dim E (weight.shape[0] = ", g.E,
                    ") must be a multiple of ", fastvit::kPatchEmbedAlignment);
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

Tensor patch_embed_fwd(const Tensor& images, const Tensor& weight_in, const OptTensor& bias_in, const OptTensor& pos_in,
                       const OptTensor& cls_in, const OptTensor& reg_in, const OptTensor& ids_in) {
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
  p.B = g.B;
  p.C = g.C;
  p.Hi = g.Hi;
  p.Wi = g.Wi;
  p.E = g.E;
  p.Ph = g.Ph;
  p.Pw = g.Pw;
  p.images = images.data_ptr();
  p.img_stride_b = images.stride(0);
  p.img_stride_c = images.stride(1);
  p.img_stride_h = images.stride(2);
  p.img_stride_w = images.stride(3);
  p.weight = weight.data_ptr();
  p.bias = opt_ptr(bias);
  p.pos_embed = opt_ptr(pos);
  p.pos_len = pos_len;
  p.pos_stride_t = g.E;
  p.cls_token = opt_ptr(cls);
  p.reg_tokens = opt_ptr(reg);
  p.n_reg = n_reg;
  p.ids_keep = ids.has_value() ? ids->data_ptr<int64_t>() : nullptr;
  p.ids_stride_b = ids.has_value() ? ids->stride(0) : 0;
  p.n_keep = n_keep;
  p.out = out.data_ptr();
  p.out_stride_b = out.stride(0);
  p.out_stride_t = out.stride(1);
  Tensor workspace = alloc_workspace(fastvit::patch_embed_fwd_workspace_bytes(p), images.options(), &p.workspace);
  check_launch(fastvit::run_patch_embed_fwd(p, launch.stream), kPeFwd);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> patch_embed_bwd(const Tensor& dout_in, const Tensor& images,
                                                                           const Tensor& weight_in,
                                                                           const OptTensor& ids_in, int64_t pos_len,
                                                                           int64_t n_cls, int64_t n_reg,
                                                                           bool compute_dimages) {
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
  p.B = g.B;
  p.C = g.C;
  p.Hi = g.Hi;
  p.Wi = g.Wi;
  p.E = g.E;
  p.Ph = g.Ph;
  p.Pw = g.Pw;
  p.dout = dout.data_ptr();
  p.dout_stride_b = dout.stride(0);
  p.dout_stride_t = dout.stride(1);
  p.images = images.data_ptr();
  p.img_stride_b = images.stride(0);
  p.img_stride_c = images.stride(1);
  p.img_stride_h = images.stride(2);
  p.img_stride_w = images.stride(3);
  p.weight = weight.data_ptr();
  p.ids_keep = ids.has_value() ? ids->data_ptr<int64_t>() : nullptr;
  p.ids_stride_b = ids.has_value() ? ids->stride(0) : 0;
  p.n_keep = n_keep;
  p.n_cls = n_cls;
  p.n_reg = n_reg;
  p.pos_len = pos_len;
  if (compute_dimages) {
    p.dimages = dimg.data_ptr();
    p.dimg_stride_b = dimg.stride(0);
    p.dimg_stride_c = dimg.stride(1);
    p.dimg_stride_h = dimg.stride(2);
    p.dimg_stride_w = dimg.stride(3);
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

}  // namespace

// Schemas of this family's ops, declared once (here); the kernels below implement them.
TORCH_LIBRARY_FRAGMENT(fastvit, m) {
  m.def("patch_embed_fwd_cuda(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? cls_token, "
        "Tensor? reg_tokens, Tensor? ids_keep) -> Tensor");
  m.def("patch_embed_bwd_cuda(Tensor dout, Tensor images, Tensor weight, Tensor? ids_keep, int pos_len, int n_cls, "
        "int n_reg, bool compute_dimages) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("patch_embed_fwd_cuda", &patch_embed_fwd);
  m.impl("patch_embed_bwd_cuda", &patch_embed_bwd);
}
