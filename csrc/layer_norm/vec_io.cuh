// fastvit CUDA C++: scalar / 16-byte vector global loads and stores with fp32 widening and RNE rounding, shared
// by the memory-bound SIMT kernels (LayerNorm, MAE). Element types: float, cutlass::half_t, cutlass::bfloat16_t.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

namespace fastvit {
namespace ln {

// Element <-> bits conversions of the 16-bit types (round-to-nearest-even, as torch's casts and CUTLASS's).
template <typename T>
__device__ __forceinline__ float bits16_to_float(unsigned short b);
template <>
__device__ __forceinline__ float bits16_to_float<cutlass::half_t>(unsigned short b) {
  return __half2float(__ushort_as_half(b));
}
template <>
__device__ __forceinline__ float bits16_to_float<cutlass::bfloat16_t>(unsigned short b) {
  return __uint_as_float(static_cast<unsigned int>(b) << 16);  // bf16 is the top half of an fp32 (exact)
}
template <typename T>
__device__ __forceinline__ unsigned short float_to_bits16(float f);
template <>
__device__ __forceinline__ unsigned short float_to_bits16<cutlass::half_t>(float f) {
  return __half_as_ushort(__float2half_rn(f));
}
template <>
__device__ __forceinline__ unsigned short float_to_bits16<cutlass::bfloat16_t>(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Word k of a 16-byte vector of 16-bit elements holds elements 2k (low half) and 2k + 1 (high half).
template <typename T>
__device__ __forceinline__ void unpack_word(unsigned int w, float& lo, float& hi) {
  lo = bits16_to_float<T>(static_cast<unsigned short>(w & 0xffffu));
  hi = bits16_to_float<T>(static_cast<unsigned short>(w >> 16));
}
template <typename T>
__device__ __forceinline__ unsigned int pack_word(float lo, float hi) {
  return static_cast<unsigned int>(float_to_bits16<T>(lo)) | (static_cast<unsigned int>(float_to_bits16<T>(hi)) << 16);
}

// Load N consecutive T's at p (p aligned to N * sizeof(T)), widened to fp32. N = 1 (scalar path) or
// N = 16 / sizeof(T) (one 16-byte vector). kReadOnly: through the non-coherent read-only cache (__ldg), only
// for data no thread of the kernel writes; otherwise a plain (coherent) load.
template <typename T, int N, bool kReadOnly = true>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  static_assert(N == 1 || N * sizeof(T) == 16, "scalar or 16-byte vectors only");
  if constexpr (std::is_same<T, float>::value) {
    if constexpr (N == 1) {
      out[0] = kReadOnly ? __ldg(p) : *p;
    } else {
      const float4 v = kReadOnly ? __ldg(reinterpret_cast<const float4*>(p)) : *reinterpret_cast<const float4*>(p);
      out[0] = v.x;
      out[1] = v.y;
      out[2] = v.z;
      out[3] = v.w;
    }
  } else {
    static_assert(sizeof(T) == 2, "fp16 / bf16");
    if constexpr (N == 1) {
      const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
      out[0] = bits16_to_float<T>(kReadOnly ? __ldg(q) : *q);
    } else {
      const uint4* q = reinterpret_cast<const uint4*>(p);
      const uint4 v = kReadOnly ? __ldg(q) : *q;
      unpack_word<T>(v.x, out[0], out[1]);
      unpack_word<T>(v.y, out[2], out[3]);
      unpack_word<T>(v.z, out[4], out[5]);
      unpack_word<T>(v.w, out[6], out[7]);
    }
  }
}
template <typename T, int N>
__device__ __forceinline__ void load_ro(const T* p, float (&out)[N]) {
  load_vec<T, N, true>(p, out);
}

// Round N fp32 values to T (round-to-nearest-even) and store them at p (one store instruction).
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  static_assert(N == 1 || N * sizeof(T) == 16, "scalar or 16-byte vectors only");
  if constexpr (std::is_same<T, float>::value) {
    if constexpr (N == 1) {
      *p = in[0];
    } else {
      *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
    }
  } else {
    if constexpr (N == 1) {
      *reinterpret_cast<unsigned short*>(p) = float_to_bits16<T>(in[0]);
    } else {
      *reinterpret_cast<uint4*>(p) = make_uint4(pack_word<T>(in[0], in[1]), pack_word<T>(in[2], in[3]),
                                                pack_word<T>(in[4], in[5]), pack_word<T>(in[6], in[7]));
    }
  }
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {  // v rounded to T and widened back (exact)
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else {
    return bits16_to_float<T>(float_to_bits16<T>(v));
  }
}

}  // namespace ln
}  // namespace fastvit
