// Several sessions to one server (an address given several times, as --streams-per-server does)
// against real nvfp4cal-server processes that allow fewer Quantize streams than the client
// opens (--max_concurrent_streams): refused sessions leave their tensors to the accepted one,
// every result arrives once with the bytes of a single-session run, and a server that refuses
// every session fails the call with its limit (or leaves the tensors to other servers) instead
// of hanging.
#include <chrono>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

using ::nvfp4cal::testing::ServerProcess;
using ::testing::Each;
using ::testing::HasSubstr;
using ::testing::SizeIs;

// Long enough for any wait of a passing run; a run that waits this long has failed.
constexpr absl::Duration kPatience = absl::Seconds(20);

// Twelve bf16 tensors in six pairs sharing a Hessian (six units of the call, two per session's
// queue with three sessions), with storage that outlives them.
struct Tasks {
  Tasks() {
    for (int i = 0; i < 12; ++i) weights.push_back(MakeExampleWeightsBf16(64, 128, 100 + i));
    for (int h = 0; h < 6; ++h) hessians.push_back(MakeExampleHessianBlocks(8, 200 + h));
    for (int i = 0; i < 12; ++i) {
      TensorTask task;
      task.name = absl::StrCat("layer", i / 2, ".proj", i % 2, ".weight");
      task.weights = {weights[i].data(), DType::kBFloat16, 64, 128};
      task.hessians = {hessians[i / 2].data(), 8};
      task.hessian_key = absl::StrCat("layer", i / 2, ".input");
      task.global_amax = *ComputeGlobalAmax(task.weights);
      tasks.push_back(task);
    }
  }
  std::vector<std::vector<uint16_t>> weights;
  std::vector<std::vector<float>> hessians;
  std::vector<TensorTask> tasks;
};

// What one call returned: its status, every result and how often each task's arrived, the
// notes and the statistics.
struct CallOutcome {
  absl::Status status;
  std::map<size_t, QuantizedTensor> results;
  std::map<size_t, int> deliveries;
  std::vector<std::string> notes;
  ClientCallStats stats;
};

// Collects results and notes of one call. `first_result` (optional) runs on the first result,
// before it is stored, on the client's thread that received it.
class Collector {
 public:
  explicit Collector(std::function<void()> first_result = {})
      : first_result_(std::move(first_result)) {}

  void Attach(ClientOptions* options) {
    options->on_note = [this](const std::string& line) {
      absl::MutexLock lock(&mu_);
      outcome_.notes.push_back(line);
    };
  }

  QuantizeResultCallback OnResult() {
    return [this](size_t i, QuantizedTensor r) {
      bool first = false;
      {
        absl::MutexLock lock(&mu_);
        first = !seen_result_;
        seen_result_ = true;
      }
      if (first && first_result_) first_result_();
      absl::MutexLock lock(&mu_);
      ++outcome_.deliveries[i];
      outcome_.results[i] = std::move(r);
      return absl::OkStatus();
    };
  }

  // Waits until `count` notes arrived or kPatience passed; whether they did.
  bool AwaitNotes(size_t count) {
    absl::MutexLock lock(&mu_);
    auto enough = [this, count]()
                      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return outcome_.notes.size() >= count; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), kPatience);
  }

  CallOutcome Take() {
    absl::MutexLock lock(&mu_);
    return std::move(outcome_);
  }

 private:
  const std::function<void()> first_result_;
  absl::Mutex mu_;
  bool seen_result_ ABSL_GUARDED_BY(mu_) = false;
  CallOutcome outcome_ ABSL_GUARDED_BY(mu_);
};

ClientOptions OptionsFor(std::vector<std::string> addresses) {
  ClientOptions options;
  options.addresses = std::move(addresses);
  options.max_attempts = 3;
  options.initial_backoff = absl::Milliseconds(10);
  return options;
}

