// Scheduler: the queue between the RPC layer and the devices.
//
// Work arrives as items (row ranges of tensors) tagged with a flow: the queue of one requester,
// a Quantize stream or an API job, with its priority and deadline. One worker thread per
// device takes batches of items and hands them to a BatchExecutor. The scheduler decides the
// order: higher flow priority first; among equal priorities, flows take turns item by item (round
// robin), so a small request is not stuck behind a whole checkpoint. A batch gathers items from
// several flows until the next one would exceed the device memory budget.
//
// Nothing here knows about gRPC or kernels; tests drive it with a fake executor.
//
//   Scheduler scheduler(options, &executor);
//   FlowOptions flow_options;
//   flow_options.priority = 1;
//   FlowId flow = scheduler.OpenFlow(flow_options);
//   WorkItem item;
//   item.memory_bytes = bytes_needed;
//   item.work = std::make_unique<MyWork>(...);          // what the executor runs
//   item.done = [](const WorkOutcome& outcome) { ... };  // called exactly once
//   absl::Status admitted = scheduler.Enqueue(flow, std::move(item));
//   ...
//   scheduler.CloseFlow(flow);  // no more items; forgotten once its items are done
//
// Lifetime rules: every admitted item's `done` runs exactly once, on a worker thread or on the
// thread that cancels its flow, never with the scheduler's lock held. Enqueue that fails does
// not call `done`.
#ifndef NVFP4CAL_SERVER_SCHEDULER_H_
#define NVFP4CAL_SERVER_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace nvfp4cal::server {

using FlowId = uint64_t;

// The executor's description of one item; the scheduler never looks inside.
class Work {
 public:
  virtual ~Work() = default;
};

// What happened to one item.
struct WorkOutcome {
  // OK, the executor's error, or the flow's cancellation / failure / deadline status.
  absl::Status status;
  // From admission to the start of the batch that ran it (zero when it never ran).
  absl::Duration queue_wait;
  // Wall time of the batch that ran it (zero when it never ran).
  absl::Duration kernel_time;
  // Worker (device) index that ran it; -1 when it never ran.
  int worker = -1;
};

// One unit of queued work.
struct WorkItem {
  // Device memory the item needs while its batch runs; batches stay within the budget.
  int64_t memory_bytes = 0;
  // Handed to the executor.
  std::unique_ptr<Work> work;
  // Called exactly once with the outcome.
  std::function<void(const WorkOutcome&)> done;
};

// Runs batches on a device. Implementations must be callable from several workers at once
// (each with its own worker index).
class BatchExecutor {
 public:
  virtual ~BatchExecutor() = default;

  // Runs `batch` on device `worker`. Returns a batch-wide error (RESOURCE_EXHAUSTED for a
  // failed allocation) that fails every flow in the batch; otherwise fills `item_status` (same
  // size as `batch`) with each item's own outcome.
  virtual absl::Status ExecuteBatch(int worker, absl::Span<Work* const> batch,
                                    std::vector<absl::Status>* item_status) = 0;
};

struct SchedulerOptions {
  // Worker threads: one per device (GPU), or the CPU workers when there is none.
  int num_workers = 1;
  // Items queued over all flows; Enqueue beyond this answers RESOURCE_EXHAUSTED at once.
  int64_t max_queued_items = 1024;
  // Device memory one batch may use; an item larger than this is rejected at Enqueue.
  int64_t memory_budget_bytes = int64_t{1} << 30;
  // Items in one batch at most, to bound the latency a batch adds to everyone in it.
  int max_items_per_batch = 64;
  // Time source for deadlines and timings; tests inject a fake clock.
  std::function<absl::Time()> clock = [] { return absl::Now(); };
};

// Per-flow scheduling parameters.
struct FlowOptions {
  // Higher runs first; equal priorities take turns.
  int priority = 0;
  // Queued work of the flow fails with DEADLINE_EXCEEDED once the clock passes this.
  absl::Time deadline = absl::InfiniteFuture();
  // Label used in error messages.
  std::string name;
};

// A snapshot of the queue, for metrics and GetServerInfo.
struct SchedulerStats {
  // Items waiting.
  int64_t queued_items = 0;
  // Items in batches that are running now.
  int64_t running_items = 0;
  // Flows not yet forgotten.
  int64_t flows = 0;
  // Batches run since start, the work items in them and those items' memory_bytes: how full
  // the batches are (a device's kernels and copies are cheaper per byte in larger batches).
  int64_t batches = 0;
  int64_t batched_items = 0;
  int64_t batched_item_bytes = 0;
};

class Scheduler {
 public:
  // Starts the workers. `executor` must outlive the scheduler.
  Scheduler(const SchedulerOptions& options, BatchExecutor* executor);
  // Shuts down (see Shutdown).
  ~Scheduler();

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Registers a flow; items may be enqueued for it until CloseFlow.
  FlowId OpenFlow(const FlowOptions& options);

  // Admits one item, or answers at once: RESOURCE_EXHAUSTED when the queue is full or the item
  // exceeds the memory budget, the flow's status when it failed or was cancelled,
  // DEADLINE_EXCEEDED past its deadline, UNAVAILABLE after Shutdown, NOT_FOUND for an unknown
  // flow. On error `item.done` is not called.
  absl::Status Enqueue(FlowId flow, WorkItem item);

  // Fails the flow with `reason` (e.g. CANCELLED): its queued items are dropped at once (their
  // `done` gets `reason` on this thread); items already running finish their batch and then
  // get `reason` too. Later Enqueues answer `reason`. No-op for unknown or finished flows.
  void CancelFlow(FlowId flow, const absl::Status& reason);

  // The owner will add no more items; the flow is forgotten once its items are done.
  void CloseFlow(FlowId flow);

  // Stops taking new work, drops every queued item with UNAVAILABLE, waits for running
  // batches and joins the workers. Idempotent.
  void Shutdown();

  SchedulerStats Stats() const;

 private:
  struct QueuedItem {
    WorkItem item;
    absl::Time enqueued;
  };
  struct Flow {
    FlowOptions options;
    std::deque<QueuedItem> queue;
    int64_t running = 0;
    bool released = false;
    // Non-OK once cancelled or failed; every later item gets it.
    absl::Status failure;
  };
  // Completed work whose `done` must run after the lock is dropped.
  struct Completion {
    std::function<void(const WorkOutcome&)> done;
    WorkOutcome outcome;
  };

  void WorkerLoop(int worker);
  // Collects the next batch in priority / round-robin order. Requires mu_.
  std::vector<std::pair<FlowId, QueuedItem>> TakeBatch() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Fails every flow whose deadline passed. Requires mu_.
  void ExpireDeadlines(std::vector<Completion>* completions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks a flow failed and moves its queued items to `completions`.
  void FailFlow(FlowId id, Flow* flow, const absl::Status& reason,
                std::vector<Completion>* completions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets a released flow with no work left.
  void MaybeForget(FlowId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool HasRunnableWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void RunCompletions(std::vector<Completion>* completions);

  const SchedulerOptions options_;
  BatchExecutor* const executor_;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  FlowId next_flow_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<FlowId, Flow> flows_ ABSL_GUARDED_BY(mu_);
  // Per priority (highest first), the flows with queued items in round-robin order.
  std::map<int, std::deque<FlowId>, std::greater<int>> ready_ ABSL_GUARDED_BY(mu_);
  int64_t queued_items_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t running_items_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t batches_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t batched_items_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t batched_item_bytes_ ABSL_GUARDED_BY(mu_) = 0;

  std::vector<std::thread> workers_;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_SCHEDULER_H_
