// fastvit CUDA C++: fused residual-add + LayerNorm forward launcher (see layer_norm.h, layer_norm_kernels.cuh).
#include "layer_norm/layer_norm_kernels.cuh"

namespace fastvit {
namespace {

// The 16-byte vector path is legal when every row of every tensor starts on a 16-byte boundary and holds a
// whole number of vectors: C, all row strides multiples of VEC, all base pointers 16-byte aligned.
bool fwd_vectorizable(const LayerNormFwdParams& p, int vec) {
  if (p.C % vec != 0 || p.x_row_stride % vec != 0 || p.y_row_stride % vec != 0) return false;
  if (!ln::aligned16(p.x) || !ln::aligned16(p.y)) return false;
  if (p.residual != nullptr) {
    if (p.residual_row_stride % vec != 0 || p.h_row_stride % vec != 0) return false;
    if (!ln::aligned16(p.residual) || !ln::aligned16(p.h_out)) return false;
  }
  if (p.weight != nullptr && !ln::aligned16(p.weight)) return false;
  if (p.bias != nullptr && !ln::aligned16(p.bias)) return false;
  return true;
}

template <typename T, int VEC, bool RMS>
cudaError_t launch_fwd(const LayerNormFwdParams& p, const ln::Plan& pl, cudaStream_t stream) {
  auto launch = [&](auto g_c, auto nv_c) -> cudaError_t {
    constexpr int G = decltype(g_c)::value;
    constexpr int NV = decltype(nv_c)::value;
    using Shape = ln::GroupShape<G>;
    const int64_t blocks = (p.M + Shape::kRows - 1) / Shape::kRows;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    ln::ln_fwd_kernel<T, VEC, G, NV, RMS>
        <<<static_cast<unsigned>(blocks), Shape::kThreads, 0, stream>>>(p, ln::inv_c(p.C));
    FASTVIT_RETURN_LAUNCH_ERROR();
    return cudaSuccess;
  };
  return ln::dispatch_group<ln::kFwdMaxElems / VEC, ln::kFwdMaxGroup>(pl, launch);
}

template <typename T, bool RMS>
cudaError_t run_fwd(const LayerNormFwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (p.C > ln::kMaxRegisterC) {
    if (p.M > 0x7fffffffLL) return cudaErrorInvalidValue;
    ln::ln_fwd_fallback_kernel<T, RMS>
        <<<static_cast<unsigned>(p.M), ln::kFallbackThreads, 0, stream>>>(p, ln::inv_c(p.C));
    FASTVIT_RETURN_LAUNCH_ERROR();
    return cudaSuccess;
  }
  if (fwd_vectorizable(p, kVec)) {
    return launch_fwd<T, kVec, RMS>(p, ln::make_plan(p.C, kVec, ln::kFwdMaxElems, ln::kFwdMaxGroup), stream);
  }
  return launch_fwd<T, 1, RMS>(p, ln::make_plan(p.C, 1, ln::kFwdMaxElems, ln::kFwdMaxGroup), stream);
}

// The checks and the dtype switch of both launchers (RMS: RMSNorm, which has no mean output and no bias).
template <bool RMS>
cudaError_t run_norm_fwd(const LayerNormFwdParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.C < 0) return cudaErrorInvalidValue;
  if (p.M == 0 || p.C == 0) return cudaSuccess;
  if (p.x == nullptr || p.y == nullptr || p.rstd == nullptr) return cudaErrorInvalidValue;
  if (RMS ? p.bias != nullptr : p.mean == nullptr) return cudaErrorInvalidValue;
  if (p.residual != nullptr && p.h_out == nullptr) return cudaErrorInvalidValue;
  return FASTVIT_FLOAT_SWITCH(p.dtype, T, [&]() -> cudaError_t { return run_fwd<T, RMS>(p, stream); });
}

}  // namespace

cudaError_t run_layer_norm_fwd(const LayerNormFwdParams& p, cudaStream_t stream) {
  return run_norm_fwd<false>(p, stream);
}

cudaError_t run_rms_norm_fwd(const LayerNormFwdParams& p, cudaStream_t stream) { return run_norm_fwd<true>(p, stream); }

}  // namespace fastvit
