// JobManager: the jobs of the async API (SubmitJob, GetJob, WatchJob, CancelJob, ListJobs).
//
// A job is one tensor given whole in a SubmitJobRequest. Submit checks the request (the same
// header rules and messages as a Quantize session), splits its rows into items of one scheduler
// job (a TensorRun, as a Quantize session's tensor) and returns at once; the items' completions
// fill in the result and the progress. So jobs share the device, the fairness, the batching and
// every method with Quantize streams. A gptq job's full Hessian (FULL layout) is admitted on the
// server-wide full-Hessian budget and freed when its job is final.
//
// Jobs live in memory. At most limits.max_jobs are kept (queued, running and finished): a new
// job makes the oldest finished one forgotten, and when every kept job is unfinished Submit
// answers RESOURCE_EXHAUSTED. A finished job is forgotten limits.job_retention after it
// finished. Observers (WatchJob streams) get a snapshot at once and after every change.
//
// Each job belongs to the caller that submitted it (the bearer token, token_authenticator.h):
// a caller sees, reads, watches, lists and cancels only its own jobs, an admin caller every
// job; another caller's job answers NOT_FOUND like an unknown one. Without tokens every caller
// is an admin of one shared view (the default Caller).
//
// The gRPC layer stays thin: CalibratorService maps these calls one to one.
//
//   JobManager jobs(options, &scheduler, &metrics);
//   absl::StatusOr<v1::Job> job = jobs.Submit(request);   // QUEUED (or further), or the error
//   absl::StatusOr<v1::Job> now = jobs.Get(job->job_id(), /*include_result=*/true);
//   absl::StatusOr<v1::Job> cancelled = jobs.Cancel(job->job_id());
#ifndef NVFP4CAL_SERVER_JOB_MANAGER_H_
#define NVFP4CAL_SERVER_JOB_MANAGER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "nvfp4cal/v1/calibrator.pb.h"
#include "server/full_hessian_budget.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "server/server_options.h"
#include "server/tensor_run.h"
#include "server/token_authenticator.h"
#include "server/work_model.h"

namespace nvfp4cal::server {

// Receives a job's snapshots (WatchJob). Deliveries happen on scheduler or RPC threads, never
// with the manager's lock held, and may race: `version` grows with every change, so an
// observer drops a snapshot older than one it already has. The final state is always
// delivered, after which the observer is dropped.
class JobObserver {
 public:
  virtual ~JobObserver() = default;
  virtual void OnJobUpdate(const v1::Job& job, uint64_t version) = 0;
};

struct JobManagerOptions {
  // Tensor limits (as for sessions), max_rows_per_item, max_jobs, max_job_request_bytes,
  // job_retention and max_send_message_bytes (a result larger than it cannot be returned).
  ServiceLimits limits;
  // Time source of job timestamps, deadlines and retention; tests inject a fake clock.
  std::function<absl::Time()> clock = [] { return absl::Now(); };
  // Method gptq: the server-wide budget its full Hessians are admitted on (shared with Quantize
  // sessions); null: the manager keeps its own of limits.max_full_hessian_bytes.
  FullHessianBudget* full_hessians = nullptr;
  // The scheduler's device memory per batch (RowSplit: how gptq rows are cut into items).
  int64_t memory_budget_bytes = int64_t{1} << 30;
};

// Whether a state is final (SUCCEEDED, FAILED, CANCELLED).
bool IsFinalJobState(v1::JobState state);

class JobManager {
 public:
  // `scheduler` and `metrics` must outlive the manager; the scheduler must be shut down (so no
  // item callback is pending) before the manager is destroyed.
  JobManager(const JobManagerOptions& options, Scheduler* scheduler, ServerMetrics* metrics);

  JobManager(const JobManager&) = delete;
  JobManager& operator=(const JobManager&) = delete;

  // Checks and queues a job. Errors: RESOURCE_EXHAUSTED (request over max_job_request_bytes,
  // every kept job unfinished at max_jobs, tensor over max_tensor_elements, scheduler queue
  // full), INVALID_ARGUMENT / FAILED_PRECONDITION as for a Quantize session's tensor; each
  // names the field, the limit and the value. Nothing is kept on error.
  // The job belongs to `caller` (its token).
  absl::StatusOr<v1::Job> Submit(const v1::SubmitJobRequest& request,
                                 const Caller& caller = Caller{});

