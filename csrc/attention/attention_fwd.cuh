// FlashAttention-2 forward (Dao 2023, Algorithm 1 / section 3.1) on strided Q, K, V.
//
// One CTA per (query block of kBlockM rows, head, batch). The CTA keeps its Q tile in shared memory, streams
// K and V in blocks of kBlockN rows, and keeps an online softmax in fp32 registers:
//   s     = (q · kᵀ) · scale · log2(e)                (scores in the log2 domain; keys >= seqlen_k -> -inf)
//   m_new = max(m, rowmax(s));  alpha = 2^(m - m_new)
//   p     = 2^(s - m_new);      l = l·alpha + rowsum(p);   acc = acc·alpha + p·v   (p rounded to the input
//                                                                                  dtype for the MMA only)
// and finally O = acc / l, LSE = (m + log2(l)) · ln(2) (natural log of the scaled scores). This is exactly the
// Triton kernel's arithmetic (kernels/attention.py, _attn_fwd_body), including the order "scale, then mask".
//
// Rotary position embeddings (kRope: params.rope.table != nullptr; attention.h): Q (in the prologue) and each K
// block (in the mainloop) are rotated in shared memory after they land, by the whole CTA, before any ldmatrix reads
// them -- one extra barrier per key block, and nothing rotated is written to global memory. A template flag, not a
// run-time branch: as a uniform branch inside the mainloop the rotary code raised the plain kernels' registers
// (dense sm_80 235 -> 243; packed sm_90a 225 -> 255 with 52 B of spills), so the kernels without it stay exactly as
// they were and the rotary ones are their own instantiations (attention_fwd[_varlen]_rope_hdim<D>_<dtype>.cu).
//
// Pipeline (single-buffered K and V, as in FlashAttention-2): the copy of V[j] overlaps Q·K[j]ᵀ, and the copy
// of the next K overlaps the softmax and P·V[j]. Key blocks are visited from the last to the first so that the
// only partial block (the sequence tail) is handled first; every key block holds at least one valid key, so
// the running max is finite after the first block (no inf - inf).
//
// Packed variable-length sequences (attention.h; FlashAttention's flash_attn_varlen_func) run the same body with
// kVarlen = true: the CTA's batch coordinate is the sequence, its rows start at token cu_seqlens[s], its length
// replaces seqlen_q / seqlen_k (the tail tile is masked exactly like the dense N = 197 tail), query blocks past
// the sequence's end exit at once, and LSE goes to (H, T). One kernel template,
// attention_fwd_kernel<Cfg, kVarlen, kRope>; with kVarlen = false every varlen branch is compiled out. (Not a __device__ body behind two thin __global__
// entry points, as the backward's kernels are: for the forward that shape made NVVM re-associate the key-mask
// index arithmetic and cost the dense sm_80 kernel 2 registers, 235 -> 237; as one template it stays at 235.)
#pragma once

#include "attention/attention_kernel_utils.cuh"
#include "attention/attention_launch.cuh"

