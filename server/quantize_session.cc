#include "server/quantize_session.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nvfp4cal/kernels/validation.h"
#include "proto/grpc_status.h"
#include "proto/wire_codec.h"
#include "server/log.h"
#include "server/proto_codec.h"
#include "server/stream_watchdog.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "payloads are little-endian and copied as is");

namespace nvfp4cal::server {
namespace {

constexpr int64_t kBlock = kBlockElements;

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
    : env_(environment), context_(context), started_(absl::Now()), last_progress_(started_) {
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
      } else if (!failed_ && !CurrentTensorComplete()) {
        FailLocked(absl::FailedPreconditionError(absl::StrFormat(
                       "stream ended before tensor '%s' was complete: %d of %d rows received",
                       current_->name, current_->rows_received, current_->rows)),
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
        status = HandleMessage(&actions);
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

absl::Status QuantizeSession::HandleMessage(Actions* actions) {
  switch (request_.payload_case()) {
    case v1::QuantizeRequest::kSession:
      return HandleSessionOptions(request_.session());
    case v1::QuantizeRequest::kHeader:
      if (env_.draining->load() && CurrentTensorComplete()) {
        StopForDrain(request_.header().name());
        return absl::OkStatus();
      }
      return HandleHeader(request_.header());
    case v1::QuantizeRequest::kHessian:
      return HandleHessianChunk(request_.mutable_hessian());
    case v1::QuantizeRequest::kWeights:
      return HandleWeightChunk(request_.mutable_weights(), actions);
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "message %d of the stream has no payload (session, header, hessian or weights)",
          messages_read_));
  }
}

absl::Status QuantizeSession::HandleSessionOptions(const v1::SessionOptions& options) {
  if (messages_read_ != 1) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "session options must be the first message; got them as message %d", messages_read_));
  }
  if (options.priority() < kMinPriority || options.priority() > kMaxPriority) {
    return absl::InvalidArgumentError(
        absl::StrFormat("session.priority = %d is out of range [%d, %d]", options.priority(),
                        kMinPriority, kMaxPriority));
  }
  if (absl::Status s = CheckStringLength("session.client_name", options.client_name()); !s.ok()) {
    return s;
  }
  priority_ = options.priority();
  return absl::OkStatus();
}

bool QuantizeSession::CurrentTensorComplete() const {
  return current_ == nullptr || current_->rows_received == current_->rows;
}

