// KernelExecutor: the production BatchExecutor of the CPU backend, running each row range of a
// batch (work_model.h) through ScaleSearch::QuantizeRows (the CUDA backend's is
// CudaBatchExecutor).
//
//   KernelExecutor executor({nvfp4cal::MakeCpuScaleSearch({})});   // one backend per worker
//   Scheduler scheduler(options, &executor);
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
#include "server/gptq_work.h"
#include "server/scheduler.h"
#include "server/work_model.h"

namespace nvfp4cal::server {

class KernelExecutor : public BatchExecutor {
 public:
  // backends[i] and gptq[i] serve worker i; there must be one per scheduler worker (gptq may
  // be empty: gptq items then fail with INTERNAL).
  explicit KernelExecutor(std::vector<std::unique_ptr<ScaleSearch>> backends,
                          std::vector<GptqBackends> gptq = {});
  ~KernelExecutor() override;

  // Quantizes each task (gptq tasks through RunGptqItems); an allocation failure fails the
  // batch with RESOURCE_EXHAUSTED.
  absl::Status ExecuteBatch(int worker, absl::Span<Work* const> batch,
                            std::vector<absl::Status>* item_status) override;

  // Backend name ("cpu" or "cuda").
  std::string_view BackendName() const;

 private:
  std::vector<std::unique_ptr<ScaleSearch>> backends_;
  std::vector<GptqBackends> gptq_;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_KERNEL_EXECUTOR_H_
