// Event-driven scale searches: the choices of SweepScaleCandidates and DecoupledScaleSearch,
// bit for bit, at a fraction of the arithmetic. Written for the CUDA kernels (host and device).
//
// Why it works. Along the sweep (d_k ascending) each element's code magnitude only steps down,
// at most 7 times; along a DSS beta grid (q ascending, d fixed) likewise. Between two such
// "events" the code vector c is constant and, in error units with S = (H + H^T) / 2,
//   X(d) = e^T S e = C - 2 d B + d^2 A,   C = w^T S w, B = c^T S w, A = c^T S c,
// so every candidate costs O(1) given A and B, and an event costs one column of S.
// X is evaluated in double and differs from the canonical fp32 objective V (block_search.h)
// by at most a margin M that we bound rigorously:
//   |V - X| <= rho * (3.25e-6 |e|^2 + 2.5e-7 |w|^2 + 2e-10 (|w|^2 + d^2 |c|^2))
// (rho >= || |H| ||_2; 21 fp32 roundings in the canonical sums, the fp32 rounding of e itself,
// and the double arithmetic here, each with a factor of 2 or more of headroom). Every
// candidate whose lower end X - M exceeds the best upper end X + M found (or a canonical value
// already known) is strictly worse than some candidate and cannot be chosen. The few survivors
// are evaluated canonically, in the original visiting order with the original tie rule, so the
// choice is exactly the full search's. If more than kMaxSurvivors survive (an all-zero Hessian
// makes every candidate tie) the full canonical search runs instead.
//
// Code changes are located exactly: an estimate from the E2M1 thresholds, then the monotone
// predicate "magnitude index < L" evaluated with the same fp32 division the full search uses.
#ifndef NVFP4CAL_KERNELS_INTERNAL_EVENT_SEARCH_H_
#define NVFP4CAL_KERNELS_INTERNAL_EVENT_SEARCH_H_

#include "nvfp4cal/kernels/internal/block_search.h"

namespace nvfp4cal {

inline constexpr int kMaxSurvivors = 8;
inline constexpr double kCanonicalMargin = 3.25e-6;  // times rho * |e|^2
inline constexpr double kRoundingMargin = 2.5e-7;    // times rho * |w|^2
inline constexpr double kDoubleMargin = 2e-10;       // times rho * (|w|^2 + d^2 |c|^2)

// The symmetric part of a Hessian block in double and a bound on || |H| ||_2.
struct SymmetricHessian {
  double s[kBlockSize * kBlockSize];
  double abs_norm;  // max over rows and columns of sum |H_ab|
};

NVFP4_HD void MakeSymmetricHessian(const float* h, SymmetricHessian* out) {
  double norm = 0.0;
  for (int a = 0; a < kBlockSize; ++a) {
    double row = 0.0;
    double col = 0.0;
    for (int b = 0; b < kBlockSize; ++b) {
      const double hab = h[a * kBlockSize + b];
      const double hba = h[b * kBlockSize + a];
      out->s[a * kBlockSize + b] = 0.5 * (hab + hba);
      row += hab < 0 ? -hab : hab;
      col += hba < 0 ? -hba : hba;
    }
    norm = norm > row ? norm : row;
    norm = norm > col ? norm : col;
  }
  out->abs_norm = norm;
}

// S_ab, with a null S meaning the identity (the squared-error objective).
NVFP4_HD double SymmetricEntry(const SymmetricHessian* s, int a, int b) {
  return s != nullptr ? s->s[a * kBlockSize + b] : (a == b ? 1.0 : 0.0);
}

// Candidates that may still win, in visiting order, with their lower bounds.
struct Survivors {
  int count = 0;
  bool overflow = false;
  int index[kMaxSurvivors];
  double lower[kMaxSurvivors];

