// fastvit CUDA C++: the fused Linear GEMMs of the ViT MLP / attention projection (fc1 + GELU, fc2 / proj +
// LayerScale + residual, and a gated MLP's fc1 + gating), forward and backward, on CUTLASS 2.x SM80 tensor-op GEMMs
// and one CuTe dual GEMM (linear_glu's forward); all SM80 code, which also runs on sm_90a.
//
// This header is the only interface the binding sees: plain params structs, launchers, workspace sizes.
// No CUTLASS, no torch. Semantics: fastvit/families/linear.py and kernels/linear.py (the Triton backend).
//
// Conventions (all ops):
//   * dtype is kFloat16 or kBFloat16 (anything else: cudaErrorNotSupported); every tensor has that dtype;
//     accumulation and epilogue math in fp32, one rounding per stored value;
//   * every matrix is row-major with unit column stride and the given leading dimension (row stride, elements);
//     `weight` is nn.Linear's (N, K) with leading dimension ldw;
//   * 128-bit alignment: K, N, every leading dimension must be multiples of kLinearAlignment (8 elements) and every
//     pointer 16-byte aligned; otherwise the launcher returns cudaErrorInvalidValue (the binding checks first);
//   * vectors (bias, gamma, dbias, dgamma) are contiguous (N,); nullable pointers are documented per field;
//   * launchers return the first CUDA error; empty problems are no-ops (except that the backward still writes
//     zero gradients when M == 0);
//   * the backward is deterministic (no atomics; fixed reduction order that depends on the shapes only).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/common.h"

