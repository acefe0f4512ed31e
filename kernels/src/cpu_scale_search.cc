#include "nvfp4cal/kernels/cpu_scale_search.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "cpu_block_search_simd.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"
#include "nvfp4cal/kernels/validation.h"

namespace nvfp4cal {
namespace {

BlockMethod ToBlockMethod(Method method) {
  switch (method) {
    case Method::kMax:
      return BlockMethod::kMax;
    case Method::kMse:
      return BlockMethod::kMse;
    case Method::kLocalHessian:
      return BlockMethod::kLocalHessian;
    case Method::kDss:
      return BlockMethod::kDss;
    case Method::kGptq:  // refused by validation (gptq.h runs it)
      return BlockMethod::kLocalHessian;
  }
  return BlockMethod::kMax;
}

// Adds one block's outcome to a task's statistics.
// `unit` converts the block's error-unit objectives to the tensor's units (ObjectiveUnit).
void AddBlockStats(const BlockOutcome& block, Method method, double unit, TensorStats* stats) {
  const bool hessian_objective = MethodNeedsHessian(method);
  const double mse_before = unit * block.mse_before;
  const double mse_after = unit * block.mse_after;
  const double hessian_before = unit * block.hessian_before;
  const double hessian_after = unit * block.hessian_after;
  stats->num_blocks += 1;
  stats->mse_before += mse_before;
  stats->mse_after += mse_after;
  stats->hessian_error_before += hessian_before;
  stats->hessian_error_after += hessian_after;
  stats->objective_before += hessian_objective ? hessian_before : mse_before;
  stats->objective_after += hessian_objective ? hessian_after : mse_after;
  stats->blocks_scale_changed += block.scale_byte != block.max_scale_byte;
  stats->blocks_beta_not_one += block.dss_beta_index != 0;
  stats->blocks_offset_not_zero += block.dss_offset != 0;
  stats->zero_hessian_blocks += block.hessian_all_zero;
}

// Everything one task needs, fixed per tensor.
struct TensorTask {
  const QuantizeRequest* request;
  const simd::CandidateScales* scales;
  float global_amax;
  float global_scale;
  double objective_unit;  // ObjectiveUnit(s2)
  BlockMethod method;
  const HessianBlockBounds* hessian_bounds;   // per column block, null without Hessians
  const HessianBlockBounds* identity_bounds;  // for the squared error
  int64_t row_begin;                          // first row of the output spans
  RowRangeOutput output;
};

// Quantizes rows [first, last) into the task's output, summing statistics into *stats. Compiled
// for several instruction sets and picked at run time; every variant computes the same bits
// (-ffp-contract=off, IEEE division, the same operation order).
__attribute__((target_clones("avx512f", "arch=haswell", "default"))) void QuantizeRowsKernel(
    const TensorTask& task, int64_t first, int64_t last, TensorStats* stats) {
  const WeightView& w = task.request->weights;
  const float* hessians = task.request->hessians.data;
  const int64_t blocks_per_row = w.cols / kBlockSize;
  const int neighbours = task.request->params.scale_neighbours;
  float block[kBlockSize];
  simd::HessianRows rows;
  for (int64_t j = 0; j < blocks_per_row; ++j) {
    // Column-block outer loop: H_j is loaded once for all rows of the task.
    const float* h = hessians == nullptr ? nullptr : hessians + j * kBlockSize * kBlockSize;
    const bool all_zero = h != nullptr && IsAllZeroHessian(h);
    if (h != nullptr) simd::LoadHessianRows(h, &rows);
    for (int64_t r = first; r < last; ++r) {
      LoadAsFloat(w.data, w.dtype, r * w.cols + j * kBlockSize, kBlockSize, block);
      const BlockOutcome out = simd::QuantizeBlock(
          block, *task.scales, task.global_amax, task.global_scale, h == nullptr ? nullptr : &rows,
          all_zero, task.method, neighbours, h == nullptr ? nullptr : &task.hessian_bounds[j],
          task.identity_bounds);
      const int64_t local_block = (r - task.row_begin) * blocks_per_row + j;
      task.output.scales[static_cast<size_t>(local_block)] = out.scale_byte;
      std::copy(out.packed, out.packed + kBlockSize / 2,
                task.output.packed_codes.begin() + local_block * (kBlockSize / 2));
      AddBlockStats(out, task.request->params.method, task.objective_unit, stats);
    }
  }
}

class CpuScaleSearch final : public ScaleSearch {
 public:
  explicit CpuScaleSearch(const CpuScaleSearchOptions& options) : options_(options) {
    if (options_.num_threads <= 0) {
      options_.num_threads = std::max(1u, std::thread::hardware_concurrency());
    }
    options_.blocks_per_task = std::max<int64_t>(1, options_.blocks_per_task);
  }

