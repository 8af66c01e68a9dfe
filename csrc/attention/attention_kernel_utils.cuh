// Shared pieces of the fastvit FlashAttention-2 kernels (forward: attention_fwd.cuh, backward:
// attention_bwd.cuh): tile traits, shared-memory layouts, predicated global<->shared tile copies, the two
// register-level GEMM loops, and the accumulator layout algebra used by the online softmax.
//
// Target: SM80 instructions (mma.sync m16n8k16 with fp32 accumulators, cp.async, ldmatrix). The same code is
// compiled for sm_90a, where it runs correctly but leaves Hopper's wgmma / TMA unused; a Hopper-specific
// mainloop (FlashAttention-3 style warp specialisation) is future work.
//
// Notation used in every comment: a "tile" is a (rows x kHeadDim) block of one head of Q, K, V, O, dO, ...;
// row r of a tile is token (block_index * kBlockRows + r); column c is head-dim index c. kHeadDim is the
// head-dim BUCKET (32, 64, 80, 96, 128); the true head dim `head_dim` <= kHeadDim is a run-time value and
// columns c >= head_dim are zero-filled on load and never stored.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <type_traits>

#include "attention/attention.h"
#include "common/common.h"

namespace fastvit {
namespace attn {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------------------ traits
// Shared-memory layout of a (kRows x kCols) row-major tile of 16-bit elements, kCols = head-dim bucket:
// a padded row pitch of kCols + 8 elements, i.e. element (r, c) lives at r·(kCols + 8) + c.
//
// Why padding and not the usual XOR swizzle (Swizzle<3,3,3> on 8 x 64 atoms): both are free of bank conflicts
// for ldmatrix here, because the pitch in 16-byte chunks, kCols/8 + 1 = 5, 9, 11, 13, 17, is odd for every
// bucket, so the 8 row addresses of one ldmatrix phase (8 consecutive rows, same chunk column) fall into 8
// different 4-bank groups; and a cp.async phase (8 threads writing 8 consecutive 16-byte chunks of one row
// for kCols >= 64) is contiguous. But a swizzled address is not affine in the row / chunk indices, so the
// compiler keeps one register per distinct ldmatrix address of the mainloop (40 for the 128 x 64 x 64 forward
// tile) and the kernel spills; with the padded layout every ldmatrix address is one base register plus an
// immediate. Costs: 8 elements per row of shared memory (6-25 %), and for kCols = 32 (4 chunks per row, two
// rows per cp.async phase) a 2-way conflict on part of the cp.async writes. Every 16-byte vector of a row stays
// 16-byte aligned (pitch·2 bytes is a multiple of 16).
template <int kCols>
struct SmemTileShape {
  static constexpr int kPitch = kCols + 8;  // elements between consecutive rows
};

template <int kRows, int kCols>
CUTE_HOST_DEVICE constexpr auto make_smem_tile_layout() {
  static_assert(kRows % 8 == 0 && kCols % 16 == 0, "tile must be a multiple of 8 rows and 16 columns");
  return Layout<Shape<Int<kRows>, Int<kCols>>, Stride<Int<SmemTileShape<kCols>::kPitch>, _1>>{};
}

// Elements of shared memory reserved for one (kRows x kCols) tile (>= the layout's cosize, a multiple of 8 so
// every tile starts 16-byte aligned).
template <int kRows, int kCols>
constexpr int smem_tile_elems() {
  return kRows * SmemTileShape<kCols>::kPitch;
}

// The MMA machinery shared by all kernels of one (element type, head-dim bucket, warp count).
//
// TiledMma: the m16n8k16 atom, kNWarps warps stacked along M (warp w owns rows [16w, 16w+16) of every 16·kNWarps
// rows of the first GEMM operand), N tile 16 (two atoms side by side) so that B operands can be fetched with
// 4-matrix ldmatrix. Because warps are stacked along M only, every warp (indeed every quad of 4 lanes) sees
// ALL columns of its rows: row reductions need only the two shuffles within a quad.
template <typename Element_, int kHeadDim_, int kNWarps_>
struct MmaTraits {
  using Element = Element_;
  static_assert(std::is_same_v<Element, cutlass::half_t> || std::is_same_v<Element, cutlass::bfloat16_t>,
                "attention kernels take fp16 or bf16");
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;

  using MmaOp = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, SM80_16x8x16_F32F16F16F32_TN,
                                   SM80_16x8x16_F32BF16BF16F32_TN>;
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

