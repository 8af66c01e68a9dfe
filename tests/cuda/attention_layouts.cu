// Host-side check of the CuTe layout algebra of the CUDA attention kernels (csrc/attention/), run by
// tests/test_cuda_build.py on a machine without a GPU: CuTe layouts are plain host-evaluable functions, so every
// thread's partition of every tile the kernels use can be enumerated here. Checks, per TiledMMA and tile shape:
//   * the accumulator -> A-operand re-layout (P·V, Pᵀ·dO, dSᵀ·Q, dS·K reuse C fragments as A) matches the MMA's own
//     A partition element for element;
//   * the (row, col) view of a C fragment has rows that depend on the row index only and columns on the column
//     index only (the online-softmax reductions rely on it);
//   * the 4 lanes of a quad share their rows and only lane % 4 == 0 holds column 0 (it writes the LSE);
//   * every tile element is owned by exactly one thread;
// that the transposed shared-memory views map (d, r) to (r, d) inside their allocation; that CuTe's m16n8k16
// fragments match the PTX register layout; and, with ldmatrix (plain and .trans) emulated per the PTX semantics,
// that every shared->register operand copy of the three kernels of every head-dim bucket delivers to each
// fragment element exactly the shared element the MMA's partition expects.
// Exit status: 0 when every check passes.
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention/attention_fwd.cuh"
#include "attention/attention_bwd.cuh"
using namespace cute;
using namespace fastvit::attn;

template <class Tiled, int M, int N>
int check_c_to_a(const char* name) {
  Tiled tiled_mma;
  int bad = 0;
  for (int tid = 0; tid < size(tiled_mma); ++tid) {
    auto thr = tiled_mma.get_thread_slice(tid);
    auto tCc = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto tAc = thr.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));  // A is (M x K=N)
    auto conv = make_tensor(tCc.data(), acc_to_a_layout(tCc.layout()));
    if (size(conv) != size(tAc)) {
      printf("%s size mismatch\n", name);
      return 1;
    }
    if (!(shape(conv) == shape(tAc))) {
      printf("%s: shape mismatch\n", name);
      print(shape(conv));
      print(shape(tAc));
      printf("\n");
    }
    for (int i = 0; i < size(conv); ++i) {
      if (!(conv(i) == tAc(i))) {
        if (bad < 5) {
          printf("%s tid %d i %d: C->A ", name, tid, i);
          print(conv(i));
          print(tAc(i));
          printf("\n");
        }
        ++bad;
      }
    }
    // rowcol: rows depend on mi only, cols on ni only
    auto rc = make_tensor(tCc.data(), rowcol(tCc.layout()));
    for (int mi = 0; mi < size<0>(rc); ++mi)
      for (int ni = 0; ni < size<1>(rc); ++ni) {
        if (get<0>(rc(mi, ni)) != get<0>(rc(mi, 0)) || get<1>(rc(mi, ni)) != get<1>(rc(0, ni))) ++bad;
      }
    // quad sharing: lanes with same lane/4 in the same warp own the same rows; the 4 lanes together own all N cols
    int lane = tid % 32;
    auto thr0 = tiled_mma.get_thread_slice(tid - lane % 4);
    auto rc0 = make_tensor(thr0.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{})).data(), rc.layout());
    for (int mi = 0; mi < size<0>(rc); ++mi)
      if (get<0>(rc0(mi, 0)) != get<0>(rc(mi, 0))) ++bad;
    // column 0 holder: exactly lane%4==0
    bool has0 = get<1>(rc(0, 0)) == 0;
    if (has0 != (lane % 4 == 0)) ++bad;
  }
  // every (m, n) covered exactly once across threads
  static int cnt[256][256];
  memset(cnt, 0, sizeof(cnt));
  for (int tid = 0; tid < size(tiled_mma); ++tid) {
    auto thr = tiled_mma.get_thread_slice(tid);
    auto tCc = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    for (int i = 0; i < size(tCc); ++i) cnt[get<0>(tCc(i))][get<1>(tCc(i))]++;
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n)
      if (cnt[m][n] != 1) ++bad;
  printf("%-40s M=%d N=%d: %s (%d bad)\n", name, M, N, bad ? "FAIL" : "ok", bad);
  return bad;
}

