#include "proto/wire_codec.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace nvfp4cal {
namespace {

absl::Status Prefixed(const absl::Status& status, const std::string& prefix) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

// Wire type 2 (length-delimited) of a field number.
uint64_t LengthDelimitedTag(int field) { return (static_cast<uint64_t>(field) << 3) | 2; }

// `head` (a chunk message serialized without its data field) followed by the data field's tag
// and length, wrapped as the request's field `request_field`.
std::string RequestPrefix(const std::string& head, int data_field, int request_field,
                          size_t data_bytes) {
  std::string chunk_head = head;
  if (data_bytes > 0) {  // proto3 leaves an empty bytes field out
    AppendVarint(LengthDelimitedTag(data_field), &chunk_head);
    AppendVarint(data_bytes, &chunk_head);
  }
  std::string prefix;
  AppendVarint(LengthDelimitedTag(request_field), &prefix);
  AppendVarint(chunk_head.size() + data_bytes, &prefix);
  prefix += chunk_head;
  return prefix;
}

}  // namespace

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return v1::DTYPE_FLOAT32;
    case DType::kFloat16:
      return v1::DTYPE_FLOAT16;
    case DType::kBFloat16:
      return v1::DTYPE_BFLOAT16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, const std::string& field) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return DType::kFloat32;
    case v1::DTYPE_BFLOAT16:
      return DType::kBFloat16;
    case v1::DTYPE_FLOAT16:
      return DType::kFloat16;
    default:
      return absl::InvalidArgumentError(
          absl::StrFormat("%s = %d is not one of DTYPE_FLOAT32, DTYPE_BFLOAT16, DTYPE_FLOAT16",
                          field, static_cast<int>(dtype)));
  }
}

void SearchParamsToProto(const SearchParams& params, v1::MethodConfig* method) {
  method->set_name(std::string(MethodName(params.method)));
  method->set_beta_step(params.beta_step);
  method->set_beta_half_range(params.beta_half_range);
  method->set_scale_neighbours(params.scale_neighbours);
  method->set_symmetry_tolerance(params.symmetry_tolerance);
  if (params.method == Method::kGptq) {
    const GptqParams& gptq = params.gptq;
    method->set_damping(gptq.damping);
    method->set_act_order(gptq.act_order);
    method->set_block_columns(gptq.block_columns);
    method->set_scale_objective(std::string(GptqScaleObjectiveName(gptq.scale_objective)));
    method->set_scale_search(std::string(GptqScaleSearchName(gptq.scale_search)));
    method->set_compare_local_hessian(gptq.compare_local_hessian);
  }
}

absl::StatusOr<SearchParams> SearchParamsFromProto(const v1::MethodConfig& config,
                                                   const std::string& message) {
  absl::StatusOr<Method> method = ParseMethod(config.name());
  if (!method.ok()) return Prefixed(method.status(), message + ".");
  SearchParams params;
  params.method = *method;
  if (config.has_beta_step()) params.beta_step = config.beta_step();
  if (config.has_beta_half_range()) params.beta_half_range = config.beta_half_range();
  if (config.has_scale_neighbours()) params.scale_neighbours = config.scale_neighbours();
  if (config.has_symmetry_tolerance()) params.symmetry_tolerance = config.symmetry_tolerance();
  const bool gptq_parameter = config.has_damping() || config.has_act_order() ||
                              config.has_block_columns() || config.has_scale_objective() ||
                              config.has_scale_search() || config.has_compare_local_hessian();
  if (gptq_parameter && *method != Method::kGptq) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s.method has gptq parameters (damping, act_order, block_columns, "
                        "scale_objective, scale_search, compare_local_hessian) but name = "
                        "\"%s\"; they apply to gptq only",
                        message, config.name()));
  }
  const std::string field = message + ".method.";
  GptqParams& gptq = params.gptq;
  if (config.has_damping()) gptq.damping = config.damping();
  if (config.has_act_order()) gptq.act_order = config.act_order();
  if (config.has_block_columns()) gptq.block_columns = config.block_columns();
  if (config.has_compare_local_hessian()) {
    gptq.compare_local_hessian = config.compare_local_hessian();
  }
  if (config.has_scale_objective()) {
    absl::StatusOr<GptqScaleObjective> objective =
        ParseGptqScaleObjective(config.scale_objective());
    if (!objective.ok()) return Prefixed(objective.status(), field);
    gptq.scale_objective = *objective;
  }
  if (config.has_scale_search()) {
    absl::StatusOr<GptqScaleSearch> search = ParseGptqScaleSearch(config.scale_search());
    if (!search.ok()) return Prefixed(search.status(), field);
    gptq.scale_search = *search;
  }
  if (absl::Status s = ValidateParams(params); !s.ok()) return Prefixed(s, field);
  return params;
}

