// The scale-search kernels as the host sees them (not installed): the work layout a launch reads
// and host-callable launchers (scale_search_kernels.cu holds the kernels).
//
// Work is cut into tiles of kRowsPerTile rows x one 16-column block of one tensor slice; one CUDA
// block of kRowsPerTile threads runs a tile, one thread per row, and writes the tile's
// statistics to tile_stats[tile].
//
//   NVFP4_CUDA_RETURN_IF_ERROR(SetScaleSearchKernelAttributes());  // once per device
//   NVFP4_CUDA_RETURN_IF_ERROR(LaunchQuantizeTiles(CudaSearchAlgorithm::kPruned, num_tiles,
//                                                  stream, slices, tiles, stats));
#ifndef NVFP4CAL_KERNELS_CUDA_SCALE_SEARCH_KERNELS_H_
#define NVFP4CAL_KERNELS_CUDA_SCALE_SEARCH_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "block_statistics.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"

namespace nvfp4cal::cuda_internal {

// Rows of one tile, and threads of the CUDA block that runs it.
constexpr int kRowsPerTile = 128;

// One tensor row range as the kernels see it (device pointers).
struct DeviceSlice {
  const void* weights;                 // rows x cols, row-major
  const float* hessians;               // [cols / 16, 16, 16] or null
  const HessianBlockBounds* bounds;    // per Hessian block (pruned search), null with hessians
  const HessianBlockBounds* identity;  // bounds of the squared-error objective
  const HessianBlockScreen* screens;   // per Hessian block (pruned search), null with hessians
  const float* dss_scales;  // [126][2n + 1]: DssQuantScale of every (candidate, beta), or null
  uint8_t* codes;           // rows x cols / 2
  uint8_t* scales;          // rows x cols / 16
  int64_t rows;
  int64_t cols;
  float global_amax;
  float global_scale;
  int dtype;
  int method;
  DssGrid grid;
};

struct Tile {
  int32_t slice;
  int32_t col_block;
  int64_t row0;
};

// Statistics of one tile in error units (the slice's ObjectiveUnit converts them on the host).
struct TileStats {
  BlockStatistics sums;
  int64_t evaluations;  // canonical evaluations by the pruned search's queues
};
static_assert(sizeof(TileStats) == 64, "workspace sizes and chunking depend on it");

// Sets what the kernels need on the current device before their first launch (the pruned
// kernel's dynamic shared memory above 48 KiB).
cudaError_t SetScaleSearchKernelAttributes();

// Enqueues the kernel of `search` over tiles[0, num_tiles) on `stream`; returns the launch's
// error. Grid x is limited to 2^31 - 1 tiles, far beyond any memory budget.
cudaError_t LaunchQuantizeTiles(CudaSearchAlgorithm search, unsigned num_tiles, cudaStream_t stream,
                                const DeviceSlice* slices, const Tile* tiles,
                                TileStats* tile_stats);

}  // namespace nvfp4cal::cuda_internal

#endif  // NVFP4CAL_KERNELS_CUDA_SCALE_SEARCH_KERNELS_H_
