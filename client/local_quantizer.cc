#include "client/local_quantizer.h"

#include <atomic>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
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
  LocalQuantizer(std::vector<std::unique_ptr<ScaleSearch>> searches, std::string description,
                 int gptq_threads)
      : searches_(std::move(searches)),
        description_(std::move(description)),
        gptq_threads_(gptq_threads) {}

  std::string Describe() const override { return description_; }

  absl::Status QuantizeAll(absl::Span<const TensorJob> jobs,
                           const QuantizeResultCallback& on_result) override {
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::vector<absl::Status> errors(jobs.size());
    auto work = [&](ScaleSearch* search) {
      for (size_t i; !failed.load() && (i = next.fetch_add(1)) < jobs.size();) {
        absl::Status status = RunJob(jobs[i], search, i, on_result);
        if (!status.ok()) {
          errors[i] = std::move(status);
          failed.store(true);
        }
      }
    };
    std::vector<std::thread> pool;
    for (size_t w = 1; w < searches_.size(); ++w) pool.emplace_back(work, searches_[w].get());
    work(searches_[0].get());
    for (std::thread& t : pool) t.join();
    for (absl::Status& s : errors) {
      if (!s.ok()) return s;  // the first failing job in order
    }
    return absl::OkStatus();
  }

 private:
  absl::Status RunJob(const TensorJob& job, ScaleSearch* search, size_t index,
                      const QuantizeResultCallback& on_result) {
    absl::StatusOr<QuantizedTensor> result;
    if (job.params.method == Method::kGptq) {
      // Full-Hessian propagation: the CPU driver (CUDA has no gptq yet).
      GptqRequest gptq;
      gptq.weights = job.weights;
      gptq.hessian = job.full_hessian;
      gptq.params = job.params;
      gptq.global_amax = job.global_amax;
      CpuGptqOptions options;
      options.num_threads = gptq_threads_;
      result = CpuGptqQuantize(gptq, options);
    } else {
      QuantizeRequest request;
      request.weights = job.weights;
      request.hessians = job.hessians;
      request.params = job.params;
      request.global_amax = job.global_amax;
      result = search->Quantize(request);
    }
    if (!result.ok()) {
      return absl::Status(result.status().code(),
                          absl::StrCat(job.name, ": ", result.status().message()));
    }
    // One result at a time: the callback writes the output and reports progress.
    absl::MutexLock lock(&result_mu_);
    return on_result(index, *std::move(result));
  }

  std::vector<std::unique_ptr<ScaleSearch>> searches_;
  std::string description_;
  int gptq_threads_;
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
        std::string description =
            absl::StrCat("in-process cuda (", name, ", ", streams.size(), " streams)");
        return std::make_unique<LocalQuantizer>(std::move(streams), std::move(description),
                                                options.cpu_threads);
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
  return std::make_unique<LocalQuantizer>(std::move(searches), std::move(description),
                                          gptq_threads);
}

}  // namespace nvfp4cal
