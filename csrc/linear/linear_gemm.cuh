// Internal (not seen by the binding): the GEMM building blocks shared by the linear and patch_embed families,
// declared here without CUTLASS so that dispatch files stay light. Defined in linear_gemm_impl.cuh and explicitly
// instantiated per dtype in linear_*_{bf16,fp16}.cu / patch_embed_*_{bf16,fp16}.cu.
//
// Matrix conventions used below (elements, not bytes): "row-major (R×C), ld" = element (r, c) at ptr[r·ld + c].
#pragma once

#include <cstddef>
#include <cstdint>

#include <cutlass/numeric_types.h>

#include "common/common.h"

namespace fastvit {
namespace gemm_detail {

// Tile of every GEMM kind below: 128 × 128 × 32 threadblock, 64 × 64 × 32 warps (4 warps = 128 threads),
// mma.sync 16 × 8 × 16, 4-stage cp.async pipeline (64 KiB shared memory).
constexpr int kTileM = 128;
constexpr int kTileN = 128;

// Extents and the two input operands of the batched GEMMs below (EpiGemmArgs, NNGemmArgs): their leading fields.
struct BatchedGemmOperands {
  int M = 0, N = 0, K = 0, batch = 1;
  const void* A = nullptr;
  int64_t lda = 0, batch_stride_A = 0;
  const void* B = nullptr;
  int64_t ldb = 0, batch_stride_B = 0;
};

// ------------------------------------------------------------------------------ forward GEMM + fused epilogue
// acc (M×N, fp32) = A (M×K) · Bᵀ per batch l, where
//   A: row-major (M×K), lda, batch stride batch_stride_A   (x, or the im2col rows)
//   B: the (N×K) row-major weight, ldb, batch stride batch_stride_B (0: shared); the GEMM reads it as the
//      column-major (K×N) matrix Bᵀ (element (k, n) at B[n·ldb + k]) -- no transpose is materialised.
// Epilogues (fp32 math, one rounding per stored value; bias / gamma nullable row vectors of length N):
//   kGeluErf / kGeluTanh: pre = acc + bias;                 D = GELU(pre)
//   kResidual:            pre = acc + bias;                 D = gamma ⊙ pre + aux   (gamma null = 1; aux = residual)
//   kBiasAux:             D = acc + bias + aux              (aux = position rows)
//   kBias:                D = acc + bias
// kStorePre additionally stores pre (rounded to T) at `pre` (only the GELU / residual epilogues).
// D, pre, aux: row-major (M×N) per batch with their ld and batch stride.
enum class Epi : int { kGeluErf = 0, kGeluTanh = 1, kResidual = 2, kBiasAux = 3, kBias = 4 };

struct EpiGemmArgs : BatchedGemmOperands {
  const void* bias = nullptr;
  const void* gamma = nullptr;
  const void* aux = nullptr;
  int64_t ld_aux = 0, batch_stride_aux = 0;
  void* D = nullptr;
  int64_t ldd = 0, batch_stride_D = 0;
  void* pre = nullptr;
  int64_t ldpre = 0, batch_stride_pre = 0;
};

template <typename T, Epi kEpi, bool kStorePre>
cudaError_t gemm_epi(const EpiGemmArgs& args, cudaStream_t stream);

// ------------------------------------------------------------------------------ "NN" GEMM (input gradients)
// D (M×N, T) = A (M×K) · B (K×N) per batch l; A, B, D all row-major with their ld and batch strides.
// linear dgrad: dx (T×K_in) = g (T×N_out) · W (N_out×K_in). patch dimages: dA (Nk×Kp) = dout (Nk×E) · Wp (E×Kp).
struct NNGemmArgs : BatchedGemmOperands {
  void* D = nullptr;
  int64_t ldd = 0, batch_stride_D = 0;
};

template <typename T>
cudaError_t gemm_nn(const NNGemmArgs& args, cudaStream_t stream);

// ------------------------------------------------------------------------------ "TN" GEMM (weight gradients)
// D (M×N, fp32) = Gᵀ · X where G is row-major (K×M) with ldg (so Gᵀ is read as the column-major M×K operand:
// element (m, k) at G[k·ldg + m]) and X is row-major (K×N) with ldx. D row-major fp32 with ldd.
// The reduction (K = tokens) is split into `split_k` slices reduced serially in slice order through D (fp32,
// CUTLASS's semaphore-ordered serial split-K): deterministic, one rounding when the caller converts D to T.
// linear wgrad: dW (N_out×K_in) = gᵀ · x;  patch wgrad: dWp (E×Kp) = doutᵀ · im2col.
struct TNGemmArgs {
  int M = 0, N = 0, K = 0;
  const void* G = nullptr;
  int64_t ldg = 0;
  const void* X = nullptr;
  int64_t ldx = 0;
  float* D = nullptr;
  int64_t ldd = 0;
  int split_k = 1;
  void* semaphores = nullptr;     // tn_gemm_semaphore_bytes(M, N) bytes (zeroed by the launcher itself)
};

template <typename T>
cudaError_t gemm_tn_f32(const TNGemmArgs& args, cudaStream_t stream);

// Serial split-K semaphores: one int per output tile (CUTLASS's UniversalParamsBase::get_workspace_size).
inline size_t tn_gemm_semaphore_bytes(int64_t M, int64_t N) {
  return sizeof(int) * size_t((M + kTileM - 1) / kTileM) * size_t((N + kTileN - 1) / kTileN);
}

// Number of K slices: enough CTAs for ~2 waves of a 132-SM GPU when the output has few tiles, each slice at least
// 512 deep, at most 16. Depends on the shape only (results are reproducible across GPUs too).
inline int tn_gemm_split_k(int64_t M, int64_t N, int64_t K) {
  int64_t tiles = ((M + kTileM - 1) / kTileM) * ((N + kTileN - 1) / kTileN);
  if (tiles <= 0 || K <= 0) return 1;
  int64_t want = (264 + tiles - 1) / tiles;
  int64_t max_by_depth = K / 512;
  int64_t s = want < max_by_depth ? want : max_by_depth;
  if (s > 16) s = 16;
  if (s < 1) s = 1;
  return int(s);
}

// ------------------------------------------------------------------------------ helpers
inline size_t align_up(size_t bytes, size_t a = 256) { return (bytes + a - 1) / a * a; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace gemm_detail
}  // namespace fastvit
