#include "engine/gptq_plan_cache.h"

#include <cstdint>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace nvfp4cal {
namespace {

uint32_t Bits(float value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Exact (bit patterns), so that two parameter sets share a plan only when they are equal.
std::string ParamsKey(const std::string& plan_domain, const SearchParams& p) {
  return absl::StrCat(plan_domain, "|", Bits(p.beta_step), ",", Bits(p.beta_half_range), ",",
                      p.scale_neighbours, ",", Bits(p.symmetry_tolerance), ",",
                      Bits(p.gptq.damping), ",", p.gptq.act_order ? 1 : 0, ",",
                      p.gptq.block_columns, ",", static_cast<int>(p.gptq.scale_objective), ",",
                      static_cast<int>(p.gptq.scale_search));
}

}  // namespace

GptqPlanCache::PlanOrError GptqPlanCache::Get(GptqBackend& backend, const std::string& plan_domain,
                                              const FullHessianView& hessian,
                                              const SearchParams& params,
                                              const PreparedHook& on_prepared) {
  Entry* entry = nullptr;
  {
    absl::MutexLock lock(&mu_);
    std::unique_ptr<Entry>& slot = entries_[Key(hessian.data, ParamsKey(plan_domain, params))];
    if (slot == nullptr) slot = std::make_unique<Entry>();
    entry = slot.get();  // entries are never erased: the pointer stays valid
  }
  // The cell's lock is held while preparing and while the hook runs; mu_ is taken inside it,
  // never the other way round.
  return entry->plan.Get(backend, hessian, params, [&](const PlanOrError& plan) {
    std::shared_ptr<void> keep = on_prepared ? on_prepared(plan) : nullptr;
    absl::MutexLock lock(&mu_);
    entry->keep = std::move(keep);
    if (plan.ok()) ++plans_prepared_;
  });
}

int GptqPlanCache::plans_prepared() const {
  absl::MutexLock lock(&mu_);
  return plans_prepared_;
}

}  // namespace nvfp4cal
