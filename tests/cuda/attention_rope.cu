// Runs the attention kernels' rotary helpers (attention_kernel_utils.cuh: rope_rotate_tile, rope_store_tile_back) on
// the host, thread by thread as a CTA would, on padded tiles laid out as in shared memory, and compares them with the
// rotation written out directly (timm's apply_rot_embed_cat: x·cos + rot(x)·sin, per column of the table) and with its
// transpose. Covers both column layouts, head dims that fill their bucket and ones that do not (72 in bucket 80, whose
// half-layout pairs (j, j + 36) start mid-chunk; 104 in 128), prefix tokens, positions past the table's rows, rows
// past the tile's valid rows and columns past the head dim (which must stay untouched). Compiled and run by
// tests/test_cuda_build.py; prints "ALL OK" when every check passes.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "attention/attention_kernel_utils.cuh"

using namespace fastvit;
using namespace fastvit::attn;
using Elem = cutlass::bfloat16_t;

namespace {

int failures = 0;

void fail(const char* what, int head_dim, bool half, int npt, int r, int c, double got, double want) {
  if (failures++ < 20)
    std::printf("FAIL %s D=%d half=%d prefix=%d row=%d col=%d: got %g want %g\n", what, head_dim, int(half), npt, r, c,
                got, want);
}

bool close(double got, double want, double rel) { return std::fabs(got - want) <= rel * (std::fabs(want) + 1e-3); }

// A timm table of `rows` rows for head dim D: one random angle per rotation pair, in both of its columns.
std::vector<float4> make_table(int rows, int D, bool half, std::mt19937& rng) {
  std::vector<float4> storage((static_cast<size_t>(rows) * 2 * D + 3) / 4 + 1);
  float* t = reinterpret_cast<float*>(storage.data());
  std::uniform_real_distribution<float> angle(-3.f, 3.f);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < D / 2; ++i) {
      const float th = angle(rng);
      const int a = half ? i : 2 * i, b = half ? i + D / 2 : 2 * i + 1;
      t[r * 2 * D + a] = t[r * 2 * D + b] = std::sin(th);
      t[r * 2 * D + D + a] = t[r * 2 * D + D + b] = std::cos(th);
    }
  }
  return storage;
}

// Partner column of column c and whether c is the first of its pair.
void pair_of(int c, int D, bool half, int& partner, bool& first) {
  if (half) {
    first = c < D / 2;
    partner = first ? c + D / 2 : c - D / 2;
  } else {
    first = c % 2 == 0;
    partner = first ? c + 1 : c - 1;
  }
}

