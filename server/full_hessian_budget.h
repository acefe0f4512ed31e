// FullHessianBudget: the server-wide account of the memory full Hessians (method gptq) hold.
//
// A full Hessian of n inputs is n * n * 4 bytes (822 MB for n = 14336). Sessions hold a
// Reservation for each from the header that defines it until the Hessian is freed (the session
// ended, however it ended), and grow it as the Hessian's chunks arrive: a stream that sends a
// header and stalls holds nothing of the budget, one that stalls half-way holds half. Prepared gptq
// plans are charged too, without refusal (their size is known only once they exist): later
// admissions see them as in use. The bytes in use are mirrored in the metrics
// (nvfp4cal_full_hessian_bytes, nvfp4cal_gptq_plan_bytes).
//
//   FullHessianBudget budget(limits.max_full_hessian_bytes, &metrics);
//   absl::StatusOr<std::unique_ptr<FullHessianBudget::Reservation>> held =
//       budget.Reserve("Hessian 'mlp.input'", n * n * 4);
//   if (!held.ok()) return held.status();   // RESOURCE_EXHAUSTED naming the limit and bytes
//   ...                                     // the bytes are returned when *held is destroyed
#ifndef NVFP4CAL_SERVER_FULL_HESSIAN_BUDGET_H_
#define NVFP4CAL_SERVER_FULL_HESSIAN_BUDGET_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/metrics.h"

namespace nvfp4cal::server {

class FullHessianBudget {
 public:
  // Bytes held on the budget; returned when destroyed. Must not outlive the budget.
  class Reservation {
   public:
    ~Reservation();
    Reservation(const Reservation&) = delete;
    Reservation& operator=(const Reservation&) = delete;
    int64_t bytes() const { return bytes_; }
    // Grows the reservation to `bytes` (no-op when it holds as much already) under the same
    // rule as Reserve; on RESOURCE_EXHAUSTED it keeps what it held.
    absl::Status GrowTo(const std::string& what, int64_t bytes);

   private:
    friend class FullHessianBudget;
    Reservation(FullHessianBudget* budget, int64_t bytes, bool plan)
        : budget_(budget), bytes_(bytes), plan_(plan) {}
    FullHessianBudget* const budget_;
    int64_t bytes_;
    // A plan's charge (nvfp4cal_gptq_plan_bytes) rather than a Hessian's.
    const bool plan_;
  };

  // `metrics` may be null (tests of the budget alone); it must outlive the budget.
  FullHessianBudget(int64_t limit_bytes, ServerMetrics* metrics)
      : limit_bytes_(limit_bytes), metrics_(metrics) {}

  // Admits `bytes` for `what` (e.g. "Hessian 'h' of tensor 'w'") when the bytes in use plus
  // `bytes` stay within the limit; else RESOURCE_EXHAUSTED naming max_full_hessian_bytes, the
  // bytes in use and the bytes requested.
  absl::StatusOr<std::unique_ptr<Reservation>> Reserve(const std::string& what, int64_t bytes);

  // Charges a prepared plan's bytes, which can no longer be refused.
  std::unique_ptr<Reservation> ChargePlan(int64_t bytes);

  int64_t limit_bytes() const { return limit_bytes_; }
  // Hessians and plans held now.
  int64_t in_use_bytes() const;

 private:
  // Adds `bytes` to the bytes in use when they fit; else RESOURCE_EXHAUSTED for `what`.
  absl::Status Admit(const std::string& what, int64_t bytes);
  void Release(int64_t bytes, bool plan);

  const int64_t limit_bytes_;
  ServerMetrics* const metrics_;
  mutable absl::Mutex mu_;
  int64_t in_use_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_FULL_HESSIAN_BUDGET_H_
