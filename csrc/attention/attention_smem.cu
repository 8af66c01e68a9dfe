// Shared memory of the attention backward kernels per head-dim bucket, read from their tile configs
// (attn::BwdTiles in attention_bwd.cuh) at compile time, for build_info() and for Python's dispatch (which must
// decline a bucket on a GPU whose per-block limit is smaller). No kernel is instantiated here.
#include <utility>

#include "attention/attention.h"
#include "attention/attention_bwd.cuh"

namespace fastvit {

namespace {

template <typename Element, int kHeadDim>
constexpr int bwd_smem_bytes() {
  using Tiles = attn::BwdTiles<Element, kHeadDim>;
  return Tiles::Dkdv::kSmemBytes > Tiles::Dq::kSmemBytes ? Tiles::Dkdv::kSmemBytes : Tiles::Dq::kSmemBytes;
}

template <int kHeadDim>
constexpr int bwd_smem_bytes() {
  constexpr int bytes = bwd_smem_bytes<cutlass::bfloat16_t, kHeadDim>();
  static_assert(bytes == bwd_smem_bytes<cutlass::half_t, kHeadDim>(), "fp16 and bf16 tiles take the same bytes");
  return bytes;
}

template <std::size_t... I>
int bwd_smem_bytes_of(int bucket, std::index_sequence<I...>) {
  int bytes = 0;
  ((bucket == kAttentionHeadDimBuckets[I] ? (bytes = bwd_smem_bytes<kAttentionHeadDimBuckets[I]>()) : 0), ...);
  return bytes;
}

}  // namespace

int attention_bwd_smem_bytes(int bucket) {
  return bwd_smem_bytes_of(bucket, std::make_index_sequence<kAttentionNumHeadDimBuckets>{});
}

}  // namespace fastvit
