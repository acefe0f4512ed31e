// FaultInjectingExecutor: a test hook around the server's real executor
// (CalibrationServer::set_executor_wrapper) that makes chosen tensors' batches fail the way a
// device can: an allocation failure (the whole batch fails RESOURCE_EXHAUSTED, as a CUDA
// out-of-memory does), a kernel error (only that tensor's row ranges fail INTERNAL) or a slow
// kernel (the batch takes `delay` longer, to push requests past their deadlines). Tensors are
// matched by the name the client sent.
//
//   FaultInjectingExecutor* faults = nullptr;
//   server.set_executor_wrapper([&faults](std::unique_ptr<BatchExecutor> real) {
//     auto wrapped = std::make_unique<FaultInjectingExecutor>(std::move(real));
//     faults = wrapped.get();
//     return wrapped;
//   });
//   server.Start();
//   faults->Inject("victim", FaultInjectingExecutor::Fault::kKernelError);
#ifndef NVFP4CAL_TESTS_SERVER_FAULT_INJECTING_EXECUTOR_H_
#define NVFP4CAL_TESTS_SERVER_FAULT_INJECTING_EXECUTOR_H_

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/kernel_executor.h"
#include "server/scheduler.h"

namespace nvfp4cal::server::testing {

class FaultInjectingExecutor : public BatchExecutor {
 public:
  enum class Fault { kAllocationFailure, kKernelError, kSlow };

  explicit FaultInjectingExecutor(std::unique_ptr<BatchExecutor> inner)
      : inner_(std::move(inner)) {}

  // Every batch holding a row range of `tensor_name` gets `fault` (kSlow: `delay` longer).
  void Inject(const std::string& tensor_name, Fault fault,
              absl::Duration delay = absl::ZeroDuration()) {
    absl::MutexLock lock(&mu_);
    rules_[tensor_name] = {fault, delay};
  }
  // How many times a fault was applied (batches for allocation and slow faults, row ranges
  // for kernel errors).
  int injected() {
    absl::MutexLock lock(&mu_);
    return injected_;
  }

  absl::Status ExecuteBatch(int worker, absl::Span<Work* const> batch,
                            std::vector<absl::Status>* item_status) override {
    std::vector<bool> kernel_error(batch.size(), false);
    absl::Duration delay;
    std::string allocation_failure;
    {
      absl::MutexLock lock(&mu_);
      bool slowed = false;
      for (size_t i = 0; i < batch.size(); ++i) {
        const std::string& name = RowRangeTaskOf(batch[i]).tensor->name;
        const auto it = rules_.find(name);
        if (it == rules_.end()) continue;
        switch (it->second.fault) {
          case Fault::kAllocationFailure:
            if (allocation_failure.empty()) ++injected_;
            allocation_failure = name;
            break;
          case Fault::kKernelError:
            kernel_error[i] = true;
            ++injected_;
            break;
          case Fault::kSlow:
            if (!slowed) ++injected_;
            slowed = true;
            delay = std::max(delay, it->second.delay);
            break;
        }
      }
    }
    if (delay > absl::ZeroDuration()) absl::SleepFor(delay);
    if (!allocation_failure.empty()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "injected: device out of memory allocating the batch of '", allocation_failure, "'"));
    }
    absl::Status status = inner_->ExecuteBatch(worker, batch, item_status);
    if (!status.ok()) return status;
    for (size_t i = 0; i < batch.size(); ++i) {
      if (kernel_error[i]) {
        (*item_status)[i] = absl::InternalError("injected: kernel launch failed");
      }
    }
    return absl::OkStatus();
  }

 private:
  struct Rule {
    Fault fault;
    absl::Duration delay;
  };
  std::unique_ptr<BatchExecutor> inner_;
  absl::Mutex mu_;
  std::map<std::string, Rule> rules_ ABSL_GUARDED_BY(mu_);
  int injected_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace nvfp4cal::server::testing

#endif  // NVFP4CAL_TESTS_SERVER_FAULT_INJECTING_EXECUTOR_H_
