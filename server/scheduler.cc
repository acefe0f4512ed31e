#include "server/scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"

namespace nvfp4cal::server {

Scheduler::Scheduler(const SchedulerOptions& options, BatchExecutor* executor)
    : options_(options), executor_(executor) {
  const int workers = std::max(1, options_.num_workers);
  workers_.reserve(static_cast<size_t>(workers));
  for (int w = 0; w < workers; ++w) workers_.emplace_back([this, w] { WorkerLoop(w); });
}

Scheduler::~Scheduler() { Shutdown(); }

JobId Scheduler::CreateJob(const JobOptions& options) {
  absl::MutexLock lock(&mu_);
  const JobId id = next_job_id_++;
  jobs_[id].options = options;
  return id;
}

absl::Status Scheduler::Enqueue(JobId id, WorkItem item) {
  std::vector<Completion> completions;
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (stopping_) {
      status = absl::UnavailableError("scheduler is shutting down; no new work is accepted");
    } else if (it == jobs_.end()) {
      status = absl::NotFoundError(absl::StrFormat("scheduler: unknown job %d", id));
    } else if (!it->second.failure.ok()) {
      status = it->second.failure;
    } else if (it->second.released) {
      status = absl::FailedPreconditionError(
          absl::StrFormat("scheduler: job %d was released; no more items may be added", id));
    } else if (options_.clock() >= it->second.options.deadline) {
      status = absl::DeadlineExceededError(
          absl::StrFormat("job '%s' passed its deadline %s before all work was queued",
                          it->second.options.name, absl::FormatTime(it->second.options.deadline)));
      FailJob(id, &it->second, status, &completions);
    } else if (item.memory_bytes > options_.memory_budget_bytes) {
      status = absl::ResourceExhaustedError(absl::StrFormat(
          "work item needs %d bytes of device memory; the per-batch memory budget is %d bytes",
          item.memory_bytes, options_.memory_budget_bytes));
    } else if (queued_items_ >= options_.max_queued_items) {
      status = absl::ResourceExhaustedError(
          absl::StrFormat("scheduler queue is full: max_queued_items = %d, queued = %d",
                          options_.max_queued_items, queued_items_));
    } else {
      Job& job = it->second;
      if (job.queue.empty()) ready_[job.options.priority].push_back(id);
      job.queue.push_back(QueuedItem{std::move(item), options_.clock()});
      ++queued_items_;
    }
  }
  RunCompletions(&completions);
  return status;
}

void Scheduler::CancelJob(JobId id, const absl::Status& reason) {
  std::vector<Completion> completions;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || !it->second.failure.ok()) return;
    FailJob(id, &it->second, reason, &completions);
    MaybeForget(id);
  }
  RunCompletions(&completions);
}

void Scheduler::ReleaseJob(JobId id) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
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
    for (auto& [id, job] : jobs_) {
      if (job.failure.ok()) FailJob(id, &job, reason, &completions);
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
  stats.jobs = static_cast<int64_t>(jobs_.size());
  stats.batches = batches_;
  return stats;
}

bool Scheduler::HasRunnableWork() const { return stopping_ || queued_items_ > 0; }

void Scheduler::WorkerLoop(int worker) {
  for (;;) {
    std::vector<Completion> completions;
    std::vector<std::pair<JobId, QueuedItem>> batch;
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
      for (size_t i = 0; i < batch.size(); ++i) {
        const JobId id = batch[i].first;
        Job& job = jobs_.at(id);
        --job.running;
        --running_items_;
        if (!batch_status.ok() && job.failure.ok()) FailJob(id, &job, batch_status, &completions);
        WorkOutcome outcome;
        outcome.status = !job.failure.ok() ? job.failure : item_status[i];
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

std::vector<std::pair<JobId, Scheduler::QueuedItem>> Scheduler::TakeBatch() {
  std::vector<std::pair<JobId, QueuedItem>> batch;
  int64_t memory_bytes = 0;
  while (static_cast<int>(batch.size()) < std::max(1, options_.max_items_per_batch) &&
         !ready_.empty()) {
    auto level = ready_.begin();
    std::deque<JobId>& turn = level->second;
    const JobId id = turn.front();
    Job& job = jobs_.at(id);
    const int64_t item_bytes = job.queue.front().item.memory_bytes;
    if (!batch.empty() && memory_bytes + item_bytes > options_.memory_budget_bytes) break;
    memory_bytes += item_bytes;
    batch.emplace_back(id, std::move(job.queue.front()));
    job.queue.pop_front();
    --queued_items_;
    ++job.running;
    ++running_items_;
    turn.pop_front();
    if (!job.queue.empty()) turn.push_back(id);
    if (turn.empty()) ready_.erase(level);
  }
  return batch;
}

void Scheduler::ExpireDeadlines(std::vector<Completion>* completions) {
  const absl::Time now = options_.clock();
  for (auto& [id, job] : jobs_) {
    if (job.failure.ok() && !job.queue.empty() && now >= job.options.deadline) {
      FailJob(id, &job,
              absl::DeadlineExceededError(absl::StrFormat(
                  "job '%s' passed its deadline %s with %d work items still queued",
                  job.options.name, absl::FormatTime(job.options.deadline), job.queue.size())),
              completions);
    }
  }
  // Forgetting is deferred: erasing inside the loop above would invalidate the iteration.
  std::vector<JobId> finished;
  for (const auto& [id, job] : jobs_) {
    if (job.released && job.queue.empty() && job.running == 0) finished.push_back(id);
  }
  for (JobId id : finished) jobs_.erase(id);
}

void Scheduler::FailJob(JobId id, Job* job, const absl::Status& reason,
                        std::vector<Completion>* completions) {
  job->failure = reason;
  if (job->queue.empty()) return;
  for (QueuedItem& queued : job->queue) {
    WorkOutcome outcome;
    outcome.status = reason;
    completions->push_back(Completion{std::move(queued.item.done), outcome});
  }
  queued_items_ -= static_cast<int64_t>(job->queue.size());
  job->queue.clear();
  auto level = ready_.find(job->options.priority);
  if (level != ready_.end()) {
    std::deque<JobId>& turn = level->second;
    turn.erase(std::remove(turn.begin(), turn.end(), id), turn.end());
    if (turn.empty()) ready_.erase(level);
  }
}

void Scheduler::MaybeForget(JobId id) {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  const Job& job = it->second;
  if (job.released && job.queue.empty() && job.running == 0) jobs_.erase(it);
}

void Scheduler::RunCompletions(std::vector<Completion>* completions) {
  for (Completion& completion : *completions) {
    if (completion.done) completion.done(completion.outcome);
  }
  completions->clear();
}

}  // namespace nvfp4cal::server
