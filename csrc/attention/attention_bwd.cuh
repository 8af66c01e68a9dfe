// FlashAttention-2 backward (Dao 2023, Algorithm 2 / section 3.2), deterministic: no atomics, every output
// element has exactly one writer. Three kernels, launched in order on one stream:
//
//   1. attention_bwd_delta_kernel: delta = rowsum(dO ∘ O) in fp32, (B, H, seqlen_q) in the caller's workspace.
//   2. attention_bwd_dkdv_kernel : one CTA per (key block of kBlockN rows, head, batch); loops over all query
//      blocks of kBlockM rows and accumulates dK and dV of its keys in fp32 registers. It works on the
//      TRANSPOSED score tile (keys x queries), so that every GEMM reads its operands straight from the
//      shared tiles of K, V, Q, dO (no round trip of P or dS through shared memory):
//          Sᵀ  = K · Qᵀ                         (A = K, B = Q)
//          Pᵀ  = 2^(Sᵀ·scale·log2e − lse·log2e)  (lse of the query = column; queries >= seqlen_q -> 0)
//          dV += Pᵀ · dO                        (A = Pᵀ from registers, B = dOᵀ via transposed ldmatrix)
//          dPᵀ = V · dOᵀ                        (A = V, B = dO)
//          dSᵀ = Pᵀ ∘ (dPᵀ − delta)             (delta of the query = column)
//          dK += dSᵀ · Q                        (A = dSᵀ from registers, B = Qᵀ via transposed ldmatrix)
//      and finally dK *= scale.
//   3. attention_bwd_dq_kernel: one CTA per (query block, head, batch); loops over all key blocks:
//          S = Q·Kᵀ, P = 2^(S·scale·log2e − lse·log2e) (keys >= seqlen_k -> 0), dP = dO·Vᵀ,
//          dS = P ∘ (dP − delta), dQ += dS·K (B = Kᵀ via transposed ldmatrix); finally dQ *= scale.
// This recomputes Q·Kᵀ twice (once per kernel) instead of FlashAttention-2's atomic dQ accumulation, exactly
// like the Triton implementation (kernels/attention.py), whose arithmetic this matches: P in fp32, P and dS
// rounded to the input dtype only as MMA operands, dS computed from the fp32 P.
//
// Rotary position embeddings (kRope: params.rope.table != nullptr; attention.h), a template flag as in the forward
// (the kernels without it are unchanged; attention_bwd[_varlen]_rope_hdim<D>_<dtype>.cu instantiate the rotary ones):
// each kernel rotates its resident tile (dK/dV: K; dQ: Q) in the prologue and every streamed Q or K block in shared
// memory after it lands (one extra barrier per block), so both GEMMs of each use see the rotated operand; the fp32 dK
// and dQ accumulators are then gradients with respect to the rotated k and q, and the epilogues stage them in fp32
// shared memory and rotate them back (the transpose) as they store them, rounding once. dV and delta are unchanged.
//
// Both mainloops double-buffer their streamed tiles: block j+1 is fetched by cp.async into the other stage
// while block j is computed.
//
// Packed variable-length sequences (attention.h; FlashAttention's flash_attn_varlen_func): each kernel's body is
// templated on kVarlen and has two entry points, attention_bwd_<k>_kernel (dense) and attention_bwd_<k>_varlen_kernel
// (packed), as in the forward. Packed, the CTA's batch coordinate is the sequence s: its rows start at token
// cu_seqlens[s], its length replaces seqlen_q = seqlen_k, blocks past its end exit at once, and lse / delta are
// (H, T). Still one writer per output element: a key row's dK / dV come from the one CTA of its key block, which
// loops over the query blocks of its own sequence only; a query row's dQ from the one CTA of its query block.
#pragma once

#include "attention/attention_kernel_utils.cuh"
#include "attention/attention_launch.cuh"

