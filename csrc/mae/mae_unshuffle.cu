// fastvit CUDA C++: MAE decoder un-shuffle forward / backward launchers (see mae.h, mae_kernels.cuh).
#include "mae/mae_kernels.cuh"

namespace fastvit {
namespace {

constexpr int kMinTY = mae::kUnshuffleThreads / 32;  // smallest tokens-per-CTA of any configuration

// The CTA shape (TX, TY) of the un-shuffle kernels for C features in vectors of VEC elements:
// TX = threads per token = next power of two of the vectors per token, clamped to 4 .. 32; TY = tokens per CTA.
template <int kTX>
struct Tile {
  static constexpr int TX = kTX;
  static constexpr int TY = mae::kUnshuffleThreads / kTX;
};

// Calls f(Tile<TX>{}) for the CTA shape of C features in VEC-element vectors.
template <int VEC, typename F>
cudaError_t dispatch_tile(int64_t C, F&& f) {
  switch (mae::pow2_clamp((C + VEC - 1) / VEC, 4, 32)) {
    case 4: return f(Tile<4>{});
    case 8: return f(Tile<8>{});
    case 16: return f(Tile<16>{});
    default: return f(Tile<32>{});
  }
}

bool fwd_vectorizable(const MaeUnshuffleFwdParams& p, int vec) {
  if (p.C % vec != 0 || p.x_stride_b % vec != 0 || p.x_stride_t % vec != 0 || p.out_stride_b % vec != 0 ||
      p.out_stride_t % vec != 0) {
    return false;
  }
  if (!mae::aligned16(p.x) || !mae::aligned16(p.out) || !mae::aligned16(p.mask_token)) return false;
  if (p.pos_embed != nullptr && (p.pos_stride_t % vec != 0 || !mae::aligned16(p.pos_embed))) return false;
  return true;
}

bool bwd_vectorizable(const MaeUnshuffleBwdParams& p, int vec) {
  if (p.C % vec != 0 || p.dout_stride_b % vec != 0 || p.dout_stride_t % vec != 0 || p.dx_stride_b % vec != 0 ||
      p.dx_stride_t % vec != 0) {
    return false;
  }
  if (!mae::aligned16(p.dout) || !mae::aligned16(p.dx)) return false;
  if (p.has_pos && (p.dpos_stride_t % vec != 0 || !mae::aligned16(p.dpos))) return false;
  return true;
}

template <typename T, int VEC>
cudaError_t launch_unshuffle_fwd(const MaeUnshuffleFwdParams& p, cudaStream_t stream) {
  return dispatch_tile<VEC>(p.C, [&](auto tile) -> cudaError_t {
    constexpr int TX = decltype(tile)::TX, TY = decltype(tile)::TY;
    const int64_t rows = p.B * (p.N + 1);
    const int64_t blocks = (rows + TY - 1) / TY;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    mae::mae_unshuffle_fwd_kernel<T, VEC, TX><<<static_cast<unsigned>(blocks), dim3(TX, TY), 0, stream>>>(p);
    FASTVIT_RETURN_LAUNCH_ERROR();
    return cudaSuccess;
  });
}

template <typename T, int VEC>
cudaError_t launch_unshuffle_bwd(const MaeUnshuffleBwdParams& p, cudaStream_t stream) {
  return dispatch_tile<VEC>(p.C, [&](auto tile) -> cudaError_t {
    constexpr int TX = decltype(tile)::TX, TY = decltype(tile)::TY;
    const int64_t n_cblocks = (p.C + TX * VEC - 1) / (TX * VEC);
    const int64_t n_tblocks = (p.N + 1 + TY - 1) / TY;  // <= ceil((N + 1) / kMinTY): fits the workspace
    const int64_t blocks = n_cblocks * n_tblocks;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    float* part = static_cast<float*>(p.workspace);
    mae::mae_unshuffle_bwd_kernel<T, VEC, TX>
        <<<static_cast<unsigned>(blocks), dim3(TX, TY), 0, stream>>>(p, part, n_cblocks);
    FASTVIT_RETURN_LAUNCH_ERROR();
    return launch_column_sum<T>(part, n_tblocks, p.C, static_cast<T*>(p.dmask_token), stream);
  });
}

}  // namespace

cudaError_t run_mae_unshuffle_fwd(const MaeUnshuffleFwdParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.N < 0 || p.C < 0 || p.N_keep < 0 || p.N_keep > p.N) return cudaErrorInvalidValue;
  if (p.B == 0 || p.C == 0) return cudaSuccess;  // out is empty (it always has 1 + N >= 1 tokens)
  if (p.x == nullptr || p.mask_token == nullptr || p.out == nullptr || (p.N > 0 && p.ids_restore == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return FASTVIT_FLOAT_SWITCH(p.dtype, T, [&]() -> cudaError_t {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    if (fwd_vectorizable(p, kVec)) return launch_unshuffle_fwd<T, kVec>(p, stream);
    return launch_unshuffle_fwd<T, 1>(p, stream);
  });
}

size_t mae_unshuffle_bwd_workspace_bytes(const MaeUnshuffleBwdParams& p) {
  if (p.N < 0 || p.C <= 0) return 0;
  return static_cast<size_t>((p.N + 1 + kMinTY - 1) / kMinTY) * static_cast<size_t>(p.C) * sizeof(float);
}

cudaError_t run_mae_unshuffle_bwd(const MaeUnshuffleBwdParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.N < 0 || p.C < 0 || p.N_keep < 0 || p.N_keep > p.N) return cudaErrorInvalidValue;
  if (p.C == 0) return cudaSuccess;
  // B == 0 still runs: dmask_token and dpos are sums over no batch rows (zeros)
  if (p.dmask_token == nullptr || p.workspace == nullptr || (p.has_pos && p.dpos == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.B > 0 && (p.dout == nullptr || p.dx == nullptr || (p.N > 0 && p.ids_restore == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return FASTVIT_FLOAT_SWITCH(p.dtype, T, [&]() -> cudaError_t {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    if (bwd_vectorizable(p, kVec)) return launch_unshuffle_bwd<T, kVec>(p, stream);
    return launch_unshuffle_bwd<T, 1>(p, stream);
  });
}

}  // namespace fastvit
