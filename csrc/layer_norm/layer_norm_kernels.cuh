// fastvit CUDA C++: LayerNorm kernels (forward, backward, dweight / dbias column reduction) and the launch
// planning shared by layer_norm_fwd.cu and layer_norm_bwd.cu. Torch-free; see layer_norm.h for the semantics.
//
// Work decomposition (register path, C <= kMaxRegisterC):
//   * a "group" of G threads (G = 32: one warp per row; G = 64..512: several warps per row) owns one row;
//     a CTA holds kRows = max(1, 128 / G) groups, so CTAs have max(128, G) threads;
//   * the row lives in registers: thread `lane` (0 <= lane < G) of a group owns the NV vectors
//         vector index  v = i * G + lane,   i = 0 .. NV-1
//         columns       c = v * VEC + j,    j = 0 .. VEC-1
//     i.e. consecutive lanes read consecutive 16-byte vectors (coalesced), and a thread's columns are the same
//     for every row it handles (that is what lets the backward keep dweight / dbias partials in registers);
//   * VEC = 16 / sizeof(T) (16-byte loads / stores) when C % VEC == 0 and every pointer is 16-byte aligned and
//     every row stride is a multiple of VEC; otherwise VEC = 1 (scalar path). With C % VEC == 0 a vector is
//     either entirely inside the row (v * VEC < C) or entirely outside, so one predicate per vector suffices;
//   * NV is a power of two, chosen by the planner as the smallest bucket with G * NV * VEC >= C.
// Statistics are two-pass from registers in fp32: mean = sum(h) / C, then var = sum((h - mean)^2) / C, where
// "/ C" is a multiplication by inv_c = 1 / C computed on the host in double precision (kernels take it as an
// argument: an in-kernel IEEE division compiles to a slow-path call whose register saves ptxas reports as
// spills), and rstd = rsqrtf(var + eps).
//
// Above kMaxRegisterC the "fallback" kernels take one CTA of 256 threads per row and loop over the row in
// global memory (re-reading it from L2), so any C works.
//
// Every kernel takes a template flag RMS (RMSNorm, see layer_norm.h): the mean is the constant 0 (no reduction,
// not read or written), so var is the mean square, and the backward drops the mean_c(g) term and dbias. With
// RMS = false the code is the LayerNorm's.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "common/column_sum.cuh"
#include "common/dispatch.cuh"
#include "layer_norm/layer_norm.h"
#include "layer_norm/vec_io.cuh"