  // shared -> register copies: ldmatrix for K-major operands, transposed ldmatrix for operands stored
  // (k x n) row-major in shared memory (V in P·V, dO in Pᵀ·dO, Q in dSᵀ·Q, K in dS·K).
  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
};

// What every attention kernel's config has on top of MmaTraits: a query block of kBlockM rows and a key block
// of kBlockN rows, and the padded shared-memory tile layouts / sizes of a (kBlockM x D) Q-like tile (Q, dO, O,
// dQ) and a (kBlockN x D) K-like tile (K, V, dK, dV). Each kernel's config adds its own warp / tile
// constraints and its shared-memory plan.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct TileConfig : MmaTraits<Element_, kHeadDim_, kNWarps_> {
  static constexpr int kBlockM = kBlockM_;  // query rows (per CTA or per mainloop step)
  static constexpr int kBlockN = kBlockN_;  // key rows (per mainloop step or per CTA)
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "blocks are whole 16-row MMA atoms");
  using SmemLayoutQ = decltype(make_smem_tile_layout<kBlockM, kHeadDim_>());
  using SmemLayoutKV = decltype(make_smem_tile_layout<kBlockN, kHeadDim_>());
  static constexpr int kSmemElemsQ = smem_tile_elems<kBlockM, kHeadDim_>();
  static constexpr int kSmemElemsKV = smem_tile_elems<kBlockN, kHeadDim_>();
};

// The three shared -> register copies of a kernel's GEMMs, with this thread's slices: `a` (ldmatrix of an A
// operand), `b` (ldmatrix of a B operand) and `bt` (transposed ldmatrix of a B operand stored (k x n)).
template <class Cfg>
struct SmemCopies {
  using TiledMma = typename Cfg::TiledMma;
  using CopyA = decltype(make_tiled_copy_A(typename Cfg::SmemCopyAtom{}, TiledMma{}));
  using CopyB = decltype(make_tiled_copy_B(typename Cfg::SmemCopyAtom{}, TiledMma{}));
  using CopyBt = decltype(make_tiled_copy_B(typename Cfg::SmemCopyAtomT{}, TiledMma{}));
  CopyA a;
  CopyB b;
  CopyBt bt;
  decltype(CopyA{}.get_thread_slice(0)) thr_a;
  decltype(CopyB{}.get_thread_slice(0)) thr_b;
  decltype(CopyBt{}.get_thread_slice(0)) thr_bt;

  __device__ __forceinline__ explicit SmemCopies(int tid)
      : thr_a(a.get_thread_slice(tid)), thr_b(b.get_thread_slice(tid)), thr_bt(bt.get_thread_slice(tid)) {}
};

// ------------------------------------------------------------------------------------------------ grid
// Blocks along the sequence on grid.x; the flattened (batch, head) index bh = b·H + h on (y, z) so that
// neither axis exceeds 65535: bh = blockIdx.z · gridDim.y + blockIdx.y (blocks with bh >= B·H exit at once).
inline bool make_attention_grid(int64_t blocks_x, int64_t batch_heads, dim3& grid) {
  if (blocks_x <= 0 || batch_heads <= 0 || blocks_x > 0x7fffffff) return false;
  const int64_t y = batch_heads < 65535 ? batch_heads : 65535;
  const int64_t z = (batch_heads + y - 1) / y;
  if (z > 65535) return false;
  grid = dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(y), static_cast<unsigned>(z));
  return true;
}

// threadIdx.x read through an opaque (volatile) instruction. The epilogues index with this instead of the
// prologue's `tid`, so that the compiler cannot compute their addresses before the mainloop (common-
// subexpression elimination with the prologue's identical tile indexing) and keep them live -- or spill them
// -- across it.
__device__ __forceinline__ int opaque_thread_idx() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}

__device__ __forceinline__ int64_t attention_bh_index() {
  return static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
}

// Where the (batch or sequence b, head h) of a CTA lives (attention.h: dense and packed problems).
//   seqlen_q, seqlen_k : its lengths (dense: the params'; packed: cu_seqlens[b + 1] - cu_seqlens[b], both)
//   row0               : packed only, the token of its row 0 (cu_seqlens[b]); dense tensors place row 0 with
//                        their batch stride instead (seq_offset below)
struct SeqCoord {
  int64_t row0;
  int seqlen_q;
  int seqlen_k;
};

