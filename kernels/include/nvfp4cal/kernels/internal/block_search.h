// Per-block scale searches of NUMERICS §3, written once for host and device.
//
// Everything here works on one block of 16 fp32 weights and, for the Hessian objective, its
// 16x16 Hessian block H_j (row-major). The CPU reference calls QuantizeBlock() per block from
// its thread pool; the CUDA backend calls the same functions from its kernels, so the two agree
// bit for bit wherever they evaluate the same candidates in the same order.
//
// Errors are evaluated in units of 2^E with 2^E <= s2 < 2^(E+1) (ErrorUnitExponent): w and d are
// both multiplied by 2^-E, which is exact, so the codes, the choices and every comparison are
// those of the unscaled arithmetic whenever that stays in fp32's normal range, while tiny and
// huge global scales no longer underflow or overflow the squared errors. Objectives returned
// here are in those units; multiply by 2^(2E) (ObjectiveUnit) for the tensor's own units.
//
// Canonical objective evaluation (docs/numerics.md §2): with e_i = fma(-c_i, d, w_i),
//   t      = e_0 * H[0, :], then t = fma(e_j, H[j, :], t) for j = 1..15
//   hess   = TreeSum16(e_i * t_i)             (pairwise: i + 8, then + 4, + 2, + 1)
//   mse    = TreeSum16(e_i * e_i)
// so with H = I the Hessian objective equals the squared error bit for bit.
#ifndef NVFP4CAL_KERNELS_INTERNAL_BLOCK_SEARCH_H_
#define NVFP4CAL_KERNELS_INTERNAL_BLOCK_SEARCH_H_

#include <cstdint>

#include "nvfp4cal/kernels/codecs.h"