namespace fastvit {
namespace ln {

// Register budget per thread, in fp32 row elements. The forward keeps one array (h) of kFwdMaxElems; the
// backward keeps four (xhat, dy, dweight and dbias partials) of kBwdMaxElems each.
constexpr int kFwdMaxElems = 32;
constexpr int kBwdMaxElems = 16;
constexpr int kFwdMaxGroup = 256;  // threads per row, forward (launch bound 256 -> up to 255 registers)
constexpr int kBwdMaxGroup = 512;  // threads per row, backward (launch bound 512 -> up to 128 registers)
// Largest C of the register path: 256 * 32 = 512 * 16 = 8192 for every VEC.
constexpr int kMaxRegisterC = 8192;
constexpr int kFallbackThreads = 256;
// Column-reduction CTA: 32 columns x 32 row lanes.
// Upper bound of backward CTAs per SM (CTAs have >= 128 threads; we aim at ~1024 resident threads per SM).
constexpr int kBwdMaxCtasPerSm = 8;

template <int G>
struct GroupShape {
  static constexpr int kRows = G >= 128 ? 1 : 128 / G;  // rows (groups) per CTA
  static constexpr int kThreads = G * kRows;             // threads per CTA (>= 128)
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kWarpsPerGroup = G / 32;
};

// ------------------------------------------------------------------------------------------ reductions
// Butterfly (xor) all-reduce over a warp. Every lane ends with the bit-identical value: at each step lanes i
// and i^o add the same two operands (a + b == b + a exactly in IEEE arithmetic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Sum over the G threads of a group. For G > 32 the warp totals go through `slot` (one entry per warp of the
// CTA) and every thread adds its group's warp totals in the same fixed order, so the result is deterministic
// and identical in all threads of the group. Contains one __syncthreads() when G > 32: every thread of the CTA
// must call it the same number of times. The caller alternates between two slots so that the next reduction's
// writes cannot overtake a slow thread's reads of this one (there is always a barrier in between).
template <int G, typename V>
__device__ __forceinline__ V group_sum(V v, V* slot) {
  v = warp_sum(v);
  if constexpr (G > 32) {
    constexpr int kWpg = GroupShape<G>::kWarpsPerGroup;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) slot[warp] = v;
    __syncthreads();
    const int first = (warp / kWpg) * kWpg;  // first warp of this thread's group
    V total = slot[first];
#pragma unroll
    for (int k = 1; k < kWpg; ++k) {
      if constexpr (std::is_same<V, float>::value) {
        total += slot[first + k];
      } else {
        total.x += slot[first + k].x;
        total.y += slot[first + k].y;
      }
    }
    return total;
  } else {
    (void)slot;
    return v;
  }
}

// ------------------------------------------------------------------------------------------ forward
template <typename T, int VEC, int G, int NV, bool RMS>
__global__ void __launch_bounds__(GroupShape<G>::kThreads) ln_fwd_kernel(const LayerNormFwdParams p, float inv_c) {
  using Shape = GroupShape<G>;
  __shared__ float red[2][Shape::kWarps];

  const int group = threadIdx.x / G;  // row slot within the CTA
  const int lane = threadIdx.x % G;   // thread within the row's group
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Shape::kRows + group;
  const bool row_ok = row < p.M;
  const int64_t r = row_ok ? row : 0;  // keeps every formed pointer inside the tensors
  const int C = static_cast<int>(p.C);  // <= kMaxRegisterC on this path

  const bool has_res = p.residual != nullptr;
  const T* x = static_cast<const T*>(p.x) + r * p.x_row_stride;
  const T* res = has_res ? static_cast<const T*>(p.residual) + r * p.residual_row_stride : nullptr;
  T* hout = has_res ? static_cast<T*>(p.h_out) + r * p.h_row_stride : nullptr;
  T* y = static_cast<T*>(p.y) + r * p.y_row_stride;
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.bias);

