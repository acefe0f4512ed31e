#include "server/device_setup.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/cuda_gptq.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/gptq.h"
#include "server/cuda_batch_executor.h"
#include "server/kernel_executor.h"
#include "server/tensor_spec.h"

namespace nvfp4cal::server {
namespace {

// Far more GPUs than one host has; bounds the probing loop.
constexpr int kMaxCudaDevices = 64;

// CUDA gptq backends (streams) per device.
constexpr int kGptqStreamsPerDevice = 3;

GptqWorker CpuGptqWorker(const DeviceOptions& options) {
  CpuGptqOptions cpu;
  cpu.num_threads = options.cpu_threads_per_worker;
  return GptqWorker{MakeCpuGptq(cpu), "cpu", {}};
}

DeviceSetup CpuSetup(const DeviceOptions& options, std::string selection) {
  DeviceSetup setup;
  setup.backend = "cpu";
  setup.selection = std::move(selection);
  const int workers = std::max(1, options.cpu_workers);
  std::vector<std::unique_ptr<ScaleSearch>> backends;
  std::vector<GptqWorker> gptq;
  for (int w = 0; w < workers; ++w) {
    CpuScaleSearchOptions cpu;
    cpu.num_threads = options.cpu_threads_per_worker;
    backends.push_back(MakeCpuScaleSearch(cpu));
    gptq.push_back(CpuGptqWorker(options));
    setup.workers.push_back(WorkerDevice{"cpu", "CPU worker", options.memory_budget_bytes});
  }
  setup.executor = std::make_unique<KernelExecutor>(std::move(backends), std::move(gptq));
  return setup;
}

// One backend per CUDA device, probing ordinals until the kernels say there are no more.
absl::StatusOr<DeviceSetup> CudaSetup(const DeviceOptions& options, const std::string& why) {
  std::vector<std::unique_ptr<CudaScaleSearch>> devices;
  for (int ordinal = 0; ordinal < kMaxCudaDevices; ++ordinal) {
    CudaScaleSearchOptions cuda;
    cuda.device = ordinal;
    cuda.memory_budget_bytes = options.memory_budget_bytes;
    absl::StatusOr<std::unique_ptr<CudaScaleSearch>> device = MakeCudaScaleSearch(cuda);
    if (device.ok()) {
      devices.push_back(*std::move(device));
      continue;
    }
    const bool no_more =
        absl::IsUnavailable(device.status()) || absl::IsInvalidArgument(device.status());
    // Ordinal 0 exists (CudaDeviceAvailable said so): its failure is a configuration error.
    if (ordinal == 0 || !no_more) {
      return PrefixStatus(
          device.status(),
          absl::StrFormat("--device=%s: CUDA device %d: ", options.device, ordinal));
    }
    break;
  }
  // More workers per device, each with its own stream and workspace (ordinal-major order).
  const int per_device = std::max(1, options.cuda_workers_per_device);
  std::vector<std::unique_ptr<CudaScaleSearch>> workers;
  std::vector<int> worker_ordinal;
  for (size_t ordinal = 0; ordinal < devices.size(); ++ordinal) {
    workers.push_back(std::move(devices[ordinal]));
    worker_ordinal.push_back(static_cast<int>(ordinal));
    for (int w = 1; w < per_device; ++w) {
      CudaScaleSearchOptions cuda;
      cuda.device = static_cast<int>(ordinal);
      cuda.memory_budget_bytes = options.memory_budget_bytes;
      absl::StatusOr<std::unique_ptr<CudaScaleSearch>> more = MakeCudaScaleSearch(cuda);
      if (!more.ok()) {
        return PrefixStatus(
            more.status(),
            absl::StrFormat("--cuda_workers_per_device=%d: CUDA device %d: ", per_device, ordinal));
      }
      workers.push_back(*std::move(more));
      worker_ordinal.push_back(static_cast<int>(ordinal));
    }
  }
  // gptq on each device through the CUDA gptq backend; a device where it cannot be created runs
  // its gptq items on the CPU backend, and the start-up log says why. Plans are per device
  // ("cuda:N"), shared by its workers.
  std::vector<GptqWorker> gptq;
  std::vector<std::string> gptq_fallbacks;
  for (size_t w = 0; w < workers.size(); ++w) {
    const size_t ordinal = static_cast<size_t>(worker_ordinal[w]);
    const bool first_of_device = w == 0 || worker_ordinal[w - 1] != worker_ordinal[w];
    CudaGptqOptions cuda;
    cuda.device = static_cast<int>(ordinal);
    cuda.memory_budget_bytes = options.memory_budget_bytes;
    absl::StatusOr<std::unique_ptr<GptqBackend>> backend = MakeCudaGptq(cuda);
    if (backend.ok()) {
      gptq.push_back(GptqWorker{*std::move(backend), absl::StrCat("cuda:", ordinal), {}});
      // More streams: a batch's gptq tensors overlap on the device (each stream's group loop
      // leaves most of the GPU idle); with several workers per device they overlap already.
      for (int s = 1; s < kGptqStreamsPerDevice / per_device; ++s) {
        absl::StatusOr<std::unique_ptr<GptqBackend>> more = MakeCudaGptq(cuda);
        if (!more.ok()) break;
        gptq.back().streams.push_back(*std::move(more));
      }
      continue;
    }
    gptq.push_back(CpuGptqWorker(options));
    if (first_of_device) {
      gptq_fallbacks.push_back(
          absl::StrFormat("device %d (%s)", ordinal, backend.status().ToString()));
    }
  }
  DeviceSetup setup;
  setup.backend = "cuda";
  std::vector<std::string> names;
  for (size_t w = 0; w < workers.size(); ++w) {
    setup.workers.push_back(WorkerDevice{"cuda", workers[w]->DeviceDescription(),
                                         options.memory_budget_bytes, worker_ordinal[w]});
    if (w == 0 || worker_ordinal[w - 1] != worker_ordinal[w]) {
      names.push_back(workers[w]->DeviceDescription());
    }
  }
  setup.selection = absl::StrFormat("%s -> cuda (%s): %d worker(s), %d per GPU: %s", options.device,
                                    why, workers.size(), per_device, absl::StrJoin(names, "; "));
  if (!gptq_fallbacks.empty()) {
    absl::StrAppend(&setup.selection, "; gptq runs on the CPU backend for ",
                    absl::StrJoin(gptq_fallbacks, ", "));
  }
  setup.executor = std::make_unique<CudaBatchExecutor>(std::move(workers), std::move(gptq));
  return setup;
}

}  // namespace

absl::StatusOr<DeviceSetup> SetUpDevices(const DeviceOptions& options) {
  if (options.device == "cpu") {
    return CpuSetup(options, absl::StrFormat("cpu -> cpu (as asked): %d CPU worker(s)",
                                             std::max(1, options.cpu_workers)));
  }
  if (options.device != "auto" && options.device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device = \"", options.device, "\" is not one of auto, cpu, cuda"));
  }
  std::string reason;
  if (!CudaDeviceAvailable(&reason)) {
    if (options.device == "cuda") {
      return absl::FailedPreconditionError(
          absl::StrCat("--device=cuda: ", reason, "; use --device=cpu or --device=auto"));
    }
    return CpuSetup(options, absl::StrFormat("auto -> cpu (%s): %d CPU worker(s)", reason,
                                             std::max(1, options.cpu_workers)));
  }
  return CudaSetup(options, options.device == "auto" ? "a CUDA device is available" : "as asked");
}

}  // namespace nvfp4cal::server
