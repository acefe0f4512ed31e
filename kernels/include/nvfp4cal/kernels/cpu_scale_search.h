// CpuScaleSearch: the multithreaded CPU reference of every method.
//
// Blocks are independent given their Hessian block, so the tensor is cut into fixed row ranges
// ("tasks") that a pool of threads takes in turn. Task boundaries depend only on the tensor's
// shape, and statistics are summed per task and then in task order, so results and statistics
// are identical for any thread count. Memory beyond the output is O(threads): nothing is copied
// per candidate or per tensor.
#ifndef NVFP4CAL_KERNELS_CPU_SCALE_SEARCH_H_
#define NVFP4CAL_KERNELS_CPU_SCALE_SEARCH_H_

#include <memory>

#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {

struct CpuScaleSearchOptions {
  // Worker threads; 0 uses every hardware thread.
  int num_threads = 0;
  // Blocks per task: small enough to balance threads, large enough to amortise scheduling.
  int64_t blocks_per_task = 4096;
};

// The CPU backend. Thread-safe: concurrent calls each use their own workers.
std::unique_ptr<ScaleSearch> MakeCpuScaleSearch(const CpuScaleSearchOptions& options);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_CPU_SCALE_SEARCH_H_