// kVarlen = false compiles to exactly the dense kernels' index arithmetic (no load, no branch).
// Packed offsets are clamped into [0, T] (start) and [start, T] (end), so that even malformed offsets (which the
// Python layer rejects) keep every row inside the tensors.
template <bool kVarlen, class Params>
__device__ __forceinline__ SeqCoord seq_coord(const Params& p, int64_t b) {
  if constexpr (kVarlen) {
    const int total = static_cast<int>(p.total_tokens);  // < 2^31 - 256, checked by the launcher
    const int start = min(max(__ldg(p.cu_seqlens + b), 0), total);
    const int end = min(max(__ldg(p.cu_seqlens + b + 1), start), total);
    return {start, end - start, end - start};
  } else {
    return {0, static_cast<int>(p.seqlen_q), static_cast<int>(p.seqlen_k)};
  }
}

// Index of query row 0 of (b, h) in the fp32 row statistics lse / delta: (b·H + h)·seqlen_q (dense, bh = b·H + h) or
// h·T + cu_seqlens[b] (packed). A function, not a SeqCoord field, so that each kernel computes it where it uses it
// (the forward's epilogue) instead of keeping 64 bits live across its mainloop.
template <bool kVarlen, class Params>
__device__ __forceinline__ int64_t stats_offset(const Params& p, const SeqCoord& sc, int64_t h, int64_t bh) {
  if constexpr (kVarlen) {
    return h * p.total_tokens + sc.row0;
  } else {
    return bh * p.seqlen_q;
  }
}

// Element offset of row 0 of batch / sequence b in a tensor with these strides: b·batch_stride (dense) or
// row0·row_stride (packed, no batch dim).
template <bool kVarlen>
__device__ __forceinline__ int64_t seq_offset(int64_t b, int64_t batch_stride, const SeqCoord& sc, int64_t row_stride) {
  if constexpr (kVarlen) {
    return sc.row0 * row_stride;
  } else {
    return b * batch_stride;
  }
}

// Raise the dynamic shared-memory limit of `kernel` when it needs more than the default 48 KB.
template <typename Kernel>
inline cudaError_t set_smem_limit(Kernel kernel, int smem_bytes) {
  if (smem_bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
}

// ------------------------------------------------------------------------------------------------ copies
// Asynchronously copy rows [0, kRows) x columns [0, kCols) of a global tile into shared tile `s`.
//   g          : element (0, 0) of the tile in global memory (row r starts at g + r·row_stride)
//   rows_valid : rows r >= rows_valid are outside the sequence -> zero-filled in shared memory
//   cols_valid : the true head dim; chunks with c >= cols_valid are zero-filled (cols_valid % 8 == 0, so a
//                16-byte chunk is either entirely valid or entirely outside)
// Work split: the tile is kRows·kCols/8 chunks of 8 elements (16 bytes), numbered v = r·(kCols/8) + c/8 (row-
// major, so consecutive threads read consecutive 16-byte pieces of one row: coalesced). Thread `tid` copies
// chunks tid, tid + kNThreads, ... Each cp.async has src-size 0 when the chunk is invalid (the hardware then
// writes 16 zero bytes and reads nothing); its source address is then the tile base, which is always a
// valid address, so no out-of-range pointer is ever formed.
template <int kRows, int kCols, int kNThreads, typename Element, typename SmemTensor>
__device__ __forceinline__ void load_tile_async(SmemTensor&& s, const Element* __restrict__ g, int64_t row_stride,
                                                int rows_valid, int cols_valid, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kIters = (kChunks + kNThreads - 1) / kNThreads;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int v = tid + i * kNThreads;
    if (kChunks % kNThreads == 0 || v < kChunks) {
      const int r = v / kChunksPerRow;
      const int c = (v % kChunksPerRow) * 8;
      const bool pred = r < rows_valid && c < cols_valid;
      const Element* src = pred ? g + static_cast<int64_t>(r) * row_stride + c : g;
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*reinterpret_cast<const cute::uint128_t*>(src),
                                                             *reinterpret_cast<cute::uint128_t*>(&s(r, c)), pred);
    }
  }
}

// Asynchronously copy `n` fp32 values (row statistics lse / delta of one query block) into shared memory,
// zero-filling entries i >= n_valid. Thread i < n copies entry i with a 4-byte cp.async.
template <int n>
__device__ __forceinline__ void load_rowstats_async(float* s, const float* __restrict__ g, int n_valid, int tid) {
  if (tid < n) {
    const bool pred = tid < n_valid;
    const float* src = pred ? g + tid : g;
    SM80_CP_ASYNC_CACHEALWAYS_ZFILL<float>::copy(*src, s[tid], pred);
  }
}

