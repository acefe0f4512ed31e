#include "engine/devices.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/cuda_gptq.h"

namespace nvfp4cal {

absl::Status CheckDeviceName(const std::string& device) {
  if (device != "auto" && device != "cpu" && device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device = \"", device, "\" is not one of auto, cpu, cuda"));
  }
  return absl::OkStatus();
}

namespace {

// Far more GPUs than one host has; bounds the probing loop.
constexpr int kMaxCudaDevices = 64;

absl::Status Prefixed(const absl::Status& status, const std::string& prefix) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

GptqBackends CpuGptq(int threads) {
  CpuGptqOptions cpu;
  cpu.num_threads = threads;
  GptqBackends gptq;
  gptq.streams.push_back(MakeCpuGptq(cpu));
  gptq.plan_domain = "cpu";
  return gptq;
}

CudaScaleSearchOptions CudaSearchOptions(const EngineOptions& options, int ordinal) {
  CudaScaleSearchOptions cuda;
  cuda.device = ordinal;
  if (options.memory_budget_bytes > 0) cuda.memory_budget_bytes = options.memory_budget_bytes;
  return cuda;
}

// The gptq backends of one worker on `ordinal`: CUDA streams, or the CPU backend with the
// CUDA backend's error in *fallback.
GptqBackends CudaGptq(const EngineOptions& options, int ordinal, int streams,
                      absl::Status* fallback) {
  CudaGptqOptions cuda;
  cuda.device = ordinal;
  if (options.memory_budget_bytes > 0) cuda.memory_budget_bytes = options.memory_budget_bytes;
  GptqBackends gptq;
  gptq.plan_domain = absl::StrCat("cuda:", ordinal);
  for (int s = 0; s < streams; ++s) {
    absl::StatusOr<std::unique_ptr<GptqBackend>> backend = MakeCudaGptq(cuda);
    if (!backend.ok()) {
      if (s > 0) break;  // fewer streams; the device works
      *fallback = backend.status();
      return CpuGptq(options.cpu_threads_per_worker);
    }
    gptq.streams.push_back(*std::move(backend));
  }
  return gptq;
}

// The scale-search backends of the GPUs: `cuda_device` alone, or every ordinal until the
// kernels say there are no more.
absl::StatusOr<std::vector<std::unique_ptr<CudaScaleSearch>>> OpenGpus(
    const EngineOptions& options) {
  std::vector<std::unique_ptr<CudaScaleSearch>> gpus;
  const int first = std::max(0, options.cuda_device);
  const int last = options.cuda_device >= 0 ? options.cuda_device + 1 : kMaxCudaDevices;
  for (int ordinal = first; ordinal < last; ++ordinal) {
    absl::StatusOr<std::unique_ptr<CudaScaleSearch>> gpu =
        MakeCudaScaleSearch(CudaSearchOptions(options, ordinal));
    if (gpu.ok()) {
      gpus.push_back(*std::move(gpu));
      continue;
    }
    const bool no_more = absl::IsUnavailable(gpu.status()) || absl::IsInvalidArgument(gpu.status());
    // The first ordinal exists (CudaDeviceAvailable said so): its failure is a configuration
    // error, as is any error that is not "no such device".
    if (ordinal == first || !no_more) {
      return Prefixed(gpu.status(),
                      absl::StrFormat("--device=%s: CUDA device %d: ", options.device, ordinal));
    }
    break;
  }
  return gpus;
}

absl::StatusOr<Engine> CudaEngine(const EngineOptions& options, const std::string& why) {
  absl::StatusOr<std::vector<std::unique_ptr<CudaScaleSearch>>> gpus = OpenGpus(options);
  if (!gpus.ok()) return gpus.status();
  const int per_gpu = options.workers_per_gpu;
  const int gptq_streams = std::max(1, options.gptq_streams_per_gpu / per_gpu);
  Engine engine;
  engine.backend = "cuda";
  std::vector<std::string> names;
  std::vector<std::string> gptq_fallbacks;
  for (std::unique_ptr<CudaScaleSearch>& gpu : *gpus) {
    const int ordinal = options.cuda_device >= 0
                            ? options.cuda_device
                            : static_cast<int>(names.size());  // probed in order from 0
    names.push_back(gpu->DeviceDescription());
    absl::Status gptq_fallback;
    for (int w = 0; w < per_gpu; ++w) {
      EngineWorker worker;
      worker.kind = "cuda";
      worker.name = names.back();
      worker.cuda_device = ordinal;
      if (w == 0) {
        worker.cuda_search = std::move(gpu);
      } else {
        absl::StatusOr<std::unique_ptr<CudaScaleSearch>> more =
            MakeCudaScaleSearch(CudaSearchOptions(options, ordinal));
        if (!more.ok()) {
          return Prefixed(
              more.status(),
              absl::StrFormat("CUDA device %d, worker %d of %d: ", ordinal, w + 1, per_gpu));
        }
        worker.cuda_search = *std::move(more);
      }
      worker.gptq = gptq_fallback.ok() ? CudaGptq(options, ordinal, gptq_streams, &gptq_fallback)
                                       : CpuGptq(options.cpu_threads_per_worker);
      engine.workers.push_back(std::move(worker));
    }
    if (!gptq_fallback.ok()) {
      gptq_fallbacks.push_back(
          absl::StrFormat("device %d (%s)", ordinal, gptq_fallback.ToString()));
    }
  }
  engine.selection =
      absl::StrFormat("%s -> cuda (%s): %d worker(s), %d per GPU: %s", options.device, why,
                      engine.workers.size(), per_gpu, absl::StrJoin(names, "; "));
  if (!gptq_fallbacks.empty()) {
    engine.gptq_fallback = absl::StrJoin(gptq_fallbacks, ", ");
    absl::StrAppend(&engine.selection, "; gptq runs on the CPU backend for ", engine.gptq_fallback);
  }
  return engine;
}

absl::Status CheckOptions(const EngineOptions& options) {
  if (absl::Status s = CheckDeviceName(options.device); !s.ok()) return s;
  struct Range {
    const char* name;
    int64_t value;
    int64_t min;
    int64_t max;
  };
  for (const Range& r : {Range{"workers per GPU", options.workers_per_gpu, 1, 16},
                         Range{"gptq streams per GPU", options.gptq_streams_per_gpu, 1, 64},
                         Range{"CPU workers", options.cpu_workers, 1, 1024},
                         Range{"CPU threads per worker", options.cpu_threads_per_worker, 0, 4096},
                         Range{"CUDA device", options.cuda_device, -1, kMaxCudaDevices - 1}}) {
    if (r.value < r.min || r.value > r.max) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s = %d is out of range [%d, %d]", r.name, r.value, r.min, r.max));
    }
  }
  return absl::OkStatus();
}

}  // namespace

