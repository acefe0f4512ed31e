#include "client/server_stream.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/thread_name.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "proto/wire_codec.h"

namespace nvfp4cal::client_internal {
namespace {

// What a Hessian of a tensor with `cols` inputs costs a session on the server: its diagonal
// blocks always, and for gptq the whole matrix too.
int64_t HessianBlockBytes(int64_t cols) { return cols * 16 * 4; }
int64_t FullHessianBytes(int64_t cols) { return cols * cols * 4; }

// What the server counts for a tensor name against max_session_tensor_name_bytes.
int64_t NameBytes(const std::string& name) { return static_cast<int64_t>(name.size()) + 64; }

// How long a finished tensor's slices may still be held by the transport after its summary
// arrived (a write's completion, normally microseconds) before the answer counts as one for rows
// the server did not read.
constexpr absl::Duration kSliceReleaseBound = absl::Seconds(10);

int64_t ChunkBytes(const ClientOptions& options, const v1::Limits& limits) {
  int64_t chunk_bytes = options.chunk_bytes;
  if (limits.max_receive_message_bytes() > 0) {
    chunk_bytes = std::min(chunk_bytes, limits.max_receive_message_bytes() / 4);
  }
  return std::max<int64_t>(chunk_bytes, 1024);
}

}  // namespace

bool SendsFullHessian(const TensorTask& task) {
  // full_hessian.n is set with the task; its data may come later (TaskGate).
  return task.params.method == Method::kGptq && task.full_hessian.n > 0 &&
         !task.hessian_key.empty();
}

ServerStream::ServerStream(const ClientOptions& options, std::string address,
                           absl::Span<const TensorTask> tasks, const v1::Limits& limits,
                           QuantizeResultCallback on_result, ErrorSink on_error)
    : options_(options),
      address_(std::move(address)),
      tasks_(tasks),
      limits_(limits),
      chunk_bytes_(ChunkBytes(options, limits)),
      on_result_(std::move(on_result)),
      on_error_(std::move(on_error)) {
  if (options_.timeout > absl::ZeroDuration()) {
    context_->set_deadline(std::chrono::system_clock::now() +
                           absl::ToChronoMilliseconds(options_.timeout));
  }
}

bool ServerStream::Open(grpc::ChannelInterface* channel) {
  // The generated stub's stream type fixes QuantizeRequest as what is written; this one writes
  // bytes (grpc::internal is how generated code itself opens its streams).
  static const std::string method =
      absl::StrCat("/", v1::Calibrator::service_full_name(), "/Quantize");
  const grpc::internal::RpcMethod rpc(method.c_str(), grpc::internal::RpcMethod::BIDI_STREAMING);
  stream_.reset(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, v1::QuantizeResponse>::Create(
          channel, rpc, &*context_));
  reader_ = std::thread([this] { ReadResponses(); });
  v1::QuantizeRequest options_message;
  options_message.mutable_session()->set_priority(options_.priority);
  options_message.mutable_session()->set_client_name(options_.client_name);
  return WriteMessage(options_message);
}

grpc::Status ServerStream::Close(bool cancel, bool writable) {
  if (cancel) {
    context_->TryCancel();
  } else if (writable) {
    stream_->WritesDone();
  }
  reader_.join();
  return stream_->Finish();
}

void ServerStream::ReleaseCall() {
  stream_.reset();
  context_.reset();
  stream_lease_->AwaitNone();
}

bool ServerStream::WriteMessage(const v1::QuantizeRequest& message) {
  grpc::ByteBuffer bytes;
  bool own_buffer = false;
  if (!grpc::SerializationTraits<v1::QuantizeRequest>::Serialize(message, &bytes, &own_buffer)
           .ok()) {
    return false;  // over 2 GiB; chunks are far smaller
  }
  return stream_->Write(bytes);
}

// What one zero-copy slice holds until gRPC releases it: its task's lease and its stream's.
struct ServerStream::SliceHold {
  std::shared_ptr<SliceLease> task;
  std::shared_ptr<SliceLease> stream;
};

void ServerStream::ReleaseSlice(void* hold) {
  auto* h = static_cast<SliceHold*>(hold);
  h->task->Release();
  h->stream->Release();
  delete h;
}

bool ServerStream::WriteWithSlice(const std::string& prefix, const void* data, size_t bytes,
                                  const std::shared_ptr<SliceLease>& lease) {
  if (bytes == 0) {
    const grpc::Slice head(prefix);
    return stream_->Write(grpc::ByteBuffer(&head, 1));
  }
  lease->Add();
  stream_lease_->Add();
  auto* hold = new SliceHold{lease, stream_lease_};
  // gRPC only reads the slice's bytes; the constructor takes a mutable pointer.
  const grpc::Slice slices[2] = {grpc::Slice(prefix),
                                 grpc::Slice(const_cast<void*>(data), bytes, &ReleaseSlice, hold)};
  return stream_->Write(grpc::ByteBuffer(slices, 2));
}

absl::Status ServerStream::CollectIncomplete(absl::Span<const size_t> session_tasks,
                                             std::vector<size_t>* incomplete) {
  absl::MutexLock lock(&mu_);
  for (size_t j : session_tasks) {
    const auto it = pending_.find(tasks_[j].name);
    if (it == pending_.end() || !it->second.done) incomplete->push_back(j);
  }
  return reader_error_;
}

bool ServerStream::ExceedsSessionLimits(absl::Span<const size_t> unit) const {
  std::set<std::string> keys;
  int64_t block_bytes = 0;
  int64_t full_bytes = 0;
  int64_t name_bytes = 0;
  for (size_t j : unit) {
    const TensorTask& task = tasks_[j];
    name_bytes += NameBytes(task.name);
    if (task.hessian_key.empty() || hessians_sent_.count(task.hessian_key) != 0) continue;
    if (!keys.insert(task.hessian_key).second) continue;
    block_bytes += HessianBlockBytes(task.weights.cols);
    if (SendsFullHessian(task)) full_bytes += FullHessianBytes(task.weights.cols);
  }
  const int64_t max_blocks = limits_.max_session_hessian_bytes();
  const int64_t max_full = limits_.max_session_full_hessian_bytes();
  const int64_t max_names = limits_.max_session_tensor_name_bytes();
  return (max_blocks > 0 && hessian_bytes_ + block_bytes > max_blocks) ||
         (max_full > 0 && full_bytes > 0 && full_hessian_bytes_ + full_bytes > max_full) ||
         (max_names > 0 && name_bytes_ + name_bytes > max_names);
}

absl::Status ServerStream::CheckLimits(const TensorTask& task) const {
  const int64_t elements = task.weights.rows * task.weights.cols;
  if (limits_.max_tensor_elements() > 0 && elements > limits_.max_tensor_elements()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        task.name, ": ", elements, " elements exceed the server's max_tensor_elements ",
        limits_.max_tensor_elements()));
  }
  const int64_t row_bytes = task.weights.cols * DTypeSize(task.weights.dtype);
  if (limits_.max_receive_message_bytes() > 0 &&
      row_bytes + 4096 > limits_.max_receive_message_bytes()) {
    return absl::ResourceExhaustedError(absl::StrCat(task.name, ": one row is ", row_bytes,
                                                     " bytes, over the server's "
                                                     "max_receive_message_bytes ",
                                                     limits_.max_receive_message_bytes()));
  }
  return absl::OkStatus();
}

