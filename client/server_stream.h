// ServerStream: one Quantize stream of nvfp4cal::Client with one server. Internal to the
// client library (client.cc); callers use nvfp4cal::Client (client.h).
//
// A Client call (client.cc) owns the units of work (tensors sharing a Hessian travel together),
// the queues, work stealing, retries and the call's statistics. For each Quantize session it
// creates a ServerStream, which owns that session's wire protocol and nothing beyond it: the
// session options, each tensor as a header, its Hessian's chunks (once per session; blocks, or
// the full matrix for gptq) and its weight rows in chunks under the server's limits, and a
// reader thread that assembles the result chunks and hands each finished tensor to the call.
//
//   ServerStream stream(options, address, tasks, limits, on_result, on_error);
//   // register &stream so that another thread may Cancel() it; add call metadata:
//   authorize(stream.context());
//   bool writable = stream.Open(channel);
//   absl::Status local_error;
//   for (each unit while writable) {
//     if (stream.ExceedsSessionLimits(unit)) break;  // the unit goes to a fresh session
//     local_error = stream.SendUnit(unit, &writable);
//     if (!local_error.ok()) break;
//   }
//   const grpc::Status finished = stream.Close(/*cancel=*/!local_error.ok(), writable);
//   // unregister &stream (no Cancel() from now on), then:
//   stream.ReleaseCall();
//   const absl::Status reader_error = stream.CollectIncomplete(session_tasks, &incomplete);
//
// Weight rows and Hessian blocks go out without a copy: each chunk is a small serialized prefix
// (proto/wire_codec.h) and a gRPC slice of the task's own memory. Those slices are counted per
// task and per stream (SliceLease): a task's result is handed over only once gRPC released its
// slices (the caller may free the memory then; a server that answers before reading the rows
// is an error), and ReleaseCall waits for all of the stream's.
//
// Thread-safety: Cancel() from any thread; every other method from the thread that owns the
// stream. on_result and on_error run on the stream's reader thread.
#ifndef NVFP4CAL_CLIENT_SERVER_STREAM_H_
#define NVFP4CAL_CLIENT_SERVER_STREAM_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/client.h"
#include "client/quantizer.h"
#include "grpcpp/grpcpp.h"
#include "nvfp4cal/v1/calibrator.grpc.pb.h"

namespace nvfp4cal::client_internal {

// Whether the task runs gptq with its full Hessian (sent whole rather than as blocks).
bool SendsFullHessian(const TensorTask& task);

class ServerStream {
 public:
  // Told the reader's first error (a malformed or unexpected response, or on_result's error),
  // prefixed with "server <address>: ", so that the call can stop its other streams.
  using ErrorSink = std::function<void(const absl::Status& error)>;

  // `options`, `tasks` and the callbacks' targets must outlive the stream. `limits`: the
  // server's GetServerInfo limits, which size the chunks and bound the session. Sets the
  // stream's deadline (options.timeout); no connection is made before Open.
  ServerStream(const ClientOptions& options, std::string address,
               absl::Span<const TensorTask> tasks, const v1::Limits& limits,
               QuantizeResultCallback on_result, ErrorSink on_error);
  ServerStream(const ServerStream&) = delete;
  ServerStream& operator=(const ServerStream&) = delete;

  // For call metadata (credentials) before Open.
  grpc::ClientContext* context() { return &*context_; }

  // Cancels the stream (before or after Open); any thread.
  void Cancel() {
    ended_.store(true);
    context_->TryCancel();
  }

  // Starts the stream on `channel` and its reader thread and writes the session options; false
  // when that write failed (the server is gone: the reader reports why). After Open, Close
  // must run before the stream is destroyed.
  bool Open(grpc::ChannelInterface* channel);

  // Whether the unit's Hessians not yet sent, or its tensor names, would take the session over
  // the server's limits (max_session_hessian_bytes, max_session_full_hessian_bytes,
  // max_session_tensor_name_bytes).
  bool ExceedsSessionLimits(absl::Span<const size_t> unit) const;

  // Sends the unit's tensors in order; the last tensor of a Hessian lets the server free it.
  // An error (RESOURCE_EXHAUSTED) for the first tensor over the server's per-tensor limits,
  // before any of it is sent; *writable = false when a write failed (the stream is broken).
  absl::Status SendUnit(absl::Span<const size_t> unit, bool* writable);

  // Ends the stream: cancels it (`cancel`), else half-closes it when still `writable`; waits
  // for the reader and returns the stream's final status.
  grpc::Status Close(bool cancel, bool writable);

  // After Close, once no other thread may Cancel() any more: frees the call and waits until
  // gRPC released every slice of the tasks' memory (a cancelled call keeps the unsent ones
  // until it is freed). The caller may free the tasks' memory after it. The destructor calls it.
  void ReleaseCall();
  ~ServerStream() { ReleaseCall(); }

  // After Close: appends the tasks among `session_tasks` whose result did not arrive to
  // *incomplete and returns the reader's error (OK when none).
  absl::Status CollectIncomplete(absl::Span<const size_t> session_tasks,
                                 std::vector<size_t>* incomplete);

