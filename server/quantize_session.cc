#include "server/quantize_session.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "proto/grpc_status.h"
#include "proto/wire_codec.h"
#include "server/log.h"
#include "server/proto_codec.h"
#include "server/stream_watchdog.h"

namespace nvfp4cal::server {
namespace {

absl::Time DeadlineOf(const grpc::CallbackServerContext& context) {
  const auto remaining = context.deadline() - std::chrono::system_clock::now();
  const double seconds = std::chrono::duration<double>(remaining).count();
  // gRPC reports "no deadline" as a time point centuries away.
  if (seconds > 1e9) return absl::InfiniteFuture();
  return absl::Now() + absl::Seconds(seconds);
}

}  // namespace

QuantizeSession::QuantizeSession(const SessionEnvironment& environment,
                                 grpc::CallbackServerContext* context)
    : env_(environment),
      context_(context),
      started_(absl::Now()),
      protocol_(SessionProtocol::Environment{&env_.limits, env_.metrics, env_.full_hessians}),
      last_progress_(started_) {
  absl::Status refused;
  if (env_.authenticator != nullptr) {
    refused = env_.authenticator->Check(context->client_metadata());
  }
  if (!refused.ok()) {
    // Not counted as an open stream; nothing of the client's is looked at.
  } else if (env_.draining->load()) {
    refused = absl::UnavailableError("server is draining; no new Quantize streams are accepted");
  } else {
    const int open = env_.open_streams->fetch_add(1) + 1;
    counted_ = true;
    env_.metrics->AddInflightStreams(1);
    if (open > env_.limits.max_concurrent_streams) {
      refused = absl::ResourceExhaustedError(
          absl::StrFormat("too many Quantize streams: max_concurrent_streams = %d, open = %d",
                          env_.limits.max_concurrent_streams, open));
    }
  }
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (!refused.ok()) {
      FailLocked(refused, &actions);
    } else {
      reading_ = true;
      ++reads_starting_;
      actions.start_read = true;
    }
  }
  if (env_.watchdog != nullptr && refused.ok()) {
    watched_ = true;
    env_.watchdog->Add(this);
  }
  Perform(&actions);
}

void QuantizeSession::OnReadDone(bool ok) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (!ok) {
      reading_ = false;
      half_closed_ = true;
      if (!failed_ && context_->IsCancelled()) {
        // The read failed because the call was cancelled (client gone, deadline), not because
        // the client half-closed early: count and report it as such.
        FailLocked(absl::CancelledError("the call was cancelled or its deadline passed"), &actions);
      } else if (!failed_ && !protocol_.CurrentTensorComplete()) {
        const Tensor& current = *protocol_.current();
        FailLocked(absl::FailedPreconditionError(absl::StrFormat(
                       "stream ended before tensor '%s' was complete: %d of %d rows received",
                       current.name, current.rows_received, current.rows)),
                   &actions);
      }
      MaybeFinish(&actions);
    } else if (stopped_) {
      // Draining: what the client sends after the refused header is read and dropped, so that
      // the call ends with every client message consumed (see MaybeFinish).
      ++messages_read_;
    } else if (!failed_) {
      ++messages_read_;
      last_progress_ = absl::Now();
      absl::Status status = ParseProto(
          &read_buffer_, absl::StrFormat("message %d of the stream", messages_read_), &request_);
      if (!status.ok()) {
        env_.metrics->RecordMalformedMessage("Quantize");
        LogLine(absl::StrCat("Quantize from ", context_->peer(), ": ", status.ToString()));
      } else {
        SessionProtocol::Step step;
        status = protocol_.Handle(messages_read_, &request_, env_.draining->load(), &step);
        if (status.ok()) Apply(step, &actions);
      }
      if (!status.ok()) {
        reading_ = false;
        FailLocked(status, &actions);
      }
    } else {
      reading_ = false;
    }
  }
  EnqueueTasks(&actions);
  {
    absl::MutexLock lock(&mu_);
    if (reading_) {
      reading_ = false;
      MaybeStartRead(&actions);
    }
    MaybeStartWrite(&actions);
    MaybeFinish(&actions);
  }
  Perform(&actions);
}