  // ---- load h (= x, or round_T(x + residual), stored to h_out) into registers; out-of-row elements are 0
  float h[NV][VEC];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * G + lane) * VEC;  // first column of vector i of this thread
    if (row_ok && c < C) {
      load_ro<T, VEC>(x + c, h[i]);
      if (has_res) {
        float rv[VEC];
        load_ro<T, VEC>(res + c, rv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) h[i][j] = round_to<T>(h[i][j] + rv[j]);  // fp32 add, one rounding
        store_vec<T, VEC>(hout + c, h[i]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) h[i][j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += h[i][j];
  }
  float mean = 0.f;  // RMS: no centring
  if constexpr (!RMS) mean = group_sum<G>(sum, red[0]) * inv_c;

  // ---- second pass from registers: biased variance of the centred values (only in-row elements count)
  float ssq = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * G + lane) * VEC;
    if (c < C) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = h[i][j] - mean;
        ssq += d * d;
      }
    }
  }
  const float var = group_sum<G>(ssq, red[1]) * inv_c;
  const float rstd = rsqrtf(var + p.eps);  // as PyTorch's CUDA LayerNorm (no IEEE-division slow path)

  // ---- y = (h - mean) * rstd * w + b
  if (row_ok) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = (i * G + lane) * VEC;
      if (c < C) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = (h[i][j] - mean) * rstd;
        if (w != nullptr) {
          float wv[VEC];
          load_ro<T, VEC>(w + c, wv);
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] *= wv[j];
        }
        if (b != nullptr) {
          float bv[VEC];
          load_ro<T, VEC>(b + c, bv);
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] += bv[j];
        }
        store_vec<T, VEC>(y + c, out);
      }
    }
    if (lane == 0) {
      if constexpr (!RMS) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

// Any C: one CTA of kFallbackThreads threads per row (blockIdx.x = row), three passes over the row in global
// memory. Thread t owns columns c = t + k * kFallbackThreads; with a residual it re-reads its own stores of h
// (coherent loads: same thread, program order), otherwise it re-reads x.
template <typename T, bool RMS>
__global__ void __launch_bounds__(kFallbackThreads) ln_fwd_fallback_kernel(const LayerNormFwdParams p, float inv_c) {
  __shared__ float red[2][kFallbackThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t C = p.C;
  const bool has_res = p.residual != nullptr;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const T* res = has_res ? static_cast<const T*>(p.residual) + row * p.residual_row_stride : nullptr;
  T* hout = has_res ? static_cast<T*>(p.h_out) + row * p.h_row_stride : nullptr;
  const T* hsrc = has_res ? hout : x;  // the normalised values
  T* y = static_cast<T*>(p.y) + row * p.y_row_stride;
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.bias);

  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kFallbackThreads) {
    float v = static_cast<float>(x[c]);
    if (has_res) {
      v = round_to<T>(v + static_cast<float>(res[c]));
      hout[c] = static_cast<T>(v);
    }
    sum += v;
  }
  float mean = 0.f;  // RMS: no centring
  if constexpr (!RMS) mean = group_sum<kFallbackThreads>(sum, red[0]) * inv_c;
  float ssq = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kFallbackThreads) {
    const float d = static_cast<float>(hsrc[c]) - mean;
    ssq += d * d;
  }
  const float var = group_sum<kFallbackThreads>(ssq, red[1]) * inv_c;
  const float rstd = rsqrtf(var + p.eps);  // as PyTorch's CUDA LayerNorm (no IEEE-division slow path)
  for (int64_t c = threadIdx.x; c < C; c += kFallbackThreads) {
    float v = (static_cast<float>(hsrc[c]) - mean) * rstd;
    if (w != nullptr) v *= static_cast<float>(w[c]);
    if (b != nullptr) v += static_cast<float>(b[c]);
    y[c] = static_cast<T>(v);
  }
  if (threadIdx.x == 0) {
    if constexpr (!RMS) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

// ------------------------------------------------------------------------------------------ backward
// Persistent-ish: CTA k handles the row blocks rb = k, k + gridDim.x, ... (row = rb * kRows + group), every
// thread of the CTA runs the same number of iterations (barriers inside group_sum). Per row:
//   xhat = (h - mean) * rstd,  g = dy * w,  c1 = sum(g * xhat) / C,  c2 = sum(g) / C
//   dx   = (g - xhat * c1 - c2) * rstd (+ dh)
// (RMS: mean = 0 and c2 = 0, and no db partials)
// and the thread's columns accumulate dw += dy * xhat, db += dy in registers. At the end the CTA writes its
// partial sums to dw_part / db_part row blockIdx.x ((gridDim.x, C) fp32, row-major), summing its kRows groups
// in fixed order through shared memory when kRows > 1.
//
// The RMS kernels tell ptxas that one resident CTA per SM is enough (minBlocksPerMultiprocessor = kBwdMinCtas):
// with no hint its occupancy heuristic squeezes the 512-thread RMS kernel (fp32, scalar path) into 64 registers
// (two CTAs per SM) and spills one accumulator; with the hint it takes the registers the launch bound allows
// (up to 128 at 512 threads), as the LayerNorm kernels already do without one. 0 = no hint: the LayerNorm
// kernels compile as before (no .minnctapersm in their PTX).
template <bool RMS>
constexpr int kBwdMinCtas = RMS ? 1 : 0;

template <typename T, int VEC, int G, int NV, bool RMS>
__global__ void __launch_bounds__(GroupShape<G>::kThreads, kBwdMinCtas<RMS>)
    ln_bwd_kernel(const LayerNormBwdParams p, float* __restrict__ dw_part, float* __restrict__ db_part,
                  int64_t num_row_blocks, float inv_c) {
  using Shape = GroupShape<G>;
  constexpr int kPerGroup = G * NV * VEC;  // columns covered by one group (>= C)
  __shared__ float2 red[2][Shape::kWarps];
  __shared__ float red_rms[RMS ? 2 : 1][RMS ? Shape::kWarps : 1];  // RMS reduces sum(g * xhat) only
  __shared__ float acc_smem[Shape::kRows > 1 ? Shape::kRows * kPerGroup : 1];

  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int C = static_cast<int>(p.C);
  const T* w = p.has_weight ? static_cast<const T*>(p.weight) : nullptr;
  const bool has_dh = p.dh != nullptr;

  float xh[NV][VEC], dyv[NV][VEC], dwa[NV][VEC], dba[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dwa[i][j] = dba[i][j] = 0.f;
  }

  int parity = 0;
  for (int64_t rb = blockIdx.x; rb < num_row_blocks; rb += gridDim.x) {
    const int64_t row = rb * Shape::kRows + group;
    const bool row_ok = row < p.M;
    const int64_t r = row_ok ? row : 0;
    const float mean = (RMS || !row_ok) ? 0.f : p.mean[r];
    const float rstd = row_ok ? p.rstd[r] : 0.f;
    const T* hrow = static_cast<const T*>(p.h) + r * p.h_row_stride;
    const T* dyrow = static_cast<const T*>(p.dy) + r * p.dy_row_stride;

    float2 s = make_float2(0.f, 0.f);  // (sum g * xhat, sum g)
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = (i * G + lane) * VEC;
      if (row_ok && c < C) {
        load_ro<T, VEC>(hrow + c, xh[i]);
        load_ro<T, VEC>(dyrow + c, dyv[i]);
        float wv[VEC];
        if (w != nullptr) {
          load_ro<T, VEC>(w + c, wv);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) wv[j] = 1.f;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xh[i][j] = (xh[i][j] - mean) * rstd;
          const float g = dyv[i][j] * wv[j];
          s.x += g * xh[i][j];
          if constexpr (!RMS) s.y += g;
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) xh[i][j] = dyv[i][j] = 0.f;
      }
    }
    float c1 = 0.f, c2 = 0.f;
    if constexpr (RMS) {
      c1 = group_sum<G>(s.x, red_rms[parity]) * inv_c;  // one float: there is no sum(g)
    } else {
      s = group_sum<G>(s, red[parity]);
      c1 = s.x * inv_c;
      c2 = s.y * inv_c;
    }
    parity ^= 1;

    if (row_ok) {
      T* dxrow = static_cast<T*>(p.dx) + r * p.dx_row_stride;
      const T* dhrow = has_dh ? static_cast<const T*>(p.dh) + r * p.dh_row_stride : nullptr;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int c = (i * G + lane) * VEC;
        if (c < C) {
          float wv[VEC];
          if (w != nullptr) {
            load_ro<T, VEC>(w + c, wv);  // L1 hit: loaded just above
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) wv[j] = 1.f;
          }
          float out[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] = (dyv[i][j] * wv[j] - xh[i][j] * c1 - c2) * rstd;
          if (has_dh) {
            float dhv[VEC];
            load_ro<T, VEC>(dhrow + c, dhv);
#pragma unroll
            for (int j = 0; j < VEC; ++j) out[j] += dhv[j];
          }
          store_vec<T, VEC>(dxrow + c, out);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            dwa[i][j] += dyv[i][j] * xh[i][j];
            if constexpr (!RMS) dba[i][j] += dyv[i][j];
          }
        }
      }
    }
  }

  // ---- per-CTA partial sums: row blockIdx.x of dw_part / db_part
  const int64_t prow = static_cast<int64_t>(blockIdx.x) * C;
  auto write_partial = [&](const float (&acc)[NV][VEC], float* __restrict__ part) {
    if constexpr (Shape::kRows == 1) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int c = (i * G + lane) * VEC;
        if (c < C) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) part[prow + c + j] = acc[i][j];
        }
      }
    } else {
      __syncthreads();  // the previous use of acc_smem is finished
#pragma unroll
      for (int i = 0; i < NV; ++i) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc_smem[group * kPerGroup + (i * G + lane) * VEC + j] = acc[i][j];
      }
      __syncthreads();
      for (int c = threadIdx.x; c < C; c += Shape::kThreads) {
        float t = acc_smem[c];
#pragma unroll
        for (int k = 1; k < Shape::kRows; ++k) t += acc_smem[k * kPerGroup + c];  // groups in fixed order
        part[prow + c] = t;
      }
    }
  };
  if (p.compute_dw) write_partial(dwa, dw_part);
  if constexpr (!RMS) {
    if (p.compute_db) write_partial(dba, db_part);
  }
}