  NVFP4_HD void Offer(int candidate, double lower_bound, double bar) {
    if (lower_bound > bar) return;
    if (count == kMaxSurvivors) {
      int kept = 0;
      for (int s = 0; s < count; ++s) {
        if (lower[s] <= bar) {
          index[kept] = index[s];
          lower[kept] = lower[s];
          ++kept;
        }
      }
      count = kept;
      if (count == kMaxSurvivors) {
        overflow = true;
        return;
      }
    }
    index[count] = candidate;
    lower[count] = lower_bound;
    ++count;
  }
};

// The quadratic objective of the current code vector, updated event by event.
struct CodeQuadratic {
  double sc[kBlockSize];  // S c
  double a;               // c^T S c
  double b;               // c^T S w
  double p;               // c . w
  double q;               // c . c
};

// Per block: w in error units with S w and the constant terms.
struct BlockQuadratic {
  double sw[kBlockSize];  // S w
  double c;               // w^T S w
  double w2;              // |w|^2
  double rho;             // >= || |H| ||_2
};

NVFP4_HD void MakeBlockQuadratic(const ScaledBlock& b, const SymmetricHessian* s,
                                 BlockQuadratic* out) {
  out->c = 0.0;
  out->w2 = 0.0;
  for (int a = 0; a < kBlockSize; ++a) {
    double v = 0.0;
    for (int j = 0; j < kBlockSize; ++j) v += SymmetricEntry(s, a, j) * b.w_unit[j];
    out->sw[a] = v;
    out->c += b.w_unit[a] * v;
    out->w2 += static_cast<double>(b.w_unit[a]) * b.w_unit[a];
  }
  out->rho = s != nullptr ? s->abs_norm : 1.0;
}

NVFP4_HD void MakeCodeQuadratic(const float* c, const ScaledBlock& b, const SymmetricHessian* s,
                                const BlockQuadratic& bq, CodeQuadratic* out) {
  out->a = out->b = out->p = out->q = 0.0;
  for (int a = 0; a < kBlockSize; ++a) {
    double v = 0.0;
    for (int j = 0; j < kBlockSize; ++j) v += SymmetricEntry(s, a, j) * c[j];
    out->sc[a] = v;
    out->a += c[a] * v;
    out->b += c[a] * bq.sw[a];
    out->p += static_cast<double>(c[a]) * b.w_unit[a];
    out->q += static_cast<double>(c[a]) * c[a];
  }
}

// Element i's code value changes by delta. Arrays are read with static indices only (selects),
// so that on the GPU they stay in registers instead of local memory.
NVFP4_HD void ApplyCodeChange(int i, double delta, double new_value, double old_value,
                              const ScaledBlock& b, const SymmetricHessian* s,
                              const BlockQuadratic& bq, CodeQuadratic* cq) {
  double sc_i = 0.0;
  double sw_i = 0.0;
  float w_i = 0.0f;
  for (int j = 0; j < kBlockSize; ++j) {
    sc_i = j == i ? cq->sc[j] : sc_i;
    sw_i = j == i ? bq.sw[j] : sw_i;
    w_i = j == i ? b.w_unit[j] : w_i;
  }
  cq->a += delta * (2.0 * sc_i + delta * SymmetricEntry(s, i, i));
  cq->b += delta * sw_i;
  cq->p += delta * w_i;
  cq->q += new_value * new_value - old_value * old_value;
  for (int j = 0; j < kBlockSize; ++j) cq->sc[j] += delta * SymmetricEntry(s, j, i);
}

// Lower and upper ends of the canonical objective of codes cq dequantized with d_unit.
struct ObjectiveInterval {
  double lower;
  double upper;
};

NVFP4_HD ObjectiveInterval Interval(const BlockQuadratic& bq, const CodeQuadratic& cq,
                                    double d_unit) {
  const double x = bq.c - 2.0 * d_unit * cq.b + d_unit * d_unit * cq.a;
  double e2 = bq.w2 - 2.0 * d_unit * cq.p + d_unit * d_unit * cq.q;
  e2 = e2 > 0.0 ? e2 : 0.0;
  const double margin = bq.rho * (kCanonicalMargin * e2 + kRoundingMargin * bq.w2 +
                                  kDoubleMargin * (bq.w2 + d_unit * d_unit * cq.q));
  return ObjectiveInterval{x - margin, x + margin};
}

// Magnitude index of |w| / q, with the full search's fp32 division.
NVFP4_HD int MagnitudeLevel(float a, float q) { return E2M1MagnitudeIndex(a / q); }

// Quotient below which the magnitude index drops under `level` (an estimate only).
NVFP4_HD float LevelThreshold(int level) {
  return level <= 1
             ? 0.25f
             : (level == 2
                    ? 0.75f
                    : (level == 3
                           ? 1.25f
                           : (level == 4 ? 1.75f
                                         : (level == 5 ? 2.5f : (level == 6 ? 3.5f : 5.0f)))));
}

// Smallest index in (from, end) whose scale gives a magnitude index below `level`, else end.
// `scale(i)` is non-decreasing in i, so the predicate is monotone; `guess` only sets where the
// exact walk starts.
template <class Scale>
NVFP4_HD int NextLevelDrop(float a, int level, int from, int end, int guess, const Scale& scale) {
  int i = guess <= from ? from + 1 : (guess > end ? end : guess);
  while (i < end && MagnitudeLevel(a, scale(i)) >= level) ++i;
  while (i - 1 > from && MagnitudeLevel(a, scale(i - 1)) < level) --i;
  return i;
}

// The sweep's candidate scales: q = d_k = f_k * s2, errors with f_k * s2_unit.
struct SweepScales {
  float global_scale;
  NVFP4_HD float operator()(int k) const {
    return MulNoContract(ScaleCandidateValue(k), global_scale);
  }
  // First k whose d_k reaches a / threshold(level) (estimate).
  NVFP4_HD int Guess(float a, int level) const {
    const float f = (a / LevelThreshold(level)) / global_scale;
    return static_cast<int>(EncodeE4M3(f)) - 1;
  }
};

// One neighbour's DSS scales: q_i = DssQuantScale(beta_i), index i + n for i = -n..n.
struct DssScales {
  float global_amax;
  float candidate_value;
  float beta_step;
  int beta_steps;
  NVFP4_HD float operator()(int index) const {
    return DssQuantScale(DssBeta(index - beta_steps, beta_step), global_amax, candidate_value);
  }
  NVFP4_HD int Guess(float a, int level) const {
    const float base = global_amax * (candidate_value / kE4M3Max) / kE2M1Max;
    const float beta = (a / LevelThreshold(level)) / base;
    const float steps = (beta - 1.0f) / beta_step;
    if (!(steps < 1e6f)) return 1 << 20;
    if (!(steps > -1e6f)) return -1;
    return static_cast<int>(ceilf(steps)) + beta_steps;
  }
};

// Walks candidates 0..end-1 of one scale family (codes from scale(i)), calling
// visit(i, cq) once at the start of every run of constant codes, and visit_run(i) for every
// candidate (used by the sweep, whose d changes with i).
template <class Scale, class Visit>
NVFP4_HD void WalkCodeEvents(const ScaledBlock& b, const SymmetricHessian* s,
                             const BlockQuadratic& bq, const Scale& scale, int end,
                             CodeQuadratic* cq, const Visit& visit) {
  float magnitude[kBlockSize];
  int next[kBlockSize];
  float code[kBlockSize];
  const float q0 = scale(0);
  for (int i = 0; i < kBlockSize; ++i) {
    magnitude[i] = std::fabs(b.w[i]);
    const float y = b.w[i] / q0;
    const int level = E2M1MagnitudeIndex(std::fabs(y));
    next[i] = level > 0 ? NextLevelDrop(magnitude[i], level, 0, end,
                                        scale.Guess(magnitude[i], level), scale)
                        : end;
    code[i] = RoundToE2M1Value(y);
  }
  MakeCodeQuadratic(code, b, s, bq, cq);
  int current = 0;
  for (;;) {
    int event = 0;
    int at = next[0];
    for (int i = 1; i < kBlockSize; ++i) {
      event = next[i] < at ? i : event;
      at = next[i] < at ? next[i] : at;
    }
    if (current < at) visit(current, at, *cq);
    if (at >= end) break;
    // The event's element, read with static indices (registers, not local memory).
    float a = 0.0f;
    float w = 0.0f;
    float old_value = 0.0f;
    for (int i = 0; i < kBlockSize; ++i) {
      a = i == event ? magnitude[i] : a;
      w = i == event ? b.w[i] : w;
      old_value = i == event ? code[i] : old_value;
    }
    const float y = w / scale(at);
    const int new_level = E2M1MagnitudeIndex(std::fabs(y));
    const float new_value = RoundToE2M1Value(y);
    ApplyCodeChange(event, static_cast<double>(new_value) - old_value, new_value, old_value, b, s,
                    bq, cq);
    const int new_next =
        new_level > 0 ? NextLevelDrop(a, new_level, at, end, scale.Guess(a, new_level), scale)
                      : end;
    for (int i = 0; i < kBlockSize; ++i) {
      code[i] = i == event ? new_value : code[i];
      next[i] = i == event ? new_next : next[i];
    }
    current = at;
  }
}

// SweepScaleCandidates(b, h), same choice. `reference` is the canonical objective of one
// candidate (e.g. the `max` method's); sym is S of h (null with h for the squared error).
// Returns candidate -1 when too many candidates tie: the caller then runs the full sweep.
NVFP4_HD SweepChoice EventSweep(const ScaledBlock& b, const float* h, const SymmetricHessian* sym,
                                float reference) {
  BlockQuadratic bq;
  MakeBlockQuadratic(b, sym, &bq);
  CodeQuadratic cq;
  Survivors survivors;
  double bar = reference;
  const SweepScales scales{b.global_scale};
  WalkCodeEvents(b, sym, bq, scales, kNumScaleCandidates, &cq,
                 [&](int first, int last, const CodeQuadratic& state) {
                   for (int k = first; k < last; ++k) {
                     const double d_unit =
                         MulNoContract(ScaleCandidateValue(k), b.global_scale_unit);
                     const ObjectiveInterval x = Interval(bq, state, d_unit);
                     bar = x.upper < bar ? x.upper : bar;
                     survivors.Offer(k, x.lower, bar);
                   }
                 });
  SweepChoice best{-1, 0.0f};
  if (survivors.overflow) return best;
  for (int s = 0; s < survivors.count; ++s) {
    if (survivors.lower[s] > bar) continue;
    const int k = survivors.index[s];
    const float f = ScaleCandidateValue(k);
    const float objective = CandidateObjective(b, MulNoContract(f, b.global_scale),
                                               MulNoContract(f, b.global_scale_unit), h);
    if (best.candidate < 0 || objective < best.objective) best = SweepChoice{k, objective};
  }
  return best;
}

// DecoupledScaleSearch(b, h, start, grid), same choice; `ok` is false when too many
// candidates tie (the caller then runs the full search).
NVFP4_HD DssChoice EventDss(const ScaledBlock& b, const float* h, const SymmetricHessian* sym,
                            SweepChoice start, DssGrid grid, bool* ok) {
  BlockQuadratic bq;
  MakeBlockQuadratic(b, sym, &bq);
  DssChoice best{start.candidate, 0,
                 MulNoContract(ScaleCandidateValue(start.candidate), b.global_scale),
                 start.objective};
  const int k_begin = DssFirstNeighbour(start.candidate, grid.neighbours);
  const int k_end = DssLastNeighbour(start.candidate, grid.neighbours);
  const int betas = 2 * grid.beta_steps + 1;
  Survivors survivors;
  double bar = start.objective;
  CodeQuadratic cq;
  for (int k = k_begin; k <= k_end; ++k) {
    const float f = ScaleCandidateValue(k);
    const double d_unit = MulNoContract(f, b.global_scale_unit);
    const DssScales scales{b.global_amax, f, grid.beta_step, grid.beta_steps};
    // Codes are constant over a run and d is fixed: the run's first beta stands for it (later
    // ones tie with it and lose).
    WalkCodeEvents(b, sym, bq, scales, betas, &cq, [&](int first, int, const CodeQuadratic& state) {
      const ObjectiveInterval x = Interval(bq, state, d_unit);
      bar = x.upper < bar ? x.upper : bar;
      survivors.Offer((k - k_begin) * betas + first, x.lower, bar);
    });
  }
  *ok = !survivors.overflow;
  if (survivors.overflow) return best;
  for (int s = 0; s < survivors.count; ++s) {
    if (survivors.lower[s] > bar) continue;
    const int k = k_begin + survivors.index[s] / betas;
    const int i = survivors.index[s] % betas - grid.beta_steps;
    const float f = ScaleCandidateValue(k);
    const float q = DssQuantScale(DssBeta(i, grid.beta_step), b.global_amax, f);
    const float objective = CandidateObjective(b, q, MulNoContract(f, b.global_scale_unit), h);
    if (objective < best.objective) best = DssChoice{k, i, q, objective};
  }
  return best;
}

// The event-driven searches for QuantizeBlockWith, falling back to the full searches when too
// many candidates tie.
struct EventSearch {
  const float* h;
  const SymmetricHessian* sym;  // S of h, null when h is
  DssGrid grid;
  NVFP4_HD SweepChoice Sweep(const ScaledBlock& b, bool squared, float reference) const {
    const float* search_h = squared ? nullptr : h;
    const SweepChoice sweep = EventSweep(b, search_h, squared ? nullptr : sym, reference);
    return sweep.candidate >= 0 ? sweep : SweepScaleCandidates(b, search_h);
  }
  NVFP4_HD DssChoice Dss(const ScaledBlock& b, SweepChoice start) const {
    bool ok = true;
    const DssChoice dss = EventDss(b, h, sym, start, grid, &ok);
    return ok ? dss : DecoupledScaleSearch(b, h, start, grid);
  }
};

// QuantizeBlock with the event-driven searches (same outcome). sym is S of h, or null when h
// is null.
NVFP4_HD BlockOutcome QuantizeBlockEvents(const float* w, float global_amax, float global_scale,
                                          const float* h, const SymmetricHessian* sym,
                                          BlockMethod method, DssGrid grid) {
  return QuantizeBlockWith(w, global_amax, global_scale, method, h != nullptr,
                           h != nullptr && IsAllZeroHessian(h), GenericBlockObjectives{h},
                           EventSearch{h, sym, grid});
}

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_INTERNAL_EVENT_SEARCH_H_