namespace fastvit {
namespace attn {

// ------------------------------------------------------------------------------------------------ delta
constexpr int kDeltaThreadsPerRow = 8;  // 8 threads x 8 elements cover 64 columns per step
constexpr int kDeltaThreads = 256;
constexpr int kDeltaRowsPerBlock = kDeltaThreads / kDeltaThreadsPerRow;  // 32

// delta[bh·seqlen_q + i] = Σ_c float(O[i, c]) · float(dO[i, c]) over c < head_dim, for query row i.
// Thread (row = threadIdx.x / 8, j = threadIdx.x % 8) reads 16-byte chunks c = 8j, 8j + 64 of the row; the 8
// partial sums of a row are reduced with xor-shuffles over the 8 consecutive lanes that share the row.
// Packed: delta[h·T + token] for the rows of sequence b; row blocks past its end exit at once.
template <typename Element, bool kVarlen>
__device__ __forceinline__ void attention_bwd_delta_body(const AttentionBwdParams& p, float* __restrict__ delta) {
  const int64_t bh = attention_bh_index();
  if (bh >= p.batch * p.heads) return;  // uniform over the block
  const int64_t b = bh / p.heads;
  const int64_t h = bh - b * p.heads;
  const SeqCoord sc = seq_coord<kVarlen>(p, b);
  if constexpr (kVarlen) {
    if (static_cast<int64_t>(blockIdx.x) * kDeltaRowsPerBlock >= sc.seqlen_q) return;  // uniform over the block
  }
  const int j = threadIdx.x % kDeltaThreadsPerRow;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaRowsPerBlock + threadIdx.x / kDeltaThreadsPerRow;
  const int64_t seqlen_q = kVarlen ? sc.seqlen_q : p.seqlen_q;
  float acc = 0.f;
  if (row < seqlen_q) {
    const Element* o = static_cast<const Element*>(p.o) + seq_offset<kVarlen>(b, p.o_batch_stride, sc, p.o_row_stride) +
                       h * p.o_head_stride + row * p.o_row_stride;
    const Element* d = static_cast<const Element*>(p.dout) +
                       seq_offset<kVarlen>(b, p.do_batch_stride, sc, p.do_row_stride) + h * p.do_head_stride +
                       row * p.do_row_stride;
    for (int c = 8 * j; c < p.head_dim; c += 8 * kDeltaThreadsPerRow) {
      const cute::uint128_t ov = *reinterpret_cast<const cute::uint128_t*>(o + c);
      const cute::uint128_t dv = *reinterpret_cast<const cute::uint128_t*>(d + c);
      const Element* oe = reinterpret_cast<const Element*>(&ov);
      const Element* de = reinterpret_cast<const Element*>(&dv);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += static_cast<float>(oe[e]) * static_cast<float>(de[e]);
    }
  }
  // Lanes 8k .. 8k+7 of a warp hold one row.
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  if (j == 0 && row < seqlen_q) delta[stats_offset<kVarlen>(p, sc, h, bh) + row] = acc;
}

template <typename Element>
__global__ void __launch_bounds__(kDeltaThreads)
    attention_bwd_delta_kernel(const AttentionBwdParams p, float* __restrict__ delta) {
  attention_bwd_delta_body<Element, false>(p, delta);
}

template <typename Element>
__global__ void __launch_bounds__(kDeltaThreads)
    attention_bwd_delta_varlen_kernel(const AttentionBwdParams p, float* __restrict__ delta) {
  attention_bwd_delta_body<Element, true>(p, delta);
}

// ------------------------------------------------------------------------------------------------ dK, dV
template <typename Element_, int kHeadDim_, int kBlockN_, int kBlockM_, int kNWarps_>
struct BwdDkdvConfig : TileConfig<Element_, kHeadDim_, kBlockM_, kBlockN_, kNWarps_> {
  using Base = TileConfig<Element_, kHeadDim_, kBlockM_, kBlockN_, kNWarps_>;
  // kBlockN: key rows per CTA (the M dimension of every MMA of this kernel); kBlockM: query rows per step.
  static_assert(kBlockN_ == 16 * kNWarps_, "each warp owns 16 key rows (one MMA atom row)");
  static_assert(32 * kNWarps_ >= kBlockM_, "load_rowstats_async: one thread per query row of a block");
  // Element offsets: K, V, Q[stage 0], Q[stage 1], dO[stage 0], dO[stage 1]; then fp32 lse[2][kBlockM],
  // delta[2][kBlockM].
  static constexpr int kOffV = Base::kSmemElemsKV;
  static constexpr int kOffQ = 2 * Base::kSmemElemsKV;
  static constexpr int kOffdO = kOffQ + 2 * Base::kSmemElemsQ;
  static constexpr int kElems = kOffdO + 2 * Base::kSmemElemsQ;
  static constexpr int kSmemBytes = kElems * int(sizeof(Element_)) + 4 * kBlockM_ * int(sizeof(float));
  static_assert(kSmemBytes <= 163 * 1024, "backward must fit sm_80's 163 KB");
};

template <class Cfg, bool kVarlen, bool kRope>
__device__ __forceinline__ void attention_bwd_dkdv_body(const AttentionBwdParams& p, const float* __restrict__ delta) {
  using Element = typename Cfg::Element;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kHeadDim = Cfg::kHeadDim;
  constexpr int kNThreads = Cfg::kNThreads;

  const int64_t bh = attention_bh_index();
  if (bh >= p.batch * p.heads) return;
  const int64_t b = bh / p.heads;
  const int64_t h = bh - b * p.heads;
  const int n_block = blockIdx.x;
  const int tid = threadIdx.x;
  const SeqCoord sc = seq_coord<kVarlen>(p, b);
  const int seqlen_q = sc.seqlen_q;
  const int seqlen_k = sc.seqlen_k;
  if constexpr (kVarlen) {
    if (n_block * kBlockN >= seqlen_k) return;  // past this sequence's end (uniform over the CTA)
  }
  const int head_dim = p.head_dim;
  const int n_valid = min(kBlockN, seqlen_k - n_block * kBlockN);  // >= 1 by the grid size (packed: the exit above)
  const int m_blocks = (seqlen_q + kBlockM - 1) / kBlockM;          // 0 when seqlen_q == 0: dK = dV = 0
  const float scale_log2 = p.scale * kLog2e;

  // Key / value tiles of this CTA; Q, dO, lse, delta from query row 0 of this (batch or sequence, head).
  const Element* k_ptr = static_cast<const Element*>(p.k) +
                         seq_offset<kVarlen>(b, p.k_batch_stride, sc, p.k_row_stride) + h * p.k_head_stride +
                         static_cast<int64_t>(n_block) * kBlockN * p.k_row_stride;
  const Element* v_ptr = static_cast<const Element*>(p.v) +
                         seq_offset<kVarlen>(b, p.v_batch_stride, sc, p.v_row_stride) + h * p.v_head_stride +
                         static_cast<int64_t>(n_block) * kBlockN * p.v_row_stride;
  const Element* q_ptr = static_cast<const Element*>(p.q) +
                         seq_offset<kVarlen>(b, p.q_batch_stride, sc, p.q_row_stride) + h * p.q_head_stride;
  const Element* do_ptr = static_cast<const Element*>(p.dout) +
                          seq_offset<kVarlen>(b, p.do_batch_stride, sc, p.do_row_stride) + h * p.do_head_stride;
  const float* lse_ptr = p.lse + stats_offset<kVarlen>(p, sc, h, bh);
  const float* delta_ptr = delta + stats_offset<kVarlen>(p, sc, h, bh);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  float* smem_f = reinterpret_cast<float*>(smem + Cfg::kElems);  // lse[2][kBlockM], then delta[2][kBlockM]
  using LayoutKV = typename Cfg::SmemLayoutKV;
  using LayoutQ = typename Cfg::SmemLayoutQ;
  Tensor sK = make_tensor(make_smem_ptr(smem), LayoutKV{});              // (kBlockN, D)
  Tensor sV = make_tensor(make_smem_ptr(smem + Cfg::kOffV), LayoutKV{});  // (kBlockN, D)
  auto q_stage = [&](int s) { return smem + Cfg::kOffQ + s * Cfg::kSmemElemsQ; };
  auto do_stage = [&](int s) { return smem + Cfg::kOffdO + s * Cfg::kSmemElemsQ; };
  auto lse_stage = [&](int s) { return smem_f + s * kBlockM; };
  auto delta_stage = [&](int s) { return smem_f + (2 + s) * kBlockM; };

  // Fetch query block mb (Q, dO rows [mb·kBlockM, +kBlockM), their lse and delta) into stage s.
  auto load_q_block = [&](int mb, int s) {
    const int rows = seqlen_q - mb * kBlockM;
    const int64_t r0 = static_cast<int64_t>(mb) * kBlockM;
    load_tile_async<kBlockM, kHeadDim, kNThreads>(make_tensor(make_smem_ptr(q_stage(s)), LayoutQ{}),
                                                  q_ptr + r0 * p.q_row_stride, p.q_row_stride, rows, head_dim, tid);
    load_tile_async<kBlockM, kHeadDim, kNThreads>(make_tensor(make_smem_ptr(do_stage(s)), LayoutQ{}),
                                                  do_ptr + r0 * p.do_row_stride, p.do_row_stride, rows, head_dim, tid);
    load_rowstats_async<kBlockM>(lse_stage(s), lse_ptr + r0, rows, tid);
    load_rowstats_async<kBlockM>(delta_stage(s), delta_ptr + r0, rows, tid);
  };

  typename Cfg::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  // Views used only for their shapes, to size register fragments.
  Tensor sQ_shape = make_tensor(make_smem_ptr(smem), LayoutQ{});                                   // (kBlockM, D)
  Tensor sT_shape =
      make_tensor(make_smem_ptr(smem), make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}));  // (D, kBlockM)
  Tensor tSrK = thr_mma.partition_fragment_A(sK);         // A of Sᵀ = K·Qᵀ
  Tensor tSrV = thr_mma.partition_fragment_A(sV);         // A of dPᵀ = V·dOᵀ
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ_shape);   // B of Sᵀ (and of dPᵀ with dO)
  Tensor tSrdO = thr_mma.partition_fragment_B(sQ_shape);
  Tensor tBrT = thr_mma.partition_fragment_B(sT_shape);   // B of dV += Pᵀ·dO (dOᵀ) and dK += dSᵀ·Q (Qᵀ)
  Tensor acc_dk = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});

  const SmemCopies<Cfg> cp(tid);
  Tensor tSsK = cp.thr_a.partition_S(sK);
  Tensor tSsV = cp.thr_a.partition_S(sV);

  // (key row, query col) of every element of the (kBlockN x kBlockM) transposed score tile this thread holds.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));

  // Prologue: K, V and query block 0 in one cp.async group.
  load_tile_async<kBlockN, kHeadDim, kNThreads>(sK, k_ptr, p.k_row_stride, n_valid, head_dim, tid);
  load_tile_async<kBlockN, kHeadDim, kNThreads>(sV, v_ptr, p.v_row_stride, n_valid, head_dim, tid);
  if (m_blocks > 0) load_q_block(0, 0);
  cp_async_fence();
  if constexpr (kRope) {  // K is rotated once, here, while no accumulator is live (the loop's barriers publish it)
    if (m_blocks > 0) {
      cp_async_wait<0>();
      __syncthreads();
      rope_rotate_tile<kBlockN, kHeadDim, kNThreads>(sK, p.rope, p.rope.table + h * p.rope.head_stride,
                                                     n_block * kBlockN, n_valid, head_dim, tid);
    }
  }
  clear(acc_dk);
  clear(acc_dv);

  for (int mb = 0; mb < m_blocks; ++mb) {
    const int stage = mb & 1;
    if (mb + 1 < m_blocks) {
      // Stage stage^1 was last read in iteration mb-1, which ended with __syncthreads().
      load_q_block(mb + 1, stage ^ 1);
      cp_async_fence();
      cp_async_wait<1>();  // everything but the group just issued has landed: block mb (and K, V)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    Tensor sQ = make_tensor(make_smem_ptr(q_stage(stage)), LayoutQ{});
    if constexpr (kRope) {  // query block mb landed (the barrier above): rotate it before the first ldmatrix
      rope_rotate_tile<kBlockM, kHeadDim, kNThreads>(sQ, p.rope, p.rope.table + h * p.rope.head_stride, mb * kBlockM,
                                                     seqlen_q - mb * kBlockM, head_dim, tid);
      __syncthreads();
    }
    Tensor sdO = make_tensor(make_smem_ptr(do_stage(stage)), LayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(q_stage(stage)), transposed<kBlockM, kHeadDim>(LayoutQ{}));  // (D, kBlockM)
    Tensor sdOt =
        make_tensor(make_smem_ptr(do_stage(stage)), transposed<kBlockM, kHeadDim>(LayoutQ{}));  // (D, kBlockM)
    const float* sLse = lse_stage(stage);
    const float* sDelta = delta_stage(stage);

    // Sᵀ = K·Qᵀ, (kBlockN x kBlockM).
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    gemm_ss(tiled_mma, acc_s, tSrK, tSrQ, tSsK, cp.thr_b.partition_S(sQ), cp.a, cp.b, cp.thr_a, cp.thr_b);

    // Pᵀ = exp(scale·Sᵀ − lse[query]) computed as 2^(Sᵀ·scale·log2e − lse·log2e); queries past the end -> 0.
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    const int q0 = mb * kBlockM;
#pragma unroll
    for (int ni = 0; ni < size<1>(s_rc); ++ni) {
      const int c = get<1>(tScS_rc(0, ni));  // query column within the block
      const bool q_ok = q0 + c < seqlen_q;
      const float lse2 = sLse[c] * kLog2e;
#pragma unroll
      for (int mi = 0; mi < size<0>(s_rc); ++mi) {
        s_rc(mi, ni) = q_ok ? fast_exp2(s_rc(mi, ni) * scale_log2 - lse2) : 0.f;
      }
    }

    // dV += Pᵀ·dO.
    {
      Tensor rP = convert_fragment<Element>(acc_s);
      Tensor tPa = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
      gemm_rs(tiled_mma, acc_dv, tPa, tBrT, cp.thr_bt.partition_S(sdOt), cp.bt, cp.thr_bt);
    }

    // dPᵀ = V·dOᵀ, (kBlockN x kBlockM).
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_dp);
    gemm_ss(tiled_mma, acc_dp, tSrV, tSrdO, tSsV, cp.thr_b.partition_S(sdO), cp.a, cp.b, cp.thr_a, cp.thr_b);

    // dSᵀ = Pᵀ ∘ (dPᵀ − delta[query]), in place of Pᵀ. (Past-the-end queries: Pᵀ = 0 -> dSᵀ = 0.)
    Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
#pragma unroll
    for (int ni = 0; ni < size<1>(s_rc); ++ni) {
      const float dlt = sDelta[get<1>(tScS_rc(0, ni))];
#pragma unroll
      for (int mi = 0; mi < size<0>(s_rc); ++mi) s_rc(mi, ni) = s_rc(mi, ni) * (dp_rc(mi, ni) - dlt);
    }

    // dK += dSᵀ·Q.
    {
      Tensor rdS = convert_fragment<Element>(acc_s);
      Tensor tdSa = make_tensor(rdS.data(), acc_to_a_layout(rdS.layout()));
      gemm_rs(tiled_mma, acc_dk, tdSa, tBrT, cp.thr_bt.partition_S(sQt), cp.bt, cp.thr_bt);
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  // Epilogue: dK·scale and dV through shared memory (K and V tiles are dead) to 16-byte global stores.
  // (m_blocks == 0: no loop, so wait for the prologue's copies before overwriting sK / sV.)
  // Rope: dK (with respect to the rotated keys) goes through an fp32 tile over sK and sV and is rotated back as it is
  // stored, before dV takes sV.
  cp_async_wait<0>();
  __syncthreads();
  const int etid = opaque_thread_idx();
  auto dk_base = [&] {
    return static_cast<Element*>(p.dk) + seq_offset<kVarlen>(b, p.dk_batch_stride, sc, p.dk_row_stride) +
           h * p.dk_head_stride + static_cast<int64_t>(n_block) * kBlockN * p.dk_row_stride;
  };
  auto dv_base = [&] {
    return static_cast<Element*>(p.dv) + seq_offset<kVarlen>(b, p.dv_batch_stride, sc, p.dv_row_stride) +
           h * p.dv_head_stride + static_cast<int64_t>(n_block) * kBlockN * p.dv_row_stride;
  };
  if constexpr (kRope) {
    Tensor sdKf = make_tensor(make_smem_ptr(reinterpret_cast<float*>(smem)), LayoutKV{});
    static_assert(2 * Cfg::kSmemElemsKV * sizeof(Element) >= cosize(LayoutKV{}) * sizeof(float) &&
                      Cfg::kOffV == Cfg::kSmemElemsKV,
                  "the fp32 dK tile fits in sK and sV");
    acc_to_smem<kBlockN, kHeadDim, float>(acc_dk, p.scale, sdKf, tiled_mma, etid);
    __syncthreads();
    rope_store_tile_back<kBlockN, kHeadDim, kNThreads>(sdKf, dk_base(), p.dk_row_stride, p.rope,
                                                       p.rope.table + h * p.rope.head_stride, n_block * kBlockN,
                                                       n_valid, head_dim, etid);
    __syncthreads();  // sV is free again
    acc_to_smem<kBlockN, kHeadDim, Element>(acc_dv, 1.f, sV, tiled_mma, etid);
    __syncthreads();
    store_tile<kBlockN, kHeadDim, kNThreads>(sV, dv_base(), p.dv_row_stride, n_valid, head_dim, etid);
  } else {
    acc_to_smem<kBlockN, kHeadDim, Element>(acc_dk, p.scale, sK, tiled_mma, etid);
    acc_to_smem<kBlockN, kHeadDim, Element>(acc_dv, 1.f, sV, tiled_mma, etid);
    __syncthreads();
    Element* dk_ptr = dk_base();
    Element* dv_ptr = dv_base();
    store_tile<kBlockN, kHeadDim, kNThreads>(sK, dk_ptr, p.dk_row_stride, n_valid, head_dim, etid);
    store_tile<kBlockN, kHeadDim, kNThreads>(sV, dv_ptr, p.dv_row_stride, n_valid, head_dim, etid);
  }
}

template <class Cfg, bool kRope>
__global__ void __launch_bounds__(Cfg::kNThreads, 1)
    attention_bwd_dkdv_kernel(const AttentionBwdParams p, const float* __restrict__ delta) {
  attention_bwd_dkdv_body<Cfg, false, kRope>(p, delta);
}

template <class Cfg, bool kRope>
__global__ void __launch_bounds__(Cfg::kNThreads, 1)
    attention_bwd_dkdv_varlen_kernel(const AttentionBwdParams p, const float* __restrict__ delta) {
  attention_bwd_dkdv_body<Cfg, true, kRope>(p, delta);
}

// ------------------------------------------------------------------------------------------------ dQ
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct BwdDqConfig : TileConfig<Element_, kHeadDim_, kBlockM_, kBlockN_, kNWarps_> {
  using Base = TileConfig<Element_, kHeadDim_, kBlockM_, kBlockN_, kNWarps_>;
  // kBlockM: query rows per CTA; kBlockN: key rows per mainloop step.
  static_assert(kBlockM_ == 16 * kNWarps_, "each warp owns 16 query rows (one MMA atom row)");
  // Element offsets: Q, dO, K[stage 0], K[stage 1], V[stage 0], V[stage 1].
  static constexpr int kOffdO = Base::kSmemElemsQ;
  static constexpr int kOffK = 2 * Base::kSmemElemsQ;
  static constexpr int kOffV = kOffK + 2 * Base::kSmemElemsKV;
  static constexpr int kElems = kOffV + 2 * Base::kSmemElemsKV;
  static constexpr int kSmemBytes = kElems * int(sizeof(Element_));
  static_assert(kSmemBytes <= 163 * 1024, "backward must fit sm_80's 163 KB");
};

template <class Cfg, bool kVarlen, bool kRope>
__device__ __forceinline__ void attention_bwd_dq_body(const AttentionBwdParams& p, const float* __restrict__ delta) {
  using Element = typename Cfg::Element;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kHeadDim = Cfg::kHeadDim;
  constexpr int kNThreads = Cfg::kNThreads;

  const int64_t bh = attention_bh_index();
  if (bh >= p.batch * p.heads) return;
  const int64_t b = bh / p.heads;
  const int64_t h = bh - b * p.heads;
  const int m_block = blockIdx.x;
  const int tid = threadIdx.x;
  const SeqCoord sc = seq_coord<kVarlen>(p, b);
  const int seqlen_q = sc.seqlen_q;
  const int seqlen_k = sc.seqlen_k;
  if constexpr (kVarlen) {
    if (m_block * kBlockM >= seqlen_q) return;  // past this sequence's end (uniform over the CTA)
  }
  const int head_dim = p.head_dim;
  const int m_valid = min(kBlockM, seqlen_q - m_block * kBlockM);  // >= 1 by the grid size (packed: the exit above)
  const int n_blocks = (seqlen_k + kBlockN - 1) / kBlockN;  // 0 when seqlen_k == 0: dQ = 0
  const float scale_log2 = p.scale * kLog2e;

  const Element* q_ptr = static_cast<const Element*>(p.q) +
                         seq_offset<kVarlen>(b, p.q_batch_stride, sc, p.q_row_stride) + h * p.q_head_stride +
                         static_cast<int64_t>(m_block) * kBlockM * p.q_row_stride;
  const Element* do_ptr = static_cast<const Element*>(p.dout) +
                          seq_offset<kVarlen>(b, p.do_batch_stride, sc, p.do_row_stride) + h * p.do_head_stride +
                          static_cast<int64_t>(m_block) * kBlockM * p.do_row_stride;
  const Element* k_ptr = static_cast<const Element*>(p.k) +
                         seq_offset<kVarlen>(b, p.k_batch_stride, sc, p.k_row_stride) + h * p.k_head_stride;
  const Element* v_ptr = static_cast<const Element*>(p.v) +
                         seq_offset<kVarlen>(b, p.v_batch_stride, sc, p.v_row_stride) + h * p.v_head_stride;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  using LayoutQ = typename Cfg::SmemLayoutQ;
  using LayoutKV = typename Cfg::SmemLayoutKV;
  Tensor sQ = make_tensor(make_smem_ptr(smem), LayoutQ{});  // (kBlockM, D)
  Tensor sdO = make_tensor(make_smem_ptr(smem + Cfg::kOffdO), LayoutQ{});  // (kBlockM, D)
  auto k_stage = [&](int s) { return smem + Cfg::kOffK + s * Cfg::kSmemElemsKV; };
  auto v_stage = [&](int s) { return smem + Cfg::kOffV + s * Cfg::kSmemElemsKV; };

  // Fetch key block nb (K, V rows [nb·kBlockN, +kBlockN)) into stage s.
  auto load_kv_block = [&](int nb, int s) {
    const int rows = seqlen_k - nb * kBlockN;
    const int64_t r0 = static_cast<int64_t>(nb) * kBlockN;
    load_tile_async<kBlockN, kHeadDim, kNThreads>(make_tensor(make_smem_ptr(k_stage(s)), LayoutKV{}),
                                                  k_ptr + r0 * p.k_row_stride, p.k_row_stride, rows, head_dim, tid);
    load_tile_async<kBlockN, kHeadDim, kNThreads>(make_tensor(make_smem_ptr(v_stage(s)), LayoutKV{}),
                                                  v_ptr + r0 * p.v_row_stride, p.v_row_stride, rows, head_dim, tid);
  };

  typename Cfg::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor sKV_shape = make_tensor(make_smem_ptr(smem), LayoutKV{});  // (kBlockN, D)
  Tensor sKt_shape =
      make_tensor(make_smem_ptr(smem), make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}));  // (D, kBlockN)
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);  // A of S = Q·Kᵀ
  Tensor tSrdO = thr_mma.partition_fragment_A(sdO);  // A of dP = dO·Vᵀ
  Tensor tSrK = thr_mma.partition_fragment_B(sKV_shape);  // B of S
  Tensor tSrV = thr_mma.partition_fragment_B(sKV_shape);  // B of dP
  Tensor tBrKt = thr_mma.partition_fragment_B(sKt_shape);  // B of dQ += dS·K (Kᵀ)
  Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});

  const SmemCopies<Cfg> cp(tid);
  Tensor tSsQ = cp.thr_a.partition_S(sQ);
  Tensor tSsdO = cp.thr_a.partition_S(sdO);

  // (query row, key col) of every element of the (kBlockM x kBlockN) score tile this thread holds.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;

  // Prologue: Q, dO and key block 0 in one cp.async group.
  load_tile_async<kBlockM, kHeadDim, kNThreads>(sQ, q_ptr, p.q_row_stride, m_valid, head_dim, tid);
  load_tile_async<kBlockM, kHeadDim, kNThreads>(sdO, do_ptr, p.do_row_stride, m_valid, head_dim, tid);
  if (n_blocks > 0) load_kv_block(0, 0);
  cp_async_fence();
  if constexpr (kRope) {  // Q is rotated once, here, while no accumulator is live (the loop's barriers publish it)
    if (n_blocks > 0) {
      cp_async_wait<0>();
      __syncthreads();
      rope_rotate_tile<kBlockM, kHeadDim, kNThreads>(sQ, p.rope, p.rope.table + h * p.rope.head_stride,
                                                     m_block * kBlockM, m_valid, head_dim, tid);
    }
  }

  // lse (log2 domain) and delta of this thread's query rows; rows past the end get 0 (never stored).
  float lse2[kRows], dlt[kRows];
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    const int q = m_block * kBlockM + get<0>(tScS_rc(mi, 0));
    const bool ok = q < seqlen_q;
    lse2[mi] = ok ? p.lse[stats_offset<kVarlen>(p, sc, h, bh) + q] * kLog2e : 0.f;
    dlt[mi] = ok ? delta[stats_offset<kVarlen>(p, sc, h, bh) + q] : 0.f;
  }
  clear(acc_dq);

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int stage = nb & 1;
    if (nb + 1 < n_blocks) {
      load_kv_block(nb + 1, stage ^ 1);  // stage^1 was last read in iteration nb-1 (ended with a barrier)
      cp_async_fence();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    Tensor sK = make_tensor(make_smem_ptr(k_stage(stage)), LayoutKV{});
    if constexpr (kRope) {  // key block nb landed (the barrier above): rotate it before the first ldmatrix
      rope_rotate_tile<kBlockN, kHeadDim, kNThreads>(sK, p.rope, p.rope.table + h * p.rope.head_stride, nb * kBlockN,
                                                     seqlen_k - nb * kBlockN, head_dim, tid);
      __syncthreads();
    }
    Tensor sV = make_tensor(make_smem_ptr(v_stage(stage)), LayoutKV{});
    Tensor sKt = make_tensor(make_smem_ptr(k_stage(stage)), transposed<kBlockN, kHeadDim>(LayoutKV{}));  // (D, kBlockN)

    // S = Q·Kᵀ, (kBlockM x kBlockN).
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, cp.thr_b.partition_S(sK), cp.a, cp.b, cp.thr_a, cp.thr_b);

    // P = 2^(S·scale·log2e − lse·log2e); keys past the end -> 0.
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    const int key0 = nb * kBlockN;
    const bool tail = key0 + kBlockN > seqlen_k;
