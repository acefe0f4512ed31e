// The work model between the front doors (Quantize sessions, jobs) and the executors: what a
// front hands to the scheduler for a row range of a tensor, and what the executor fills in.
//
// A TensorInput is what every row range of one tensor shares (dtype, columns, method and
// parameters, global amax, Hessian); a RowRangeTask is one scheduler item: a contiguous range of
// weight rows of one tensor. The front checked everything in them at its trust boundary (header,
// Hessian, each chunk's rows); executors do not check the data again. The executor fills the
// task's outputs; the front reads them in the item's done callback.
//
//   auto task = std::make_shared<RowRangeTask>(...);
//   scheduler.Enqueue(job, MakeRowRangeItem(task, [task](const WorkOutcome& o) { ... }));
#ifndef NVFP4CAL_SERVER_WORK_MODEL_H_
#define NVFP4CAL_SERVER_WORK_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "server/scheduler.h"

namespace nvfp4cal::server {

class FullHessian;  // gptq_work.h

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
  // Their pruning tables (ComputeSharedHessianPruning), computed once per Hessian and shared by
  // every row range of every tensor using it; null with the blocks.
  SharedHessianPruning hessian_pruning;
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
  // The same rows as checked by the front (ValidateRows): what block-Hessian executors search,
  // without checking again. Absent for gptq, whose backend checks its rows itself.
  std::optional<ValidatedRows> rows;

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

// INTERNAL: a block-Hessian task without checked rows reached an executor (a front's defect).
absl::Status UncheckedRows(const RowRangeTask& task);

// Spans over the task's allocated outputs.
RowRangeOutput OutputOf(RowRangeTask* task);

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_WORK_MODEL_H_