void QuantizeSession::Apply(const SessionProtocol::Step& step, Actions* actions) {
  if (step.opened != nullptr) {
    if (!flow_.has_value()) {
      FlowOptions flow;
      flow.priority = protocol_.priority();
      flow.deadline = DeadlineOf(*context_);
      flow.name = absl::StrCat("stream ", context_->peer());
      flow_ = env_.scheduler->OpenFlow(flow);
    }
    open_tensors_[step.opened->index] = step.opened;
  }
  if (step.stop) {
    stopped_ = true;
    stopped_at_ = absl::Now();
    stop_status_ = ToGrpcStatus(step.stop_status);
  }
  if (step.ready != nullptr) {
    std::vector<std::shared_ptr<RowRangeTask>> tasks = step.ready->run->MakeTasks(
        step.bytes, step.row_begin, step.num_rows,
        RowSplit{env_.limits.max_rows_per_item, env_.memory_budget_bytes},
        step.rows.has_value() ? &*step.rows : nullptr);
    items_outstanding_ += static_cast<int64_t>(tasks.size());
    for (std::shared_ptr<RowRangeTask>& task : tasks) actions->enqueue.push_back(std::move(task));
    actions->enqueue_tensor = step.ready;
  }
}

void QuantizeSession::EnqueueTasks(Actions* actions) {
  if (actions->enqueue.empty()) return;
  FlowId flow;
  {
    absl::MutexLock lock(&mu_);
    flow = *flow_;
  }
  std::shared_ptr<Tensor> tensor = std::move(actions->enqueue_tensor);
  size_t admitted = 0;
  absl::Status rejected;
  for (std::shared_ptr<RowRangeTask>& task : actions->enqueue) {
    refs_.fetch_add(1);
    const int64_t bytes = task->MemoryBytes();
    WorkItem item = MakeRowRangeItem(task, [this, tensor, task](const WorkOutcome& outcome) {
      OnItemDone(tensor, task, outcome);
    });
    rejected = env_.scheduler->Enqueue(flow, std::move(item));
    if (!rejected.ok()) {
      refs_.fetch_sub(1);  // the constructor's reference is still held: never the last
      break;
    }
    env_.metrics->AddDeviceMemoryInUse(bytes);
    ++admitted;
  }
  env_.metrics->SetQueueDepth(env_.scheduler->Stats().queued_items);
  const int64_t not_admitted = static_cast<int64_t>(actions->enqueue.size() - admitted);
  actions->enqueue.clear();
  if (not_admitted == 0) return;
  absl::MutexLock lock(&mu_);
  items_outstanding_ -= not_admitted;
  reading_ = false;
  FailLocked(PrefixStatus(rejected, absl::StrFormat("tensor '%s': ", tensor->name)), actions);
}