template <int R, int D>
int check_transpose() {
  auto L = make_smem_tile_layout<R, D>();
  auto T = transposed<R, D>(L);
  int bad = 0;
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d)
      if (T(d, r) != L(r, d)) ++bad;
  if (cosize(L) > smem_tile_elems<R, D>()) ++bad;
  printf("transpose R=%d D=%d: %s cosize %d alloc %d\n", R, D, bad ? "FAIL" : "ok", int(cosize(L)),
         smem_tile_elems<R, D>());
  return bad;
}

// ------------------------------------------------------------------------------------------------ ldmatrix
// Host emulation of the warp-wide ldmatrix.sync.aligned.x4[.trans].m8n8.b16 (PTX ISA semantics, not CuTe's model of
// it): lane l supplies the address of row l % 8 of matrix l / 8; destination register j of lane l receives, from
// matrix j, elements (row l/4, cols 2(l%4), 2(l%4)+1) -- or, transposed, (rows 2(l%4), 2(l%4)+1, col l/4).
static void ldsm_x4(const cutlass::bfloat16_t* mem, const long addr[32], bool trans, uint32_t out[32][4]) {
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) {
      uint32_t lo, hi;
      if (!trans) {
        lo = mem[addr[8 * j + l / 4] + 2 * (l % 4)].raw();
        hi = mem[addr[8 * j + l / 4] + 2 * (l % 4) + 1].raw();
      } else {
        lo = mem[addr[8 * j + 2 * (l % 4)] + l / 4].raw();
        hi = mem[addr[8 * j + 2 * (l % 4) + 1] + l / 4].raw();
      }
      out[l][j] = lo | (hi << 16);
    }
}

// Runs the kernels' shared->register copies of one GEMM operand exactly as gemm_ss / gemm_rs issue them (the
// tiled copy's partition_S of the shared view `view`, retile_D of the fragment sized by `shape_l`), with every
// ldmatrix emulated per the PTX semantics on a shared tile whose element at offset i holds the value i. Then
// every fragment element must hold the offset of the element the MMA's own partition (partition_A / _B of an
// identity tensor over the view's shape) says it is -- i.e. view(coordinate). This checks the transposed
// (SM75_U16x8_LDSM_T) B operands of P·V, Pᵀ·dO, dSᵀ·Q, dS·K against the hardware, not against CuTe's traits.
template <bool kIsA, bool kTrans, class TiledMma, class CopyAtom, class ViewLayout, class ShapeLayout>
int check_ldsm(const char* name, ViewLayout view, ShapeLayout shape_l) {
  using E = cutlass::bfloat16_t;
  TiledMma tiled_mma;
  const int n = cosize(view);
  std::vector<E> mem(n);
  for (int i = 0; i < n; ++i) mem[i] = E::bitcast(static_cast<uint16_t>(i));
  Tensor s = make_tensor(make_smem_ptr(mem.data()), view);
  Tensor s_shape = make_tensor(make_smem_ptr(mem.data()), shape_l);
  auto copy = [&] {
    if constexpr (kIsA)
      return make_tiled_copy_A(CopyAtom{}, tiled_mma);
    else
      return make_tiled_copy_B(CopyAtom{}, tiled_mma);
  }();
  auto frag_of = [&](int tid) {
    auto thr = tiled_mma.get_thread_slice(tid);
    if constexpr (kIsA)
      return thr.partition_fragment_A(s_shape);
    else
      return thr.partition_fragment_B(s_shape);
  };
  using Frag = decltype(frag_of(0));
  int bad = 0;
  const int nthreads = size(tiled_mma);
  for (int w = 0; w < nthreads / 32; ++w) {
    std::vector<Frag> frags;
    for (int l = 0; l < 32; ++l) {
      frags.push_back(frag_of(32 * w + l));
      for (int v = 0; v < size(frags[l]); ++v) frags[l](v) = E::bitcast(0xffff);
    }
    constexpr int kSteps = decltype(size<2>(Frag{}))::value;
    auto src0 = copy.get_thread_slice(0).partition_S(s);
    constexpr int kCopies = decltype(size<1>(src0))::value;
    static_assert(decltype(size<2>(src0))::value == kSteps, "k steps");
    for (int k = 0; k < kSteps; ++k)
      for (int i = 0; i < kCopies; ++i) {
        long addr[32];
        for (int l = 0; l < 32; ++l) {
          auto src = copy.get_thread_slice(32 * w + l).partition_S(s);
          auto sv = src(_, i, k);
          addr[l] = &sv(0) - mem.data();
          if (size(sv) != 8 || addr[l] % 8 != 0 || addr[l] < 0 || addr[l] + 8 > n) {
            ++bad;
            addr[l] = 0;
          }
          for (int e = 0; e < size(sv); ++e)
            if (&sv(e) != &sv(0) + e) ++bad;  // one 16-byte row per lane
        }
        uint32_t out[32][4];
        ldsm_x4(mem.data(), addr, kTrans, out);
        for (int l = 0; l < 32; ++l) {
          auto dst = copy.get_thread_slice(32 * w + l).retile_D(frags[l]);
          auto dv = recast<uint32_t>(dst(_, i, k));
          if (size(dv) != 4) {
            ++bad;
            continue;
          }
          for (int j = 0; j < 4; ++j) dv(j) = out[l][j];
        }
      }
    for (int l = 0; l < 32; ++l) {
      auto thr = tiled_mma.get_thread_slice(32 * w + l);
      auto id = [&] {
        if constexpr (kIsA)
          return thr.partition_A(make_identity_tensor(shape(view)));
        else
          return thr.partition_B(make_identity_tensor(shape(view)));
      }();
      for (int v = 0; v < size(frags[l]); ++v) {
        const int expect = view(id(v));
        const int got = frags[l](v).raw();
        if (got != expect) {
          if (bad < 3) {
            printf("%s: warp %d lane %d v %d: got offset %d, expected %d at ", name, w, l, v, got, expect);
            print(id(v));
            printf("\n");
          }
          ++bad;
        }
      }
    }
  }
  printf("%-40s: %s (%d bad)\n", name, bad ? "FAIL" : "ok", bad);
  return bad;
}