// Any C: one CTA of kFallbackThreads threads per row, CTAs loop over rows rb = blockIdx.x + k * gridDim.x.
// Thread t owns columns c = t + k * kFallbackThreads of every row and accumulates its dw / db partials directly
// in its own entries of the partial rows (read-modify-write by a single thread: no race, fixed order).
template <typename T, bool RMS>
__global__ void __launch_bounds__(kFallbackThreads)
    ln_bwd_fallback_kernel(const LayerNormBwdParams p, float* __restrict__ dw_part, float* __restrict__ db_part,
                           float inv_c) {
  __shared__ float2 red[2][kFallbackThreads / 32];
  __shared__ float red_rms[RMS ? 2 : 1][RMS ? kFallbackThreads / 32 : 1];  // RMS reduces sum(g * xhat) only
  const int64_t C = p.C;
  const T* w = p.has_weight ? static_cast<const T*>(p.weight) : nullptr;
  float* dwp = p.compute_dw ? dw_part + static_cast<int64_t>(blockIdx.x) * C : nullptr;
  float* dbp = (!RMS && p.compute_db) ? db_part + static_cast<int64_t>(blockIdx.x) * C : nullptr;
  for (int64_t c = threadIdx.x; c < C; c += kFallbackThreads) {
    if (dwp) dwp[c] = 0.f;
    if (dbp) dbp[c] = 0.f;
  }
  int parity = 0;
  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {  // uniform per CTA: barriers are safe
    const float mean = RMS ? 0.f : p.mean[row];
    const float rstd = p.rstd[row];
    const T* hrow = static_cast<const T*>(p.h) + row * p.h_row_stride;
    const T* dyrow = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    float2 s = make_float2(0.f, 0.f);
    for (int64_t c = threadIdx.x; c < C; c += kFallbackThreads) {
      const float xhat = (static_cast<float>(hrow[c]) - mean) * rstd;
      const float g = static_cast<float>(dyrow[c]) * (w ? static_cast<float>(w[c]) : 1.f);
      s.x += g * xhat;
      if constexpr (!RMS) s.y += g;
    }
    float c1 = 0.f, c2 = 0.f;
    if constexpr (RMS) {
      c1 = group_sum<kFallbackThreads>(s.x, red_rms[parity]) * inv_c;  // one float: there is no sum(g)
    } else {
      s = group_sum<kFallbackThreads>(s, red[parity]);
      c1 = s.x * inv_c;
      c2 = s.y * inv_c;
    }
    parity ^= 1;
    T* dxrow = static_cast<T*>(p.dx) + row * p.dx_row_stride;
    const T* dhrow = p.dh ? static_cast<const T*>(p.dh) + row * p.dh_row_stride : nullptr;
    for (int64_t c = threadIdx.x; c < C; c += kFallbackThreads) {
      const float xhat = (static_cast<float>(hrow[c]) - mean) * rstd;
      const float dyc = static_cast<float>(dyrow[c]);
      const float g = dyc * (w ? static_cast<float>(w[c]) : 1.f);
      float out = (g - xhat * c1 - c2) * rstd;
      if (dhrow) out += static_cast<float>(dhrow[c]);
      dxrow[c] = static_cast<T>(out);
      if (dwp) dwp[c] += dyc * xhat;
      if (dbp) dbp[c] += dyc;
    }
  }
}

