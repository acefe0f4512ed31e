// BlockStatistics: the error sums and block counts the CUDA kernels accumulate on the device (a
// tile's in the scale search, a row's in gptq), and their conversion into TensorStats on the
// host. Not installed.
//
//   std::vector<BlockStatistics> sums = ...;  // copied back from the device
//   TensorStats part;
//   for (const BlockStatistics& s : sums) AddBlockStatistics(s, ObjectiveUnit(s2), &part);
#ifndef NVFP4CAL_KERNELS_CUDA_BLOCK_STATISTICS_H_
#define NVFP4CAL_KERNELS_CUDA_BLOCK_STATISTICS_H_

#include <cstdint>

#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal::cuda_internal {

// Sums in error units (the host scales them by ObjectiveUnit) and counts of blocks.
struct BlockStatistics {
  double mse_before;
  double mse_after;
  double hessian_before;
  double hessian_after;
  int32_t blocks;
  int32_t scale_changed;
  int32_t beta_not_one;
  int32_t offset_not_zero;
  int32_t zero_hessian;
  int32_t padding;
};
static_assert(sizeof(BlockStatistics) == 56, "workspace sizes and chunking depend on it");

// Adds `s` into `part`: the error sums times `unit` (ObjectiveUnit of the global scale), the
// counts as they are.
inline void AddBlockStatistics(const BlockStatistics& s, double unit, TensorStats* part) {
  part->num_blocks += s.blocks;
  part->mse_before += unit * s.mse_before;
  part->mse_after += unit * s.mse_after;
  part->hessian_error_before += unit * s.hessian_before;
  part->hessian_error_after += unit * s.hessian_after;
  part->blocks_scale_changed += s.scale_changed;
  part->blocks_beta_not_one += s.beta_not_one;
  part->blocks_offset_not_zero += s.offset_not_zero;
  part->zero_hessian_blocks += s.zero_hessian;
}

}  // namespace nvfp4cal::cuda_internal

#endif  // NVFP4CAL_KERNELS_CUDA_BLOCK_STATISTICS_H_
