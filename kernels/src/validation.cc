#include "nvfp4cal/kernels/validation.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_format.h"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/dtype.h"

namespace nvfp4cal {
namespace {

absl::Status ValidateHessianBlock(const float* h, int64_t block, float tolerance) {
  float max_diagonal = 0.0f;
  for (int a = 0; a < kBlockSize * kBlockSize; ++a) {
    if (!std::isfinite(h[a])) {
      return absl::InvalidArgumentError(
          absl::StrFormat("hessians: block %d element (%d, %d) is %g; Hessians must be finite",
                          block, a / kBlockSize, a % kBlockSize, h[a]));
    }
  }
  for (int a = 0; a < kBlockSize; ++a) {
    const float diagonal = h[a * kBlockSize + a];
    if (diagonal < 0.0f) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "hessians: block %d diagonal element (%d, %d) = %g is negative; a Hessian "
          "sum x x^T is positive semi-definite",
          block, a, a, diagonal));
    }
    max_diagonal = std::fmax(max_diagonal, diagonal);
  }
  const float limit = tolerance * max_diagonal;
  for (int a = 0; a < kBlockSize; ++a) {
    for (int b = a + 1; b < kBlockSize; ++b) {
      const float upper = h[a * kBlockSize + b];
      const float lower = h[b * kBlockSize + a];
      if (std::fabs(upper - lower) > limit) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "hessians: block %d is not symmetric: H(%d, %d) = %g but H(%d, %d) = %g; "
            "|difference| %g exceeds symmetry_tolerance %g * max diagonal %g",
            block, a, b, upper, b, a, lower, std::fabs(upper - lower), tolerance, max_diagonal));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateShapeHessiansAndParams(const QuantizeRequest& request) {
  const WeightView& w = request.weights;
  if (w.rows <= 0 || w.cols <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights: empty tensor (rows = %d, cols = %d); both must be > 0", w.rows, w.cols));
  }
  if (w.cols % kBlockSize != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights.cols (in) = %d is not a multiple of the block size %d", w.cols, kBlockSize));
  }
  if (w.data == nullptr) return absl::InvalidArgumentError("weights.data is null");
  if (w.dtype != DType::kFloat32 && w.dtype != DType::kBFloat16 && w.dtype != DType::kFloat16) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights.dtype = %d is not one of float32, bfloat16, float16", static_cast<int>(w.dtype)));
  }
  if (absl::Status s = ValidateParams(request.params); !s.ok()) return s;
  if (request.params.method == Method::kGptq) {
    // gptq propagates errors over the full [in, in] Hessian, which this request type (diagonal
    // blocks) cannot carry.
    return absl::UnimplementedError(
        "params.method = gptq needs the full [in, in] Hessian: run it through GptqQuantize "
        "(nvfp4cal/kernels/gptq.h); block-Hessian backends do not support it");
  }

  const BlockHessiansView& h = request.hessians;
  const int64_t expected_blocks = w.cols / kBlockSize;
  if (h.data == nullptr) {
    if (MethodNeedsHessian(request.params.method)) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "hessians: method %s needs Hessian blocks [%d, 16, 16] and none were given",
          MethodName(request.params.method), expected_blocks));
    }
    return absl::OkStatus();
  }
  if (h.num_blocks != expected_blocks) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "hessians.num_blocks = %d but weights.cols / 16 = %d; expected shape [%d, 16, 16]",
        h.num_blocks, expected_blocks, expected_blocks));
  }
  for (int64_t j = 0; j < h.num_blocks; ++j) {
    if (absl::Status s = ValidateHessianBlock(h.data + j * kBlockSize * kBlockSize, j,
                                              request.params.symmetry_tolerance);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

namespace {

// The largest magnitude bits of a row of 16-bit floats (bf16 and fp16 alike: sign bit cleared,
// the bits of non-negative values order as the values do; NaN and Inf have the largest).
// Written so that the compiler vectorises it: one pass of integer max over the row.
uint16_t RowMagnitudeBits16(const uint16_t* row, int64_t cols) {
  int16_t m = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const int16_t a = static_cast<int16_t>(row[c] & 0x7fff);
    m = a > m ? a : m;
  }
  return static_cast<uint16_t>(m);
}

uint32_t RowMagnitudeBits32(const uint32_t* row, int64_t cols) {
  uint32_t m = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const uint32_t a = row[c] & 0x7fffffffu;
    m = a > m ? a : m;
  }
  return m;
}

absl::Status NonFinite(const WeightView& weights, int64_t row) {
  std::vector<float> values(static_cast<size_t>(weights.cols));
  LoadAsFloat(weights.data, weights.dtype, row * weights.cols, static_cast<int>(weights.cols),
              values.data());
  for (int64_t c = 0; c < weights.cols; ++c) {
    if (!std::isfinite(values[static_cast<size_t>(c)])) {
      return absl::InvalidArgumentError(
          absl::StrFormat("weights: element (%d, %d) is %g; weights must be finite", row, c,
                          values[static_cast<size_t>(c)]));
    }
  }
  return absl::InternalError("weights: a non-finite element was flagged but not found");
}

}  // namespace

