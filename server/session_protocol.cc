#include "server/session_protocol.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nvfp4cal/kernels/validation.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "payloads are little-endian and copied as is");

namespace nvfp4cal::server {
namespace {

constexpr int64_t kBlock = kBlockElements;

// The status that ends a stream stopped by the drain at the header of `next_tensor`.
absl::Status DrainStatus(const std::string& next_tensor, int64_t message_number,
                         int64_t tensors_started) {
  const std::string name = CheckStringLength("", next_tensor).ok()
                               ? absl::StrCat("'", next_tensor, "'")
                               : absl::StrFormat("with a name of %d bytes", next_tensor.size());
  return absl::UnavailableError(
      absl::StrFormat("server is draining; tensor %s (message %d of the stream) and every tensor "
                      "after it were not started; the stream's first %d tensors finished and "
                      "their summaries were sent",
                      name, message_number, tensors_started));
}

}  // namespace

SessionProtocol::SessionProtocol(const Environment& environment)
    : limits_(*environment.limits),
      metrics_(environment.metrics),
      full_hessians_(environment.full_hessians) {}

absl::Status SessionProtocol::Handle(int64_t message_number, v1::QuantizeRequest* request,
                                     bool draining, Step* step) {
  switch (request->payload_case()) {
    case v1::QuantizeRequest::kSession:
      return HandleSessionOptions(message_number, request->session());
    case v1::QuantizeRequest::kHeader:
      if (draining && CurrentTensorComplete()) {
        step->stop = true;
        step->stop_status = DrainStatus(request->header().name(), message_number, tensors_started_);
        return absl::OkStatus();
      }
      return HandleHeader(request->header(), step);
    case v1::QuantizeRequest::kHessian:
      return HandleHessianChunk(request->mutable_hessian());
    case v1::QuantizeRequest::kWeights:
      return HandleWeightChunk(request->mutable_weights(), step);
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "message %d of the stream has no payload (session, header, hessian or weights)",
          message_number));
  }
}

absl::Status SessionProtocol::HandleSessionOptions(int64_t message_number,
                                                   const v1::SessionOptions& options) {
  if (message_number != 1) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "session options must be the first message; got them as message %d", message_number));
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

bool SessionProtocol::CurrentTensorComplete() const {
  return current_ == nullptr || current_->rows_received == current_->rows;
}

absl::Status SessionProtocol::HandleHeader(const v1::TensorHeader& header, Step* step) {
  const ServiceLimits& limits = limits_;
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
  if (!gptq && (tensor->hessian == nullptr || tensor->hessian->complete())) {
    if (absl::Status s = CheckTensor(tensor.get()); !s.ok()) return s;
  }
  tensor_names_.insert(tensor->name);
  tensor_name_bytes_ += name_bytes;
  step->opened = tensor;
  current_ = std::move(tensor);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<SessionProtocol::Hessian>> SessionProtocol::DefineHessian(
    const v1::TensorHeader& header, const TensorSpec& spec) {
  const ServiceLimits& limits = limits_;
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
      metrics_->RecordFullHessianRefused("max_session_full_hessian_bytes");
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s needs %d bytes as a full Hessian; the session holds %d bytes of full Hessians and "
          "max_session_full_hessian_bytes = %d (start a new session)",
          what, full_bytes, full_hessian_bytes_, limits.max_session_full_hessian_bytes));
    }
    if (full_bytes > full_hessians_->limit_bytes()) {
      metrics_->RecordFullHessianRefused("max_full_hessian_bytes");
      return absl::ResourceExhaustedError(
          absl::StrFormat("%s needs %d bytes as a full Hessian; max_full_hessian_bytes = %d", what,
                          full_bytes, full_hessians_->limit_bytes()));
    }
    // The server-wide budget is charged as the chunks arrive (HandleHessianChunk): a stream
    // that stalls after the header holds none of it.
    absl::StatusOr<std::unique_ptr<FullHessianBudget::Reservation>> reservation =
        full_hessians_->Reserve(what, 0);
    if (!reservation.ok()) return reservation.status();
    absl::StatusOr<std::shared_ptr<FullHessian>> full =
        FullHessian::Create(name, cols, *std::move(reservation), full_hessians_, metrics_);
    if (!full.ok()) return full.status();
    hessian->full = *std::move(full);
    full_hessian_bytes_ += full_bytes;
  }
  hessian->blocks = std::make_shared<std::vector<float>>(static_cast<size_t>(cols * kBlock), 0.0f);
  hessian_bytes_ += block_bytes;
  hessians_[name] = hessian;
  return hessian;
}

