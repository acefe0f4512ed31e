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

// A group's scale chosen by a team of lanes: the candidates are dealt out to the lanes, every
// one evaluated with the canonical objective, and the team's best in the sequential order is
// exactly the choice of GptqChooseGroupScale (whose pruning never changes it).
template <int kTeam, class Objective>
__device__ GptqGroupChoice TeamChooseScale(const ScaledBlock& b, const GptqGroupConfig& config,
                                           int lane, const Objective& objective) {
  TeamCandidate best{0.0f, -1};
  for (int k = lane; k < kNumScaleCandidates; k += kTeam) {
    const float f = ScaleCandidateValue(k);
    const TeamCandidate c{
        objective(MulNoContract(f, b.global_scale), MulNoContract(f, b.global_scale_unit)), k};
    if (best.index < 0 || SweepBetter(c, best)) best = c;
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
    const TeamCandidate c{objective(q, MulNoContract(f, b.global_scale_unit)), v};
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
