// Internal: the linear backward launchers (templated on the element type), included by linear_bwd_<dtype>.cu.
//
// Pipeline (one stream, in order; every output element has one writer; no atomics):
//   1. bwd_prologue_kernel: g = f(dy) rounded to T into the workspace (f = dy ⊙ GELU'(h) or gamma ⊙ dy; for the
//      residual backward without gamma g is dy itself and nothing is written), plus fp32 per-row-block column sums
//      of f(dy) (dbias) and of dy ⊙ z (dgamma);
//   2. column_sum_kernel: dbias / dgamma = Σ over row blocks, in order, one rounding;
//   3. dgrad GEMM (NN):  dx (M×K) = g (M×N, ld ldg) · W (N×K, ld ldw);
//   4. wgrad GEMM (TN):  dw32 (N×K fp32) = gᵀ · x, serial split-K over the M tokens;
//   5. convert_f32_kernel: dweight = T(dw32) (one rounding).
// linear_glu's backward (linear_glu_bwd below) is the same pipeline on the stacked weights Wcat (2·N, K) with the
// gated prologue (glu_bwd_prologue_kernel): g = [dh_g | dh_x] (M×2N), dx = g · Wcat (one GEMM, reduction 2·N),
// dw32 (2N×K) = gᵀ · x (one GEMM), then each half of dw32 rounded into its own gradient.
#pragma once

#include "linear/linear_gemm_impl.cuh"
#include "linear/linear_impl.h"
#include "linear/linear_kernels.cuh"