absl::Status ServerStream::SendUnit(absl::Span<const size_t> unit, bool* writable) {
  for (size_t k = 0; k < unit.size(); ++k) {
    const size_t j = unit[k];
    // Its weights may still be on their way (the caller reads them beside the sessions); a
    // stream that ended meanwhile stops waiting, so that its tasks go elsewhere.
    absl::Status ready;
    {
      TraceSpan wait(options_.trace, "wait for " + tasks_[j].name, "quantize");
      ready = AwaitTask(tasks_[j], [this] { return ended_.load(); });
    }
    if (ended_.load()) {
      *writable = false;
      return absl::OkStatus();
    }
    if (!ready.ok()) return ready;
    absl::Status within = CheckLimits(tasks_[j]);
    if (!within.ok()) return within;
    // The unit holds every task of its Hessian: the last one lets the server free it.
    bool last_use = true;
    for (size_t later = k + 1; later < unit.size(); ++later) {
      last_use = last_use && tasks_[unit[later]].hessian_key != tasks_[j].hessian_key;
    }
    {
      TraceSpan send(options_.trace, "send " + tasks_[j].name, "send");
      *writable = SendTensor(j, last_use);
    }
    if (!*writable) break;
  }
  return absl::OkStatus();
}

bool ServerStream::SendTensor(size_t j, bool release) {
  const TensorTask& task = tasks_[j];
  const int64_t rows = task.weights.rows;
  const int64_t cols = task.weights.cols;
  auto lease = std::make_shared<SliceLease>();
  {
    absl::MutexLock lock(&mu_);
    Pending& p = pending_[task.name];
    p.task = j;
    p.lease = lease;
    p.codes.assign(static_cast<size_t>(rows * cols / 2), 0);
    p.scales.assign(static_cast<size_t>(rows * cols / 16), 0);
  }
  v1::QuantizeRequest request;
  v1::TensorHeader* header = request.mutable_header();
  header->set_name(task.name);
  header->set_rows(rows);
  header->set_cols(cols);
  header->set_dtype(DTypeToProto(task.weights.dtype));
  SearchParamsToProto(task.params, header->mutable_method());
  header->set_global_amax(task.global_amax);
  const bool full = SendsFullHessian(task);
  const bool upper = options_.send_full_hessian_upper;
  const bool has_hessian = (full || task.hessians.data != nullptr) && !task.hessian_key.empty();
  const bool define = has_hessian && hessians_sent_.count(task.hessian_key) == 0;
  if (has_hessian) {
    header->mutable_hessian()->set_name(task.hessian_key);
    header->mutable_hessian()->set_layout(!full   ? v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL
                                          : upper ? v1::HESSIAN_LAYOUT_FULL_UPPER
                                                  : v1::HESSIAN_LAYOUT_FULL);
    header->mutable_hessian()->set_release_after(release);
  }
  if (!WriteMessage(request)) return false;
  name_bytes_ += NameBytes(task.name);
  if (define && full) {
    hessians_sent_.insert(task.hessian_key);
    hessian_bytes_ += HessianBlockBytes(cols);
    full_hessian_bytes_ += FullHessianBytes(cols);
    if (!SendFullHessian(task.full_hessian, upper)) return false;
  } else if (define) {
    hessians_sent_.insert(task.hessian_key);
    hessian_bytes_ += HessianBlockBytes(cols);
    if (!SendHessianBlocks(task, lease)) return false;
  }
  if (has_hessian && release) {
    // The server forgot it with this header; it no longer counts against the session.
    hessians_sent_.erase(task.hessian_key);
    hessian_bytes_ -= HessianBlockBytes(cols);
    if (full) full_hessian_bytes_ -= FullHessianBytes(cols);
  }
  return SendWeightRows(task, lease);
}

