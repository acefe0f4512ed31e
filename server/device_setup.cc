#include "server/device_setup.h"

#include <utility>

#include "engine/devices.h"
#include "server/cuda_batch_executor.h"
#include "server/kernel_executor.h"

namespace nvfp4cal::server {

absl::StatusOr<DeviceSetup> SetUpDevices(const DeviceOptions& options) {
  EngineOptions engine_options;
  engine_options.device = options.device;
  engine_options.workers_per_gpu = options.cuda_workers_per_device;
  engine_options.cpu_workers = options.cpu_workers;
  engine_options.cpu_threads_per_worker = options.cpu_threads_per_worker;
  engine_options.memory_budget_bytes = options.memory_budget_bytes;
  absl::StatusOr<Engine> engine = SelectDevices(engine_options);
  if (!engine.ok()) return engine.status();
  DeviceSetup setup;
  setup.backend = engine->backend;
  setup.selection = engine->selection;
  std::vector<std::unique_ptr<ScaleSearch>> cpu;
  std::vector<std::unique_ptr<CudaScaleSearch>> cuda;
  std::vector<GptqBackends> gptq;
  for (EngineWorker& worker : engine->workers) {
    setup.workers.push_back(
        WorkerDevice{worker.kind, worker.name, options.memory_budget_bytes, worker.cuda_device});
    if (worker.cuda_search != nullptr) {
      cuda.push_back(std::move(worker.cuda_search));
    } else {
      cpu.push_back(std::move(worker.cpu_search));
    }
    gptq.push_back(std::move(worker.gptq));
  }
  if (setup.backend == "cuda") {
    setup.executor = std::make_unique<CudaBatchExecutor>(std::move(cuda), std::move(gptq));
  } else {
    setup.executor = std::make_unique<KernelExecutor>(std::move(cpu), std::move(gptq));
  }
  return setup;
}

}  // namespace nvfp4cal::server
