// The pruned search's tile-wide machinery (CudaSearchAlgorithm::kPruned, the default; not
// installed): the tile's shared memory, the queue that spreads candidate evaluations over the
// tile's threads, and the screens that rule candidates out with exact lower bounds.
//
// One thread per row still owns its block, but candidates are no longer evaluated by the thread
// that owns them. Each thread first screens all its candidates with the exact lower bound of
// block_search.h (CandidateCannotWin: one element's error, ~30 instructions instead of ~680);
// the survivors of all 128 rows of the tile go into a shared-memory queue, and every thread of
// the tile then evaluates queue entries with the canonical objective, whoever owns them. So a
// warp never idles on a row that needs fewer evaluations than its neighbours (the reason
// per-thread pruning lost), and the choice stays exactly the full search's: every candidate
// that could win or tie is evaluated canonically, and the per-row minimum is taken over
// (objective, visiting index) keys, i.e. the first minimal candidate in visiting order.
// A non-finite objective (possible only with extreme Hessian entries) sends that row to the
// sequential search, whose tie and NaN semantics are the CPU reference's.
//
//   uint32_t mask[kSweepWords] = {};  // this thread's surviving candidates
//   ScreenSweep(sh, pruning, shared_reciprocal, threshold, reference_k, mask);
//   EvaluateSurvivors(mask, sh, &evaluated, [&](int row, uint32_t k) { return objective; });
//   // sh.best[row]: the row's smallest (objective, index) key
#ifndef NVFP4CAL_KERNELS_CUDA_PRUNED_TILE_SEARCH_CUH_
#define NVFP4CAL_KERNELS_CUDA_PRUNED_TILE_SEARCH_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "block_primitives.cuh"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"
#include "scale_search_kernels.h"

namespace nvfp4cal::cuda_internal {

constexpr int kQueueCapacity = 4096;  // queue entries per round (more survivors: more rounds)
constexpr int kStagePitch = 20;       // floats per staged row (16 + padding: no bank conflicts)

// One sweep candidate k as the pruned kernel's loops read it (one 16-byte load).
struct alignas(16) SweepScale {
  float q;             // q_k = f_k * s2
  float q_reciprocal;  // SharedReciprocal(q_k)
  float d_unit;        // f_k * s2 in error units
  float r_square;      // UnsaturatedErrorBound(q_k, d_k)^2
};

// The tile's shared memory for the search: H_j with its bounds and screen, the sweep's
// candidates, the rows' staged blocks, the queue and the per-row minimum keys.
struct PrunedTileShared {
  float h[kBlockSize * kBlockSize];
  HessianBlockBounds bounds;
  HessianBlockScreen screen;  // valid = 0: no second screen (squared error, or S unsuitable)
  SweepScale sweep[kNumScaleCandidates];
  alignas(16) float w[kRowsPerTile * kStagePitch];  // read as float4
  alignas(16) float w_unit[kRowsPerTile * kStagePitch];
  unsigned long long best[kRowsPerTile];
  uint32_t queue[kQueueCapacity];
  int warp_total[kRowsPerTile / 32];
  int non_finite[kRowsPerTile];
  double scratch[kRowsPerTile];
  uint32_t refined[kRowsPerTile][4];    // ScreenSurvivors' result per row
  float square_sum_unit[kRowsPerTile];  // the rows' BlockPruning sums, for the second screen
  float amax_unit[kRowsPerTile];
  alignas(16) float screen_w[kRowsPerTile][2 * kScreenElements];  // w_M, then w_M in units
};

// Calls visit(begin, end) on every thread for its run of the tile's queue entries [begin, end),
// in rounds of at most kQueueCapacity entries; returns the number of entries. `mask` holds this
// thread's survivors (bit j of word j / 32 = visiting index j); a queue entry is
// (row << 16) | index.
template <int kWords, class Visit>
__device__ int ForEachSurvivor(const uint32_t (&mask)[kWords], PrunedTileShared& sh,
                               const Visit& visit) {
  int count = 0;
#pragma unroll
  for (int w = 0; w < kWords; ++w) count += __popc(mask[w]);
  int total = 0;
  const int first = BlockExclusiveScan<kRowsPerTile>(count, sh.warp_total, &total);
  for (int base = 0; base < total; base += kQueueCapacity) {
    // Write this thread's entries whose queue position falls into the round.
    int position = first;
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      uint32_t bits = mask[w];
      while (bits != 0 && position < base + kQueueCapacity) {
        const int bit = __ffs(bits) - 1;
        bits &= bits - 1;
        if (position >= base) {
          sh.queue[position - base] =
              (static_cast<uint32_t>(threadIdx.x) << 16) | static_cast<uint32_t>(w * 32 + bit);
        }
        ++position;
      }
    }
    __syncthreads();
    // Each thread takes a contiguous run of entries: the lanes of a warp then work on different
    // rows (no contention on one row's data), and a run mostly stays within one row.
    const int entries = min(kQueueCapacity, total - base);
    const int per_thread = (entries + kRowsPerTile - 1) / kRowsPerTile;
    const int begin = min(entries, static_cast<int>(threadIdx.x) * per_thread);
    visit(begin, min(entries, begin + per_thread));
    __syncthreads();
  }
  return total;
}

