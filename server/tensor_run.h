// TensorRun: one tensor on its way through the scheduler, the part Quantize sessions and jobs
// share. It splits the tensor's rows into row-range tasks (work_model.h), collects what the
// finished tasks report (statistics summed in row order, queue and kernel time) and builds the
// tensor's summary once every row is done. The front keeps its own protocol (when rows arrive,
// where results go); the run is not thread-safe: the front calls it under its own lock.
//
//   TensorRun run(input, rows, absl::Now());
//   for (auto& task : run.MakeTasks(bytes, first_row, num_rows, limits, &rows)) Enqueue(task);
//   ...  // in each task's done callback, with a successful outcome:
//   if (run.RecordDone(*task, outcome)) Send(run.Summary(index, absl::Now()));
#ifndef NVFP4CAL_SERVER_TENSOR_RUN_H_
#define NVFP4CAL_SERVER_TENSOR_RUN_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/v1/calibrator.pb.h"
#include "server/scheduler.h"
#include "server/work_model.h"

namespace nvfp4cal::server {

// How a tensor's rows are cut into scheduler items.
struct RowSplit {
  // Rows per item (limits.max_rows_per_item); at least 1.
  int64_t max_rows_per_item = 1;
  // The scheduler's device memory per batch: a gptq tensor's rows go into items of up to half
  // of it (at least max_rows_per_item rows), since each item pays gptq's ordered group loop once.
  int64_t memory_budget_bytes = int64_t{1} << 30;
};

class TensorRun {
 public:
  TensorRun(std::shared_ptr<const TensorInput> input, int64_t rows, absl::Time started);

  const TensorInput& input() const { return *input_; }
  int64_t rows() const { return rows_; }
  int64_t rows_done() const { return rows_done_; }
  bool done() const { return rows_done_ == rows_; }

  // Tasks for rows [row_begin, row_begin + num_rows), whose bytes start at the beginning of
  // `bytes` (a chunk, or the whole buffered tensor with row_begin = 0). `rows`: the same rows as
  // the front checked them (ValidateRows), each task gets its part; null for gptq.
  std::vector<std::shared_ptr<RowRangeTask>> MakeTasks(std::shared_ptr<const std::string> bytes,
                                                       int64_t row_begin, int64_t num_rows,
                                                       const RowSplit& split,
                                                       const ValidatedRows* rows) const;

  // Takes a successful task's statistics and times; true when it was the last row range.
  bool RecordDone(const RowRangeTask& task, const WorkOutcome& outcome);

  // The summary of the finished tensor (done() must hold).
  v1::TensorSummary Summary(int64_t tensor_index, absl::Time now) const;

 private:
  const std::shared_ptr<const TensorInput> input_;
  const int64_t rows_;
  const absl::Time started_;
  int64_t rows_done_ = 0;
  // Per row range, by first row: summed in row order, so the totals do not depend on the order
  // in which ranges finished.
  std::map<int64_t, TensorStats> range_stats_;
  absl::Duration queue_wait_;
  absl::Duration kernel_time_;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_TENSOR_RUN_H_