bool ServerStream::SendHessianBlocks(const TensorTask& task,
                                     const std::shared_ptr<SliceLease>& lease) {
  const int64_t total = task.hessians.num_blocks * 256;
  const int64_t step = std::max<int64_t>(256, chunk_bytes_ / 4 / 256 * 256);
  for (int64_t offset = 0; offset < total; offset += step) {
    const size_t bytes = static_cast<size_t>(std::min(step, total - offset) * 4);
    if (!WriteWithSlice(HessianChunkRequestPrefix(offset, bytes), task.hessians.data + offset,
                        bytes, lease)) {
      return false;
    }
  }
  return true;
}

// The whole matrix row-major, or (upper) row r's elements H[r, r..n-1] one row after the other.
bool ServerStream::SendFullHessian(const FullHessianView& h, bool upper) {
  const int64_t n = h.n;
  const int64_t step = std::max<int64_t>(256, chunk_bytes_ / 4);
  int64_t sent = 0;
  std::string buffer;
  auto flush = [&]() {
    if (buffer.empty()) return true;
    v1::QuantizeRequest chunk;
    chunk.mutable_hessian()->set_element_offset(sent);
    sent += static_cast<int64_t>(buffer.size() / 4);
    chunk.mutable_hessian()->set_data(std::move(buffer));
    buffer.clear();
    return WriteMessage(chunk);
  };
  const int64_t rows = upper ? n : 1;
  for (int64_t r = 0; r < rows; ++r) {
    // Upper: one row's tail; whole matrix: all n * n elements as one "row".
    const float* begin = upper ? h.data + r * n + r : h.data;
    const int64_t count = upper ? n - r : n * n;
    for (int64_t done = 0; done < count;) {
      const int64_t take = std::min(count - done, step - static_cast<int64_t>(buffer.size() / 4));
      buffer.append(reinterpret_cast<const char*>(begin + done), static_cast<size_t>(take * 4));
      done += take;
      if (static_cast<int64_t>(buffer.size() / 4) == step && !flush()) return false;
    }
  }
  return flush();
}

bool ServerStream::SendWeightRows(const TensorTask& task,
                                  const std::shared_ptr<SliceLease>& lease) {
  const int64_t rows = task.weights.rows;
  const int64_t row_bytes = task.weights.cols * DTypeSize(task.weights.dtype);
  const int64_t rows_per_chunk = std::max<int64_t>(1, chunk_bytes_ / row_bytes);
  const char* data = static_cast<const char*>(task.weights.data);
  for (int64_t r = 0; r < rows; r += rows_per_chunk) {
    const int64_t n = std::min(rows_per_chunk, rows - r);
    const size_t bytes = static_cast<size_t>(n * row_bytes);
    if (r + n == rows) {
      absl::MutexLock lock(&mu_);
      pending_[task.name].handed_over_at = absl::Now();
    }
    if (!WriteWithSlice(WeightChunkRequestPrefix(r, n, bytes), data + r * row_bytes, bytes,
                        lease)) {
      return false;
    }
  }
  return true;
}

