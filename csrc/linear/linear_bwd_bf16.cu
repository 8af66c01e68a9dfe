// linear_gelu / linear_residual backward, bfloat16 instantiation (also the NN / TN GEMMs patch_embed reuses).
#include "linear/linear_bwd_impl.cuh"

FASTVIT_INSTANTIATE_LINEAR_BWD(cutlass::bfloat16_t)