#pragma unroll
    for (int ni = 0; ni < size<1>(s_rc); ++ni) {
      const bool key_ok = !tail || key0 + get<1>(tScS_rc(0, ni)) < seqlen_k;
#pragma unroll
      for (int mi = 0; mi < kRows; ++mi) {
        s_rc(mi, ni) = key_ok ? fast_exp2(s_rc(mi, ni) * scale_log2 - lse2[mi]) : 0.f;
      }
    }

    // dP = dO·Vᵀ, (kBlockM x kBlockN).
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_ss(tiled_mma, acc_dp, tSrdO, tSrV, tSsdO, cp.thr_b.partition_S(sV), cp.a, cp.b, cp.thr_a, cp.thr_b);

    // dS = P ∘ (dP − delta[query]), in place of P.
    Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
#pragma unroll
      for (int ni = 0; ni < size<1>(s_rc); ++ni) s_rc(mi, ni) = s_rc(mi, ni) * (dp_rc(mi, ni) - dlt[mi]);
    }

    // dQ += dS·K.
    Tensor rdS = convert_fragment<Element>(acc_s);
    Tensor tdSa = make_tensor(rdS.data(), acc_to_a_layout(rdS.layout()));
    gemm_rs(tiled_mma, acc_dq, tdSa, tBrKt, cp.thr_bt.partition_S(sKt), cp.bt, cp.thr_bt);
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  // Epilogue: dQ·scale through shared memory (sQ is dead) to 16-byte global stores.
  // Rope: dQ (with respect to the rotated queries) goes through an fp32 tile over sQ and sdO, rotated back as stored.
  cp_async_wait<0>();  // n_blocks == 0: the prologue's copies must land before sQ is overwritten
  __syncthreads();
  const int etid = opaque_thread_idx();
  auto dq_base = [&] {
    return static_cast<Element*>(p.dq) + seq_offset<kVarlen>(b, p.dq_batch_stride, sc, p.dq_row_stride) +
           h * p.dq_head_stride + static_cast<int64_t>(m_block) * kBlockM * p.dq_row_stride;
  };
  if constexpr (kRope) {
    Tensor sdQf = make_tensor(make_smem_ptr(reinterpret_cast<float*>(smem)), LayoutQ{});
    static_assert(
        2 * Cfg::kSmemElemsQ * sizeof(Element) >= cosize(LayoutQ{}) * sizeof(float) && Cfg::kOffdO == Cfg::kSmemElemsQ,
        "the fp32 dQ tile fits in sQ and sdO");
    acc_to_smem<kBlockM, kHeadDim, float>(acc_dq, p.scale, sdQf, tiled_mma, etid);
    __syncthreads();
    rope_store_tile_back<kBlockM, kHeadDim, kNThreads>(sdQf, dq_base(), p.dq_row_stride, p.rope,
                                                       p.rope.table + h * p.rope.head_stride, m_block * kBlockM,
                                                       m_valid, head_dim, etid);
  } else {
    acc_to_smem<kBlockM, kHeadDim, Element>(acc_dq, p.scale, sQ, tiled_mma, etid);
    __syncthreads();
    Element* dq_ptr = dq_base();
    store_tile<kBlockM, kHeadDim, kNThreads>(sQ, dq_ptr, p.dq_row_stride, m_valid, head_dim, etid);
  }
}

