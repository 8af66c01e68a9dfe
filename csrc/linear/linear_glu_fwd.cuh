// Internal: linear_glu's forward, a dual GEMM with the gating epilogue, included by linear_glu_fwd_<dtype>.cu.
//
// Why a kernel of its own and not one of linear_gemm.cuh's CUTLASS GEMMs: the gate column n and the value column n
// come from two different weights, so no epilogue of one GEMM over either weight (or over a packed (2·N, K) weight,
// whose CTA tiles hold 128 rows of one half) sees both products of an output element. This kernel keeps two fp32
// accumulators per CTA tile -- one per weight, over the same x tiles in shared memory (Triton's glu_fwd does the
// same: kernels/linear.py, _glu_body) -- and applies the gate in registers:
//   h_g = acc_g + bias,  h_x = acc_x + bias_value,  y = act(h_g) ⊙ h_x      (fp32, each stored value rounded once)
// so neither product crosses global memory unless autograd asks for h = [h_g | h_x].
//
// Shape of the kernel (SM80 instructions; the same code runs on sm_90a, without wgmma / TMA):
//   * CTA tile: 128 tokens × 64 gated columns × 32 of K, i.e. a 128 × 128 output tile of gate and value together,
//     the tile of the family's CUTLASS GEMMs; 8 warps as 4 (M) × 2 (N), each warp 32 × 32 of both accumulators
//     (64 fp32 registers per thread);
//   * mma.sync m16n8k16 with fp32 accumulation (CuTe's SM80 atoms), ldmatrix from shared memory;
//   * a 3-stage cp.async pipeline over K (x tile 128 × 32, W_g and W_x tiles 64 × 32 each: 20 KiB per stage, 60 KiB
//     in all: two CTAs per SM on sm_80 and sm_90); tokens, columns and K beyond the problem are zero-filled by the
//     copies (src-size 0) and never stored;
//   * shared-memory tiles use a padded row pitch (32 + 8 elements = 5 chunks of 16 bytes, odd, so ldmatrix's 8 rows
//     hit 8 different bank groups) instead of an XOR swizzle: every ldmatrix address is then one base register plus
//     an immediate (the attention kernels' layout for the same reason, attention_kernel_utils.cuh);
//   * epilogue: y, h_g, h_x staged through shared memory (the pipeline's buffers) and written with 16-byte coalesced
//     stores.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "linear/linear_impl.h"
#include "linear/linear_kernels.cuh"

namespace fastvit {
namespace linear_detail {
namespace glu {

using namespace cute;

template <typename T>
struct FwdConfig {
  static constexpr int kBlockM = 128;  // tokens per CTA
  static constexpr int kBlockN = 64;   // gated columns per CTA (of the gate and of the value each)
  static constexpr int kBlockK = 32;   // reduction depth per pipeline stage
  static constexpr int kStages = 3;
  static constexpr int kWarpsM = 4, kWarpsN = 2;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kPitch = kBlockK + 8;     // elements between rows of a staged operand tile
  static constexpr int kOutPitch = kBlockN + 8;  // elements between rows of a staged output tile (9 chunks: odd)

  using MmaOp = std::conditional_t<std::is_same_v<T, cutlass::half_t>, SM80_16x8x16_F32F16F16F32_TN,
                                   SM80_16x8x16_F32BF16BF16F32_TN>;
  // 4 × 2 warps; each warp's N extent per 32-column step is two 8-column atoms, so B fragments load with the
  // 4-matrix ldmatrix (16 n × 16 k per instruction), as A's do.
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<Int<kWarpsM>, Int<kWarpsN>, _1>>,
                            Tile<Int<16 * kWarpsM>, Int<16 * kWarpsN>, _16>>;
  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, T>;

  using SmemLayoutA = Layout<Shape<Int<kBlockM>, Int<kBlockK>>, Stride<Int<kPitch>, _1>>;  // x: (tokens, k)
  using SmemLayoutB = Layout<Shape<Int<kBlockN>, Int<kBlockK>>, Stride<Int<kPitch>, _1>>;  // W: (columns, k)
  using SmemLayoutOut = Layout<Shape<Int<kBlockM>, Int<kBlockN>>, Stride<Int<kOutPitch>, _1>>;

