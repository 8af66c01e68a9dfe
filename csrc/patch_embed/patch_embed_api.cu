// patch_embed: dtype-independent entry points (validation, dtype dispatch, workspace sizes). The per-dtype
// launchers live in patch_embed_{fwd,bwd}_<dtype>.cu; in a minimal build (FASTVIT_MINIMAL_BUILD)
// FASTVIT_HALF_SWITCH references only the bf16 ones.
#include "common/dispatch.cuh"
#include "patch_embed/patch_embed.h"
#include "patch_embed/patch_embed_impl.h"

namespace fastvit {
namespace {

using gemm_detail::aligned16;

bool geom_ok(const patch_detail::Geom& g, int64_t Hi, int64_t Wi, int64_t pos_len) {
  if (g.B < 0 || g.C < 0 || Hi < 0 || Wi < 0 || g.E < 0 || g.Ph <= 0 || g.Pw <= 0 || g.Nk < 0 || g.n_reg < 0)
    return false;
  if (g.E % 8 != 0) return false;
  if (pos_len != 0 && pos_len != g.Np && pos_len != g.Np + g.R) return false;
  // 32-bit GEMM extents (CUTLASS GemmCoord) and int32 inverse indices.
  const int64_t lim = INT32_MAX;
  // The batched GEMMs put the batch on grid z (at most 65535).
  return g.Kp <= lim && g.E <= lim && g.Nk <= lim && g.B <= 65535 && g.B * (g.R + g.Nk) <= lim && g.Np <= lim;
}

}  // namespace

size_t patch_embed_fwd_workspace_bytes(const PatchEmbedFwdParams& p) {
  return patch_detail::fwd_layout(patch_detail::fwd_geom(p)).total;
}

size_t patch_embed_bwd_workspace_bytes(const PatchEmbedBwdParams& p) {
  return patch_detail::bwd_layout(patch_detail::bwd_geom(p), p.dimages != nullptr).total;
}

cudaError_t run_patch_embed_fwd(const PatchEmbedFwdParams& p, cudaStream_t stream) {
  const patch_detail::Geom g = patch_detail::fwd_geom(p);
  if (!geom_ok(g, p.Hi, p.Wi, p.pos_embed != nullptr ? p.pos_len : 0)) return cudaErrorInvalidValue;
  if (g.B == 0 || g.E == 0 || g.R + g.Nk == 0) return cudaSuccess;
  // 128-bit epilogue accesses: out / pos rows start 16-byte aligned.
  if (p.out == nullptr || !aligned16(p.out) || p.out_stride_t % 8 != 0 || p.out_stride_b % 8 != 0)
    return cudaErrorInvalidValue;
  if (g.Nk > 0 && (p.images == nullptr || p.weight == nullptr || !aligned16(p.weight) || !aligned16(p.bias)))
    return cudaErrorInvalidValue;
  if (p.pos_embed != nullptr && (!aligned16(p.pos_embed) || p.pos_stride_t % 8 != 0)) return cudaErrorInvalidValue;
  if (p.ids_keep == nullptr && p.n_keep != 0 && p.n_keep != g.Np) return cudaErrorInvalidValue;
  return FASTVIT_HALF_SWITCH(p.dtype, T, [&] { return patch_detail::patch_embed_fwd<T>(p, stream); });
}

cudaError_t run_patch_embed_bwd(const PatchEmbedBwdParams& p, cudaStream_t stream) {
  const patch_detail::Geom g = patch_detail::bwd_geom(p);
  if (!geom_ok(g, p.Hi, p.Wi, p.pos_len) || p.n_cls < 0 || p.n_cls > 1) return cudaErrorInvalidValue;
  if (g.E == 0) return cudaSuccess;
  if (p.dweight == nullptr || p.weight == nullptr || p.dout == nullptr) return cudaErrorInvalidValue;
  // The weight-gradient GEMM reads dout as one (B·(R+Nk) × E) matrix; the dgrad GEMM reads 16-byte-aligned rows.
  if (!aligned16(p.dout) || p.dout_stride_t % 8 != 0 || (g.B > 1 && p.dout_stride_b != (g.R + g.Nk) * p.dout_stride_t))
    return cudaErrorInvalidValue;
  if (!aligned16(p.weight)) return cudaErrorInvalidValue;
  return FASTVIT_HALF_SWITCH(p.dtype, T, [&] { return patch_detail::patch_embed_bwd<T>(p, stream); });
}

}  // namespace fastvit
