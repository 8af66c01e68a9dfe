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

// The fp16 / bf16 cases this build compiles (FASTVIT_BUILD_HALF_TYPES, common/kernel_table.h: bf16 only in a
// minimal build).
#define FASTVIT_HALF_CASE_X(KIND, TYPE, DTYPE, T, ...) FASTVIT_DTYPE_CASE(DTYPE, KIND, TYPE, T, __VA_ARGS__)
#define FASTVIT_HALF_CASES(DTYPE, T, ...) FASTVIT_BUILD_HALF_TYPES(FASTVIT_HALF_CASE_X, DTYPE, T, __VA_ARGS__)

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
