#include "nvfp4cal/kernels/validation.h"

#include <cmath>
#include <cstdlib>
#include <limits>

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

absl::StatusOr<float> ScanWeightRows(const WeightView& weights, int64_t row_begin,
                                     int64_t row_end) {
  if (weights.data == nullptr) return absl::InvalidArgumentError("weights.data is null");
  float amax = 0.0f;
  float chunk[kBlockSize];
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t c = 0; c < weights.cols; c += kBlockSize) {
      const int count = static_cast<int>(std::min<int64_t>(kBlockSize, weights.cols - c));
      LoadAsFloat(weights.data, weights.dtype, r * weights.cols + c, count, chunk);
      bool finite = true;
      for (int i = 0; i < count; ++i) {
        finite = finite && std::isfinite(chunk[i]);
        const float a = std::fabs(chunk[i]);
        amax = a > amax ? a : amax;  // a NaN is reported below
      }
      if (!finite) {
        for (int i = 0; i < count; ++i) {
          if (!std::isfinite(chunk[i])) {
            return absl::InvalidArgumentError(absl::StrFormat(
                "weights: element (%d, %d) is %g; weights must be finite", r, c + i, chunk[i]));
          }
        }
      }
    }
  }
  return amax;
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

absl::StatusOr<float> ValidatedGlobalAmax(const QuantizeRequest& request) {
  if (absl::Status s = ValidateShapeHessiansAndParams(request); !s.ok()) return s;
  absl::StatusOr<float> own_amax = ScanWeightRows(request.weights, 0, request.weights.rows);
  if (!own_amax.ok()) return own_amax.status();
  if (!request.global_amax.has_value()) return *own_amax;
  if (absl::Status s = ValidateGlobalAmax(*request.global_amax, *own_amax); !s.ok()) return s;
  return *request.global_amax;
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

absl::StatusOr<QuantizedTensor> PrepareQuantizedTensor(const QuantizeRequest& request) {
  absl::StatusOr<float> global_amax = ValidatedGlobalAmax(request);
  if (!global_amax.ok()) return global_amax.status();
  const WeightView& w = request.weights;
  QuantizedTensor result;
  result.rows = w.rows;
  result.cols = w.cols;
  result.packed_codes.resize(static_cast<size_t>(w.rows * w.cols / 2));
  result.scales.resize(static_cast<size_t>(w.rows * w.cols / kBlockSize));
  result.global_amax = *global_amax;
  result.global_scale = GlobalScaleFromAmax(*global_amax);
  InitTensorStats(request.params, *global_amax, &result.stats);
  return result;
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
