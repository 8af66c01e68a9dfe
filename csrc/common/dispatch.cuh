// Switch macros turning run-time dtype / head-dim values into compile-time template arguments
// (docs/ARCHITECTURE.md, "Style"). Device element types are CUTLASS's (cutlass::half_t, cutlass::bfloat16_t), which
// share their bit layout with at::Half / at::BFloat16 and with CuTe's MMA atoms.
#pragma once

#include <cutlass/numeric_types.h>

#include "common/common.h"

// One case of the switches below: when DTYPE is ::fastvit::DType::KIND, return __VA_ARGS__() with T = TYPE.
#define FASTVIT_DTYPE_CASE(DTYPE, KIND, TYPE, T, ...) \
  if ((DTYPE) == ::fastvit::DType::KIND) {            \
    using T = TYPE;                                   \
    return __VA_ARGS__();                             \
  }

// The fp16 / bf16 cases; in a minimal build only bf16 is compiled.
#ifdef FASTVIT_MINIMAL_BUILD
#define FASTVIT_HALF_CASES(DTYPE, T, ...) FASTVIT_DTYPE_CASE(DTYPE, kBFloat16, cutlass::bfloat16_t, T, __VA_ARGS__)
#else
#define FASTVIT_HALF_CASES(DTYPE, T, ...)                              \
  FASTVIT_DTYPE_CASE(DTYPE, kFloat16, cutlass::half_t, T, __VA_ARGS__) \
  FASTVIT_DTYPE_CASE(DTYPE, kBFloat16, cutlass::bfloat16_t, T, __VA_ARGS__)
#endif

// FASTVIT_HALF_SWITCH(dtype, T, ...): T = cutlass::half_t | cutlass::bfloat16_t; other dtypes
// return cudaErrorNotSupported from the enclosing launcher. In a minimal build only bf16 is compiled.
#define FASTVIT_HALF_SWITCH(DTYPE, T, ...)    \
  [&]() -> cudaError_t {                      \
    FASTVIT_HALF_CASES(DTYPE, T, __VA_ARGS__) \
    return cudaErrorNotSupported;             \
  }()

// FASTVIT_FLOAT_SWITCH(dtype, T, ...): all three dtypes (T = cutlass::half_t | cutlass::bfloat16_t |
// float), in every build. Used by the memory-bound SIMT kernels (LayerNorm, MAE), which are cheap to instantiate.
#define FASTVIT_FLOAT_SWITCH(DTYPE, T, ...)                                   \
  [&]() -> cudaError_t {                                                      \
    FASTVIT_DTYPE_CASE(DTYPE, kFloat16, cutlass::half_t, T, __VA_ARGS__)      \
    FASTVIT_DTYPE_CASE(DTYPE, kBFloat16, cutlass::bfloat16_t, T, __VA_ARGS__) \
    FASTVIT_DTYPE_CASE(DTYPE, kFloat32, float, T, __VA_ARGS__)                \
    return cudaErrorNotSupported;                                             \
  }()