void SessionProtocol::StoreHessianElements(Hessian* hessian, const float* values, int64_t count) {
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

absl::Status SessionProtocol::CheckTensor(Tensor* tensor) {
  QuantizeRequest request;
  static const float kDummy = 0.0f;  // only the shape is read here; rows replace it
  request.weights = {&kDummy, tensor->dtype, tensor->rows, tensor->cols};
  request.params = tensor->params;
  if (tensor->hessian != nullptr) {
    Hessian& hessian = *tensor->hessian;
    request.hessians = {hessian.blocks->data(), tensor->cols / kBlock};
    // Pruning bounds once per Hessian, shared by every tensor and row range that uses it.
    if (hessian.pruning.bounds == nullptr) {
      hessian.pruning =
          ComputeSharedHessianPruning({hessian.blocks->data(), hessian.cols / kBlock});
    }
    hessian.pruning.AttachTo(&request);
  }
  absl::StatusOr<ValidatedTensor> checked = ValidateTensor(request);
  if (!checked.ok()) {
    if (tensor->hessian == nullptr) {
      return PrefixStatus(checked.status(), absl::StrFormat("tensor '%s': ", tensor->name));
    }
    return PrefixStatus(
        checked.status(),
        absl::StrFormat("Hessian '%s' of tensor '%s': ", tensor->hessian->name, tensor->name));
  }
  tensor->checked = *std::move(checked);
  return absl::OkStatus();
}

absl::Status SessionProtocol::HandleHessianChunk(v1::HessianChunk* chunk) {
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
  metrics_->AddBytesIn(static_cast<int64_t>(data.size()));
  // The bytes of a protobuf string need not be 4-byte aligned.
  std::vector<float> values(static_cast<size_t>(count));
  std::memcpy(values.data(), data.data(), data.size());
  StoreHessianElements(&hessian, values.data(), count);
  hessian.received_elements += count;
  // gptq validates its full Hessian on a scheduler worker, with the factorisation.
  if (hessian.complete() && current_->params.method != Method::kGptq) {
    return CheckTensor(current_.get());
  }
  return absl::OkStatus();
}

absl::Status SessionProtocol::HandleWeightChunk(v1::WeightChunk* chunk, Step* step) {
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
  metrics_->AddBytesIn(expected_bytes);
  const bool gptq = tensor.params.method == Method::kGptq;
  // Rows go straight to the scheduler when the header gave g (gptq is buffered too: on a GPU
  // its ordered group loop costs about the same for a chunk as for the whole tensor, so the
  // rows run together); else into the tensor's buffer, as g is max |W| over the whole tensor.
  const bool direct = tensor.header_amax.has_value() && !gptq;
  std::shared_ptr<std::string> bytes;
  const char* rows_data = nullptr;
  if (direct) {
    bytes = std::make_shared<std::string>(std::move(*chunk->mutable_data()));
    rows_data = bytes->data();
  } else {
    if (tensor.buffer == nullptr) {
      tensor.buffer = std::make_shared<std::string>();
      // Reserved whole: appending never moves the rows scanned so far.
      tensor.buffer->reserve(
          static_cast<size_t>(tensor.rows * tensor.cols * DTypeSize(tensor.dtype)));
    }
    const size_t at = tensor.buffer->size();
    tensor.buffer->append(chunk->data());
    rows_data = tensor.buffer->data() + at;
  }
  // Scanned where they will be read from, so that the scan vouches for exactly these bytes.
  absl::StatusOr<WeightScan> scan =
      ScanWeights(WeightView{rows_data, tensor.dtype, chunk->num_rows(), tensor.cols});
  if (!scan.ok()) {
    return PrefixStatus(scan.status(),
                        absl::StrFormat("tensor '%s', weight chunk at row_begin = %d (element "
                                        "indices relative to the chunk): ",
                                        tensor.name, chunk->row_begin()));
  }
  const int64_t row_begin = chunk->row_begin();
  tensor.rows_received += chunk->num_rows();
  if (tensor.header_amax.has_value()) {
    if (absl::Status s = ValidateGlobalAmax(*tensor.header_amax, scan->amax()); !s.ok()) {
      return PrefixStatus(s, absl::StrFormat("tensor '%s': header.", tensor.name));
    }
  }
  if (direct) {
    absl::StatusOr<ValidatedRows> rows =
        ValidateRows(*tensor.checked, *tensor.header_amax, absl::MakeConstSpan(&*scan, 1));
    if (!rows.ok()) return rows.status();
    Ready(std::move(bytes), row_begin, chunk->num_rows(), *std::move(rows), step);
    return absl::OkStatus();
  }
  tensor.buffered_amax = std::max(tensor.buffered_amax, scan->amax());
  if (!gptq) tensor.buffered_scans.push_back(*std::move(scan));
  if (tensor.rows_received == tensor.rows) {
    std::optional<ValidatedRows> rows;
    if (!gptq) {
      absl::StatusOr<ValidatedRows> checked =
          ValidateRows(*tensor.checked, tensor.header_amax.value_or(tensor.buffered_amax),
                       tensor.buffered_scans);
      if (!checked.ok()) return checked.status();
      rows = *std::move(checked);
      tensor.buffered_scans.clear();
    }
    std::shared_ptr<const std::string> whole = std::move(tensor.buffer);
    Ready(std::move(whole), 0, tensor.rows, std::move(rows), step);
  }
  return absl::OkStatus();
}

void SessionProtocol::Ready(std::shared_ptr<const std::string> bytes, int64_t row_begin,
                            int64_t num_rows, std::optional<ValidatedRows> rows, Step* step) {
  Tensor& tensor = *current_;
  if (tensor.run == nullptr) {
    auto input = std::make_shared<TensorInput>();
    input->name = tensor.name;
    input->dtype = tensor.dtype;
    input->cols = tensor.cols;
    input->params = tensor.params;
    input->global_amax = tensor.header_amax.value_or(tensor.buffered_amax);
    if (tensor.params.method == Method::kGptq) {
      input->full_hessian = tensor.hessian->full;
    } else if (tensor.hessian != nullptr) {
      // Bounds computed when the tensor was checked (CheckTensor).
      input->hessian_blocks = tensor.hessian->blocks;
      input->hessian_pruning = tensor.hessian->pruning;
    }
    tensor.run = std::make_unique<TensorRun>(std::move(input), tensor.rows, tensor.started);
  }
  step->ready = current_;
  step->bytes = std::move(bytes);
  step->row_begin = row_begin;
  step->num_rows = num_rows;
  step->rows = std::move(rows);
}

}  // namespace nvfp4cal::server
