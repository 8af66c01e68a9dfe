// linear_gelu forward, bfloat16 instantiation: 4 EVT GEMMs (erf / tanh GELU × with / without the stored h).
#include "linear/linear_fwd_impl.cuh"

FASTVIT_INSTANTIATE_LINEAR_GELU_FWD(cutlass::bfloat16_t)