// ------------------------------------------------------------------------------------------ host-side planning
struct Plan {
  bool fallback = false;
  int vec = 1;  // elements per vector (1 = scalar path)
  int G = 32;   // threads per row
  int nv = 1;   // vectors per thread
};

// 1 / C rounded once to fp32 (from double).
inline float inv_c(int64_t C) { return static_cast<float>(1.0 / static_cast<double>(C)); }

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Smallest G (power of two, 32 .. max_group) whose group can hold ceil(C / vec) vectors with at most
// max_elems / vec vectors per thread; NV = next power of two of the per-thread count (G = 32) or the maximum
// (G > 32: the previous G was too small, so the count is above half the maximum and rounds up to it).
inline Plan make_plan(int64_t C, int vec, int max_elems, int max_group) {
  Plan pl;
  pl.vec = vec;
  if (C > kMaxRegisterC) {
    pl.fallback = true;
    return pl;
  }
  const int64_t nvec = (C + vec - 1) / vec;
  const int nv_max = max_elems / vec;
  for (int G = 32; G <= max_group; G *= 2) {
    if (nvec <= static_cast<int64_t>(G) * nv_max) {
      pl.G = G;
      pl.nv = (G == 32) ? next_pow2((nvec + G - 1) / G) : nv_max;
      return pl;
    }
  }
  pl.fallback = true;  // unreachable for C <= kMaxRegisterC
  return pl;
}

