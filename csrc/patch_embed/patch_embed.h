// fastvit CUDA C++: patch embedding (im2col + GEMM + bias + pos-embed + cls/register tokens, optional MAE
// ids_keep), forward and backward, on CUTLASS 2.x SM80 tensor-op GEMMs (they also run on sm_90a).
//
// This header is the only interface the binding sees: plain params structs, launchers, workspace sizes.
// No CUTLASS, no torch. Semantics: fastvit::patch_embed_fwd / patch_embed_bwd of fastvit/_triton_mae.py and
// kernels/patch_embed.py.
//
// Geometry (derived by the launchers from the fields):
//   gh = Hi / Ph, gw = Wi / Pw, Np = gh·gw (row-major patch grid; pixels beyond gh·Ph / gw·Pw are ignored);
//   K = C·Ph·Pw in (c, i, j) order = weight.reshape(E, K) order; R = n_cls + n_reg prefix tokens (n_cls ∈ {0, 1});
//   Nk = n_keep when ids_keep is given, else Np; row R + j of batch b embeds patch p = ids_keep[b, j] (or j);
//   pos rows: pos_len == Np + R: prefix row r gets pos[r], patch p gets pos[R + p];
//             pos_len == Np:     prefix rows get no position, patch p gets pos[p];  pos_len == 0: no position.
//
// Forward:  out[b, r]     = prefix[r] (+ pos[r])                    r < R (prefix = cls then the n_reg registers)
//           out[b, R + j] = A[b, j] · Wᵀ + bias + pos[pos_off + p]  (fp32 accumulate, one rounding)
// Backward: dweight = Σ_{b,j} dout[b, R + j]ᵀ A[b, j];  dimages = col2im(dout_patches · W) (pixels of dropped
//           patches and outside the grid are zero);  S[p] = Σ_b dout[b, R + j(b, p)] (fp32; 0 when p dropped),
//           S[r] = Σ_b dout[b, r] for prefix rows;  dbias = Σ_p S[p];  dpos = S (rows as pos_len says);
//           dcls = S[0] (when n_cls), dreg = S[n_cls ..]. Deterministic: no atomics, fixed reduction orders.
//
// Requirements (else cudaErrorInvalidValue; the binding checks first): dtype fp16 / bf16 (else
// cudaErrorNotSupported); E % 8 == 0; weight, cls_token, reg_tokens, dweight, dpos, dcls, dreg contiguous;
// out / dout / pos rows with unit last stride and row strides multiples of 8 (pointers 16-byte aligned);
// ids_keep int64 with unit last stride, values in [0, Np) and unique per batch row (as the Triton op assumes).
// Any K (e.g. 3·14·14 = 588): the GEMMs run on operands padded with zeros to a multiple of 8 in the workspace.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/common.h"

namespace fastvit {

// Elements: the embed dim E and the row strides of out / dout / pos must be multiples of this (128-bit accesses).
constexpr int kPatchEmbedAlignment = 8;

struct PatchEmbedFwdParams {
  DType dtype = DType::kBFloat16;
  int64_t B = 0, C = 0, Hi = 0, Wi = 0;    // images (B, C, Hi, Wi)
  int64_t E = 0, Ph = 0, Pw = 0;           // weight (E, C, Ph, Pw)
  const void* images = nullptr;            // any strides (elements)
  int64_t img_stride_b = 0, img_stride_c = 0, img_stride_h = 0, img_stride_w = 0;
  const void* weight = nullptr;            // (E, C, Ph, Pw) contiguous
  const void* bias = nullptr;              // (E,) or nullptr
  const void* pos_embed = nullptr;         // (1, pos_len, E), row stride pos_stride_t, or nullptr
  int64_t pos_len = 0;                     // 0 (no pos_embed), Np or Np + R
  int64_t pos_stride_t = 0;
  const void* cls_token = nullptr;         // (1, 1, E) contiguous, or nullptr
  const void* reg_tokens = nullptr;        // (1, n_reg, E) contiguous, or nullptr
  int64_t n_reg = 0;
  const int64_t* ids_keep = nullptr;       // (B, n_keep) int64, row stride ids_stride_b, or nullptr
  int64_t ids_stride_b = 0;
  int64_t n_keep = 0;
  void* out = nullptr;                     // (B, R + Nk, E) out, strides out_stride_b, out_stride_t, 1
  int64_t out_stride_b = 0, out_stride_t = 0;
  void* workspace = nullptr;               // patch_embed_fwd_workspace_bytes(params) bytes, 256-byte aligned
};
size_t patch_embed_fwd_workspace_bytes(const PatchEmbedFwdParams& params);
cudaError_t run_patch_embed_fwd(const PatchEmbedFwdParams& params, cudaStream_t stream);

struct PatchEmbedBwdParams {
  DType dtype = DType::kBFloat16;
  int64_t B = 0, C = 0, Hi = 0, Wi = 0;
  int64_t E = 0, Ph = 0, Pw = 0;
  const void* dout = nullptr;              // (B, R + Nk, E), strides dout_stride_b == (R + Nk)·dout_stride_t, 1
  int64_t dout_stride_b = 0, dout_stride_t = 0;
  const void* images = nullptr;            // as in the forward
  int64_t img_stride_b = 0, img_stride_c = 0, img_stride_h = 0, img_stride_w = 0;
  const void* weight = nullptr;            // (E, C, Ph, Pw) contiguous
  const int64_t* ids_keep = nullptr;       // (B, n_keep) or nullptr
  int64_t ids_stride_b = 0;
  int64_t n_keep = 0;
  int64_t n_cls = 0, n_reg = 0;            // R = n_cls + n_reg
  int64_t pos_len = 0;                     // 0, Np or Np + R (what the forward had)
  void* dimages = nullptr;                 // (B, C, Hi, Wi) out, any strides, or nullptr (not computed)
  int64_t dimg_stride_b = 0, dimg_stride_c = 0, dimg_stride_h = 0, dimg_stride_w = 0;
  void* dweight = nullptr;                 // (E, C, Ph, Pw) out, contiguous
  void* dbias = nullptr;                   // (E,) out, or nullptr
  void* dpos = nullptr;                    // (1, pos_len, E) out contiguous, or nullptr
  void* dcls = nullptr;                    // (1, n_cls, E) out, or nullptr
  void* dreg = nullptr;                    // (1, n_reg, E) out, or nullptr
  void* workspace = nullptr;               // patch_embed_bwd_workspace_bytes(params) bytes, 256-byte aligned
};
size_t patch_embed_bwd_workspace_bytes(const PatchEmbedBwdParams& params);
cudaError_t run_patch_embed_bwd(const PatchEmbedBwdParams& params, cudaStream_t stream);

}  // namespace fastvit
