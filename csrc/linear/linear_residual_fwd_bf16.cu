// linear_residual forward, bfloat16 instantiation: 2 EVT GEMMs (with / without the stored z).
#include "linear/linear_fwd_impl.cuh"

FASTVIT_INSTANTIATE_LINEAR_RESIDUAL_FWD(cutlass::bfloat16_t)
