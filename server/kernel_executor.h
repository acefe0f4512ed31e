// KernelExecutor: the production BatchExecutor of the CPU backend, running each row range of a
// batch through ScaleSearch::QuantizeRows (the CUDA backend's is CudaBatchExecutor).
//
// A RowRangeTask is one scheduler item: a contiguous range of weight rows of one tensor plus
// everything needed to quantize it (dtype, method, global amax, the shared Hessian blocks). The
// executor fills its outputs; the service reads them in the item's done callback.
//
//   KernelExecutor executor({nvfp4cal::MakeCpuScaleSearch({})});   // one backend per worker
//   Scheduler scheduler(options, &executor);
//   auto task = std::make_shared<RowRangeTask>(...);
//   scheduler.Enqueue(job, MakeRowRangeItem(task, [task](const WorkOutcome& o) { ... }));
#ifndef NVFP4CAL_SERVER_KERNEL_EXECUTOR_H_
#define NVFP4CAL_SERVER_KERNEL_EXECUTOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nvfp4cal/kernels/gptq.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "server/scheduler.h"

namespace nvfp4cal::server {

class FullHessian;  // gptq_work.h

// The gptq backend of one scheduler worker (gptq_work.h runs tasks with it).
struct GptqWorker {
  std::unique_ptr<GptqBackend> backend;
  // Where its plans live: "cpu" (a CPU plan serves every CPU backend) or "cuda:N".
  std::string device;
  // More backends on the same device (CUDA streams): the gptq runs of different tensors in one
  // batch go to `backend` and these in parallel, sharing the device's plans.
  std::vector<std::unique_ptr<GptqBackend>> streams;
};

// What a tensor's row ranges share.
struct TensorInput {
  // The tensor's name as the client sent it (for logs and test hooks; never interpreted).
  std::string name;
  // Element type of the weights.
  DType dtype = DType::kBFloat16;
  // Columns (in features).
  int64_t cols = 0;
  // Method and parameters.
  SearchParams params;
  // g for every range of the tensor.
  float global_amax = 0.0f;
  // [cols / 16, 16, 16] fp32 Hessian blocks; null when the tensor has none (and for gptq).
  std::shared_ptr<const std::vector<float>> hessian_blocks;
  // Method gptq: the full Hessian with its plans (gptq_work.h); null otherwise.
  std::shared_ptr<FullHessian> full_hessian;
};

// One scheduler item: rows [row_begin, row_begin + num_rows) of a tensor.
struct RowRangeTask {
  std::shared_ptr<const TensorInput> tensor;
  // Bytes holding the rows (possibly a whole buffered tensor); the range starts at byte_offset.
  std::shared_ptr<const std::string> weights;
  size_t byte_offset = 0;
  int64_t row_begin = 0;
  int64_t num_rows = 0;

  // Outputs, filled by the executor.
  std::string packed_codes;
  std::string scales;
  TensorStats stats;

  // Device memory the item needs while it runs (input rows, outputs, Hessian blocks; gptq: the
  // fp32 working rows, while its plan is accounted by the full-Hessian budget).
  int64_t MemoryBytes() const;
};

// Wraps a task as a scheduler item.
WorkItem MakeRowRangeItem(std::shared_ptr<RowRangeTask> task,
                          std::function<void(const WorkOutcome&)> done);

// The task inside an item made by MakeRowRangeItem (what executors receive as Work).
RowRangeTask& RowRangeTaskOf(Work* work);

// Sizes the task's outputs for its rows; RESOURCE_EXHAUSTED when host memory runs out.
absl::Status AllocateOutputs(RowRangeTask* task);

// The kernels' request for the task's rows (pointing into the task; valid while it lives).
QuantizeRequest RequestOf(const RowRangeTask& task);

// Spans over the task's allocated outputs.
RowRangeOutput OutputOf(RowRangeTask* task);

class KernelExecutor : public BatchExecutor {
 public:
  // backends[i] and gptq[i] serve worker i; there must be one per scheduler worker (gptq may
  // be empty: gptq items then fail with INTERNAL).
  explicit KernelExecutor(std::vector<std::unique_ptr<ScaleSearch>> backends,
                          std::vector<GptqWorker> gptq = {});
  ~KernelExecutor() override;

  // Quantizes each task (gptq tasks through RunGptqItems); an allocation failure fails the
  // batch with RESOURCE_EXHAUSTED.
  absl::Status ExecuteBatch(int worker, absl::Span<Work* const> batch,
                            std::vector<absl::Status>* item_status) override;

  // Backend name ("cpu" or "cuda").
  std::string_view BackendName() const;

 private:
  std::vector<std::unique_ptr<ScaleSearch>> backends_;
  std::vector<GptqWorker> gptq_;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_KERNEL_EXECUTOR_H_
