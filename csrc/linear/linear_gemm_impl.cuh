// Internal: CUTLASS 2.x definitions of the GEMM kinds declared in linear_gemm.cuh. Include only from the per-dtype
// instantiation files (each CUTLASS kernel is expensive to compile).
//
// All kinds: SM80 tensor-op (mma.sync 16×8×16, fp32 accumulate), threadblock 128×128×32, warp 64×64×32, 4 stages,
// 128-bit (8-element) global accesses on A and B, GemmIdentityThreadblockSwizzle<8> (CTAs of neighbouring tiles
// share A / B panels in L2). SM80 kernels run unchanged on sm_90a.
#pragma once

#include <type_traits>

// Order matters: the gemm headers first (visitor_2x.hpp names gemm::GemmCoord, which must not resolve to
// cute::gemm), as in CUTLASS's own EVT examples.
#include <cutlass/cutlass.h>
#include <cutlass/gemm/gemm.h>
#include <cutlass/gemm/device/gemm_universal.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>
#include <cutlass/functional.h>
#include <cute/tensor.hpp>

#include "linear/linear_gemm.cuh"

namespace fastvit {
namespace gemm_detail {

using TileShape = cutlass::gemm::GemmShape<128, 128, 32>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 32>;
using InstShape = cutlass::gemm::GemmShape<16, 8, 16>;
constexpr int kStages = 4;
constexpr int kAlign = 8;  // 16-bit elements per 128-bit access
using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>;

inline cudaError_t to_cuda_error(cutlass::Status s) {
  switch (s) {
    case cutlass::Status::kSuccess: return cudaSuccess;
    case cutlass::Status::kErrorMisalignedOperand:
    case cutlass::Status::kErrorInvalidProblem:
    case cutlass::Status::kErrorInvalidLayout:
    case cutlass::Status::kErrorWorkspaceNull: return cudaErrorInvalidValue;
    case cutlass::Status::kErrorNotSupported:
    case cutlass::Status::kErrorArchMismatch: return cudaErrorNotSupported;
    default: {
      cudaError_t e = cudaGetLastError();  // kErrorInternal: a CUDA call inside CUTLASS failed
      return e != cudaSuccess ? e : cudaErrorUnknown;
    }
  }
}

// tanh-form GELU in fp32 with the accurate tanhf: cutlass::epilogue::thread::GELU_taylor uses tanh.approx.f32
// (relative error ~2^-11), which is not the formula the Triton backend and PyTorch evaluate.
//   0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
template <typename T>
struct GeluTanhAccurate;

template <int N>
struct GeluTanhAccurate<cutlass::Array<float, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& x) const {
    cutlass::Array<float, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      float v = x[i];
      y[i] = 0.5f * v * (1.0f + tanhf((v + v * v * v * 0.044715f) * 0.7978845608028654f));
    }
    return y;
  }
};

// exact-erf GELU: cutlass::epilogue::thread::GELU<float> computes 0.5f·x·(1 + erff(x·(√2/2))) -- exactly
// 0.5·x·(1 + erf(x/√2)) with the accurate erff; its Array<float, N> specialisation applies it per element.
template <typename T>
using GeluErf = cutlass::epilogue::thread::GELU<T>;

template <bool kTanh>
struct GeluSelect {
  template <class X>
  using Fn = GeluErf<X>;
};
template <>
struct GeluSelect<true> {
  template <class X>
  using Fn = GeluTanhAccurate<X>;
};

