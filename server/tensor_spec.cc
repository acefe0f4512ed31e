#include "server/tensor_spec.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "proto/wire_codec.h"

namespace nvfp4cal::server {

absl::Status PrefixStatus(const absl::Status& status, const std::string& prefix) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

absl::Status CheckStringLength(std::string_view field, std::string_view value, int64_t max_bytes) {
  if (static_cast<int64_t>(value.size()) <= max_bytes) return absl::OkStatus();
  constexpr size_t kQuoted = 32;
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s has %d bytes; the limit is %d (it starts '%s...')", field, value.size(), max_bytes,
      absl::CHexEscape(absl::string_view(value.data(), std::min(value.size(), kQuoted)))));
}

absl::StatusOr<TensorSpec> ParseTensorHeader(const v1::TensorHeader& header,
                                             const ServiceLimits& limits) {
  if (header.name().empty()) return absl::InvalidArgumentError("header.name is empty");
  // Before anything echoes a string: messages quote names whole.
  for (const auto& [field, value] :
       {std::pair<const char*, const std::string*>{"header.name", &header.name()},
        {"header.hessian.name", &header.hessian().name()},
        {"header.method.name", &header.method().name()},
        {"header.method.scale_objective", &header.method().scale_objective()},
        {"header.method.scale_search", &header.method().scale_search()}}) {
    if (absl::Status s = CheckStringLength(field, *value); !s.ok()) return s;
  }
  if (header.rows() <= 0 || header.cols() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("header: tensor '%s' has shape [%d, %d]; rows and cols must be > 0",
                        header.name(), header.rows(), header.cols()));
  }
  if (header.cols() % kBlockElements != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("header.cols = %d of tensor '%s' is not a multiple of the block size 16",
                        header.cols(), header.name()));
  }
  if (header.rows() > limits.max_tensor_elements / header.cols()) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("tensor '%s' has %d x %d elements; max_tensor_elements = %d", header.name(),
                        header.rows(), header.cols(), limits.max_tensor_elements));
  }
  // A result row is never split across messages, so it must fit in one.
  const int64_t result_row_bytes = header.cols() / 2 + header.cols() / kBlockElements;
  if (result_row_bytes > limits.ResultPayloadBytes()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "tensor '%s': one row's codes and scales take %d bytes, more than a result message holds "
        "(%d under max_send_message_bytes = %d)",
        header.name(), result_row_bytes, limits.ResultPayloadBytes(),
        limits.max_send_message_bytes));
  }
  absl::StatusOr<DType> dtype = DTypeFromProto(header.dtype(), "header.dtype");
  if (!dtype.ok()) return dtype.status();
  absl::StatusOr<SearchParams> params = SearchParamsFromProto(header.method(), "header");
  if (!params.ok()) return params.status();
  TensorSpec spec;
  spec.name = header.name();
  spec.rows = header.rows();
  spec.cols = header.cols();
  spec.dtype = *dtype;
  spec.params = *params;
  if (header.has_global_amax()) {
    const float g = header.global_amax();
    if (!std::isfinite(g) || g < 0.0f) {
      return absl::InvalidArgumentError(
          absl::StrFormat("header.global_amax = %g must be finite and >= 0", g));
    }
    spec.global_amax = g;
  }
  return spec;
}

void ExtractDiagonalBlocks(const float* src, int64_t offset, int64_t count, int64_t cols,
                           float* blocks) {
  constexpr int64_t kB = kBlockElements;
  while (count > 0) {
    const int64_t row = offset / cols;
    const int64_t col = offset % cols;
    const int64_t segment = std::min(count, cols - col);
    const int64_t block = row / kB;
    const int64_t lo = std::max(col, block * kB);
    const int64_t hi = std::min(col + segment, block * kB + kB);
    for (int64_t c = lo; c < hi; ++c) {
      blocks[block * kB * kB + (row % kB) * kB + (c % kB)] = src[c - col];
    }
    offset += segment;
    src += segment;
    count -= segment;
  }
}

int64_t UpperRowStart(int64_t row, int64_t cols) { return row * cols - row * (row - 1) / 2; }

void ForEachUpperSegment(
    int64_t offset, int64_t count, int64_t cols,
    const std::function<void(int64_t row, int64_t col, int64_t length, int64_t consumed)>& visit) {
  // The row holding `offset`: the largest r with UpperRowStart(r) <= offset.
  int64_t lo = 0;
  int64_t hi = cols - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (UpperRowStart(mid, cols) <= offset) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  int64_t row = lo;
  int64_t col = row + (offset - UpperRowStart(row, cols));
  int64_t consumed = 0;
  while (consumed < count && row < cols) {
    const int64_t length = std::min(count - consumed, cols - col);
    visit(row, col, length, consumed);
    consumed += length;
    ++row;
    col = row;
  }
}

void ExtractDiagonalBlocksUpper(const float* src, int64_t offset, int64_t count, int64_t cols,
                                float* blocks) {
  constexpr int64_t kB = kBlockElements;
  ForEachUpperSegment(offset, count, cols,
                      [&](int64_t row, int64_t col, int64_t length, int64_t consumed) {
                        const int64_t block = row / kB;
                        const int64_t hi = std::min(col + length, block * kB + kB);
                        float* b = blocks + block * kB * kB;
                        for (int64_t c = col; c < hi; ++c) {
                          const float value = src[consumed + c - col];
                          b[(row % kB) * kB + (c % kB)] = value;
                          b[(c % kB) * kB + (row % kB)] = value;
                        }
                      });
}

}  // namespace nvfp4cal::server
