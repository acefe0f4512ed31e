// Device setup: the server's scheduler workers and executor over the engine's device selection
// (engine/devices.h: --device auto|cpu|cuda, workers per GPU, gptq backends and their fallback,
// the one-line `selection` the server logs at start). The CPU workers run batches through
// KernelExecutor, the GPU workers through CudaBatchExecutor.
//
//   absl::StatusOr<DeviceSetup> setup = SetUpDevices(options.devices);
//   if (!setup.ok()) return setup.status();
//   std::cerr << setup->selection << "\n";
//   SchedulerOptions scheduler_options;
//   scheduler_options.num_workers = static_cast<int>(setup->workers.size());
//   Scheduler scheduler(scheduler_options, setup->executor.get());
#ifndef NVFP4CAL_SERVER_DEVICE_SETUP_H_
#define NVFP4CAL_SERVER_DEVICE_SETUP_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/scheduler.h"
#include "server/server_options.h"

namespace nvfp4cal::server {

// One scheduler worker's device, as GetServerInfo lists it.
struct WorkerDevice {
  // "cpu" or "cuda".
  std::string kind;
  // "CPU worker" or the GPU's description, e.g. "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, ...)".
  std::string name;
  // Memory one batch may use on it.
  int64_t memory_budget_bytes = 0;
  // CUDA device ordinal; -1 for the CPU.
  int cuda_device = -1;
};

struct DeviceSetup {
  // Kernel backend: "cpu" or "cuda".
  std::string backend;
  // Which backend --device chose and why, one line for the start-up log.
  std::string selection;
  // workers[i] is scheduler worker i.
  std::vector<WorkerDevice> workers;
  // Runs the scheduler's batches; one worker per entry of `workers`.
  std::unique_ptr<BatchExecutor> executor;
};

// Builds the backends for options.device. Errors: INVALID_ARGUMENT for an unknown --device,
// FAILED_PRECONDITION for --device=cuda without a usable device, and the CUDA backend's own
// error when a present device cannot be set up (e.g. a memory budget below its minimum).
absl::StatusOr<DeviceSetup> SetUpDevices(const DeviceOptions& options);

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_DEVICE_SETUP_H_