// Copy rows [0, rows_valid) x columns [0, cols_valid) of shared tile `s` to global memory with 16-byte stores
// (same chunk numbering as load_tile_async); nothing outside that range is written.
template <int kRows, int kCols, int kNThreads, typename Element, typename SmemTensor>
__device__ __forceinline__ void store_tile(SmemTensor&& s, Element* __restrict__ g, int64_t row_stride, int rows_valid,
                                           int cols_valid, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kIters = (kChunks + kNThreads - 1) / kNThreads;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int v = tid + i * kNThreads;
    if (kChunks % kNThreads == 0 || v < kChunks) {
      const int r = v / kChunksPerRow;
      const int c = (v % kChunksPerRow) * 8;
      if (r < rows_valid && c < cols_valid) {
        *reinterpret_cast<cute::uint128_t*>(g + static_cast<int64_t>(r) * row_stride + c) =
            *reinterpret_cast<const cute::uint128_t*>(&s(r, c));
      }
    }
  }
}

// Write an fp32 accumulator fragment (the C fragment of `tiled_mma` for a (kRows x kCols) tile, multiplied by
// `mul`) into shared tile `s` in the element type. The coordinates come from partitioning an identity tensor
// exactly as the accumulator was partitioned, so element i of `acc` goes to (row, col) = tCc(i) -- no
// assumption about the MMA's register layout.
template <int kRows, int kCols, typename Element, typename TiledMma, typename Acc, typename SmemTensor>
__device__ __forceinline__ void acc_to_smem(Acc const& acc, float mul, SmemTensor&& s, TiledMma const& tiled_mma,
                                            int tid) {
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tCc = thr_mma.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kCols>>{}));
  static_assert(decltype(size(tCc))::value == decltype(size(acc))::value, "fragment / coordinate mismatch");
#pragma unroll
  for (int i = 0; i < size(acc); ++i) {
    s(get<0>(tCc(i)), get<1>(tCc(i))) = static_cast<Element>(acc(i) * mul);
  }
}

// ------------------------------------------------------------------------------------------------ rotary
// Rotary position embeddings (AttentionRopeParams, attention.h) on shared tiles. The work unit is a "group" of 4
// rotation pairs whose 8 columns form two 4-column segments: rotate_half, columns [4g, 4g + 4) and the same shifted by
// head_dim/2 (pair i = segment 0's column i with segment 1's column i); interleaved, the 8 consecutive columns
// [8g, 8g + 8) (pair i = columns 8g + 2i, 8g + 2i + 1, i.e. segment s's columns 2i', 2i' + 1). Either way a row has
// head_dim/8 groups, every segment starts at a multiple of 4 columns (8-byte element vectors, 16-byte float4 table
// reads) and the table is read at the same columns as the data. Host-callable, so that tests/cuda/attention_rope.cu
// can run them thread by thread on the CPU.

// The table row of the token at position `pos` of its sequence, or nullptr when the token is not rotated (a prefix
// token, or past the table's rows).
CUTE_HOST_DEVICE const float* rope_row(const AttentionRopeParams& rope, const float* table_h, int pos) {
  const int t = pos - rope.num_prefix;
  return t >= 0 && t < rope.rows ? table_h + static_cast<int64_t>(t) * rope.row_stride : nullptr;
}

// First columns of the two segments of group g.
CUTE_HOST_DEVICE int2 rope_segments(const AttentionRopeParams& rope, int g, int head_dim) {
  return rope.rotate_half ? make_int2(4 * g, 4 * g + head_dim / 2) : make_int2(8 * g, 8 * g + 4);
}

// A 16-byte table read through the read-only cache (a plain load when the helpers run on the host: tests/cuda).
CUTE_HOST_DEVICE float4 rope_ldg(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const float4*>(p));
#else
  return *reinterpret_cast<const float4*>(p);
#endif
}

