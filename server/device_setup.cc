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
  // gptq on each device through the CUDA gptq backend; a device where it cannot be created runs
  // its gptq items on the CPU backend, and the start-up log says why.
  std::vector<GptqWorker> gptq;
  std::vector<std::string> gptq_fallbacks;
  for (size_t ordinal = 0; ordinal < devices.size(); ++ordinal) {
    CudaGptqOptions cuda;
    cuda.device = static_cast<int>(ordinal);
    cuda.memory_budget_bytes = options.memory_budget_bytes;
    absl::StatusOr<std::unique_ptr<GptqBackend>> backend = MakeCudaGptq(cuda);
    if (backend.ok()) {
      gptq.push_back(GptqWorker{*std::move(backend), absl::StrCat("cuda:", ordinal), {}});
      // More streams: a batch's gptq tensors overlap on the device (each stream's group loop
      // leaves most of the GPU idle).
      for (int s = 1; s < kGptqStreamsPerDevice; ++s) {
        absl::StatusOr<std::unique_ptr<GptqBackend>> more = MakeCudaGptq(cuda);
        if (!more.ok()) break;
        gptq.back().streams.push_back(*std::move(more));
      }
      continue;
    }
    gptq.push_back(CpuGptqWorker(options));
    gptq_fallbacks.push_back(
        absl::StrFormat("device %d (%s)", ordinal, backend.status().ToString()));
  }
  DeviceSetup setup;
  setup.backend = "cuda";
  std::vector<std::string> names;
  for (size_t ordinal = 0; ordinal < devices.size(); ++ordinal) {
    const std::unique_ptr<CudaScaleSearch>& device = devices[ordinal];
    setup.workers.push_back(WorkerDevice{"cuda", device->DeviceDescription(),
                                         options.memory_budget_bytes, static_cast<int>(ordinal)});
    names.push_back(device->DeviceDescription());
  }
  setup.selection =
      absl::StrFormat("%s -> cuda (%s): %d worker(s), one per GPU: %s", options.device, why,
                      devices.size(), absl::StrJoin(names, "; "));
  if (!gptq_fallbacks.empty()) {
    absl::StrAppend(&setup.selection, "; gptq runs on the CPU backend for ",
                    absl::StrJoin(gptq_fallbacks, ", "));
  }
  setup.executor = std::make_unique<CudaBatchExecutor>(std::move(devices), std::move(gptq));
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
