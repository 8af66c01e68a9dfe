// Helpers shared by the per-family binding files (csrc/<family>/<family>_binding.cpp): argument checks that name
// the op and the argument, the fastvit::DType of a tensor, the mapping of a launcher's cudaError_t to a Python
// exception, 128-bit alignment of operands, workspace allocation and the device guard + stream of a launch.
//
// This header and the *_binding.cpp / fastvit_*.cpp files are the only ones under csrc/ that see torch; the kernel
// files (*.cu, *.cuh and the other *.h) stay torch-free (docs/ARCHITECTURE.md, "Layers of an op").
//
// Error types: TORCH_CHECK_TYPE -> TypeError (dtype), TORCH_CHECK_VALUE -> ValueError (shape, device, size),
// TORCH_CHECK_NOT_IMPLEMENTED -> NotImplementedError (a dtype / head dim this build did not compile).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

#include "common/common.h"

namespace fastvit {
namespace binding {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ------------------------------------------------------------------------------------------- checks
inline void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

inline void check_same(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; expected the same device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has ", ref.scalar_type(), "; expected the same dtype");
}

inline void check_shape(const Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_index(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but must be on ",
                    ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D (B, N), got shape ", t.sizes());
}

// fp16 / bf16 (tensor-core ops) or also fp32 (memory-bound ops).
inline fastvit::DType dtype_of(const Tensor& t, const char* op, const char* name, bool allow_fp32) {
  switch (t.scalar_type()) {
    case at::kHalf: return fastvit::DType::kFloat16;
    case at::kBFloat16: return fastvit::DType::kBFloat16;
    case at::kFloat:
      if (allow_fp32) return fastvit::DType::kFloat32;
      break;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be ",
                   allow_fp32 ? "float16, bfloat16 or float32" : "float16 or bfloat16", ", got ", t.scalar_type());
  return fastvit::DType::kFloat32;  // unreachable
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(err != cudaErrorNotSupported, op,
                              ": this fastvit._C build did not compile the requested dtype / head dim "
                              "(fastvit._C.build_info() lists what it has)");
  TORCH_CHECK_VALUE(err != cudaErrorInvalidValue && err != cudaErrorMisalignedAddress, op,
                    ": the kernel rejected its arguments (", cudaGetErrorString(err),
                    "); this is a bug in the binding's checks, please report it");
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

inline bool ptr_aligned(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// `t` itself when its last dim is contiguous, its other strides are multiples of `align` elements and its data is
// 16-byte aligned (what the kernels' 128-bit accesses need); otherwise a contiguous, freshly allocated copy.
inline Tensor vector_aligned(const Tensor& t, int64_t align = 8) {
  bool ok = t.numel() == 0 || ((t.size(-1) <= 1 || t.stride(-1) == 1) && ptr_aligned(t));
  for (int64_t i = 0; ok && i + 1 < t.dim(); ++i) ok = t.size(i) <= 1 || t.stride(i) % align == 0;
  if (ok) return t;
  Tensor c = t.contiguous();
  return (c.data_ptr() == t.data_ptr()) ? t.clone(at::MemoryFormat::Contiguous) : c;
}

// (M, C) view of `t` (..., C) with a unit last stride (a copy only when no such view exists).
inline Tensor rows(const Tensor& t, int64_t C) {
  Tensor r = t.reshape({-1, C});
  return (C > 1 && r.stride(1) != 1) ? r.contiguous() : r;
}

// Scratch of `bytes` bytes on `options`' device for a launcher; *ptr gets its address (null when empty). Kept alive
// by the caller until the launch is queued (the caching allocator orders its reuse on the same stream).
inline Tensor alloc_workspace(size_t bytes, const at::TensorOptions& options, void** ptr) {
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, options.dtype(at::kByte));
  *ptr = bytes ? workspace.data_ptr() : nullptr;
  return workspace;
}

inline Tensor empty0(const Tensor& like) { return at::empty({0}, like.options()); }

inline const void* opt_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

struct Launch {  // device guard + current stream for one op
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  explicit Launch(const Tensor& t) : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream().stream()) {}
};

// An optional vector argument: absent, or of shape (C,) on `ref`'s device with `ref`'s dtype.
inline void check_vector(const OptTensor& t, const Tensor& ref, int64_t C, const char* op, const char* name,
                         const char* ref_name) {
  if (!t.has_value()) return;
  check_same(*t, ref, op, name, ref_name);
  check_shape(*t, {C}, op, name);
}

}  // namespace binding
}  // namespace fastvit
