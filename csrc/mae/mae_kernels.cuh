// fastvit CUDA C++: MAE un-shuffle and loss kernels (torch-free; semantics in mae.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "common/column_sum.cuh"
#include "common/dispatch.cuh"
#include "layer_norm/vec_io.cuh"
#include "mae/mae.h"

namespace fastvit {
namespace mae {

using ln::load_ro;
using ln::store_vec;

// ------------------------------------------------------------------------------------------ un-shuffle
// Threads per CTA of the un-shuffle kernels: blockDim = (TX, kUnshuffleThreads / TX); TX threads cover one
// token's C features in vectors of VEC elements (columns c = (chunk * TX + tx) * VEC + j).
constexpr int kUnshuffleThreads = 128;
// Batch rows whose loads the backward issues before it uses any of them (memory-level parallelism).
constexpr int kBwdBatchUnroll = 4;

// Forward: one output token per threadIdx.y; row = blockIdx.x * TY + ty indexes the B * (1 + N) output rows
// (row = b * (1 + N) + t). Token t = 0 copies x[b, 0]; token t = 1 + j reads x[b, 1 + r] when
// 0 <= r = ids_restore[b, j] < N_keep and the mask token otherwise; pos[t] is added in fp32 and the sum is
// rounded once to T.
template <typename T, int VEC, int TX>
__global__ void __launch_bounds__(kUnshuffleThreads) mae_unshuffle_fwd_kernel(const MaeUnshuffleFwdParams p) {
  constexpr int TY = kUnshuffleThreads / TX;
  const int64_t T_out = p.N + 1;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * TY + threadIdx.y;
  if (row >= p.B * T_out) return;  // no barriers in this kernel
  const int64_t b = row / T_out;
  const int64_t t = row - b * T_out;

  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b;
  const T* src;
  if (t == 0) {
    src = x;  // cls token
  } else {
    const int64_t r = __ldg(p.ids_restore + b * p.ids_stride_b + (t - 1));
    src = (r >= 0 && r < p.N_keep) ? x + (1 + r) * p.x_stride_t : static_cast<const T*>(p.mask_token);
  }
  const T* pos = p.pos_embed != nullptr ? static_cast<const T*>(p.pos_embed) + t * p.pos_stride_t : nullptr;
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + t * p.out_stride_t;

  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < p.C; c += static_cast<int64_t>(TX) * VEC) {
    float v[VEC];
    load_ro<T, VEC>(src + c, v);
    if (pos != nullptr) {
      float pv[VEC];
      load_ro<T, VEC>(pos + c, pv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] += pv[j];
    }
    store_vec<T, VEC>(out + c, v);
  }
}

// Backward, fused: CTA (tb, cb) owns output tokens t = tb * TY + ty (ty < TY) and the column chunk
// c = (cb * TX + tx) * VEC + j, and walks the batch b = 0 .. B-1 in order (kBwdBatchUnroll rows of loads in
// flight). For each (b, t) it
//   * scatters dout[b, t] to dx[b, 0] (t = 0) or dx[b, 1 + r] (0 <= r = ids_restore[b, t-1] < N_keep): the ids
//     are a permutation, so each dx row has exactly one writer;
//   * adds dout[b, t] to acc_pos (-> dpos[t], exact fixed-order fp32 sum over b) and, for masked tokens, to
//     acc_mask.
// The CTA then sums acc_mask over its TY tokens in fixed order (shared memory) into row tb of the
// (n_tblocks, C) fp32 partial buffer that column_sum_kernel (common/column_sum.cuh) reduces to dmask_token.
template <typename T, int VEC, int TX>
__global__ void __launch_bounds__(kUnshuffleThreads)
    mae_unshuffle_bwd_kernel(const MaeUnshuffleBwdParams p, float* __restrict__ mask_part, int64_t n_cblocks) {
  constexpr int TY = kUnshuffleThreads / TX;
  constexpr int U = kBwdBatchUnroll;
  __shared__ float s_mask[TY][TX * VEC + 1];

  const int64_t cb = blockIdx.x % n_cblocks;
  const int64_t tb = blockIdx.x / n_cblocks;
  const int64_t T_out = p.N + 1;
  const int64_t t = tb * TY + threadIdx.y;
  const int64_t c = (cb * TX + threadIdx.x) * VEC;
  const bool active = t < T_out && c < p.C;

  const T* dout = static_cast<const T*>(p.dout);
  T* dx = static_cast<T*>(p.dx);
  float acc_pos[VEC], acc_mask[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc_pos[j] = acc_mask[j] = 0.f;

  if (active) {
    for (int64_t b0 = 0; b0 < p.B; b0 += U) {
      // issue the loads of U batch rows first, then consume them in increasing b (fixed summation order)
      int dst[U];  // dx token of (b, t), or -1 for a masked token (token counts fit in int)
      float g[U][VEC];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t b = b0 + u;
        dst[u] = -1;
        if (b < p.B) {
          if (t == 0) {
            dst[u] = 0;
          } else {
            const int64_t r = __ldg(p.ids_restore + b * p.ids_stride_b + (t - 1));
            dst[u] = (r >= 0 && r < p.N_keep) ? static_cast<int>(1 + r) : -1;
          }
          load_ro<T, VEC>(dout + b * p.dout_stride_b + t * p.dout_stride_t + c, g[u]);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) g[u][j] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t b = b0 + u;
        if (b < p.B) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc_pos[j] += g[u][j];
          if (dst[u] >= 0) {
            store_vec<T, VEC>(dx + b * p.dx_stride_b + static_cast<int64_t>(dst[u]) * p.dx_stride_t + c,
                              g[u]);  // exact copy
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc_mask[j] += g[u][j];
          }
        }
      }
    }
    if (p.has_pos) store_vec<T, VEC>(static_cast<T*>(p.dpos) + t * p.dpos_stride_t + c, acc_pos);
  }