absl::Status QuantizeSession::HandleHeader(const v1::TensorHeader& header) {
  const ServiceLimits& limits = env_.limits;
  if (!CurrentTensorComplete()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "header of tensor '%s' arrived before tensor '%s' was complete: %d of %d rows received",
        header.name(), current_->name, current_->rows_received, current_->rows));
  }
  absl::StatusOr<TensorSpec> spec = ParseTensorHeader(header, limits);
  if (!spec.ok()) return spec.status();
  if (tensor_names_.contains(header.name())) {
    return absl::InvalidArgumentError(
        absl::StrFormat("header.name = '%s' was already used in this session", header.name()));
  }
  const int64_t name_bytes =
      static_cast<int64_t>(header.name().size()) + ServiceLimits::kNameEntryOverheadBytes;
  if (name_bytes > limits.max_session_tensor_name_bytes - tensor_name_bytes_) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("tensor '%s': the session keeps %d bytes of tensor names (%d tensors) and "
                        "max_session_tensor_name_bytes = %d; start a new session for more tensors",
                        header.name(), tensor_name_bytes_, tensor_names_.size(),
                        limits.max_session_tensor_name_bytes));
  }
  if (!spec->global_amax.has_value() && spec->WeightBytes() > limits.max_buffered_tensor_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("tensor '%s' without header.global_amax is buffered whole: %d bytes exceed "
                        "max_buffered_tensor_bytes = %d (send global_amax to stream it)",
                        header.name(), spec->WeightBytes(), limits.max_buffered_tensor_bytes));
  }
  const bool gptq = spec->params.method == Method::kGptq;
  if (gptq && spec->WeightBytes() > limits.max_buffered_tensor_bytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "gptq tensor '%s' is buffered whole (its rows run together): %d bytes exceed "
        "max_buffered_tensor_bytes = %d",
        header.name(), spec->WeightBytes(), limits.max_buffered_tensor_bytes));
  }
  if (gptq && header.cols() > kMaxGptqColumns) {
    return absl::InvalidArgumentError(
        absl::StrFormat("header.cols = %d of gptq tensor '%s' exceeds the gptq limit %d",
                        header.cols(), header.name(), kMaxGptqColumns));
  }
  auto tensor = std::make_shared<Tensor>();
  const std::string& hessian_name = header.hessian().name();
  if (hessian_name.empty()) {
    if (MethodNeedsHessian(spec->params.method)) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "header.hessian.name is empty but method %s of tensor '%s' needs a Hessian",
          MethodName(spec->params.method), header.name()));
    }
  } else if (auto it = hessians_.find(hessian_name); it != hessians_.end()) {
    if (it->second->cols != header.cols()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "header.hessian.name = '%s' covers %d columns but tensor '%s' has cols = %d",
          hessian_name, it->second->cols, header.name(), header.cols()));
    }
    if (gptq && it->second->full == nullptr) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "Hessian '%s' is kept as diagonal blocks only (it was defined by %s), but method gptq "
          "of tensor '%s' needs the full matrix: define the Hessian with a gptq tensor's header "
          "(layout FULL or FULL_UPPER), or send it again under another name",
          hessian_name, it->second->defined_by, header.name()));
    }
    tensor->hessian = it->second;
  } else {
    absl::StatusOr<std::shared_ptr<Hessian>> hessian = DefineHessian(header, *spec);
    if (!hessian.ok()) return hessian.status();
    tensor->hessian = *std::move(hessian);
  }

  if (header.hessian().release_after() && tensor->hessian != nullptr) {
    // The last user: the tensor (and its work items) keep the Hessian alive until done.
    hessians_.erase(hessian_name);
    hessian_bytes_ -= tensor->hessian->cols * kBlock * 4;
    if (tensor->hessian->full != nullptr) {
      full_hessian_bytes_ -= tensor->hessian->cols * tensor->hessian->cols * 4;
    }
  }

  tensor->index = tensors_started_++;
  tensor->name = header.name();
  tensor->rows = header.rows();
  tensor->cols = header.cols();
  tensor->dtype = spec->dtype;
  tensor->params = spec->params;
  tensor->header_amax = spec->global_amax;
  tensor->started = absl::Now();
  // gptq validates its full Hessian on a scheduler worker, with the factorisation.
  if (!gptq && tensor->hessian != nullptr && tensor->hessian->complete()) {
    if (absl::Status s = ValidateTensorHessian(*tensor); !s.ok()) return s;
  }
  if (!job_.has_value()) {
    JobOptions job;
    job.priority = priority_;
    job.deadline = DeadlineOf(*context_);
    job.name = absl::StrCat("stream ", context_->peer());
    job_ = env_.scheduler->CreateJob(job);
  }
  tensor_names_.insert(tensor->name);
  tensor_name_bytes_ += name_bytes;
  open_tensors_[tensor->index] = tensor;
  current_ = std::move(tensor);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<QuantizeSession::Hessian>> QuantizeSession::DefineHessian(
    const v1::TensorHeader& header, const TensorSpec& spec) {
  const ServiceLimits& limits = env_.limits;
  const std::string& name = header.hessian().name();
  const int64_t cols = header.cols();
  const v1::HessianLayout layout = header.hessian().layout();
  if (layout != v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL && layout != v1::HESSIAN_LAYOUT_FULL &&
      layout != v1::HESSIAN_LAYOUT_FULL_UPPER) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "header.hessian.layout = %d for new Hessian '%s' is not BLOCK_DIAGONAL, FULL or "
        "FULL_UPPER",
        static_cast<int>(layout), name));
  }
  const bool gptq = spec.params.method == Method::kGptq;
  if (gptq && layout == v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "header.hessian.layout = BLOCK_DIAGONAL for Hessian '%s' of tensor '%s', but method "
        "gptq propagates errors across blocks and needs the full matrix: send it as FULL or "
        "FULL_UPPER",
        name, header.name()));
  }
  const int64_t block_bytes = cols * kBlock * 4;
  if (hessian_bytes_ + block_bytes > limits.max_session_hessian_bytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "Hessian '%s' needs %d bytes; the session holds %d and max_session_hessian_bytes = %d",
        name, block_bytes, hessian_bytes_, limits.max_session_hessian_bytes));
  }
  auto hessian = std::make_shared<Hessian>();
  hessian->name = name;
  hessian->layout = layout;
  hessian->cols = cols;
  hessian->defined_by =
      absl::StrFormat("tensor '%s' with method %s", header.name(), MethodName(spec.params.method));
  hessian->expected_elements = layout == v1::HESSIAN_LAYOUT_FULL         ? cols * cols
                               : layout == v1::HESSIAN_LAYOUT_FULL_UPPER ? cols * (cols + 1) / 2
                                                                         : cols * kBlock;
  if (gptq) {
    // Admitted before any chunk is buffered: the session's share, then the server's budget.
    const int64_t full_bytes = cols * cols * 4;
    const std::string what = absl::StrFormat("Hessian '%s' of tensor '%s'", name, header.name());
    if (full_bytes > limits.max_session_full_hessian_bytes - full_hessian_bytes_) {
      env_.metrics->RecordFullHessianRefused("max_session_full_hessian_bytes");
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s needs %d bytes as a full Hessian; the session holds %d bytes of full Hessians and "
          "max_session_full_hessian_bytes = %d (start a new session)",
          what, full_bytes, full_hessian_bytes_, limits.max_session_full_hessian_bytes));
    }
    if (full_bytes > env_.full_hessians->limit_bytes()) {
      env_.metrics->RecordFullHessianRefused("max_full_hessian_bytes");
      return absl::ResourceExhaustedError(
          absl::StrFormat("%s needs %d bytes as a full Hessian; max_full_hessian_bytes = %d", what,
                          full_bytes, env_.full_hessians->limit_bytes()));
    }
    // The server-wide budget is charged as the chunks arrive (HandleHessianChunk): a stream
    // that stalls after the header holds none of it.
    absl::StatusOr<std::unique_ptr<FullHessianBudget::Reservation>> reservation =
        env_.full_hessians->Reserve(what, 0);
    if (!reservation.ok()) return reservation.status();
    absl::StatusOr<std::shared_ptr<FullHessian>> full =
        FullHessian::Create(name, cols, *std::move(reservation), env_.full_hessians, env_.metrics);
    if (!full.ok()) return full.status();
    hessian->full = *std::move(full);
    full_hessian_bytes_ += full_bytes;
  }
  hessian->blocks = std::make_shared<std::vector<float>>(static_cast<size_t>(cols * kBlock), 0.0f);
  hessian_bytes_ += block_bytes;
  hessians_[name] = hessian;
  return hessian;
}

