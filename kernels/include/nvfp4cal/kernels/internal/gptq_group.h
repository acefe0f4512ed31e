// Per-group numerics of the gptq method (docs/numerics.md §6), written once for host and device.
//
// GPTQ quantizes the columns of W in order and pushes each column's rounding error onto the
// columns not yet quantized. With U the upper Cholesky factor of H^-1 (H^-1 = U^T U), quantizing
// column j of a row with working (error-updated) weight w'_j gives
//   s_j = (w'_j - e2m1(w'_j / q) * d) / U_jj,   w'_l -= s_j * U_jl   for every later column l,
// and adds s_j^2 to the row's GPTQ cost. NVFP4 shares one FP8 scale per 16 columns, so the scale
// of a group is chosen when the group is reached, on its error-updated weights; the 16 columns
// of the group are then quantized in order with that scale, each error moving the group's later
// columns. This header holds that group step: the scale choice (block_search.h's sweep and DSS,
// with either the group's 16x16 block of H or the exact GPTQ cost as objective) and the
// sequential pass. The CPU driver (cpu_gptq.cc) applies the errors to the columns after the group.
#ifndef NVFP4CAL_KERNELS_INTERNAL_GPTQ_GROUP_H_
#define NVFP4CAL_KERNELS_INTERNAL_GPTQ_GROUP_H_

#include <cstdint>

#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {

// How a group's scale is chosen (GptqParams in scale_search.h, reduced to plain values).
struct GptqGroupConfig {
  bool exact_cost;  // objective: true = GPTQ cost of the sequential pass, false = e^T H_j e
  bool dss;         // search: true = sweep then DSS, false = the 126-candidate sweep
  DssGrid grid;     // DSS neighbours and betas
};

// The configuration of gptq parameters (host).
inline GptqGroupConfig GptqGroupConfigOf(const SearchParams& params) {
  return GptqGroupConfig{params.gptq.scale_objective == GptqScaleObjective::kGptqCost,
                         params.gptq.scale_search == GptqScaleSearch::kDss,
                         DssGrid{params.scale_neighbours, DssBetaSteps(params), params.beta_step}};
}

// What a group's pass leaves behind for the propagation to later columns.
struct GptqGroupOutput {
  uint8_t codes[kBlockSize];       // E2M1 codes
  float scaled_error[kBlockSize];  // s_j = (w'_j - c_j d) / U_jj, tensor units
};

// The sequential pass over one group of one row. w: the 16 working weights (tensor units); q:
// quantization scale; d_unit: dequant scale in error units (d = d_unit * 2^E); unit and
// unit_inverse: 2^E and 2^-E (ErrorUnitInverse); u: the group's 16x16 block of U, row-major
// (upper triangle read). Returns sum_j s_j^2 in error units squared, the exact GPTQ cost of the
// group with these scales. Writes codes and s_j when out is not null.
//   c_j = e2m1(w'_j / q);  e_j = fma(-c_j, d_unit, w'_j * 2^-E);  s_j = e_j / U_jj (error units);
//   w'_l = w'_l - (s_j * 2^E) * U_jl for l > j (product rounded, then the subtraction).
NVFP4_HD float GptqGroupPass(const float* w, float q, float d_unit, float unit, float unit_inverse,
                             const float* u, GptqGroupOutput* out) {
  float work[kBlockSize];
  float cost[kBlockSize];
  for (int i = 0; i < kBlockSize; ++i) work[i] = w[i];
  for (int j = 0; j < kBlockSize; ++j) {
    const float y = work[j] / q;
    const float e_unit =
        ElementError(MulNoContract(work[j], unit_inverse), RoundToE2M1Value(y), d_unit);
    const float s_unit = e_unit / u[j * kBlockSize + j];
    cost[j] = MulNoContract(s_unit, s_unit);
    const float s = MulNoContract(s_unit, unit);  // exact: a power of two
    for (int l = j + 1; l < kBlockSize; ++l) {
      work[l] = AddNoContract(work[l], -MulNoContract(s, u[j * kBlockSize + l]));
    }
    if (out != nullptr) {
      out->codes[j] = EncodeE2M1(y);
      out->scaled_error[j] = s;
    }
  }
  return TreeSum16(cost);
}

