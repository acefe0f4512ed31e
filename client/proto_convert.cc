#include "client/proto_convert.h"

#include "absl/strings/str_cat.h"

namespace nvfp4cal {

absl::Status FromGrpc(const grpc::Status& status, const std::string& context) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(context, ": ", status.error_message()));
}

v1::DType ToProto(DType dtype) {
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

void FillMethod(const SearchParams& params, v1::MethodConfig* method) {
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
  }
}

TensorStats StatsFromSummary(const v1::TensorSummary& summary, const SearchParams& params) {
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

}  // namespace nvfp4cal
