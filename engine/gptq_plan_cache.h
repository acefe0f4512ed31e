// GptqPlanCache: gptq plans (validation, damping and factorisation of a full Hessian: seconds
// of work and gigabytes of device memory for large n) prepared once and shared, for the
// embedded engine and the server alike.
//
// A plan is keyed by its Hessian (the matrix's address), its plan domain ("cpu" or "cuda:N",
// devices.h's GptqBackends::plan_domain) and every parameter that changes it or its results.
// The first caller prepares it on its backend; callers of the same key meanwhile wait for it
// (SharedGptqPlan) instead of repeating the factorisation; a failed preparation is kept and
// returned to every later caller, so a Hessian is validated once.
//
// Plans live as long as the cache: the server keeps one cache per full Hessian, freed when its
// session and last work item let go of it; the CLI one per Hessian (key) of a call, freed after
// the Hessian's last tensor.
//
//   nvfp4cal::GptqPlanCache plans;  // one per Hessian
//   absl::StatusOr<std::shared_ptr<const nvfp4cal::GptqPlan>> plan =
//       plans.Get(backend, "cuda:0", h, params);
//   ... GptqQuantizeWithPlan(backend, **plan, request) ...
#ifndef NVFP4CAL_ENGINE_GPTQ_PLAN_CACHE_H_
#define NVFP4CAL_ENGINE_GPTQ_PLAN_CACHE_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "nvfp4cal/kernels/gptq.h"

namespace nvfp4cal {

class GptqPlanCache {
 public:
  using PlanOrError = absl::StatusOr<std::shared_ptr<const GptqPlan>>;
  // Called once per plan, right after its preparation and before any caller sees the result.
  // What it returns is kept with the plan and dropped with it (the server returns the plan's
  // charge on its memory budget); it may return null.
  using PreparedHook = std::function<std::shared_ptr<void>(const PlanOrError& plan)>;

  // The plan of (hessian, plan_domain, params), prepared by `backend` on the first call.
  PlanOrError Get(GptqBackend& backend, const std::string& plan_domain,
                  const FullHessianView& hessian, const SearchParams& params,
                  const PreparedHook& on_prepared = nullptr);

  // Plans prepared successfully so far.
  int plans_prepared() const;

 private:
  struct Entry {
    SharedGptqPlan plan;
    std::shared_ptr<void> keep;  // what the PreparedHook returned (guarded by mu_)
  };
  // (Hessian, plan domain and parameters as exact bits).
  using Key = std::tuple<const float*, std::string>;

  mutable absl::Mutex mu_;
  std::map<Key, std::unique_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  int plans_prepared_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace nvfp4cal

#endif  // NVFP4CAL_ENGINE_GPTQ_PLAN_CACHE_H_