template <class Cfg, bool kRope>
__global__ void __launch_bounds__(Cfg::kNThreads, 1)
    attention_bwd_dq_kernel(const AttentionBwdParams p, const float* __restrict__ delta) {
  attention_bwd_dq_body<Cfg, false, kRope>(p, delta);
}

template <class Cfg, bool kRope>
__global__ void __launch_bounds__(Cfg::kNThreads, 1)
    attention_bwd_dq_varlen_kernel(const AttentionBwdParams p, const float* __restrict__ delta) {
  attention_bwd_dq_body<Cfg, true, kRope>(p, delta);
}

// ------------------------------------------------------------------------------------------------ launch
// Tile configurations per head-dim bucket. Per-thread fp32 accumulator registers (each warp owns 16 rows):
//   dK/dV kernel: dK + dV = 2·16·D/32 = D, Sᵀ + dPᵀ = 2·16·kBlockM/32 = kBlockM.
//   dQ kernel:    dQ = D/2,               S + dP   = kBlockN.
//   D <= 96 : dK/dV 128 keys x 64 queries, 8 warps; dQ 64 queries x 64 keys, 4 warps
//   D = 128 : dK/dV 128 keys x 32 queries, 8 warps (64-query steps would need ~190 accumulator registers);
//             dQ 64 queries x 32 keys, 4 warps (64 x 64 spilled ~24 bytes under ptxas's operand prefetching).
template <typename Element, int kHeadDim>
struct BwdTiles {
  using Dkdv = BwdDkdvConfig<Element, kHeadDim, /*kBlockN=*/128, /*kBlockM=*/(kHeadDim <= 96 ? 64 : 32), /*warps=*/8>;
  using Dq = BwdDqConfig<Element, kHeadDim, /*kBlockM=*/64, /*kBlockN=*/(kHeadDim <= 96 ? 64 : 32), /*warps=*/4>;
};