// The m16n8k16 fragments of CuTe's TiledMMA against the PTX ISA's register layout, per lane l (g = l/4, t = l%4),
// value v in register v/2, half v%2:  A: a0 (g, 2t+h), a1 (g+8, 2t+h), a2 (g, 2t+8+h), a3 (g+8, 2t+8+h);
// B (n, k): b0 (g, 2t+h), b1 (g, 2t+8+h);  C (fp32, one value per register): (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
// Checked relative to each atom's origin (the same for all lanes of a warp).
template <class TiledMma>
int check_mma_atom() {
  TiledMma tiled_mma;
  int bad = 0;
  for (int tid = 0; tid < size(tiled_mma); ++tid) {
    const int l = tid % 32, g = l / 4, t = l % 4;
    auto thr = tiled_mma.get_thread_slice(tid);
    auto thr0 = tiled_mma.get_thread_slice(tid - l);
    auto a = thr.partition_A(make_identity_tensor(Shape<_64, _32>{}));
    auto a0 = thr0.partition_A(make_identity_tensor(Shape<_64, _32>{}));
    for (int m = 0; m < size<1>(a); ++m)
      for (int k = 0; k < size<2>(a); ++k)
        for (int v = 0; v < 8; ++v) {
          const int r = v / 2, h = v % 2;
          const int er = g + (r % 2) * 8, ec = 2 * t + h + (r / 2) * 8;
          if (get<0>(a(v, m, k)) - get<0>(a0(0, m, k)) != er || get<1>(a(v, m, k)) - get<1>(a0(0, m, k)) != ec - 0)
            ++bad;
        }
    auto b = thr.partition_B(make_identity_tensor(Shape<_32, _32>{}));
    auto b0 = thr0.partition_B(make_identity_tensor(Shape<_32, _32>{}));
    for (int n = 0; n < size<1>(b); ++n)
      for (int k = 0; k < size<2>(b); ++k)
        for (int v = 0; v < 4; ++v) {
          const int r = v / 2, h = v % 2;
          if (get<0>(b(v, n, k)) - get<0>(b0(0, n, k)) != g ||
              get<1>(b(v, n, k)) - get<1>(b0(0, n, k)) != 2 * t + h + 8 * r)
            ++bad;
        }
    auto c = thr.partition_C(make_identity_tensor(Shape<_64, _32>{}));
    auto c0 = thr0.partition_C(make_identity_tensor(Shape<_64, _32>{}));
    for (int m = 0; m < size<1>(c); ++m)
      for (int n = 0; n < size<2>(c); ++n)
        for (int v = 0; v < 4; ++v) {
          if (get<0>(c(v, m, n)) - get<0>(c0(0, m, n)) != g + 8 * (v / 2) ||
              get<1>(c(v, m, n)) - get<1>(c0(0, m, n)) != 2 * t + v % 2)
            ++bad;
        }
    // a0(0, m, k) is lane 0's (g = 0, t = 0) first value: the atom origin must be a multiple of (16, 16) / (8, 16) / (16, 8).
    if (get<0>(a0(0, 0, 0)) % 16 || get<1>(a0(0, 0, 0)) % 16 || get<0>(b0(0, 0, 0)) % 8 || get<0>(c0(0, 0, 0)) % 16)
      ++bad;
  }
  printf("%-40s: %s (%d bad)\n", "mma atom vs PTX fragment layout", bad ? "FAIL" : "ok", bad);
  return bad;
}

