// Internal: the linear forward launchers (one EVT GEMM each), included by linear_{gelu,residual}_fwd_<dtype>.cu.
//
// GEMM (m, n, k) = (M, N, K): A = x row-major (M×K, ld ldx); B = the (N×K) row-major weight read as the
// column-major (K×N) operand Wᵀ (ld ldw); the epilogue writes y (and h / z) row-major (M×N) with their ld.
#pragma once

#include "linear/linear_gemm_impl.cuh"
#include "linear/linear_impl.h"

namespace fastvit {
namespace linear_detail {

inline gemm_detail::EpiGemmArgs fwd_args(int64_t M, int64_t N, int64_t K, const void* x, int64_t ldx, const void* w,
                                         int64_t ldw, const void* bias, void* y, int64_t ldy, void* pre,
                                         int64_t ldpre) {
  gemm_detail::EpiGemmArgs a;
  a.M = int(M);
  a.N = int(N);
  a.K = int(K);
  a.batch = 1;
  a.A = x;
  a.lda = ldx;
  a.B = w;
  a.ldb = ldw;
  a.bias = bias;
  a.D = y;
  a.ldd = ldy;
  a.pre = pre;
  a.ldpre = ldpre;
  return a;
}

template <typename T>
cudaError_t linear_gelu_fwd(const LinearGeluFwdParams& p, cudaStream_t stream) {
  using gemm_detail::Epi;
  using gemm_detail::gemm_epi;
  const auto a = fwd_args(p.M, p.N, p.K, p.x, p.ldx, p.weight, p.ldw, p.bias, p.y, p.ldy, p.h, p.ldh);
  if (p.gelu_tanh)
    return p.h != nullptr ? gemm_epi<T, Epi::kGeluTanh, true>(a, stream)
                          : gemm_epi<T, Epi::kGeluTanh, false>(a, stream);
  return p.h != nullptr ? gemm_epi<T, Epi::kGeluErf, true>(a, stream) : gemm_epi<T, Epi::kGeluErf, false>(a, stream);
}

template <typename T>
cudaError_t linear_residual_fwd(const LinearResidualFwdParams& p, cudaStream_t stream) {
  using gemm_detail::Epi;
  using gemm_detail::gemm_epi;
  auto a = fwd_args(p.M, p.N, p.K, p.x, p.ldx, p.weight, p.ldw, p.bias, p.y, p.ldy, p.z, p.ldz);
  a.gamma = p.gamma;
  a.aux = p.residual;
  a.ld_aux = p.ldr;
  return p.z != nullptr ? gemm_epi<T, Epi::kResidual, true>(a, stream) : gemm_epi<T, Epi::kResidual, false>(a, stream);
}

}  // namespace linear_detail
}  // namespace fastvit

#define FASTVIT_INSTANTIATE_LINEAR_GELU_FWD(T)                                       \
  namespace fastvit {                                                                \
  namespace linear_detail {                                                          \
  template cudaError_t linear_gelu_fwd<T>(const LinearGeluFwdParams&, cudaStream_t); \
  }                                                                                  \
  }

#define FASTVIT_INSTANTIATE_LINEAR_RESIDUAL_FWD(T)                                           \
  namespace fastvit {                                                                        \
  namespace linear_detail {                                                                  \
  template cudaError_t linear_residual_fwd<T>(const LinearResidualFwdParams&, cudaStream_t); \
  }                                                                                          \
  }