// sin (sn) and cos (cs) of the 8 columns of a group, segment 0 in [0, 4), segment 1 in [4, 8).
CUTE_HOST_DEVICE void rope_load_sincos(const float* row, int2 seg, int head_dim, float (&sn)[8], float (&cs)[8]) {
  const float4 s0 = rope_ldg(row + seg.x);
  const float4 s1 = rope_ldg(row + seg.y);
  const float4 c0 = rope_ldg(row + head_dim + seg.x);
  const float4 c1 = rope_ldg(row + head_dim + seg.y);
  sn[0] = s0.x, sn[1] = s0.y, sn[2] = s0.z, sn[3] = s0.w, sn[4] = s1.x, sn[5] = s1.y, sn[6] = s1.z, sn[7] = s1.w;
  cs[0] = c0.x, cs[1] = c0.y, cs[2] = c0.z, cs[3] = c0.w, cs[4] = c1.x, cs[5] = c1.y, cs[6] = c1.z, cs[7] = c1.w;
}

// One pair (a, b): timm's x·cos + rot(x)·sin (kInverse = false) or its transpose (the backward of the gradient).
template <bool kInverse>
CUTE_HOST_DEVICE void rope_pair(float (&x)[8], const float (&sn)[8], const float (&cs)[8], int a, int b) {
  const float xa = x[a], xb = x[b];
  if constexpr (kInverse) {
    x[a] = xa * cs[a] + xb * sn[b];
    x[b] = xb * cs[b] - xa * sn[a];
  } else {
    x[a] = xa * cs[a] - xb * sn[a];
    x[b] = xb * cs[b] + xa * sn[b];
  }
}

// The 4 pairs of a group, in place (the pairing of each layout, with compile-time indices: x stays in registers).
template <bool kInverse>
CUTE_HOST_DEVICE void rope_group(float (&x)[8], const float (&sn)[8], const float (&cs)[8], bool rotate_half) {
  if (rotate_half) {
#pragma unroll
    for (int i = 0; i < 4; ++i) rope_pair<kInverse>(x, sn, cs, i, 4 + i);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) rope_pair<kInverse>(x, sn, cs, 2 * i, 2 * i + 1);
  }
}

template <typename T>
CUTE_HOST_DEVICE void load4_as_float(const T* p, float* x) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = static_cast<float>(e[i]);
  }
}

template <typename Element>
CUTE_HOST_DEVICE void store4_from_float(Element* p, const float* y) {
  uint2 v;
  Element* e = reinterpret_cast<Element*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) e[i] = static_cast<Element>(y[i]);
  *reinterpret_cast<uint2*>(p) = v;
}

// Rotate, in place, the rows [0, rows_valid) x columns [0, head_dim) of a (kRows x kCols) shared tile of q or k in the
// element type: row r is the token at position pos0 + r of its sequence; table_h is the table of this head
// (rope.table + h·head_stride). Rows that are not rotated (prefix, past the table) are left untouched. Run between
// the cp.async wait + __syncthreads() that lands the tile and a __syncthreads() before any thread reads it. Work
// split: group v = r·(kCols/8) + g to thread v % kNThreads (each group is read and written by one thread).
template <int kRows, int kCols, int kNThreads, typename SmemTensor>
CUTE_HOST_DEVICE void rope_rotate_tile(SmemTensor&& s, const AttentionRopeParams& rope, const float* table_h, int pos0,
                                       int rows_valid, int head_dim, int tid) {
  using Element = std::remove_cv_t<std::remove_reference_t<decltype(s(0, 0))>>;
  constexpr int kGroupsPerRow = kCols / 8;
  constexpr int kGroups = kRows * kGroupsPerRow;
  constexpr int kIters = (kGroups + kNThreads - 1) / kNThreads;
#pragma unroll 1  // one group's 24 values live at a time: unrolled, ptxas hoists every group's loads (registers)
  for (int i = 0; i < kIters; ++i) {
    const int v = tid + i * kNThreads;
    const int r = v / kGroupsPerRow;
    const int g = v % kGroupsPerRow;
    if ((kGroups % kNThreads != 0 && v >= kGroups) || r >= rows_valid || 8 * g >= head_dim) continue;
    const float* row = rope_row(rope, table_h, pos0 + r);
    if (row == nullptr) continue;
    const int2 seg = rope_segments(rope, g, head_dim);
    float sn[8], cs[8], x[8];
    rope_load_sincos(row, seg, head_dim, sn, cs);
    Element* p0 = &s(r, seg.x);
    Element* p1 = &s(r, seg.y);
    load4_as_float(p0, x);
    load4_as_float(p1, x + 4);
    rope_group<false>(x, sn, cs, rope.rotate_half);
    store4_from_float(p0, x);
    store4_from_float(p1, x + 4);
  }
}

