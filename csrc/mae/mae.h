// fastvit CUDA C++: MAE decoder un-shuffle and reconstruction loss, forward and backward (torch-free interface).
//
// Semantics are those of the Triton ops fastvit::mae_unshuffle_fwd / _bwd and fastvit::mae_loss_fwd / _bwd
// (kernels/mae.py) and of fastvit.reference.mae_unshuffle / mae_loss (He et al., "Masked Autoencoders Are
// Scalable Vision Learners", CVPR 2022; facebookresearch/mae models_mae.py).
//
// Un-shuffle (T = 1 + N output tokens, N_keep kept tokens, r = ids_restore[b, j]):
//   out[b, 0]     = x[b, 0]                                   (+ pos[0])
//   out[b, 1 + j] = (r < N_keep ? x[b, 1 + r] : mask_token)   (+ pos[1 + j])     add in fp32, round once
// Un-shuffle backward:
//   dx[b, 0] = dout[b, 0];  dx[b, 1 + r] = dout[b, 1 + j] for every j with r = ids_restore[b, j] < N_keep
//   dmask_token = sum_b sum_{j : r >= N_keep} dout[b, 1 + j];   dpos = sum_b dout[b]      (fp32, fixed order)
// ids_restore[b] must be a permutation of 0..N-1 (as MAE's argsort gives): then every dx row has exactly one
// writer. Values outside [0, N_keep) are treated as masked tokens (never an out-of-bounds access).
//
// Loss (K = P * P * C, patch n at grid position (n / grid_w, n % grid_w), grid_w = Wi / P):
//   target[b, n, k] = images[b, c, (n / grid_w) * P + p, (n % grid_w) * P + q],  k = (p * P + q) * C + c
//   norm_pix:  target = (t - mean_k t) / sqrt(var_k t + 1e-6), var unbiased (K = 1 gives NaN, as torch.var)
//   row[b, n] = mean_k (pred[b, n, k] - target[b, n, k])^2                                  (fp32)
// Loss backward (drow = d loss / d row, fp32):
//   dpred   = drow * 2 * (pred - target) / K
//   dimages = d/d images through the target (with norm_pix: (gt - mean(gt) - that * sum(gt * that) / (K - 1))
//             / sigma, gt = -dpred, that = normalised target); every pixel of the patch grid belongs to exactly
//             one patch, so it is a plain scatter (no atomics). Pixels outside the grid (Hi or Wi not a multiple
//             of P) are not written.
//
// Float tensors of one call share `dtype` (fp16 / bf16 / fp32); indices are int64; losses / drow / workspace are
// fp32. Strides are in elements; the last (feature / K) dim of every token tensor is contiguous. Launchers return
// cudaSuccess without launching for empty problems, cudaErrorInvalidValue for inconsistent sizes, and the first
// CUDA error otherwise.
#pragma once

#include "common/common.h"

