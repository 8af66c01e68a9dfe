// Internal: patch embedding backward (included by patch_embed_bwd_<dtype>.cu). Uses the NN / TN GEMMs that
// linear_bwd_<dtype>.cu instantiates (declared in linear_gemm.cuh), so this file compiles no CUTLASS kernel.
//
//   1. ids_keep only: inv (B × Np int32) = inverse permutation (-1 = dropped);
//   2. im2col_kernel over all B·(R + Nk) rows of dout (prefix rows zero): A (B·(R+Nk) × Kp);
//   3. TN GEMM (m, n, k) = (E, Kp, B·(R+Nk)): dw32 (E × Kp fp32) = doutᵀ · A, with
//        G = dout viewed as the row-major (B·(R+Nk) × E) matrix, ldg = dout_stride_t (needs dout_stride_b ==
//            (R + Nk)·dout_stride_t), read as the column-major E × rows operand;
//        X = A row-major, ldx = Kp;  serial split-K over the rows;  prefix rows of A are zero, so they add 0;
//      then dweight (E × K, contiguous) = T(dw32[:, :K]);
//   4. dimages: batched NN GEMM, batch b, (m, n, k) = (Nk, Kp, E): dA_b (Nk × Kp, ld Kp, batch stride Nk·Kp; reuses
//      A's memory, stream-ordered after step 3) = dout_b[R..] (row-major, lda = dout_stride_t, batch stride
//      dout_stride_b) · Wp (E × Kp row-major, ldb = Kp, batch stride 0); then col2im_kernel writes every pixel;
//   5. batch_sum_kernel: dcls, dreg, dpos, S (fp32 patch sums); column sums of S (in p order) → dbias.
#pragma once

#include "linear/linear_gemm.cuh"
#include "linear/linear_kernels.cuh"
#include "patch_embed/patch_embed_impl.h"
#include "patch_embed/patch_embed_kernels.cuh"

