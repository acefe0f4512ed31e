// Pieces of request validation that backends combine for whole tensors and row ranges.
//
// Every error is INVALID_ARGUMENT (FAILED_PRECONDITION for a missing Hessian) and names the
// field, the limit and the value seen. No function here has side effects.
#ifndef NVFP4CAL_KERNELS_VALIDATION_H_
#define NVFP4CAL_KERNELS_VALIDATION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {

// Shape, Hessian presence / shape / values / symmetry and parameter ranges: everything except
// the weights' values. Cost O(cols * 16).
absl::Status ValidateShapeHessiansAndParams(const QuantizeRequest& request);

// Checks rows [row_begin, row_end) for NaN/Inf (naming the first bad element) and returns their
// amax.
absl::StatusOr<float> ScanWeightRows(const WeightView& weights, int64_t row_begin, int64_t row_end);

// A caller-given global amax must be finite and cover the weights it scales.
absl::Status ValidateGlobalAmax(float global_amax, float weights_amax);

// Everything ScaleSearch::QuantizeRows checks before searching rows [row_begin, row_end) with
// global amax g: shape, Hessians and parameters, the range and output sizes, the rows' values
// and g against their amax.
absl::Status ValidateRowRangeRequest(const QuantizeRequest& request, float global_amax,
                                     int64_t row_begin, int64_t row_end,
                                     const RowRangeOutput& output);

// Row range and output span sizes of ScaleSearch::QuantizeRows.
absl::Status ValidateRowRange(const WeightView& weights, int64_t row_begin, int64_t row_end,
                              const RowRangeOutput& output);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_VALIDATION_H_