absl::StatusOr<float> ScanWeightRows(const WeightView& weights, int64_t row_begin,
                                     int64_t row_end) {
  if (weights.data == nullptr) return absl::InvalidArgumentError("weights.data is null");
  // Per row the largest magnitude's bits; a row holding NaN or Inf is searched for the first
  // one, so the error names the first in row-major order.
  if (weights.dtype == DType::kFloat32) {
    const uint32_t* bits = static_cast<const uint32_t*>(weights.data);
    uint32_t amax = 0;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const uint32_t m = RowMagnitudeBits32(bits + r * weights.cols, weights.cols);
      if (m >= 0x7f800000u) return NonFinite(weights, r);
      amax = std::max(amax, m);
    }
    float value;
    std::memcpy(&value, &amax, sizeof(value));
    return value;
  }
  const uint16_t* bits = static_cast<const uint16_t*>(weights.data);
  const uint16_t inf = weights.dtype == DType::kBFloat16 ? 0x7f80 : 0x7c00;
  uint16_t amax = 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint16_t m = RowMagnitudeBits16(bits + r * weights.cols, weights.cols);
    if (m >= inf) return NonFinite(weights, r);
    amax = std::max(amax, m);
  }
  return weights.dtype == DType::kBFloat16 ? BFloat16ToFloat(amax) : Float16ToFloat(amax);
}

absl::Status ValidateGlobalAmax(float global_amax, float weights_amax) {
  if (!std::isfinite(global_amax) || global_amax < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrFormat("global_amax = %g must be finite and >= 0", global_amax));
  }
  if (global_amax < weights_amax) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "global_amax = %g is below the weights' own amax %g; a shared global amax is the max "
        "over the fused group",
        global_amax, weights_amax));
  }
  return absl::OkStatus();
}

absl::StatusOr<WeightScan> ScanWeights(const WeightView& weights) {
  absl::StatusOr<float> amax = ScanWeightRows(weights, 0, weights.rows);
  if (!amax.ok()) return amax.status();
  return WeightScan(weights, *amax);
}

absl::StatusOr<ValidatedTensor> ValidateTensor(const QuantizeRequest& request) {
  if (absl::Status s = ValidateShapeHessiansAndParams(request); !s.ok()) return s;
  return ValidatedTensor(request);
}

absl::StatusOr<ValidatedRows> ValidateRows(const ValidatedTensor& tensor, float global_amax,
                                           absl::Span<const WeightScan> pieces) {
  const WeightView& shape = tensor.request().weights;
  if (pieces.empty()) return absl::InvalidArgumentError("rows: no scanned pieces given");
  const char* const first = static_cast<const char*>(pieces[0].weights().data);
  const int64_t row_bytes = shape.cols * DTypeSize(shape.dtype);
  int64_t rows = 0;
  float amax = 0.0f;
  for (size_t k = 0; k < pieces.size(); ++k) {
    const WeightView& w = pieces[k].weights();
    if (w.dtype != shape.dtype || w.cols != shape.cols || w.rows <= 0 ||
        static_cast<const char*>(w.data) != first + rows * row_bytes) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "rows: scanned piece %d ([%d, %d] of %s at %p) does not continue the tensor's rows "
          "([%d rows, %d] of %s at %p)",
          k, w.rows, w.cols, DTypeName(w.dtype), w.data, rows, shape.cols, DTypeName(shape.dtype),
          static_cast<const void*>(first)));
    }
    rows += w.rows;
    amax = std::max(amax, pieces[k].amax());
  }
  if (absl::Status s = ValidateGlobalAmax(global_amax, amax); !s.ok()) return s;
  QuantizeRequest request = tensor.request();
  request.weights = WeightView{first, shape.dtype, rows, shape.cols};
  return ValidatedRows(request, global_amax);
}

