// TensorSpec: what a client declares about one tensor (TensorHeader), parsed and checked
// against the server's limits; shared by Quantize sessions and async jobs, so both answer the
// same malformed header with the same status and message. The statistics of results go back
// through proto/wire_codec.h.
//
//   absl::StatusOr<TensorSpec> spec = ParseTensorHeader(request.header(), limits);
//   if (!spec.ok()) return spec.status();   // INVALID_ARGUMENT / RESOURCE_EXHAUSTED, named
//   const int64_t bytes = spec->WeightBytes();
#ifndef NVFP4CAL_SERVER_TENSOR_SPEC_H_
#define NVFP4CAL_SERVER_TENSOR_SPEC_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/v1/calibrator.pb.h"
#include "server/server_options.h"

namespace nvfp4cal::server {

// Elements per NVFP4 block.
inline constexpr int64_t kBlockElements = 16;
// SessionOptions.priority and SubmitJobRequest.priority range.
inline constexpr int kMinPriority = 0;
inline constexpr int kMaxPriority = 10;

// OK when `value` (the client's field `field`) has at most `max_bytes` bytes; else
// INVALID_ARGUMENT naming the field, the limit and the size, quoting only the value's start.
absl::Status CheckStringLength(std::string_view field, std::string_view value,
                               int64_t max_bytes = kMaxNameBytes);

// A checked TensorHeader (the Hessian reference is left to the caller: sessions name Hessians,
// jobs carry theirs inline).
struct TensorSpec {
  std::string name;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kBFloat16;
  SearchParams params;
  // The header's global amax when it carries one.
  std::optional<float> global_amax;

  // Bytes of the rows * cols weights in `dtype`.
  int64_t WeightBytes() const { return rows * cols * DTypeSize(dtype); }
};

// Checks name, shape (rows, cols > 0, cols % 16 == 0), rows * cols against
// limits.max_tensor_elements (RESOURCE_EXHAUSTED), dtype, method and parameter ranges (gptq's
// too; gptq parameters with another method are INVALID_ARGUMENT), and that a given global_amax
// is finite and >= 0. Errors name the field, the limit and the value.
absl::StatusOr<TensorSpec> ParseTensorHeader(const v1::TensorHeader& header,
                                             const ServiceLimits& limits);

// Prefixes a status's message, keeping its code.
absl::Status PrefixStatus(const absl::Status& status, const std::string& prefix);

// Copies the diagonal 16x16 blocks out of elements [offset, offset + count) of a row-major
// [cols, cols] matrix into `blocks` ([cols / 16, 16, 16]); lets a full Hessian arrive in chunks
// without ever being held whole.
void ExtractDiagonalBlocks(const float* src, int64_t offset, int64_t count, int64_t cols,
                           float* blocks);

// HESSIAN_LAYOUT_FULL_UPPER: the upper triangle of a [cols, cols] matrix, row r holding
// H[r, r..cols-1], so row r starts at element UpperRowStart(r) = r * cols - r * (r - 1) / 2.
int64_t UpperRowStart(int64_t row, int64_t cols);

// Splits elements [offset, offset + count) of an upper-triangle stream into row segments:
// visit(row, col, length, consumed) for H[row, col..col+length), whose values are the chunk's
// elements [consumed, consumed + length).
void ForEachUpperSegment(
    int64_t offset, int64_t count, int64_t cols,
    const std::function<void(int64_t row, int64_t col, int64_t length, int64_t consumed)>& visit);

// ExtractDiagonalBlocks for the upper-triangle layout: mirrors each element of a diagonal
// block into its lower half too.
void ExtractDiagonalBlocksUpper(const float* src, int64_t offset, int64_t count, int64_t cols,
                                float* blocks);

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_TENSOR_SPEC_H_
