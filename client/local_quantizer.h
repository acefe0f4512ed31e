// In-process Quantizer over the kernel library: CUDA when a device is usable, else the CPU.
//
//   nvfp4cal::LocalQuantizerOptions options;
//   options.device = "auto";   // "cpu", "cuda" (error when no GPU), "auto"
//   absl::StatusOr<std::unique_ptr<nvfp4cal::Quantizer>> q =
//       nvfp4cal::MakeLocalQuantizer(options);
#ifndef NVFP4CAL_CLIENT_LOCAL_QUANTIZER_H_
#define NVFP4CAL_CLIENT_LOCAL_QUANTIZER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "client/quantizer.h"
#include "client/trace.h"

namespace nvfp4cal {

struct LocalQuantizerOptions {
  // "auto" (CUDA when CudaDeviceAvailable, else CPU), "cpu" or "cuda".
  std::string device = "auto";
  // CPU backend threads; 0 = every hardware thread.
  int cpu_threads = 0;
  // CUDA device ordinal.
  int cuda_device = 0;
  // CUDA tensors in flight, in [1, 16]: each worker has its own stream, workspace, pinned
  // staging and gptq backend, so that one tensor's host copies and result write overlap the
  // others' kernels.
  int cuda_workers = 3;
  // When not null, each task's wait for its weights and its quantization as spans on the
  // worker's row (--trace); it must outlive the quantizer.
  Trace* trace = nullptr;
};

// The backend the options pick. INVALID_ARGUMENT for an unknown device name; UNAVAILABLE for
// "cuda" without a usable GPU (the message says why).
absl::StatusOr<std::unique_ptr<Quantizer>> MakeLocalQuantizer(const LocalQuantizerOptions& options);

// MakeLocalQuantizer on a thread of its own: returns at once, so that opening the checkpoint,
// planning and the first reads overlap the backend's start (a CUDA context, its streams and
// library handles: a noticeable part of a short run). Describe and QuantizeAll wait for the
// start; a failed start is QuantizeAll's error (and Describe says it). An unknown device name
// is INVALID_ARGUMENT here, before any work. The start goes to options.trace as a span.
absl::StatusOr<std::unique_ptr<Quantizer>> StartLocalQuantizer(
    const LocalQuantizerOptions& options);

// Wraps an existing backend (tests inject one).
// Jobs with Method::kGptq run on the CPU gptq driver (gptq.h) with `gptq_threads` threads
// (0 = all), whatever the backend.
std::unique_ptr<Quantizer> MakeLocalQuantizer(std::unique_ptr<ScaleSearch> search,
                                              std::string description, int gptq_threads = 0);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_LOCAL_QUANTIZER_H_
