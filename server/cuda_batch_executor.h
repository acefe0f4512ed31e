// CudaBatchExecutor: the BatchExecutor of the CUDA backend. A whole scheduler batch (row
// ranges of many tensors from many sessions and jobs, each with its own method, Hessian and
// global scale) goes to its worker's GPU in one CudaScaleSearch::QuantizeBatch call, which packs
// it into as few kernel launches as the device memory budget allows. That is what batching
// across jobs is for.
//
// Errors: RESOURCE_EXHAUSTED from the device (a failed allocation) fails the whole batch, and
// the scheduler fails the jobs in it; the backend stays usable for the next batch. Any other
// batch error (which the server's own validation should make impossible) is attributed item by
// item by running the items one at a time, so one bad item cannot fail its neighbours.
//
// Items of method gptq do not fit QuantizeBatch (they need a prepared full-Hessian plan): they
// run through the worker's GptqBackends (RunGptqItems, gptq_work.h), the CUDA gptq backends
// or, when those could not be created, the CPU one.
//
//   std::vector<std::unique_ptr<CudaScaleSearch>> gpus;   // one per device ordinal
//   gpus.push_back(*std::move(MakeCudaScaleSearch({/*device=*/0, budget, nullptr})));
//   CudaBatchExecutor executor(std::move(gpus));
//   SchedulerOptions scheduler_options;
//   scheduler_options.num_workers = executor.num_devices();   // worker i runs on gpus[i]
//   Scheduler scheduler(scheduler_options, &executor);
#ifndef NVFP4CAL_SERVER_CUDA_BATCH_EXECUTOR_H_
#define NVFP4CAL_SERVER_CUDA_BATCH_EXECUTOR_H_

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "server/kernel_executor.h"
#include "server/scheduler.h"

namespace nvfp4cal::server {

class CudaBatchExecutor : public BatchExecutor {
 public:
  // devices[i] and gptq[i] serve scheduler worker i (gptq may be empty: gptq items then fail
  // with INTERNAL).
  explicit CudaBatchExecutor(std::vector<std::unique_ptr<CudaScaleSearch>> devices,
                             std::vector<GptqBackends> gptq = {});

  // Quantizes the batch's RowRangeTasks (see kernel_executor.h) in one QuantizeBatch call.
  absl::Status ExecuteBatch(int worker, absl::Span<Work* const> batch,
                            std::vector<absl::Status>* item_status) override;

  // Number of devices (scheduler workers).
  int num_devices() const { return static_cast<int>(devices_.size()); }
  // CudaScaleSearch::DeviceDescription of device i.
  std::string DeviceDescription(int i) const;

 private:
  std::vector<std::unique_ptr<CudaScaleSearch>> devices_;
  std::vector<GptqBackends> gptq_;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_CUDA_BATCH_EXECUTOR_H_
