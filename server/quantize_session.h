// QuantizeSession: the reactor behind one Calibrator.Quantize stream.
//
// It parses and validates the client's messages (SessionOptions, TensorHeader, HessianChunk,
// WeightChunk), turns weight rows into scheduler items and writes ResultChunks and
// TensorSummaries back as items finish. No thread is blocked per stream:
//   - flow control: the next read starts only after the previous chunk's items were admitted by
//     the scheduler and while fewer than limits.max_inflight_chunks_per_stream items are
//     outstanding; a finished item resumes reading;
//   - the first error (validation, scheduler rejection, kernel error, cancellation) finishes the
//     whole stream with that status and cancels the session's queued work.
//
// The service creates one per call. It is reference counted: gRPC holds one reference until
// OnDone, and every admitted scheduler item holds one until its callback returned; the last
// release deletes it.
//
//   grpc::ServerBidiReactor<QuantizeRequest, QuantizeResponse>* Quantize(
//       grpc::CallbackServerContext* context) override {
//     return new QuantizeSession(environment_, context);
//   }
#ifndef NVFP4CAL_SERVER_QUANTIZE_SESSION_H_
#define NVFP4CAL_SERVER_QUANTIZE_SESSION_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/v1/calibrator.pb.h"
#include "server/full_hessian_budget.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "server/server_options.h"
#include "server/session_protocol.h"
#include "server/tensor_run.h"
#include "server/token_authenticator.h"
#include "server/work_model.h"

namespace nvfp4cal::server {

class StreamWatchdog;

// What every session shares; owned by the service, which outlives its sessions.
struct SessionEnvironment {
  Scheduler* scheduler = nullptr;
  ServerMetrics* metrics = nullptr;
  ServiceLimits limits;
  // Set while the server drains: new streams and new tensors answer UNAVAILABLE.
  const std::atomic<bool>* draining = nullptr;
  // Open Quantize streams, for limits.max_concurrent_streams.
  std::atomic<int>* open_streams = nullptr;
  // Null: no token required; else streams without an accepted token end UNAUTHENTICATED.
  const TokenAuthenticator* authenticator = nullptr;
  // Server-wide account of full Hessians (method gptq); limits.max_full_hessian_bytes.
  FullHessianBudget* full_hessians = nullptr;
  // Ends idle streams (limits.stream_idle_timeout); null: none is ended.
  StreamWatchdog* watchdog = nullptr;
  // The scheduler's device memory per batch: a gptq tensor's rows go into items of up to half
  // of it (whole tensors at 8B sizes), since each item pays the ordered group loop once.
  int64_t memory_budget_bytes = int64_t{1} << 30;
};

// Messages travel as bytes and are parsed here (server/proto_codec.h), so a malformed one ends
// the stream with INVALID_ARGUMENT instead of looking like the client's half-close.
class QuantizeSession : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  QuantizeSession(const SessionEnvironment& environment, grpc::CallbackServerContext* context);

  // For the StreamWatchdog: ends the stream with DEADLINE_EXCEEDED when it has been idle for
  // limits.stream_idle_timeout at `now` (nothing of it in the scheduler, no message read and no
  // result written).
  void CheckIdle(absl::Time now) ABSL_LOCKS_EXCLUDED(mu_);
  // A reference that keeps the session alive until the matching Unref.
  void Ref() { refs_.fetch_add(1); }
  void Unref();

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  using Tensor = SessionProtocol::Tensor;
  // Reactor operations decided under mu_ and started after it is released (gRPC may run a
  // reaction inline inside a Start* call).
  struct Actions {
    bool start_read = false;
    bool start_write = false;
    bool cancel_flow = false;
    bool finish = false;
    grpc::Status finish_status;
    std::vector<std::shared_ptr<RowRangeTask>> enqueue;
    std::shared_ptr<Tensor> enqueue_tensor;
  };

  // Carries out what the protocol asked for one message: a new tensor (the stream's scheduler
  // job on the first), rows to split into tasks, or the drain's stop.
  void Apply(const SessionProtocol::Step& step, Actions* actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Admits tasks to the scheduler; called without mu_.
  void EnqueueTasks(Actions* actions) ABSL_LOCKS_EXCLUDED(mu_);
  void OnItemDone(const std::shared_ptr<Tensor>& tensor, const std::shared_ptr<RowRangeTask>& task,
                  const WorkOutcome& outcome) ABSL_LOCKS_EXCLUDED(mu_);
  void QueueSummary(const Tensor& tensor) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void QueueWrite(v1::QuantizeResponse response, int64_t result_bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetUnsentResultBytes(int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  void FailLocked(const absl::Status& status, Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeStartRead(Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeStartWrite(Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeFinish(Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Perform(Actions* actions) ABSL_LOCKS_EXCLUDED(mu_);

  const SessionEnvironment env_;
  grpc::CallbackServerContext* const context_;
  const absl::Time started_;
  // The message being read (parsed into request_ by OnReadDone) and the one being written.
  grpc::ByteBuffer read_buffer_;
  grpc::ByteBuffer current_write_;
  // Whether this stream counts towards open_streams (false when refused at the door).
  bool counted_ = false;
  // gRPC's reference plus one per admitted scheduler item.
  std::atomic<int> refs_{1};

  absl::Mutex mu_;
  v1::QuantizeRequest request_;
  // A response waiting to be written; result_bytes: its codes and scales.
  struct PendingWrite {
    v1::QuantizeResponse message;
    int64_t result_bytes = 0;
  };
  std::deque<PendingWrite> pending_writes_ ABSL_GUARDED_BY(mu_);
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  // A read is pending or its message is being handled.
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  // StartReads decided but not yet called; Finish waits for them (a Finish before a pending
  // StartRead lets gRPC free the call under it).
  // A count, not a flag: a read decided in one thread can complete and its reaction decide the
  // next read before the first thread has cleared its mark.
  int reads_starting_ ABSL_GUARDED_BY(mu_) = 0;
  bool half_closed_ ABSL_GUARDED_BY(mu_) = false;
  int64_t messages_read_ ABSL_GUARDED_BY(mu_) = 0;
  // An error ended the session; final_status_ is what Finish sends.
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);

  std::optional<FlowId> flow_ ABSL_GUARDED_BY(mu_);
  int64_t items_outstanding_ ABSL_GUARDED_BY(mu_) = 0;
  SessionProtocol protocol_ ABSL_GUARDED_BY(mu_);
  // Tensors whose summary is not sent yet, by index.
  std::map<int64_t, std::shared_ptr<Tensor>> open_tensors_ ABSL_GUARDED_BY(mu_);
  // Codes and scales queued or being written, for limits.max_unsent_result_bytes_per_stream
  // (mirrored in the metrics); those of the write in flight.
  int64_t unsent_result_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t writing_result_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  // The server is draining and a new tensor's header arrived: what follows is read and dropped,
  // the accepted tensors finish, then the call ends with stop_status_ (UNAVAILABLE naming it).
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time stopped_at_ ABSL_GUARDED_BY(mu_);
  // How long a stopped stream waits for the client's half-close (MaybeFinish).
  static constexpr absl::Duration kDrainReadGrace = absl::Milliseconds(500);
  grpc::Status stop_status_ ABSL_GUARDED_BY(mu_);
  // Last message read, result written or item finished, for limits.stream_idle_timeout.
  absl::Time last_progress_ ABSL_GUARDED_BY(mu_);
  // Registered with env_.watchdog (from the constructor until OnDone).
  bool watched_ = false;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_QUANTIZE_SESSION_H_
