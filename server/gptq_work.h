// gptq work: what the service needs to run method gptq (docs/numerics.md §6) on the scheduler.
//
// FullHessian is a full [n, n] Hessian a Quantize session keeps for gptq tensors, admitted on
// the server-wide FullHessianBudget, with the plans prepared from it. A plan (validation and
// factorisation, seconds of work for large n) is prepared once per (Hessian, gptq parameters,
// device) by the first work item that needs it, on that item's scheduler worker, and shared by
// every row range of every tensor that uses the Hessian with those parameters; items needing it
// meanwhile wait for it. Plans and the matrix are freed with the FullHessian, when the last
// reference goes (its session ended and no item holds it).
//
// Executors collect a batch's items whose tensor has method gptq and run them together:
//
//   std::vector<GptqBackends> gptq;   // one per scheduler worker (engine/devices.h)
//   gptq.push_back(GptqBackends{{nvfp4cal::MakeCpuGptq({})}, "cpu"});
//   if (absl::Status s = AllocateOutputs(&task); !s.ok()) return s;   // for each gptq item
//   RunGptqItems(gptq, worker, gptq_items, gptq_tasks, item_status);
#ifndef NVFP4CAL_SERVER_GPTQ_WORK_H_
#define NVFP4CAL_SERVER_GPTQ_WORK_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/devices.h"
#include "engine/gptq_plan_cache.h"
#include "nvfp4cal/kernels/gptq.h"
#include "server/full_hessian_budget.h"
#include "server/metrics.h"
#include "server/work_model.h"

namespace nvfp4cal::server {

// The largest cols gptq accepts (the kernels' ValidateGptqHessian limit); checked on the
// header so that n * n * 4 is computed only for sizes that can run.
inline constexpr int64_t kMaxGptqColumns = 65536;

class FullHessian {
 public:
  // Allocates the n * n matrix (uninitialised: the session fills every element from the
  // chunks before any item refers to it). RESOURCE_EXHAUSTED when host memory runs out.
  // `reservation` holds its bytes on `budget`; plans are charged to `budget` too. `budget`
  // and `metrics` must outlive it.
  static absl::StatusOr<std::shared_ptr<FullHessian>> Create(
      std::string name, int64_t n, std::unique_ptr<FullHessianBudget::Reservation> reservation,
      FullHessianBudget* budget, ServerMetrics* metrics);

  const std::string& name() const { return name_; }
  int64_t n() const { return n_; }
  // Grows the budget reservation to `bytes` as the matrix's chunks arrive (at most n * n * 4);
  // RESOURCE_EXHAUSTED naming `what` when the budget cannot hold them. Called by the session
  // that fills the matrix, before it stores each chunk.
  absl::Status GrowReservation(const std::string& what, int64_t bytes) {
    return reservation_->GrowTo(what, bytes);
  }
  // Row-major [n, n]; written by the session while the chunks arrive, read-only afterwards.
  float* mutable_data() { return data_.get(); }
  FullHessianView view() const { return FullHessianView{data_.get(), n_}; }

  // The plan for `params` in `plan_domain` ("cpu", or "cuda:N" for a device backend), prepared
  // by `backend` on the first call (GptqBackend::Prepare: validation, damping, factorisation)
  // and shared afterwards (GptqPlanCache: concurrent callers wait for the first; a failed
  // preparation is kept, so H is validated once). Its memory is charged to the budget.
  absl::StatusOr<std::shared_ptr<const GptqPlan>> Plan(GptqBackend& backend,
                                                       const std::string& plan_domain,
                                                       const SearchParams& params);

  // Plans prepared (successfully) so far.
  int plans_prepared() const { return plans_.plans_prepared(); }

 private:
  FullHessian(std::string name, int64_t n, std::unique_ptr<float[]> data,
              std::unique_ptr<FullHessianBudget::Reservation> reservation,
              FullHessianBudget* budget, ServerMetrics* metrics);

  const std::string name_;
  const int64_t n_;
  const std::unique_ptr<float[]> data_;
  const std::unique_ptr<FullHessianBudget::Reservation> reservation_;
  FullHessianBudget* const budget_;
  ServerMetrics* const metrics_;
  // Dropped with the matrix, each plan with its charge on the budget.
  GptqPlanCache plans_;
};

// The gptq tasks of one batch (outputs allocated), each with the plan of its tensor's full
// Hessian (prepared by the first task that needs it; its errors are prefixed with the
// Hessian's name, e.g. "Hessian 'h': hessian is not symmetric: ..."). Tasks of a tensor with
// contiguous rows run as one QuantizeRows call (the ordered group loop costs about the same for 512
// rows as for 14336 on a GPU, so merging the chunks of a tensor that arrive together saves most of
// it); the bytes are those of separate calls. (*status)[k] receives tasks[k]'s status; a merged
// run's statistics go to its first task.
void RunGptqTasks(GptqBackends& worker, const std::vector<RowRangeTask*>& tasks,
                  std::vector<absl::Status>* status);

// What executors call for a batch's gptq items: RunGptqTasks on workers[worker] (an error
// for each item when there is none); (*item_status)[items[k]] receives tasks[k]'s status.
void RunGptqItems(std::vector<GptqBackends>& workers, int worker, const std::vector<size_t>& items,
                  const std::vector<RowRangeTask*>& tasks, std::vector<absl::Status>* item_status);

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_GPTQ_WORK_H_
