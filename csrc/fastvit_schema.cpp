// fastvit._C: the schemas of every CUDA op, declared once (TORCH_LIBRARY(fastvit)).
//
// Namespace fastvit, suffix _cuda; the Triton backend registers the same schemas without the suffix. The CUDA
// kernels of each op are registered next to that family's kernels, in one TORCH_LIBRARY_IMPL(fastvit, CUDA)
// fragment per family (csrc/<family>/<family>_binding.cpp: input checks, set_params_*, launch). Fake (meta)
// implementations and autograd are registered from Python, by each op family's module (fastvit/families/<family>.py)
// when the extension loads; no set_python_module, since they live in five modules, not one. The
// Python module itself (PYBIND11_MODULE, build_info) is csrc/fastvit_module.cpp.
#include <torch/library.h>

// Schemas: identical to the Triton ops of fastvit/families/*.py, with the _cuda suffix.
TORCH_LIBRARY(fastvit, m) {
  m.def("attention_fwd_cuda(Tensor qkv, int num_heads, float scale) -> (Tensor, Tensor)");
  m.def("attention_bwd_cuda(Tensor do, Tensor qkv, Tensor o, Tensor lse, int num_heads, float scale) -> Tensor");
  m.def("sdpa_fwd_cuda(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("sdpa_bwd_cuda(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  // Packed variable-length sequences (cu_seqlens int32 (S + 1,), FlashAttention's flash_attn_varlen_func layout):
  // qkv (T, 3C) -> o (T, C), lse (H, T) fp32; q, k, v (T, H, D) -> o (T, H, D), lse (H, T) fp32.
  m.def("attention_varlen_fwd_cuda(Tensor qkv, Tensor cu_seqlens, int max_seqlen, int num_heads, float scale) "
        "-> (Tensor, Tensor)");
  m.def("attention_varlen_bwd_cuda(Tensor do, Tensor qkv, Tensor cu_seqlens, int max_seqlen, Tensor o, Tensor lse, "
        "int num_heads, float scale) -> Tensor");
  m.def("sdpa_varlen_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale) "
        "-> (Tensor, Tensor)");
  m.def("sdpa_varlen_bwd_cuda(Tensor do, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, Tensor o, "
        "Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_fwd_cuda(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd_cuda(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("linear_gelu_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, str approximate, bool save_h) "
        "-> (Tensor, Tensor)");
  m.def("linear_gelu_bwd_cuda(Tensor dy, Tensor x, Tensor weight, Tensor h, str approximate, bool has_bias) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_residual_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor? gamma, "
        "bool save_z) -> (Tensor, Tensor)");
  m.def("linear_residual_bwd_cuda(Tensor dy, Tensor x, Tensor weight, Tensor? gamma, Tensor? z, bool has_bias) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("patch_embed_fwd_cuda(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? cls_token, "
        "Tensor? reg_tokens, Tensor? ids_keep) -> Tensor");
  m.def("patch_embed_bwd_cuda(Tensor dout, Tensor images, Tensor weight, Tensor? ids_keep, int pos_len, int n_cls, "
        "int n_reg, bool compute_dimages) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mae_unshuffle_fwd_cuda(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor");
  m.def("mae_unshuffle_bwd_cuda(Tensor dout, Tensor ids_restore, int n_keep, bool has_pos) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mae_loss_fwd_cuda(Tensor pred, Tensor images, int patch_size, bool norm_pix) -> Tensor");
  m.def("mae_loss_bwd_cuda(Tensor drow, Tensor pred, Tensor images, int patch_size, bool norm_pix, "
        "bool compute_dimages) -> (Tensor, Tensor)");
}
