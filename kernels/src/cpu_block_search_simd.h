// Host-only vectorised forms of the block searches in block_search.h.
//
// Same arithmetic, same order, same results bit for bit (tests/kernels check it on random
// blocks): a 16-element block is one GCC vector, so the objective's "t += e_j * H[j, :]" is 16
// whole-vector multiply-adds and the tree sum is three half-vector folds. GCC lowers the vectors
// to whatever the target has (4 SSE registers by default, one AVX-512 register with
// -march=native); -ffp-contract=off keeps every product rounded on its own.
#ifndef NVFP4CAL_KERNELS_SRC_CPU_BLOCK_SEARCH_SIMD_H_
#define NVFP4CAL_KERNELS_SRC_CPU_BLOCK_SEARCH_SIMD_H_

#include <cstdint>
#include <cstring>
#include <vector>

#include "nvfp4cal/kernels/internal/block_search.h"

namespace nvfp4cal {
namespace simd {

// Everything here is inlined into the caller, which is compiled once per instruction set
// (target_clones), so the vectors never cross a function boundary.
#define NVFP4_SIMD inline __attribute__((always_inline))

typedef float Vec16 __attribute__((vector_size(64)));
typedef int32_t Mask16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));

NVFP4_SIMD Vec16 Load(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

NVFP4_SIMD Vec16 Splat(float x) { return Vec16{} + x; }

// a * b + c with one rounding per lane (vectorised to FMA instructions where the target has
// them; the baseline x86-64 variant calls fmaf).
NVFP4_SIMD Vec16 Fma(Vec16 a, Vec16 b, Vec16 c) {
  Vec16 r;
  for (int l = 0; l < 16; ++l) r[l] = __builtin_fmaf(a[l], b[l], c[l]);
  return r;
}

NVFP4_SIMD Vec16 MaskedConstant(Mask16 mask, float value) {
  return reinterpret_cast<Vec16>(mask & reinterpret_cast<Mask16>(Splat(value)));
}

// RoundToE2M1Value on 16 lanes.
NVFP4_SIMD Vec16 RoundToE2M1Value(Vec16 y) {
  const Vec16 a = reinterpret_cast<Vec16>(reinterpret_cast<Mask16>(y) & 0x7FFFFFFF);
  const Vec16 magnitude = MaskedConstant(a > 0.25f, 0.5f) + MaskedConstant(a >= 0.75f, 0.5f) +
                          MaskedConstant(a > 1.25f, 0.5f) + MaskedConstant(a >= 1.75f, 0.5f) +
                          MaskedConstant(a > 2.5f, 1.0f) + MaskedConstant(a >= 3.5f, 1.0f) +
                          MaskedConstant(a > 5.0f, 2.0f);
  // Negation by the sign bit equals multiplying by -1, -0 for a zero magnitude included.
  const Mask16 negative = (y < 0.0f) & static_cast<int32_t>(0x80000000u);
  return reinterpret_cast<Vec16>(reinterpret_cast<Mask16>(magnitude) ^ negative);
}

NVFP4_SIMD float TreeSum(Vec16 p) {
  const Vec8 p8 = __builtin_shufflevector(p, p, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(p, p, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 p4 =
      __builtin_shufflevector(p8, p8, 0, 1, 2, 3) + __builtin_shufflevector(p8, p8, 4, 5, 6, 7);
  return (p4[0] + p4[2]) + (p4[1] + p4[3]);
}

// The block's Hessian rows as vectors (loaded once per block, used by every candidate).
struct HessianRows {
  Vec16 row[kBlockSize];
};

NVFP4_SIMD void LoadHessianRows(const float* h, HessianRows* rows) {
  for (int j = 0; j < kBlockSize; ++j) rows->row[j] = Load(h + j * kBlockSize);
}

NVFP4_SIMD float Objective(Vec16 e, const HessianRows* h) {
  if (h == nullptr) return TreeSum(e * e);
  Vec16 t = e[0] * h->row[0];
  for (int j = 1; j < kBlockSize; ++j) t = Fma(Splat(e[j]), h->row[j], t);
  return TreeSum(e * t);
}

// Per-tensor candidate scales: they depend only on g, so they are computed once per tensor
// instead of once per block.
struct CandidateScales {
  // Padded to 128 so that vector loads of 16 candidates stay inside; entries 126, 127 are 1.
  float d[128];       // d_k = f_k * s2 (codes of the sweeps use q = d_k)
  float d_unit[128];  // f_k * s2 * 2^-E (errors)
  int beta_steps = 0;
  std::vector<float> dss_q;  // [126][2n + 1]: q(k, i) = DssQuantScale(beta_i, g, f_k)

  CandidateScales(float global_amax, float global_scale, DssGrid grid)
      : beta_steps(grid.beta_steps) {
    const float global_scale_unit =
        global_scale * ErrorUnitInverse(ErrorUnitExponent(global_scale));
    const int betas = 2 * grid.beta_steps + 1;
    dss_q.resize(static_cast<size_t>(kNumScaleCandidates * betas + 16), 1.0f);
    for (int k = kNumScaleCandidates; k < 128; ++k) d[k] = d_unit[k] = 1.0f;
    for (int k = 0; k < kNumScaleCandidates; ++k) {
      const float f = ScaleCandidateValue(k);
      d[k] = f * global_scale;
      d_unit[k] = f * global_scale_unit;
      for (int i = -grid.beta_steps; i <= grid.beta_steps; ++i) {
        dss_q[static_cast<size_t>(k * betas + i + grid.beta_steps)] =
            DssQuantScale(DssBeta(i, grid.beta_step), global_amax, f);
      }
    }
  }
};

// Objectives of `count` candidates (q[c], d_unit) in error units. Two candidates at a time, so
// that the two 16-deep dependency chains of the objective overlap.
NVFP4_SIMD void EvaluateCandidates(Vec16 w, Vec16 w_unit, const float* q, const float* d_unit,
                                   int d_stride, int count, const HessianRows* h,
                                   float* objective) {
  int c = 0;
  for (; c + 1 < count; c += 2) {
    const Vec16 e0 = Fma(-RoundToE2M1Value(w / q[c]), Splat(d_unit[c * d_stride]), w_unit);
    const Vec16 e1 =
        Fma(-RoundToE2M1Value(w / q[c + 1]), Splat(d_unit[(c + 1) * d_stride]), w_unit);
    if (h == nullptr) {
      objective[c] = TreeSum(e0 * e0);
      objective[c + 1] = TreeSum(e1 * e1);
      continue;
    }
    Vec16 t0 = e0[0] * h->row[0];
    Vec16 t1 = e1[0] * h->row[0];
    for (int j = 1; j < kBlockSize; ++j) {
      t0 = Fma(Splat(e0[j]), h->row[j], t0);
      t1 = Fma(Splat(e1[j]), h->row[j], t1);
    }
    objective[c] = TreeSum(e0 * t0);
    objective[c + 1] = TreeSum(e1 * t1);
  }
  if (c < count) {
    objective[c] =
        Objective(Fma(-RoundToE2M1Value(w / q[c]), Splat(d_unit[c * d_stride]), w_unit), h);
  }
}

// CandidateCannotWin for 16 candidates at once (q[c], d_unit[c]) against one threshold: bit c
// of the result is set when candidate c provably cannot win. Pruning only needs to be valid,
// not identical to the scalar test, so a fixed threshold (weaker than the running best) is fine.
NVFP4_SIMD uint32_t CannotWinMask(const BlockPruning& p, Vec16 q, Vec16 d_unit, float threshold) {
  if (!BlockPruningApplies(p, threshold)) return 0;
  const float precision = p.precision;
  const Vec16 e = Fma(-RoundToE2M1Value(p.w / q), d_unit, Splat(p.w_unit));
  const Vec16 e_square = e * e;
  // UnsaturatedErrorBound and CanonicalRoundingAllowance, lane by lane.
  const Vec16 q_unit = q * p.unit_inverse;
  const Vec16 distance =
      reinterpret_cast<Vec16>(reinterpret_cast<Mask16>(q_unit - d_unit) & 0x7FFFFFFF);
  const Vec16 r = Fma(Splat(6.0f), distance, Fma(q_unit, Splat(1.0f + 0x1p-20f), Splat(0x1p-140f)));
  const Vec16 saturated =
      MaskedConstant((6.0f * (1.0f - 0x1p-20f)) * d_unit < p.amax_unit, p.square_sum_unit);
  const Vec16 norm_bound = (e_square + static_cast<float>(kBlockSize - 1) * (r * r)) + saturated;
  const Vec16 lower =
      (e_square * precision) * (1.0f - kBoundRelativeMargin) -
      ((kObjectiveRoundingSlack * p.bounds->abs_norm) * norm_bound) * (1.0f + kBoundRelativeMargin);
  const Mask16 prune = (lower > threshold) & (lower < 3.0e38f);
  uint32_t bits = 0;
  for (int c = 0; c < 16; ++c) bits |= (prune[c] != 0 ? 1u : 0u) << c;
  return bits;
}

// Evaluates up to two gathered candidates and folds them into a running minimum in the order
// they were gathered (ascending visiting order), with strict improvement.
struct PendingCandidates {
  float q[2];
  float d_unit[2];
  int k[2];
  int beta_index[2];
  int count = 0;
};

NVFP4_SIMD void FlushSweep(Vec16 w, Vec16 w_unit, const HessianRows* h, PendingCandidates* pending,
                           SweepChoice* best) {
  float objective[2];
  EvaluateCandidates(w, w_unit, pending->q, pending->d_unit, 1, pending->count, h, objective);
  for (int c = 0; c < pending->count; ++c) {
    if (best->candidate < 0 || objective[c] < best->objective) {
      *best = SweepChoice{pending->k[c], objective[c]};
    }
  }
  pending->count = 0;
}

NVFP4_SIMD void FlushDss(Vec16 w, Vec16 w_unit, const HessianRows* h, PendingCandidates* pending,
                         DssChoice* best) {
  float objective[2];
  EvaluateCandidates(w, w_unit, pending->q, pending->d_unit, 1, pending->count, h, objective);
  for (int c = 0; c < pending->count; ++c) {
    if (objective[c] < best->objective) {
      *best = DssChoice{pending->k[c], pending->beta_index[c], pending->q[c], objective[c]};
    }
  }
  pending->count = 0;
}

// SweepScaleCandidates (with pruning), vectorised: same visiting order, same choice.
NVFP4_SIMD SweepChoice SweepScaleCandidates(const ScaledBlock& b, const CandidateScales& scales,
                                            const HessianRows* h, const BlockPruning& pruning,
                                            float threshold) {
  const Vec16 w = Load(b.w);
  const Vec16 w_unit = Load(b.w_unit);
  SweepChoice best{-1, 0.0f};
  // Pass 1 runs only when pass 0 pruned every candidate against `threshold`, which some
  // candidate reaches (a bound rounded past it): pruning must never decide the result, nor
  // leave none.
  for (int pass = 0; pass < 2 && best.candidate < 0; ++pass) {
    const bool prune = pass == 0 && pruning.bounds != nullptr;
    PendingCandidates pending;
    uint32_t pruned = 0;
    for (int k = 0; k < kNumScaleCandidates; ++k) {
      if (prune && k % 16 == 0) {
        const float bar = best.candidate < 0
                              ? threshold
                              : (best.objective < threshold ? best.objective : threshold);
        pruned = CannotWinMask(pruning, Load(&scales.d[k]), Load(&scales.d_unit[k]), bar);
      }
      if ((pruned >> (k % 16)) & 1u) continue;
      pending.q[pending.count] = scales.d[k];
      pending.d_unit[pending.count] = scales.d_unit[k];
      pending.k[pending.count++] = k;
      if (pending.count == 2) FlushSweep(w, w_unit, h, &pending, &best);
    }
    if (pending.count > 0) FlushSweep(w, w_unit, h, &pending, &best);
    if (!prune) break;
  }
  return best;
}

// DecoupledScaleSearch (with pruning), vectorised: the same visiting order (k ascending, then
// beta ascending) and strict improvement.
NVFP4_SIMD DssChoice DecoupledScaleSearch(const ScaledBlock& b, const CandidateScales& scales,
                                          const HessianRows* h, SweepChoice start, int neighbours,
                                          const BlockPruning& pruning) {
  const Vec16 w = Load(b.w);
  const Vec16 w_unit = Load(b.w_unit);
  DssChoice best{start.candidate, 0, scales.d[start.candidate], start.objective};
  const int k_begin = DssFirstNeighbour(start.candidate, neighbours);
  const int k_end = DssLastNeighbour(start.candidate, neighbours);
  const int betas = 2 * scales.beta_steps + 1;
  PendingCandidates pending;
  for (int k = k_begin; k <= k_end; ++k) {
    const float* q = scales.dss_q.data() + k * betas;
    const Vec16 d_unit = Splat(scales.d_unit[k]);
    uint32_t pruned = 0;
    for (int i = 0; i < betas; ++i) {
      if (i % 16 == 0) pruned = CannotWinMask(pruning, Load(q + i), d_unit, best.objective);
      if ((pruned >> (i % 16)) & 1u) continue;
      pending.q[pending.count] = q[i];
      pending.d_unit[pending.count] = scales.d_unit[k];
      pending.k[pending.count] = k;
      pending.beta_index[pending.count++] = i - scales.beta_steps;
      if (pending.count == 2) FlushDss(w, w_unit, h, &pending, &best);
    }
  }
  if (pending.count > 0) FlushDss(w, w_unit, h, &pending, &best);
  return best;
}

// GenericBlockObjectives on vectors.
struct VectorBlockObjectives {
  const HessianRows* rows;  // Hessian block or null
  NVFP4_SIMD float SquaredError(const float* e) const { return Objective(Load(e), nullptr); }
  NVFP4_SIMD float HessianError(const float* e) const {
    return rows != nullptr ? Objective(Load(e), rows) : 0.0f;
  }
};

// The vectorised searches for QuantizeBlockWith.
struct VectorSearch {
  const CandidateScales* scales;
  const HessianRows* rows;  // null without Hessians
  int neighbours;
  const HessianBlockBounds* hessian_bounds;  // null: no pruning
  const HessianBlockBounds* identity_bounds;
  NVFP4_SIMD SweepChoice Sweep(const ScaledBlock& b, bool squared, float reference) const {
    const BlockPruning pruning = MakeBlockPruning(b, squared ? identity_bounds : hessian_bounds);
    return SweepScaleCandidates(b, *scales, squared ? nullptr : rows, pruning, reference);
  }
  NVFP4_SIMD DssChoice Dss(const ScaledBlock& b, SweepChoice start) const {
    return DecoupledScaleSearch(b, *scales, rows, start, neighbours,
                                MakeBlockPruning(b, hessian_bounds));
  }
};

// QuantizeBlock with the vectorised searches. `rows` is the block's Hessian (null when there is
// none); `hessian_all_zero` its IsAllZeroHessian, computed once per column block by the caller.
NVFP4_SIMD BlockOutcome QuantizeBlock(const float* w, const CandidateScales& scales,
                                      float global_amax, float global_scale,
                                      const HessianRows* rows, bool hessian_all_zero,
                                      BlockMethod method, int neighbours,
                                      const HessianBlockBounds* hessian_bounds,
                                      const HessianBlockBounds* identity_bounds) {
  return QuantizeBlockWith(
      w, global_amax, global_scale, method, rows != nullptr, hessian_all_zero,
      VectorBlockObjectives{rows},
      VectorSearch{&scales, rows, neighbours, hessian_bounds, identity_bounds});
}

}  // namespace simd
}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_SRC_CPU_BLOCK_SEARCH_SIMD_H_
