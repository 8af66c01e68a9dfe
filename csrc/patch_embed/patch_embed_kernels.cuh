// Internal: the memory-bound SIMT kernels of patch embedding (gathers, scatters, batch sums). Deterministic: every
// output element has exactly one writer and sums run in a fixed order. Indices are int64 throughout.
#pragma once

#include <cstdint>

#include <cutlass/numeric_types.h>

#include "common/common.h"

namespace fastvit {
namespace patch_detail {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t total, int64_t max_blocks = 65535LL * 16) {
  int64_t b = (total + kThreads - 1) / kThreads;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return unsigned(b);
}

// The grid-stride loop of the 1-D kernels below: f(idx) for every idx < total, idx = blockIdx.x·kThreads +
// threadIdx.x + i·gridDim.x·kThreads.
template <class F>
__device__ __forceinline__ void grid_stride(int64_t total, F&& f) {
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * kThreads)
    f(idx);
}

// dst[(b·rows_per_batch + t)·Kp + k] for t < rows_per_batch, k < Kp:
//   0                                   when t < prefix_rows (rows of dout's prefix tokens) or k >= K (padding);
//   images[b, c, py·Ph + i, px·Pw + jj] otherwise, with j = t - prefix_rows, p = ids ? ids[b, j] : j,
//                                       (py, px) = (p / gw, p % gw), k = (c·Ph + i)·Pw + jj  (weight order).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    im2col_kernel(const T* __restrict__ img, int64_t sb, int64_t sc, int64_t sh, int64_t sw,
                  const int64_t* __restrict__ ids, int64_t ids_sb, T* __restrict__ dst, int64_t B,
                  int64_t rows_per_batch, int64_t prefix_rows, int64_t K, int64_t Kp, int64_t Ph, int64_t Pw,
                  int64_t gw, int64_t Np) {
  const int64_t total = B * rows_per_batch * Kp;
  grid_stride(total, [&](int64_t idx) {
    const int64_t k = idx % Kp;
    const int64_t row = idx / Kp;
    const int64_t b = row / rows_per_batch;
    const int64_t t = row - b * rows_per_batch;
    T v = T(0.0f);
    if (t >= prefix_rows && k < K) {
      const int64_t j = t - prefix_rows;
      const int64_t p = ids != nullptr ? ids[b * ids_sb + j] : j;
      if (p >= 0 && p < Np) {  // out-of-range ids read nothing (zeros) instead of faulting
        const int64_t c = k / (Ph * Pw);
        const int64_t i = (k / Pw) % Ph;
        const int64_t jj = k % Pw;
        const int64_t y = (p / gw) * Ph + i;
        const int64_t x = (p % gw) * Pw + jj;
        v = img[b * sb + c * sc + y * sh + x * sw];
      }
    }
    dst[idx] = v;
  });
}

// Wp[e·Kp + k] = k < K ? W[e·K + k] : 0  (weight (E, K) contiguous).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pad_weight_kernel(const T* __restrict__ w, T* __restrict__ wp, int64_t E, int64_t K, int64_t Kp) {
  const int64_t total = E * Kp;
  grid_stride(total, [&](int64_t idx) {
    const int64_t e = idx / Kp, k = idx - e * Kp;
    wp[idx] = k < K ? w[e * K + k] : T(0.0f);
  });
}

// The (E × Kp) weight operand of the GEMMs: `weight` itself when pad is false (K == Kp), else `weight` with zero
// columns K..Kp-1 written to the workspace at wp by pad_weight_kernel. Returns the launch error.
template <typename T>
cudaError_t weight_operand(const void* weight, bool pad, void* wp, int64_t E, int64_t K, int64_t Kp,
                           cudaStream_t stream, const T** operand) {
  const T* w = static_cast<const T*>(weight);
  if (pad) {
    T* padded = static_cast<T*>(wp);
    pad_weight_kernel<T><<<blocks_for(E * Kp), kThreads, 0, stream>>>(w, padded, E, K, Kp);
    FASTVIT_RETURN_LAUNCH_ERROR();
    w = padded;
  }
  *operand = w;
  return cudaSuccess;
}

// posg[(b·Nk + j)·E + e] = pos[(pos_off + ids[b, j])·pst + e]  (an exact copy: no rounding).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_pos_kernel(const T* __restrict__ pos, int64_t pst, int64_t pos_off, const int64_t* __restrict__ ids,
                      int64_t ids_sb, T* __restrict__ posg, int64_t B, int64_t Nk, int64_t E, int64_t Np) {
  const int64_t total = B * Nk * E;
  grid_stride(total, [&](int64_t idx) {
    const int64_t e = idx % E;
    const int64_t row = idx / E;
    const int64_t b = row / Nk, j = row - b * Nk;
    const int64_t p = ids[b * ids_sb + j];
    posg[idx] = (p >= 0 && p < Np) ? pos[(pos_off + p) * pst + e] : T(0.0f);
  });
}

