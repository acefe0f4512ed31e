// CUDA gptq factory for builds without the CUDA toolkit.
#include "nvfp4cal/kernels/cuda_gptq.h"

namespace nvfp4cal {

absl::StatusOr<std::unique_ptr<GptqBackend>> MakeCudaGptq(const CudaGptqOptions&) {
  return absl::UnavailableError(
      "the CUDA gptq backend is not available: nvfp4cal was built without CUDA");
}

}  // namespace nvfp4cal