namespace fastvit {

// K, N and all leading dimensions must be multiples of this (128-bit vector accesses of 16-bit elements).
constexpr int kLinearAlignment = 8;

// The leading fields of every params struct below (each struct derives from one of these, so the binding sees
// the same field names; the derived struct's own fields follow these in memory).
struct LinearFwdParamsBase {
  DType dtype = DType::kBFloat16;
  int64_t M = 0, N = 0, K = 0;   // tokens, out features, in features
  const void* x = nullptr;       // (M, K), leading dim ldx
  int64_t ldx = 0;
  const void* weight = nullptr;  // (N, K), leading dim ldw
  int64_t ldw = 0;
  const void* bias = nullptr;    // (N,) or nullptr (= 0)
};

struct LinearBwdParamsBase {
  DType dtype = DType::kBFloat16;
  int64_t M = 0, N = 0, K = 0;   // tokens, out features, in features
  const void* dy = nullptr;      // (M, N), leading dim lddy
  int64_t lddy = 0;
  const void* x = nullptr;       // (M, K), leading dim ldx
  int64_t ldx = 0;
  const void* weight = nullptr;  // (N, K), leading dim ldw
  int64_t ldw = 0;
};

// ------------------------------------------------------------------------------------------ linear_gelu
// Forward: h = x · weightᵀ + bias (M, N); y = GELU(h). GELU is exact erf 0.5·h·(1 + erf(h/√2)) unless gelu_tanh,
// then 0.5·h·(1 + tanh(√(2/π)·(h + 0.044715·h³))); both in fp32 (accurate erff / tanhf, no fast-math).
struct LinearGeluFwdParams : LinearFwdParamsBase {
  void* y = nullptr;             // (M, N) out, leading dim ldy
  int64_t ldy = 0;
  void* h = nullptr;             // (M, N) out, the pre-activation x·Wᵀ + b, or nullptr (not stored)
  int64_t ldh = 0;
  bool gelu_tanh = false;
};
cudaError_t run_linear_gelu_fwd(const LinearGeluFwdParams& params, cudaStream_t stream);

// Backward: dh = dy ⊙ GELU'(h) (fp32 math, rounded to the input dtype: the operand of both GEMMs);
// dx = dh · weight (M, K); dweight = dhᵀ · x (N, K); dbias = Σ_rows dh (N,) in fp32, rounded once.
struct LinearGeluBwdParams : LinearBwdParamsBase {
  const void* h = nullptr;       // (M, N) saved pre-activation, leading dim ldh
  int64_t ldh = 0;
  bool gelu_tanh = false;
  bool has_bias = false;         // dbias is written iff has_bias
  void* dx = nullptr;            // (M, K) out, leading dim lddx
  int64_t lddx = 0;
  void* dweight = nullptr;       // (N, K) out, leading dim lddw
  int64_t lddw = 0;
  void* dbias = nullptr;         // (N,) out when has_bias
  void* workspace = nullptr;     // linear_gelu_bwd_workspace_bytes(params) bytes, 256-byte aligned, no init needed
};
size_t linear_gelu_bwd_workspace_bytes(const LinearGeluBwdParams& params);
cudaError_t run_linear_gelu_bwd(const LinearGeluBwdParams& params, cudaStream_t stream);

// ------------------------------------------------------------------------------------------ linear_residual
// Forward: z = x · weightᵀ + bias; y = residual + gamma ⊙ z (gamma nullptr = 1), fp32 math.
struct LinearResidualFwdParams : LinearFwdParamsBase {
  const void* gamma = nullptr;     // (N,) or nullptr (= 1)
  const void* residual = nullptr;  // (M, N), leading dim ldr
  int64_t ldr = 0;
  void* y = nullptr;               // (M, N) out, leading dim ldy (may alias residual only if ldy == ldr)
  int64_t ldy = 0;
  void* z = nullptr;               // (M, N) out, x·Wᵀ + b, or nullptr (not stored)
  int64_t ldz = 0;
};
cudaError_t run_linear_residual_fwd(const LinearResidualFwdParams& params, cudaStream_t stream);

// Backward: dz = gamma ⊙ dy (rounded to the input dtype, as the Triton prologue; dz = dy when gamma is nullptr);
// dx = dz · weight; dweight = dzᵀ · x; dbias = Σ_rows dz (fp32 sum of the unrounded products);
// dgamma = Σ_rows dy ⊙ z (only when gamma, z and dgamma are all non-null). dresidual = dy is the caller's.
struct LinearResidualBwdParams : LinearBwdParamsBase {
  const void* gamma = nullptr;   // (N,) or nullptr
  const void* z = nullptr;       // (M, N) saved x·Wᵀ + b, leading dim ldz, or nullptr
  int64_t ldz = 0;
  bool has_bias = false;
  void* dx = nullptr;            // (M, K) out, leading dim lddx
  int64_t lddx = 0;
  void* dweight = nullptr;       // (N, K) out, leading dim lddw
  int64_t lddw = 0;
  void* dbias = nullptr;         // (N,) out when has_bias
  void* dgamma = nullptr;        // (N,) out, or nullptr; written only when gamma and z are non-null
  void* workspace = nullptr;     // linear_residual_bwd_workspace_bytes(params) bytes, 256-byte aligned
};
size_t linear_residual_bwd_workspace_bytes(const LinearResidualBwdParams& params);
cudaError_t run_linear_residual_bwd(const LinearResidualBwdParams& params, cudaStream_t stream);

// ------------------------------------------------------------------------------------------ linear_glu
// The gate's activation (the codes of kernels/linear.py's ACT constexpr), fp32 math with the accurate expf / erff /
// tanhf: silu h·σ(h) (SwiGLU), exact-erf GELU (GeGLU), tanh GELU, sigmoid σ(h) (Dauphin et al.'s GLU).
enum class GluActivation : int { kSilu = 0, kGeluErf = 1, kGeluTanh = 2, kSigmoid = 3 };

// Forward (Shazeer 2020, "GLU Variants Improve Transformer"): h_g = x · weightᵀ + bias (the gate), h_x = x ·
// weight_valueᵀ + bias_value (the value), y = act(h_g) ⊙ h_x, all (M, N) with N the gated width; both products are
// accumulated in fp32 by one kernel over the same x tiles, and the gate is applied to the fp32 h_g, h_x. A packed
// (2·N, K) weight (timm's GluMlp) reaches it as two row views (weight / weight_value pointing into it).
struct LinearGluFwdParams : LinearFwdParamsBase {  // weight, ldw, bias: the gate's
  const void* weight_value = nullptr;  // (N, K), leading dim ldwv
  int64_t ldwv = 0;
  const void* bias_value = nullptr;    // (N,) or nullptr (= 0)
  void* y = nullptr;                   // (M, N) out, leading dim ldy
  int64_t ldy = 0;
  void* h = nullptr;                   // (M, 2·N) out, [h_g | h_x] per row (h_x from column N), leading dim ldh; or
  int64_t ldh = 0;                     // nullptr (not stored)
  GluActivation activation = GluActivation::kSilu;
};
cudaError_t run_linear_glu_fwd(const LinearGluFwdParams& params, cudaStream_t stream);

// Backward: the prologue dh_g = dy ⊙ h_x ⊙ act'(h_g), dh_x = dy ⊙ act(h_g) (fp32 from the saved h, rounded to the
// input dtype: the operand of the GEMMs, as the Triton prologue rounds it); dx = dh_g · weight + dh_x · weight_value
// (one GEMM over the 2·N reduction, fp32 accumulation); dweight = dh_gᵀ · x, dweight_value = dh_xᵀ · x (one GEMM
// over the 2·N rows, rounded once); dbias / dbias_value = Σ_rows dh_g / dh_x of the unrounded fp32 values.
struct LinearGluBwdParams : LinearBwdParamsBase {  // weight, ldw: the gate's
  const void* weight_value = nullptr;  // (N, K), leading dim ldwv
  int64_t ldwv = 0;
  const void* h = nullptr;             // (M, 2·N) saved [h_g | h_x], leading dim ldh
  int64_t ldh = 0;
  GluActivation activation = GluActivation::kSilu;
  bool has_bias = false;               // dbias and dbias_value are written iff has_bias
  void* dx = nullptr;                  // (M, K) out, leading dim lddx
  int64_t lddx = 0;
  void* dweight = nullptr;             // (N, K) out, leading dim lddw
  int64_t lddw = 0;
  void* dweight_value = nullptr;       // (N, K) out, leading dim lddwv
  int64_t lddwv = 0;
  void* dbias = nullptr;               // (N,) out when has_bias
  void* dbias_value = nullptr;         // (N,) out when has_bias
  void* workspace = nullptr;           // linear_glu_bwd_workspace_bytes(params) bytes, 256-byte aligned
};
size_t linear_glu_bwd_workspace_bytes(const LinearGluBwdParams& params);
cudaError_t run_linear_glu_bwd(const LinearGluBwdParams& params, cudaStream_t stream);

}  // namespace fastvit