  // d mask_token partial of this CTA: sum over its TY tokens (inactive threads contribute zeros)
#pragma unroll
  for (int j = 0; j < VEC; ++j) s_mask[threadIdx.y][threadIdx.x * VEC + j] = acc_mask[j];
  __syncthreads();
  if (threadIdx.y == 0 && c < p.C) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = s_mask[0][threadIdx.x * VEC + j];
      for (int k = 1; k < TY; ++k) s += s_mask[k][threadIdx.x * VEC + j];
      mask_part[tb * p.C + c + j] = s;
    }
  }
}

// ------------------------------------------------------------------------------------------ loss
constexpr int kLossThreads = 128;
// Largest K whose (normalised) target row is cached in shared memory without the > 48 KiB opt-in: the 48 KiB
// default limit covers static + dynamic shared memory, and the loss kernels also hold red[2][kLossThreads / 32]
// statically, so K fp32 may use 48 KiB - 32 B (K = 12288, e.g. P = 64, C = 3, would fail to launch).
constexpr int kLossSmemMaxK =
    static_cast<int>((48 * 1024 - 2 * (kLossThreads / 32) * sizeof(float)) / sizeof(float));  // 12280

// Deterministic CTA-wide sum (kLossThreads threads): warp butterflies, then every thread adds the warp totals
// in order. `slot` alternates between calls (see ln::group_sum) so one barrier per call suffices.
__device__ __forceinline__ float block_sum(float v, float* slot) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) slot[threadIdx.x / 32] = v;
  __syncthreads();
  float total = slot[0];
#pragma unroll
  for (int k = 1; k < kLossThreads / 32; ++k) total += slot[k];
  return total;
}

// Geometry of one patch row (b, n). Elements are enumerated in *image* order
//     e = (c * P + p) * P + q,   q = e % P,  p = (e / P) % P,  c = e / (P * P)
// so consecutive threads read consecutive pixels of an image row (coalesced when the width stride is 1);
// the same element is k = (p * P + q) * C + c of the pred / target row (MAE's (p, q, c) patchify order) and
// the pixel images[b, c, hp * P + p, wp * P + q] with (hp, wp) = (n / grid_w, n % grid_w).
struct PatchIndex {
  int P, C;
  __device__ __forceinline__ void decode(int e, int& c, int& pp, int& q, int& k) const {
    q = e % P;
    const int cp = e / P;  // c * P + p
    pp = cp % P;
    c = cp / P;
    k = (pp * P + q) * C + c;
  }
};