namespace fastvit {

struct MaeUnshuffleFwdParams {
  const void* x = nullptr;           // (B, 1 + N_keep, C) dtype; strides x_stride_b, x_stride_t, 1
  const void* mask_token = nullptr;  // (C,) dtype, contiguous
  const int64_t* ids_restore = nullptr;  // (B, N) int64; strides ids_stride_b, 1
  const void* pos_embed = nullptr;   // (1 + N, C) dtype; strides pos_stride_t, 1; nullable (no position add)
  void* out = nullptr;               // (B, 1 + N, C) dtype; strides out_stride_b, out_stride_t, 1
  int64_t B = 0;                     // batch
  int64_t N = 0;                     // patch tokens of the decoder (ids_restore.shape[1]); out has 1 + N tokens
  int64_t N_keep = 0;                // kept tokens (x has 1 + N_keep tokens), 0 <= N_keep <= N
  int64_t C = 0;                     // decoder embed dim
  int64_t x_stride_b = 0, x_stride_t = 0;
  int64_t ids_stride_b = 0;
  int64_t pos_stride_t = 0;
  int64_t out_stride_b = 0, out_stride_t = 0;
  DType dtype = DType::kFloat32;     // element type of x, mask_token, pos_embed, out
};

struct MaeUnshuffleBwdParams {
  const void* dout = nullptr;        // (B, 1 + N, C) dtype; strides dout_stride_b, dout_stride_t, 1
  const int64_t* ids_restore = nullptr;  // (B, N) int64; strides ids_stride_b, 1
  void* dx = nullptr;                // (B, 1 + N_keep, C) dtype; strides dx_stride_b, dx_stride_t, 1
  void* dmask_token = nullptr;       // (C,) dtype, contiguous
  void* dpos = nullptr;              // (1 + N, C) dtype; strides dpos_stride_t, 1; written iff has_pos
  void* workspace = nullptr;         // fp32 scratch of mae_unshuffle_bwd_workspace_bytes(*this) bytes
                                     //   (16-byte aligned, uninitialised is fine)
  int64_t B = 0, N = 0, N_keep = 0, C = 0;
  int64_t dout_stride_b = 0, dout_stride_t = 0;
  int64_t ids_stride_b = 0;
  int64_t dx_stride_b = 0, dx_stride_t = 0;
  int64_t dpos_stride_t = 0;
  bool has_pos = false;              // compute dpos
  DType dtype = DType::kFloat32;     // element type of dout, dx, dmask_token, dpos
};

struct MaeLossFwdParams {
  const void* pred = nullptr;        // (B, N, K) dtype; strides pred_stride_b, pred_stride_n, 1
  const void* images = nullptr;      // (B, C, Hi, Wi) dtype; arbitrary strides img_stride_{b,c,h,w}
  float* row_loss = nullptr;         // (B, N) fp32, contiguous: mean_k (pred - target)^2
  int64_t B = 0;
  int64_t N = 0;                     // patches, must equal (Hi / P) * (Wi / P)
  int64_t C = 0;                     // image channels
  int64_t Hi = 0, Wi = 0;            // image height / width in pixels
  int64_t P = 0;                     // patch size (square patches); K = P * P * C
  int64_t pred_stride_b = 0, pred_stride_n = 0;
  int64_t img_stride_b = 0, img_stride_c = 0, img_stride_h = 0, img_stride_w = 0;
  bool norm_pix = false;             // per-patch normalised target (MAE's norm_pix_loss)
  DType dtype = DType::kFloat32;     // element type of pred and images
};

struct MaeLossBwdParams {
  const float* drow = nullptr;       // (B, N) fp32; strides drow_stride_b, drow_stride_n (0 allowed: expanded)
  const void* pred = nullptr;        // (B, N, K) dtype; strides pred_stride_b, pred_stride_n, 1
  const void* images = nullptr;      // (B, C, Hi, Wi) dtype; strides img_stride_{b,c,h,w}
  void* dpred = nullptr;             // (B, N, K) dtype; strides dpred_stride_b, dpred_stride_n, 1
  void* dimages = nullptr;           // (B, C, Hi, Wi) dtype; strides dimg_stride_{b,c,h,w}; written iff
                                     //   compute_dimages
  int64_t B = 0, N = 0, C = 0, Hi = 0, Wi = 0, P = 0;
  int64_t drow_stride_b = 0, drow_stride_n = 0;
  int64_t pred_stride_b = 0, pred_stride_n = 0;
  int64_t img_stride_b = 0, img_stride_c = 0, img_stride_h = 0, img_stride_w = 0;
  int64_t dpred_stride_b = 0, dpred_stride_n = 0;
  int64_t dimg_stride_b = 0, dimg_stride_c = 0, dimg_stride_h = 0, dimg_stride_w = 0;
  bool norm_pix = false;
  bool compute_dimages = false;
  DType dtype = DType::kFloat32;     // element type of pred, images, dpred, dimages
};

cudaError_t run_mae_unshuffle_fwd(const MaeUnshuffleFwdParams& params, cudaStream_t stream);

// Bytes of fp32 scratch for the d mask_token partial sums (depends on N and C only).
size_t mae_unshuffle_bwd_workspace_bytes(const MaeUnshuffleBwdParams& params);
cudaError_t run_mae_unshuffle_bwd(const MaeUnshuffleBwdParams& params, cudaStream_t stream);

cudaError_t run_mae_loss_fwd(const MaeLossFwdParams& params, cudaStream_t stream);
cudaError_t run_mae_loss_bwd(const MaeLossBwdParams& params, cudaStream_t stream);

}  // namespace fastvit