void ServerStream::ReadResponses() {
  NameThisThread("nvf-receive");
  v1::QuantizeResponse response;
  while (stream_->Read(&response)) {
    absl::Status status = HandleResponse(response);
    if (!status.ok()) {
      absl::Status first_error;
      {
        absl::MutexLock lock(&mu_);
        if (reader_error_.ok()) {
          reader_error_ = absl::Status(status.code(),
                                       absl::StrCat("server ", address_, ": ", status.message()));
        }
        first_error = reader_error_;
      }
      on_error_(first_error);
      context_->TryCancel();
    }
  }
  ended_.store(true);
}

absl::Status ServerStream::HandleResponse(const v1::QuantizeResponse& response) {
  if (response.has_result()) return AddResultChunk(response.result());
  if (response.has_summary()) return FinishTensor(response.summary());
  return absl::OkStatus();
}

absl::Status ServerStream::AddResultChunk(const v1::ResultChunk& chunk) {
  absl::MutexLock lock(&mu_);
  const auto it = pending_.find(chunk.tensor_name());
  if (it == pending_.end() || it->second.done) {
    return absl::InternalError(
        absl::StrCat("result for unexpected tensor '", chunk.tensor_name(), "'"));
  }
  Pending& p = it->second;
  const TensorTask& task = tasks_[p.task];
  const int64_t cols = task.weights.cols;
  if (chunk.row_begin() < 0 || chunk.num_rows() <= 0 ||
      chunk.row_begin() + chunk.num_rows() > task.weights.rows ||
      static_cast<int64_t>(chunk.packed_codes().size()) != chunk.num_rows() * cols / 2 ||
      static_cast<int64_t>(chunk.scales().size()) != chunk.num_rows() * cols / 16) {
    return absl::InternalError(absl::StrCat(task.name, ": malformed result chunk for rows ",
                                            chunk.row_begin(), "+", chunk.num_rows()));
  }
  std::memcpy(p.codes.data() + chunk.row_begin() * cols / 2, chunk.packed_codes().data(),
              chunk.packed_codes().size());
  std::memcpy(p.scales.data() + chunk.row_begin() * cols / 16, chunk.scales().data(),
              chunk.scales().size());
  p.rows_covered += chunk.num_rows();
  return absl::OkStatus();
}

absl::Status ServerStream::FinishTensor(const v1::TensorSummary& summary) {
  QuantizedTensor result;
  size_t task_index = 0;
  std::shared_ptr<SliceLease> lease;
  {
    absl::MutexLock lock(&mu_);
    const auto it = pending_.find(summary.tensor_name());
    if (it == pending_.end() || it->second.done) {
      return absl::InternalError(
          absl::StrCat("summary for unexpected tensor '", summary.tensor_name(), "'"));
    }
    Pending& p = it->second;
    const TensorTask& task = tasks_[p.task];
    if (p.handed_over_at == absl::InfinitePast()) {
      return absl::InternalError(
          absl::StrCat(task.name, ": summary before the tensor's rows were all sent"));
    }
    if (p.rows_covered != task.weights.rows) {
      return absl::InternalError(absl::StrCat(task.name, ": summary after ", p.rows_covered, " of ",
                                              task.weights.rows, " rows"));
    }
    if (summary.global_amax() != task.global_amax) {
      return absl::InternalError(absl::StrCat(task.name, ": server used global amax ",
                                              summary.global_amax(), ", sent ", task.global_amax));
    }
    p.done = true;
    task_index = p.task;
    lease = std::move(p.lease);
    result.rows = task.weights.rows;
    result.cols = task.weights.cols;
    result.packed_codes = std::move(p.codes);
    result.scales = std::move(p.scales);
    result.global_amax = summary.global_amax();
    result.global_scale = summary.global_scale();
    result.stats = StatsFromProto(summary, task.params);
    result.server_kernel_seconds = static_cast<double>(summary.timings().kernel_us()) * 1e-6;
    result.server_queue_seconds = static_cast<double>(summary.timings().queue_wait_us()) * 1e-6;
    if (options_.trace != nullptr) {
      options_.trace->Async(task.name, "server", p.handed_over_at, absl::Now());
    }
  }
  // Every row went to gRPC before this summary (checked above) and the stream reads the task's
  // memory no more; once gRPC released the slices the caller may free that memory. A server
  // answers after reading every row, so they are released already or about to be; slices still
  // held after the bound mean rows the server has not read (the call's end releases them).
  if (!lease->AwaitNoneFor(kSliceReleaseBound)) {
    return absl::InternalError(absl::StrCat(tasks_[task_index].name,
                                            ": summary before the server read the tensor's rows"));
  }
  return on_result_(task_index, std::move(result));
}

}  // namespace nvfp4cal::client_internal
