// HessianAccumulator: builds the Hessians `nvfp4cal quantize` needs from activations, for C++
// users who run their own forward passes.
//
// H = sum_t x_t x_t^T over the calibration tokens of one Linear input (NUMERICS §6), summed in
// double precision. By default only the diagonal 16x16 blocks are kept (in * 16 values, all the
// current methods use); keep_full_matrix keeps the whole [in, in] matrix for future methods.
//
//   nvfp4cal::HessianAccumulator attn_input(/*in_features=*/4096);
//   for (each batch) attn_input.AddBatch(activations, /*tokens=*/batch_tokens);  // [t, 4096]
//   std::vector<nvfp4cal::NamedHessian> hessians = {
//       {"model.layers.0.self_attn.q_proj.hessian", &attn_input}};   // k/v share it
//   absl::Status s = nvfp4cal::WriteHessiansFile("hessians.safetensors", hessians,
//                                                /*divide_by_tokens=*/true);
#ifndef NVFP4CAL_CLIENT_HESSIAN_ACCUMULATOR_H_
#define NVFP4CAL_CLIENT_HESSIAN_ACCUMULATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nvfp4cal/kernels/dtype.h"

namespace nvfp4cal {

class HessianAccumulator {
 public:
  // in_features must be a positive multiple of 16 (checked by AddBatch).
  explicit HessianAccumulator(int64_t in_features, bool keep_full_matrix = false);

  int64_t in_features() const { return in_; }
  int64_t num_tokens() const { return tokens_; }
  bool keeps_full_matrix() const { return full_; }
  // max |x| over every activation added: the input's amax, from which `nvfp4cal quantize`
  // writes input_scale = amax / 2688 (NUMERICS §5).
  float input_amax() const { return amax_; }

  // Adds `tokens` activation rows [tokens, in_features] (row-major) of the given dtype.
  // INVALID_ARGUMENT for a bad shape or a non-finite value (naming the token and feature);
  // nothing is added then.
  absl::Status AddBatch(const void* activations, DType dtype, int64_t tokens);
  absl::Status AddBatch(const float* activations, int64_t tokens) {
    return AddBatch(activations, DType::kFloat32, tokens);
  }

  // The diagonal blocks [in/16, 16, 16] as fp32, divided by the token count when asked.
  std::vector<float> Blocks(bool divide_by_tokens) const;

  // The full matrix [in, in] as fp32; FAILED_PRECONDITION without keep_full_matrix.
  absl::StatusOr<std::vector<float>> FullMatrix(bool divide_by_tokens) const;

 private:
  int64_t in_;
  bool full_;
  int64_t tokens_ = 0;
  float amax_ = 0.0f;
  std::vector<double> blocks_;  // [in/16, 16, 16]
  std::vector<double> matrix_;  // [in, in] when full_
};

// One entry of a Hessians file.
struct NamedHessian {
  std::string name;  // "<module>.hessian"
  const HessianAccumulator* hessian = nullptr;
};

// Writes the accumulators as a Hessians file `quantize --hessians` reads: each entry [in, in]
// when it keeps the full matrix, else [in/16, 16, 16]; fp32; next to each `<x>.hessian` the
// scalar `<x>.input_amax` (HessianAccumulator::input_amax); `__metadata__` records the token
// count of each entry and any `aliases` (entry name -> name of the entry it shares, see
// hessians.h). `output_amax` (module name -> max |y| over the module's outputs, e.g. of k_proj
// and v_proj for `quantize --kv-cache fp8`) adds the scalars `<module>.output_amax`.
// FAILED_PRECONDITION for an accumulator without tokens; INVALID_ARGUMENT naming the alias for
// one whose target is not among `hessians` or whose name is, and naming the module for an
// output amax that is negative or not finite; nothing is written then.
absl::Status WriteHessiansFile(const std::string& path, const std::vector<NamedHessian>& hessians,
                               bool divide_by_tokens,
                               const std::vector<std::pair<std::string, std::string>>& aliases = {},
                               const std::vector<std::pair<std::string, float>>& output_amax = {});

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_HESSIAN_ACCUMULATOR_H_