// ------------------------------------------------------------------------------ EVT forward GEMM
// Epilogue visitor trees (children evaluated left to right, all in fp32; AuxStore nodes round to T on store and
// forward their fp32 input). Arguments of Sm80EVT<Node, C0, C1, ...> are the aggregate {op_0 = C0, op_1 = C1, ...,
// op_last = Node} (visitor_2x.hpp, VisitorImpl2x).
//   Z      = plus(Acc, Bias)                                  Bias: RowBroadcast, null → 0
//   Pre    = kStorePre ? AuxStore_pre(Z) : Z
//   GELU:     Out = GELU(Pre)                                 (compute node converts fp32 → T)
//   Residual: Out = multiply_add(Gamma, Pre, Aux)             Gamma: RowBroadcast, null → 1; Aux: AuxLoad residual
//   BiasAux:  Out = plus(Z, Aux)                              Aux: AuxLoad position rows
//   Bias:     Out = Z (converted to T by the store)
//   D      = AuxStore_D(Out)
template <typename T, Epi kEpi, bool kStorePre>
struct EpiGemm {
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  // Epilogue thread map: 8 elements of T (128 bits) per access, 1 epilogue stage.
  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<TileShape, WarpShape, T, kAlign, 1>;

  // Strides are (M, N, L) = (row, column, batch) in elements.
  using StrideRow = cute::Stride<cute::_0, cute::_1, int64_t>;  // one length-N vector for every row (and batch)
  using StrideMat = cute::Stride<int64_t, cute::_1, int64_t>;   // row-major: (ld, 1, batch stride)

  template <class Node, class... Children>
  using EVT = cutlass::epilogue::threadblock::Sm80EVT<Node, Children...>;

  using Accum = cutlass::epilogue::threadblock::VisitorAccFetch;
  using RowVec = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, T, StrideRow>;
  using AuxLoad = cutlass::epilogue::threadblock::VisitorAuxLoad<ThreadMap, T, StrideMat>;
  using AuxStore = cutlass::epilogue::threadblock::VisitorAuxStore<ThreadMap, T, RN, StrideMat>;

  using AddBias = cutlass::epilogue::threadblock::VisitorCompute<cutlass::plus, float, float, RN>;
  using EvtZ = EVT<AddBias, Accum, RowVec>;
  using EvtPre = std::conditional_t<kStorePre, EVT<AuxStore, EvtZ>, EvtZ>;

  using Act =
      cutlass::epilogue::threadblock::VisitorCompute<GeluSelect<kEpi == Epi::kGeluTanh>::template Fn, T, float, RN>;
  using Fma = cutlass::epilogue::threadblock::VisitorCompute<cutlass::homogeneous_multiply_add, T, float, RN>;
  using AddAux = cutlass::epilogue::threadblock::VisitorCompute<cutlass::plus, T, float, RN>;

  using EvtOut = std::conditional_t<kEpi == Epi::kResidual, EVT<Fma, RowVec, EvtPre, AuxLoad>,
                                    std::conditional_t<kEpi == Epi::kBiasAux, EVT<AddAux, EvtZ, AuxLoad>,
                                                       std::conditional_t<kEpi == Epi::kBias, EvtZ, EVT<Act, EvtPre>>>>;
  using Evt = EVT<AuxStore, EvtOut>;

  static_assert(!kStorePre || kEpi == Epi::kGeluErf || kEpi == Epi::kGeluTanh || kEpi == Epi::kResidual,
                "only the GELU and residual epilogues store the pre-activation");