// Evaluates every surviving candidate of the tile with the canonical objective and keeps, per
// row, the smallest (objective, index) key in sh.best. `mask` holds this thread's survivors
// (bit j of word j / 32 = visiting index j); `evaluate(row, index)` returns the objective.
template <int kWords, class Evaluate>
__device__ void EvaluateSurvivors(const uint32_t (&mask)[kWords], PrunedTileShared& sh,
                                  int64_t* evaluated, const Evaluate& evaluate) {
  *evaluated += ForEachSurvivor(mask, sh, [&](int begin, int end) {
    // A thread publishes its running minimum once per row instead of once per entry.
    int current_row = -1;
    unsigned long long current_min = ~0ull;
    for (int e = begin; e < end; ++e) {
      const uint32_t entry = sh.queue[e];
      const int row = static_cast<int>(entry >> 16);
      const uint32_t index = entry & 0xFFFFu;
      const float objective = evaluate(row, index);
      if (objective != objective) sh.non_finite[row] = 1;
      if (row != current_row) {
        if (current_row >= 0) atomicMin(&sh.best[current_row], current_min);
        current_row = row;
        current_min = ~0ull;
      }
      const unsigned long long key = CandidateKey(objective, index + 1);
      current_min = key < current_min ? key : current_min;
    }
    if (current_row >= 0) atomicMin(&sh.best[current_row], current_min);
  });
}

// Second screen of the survivors, spread over the tile like the evaluations (run per thread,
// a warp would execute the union of its rows' survivors): `keep(row, index)` is false when the
// candidate provably cannot win. On return `mask` holds this thread's remaining survivors.
template <int kWords, class Keep>
__device__ void ScreenSurvivors(uint32_t (&mask)[kWords], PrunedTileShared& sh, const Keep& keep) {
#pragma unroll
  for (int w = 0; w < kWords; ++w) sh.refined[threadIdx.x][w] = 0u;
  ForEachSurvivor(mask, sh, [&](int begin, int end) {
    for (int e = begin; e < end; ++e) {
      const uint32_t entry = sh.queue[e];
      const int row = static_cast<int>(entry >> 16);
      const uint32_t index = entry & 0xFFFFu;
      if (keep(row, index)) atomicOr(&sh.refined[row][index >> 5], 1u << (index & 31u));
    }
  });
#pragma unroll
  for (int w = 0; w < kWords; ++w) mask[w] = sh.refined[threadIdx.x][w];
}

// CandidateObjective, bit for bit, with the quotients from a shared reciprocal when `shared`
// (the row's dividends and q passed the guards).
__device__ __forceinline__ float QueuedCandidateObjective(const ScaledBlock& b, float q,
                                                          float d_unit, const float* h,
                                                          bool shared) {
  float e[kBlockSize];
  if (shared) {
    const float y = SharedReciprocal(q);
#pragma unroll
    for (int i = 0; i < kBlockSize; ++i) {
      const float quotient = QuotientWithReciprocal(b.w[i], q, y);
      e[i] = ElementError(b.w_unit[i], RoundToE2M1ValueNotNaN(quotient), d_unit);
    }
  } else {
    BlockErrorForScales(b, q, d_unit, e);
  }
  return BlockObjective(h, e);
}

// The second screen (HessianBlockScreen): candidates that survive the one-element bound are
// tested with the Schur complement onto the block's kScreenElements most precise channels.
// ScreenRow holds the row's weights of those channels.
struct ScreenRow {
  float w[kScreenElements];
  float w_unit[kScreenElements];
};

