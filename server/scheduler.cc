#include "server/scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"
#include "common/thread_name.h"

namespace nvfp4cal::server {

Scheduler::Scheduler(const SchedulerOptions& options, BatchExecutor* executor)
    : options_(options), executor_(executor) {
  const int workers = std::max(1, options_.num_workers);
  workers_.reserve(static_cast<size_t>(workers));
  for (int w = 0; w < workers; ++w) workers_.emplace_back([this, w] { WorkerLoop(w); });
}

Scheduler::~Scheduler() { Shutdown(); }

FlowId Scheduler::OpenFlow(const FlowOptions& options) {
  absl::MutexLock lock(&mu_);
  const FlowId id = next_flow_id_++;
  flows_[id].options = options;
  return id;
}

absl::Status Scheduler::Enqueue(FlowId id, WorkItem item) {
  std::vector<Completion> completions;
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    auto it = flows_.find(id);
    if (stopping_) {
      status = absl::UnavailableError("scheduler is shutting down; no new work is accepted");
    } else if (it == flows_.end()) {
      status = absl::NotFoundError(absl::StrFormat("scheduler: unknown flow %d", id));
    } else if (!it->second.failure.ok()) {
      status = it->second.failure;
    } else if (it->second.released) {
      status = absl::FailedPreconditionError(
          absl::StrFormat("scheduler: flow %d was released; no more items may be added", id));
    } else if (options_.clock() >= it->second.options.deadline) {
      status = absl::DeadlineExceededError(
          absl::StrFormat("flow '%s' passed its deadline %s before all work was queued",
                          it->second.options.name, absl::FormatTime(it->second.options.deadline)));
      FailFlow(id, &it->second, status, &completions);
    } else if (item.memory_bytes > options_.memory_budget_bytes) {
      status = absl::ResourceExhaustedError(absl::StrFormat(
          "work item needs %d bytes of device memory; the per-batch memory budget is %d bytes",
          item.memory_bytes, options_.memory_budget_bytes));
    } else if (queued_items_ >= options_.max_queued_items) {
      status = absl::ResourceExhaustedError(
          absl::StrFormat("scheduler queue is full: max_queued_items = %d, queued = %d",
                          options_.max_queued_items, queued_items_));
    } else {
      Flow& flow = it->second;
      if (flow.queue.empty()) ready_[flow.options.priority].push_back(id);
      flow.queue.push_back(QueuedItem{std::move(item), options_.clock()});
      ++queued_items_;
    }
  }
  RunCompletions(&completions);
  return status;
}

void Scheduler::CancelFlow(FlowId id, const absl::Status& reason) {
  std::vector<Completion> completions;
  {
    absl::MutexLock lock(&mu_);
    auto it = flows_.find(id);
    if (it == flows_.end() || !it->second.failure.ok()) return;
    FailFlow(id, &it->second, reason, &completions);
    MaybeForget(id);
  }
  RunCompletions(&completions);
}

void Scheduler::CloseFlow(FlowId id) {
  absl::MutexLock lock(&mu_);
  auto it = flows_.find(id);
  if (it == flows_.end()) return;
  it->second.released = true;
  MaybeForget(id);
}

void Scheduler::Shutdown() {
  std::vector<Completion> completions;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    const absl::Status reason = absl::UnavailableError("scheduler shut down before the work ran");
    for (auto& [id, flow] : flows_) {
      if (flow.failure.ok()) FailFlow(id, &flow, reason, &completions);
    }
  }
  RunCompletions(&completions);
  for (std::thread& worker : workers_) worker.join();
  workers_.clear();
}

SchedulerStats Scheduler::Stats() const {
  absl::MutexLock lock(&mu_);
  SchedulerStats stats;
  stats.queued_items = queued_items_;
  stats.running_items = running_items_;
  stats.flows = static_cast<int64_t>(flows_.size());
  stats.batches = batches_;
  stats.batched_items = batched_items_;
  stats.batched_item_bytes = batched_item_bytes_;
  return stats;
}

bool Scheduler::HasRunnableWork() const { return stopping_ || queued_items_ > 0; }

