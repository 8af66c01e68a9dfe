// Internal (not seen by the binding): per-dtype launchers behind the dispatch in linear_api.cu, and the backward
// workspace layout shared by the workspace-size functions and the launchers. No CUTLASS kernels here.
#pragma once

#include <cstddef>
#include <cstdint>

#include "linear/linear.h"
#include "linear/linear_gemm.cuh"

namespace fastvit {
namespace linear_detail {

// Defined in linear_{gelu,residual}_fwd_<dtype>.cu and linear_bwd_<dtype>.cu (T = cutlass::half_t / bfloat16_t).
template <typename T>
cudaError_t linear_gelu_fwd(const LinearGeluFwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t linear_residual_fwd(const LinearResidualFwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t linear_gelu_bwd(const LinearGeluBwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t linear_residual_bwd(const LinearResidualBwdParams& p, cudaStream_t stream);

// Row blocks of the fused dGELU / scale prologue (= number of fp32 partial column sums per column reduced by the
// second pass): a function of M only, so the reduction order never depends on the GPU.
inline int64_t bwd_row_blocks(int64_t M) {
  int64_t rb = (M + 31) / 32;
  if (rb > 128) rb = 128;
  return rb < 1 ? 1 : rb;
}
inline int64_t bwd_rows_per_block(int64_t M) {
  int64_t rb = bwd_row_blocks(M);
  return (M + rb - 1) / rb;
}

// Backward workspace (byte offsets, each region 256-byte aligned):
//   g        (M×N, input dtype, ld N)  the prologued dy (dGELU ⊙ dy, or gamma ⊙ dy), when needed
//   part_db  (RB×N fp32)              per-row-block partial column sums of g (dbias)
//   part_dg  (RB×N fp32)              per-row-block partial column sums of dy ⊙ z (dgamma)
//   dw32     (N×K fp32, ld K)         the weight gradient before its single rounding
//   sem      (int per 128×128 tile)   serial split-K semaphores of the wgrad GEMM
struct BwdLayout {
  size_t g = 0, part_db = 0, part_dg = 0, dw32 = 0, sem = 0, total = 0;
  bool has_g = false, has_db = false, has_dg = false;
};

inline BwdLayout bwd_layout(int64_t M, int64_t N, int64_t K, bool need_g, bool need_db, bool need_dg) {
  using gemm_detail::align_up;
  BwdLayout L;
  L.has_g = need_g;
  L.has_db = need_db;
  L.has_dg = need_dg;
  const int64_t rb = bwd_row_blocks(M);
  size_t off = 0;
  L.g = off;
  off += need_g ? align_up(size_t(M) * size_t(N) * 2) : 0;   // fp16 / bf16: 2 bytes
  L.part_db = off;
  off += need_db ? align_up(size_t(rb) * size_t(N) * 4) : 0;
  L.part_dg = off;
  off += need_dg ? align_up(size_t(rb) * size_t(N) * 4) : 0;
  L.dw32 = off;
  off += align_up(size_t(N) * size_t(K) * 4);
  L.sem = off;
  off += align_up(gemm_detail::tn_gemm_semaphore_bytes(N, K));
  L.total = off;
  return L;
}

inline BwdLayout gelu_bwd_layout(const LinearGeluBwdParams& p) {
  return bwd_layout(p.M, p.N, p.K, /*need_g=*/true, p.has_bias, false);
}
inline bool residual_bwd_has_dgamma(const LinearResidualBwdParams& p) {
  return p.gamma != nullptr && p.z != nullptr && p.dgamma != nullptr;
}
inline BwdLayout residual_bwd_layout(const LinearResidualBwdParams& p) {
  return bwd_layout(p.M, p.N, p.K, /*need_g=*/p.gamma != nullptr, p.has_bias, residual_bwd_has_dgamma(p));
}

}  // namespace linear_detail
}  // namespace fastvit