// The three entry points of one problem kind (dense or packed, with or without rope); only those kernels are
// instantiated.
template <typename Element, class Dkdv, class Dq, bool kVarlen, bool kRope>
struct BwdKernels {
  static constexpr auto delta = &attention_bwd_delta_kernel<Element>;
  static constexpr auto dkdv = &attention_bwd_dkdv_kernel<Dkdv, kRope>;
  static constexpr auto dq = &attention_bwd_dq_kernel<Dq, kRope>;
};
template <typename Element, class Dkdv, class Dq, bool kRope>
struct BwdKernels<Element, Dkdv, Dq, true, kRope> {
  static constexpr auto delta = &attention_bwd_delta_varlen_kernel<Element>;
  static constexpr auto dkdv = &attention_bwd_dkdv_varlen_kernel<Dkdv, kRope>;
  static constexpr auto dq = &attention_bwd_dq_varlen_kernel<Dq, kRope>;
};

// Grids: (row blocks of the longest sequence, B·H); packed, the blocks past a shorter sequence's end exit at once.
template <typename Element, int kHeadDim, bool kVarlen, bool kRope>
cudaError_t launch_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using Dkdv = typename BwdTiles<Element, kHeadDim>::Dkdv;
  using Dq = typename BwdTiles<Element, kHeadDim>::Dq;
  using Kernels = BwdKernels<Element, Dkdv, Dq, kVarlen, kRope>;
  const int64_t bh = p.batch * p.heads;
  float* delta = static_cast<float*>(p.workspace);
  cudaError_t err;

  if (p.seqlen_q > 0) {
    // 1. delta = rowsum(dO ∘ O)
    dim3 grid;
    if (!make_attention_grid((p.seqlen_q + kDeltaRowsPerBlock - 1) / kDeltaRowsPerBlock, bh, grid))
      return cudaErrorInvalidConfiguration;
    Kernels::delta<<<grid, kDeltaThreads, 0, stream>>>(p, delta);
    FASTVIT_RETURN_LAUNCH_ERROR();
  }
  if (p.seqlen_k > 0) {
    // 2. dK, dV (zeros when seqlen_q == 0)
    dim3 grid;
    if (!make_attention_grid((p.seqlen_k + Dkdv::kBlockN - 1) / Dkdv::kBlockN, bh, grid))
      return cudaErrorInvalidConfiguration;
    auto kernel = Kernels::dkdv;
    if ((err = set_smem_limit(kernel, Dkdv::kSmemBytes)) != cudaSuccess) return err;
    kernel<<<grid, Dkdv::kNThreads, Dkdv::kSmemBytes, stream>>>(p, delta);
    FASTVIT_RETURN_LAUNCH_ERROR();
  }
  if (p.seqlen_q > 0) {
    // 3. dQ (zeros when seqlen_k == 0)
    dim3 grid;
    if (!make_attention_grid((p.seqlen_q + Dq::kBlockM - 1) / Dq::kBlockM, bh, grid))
      return cudaErrorInvalidConfiguration;
    auto kernel = Kernels::dq;
    if ((err = set_smem_limit(kernel, Dq::kSmemBytes)) != cudaSuccess) return err;
    kernel<<<grid, Dq::kNThreads, Dq::kSmemBytes, stream>>>(p, delta);
    FASTVIT_RETURN_LAUNCH_ERROR();
  }
  return cudaSuccess;
}

}  // namespace attn

template <typename Element, int kHeadDim, bool kVarlen, bool kRope>
cudaError_t run_attention_bwd_bucket(const AttentionBwdParams& params, cudaStream_t stream) {
  return attn::launch_attention_bwd<Element, kHeadDim, kVarlen, kRope>(params, stream);
}

}  // namespace fastvit