namespace nvfp4cal {

// Sum of 16 values in the fixed pairwise order of the canonical objective. Overwrites p.
NVFP4_HD float TreeSum16(float* p) {
  for (int i = 0; i < 8; ++i) p[i] = AddNoContract(p[i], p[i + 8]);
  for (int i = 0; i < 4; ++i) p[i] = AddNoContract(p[i], p[i + 4]);
  for (int i = 0; i < 2; ++i) p[i] = AddNoContract(p[i], p[i + 2]);
  return AddNoContract(p[0], p[1]);
}

// sum_i e_i^2 in canonical order.
NVFP4_HD float BlockSquaredError(const float* e) {
  float p[kBlockSize];
  for (int i = 0; i < kBlockSize; ++i) p[i] = MulNoContract(e[i], e[i]);
  return TreeSum16(p);
}

// e^T H e in canonical order; h is the 16x16 block, row-major.
NVFP4_HD float BlockHessianError(const float* h, const float* e) {
  float t[kBlockSize];
  for (int i = 0; i < kBlockSize; ++i) t[i] = MulNoContract(e[0], h[i]);
  for (int j = 1; j < kBlockSize; ++j) {
    for (int i = 0; i < kBlockSize; ++i) t[i] = FusedMulAdd(e[j], h[j * kBlockSize + i], t[i]);
  }
  for (int i = 0; i < kBlockSize; ++i) t[i] = MulNoContract(e[i], t[i]);
  return TreeSum16(t);
}

// Objective of a block error: e^T H e when h is given, else the squared error.
NVFP4_HD float BlockObjective(const float* h, const float* e) {
  return h != nullptr ? BlockHessianError(h, e) : BlockSquaredError(e);
}

// Exponent E of the error unit 2^E: floor(log2(s2)) clamped to [-126, 126] so that 2^-E is a
// normal fp32 value. 0 for s2 = 0.
NVFP4_HD int ErrorUnitExponent(float global_scale) {
  if (!(global_scale > 0.0f)) return 0;
  const int biased = static_cast<int>((FloatBits(global_scale) >> 23) & 0xFFu);
  const int e = biased == 0 ? -126 : biased - 127;
  return e < -126 ? -126 : (e > 126 ? 126 : e);
}

// 2^-E as fp32 (exact): the factor that takes weights and dequant scales into error units.
NVFP4_HD float ErrorUnitInverse(int exponent) {
  return BitsToFloat(static_cast<uint32_t>(127 - exponent) << 23);
}

// Weights and global scale of one block, in the tensor's units (for codes) and in error units
// (for errors).
struct ScaledBlock {
  float w[kBlockSize];       // weights as given
  float w_unit[kBlockSize];  // w * 2^-E
  float global_amax;         // g
  float global_scale;        // s2 = g / 2688
  float global_scale_unit;   // s2 * 2^-E, in [1, 2) unless clamped
};

NVFP4_HD void PrepareScaledBlock(const float* w, float global_amax, float global_scale,
                                 ScaledBlock* block) {
  const float inverse = ErrorUnitInverse(ErrorUnitExponent(global_scale));
  for (int i = 0; i < kBlockSize; ++i) {
    block->w[i] = w[i];
    block->w_unit[i] = MulNoContract(w[i], inverse);
  }
  block->global_amax = global_amax;
  block->global_scale = global_scale;
  block->global_scale_unit = MulNoContract(global_scale, inverse);
}

// Error in units, e = w * 2^-E - e2m1(w / q) * d_unit (one fused rounding), of codes made with
// quantization scale q and dequantized with d = d_unit * 2^E.
NVFP4_HD float ElementError(float w_unit, float code_value, float d_unit) {
  return FusedMulAdd(-code_value, d_unit, w_unit);
}

NVFP4_HD void BlockErrorForScales(const ScaledBlock& b, float q, float d_unit, float* e) {
  for (int i = 0; i < kBlockSize; ++i) {
    e[i] = ElementError(b.w_unit[i], RoundToE2M1Value(b.w[i] / q), d_unit);
  }
}

// Objective (in error units squared) of one (q, d) candidate.
NVFP4_HD float CandidateObjective(const ScaledBlock& b, float q, float d_unit, const float* h) {
  float e[kBlockSize];
  BlockErrorForScales(b, q, d_unit, e);
  return BlockObjective(h, e);
}

// Block scale byte of the `max` method: v = ((a_b / 6) * 448) / (g / 6), with a_b / 6 taken as
// 1.0 for an all-zero block, rounded with the export clamp.
NVFP4_HD uint8_t MaxMethodScaleByte(float block_amax, float global_amax) {
  float per_block = block_amax / 6.0f;
  if (block_amax == 0.0f) per_block = 1.0f;
  return EncodeE4M3Scale((per_block * 448.0f) / (global_amax / 6.0f));
}

// The `max` method's byte for a block of weights, from its largest |w_i| (weights are
// validated finite).
NVFP4_HD uint8_t MaxMethodScaleByteOf(const float* w, float global_amax) {
  float block_amax = 0.0f;
  for (int i = 0; i < kBlockSize; ++i) {
    const float a = std::fabs(w[i]);
    block_amax = a > block_amax ? a : block_amax;
  }
  return MaxMethodScaleByte(block_amax, global_amax);
}

// Dequantization scale d = float(sf8) * s2.
NVFP4_HD float DequantScale(uint8_t scale_byte, float global_scale) {
  return MulNoContract(DecodeE4M3(scale_byte), global_scale);
}

// What the exact candidate pruning needs to know about one Hessian block (computed once per
// column block on the host, see hessian_bounds.h).
//
// For the symmetric part S of H and any error vector e, e^T S e >= e_m^2 / (S^-1)_mm for every
// element m (the minimum of the quadratic form with e_m fixed). And the canonical fp32
// evaluation of e^T H e is within gamma * sum_ab |e_a H_ab e_b| <= gamma * abs_norm * |e|^2 of
// the exact value (gamma = 21 units in the last place). So a candidate whose single element m
// already has an error e_m with
//   e_m^2 * precision_m - slack * abs_norm * |e|^2_bound  >  best objective so far
// cannot be the argmin, nor tie with it: skipping it leaves the choice exactly as the full
// search makes it. That is what makes pruning safe for bit-exact results.
struct HessianBlockBounds {
  float precision[kBlockSize];  // <= 1 / (S^-1)_mm; 0 when S is not safely positive definite
  float abs_norm;               // >= max row / column sum of |H|
};

// Relative margins of the bound: fp32 rounding of the bound itself, and of the canonical
// objective (21 ulps of sum |e_a H_ab e_b|, taken with a factor 8 of headroom).
inline constexpr float kBoundRelativeMargin = 1e-5f;
inline constexpr float kObjectiveRoundingSlack = 1e-5f;

// Per block: the element m whose bound bites hardest (argmax precision_i * w_i^2, first on ties)
// and what bounds |e|^2 for any candidate. m's values are copied so that the per-candidate test
// never indexes the block (on the GPU that index went to local memory).
struct BlockPruning {
  const HessianBlockBounds* bounds;  // null: no pruning
  float amax_unit;                   // max |w_i| in error units
  float square_sum_unit;             // sum w_i^2 in error units
  float unit_inverse;                // 2^-E: q * unit_inverse is q in error units
  float w;                           // w_m
  float w_unit;                      // w_m in error units
  float precision;                   // precision_m
};

// What bounds the error of one element under any candidate (q, d), in error units (docs/numerics.md
// §2): |e_i| <= max(|w_i| - 6 d, r) with r = q (1 + 2^-20) + 6 |q - d| + 2^-140. Below
// saturation the code is within half a grid spacing (at most 1) of w / q, so |w - c q| <= q up
// to the quotient's rounding, and c |q - d| <= 6 |q - d|; a saturated code (6) leaves |w| - 6 d,
// or less than r where |w| < 6 d. For the sweep (q = d) r is d itself.
NVFP4_HD float UnsaturatedErrorBound(float q_unit, float d_unit) {
  return FusedMulAdd(6.0f, std::fabs(AddNoContract(q_unit, -d_unit)),
                     FusedMulAdd(q_unit, 1.0f + 0x1p-20f, 0x1p-140f));
}

// What the canonical objective's rounding may take off the exact e^T S e of a candidate, given
// the squared errors of some elements (`known_square`, exact up to fp32 rounding) and
// `unknown_square` = n r^2 for the n others (r = UnsaturatedErrorBound): sum_i e_i^2 <=
// known_square + n r^2 + sum_i max(|w_i| - 6 d, 0)^2, the last sum zero once 6 d >= max |w_i|
// and at most sum w_i^2 otherwise; times kObjectiveRoundingSlack * abs_norm. amax_unit and
// square_sum_unit are BlockPruning's.
NVFP4_HD float CanonicalRoundingAllowance(float abs_norm, float amax_unit, float square_sum_unit,
                                          float known_square, float unknown_square, float d_unit) {
  // 6 (1 - 2^-20) d rounds to less than 6 d: "not below amax" then proves 6 d >= amax.
  const float saturated =
      MulNoContract(6.0f * (1.0f - 0x1p-20f), d_unit) < amax_unit ? square_sum_unit : 0.0f;
  const float norm_bound = AddNoContract(AddNoContract(known_square, unknown_square), saturated);
  return MulNoContract(kObjectiveRoundingSlack * abs_norm, norm_bound);
}

// r^2 for a candidate with quantization scale q (tensor units) and d_unit: unit_inverse is
// BlockPruning's.
NVFP4_HD float UnsaturatedErrorBoundSquare(float q, float unit_inverse, float d_unit) {
  const float r = UnsaturatedErrorBound(MulNoContract(q, unit_inverse), d_unit);
  return MulNoContract(r, r);
}

// n r^2 for CanonicalRoundingAllowance, from r^2.
NVFP4_HD float UnknownSquareBound(int n, float r_square) {
  return MulNoContract(static_cast<float>(n), r_square);
}

// True when `bound` (a lower bound of e^T S e, computed in fp32), less the canonical rounding
// `allowance`, provably exceeds `threshold`: the candidate can neither win nor tie.
NVFP4_HD bool BoundExceedsThreshold(float bound, float allowance, float threshold) {
  const float lower =
      bound * (1.0f - kBoundRelativeMargin) - allowance * (1.0f + kBoundRelativeMargin);
  return lower > threshold && lower < 3.0e38f;
}

NVFP4_HD BlockPruning MakeBlockPruning(const ScaledBlock& b, const HessianBlockBounds* bounds) {
  // The element with the largest precision_m * w_m^2 (its saturation or rounding error is
  // weighted most): on inputs whose largest weight sits in a low-precision channel, the largest
  // |w| alone leaves a third more candidates standing.
  BlockPruning p{bounds, 0.0f, 0.0f, ErrorUnitInverse(ErrorUnitExponent(b.global_scale)),
                 0.0f,   0.0f, 0.0f};
  float strongest = -1.0f;
  for (int i = 0; i < kBlockSize; ++i) {
    const float a = std::fabs(b.w_unit[i]);
    const float precision = bounds != nullptr ? bounds->precision[i] : 1.0f;
    const float weight = MulNoContract(MulNoContract(a, a), precision);
    if (weight > strongest) {
      strongest = weight;
      p.w = b.w[i];
      p.w_unit = b.w_unit[i];
      p.precision = precision;
    }
    p.amax_unit = a > p.amax_unit ? a : p.amax_unit;
    p.square_sum_unit = AddNoContract(p.square_sum_unit, MulNoContract(a, a));
  }
  return p;
}

// The one-element test for any element (w_unit, precision) of the block whose code value is
// given, with `unknown_square` = UnknownSquareBound(15, r) for the other elements. The caller
// has checked BlockPruningApplies and passes p.bounds->abs_norm (a loop keeps it in a register).
NVFP4_HD bool ElementCannotWin(const BlockPruning& p, float abs_norm, float w_unit, float precision,
                               float code_value, float d_unit, float unknown_square,
                               float threshold) {
  // e exactly as the full evaluation computes it.
  const float e = ElementError(w_unit, code_value, d_unit);
  const float e_square = MulNoContract(e, e);
  return BoundExceedsThreshold(MulNoContract(e_square, precision),
                               CanonicalRoundingAllowance(abs_norm, p.amax_unit, p.square_sum_unit,
                                                          e_square, unknown_square, d_unit),
                               threshold);
}

// Whether the one-element test can prune anything against `threshold`.
NVFP4_HD bool BlockPruningApplies(const BlockPruning& p, float threshold) {
  return p.bounds != nullptr && p.precision > 0.0f && threshold < 3.0e38f;
}

// The test with the quotient w_m / q given (the GPU computes it with a shared reciprocal).
NVFP4_HD bool CandidateCannotWinGivenQuotient(const BlockPruning& p, float quotient, float q,
                                              float d_unit, float threshold) {
  if (!BlockPruningApplies(p, threshold)) return false;
  return ElementCannotWin(
      p, p.bounds->abs_norm, p.w_unit, p.precision, RoundToE2M1Value(quotient), d_unit,
      UnknownSquareBound(kBlockSize - 1, UnsaturatedErrorBoundSquare(q, p.unit_inverse, d_unit)),
      threshold);
}

NVFP4_HD bool CandidateCannotWin(const BlockPruning& p, float q, float d_unit, float threshold) {
  return p.bounds != nullptr && CandidateCannotWinGivenQuotient(p, p.w / q, q, d_unit, threshold);
}

struct SweepChoice {
  int candidate;    // k in 0..125: E4M3 byte k + 1
  float objective;  // objective (error units) with q = d = d_k
};

// The 126-candidate sweep (`mse` when h is null, `local_hessian` otherwise): argmin over k of
// the objective with codes from q = d_k = f_k * s2; ties go to the smaller k (strict <).
// With pruning.bounds set, candidates that provably cannot beat `threshold` (an objective some
// candidate reaches, e.g. the `max` method's) or the best so far are skipped; the choice is the
// same as without pruning.
NVFP4_HD SweepChoice SweepScaleCandidates(const ScaledBlock& b, const float* h,
                                          const BlockPruning& pruning, float threshold) {
  SweepChoice best{-1, 0.0f};
  for (int k = 0; k < kNumScaleCandidates; ++k) {
    const float f = ScaleCandidateValue(k);
    const float q = MulNoContract(f, b.global_scale);
    const float d_unit = MulNoContract(f, b.global_scale_unit);
    const float bar =
        best.candidate < 0 ? threshold : (best.objective < threshold ? best.objective : threshold);
    if (CandidateCannotWin(pruning, q, d_unit, bar)) continue;
    const float objective = CandidateObjective(b, q, d_unit, h);
    if (best.candidate < 0 || objective < best.objective) best = SweepChoice{k, objective};
  }
  return best;
}

// The full sweep, without pruning.
NVFP4_HD SweepChoice SweepScaleCandidates(const ScaledBlock& b, const float* h) {
  const BlockPruning none{nullptr, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  return SweepScaleCandidates(b, h, none, 0.0f);
}

// Parameters of the decoupled scale search around the sweep optimum.
struct DssGrid {
  int neighbours;   // FP8 neighbours tried on each side of k* (spec default 1)
  int beta_steps;   // n: betas 1 + i * beta_step for i = -n..n (default 10)
  float beta_step;  // grid spacing (default 0.05)
};

struct DssChoice {
  int candidate;   // k of the stored scale byte k + 1
  int beta_index;  // i of beta_i; 0 with q = d_k means "the sweep's codes"
  float q;         // quantization scale the codes are made with
  float objective;
};

// The FP8 neighbours DSS visits around the sweep optimum k*: k* - n .. k* + n clamped to the
// 126 candidates (clamped duplicates are not revisited).
NVFP4_HD int DssFirstNeighbour(int start, int neighbours) {
  return start - neighbours < 0 ? 0 : start - neighbours;
}
NVFP4_HD int DssLastNeighbour(int start, int neighbours) {
  return start + neighbours > kNumScaleCandidates - 1 ? kNumScaleCandidates - 1
                                                      : start + neighbours;
}

// DSS quantization scale q = ((beta * (g * (f_k / 448))) / 6), in exactly this order.
NVFP4_HD float DssQuantScale(float beta, float global_amax, float candidate_value) {
  return MulNoContract(beta, global_amax * (candidate_value / kE4M3Max)) / kE2M1Max;
}

// beta_i = 1.0f + (float)i * beta_step.
NVFP4_HD float DssBeta(int i, float beta_step) {
  return AddNoContract(1.0f, MulNoContract(static_cast<float>(i), beta_step));
}

// The DSS candidates in visiting order (k ascending, then beta ascending) around `start`, the
// best replaced only on a strict improvement. `objective(q, d_unit, bar)` returns a
// candidate's objective in error units, or any value >= bar (the best so far) to skip it.
template <class Objective>
NVFP4_HD DssChoice VisitDssCandidates(const ScaledBlock& b, SweepChoice start, DssGrid grid,
                                      const Objective& objective) {
  DssChoice best{start.candidate, 0,
                 MulNoContract(ScaleCandidateValue(start.candidate), b.global_scale),
                 start.objective};
  const int k_begin = DssFirstNeighbour(start.candidate, grid.neighbours);
  const int k_end = DssLastNeighbour(start.candidate, grid.neighbours);
  for (int k = k_begin; k <= k_end; ++k) {
    const float f = ScaleCandidateValue(k);
    const float d_unit = MulNoContract(f, b.global_scale_unit);
    for (int i = -grid.beta_steps; i <= grid.beta_steps; ++i) {
      const float q = DssQuantScale(DssBeta(i, grid.beta_step), b.global_amax, f);
      const float value = objective(q, d_unit, best.objective);
      if (value < best.objective) best = DssChoice{k, i, q, value};
    }
  }
  return best;
}

// Decoupled scale search (NUMERICS §3 dss) starting from the sweep optimum `start`. Candidates
// are visited k ascending, then beta ascending; the best is replaced only on a strict
// improvement, so ties keep the earlier candidate and the result is never worse than `start`.
// Pruning (when pruning.bounds is set) skips candidates that cannot beat the best so far.
NVFP4_HD DssChoice DecoupledScaleSearch(const ScaledBlock& b, const float* h, SweepChoice start,
                                        DssGrid grid, const BlockPruning& pruning) {
  return VisitDssCandidates(b, start, grid, [&](float q, float d_unit, float bar) {
    // A candidate that cannot beat the best so far is skipped (reported as `bar`: no change).
    return CandidateCannotWin(pruning, q, d_unit, bar) ? bar : CandidateObjective(b, q, d_unit, h);
  });
}

NVFP4_HD DssChoice DecoupledScaleSearch(const ScaledBlock& b, const float* h, SweepChoice start,
                                        DssGrid grid) {
  const BlockPruning none{nullptr, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  return DecoupledScaleSearch(b, h, start, grid, none);
}

// The same two searches with any objective of a (q, d_unit) candidate: `objective(q, d_unit)`
// returns the candidate's objective in error units. Candidates, order and tie rule are those of
// SweepScaleCandidates and DecoupledScaleSearch (gptq's exact group cost uses them, gptq.h).
template <class Objective>
NVFP4_HD SweepChoice SweepScaleCandidatesBy(const ScaledBlock& b, const Objective& objective) {
  SweepChoice best{-1, 0.0f};
  for (int k = 0; k < kNumScaleCandidates; ++k) {
    const float f = ScaleCandidateValue(k);
    const float value =
        objective(MulNoContract(f, b.global_scale), MulNoContract(f, b.global_scale_unit));
    if (best.candidate < 0 || value < best.objective) best = SweepChoice{k, value};
  }
  return best;
}

template <class Objective>
NVFP4_HD DssChoice DecoupledScaleSearchBy(const ScaledBlock& b, SweepChoice start, DssGrid grid,
                                          const Objective& objective) {
  return VisitDssCandidates(b, start, grid,
                            [&](float q, float d_unit, float) { return objective(q, d_unit); });
}

// What the methods can do with one block.
enum class BlockMethod : int { kMax = 0, kMse = 1, kLocalHessian = 2, kDss = 3 };

// Result of quantizing one block, with the statistics of NUMERICS §4. Error sums are in error
// units squared: multiply by ObjectiveUnit(s2) for the tensor's units.
struct BlockOutcome {
  uint8_t scale_byte;
  uint8_t packed[kBlockSize / 2];
  float mse_before;  // squared error of the `max` method's result
  float mse_after;
  float hessian_before;  // e^T H e of the `max` result (0 without H)
  float hessian_after;
  uint8_t max_scale_byte;  // the `max` method's byte, to count changed blocks
  int8_t dss_offset;       // chosen k - k* (dss only)
  int16_t dss_beta_index;  // chosen beta index i (dss only)
  bool hessian_all_zero;   // H_j is all zeros: every candidate ties
};

// 2^(2E): converts objectives from error units squared to the tensor's units (host only; the
// range needs double).
inline double ObjectiveUnit(float global_scale) {
  const int e = ErrorUnitExponent(global_scale);
  double unit = 1.0;
  for (int i = 0; i < (e < 0 ? -2 * e : 2 * e); ++i) unit *= 2.0;
  return e < 0 ? 1.0 / unit : unit;
}

// Error sums of a block error vector, as the generic code computes them. Implementations with
// their own (bit-identical) vector code pass their own object with the same two functions.
struct GenericBlockObjectives {
  const float* h;  // Hessian block or null
  NVFP4_HD float SquaredError(const float* e) const { return BlockSquaredError(e); }
  NVFP4_HD float HessianError(const float* e) const {
    return h != nullptr ? BlockHessianError(h, e) : 0.0f;
  }
};

// True when every element of the 16x16 block is zero.
NVFP4_HD bool IsAllZeroHessian(const float* h) {
  bool all_zero = true;
  for (int i = 0; i < kBlockSize * kBlockSize; ++i) all_zero = all_zero && h[i] == 0.0f;
  return all_zero;
}

// First part of QuantizeBlock, shared by every search implementation: computes the `max`
// method's byte and its errors (the "before" statistics) and prepares the block in error units.
// Returns false for an all-zero tensor (g = 0), whose outcome is then final.
template <class Objectives>
NVFP4_HD_FLATTEN bool BeginBlock(const float* w, float global_amax, float global_scale,
                                 BlockMethod method, const Objectives& objectives,
                                 BlockOutcome* out, ScaledBlock* b) {
  out->max_scale_byte = MaxMethodScaleByteOf(w, global_amax);
  if (global_amax == 0.0f) {
    // All-zero tensor: s2 = 0, every code 0, never a division by zero.
    out->scale_byte = method == BlockMethod::kMax ? out->max_scale_byte : 0x01;
    return false;
  }
  PrepareScaledBlock(w, global_amax, global_scale, b);
  float e[kBlockSize];
  const float f_max = DecodeE4M3(out->max_scale_byte);
  BlockErrorForScales(*b, MulNoContract(f_max, global_scale),
                      MulNoContract(f_max, b->global_scale_unit), e);
  out->mse_before = objectives.SquaredError(e);
  out->hessian_before = objectives.HessianError(e);
  out->scale_byte = out->max_scale_byte;
  return true;
}

// Last part of QuantizeBlock: codes e2m1(w / q) for stored candidate k, packing and the "after"
// statistics.
template <class Objectives>
NVFP4_HD_FLATTEN void FinishBlock(const ScaledBlock& b, const Objectives& objectives, int candidate,
                                  float q, BlockOutcome* out) {
  out->scale_byte = static_cast<uint8_t>(candidate + 1);
  const float d_unit = MulNoContract(ScaleCandidateValue(candidate), b.global_scale_unit);
  uint8_t codes[kBlockSize];
  float e[kBlockSize];
  for (int i = 0; i < kBlockSize; ++i) {
    codes[i] = EncodeE2M1(b.w[i] / q);
    e[i] = ElementError(b.w_unit[i], DecodeE2M1(codes[i]), d_unit);
  }
  for (int i = 0; i < kBlockSize / 2; ++i) {
    out->packed[i] = PackE2M1Pair(codes[2 * i], codes[2 * i + 1]);
  }
  out->mse_after = objectives.SquaredError(e);
  out->hessian_after = objectives.HessianError(e);
}

// The method-independent frame of every QuantizeBlock variant: the `max` method's result and
// "before" statistics, then the search, then codes, packing and "after" statistics. `search`
// provides the two searches (generic, vectorised or event-driven; all choose alike):
//   SweepChoice Sweep(const ScaledBlock& b, bool squared_error, float reference) const;
//   DssChoice Dss(const ScaledBlock& b, SweepChoice start) const;
// `reference` is the canonical objective of one candidate (the `max` method's), which searches
// may use as an upper bound.
template <class Objectives, class Search>
NVFP4_HD_FLATTEN BlockOutcome QuantizeBlockWith(const float* w, float global_amax,
                                                float global_scale, BlockMethod method,
                                                bool has_hessian, bool hessian_all_zero,
                                                const Objectives& objectives,
                                                const Search& search) {
  BlockOutcome out{};
  ScaledBlock b{};
  out.hessian_all_zero = hessian_all_zero;
  if (!BeginBlock(w, global_amax, global_scale, method, objectives, &out, &b)) return out;
  int candidate = out.max_scale_byte - 1;
  float q = MulNoContract(DecodeE4M3(out.max_scale_byte), global_scale);
  if (method != BlockMethod::kMax) {
    const bool squared = method == BlockMethod::kMse || !has_hessian;
    const SweepChoice sweep =
        search.Sweep(b, squared, squared ? out.mse_before : out.hessian_before);
    candidate = sweep.candidate;
    q = MulNoContract(ScaleCandidateValue(candidate), global_scale);
    if (method == BlockMethod::kDss) {
      const DssChoice dss = search.Dss(b, sweep);
      out.dss_offset = static_cast<int8_t>(dss.candidate - sweep.candidate);
      out.dss_beta_index = static_cast<int16_t>(dss.beta_index);
      candidate = dss.candidate;
      q = dss.q;
    }
  }
  FinishBlock(b, objectives, candidate, q, &out);
  return out;
}

// The generic searches of this header, with optional exact pruning.
struct GenericSearch {
  const float* h;
  DssGrid grid;
  const HessianBlockBounds* hessian_bounds;   // null: no pruning
  const HessianBlockBounds* identity_bounds;  // null: no pruning of the squared error
  NVFP4_HD SweepChoice Sweep(const ScaledBlock& b, bool squared, float reference) const {
    const BlockPruning pruning = MakeBlockPruning(b, squared ? identity_bounds : hessian_bounds);
    return SweepScaleCandidates(b, squared ? nullptr : h, pruning, reference);
  }
  NVFP4_HD DssChoice Dss(const ScaledBlock& b, SweepChoice start) const {
    return DecoupledScaleSearch(b, h, start, grid, MakeBlockPruning(b, hessian_bounds));
  }
};

// Quantizes one block with `method`. w: 16 fp32 weights; h: 16x16 Hessian block or null (the
// mse and max methods ignore it for the search but still report its objective). g is the
// tensor's (or fused group's) amax and s2 = g / 2688 its global scale. `hessian_bounds` (of h)
// and `identity_bounds` (IdentityBounds(), for the squared error) enable exact pruning; the
// outcome is identical with and without.
NVFP4_HD BlockOutcome QuantizeBlock(const float* w, float global_amax, float global_scale,
                                    const float* h, BlockMethod method, DssGrid grid,
                                    const HessianBlockBounds* hessian_bounds = nullptr,
                                    const HessianBlockBounds* identity_bounds = nullptr) {
  return QuantizeBlockWith(w, global_amax, global_scale, method, h != nullptr,
                           h != nullptr && IsAllZeroHessian(h), GenericBlockObjectives{h},
                           GenericSearch{h, grid, hessian_bounds, identity_bounds});
}

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_INTERNAL_BLOCK_SEARCH_H_