// `quotient(w)` returns w / q as the canonical evaluation rounds it.
template <class Quotient>
__device__ __forceinline__ bool ScreenCannotWin(const HessianBlockScreen& screen,
                                                const ScreenRow& row, float square_sum_unit,
                                                float amax_unit, float abs_norm,
                                                const Quotient& quotient, float r_square,
                                                float d_unit, float threshold) {
  if (!(threshold < 3.0e38f)) return false;
  float e[kScreenElements];
#pragma unroll
  for (int j = 0; j < kScreenElements; ++j) {
    e[j] = ElementError(row.w_unit[j], RoundToE2M1ValueNotNaN(quotient(row.w[j])), d_unit);
  }
  // The factor in registers (nine 16-byte loads).
  float factor[kScreenFactorSize + 4];
  const float4* packed = reinterpret_cast<const float4*>(screen.factor);
#pragma unroll
  for (int i = 0; i < (kScreenFactorSize + 4) / 4; ++i) {
    const float4 v = packed[i];
    factor[4 * i] = v.x;
    factor[4 * i + 1] = v.y;
    factor[4 * i + 2] = v.z;
    factor[4 * i + 3] = v.w;
  }
  // z = L_MM^T e_M; |z|^2 and |e_M|^2 in fp32 (rounding covered by the 2^-20 factors).
  float zz = 0.0f;
  float ee = 0.0f;
#pragma unroll
  for (int j = 0; j < kScreenElements; ++j) {
    float z = MulNoContract(factor[j * (j + 1) / 2 + j], e[j]);
#pragma unroll
    for (int i = j + 1; i < kScreenElements; ++i) {
      z = FusedMulAdd(factor[i * (i + 1) / 2 + j], e[i], z);
    }
    zz = FusedMulAdd(z, z, zz);
    ee = FusedMulAdd(e[j], e[j], ee);
  }
  const float schur = MulNoContract(zz, (255.0f / 256.0f) * (1.0f - 0x1p-20f)) -
                      MulNoContract(screen.kappa_squared, ee) * (1.0f + 0x1p-20f);
  // The allowance knows e_M; the other elements are bounded (UnsaturatedErrorBound).
  const float allowance = CanonicalRoundingAllowance(
      abs_norm, amax_unit, square_sum_unit, ee,
      UnknownSquareBound(kBlockSize - kScreenElements, r_square), d_unit);
  return BoundExceedsThreshold(schur, allowance, threshold);
}

// The staged block of another row of the tile, as QuantizeBlock prepared it.
__device__ inline void LoadStagedBlock(const PrunedTileShared& sh, int row, float global_amax,
                                       float global_scale, float global_scale_unit,
                                       ScaledBlock* b) {
  const float4* w = reinterpret_cast<const float4*>(sh.w + row * kStagePitch);
  const float4* u = reinterpret_cast<const float4*>(sh.w_unit + row * kStagePitch);
  for (int i = 0; i < kBlockSize / 4; ++i) {
    const float4 a = w[i];
    const float4 c = u[i];
    b->w[4 * i] = a.x;
    b->w[4 * i + 1] = a.y;
    b->w[4 * i + 2] = a.z;
    b->w[4 * i + 3] = a.w;
    b->w_unit[4 * i] = c.x;
    b->w_unit[4 * i + 1] = c.y;
    b->w_unit[4 * i + 2] = c.z;
    b->w_unit[4 * i + 3] = c.w;
  }
  b->global_amax = global_amax;
  b->global_scale = global_scale;
  b->global_scale_unit = global_scale_unit;
}

// The owner of a row gathers its screen weights once (phase 1); queue threads read them.
__device__ __forceinline__ void StageScreenRow(PrunedTileShared& sh, int row) {
  const float* w = sh.w + row * kStagePitch;
  const float* u = sh.w_unit + row * kStagePitch;
#pragma unroll
  for (int j = 0; j < kScreenElements; ++j) {
    sh.screen_w[row][j] = w[sh.screen.element[j]];
    sh.screen_w[row][kScreenElements + j] = u[sh.screen.element[j]];
  }
}
__device__ __forceinline__ ScreenRow LoadScreenRow(const PrunedTileShared& sh, int row) {
  ScreenRow r;
  const float4* v = reinterpret_cast<const float4*>(sh.screen_w[row]);
#pragma unroll
  for (int i = 0; i < kScreenElements / 4; ++i) {
    const float4 a = v[i];
    const float4 c = v[kScreenElements / 4 + i];
    r.w[4 * i] = a.x;
    r.w[4 * i + 1] = a.y;
    r.w[4 * i + 2] = a.z;
    r.w[4 * i + 3] = a.w;
    r.w_unit[4 * i] = c.x;
    r.w_unit[4 * i + 1] = c.y;
    r.w_unit[4 * i + 2] = c.z;
    r.w_unit[4 * i + 3] = c.w;
  }
  return r;
}