void QuantizeSession::StoreHessianElements(Hessian* hessian, const float* values, int64_t count) {
  const int64_t offset = hessian->received_elements;
  const int64_t n = hessian->cols;
  float* full = hessian->full == nullptr ? nullptr : hessian->full->mutable_data();
  if (hessian->layout == v1::HESSIAN_LAYOUT_FULL) {
    if (full != nullptr) std::memcpy(full + offset, values, static_cast<size_t>(count) * 4);
    ExtractDiagonalBlocks(values, offset, count, n, hessian->blocks->data());
  } else if (hessian->layout == v1::HESSIAN_LAYOUT_FULL_UPPER) {
    ExtractDiagonalBlocksUpper(values, offset, count, n, hessian->blocks->data());
    if (full == nullptr) return;
    ForEachUpperSegment(offset, count, n,
                        [&](int64_t row, int64_t col, int64_t length, int64_t consumed) {
                          const float* src = values + consumed;
                          std::memcpy(full + row * n + col, src, static_cast<size_t>(length) * 4);
                          for (int64_t c = col; c < col + length; ++c)
                            full[c * n + row] = src[c - col];
                        });
  } else {
    std::memcpy(hessian->blocks->data() + offset, values, static_cast<size_t>(count) * 4);
  }
}

absl::Status QuantizeSession::ValidateTensorHessian(const Tensor& tensor) {
  QuantizeRequest request;
  static const float kDummy = 0.0f;  // only the shape is read here
  request.weights = {&kDummy, tensor.dtype, 1, tensor.cols};
  request.hessians = {tensor.hessian->blocks->data(), tensor.cols / kBlock};
  request.params = tensor.params;
  absl::Status status = ValidateShapeHessiansAndParams(request);
  if (!status.ok()) {
    return PrefixStatus(
        status,
        absl::StrFormat("Hessian '%s' of tensor '%s': ", tensor.hessian->name, tensor.name));
  }
  return absl::OkStatus();
}

