// GatedExecutor: a test wrapper around the server's real executor (CalibrationServer::
// set_executor_wrapper). While the gate is closed every batch waits before it runs, so a test
// can keep work queued (queue full, cancellation, cross-job batching) without timing guesses;
// a chosen batch can fail with a given status instead of running (device out of memory). It
// records which tensors each batch held.
//
//   GatedExecutor* gate = nullptr;
//   server.set_executor_wrapper([&gate](std::unique_ptr<BatchExecutor> real) {
//     auto wrapped = std::make_unique<GatedExecutor>(std::move(real));
//     gate = wrapped.get();
//     return wrapped;
//   });
//   server.Start();
//   gate->Close();
//   ... submit work ...
//   ASSERT_TRUE(gate->WaitUntilWaiting(1));   // one batch is held at the gate
//   gate->Open();
#ifndef NVFP4CAL_TESTS_SERVER_GATED_EXECUTOR_H_
#define NVFP4CAL_TESTS_SERVER_GATED_EXECUTOR_H_

#include <map>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/kernel_executor.h"
#include "server/scheduler.h"

namespace nvfp4cal::server::testing {

// Safety net only: a broken server fails the test instead of hanging ctest.
inline constexpr absl::Duration kGateHangLimit = absl::Seconds(30);

class GatedExecutor : public BatchExecutor {
 public:
  explicit GatedExecutor(std::unique_ptr<BatchExecutor> inner) : inner_(std::move(inner)) {}

  absl::Status ExecuteBatch(int worker, absl::Span<Work* const> batch,
                            std::vector<absl::Status>* item_status) override {
    std::set<const TensorInput*> tensors;
    for (Work* work : batch) tensors.insert(RowRangeTaskOf(work).tensor.get());
    absl::Status injected;
    {
      absl::MutexLock lock(&mu_);
      const int index = arrived_++;
      ++waiting_;
      mu_.Await(absl::Condition(this, &GatedExecutor::CanPass));
      --waiting_;
      ++passed_;
      if (!open_) --passes_;
      tensors_per_batch_.push_back(static_cast<int>(tensors.size()));
      if (auto it = failures_.find(index); it != failures_.end()) injected = it->second;
    }
    if (!injected.ok()) return injected;
    return inner_->ExecuteBatch(worker, batch, item_status);
  }

  void Close() {
    absl::MutexLock lock(&mu_);
    open_ = false;
  }
  void Open() {
    absl::MutexLock lock(&mu_);
    open_ = true;
  }
  // Lets `count` more batches through the closed gate.
  void PassBatches(int count) {
    absl::MutexLock lock(&mu_);
    passes_ += count;
  }
  // Blocks until `count` batches wait at the closed gate; false after kGateHangLimit.
  bool WaitUntilWaiting(int count) {
    absl::MutexLock lock(&mu_);
    auto reached = [this, count]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return waiting_ >= count; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kGateHangLimit);
  }
  // Blocks until batch number `index` (0-based, counted from Start) waits at the gate and every
  // batch before it has passed (and so has finished: there is one worker in these tests).
  bool WaitUntilHeld(int index) {
    absl::MutexLock lock(&mu_);
    auto held = [this, index]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return arrived_ > index && passed_ == index;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&held), kGateHangLimit);
  }
  // The batch arriving as number `index` (0-based, counted from Start) returns `status`
  // without running.
  void FailBatch(int index, absl::Status status) {
    absl::MutexLock lock(&mu_);
    failures_[index] = std::move(status);
  }
  // For every batch that passed the gate, the number of distinct tensors in it.
  std::vector<int> TensorsPerBatch() {
    absl::MutexLock lock(&mu_);
    return tensors_per_batch_;
  }

 private:
  bool CanPass() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return open_ || passes_ > 0; }

  std::unique_ptr<BatchExecutor> inner_;
  absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = true;
  int passes_ ABSL_GUARDED_BY(mu_) = 0;
  int passed_ ABSL_GUARDED_BY(mu_) = 0;
  int waiting_ ABSL_GUARDED_BY(mu_) = 0;
  int arrived_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int, absl::Status> failures_ ABSL_GUARDED_BY(mu_);
  std::vector<int> tensors_per_batch_ ABSL_GUARDED_BY(mu_);
};

}  // namespace nvfp4cal::server::testing

#endif  // NVFP4CAL_TESTS_SERVER_GATED_EXECUTOR_H_