  std::string_view BackendName() const override { return "cpu"; }

  absl::Status QuantizeRows(const QuantizeRequest& request, float global_amax, int64_t row_begin,
                            int64_t row_end, RowRangeOutput output, TensorStats* stats) override {
    if (absl::Status s = ValidateRowRangeRequest(request, global_amax, row_begin, row_end, output);
        !s.ok()) {
      return s;
    }
    return QuantizePrevalidatedRows(request, global_amax, row_begin, row_end, output, stats);
  }

  absl::Status QuantizePrevalidatedRows(const QuantizeRequest& request, float global_amax,
                                        int64_t row_begin, int64_t row_end, RowRangeOutput output,
                                        TensorStats* stats) override {
    if (absl::Status s = ValidateRowRange(request.weights, row_begin, row_end, output); !s.ok()) {
      return s;
    }
    InitTensorStats(request.params, global_amax, stats);
    Run(request, global_amax, row_begin, row_end, output, stats);
    return absl::OkStatus();
  }

 private:
  // Quantizes rows [row_begin, row_end) of a validated request; output spans start at
  // row_begin. Statistics are summed per task, then in task order (thread-count independent).
  void Run(const QuantizeRequest& request, float global_amax, int64_t row_begin, int64_t row_end,
           RowRangeOutput output, TensorStats* stats) const {
    const WeightView& w = request.weights;
    const int64_t blocks_per_row = w.cols / kBlockSize;
    const int64_t rows_per_task = std::max<int64_t>(1, options_.blocks_per_task / blocks_per_row);
    const int64_t num_tasks = (row_end - row_begin + rows_per_task - 1) / rows_per_task;
    std::vector<TensorStats> task_stats(static_cast<size_t>(num_tasks));
    std::atomic<int64_t> next_task{0};

    const float global_scale = GlobalScaleFromAmax(global_amax);
    const DssGrid grid{request.params.scale_neighbours, DssBetaSteps(request.params),
                       request.params.beta_step};
    const simd::CandidateScales scales(global_amax, global_scale, grid);
    std::vector<HessianBlockBounds> computed;
    if (request.hessian_bounds == nullptr) computed = ComputeHessianBlockBounds(request.hessians);
    const HessianBlockBounds* bounds = request.hessian_bounds != nullptr ? request.hessian_bounds
                                       : computed.empty()                ? nullptr
                                                                         : computed.data();
    const HessianBlockBounds identity = IdentityBounds();
    const TensorTask tensor_task{&request,
                                 &scales,
                                 global_amax,
                                 global_scale,
                                 ObjectiveUnit(global_scale),
                                 ToBlockMethod(request.params.method),
                                 request.hessians.data == nullptr ? nullptr : bounds,
                                 &identity,
                                 row_begin,
                                 output};

    auto worker = [&]() {
      for (int64_t task = next_task++; task < num_tasks; task = next_task++) {
        const int64_t first = row_begin + task * rows_per_task;
        const int64_t last = std::min(row_end, first + rows_per_task);
        QuantizeRowsKernel(tensor_task, first, last, &task_stats[static_cast<size_t>(task)]);
      }
    };
    const int threads = static_cast<int>(std::min<int64_t>(options_.num_threads, num_tasks));
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads > 0 ? threads - 1 : 0));
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (std::thread& t : pool) t.join();
    for (const TensorStats& ts : task_stats) AccumulateStats(ts, stats);
  }

  CpuScaleSearchOptions options_;
};

}  // namespace

std::unique_ptr<ScaleSearch> MakeCpuScaleSearch(const CpuScaleSearchOptions& options) {
  return std::make_unique<CpuScaleSearch>(options);
}

}  // namespace nvfp4cal