  // A: row-major (M×K); B: column-major (K×N) = the row-major (N×K) weight; "C" (unused by the EVT) row-major T.
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      T, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlign, T, cutlass::layout::ColumnMajor,
      cutlass::ComplexTransform::kNone, kAlign, T, cutlass::layout::RowMajor, kAlign, float, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape, InstShape, Evt, Swizzle, kStages,
      cutlass::arch::OpMultiplyAdd,
      /*EpilogueStages=*/1>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename RowVec::Arguments row_vec(const void* p, float null_value) {
    // Batch stride 0 spelled out: a default-constructed int64_t member of a cute::tuple is not guaranteed to be
    // zero, and in batched mode the batch index multiplies it.
    return typename RowVec::Arguments{static_cast<const T*>(p), T(null_value),
                                      StrideRow{cute::_0{}, cute::_1{}, int64_t(0)}};
  }
  static typename EvtZ::Arguments z_args(const EpiGemmArgs& a) {
    typename EvtZ::Arguments z{};
    z.op_0 = {};                      // Accum
    z.op_1 = row_vec(a.bias, 0.0f);   // Bias (null → 0)
    z.op_2 = {};                      // plus
    return z;
  }
  static typename EvtPre::Arguments pre_args(const EpiGemmArgs& a) {
    if constexpr (kStorePre) {
      typename EvtPre::Arguments p{};
      p.op_0 = z_args(a);
      p.op_1 = typename AuxStore::Arguments{static_cast<T*>(a.pre), StrideMat{a.ldpre, cute::_1{}, a.batch_stride_pre}};
      return p;
    } else {
      return z_args(a);
    }
  }
  static typename EvtOut::Arguments out_args(const EpiGemmArgs& a) {
    typename EvtOut::Arguments o{};
    if constexpr (kEpi == Epi::kResidual) {
      o.op_0 = row_vec(a.gamma, 1.0f);  // gamma (null → 1)
      o.op_1 = pre_args(a);
      o.op_2 = typename AuxLoad::Arguments{static_cast<T*>(const_cast<void*>(a.aux)), T(0),
                                           StrideMat{a.ld_aux, cute::_1{}, a.batch_stride_aux}};
      o.op_3 = {};                      // gamma·z + residual
    } else if constexpr (kEpi == Epi::kBiasAux) {
      o.op_0 = z_args(a);
      o.op_1 = typename AuxLoad::Arguments{static_cast<T*>(const_cast<void*>(a.aux)), T(0),
                                           StrideMat{a.ld_aux, cute::_1{}, a.batch_stride_aux}};
      o.op_2 = {};
    } else if constexpr (kEpi == Epi::kBias) {
      o = z_args(a);
    } else {
      o.op_0 = pre_args(a);
      o.op_1 = {};                      // GELU
    }
    return o;
  }

  static cudaError_t run(const EpiGemmArgs& a, cudaStream_t stream) {
    typename Evt::Arguments evt{};
    evt.op_0 = out_args(a);
    evt.op_1 = typename AuxStore::Arguments{static_cast<T*>(a.D), StrideMat{a.ldd, cute::_1{}, a.batch_stride_D}};

    typename Gemm::Arguments args(
        a.batch > 1 ? cutlass::gemm::GemmUniversalMode::kBatched : cutlass::gemm::GemmUniversalMode::kGemm,
        cutlass::gemm::GemmCoord(a.M, a.N, a.K),
        a.batch,                           // batch count (no split-K: the EVT kernel does not support it)
        evt, a.A, a.B, nullptr, nullptr,                  // ptr_C, ptr_D: unused, the EVT stores
        a.batch_stride_A, a.batch_stride_B, 0, 0,                              // batch strides of C, D (unused)
        a.lda, a.ldb,                      // A row-major: ld = row stride; B column-major: ld = column stride
        0, 0);                             // ldc, ldd (unused)
    Gemm gemm;
    cutlass::Status s = gemm.can_implement(args);
    if (s != cutlass::Status::kSuccess) return to_cuda_error(s);
    s = gemm.initialize(args, nullptr, stream);
    if (s != cutlass::Status::kSuccess) return to_cuda_error(s);
    s = gemm.run(stream);
    if (s != cutlass::Status::kSuccess) return to_cuda_error(s);
    FASTVIT_RETURN_LAUNCH_ERROR();
    return cudaSuccess;
  }
};

template <typename T, Epi kEpi, bool kStorePre>
cudaError_t gemm_epi(const EpiGemmArgs& args, cudaStream_t stream) {
  if (args.M <= 0 || args.N <= 0 || args.batch <= 0) return cudaSuccess;
  return EpiGemm<T, kEpi, kStorePre>::run(args, stream);
}

// ------------------------------------------------------------------------------ NN GEMM (dgrad)
template <typename T>
using GemmNN = cutlass::gemm::device::GemmUniversal<
    T, cutlass::layout::RowMajor,                              // A (M×K), ld = row stride
    T, cutlass::layout::RowMajor,                              // B (K×N), ld = row stride
    T, cutlass::layout::RowMajor,                              // C / D (M×N)
    float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape, InstShape,
    cutlass::epilogue::thread::LinearCombination<T, kAlign, float, float>,  // D = 1·acc + 0·C (C never read)
    Swizzle, kStages, kAlign, kAlign, cutlass::arch::OpMultiplyAdd>;

