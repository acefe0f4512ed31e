#include "server/full_hessian_budget.h"

#include "absl/strings/str_format.h"

namespace nvfp4cal::server {

FullHessianBudget::Reservation::~Reservation() { budget_->Release(bytes_, plan_); }

absl::Status FullHessianBudget::Reservation::GrowTo(const std::string& what, int64_t bytes) {
  if (bytes <= bytes_) return absl::OkStatus();
  if (absl::Status s = budget_->Admit(what, bytes - bytes_); !s.ok()) return s;
  bytes_ = bytes;
  return absl::OkStatus();
}

absl::Status FullHessianBudget::Admit(const std::string& what, int64_t bytes) {
  {
    absl::MutexLock lock(&mu_);
    if (bytes > limit_bytes_ - in_use_) {
      if (metrics_ != nullptr) metrics_->RecordFullHessianRefused("max_full_hessian_bytes");
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s needs %d more bytes as a full Hessian; the server holds %d bytes of full Hessians "
          "and gptq plans and max_full_hessian_bytes = %d",
          what, bytes, in_use_, limit_bytes_));
    }
    in_use_ += bytes;
  }
  if (metrics_ != nullptr) metrics_->AddFullHessianBytes(bytes);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<FullHessianBudget::Reservation>> FullHessianBudget::Reserve(
    const std::string& what, int64_t bytes) {
  if (absl::Status s = Admit(what, bytes); !s.ok()) return s;
  return std::unique_ptr<Reservation>(new Reservation(this, bytes, /*plan=*/false));
}

std::unique_ptr<FullHessianBudget::Reservation> FullHessianBudget::ChargePlan(int64_t bytes) {
  {
    absl::MutexLock lock(&mu_);
    in_use_ += bytes;
  }
  if (metrics_ != nullptr) metrics_->AddGptqPlanBytes(bytes);
  return std::unique_ptr<Reservation>(new Reservation(this, bytes, /*plan=*/true));
}

int64_t FullHessianBudget::in_use_bytes() const {
  absl::MutexLock lock(&mu_);
  return in_use_;
}

void FullHessianBudget::Release(int64_t bytes, bool plan) {
  {
    absl::MutexLock lock(&mu_);
    in_use_ -= bytes;
  }
  if (metrics_ == nullptr) return;
  if (plan) {
    metrics_->AddGptqPlanBytes(-bytes);
  } else {
    metrics_->AddFullHessianBytes(-bytes);
  }
}

}  // namespace nvfp4cal::server
