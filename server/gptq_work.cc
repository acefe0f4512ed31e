#include "server/gptq_work.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <new>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nvfp4cal/kernels/dtype.h"
#include "server/tensor_spec.h"

namespace nvfp4cal::server {
namespace {}  // namespace

absl::StatusOr<std::shared_ptr<FullHessian>> FullHessian::Create(
    std::string name, int64_t n, std::unique_ptr<FullHessianBudget::Reservation> reservation,
    FullHessianBudget* budget, ServerMetrics* metrics) {
  std::unique_ptr<float[]> data(new (std::nothrow) float[static_cast<size_t>(n * n)]);
  if (data == nullptr) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "out of host memory allocating %d bytes for the full Hessian '%s'", n * n * 4, name));
  }
  return std::shared_ptr<FullHessian>(new FullHessian(std::move(name), n, std::move(data),
                                                      std::move(reservation), budget, metrics));
}

FullHessian::FullHessian(std::string name, int64_t n, std::unique_ptr<float[]> data,
                         std::unique_ptr<FullHessianBudget::Reservation> reservation,
                         FullHessianBudget* budget, ServerMetrics* metrics)
    : name_(std::move(name)),
      n_(n),
      data_(std::move(data)),
      reservation_(std::move(reservation)),
      budget_(budget),
      metrics_(metrics) {}

absl::StatusOr<std::shared_ptr<const GptqPlan>> FullHessian::Plan(GptqBackend& backend,
                                                                  const std::string& plan_domain,
                                                                  const SearchParams& params) {
  return plans_.Get(backend, plan_domain, view(), params,
                    [this, &backend](const GptqPlanCache::PlanOrError& plan) {
                      std::shared_ptr<void> charge;
                      if (!plan.ok()) {
                        if (metrics_ != nullptr) metrics_->RecordGptqPlanFailure();
                        return charge;
                      }
                      if (budget_ != nullptr) charge = budget_->ChargePlan((*plan)->memory_bytes);
                      if (metrics_ != nullptr) {
                        metrics_->RecordGptqPlan(std::string(backend.BackendName()),
                                                 (*plan)->factor_seconds);
                      }
                      return charge;
                    });
}

namespace {

// Quantizes `rows` rows in `weights` (the rows of tasks run[0..]) into the outputs.
absl::Status RunGptqRows(GptqBackend* backend, const std::string& plan_domain,
                         const TensorInput& tensor, const char* weights, int64_t rows,
                         RowRangeOutput output, TensorStats* stats) {
  if (tensor.full_hessian == nullptr || backend == nullptr) {
    return absl::InternalError(
        absl::StrFormat("gptq rows of tensor '%s' reached a worker without %s", tensor.name,
                        tensor.full_hessian == nullptr ? "a full Hessian" : "a gptq backend"));
  }
  absl::StatusOr<std::shared_ptr<const GptqPlan>> plan =
      tensor.full_hessian->Plan(*backend, plan_domain, tensor.params);
  if (!plan.ok()) {
    return PrefixStatus(plan.status(),
                        absl::StrFormat("Hessian '%s': ", tensor.full_hessian->name()));
  }
  InitTensorStats(tensor.params, tensor.global_amax, stats);
  const WeightView view{weights, tensor.dtype, rows, tensor.cols};
  absl::Status status =
      backend->QuantizeRows(**plan, view, tensor.global_amax, 0, rows,
                            tensor.params.gptq.compare_local_hessian, output, stats);
  stats->gptq.factor_seconds = (*plan)->factor_seconds;
  return status;
}

}  // namespace

