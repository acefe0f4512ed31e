// Fuzz target: weight and Hessian validation of the kernel library, then the CPU search.
//
// The input picks a small shape (columns not always a multiple of 16, rows possibly 0), dtype,
// method and parameters, whether Hessians are given, an optional global amax, then supplies the
// raw weight and Hessian bytes (NaN, Inf, asymmetric and negative-diagonal blocks all occur).
// Checked: validation never crashes; Quantize succeeds exactly when the separate validation
// steps (shape/Hessians/parameters, weight scan, global amax) all pass; on success the outputs
// have their documented sizes, every scale byte is a valid E4M3 scale and the row-range API
// gives the same bytes.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/kernels/validation.h"
#include "tests/fuzz/fuzz_input.h"

namespace {

nvfp4cal::ScaleSearch& Search() {
  static nvfp4cal::ScaleSearch* search =
      nvfp4cal::MakeCpuScaleSearch({/*num_threads=*/1, /*blocks_per_task=*/4096}).release();
  return *search;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using nvfp4cal::DType;
  nvfp4cal::fuzz::FuzzInput in(data, size);
  const uint8_t shape = in.Byte();
  const int64_t rows = shape & 7;                                                 // 0..7
  const int64_t cols = (shape >> 3) % 4 == 3 ? 24 : 16 * (1 + (shape >> 3) % 3);  // 16,32,48,24
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  const DType dtype = dtypes[in.Byte() % 3];
  const nvfp4cal::Method methods[] = {nvfp4cal::Method::kMax, nvfp4cal::Method::kMse,
                                      nvfp4cal::Method::kLocalHessian, nvfp4cal::Method::kDss};
  const uint8_t flags = in.Byte();
  nvfp4cal::QuantizeRequest request;
  request.params.method = methods[flags & 3];
  const bool with_hessians = (flags & 4) != 0;
  const bool with_amax = (flags & 8) != 0;
  const bool odd_params = (flags & 16) != 0;
  const bool wrong_block_count = (flags & 32) != 0;
  if (odd_params) {
    request.params.beta_step = in.Float();
    request.params.beta_half_range = in.Float();
    request.params.scale_neighbours = static_cast<int>(in.Range(-2, 130));
    request.params.symmetry_tolerance = in.Float();
  }
  if (with_amax) request.global_amax = in.Float();

  const size_t weight_bytes = static_cast<size_t>(rows * cols * nvfp4cal::DTypeSize(dtype));
  const std::string weights = in.Bytes(weight_bytes);
  request.weights = {weights.data(), dtype, rows, cols};
  std::vector<float> blocks;
  if (with_hessians) {
    const int64_t num_blocks = cols / 16 + (wrong_block_count ? 1 : 0);
    blocks.resize(static_cast<size_t>(num_blocks * 256));
    // Mostly a well-formed block (symmetric, positive diagonal) perturbed by the input.
    for (int64_t b = 0; b < num_blocks; ++b) {
      for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 16; ++j) {
          blocks[static_cast<size_t>(b * 256 + i * 16 + j)] = i == j ? 2.0f : 0.1f;
        }
      }
    }
    const int64_t edits = in.Range(0, 6);
    for (int64_t e = 0; e < edits; ++e) {
      const size_t at = static_cast<size_t>(in.Range(0, num_blocks * 256 - 1));
      blocks[at] = in.Float();
    }
    request.hessians = {blocks.data(), num_blocks};
  }

  const absl::Status shape_ok = nvfp4cal::ValidateShapeHessiansAndParams(request);
  absl::StatusOr<float> amax = absl::InvalidArgumentError("not scanned");
  if (shape_ok.ok()) amax = nvfp4cal::ScanWeightRows(request.weights, 0, rows);
  absl::Status amax_ok = amax.status();
  if (amax.ok() && request.global_amax.has_value()) {
    amax_ok = nvfp4cal::ValidateGlobalAmax(*request.global_amax, *amax);
  }
  const bool expect_ok = shape_ok.ok() && amax_ok.ok();

  absl::StatusOr<nvfp4cal::QuantizedTensor> result = Search().Quantize(request);
  if (result.ok() != expect_ok) {
    std::fprintf(stderr, "Quantize: %s; validation: %s / %s\n", result.status().ToString().c_str(),
                 shape_ok.ToString().c_str(), amax_ok.ToString().c_str());
    std::abort();
  }
  if (!result.ok()) {
    const absl::StatusCode code = result.status().code();
    FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument ||
               code == absl::StatusCode::kFailedPrecondition);
    return 0;
  }
  FUZZ_CHECK(result->packed_codes.size() == static_cast<size_t>(rows * cols / 2));
  FUZZ_CHECK(result->scales.size() == static_cast<size_t>(rows * cols / 16));
  for (uint8_t s : result->scales) FUZZ_CHECK(s <= 0x7e);
  FUZZ_CHECK(std::isfinite(result->global_scale));

  // Row ranges of the same tensor give the same bytes.
  if (rows > 1) {
    std::vector<uint8_t> codes(result->packed_codes.size());
    std::vector<uint8_t> scales(result->scales.size());
    const int64_t split = rows / 2;
    for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, split}, {split, rows}}) {
      nvfp4cal::RowRangeOutput out;
      out.packed_codes = absl::MakeSpan(codes.data() + begin * cols / 2,
                                        static_cast<size_t>((end - begin) * cols / 2));
      out.scales = absl::MakeSpan(scales.data() + begin * cols / 16,
                                  static_cast<size_t>((end - begin) * cols / 16));
      nvfp4cal::TensorStats stats;
      FUZZ_CHECK(Search().QuantizeRows(request, result->global_amax, begin, end, out, &stats).ok());
    }
    FUZZ_CHECK(codes == result->packed_codes);
    FUZZ_CHECK(scales == result->scales);
  }
  return 0;
}
