#include "client/local_quantizer.h"

#include <atomic>
#include <map>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/cuda_gptq.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/gptq.h"

namespace nvfp4cal {
namespace {

// CUDA tensors in flight in-process (each stream holds a workspace of the default budget).
constexpr int kCudaStreams = 3;

// Quantizes jobs on one or more backends. With several (CUDA: one per stream), that many jobs
// are in flight, so one tensor's validation scan and host-device copies overlap another's
// kernels; results are handed over as they finish, one callback at a time, from the worker
// threads.
class LocalQuantizer : public Quantizer {
 public:
  // gptq[i] serves the worker of searches[i] (all of one kind: plans are shared between them;
  // one CPU backend may serve every worker).
  LocalQuantizer(std::vector<std::unique_ptr<ScaleSearch>> searches,
                 std::vector<std::shared_ptr<GptqBackend>> gptq, std::string description)
      : searches_(std::move(searches)),
        gptq_(std::move(gptq)),
        description_(std::move(description)) {}

  std::string Describe() const override { return description_; }

  absl::Status QuantizeAll(absl::Span<const TensorJob> jobs,
                           const QuantizeResultCallback& on_result) override {
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::vector<absl::Status> errors(jobs.size());
    // One gptq plan per full Hessian, prepared by the first job that needs it and freed after
    // the last (q/k/v and gate/up share theirs).
    plans_.clear();
    for (const TensorJob& job : jobs) {
      if (job.params.method == Method::kGptq) ++plans_[job.full_hessian.data].uses;
    }
    auto work = [&](size_t worker) {
      for (size_t i; !failed.load() && (i = next.fetch_add(1)) < jobs.size();) {
        absl::Status status = RunJob(jobs[i], worker, i, on_result);
        if (!status.ok()) {
          errors[i] = std::move(status);
          failed.store(true);
        }
      }
    };
    std::vector<std::thread> pool;
    for (size_t w = 1; w < searches_.size(); ++w) pool.emplace_back(work, w);
    work(0);
    for (std::thread& t : pool) t.join();
    for (absl::Status& s : errors) {
      if (!s.ok()) return s;  // the first failing job in order
    }
    return absl::OkStatus();
  }

 private:
  absl::Status RunJob(const TensorJob& job, size_t worker, size_t index,
                      const QuantizeResultCallback& on_result) {
    absl::StatusOr<QuantizedTensor> result;
    ScaleSearch* search = searches_[worker].get();
    if (job.params.method == Method::kGptq) {
      // Full-Hessian propagation on the worker's gptq backend, with the Hessian's shared plan.
      GptqRequest gptq;
      gptq.weights = job.weights;
      gptq.hessian = job.full_hessian;
      gptq.params = job.params;
      gptq.global_amax = job.global_amax;
      GptqBackend& backend = *gptq_[worker];
      absl::StatusOr<std::shared_ptr<const GptqPlan>> plan = Plan(backend, job);
      result = plan.ok() ? GptqQuantizeWithPlan(backend, **plan, gptq)
                         : absl::StatusOr<QuantizedTensor>(plan.status());
      ReleasePlan(job);
    } else {
      QuantizeRequest request;
      request.weights = job.weights;
      request.hessians = job.hessians;
      request.params = job.params;
      request.global_amax = job.global_amax;
      // Checked once: with the scan the caller took (its amax pass), else scanned here.
      absl::StatusOr<ValidatedRequest> validated =
          job.weight_scan.has_value() ? ValidateQuantizeRequest(request, *job.weight_scan)
                                      : ValidateQuantizeRequest(request);
      result = validated.ok() ? search->QuantizeValidated(*validated)
                              : absl::StatusOr<QuantizedTensor>(validated.status());
    }
    if (!result.ok()) {
      return absl::Status(result.status().code(),
                          absl::StrCat(job.name, ": ", result.status().message()));
    }
    // One result at a time: the callback writes the output and reports progress.
    absl::MutexLock lock(&result_mu_);
    return on_result(index, *std::move(result));
  }

