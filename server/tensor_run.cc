#include "server/tensor_run.h"

#include <algorithm>
#include <utility>

#include "proto/wire_codec.h"

namespace nvfp4cal::server {

TensorRun::TensorRun(std::shared_ptr<const TensorInput> input, int64_t rows, absl::Time started)
    : input_(std::move(input)), rows_(rows), started_(started) {}

std::vector<std::shared_ptr<RowRangeTask>> TensorRun::MakeTasks(
    std::shared_ptr<const std::string> bytes, int64_t row_begin, int64_t num_rows,
    const RowSplit& split, const ValidatedRows* rows) const {
  const int64_t cols = input_->cols;
  const int64_t row_bytes = cols * DTypeSize(input_->dtype);
  int64_t step = std::max<int64_t>(1, split.max_rows_per_item);
  if (input_->params.method == Method::kGptq) {
    // As many rows as half the batch memory budget holds (RowRangeTask::MemoryBytes: input,
    // outputs and the fp32 working copy), at least max_rows_per_item.
    const int64_t per_row = row_bytes + cols / 2 + cols / 16 + cols * 4;
    step = std::max(step, split.memory_budget_bytes / 2 / per_row);
  }
  std::vector<std::shared_ptr<RowRangeTask>> tasks;
  tasks.reserve(static_cast<size_t>((num_rows + step - 1) / step));
  for (int64_t first = 0; first < num_rows; first += step) {
    auto task = std::make_shared<RowRangeTask>();
    task->tensor = input_;
    task->weights = bytes;
    task->byte_offset = static_cast<size_t>(first * row_bytes);
    task->row_begin = row_begin + first;
    task->num_rows = std::min(step, num_rows - first);
    if (rows != nullptr) task->rows = rows->Subrange(first, task->num_rows).value();
    tasks.push_back(std::move(task));
  }
  return tasks;
}

bool TensorRun::RecordDone(const RowRangeTask& task, const WorkOutcome& outcome) {
  rows_done_ += task.num_rows;
  range_stats_[task.row_begin] = task.stats;
  queue_wait_ += outcome.queue_wait;
  kernel_time_ += outcome.kernel_time;
  return done();
}

v1::TensorSummary TensorRun::Summary(int64_t tensor_index, absl::Time now) const {
  TensorStats total;
  for (auto range = range_stats_.begin(); range != range_stats_.end(); ++range) {
    if (range == range_stats_.begin()) {
      total = range->second;
      continue;
    }
    AccumulateStats(range->second, &total);
    // Wall times of gptq's row ranges; the plan's factor time and damping are every range's.
    total.gptq.quantize_seconds += range->second.gptq.quantize_seconds;
    total.gptq.compare_seconds += range->second.gptq.compare_seconds;
  }
  v1::TensorSummary summary;
  summary.set_tensor_name(input_->name);
  summary.set_tensor_index(tensor_index);
  summary.set_rows(rows_);
  summary.set_cols(input_->cols);
  summary.set_global_amax(input_->global_amax);
  summary.set_global_scale(GlobalScaleFromAmax(input_->global_amax));
  StatsToProto(total, summary.mutable_stats());
  summary.mutable_timings()->set_total_us(absl::ToInt64Microseconds(now - started_));
  summary.mutable_timings()->set_queue_wait_us(absl::ToInt64Microseconds(queue_wait_));
  summary.mutable_timings()->set_kernel_us(absl::ToInt64Microseconds(kernel_time_));
  return summary;
}

}  // namespace nvfp4cal::server
