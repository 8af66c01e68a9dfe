// Host-side check of the CuTe layout algebra of the CUDA attention kernels (csrc/attention/), run by
// tests/test_cuda_layouts.py on a machine without a GPU: CuTe layouts are plain host-evaluable functions, so every
// thread's partition of every tile the kernels use can be enumerated here. Checks, per TiledMMA and tile shape:
//   * the accumulator -> A-operand re-layout (P·V, Pᵀ·dO, dSᵀ·Q, dS·K reuse C fragments as A) matches the MMA's own
//     A partition element for element;
//   * the (row, col) view of a C fragment has rows that depend on the row index only and columns on the column
//     index only (the online-softmax reductions rely on it);
//   * the 4 lanes of a quad share their rows and only lane % 4 == 0 holds column 0 (it writes the LSE);
//   * every tile element is owned by exactly one thread;
// and that the transposed shared-memory views map (d, r) to (r, d) inside their allocation.
// Exit status: 0 when every check passes.
#include <cstdio>
#include <cstring>

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
    if (size(conv) != size(tAc)) { printf("%s size mismatch\n", name); return 1; }
    if (!(shape(conv) == shape(tAc))) { printf("%s: shape mismatch\n", name); print(shape(conv)); print(shape(tAc)); printf("\n"); }
    for (int i = 0; i < size(conv); ++i) {
      if (!(conv(i) == tAc(i))) { if (bad < 5) { printf("%s tid %d i %d: C->A ", name, tid, i); print(conv(i)); print(tAc(i)); printf("\n"); } ++bad; }
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
    for (int mi = 0; mi < size<0>(rc); ++mi) if (get<0>(rc0(mi, 0)) != get<0>(rc(mi, 0))) ++bad;
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
  for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) if (cnt[m][n] != 1) ++bad;
  printf("%-40s M=%d N=%d: %s (%d bad)\n", name, M, N, bad ? "FAIL" : "ok", bad);
  return bad;
}

template <int R, int D>
int check_transpose() {
  auto L = make_smem_tile_layout<R, D>();
  auto T = transposed<R, D>(L);
  int bad = 0;
  for (int r = 0; r < R; ++r) for (int d = 0; d < D; ++d) if (T(d, r) != L(r, d)) ++bad;
  if (cosize(L) > smem_tile_elems<R, D>()) ++bad;
  printf("transpose R=%d D=%d: %s cosize %d alloc %d\n", R, D, bad ? "FAIL" : "ok", int(cosize(L)), smem_tile_elems<R, D>());
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
  bad += check_transpose<64, 80>() + check_transpose<128, 32>() + check_transpose<32, 128>() + check_transpose<64, 96>();
  printf("fwd smem: 32:%d 64:%d 80:%d 96:%d 128:%d\n", FwdTiles<cutlass::half_t,32>::Cfg::kSmemBytes, FwdTiles<cutlass::half_t,64>::Cfg::kSmemBytes,
    FwdTiles<cutlass::half_t,80>::Cfg::kSmemBytes, FwdTiles<cutlass::half_t,96>::Cfg::kSmemBytes, FwdTiles<cutlass::half_t,128>::Cfg::kSmemBytes);
  printf("dkdv smem: 32:%d 64:%d 80:%d 96:%d 128:%d\n", BwdTiles<cutlass::half_t,32>::Dkdv::kSmemBytes, BwdTiles<cutlass::half_t,64>::Dkdv::kSmemBytes,
    BwdTiles<cutlass::half_t,80>::Dkdv::kSmemBytes, BwdTiles<cutlass::half_t,96>::Dkdv::kSmemBytes, BwdTiles<cutlass::half_t,128>::Dkdv::kSmemBytes);
  printf("dq smem: 32:%d 64:%d 80:%d 96:%d 128:%d\n", BwdTiles<cutlass::half_t,32>::Dq::kSmemBytes, BwdTiles<cutlass::half_t,64>::Dq::kSmemBytes,
    BwdTiles<cutlass::half_t,80>::Dq::kSmemBytes, BwdTiles<cutlass::half_t,96>::Dq::kSmemBytes, BwdTiles<cutlass::half_t,128>::Dq::kSmemBytes);
  printf(bad ? "FAILED\n" : "ALL OK\n");
  return bad != 0;
}