constexpr int kSweepWords = (kNumScaleCandidates + 31) / 32;
constexpr int kDssWords = 4;  // DSS grids of up to 128 candidates use the queue (default: 63)
static_assert(kSweepWords <= 4 && kDssWords <= 4, "PrunedTileShared::refined holds 4 words");

// Phase 1's one-element screen of the sweep against `threshold` (the `max` method's objective):
// CandidateCannotWinGivenQuotient per candidate, with its per-block checks hoisted and r^2 from
// the tile's table; bit k of `mask` is set for the candidates that may still win.
//
// Candidates go in descending k, and the loop stops early: once the pruning element m is
// saturated (quotient above 5: code 6 here and at every smaller k, q being smaller) with
// |w_m| >= 6.01 d (so |e_m| = |w_m| - 6 d, growing as d shrinks) and the candidate is pruned,
// every smaller k is pruned too. The bound less the allowance is e_m^2 (precision_m - c) -
// c (15 r^2 + sum w^2), c = kObjectiveRoundingSlack * abs_norm (margins aside), which grows as d
// shrinks wherever precision_m exceeds c with room for the margins and r = d (1 + 2^-20) grows
// with d (q = d in error units exactly when every q_k is a normal number). Most of the 126
// candidates lie there, below the `max` method's scale. (Stopping on the largest |w| as well,
// which saturates first, was slower: its bound rarely prunes early enough to pay for itself.)
__device__ __forceinline__ void ScreenSweep(const PrunedTileShared& sh, const BlockPruning& pruning,
                                            bool shared_reciprocal, float threshold,
                                            int reference_k, uint32_t (&mask)[kSweepWords]) {
  const bool prunable = BlockPruningApplies(pruning, threshold);
  const float abs_norm = sh.bounds.abs_norm;
  const bool normal_scales = sh.sweep[0].q >= 0x1p-126f;
  const float monotone_precision = 2.0f * kObjectiveRoundingSlack * abs_norm;
  // q_k grows with k: the ends decide whether every q_k takes the shared reciprocal.
  const bool all_shared = shared_reciprocal && SharedReciprocalDivisor(sh.sweep[0].q) &&
                          SharedReciprocalDivisor(sh.sweep[kNumScaleCandidates - 1].q);
  const bool can_stop = prunable && normal_scales && pruning.precision > monotone_precision;
  bool stop = false;
#pragma unroll
  for (int w = kSweepWords - 1; w >= 0; --w) {
    for (int bit = 31; bit >= 0 && !stop; --bit) {
      const int k = w * 32 + bit;
      if (k >= kNumScaleCandidates || k == reference_k) continue;
      if (!prunable) {
        mask[w] |= 1u << bit;
        continue;
      }
      const SweepScale c = sh.sweep[k];
      const bool shared = all_shared || (shared_reciprocal && SharedReciprocalDivisor(c.q));
      const float unknown_square = UnknownSquareBound(kBlockSize - 1, c.r_square);
      const float quotient = Quotient(pruning.w, c.q, c.q_reciprocal, shared);
      if (!ElementCannotWin(pruning, abs_norm, pruning.w_unit, pruning.precision,
                            RoundToE2M1ValueNotNaN(quotient), c.d_unit, unknown_square,
                            threshold)) {
        mask[w] |= 1u << bit;
      } else if (can_stop && fabsf(quotient) > 5.0f &&
                 fabsf(pruning.w_unit) >= MulNoContract(6.01f, c.d_unit)) {
        stop = true;
      }
    }
  }
}

// What a row keeps between the phases of the pruned kernel (in shared memory, so that no
// thread carries its block in registers across the tile-wide evaluation phases).
struct RowState {
  float mse_before;
  float hessian_before;
  float sweep_objective;
  int16_t sweep_candidate;
  int16_t dss_k_begin;
  uint8_t max_scale_byte;
  uint8_t scale_byte;  // BeginBlock's: final for an all-zero tensor
  uint8_t searching;
  uint8_t shared_reciprocal;  // every weight passes SharedReciprocalDividend
};

// The tile's shared data (about 55 KiB: above the 48 KiB of static shared memory, so dynamic;
// four tiles still fit an SM).
struct PrunedKernelShared {
  PrunedTileShared tile;
  RowState rows[kRowsPerTile];
};

}  // namespace nvfp4cal::cuda_internal

#endif  // NVFP4CAL_KERNELS_CUDA_PRUNED_TILE_SEARCH_CUH_
