// fastvit CUDA C++: LayerNorm backward launcher (see layer_norm.h, layer_norm_kernels.cuh).
//
// Two deterministic stages, no atomics:
//   1. ln_bwd_kernel (or ln_bwd_fallback_kernel for C > kMaxRegisterC) writes dx and, per CTA, one row of
//      dweight / dbias partial sums into the fp32 workspace: [dw_part (grid, C) | db_part (grid, C)]
//      (each present only when computed, in that order);
//   2. column_sum_kernel (common/column_sum.cuh) sums the partial rows per column in a fixed order and rounds
//      to the dtype.
// The grid is "persistent-ish": min(row blocks, SMs * CTAs-per-SM) CTAs looping over rows, so the partial
// buffer has at most SMs * kBwdMaxCtasPerSm rows whatever M is.
#include "layer_norm/layer_norm_kernels.cuh"

namespace fastvit {
namespace {

bool bwd_vectorizable(const LayerNormBwdParams& p, int vec) {
  if (p.C % vec != 0 || p.dy_row_stride % vec != 0 || p.h_row_stride % vec != 0 || p.dx_row_stride % vec != 0) {
    return false;
  }
  if (!ln::aligned16(p.dy) || !ln::aligned16(p.h) || !ln::aligned16(p.dx)) return false;
  if (p.dh != nullptr && (p.dh_row_stride % vec != 0 || !ln::aligned16(p.dh))) return false;
  if (p.has_weight && !ln::aligned16(p.weight)) return false;
  return true;
}

// CTAs of the backward for a plan: one CTA per block of kRows rows, capped at ~1024 resident threads per SM.
int64_t bwd_grid(const ln::Plan& pl, int64_t M, int sms) {
  int rows = 1, threads = ln::kFallbackThreads;
  if (!pl.fallback) {
    rows = pl.G >= 128 ? 1 : 128 / pl.G;  // = GroupShape<G>::kRows
    threads = pl.G * rows;                // = GroupShape<G>::kThreads
  }
  int per_sm = 1024 / threads;
  per_sm = per_sm < 1 ? 1 : (per_sm > ln::kBwdMaxCtasPerSm ? ln::kBwdMaxCtasPerSm : per_sm);
  const int64_t blocks = (M + rows - 1) / rows;
  const int64_t cap = static_cast<int64_t>(sms) * per_sm;
  return blocks < cap ? blocks : cap;
}

// Upper bound of bwd_grid over every plan (threads >= 128 -> per_sm <= kBwdMaxCtasPerSm; rows >= 1).
int64_t max_partial_rows(int64_t M) {
  int sms = 0;
  if (ln::num_sms(&sms) != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error: M itself is always an upper bound of the grid
    return M;
  }
  const int64_t cap = static_cast<int64_t>(sms) * ln::kBwdMaxCtasPerSm;
  return M < cap ? M : cap;
}

template <typename T, int VEC, bool RMS>
cudaError_t launch_bwd(const LayerNormBwdParams& p, const ln::Plan& pl, int64_t grid, float* dw_part, float* db_part,
                       cudaStream_t stream) {
  auto launch = [&](auto g_c, auto nv_c) -> cudaError_t {
    constexpr int G = decltype(g_c)::value;
    constexpr int NV = decltype(nv_c)::value;
    using Shape = ln::GroupShape<G>;
    const int64_t row_blocks = (p.M + Shape::kRows - 1) / Shape::kRows;
    ln::ln_bwd_kernel<T, VEC, G, NV, RMS>
        <<<static_cast<unsigned>(grid), Shape::kThreads, 0, stream>>>(p, dw_part, db_part, row_blocks, ln::inv_c(p.C));
    FASTVIT_RETURN_LAUNCH_ERROR();
    return cudaSuccess;
  };
  return ln::dispatch_group<ln::kBwdMaxElems / VEC, ln::kBwdMaxGroup>(pl, launch);
}

template <typename T>
cudaError_t launch_colsum(const LayerNormBwdParams& p, const float* dw_part, const float* db_part, int64_t P,
                          cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (p.compute_dw) err = launch_column_sum<T>(dw_part, P, p.C, static_cast<T*>(p.dweight), stream);
  if (err == cudaSuccess && p.compute_db) err = launch_column_sum<T>(db_part, P, p.C, static_cast<T*>(p.dbias), stream);
  return err;
}

// Everything after the argument checks, for one dtype and one normalisation (RMS: RMSNorm).
template <typename T, bool RMS>
cudaError_t run_bwd(const LayerNormBwdParams& p, cudaStream_t stream) {
  int sms = 0;
  cudaError_t err = ln::num_sms(&sms);
  if (err != cudaSuccess) return err;

  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vec = bwd_vectorizable(p, kVec);
  const ln::Plan pl = ln::make_plan(p.C, vec ? kVec : 1, ln::kBwdMaxElems, ln::kBwdMaxGroup);
  int64_t grid = bwd_grid(pl, p.M, sms);
  const int64_t pmax = max_partial_rows(p.M);  // what layer_norm_bwd_workspace_bytes sized the buffer for
  if (grid > pmax) grid = pmax;
  if (grid < 1 || grid > 0x7fffffffLL) return cudaErrorInvalidValue;

  float* dw_part = static_cast<float*>(p.workspace);
  float* db_part = dw_part + (p.compute_dw ? grid * p.C : 0);
  if (!p.compute_dw) dw_part = nullptr;
  if (!p.compute_db) db_part = nullptr;

  if (pl.fallback) {
    ln::ln_bwd_fallback_kernel<T, RMS>
        <<<static_cast<unsigned>(grid), ln::kFallbackThreads, 0, stream>>>(p, dw_part, db_part, ln::inv_c(p.C));
    FASTVIT_RETURN_LAUNCH_ERROR();
  } else if (vec) {
    err = launch_bwd<T, kVec, RMS>(p, pl, grid, dw_part, db_part, stream);
    if (err != cudaSuccess) return err;
  } else {
    err = launch_bwd<T, 1, RMS>(p, pl, grid, dw_part, db_part, stream);
    if (err != cudaSuccess) return err;
  }
  return launch_colsum<T>(p, dw_part, db_part, grid, stream);
}

// The checks and the dtype switch of both launchers (RMS: RMSNorm, which reads no mean and has no dbias).
template <bool RMS>
cudaError_t run_norm_bwd(const LayerNormBwdParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.C < 0) return cudaErrorInvalidValue;
  if (p.C == 0) return cudaSuccess;
  if ((p.compute_dw && p.dweight == nullptr) || (p.compute_db && p.dbias == nullptr)) return cudaErrorInvalidValue;
  if (RMS && p.compute_db) return cudaErrorInvalidValue;
  return FASTVIT_FLOAT_SWITCH(p.dtype, T, [&]() -> cudaError_t {
    if (p.M == 0) return launch_colsum<T>(p, nullptr, nullptr, 0, stream);  // sums over no rows: zeros
    if (p.dy == nullptr || p.h == nullptr || p.dx == nullptr || (!RMS && p.mean == nullptr) || p.rstd == nullptr ||
        (p.has_weight && p.weight == nullptr)) {
      return cudaErrorInvalidValue;
    }
    const bool partials = p.compute_dw || p.compute_db;
    if (partials && p.workspace == nullptr) return cudaErrorInvalidValue;
    return run_bwd<T, RMS>(p, stream);
  });
}

}  // namespace

size_t layer_norm_bwd_workspace_bytes(const LayerNormBwdParams& p) {
  if (p.M <= 0 || p.C <= 0) return 0;
  const int n = (p.compute_dw ? 1 : 0) + (p.compute_db ? 1 : 0);
  if (n == 0) return 0;
  return static_cast<size_t>(n) * static_cast<size_t>(max_partial_rows(p.M)) * static_cast<size_t>(p.C) * sizeof(float);
}

cudaError_t run_layer_norm_bwd(const LayerNormBwdParams& p, cudaStream_t stream) {
  return run_norm_bwd<false>(p, stream);
}

cudaError_t run_rms_norm_bwd(const LayerNormBwdParams& p, cudaStream_t stream) { return run_norm_bwd<true>(p, stream); }

}  // namespace fastvit
