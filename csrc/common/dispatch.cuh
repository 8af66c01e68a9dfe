// Switch macros turning run-time dtype / head-dim values into compile-time template arguments
// (DESIGN.md, Style). Device element types are CUTLASS's (cutlass::half_t, cutlass::bfloat16_t), which
// share their bit layout with at::Half / at::BFloat16 and with CuTe's MMA atoms.
#pragma once

#include <cutlass/numeric_types.h>

#include "common/common.h"

// FASTVIT_HALF_SWITCH(dtype, T, ...): T = cutlass::half_t | cutlass::bfloat16_t; other dtypes
// return cudaErrorNotSupported from the enclosing launcher. In a minimal build only bf16 is compiled.
#ifdef FASTVIT_MINIMAL_BUILD
#define FASTVIT_HALF_SWITCH(DTYPE, T, ...)                         \
  [&]() -> cudaError_t {                                           \
    if ((DTYPE) == ::fastvit::DType::kBFloat16) {                  \
      using T = cutlass::bfloat16_t;                               \
      return __VA_ARGS__();                                        \
    }                                                              \
    return cudaErrorNotSupported;                                  \
  }()
#else
#define FASTVIT_HALF_SWITCH(DTYPE, T, ...)                         \
  [&]() -> cudaError_t {                                           \
    if ((DTYPE) == ::fastvit::DType::kFloat16) {                   \
      using T = cutlass::half_t;                                   \
      return __VA_ARGS__();                                        \
    } else if ((DTYPE) == ::fastvit::DType::kBFloat16) {           \
      using T = cutlass::bfloat16_t;                               \
      return __VA_ARGS__();                                        \
    }                                                              \
    return cudaErrorNotSupported;                                  \
  }()
#endif

// FASTVIT_FLOAT_SWITCH(dtype, T, ...): all three dtypes (T = cutlass::half_t | cutlass::bfloat16_t |
// float). Used by the memory-bound SIMT kernels (LayerNorm, MAE), which are cheap to instantiate.
#define FASTVIT_FLOAT_SWITCH(DTYPE, T, ...)                        \
  [&]() -> cudaError_t {                                           \
    if ((DTYPE) == ::fastvit::DType::kFloat16) {                   \
      using T = cutlass::half_t;                                   \
      return __VA_ARGS__();                                        \
    } else if ((DTYPE) == ::fastvit::DType::kBFloat16) {           \
      using T = cutlass::bfloat16_t;                               \
      return __VA_ARGS__();                                        \
    } else if ((DTYPE) == ::fastvit::DType::kFloat32) {            \
      using T = float;                                             \
      return __VA_ARGS__();                                        \
    }                                                              \
    return cudaErrorNotSupported;                                  \
  }()