Engine CpuEngine(const EngineOptions& options, std::string selection) {
  Engine engine;
  engine.backend = "cpu";
  engine.selection = std::move(selection);
  for (int w = 0; w < std::max(1, options.cpu_workers); ++w) {
    CpuScaleSearchOptions cpu;
    cpu.num_threads = options.cpu_threads_per_worker;
    engine.workers.push_back(CpuWorker(MakeCpuScaleSearch(cpu), options.cpu_threads_per_worker));
  }
  return engine;
}

EngineWorker CpuWorker(std::unique_ptr<ScaleSearch> search, int threads) {
  EngineWorker worker;
  worker.kind = "cpu";
  worker.name = "CPU worker";
  worker.cpu_search = std::move(search);
  worker.gptq = CpuGptq(threads);
  return worker;
}

absl::StatusOr<Engine> SelectDevices(const EngineOptions& options) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  const int cpu_workers = options.cpu_workers;
  if (options.device == "cpu") {
    return CpuEngine(options,
                     absl::StrFormat("cpu -> cpu (as asked): %d CPU worker(s)", cpu_workers));
  }
  std::string reason;
  if (!CudaDeviceAvailable(&reason)) {
    if (options.device == "cuda") {
      return absl::FailedPreconditionError(
          absl::StrCat("--device=cuda: ", reason, "; use --device=cpu or --device=auto"));
    }
    return CpuEngine(options,
                     absl::StrFormat("auto -> cpu (%s): %d CPU worker(s)", reason, cpu_workers));
  }
  absl::StatusOr<Engine> cuda =
      CudaEngine(options, options.device == "auto" ? "a CUDA device is available" : "as asked");
  if (cuda.ok() || options.device != "auto" || !options.auto_falls_back_to_cpu) return cuda;
  return CpuEngine(options, absl::StrFormat("auto -> cpu (%s): %d CPU worker(s)",
                                            cuda.status().message(), cpu_workers));
}

}  // namespace nvfp4cal