void QuantizeSession::OnItemDone(const std::shared_ptr<Tensor>& tensor,
                                 const std::shared_ptr<RowRangeTask>& task,
                                 const WorkOutcome& outcome) {
  env_.metrics->AddDeviceMemoryInUse(-task->MemoryBytes());
  env_.metrics->SetQueueDepth(env_.scheduler->Stats().queued_items);
  if (outcome.worker >= 0) {
    env_.metrics->ObserveQueueWait(outcome.queue_wait);
    env_.metrics->ObserveKernelTime(outcome.kernel_time);
  }
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    --items_outstanding_;
    // The idle clock restarts when the server has something new for the client.
    last_progress_ = absl::Now();
    if (!outcome.status.ok()) {
      FailLocked(PrefixStatus(outcome.status,
                              absl::StrFormat("tensor '%s' rows [%d, %d): ", tensor->name,
                                              task->row_begin, task->row_begin + task->num_rows)),
                 &actions);
    } else if (!failed_) {
      const bool tensor_done = tensor->run->RecordDone(*task, outcome);
      env_.metrics->AddBlocksQuantized(task->stats.num_blocks);
      env_.metrics->AddBytesOut(
          static_cast<int64_t>(task->packed_codes.size() + task->scales.size()));
      // Result messages of at most limits.max_result_chunk_bytes (items can be whole gptq
      // tensors).
      const int64_t row_bytes = tensor->cols / 2 + tensor->cols / 16;
      const int64_t rows_per_message =
          std::max<int64_t>(1, env_.limits.ResultPayloadBytes() / row_bytes);
      for (int64_t first = 0; first < task->num_rows; first += rows_per_message) {
        const int64_t rows = std::min(rows_per_message, task->num_rows - first);
        v1::QuantizeResponse response;
        v1::ResultChunk* result = response.mutable_result();
        result->set_tensor_name(tensor->name);
        result->set_tensor_index(tensor->index);
        result->set_row_begin(task->row_begin + first);
        result->set_num_rows(rows);
        if (first == 0 && rows == task->num_rows) {
          result->set_packed_codes(std::move(task->packed_codes));
          result->set_scales(std::move(task->scales));
        } else {
          result->set_packed_codes(
              task->packed_codes.substr(static_cast<size_t>(first * tensor->cols / 2),
                                        static_cast<size_t>(rows * tensor->cols / 2)));
          result->set_scales(task->scales.substr(static_cast<size_t>(first * tensor->cols / 16),
                                                 static_cast<size_t>(rows * tensor->cols / 16)));
        }
        QueueWrite(std::move(response), rows * row_bytes);
      }
      if (tensor_done) QueueSummary(*tensor);
    }
    MaybeStartRead(&actions);
    MaybeStartWrite(&actions);
    MaybeFinish(&actions);
  }
  Perform(&actions);
  Unref();
}

void QuantizeSession::QueueSummary(const Tensor& tensor) {
  v1::QuantizeResponse response;
  *response.mutable_summary() = tensor.run->Summary(tensor.index, absl::Now());
  QueueWrite(std::move(response), 0);
  open_tensors_.erase(tensor.index);
}

void QuantizeSession::FailLocked(const absl::Status& status, Actions* actions) {
  if (failed_ || finish_called_) return;
  failed_ = true;
  final_status_ = ToGrpcStatus(status);
  pending_writes_.clear();
  SetUnsentResultBytes(writing_result_bytes_);
  if (flow_.has_value()) actions->cancel_flow = true;
  MaybeFinish(actions);
}

void QuantizeSession::QueueWrite(v1::QuantizeResponse response, int64_t result_bytes) {
  pending_writes_.push_back(PendingWrite{std::move(response), result_bytes});
  SetUnsentResultBytes(unsent_result_bytes_ + result_bytes);
}

void QuantizeSession::SetUnsentResultBytes(int64_t bytes) {
  env_.metrics->AddUnsentResultBytes(bytes - unsent_result_bytes_);
  unsent_result_bytes_ = bytes;
}

void QuantizeSession::CheckIdle(absl::Time now) {
  bool cancel_write = false;
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) {
      // Draining: ends the wait for the client's half-close once kDrainReadGrace has passed.
      MaybeFinish(&actions);
    } else if (!failed_ && !finish_called_ && items_outstanding_ == 0 &&
               now - last_progress_ >= env_.limits.stream_idle_timeout) {
      env_.metrics->RecordStreamIdleTimeout();
      FailLocked(absl::DeadlineExceededError(absl::StrFormat(
                     "stream idle for %s (stream_idle_timeout): no message arrived and no result "
                     "was taken; %d tensors of the stream have no summary and were not finished",
                     absl::FormatDuration(now - last_progress_), open_tensors_.size())),
                 &actions);
      // A write the client never takes would hold the call open: cancelling completes it.
      cancel_write = write_in_flight_;
    }
  }
  if (cancel_write) context_->TryCancel();
  Perform(&actions);
}

