// out[c] = Σ_{r < rows} part[r·C + c]: the second, deterministic stage of every fp32 partial-sum reduction
// (LayerNorm dγ/dβ, the linear backward's dbias/dgamma, MAE's d mask_token). No atomics: a fixed summation order
// that depends on the shape only, so the backward is bit-reproducible run to run.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/common.h"

namespace fastvit {

constexpr int kColumnSumX = 32;  // columns per CTA (one per lane: coalesced row reads)
constexpr int kColumnSumY = 32;  // row stripes per CTA

// Thread (tx, ty) of CTA bx sums rows ty, ty + kColumnSumY, ... of column bx·kColumnSumX + tx in increasing order
// (unrolled so the loads are independent; the additions stay in order); thread ty = 0 then adds the kColumnSumY
// stripe totals in order and rounds once to T. rows = 0 writes zeros.
template <typename T>
__global__ void __launch_bounds__(kColumnSumX* kColumnSumY)
    column_sum_kernel(const float* __restrict__ part, int64_t rows, int64_t C, T* __restrict__ out) {
  __shared__ float stripe[kColumnSumY][kColumnSumX + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnSumX + threadIdx.x;
  float acc = 0.f;
  if (col < C) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < rows; r += kColumnSumY) acc += part[r * C + col];
  }
  stripe[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < C) {
    float total = stripe[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < kColumnSumY; ++k) total += stripe[k][threadIdx.x];
    out[col] = static_cast<T>(total);
  }
}

// Launches column_sum_kernel over C columns; a no-op for C <= 0.
template <typename T>
cudaError_t launch_column_sum(const float* part, int64_t rows, int64_t C, T* out, cudaStream_t stream) {
  if (C <= 0) return cudaSuccess;
  const int64_t blocks = (C + kColumnSumX - 1) / kColumnSumX;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  column_sum_kernel<T>
      <<<static_cast<unsigned>(blocks), dim3(kColumnSumX, kColumnSumY), 0, stream>>>(part, rows, C, out);
  FASTVIT_RETURN_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace fastvit
