// CUDA runtime errors as absl::Status, and early returns on errors, shared by the CUDA backends
// (not installed).
#ifndef NVFP4CAL_KERNELS_CUDA_CUDA_STATUS_H_
#define NVFP4CAL_KERNELS_CUDA_CUDA_STATUS_H_

#include <cuda_runtime.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace nvfp4cal {

// RESOURCE_EXHAUSTED for a failed allocation (callers may retry with less), INTERNAL otherwise.
inline absl::Status CudaStatus(cudaError_t error, const char* what) {
  const std::string message = absl::StrFormat("CUDA %s failed: %s (%s)", what,
                                              cudaGetErrorString(error), cudaGetErrorName(error));
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

}  // namespace nvfp4cal

// Returns the error of a CUDA runtime call (clearing the sticky last error).
#define NVFP4_CUDA_RETURN_IF_ERROR(expr)      \
  do {                                        \
    const cudaError_t nvfp4_error_ = (expr);  \
    if (nvfp4_error_ != cudaSuccess) {        \
      (void)cudaGetLastError();               \
      return CudaStatus(nvfp4_error_, #expr); \
    }                                         \
  } while (0)

// Returns a non-OK absl::Status.
#define NVFP4_RETURN_IF_ERROR(expr)                \
  do {                                             \
    const absl::Status nvfp4_status_ = (expr);     \
    if (!nvfp4_status_.ok()) return nvfp4_status_; \
  } while (0)

#endif  // NVFP4CAL_KERNELS_CUDA_CUDA_STATUS_H_
