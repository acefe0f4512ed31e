// Device selection: where quantization runs, for the embedded engine of the CLI and for the
// server alike. One call decides the backend (--device auto|cpu|cuda), builds the workers (a
// scale-search backend each, with the gptq backends beside it) and says in one line what it
// chose and why.
//
//   auto  CUDA when CudaDeviceAvailable() says a device is usable, else the CPU.
//   cpu   `cpu_workers` CPU workers.
//   cuda  the GPUs; FAILED_PRECONDITION naming the reason when none is usable.
//
// On a GPU each worker has its own stream and workspace, so one worker's copies and host-side
// work overlap another's kernels. gptq runs on the CUDA gptq backend of the worker's device, or
// on the CPU backend when that cannot be created (the selection line then says why); plans are
// shared within a worker's plan domain ("cpu" or "cuda:N", see gptq_plan_cache.h).
//
// GPUs are counted without CUDA headers: MakeCudaScaleSearch is tried with ordinals 0, 1, ...
// until it answers UNAVAILABLE or INVALID_ARGUMENT (ordinal out of range).
//
//   nvfp4cal::EngineOptions options;          // device "auto", 3 workers per GPU
//   absl::StatusOr<nvfp4cal::Engine> engine = nvfp4cal::SelectDevices(options);
//   if (!engine.ok()) return engine.status();
//   std::cerr << engine->selection << "\n";  // "auto -> cuda (a CUDA device is available): ..."
//   for (nvfp4cal::EngineWorker& w : engine->workers) ... w.search() ... w.gptq.streams[0] ...
#ifndef NVFP4CAL_ENGINE_DEVICES_H_
#define NVFP4CAL_ENGINE_DEVICES_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/gptq.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {

struct EngineOptions {
  // "auto", "cpu" or "cuda".
  std::string device = "auto";
  // The GPU to use; -1 = every GPU of the machine (the server), an ordinal = that one only.
  int cuda_device = -1;
  // Workers per GPU, each with its own CUDA stream and workspace.
  int workers_per_gpu = 3;
  // gptq backends (CUDA streams) per GPU in all, spread over its workers: each worker gets
  // max(1, gptq_streams_per_gpu / workers_per_gpu).
  int gptq_streams_per_gpu = 3;
  // Workers when the CPU backend is chosen.
  int cpu_workers = 1;
  // Threads of each CPU worker (scale search and gptq); 0 = every hardware thread.
  int cpu_threads_per_worker = 0;
  // Device memory one call of a CUDA backend may hold; 0 = each backend's own default.
  int64_t memory_budget_bytes = 0;
  // With "auto": a usable GPU whose backend cannot be set up (device memory taken by another
  // process, a budget below the minimum) falls back to the CPU (true) or is an error (false).
  bool auto_falls_back_to_cpu = false;
};

// The gptq backends of one worker. streams[0] always exists; more are streams on the same
// device that take different tensors in parallel. Plans are shared within `plan_domain`
// ("cpu": a CPU plan serves every CPU backend; "cuda:N": device N's memory).
struct GptqBackends {
  std::vector<std::shared_ptr<GptqBackend>> streams;
  std::string plan_domain;
};

// One worker: a scale-search backend and its gptq backends.
struct EngineWorker {
  // "cpu" or "cuda".
  std::string kind;
  // "CPU worker" or the GPU's description, e.g. "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, ...)".
  std::string name;
  // CUDA device ordinal; -1 for the CPU.
  int cuda_device = -1;
  // The backend: exactly one of the two is set, by `kind` (the server's CUDA executor needs the
  // CUDA type for whole batches); cpu_search may also be a backend a test injects.
  std::unique_ptr<ScaleSearch> cpu_search;
  std::unique_ptr<CudaScaleSearch> cuda_search;
  GptqBackends gptq;

  ScaleSearch& search() const {
    return cuda_search != nullptr ? static_cast<ScaleSearch&>(*cuda_search) : *cpu_search;
  }
};

struct Engine {
  // "cpu" or "cuda".
  std::string backend;
  // What was chosen and why, one line, e.g. "auto -> cpu (no CUDA device present): 1 CPU
  // worker(s)" or "cuda -> cuda (as asked): 3 worker(s), 3 per GPU: NVIDIA H100 ...".
  std::string selection;
  // Device-major: a GPU's workers are adjacent.
  std::vector<EngineWorker> workers;
  // Why gptq runs on the CPU backend on some GPUs ("device 0 (UNAVAILABLE: ...)"); empty when
  // it runs on every GPU (or the backend is the CPU).
  std::string gptq_fallback;
};

// INVALID_ARGUMENT naming the value unless `device` is "auto", "cpu" or "cuda".
absl::Status CheckDeviceName(const std::string& device);

// Errors: INVALID_ARGUMENT for an unknown device name or an option out of range;
// FAILED_PRECONDITION for "cuda" without a usable device; a present device that cannot be set
// up: the backend's own error prefixed with the device (unless auto_falls_back_to_cpu).
absl::StatusOr<Engine> SelectDevices(const EngineOptions& options);

// The CPU workers alone (tests and the CPU path of SelectDevices).
Engine CpuEngine(const EngineOptions& options, std::string selection);

// One CPU worker around `search` (the CPU backend, or one a test injects), with the CPU gptq
// backend on `threads` threads (0 = every hardware thread).
EngineWorker CpuWorker(std::unique_ptr<ScaleSearch> search, int threads);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_ENGINE_DEVICES_H_
