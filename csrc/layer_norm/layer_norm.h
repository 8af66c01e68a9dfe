// fastvit CUDA C++: fused residual-add + LayerNorm, forward and backward (torch-free interface).
//
// Semantics are those of the Triton ops fastvit::layer_norm_fwd / fastvit::layer_norm_bwd
// (kernels/layer_norm.py) and of fastvit.reference.layer_norm:
//
//   forward  (per row m of M rows, C features):
//     h    = x + residual        (fp32 add, rounded to the dtype and stored to h_out; only with residual)
//     h    = x                   (without residual; nothing is stored)
//     mean = sum_c h / C,  var = sum_c (h - mean)^2 / C   (biased, two-pass from registers, fp32)
//     rstd = 1 / sqrt(var + eps)
//     y    = (h - mean) * rstd * weight + bias            (weight / bias optional)
//   backward (h = the tensor that was normalised: h_out with residual, x without):
//     xhat = (h - mean) * rstd,  g = dy * weight (g = dy without weight)
//     dx   = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) + dh      (dh optional)
//     dw   = sum_rows dy * xhat,  db = sum_rows dy       (fp32, two deterministic stages, no atomics)
//
// The run_rms_norm_* launchers take the same params and compute RMSNorm instead (Zhang & Sennrich, 2019; the
// Triton ops fastvit::rms_norm_fwd / fastvit::rms_norm_bwd, fastvit.reference.rms_norm): mean is taken as 0 and
// neither read nor written (the mean pointers may be null), there is no bias (bias must be null, compute_db false):
//     rstd = 1 / sqrt(sum_c h^2 / C + eps),  y = h * rstd * weight
//     xhat = h * rstd,  dx = rstd * (g - xhat * mean_c(g * xhat)) + dh,  dw = sum_rows dy * xhat
// (The choice is the launcher's, not a params field: the structs, and so the LayerNorm kernels' parameter
// layout and code, are the same as before the RMSNorm.)
//
// All float tensors of one call share `dtype` (fp16 / bf16 / fp32); mean / rstd / the workspace are fp32.
// Tensors are 2-D row-major views: row m of C contiguous elements starts at ptr + m * stride (elements).
// Launchers return cudaSuccess without launching when C == 0 or (forward) M == 0; with M == 0 the backward
// still writes zeros to dweight / dbias (a sum over no rows). They return cudaErrorInvalidValue for negative
// sizes or a missing required pointer, and the first CUDA error otherwise.
#pragma once

#include "common/common.h"

namespace fastvit {

struct LayerNormFwdParams {
  // ---- inputs
  const void* x = nullptr;         // (M, C) dtype, row stride x_row_stride
  const void* residual = nullptr;  // (M, C) dtype, row stride residual_row_stride; nullable (no residual add)
  const void* weight = nullptr;    // (C,) dtype, contiguous; nullable (weight = 1)
  const void* bias = nullptr;      // (C,) dtype, contiguous; nullable (bias = 0)
  // ---- outputs
  void* y = nullptr;               // (M, C) dtype, row stride y_row_stride
  void* h_out = nullptr;           // (M, C) dtype, row stride h_row_stride; written iff residual != nullptr
                                   //   (must then be non-null), ignored otherwise
  float* mean = nullptr;           // (M,) fp32, contiguous; unused (may be null) by run_rms_norm_fwd
  float* rstd = nullptr;           // (M,) fp32, contiguous
  // ---- sizes / strides (elements)
  int64_t M = 0;                   // rows (product of the leading dims)
  int64_t C = 0;                   // features (normalised dim), any C >= 1
  int64_t x_row_stride = 0;
  int64_t residual_row_stride = 0;
  int64_t y_row_stride = 0;
  int64_t h_row_stride = 0;
  float eps = 1e-6f;               // added to the biased variance (RMSNorm: to the mean square)
  DType dtype = DType::kFloat32;   // element type of x, residual, weight, bias, y, h_out
};

struct LayerNormBwdParams {
  // ---- inputs
  const void* dy = nullptr;        // (M, C) dtype, row stride dy_row_stride: gradient of y
  const void* dh = nullptr;        // (M, C) dtype, row stride dh_row_stride; nullable: gradient arriving on the
                                   //   h output of the forward (residual case), added to dx
  const void* h = nullptr;         // (M, C) dtype, row stride h_row_stride: the normalised input (forward's h_out
                                   //   with a residual, x without)
  const void* weight = nullptr;    // (C,) dtype, contiguous; read iff has_weight (may be null otherwise)
  const float* mean = nullptr;     // (M,) fp32, contiguous (forward's mean); unused (may be null) by
                                   //   run_rms_norm_bwd
  const float* rstd = nullptr;     // (M,) fp32, contiguous (forward's rstd)
  // ---- outputs
  void* dx = nullptr;              // (M, C) dtype, row stride dx_row_stride: gradient of h (= of x and residual)
  void* dweight = nullptr;         // (C,) dtype, contiguous; written iff compute_dw
  void* dbias = nullptr;           // (C,) dtype, contiguous; written iff compute_db
  void* workspace = nullptr;       // fp32 scratch of layer_norm_bwd_workspace_bytes(*this) bytes (16-byte
                                   //   aligned; uninitialised is fine); may be null when that size is 0
  // ---- sizes / strides (elements)
  int64_t M = 0;
  int64_t C = 0;
  int64_t dy_row_stride = 0;
  int64_t dh_row_stride = 0;
  int64_t h_row_stride = 0;
  int64_t dx_row_stride = 0;
  bool has_weight = false;         // forward had a weight (g = dy * weight)
  bool compute_dw = false;         // write dweight (requires has_weight in practice; computed as sum dy * xhat)
  bool compute_db = false;         // write dbias (must be false for run_rms_norm_bwd)
  DType dtype = DType::kFloat32;   // element type of dy, dh, h, weight, dx, dweight, dbias
};

// Forward launchers: LayerNorm, RMSNorm (bias must be null; mean is not written).
cudaError_t run_layer_norm_fwd(const LayerNormFwdParams& params, cudaStream_t stream);
cudaError_t run_rms_norm_fwd(const LayerNormFwdParams& params, cudaStream_t stream);

// Bytes of fp32 scratch the backward needs for the dweight / dbias partial sums (0 when neither is computed
// or the problem is empty). Depends on M, C, the flags and the current device's SM count only (an upper
// bound over every kernel configuration): call it with the same current device as run_layer_norm_bwd /
// run_rms_norm_bwd (both use it).
size_t layer_norm_bwd_workspace_bytes(const LayerNormBwdParams& params);

// Backward launchers (dx; then dweight / dbias by a deterministic column reduction of the partials): LayerNorm,
// RMSNorm (compute_db must be false; mean is not read).
cudaError_t run_layer_norm_bwd(const LayerNormBwdParams& params, cudaStream_t stream);
cudaError_t run_rms_norm_bwd(const LayerNormBwdParams& params, cudaStream_t stream);

}  // namespace fastvit
