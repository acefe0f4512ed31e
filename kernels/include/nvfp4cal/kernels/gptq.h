// gptq: NVFP4 quantization with GPTQ error propagation over the full Hessian (docs/numerics.md
// §6). Columns are quantized in order (16-column groups, optionally in act-order), each group's
// FP8 scale is chosen on its error-updated weights, and each column's rounding error moves the
// columns not yet quantized, weighted by the inverse-Hessian factor. Output is standard NVFP4
// (codes, FP8 block scales, FP32 global scale), like every other method.
//
//   nvfp4cal::GptqRequest request;
//   request.weights = {bf16_data, nvfp4cal::DType::kBFloat16, /*rows=*/4096, /*cols=*/4096};
//   request.hessian = {h_data, 4096};              // full [in, in] fp32, row-major
//   request.params.method = nvfp4cal::Method::kGptq;
//   request.params.gptq.act_order = true;
//   absl::StatusOr<nvfp4cal::QuantizedTensor> result = nvfp4cal::CpuGptqQuantize(request, {});
//   // result->stats.gptq.full_hessian_error vs .full_hessian_error_local_hessian
//
// The pieces are separable for other backends: ValidateGptqRequest (no side effects),
// ComputeGptqFactor (host, LAPACK, double precision), the per-group step of gptq_group.h
// (host and device), and the CPU driver.
#ifndef NVFP4CAL_KERNELS_GPTQ_H_
#define NVFP4CAL_KERNELS_GPTQ_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {

// Full Hessian H [n, n] fp32, row-major, n = the weights' cols. Not owned.
struct FullHessianView {
  const float* data = nullptr;
  int64_t n = 0;
};

// One tensor for gptq.
struct GptqRequest {
  WeightView weights;
  FullHessianView hessian;
  // method must be Method::kGptq; params.gptq holds its parameters, beta_step / beta_half_range
  // / scale_neighbours the DSS grid of GptqScaleSearch::kDss, symmetry_tolerance the check of H.
  SearchParams params;
  // Shared global amax of fused siblings (>= the tensor's own); computed when absent.
  std::optional<float> global_amax;
};

// Shape, finiteness and symmetry of H (|H_ab - H_ba| <= tol * max_c H_cc), non-negative
// diagonal, parameters and weights. INVALID_ARGUMENT naming the field, limit and value;
// FAILED_PRECONDITION without a Hessian. No side effects. Positive definiteness is checked by
// ComputeGptqFactor.
absl::Status ValidateGptqRequest(const GptqRequest& request);

// The factorised Hessian, in the order the columns are quantized.
struct GptqFactor {
  int64_t n = 0;
  // group_order[t] = the original 16-column group quantized t-th (identity without act-order).
  std::vector<int64_t> group_order;
  // Upper triangular U [n, n] fp32, row-major, in quantization order, with
  // (H_perm + lambda I)^-1 = U^T U; the strict lower triangle is zero.
  std::vector<float> inverse_factor;
  double damping_relative = 0.0;  // lambda / mean(diag H) actually used
  double damping_absolute = 0.0;  // lambda
  int damping_increases = 0;      // tenfold increases it took to be positive definite
};

// Orders the groups (act-order), damps and factorises H in double precision with LAPACK
// (dpotrf and dtrtri on the reversed matrix; docs/numerics.md §6). H must have passed
// ValidateGptqRequest. While H + lambda I is not positive definite, lambda grows tenfold (up to
// 1 x mean diagonal, or the requested damping if larger); then INVALID_ARGUMENT naming the
// failing column and its pivot. INVALID_ARGUMENT for an all-zero diagonal.
absl::StatusOr<GptqFactor> ComputeGptqFactor(const FullHessianView& hessian,
                                             const GptqParams& params);

struct CpuGptqOptions {
  // Worker threads; 0 uses every hardware thread. Results do not depend on it.
  int num_threads = 0;
  // Rows per task: rows are independent given H, so tasks are row ranges that each run the
  // whole column loop; small enough to balance, large enough that each pass over U is shared.
  int rows_per_task = 16;
  // Also quantize with local_hessian and report tr(E H E^T) of both (GptqStats). Costs about
  // two extra passes of rows * cols^2 multiply-adds.
  bool compare_local_hessian = true;
};

// Validates, factorises and quantizes a whole tensor on the CPU. TensorStats as for
// local_hessian (block sums of e^T H_j e against the `max` method, mse, changed scales; dss
// counts with GptqScaleSearch::kDss) plus GptqStats. Deterministic for any thread count.
absl::StatusOr<QuantizedTensor> CpuGptqQuantize(const GptqRequest& request,
                                                const CpuGptqOptions& options);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_GPTQ_H_