void QuantizeSession::MaybeStartRead(Actions* actions) {
  if (reading_ || half_closed_ || failed_ || finish_called_) return;
  if (stopped_ && absl::Now() - stopped_at_ >= kDrainReadGrace) return;
  if (items_outstanding_ >= env_.limits.max_inflight_chunks_per_stream) return;
  // Results the client has not taken count too: a client that never reads stops being read.
  if (unsent_result_bytes_ >= env_.limits.max_unsent_result_bytes_per_stream) return;
  reading_ = true;
  ++reads_starting_;
  actions->start_read = true;
}

void QuantizeSession::MaybeStartWrite(Actions* actions) {
  if (write_in_flight_ || pending_writes_.empty() || finish_called_) return;
  current_write_ = SerializeProto(pending_writes_.front().message);
  writing_result_bytes_ = pending_writes_.front().result_bytes;
  pending_writes_.pop_front();
  write_in_flight_ = true;
  actions->start_write = true;
}

void QuantizeSession::MaybeFinish(Actions* actions) {
  if (finish_called_ || write_in_flight_ || reads_starting_ > 0) return;
  if (failed_) {
    finish_called_ = true;
    actions->finish = true;
    actions->finish_status = final_status_;
    return;
  }
  // Draining, the call ends once the accepted tensors are done and the client half-closed (its
  // messages read and dropped meanwhile; a call ended with unread client data can reach the
  // client as a connection reset instead of the status), or kDrainReadGrace after the stop.
  const bool reads_done = !reading_ || (stopped_ && absl::Now() - stopped_at_ >= kDrainReadGrace);
  if ((half_closed_ || stopped_) && items_outstanding_ == 0 && pending_writes_.empty() &&
      reads_done && open_tensors_.empty()) {
    finish_called_ = true;
    final_status_ = stopped_ ? stop_status_ : grpc::Status::OK;
    actions->finish = true;
    actions->finish_status = final_status_;
  }
}

void QuantizeSession::OnWriteDone(bool ok) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    write_in_flight_ = false;
    SetUnsentResultBytes(unsent_result_bytes_ - writing_result_bytes_);
    writing_result_bytes_ = 0;
    if (ok) {
      last_progress_ = absl::Now();
    } else {
      FailLocked(absl::CancelledError("write failed: the client went away"), &actions);
    }
    MaybeStartRead(&actions);
    MaybeStartWrite(&actions);
    MaybeFinish(&actions);
  }
  Perform(&actions);
}

void QuantizeSession::OnCancel() {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    FailLocked(absl::CancelledError("the call was cancelled or its deadline passed"), &actions);
  }
  Perform(&actions);
}

void QuantizeSession::Perform(Actions* actions) {
  if (actions->cancel_flow) {
    FlowId flow;
    grpc::Status reason;
    {
      absl::MutexLock lock(&mu_);
      flow = *flow_;
      reason = final_status_;
    }
    env_.scheduler->CancelFlow(
        flow,
        absl::Status(static_cast<absl::StatusCode>(reason.error_code()), reason.error_message()));
  }
  if (actions->start_write) StartWrite(&current_write_);
  if (actions->start_read) {
    StartRead(&read_buffer_);
    // A failure decided meanwhile waited for this read to be issued before finishing.
    absl::MutexLock lock(&mu_);
    --reads_starting_;
    MaybeFinish(actions);
  }
  if (actions->finish) {
    // Counted before the client can see the status, so a scrape after the call includes it.
    env_.metrics->RecordRequest("Quantize", actions->finish_status.error_code(),
                                absl::Now() - started_);
    Finish(actions->finish_status);
  }
  actions->start_read = actions->start_write = actions->cancel_flow = actions->finish = false;
}

void QuantizeSession::Unref() {
  if (refs_.fetch_sub(1) == 1) delete this;
}

void QuantizeSession::OnDone() {
  if (watched_) env_.watchdog->Remove(this);
  {
    absl::MutexLock lock(&mu_);
    if (flow_.has_value()) env_.scheduler->CloseFlow(*flow_);
    pending_writes_.clear();
    SetUnsentResultBytes(0);
  }
  if (counted_) {
    env_.open_streams->fetch_sub(1);
    env_.metrics->AddInflightStreams(-1);
  }
  Unref();
}

}  // namespace nvfp4cal::server
