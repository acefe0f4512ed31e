// JobWatchReactor: the reactor behind one Calibrator.WatchJob stream.
//
// It observes one job through JobManager::Watch and writes the job's snapshots as they come.
// At most one write is in flight and at most one snapshot waits behind it (a newer one replaces
// it), so a slow client gets the latest progress rather than a backlog; the final state is
// always written, and then the stream ends OK. Unknown job: NOT_FOUND. Client gone or the
// server shutting down: CANCELLED. No thread is blocked per stream.
//
// Shared ownership: the manager holds a reference while it may deliver, the reactor holds one to
// itself until OnDone, so a delivery racing with the end of the call never touches freed memory.
//
//   grpc::ServerWriteReactor<grpc::ByteBuffer>* WatchJob(grpc::CallbackServerContext* context,
//                                                       const grpc::ByteBuffer* request) override {
//     ...   // parse the WatchJobRequest (server/proto_codec.h)
//     return JobWatchReactor::Start(jobs_, metrics_, request.job_id(), caller);
//   }
#ifndef NVFP4CAL_SERVER_JOB_WATCH_REACTOR_H_
#define NVFP4CAL_SERVER_JOB_WATCH_REACTOR_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "nvfp4cal/v1/calibrator.pb.h"
#include "server/job_manager.h"
#include "server/metrics.h"

namespace nvfp4cal::server {

// Writes the Job messages as bytes (the service's methods are raw, server/proto_codec.h).
class JobWatchReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer>,
                              public JobObserver {
 public:
  // Creates the reactor for one call and subscribes it; `jobs` and `metrics` must outlive it.
  // A job `caller` may not see (JobManager::Watch) ends the call NOT_FOUND.
  static grpc::ServerWriteReactor<grpc::ByteBuffer>* Start(JobManager* jobs, ServerMetrics* metrics,
                                                           const std::string& job_id,
                                                           const Caller& caller);

  void OnJobUpdate(const v1::Job& job, uint64_t version) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnWriteDone(bool ok) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnCancel() override ABSL_LOCKS_EXCLUDED(mu_);
  void OnDone() override;

 private:
  // Reactor operations decided under mu_ and started after it is released (gRPC may run a
  // reaction inline inside a Start* call).
  struct Actions {
    bool write = false;
    bool finish = false;
    grpc::Status status;
  };

  JobWatchReactor(JobManager* jobs, ServerMetrics* metrics, std::string job_id);
  // Starts the next write, or finishes once the final state was written or the call ended.
  void NextLocked(Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Perform(const Actions& actions);

  JobManager* const jobs_;
  ServerMetrics* const metrics_;
  const std::string job_id_;
  const absl::Time started_;
  std::shared_ptr<JobWatchReactor> self_;

  absl::Mutex mu_;
  // Highest snapshot version taken; older deliveries are dropped.
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<v1::Job> pending_ ABSL_GUARDED_BY(mu_);
  // The message of the write in flight; gRPC reads it until OnWriteDone.
  grpc::ByteBuffer writing_;
  // Whether writing_ holds the job's final state.
  bool writing_final_ = false;
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool final_written_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_JOB_WATCH_REACTOR_H_
