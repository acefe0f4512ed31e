// A group's scale chosen by a team of lanes (not installed): the search of gptq_group.h and
// block_search.h with its candidates dealt out to kTeam lanes of a warp, and the orders in which
// the sequential searches keep their best candidate, so that the team's choice is exactly theirs.
//
//   const GptqGroupChoice choice = TeamChooseScale<16>(b, config, lane, [&](float q, float d) {
//     return CandidateObjective(b, q, d, h);
//   });
#ifndef NVFP4CAL_KERNELS_CUDA_TEAM_SCALE_SEARCH_CUH_
#define NVFP4CAL_KERNELS_CUDA_TEAM_SCALE_SEARCH_CUH_

#include <cuda_runtime.h>

#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/gptq_group.h"

namespace nvfp4cal::cuda_internal {

// A candidate of a team's search: its objective and its position in the sequential visiting
// order.
struct TeamCandidate {
  float objective;
  int index;
};

// The sweep's order (SweepScaleCandidates): the candidate the sequential loop keeps is the
// first one (index 0) when its objective is NaN, else the smallest non-NaN objective, the
// smaller index on ties. `x` better than `y` in that order:
__device__ inline bool SweepBetter(const TeamCandidate& x, const TeamCandidate& y) {
  const bool x_top = x.index == 0 && isnan(x.objective);
  const bool y_top = y.index == 0 && isnan(y.objective);
  if (x_top || y_top) return x_top;
  if (isnan(x.objective) || isnan(y.objective)) return !isnan(x.objective);
  return x.objective < y.objective || (x.objective == y.objective && x.index < y.index);
}

// DSS's order (VisitDssCandidates): the smallest objective, the earlier visit on ties; NaN never
// wins (it never improves on the start).
__device__ inline bool DssBetter(const TeamCandidate& x, const TeamCandidate& y) {
  if (isnan(x.objective) || isnan(y.objective)) return !isnan(x.objective);
  return x.objective < y.objective || (x.objective == y.objective && x.index < y.index);
}

// The best of the team's candidates (every lane returns it). kTeam lanes, aligned in the warp.
template <int kTeam, class Better>
__device__ TeamCandidate TeamBest(TeamCandidate c, const Better& better) {
  for (int offset = kTeam / 2; offset > 0; offset /= 2) {
    const TeamCandidate other{__shfl_xor_sync(0xffffffffu, c.objective, offset, kTeam),
                              __shfl_xor_sync(0xffffffffu, c.index, offset, kTeam)};
    if (better(other, c)) c = other;
  }
  return c;
}

// The smallest of the team's values, NaN ignored (NaN only when every lane's is).
template <int kTeam>
__device__ float TeamMinimum(float v) {
  for (int offset = kTeam / 2; offset > 0; offset /= 2) {
    v = fminf(v, __shfl_xor_sync(0xffffffffu, v, offset, kTeam));
  }
  return v;
}

// Prunes nothing: for objectives without a lower bound (gptq's exact cost).
struct NoPruning {
  static constexpr bool kPrunes = false;
  __device__ bool operator()(float, float, float) const { return false; }
};

// block_search.h's one-element test for the e^T H_j e objective: true when a (q, d_unit)
// candidate provably can neither beat nor tie an objective `bar` that an evaluated candidate
// reaches. Skipping such candidates leaves every choice as the full search makes it.
struct OneElementPruning {
  static constexpr bool kPrunes = true;
  BlockPruning pruning;
  __device__ bool operator()(float q, float d_unit, float bar) const {
    return CandidateCannotWin(pruning, q, d_unit, bar);
  }
};

// The sweep candidate dealt at position j (0 .. 125): positions 0 .. kTeam - 1 are the window
// [first, first + kTeam), the others the remaining candidates in ascending order.
template <int kTeam>
__device__ __forceinline__ int DealtSweepCandidate(int j, int first) {
  if (j < kTeam) return first + j;
  return j - kTeam < first ? j - kTeam : j;
}

// The window of the first pass: kTeam candidates starting kTeam / 2 below `centre`, inside the
// 126 candidates.
template <int kTeam>
__device__ __forceinline__ int SweepWindowStart(int centre) {
  const int first = centre - kTeam / 2;
  return first < 0 ? 0
                   : (first > kNumScaleCandidates - kTeam ? kNumScaleCandidates - kTeam : first);
}

// A group's scale chosen by a team of lanes: the candidates are dealt out to the lanes, and the
// team's best in the sequential order is exactly the choice of GptqChooseGroupScale (whose
// pruning never changes it). The first pass evaluates one candidate per lane, the window from
// `first` on (SweepWindowStart around the `max` method's candidate, where the optimum usually
// lies, or 0); with a pruning test the team's smallest objective of that pass then bars the
// other candidates, and each lane skips those that cannot beat it nor its own best so far.
// Pruned candidates are never the choice nor tie with it, so the result is the full search's.
template <int kTeam, class Objective, class CannotWin = NoPruning>
__device__ GptqGroupChoice TeamChooseScale(const ScaledBlock& b, const GptqGroupConfig& config,
                                           int lane, const Objective& objective, int first = 0,
                                           const CannotWin& cannot_win = CannotWin{}) {
  const float infinity = __int_as_float(0x7f800000);
  // Loses to every evaluated candidate but a NaN one of index > 0, which never wins the team's
  // choice: candidate 0 is evaluated (NaN there is the choice) unless a bar prunes it, and a bar
  // exists only when an evaluated candidate has a number.
  TeamCandidate best{infinity, kNumScaleCandidates};
  float bar = infinity;
  for (int j = lane; j < kNumScaleCandidates; j += kTeam) {
    const int k = DealtSweepCandidate<kTeam>(j, first);
    const float f = ScaleCandidateValue(k);
    const float q = MulNoContract(f, b.global_scale);
    const float d_unit = MulNoContract(f, b.global_scale_unit);
    if (j < kTeam || !cannot_win(q, d_unit, fminf(bar, best.objective))) {
      const TeamCandidate c{objective(q, d_unit), k};
      if (SweepBetter(c, best)) best = c;
    }
    // Every lane is in its first pass here (kTeam <= 126 candidates).
    if (CannotWin::kPrunes && j < kTeam) bar = TeamMinimum<kTeam>(best.objective);
  }
  const TeamCandidate sweep = TeamBest<kTeam>(best, SweepBetter);
  if (!config.dss) {
    return GptqGroupChoice{sweep.index,
                           MulNoContract(ScaleCandidateValue(sweep.index), b.global_scale), 0, 0};
  }
  const DssGrid& grid = config.grid;
  const int k_begin = DssFirstNeighbour(sweep.index, grid.neighbours);
  const int k_end = DssLastNeighbour(sweep.index, grid.neighbours);
  const int betas = 2 * grid.beta_steps + 1;
  const int visits = (k_end - k_begin + 1) * betas;
  TeamCandidate dss{__int_as_float(0x7fc00000), visits};  // NaN: loses to every number
  for (int v = lane; v < visits; v += kTeam) {
    const int k = k_begin + v / betas;
    const int i = v % betas - grid.beta_steps;
    const float f = ScaleCandidateValue(k);
    const float q = DssQuantScale(DssBeta(i, grid.beta_step), b.global_amax, f);
    const float d_unit = MulNoContract(f, b.global_scale_unit);
    // Only a strict improvement on the sweep's objective is chosen: the bar is that or better.
    if (cannot_win(q, d_unit, fminf(sweep.objective, dss.objective))) continue;
    const TeamCandidate c{objective(q, d_unit), v};
    if (DssBetter(c, dss)) dss = c;
  }
  dss = TeamBest<kTeam>(dss, DssBetter);
  if (!(dss.objective < sweep.objective)) {
    return GptqGroupChoice{sweep.index,
                           MulNoContract(ScaleCandidateValue(sweep.index), b.global_scale), 0, 0};
  }
  const int k = k_begin + dss.index / betas;
  const int i = dss.index % betas - grid.beta_steps;
  return GptqGroupChoice{
      k, DssQuantScale(DssBeta(i, grid.beta_step), b.global_amax, ScaleCandidateValue(k)),
      k - sweep.index, i};
}

}  // namespace nvfp4cal::cuda_internal

#endif  // NVFP4CAL_KERNELS_CUDA_TEAM_SCALE_SEARCH_CUH_
