// Internal (not seen by the binding): geometry, workspace layouts and the per-dtype launchers behind
// patch_embed_api.cu. No CUTLASS kernels here.
#pragma once

#include <cstddef>
#include <cstdint>

#include "linear/linear_gemm.cuh"
#include "patch_embed/patch_embed.h"

namespace fastvit {
namespace patch_detail {

using gemm_detail::align_up;

struct Geom {
  int64_t B = 0, C = 0, E = 0, Ph = 0, Pw = 0;
  int64_t K = 0, Kp = 0;        // K = C·Ph·Pw; Kp = K rounded up to a multiple of 8 (zero padding)
  int64_t gh = 0, gw = 0, Np = 0;
  int64_t n_cls = 0, n_reg = 0, R = 0;
  int64_t Nk = 0;               // kept patches per image
  bool has_ids = false;
  bool prefix_pos = false;      // pos_len == Np + R: prefix rows have position rows too
  int64_t pos_off = 0;          // pos row of patch p = pos_off + p
  bool has_pos = false;
};

inline Geom make_geom(int64_t B, int64_t C, int64_t Hi, int64_t Wi, int64_t E, int64_t Ph, int64_t Pw, int64_t n_cls,
                      int64_t n_reg, const int64_t* ids, int64_t n_keep, int64_t pos_len) {
  Geom g;
  g.B = B;
  g.C = C;
  g.E = E;
  g.Ph = Ph;
  g.Pw = Pw;
  g.K = C * Ph * Pw;
  g.Kp = (g.K + 7) / 8 * 8;
  g.gh = Ph > 0 ? Hi / Ph : 0;
  g.gw = Pw > 0 ? Wi / Pw : 0;
  g.Np = g.gh * g.gw;
  g.n_cls = n_cls;
  g.n_reg = n_reg;
  g.R = n_cls + n_reg;
  g.has_ids = ids != nullptr;
  g.Nk = g.has_ids ? n_keep : g.Np;
  g.has_pos = pos_len > 0;
  g.prefix_pos = g.has_pos && pos_len == g.Np + g.R && g.R > 0;
  g.pos_off = g.prefix_pos ? g.R : 0;
  return g;
}

inline Geom fwd_geom(const PatchEmbedFwdParams& p) {
  return make_geom(p.B, p.C, p.Hi, p.Wi, p.E, p.Ph, p.Pw, p.cls_token != nullptr ? 1 : 0,
                   p.reg_tokens != nullptr ? p.n_reg : 0, p.ids_keep, p.n_keep, p.pos_embed != nullptr ? p.pos_len : 0);
}
inline Geom bwd_geom(const PatchEmbedBwdParams& p) {
  return make_geom(p.B, p.C, p.Hi, p.Wi, p.E, p.Ph, p.Pw, p.n_cls, p.n_reg, p.ids_keep, p.n_keep, p.pos_len);
}

// Forward workspace: A = im2col of the kept patches (B·Nk × Kp, T); Wp = the weight padded to (E × Kp) when
// K % 8 != 0; posg = the position rows gathered per kept patch (B·Nk × E) when ids_keep and pos_embed are given.
struct FwdLayout {
  size_t A = 0, Wp = 0, posg = 0, total = 0;
  bool pad_w = false, gather_pos = false;
};
inline FwdLayout fwd_layout(const Geom& g) {
  FwdLayout L;
  L.pad_w = g.K != g.Kp;
  L.gather_pos = g.has_ids && g.has_pos;
  size_t off = 0;
  L.A = off;
  off += align_up(size_t(g.B) * size_t(g.Nk) * size_t(g.Kp) * 2);
  L.Wp = off;
  off += L.pad_w ? align_up(size_t(g.E) * size_t(g.Kp) * 2) : 0;
  L.posg = off;
  off += L.gather_pos ? align_up(size_t(g.B) * size_t(g.Nk) * size_t(g.E) * 2) : 0;
  L.total = off;
  return L;
}

// Backward workspace: A = im2col over all B·(R + Nk) rows of dout with zero prefix rows (B·(R+Nk) × Kp, T), later
// reused for dA = dout_patches · Wp (B·Nk × Kp); Wp as in the forward (only for dimages); dw32 (E × Kp fp32);
// split-K semaphores; inv = inverse of ids_keep (B × Np int32, -1 = dropped); S = fp32 batch sums of the patch
// rows (Np × E).
struct BwdLayout {
  size_t A = 0, Wp = 0, dw32 = 0, sem = 0, inv = 0, S = 0, total = 0;
  bool pad_w = false;
};
inline BwdLayout bwd_layout(const Geom& g, bool dimages) {
  BwdLayout L;
  L.pad_w = dimages && g.K != g.Kp;
  size_t off = 0;
  L.A = off;
  off += align_up(size_t(g.B) * size_t(g.R + g.Nk) * size_t(g.Kp) * 2);
  L.Wp = off;
  off += L.pad_w ? align_up(size_t(g.E) * size_t(g.Kp) * 2) : 0;
  L.dw32 = off;
  off += align_up(size_t(g.E) * size_t(g.Kp) * 4);
  L.sem = off;
  off += align_up(gemm_detail::tn_gemm_semaphore_bytes(g.E, g.Kp));
  L.inv = off;
  off += g.has_ids ? align_up(size_t(g.B) * size_t(g.Np) * 4) : 0;
  L.S = off;
  off += align_up(size_t(g.Np) * size_t(g.E) * 4);
  L.total = off;
  return L;
}

// Defined in patch_embed_fwd_<dtype>.cu / patch_embed_bwd_<dtype>.cu.
template <typename T>
cudaError_t patch_embed_fwd(const PatchEmbedFwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t patch_embed_bwd(const PatchEmbedBwdParams& p, cudaStream_t stream);

}  // namespace patch_detail
}  // namespace fastvit
