#include "server/tensor_spec.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace nvfp4cal::server {
namespace {

absl::StatusOr<DType> ToDType(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return DType::kFloat32;
    case v1::DTYPE_BFLOAT16:
      return DType::kBFloat16;
    case v1::DTYPE_FLOAT16:
      return DType::kFloat16;
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "header.dtype = %d is not one of DTYPE_FLOAT32, DTYPE_BFLOAT16, DTYPE_FLOAT16",
          static_cast<int>(dtype)));
  }
}

absl::StatusOr<SearchParams> ToSearchParams(const v1::MethodConfig& config) {
  absl::StatusOr<Method> method = ParseMethod(config.name());
  if (!method.ok()) return PrefixStatus(method.status(), "header.");
  SearchParams params;
  params.method = *method;
  if (config.has_beta_step()) params.beta_step = config.beta_step();
  if (config.has_beta_half_range()) params.beta_half_range = config.beta_half_range();
  if (config.has_scale_neighbours()) params.scale_neighbours = config.scale_neighbours();
  if (config.has_symmetry_tolerance()) params.symmetry_tolerance = config.symmetry_tolerance();
  const bool gptq_parameter = config.has_damping() || config.has_act_order() ||
                              config.has_block_columns() || config.has_scale_objective() ||
                              config.has_scale_search();
  if (gptq_parameter && *method != Method::kGptq) {
    return absl::InvalidArgumentError(
        absl::StrFormat("header.method has gptq parameters (damping, act_order, block_columns, "
                        "scale_objective, scale_search) but name = \"%s\"; they apply to gptq only",
                        config.name()));
  }
  GptqParams& gptq = params.gptq;
  if (config.has_damping()) gptq.damping = config.damping();
  if (config.has_act_order()) gptq.act_order = config.act_order();
  if (config.has_block_columns()) gptq.block_columns = config.block_columns();
  if (config.has_scale_objective()) {
    absl::StatusOr<GptqScaleObjective> objective =
        ParseGptqScaleObjective(config.scale_objective());
    if (!objective.ok()) return PrefixStatus(objective.status(), "header.method.");
    gptq.scale_objective = *objective;
  }
  if (config.has_scale_search()) {
    absl::StatusOr<GptqScaleSearch> search = ParseGptqScaleSearch(config.scale_search());
    if (!search.ok()) return PrefixStatus(search.status(), "header.method.");
    gptq.scale_search = *search;
  }
  if (absl::Status s = ValidateParams(params); !s.ok()) return PrefixStatus(s, "header.method.");
  return params;
}

}  // namespace

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
  absl::StatusOr<DType> dtype = ToDType(header.dtype());
  if (!dtype.ok()) return dtype.status();
  absl::StatusOr<SearchParams> params = ToSearchParams(header.method());
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

void FillStatistics(const TensorStats& stats, v1::TensorStatistics* out) {
  out->set_method(std::string(MethodName(stats.method)));
  v1::MethodConfig* params = out->mutable_params();
  params->set_name(std::string(MethodName(stats.params.method)));
  params->set_beta_step(stats.params.beta_step);
  params->set_beta_half_range(stats.params.beta_half_range);
  params->set_scale_neighbours(stats.params.scale_neighbours);
  params->set_symmetry_tolerance(stats.params.symmetry_tolerance);
  if (stats.params.method == Method::kGptq) {
    const GptqParams& gptq = stats.params.gptq;
    params->set_damping(gptq.damping);
    params->set_act_order(gptq.act_order);
    params->set_block_columns(gptq.block_columns);
    params->set_scale_objective(std::string(GptqScaleObjectiveName(gptq.scale_objective)));
    params->set_scale_search(std::string(GptqScaleSearchName(gptq.scale_search)));
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

}  // namespace nvfp4cal::server