void StatsToProto(const TensorStats& stats, v1::TensorStatistics* out) {
  out->set_method(std::string(MethodName(stats.method)));
  SearchParamsToProto(stats.params, out->mutable_params());
  if (stats.params.method == Method::kGptq) {
    out->set_full_hessian_error(stats.gptq.full_hessian_error);
    out->set_full_hessian_error_local_hessian(stats.gptq.full_hessian_error_local_hessian);
    out->set_damping_relative(stats.gptq.damping_relative);
    out->set_damping_increases(stats.gptq.damping_increases);
    out->set_factor_seconds(stats.gptq.factor_seconds);
    out->set_gptq_quantize_seconds(stats.gptq.quantize_seconds);
    out->set_gptq_compare_seconds(stats.gptq.compare_seconds);
  }
  out->set_num_blocks(stats.num_blocks);
  out->set_objective_before(stats.objective_before);
  out->set_objective_after(stats.objective_after);
  out->set_mse_before(stats.mse_before);
  out->set_mse_after(stats.mse_after);
  out->set_hessian_error_before(stats.hessian_error_before);
  out->set_hessian_error_after(stats.hessian_error_after);
  out->set_blocks_scale_changed(stats.blocks_scale_changed);
  out->set_blocks_beta_not_one(stats.blocks_beta_not_one);
  out->set_blocks_offset_not_zero(stats.blocks_offset_not_zero);
  out->set_zero_hessian_blocks(stats.zero_hessian_blocks);
}

TensorStats StatsFromProto(const v1::TensorSummary& summary, const SearchParams& params) {
  TensorStats stats;
  InitTensorStats(params, summary.global_amax(), &stats);
  stats.global_scale = summary.global_scale();
  const v1::TensorStatistics& s = summary.stats();
  stats.num_blocks = s.num_blocks();
  stats.objective_before = s.objective_before();
  stats.objective_after = s.objective_after();
  stats.mse_before = s.mse_before();
  stats.mse_after = s.mse_after();
  stats.hessian_error_before = s.hessian_error_before();
  stats.hessian_error_after = s.hessian_error_after();
  stats.blocks_scale_changed = s.blocks_scale_changed();
  stats.blocks_beta_not_one = s.blocks_beta_not_one();
  stats.blocks_offset_not_zero = s.blocks_offset_not_zero();
  stats.zero_hessian_blocks = s.zero_hessian_blocks();
  GptqStats& gptq = stats.gptq;
  gptq.full_hessian_error = s.full_hessian_error();
  gptq.full_hessian_error_local_hessian = s.full_hessian_error_local_hessian();
  gptq.damping_relative = s.damping_relative();
  gptq.damping_increases = s.damping_increases();
  gptq.factor_seconds = s.factor_seconds();
  gptq.quantize_seconds = s.gptq_quantize_seconds();
  gptq.compare_seconds = s.gptq_compare_seconds();
  return stats;
}

std::string WeightChunkRequestPrefix(int64_t row_begin, int64_t num_rows, size_t data_bytes) {
  v1::WeightChunk head;
  head.set_row_begin(row_begin);
  head.set_num_rows(num_rows);
  return RequestPrefix(head.SerializeAsString(), v1::WeightChunk::kDataFieldNumber,
                       v1::QuantizeRequest::kWeightsFieldNumber, data_bytes);
}

std::string HessianChunkRequestPrefix(int64_t element_offset, size_t data_bytes) {
  v1::HessianChunk head;
  head.set_element_offset(element_offset);
  return RequestPrefix(head.SerializeAsString(), v1::HessianChunk::kDataFieldNumber,
                       v1::QuantizeRequest::kHessianFieldNumber, data_bytes);
}

}  // namespace nvfp4cal
