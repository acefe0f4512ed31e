// Validation and helpers shared by every ScaleSearch backend.
#include "nvfp4cal/kernels/scale_search.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/validation.h"

namespace nvfp4cal {

std::string_view MethodName(Method method) {
  switch (method) {
    case Method::kMax:
      return "max";
    case Method::kMse:
      return "mse";
    case Method::kLocalHessian:
      return "local_hessian";
    case Method::kDss:
      return "dss";
    case Method::kGptq:
      return "gptq";
  }
  return "unknown";
}

absl::StatusOr<Method> ParseMethod(std::string_view name) {
  for (Method m :
       {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss, Method::kGptq}) {
    if (MethodName(m) == name) return m;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("method: unknown value \"", std::string(name),
                   "\"; expected one of max, mse, local_hessian, dss, gptq"));
}

std::string_view GptqScaleObjectiveName(GptqScaleObjective objective) {
  return objective == GptqScaleObjective::kGptqCost ? "gptq_cost" : "hessian_block";
}

absl::StatusOr<GptqScaleObjective> ParseGptqScaleObjective(std::string_view name) {
  for (GptqScaleObjective o : {GptqScaleObjective::kHessianBlock, GptqScaleObjective::kGptqCost}) {
    if (GptqScaleObjectiveName(o) == name) return o;
  }
  return absl::InvalidArgumentError(absl::StrCat("gptq.scale_objective: unknown value \"",
                                                 std::string(name),
                                                 "\"; expected one of hessian_block, gptq_cost"));
}

std::string_view GptqScaleSearchName(GptqScaleSearch search) {
  return search == GptqScaleSearch::kDss ? "dss" : "sweep";
}

absl::StatusOr<GptqScaleSearch> ParseGptqScaleSearch(std::string_view name) {
  for (GptqScaleSearch s : {GptqScaleSearch::kSweep, GptqScaleSearch::kDss}) {
    if (GptqScaleSearchName(s) == name) return s;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "gptq.scale_search: unknown value \"", std::string(name), "\"; expected one of sweep, dss"));
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat16:
      return "float16";
  }
  return "unknown";
}

bool MethodNeedsHessian(Method method) {
  return method == Method::kLocalHessian || method == Method::kDss || method == Method::kGptq;
}

void InitTensorStats(const SearchParams& params, float global_amax, TensorStats* stats) {
  stats->method = params.method;
  stats->params = params;
  stats->global_amax = global_amax;
  stats->global_scale = GlobalScaleFromAmax(global_amax);
}

void AccumulateStats(const TensorStats& part, TensorStats* total) {
  total->num_blocks += part.num_blocks;
  total->objective_before += part.objective_before;
  total->objective_after += part.objective_after;
  total->mse_before += part.mse_before;
  total->mse_after += part.mse_after;
  total->hessian_error_before += part.hessian_error_before;
  total->hessian_error_after += part.hessian_error_after;
  total->blocks_scale_changed += part.blocks_scale_changed;
  total->blocks_beta_not_one += part.blocks_beta_not_one;
  total->blocks_offset_not_zero += part.blocks_offset_not_zero;
  total->zero_hessian_blocks += part.zero_hessian_blocks;
  total->gptq.full_hessian_error += part.gptq.full_hessian_error;
  total->gptq.full_hessian_error_local_hessian += part.gptq.full_hessian_error_local_hessian;
}

float GlobalScaleFromAmax(float global_amax) { return global_amax / kGlobalScaleDivisor; }

int DssBetaSteps(const SearchParams& params) {
  return static_cast<int>(std::lround(params.beta_half_range / params.beta_step));
}

absl::Status ValidateParams(const SearchParams& params) {
  constexpr float kMinBetaStep = 0.005f;
  constexpr float kMaxBetaStep = 0.5f;
  if (!(params.beta_step >= kMinBetaStep && params.beta_step <= kMaxBetaStep)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("params.beta_step = %g is out of range [%g, %g]", params.beta_step,
                        kMinBetaStep, kMaxBetaStep));
  }
  if (!(params.beta_half_range >= 0.0f && params.beta_half_range < 1.0f)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "params.beta_half_range = %g is out of range [0, 1)", params.beta_half_range));
  }
  const int steps = DssBetaSteps(params);
  const float smallest_beta = DssBeta(-steps, params.beta_step);
  if (!(smallest_beta > 0.0f)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "params.beta_half_range = %g with beta_step = %g gives a smallest beta of %g; it must "
        "be > 0",
        params.beta_half_range, params.beta_step, smallest_beta));
  }
  if (params.scale_neighbours < 0 || params.scale_neighbours > kNumScaleCandidates - 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("params.scale_neighbours = %d is out of range [0, %d]",
                        params.scale_neighbours, kNumScaleCandidates - 1));
  }
  if (!(params.symmetry_tolerance >= 0.0f && std::isfinite(params.symmetry_tolerance))) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "params.symmetry_tolerance = %g must be finite and >= 0", params.symmetry_tolerance));
  }
  constexpr float kMaxGptqDamping = 10.0f;
  if (!(params.gptq.damping >= 0.0f && params.gptq.damping <= kMaxGptqDamping)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "params.gptq.damping = %g is out of range [0, %g]", params.gptq.damping, kMaxGptqDamping));
  }
  constexpr int kMaxGptqBlockColumns = 8192;
  if (params.gptq.block_columns < kBlockSize || params.gptq.block_columns > kMaxGptqBlockColumns ||
      params.gptq.block_columns % kBlockSize != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("params.gptq.block_columns = %d must be a multiple of %d in [%d, %d]",
                        params.gptq.block_columns, kBlockSize, kBlockSize, kMaxGptqBlockColumns));
  }
  return absl::OkStatus();
}

absl::StatusOr<float> ComputeGlobalAmax(const WeightView& weights) {
  return ScanWeightRows(weights, 0, weights.rows);
}

absl::Status ValidateRequest(const QuantizeRequest& request) {
  return ValidateQuantizeRequest(request).status();
}

absl::StatusOr<QuantizedTensor> ScaleSearch::Quantize(const QuantizeRequest& request) {
  absl::StatusOr<ValidatedRequest> validated = ValidateQuantizeRequest(request);
  if (!validated.ok()) return validated.status();
  return QuantizeValidated(*validated);
}

absl::StatusOr<QuantizedTensor> ScaleSearch::QuantizeValidated(const ValidatedRequest& validated) {
  const WeightView& w = validated.request().weights;
  QuantizedTensor result;
  result.rows = w.rows;
  result.cols = w.cols;
  result.packed_codes.resize(static_cast<size_t>(w.rows * w.cols / 2));
  result.scales.resize(static_cast<size_t>(w.rows * w.cols / kBlockSize));
  result.global_amax = validated.global_amax();
  result.global_scale = GlobalScaleFromAmax(result.global_amax);
  InitTensorStats(validated.request().params, result.global_amax, &result.stats);
  absl::Status searched = QuantizePrevalidatedRows(
      validated.request(), result.global_amax, 0, w.rows,
      RowRangeOutput{absl::MakeSpan(result.packed_codes), absl::MakeSpan(result.scales)},
      &result.stats);
  if (!searched.ok()) return searched;
  return result;
}

absl::Status ScaleSearch::QuantizeValidatedRows(const ValidatedRows& rows, RowRangeOutput output,
                                                TensorStats* stats) {
  return QuantizePrevalidatedRows(rows.request(), rows.global_amax(), 0, rows.rows(), output,
                                  stats);
}

}  // namespace nvfp4cal