template <int V>
using IC = std::integral_constant<int, V>;

// Calls f(IC<G>, IC<NV>) for the (G, NV) of a plan: G = 32 with NV in {1, 2, 4, ..., NVMAX}, or
// G in {64, ..., GMAX} with NV = NVMAX. Only these combinations are instantiated.
template <int NV, int NVMAX, typename F>
cudaError_t dispatch_warp(int nv, F& f) {
  if constexpr (NV > NVMAX) {
    (void)nv;
    (void)f;
    return cudaErrorInvalidValue;
  } else {
    if (nv == NV) return f(IC<32>{}, IC<NV>{});
    return dispatch_warp<NV * 2, NVMAX>(nv, f);
  }
}
template <int G, int GMAX, int NVMAX, typename F>
cudaError_t dispatch_cta(int g, F& f) {
  if constexpr (G > GMAX) {
    (void)g;
    (void)f;
    return cudaErrorInvalidValue;
  } else {
    if (g == G) return f(IC<G>{}, IC<NVMAX>{});
    return dispatch_cta<G * 2, GMAX, NVMAX>(g, f);
  }
}
template <int NVMAX, int GMAX, typename F>
cudaError_t dispatch_group(const Plan& pl, F& f) {
  if (pl.G == 32) return dispatch_warp<1, NVMAX>(pl.nv, f);
  if (pl.nv != NVMAX) return cudaErrorInvalidValue;
  return dispatch_cta<64, GMAX, NVMAX>(pl.G, f);
}

inline cudaError_t num_sms(int* out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (*out < 1) *out = 1;
  return cudaSuccess;
}

}  // namespace ln
}  // namespace fastvit