namespace fastvit {
namespace attn {

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdConfig : TileConfig<Element_, kHeadDim_, kBlockM_, kBlockN_, kNWarps_> {
  using Base = TileConfig<Element_, kHeadDim_, kBlockM_, kBlockN_, kNWarps_>;
  // kBlockM: query rows per CTA; kBlockN: key rows per mainloop step.
  static_assert(kBlockM_ % (16 * kNWarps_) == 0, "each warp owns a whole number of 16-row MMA atoms");
  // Q, K, V tiles (O reuses Q's space in the epilogue).
  static constexpr int kSmemBytes = (Base::kSmemElemsQ + 2 * Base::kSmemElemsKV) * int(sizeof(Element_));
  static_assert(kSmemBytes <= 99 * 1024, "forward must fit two CTAs per SM on sm_80");
};

template <class Cfg, bool kVarlen, bool kRope>
__global__ void __launch_bounds__(Cfg::kNThreads, 1) attention_fwd_kernel(const AttentionFwdParams p) {
  using Element = typename Cfg::Element;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kHeadDim = Cfg::kHeadDim;
  constexpr int kNThreads = Cfg::kNThreads;

  const int64_t bh = attention_bh_index();  // b·H + h
  if (bh >= p.batch * p.heads) return;
  const int64_t b = bh / p.heads;
  const int64_t h = bh - b * p.heads;
  const int m_block = blockIdx.x;
  const int tid = threadIdx.x;
  const SeqCoord sc = seq_coord<kVarlen>(p, b);
  const int seqlen_q = sc.seqlen_q;
  const int seqlen_k = sc.seqlen_k;
  if constexpr (kVarlen) {
    // The grid covers the longest sequence; this one may end earlier (or be empty). Uniform over the CTA.
    if (m_block * kBlockM >= seqlen_q) return;
  }
  const int head_dim = p.head_dim;
  const int m_valid = min(kBlockM, seqlen_q - m_block * kBlockM);  // >= 1 by the grid size (packed: the exit above)
  const int n_blocks = (seqlen_k + kBlockN - 1) / kBlockN;  // >= 1 (seqlen_k >= 1; packed: = seqlen_q)
  const float scale_log2 = p.scale * kLog2e;

  // Global tile bases: row 0 of this query block for Q (O: in the epilogue), row 0 of the sequence for K, V.
  const Element* q_ptr = static_cast<const Element*>(p.q) +
                         seq_offset<kVarlen>(b, p.q_batch_stride, sc, p.q_row_stride) + h * p.q_head_stride +
                         static_cast<int64_t>(m_block) * kBlockM * p.q_row_stride;
  const Element* k_ptr = static_cast<const Element*>(p.k) +
                         seq_offset<kVarlen>(b, p.k_batch_stride, sc, p.k_row_stride) + h * p.k_head_stride;
  const Element* v_ptr = static_cast<const Element*>(p.v) +
                         seq_offset<kVarlen>(b, p.v_batch_stride, sc, p.v_row_stride) + h * p.v_head_stride;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Cfg::SmemLayoutQ{});  // (M, D)
  Tensor sK = make_tensor(make_smem_ptr(smem + Cfg::kSmemElemsQ), typename Cfg::SmemLayoutKV{});  // (N, D)
  Element* sV_ptr = smem + Cfg::kSmemElemsQ + Cfg::kSmemElemsKV;
  Tensor sV = make_tensor(make_smem_ptr(sV_ptr), typename Cfg::SmemLayoutKV{});  // (N, D)
  // Vᵀ as the B operand of P·V: (D, N), element (d, n) = V(n, d).
  Tensor sVt = make_tensor(make_smem_ptr(sV_ptr), transposed<kBlockN, kHeadDim>(typename Cfg::SmemLayoutKV{}));
  // A plain (D, N) layout: only used to size the register fragment of Vᵀ.
  Tensor sVt_shape = make_tensor(make_smem_ptr(sV_ptr), make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}));

  typename Cfg::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);  // (MMA, MMA_M, MMA_K over D)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);  // (MMA, MMA_N over kBlockN, MMA_K over D)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt_shape);  // (MMA, MMA_N over D, MMA_K over kBlockN)
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});

  const SmemCopies<Cfg> cp(tid);  // a: Q, b: K, bt: Vᵀ
  Tensor tSsQ = cp.thr_a.partition_S(sQ);
  Tensor tSsK = cp.thr_b.partition_S(sK);
  Tensor tOsVt = cp.thr_bt.partition_S(sVt);

  // (row, col) coordinates within the (kBlockM x kBlockN) score tile of each accumulator element, viewed
  // (thread rows, thread cols) like the scores themselves.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  Tensor acc_o_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;  // rows of the tile this thread holds (2·MMA_M)

  // Prologue: Q and the last K block in one cp.async group.
  int n_block = n_blocks - 1;
  load_tile_async<kBlockM, kHeadDim, kNThreads>(sQ, q_ptr, p.q_row_stride, m_valid, head_dim, tid);
  load_tile_async<kBlockN, kHeadDim, kNThreads>(sK, k_ptr + static_cast<int64_t>(n_block) * kBlockN * p.k_row_stride,
                                                p.k_row_stride, seqlen_k - n_block * kBlockN, head_dim, tid);
  cp_async_fence();
  if constexpr (kRope) {  // Q is rotated once, here, while no accumulator is live
    cp_async_wait<0>();
    __syncthreads();
    rope_rotate_tile<kBlockM, kHeadDim, kNThreads>(sQ, p.rope, p.rope.table + h * p.rope.head_stride, m_block * kBlockM,
                                                   m_valid, head_dim, tid);
  }

  float row_max[kRows];  // running max of the log2-domain scores
  float row_sum[kRows];  // this thread's partial running sum of 2^(s - row_max) (quad-reduced at the end)
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    row_max[mi] = -INFINITY;
    row_sum[mi] = 0.f;
  }
  clear(acc_o);

  for (; n_block >= 0; --n_block) {
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    // K[n_block] (and Q) have landed; every warp is done with the previous P·V, so sV may be overwritten.
    cp_async_wait<0>();
    __syncthreads();
    load_tile_async<kBlockN, kHeadDim, kNThreads>(sV, v_ptr + static_cast<int64_t>(n_block) * kBlockN * p.v_row_stride,
                                                  p.v_row_stride, seqlen_k - n_block * kBlockN, head_dim, tid);
    cp_async_fence();
    if constexpr (kRope) {  // K[n_block] landed (the barrier above): rotate it before the first ldmatrix
      rope_rotate_tile<kBlockN, kHeadDim, kNThreads>(sK, p.rope, p.rope.table + h * p.rope.head_stride,
                                                     n_block * kBlockN, seqlen_k - n_block * kBlockN, head_dim, tid);
      __syncthreads();
    }

    gemm_ss(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, cp.a, cp.b, cp.thr_a, cp.thr_b);

    // Scale into the log2 domain, then mask keys beyond the sequence (only the last block has any).
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    const int key0 = n_block * kBlockN;
    const bool tail = key0 + kBlockN > seqlen_k;
#pragma unroll
    for (int ni = 0; ni < size<1>(s_rc); ++ni) {
      const bool key_ok = !tail || key0 + get<1>(tScS_rc(0, ni)) < seqlen_k;
#pragma unroll
      for (int mi = 0; mi < kRows; ++mi) {
        s_rc(mi, ni) = key_ok ? s_rc(mi, ni) * scale_log2 : -INFINITY;
      }
    }

    // V[n_block] has landed; every warp is done reading sK, so the next K block may be fetched.
    cp_async_wait<0>();
    __syncthreads();
    if (n_block > 0) {
      const int nb = n_block - 1;
      load_tile_async<kBlockN, kHeadDim, kNThreads>(sK, k_ptr + static_cast<int64_t>(nb) * kBlockN * p.k_row_stride,
                                                    p.k_row_stride, seqlen_k - nb * kBlockN, head_dim, tid);
      cp_async_fence();
    }

    // Online softmax.
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      float mx = row_max[mi];
#pragma unroll
      for (int ni = 0; ni < size<1>(s_rc); ++ni) mx = fmaxf(mx, s_rc(mi, ni));
      mx = quad_max(mx);  // finite: each block has a valid key
      const float alpha = fast_exp2(row_max[mi] - mx);  // 0 on the first block (row_max = -inf)
      row_max[mi] = mx;
      float sum = 0.f;
#pragma unroll
      for (int ni = 0; ni < size<1>(s_rc); ++ni) {
        const float pv = fast_exp2(s_rc(mi, ni) - mx);  // masked keys: 2^-inf = 0
        s_rc(mi, ni) = pv;
        sum += pv;
      }
      row_sum[mi] = row_sum[mi] * alpha + sum;
#pragma unroll
      for (int di = 0; di < size<1>(acc_o_rc); ++di) acc_o_rc(mi, di) *= alpha;
    }

    // acc_o += P · V[n_block]: P (fp32 accumulator) -> element type, re-viewed as the A operand.
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
    gemm_rs(tiled_mma, acc_o, tOrP, tOrVt, tOsVt, cp.bt, cp.thr_bt);
  }

  // Epilogue: finish the row sums, normalise, write LSE and O.
  const int etid = opaque_thread_idx();
  auto ethr_mma = tiled_mma.get_thread_slice(etid);
  Tensor tOcO = ethr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tOcO_rc = make_tensor(tOcO.data(), rowcol(tOcO.layout()));
  float* lse_ptr = p.lse + stats_offset<kVarlen>(p, sc, h, bh) + static_cast<int64_t>(m_block) * kBlockM;
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    const float l = quad_sum(row_sum[mi]);  // >= 1: the max element contributes 2^0
    const float inv_l = 1.f / l;