void Scheduler::WorkerLoop(int worker) {
  NameThisThread("nvf-worker");
  for (;;) {
    std::vector<Completion> completions;
    std::vector<std::pair<FlowId, QueuedItem>> batch;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &Scheduler::HasRunnableWork));
      if (stopping_) break;
      ExpireDeadlines(&completions);
      batch = TakeBatch();
    }
    RunCompletions(&completions);
    if (batch.empty()) continue;

    std::vector<Work*> works;
    works.reserve(batch.size());
    for (auto& entry : batch) works.push_back(entry.second.item.work.get());
    std::vector<absl::Status> item_status(batch.size());
    const absl::Time start = options_.clock();
    absl::Status batch_status =
        executor_->ExecuteBatch(worker, absl::MakeSpan(works), &item_status);
    const absl::Time end = options_.clock();
    if (batch_status.ok() && item_status.size() != batch.size()) {
      batch_status = absl::InternalError(
          absl::StrFormat("executor returned %d item statuses for a batch of %d",
                          item_status.size(), batch.size()));
    }

    {
      absl::MutexLock lock(&mu_);
      ++batches_;
      batched_items_ += static_cast<int64_t>(batch.size());
      for (size_t i = 0; i < batch.size(); ++i) {
        batched_item_bytes_ += batch[i].second.item.memory_bytes;
        const FlowId id = batch[i].first;
        Flow& flow = flows_.at(id);
        --flow.running;
        --running_items_;
        if (!batch_status.ok() && flow.failure.ok())
          FailFlow(id, &flow, batch_status, &completions);
        WorkOutcome outcome;
        outcome.status = !flow.failure.ok() ? flow.failure : item_status[i];
        outcome.queue_wait = start - batch[i].second.enqueued;
        outcome.kernel_time = end - start;
        outcome.worker = worker;
        completions.push_back(Completion{std::move(batch[i].second.item.done), outcome});
        MaybeForget(id);
      }
    }
    RunCompletions(&completions);
  }
}

std::vector<std::pair<FlowId, Scheduler::QueuedItem>> Scheduler::TakeBatch() {
  std::vector<std::pair<FlowId, QueuedItem>> batch;
  int64_t memory_bytes = 0;
  while (static_cast<int>(batch.size()) < std::max(1, options_.max_items_per_batch) &&
         !ready_.empty()) {
    auto level = ready_.begin();
    std::deque<FlowId>& turn = level->second;
    const FlowId id = turn.front();
    Flow& flow = flows_.at(id);
    const int64_t item_bytes = flow.queue.front().item.memory_bytes;
    if (!batch.empty() && memory_bytes + item_bytes > options_.memory_budget_bytes) break;
    memory_bytes += item_bytes;
    batch.emplace_back(id, std::move(flow.queue.front()));
    flow.queue.pop_front();
    --queued_items_;
    ++flow.running;
    ++running_items_;
    turn.pop_front();
    if (!flow.queue.empty()) turn.push_back(id);
    if (turn.empty()) ready_.erase(level);
  }
  return batch;
}

void Scheduler::ExpireDeadlines(std::vector<Completion>* completions) {
  const absl::Time now = options_.clock();
  for (auto& [id, flow] : flows_) {
    if (flow.failure.ok() && !flow.queue.empty() && now >= flow.options.deadline) {
      FailFlow(id, &flow,
               absl::DeadlineExceededError(absl::StrFormat(
                   "flow '%s' passed its deadline %s with %d work items still queued",
                   flow.options.name, absl::FormatTime(flow.options.deadline), flow.queue.size())),
               completions);
    }
  }
  // Forgetting is deferred: erasing inside the loop above would invalidate the iteration.
  std::vector<FlowId> finished;
  for (const auto& [id, flow] : flows_) {
    if (flow.released && flow.queue.empty() && flow.running == 0) finished.push_back(id);
  }
  for (FlowId id : finished) flows_.erase(id);
}

void Scheduler::FailFlow(FlowId id, Flow* flow, const absl::Status& reason,
                         std::vector<Completion>* completions) {
  flow->failure = reason;
  if (flow->queue.empty()) return;
  for (QueuedItem& queued : flow->queue) {
    WorkOutcome outcome;
    outcome.status = reason;
    completions->push_back(Completion{std::move(queued.item.done), outcome});
  }
  queued_items_ -= static_cast<int64_t>(flow->queue.size());
  flow->queue.clear();
  auto level = ready_.find(flow->options.priority);
  if (level != ready_.end()) {
    std::deque<FlowId>& turn = level->second;
    turn.erase(std::remove(turn.begin(), turn.end(), id), turn.end());
    if (turn.empty()) ready_.erase(level);
  }
}

void Scheduler::MaybeForget(FlowId id) {
  auto it = flows_.find(id);
  if (it == flows_.end()) return;
  const Flow& flow = it->second;
  if (flow.released && flow.queue.empty() && flow.running == 0) flows_.erase(it);
}

void Scheduler::RunCompletions(std::vector<Completion>* completions) {
  for (Completion& completion : *completions) {
    if (completion.done) completion.done(completion.outcome);
  }
  completions->clear();
}

}  // namespace nvfp4cal::server
