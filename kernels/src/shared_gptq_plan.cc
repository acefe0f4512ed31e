// SharedGptqPlan (gptq.h): one preparation per cell, shared, released after the last use.
#include "nvfp4cal/kernels/gptq.h"

namespace nvfp4cal {

absl::StatusOr<std::shared_ptr<const GptqPlan>> SharedGptqPlan::Get(
    GptqBackend& backend, const FullHessianView& hessian, const SearchParams& params,
    const PreparedHook& on_prepared) {
  // Held while preparing: other callers wait instead of repeating the factorisation.
  absl::MutexLock lock(&mu_);
  if (done_) return plan_;
  plan_ = backend.Prepare(hessian, params);
  done_ = true;
  succeeded_ = plan_.ok();
  if (on_prepared) on_prepared(plan_);
  return plan_;
}

void SharedGptqPlan::Release() {
  absl::MutexLock lock(&mu_);
  // A failed preparation stays the answer; a plan (or none yet) becomes "released".
  if (!done_ || plan_.ok()) {
    plan_ = absl::FailedPreconditionError("gptq plan released after its last tensor");
  }
  done_ = true;
}

bool SharedGptqPlan::prepared() const {
  absl::MutexLock lock(&mu_);
  return succeeded_;
}

}  // namespace nvfp4cal