#pragma unroll
    for (int di = 0; di < size<1>(acc_o_rc); ++di) acc_o_rc(mi, di) *= inv_l;
    // The quad lane holding column 0 writes the row's LSE.
    const int row = get<0>(tOcO_rc(mi, 0));
    if (get<1>(tOcO_rc(mi, 0)) == 0 && row < m_valid) lse_ptr[row] = (row_max[mi] + log2f(l)) * kLn2;
  }

  __syncthreads();  // every warp is done with sQ / sV: reuse sQ as the staging tile of O
  Tensor sO = make_tensor(make_smem_ptr(smem), typename Cfg::SmemLayoutQ{});
  acc_to_smem<kBlockM, kHeadDim, Element>(acc_o, 1.f, sO, tiled_mma, etid);
  __syncthreads();
  Element* o_ptr = static_cast<Element*>(p.o) + seq_offset<kVarlen>(b, p.o_batch_stride, sc, p.o_row_stride) +
                   h * p.o_head_stride + static_cast<int64_t>(m_block) * kBlockM * p.o_row_stride;
  store_tile<kBlockM, kHeadDim, kNThreads>(sO, o_ptr, p.o_row_stride, m_valid, head_dim, etid);
}

// Grid: (query blocks of the longest sequence, B·H); packed, the blocks past a shorter sequence's end exit at once.
template <class Cfg, bool kVarlen, bool kRope>
cudaError_t launch_attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  const int64_t m_blocks = (p.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
  dim3 grid;
  if (!make_attention_grid(m_blocks, p.batch * p.heads, grid)) return cudaErrorInvalidConfiguration;
  auto kernel = attention_fwd_kernel<Cfg, kVarlen, kRope>;
  cudaError_t err = set_smem_limit(kernel, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, Cfg::kNThreads, Cfg::kSmemBytes, stream>>>(p);
  FASTVIT_RETURN_LAUNCH_ERROR();
  return cudaSuccess;
}

// Tile configurations per head-dim bucket (query rows x key rows, warps). Registers per thread are dominated
// by the fp32 accumulators: acc_o = (kBlockM/kNWarps)·D/32 and acc_s = (kBlockM/kNWarps)·kBlockN/32.
//   D = 32  : 128 x 64, 4 warps (each warp 32 query rows): acc_o = 32, acc_s = 64 registers.
//   D = 64  : 128 x 32, 4 warps (each warp 32 query rows): acc_o <= 64, acc_s = 32 registers. 32 rows per warp
//             halve the shared-memory (ldmatrix) traffic per MMA compared with 16; 128 x 64 (acc_s = 64) spilled
//             ~100 bytes on sm_90a because ptxas prefetches all ldmatrix operands of a GEMM at once.
//   D >= 80 : 64 x 64, 4 warps (16 query rows per warp):   acc_o <= 64, acc_s = 32 registers.
// (128-row tiles for D >= 80 would put ~200 registers into accumulators and spill.)
template <typename Element, int kHeadDim>
struct FwdTiles {
  static constexpr int kBlockM = kHeadDim <= 64 ? 128 : 64;
  static constexpr int kBlockN = kHeadDim == 64 ? 32 : 64;
  static constexpr int kNWarps = 4;
  using Cfg = FwdConfig<Element, kHeadDim, kBlockM, kBlockN, kNWarps>;
};

}  // namespace attn

template <typename Element, int kHeadDim, bool kVarlen, bool kRope>
cudaError_t run_attention_fwd_bucket(const AttentionFwdParams& params, cudaStream_t stream) {
  return attn::launch_attention_fwd<typename attn::FwdTiles<Element, kHeadDim>::Cfg, kVarlen, kRope>(params, stream);
}

}  // namespace fastvit
