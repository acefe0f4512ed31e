#include "server/kernel_executor.h"

#include <new>
#include <utility>

#include "absl/strings/str_format.h"
#include "server/gptq_work.h"

namespace nvfp4cal::server {
namespace {

// The scheduler's Work for a RowRangeTask; the task itself is shared with the done callback,
// which may outlive this wrapper.
struct RowRangeWork : Work {
  std::shared_ptr<RowRangeTask> task;
};

}  // namespace

int64_t RowRangeTask::MemoryBytes() const {
  const int64_t elements = num_rows * tensor->cols;
  const int64_t hessian = tensor->hessian_blocks == nullptr
                              ? 0
                              : static_cast<int64_t>(tensor->hessian_blocks->size() * 4);
  const int64_t gptq_working_rows = tensor->full_hessian == nullptr ? 0 : elements * 4;
  return elements * DTypeSize(tensor->dtype) + elements / 2 + elements / 16 + hessian +
         gptq_working_rows;
}

WorkItem MakeRowRangeItem(std::shared_ptr<RowRangeTask> task,
                          std::function<void(const WorkOutcome&)> done) {
  WorkItem item;
  item.memory_bytes = task->MemoryBytes();
  auto work = std::make_unique<RowRangeWork>();
  work->task = std::move(task);
  item.work = std::move(work);
  item.done = std::move(done);
  return item;
}

RowRangeTask& RowRangeTaskOf(Work* work) { return *static_cast<RowRangeWork*>(work)->task; }

absl::Status AllocateOutputs(RowRangeTask* task) {
  const int64_t elements = task->num_rows * task->tensor->cols;
  try {
    task->packed_codes.resize(static_cast<size_t>(elements / 2));
    task->scales.resize(static_cast<size_t>(elements / 16));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "out of memory allocating %d bytes of output for rows [%d, %d)",
        elements / 2 + elements / 16, task->row_begin, task->row_begin + task->num_rows));
  }
  return absl::OkStatus();
}

QuantizeRequest RequestOf(const RowRangeTask& task) {
  const TensorInput& tensor = *task.tensor;
  QuantizeRequest request;
  request.weights = {task.weights->data() + task.byte_offset, tensor.dtype, task.num_rows,
                     tensor.cols};
  if (tensor.hessian_blocks != nullptr) {
    request.hessians = {tensor.hessian_blocks->data(),
                        static_cast<int64_t>(tensor.hessian_blocks->size() / 256)};
  }
  request.params = tensor.params;
  return request;
}

RowRangeOutput OutputOf(RowRangeTask* task) {
  return RowRangeOutput{
      absl::MakeSpan(reinterpret_cast<uint8_t*>(task->packed_codes.data()),
                     task->packed_codes.size()),
      absl::MakeSpan(reinterpret_cast<uint8_t*>(task->scales.data()), task->scales.size())};
}

KernelExecutor::KernelExecutor(std::vector<std::unique_ptr<ScaleSearch>> backends,
                               std::vector<GptqWorker> gptq)
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
    const QuantizeRequest request = RequestOf(task);
    (*item_status)[i] = backend.QuantizeRows(request, task.tensor->global_amax, 0, task.num_rows,
                                             OutputOf(&task), &task.stats);
  }
  RunGptqItems(gptq_, worker, gptq_items, gptq_tasks, item_status);
  return absl::OkStatus();
}

}  // namespace nvfp4cal::server