absl::Status QuantizeSession::HandleHessianChunk(v1::HessianChunk* chunk) {
  if (current_ == nullptr || current_->hessian == nullptr || current_->hessian->complete() ||
      current_->rows_received > 0) {
    return absl::FailedPreconditionError(
        "hessian chunk without a preceding header that defines a new Hessian");
  }
  Hessian& hessian = *current_->hessian;
  if (chunk->element_offset() != hessian.received_elements) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "hessian chunk out of order: element_offset = %d, expected %d (Hessian '%s')",
        chunk->element_offset(), hessian.received_elements, hessian.name));
  }
  const std::string& data = chunk->data();
  if (data.size() % 4 != 0 || data.empty()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "hessian chunk data has %d bytes; it must be a non-zero multiple of 4 (fp32)",
        data.size()));
  }
  const int64_t count = static_cast<int64_t>(data.size() / 4);
  if (hessian.received_elements + count > hessian.expected_elements) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "hessian chunk [%d, %d) goes beyond the declared shape of Hessian '%s' (%d elements)",
        chunk->element_offset(), chunk->element_offset() + count, hessian.name,
        hessian.expected_elements));
  }
  if (hessian.full != nullptr) {
    // Charged in proportion to the elements received, the whole matrix once complete.
    const int64_t full_bytes = hessian.cols * hessian.cols * 4;
    const int64_t received = hessian.received_elements + count;
    const int64_t charge = static_cast<int64_t>(
        std::ceil(static_cast<double>(full_bytes) * static_cast<double>(received) /
                  static_cast<double>(hessian.expected_elements)));
    absl::Status admitted = hessian.full->GrowReservation(
        absl::StrFormat("Hessian '%s' of tensor '%s'", hessian.name, current_->name),
        received == hessian.expected_elements ? full_bytes : std::min(charge, full_bytes));
    if (!admitted.ok()) return admitted;
  }
  env_.metrics->AddBytesIn(static_cast<int64_t>(data.size()));
  // The bytes of a protobuf string need not be 4-byte aligned.
  std::vector<float> values(static_cast<size_t>(count));
  std::memcpy(values.data(), data.data(), data.size());
  StoreHessianElements(&hessian, values.data(), count);
  hessian.received_elements += count;
  // gptq validates its full Hessian on a scheduler worker, with the factorisation.
  if (hessian.complete() && current_->params.method != Method::kGptq) {
    return ValidateTensorHessian(*current_);
  }
  return absl::OkStatus();
}

absl::Status QuantizeSession::HandleWeightChunk(v1::WeightChunk* chunk, Actions* actions) {
  if (current_ == nullptr) {
    return absl::FailedPreconditionError("weight chunk before any tensor header");
  }
  Tensor& tensor = *current_;
  if (tensor.hessian != nullptr && !tensor.hessian->complete()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "weights of tensor '%s' arrived before its Hessian '%s' was complete: %d of %d "
        "elements received",
        tensor.name, tensor.hessian->name, tensor.hessian->received_elements,
        tensor.hessian->expected_elements));
  }
  if (chunk->row_begin() != tensor.rows_received) {
    return absl::FailedPreconditionError(
        absl::StrFormat("weight chunk out of order for tensor '%s': row_begin = %d, expected %d",
                        tensor.name, chunk->row_begin(), tensor.rows_received));
  }
  if (chunk->num_rows() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("weights.num_rows = %d must be > 0", chunk->num_rows()));
  }
  if (chunk->num_rows() > tensor.rows - chunk->row_begin()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "weight chunk rows [%d, %d) go beyond the declared shape of tensor '%s' (%d rows)",
        chunk->row_begin(), chunk->row_begin() + chunk->num_rows(), tensor.name, tensor.rows));
  }
  const int64_t expected_bytes = chunk->num_rows() * tensor.cols * DTypeSize(tensor.dtype);
  if (static_cast<int64_t>(chunk->data().size()) != expected_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights.data has %d bytes; %d rows x %d cols of %s need %d", chunk->data().size(),
        chunk->num_rows(), tensor.cols, DTypeName(tensor.dtype), expected_bytes));
  }
  env_.metrics->AddBytesIn(expected_bytes);
  const WeightView view{chunk->data().data(), tensor.dtype, chunk->num_rows(), tensor.cols};
  absl::StatusOr<float> amax = ScanWeightRows(view, 0, view.rows);
  if (!amax.ok()) {
    return PrefixStatus(amax.status(),
                        absl::StrFormat("tensor '%s', weight chunk at row_begin = %d (element "
                                        "indices relative to the chunk): ",
                                        tensor.name, chunk->row_begin()));
  }
  const int64_t row_begin = chunk->row_begin();
  tensor.rows_received += chunk->num_rows();
  if (tensor.header_amax.has_value()) {
    if (absl::Status s = ValidateGlobalAmax(*tensor.header_amax, *amax); !s.ok()) {
      return PrefixStatus(s, absl::StrFormat("tensor '%s': header.", tensor.name));
    }
    // gptq is buffered too: on a GPU its ordered group loop costs about the same for a chunk
    // as for the whole tensor, so the rows run together.
    if (tensor.params.method != Method::kGptq) {
      auto bytes = std::make_shared<std::string>(std::move(*chunk->mutable_data()));
      MakeTasks(&tensor, std::move(bytes), row_begin, chunk->num_rows(), actions);
      return absl::OkStatus();
    }
  }
  // Buffered: g is max |W| over the whole tensor (unless the header gave it), known after the
  // last row.
  if (tensor.buffer == nullptr) {
    tensor.buffer = std::make_shared<std::string>();
    tensor.buffer->reserve(
        static_cast<size_t>(tensor.rows * tensor.cols * DTypeSize(tensor.dtype)));
  }
  tensor.buffer->append(chunk->data());
  tensor.buffered_amax = std::max(tensor.buffered_amax, *amax);
  if (tensor.rows_received == tensor.rows) {
    std::shared_ptr<const std::string> whole = std::move(tensor.buffer);
    MakeTasks(&tensor, std::move(whole), 0, tensor.rows, actions);
  }
  return absl::OkStatus();
}

