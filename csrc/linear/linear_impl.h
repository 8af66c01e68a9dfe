// Internal (not seen by the binding): per-dtype launchers behind the dispatch in linear_api.cu, and the backward
// workspace layout shared by the workspace-size functions and the launchers. No CUTLASS kernels here.
#pragma once

#include <cstddef>
#include <cstdint>

#include "linear/linear.h"
#include "linear/linear_gemm.cuh"

namespace fastvit {
namespace linear_detail {

// Defined in linear_{gelu,residual,glu}_fwd_<dtype>.cu and linear_bwd_<dtype>.cu (T = cutlass::half_t /
// bfloat16_t).
template <typename T>
cudaError_t linear_gelu_fwd(const LinearGeluFwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t linear_residual_fwd(const LinearResidualFwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t linear_gelu_bwd(const LinearGeluBwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t linear_residual_bwd(const LinearResidualBwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t linear_glu_fwd(const LinearGluFwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t linear_glu_bwd(const LinearGluBwdParams& p, cudaStream_t stream);

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

// linear_glu's backward runs its two GEMMs over the stacked gate and value weights Wcat (2·N, K): where the two
// weights already lie stacked in memory (the two row views of a packed GluMlp weight, either order) Wcat is that
// memory, else the launcher copies them into the workspace (gate first). The prologue writes dh = [dh_g | dh_x] in
// Wcat's row order, and the weight gradient's rows come out in that order too.
struct GluStack {
  const void* wcat = nullptr;  // row 0 of Wcat in memory (nullptr: the workspace copy)
  int64_t ldcat = 0;
  int64_t off_g = 0, off_x = 0;  // first row of the gate's / value's half in Wcat (0 / N or N / 0)
};

inline GluStack glu_stack(const LinearGluBwdParams& p) {
  const size_t half = size_t(p.N) * size_t(p.ldw) * 2;  // bytes of one (N, ldw) half (16-bit elements)
  const char* g = static_cast<const char*>(p.weight);
  const char* x = static_cast<const char*>(p.weight_value);
  GluStack s;
  if (p.ldw == p.ldwv && g != nullptr && x == g + half) {
    s = {p.weight, p.ldw, 0, p.N};  // [W_g; W_x]: a packed weight, gate first
  } else if (p.ldw == p.ldwv && x != nullptr && g == x + half) {
    s = {p.weight_value, p.ldw, p.N, 0};  // [W_x; W_g]: a packed weight, gate last
  } else {
    s = {nullptr, p.K, 0, p.N};  // separate weights (timm's SwiGLU fc1_g / fc1_x): copied, gate first
  }
  return s;
}

// linear_glu's backward workspace (byte offsets, each region 256-byte aligned):
//   dh       (M×2N, input dtype, ld 2N)  the prologue's [dh_g | dh_x] (in Wcat's row order)
//   part_dbg (RB×N fp32), part_dbx (RB×N fp32)  per-row-block partial column sums of dh_g / dh_x (has_bias)
//   wcat     (2N×K, input dtype, ld K)   the stacked weights, when they are not stacked in memory already
//   dw32     (2N×K fp32, ld K)           both weight gradients before their single rounding
//   sem      (int per 128×128 tile)      serial split-K semaphores of the wgrad GEMM
struct GluBwdLayout {
  size_t dh = 0, part_dbg = 0, part_dbx = 0, wcat = 0, dw32 = 0, sem = 0, total = 0;
  bool has_db = false, has_wcat = false;
};

inline GluBwdLayout glu_bwd_layout(const LinearGluBwdParams& p) {
  using gemm_detail::align_up;
  GluBwdLayout L;
  L.has_db = p.has_bias;
  L.has_wcat = glu_stack(p).wcat == nullptr;
  const size_t M = size_t(p.M), N2 = 2 * size_t(p.N), K = size_t(p.K), rb = size_t(bwd_row_blocks(p.M));
  size_t off = 0;
  L.dh = off;
  off += align_up(M * N2 * 2);
  L.part_dbg = off;
  off += L.has_db ? align_up(rb * size_t(p.N) * 4) : 0;
  L.part_dbx = off;
  off += L.has_db ? align_up(rb * size_t(p.N) * 4) : 0;
  L.wcat = off;
  off += L.has_wcat ? align_up(N2 * K * 2) : 0;
  L.dw32 = off;
  off += align_up(N2 * K * 4);
  L.sem = off;
  off += align_up(gemm_detail::tn_gemm_semaphore_bytes(int64_t(N2), p.K));
  L.total = off;
  return L;
}

}  // namespace linear_detail
}  // namespace fastvit