  // The plan of the job's full Hessian: prepared (validated and factorised) by the first job,
  // which the others wait for; a failure is kept and returned to each.
  absl::StatusOr<std::shared_ptr<const GptqPlan>> Plan(GptqBackend& backend, const TensorJob& job) {
    PlanEntry* entry = nullptr;
    {
      absl::MutexLock lock(&plans_mu_);
      entry = &plans_[job.full_hessian.data];
    }
    return entry->plan.Get(backend, job.full_hessian, job.params);
  }

  // Frees the plan after its last job (device memory: a layer's plans are gigabytes).
  void ReleasePlan(const TensorJob& job) {
    absl::MutexLock lock(&plans_mu_);
    PlanEntry& entry = plans_[job.full_hessian.data];
    if (--entry.uses == 0) entry.plan.Release();
  }

  struct PlanEntry {
    SharedGptqPlan plan;
    int uses = 0;  // gptq jobs still to finish (guarded by plans_mu_)
  };

  std::vector<std::unique_ptr<ScaleSearch>> searches_;
  std::vector<std::shared_ptr<GptqBackend>> gptq_;
  std::string description_;
  absl::Mutex plans_mu_;
  std::map<const float*, PlanEntry> plans_;
  absl::Mutex result_mu_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Quantizer>> MakeLocalQuantizer(
    const LocalQuantizerOptions& options) {
  if (options.device != "auto" && options.device != "cpu" && options.device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be auto, cpu or cuda; got \"", options.device, "\""));
  }
  if (options.device != "cpu") {
    std::string reason;
    if (CudaDeviceAvailable(&reason)) {
      // Several streams, each with its own backend (stream and workspace): tensors overlap.
      std::vector<std::unique_ptr<ScaleSearch>> streams;
      absl::Status failure;
      std::string name;
      for (int s = 0; s < kCudaStreams; ++s) {
        CudaScaleSearchOptions cuda;
        cuda.device = options.cuda_device;
        absl::StatusOr<std::unique_ptr<CudaScaleSearch>> gpu = MakeCudaScaleSearch(cuda);
        if (!gpu.ok()) {
          failure = gpu.status();
          break;
        }
        name = (*gpu)->DeviceDescription();
        streams.push_back(*std::move(gpu));
      }
      if (!streams.empty()) {
        // gptq on the same device, one backend per stream; the CPU's for every stream when
        // the CUDA gptq backend is not available (plans must be of one kind).
        std::vector<std::shared_ptr<GptqBackend>> gptq;
        std::string gptq_note;
        for (size_t s = 0; s < streams.size(); ++s) {
          CudaGptqOptions cuda;
          cuda.device = options.cuda_device;
          absl::StatusOr<std::unique_ptr<GptqBackend>> g = MakeCudaGptq(cuda);
          if (!g.ok()) {
            gptq_note = absl::StrCat("; gptq on the cpu: ", g.status().message());
            gptq.clear();
            break;
          }
          gptq.push_back(*std::move(g));
        }
        if (gptq.empty()) {
          std::shared_ptr<GptqBackend> cpu =
              MakeCpuGptq(CpuGptqOptions{options.cpu_threads, 16, true});
          gptq.assign(streams.size(), cpu);
        }
        std::string description = absl::StrCat("in-process cuda (", name, ", ", streams.size(),
                                               " streams", gptq_note, ")");
        return std::make_unique<LocalQuantizer>(std::move(streams), std::move(gptq),
                                                std::move(description));
      }
      reason = std::string(failure.message());
    }
    if (options.device == "cuda") {
      return absl::UnavailableError(absl::StrCat("--device cuda: no usable GPU: ", reason));
    }
  }
  CpuScaleSearchOptions cpu;
  cpu.num_threads = options.cpu_threads;
  return MakeLocalQuantizer(MakeCpuScaleSearch(cpu), "in-process cpu", options.cpu_threads);
}

std::unique_ptr<Quantizer> MakeLocalQuantizer(std::unique_ptr<ScaleSearch> search,
                                              std::string description, int gptq_threads) {
  std::vector<std::unique_ptr<ScaleSearch>> searches;
  searches.push_back(std::move(search));
  std::vector<std::shared_ptr<GptqBackend>> gptq;
  gptq.push_back(MakeCpuGptq(CpuGptqOptions{gptq_threads, 16, true}));
  return std::make_unique<LocalQuantizer>(std::move(searches), std::move(gptq),
                                          std::move(description));
}

}  // namespace nvfp4cal
