// Scheduler specification, driven by a fake executor whose batches can be held open, so every
// ordering below is deterministic: nothing waits on wall-clock time.
#include "server/scheduler.h"

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace nvfp4cal::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Safety net only: a broken scheduler fails the test instead of hanging ctest.
constexpr absl::Duration kHangLimit = absl::Seconds(30);

struct FakeWork : Work {
  std::string label;
  bool hold = false;             // block in the executor until Release()
  bool fail_allocation = false;  // the batch containing it fails with RESOURCE_EXHAUSTED
};

// Records batches; holds any batch containing a `hold` item until Release().
class FakeExecutor : public BatchExecutor {
 public:
  absl::Status ExecuteBatch(int /*worker*/, absl::Span<Work* const> batch,
                            std::vector<absl::Status>* item_status) override {
    std::vector<std::string> labels;
    bool hold = false;
    bool fail = false;
    for (Work* w : batch) {
      auto* work = static_cast<FakeWork*>(w);
      labels.push_back(work->label);
      hold = hold || work->hold;
      fail = fail || work->fail_allocation;
    }
    absl::MutexLock lock(&mu_);
    batches_.push_back(labels);
    if (hold) {
      ++held_;
      mu_.Await(absl::Condition(
          +[](int* releases) { return *releases > 0; }, &releases_));
      --releases_;
      --held_;
    }
    if (fail) return absl::ResourceExhaustedError("fake: out of device memory allocating batch");
    item_status->assign(batch.size(), absl::OkStatus());
    return absl::OkStatus();
  }

  // Blocks until `count` held batches are inside ExecuteBatch.
  void WaitUntilHeld(int count) {
    absl::MutexLock lock(&mu_);
    auto reached = [this, count]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return held_ >= count; };
    ASSERT_TRUE(mu_.AwaitWithTimeout(absl::Condition(&reached), kHangLimit));
  }
  void Release() {
    absl::MutexLock lock(&mu_);
    ++releases_;
  }
  // Labels of every executed item, in execution order.
  std::vector<std::string> Executed() {
    absl::MutexLock lock(&mu_);
    std::vector<std::string> all;
    for (const auto& batch : batches_) all.insert(all.end(), batch.begin(), batch.end());
    return all;
  }
  std::vector<std::vector<std::string>> Batches() {
    absl::MutexLock lock(&mu_);
    return batches_;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::vector<std::string>> batches_ ABSL_GUARDED_BY(mu_);
  int held_ ABSL_GUARDED_BY(mu_) = 0;
  int releases_ ABSL_GUARDED_BY(mu_) = 0;
};

// Collects outcomes by label and waits for them.
class Outcomes {
 public:
  std::function<void(const WorkOutcome&)> Callback(const std::string& label) {
    return [this, label](const WorkOutcome& outcome) {
      absl::MutexLock lock(&mu_);
      done_.emplace_back(label, outcome.status);
    };
  }
  void WaitFor(size_t count) {
    absl::MutexLock lock(&mu_);
    auto reached = [this, count]()
                       ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return done_.size() >= count; };
    ASSERT_TRUE(mu_.AwaitWithTimeout(absl::Condition(&reached), kHangLimit))
        << "only " << done_.size() << " of " << count << " items finished";
  }
  absl::Status StatusOf(const std::string& label) {
    absl::MutexLock lock(&mu_);
    for (const auto& [l, s] : done_) {
      if (l == label) return s;
    }
    return absl::UnknownError("not finished: " + label);
  }
  size_t Count() {
    absl::MutexLock lock(&mu_);
    return done_.size();
  }

 private:
  absl::Mutex mu_;
  std::vector<std::pair<std::string, absl::Status>> done_ ABSL_GUARDED_BY(mu_);
};

WorkItem MakeItem(Outcomes* outcomes, const std::string& label, int64_t bytes = 1,
                  bool hold = false, bool fail_allocation = false) {
  auto work = std::make_unique<FakeWork>();
  work->label = label;
  work->hold = hold;
  work->fail_allocation = fail_allocation;
  WorkItem item;
  item.memory_bytes = bytes;
  item.work = std::move(work);
  item.done = outcomes->Callback(label);
  return item;
}

FlowOptions Named(const std::string& name, int priority = 0) {
  FlowOptions options;
  options.name = name;
  options.priority = priority;
  return options;
}