// Runs the call on its own thread; a call still running after kPatience fails the test (it is
// then waited for, which ctest's time limit bounds).
CallOutcome RunCall(const ClientOptions& options, const std::vector<TensorTask>& tasks,
                    Collector* collector) {
  CallOutcome outcome;
  ClientOptions with_notes = options;
  collector->Attach(&with_notes);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(with_notes);
  if (!client.ok()) {
    ADD_FAILURE() << client.status();
    outcome.status = client.status();
    return outcome;
  }
  ClientCallStats stats;
  std::future<absl::Status> call = std::async(std::launch::async, [&] {
    return (*client)->QuantizeTensors(tasks, collector->OnResult(), &stats);
  });
  EXPECT_EQ(call.wait_for(absl::ToChronoSeconds(kPatience)), std::future_status::ready)
      << "the call did not end";
  const absl::Status status = call.get();
  outcome = collector->Take();
  outcome.status = status;
  outcome.stats = stats;
  return outcome;
}

int64_t Sum(const std::vector<int64_t>& v) {
  int64_t total = 0;
  for (int64_t x : v) total += x;
  return total;
}

TEST(StreamLimit, RefusedSessionsLeaveTheirTensorsToTheAcceptedOne) {
  ServerProcess server({"--max_concurrent_streams=1"});
  ASSERT_FALSE(server.address().empty());
  const Tasks in;

  Collector single_collector;
  const CallOutcome single = RunCall(OptionsFor({server.address()}), in.tasks, &single_collector);
  ASSERT_TRUE(single.status.ok()) << single.status;
  ASSERT_THAT(single.results, SizeIs(in.tasks.size()));

  // Three sessions; every task waits for a gate that opens once the other two were refused, so
  // that the accepted session (and the server's one slot) stays open until then, whatever the
  // threads' timing (a stream whose results were all sent ends, freeing the slot).
  std::vector<TensorTask> gated = in.tasks;
  TaskGate gate;
  for (TensorTask& task : gated) task.ready = &gate;
  Collector collector;
  std::thread opener([&] {
    collector.AwaitNotes(2);  // kPatience at most: then the notes' expectations below fail
    gate.Open(absl::OkStatus());
  });
  const std::string a = server.address();
  const CallOutcome three = RunCall(OptionsFor({a, a, a}), gated, &collector);
  opener.join();
  ASSERT_TRUE(three.status.ok()) << three.status;

  // Every task's result arrived exactly once, with the single session's bytes.
  ASSERT_THAT(three.results, SizeIs(in.tasks.size()));
  ASSERT_THAT(three.deliveries, SizeIs(in.tasks.size()));
  for (const auto& [i, count] : three.deliveries) EXPECT_EQ(count, 1) << in.tasks[i].name;
  for (const auto& [i, want] : single.results) {
    const QuantizedTensor& got = three.results.at(i);
    EXPECT_EQ(got.packed_codes, want.packed_codes) << in.tasks[i].name;
    EXPECT_EQ(got.scales, want.scales) << in.tasks[i].name;
    EXPECT_EQ(got.global_scale, want.global_scale) << in.tasks[i].name;
  }
  EXPECT_EQ(Sum(three.stats.tensors_per_address), static_cast<int64_t>(in.tasks.size()));
  // Two sessions refused, one note each, naming the server and the sessions left.
  EXPECT_EQ(three.stats.streams_refused, 2);
  EXPECT_THAT(three.notes,
              ::testing::UnorderedElementsAre(
                  "note: server " + a +
                      " refused a stream (max_concurrent_streams); going on with 2 streams to it",
                  "note: server " + a +
                      " refused a stream (max_concurrent_streams); going on with 1 stream to it"));
  EXPECT_TRUE(single.notes.empty());
  EXPECT_EQ(single.stats.streams_refused, 0);
}

// Another client's call to `address` that holds the server's only stream slot: every task after
// the first waits for a gate that Release opens, so its stream stays open (a call whose results
// merely wait to be read would not hold it: the server ends a stream once its results are sent,
// and small results fit in the transport's window).
class SlotHolder {
 public:
  SlotHolder(const std::string& address, const std::vector<TensorTask>& tasks)
      : tasks_(tasks), collector_([this] { holding_.Notify(); }) {
    for (size_t k = 1; k < tasks_.size(); ++k) tasks_[k].ready = &gate_;
    ClientOptions options = OptionsFor({address});
    collector_.Attach(&options);
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
    if (!client.ok()) {
      ADD_FAILURE() << client.status();
      return;
    }
    client_ = *std::move(client);
    call_ = client_->QuantizeTensorsAsync(tasks_, collector_.OnResult());
  }
  ~SlotHolder() {
    Release();
    if (call_.valid()) call_.wait();
  }