absl::StatusOr<ValidatedRows> ValidatedRows::Subrange(int64_t first, int64_t count) const {
  const WeightView& w = request_.weights;
  if (first < 0 || count <= 0 || first > w.rows - count) {
    return absl::InvalidArgumentError(
        absl::StrFormat("rows [%d, %d) are empty or outside the checked rows [0, %d)", first,
                        first + count, w.rows));
  }
  QuantizeRequest sub = request_;
  sub.weights.data = static_cast<const char*>(w.data) + first * w.cols * DTypeSize(w.dtype);
  sub.weights.rows = count;
  return ValidatedRows(sub, global_amax_);
}

absl::StatusOr<ValidatedRequest> ValidateQuantizeRequest(const QuantizeRequest& request,
                                                         const WeightScan& scan) {
  const WeightView& w = request.weights;
  const WeightView& scanned = scan.weights();
  if (w.data != scanned.data || w.dtype != scanned.dtype || w.rows != scanned.rows ||
      w.cols != scanned.cols) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights: the scan given is of other weights ([%d, %d] at %p, the request's [%d, %d] "
        "at %p)",
        scanned.rows, scanned.cols, scanned.data, w.rows, w.cols, w.data));
  }
  if (absl::Status s = ValidateShapeHessiansAndParams(request); !s.ok()) return s;
  return ValidatedRequest::WithWeightsAmax(request, scan.amax());
}

absl::StatusOr<ValidatedRequest> ValidateQuantizeRequest(const QuantizeRequest& request) {
  // Shape first: the scan must not read a view whose shape is wrong.
  if (absl::Status s = ValidateShapeHessiansAndParams(request); !s.ok()) return s;
  absl::StatusOr<WeightScan> scan = ScanWeights(request.weights);
  if (!scan.ok()) return scan.status();
  return ValidatedRequest::WithWeightsAmax(request, scan->amax());
}

absl::StatusOr<ValidatedRequest> ValidatedRequest::WithWeightsAmax(const QuantizeRequest& request,
                                                                   float weights_amax) {
  if (!request.global_amax.has_value()) return ValidatedRequest(request, weights_amax);
  if (absl::Status s = ValidateGlobalAmax(*request.global_amax, weights_amax); !s.ok()) return s;
  return ValidatedRequest(request, *request.global_amax);
}

absl::Status ValidateRowRangeRequest(const QuantizeRequest& request, float global_amax,
                                     int64_t row_begin, int64_t row_end,
                                     const RowRangeOutput& output) {
  if (absl::Status s = ValidateShapeHessiansAndParams(request); !s.ok()) return s;
  if (absl::Status s = ValidateRowRange(request.weights, row_begin, row_end, output); !s.ok()) {
    return s;
  }
  absl::StatusOr<float> rows_amax = ScanWeightRows(request.weights, row_begin, row_end);
  if (!rows_amax.ok()) return rows_amax.status();
  return ValidateGlobalAmax(global_amax, *rows_amax);
}

absl::Status ValidateRowRange(const WeightView& weights, int64_t row_begin, int64_t row_end,
                              const RowRangeOutput& output) {
  if (row_begin < 0 || row_end > weights.rows || row_begin >= row_end) {
    return absl::InvalidArgumentError(
        absl::StrFormat("row range [%d, %d) is empty or outside the tensor's rows [0, %d)",
                        row_begin, row_end, weights.rows));
  }
  const int64_t rows = row_end - row_begin;
  const int64_t code_bytes = rows * weights.cols / 2;
  const int64_t scale_bytes = rows * weights.cols / kBlockSize;
  if (static_cast<int64_t>(output.packed_codes.size()) != code_bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("output.packed_codes has %d bytes; %d rows x %d cols need %d",
                        output.packed_codes.size(), rows, weights.cols, code_bytes));
  }
  if (static_cast<int64_t>(output.scales.size()) != scale_bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("output.scales has %d bytes; %d rows x %d cols need %d",
                        output.scales.size(), rows, weights.cols, scale_bytes));
  }
  return absl::OkStatus();
}

}  // namespace nvfp4cal
