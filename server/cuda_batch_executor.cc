#include "server/cuda_batch_executor.h"

#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "server/gptq_work.h"
#include "server/kernel_executor.h"

namespace nvfp4cal::server {

CudaBatchExecutor::CudaBatchExecutor(std::vector<std::unique_ptr<CudaScaleSearch>> devices,
                                     std::vector<GptqBackends> gptq)
    : devices_(std::move(devices)), gptq_(std::move(gptq)) {}

std::string CudaBatchExecutor::DeviceDescription(int i) const {
  return devices_.at(static_cast<size_t>(i))->DeviceDescription();
}

absl::Status CudaBatchExecutor::ExecuteBatch(int worker, absl::Span<Work* const> batch,
                                             std::vector<absl::Status>* item_status) {
  if (worker < 0 || worker >= num_devices()) {
    return absl::InternalError(
        absl::StrFormat("no CUDA device for worker %d (have %d)", worker, num_devices()));
  }
  CudaScaleSearch& device = *devices_[static_cast<size_t>(worker)];
  item_status->assign(batch.size(), absl::OkStatus());
  // gptq items run together after the loop (contiguous rows of a tensor as one call).
  std::vector<size_t> gptq_items;
  std::vector<RowRangeTask*> gptq_tasks;

  std::vector<CudaScaleSearch::Slice> slices;
  // slices[k] is batch[sliced[k]]; gptq items run on their own below.
  std::vector<size_t> sliced;
  slices.reserve(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    RowRangeTask& task = RowRangeTaskOf(batch[i]);
    if (absl::Status s = AllocateOutputs(&task); !s.ok()) return s;
    if (task.tensor->full_hessian != nullptr) {
      gptq_items.push_back(i);
      gptq_tasks.push_back(&task);
      continue;
    }
    if (!task.rows.has_value()) {
      (*item_status)[i] = UncheckedRows(task);
      continue;
    }
    // Sessions and jobs validated the header, the Hessian and every chunk's rows on arrival.
    sliced.push_back(i);
    slices.push_back(CudaScaleSearch::Slice::Of(*task.rows, OutputOf(&task), &task.stats));
  }
  RunGptqItems(gptq_, worker, gptq_items, gptq_tasks, item_status);
  if (slices.empty()) return absl::OkStatus();
  const absl::Status status = device.QuantizeBatch(slices);
  if (status.ok()) return absl::OkStatus();
  // Device memory ran out: the scheduler fails every job in the batch.
  if (absl::IsResourceExhausted(status)) return status;
  if (slices.size() == 1) {
    (*item_status)[sliced[0]] = status;
    return absl::OkStatus();
  }
  // Find the item(s) at fault; launches that ran before the error added partial statistics.
  for (size_t k = 0; k < slices.size(); ++k) {
    RowRangeTask& task = RowRangeTaskOf(batch[sliced[k]]);
    task.stats = TensorStats();
    (*item_status)[sliced[k]] = device.QuantizeBatch(absl::MakeConstSpan(&slices[k], 1));
  }
  return absl::OkStatus();
}

}  // namespace nvfp4cal::server
