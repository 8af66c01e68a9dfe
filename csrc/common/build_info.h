// What this build of fastvit._C compiled, and the kernel facts Python reads instead of copying them: reported by
// fastvit._C.build_info() (csrc/fastvit_module.cpp). Torch-free.
#pragma once

namespace fastvit {

struct BuildInfo {
  const char* archs;              // nvcc's __CUDA_ARCH_LIST__ of the kernel files, e.g. "800,900"
  int cuda_runtime_version;       // CUDART_VERSION the kernels were compiled against, e.g. 13000
  int cutlass_major, cutlass_minor, cutlass_patch;
  bool minimal;                   // FASTVIT_MINIMAL_BUILD: one instantiation per kernel template
  const char* half_dtypes;        // dtypes of the tensor-core ops (attention, linear, patch_embed), comma-separated
  const char* attention_head_dim_buckets;  // buckets this build compiled, ascending, e.g. "32,64,80,96,128"
  // Every head-dim bucket the attention kernels define, ascending, compiled or not: a head dim runs in the first
  // bucket >= it ("32,64,80,96,128"). A head dim is supported when it is a positive multiple of
  // attention_head_dim_multiple, at most attention_max_head_dim, and its bucket is compiled.
  const char* attention_head_dim_bucket_bounds;
  int attention_head_dim_multiple;  // 8
  int attention_max_head_dim;       // 128
  // Dynamic shared memory per block of the largest attention backward kernel, per compiled bucket, in bytes, as
  // "bucket:bytes" pairs, e.g. "32:...,64:...,80:...,96:107520,128:104960"; from the kernels' tile configs.
  const char* attention_bwd_smem_bytes;
  // 1: the attention kernels take packed variable-length sequences (cu_seqlens; the attention_varlen_* and
  // sdpa_varlen_* ops exist). Builds from before that have no such key; Python enables varlen only when it is 1.
  int attention_varlen;
  // 1: the attention ops take the rotary arguments (rope, num_prefix_tokens, rotate_half) and the kernels apply them
  // (AttentionRopeParams). Builds from before that have no such key; Python enables rope calls only when it is 1.
  int attention_rope;
  // Elements: GEMM (linear) in / out features and the patch embedding's embed dim must be multiples of this (the
  // kernels' 128-bit accesses of 16-bit elements).
  int gemm_alignment;
};

BuildInfo build_info();

}  // namespace fastvit