namespace fastvit {
namespace linear_detail {

// The part shared by both backward ops. `g` = the GEMM operand (workspace copy or dy itself) with ld `ldg`.
template <typename T, Pro kPro>
cudaError_t linear_bwd_common(int64_t M, int64_t N, int64_t K, const T* dy, int64_t lddy, const T* p, int64_t ldp,
                              const T* z, int64_t ldz, const T* x, int64_t ldx, const T* w, int64_t ldw, T* dx,
                              int64_t lddx, T* dweight, int64_t lddw, T* dbias, T* dgamma, const BwdLayout& L,
                              void* workspace, cudaStream_t stream) {
  using namespace gemm_detail;
  char* ws = static_cast<char*>(workspace);
  if ((L.total > 0 && ws == nullptr) || (ws != nullptr && (reinterpret_cast<uintptr_t>(ws) & 255u) != 0))
    return cudaErrorInvalidValue;
  T* g_ws = L.has_g ? reinterpret_cast<T*>(ws + L.g) : nullptr;
  float* part_db = L.has_db ? reinterpret_cast<float*>(ws + L.part_db) : nullptr;
  float* part_dg = L.has_dg ? reinterpret_cast<float*>(ws + L.part_dg) : nullptr;
  float* dw32 = reinterpret_cast<float*>(ws + L.dw32);
  void* sem = ws + L.sem;
  cudaError_t err;

  if (M == 0) {  // no tokens: every gradient is zero (dx is empty)
    if ((err = launch_convert_f32<T>(nullptr, 0, dweight, lddw, N, K, stream)) != cudaSuccess) return err;
    if (dbias != nullptr && (err = launch_convert_f32<T>(nullptr, 0, dbias, N, 1, N, stream)) != cudaSuccess)
      return err;
    if (dgamma != nullptr && (err = launch_convert_f32<T>(nullptr, 0, dgamma, N, 1, N, stream)) != cudaSuccess)
      return err;
    return cudaSuccess;
  }
  if (N == 0) {  // no output features: dx = 0, the rest is empty
    return launch_convert_f32<T>(nullptr, 0, dx, lddx, M, K, stream);
  }

  // 1. prologue (+ partial column sums)
  const int64_t rb = bwd_row_blocks(M);
  if (g_ws != nullptr || part_db != nullptr || part_dg != nullptr) {
    dim3 grid(unsigned((N + kProCols - 1) / kProCols), unsigned(rb));
    dim3 block(kProThreadsX, kProThreadsY);
    bwd_prologue_kernel<T, kPro>
        <<<grid, block, 0, stream>>>(M, N, dy, lddy, p, ldp, z, ldz, g_ws, part_db, part_dg, bwd_rows_per_block(M));
    FASTVIT_RETURN_LAUNCH_ERROR();
  }
  // 2. dbias / dgamma
  if (part_db != nullptr && (err = launch_column_sum<T>(part_db, rb, N, dbias, stream)) != cudaSuccess) return err;
  if (part_dg != nullptr && (err = launch_column_sum<T>(part_dg, rb, N, dgamma, stream)) != cudaSuccess) return err;
  if (K == 0) return cudaSuccess;  // dx, dweight empty

  const T* g = g_ws != nullptr ? g_ws : dy;
  const int64_t ldg = g_ws != nullptr ? N : lddy;

  // 3. dx (M×K) = g (M×N) · W (N×K): GEMM (m, n, k) = (M, K, N); A = g row-major ld ldg; B = W row-major ld ldw.
  NNGemmArgs dg;
  dg.M = int(M);
  dg.N = int(K);
  dg.K = int(N);
  dg.batch = 1;
  dg.A = g;
  dg.lda = ldg;
  dg.B = w;
  dg.ldb = ldw;
  dg.D = dx;
  dg.ldd = lddx;
  if ((err = gemm_nn<T>(dg, stream)) != cudaSuccess) return err;

  // 4. dW (N×K) = gᵀ (N×M) · x (M×K): GEMM (m, n, k) = (N, K, M); G = g (M×N row-major, read as the column-major
  //    N×M operand gᵀ), X = x (M×K row-major), D = dw32 (N×K fp32, ld K).
  TNGemmArgs wg;
  wg.M = int(N);
  wg.N = int(K);
  wg.K = int(M);
  wg.G = g;
  wg.ldg = ldg;
  wg.X = x;
  wg.ldx = ldx;
  wg.D = dw32;
  wg.ldd = K;
  wg.split_k = tn_gemm_split_k(N, K, M);
  wg.semaphores = sem;
  if ((err = gemm_tn_f32<T>(wg, stream)) != cudaSuccess) return err;

  // 5. dweight = T(dw32)
  return launch_convert_f32<T>(dw32, K, dweight, lddw, N, K, stream);
}

template <typename T>
cudaError_t linear_gelu_bwd(const LinearGeluBwdParams& p, cudaStream_t stream) {
  const BwdLayout L = gelu_bwd_layout(p);
  auto c = [](const void* q) { return static_cast<const T*>(q); };
  auto m = [](void* q) { return static_cast<T*>(q); };
  T* dbias = p.has_bias ? m(p.dbias) : nullptr;
  if (p.has_bias && dbias == nullptr) return cudaErrorInvalidValue;
  if (p.gelu_tanh)
    return linear_bwd_common<T, Pro::kGeluTanh>(p.M, p.N, p.K, c(p.dy), p.lddy, c(p.h), p.ldh, nullptr, 0, c(p.x),
                                                p.ldx, c(p.weight), p.ldw, m(p.dx), p.lddx, m(p.dweight), p.lddw, dbias,
                                                nullptr, L, p.workspace, stream);
  return linear_bwd_common<T, Pro::kGeluErf>(p.M, p.N, p.K, c(p.dy), p.lddy, c(p.h), p.ldh, nullptr, 0, c(p.x), p.ldx,
                                             c(p.weight), p.ldw, m(p.dx), p.lddx, m(p.dweight), p.lddw, dbias, nullptr,
                                             L, p.workspace, stream);
}

template <typename T>
cudaError_t linear_residual_bwd(const LinearResidualBwdParams& p, cudaStream_t stream) {
  const BwdLayout L = residual_bwd_layout(p);
  auto c = [](const void* q) { return static_cast<const T*>(q); };
  auto m = [](void* q) { return static_cast<T*>(q); };
  T* dbias = p.has_bias ? m(p.dbias) : nullptr;
  if (p.has_bias && dbias == nullptr) return cudaErrorInvalidValue;
  const bool dg = residual_bwd_has_dgamma(p);
  T* dgamma = dg ? m(p.dgamma) : nullptr;
  const T* z = dg ? c(p.z) : nullptr;
  if (p.gamma != nullptr)
    return linear_bwd_common<T, Pro::kScale>(p.M, p.N, p.K, c(p.dy), p.lddy, c(p.gamma), 0, z, p.ldz, c(p.x), p.ldx,
                                             c(p.weight), p.ldw, m(p.dx), p.lddx, m(p.dweight), p.lddw, dbias, dgamma,
                                             L, p.workspace, stream);
  return linear_bwd_common<T, Pro::kNone>(p.M, p.N, p.K, c(p.dy), p.lddy, nullptr, 0, nullptr, 0, c(p.x), p.ldx,
                                          c(p.weight), p.ldw, m(p.dx), p.lddx, m(p.dweight), p.lddw, dbias, nullptr, L,
                                          p.workspace, stream);
}

template <typename T, GluActivation kAct>
cudaError_t launch_glu_bwd_prologue(const LinearGluBwdParams& p, T* dh, float* part_dbg, float* part_dbx,
                                    const GluStack& s, cudaStream_t stream) {
  const dim3 grid(unsigned((p.N + kProCols - 1) / kProCols), unsigned(bwd_row_blocks(p.M)));
  glu_bwd_prologue_kernel<T, kAct><<<grid, dim3(kProThreadsX, kProThreadsY), 0, stream>>>(
      p.M, p.N, static_cast<const T*>(p.dy), p.lddy, static_cast<const T*>(p.h), p.ldh, dh, 2 * p.N, s.off_g, s.off_x,
      part_dbg, part_dbx, bwd_rows_per_block(p.M));
  FASTVIT_RETURN_LAUNCH_ERROR();
  return cudaSuccess;
}

template <typename T>
cudaError_t linear_glu_bwd(const LinearGluBwdParams& p, cudaStream_t stream) {
  using namespace gemm_detail;
  const GluBwdLayout L = glu_bwd_layout(p);
  const GluStack s = glu_stack(p);
  char* ws = static_cast<char*>(p.workspace);
  if ((L.total > 0 && ws == nullptr) || (ws != nullptr && (reinterpret_cast<uintptr_t>(ws) & 255u) != 0))
    return cudaErrorInvalidValue;
  if (p.has_bias && (p.dbias == nullptr || p.dbias_value == nullptr)) return cudaErrorInvalidValue;
  const int64_t M = p.M, N = p.N, K = p.K;
  T* dwg = static_cast<T*>(p.dweight);
  T* dwx = static_cast<T*>(p.dweight_value);
  T* dbg = p.has_bias ? static_cast<T*>(p.dbias) : nullptr;
  T* dbx = p.has_bias ? static_cast<T*>(p.dbias_value) : nullptr;
  cudaError_t err;

  if (M == 0) {  // no tokens: every gradient is zero (dx is empty)
    if ((err = launch_convert_f32<T>(nullptr, 0, dwg, p.lddw, N, K, stream)) != cudaSuccess) return err;
    if ((err = launch_convert_f32<T>(nullptr, 0, dwx, p.lddwv, N, K, stream)) != cudaSuccess) return err;
    if (dbg != nullptr && (err = launch_convert_f32<T>(nullptr, 0, dbg, N, 1, N, stream)) != cudaSuccess) return err;
    if (dbx != nullptr && (err = launch_convert_f32<T>(nullptr, 0, dbx, N, 1, N, stream)) != cudaSuccess) return err;
    return cudaSuccess;
  }
  if (N == 0) return launch_convert_f32<T>(nullptr, 0, static_cast<T*>(p.dx), p.lddx, M, K, stream);

  // 1. prologue: dh = [dh_g | dh_x] in Wcat's row order (+ partial column sums)
  T* dh = reinterpret_cast<T*>(ws + L.dh);
  float* part_dbg = L.has_db ? reinterpret_cast<float*>(ws + L.part_dbg) : nullptr;
  float* part_dbx = L.has_db ? reinterpret_cast<float*>(ws + L.part_dbx) : nullptr;
  switch (p.activation) {
    case GluActivation::kSilu:
      err = launch_glu_bwd_prologue<T, GluActivation::kSilu>(p, dh, part_dbg, part_dbx, s, stream);
      break;
    case GluActivation::kGeluErf:
      err = launch_glu_bwd_prologue<T, GluActivation::kGeluErf>(p, dh, part_dbg, part_dbx, s, stream);
      break;
    case GluActivation::kGeluTanh:
      err = launch_glu_bwd_prologue<T, GluActivation::kGeluTanh>(p, dh, part_dbg, part_dbx, s, stream);
      break;
    case GluActivation::kSigmoid:
      err = launch_glu_bwd_prologue<T, GluActivation::kSigmoid>(p, dh, part_dbg, part_dbx, s, stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  // 2. dbias, dbias_value
  const int64_t rb = bwd_row_blocks(M);
  if (L.has_db) {
    if ((err = launch_column_sum<T>(part_dbg, rb, N, dbg, stream)) != cudaSuccess) return err;
    if ((err = launch_column_sum<T>(part_dbx, rb, N, dbx, stream)) != cudaSuccess) return err;
  }
  if (K == 0) return cudaSuccess;  // dx, dweights empty

  // Wcat: the weights' own memory, or a gate-first copy in the workspace.
  const T* wcat = static_cast<const T*>(s.wcat);
  if (L.has_wcat) {
    T* copy = reinterpret_cast<T*>(ws + L.wcat);
    const size_t row = size_t(K) * sizeof(T);
    if ((err = cudaMemcpy2DAsync(copy, row, p.weight, size_t(p.ldw) * sizeof(T), row, size_t(N),
                                 cudaMemcpyDeviceToDevice, stream)) != cudaSuccess)
      return err;
    if ((err = cudaMemcpy2DAsync(copy + N * K, row, p.weight_value, size_t(p.ldwv) * sizeof(T), row, size_t(N),
                                 cudaMemcpyDeviceToDevice, stream)) != cudaSuccess)
      return err;
    wcat = copy;
  }

  // 3. dx (M×K) = dh (M×2N) · Wcat (2N×K): GEMM (m, n, k) = (M, K, 2N).
  NNGemmArgs dg;
  dg.M = int(M);
  dg.N = int(K);
  dg.K = int(2 * N);
  dg.batch = 1;
  dg.A = dh;
  dg.lda = 2 * N;
  dg.B = wcat;
  dg.ldb = s.ldcat;
  dg.D = p.dx;
  dg.ldd = p.lddx;
  if ((err = gemm_nn<T>(dg, stream)) != cudaSuccess) return err;

  // 4. dW_cat (2N×K) = dhᵀ (2N×M) · x (M×K): GEMM (m, n, k) = (2N, K, M), fp32, serial split-K over the tokens.
  float* dw32 = reinterpret_cast<float*>(ws + L.dw32);
  TNGemmArgs wg;
  wg.M = int(2 * N);
  wg.N = int(K);
  wg.K = int(M);
  wg.G = dh;
  wg.ldg = 2 * N;
  wg.X = p.x;
  wg.ldx = p.ldx;
  wg.D = dw32;
  wg.ldd = K;
  wg.split_k = tn_gemm_split_k(2 * N, K, M);
  wg.semaphores = ws + L.sem;
  if ((err = gemm_tn_f32<T>(wg, stream)) != cudaSuccess) return err;

  // 5. dweight, dweight_value = T(their halves of dw32)
  if ((err = launch_convert_f32<T>(dw32 + s.off_g * K, K, dwg, p.lddw, N, K, stream)) != cudaSuccess) return err;
  return launch_convert_f32<T>(dw32 + s.off_x * K, K, dwx, p.lddwv, N, K, stream);
}

}  // namespace linear_detail
}  // namespace fastvit

// Explicit instantiations for one element type (used by linear_bwd_<dtype>.cu).
#define FASTVIT_INSTANTIATE_LINEAR_BWD(T)                                                    \
  namespace fastvit {                                                                        \
  namespace gemm_detail {                                                                    \
  template cudaError_t gemm_nn<T>(const NNGemmArgs&, cudaStream_t);                          \
  template cudaError_t gemm_tn_f32<T>(const TNGemmArgs&, cudaStream_t);                      \
  }                                                                                          \
  namespace linear_detail {                                                                  \
  template cudaError_t linear_gelu_bwd<T>(const LinearGeluBwdParams&, cudaStream_t);         \
  template cudaError_t linear_residual_bwd<T>(const LinearResidualBwdParams&, cudaStream_t); \
  template cudaError_t linear_glu_bwd<T>(const LinearGluBwdParams&, cudaStream_t);           \
  }                                                                                          \
  }