// Store rows [0, rows_valid) x columns [0, head_dim) of an fp32 (kRows x kCols) shared tile `s` -- dq or dk with
// respect to the ROTATED q or k, already scaled -- to global memory in the element type, rotated back (the
// transpose rotation; rows that were not rotated are stored as they are). g: element (0, 0) of the tile in global
// memory; row r is the token at position pos0 + r. 8-byte stores of each 4-column segment.
template <int kRows, int kCols, int kNThreads, typename Element, typename SmemTensor>
CUTE_HOST_DEVICE void rope_store_tile_back(SmemTensor&& s, Element* __restrict__ g, int64_t row_stride,
                                           const AttentionRopeParams& rope, const float* table_h, int pos0,
                                           int rows_valid, int head_dim, int tid) {
  constexpr int kGroupsPerRow = kCols / 8;
  constexpr int kGroups = kRows * kGroupsPerRow;
  constexpr int kIters = (kGroups + kNThreads - 1) / kNThreads;
#pragma unroll 1
  for (int i = 0; i < kIters; ++i) {
    const int v = tid + i * kNThreads;
    const int r = v / kGroupsPerRow;
    const int grp = v % kGroupsPerRow;
    if ((kGroups % kNThreads != 0 && v >= kGroups) || r >= rows_valid || 8 * grp >= head_dim) continue;
    const int2 seg = rope_segments(rope, grp, head_dim);
    float x[8];
    load4_as_float(&s(r, seg.x), x);
    load4_as_float(&s(r, seg.y), x + 4);
    const float* row = rope_row(rope, table_h, pos0 + r);
    if (row != nullptr) {
      float sn[8], cs[8];
      rope_load_sincos(row, seg, head_dim, sn, cs);
      rope_group<true>(x, sn, cs, rope.rotate_half);
    }
    Element* out = g + static_cast<int64_t>(r) * row_stride;
    store4_from_float(out + seg.x, x);
    store4_from_float(out + seg.y, x + 4);
  }
}

// ------------------------------------------------------------------------------------------------ layouts
// The m16n8k16 accumulator fragment of one thread has layout ((2, 2), MMA_M, MMA_N):
//   mode 0,0 : the two adjacent columns (2t, 2t+1) of an 8-column atom  (t = lane % 4)
//   mode 0,1 : the two rows g and g+8 of a 16-row atom                   (g = lane / 4)
//   mode 1   : which 16-row atom (MMA_M),  mode 2 : which 8-column atom (MMA_N).
// rowcol() regroups it as ((2, MMA_M), (2, MMA_N)) = (rows of this thread, columns of this thread), so that
// row-wise softmax loops read acc_rc(mi, ni).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto rowcol(Layout l) {
  static_assert(decltype(rank(l))::value == 3, "expects an MMA accumulator layout");
  static_assert(decltype(size<0>(l))::value == 4, "expects the m16n8 accumulator");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// Reinterpret an accumulator fragment ((2, 2), MMA_M, MMA_N) of a (M x N) product as the A-operand fragment