 private:
  // Requests go out as bytes (serialized messages, or a prefix and a slice of the caller's
  // memory); responses are parsed as messages.
  using QuantizeStream = grpc::ClientReaderWriter<grpc::ByteBuffer, v1::QuantizeResponse>;

  // Slices of caller memory that gRPC still holds.
  class SliceLease {
   public:
    void Add() {
      absl::MutexLock lock(&mu_);
      ++held_;
    }
    void Release() {
      absl::MutexLock lock(&mu_);
      --held_;
    }
    // Blocks until every slice counted here was released, for at most `timeout`; false when
    // slices are still held then.
    bool AwaitNoneFor(absl::Duration timeout) {
      absl::MutexLock lock(&mu_);
      return mu_.AwaitWithTimeout(absl::Condition(
                                      +[](int64_t* held) { return *held == 0; }, &held_),
                                  timeout);
    }
    void AwaitNone() { AwaitNoneFor(absl::InfiniteDuration()); }

   private:
    absl::Mutex mu_;
    int64_t held_ ABSL_GUARDED_BY(mu_) = 0;
  };

  // A tensor sent and not yet finished: its result chunks land here.
  struct Pending {
    size_t task = 0;
    // The slices of this task's weights (and of the Hessian blocks it defined).
    std::shared_ptr<SliceLease> lease;
    std::vector<uint8_t> codes;
    std::vector<uint8_t> scales;
    int64_t rows_covered = 0;
    bool done = false;
    // When its last row went to gRPC (InfinitePast: not yet). From then on the stream reads the
    // task's memory only through the slices gRPC holds; a summary before it is refused, since
    // the result would let the caller free memory the stream still sends from.
    absl::Time handed_over_at = absl::InfinitePast();
  };

  absl::Status CheckLimits(const TensorTask& task) const;
  // Header, the Hessian's chunks when this session has not seen it, then the weight rows.
  // release: the session's last tensor with this Hessian (HessianRef.release_after).
  bool SendTensor(size_t j, bool release);
  // The diagonal blocks of the task's Hessian in chunks of about chunk_bytes_.
  bool SendHessianBlocks(const TensorTask& task, const std::shared_ptr<SliceLease>& lease);
  // The full Hessian in chunks of about chunk_bytes_, cut straight from `h`.
  bool SendFullHessian(const FullHessianView& h, bool upper);
  // The task's weight rows in chunks of about chunk_bytes_ (at least one row each).
  bool SendWeightRows(const TensorTask& task, const std::shared_ptr<SliceLease>& lease);
  // gRPC's destroy callback of a zero-copy slice: releases what the SliceHold holds.
  struct SliceHold;
  static void ReleaseSlice(void* hold);
  // One message, serialized.
  bool WriteMessage(const v1::QuantizeRequest& message);
  // One message as `prefix` followed by `bytes` of caller memory at `data`, which gRPC sends
  // from where it is; the slice counts in `lease` and in the stream's lease until released.
  bool WriteWithSlice(const std::string& prefix, const void* data, size_t bytes,
                      const std::shared_ptr<SliceLease>& lease);

  void ReadResponses();
  absl::Status HandleResponse(const v1::QuantizeResponse& response);
  // Copies a result chunk into its tensor's pending buffers.
  absl::Status AddResultChunk(const v1::ResultChunk& chunk);
  // Checks a tensor's summary against its task and hands the assembled result to on_result.
  absl::Status FinishTensor(const v1::TensorSummary& summary);

  const ClientOptions& options_;
  const std::string address_;
  const absl::Span<const TensorTask> tasks_;
  const v1::Limits limits_;
  // Target size of a weight or Hessian chunk: options.chunk_bytes, at most a quarter of the
  // server's max_receive_message_bytes, at least 1 KiB.
  const int64_t chunk_bytes_;
  const QuantizeResultCallback on_result_;
  const ErrorSink on_error_;

  // Destroyed by ReleaseCall: the call's transport stream, which may hold slices of the tasks'
  // memory, lives as long as the context holds the call.
  std::optional<grpc::ClientContext> context_{std::in_place};
  // Set once the stream can carry nothing more (cancelled, or the reader saw its end).
  std::atomic<bool> ended_{false};
  std::unique_ptr<QuantizeStream> stream_;
  // Every slice of caller memory this stream gave gRPC and gRPC still holds.
  const std::shared_ptr<SliceLease> stream_lease_ = std::make_shared<SliceLease>();
  std::thread reader_;
  absl::Mutex mu_;
  std::map<std::string, Pending> pending_ ABSL_GUARDED_BY(mu_);
  absl::Status reader_error_ ABSL_GUARDED_BY(mu_);
  // Hessians the server holds for this session, and what they cost it: diagonal blocks (every
  // Hessian) and full matrices (gptq), against max_session_hessian_bytes /
  // max_session_full_hessian_bytes.
  std::set<std::string> hessians_sent_;
  int64_t hessian_bytes_ = 0;
  int64_t full_hessian_bytes_ = 0;
  // Tensor names the server keeps for the session, against max_session_tensor_name_bytes.
  int64_t name_bytes_ = 0;
};

}  // namespace nvfp4cal::client_internal

#endif  // NVFP4CAL_CLIENT_SERVER_STREAM_H_
