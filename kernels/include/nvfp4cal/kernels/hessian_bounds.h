// Per-Hessian-block data for the exact candidate pruning of block_search.h (host only).
//
//   std::vector<HessianBlockBounds> bounds = ComputeHessianBlockBounds(hessians);
//   QuantizeBlock(w, g, s2, h_j, method, grid, &bounds[j], &identity);
#ifndef NVFP4CAL_KERNELS_HESSIAN_BOUNDS_H_
#define NVFP4CAL_KERNELS_HESSIAN_BOUNDS_H_

#include <vector>

#include "nvfp4cal/kernels/block_search.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {

// Bounds of one 16x16 block: precision_m = 1 / (S^-1)_mm of the symmetric part S, from a
// double-precision Cholesky factorisation, rounded down; all zero when S is singular or too
// ill-conditioned for the bound to be trusted (pruning then simply does not happen).
HessianBlockBounds ComputeHessianBlockBounds(const float* h);

// One entry per block of a BlockHessiansView (empty when the view is).
std::vector<HessianBlockBounds> ComputeHessianBlockBounds(const BlockHessiansView& hessians);

// The bounds of the identity (the squared-error objective).
HessianBlockBounds IdentityBounds();

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_HESSIAN_BOUNDS_H_