  // The job's state and progress; with include_result, a succeeded job's codes, scales and
  // summary. NOT_FOUND for unknown or forgotten jobs; RESOURCE_EXHAUSTED when the result
  // exceeds max_send_message_bytes.
  absl::StatusOr<v1::Job> Get(const std::string& job_id, bool include_result,
                              const Caller& caller = Caller{});

  // Cancels an unfinished job (CANCELLED at once; queued work dropped, a running batch's
  // results discarded). A finished job is returned unchanged. NOT_FOUND for unknown jobs.
  absl::StatusOr<v1::Job> Cancel(const std::string& job_id, const Caller& caller = Caller{});

  // Kept jobs, newest first, without results. INVALID_ARGUMENT for a negative page size or a
  // page token this server did not hand out.
  absl::StatusOr<v1::ListJobsResponse> List(const v1::ListJobsRequest& request,
                                            const Caller& caller = Caller{});

  // Delivers the job's snapshot to `observer` at once and, until it is final, after every
  // change. NOT_FOUND for unknown jobs.
  absl::Status Watch(const std::string& job_id, std::shared_ptr<JobObserver> observer,
                     const Caller& caller = Caller{});
  // Stops deliveries to `observer` (no-op when it is not watching).
  void Unwatch(const std::string& job_id, const JobObserver* observer);

  // Waits until no job is unfinished or the deadline passes; true when none is left.
  bool WaitUntilIdle(absl::Time deadline);
  // Cancels every unfinished job with `reason` (server shutdown).
  void CancelAll(const absl::Status& reason);

  // Jobs not yet final.
  int64_t unfinished_jobs() const;

 private:
  struct Record {
    uint64_t seq = 0;
    std::string id;
    // The submitting caller's identity (its token; empty without tokens).
    std::string owner;
    // False until all items were admitted; such a job is invisible to the API.
    bool admitted = false;
    v1::JobState state = v1::JOB_STATE_QUEUED;
    std::string tensor_name;
    int64_t rows = 0;
    int64_t cols = 0;
    int64_t rows_done = 0;
    absl::Status error;
    absl::Time created;
    absl::Time finished = absl::InfiniteFuture();
    uint64_t version = 1;
    FlowId scheduler_flow = 0;
    // Tasks, statistics and summary of the job's tensor; freed when the job is final.
    std::unique_ptr<TensorRun> run;
    // The result, assembled as row ranges finish.
    std::string packed_codes;
    std::string scales;
    v1::TensorSummary summary;
    std::vector<std::shared_ptr<JobObserver>> observers;
  };
  // Snapshots to deliver once the lock is released.
  struct Delivery {
    std::vector<std::shared_ptr<JobObserver>> observers;
    v1::Job job;
    uint64_t version = 0;
  };

  void OnItemDone(uint64_t seq, const std::shared_ptr<RowRangeTask>& task,
                  const WorkOutcome& outcome) ABSL_LOCKS_EXCLUDED(mu_);
  // Moves a record to a final state; its observers are handed over in `delivery`.
  void FinalizeLocked(Record* record, v1::JobState state, const absl::Status& error,
                      Delivery* delivery) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets finished jobs past their retention.
  void SweepLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes room for one more job, or RESOURCE_EXHAUSTED.
  absl::Status MakeRoomLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The admitted record with this id, or null.
  // The admitted job `job_id` when `caller` may see it, else null.
  Record* FindLocked(const std::string& job_id, const Caller& caller)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static bool Visible(const Record& record, const Caller& caller) {
    return record.admitted && (caller.admin || record.owner == caller.identity);
  }
  void EraseLocked(uint64_t seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string NotFoundMessage(const std::string& job_id) const;
  v1::Job SnapshotLocked(const Record& record) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void Deliver(const Delivery& delivery);

  const JobManagerOptions options_;
  Scheduler* const scheduler_;
  ServerMetrics* const metrics_;
  // When options_.full_hessians is null.
  std::unique_ptr<FullHessianBudget> own_full_hessians_;

  mutable absl::Mutex mu_;
  // By creation order (seq); ListJobs walks it backwards.
  std::map<uint64_t, Record> jobs_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, uint64_t> ids_ ABSL_GUARDED_BY(mu_);
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t unfinished_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_JOB_MANAGER_H_
