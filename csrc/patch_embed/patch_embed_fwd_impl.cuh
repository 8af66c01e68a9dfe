// Internal: patch embedding forward (included by patch_embed_fwd_<dtype>.cu).
//
//   1. im2col_kernel: A[b·Nk + j, k] (B·Nk × Kp, zero-padded columns) = pixels of kept patch j of image b;
//   2. pad_weight_kernel (K % 8 != 0 only): Wp (E × Kp) = weight with zero columns K..Kp-1;
//   3. gather_pos_kernel (ids_keep and pos_embed only): posg[b·Nk + j] = pos[pos_off + ids[b, j]];
//   4. batched EVT GEMM, batch b = image, (m, n, k) = (Nk, E, Kp):
//        A = A_b row-major (Nk × Kp), lda = Kp, batch stride Nk·Kp;
//        B = Wp (E × Kp) row-major, read as the column-major (Kp × E) operand Wpᵀ: ldb = Kp, batch stride 0;
//        D = out + R·ost (row-major Nk × E), ldd = ost, batch stride osb  -- rows R.. of each image;
//        epilogue D = acc + bias + pos (AuxLoad: posg with (E, 1, Nk·E), or pos + pos_off·pst with (pst, 1, 0));
//   5. prefix_rows_kernel: out[b, r < R] = cls / reg (+ pos[r]).
#pragma once

#include "linear/linear_gemm_impl.cuh"
#include "patch_embed/patch_embed_impl.h"
#include "patch_embed/patch_embed_kernels.cuh"

namespace fastvit {
namespace patch_detail {

template <typename T>
cudaError_t patch_embed_fwd(const PatchEmbedFwdParams& p, cudaStream_t stream) {
  using namespace gemm_detail;
  const Geom g = fwd_geom(p);
  const FwdLayout L = fwd_layout(g);
  char* ws = static_cast<char*>(p.workspace);
  if (L.total > 0 && (ws == nullptr || (reinterpret_cast<uintptr_t>(ws) & 255u) != 0)) return cudaErrorInvalidValue;
  T* out = static_cast<T*>(p.out);
  const T* pos = static_cast<const T*>(p.pos_embed);

  if (g.B > 0 && g.Nk > 0 && g.E > 0) {
    T* A = reinterpret_cast<T*>(ws + L.A);
    im2col_kernel<T><<<blocks_for(g.B * g.Nk * g.Kp), kThreads, 0, stream>>>(
        static_cast<const T*>(p.images), p.img_stride_b, p.img_stride_c, p.img_stride_h, p.img_stride_w, p.ids_keep,
        p.ids_stride_b, A, g.B, /*rows_per_batch=*/g.Nk, /*prefix_rows=*/0, g.K, g.Kp, g.Ph, g.Pw, g.gw, g.Np);
    FASTVIT_RETURN_LAUNCH_ERROR();
    const T* Wp;
    cudaError_t err = weight_operand<T>(p.weight, L.pad_w, ws + L.Wp, g.E, g.K, g.Kp, stream, &Wp);
    if (err != cudaSuccess) return err;
    EpiGemmArgs a;
    a.M = int(g.Nk);
    a.N = int(g.E);
    a.K = int(g.Kp);
    a.batch = int(g.B);
    a.A = A;
    a.lda = g.Kp;
    a.batch_stride_A = g.Nk * g.Kp;
    a.B = Wp;
    a.ldb = g.Kp;
    a.batch_stride_B = 0;
    a.bias = p.bias;
    a.D = out + g.R * p.out_stride_t;
    a.ldd = p.out_stride_t;
    a.batch_stride_D = p.out_stride_b;
    if (g.has_pos) {
      if (L.gather_pos) {
        T* posg = reinterpret_cast<T*>(ws + L.posg);
        gather_pos_kernel<T><<<blocks_for(g.B * g.Nk * g.E), kThreads, 0, stream>>>(
            pos, p.pos_stride_t, g.pos_off, p.ids_keep, p.ids_stride_b, posg, g.B, g.Nk, g.E, g.Np);
        FASTVIT_RETURN_LAUNCH_ERROR();
        a.aux = posg;
        a.ld_aux = g.E;
        a.batch_stride_aux = g.Nk * g.E;
      } else {  // row j of every image is patch j: the same position rows for all images (batch stride 0)
        a.aux = pos + g.pos_off * p.pos_stride_t;
        a.ld_aux = p.pos_stride_t;
        a.batch_stride_aux = 0;
      }
      err = gemm_epi<T, Epi::kBiasAux, false>(a, stream);
    } else {
      err = gemm_epi<T, Epi::kBias, false>(a, stream);
    }
    if (err != cudaSuccess) return err;
  }
  if (g.B > 0 && g.R > 0 && g.E > 0) {
    prefix_rows_kernel<T><<<blocks_for(g.B * g.R * g.E), kThreads, 0, stream>>>(
        static_cast<const T*>(p.cls_token), static_cast<const T*>(p.reg_tokens), g.n_cls, pos, p.pos_stride_t,
        g.prefix_pos, out, p.out_stride_b, p.out_stride_t, g.B, g.R, g.E);
    FASTVIT_RETURN_LAUNCH_ERROR();
  }
  return cudaSuccess;
}

}  // namespace patch_detail
}  // namespace fastvit

#define FASTVIT_INSTANTIATE_PATCH_EMBED_FWD(T)                                       \
  namespace fastvit {                                                                \
  namespace patch_detail {                                                           \
  template cudaError_t patch_embed_fwd<T>(const PatchEmbedFwdParams&, cudaStream_t); \
  }                                                                                  \
  }