// The exact GPTQ cost of a (q, d_unit) candidate, as the searches of block_search.h call it.
struct GptqCostObjective {
  const float* w;
  float unit;
  float unit_inverse;
  const float* u;
  NVFP4_HD float operator()(float q, float d_unit) const {
    return GptqGroupPass(w, q, d_unit, unit, unit_inverse, u, nullptr);
  }
};

// A group's chosen scale.
struct GptqGroupChoice {
  int candidate;   // k: stored E4M3 byte k + 1
  float q;         // quantization scale of the codes
  int dss_offset;  // k - k* of the sweep optimum (dss only)
  int dss_beta_index;
};

// Chooses the group's scale on its working weights w (tensor units) with global amax g and
// s2 = g / 2688 (g > 0). h: the group's 16x16 block of H (for the e^T H_j e objective); u: its
// block of U (for the exact cost); bounds: pruning data of h or null (does not change the choice).
NVFP4_HD GptqGroupChoice GptqChooseGroupScale(const float* w, float global_amax, float global_scale,
                                              const float* h, const float* u,
                                              const GptqGroupConfig& config,
                                              const HessianBlockBounds* bounds) {
  ScaledBlock b{};
  PrepareScaledBlock(w, global_amax, global_scale, &b);
  SweepChoice sweep{};
  DssChoice dss{};
  if (config.exact_cost) {
    const int e = ErrorUnitExponent(global_scale);
    const GptqCostObjective objective{w, ErrorUnitInverse(-e), ErrorUnitInverse(e), u};
    sweep = SweepScaleCandidatesBy(b, objective);
    if (config.dss) dss = DecoupledScaleSearchBy(b, sweep, config.grid, objective);
  } else {
    // The `max` method's candidate bounds the optimum from the start, so pruning (exact: the
    // choice is unchanged) skips most candidates, as in QuantizeBlock.
    const float f_max = DecodeE4M3(MaxMethodScaleByteOf(w, global_amax));
    const float reference = CandidateObjective(b, MulNoContract(f_max, global_scale),
                                               MulNoContract(f_max, b.global_scale_unit), h);
    const BlockPruning pruning = MakeBlockPruning(b, bounds);
    sweep = SweepScaleCandidates(b, h, pruning, reference);
    if (config.dss) dss = DecoupledScaleSearch(b, h, sweep, config.grid, pruning);
  }
  if (!config.dss) {
    return GptqGroupChoice{sweep.candidate,
                           MulNoContract(ScaleCandidateValue(sweep.candidate), global_scale), 0, 0};
  }
  return GptqGroupChoice{dss.candidate, dss.q, dss.candidate - sweep.candidate, dss.beta_index};
}

// A group's error statistics in error units (ObjectiveUnit converts them), on its original
// weights: the `max` method's result and the chosen one.
struct GptqGroupStats {
  float mse_before;
  float mse_after;
  float hessian_before;
  float hessian_after;
  bool scale_changed;  // scale byte differs from the `max` method's
  bool zero_hessian;   // the group's block of H is all zeros
};

// orig: the group's original weights; h: its 16x16 block of H; scale_byte and codes: the result.
NVFP4_HD GptqGroupStats GptqGroupStatistics(const float* orig, float global_amax,
                                            float global_scale, float unit_inverse, const float* h,
                                            uint8_t scale_byte, const uint8_t* codes,
                                            const DssGrid& grid) {
  const BlockOutcome max =
      QuantizeBlock(orig, global_amax, global_scale, h, BlockMethod::kMax, grid);
  float e[kBlockSize];
  const float d_unit =
      MulNoContract(DecodeE4M3(scale_byte), MulNoContract(global_scale, unit_inverse));
  for (int i = 0; i < kBlockSize; ++i) {
    e[i] = ElementError(MulNoContract(orig[i], unit_inverse), DecodeE2M1(codes[i]), d_unit);
  }
  return GptqGroupStats{max.mse_before,
                        BlockSquaredError(e),
                        max.hessian_before,
                        BlockHessianError(h, e),
                        scale_byte != max.max_scale_byte,
                        IsAllZeroHessian(h)};
}

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_INTERNAL_GPTQ_GROUP_H_