// ((2, 2, 2), MMA_M, MMA_N / 2) of a following GEMM whose K dimension is that N.
// The m16n8k16 A fragment holds, per thread, values ordered (k pair {2t, 2t+1}, row half {g, g+8}, k half
// {+0, +8}); the accumulator of the 8-column atoms 2j and 2j+1 holds (column pair {2t, 2t+1}, row half) for
// columns 16j + {0..7} and 16j + {8..15}. So pairing atoms (2j, 2j+1) as the two k halves of k-step j gives
// exactly the A fragment, without moving any data between threads.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_to_a_layout(Layout l) {
  static_assert(decltype(size<2>(l))::value % 2 == 0, "N of the accumulator must be a multiple of 16");
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // ((2,2), MMA_M, (2, MMA_N/2))
  return make_layout(make_layout(get<0, 0>(d), get<0, 1>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// Convert an fp32 fragment to `To` (packed cvt.rn of pairs) into a new register tensor with the same layout.
template <typename To, class FragEngine, class FragLayout>
__device__ __forceinline__ auto convert_fragment(Tensor<FragEngine, FragLayout> const& t) {
  constexpr int N = decltype(size(t))::value;
  Tensor out = make_tensor<To>(FragLayout{});
  cutlass::NumericArrayConverter<To, float, N> conv;
  *reinterpret_cast<cutlass::Array<To, N>*>(out.data()) =
      conv(*reinterpret_cast<const cutlass::Array<float, N>*>(t.data()));
  return out;
}

// Reductions over the 4 lanes of a quad (the lanes that share accumulator rows).
// 2^x with MUFU.EX2 directly (flush-to-zero for results below 2^-126, like Triton's and FlashAttention's
// exp2; exp2f without fast-math adds a range check and two multiplies per call to keep subnormals).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return x;
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x;
}

// ------------------------------------------------------------------------------------------------ GEMMs
// acc += A · Bᵀ with both operands in shared memory (A: (M x K) K-contiguous view, B: (N x K) view).
//   tCrA / tCrB        : this thread's register fragments (thr_mma.partition_fragment_A / _B)
//   tCsA / tCsB        : the ldmatrix copies' partitions of the shared tiles (thr_copy.partition_S)
//   thr_copy_A / _B    : the per-thread ldmatrix copies (to view the fragments in the copies' layout)
// k-step k+1 is fetched from shared memory while the tensor cores work on k-step k.
template <class TiledMma, class Acc, class RA, class RB, class SA, class SB, class TiledCopyA, class TiledCopyB,
          class ThrCopyA, class ThrCopyB>
__device__ __forceinline__ void gemm_ss(TiledMma& tiled_mma, Acc& acc, RA& tCrA, RB& tCrB, SA const& tCsA,
                                        SB const& tCsB, TiledCopyA const& copy_a, TiledCopyB const& copy_b,
                                        ThrCopyA const& thr_copy_a, ThrCopyB const& thr_copy_b) {
  Tensor tCrA_v = thr_copy_a.retile_D(tCrA);
  Tensor tCrB_v = thr_copy_b.retile_D(tCrB);
  static_assert(decltype(size<1>(tCsA))::value == decltype(size<1>(tCrA_v))::value, "A: M mismatch");
  static_assert(decltype(size<1>(tCsB))::value == decltype(size<1>(tCrB_v))::value, "B: N mismatch");
  static_assert(decltype(size<2>(tCrA))::value == decltype(size<2>(tCrB))::value, "K mismatch");
  constexpr int kSteps = decltype(size<2>(tCrA))::value;
  cute::copy(copy_a, tCsA(_, _, 0), tCrA_v(_, _, 0));
  cute::copy(copy_b, tCsB(_, _, 0), tCrB_v(_, _, 0));
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    if (k + 1 < kSteps) {
      cute::copy(copy_a, tCsA(_, _, k + 1), tCrA_v(_, _, k + 1));
      cute::copy(copy_b, tCsB(_, _, k + 1), tCrB_v(_, _, k + 1));
    }
    cute::gemm(tiled_mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A · Bᵀ with A already in registers (an A-operand fragment, e.g. P from acc_to_a_layout) and B in
// shared memory.
template <class TiledMma, class Acc, class RA, class RB, class SB, class TiledCopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_rs(TiledMma& tiled_mma, Acc& acc, RA const& tCrA, RB& tCrB, SB const& tCsB,
                                        TiledCopyB const& copy_b, ThrCopyB const& thr_copy_b) {
  Tensor tCrB_v = thr_copy_b.retile_D(tCrB);
  static_assert(decltype(size<1>(tCsB))::value == decltype(size<1>(tCrB_v))::value, "B: N mismatch");
  static_assert(decltype(size<2>(tCrA))::value == decltype(size<2>(tCrB))::value, "K mismatch");
  constexpr int kSteps = decltype(size<2>(tCrA))::value;
  cute::copy(copy_b, tCsB(_, _, 0), tCrB_v(_, _, 0));
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    if (k + 1 < kSteps) cute::copy(copy_b, tCsB(_, _, k + 1), tCrB_v(_, _, k + 1));
    cute::gemm(tiled_mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// Transposed view of a (kRows x kCols) shared tile laid out by `layout`: element (c, r) of the result is element
// (r, c) of the tile. composition(L, RowMajor(kCols, kRows)) maps (c, r) -> 1-D index c·kRows + r, which L
// (column-major over its (kRows, kCols) domain) reads as coordinate (r, c).
template <int kRows, int kCols, class Layout>
CUTE_HOST_DEVICE constexpr auto transposed(Layout const& layout) {
  return composition(layout, make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{}));
}

}  // namespace attn
}  // namespace fastvit
