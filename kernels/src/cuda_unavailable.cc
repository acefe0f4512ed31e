// CUDA backend entry points for builds without the CUDA toolkit.
#include "nvfp4cal/kernels/cuda_scale_search.h"

namespace nvfp4cal {

bool CudaDeviceAvailable(std::string* reason) {
  if (reason != nullptr)
    *reason = "nvfp4cal was built without CUDA (nvcc not found at configure time)";
  return false;
}

absl::Status CudaDeviceMemory(int, int64_t*, int64_t*) {
  return absl::UnavailableError("nvfp4cal was built without CUDA");
}

absl::StatusOr<std::unique_ptr<CudaScaleSearch>> MakeCudaScaleSearch(
    const CudaScaleSearchOptions&) {
  return absl::UnavailableError(
      "the CUDA backend is not available: nvfp4cal was built without CUDA");
}

}  // namespace nvfp4cal
