#include "server/kernel_executor.h"

#include <utility>

#include "absl/strings/str_format.h"
#include "server/gptq_work.h"

namespace nvfp4cal::server {

KernelExecutor::KernelExecutor(std::vector<std::unique_ptr<ScaleSearch>> backends,
                               std::vector<GptqBackends> gptq)
    : backends_(std::move(backends)), gptq_(std::move(gptq)) {}

KernelExecutor::~KernelExecutor() = default;

std::string_view KernelExecutor::BackendName() const {
  return backends_.empty() ? "none" : backends_.front()->BackendName();
}

absl::Status KernelExecutor::ExecuteBatch(int worker, absl::Span<Work* const> batch,
                                          std::vector<absl::Status>* item_status) {
  if (worker < 0 || worker >= static_cast<int>(backends_.size())) {
    return absl::InternalError(
        absl::StrFormat("no backend for worker %d (have %d)", worker, backends_.size()));
  }
  ScaleSearch& backend = *backends_[static_cast<size_t>(worker)];
  item_status->assign(batch.size(), absl::OkStatus());
  // gptq items run together after the loop (contiguous rows of a tensor as one call).
  std::vector<size_t> gptq_items;
  std::vector<RowRangeTask*> gptq_tasks;
  for (size_t i = 0; i < batch.size(); ++i) {
    RowRangeTask& task = RowRangeTaskOf(batch[i]);
    if (absl::Status s = AllocateOutputs(&task); !s.ok()) return s;
    if (task.tensor->full_hessian != nullptr) {
      gptq_items.push_back(i);
      gptq_tasks.push_back(&task);
      continue;
    }
    // The front checked the tensor's Hessian and parameters and these rows on arrival.
    (*item_status)[i] = task.rows.has_value() ? backend.QuantizeValidatedRows(
                                                    *task.rows, OutputOf(&task), &task.stats)
                                              : UncheckedRows(task);
  }
  RunGptqItems(gptq_, worker, gptq_items, gptq_tasks, item_status);
  return absl::OkStatus();
}

}  // namespace nvfp4cal::server
