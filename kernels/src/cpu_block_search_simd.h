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

#include "nvfp4cal/kernels/block_search.h"

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
  const Vec4 p4 = __builtin_shufflevector(p8, p8, 0, 1, 2, 3) +
                  __builtin_shufflevector(p8, p8, 4, 5, 6, 7);
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
  for (int j = 1; j < kBlockSize; ++j) t = t + e[j] * h->row[j];
  return TreeSum(e * t);
}

// Per-tensor candidate scales: they depend only on g, so they are computed once per tensor
// instead of once per block.
struct CandidateScales {
  float d[kNumScaleCandidates];       // d_k = f_k * s2 (codes of the sweeps use q = d_k)
  float d_unit[kNumScaleCandidates];  // f_k * s2 * 2^-E (errors)
  int beta_steps = 0;
  std::vector<float> dss_q;           // [126][2n + 1]: q(k, i) = DssQuantScale(beta_i, g, f_k)

  CandidateScales(float global_amax, float global_scale, DssGrid grid)
      : beta_steps(grid.beta_steps) {
    const float global_scale_unit =
        global_scale * ErrorUnitInverse(ErrorUnitExponent(global_scale));
    const int betas = 2 * grid.beta_steps + 1;
    dss_q.resize(static_cast<size_t>(kNumScaleCandidates * betas));
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
                               int d_stride, int count, const HessianRows* h, float* objective) {
  int c = 0;
  for (; c + 1 < count; c += 2) {
    const Vec16 e0 = w_unit - RoundToE2M1Value(w / q[c]) * d_unit[c * d_stride];
    const Vec16 e1 = w_unit - RoundToE2M1Value(w / q[c + 1]) * d_unit[(c + 1) * d_stride];
    if (h == nullptr) {
      objective[c] = TreeSum(e0 * e0);
      objective[c + 1] = TreeSum(e1 * e1);
      continue;
    }
    Vec16 t0 = e0[0] * h->row[0];
    Vec16 t1 = e1[0] * h->row[0];
    for (int j = 1; j < kBlockSize; ++j) {
      t0 = t0 + e0[j] * h->row[j];
      t1 = t1 + e1[j] * h->row[j];
    }
    objective[c] = TreeSum(e0 * t0);
    objective[c + 1] = TreeSum(e1 * t1);
  }
  if (c < count) {
    objective[c] = Objective(w_unit - RoundToE2M1Value(w / q[c]) * d_unit[c * d_stride], h);
  }
}

// SweepScaleCandidates, vectorised.
NVFP4_SIMD SweepChoice SweepScaleCandidates(const ScaledBlock& b, const CandidateScales& scales,
                                        const HessianRows* h) {
  float objective[kNumScaleCandidates];
  EvaluateCandidates(Load(b.w), Load(b.w_unit), scales.d, scales.d_unit, 1, kNumScaleCandidates,
                     h, objective);
  SweepChoice best{0, objective[0]};
  for (int k = 1; k < kNumScaleCandidates; ++k) {
    if (objective[k] < best.objective) best = SweepChoice{k, objective[k]};
  }
  return best;
}

// DecoupledScaleSearch, vectorised: the same visiting order (k ascending, then beta ascending)
// and strict improvement.
NVFP4_SIMD DssChoice DecoupledScaleSearch(const ScaledBlock& b, const CandidateScales& scales,
                                      const HessianRows* h, SweepChoice start, int neighbours) {
  const Vec16 w = Load(b.w);
  const Vec16 w_unit = Load(b.w_unit);
  DssChoice best{start.candidate, 0, scales.d[start.candidate], start.objective};
  const int k_begin = start.candidate - neighbours < 0 ? 0 : start.candidate - neighbours;
  const int k_end = start.candidate + neighbours > kNumScaleCandidates - 1
                        ? kNumScaleCandidates - 1
                        : start.candidate + neighbours;
  const int betas = 2 * scales.beta_steps + 1;
  constexpr int kChunk = 64;
  float objective[kChunk];
  for (int k = k_begin; k <= k_end; ++k) {
    const float* q = scales.dss_q.data() + k * betas;
    for (int first = 0; first < betas; first += kChunk) {
      const int count = betas - first < kChunk ? betas - first : kChunk;
      EvaluateCandidates(w, w_unit, q + first, &scales.d_unit[k], 0, count, h, objective);
      for (int c = 0; c < count; ++c) {
        if (objective[c] < best.objective) {
          best = DssChoice{k, first + c - scales.beta_steps, q[first + c], objective[c]};
        }
      }
    }
  }
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

// QuantizeBlock with the vectorised searches. `rows` is the block's Hessian (null when there is
// none); `hessian_all_zero` its IsAllZeroHessian, computed once per column block by the caller.
NVFP4_SIMD BlockOutcome QuantizeBlock(const float* w, const CandidateScales& scales,
                                      float global_amax, float global_scale,
                                      const HessianRows* rows, bool hessian_all_zero,
                                      BlockMethod method, int neighbours) {
  BlockOutcome out{};
  ScaledBlock b{};
  const VectorBlockObjectives objectives{rows};
  out.hessian_all_zero = hessian_all_zero;
  if (!BeginBlock(w, global_amax, global_scale, method, objectives, &out, &b)) return out;
  int candidate = out.max_scale_byte - 1;
  float q = DecodeE4M3(out.max_scale_byte) * global_scale;
  if (method != BlockMethod::kMax) {
    const SweepChoice sweep =
        SweepScaleCandidates(b, scales, method == BlockMethod::kMse ? nullptr : rows);
    candidate = sweep.candidate;
    q = scales.d[candidate];
    if (method == BlockMethod::kDss) {
      const DssChoice dss = DecoupledScaleSearch(b, scales, rows, sweep, neighbours);
      out.dss_offset = static_cast<int8_t>(dss.candidate - sweep.candidate);
      out.dss_beta_index = static_cast<int16_t>(dss.beta_index);
      candidate = dss.candidate;
      q = dss.q;
    }
  }
  FinishBlock(b, objectives, candidate, q, &out);
  return out;
}

}  // namespace simd
}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_SRC_CPU_BLOCK_SEARCH_SIMD_H_
