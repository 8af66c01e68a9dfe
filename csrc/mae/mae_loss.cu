// fastvit CUDA C++: MAE reconstruction loss forward / backward launchers (see mae.h, mae_kernels.cuh).
// One CTA of kLossThreads threads per patch row (b, n), blockIdx.x = b * N + n. Rows of up to kLossSmemMaxK
// elements cache the target in dynamic shared memory; longer rows re-read the image (L1 / L2 hits).
#include "mae/mae_kernels.cuh"

namespace fastvit {
namespace {

// Shared validation of the loss geometry: returns false for inconsistent or out-of-range sizes.
bool loss_geometry_ok(int64_t B, int64_t N, int64_t C, int64_t Hi, int64_t Wi, int64_t P) {
  if (B < 0 || N < 0 || C < 1 || P < 1 || Hi < 0 || Wi < 0) return false;
  if ((Hi / P) * (Wi / P) != N) return false;
  if (P * P * C > 0x7fffffffLL || B * N > 0x7fffffffLL) return false;  // int element / CTA indices
  return true;
}

// The loss kernel of a params type (kCache: the target row is cached in dynamic shared memory).
template <typename T, bool kCache>
auto loss_kernel(const MaeLossFwdParams&) {
  return mae::mae_loss_fwd_kernel<T, kCache>;
}
template <typename T, bool kCache>
auto loss_kernel(const MaeLossBwdParams&) {
  return mae::mae_loss_bwd_kernel<T, kCache>;
}

// Launches the loss kernel of p (forward or backward; its sizes and pointers already checked): one CTA per patch
// row, the target cached when norm_pix reads it twice and it fits (without norm_pix it is read once: no cache).
template <class Params>
cudaError_t launch_loss(const Params& p, cudaStream_t stream) {
  const int grid_w = static_cast<int>(p.Wi / p.P);
  const int64_t K = p.P * p.P * p.C;
  const unsigned blocks = static_cast<unsigned>(p.B * p.N);
  return FASTVIT_FLOAT_SWITCH(p.dtype, T, [&]() -> cudaError_t {
    if (p.norm_pix && K <= mae::kLossSmemMaxK) {
      const size_t smem = static_cast<size_t>(K) * sizeof(float);
      loss_kernel<T, true>(p)<<<blocks, mae::kLossThreads, smem, stream>>>(p, grid_w);
    } else {
      loss_kernel<T, false>(p)<<<blocks, mae::kLossThreads, 0, stream>>>(p, grid_w);
    }
    FASTVIT_RETURN_LAUNCH_ERROR();
    return cudaSuccess;
  });
}

}  // namespace

cudaError_t run_mae_loss_fwd(const MaeLossFwdParams& p, cudaStream_t stream) {
  if (!loss_geometry_ok(p.B, p.N, p.C, p.Hi, p.Wi, p.P)) return cudaErrorInvalidValue;
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  if (p.pred == nullptr || p.images == nullptr || p.row_loss == nullptr) return cudaErrorInvalidValue;
  return launch_loss(p, stream);
}

cudaError_t run_mae_loss_bwd(const MaeLossBwdParams& p, cudaStream_t stream) {
  if (!loss_geometry_ok(p.B, p.N, p.C, p.Hi, p.Wi, p.P)) return cudaErrorInvalidValue;
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  if (p.drow == nullptr || p.pred == nullptr || p.images == nullptr || p.dpred == nullptr ||
      (p.compute_dimages && p.dimages == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return launch_loss(p, stream);
}

}  // namespace fastvit
