// Internal: the memory-bound SIMT kernels of the linear backward (and the fp32 → T conversion that patch_embed
// reuses). Plain CUDA on CUTLASS's numeric types; deterministic (fixed summation orders, no atomics).
#pragma once

#include <cstdint>

#include <cutlass/array.h>
#include <cutlass/numeric_types.h>

#include "common/column_sum.cuh"
#include "common/common.h"
#include "linear/linear.h"

namespace fastvit {
namespace linear_detail {

// What the prologue applies to dy (Triton's PRO_* modes).
enum class Pro : int { kNone = 0, kScale = 1, kGeluErf = 2, kGeluTanh = 3 };

// GELU'(h) in fp32, exactly the formulas of kernels/linear.py (_gelu_grad):
//   erf:  0.5·(1 + erf(h/√2)) + h·exp(-h²/2)/√(2π)
//   tanh: 0.5·(1 + t) + 0.5·h·(1 - t²)·√(2/π)·(1 + 3·0.044715·h²),  t = tanh(√(2/π)·(h + 0.044715·h³))
__device__ __forceinline__ float gelu_grad(float h, bool tanh_form) {
  if (tanh_form) {
    const float t = tanhf((h + h * h * h * 0.044715f) * 0.7978845608028654f);
    return 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * 0.7978845608028654f * (1.0f + h * h * (3.0f * 0.044715f));
  }
  return 0.5f * (1.0f + erff(h * 0.7071067811865476f)) + h * expf(-0.5f * h * h) * 0.3989422804014327f;
}

template <typename T>
using Vec8 = cutlass::AlignedArray<T, 8>;  // 16 bytes: one 128-bit access

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const Vec8<T> a = *reinterpret_cast<const Vec8<T>*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = float(a[i]);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  Vec8<T> a;
#pragma unroll
  for (int i = 0; i < 8; ++i) a[i] = T(v[i]);
  *reinterpret_cast<Vec8<T>*>(p) = a;
}

// Block: 32 × 8 threads. threadIdx.x owns 8 consecutive columns (one 128-bit vector), so a CTA covers 256 columns;
// threadIdx.y strides the CTA's rows [blockIdx.y·rows_per_block, +rows_per_block) by 8.
constexpr int kProThreadsX = 32;
constexpr int kProThreadsY = 8;
constexpr int kProCols = kProThreadsX * 8;  // 256

// g = f(dy) (rounded to T, stored at g[r·N + c] when g != nullptr), and per row block the fp32 column sums of f(dy)
// (part_db[blockIdx.y·N + c]) and of dy ⊙ z (part_dg[...]). f: kNone: dy; kScale: dy ⊙ p (p = gamma, (N,));
// kGelu*: dy ⊙ GELU'(p) (p = h, (M, N) with ldp). Requires N % 8 == 0, 16-byte aligned rows.
// The sums are reduced in a fixed order: each thread over its rows in increasing order, then the 8 row-threads
// in threadIdx.y order.
template <typename T, Pro kPro>
__global__ void __launch_bounds__(kProThreadsX* kProThreadsY)
    bwd_prologue_kernel(int64_t M, int64_t N, const T* __restrict__ dy, int64_t lddy, const T* __restrict__ p,
                        int64_t ldp, const T* __restrict__ z, int64_t ldz, T* __restrict__ g,
                        float* __restrict__ part_db, float* __restrict__ part_dg, int64_t rows_per_block) {
  __shared__ float red[2][kProThreadsY][kProCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (int64_t(blockIdx.x) * kProThreadsX + tx) * 8;  // first of this thread's 8 columns
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < M ? row_begin + rows_per_block : M;
  float sdb[8], sdg[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) sdb[i] = sdg[i] = 0.0f;
  if (col < N) {
    float scale[8];
    if constexpr (kPro == Pro::kScale) load8(p + col, scale);
    for (int64_t r = row_begin + ty; r < row_end; r += kProThreadsY) {
      float d[8], gv[8];
      load8(dy + r * lddy + col, d);
      if constexpr (kPro == Pro::kNone) {
#pragma unroll
        for (int i = 0; i < 8; ++i) gv[i] = d[i];
      } else if constexpr (kPro == Pro::kScale) {
#pragma unroll
        for (int i = 0; i < 8; ++i) gv[i] = d[i] * scale[i];
      } else {
        float h[8];
        load8(p + r * ldp + col, h);
#pragma unroll
        for (int i = 0; i < 8; ++i) gv[i] = d[i] * gelu_grad(h[i], kPro == Pro::kGeluTanh);
      }
      if (g != nullptr) store8(g + r * N + col, gv);
      if (part_db != nullptr) {
#pragma unroll
        for (int i = 0; i < 8; ++i) sdb[i] += gv[i];
      }
      if (part_dg != nullptr) {
        float zz[8];
        load8(z + r * ldz + col, zz);
#pragma unroll
        for (int i = 0; i < 8; ++i) sdg[i] += d[i] * zz[i];
      }
    }
  }
  if (part_db == nullptr && part_dg == nullptr) return;  // uniform across the block
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    red[0][ty][tx * 8 + i] = sdb[i];
    red[1][ty][tx * 8 + i] = sdg[i];
  }
  __syncthreads();
  const int t = ty * kProThreadsX + tx;  // 0..255: one column of the CTA's 256
  const int64_t c = int64_t(blockIdx.x) * kProCols + t;
  if (c < N) {
    float a = 0.0f, b = 0.0f;
#pragma unroll
    for (int y = 0; y < kProThreadsY; ++y) {
      a += red[0][y][t];
      b += red[1][y][t];
    }
    if (part_db != nullptr) part_db[int64_t(blockIdx.y) * N + c] = a;
    if (part_dg != nullptr) part_dg[int64_t(blockIdx.y) * N + c] = b;
  }
}

// ------------------------------------------------------------------------------------------ gated (GLU) math
// σ(h) = 1 / (1 + e^-h) with the accurate expf (h < -88: e^-h = inf, σ = 0; no NaN for finite h).
__device__ __forceinline__ float sigmoid_f32(float h) { return 1.0f / (1.0f + expf(-h)); }

// act(h) of linear_glu's gate, fp32: the formulas of kernels/linear.py (_glu_act).
__device__ __forceinline__ float glu_act(float h, GluActivation act) {
  switch (act) {
    case GluActivation::kSilu: return h * sigmoid_f32(h);
    case GluActivation::kGeluErf: return 0.5f * h * (1.0f + erff(h * 0.7071067811865476f));
    case GluActivation::kGeluTanh: return 0.5f * h * (1.0f + tanhf((h + h * h * h * 0.044715f) * 0.7978845608028654f));
    default: return sigmoid_f32(h);
  }
}

// act'(h), fp32 (kernels/linear.py's _glu_act_grad): silu σ·(1 + h·(1 − σ)); GELU as gelu_grad; sigmoid σ·(1 − σ).
__device__ __forceinline__ float glu_act_grad(float h, GluActivation act) {
  switch (act) {
    case GluActivation::kSilu: {
      const float s = sigmoid_f32(h);
      return s * (1.0f + h * (1.0f - s));
    }
    case GluActivation::kGeluErf: return gelu_grad(h, false);
    case GluActivation::kGeluTanh: return gelu_grad(h, true);
    default: {
      const float s = sigmoid_f32(h);
      return s * (1.0f - s);
    }
  }
}

// linear_glu's backward prologue, one thread per 8 columns of the gated width N (the bwd_prologue_kernel grid: 32 × 8
// threads, 256 columns per CTA, row block blockIdx.y): from dy (M, N) and the saved [h_g | h_x] (M, 2N, ld ldh),
//   dh_g = dy ⊙ h_x ⊙ act'(h_g),  dh_x = dy ⊙ act(h_g)        (fp32)
// rounded to T into dh (ld lddh) at columns off_g + c and off_x + c, and -- when part_dbg != nullptr -- the fp32
// column sums of the unrounded dh_g / dh_x over the row block into part_dbg / part_dbx[blockIdx.y·N + c], in the
// fixed order of bwd_prologue_kernel. kAct: the activation (a template argument: the per-element switch leaves the
// loop). Requires N % 8 == 0 and 16-byte aligned rows.
template <typename T, GluActivation kAct>
__global__ void __launch_bounds__(kProThreadsX* kProThreadsY)
    glu_bwd_prologue_kernel(int64_t M, int64_t N, const T* __restrict__ dy, int64_t lddy, const T* __restrict__ h,
                            int64_t ldh, T* __restrict__ dh, int64_t lddh, int64_t off_g, int64_t off_x,
                            float* __restrict__ part_dbg, float* __restrict__ part_dbx, int64_t rows_per_block) {
  __shared__ float red[2][kProThreadsY][kProCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (int64_t(blockIdx.x) * kProThreadsX + tx) * 8;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < M ? row_begin + rows_per_block : M;
  float sg[8], sx[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) sg[i] = sx[i] = 0.0f;
  if (col < N) {
    for (int64_t r = row_begin + ty; r < row_end; r += kProThreadsY) {
      float d[8], hg[8], hx[8], gg[8], gx[8];
      load8(dy + r * lddy + col, d);
      load8(h + r * ldh + col, hg);
      load8(h + r * ldh + N + col, hx);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        gg[i] = d[i] * hx[i] * glu_act_grad(hg[i], kAct);
        gx[i] = d[i] * glu_act(hg[i], kAct);
        sg[i] += gg[i];
        sx[i] += gx[i];
      }
      store8(dh + r * lddh + off_g + col, gg);
      store8(dh + r * lddh + off_x + col, gx);
    }
  }
  if (part_dbg == nullptr) return;  // uniform across the block
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    red[0][ty][tx * 8 + i] = sg[i];
    red[1][ty][tx * 8 + i] = sx[i];
  }
  __syncthreads();
  const int t = ty * kProThreadsX + tx;
  const int64_t c = int64_t(blockIdx.x) * kProCols + t;
  if (c < N) {
    float a = 0.0f, b = 0.0f;
#pragma unroll
    for (int y = 0; y < kProThreadsY; ++y) {
      a += red[0][y][t];
      b += red[1][y][t];
    }
    part_dbg[int64_t(blockIdx.y) * N + c] = a;
    part_dbx[int64_t(blockIdx.y) * N + c] = b;
  }
}

// dst[r·ldd + c] = T(src[r·lds + c]) for r < rows, c < cols (src == nullptr: zeros). Grid-stride, int64 indices.
template <typename T>
__global__ void __launch_bounds__(256)
    convert_f32_kernel(const float* __restrict__ src, int64_t lds, T* __restrict__ dst, int64_t ldd, int64_t rows,
                       int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    dst[r * ldd + c] = T(src != nullptr ? src[r * lds + c] : 0.0f);
  }
}

inline unsigned grid_for(int64_t total, int threads = 256, int64_t max_blocks = 65535LL * 8) {
  int64_t b = (total + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return unsigned(b);
}

template <typename T>
cudaError_t launch_convert_f32(const float* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols,
                               cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  convert_f32_kernel<T><<<grid_for(rows * cols), 256, 0, stream>>>(src, lds, dst, ldd, rows, cols);
  FASTVIT_RETURN_LAUNCH_ERROR();
  return cudaSuccess;
}

using ::fastvit::launch_column_sum;  // common/column_sum.cuh

}  // namespace linear_detail
}  // namespace fastvit