template <int kRows, int kCols, int kThreads>
void check(int D, bool half, int npt, int pos0, int rows_valid, int table_rows, std::mt19937& rng) {
  constexpr int kPitch = SmemTileShape<kCols>::kPitch;
  auto layout = make_smem_tile_layout<kRows, kCols>();
  std::vector<float4> table_storage = make_table(table_rows, D, half, rng);
  const float* table = reinterpret_cast<const float*>(table_storage.data());
  AttentionRopeParams rope;
  rope.table = table;
  rope.row_stride = 2 * D;
  rope.rows = table_rows;
  rope.num_prefix = npt;
  rope.rotate_half = half;
  std::normal_distribution<float> normal;
  auto sc = [&](int r, int c, int cs) {  // table value (cs = 0: sin, 1: cos) of row r's token at column c, or identity
    const int t = pos0 + r - npt;
    if (t < 0 || t >= table_rows) return cs ? 1.0 : 0.0;
    return static_cast<double>(table[t * 2 * D + cs * D + c]);
  };

  // 1. rotation in place of an element tile (the loads of q and k)
  std::vector<float4> tile_storage((kRows * kPitch * sizeof(Elem) + 15) / 16);
  Elem* tile = reinterpret_cast<Elem*>(tile_storage.data());
  for (int i = 0; i < kRows * kPitch; ++i) tile[i] = Elem(0.f);
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < D; ++c) tile[r * kPitch + c] = Elem(normal(rng));
  std::vector<Elem> before(tile, tile + kRows * kPitch);
  auto s = make_tensor(tile, layout);
  for (int tid = 0; tid < kThreads; ++tid)
    rope_rotate_tile<kRows, kCols, kThreads>(s, rope, table, pos0, rows_valid, D, tid);
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kPitch; ++c) {
      const double got = static_cast<float>(tile[r * kPitch + c]);
      const double x = static_cast<float>(before[r * kPitch + c]);
      if (r >= rows_valid || c >= D) {
        if (std::memcmp(&tile[r * kPitch + c], &before[r * kPitch + c], sizeof(Elem)) != 0)
          fail("rotate touched", D, half, npt, r, c, got, x);
        continue;
      }
      int p;
      bool first;
      pair_of(c, D, half, p, first);
      const double xp = static_cast<float>(before[r * kPitch + p]);
      const double want = first ? x * sc(r, c, 1) - xp * sc(r, c, 0) : x * sc(r, c, 1) + xp * sc(r, c, 0);
      if (!close(got, want, 1.0 / 128)) fail("rotate", D, half, npt, r, c, got, want);
    }
  }

  // 2. the transpose rotation of an fp32 tile (dq, dk) stored to a strided global tile
  std::vector<float4> f_storage(kRows * kPitch / 4 + 1);
  float* f = reinterpret_cast<float*>(f_storage.data());
  for (int i = 0; i < kRows * kPitch; ++i) f[i] = normal(rng);
  const int64_t row_stride = 3 * kCols + 8;  // a packed dqkv row: other heads' columns around this one
  std::vector<float4> g_storage((kRows * row_stride * sizeof(Elem) + 15) / 16 + 1);
  Elem* g = reinterpret_cast<Elem*>(g_storage.data());
  const Elem sentinel(12345.f);
  for (int64_t i = 0; i < kRows * row_stride; ++i) g[i] = sentinel;
  auto sf = make_tensor(f, layout);
  for (int tid = 0; tid < kThreads; ++tid)
    rope_store_tile_back<kRows, kCols, kThreads>(sf, g, row_stride, rope, table, pos0, rows_valid, D, tid);
  for (int r = 0; r < kRows; ++r) {
    for (int64_t c = 0; c < row_stride; ++c) {
      const double got = static_cast<float>(g[r * row_stride + c]);
      if (r >= rows_valid || c >= D) {
        if (std::memcmp(&g[r * row_stride + c], &sentinel, sizeof(Elem)) != 0)
          fail("store touched", D, half, npt, r, int(c), got, 12345.0);
        continue;
      }
      int p;
      bool first;
      pair_of(int(c), D, half, p, first);
      const double y = f[r * kPitch + c], yp = f[r * kPitch + p];
      // the transpose of [[c_a, -s_a], [s_b, c_b]] on (a, b): dx_a = dy_a c_a + dy_b s_b, dx_b = dy_b c_b - dy_a s_a
      const double want = first ? y * sc(r, int(c), 1) + yp * sc(r, p, 0) : y * sc(r, int(c), 1) - yp * sc(r, p, 0);
      if (!close(got, want, 1.0 / 128)) fail("store back", D, half, npt, r, int(c), got, want);
    }
  }
}

template <int kRows, int kCols, int kThreads>
void check_all(int D, std::mt19937& rng) {
  for (bool half : {true, false}) {
    check<kRows, kCols, kThreads>(D, half, 0, 0, kRows, kRows, rng);  // a full tile, every row rotated
    check<kRows, kCols, kThreads>(D, half, 1, 0, kRows, kRows - 1, rng);  // cls token, table just long enough
    check<kRows, kCols, kThreads>(D, half, 5, 0, 13, 8, rng);  // 5 prefix tokens, a tail, a short table
    check<kRows, kCols, kThreads>(D, half, 1, kRows, kRows / 2 + 3, kRows + 10, rng);  // the second block of a row
  }
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  check_all<64, 64, 128>(64, rng);  // forward K block / dQ tiles of bucket 64
  check_all<64, 64, 128>(48, rng);  // 48 in bucket 64: half pairs (j, j + 24)
  check_all<64, 80, 128>(80, rng);  // bucket 80
  check_all<64, 80, 128>(72, rng);  // 72 in bucket 80: half pairs (j, j + 36), segments start mid-chunk
  check_all<128, 128, 256>(104, rng);  // dK/dV tile of bucket 128 (8 warps), D = 104
  check_all<32, 32, 128>(32, rng);  // bucket 32
  if (failures) {
    std::printf("%d FAIL\n", failures);
    return 1;
  }
  std::printf("ALL OK\n");
  return 0;
}
