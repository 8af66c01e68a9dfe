// patch_embed forward, bfloat16 instantiation: 2 batched EVT GEMMs (bias + pos-embed rows / bias only) + gathers.
#include "patch_embed/patch_embed_fwd_impl.cuh"

FASTVIT_INSTANTIATE_PATCH_EMBED_FWD(cutlass::bfloat16_t)