  static constexpr int kElemsA = kBlockM * kPitch;
  static constexpr int kElemsB = kBlockN * kPitch;
  static constexpr int kStageElems = kElemsA + 2 * kElemsB;  // x, W_g, W_x
  static constexpr int kElemsOut = kBlockM * kOutPitch;
  static constexpr int kPipeBytes = kStages * kStageElems * int(sizeof(T));
  static constexpr int kOutBytes = 3 * kElemsOut * int(sizeof(T));  // y, h_g, h_x
  static constexpr int kSmemBytes = kPipeBytes > kOutBytes ? kPipeBytes : kOutBytes;
  static_assert(kSmemBytes <= 80 * 1024, "two CTAs per SM on sm_80 (164 KiB per SM)");
  static_assert(kBlockM % (16 * kWarpsM) == 0 && kBlockN % (16 * kWarpsN) == 0 && kBlockK % 16 == 0, "whole atoms");
};

// Copy a (kRows × kCols) tile, kCols a multiple of 8, between global and shared memory in 16-byte chunks numbered
// row-major (consecutive threads take consecutive chunks of a row: coalesced). Chunk (r, c) is in range when
// r < rows_valid and c < cols_valid (cols_valid a multiple of 8, so a chunk is wholly in or out).
//   load: cp.async global → shared; chunks out of range are zero-filled (src-size 0, reading nothing, with the tile
//         base -- always in range -- as the address);
//   store: shared → global; chunks out of range are not written.
template <int kRows, int kCols, int kThreads, typename T, typename SmemTensor>
__device__ __forceinline__ void load_tile(SmemTensor&& s, const T* __restrict__ g, int64_t ld, int rows_valid,
                                          int cols_valid, int tid) {
  constexpr int kPerRow = kCols / 8;
  constexpr int kChunks = kRows * kPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int v = tid + i * kThreads;
    const int r = v / kPerRow, c = (v % kPerRow) * 8;
    const bool in = r < rows_valid && c < cols_valid;
    const T* src = in ? g + r * ld + c : g;
    SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*reinterpret_cast<const cute::uint128_t*>(src),
                                                           *reinterpret_cast<cute::uint128_t*>(&s(r, c)), in);
  }
}

template <int kRows, int kCols, int kThreads, typename T, typename SmemTensor>
__device__ __forceinline__ void store_tile(SmemTensor const& s, T* __restrict__ g, int64_t ld, int rows_valid,
                                           int cols_valid, int tid) {
  constexpr int kPerRow = kCols / 8;
  constexpr int kChunks = kRows * kPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int v = tid + i * kThreads;
    const int r = v / kPerRow, c = (v % kPerRow) * 8;
    if (r < rows_valid && c < cols_valid) {
      *reinterpret_cast<cute::uint128_t*>(g + r * ld + c) = *reinterpret_cast<const cute::uint128_t*>(&s(r, c));
    }
  }
}