SchedulerOptions OneByOne() {
  SchedulerOptions options;
  options.num_workers = 1;
  options.max_items_per_batch = 1;
  return options;
}

// Starts a flow whose single item occupies the only worker until executor.Release().
FlowId OccupyWorker(Scheduler* scheduler, FakeExecutor* executor, Outcomes* outcomes) {
  const FlowId blocker = scheduler->OpenFlow(Named("blocker"));
  EXPECT_TRUE(scheduler->Enqueue(blocker, MakeItem(outcomes, "hold", 1, /*hold=*/true)).ok());
  executor->WaitUntilHeld(1);
  return blocker;
}

TEST(Scheduler, SmallFlowTakesTurnsWithLargeFlow) {
  FakeExecutor executor;
  Outcomes outcomes;
  Scheduler scheduler(OneByOne(), &executor);
  OccupyWorker(&scheduler, &executor, &outcomes);
  const FlowId large = scheduler.OpenFlow(Named("checkpoint"));
  const FlowId small = scheduler.OpenFlow(Named("small"));
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(scheduler.Enqueue(large, MakeItem(&outcomes, "L" + std::to_string(i))).ok());
  }
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(scheduler.Enqueue(small, MakeItem(&outcomes, "S" + std::to_string(i))).ok());
  }
  executor.Release();
  outcomes.WaitFor(8);
  EXPECT_THAT(executor.Executed(), ElementsAre("hold", "L0", "S0", "L1", "S1", "L2", "L3", "L4"));
}

TEST(Scheduler, HigherPriorityRunsFirst) {
  FakeExecutor executor;
  Outcomes outcomes;
  Scheduler scheduler(OneByOne(), &executor);
  OccupyWorker(&scheduler, &executor, &outcomes);
  const FlowId low = scheduler.OpenFlow(Named("low", 0));
  const FlowId high = scheduler.OpenFlow(Named("high", 5));
  ASSERT_TRUE(scheduler.Enqueue(low, MakeItem(&outcomes, "low0")).ok());
  ASSERT_TRUE(scheduler.Enqueue(low, MakeItem(&outcomes, "low1")).ok());
  ASSERT_TRUE(scheduler.Enqueue(high, MakeItem(&outcomes, "high0")).ok());
  ASSERT_TRUE(scheduler.Enqueue(high, MakeItem(&outcomes, "high1")).ok());
  executor.Release();
  outcomes.WaitFor(5);
  EXPECT_THAT(executor.Executed(), ElementsAre("hold", "high0", "high1", "low0", "low1"));
}