// out[b, r, e] = prefix[r, e] (+ pos[r, e]) for r < R: prefix row 0 is cls when n_cls == 1, then the registers.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    prefix_rows_kernel(const T* __restrict__ cls, const T* __restrict__ reg, int64_t n_cls, const T* __restrict__ pos,
                       int64_t pst, bool add_pos, T* __restrict__ out, int64_t osb, int64_t ost, int64_t B, int64_t R,
                       int64_t E) {
  const int64_t total = B * R * E;
  grid_stride(total, [&](int64_t idx) {
    const int64_t e = idx % E;
    const int64_t row = idx / E;
    const int64_t b = row / R, r = row - b * R;
    const T src = r < n_cls ? cls[e] : reg[(r - n_cls) * E + e];
    T v = src;
    if (add_pos) v = T(float(src) + float(pos[r * pst + e]));
    out[b * osb + r * ost + e] = v;
  });
}

// inv[b·Np + p] = j if ids[b, j] == p, else -1. Two passes: fill, then scatter (unique ids: one writer each).
// (Templates so that this header can be included by several translation units without duplicate symbols.)
template <typename IndexT>
__global__ void __launch_bounds__(kThreads) fill_inv_kernel(IndexT* __restrict__ inv, int64_t total) {
  grid_stride(total, [&](int64_t idx) { inv[idx] = -1; });
}
template <typename IndexT>
__global__ void __launch_bounds__(kThreads)
    scatter_inv_kernel(const int64_t* __restrict__ ids, int64_t ids_sb, IndexT* __restrict__ inv, int64_t B, int64_t Nk,
                       int64_t Np) {
  const int64_t total = B * Nk;
  grid_stride(total, [&](int64_t idx) {
    const int64_t b = idx / Nk, j = idx - b * Nk;
    const int64_t p = ids[b * ids_sb + j];
    if (p >= 0 && p < Np) inv[b * Np + p] = IndexT(j);
  });
}

// dimages[b, c, y, x] (any strides) = dA[(b·Nk + j)·Kp + k] for pixels of kept patches (j = the kept row of patch
// p = (y / Ph)·gw + x / Pw, k = (c·Ph + y % Ph)·Pw + x % Pw); 0 for dropped patches, for pixels outside the
// patch grid, and everywhere when dA == nullptr. Patches do not overlap (stride = kernel): one writer per pixel.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    col2im_kernel(const T* __restrict__ dA, const int* __restrict__ inv, T* __restrict__ dimg, int64_t sb, int64_t sc,
                  int64_t sh, int64_t sw, int64_t B, int64_t C, int64_t Hi, int64_t Wi, int64_t Ph, int64_t Pw,
                  int64_t gh, int64_t gw, int64_t Nk, int64_t Kp) {
  const int64_t total = B * C * Hi * Wi;
  const int64_t Np = gh * gw;
  grid_stride(total, [&](int64_t idx) {
    const int64_t x = idx % Wi;
    int64_t rest = idx / Wi;
    const int64_t y = rest % Hi;
    rest /= Hi;
    const int64_t c = rest % C;
    const int64_t b = rest / C;
    T v = T(0.0f);
    if (dA != nullptr && y < gh * Ph && x < gw * Pw) {
      const int64_t p = (y / Ph) * gw + x / Pw;
      const int64_t j = inv != nullptr ? int64_t(inv[b * Np + p]) : p;
      if (j >= 0) {
        const int64_t k = (c * Ph + y % Ph) * Pw + x % Pw;
        v = dA[(b * Nk + j) * Kp + k];
      }
    }
    dimg[b * sb + c * sc + y * sh + x * sw] = v;
  });
}

// Batch sums, one thread per (row t, feature e), the batch summed in order in fp32:
//   t < R (prefix rows):  s = Σ_b dout[b, t, e]  → dcls / dreg / dpos[t] (rounded to T) when requested;
//   t = R + p (patch p):  s = Σ_b dout[b, R + j_b(p), e] over the batches that kept p (j_b = inv, or p itself)
//                         → S[p·E + e] (fp32, for dbias) and dpos[pos_off + p] when requested.
// Grid: x over E in blocks of 256, y strides over the R + Np rows.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    batch_sum_kernel(const T* __restrict__ dout, int64_t dsb, int64_t dst, const int* __restrict__ inv, int64_t B,
                     int64_t R, int64_t n_cls, int64_t Np, int64_t E, float* __restrict__ S, T* __restrict__ dpos,
                     bool prefix_pos, int64_t pos_off, T* __restrict__ dcls, T* __restrict__ dreg) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= E) return;
  for (int64_t t = blockIdx.y; t < R + Np; t += gridDim.y) {
    float s = 0.0f;
    for (int64_t b = 0; b < B; ++b) {
      int64_t src;
      if (t < R) {
        src = t;
      } else {
        const int64_t p = t - R;
        const int64_t j = inv != nullptr ? int64_t(inv[b * Np + p]) : p;
        if (j < 0) continue;  // patch p dropped in image b
        src = R + j;
      }
      s += float(dout[b * dsb + src * dst + e]);
    }
    if (t < R) {
      if (t < n_cls) {
        if (dcls != nullptr) dcls[t * E + e] = T(s);
      } else if (dreg != nullptr) {
        dreg[(t - n_cls) * E + e] = T(s);
      }
      if (dpos != nullptr && prefix_pos) dpos[t * E + e] = T(s);
    } else {
      const int64_t p = t - R;
      S[p * E + e] = s;
      if (dpos != nullptr) dpos[(pos_off + p) * E + e] = T(s);
    }
  }
}

}  // namespace patch_detail
}  // namespace fastvit