// Every shared->register operand copy of the three kernels of one head-dim bucket.
template <int D>
int check_ldsm_bucket() {
  using E = cutlass::bfloat16_t;
  using F = typename FwdTiles<E, D>::Cfg;
  using K = typename BwdTiles<E, D>::Dkdv;
  using Q = typename BwdTiles<E, D>::Dq;
  char buf[96];
  int bad = 0;
  using N = typename F::SmemCopyAtom;
  using T = typename F::SmemCopyAtomT;
  snprintf(buf, sizeof buf, "ldsm fwd D=%d Q (A)", D);
  bad += check_ldsm<true, false, typename F::TiledMma, N>(buf, typename F::SmemLayoutQ{}, typename F::SmemLayoutQ{});
  snprintf(buf, sizeof buf, "ldsm fwd D=%d K (B)", D);
  bad += check_ldsm<false, false, typename F::TiledMma, N>(buf, typename F::SmemLayoutKV{}, typename F::SmemLayoutKV{});
  snprintf(buf, sizeof buf, "ldsm fwd D=%d Vt (B, trans)", D);
  bad += check_ldsm<false, true, typename F::TiledMma, T>(buf, transposed<F::kBlockN, D>(typename F::SmemLayoutKV{}),
                                                          make_layout(Shape<Int<D>, Int<F::kBlockN>>{}));
  snprintf(buf, sizeof buf, "ldsm dkdv D=%d K/V (A)", D);
  bad += check_ldsm<true, false, typename K::TiledMma, N>(buf, typename K::SmemLayoutKV{}, typename K::SmemLayoutKV{});
  snprintf(buf, sizeof buf, "ldsm dkdv D=%d Q/dO (B)", D);
  bad += check_ldsm<false, false, typename K::TiledMma, N>(buf, typename K::SmemLayoutQ{}, typename K::SmemLayoutQ{});
  snprintf(buf, sizeof buf, "ldsm dkdv D=%d Qt/dOt (B, trans)", D);
  bad += check_ldsm<false, true, typename K::TiledMma, T>(buf, transposed<K::kBlockM, D>(typename K::SmemLayoutQ{}),
                                                          make_layout(Shape<Int<D>, Int<K::kBlockM>>{}));
  snprintf(buf, sizeof buf, "ldsm dq D=%d Q/dO (A)", D);
  bad += check_ldsm<true, false, typename Q::TiledMma, N>(buf, typename Q::SmemLayoutQ{}, typename Q::SmemLayoutQ{});
  snprintf(buf, sizeof buf, "ldsm dq D=%d K/V (B)", D);
  bad += check_ldsm<false, false, typename Q::TiledMma, N>(buf, typename Q::SmemLayoutKV{}, typename Q::SmemLayoutKV{});
  snprintf(buf, sizeof buf, "ldsm dq D=%d Kt (B, trans)", D);
  bad += check_ldsm<false, true, typename Q::TiledMma, T>(buf, transposed<Q::kBlockN, D>(typename Q::SmemLayoutKV{}),
                                                          make_layout(Shape<Int<D>, Int<Q::kBlockN>>{}));
  return bad;
}