// One CTA per output tile of 128 tokens × 64 gated columns, numbered with the columns fastest (see the launcher).
// See the file comment.
template <class Cfg, typename T>
__global__ void __launch_bounds__(Cfg::kThreads, 2) glu_fwd_kernel(const LinearGluFwdParams p, int tiles_n) {
  constexpr int kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kBK = Cfg::kBlockK, kStages = Cfg::kStages;
  constexpr int kThreads = Cfg::kThreads;
  const int tid = threadIdx.x;
  const int tile_m = int(blockIdx.x) / tiles_n;
  const int64_t m0 = int64_t(tile_m) * kBM;
  const int64_t n0 = int64_t(int(blockIdx.x) - tile_m * tiles_n) * kBN;
  const int rows_valid = int(p.M - m0 < kBM ? p.M - m0 : kBM);  // >= 1 by the grid
  const int cols_valid = int(p.N - n0 < kBN ? p.N - n0 : kBN);  // >= 8 (N % 8 == 0)
  const int K = int(p.K);
  const int k_tiles = (K + kBK - 1) / kBK;

  const T* x = static_cast<const T*>(p.x) + m0 * p.ldx;
  const T* wg = static_cast<const T*>(p.weight) + n0 * p.ldw;
  const T* wx = static_cast<const T*>(p.weight_value) + n0 * p.ldwv;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  auto stage_a = [&](int s) {
    return make_tensor(make_smem_ptr(smem + s * Cfg::kStageElems), typename Cfg::SmemLayoutA{});
  };
  auto stage_bg = [&](int s) {
    return make_tensor(make_smem_ptr(smem + s * Cfg::kStageElems + Cfg::kElemsA), typename Cfg::SmemLayoutB{});
  };
  auto stage_bx = [&](int s) {
    return make_tensor(make_smem_ptr(smem + s * Cfg::kStageElems + Cfg::kElemsA + Cfg::kElemsB),
                       typename Cfg::SmemLayoutB{});
  };
  auto load_stage = [&](int s, int kt) {
    const int k0 = kt * kBK;
    const int k_valid = K - k0;
    load_tile<kBM, kBK, kThreads>(stage_a(s), x + k0, p.ldx, rows_valid, k_valid, tid);
    load_tile<kBN, kBK, kThreads>(stage_bg(s), wg + k0, p.ldw, cols_valid, k_valid, tid);
    load_tile<kBN, kBK, kThreads>(stage_bx(s), wx + k0, p.ldwv, cols_valid, k_valid, tid);
  };

  typename Cfg::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor rA = thr_mma.partition_fragment_A(stage_a(0));    // (MMA, MMA_M, MMA_K)
  Tensor rBg = thr_mma.partition_fragment_B(stage_bg(0));  // (MMA, MMA_N, MMA_K)
  Tensor rBx = thr_mma.partition_fragment_B(stage_bx(0));
  Tensor acc_g = partition_fragment_C(tiled_mma, Shape<Int<kBM>, Int<kBN>>{});
  Tensor acc_x = partition_fragment_C(tiled_mma, Shape<Int<kBM>, Int<kBN>>{});
  clear(acc_g);
  clear(acc_x);

  auto copy_a = make_tiled_copy_A(typename Cfg::SmemCopyAtom{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(typename Cfg::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_a = copy_a.get_thread_slice(tid);
  auto thr_copy_b = copy_b.get_thread_slice(tid);
  Tensor rA_v = thr_copy_a.retile_D(rA);
  Tensor rBg_v = thr_copy_b.retile_D(rBg);
  Tensor rBx_v = thr_copy_b.retile_D(rBx);
  constexpr int kSteps = decltype(size<2>(rA))::value;  // 16-deep k-steps per stage

  // Pipeline: stages 0 .. kStages-2 in flight before the loop (one cp.async group each, empty past the last tile).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_fence();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (this thread's copies) ...
    __syncthreads();               // ... everybody's, and every warp is done with the slot refilled below
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_fence();

    const int s = kt % kStages;
    Tensor sA = thr_copy_a.partition_S(stage_a(s));
    Tensor sBg = thr_copy_b.partition_S(stage_bg(s));
    Tensor sBx = thr_copy_b.partition_S(stage_bx(s));
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      cute::copy(copy_a, sA(_, _, k), rA_v(_, _, k));
      cute::copy(copy_b, sBg(_, _, k), rBg_v(_, _, k));
      cute::copy(copy_b, sBx(_, _, k), rBx_v(_, _, k));
      cute::gemm(tiled_mma, rA(_, _, k), rBg(_, _, k), acc_g);
      cute::gemm(tiled_mma, rA(_, _, k), rBx(_, _, k), acc_x);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline's buffers: they stage the outputs now

  // Epilogue: bias, gate, round; through shared memory to 16-byte stores.
  const bool store_h = p.h != nullptr;
  Tensor sY = make_tensor(make_smem_ptr(smem), typename Cfg::SmemLayoutOut{});
  Tensor sHg = make_tensor(make_smem_ptr(smem + Cfg::kElemsOut), typename Cfg::SmemLayoutOut{});
  Tensor sHx = make_tensor(make_smem_ptr(smem + 2 * Cfg::kElemsOut), typename Cfg::SmemLayoutOut{});
  Tensor coord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  const T* bias_g = static_cast<const T*>(p.bias);
  const T* bias_x = static_cast<const T*>(p.bias_value);
  const GluActivation act = p.activation;
#pragma unroll
  for (int i = 0; i < size(acc_g); ++i) {
    const int r = get<0>(coord(i)), c = get<1>(coord(i));
    const bool col_in = c < cols_valid;
    const float bg = (bias_g != nullptr && col_in) ? float(bias_g[n0 + c]) : 0.0f;
    const float bx = (bias_x != nullptr && col_in) ? float(bias_x[n0 + c]) : 0.0f;
    const float hg = acc_g(i) + bg;
    const float hx = acc_x(i) + bx;
    sY(r, c) = T(glu_act(hg, act) * hx);
    if (store_h) {
      sHg(r, c) = T(hg);
      sHx(r, c) = T(hx);
    }
  }
  __syncthreads();
  T* y = static_cast<T*>(p.y) + m0 * p.ldy + n0;
  store_tile<kBM, kBN, kThreads>(sY, y, p.ldy, rows_valid, cols_valid, tid);
  if (store_h) {
    T* h = static_cast<T*>(p.h) + m0 * p.ldh + n0;
    store_tile<kBM, kBN, kThreads>(sHg, h, p.ldh, rows_valid, cols_valid, tid);
    store_tile<kBM, kBN, kThreads>(sHx, h + p.N, p.ldh, rows_valid, cols_valid, tid);
  }
}

}  // namespace glu

// A 1-D grid of tiles_m · tiles_n CTAs, the gated-column tiles of one token tile consecutive: the CTAs resident at
// once cover a few token tiles × every column tile, so each x tile is read from DRAM about once and shared through
// L2 by the CTAs of its row, while the weights (2·N·K elements, a few MB for ViT widths) stay in L2. The caller
// (run_linear_glu_fwd in linear_api.cu) has checked shapes, alignment and pointers.
template <typename T>
cudaError_t linear_glu_fwd(const LinearGluFwdParams& p, cudaStream_t stream) {
  using Cfg = glu::FwdConfig<T>;
  const int64_t tiles_m = (p.M + Cfg::kBlockM - 1) / Cfg::kBlockM;
  const int64_t tiles_n = (p.N + Cfg::kBlockN - 1) / Cfg::kBlockN;
  if (tiles_m <= 0 || tiles_n <= 0) return cudaSuccess;
  if (tiles_m * tiles_n > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  auto kernel = glu::glu_fwd_kernel<Cfg, T>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<unsigned(tiles_m * tiles_n), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, int(tiles_n));
  FASTVIT_RETURN_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace linear_detail
}  // namespace fastvit

#define FASTVIT_INSTANTIATE_LINEAR_GLU_FWD(T)                                      \
  namespace fastvit {                                                              \
  namespace linear_detail {                                                        \
  template cudaError_t linear_glu_fwd<T>(const LinearGluFwdParams&, cudaStream_t); \
  }                                                                                \
  }
