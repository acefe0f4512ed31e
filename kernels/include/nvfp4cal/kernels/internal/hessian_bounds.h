// Per-Hessian-block data for the exact candidate pruning of block_search.h (host only).
//
//   std::vector<HessianBlockBounds> bounds = ComputeHessianBlockBounds(hessians);
//   QuantizeBlock(w, g, s2, h_j, method, grid, &bounds[j], &identity);
#ifndef NVFP4CAL_KERNELS_INTERNAL_HESSIAN_BOUNDS_H_
#define NVFP4CAL_KERNELS_INTERNAL_HESSIAN_BOUNDS_H_

#include <vector>

#include "nvfp4cal/kernels/internal/block_search.h"
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

// A second, stronger screen for the CUDA search: the errors of several elements M at once.
// For S positive definite and any e, e^T S e >= e_M^T C_M e_M with C_M the Schur complement of
// S onto M. C_M comes from a double-precision Cholesky factorisation of P S P^T - delta I (M last
// in P): the computed factor is the exact one of a matrix below S (delta exceeds the backward
// error), and Schur complements are monotone, so its trailing block L_MM gives
// e_M^T L_MM L_MM^T e_M <= e^T S e rigorously. M is the kScreenElements channels of highest
// precision (per block, so that the host does the factorisation once).
//
// On the device, with L_MM in fp32 and z = L_MM^T e_M evaluated in fp32,
// |L_MM^T e_M| >= |z| - kappa |e_M| with kappa = 2^-20 ||L_MM||_F (rounding of the factor and
// of the eight-term sums), hence
//   e^T S e >= (255/256) |z|^2 - 255 kappa^2 |e_M|^2,
// and the canonical objective's own rounding is subtracted as in CandidateCannotWin.
inline constexpr int kScreenElements = 8;
inline constexpr int kScreenFactorSize = kScreenElements * (kScreenElements + 1) / 2;
struct HessianBlockScreen {
  alignas(16) float factor[kScreenFactorSize + 4];  // L_MM, lower triangle row by row; padding
  float kappa_squared;                              // 255 kappa^2, rounded up
  uint8_t element[kScreenElements];                 // M; row i of L_MM is element[i]
  int32_t valid;                                    // 0: S not positive definite, no screen
  int32_t padding;
};
// `bounds` are the block's ComputeHessianBlockBounds (M is chosen by their precisions).
HessianBlockScreen ComputeHessianBlockScreen(const float* h, const HessianBlockBounds& bounds);
std::vector<HessianBlockScreen> ComputeHessianBlockScreens(
    const BlockHessiansView& hessians, const std::vector<HessianBlockBounds>& bounds);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_INTERNAL_HESSIAN_BOUNDS_H_
