// linear_gelu / linear_residual / linear_glu: dtype-independent entry points (validation, dtype dispatch, workspace
// sizes). The per-dtype launchers live in linear_{gelu,residual,glu}_fwd_<dtype>.cu and linear_bwd_<dtype>.cu; in a minimal
// build (FASTVIT_MINIMAL_BUILD) FASTVIT_HALF_SWITCH references only the bf16 ones.
#include "common/dispatch.cuh"
#include "linear/linear.h"
#include "linear/linear_impl.h"

namespace fastvit {
namespace {

using gemm_detail::aligned16;

bool ld_ok(int64_t ld, int64_t cols) { return ld % kLinearAlignment == 0 && ld >= cols; }
bool vec_ok(const void* p) { return p == nullptr || aligned16(p); }
bool mat_ok(const void* p, int64_t ld, int64_t cols) { return p == nullptr || (aligned16(p) && ld_ok(ld, cols)); }

bool shape_ok(int64_t M, int64_t N, int64_t K) {
  return M >= 0 && N >= 0 && K >= 0 && N % kLinearAlignment == 0 && K % kLinearAlignment == 0 && M <= INT32_MAX &&
         N <= INT32_MAX && K <= INT32_MAX;
}

// linear_glu: the GEMMs of its backward run over 2·N (the stacked gate and value weights).
bool glu_shape_ok(int64_t M, int64_t N, int64_t K) { return shape_ok(M, N, K) && 2 * N <= INT32_MAX; }

bool glu_activation_ok(GluActivation a) {
  return a == GluActivation::kSilu || a == GluActivation::kGeluErf || a == GluActivation::kGeluTanh ||
         a == GluActivation::kSigmoid;
}

}  // namespace

cudaError_t run_linear_gelu_fwd(const LinearGeluFwdParams& p, cudaStream_t stream) {
  if (!shape_ok(p.M, p.N, p.K)) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (!mat_ok(p.x, p.ldx, p.K) || !mat_ok(p.weight, p.ldw, p.K) || !vec_ok(p.bias) || !mat_ok(p.y, p.ldy, p.N) ||
      !mat_ok(p.h, p.ldh, p.N) || p.x == nullptr || p.weight == nullptr || p.y == nullptr)
    return cudaErrorInvalidValue;
  return FASTVIT_HALF_SWITCH(p.dtype, T, [&] { return linear_detail::linear_gelu_fwd<T>(p, stream); });
}

cudaError_t run_linear_residual_fwd(const LinearResidualFwdParams& p, cudaStream_t stream) {
  if (!shape_ok(p.M, p.N, p.K)) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (!mat_ok(p.x, p.ldx, p.K) || !mat_ok(p.weight, p.ldw, p.K) || !vec_ok(p.bias) || !vec_ok(p.gamma) ||
      !mat_ok(p.residual, p.ldr, p.N) || !mat_ok(p.y, p.ldy, p.N) || !mat_ok(p.z, p.ldz, p.N) || p.x == nullptr ||
      p.weight == nullptr || p.y == nullptr || p.residual == nullptr)
    return cudaErrorInvalidValue;
  return FASTVIT_HALF_SWITCH(p.dtype, T, [&] { return linear_detail::linear_residual_fwd<T>(p, stream); });
}

cudaError_t run_linear_glu_fwd(const LinearGluFwdParams& p, cudaStream_t stream) {
  if (!glu_shape_ok(p.M, p.N, p.K) || !glu_activation_ok(p.activation)) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (!mat_ok(p.x, p.ldx, p.K) || !mat_ok(p.weight, p.ldw, p.K) || !mat_ok(p.weight_value, p.ldwv, p.K) ||
      !vec_ok(p.bias) || !vec_ok(p.bias_value) || !mat_ok(p.y, p.ldy, p.N) || !mat_ok(p.h, p.ldh, 2 * p.N) ||
      p.x == nullptr || p.weight == nullptr || p.weight_value == nullptr || p.y == nullptr)
    return cudaErrorInvalidValue;
  return FASTVIT_HALF_SWITCH(p.dtype, T, [&] { return linear_detail::linear_glu_fwd<T>(p, stream); });
}

size_t linear_gelu_bwd_workspace_bytes(const LinearGeluBwdParams& p) { return linear_detail::gelu_bwd_layout(p).total; }

size_t linear_residual_bwd_workspace_bytes(const LinearResidualBwdParams& p) {
  return linear_detail::residual_bwd_layout(p).total;
}

size_t linear_glu_bwd_workspace_bytes(const LinearGluBwdParams& p) { return linear_detail::glu_bwd_layout(p).total; }

cudaError_t run_linear_gelu_bwd(const LinearGeluBwdParams& p, cudaStream_t stream) {
  if (!shape_ok(p.M, p.N, p.K)) return cudaErrorInvalidValue;
  if (p.N == 0 && p.K == 0) return cudaSuccess;
  if (!mat_ok(p.dy, p.lddy, p.N) || !mat_ok(p.x, p.ldx, p.K) || !mat_ok(p.weight, p.ldw, p.K) ||
      !mat_ok(p.h, p.ldh, p.N) || !mat_ok(p.dx, p.lddx, p.K) || !mat_ok(p.dweight, p.lddw, p.K) || !vec_ok(p.dbias) ||
      (p.M > 0 && (p.dy == nullptr || p.x == nullptr || p.h == nullptr || p.dx == nullptr)) || p.weight == nullptr ||
      p.dweight == nullptr)
    return cudaErrorInvalidValue;
  return FASTVIT_HALF_SWITCH(p.dtype, T, [&] { return linear_detail::linear_gelu_bwd<T>(p, stream); });
}

cudaError_t run_linear_residual_bwd(const LinearResidualBwdParams& p, cudaStream_t stream) {
  if (!shape_ok(p.M, p.N, p.K)) return cudaErrorInvalidValue;
  if (p.N == 0 && p.K == 0) return cudaSuccess;
  if (!mat_ok(p.dy, p.lddy, p.N) || !mat_ok(p.x, p.ldx, p.K) || !mat_ok(p.weight, p.ldw, p.K) ||
      !mat_ok(p.z, p.ldz, p.N) || !vec_ok(p.gamma) || !mat_ok(p.dx, p.lddx, p.K) || !mat_ok(p.dweight, p.lddw, p.K) ||
      !vec_ok(p.dbias) || !vec_ok(p.dgamma) || (p.M > 0 && (p.dy == nullptr || p.x == nullptr || p.dx == nullptr)) ||
      p.weight == nullptr || p.dweight == nullptr)
    return cudaErrorInvalidValue;
  return FASTVIT_HALF_SWITCH(p.dtype, T, [&] { return linear_detail::linear_residual_bwd<T>(p, stream); });
}

cudaError_t run_linear_glu_bwd(const LinearGluBwdParams& p, cudaStream_t stream) {
  if (!glu_shape_ok(p.M, p.N, p.K) || !glu_activation_ok(p.activation)) return cudaErrorInvalidValue;
  if (p.N == 0 && p.K == 0) return cudaSuccess;
  if (!mat_ok(p.dy, p.lddy, p.N) || !mat_ok(p.x, p.ldx, p.K) || !mat_ok(p.weight, p.ldw, p.K) ||
      !mat_ok(p.weight_value, p.ldwv, p.K) || !mat_ok(p.h, p.ldh, 2 * p.N) || !mat_ok(p.dx, p.lddx, p.K) ||
      !mat_ok(p.dweight, p.lddw, p.K) || !mat_ok(p.dweight_value, p.lddwv, p.K) || !vec_ok(p.dbias) ||
      !vec_ok(p.dbias_value) || (p.M > 0 && (p.dy == nullptr || p.x == nullptr || p.h == nullptr || p.dx == nullptr)) ||
      p.weight == nullptr || p.weight_value == nullptr || p.dweight == nullptr || p.dweight_value == nullptr)
    return cudaErrorInvalidValue;
  return FASTVIT_HALF_SWITCH(p.dtype, T, [&] { return linear_detail::linear_glu_bwd<T>(p, stream); });
}

}  // namespace fastvit