TEST(Scheduler, ExpiredDeadlineFailsQueuedWorkWithoutRunningIt) {
  std::atomic<int64_t> now_s{1000};
  SchedulerOptions options = OneByOne();
  options.clock = [&now_s] { return absl::FromUnixSeconds(now_s.load()); };
  FakeExecutor executor;
  Outcomes outcomes;
  Scheduler scheduler(options, &executor);
  OccupyWorker(&scheduler, &executor, &outcomes);
  FlowOptions flow_options = Named("hurried");
  flow_options.deadline = absl::FromUnixSeconds(1010);
  const FlowId flow = scheduler.OpenFlow(flow_options);
  ASSERT_TRUE(scheduler.Enqueue(flow, MakeItem(&outcomes, "d0")).ok());
  ASSERT_TRUE(scheduler.Enqueue(flow, MakeItem(&outcomes, "d1")).ok());
  now_s = 1011;
  executor.Release();
  outcomes.WaitFor(3);
  EXPECT_THAT(executor.Executed(), ElementsAre("hold"));
  EXPECT_EQ(outcomes.StatusOf("d0").code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(outcomes.StatusOf("d1").message(), HasSubstr("hurried"));
  const absl::Status late = scheduler.Enqueue(flow, MakeItem(&outcomes, "d2"));
  EXPECT_EQ(late.code(), absl::StatusCode::kDeadlineExceeded);
}

TEST(Scheduler, CancelDropsQueuedWorkAtOnceAndRunningWorkAtBatchEnd) {
  FakeExecutor executor;
  Outcomes outcomes;
  Scheduler scheduler(OneByOne(), &executor);
  const FlowId flow = scheduler.OpenFlow(Named("doomed"));
  ASSERT_TRUE(scheduler.Enqueue(flow, MakeItem(&outcomes, "running", 1, /*hold=*/true)).ok());
  executor.WaitUntilHeld(1);
  ASSERT_TRUE(scheduler.Enqueue(flow, MakeItem(&outcomes, "queued0")).ok());
  ASSERT_TRUE(scheduler.Enqueue(flow, MakeItem(&outcomes, "queued1")).ok());
  EXPECT_EQ(scheduler.Stats().queued_items, 2);

  scheduler.CancelFlow(flow, absl::CancelledError("client cancelled"));
  // Queued items finished before CancelFlow returned, while the batch is still held.
  EXPECT_EQ(outcomes.Count(), 2u);
  EXPECT_EQ(outcomes.StatusOf("queued0").code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(scheduler.Stats().queued_items, 0);
  EXPECT_EQ(scheduler.Enqueue(flow, MakeItem(&outcomes, "after")).code(),
            absl::StatusCode::kCancelled);

  executor.Release();
  outcomes.WaitFor(3);
  EXPECT_EQ(outcomes.StatusOf("running").code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(executor.Executed(), ElementsAre("running"));
}

TEST(Scheduler, BatchesAcrossFlowsWithinMemoryBudget) {
  SchedulerOptions options;
  options.num_workers = 1;
  options.memory_budget_bytes = 100;
  FakeExecutor executor;
  Outcomes outcomes;
  Scheduler scheduler(options, &executor);
  OccupyWorker(&scheduler, &executor, &outcomes);
  const FlowId a = scheduler.OpenFlow(Named("a"));
  const FlowId b = scheduler.OpenFlow(Named("b"));
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(scheduler.Enqueue(a, MakeItem(&outcomes, "a" + std::to_string(i), 40)).ok());
  }
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(scheduler.Enqueue(b, MakeItem(&outcomes, "b" + std::to_string(i), 40)).ok());
  }
  const absl::Status too_big = scheduler.Enqueue(a, MakeItem(&outcomes, "huge", 101));
  EXPECT_EQ(too_big.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(too_big.message(), HasSubstr("needs 101 bytes"));
  EXPECT_THAT(too_big.message(), HasSubstr("budget is 100 bytes"));
  executor.Release();
  outcomes.WaitFor(6);
  const std::vector<std::vector<std::string>> batches = executor.Batches();
  ASSERT_EQ(batches.size(), 4u);
  EXPECT_THAT(batches[1], ElementsAre("a0", "b0"));
  EXPECT_THAT(batches[2], ElementsAre("a1", "b1"));
  EXPECT_THAT(batches[3], ElementsAre("a2"));
  // The counters: the blocker's batch (1 byte) and these three; the refused item is not run.
  const SchedulerStats stats = scheduler.Stats();
  EXPECT_EQ(stats.batches, 4);
  EXPECT_EQ(stats.batched_items, 6);
  EXPECT_EQ(stats.batched_item_bytes, 1 + 5 * 40);
}

TEST(Scheduler, FullQueueAnswersResourceExhaustedAtOnce) {
  SchedulerOptions options = OneByOne();
  options.max_queued_items = 2;
  FakeExecutor executor;
  Outcomes outcomes;
  Scheduler scheduler(options, &executor);
  OccupyWorker(&scheduler, &executor, &outcomes);
  const FlowId flow = scheduler.OpenFlow(Named("burst"));
  ASSERT_TRUE(scheduler.Enqueue(flow, MakeItem(&outcomes, "q0")).ok());
  ASSERT_TRUE(scheduler.Enqueue(flow, MakeItem(&outcomes, "q1")).ok());
  const absl::Status full = scheduler.Enqueue(flow, MakeItem(&outcomes, "q2"));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("max_queued_items = 2, queued = 2"));
  executor.Release();
  outcomes.WaitFor(3);
  // Rejection did not poison the flow: accepted work ran.
  EXPECT_TRUE(outcomes.StatusOf("q1").ok());
  EXPECT_TRUE(scheduler.Enqueue(flow, MakeItem(&outcomes, "q3")).ok());
  outcomes.WaitFor(4);
}

TEST(Scheduler, AllocationFailureFailsTheBatchFlowsAndKeepsServing) {
  SchedulerOptions options;
  options.num_workers = 1;
  options.max_items_per_batch = 2;
  FakeExecutor executor;
  Outcomes outcomes;
  Scheduler scheduler(options, &executor);
  OccupyWorker(&scheduler, &executor, &outcomes);
  const FlowId a = scheduler.OpenFlow(Named("a"));
  const FlowId b = scheduler.OpenFlow(Named("b"));
  ASSERT_TRUE(scheduler.Enqueue(a, MakeItem(&outcomes, "a0", 1, false, /*fail=*/true)).ok());
  ASSERT_TRUE(scheduler.Enqueue(a, MakeItem(&outcomes, "a1")).ok());
  ASSERT_TRUE(scheduler.Enqueue(a, MakeItem(&outcomes, "a2")).ok());
  ASSERT_TRUE(scheduler.Enqueue(b, MakeItem(&outcomes, "b0")).ok());
  executor.Release();
  outcomes.WaitFor(5);
  for (const char* label : {"a0", "a1", "a2", "b0"}) {
    EXPECT_EQ(outcomes.StatusOf(label).code(), absl::StatusCode::kResourceExhausted) << label;
  }
  EXPECT_THAT(outcomes.StatusOf("a2").message(), HasSubstr("out of device memory"));
  // a1 and a2 were dropped without running.
  EXPECT_THAT(executor.Executed(), ElementsAre("hold", "a0", "b0"));
  EXPECT_EQ(scheduler.Enqueue(b, MakeItem(&outcomes, "b1")).code(),
            absl::StatusCode::kResourceExhausted);

  const FlowId c = scheduler.OpenFlow(Named("c"));
  ASSERT_TRUE(scheduler.Enqueue(c, MakeItem(&outcomes, "c0")).ok());
  outcomes.WaitFor(6);
  EXPECT_TRUE(outcomes.StatusOf("c0").ok());
}

TEST(Scheduler, OneWorkerPerDeviceRunsBatchesConcurrently) {
  SchedulerOptions options = OneByOne();
  options.num_workers = 2;
  FakeExecutor executor;
  Outcomes outcomes;
  Scheduler scheduler(options, &executor);
  const FlowId a = scheduler.OpenFlow(Named("a"));
  const FlowId b = scheduler.OpenFlow(Named("b"));
  ASSERT_TRUE(scheduler.Enqueue(a, MakeItem(&outcomes, "a0", 1, /*hold=*/true)).ok());
  ASSERT_TRUE(scheduler.Enqueue(b, MakeItem(&outcomes, "b0", 1, /*hold=*/true)).ok());
  executor.WaitUntilHeld(2);  // both workers are inside a batch at once
  EXPECT_EQ(scheduler.Stats().running_items, 2);
  executor.Release();
  executor.Release();
  outcomes.WaitFor(2);
}

TEST(Scheduler, ReleasedFlowsAreForgottenAndShutdownFailsQueuedWork) {
  FakeExecutor executor;
  Outcomes outcomes;
  auto scheduler = std::make_unique<Scheduler>(OneByOne(), &executor);
  const FlowId blocker = OccupyWorker(scheduler.get(), &executor, &outcomes);
  const FlowId flow = scheduler->OpenFlow(Named("late"));
  ASSERT_TRUE(scheduler->Enqueue(flow, MakeItem(&outcomes, "late0")).ok());
  scheduler->CloseFlow(blocker);
  scheduler->CloseFlow(flow);
  EXPECT_EQ(scheduler->Enqueue(flow, MakeItem(&outcomes, "x")).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(scheduler->Stats().flows, 2);  // both still have work

  executor.Release();
  outcomes.WaitFor(2);
  EXPECT_TRUE(outcomes.StatusOf("late0").ok());
  EXPECT_EQ(scheduler->Stats().flows, 0);

  const FlowId held = scheduler->OpenFlow(Named("held"));
  ASSERT_TRUE(scheduler->Enqueue(held, MakeItem(&outcomes, "run", 1, /*hold=*/true)).ok());
  executor.WaitUntilHeld(1);
  ASSERT_TRUE(scheduler->Enqueue(held, MakeItem(&outcomes, "never")).ok());
  std::thread shutdown([&scheduler] { scheduler->Shutdown(); });
  outcomes.WaitFor(3);  // "never" was dropped while "run" is still held
  EXPECT_EQ(outcomes.StatusOf("never").code(), absl::StatusCode::kUnavailable);
  executor.Release();
  shutdown.join();
  EXPECT_EQ(outcomes.StatusOf("run").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(scheduler->Enqueue(held, MakeItem(&outcomes, "y")).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_THAT(executor.Executed(), ElementsAre("hold", "late0", "run"));
}

}  // namespace
}  // namespace nvfp4cal::server