template <typename T>
cudaError_t gemm_nn(const NNGemmArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.N <= 0 || a.batch <= 0) return cudaSuccess;
  using Gemm = GemmNN<T>;
  typename Gemm::Arguments args(
      a.batch > 1 ? cutlass::gemm::GemmUniversalMode::kBatched : cutlass::gemm::GemmUniversalMode::kGemm,
      cutlass::gemm::GemmCoord(a.M, a.N, a.K), a.batch, {1.0f, 0.0f},                               // alpha, beta
      a.A, a.B, a.D, a.D,                         // ptr_C = ptr_D (beta = 0: never read)
      a.batch_stride_A, a.batch_stride_B, a.batch_stride_D, a.batch_stride_D, a.lda, a.ldb, a.ldd, a.ldd);
  Gemm gemm;
  cutlass::Status s = gemm.can_implement(args);
  if (s != cutlass::Status::kSuccess) return to_cuda_error(s);
  s = gemm.initialize(args, nullptr, stream);     // no split-K: no workspace
  if (s != cutlass::Status::kSuccess) return to_cuda_error(s);
  s = gemm.run(stream);
  if (s != cutlass::Status::kSuccess) return to_cuda_error(s);
  FASTVIT_RETURN_LAUNCH_ERROR();
  return cudaSuccess;
}

// ------------------------------------------------------------------------------ TN GEMM (wgrad, fp32 out)
template <typename T>
using GemmTN = cutlass::gemm::device::GemmUniversal<
    T, cutlass::layout::ColumnMajor,                           // A = Gᵀ (M×K): element (m, k) at G[k·ldg + m]
    T, cutlass::layout::RowMajor,                              // B = X (K×N): element (k, n) at X[k·ldx + n]
    float, cutlass::layout::RowMajor,                          // D (M×N) fp32
    float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape, InstShape,
    // 4 fp32 = 128-bit stores; serial split-K: slice k > 0 gets beta = 1 (set_k_partition) and reads D.
    cutlass::epilogue::thread::LinearCombination<float, 4, float, float>, Swizzle, kStages, kAlign, kAlign,
    cutlass::arch::OpMultiplyAdd>;

template <typename T>
cudaError_t gemm_tn_f32(const TNGemmArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.N <= 0) return cudaSuccess;
  using Gemm = GemmTN<T>;
  int split = a.split_k < 1 ? 1 : a.split_k;
  typename Gemm::Arguments args(
      cutlass::gemm::GemmUniversalMode::kGemm,    // batch_count > 1 in kGemm mode = serial split-K
      cutlass::gemm::GemmCoord(a.M, a.N, a.K), split, {1.0f, 0.0f}, a.G, a.X, a.D, a.D, 0, 0, 0,
      0,                                 // batch strides: unused in kGemm mode
      a.ldg, a.ldx, a.ldd, a.ldd);
  Gemm gemm;
  cutlass::Status s = gemm.can_implement(args);
  if (s != cutlass::Status::kSuccess) return to_cuda_error(s);
  size_t need = Gemm::get_workspace_size(args);
  if (need > tn_gemm_semaphore_bytes(a.M, a.N) || (need > 0 && a.semaphores == nullptr))
    return cudaErrorInvalidValue;                 // the caller's workspace arithmetic disagrees with CUTLASS's
  s = gemm.initialize(args, need > 0 ? a.semaphores : nullptr, stream);  // zero-fills the semaphores
  if (s != cutlass::Status::kSuccess) return to_cuda_error(s);
  s = gemm.run(stream);
  if (s != cutlass::Status::kSuccess) return to_cuda_error(s);
  FASTVIT_RETURN_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace gemm_detail
}  // namespace fastvit