namespace fastvit {
namespace patch_detail {

template <typename T>
cudaError_t patch_embed_bwd(const PatchEmbedBwdParams& p, cudaStream_t stream) {
  using namespace gemm_detail;
  const Geom g = bwd_geom(p);
  const bool want_dimg = p.dimages != nullptr;
  const BwdLayout L = bwd_layout(g, want_dimg);
  char* ws = static_cast<char*>(p.workspace);
  if (L.total > 0 && (ws == nullptr || (reinterpret_cast<uintptr_t>(ws) & 255u) != 0)) return cudaErrorInvalidValue;
  const T* dout = static_cast<const T*>(p.dout);
  T* A = reinterpret_cast<T*>(ws + L.A);
  float* dw32 = reinterpret_cast<float*>(ws + L.dw32);
  int* inv = g.has_ids ? reinterpret_cast<int*>(ws + L.inv) : nullptr;
  float* S = reinterpret_cast<float*>(ws + L.S);
  const int64_t rows = g.B * (g.R + g.Nk);
  cudaError_t err;

  // 1. inverse of ids_keep
  if (inv != nullptr && g.B * g.Np > 0) {
    fill_inv_kernel<int><<<blocks_for(g.B * g.Np), kThreads, 0, stream>>>(inv, g.B * g.Np);
    FASTVIT_RETURN_LAUNCH_ERROR();
    if (g.Nk > 0) {
      scatter_inv_kernel<int>
          <<<blocks_for(g.B * g.Nk), kThreads, 0, stream>>>(p.ids_keep, p.ids_stride_b, inv, g.B, g.Nk, g.Np);
      FASTVIT_RETURN_LAUNCH_ERROR();
    }
  }

  // 2-3. dweight
  if (g.E > 0 && g.K > 0) {
    if (g.B > 0 && g.Nk > 0) {
      im2col_kernel<T><<<blocks_for(rows * g.Kp), kThreads, 0, stream>>>(
          static_cast<const T*>(p.images), p.img_stride_b, p.img_stride_c, p.img_stride_h, p.img_stride_w, p.ids_keep,
          p.ids_stride_b, A, g.B, /*rows_per_batch=*/g.R + g.Nk, /*prefix_rows=*/g.R, g.K, g.Kp, g.Ph, g.Pw, g.gw,
          g.Np);
      FASTVIT_RETURN_LAUNCH_ERROR();
      TNGemmArgs wg;
      wg.M = int(g.E);
      wg.N = int(g.Kp);
      wg.K = int(rows);
      wg.G = dout;
      wg.ldg = p.dout_stride_t;
      wg.X = A;
      wg.ldx = g.Kp;
      wg.D = dw32;
      wg.ldd = g.Kp;
      wg.split_k = tn_gemm_split_k(g.E, g.Kp, rows);
      wg.semaphores = ws + L.sem;
      if ((err = gemm_tn_f32<T>(wg, stream)) != cudaSuccess) return err;
      err = linear_detail::launch_convert_f32<T>(dw32, g.Kp, static_cast<T*>(p.dweight), g.K, g.E, g.K, stream);
    } else {
      err = linear_detail::launch_convert_f32<T>(nullptr, 0, static_cast<T*>(p.dweight), g.K, g.E, g.K, stream);
    }
    if (err != cudaSuccess) return err;
  }

  // 4. dimages
  if (want_dimg && g.B * g.C * p.Hi * p.Wi > 0) {
    const T* dA = nullptr;
    if (g.Nk > 0 && g.K > 0 && g.E > 0) {
      const T* Wp;
      if ((err = weight_operand<T>(p.weight, L.pad_w, ws + L.Wp, g.E, g.K, g.Kp, stream, &Wp)) != cudaSuccess)
        return err;
      NNGemmArgs dg;
      dg.M = int(g.Nk);
      dg.N = int(g.Kp);
      dg.K = int(g.E);
      dg.batch = int(g.B);
      dg.A = dout + g.R * p.dout_stride_t;
      dg.lda = p.dout_stride_t;
      dg.batch_stride_A = p.dout_stride_b;
      dg.B = Wp;
      dg.ldb = g.Kp;
      dg.batch_stride_B = 0;
      dg.D = A;
      dg.ldd = g.Kp;
      dg.batch_stride_D = g.Nk * g.Kp;
      if ((err = gemm_nn<T>(dg, stream)) != cudaSuccess) return err;
      dA = A;
    }
    col2im_kernel<T><<<blocks_for(g.B * g.C * p.Hi * p.Wi), kThreads, 0, stream>>>(
        dA, inv, static_cast<T*>(p.dimages), p.dimg_stride_b, p.dimg_stride_c, p.dimg_stride_h, p.dimg_stride_w, g.B,
        g.C, p.Hi, p.Wi, g.Ph, g.Pw, g.gh, g.gw, g.Nk, g.Kp);
    FASTVIT_RETURN_LAUNCH_ERROR();
  }

  // 5. batch sums → dcls, dreg, dpos, dbias
  if (g.E > 0 && g.R + g.Np > 0) {
    int64_t ry = g.R + g.Np;
    dim3 grid(unsigned((g.E + kThreads - 1) / kThreads), unsigned(ry < 65535 ? ry : 65535));
    batch_sum_kernel<T><<<grid, kThreads, 0, stream>>>(dout, p.dout_stride_b, p.dout_stride_t, inv, g.B, g.R, g.n_cls,
                                                       g.Np, g.E, S, g.has_pos ? static_cast<T*>(p.dpos) : nullptr,
                                                       g.prefix_pos, g.pos_off, static_cast<T*>(p.dcls),
                                                       static_cast<T*>(p.dreg));
    FASTVIT_RETURN_LAUNCH_ERROR();
  }
  if (p.dbias != nullptr && g.E > 0) {
    if (g.Np > 0)
      err = linear_detail::launch_column_sum<T>(S, g.Np, g.E, static_cast<T*>(p.dbias), stream);
    else
      err = linear_detail::launch_convert_f32<T>(nullptr, 0, static_cast<T*>(p.dbias), g.E, 1, g.E, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace patch_detail
}  // namespace fastvit

#define FASTVIT_INSTANTIATE_PATCH_EMBED_BWD(T)                                       \
  namespace fastvit {                                                                \
  namespace patch_detail {                                                           \
  template cudaError_t patch_embed_bwd<T>(const PatchEmbedBwdParams&, cudaStream_t); \
  }                                                                                  \
  }
