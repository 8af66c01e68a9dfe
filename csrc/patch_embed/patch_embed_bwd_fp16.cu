// patch_embed backward, float16 instantiation: SIMT gathers / scatters / batch sums; the GEMMs are the NN / TN
// kinds instantiated in linear/linear_bwd_fp16.cu.
#include "patch_embed/patch_embed_bwd_impl.cuh"

FASTVIT_INSTANTIATE_PATCH_EMBED_BWD(cutlass::half_t)