  // Whether the holding call's first result arrived (its stream holds the slot).
  bool Holding() {
    return client_ != nullptr && holding_.WaitForNotificationWithTimeout(kPatience);
  }
  void Release() { gate_.Open(absl::OkStatus()); }
  // Releases the slot and returns the holding call's outcome.
  CallOutcome Finish() {
    Release();
    CallOutcome outcome;
    if (!call_.valid() ||
        call_.wait_for(absl::ToChronoSeconds(kPatience)) != std::future_status::ready) {
      outcome.status = absl::DeadlineExceededError("the holding call did not finish");
      return outcome;
    }
    const absl::Status status = call_.get();
    outcome = collector_.Take();
    outcome.status = status;
    return outcome;
  }

 private:
  std::vector<TensorTask> tasks_;
  TaskGate gate_;
  absl::Notification holding_;
  Collector collector_;
  std::unique_ptr<Client> client_;
  std::future<absl::Status> call_;
};

// A session of another client holds the server's only slot: every session of the call is
// refused. Two retire, the last one retries and gives up, and the call fails naming the limit.
TEST(StreamLimit, EverySessionRefusedFailsWithTheLimitInsteadOfHanging) {
  ServerProcess server({"--max_concurrent_streams=1"});
  ASSERT_FALSE(server.address().empty());
  const Tasks in;
  const std::string a = server.address();

  SlotHolder holder(a, in.tasks);
  ASSERT_TRUE(holder.Holding());

  Collector collector;
  const CallOutcome refused = RunCall(OptionsFor({a, a, a}), in.tasks, &collector);
  holder.Release();
  EXPECT_EQ(refused.status.code(), absl::StatusCode::kResourceExhausted) << refused.status;
  EXPECT_THAT(std::string(refused.status.message()),
              HasSubstr("server " + a + " refused the stream after 3 attempts: "));
  EXPECT_THAT(std::string(refused.status.message()),
              HasSubstr("too many Quantize streams: max_concurrent_streams = 1"));
  EXPECT_TRUE(refused.deliveries.empty());
  EXPECT_EQ(refused.stats.streams_refused, 2);
  EXPECT_EQ(refused.stats.failed_attempts, 3);  // the last session's attempts
  EXPECT_THAT(refused.notes, SizeIs(2));
  EXPECT_THAT(refused.notes, Each(HasSubstr("refused a stream (max_concurrent_streams)")));

  // The holder was never disturbed.
  const CallOutcome held = holder.Finish();
  EXPECT_TRUE(held.status.ok()) << held.status;
  EXPECT_THAT(held.results, SizeIs(in.tasks.size()));
}

// The same full server among others: its tensors go to the other server, and the call succeeds.
TEST(StreamLimit, AServerRefusingEverySessionLeavesItsTensorsToTheOthers) {
  ServerProcess full({"--max_concurrent_streams=1"});
  ServerProcess other;
  ASSERT_FALSE(full.address().empty() || other.address().empty());
  const Tasks in;
  const std::string a = full.address();

  SlotHolder holder(a, in.tasks);
  ASSERT_TRUE(holder.Holding());

  Collector collector;
  ClientOptions options = OptionsFor({a, other.address(), a});
  options.work_stealing = false;  // the full server's queued tensors reach the other as orphans
  const CallOutcome call = RunCall(options, in.tasks, &collector);
  holder.Release();
  ASSERT_TRUE(call.status.ok()) << call.status;
  ASSERT_THAT(call.deliveries, SizeIs(in.tasks.size()));
  for (const auto& [i, count] : call.deliveries) EXPECT_EQ(count, 1) << in.tasks[i].name;
  EXPECT_EQ(call.stats.tensors_per_address,
            (std::vector<int64_t>{0, static_cast<int64_t>(in.tasks.size()), 0}));
  EXPECT_EQ(call.stats.streams_refused, 1);

  const CallOutcome reference = holder.Finish();
  ASSERT_TRUE(reference.status.ok()) << reference.status;
  for (const auto& [i, want] : reference.results) {
    EXPECT_EQ(call.results.at(i).packed_codes, want.packed_codes) << in.tasks[i].name;
    EXPECT_EQ(call.results.at(i).scales, want.scales) << in.tasks[i].name;
  }
}

}  // namespace
}  // namespace nvfp4cal