// MAE's norm_pix statistics of one patch, block-wide (every thread of the CTA calls it): mean and 1/σ of its K
// pixels, σ² the unbiased variance + 1e-6 (K = 1 gives 0 / 0 = NaN, as torch.var and the Triton kernel). With
// kCache each thread also stores the pixels it visits in s_t[e], read back by that same thread later.
template <bool kCache, class Pixel>
__device__ __forceinline__ void patch_stats(const PatchIndex& ix, int K, Pixel pixel, float* s_t,
                                            float (&red)[2][kLossThreads / 32], float& mean, float& rsig) {
  float s = 0.f;
  for (int e = threadIdx.x; e < K; e += kLossThreads) {
    int c, pp, q, k;
    ix.decode(e, c, pp, q, k);
    const float t = pixel(c, pp, q);
    if constexpr (kCache) s_t[e] = t;
    s += t;
  }
  mean = block_sum(s, red[0]) / static_cast<float>(K);
  float ss = 0.f;
  for (int e = threadIdx.x; e < K; e += kLossThreads) {
    int c, pp, q, k;
    ix.decode(e, c, pp, q, k);
    const float d = (kCache ? s_t[e] : pixel(c, pp, q)) - mean;  // s_t[e] was written by this thread
    ss += d * d;
  }
  const float var = block_sum(ss, red[1]) / static_cast<float>(K - 1);
  rsig = 1.f / sqrtf(var + 1e-6f);
}

// The patch row of a loss CTA and its pixels (the prologue shared by the forward and backward kernels):
// row = blockIdx.x = b * N + n, patch n at grid position (hp, wp) = (n / grid_w, n % grid_w), whose top-left
// pixel is (h0, w0) = (hp * P, wp * P). Called as pixel(c, pp, q): pixel (c, h0 + pp, w0 + q) in fp32.
template <typename T, class Params>
struct LossRow {
  const Params& p;
  int P, C, K;
  int64_t row, b;
  int n;
  int64_t h0, w0;
  const T* img;   // images[b, 0, h0, w0]
  const T* pred;  // pred[b, n, 0]

  __device__ __forceinline__ LossRow(const Params& params, int grid_w) : p(params) {
    P = static_cast<int>(p.P);
    C = static_cast<int>(p.C);
    K = P * P * C;
    row = blockIdx.x;
    b = row / p.N;
    n = static_cast<int>(row - b * p.N);
    const int hp = n / grid_w, wp = n % grid_w;
    h0 = static_cast<int64_t>(hp) * P;
    w0 = static_cast<int64_t>(wp) * P;
    img = static_cast<const T*>(p.images) + b * p.img_stride_b + h0 * p.img_stride_h + w0 * p.img_stride_w;
    pred = static_cast<const T*>(p.pred) + b * p.pred_stride_b + static_cast<int64_t>(n) * p.pred_stride_n;
  }

  __device__ __forceinline__ float operator()(int c, int pp, int q) const {
    float v[1];
    load_ro<T, 1>(img + c * p.img_stride_c + pp * p.img_stride_h + q * p.img_stride_w, v);
    return v[0];
  }
};

// Loss row (b, n) per CTA (blockIdx.x = b * N + n). kCache: the (normalised) target lives in dynamic shared
// memory (K floats); otherwise it is re-read from the image for every pass.
template <typename T, bool kCache>
__global__ void __launch_bounds__(kLossThreads) mae_loss_fwd_kernel(const MaeLossFwdParams p, int grid_w) {
  extern __shared__ float s_t[];
  __shared__ float red[2][kLossThreads / 32];
  const LossRow<T, MaeLossFwdParams> pixel(p, grid_w);
  const int K = pixel.K;
  const int64_t row = pixel.row;
  const T* pred = pixel.pred;
  const PatchIndex ix{pixel.P, pixel.C};

  float mean = 0.f, rsig = 1.f;
  if (p.norm_pix) patch_stats<kCache>(ix, K, pixel, s_t, red, mean, rsig);
  float acc = 0.f;
  for (int e = threadIdx.x; e < K; e += kLossThreads) {
    int c, pp, q, k;
    ix.decode(e, c, pp, q, k);
    const float t = ((kCache && p.norm_pix) ? s_t[e] : pixel(c, pp, q));
    const float tgt = p.norm_pix ? (t - mean) * rsig : t;
    float x[1];
    load_ro<T, 1>(pred + k, x);
    const float d = x[0] - tgt;
    acc += d * d;
  }
  // red[0] is reused: the barrier of the red[1] reduction separates it from the last reads of red[0]; without
  // norm_pix this is the only reduction.
  const float total = block_sum(acc, red[0]);
  if (threadIdx.x == 0) p.row_loss[row] = total / static_cast<float>(K);
}