void QuantizeSession::MakeTasks(Tensor* tensor, std::shared_ptr<const std::string> bytes,
                                int64_t row_begin, int64_t num_rows, Actions* actions) {
  if (tensor->run == nullptr) {
    auto input = std::make_shared<TensorInput>();
    input->name = tensor->name;
    input->dtype = tensor->dtype;
    input->cols = tensor->cols;
    input->params = tensor->params;
    input->global_amax = tensor->header_amax.value_or(tensor->buffered_amax);
    if (tensor->params.method == Method::kGptq) {
      input->full_hessian = tensor->hessian->full;
    } else if (tensor->hessian != nullptr) {
      input->hessian_blocks = tensor->hessian->blocks;
    }
    tensor->run = std::make_unique<TensorRun>(std::move(input), tensor->rows, tensor->started);
  }
  std::vector<std::shared_ptr<RowRangeTask>> tasks =
      tensor->run->MakeTasks(std::move(bytes), row_begin, num_rows,
                             RowSplit{env_.limits.max_rows_per_item, env_.memory_budget_bytes});
  items_outstanding_ += static_cast<int64_t>(tasks.size());
  for (std::shared_ptr<RowRangeTask>& task : tasks) actions->enqueue.push_back(std::move(task));
  actions->enqueue_tensor = current_;
}

void QuantizeSession::EnqueueTasks(Actions* actions) {
  if (actions->enqueue.empty()) return;
  JobId job;
  {
    absl::MutexLock lock(&mu_);
    job = *job_;
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
    rejected = env_.scheduler->Enqueue(job, std::move(item));
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
  if (job_.has_value()) actions->cancel_job = true;
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

void QuantizeSession::StopForDrain(const std::string& next_tensor) {
  stopped_ = true;
  stopped_at_ = absl::Now();
  const std::string name = CheckStringLength("", next_tensor).ok()
                               ? absl::StrCat("'", next_tensor, "'")
                               : absl::StrFormat("with a name of %d bytes", next_tensor.size());
  stop_status_ = grpc::Status(
      grpc::StatusCode::UNAVAILABLE,
      absl::StrFormat("server is draining; tensor %s (message %d of the stream) and every tensor "
                      "after it were not started; the stream's first %d tensors finished and "
                      "their summaries were sent",
                      name, messages_read_, tensors_started_));
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
  if (actions->cancel_job) {
    JobId job;
    grpc::Status reason;
    {
      absl::MutexLock lock(&mu_);
      job = *job_;
      reason = final_status_;
    }
    env_.scheduler->CancelJob(job, absl::Status(static_cast<absl::StatusCode>(reason.error_code()),
                                                reason.error_message()));
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
  actions->start_read = actions->start_write = actions->cancel_job = actions->finish = false;
}

void QuantizeSession::Unref() {
  if (refs_.fetch_sub(1) == 1) delete this;
}

void QuantizeSession::OnDone() {
  if (watched_) env_.watchdog->Remove(this);
  {
    absl::MutexLock lock(&mu_);
    if (job_.has_value()) env_.scheduler->ReleaseJob(*job_);
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
