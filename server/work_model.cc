#include "server/work_model.h"

#include <new>
#include <utility>

#include "absl/strings/str_format.h"

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

absl::Status UncheckedRows(const RowRangeTask& task) {
  return absl::InternalError(
      absl::StrFormat("rows [%d, %d) of tensor '%s' reached the executor "
                      "without the front's check",
                      task.row_begin, task.row_begin + task.num_rows, task.tensor->name));
}

RowRangeOutput OutputOf(RowRangeTask* task) {
  return RowRangeOutput{
      absl::MakeSpan(reinterpret_cast<uint8_t*>(task->packed_codes.data()),
                     task->packed_codes.size()),
      absl::MakeSpan(reinterpret_cast<uint8_t*>(task->scales.data()), task->scales.size())};
}

}  // namespace nvfp4cal::server