// Backward of row (b, n): g = (pred - that) * 2 drow / K -> dpred; gt = -g; without norm_pix dimages = gt,
// with norm_pix dimages = (gt - mean(gt) - that * sum(gt * that) / (K - 1)) * rsig. With kCache, s_t holds
// that (the normalised target) after the statistics pass.
template <typename T, bool kCache>
__global__ void __launch_bounds__(kLossThreads) mae_loss_bwd_kernel(const MaeLossBwdParams p, int grid_w) {
  extern __shared__ float s_t[];
  __shared__ float red[2][kLossThreads / 32];
  const LossRow<T, MaeLossBwdParams> pixel(p, grid_w);
  const int K = pixel.K;
  const int64_t b = pixel.b, h0 = pixel.h0, w0 = pixel.w0;
  const int n = pixel.n;
  const T* pred = pixel.pred;
  T* dpred = static_cast<T*>(p.dpred) + b * p.dpred_stride_b + static_cast<int64_t>(n) * p.dpred_stride_n;
  T* dimg = p.compute_dimages
                ? static_cast<T*>(p.dimages) + b * p.dimg_stride_b + h0 * p.dimg_stride_h + w0 * p.dimg_stride_w
                : nullptr;
  const PatchIndex ix{pixel.P, pixel.C};
  const float scale =
      2.f * p.drow[b * p.drow_stride_b + static_cast<int64_t>(n) * p.drow_stride_n] / static_cast<float>(K);

  float mean = 0.f, rsig = 1.f;
  if (p.norm_pix) patch_stats<kCache>(ix, K, pixel, s_t, red, mean, rsig);
  // that(e): the (normalised) target of element e
  auto target = [&](int e, int c, int pp, int q) -> float {
    if (p.norm_pix) return ((kCache ? s_t[e] : pixel(c, pp, q)) - mean) * rsig;
    return pixel(c, pp, q);
  };

  // dpred (and dimages without norm_pix; with norm_pix the sums of gt and gt * that)
  float s1 = 0.f, s2 = 0.f;
  for (int e = threadIdx.x; e < K; e += kLossThreads) {
    int c, pp, q, k;
    ix.decode(e, c, pp, q, k);
    const float tgt = target(e, c, pp, q);
    float x[1];
    load_ro<T, 1>(pred + k, x);
    float g[1] = {(x[0] - tgt) * scale};
    store_vec<T, 1>(dpred + k, g);
    if (dimg != nullptr) {
      const float gt = -g[0];
      if (p.norm_pix) {
        s1 += gt;
        s2 += gt * tgt;
      } else {
        float v[1] = {gt};
        store_vec<T, 1>(dimg + c * p.dimg_stride_c + pp * p.dimg_stride_h + q * p.dimg_stride_w, v);
      }
    }
  }
  if (dimg != nullptr && p.norm_pix) {  // uniform over the CTA
    // red[0] again: the red[1] barrier above separates this write from the last reads of red[0]
    const float gmean = block_sum(s1, red[0]) / static_cast<float>(K);
    const float gdot = block_sum(s2, red[1]) / static_cast<float>(K - 1);
    for (int e = threadIdx.x; e < K; e += kLossThreads) {
      int c, pp, q, k;
      ix.decode(e, c, pp, q, k);
      const float tgt = target(e, c, pp, q);
      float x[1];
      load_ro<T, 1>(pred + k, x);
      const float gt = -((x[0] - tgt) * scale);  // the same fp32 value as in the pass above
      float v[1] = {(gt - gmean - tgt * gdot) * rsig};
      store_vec<T, 1>(dimg + c * p.dimg_stride_c + pp * p.dimg_stride_h + q * p.dimg_stride_w, v);
    }
  }
}

inline int pow2_clamp(int64_t v, int lo, int hi) {
  int p = lo;
  while (p < v && p < hi) p <<= 1;
  return p;
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace mae
}  // namespace fastvit
