#include "server/job_watch_reactor.h"

#include <utility>

#include "proto/grpc_status.h"
#include "server/proto_codec.h"
#include "server/quantize_session.h"

namespace nvfp4cal::server {

JobWatchReactor::JobWatchReactor(JobManager* jobs, ServerMetrics* metrics, std::string job_id)
    : jobs_(jobs), metrics_(metrics), job_id_(std::move(job_id)), started_(absl::Now()) {}

grpc::ServerWriteReactor<grpc::ByteBuffer>* JobWatchReactor::Start(JobManager* jobs,
                                                                   ServerMetrics* metrics,
                                                                   const std::string& job_id,
                                                                   const Caller& caller) {
  std::shared_ptr<JobWatchReactor> reactor(new JobWatchReactor(jobs, metrics, job_id));
  reactor->self_ = reactor;
  // Delivers the current snapshot at once (starting the first write) when the job exists.
  const absl::Status watched = jobs->Watch(job_id, reactor, caller);
  if (!watched.ok()) {
    Actions actions;
    {
      absl::MutexLock lock(&reactor->mu_);
      reactor->finish_called_ = true;
      reactor->status_ = ToGrpcStatus(watched);
      actions.finish = true;
      actions.status = reactor->status_;
    }
    reactor->Perform(actions);
  }
  return reactor.get();
}

void JobWatchReactor::OnJobUpdate(const v1::Job& job, uint64_t version) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (finish_called_ || version <= version_) return;
    version_ = version;
    pending_ = job;
    NextLocked(&actions);
  }
  Perform(actions);
}

void JobWatchReactor::OnWriteDone(bool ok) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    write_in_flight_ = false;
    if (!ok) {
      cancelled_ = true;
    } else if (writing_final_) {
      final_written_ = true;
    }
    NextLocked(&actions);
  }
  Perform(actions);
}

void JobWatchReactor::OnCancel() {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
    NextLocked(&actions);
  }
  Perform(actions);
}

void JobWatchReactor::NextLocked(Actions* actions) {
  if (finish_called_ || write_in_flight_) return;
  if (cancelled_) {
    status_ = grpc::Status(grpc::StatusCode::CANCELLED,
                           "WatchJob ended: the client went away or the server is stopping");
  } else if (final_written_) {
    status_ = grpc::Status::OK;
  } else {
    if (pending_.has_value()) {
      writing_ = SerializeProto(*pending_);
      writing_final_ = IsFinalJobState(pending_->state());
      pending_.reset();
      write_in_flight_ = true;
      actions->write = true;
    }
    return;
  }
  finish_called_ = true;
  actions->finish = true;
  actions->status = status_;
}

void JobWatchReactor::Perform(const Actions& actions) {
  if (actions.write) StartWrite(&writing_);
  if (actions.finish) {
    // Counted before the client can see the status, so a scrape after the call includes it.
    metrics_->RecordRequest("WatchJob", actions.status.error_code(), absl::Now() - started_);
    Finish(actions.status);
  }
}

void JobWatchReactor::OnDone() {
  jobs_->Unwatch(job_id_, this);
  // The manager may still hold a reference for a delivery in progress; the last one frees us.
  std::shared_ptr<JobWatchReactor> self = std::move(self_);
}

}  // namespace nvfp4cal::server
