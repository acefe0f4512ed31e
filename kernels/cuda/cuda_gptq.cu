// CUDA gptq backend (cuda_gptq.h). Work in progress: the factory reports UNIMPLEMENTED until the
// device implementation lands; callers fall back to the CPU backend.
#include "nvfp4cal/kernels/cuda_gptq.h"

namespace nvfp4cal {

absl::StatusOr<std::unique_ptr<GptqBackend>> MakeCudaGptq(const CudaGptqOptions&) {
  return absl::UnimplementedError("the CUDA gptq backend is not implemented yet");
}

}  // namespace nvfp4cal
