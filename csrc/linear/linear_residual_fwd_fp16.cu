// linear_residual forward, float16 instantiation: 2 EVT GEMMs (with / without the stored z).
#include "linear/linear_fwd_impl.cuh"

FASTVIT_INSTANTIATE_LINEAR_RESIDUAL_FWD(cutlass::half_t)
