#include "server/gptq_work.h"

#include <cstring>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/tensor_spec.h"

namespace nvfp4cal::server {
namespace {

uint32_t Bits(float value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Exact (bit patterns) so that two parameter sets share a plan only when they are equal.
std::string PlanKey(const std::string& device, const SearchParams& p) {
  return absl::StrCat(device, "|", Bits(p.beta_step), ",", Bits(p.beta_half_range), ",",
                      p.scale_neighbours, ",", Bits(p.symmetry_tolerance), ",",
                      Bits(p.gptq.damping), ",", p.gptq.act_order ? 1 : 0, ",",
                      p.gptq.block_columns, ",", static_cast<int>(p.gptq.scale_objective), ",",
                      static_cast<int>(p.gptq.scale_search));
}

}  // namespace

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
                                                                  const std::string& device,
                                                                  const SearchParams& params) {
  PlanEntry* entry = nullptr;
  {
    absl::MutexLock lock(&mu_);
    std::unique_ptr<PlanEntry>& slot = plans_[PlanKey(device, params)];
    if (slot == nullptr) slot = std::make_unique<PlanEntry>();
    entry = slot.get();
  }
  // Held while preparing: items of the same plan on other workers wait instead of repeating
  // the factorisation.
  absl::MutexLock lock(&entry->mu);
  if (entry->done) return entry->plan;
  entry->plan = backend.Prepare(view(), params);
  entry->done = true;
  if (entry->plan.ok()) {
    const GptqPlan& plan = **entry->plan;
    if (budget_ != nullptr) entry->charge = budget_->ChargePlan(plan.memory_bytes);
    if (metrics_ != nullptr) {
      metrics_->RecordGptqPlan(std::string(backend.BackendName()), plan.factor_seconds);
    }
    absl::MutexLock count(&mu_);
    ++plans_prepared_;
  } else if (metrics_ != nullptr) {
    metrics_->RecordGptqPlanFailure();
  }
  return entry->plan;
}

int FullHessian::plans_prepared() const {
  absl::MutexLock lock(&mu_);
  return plans_prepared_;
}

absl::Status RunGptqTask(GptqWorker& worker, RowRangeTask* task) {
  const TensorInput& tensor = *task->tensor;
  if (tensor.full_hessian == nullptr || worker.backend == nullptr) {
    return absl::InternalError(
        absl::StrFormat("gptq rows of tensor '%s' reached a worker without %s", tensor.name,
                        tensor.full_hessian == nullptr ? "a full Hessian" : "a gptq backend"));
  }
  absl::StatusOr<std::shared_ptr<const GptqPlan>> plan =
      tensor.full_hessian->Plan(*worker.backend, worker.device, tensor.params);
  if (!plan.ok()) {
    return PrefixStatus(plan.status(),
                        absl::StrFormat("Hessian '%s': ", tensor.full_hessian->name()));
  }
  InitTensorStats(tensor.params, tensor.global_amax, &task->stats);
  const WeightView rows{task->weights->data() + task->byte_offset, tensor.dtype, task->num_rows,
                        tensor.cols};
  absl::Status status = worker.backend->QuantizeRows(**plan, rows, tensor.global_amax, 0,
                                                     task->num_rows, OutputOf(task), &task->stats);
  task->stats.gptq.factor_seconds = (*plan)->factor_seconds;
  return status;
}

}  // namespace nvfp4cal::server
