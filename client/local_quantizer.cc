#include "client/local_quantizer.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/gptq.h"

namespace nvfp4cal {
namespace {

class LocalQuantizer : public Quantizer {
 public:
  LocalQuantizer(std::unique_ptr<ScaleSearch> search, std::string description, int gptq_threads)
      : search_(std::move(search)),
        description_(std::move(description)),
        gptq_threads_(gptq_threads) {}

  std::string Describe() const override { return description_; }

  absl::Status QuantizeAll(absl::Span<const TensorJob> jobs,
                           const QuantizeResultCallback& on_result) override {
    // One tensor at a time: each backend call already uses every CPU thread or the whole GPU.
    for (size_t i = 0; i < jobs.size(); ++i) {
      const TensorJob& job = jobs[i];
      if (job.params.method == Method::kGptq) {
        // Full-Hessian propagation: the CPU driver (CUDA has no gptq yet).
        GptqRequest gptq;
        gptq.weights = job.weights;
        gptq.hessian = job.full_hessian;
        gptq.params = job.params;
        gptq.global_amax = job.global_amax;
        CpuGptqOptions options;
        options.num_threads = gptq_threads_;
        absl::StatusOr<QuantizedTensor> result = CpuGptqQuantize(gptq, options);
        if (!result.ok()) {
          return absl::Status(result.status().code(),
                              absl::StrCat(job.name, ": ", result.status().message()));
        }
        absl::Status status = on_result(i, *std::move(result));
        if (!status.ok()) return status;
        continue;
      }
      QuantizeRequest request;
      request.weights = job.weights;
      request.hessians = job.hessians;
      request.params = job.params;
      request.global_amax = job.global_amax;
      absl::StatusOr<QuantizedTensor> result = search_->Quantize(request);
      if (!result.ok()) {
        return absl::Status(result.status().code(),
                            absl::StrCat(job.name, ": ", result.status().message()));
      }
      absl::Status status = on_result(i, *std::move(result));
      if (!status.ok()) return status;
    }
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<ScaleSearch> search_;
  std::string description_;
  int gptq_threads_;
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
      CudaScaleSearchOptions cuda;
      cuda.device = options.cuda_device;
      absl::StatusOr<std::unique_ptr<CudaScaleSearch>> gpu = MakeCudaScaleSearch(cuda);
      if (gpu.ok()) {
        std::string description =
            absl::StrCat("in-process cuda (", (*gpu)->DeviceDescription(), ")");
        return MakeLocalQuantizer(*std::move(gpu), std::move(description), options.cpu_threads);
      }
      reason = std::string(gpu.status().message());
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
  return std::make_unique<LocalQuantizer>(std::move(search), std::move(description), gptq_threads);
}

}  // namespace nvfp4cal