int main() {
  int bad = 0;
  using T4 = MmaTraits<cutlass::bfloat16_t, 64, 4>::TiledMma;
  using T8 = MmaTraits<cutlass::half_t, 64, 8>::TiledMma;
  bad += check_c_to_a<T4, 128, 32>("fwd 4 warps S 128x32");
  bad += check_c_to_a<T4, 128, 64>("fwd 4 warps S 128x64");
  bad += check_c_to_a<T4, 64, 64>("4 warps 64x64");
  bad += check_c_to_a<T4, 64, 32>("4 warps 64x32");
  bad += check_c_to_a<T8, 128, 64>("8 warps 128x64");
  bad += check_c_to_a<T8, 128, 32>("8 warps 128x32");
  bad += check_c_to_a<T4, 64, 96>("4 warps 64x96");
  bad += check_c_to_a<T4, 64, 128>("4 warps 64x128");
  bad += check_c_to_a<T4, 128, 64>("4 warps 128x64");
  bad += check_c_to_a<T8, 128, 96>("8 warps 128x96");
  bad += check_c_to_a<T8, 128, 128>("8 warps 128x128");
  bad += check_c_to_a<T4, 64, 80>("4 warps 64x80");     // acc_o / acc_dq of bucket 80
  bad += check_c_to_a<T8, 128, 80>("8 warps 128x80");   // acc_dk / acc_dv of bucket 80
  bad += check_mma_atom<T4>() + check_mma_atom<T8>();
  bad += check_ldsm_bucket<32>() + check_ldsm_bucket<64>() + check_ldsm_bucket<80>() + check_ldsm_bucket<96>() +
         check_ldsm_bucket<128>();
  bad +=
      check_transpose<64, 80>() + check_transpose<128, 32>() + check_transpose<32, 128>() + check_transpose<64, 96>();
  printf("fwd smem: 32:%d 64:%d 80:%d 96:%d 128:%d\n", FwdTiles<cutlass::half_t, 32>::Cfg::kSmemBytes,
         FwdTiles<cutlass::half_t, 64>::Cfg::kSmemBytes, FwdTiles<cutlass::half_t, 80>::Cfg::kSmemBytes,
         FwdTiles<cutlass::half_t, 96>::Cfg::kSmemBytes, FwdTiles<cutlass::half_t, 128>::Cfg::kSmemBytes);
  printf("dkdv smem: 32:%d 64:%d 80:%d 96:%d 128:%d\n", BwdTiles<cutlass::half_t, 32>::Dkdv::kSmemBytes,
         BwdTiles<cutlass::half_t, 64>::Dkdv::kSmemBytes, BwdTiles<cutlass::half_t, 80>::Dkdv::kSmemBytes,
         BwdTiles<cutlass::half_t, 96>::Dkdv::kSmemBytes, BwdTiles<cutlass::half_t, 128>::Dkdv::kSmemBytes);
  printf("dq smem: 32:%d 64:%d 80:%d 96:%d 128:%d\n", BwdTiles<cutlass::half_t, 32>::Dq::kSmemBytes,
         BwdTiles<cutlass::half_t, 64>::Dq::kSmemBytes, BwdTiles<cutlass::half_t, 80>::Dq::kSmemBytes,
         BwdTiles<cutlass::half_t, 96>::Dq::kSmemBytes, BwdTiles<cutlass::half_t, 128>::Dq::kSmemBytes);
  printf(bad ? "FAILED\n" : "ALL OK\n");
  return bad != 0;
}