void RunGptqTasks(GptqBackends& worker, const std::vector<RowRangeTask*>& tasks,
                  std::vector<absl::Status>* status) {
  status->assign(tasks.size(), absl::OkStatus());
  // Tasks by tensor, then row.
  std::vector<size_t> order(tasks.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = k;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (tasks[a]->tensor != tasks[b]->tensor) return tasks[a]->tensor < tasks[b]->tensor;
    return tasks[a]->row_begin < tasks[b]->row_begin;
  });
  // Runs [first, last) of `order`: same tensor, each task's rows right after the previous one's.
  std::vector<std::pair<size_t, size_t>> runs;
  for (size_t first = 0; first < order.size();) {
    size_t last = first + 1;
    while (last < order.size() && tasks[order[last]]->tensor == tasks[order[first]]->tensor &&
           tasks[order[last]]->row_begin ==
               tasks[order[last - 1]]->row_begin + tasks[order[last - 1]]->num_rows) {
      ++last;
    }
    runs.emplace_back(first, last);
    first = last;
  }
  auto run = [&](GptqBackend* backend, size_t first, size_t last) {
    if (last - first == 1) {
      RowRangeTask& t = *tasks[order[first]];
      (*status)[order[first]] =
          RunGptqRows(backend, worker.plan_domain, *t.tensor, t.weights->data() + t.byte_offset,
                      t.num_rows, OutputOf(&t), &t.stats);
      return;
    }
    const TensorInput& tensor = *tasks[order[first]]->tensor;
    const int64_t row_bytes = tensor.cols * DTypeSize(tensor.dtype);
    int64_t rows = 0;
    for (size_t k = first; k < last; ++k) rows += tasks[order[k]]->num_rows;
    std::string weights;
    std::string codes;
    std::string scales;
    absl::Status run_status;
    try {
      weights.resize(static_cast<size_t>(rows * row_bytes));
      codes.resize(static_cast<size_t>(rows * tensor.cols / 2));
      scales.resize(static_cast<size_t>(rows * tensor.cols / 16));
    } catch (const std::bad_alloc&) {
      run_status = absl::ResourceExhaustedError(absl::StrFormat(
          "out of host memory merging %d rows of gptq tensor '%s'", rows, tensor.name));
    }
    if (run_status.ok()) {
      int64_t at = 0;
      for (size_t k = first; k < last; ++k) {
        const RowRangeTask& t = *tasks[order[k]];
        std::memcpy(weights.data() + at * row_bytes, t.weights->data() + t.byte_offset,
                    static_cast<size_t>(t.num_rows * row_bytes));
        at += t.num_rows;
      }
      RowRangeTask& head = *tasks[order[first]];
      run_status = RunGptqRows(
          backend, worker.plan_domain, tensor, weights.data(), rows,
          RowRangeOutput{absl::MakeSpan(reinterpret_cast<uint8_t*>(codes.data()), codes.size()),
                         absl::MakeSpan(reinterpret_cast<uint8_t*>(scales.data()), scales.size())},
          &head.stats);
      at = 0;
      for (size_t k = first; run_status.ok() && k < last; ++k) {
        RowRangeTask& t = *tasks[order[k]];
        std::memcpy(t.packed_codes.data(), codes.data() + at * tensor.cols / 2,
                    static_cast<size_t>(t.num_rows * tensor.cols / 2));
        std::memcpy(t.scales.data(), scales.data() + at * tensor.cols / 16,
                    static_cast<size_t>(t.num_rows * tensor.cols / 16));
        if (k != first) InitTensorStats(tensor.params, tensor.global_amax, &t.stats);
        at += t.num_rows;
      }
    }
    for (size_t k = first; k < last; ++k) (*status)[order[k]] = run_status;
  };
  // The worker's backends take runs in parallel (one each at a time).
  std::vector<GptqBackend*> backends;
  for (const std::shared_ptr<GptqBackend>& b : worker.streams) backends.push_back(b.get());
  const size_t threads = std::min(backends.size(), runs.size());
  std::atomic<size_t> next{0};
  auto drain = [&](GptqBackend* backend) {
    for (size_t r = next++; r < runs.size(); r = next++)
      run(backend, runs[r].first, runs[r].second);
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(drain, backends[t]);
  drain(backends[0]);
  for (std::thread& t : pool) t.join();
}

void RunGptqItems(std::vector<GptqBackends>& workers, int worker, const std::vector<size_t>& items,
                  const std::vector<RowRangeTask*>& tasks, std::vector<absl::Status>* item_status) {
  if (tasks.empty()) return;
  std::vector<absl::Status> status;
  if (worker >= 0 && static_cast<size_t>(worker) < workers.size() &&
      !workers[static_cast<size_t>(worker)].streams.empty()) {
    RunGptqTasks(workers[static_cast<size_t>(worker)], tasks, &status);
  } else {
    status.assign(tasks.size(), absl::InternalError("no gptq backend for this worker"));
  }
  for (size_t k = 0; k < items.size(); ++k) (*item_status)[items[k]] = status[k];
}

}  // namespace nvfp4cal::server
