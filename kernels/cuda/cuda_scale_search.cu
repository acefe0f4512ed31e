// CUDA backend: the block searches of block_search.h, one thread per block of 16 weights.
//
// Work is cut into tiles of kRowsPerTile rows x one 16-column block of one tensor slice. The
// tile's CUDA block loads its Hessian block H_j into shared memory once (every row of a column
// block shares it; reads are warp-wide broadcasts), each thread runs QuantizeBlock for its row,
// and the block reduces its statistics in a fixed order, so results are deterministic.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "absl/strings/str_format.h"
#include "cuda_status.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/event_search.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"
#include "nvfp4cal/kernels/validation.h"

namespace nvfp4cal {
namespace {

constexpr int kRowsPerTile = 128;
constexpr int64_t kAlignment = 256;

// One tensor row range as the kernel sees it (device pointers).
struct DeviceSlice {
  const void* weights;                 // rows x cols, row-major
  const float* hessians;               // [cols / 16, 16, 16] or null
  const HessianBlockBounds* bounds;    // per Hessian block (pruned search), null with hessians
  const HessianBlockBounds* identity;  // bounds of the squared-error objective
  const HessianBlockScreen* screens;   // per Hessian block (pruned search), null with hessians
  const float* dss_scales;  // [126][2n + 1]: DssQuantScale of every (candidate, beta), or null
  uint8_t* codes;           // rows x cols / 2
  uint8_t* scales;          // rows x cols / 16
  int64_t rows;
  int64_t cols;
  float global_amax;
  float global_scale;
  int dtype;
  int method;
  DssGrid grid;
};

struct Tile {
  int32_t slice;
  int32_t col_block;
  int64_t row0;
};

// Statistics of one tile in error units (the slice's ObjectiveUnit converts them on the host).
struct TileStats {
  double mse_before;
  double mse_after;
  double hessian_before;
  double hessian_after;
  int32_t blocks;
  int32_t scale_changed;
  int32_t beta_not_one;
  int32_t offset_not_zero;
  int32_t zero_hessian;
  int32_t padding;
  int64_t evaluations;  // canonical evaluations by the pruned search's queues
};

// Fixed-order tree sum over the CUDA block (kRowsPerTile threads); result valid in thread 0.
__device__ double BlockSum(double value, double* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kRowsPerTile / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const double sum = scratch[0];
  __syncthreads();
  return sum;
}

// The tile's statistics, summed in a fixed order (thread 0 writes them).
__device__ void WriteTileStats(bool active, const BlockOutcome& out, double* scratch,
                               TileStats* tile_stats, int64_t evaluations = 0) {
  const double mse_before = BlockSum(active ? out.mse_before : 0.0, scratch);
  const double mse_after = BlockSum(active ? out.mse_after : 0.0, scratch);
  const double hessian_before = BlockSum(active ? out.hessian_before : 0.0, scratch);
  const double hessian_after = BlockSum(active ? out.hessian_after : 0.0, scratch);
  const int blocks = __syncthreads_count(active);
  const int changed = __syncthreads_count(active && out.scale_byte != out.max_scale_byte);
  const int beta = __syncthreads_count(active && out.dss_beta_index != 0);
  const int offset = __syncthreads_count(active && out.dss_offset != 0);
  const int zero = __syncthreads_count(active && out.hessian_all_zero);
  if (threadIdx.x == 0) {
    tile_stats[blockIdx.x] = TileStats{mse_before, mse_after, hessian_before, hessian_after,
                                       blocks,     changed,   beta,           offset,
                                       zero,       0,         evaluations};
  }
}

// Copies the tile's 16x16 Hessian block into shared memory (every thread of the tile takes part).
__device__ void LoadTileHessian(const DeviceSlice& s, const Tile& tile, float* h) {
  const float* hj = s.hessians + static_cast<int64_t>(tile.col_block) * kBlockSize * kBlockSize;
  for (int i = threadIdx.x; i < kBlockSize * kBlockSize; i += kRowsPerTile) h[i] = hj[i];
}

// Loads the tile's Hessian block (and what the chosen search needs of it) into shared memory.
struct TileHessian {
  float h[kBlockSize * kBlockSize];
  SymmetricHessian sym;  // event search
  double row_sum[kBlockSize];
  double col_sum[kBlockSize];
};

template <bool kEventSearch>
__global__ void __launch_bounds__(kRowsPerTile)
    QuantizeTilesKernel(const DeviceSlice* slices, const Tile* tiles, TileStats* tile_stats) {
  __shared__ TileHessian th;
  __shared__ double scratch[kRowsPerTile];
  const Tile tile = tiles[blockIdx.x];
  const DeviceSlice s = slices[tile.slice];
  const bool has_hessian = s.hessians != nullptr;
  if (has_hessian) LoadTileHessian(s, tile, th.h);
  __syncthreads();
  if (has_hessian && kEventSearch) {
    for (int i = threadIdx.x; i < kBlockSize * kBlockSize; i += kRowsPerTile) {
      const int a = i / kBlockSize;
      const int b = i % kBlockSize;
      th.sym.s[i] = 0.5 * (static_cast<double>(th.h[i]) + th.h[b * kBlockSize + a]);
    }
    if (threadIdx.x < 2 * kBlockSize) {
      const int line = threadIdx.x % kBlockSize;
      double sum = 0.0;
      for (int j = 0; j < kBlockSize; ++j) {
        sum += fabs(static_cast<double>(threadIdx.x < kBlockSize ? th.h[line * kBlockSize + j]
                                                                 : th.h[j * kBlockSize + line]));
      }
      (threadIdx.x < kBlockSize ? th.row_sum : th.col_sum)[line] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double norm = 0.0;
      for (int j = 0; j < kBlockSize; ++j) norm = fmax(norm, fmax(th.row_sum[j], th.col_sum[j]));
      th.sym.abs_norm = norm;
    }
  }
  __syncthreads();

  const int64_t row = tile.row0 + threadIdx.x;
  const bool active = row < s.rows;
  BlockOutcome out{};
  if (active) {
    float w[kBlockSize];
    LoadAsFloat(s.weights, static_cast<DType>(s.dtype), row * s.cols + tile.col_block * kBlockSize,
                kBlockSize, w);
    const float* h = has_hessian ? th.h : nullptr;
    if (kEventSearch) {
      out =
          QuantizeBlockEvents(w, s.global_amax, s.global_scale, h, has_hessian ? &th.sym : nullptr,
                              static_cast<BlockMethod>(s.method), s.grid);
    } else {
      // No lower-bound pruning here: threads of a warp prune different candidates, so the warp
      // would still evaluate the union, and the bound itself costs a division per candidate
      // (measured slower on an H200; see docs/performance.md). The CPU path prunes.
      out = QuantizeBlock(w, s.global_amax, s.global_scale, h, static_cast<BlockMethod>(s.method),
                          s.grid);
    }
    const int64_t block = row * (s.cols / kBlockSize) + tile.col_block;
    s.scales[block] = out.scale_byte;
    uint2 packed;
    memcpy(&packed, out.packed, sizeof(packed));
    reinterpret_cast<uint2*>(s.codes)[block] = packed;
  }
  WriteTileStats(active, out, scratch, tile_stats);
}

// ---------------------------------------------------------------------------------------------
// Pruned search with a per-tile work queue (CudaSearchAlgorithm::kPruned, the default).
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
// ---------------------------------------------------------------------------------------------

constexpr int kQueueCapacity = 4096;  // queue entries per round (more survivors: more rounds)
constexpr int kStagePitch = 20;       // floats per staged row (16 + padding: no bank conflicts)

// Orders floats as unsigned integers (-0 and +0 taken as equal, NaN above +Inf).
__device__ uint32_t OrderedFloatBits(float x) {
  const uint32_t u = FloatBits(AddNoContract(x, 0.0f));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ float FloatFromOrderedBits(uint32_t u) {
  return BitsToFloat((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
}
__device__ unsigned long long CandidateKey(float objective, uint32_t index) {
  return (static_cast<unsigned long long>(OrderedFloatBits(objective)) << 32) | index;
}

// One sweep candidate k as the pruned kernel's loops read it (one 16-byte load).
struct alignas(16) SweepScale {
  float q;             // q_k = f_k * s2
  float q_reciprocal;  // SharedReciprocal(q_k)
  float d_unit;        // f_k * s2 in error units
  float r_square;      // UnsaturatedErrorBound(q_k, d_k)^2
};

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

// Exclusive prefix sum of `count` over the CUDA block; *total receives the sum.
__device__ int BlockExclusiveScan(int count, PrunedTileShared& sh, int* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int inclusive = count;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int v = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += v;
  }
  if (lane == 31) sh.warp_total[warp] = inclusive;
  __syncthreads();
  int before = 0;
  int sum = 0;
  for (int w = 0; w < kRowsPerTile / 32; ++w) {
    before += w < warp ? sh.warp_total[w] : 0;
    sum += sh.warp_total[w];
  }
  __syncthreads();
  *total = sum;
  return before + inclusive - count;
}

// Evaluates every surviving candidate of the tile with the canonical objective and keeps, per
// row, the smallest (objective, index) key in sh.best. `mask` holds this thread's survivors
// (bit j of word j / 32 = visiting index j); `evaluate(row, index)` returns the objective.
template <int kWords, class Visit>
__device__ int ForEachSurvivor(const uint32_t (&mask)[kWords], PrunedTileShared& sh,
                               const Visit& visit) {
  int count = 0;
#pragma unroll
  for (int w = 0; w < kWords; ++w) count += __popc(mask[w]);
  int total = 0;
  const int first = BlockExclusiveScan(count, sh, &total);
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

// Quotients w / q with one reciprocal per divisor. The compiler expands every IEEE division into
// MUFU.RCP, one Newton step for the reciprocal, the quotient, its residual and a correction
// (guarded by FCHK, with a slow path for operands where that could fail). The sixteen quotients
// of a candidate share the divisor, so the reciprocal part is done once and each quotient costs
// three FMAs, exactly the compiler's; the guard is a range check instead of FCHK: divisors in
// [2^-60, 2^60] and dividends zero or in [2^-60, 2^60] (checked once per row) keep every
// intermediate value normal. Anything else takes the IEEE division. The agreement tests compare
// the results with the CPU's divisions on hard cases, boundary quotients included.
constexpr float kSharedReciprocalMin = 0x1p-60f;
constexpr float kSharedReciprocalMax = 0x1p60f;

__device__ __forceinline__ bool SharedReciprocalDivisor(float q) {
  return q >= kSharedReciprocalMin && q <= kSharedReciprocalMax;
}
__device__ __forceinline__ bool SharedReciprocalDividend(float w) {
  const float a = fabsf(w);
  return a == 0.0f || (a >= kSharedReciprocalMin && a <= kSharedReciprocalMax);
}

// 1 / q refined once (the division's own first steps).
__device__ __forceinline__ float SharedReciprocal(float q) {
  float y0;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y0) : "f"(q));
  return __fmaf_rn(y0, __fmaf_rn(-q, y0, 1.0f), y0);
}

// w / q rounded to nearest even, given y = SharedReciprocal(q) (both guarded as above).
__device__ __forceinline__ float QuotientWithReciprocal(float w, float q, float y) {
  const float q0 = __fmaf_rn(w, y, 0.0f);
  const float r = __fmaf_rn(-q, q0, w);
  return __fmaf_rn(y, r, q0);
}

// w / q as the IEEE division rounds it: from the reciprocal y when `shared` (guards passed).
__device__ __forceinline__ float Quotient(float w, float q, float y, bool shared) {
  return shared ? QuotientWithReciprocal(w, q, y) : w / q;
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
__device__ void LoadStagedBlock(const PrunedTileShared& sh, int row, float global_amax,
                                float global_scale, float global_scale_unit, ScaledBlock* b) {
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

__global__ void __launch_bounds__(kRowsPerTile, 4)
    QuantizeTilesPrunedKernel(const DeviceSlice* slices, const Tile* tiles, TileStats* tile_stats) {
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  PrunedKernelShared& shared = *reinterpret_cast<PrunedKernelShared*>(dynamic_shared);
  PrunedTileShared& sh = shared.tile;
  RowState* rows = shared.rows;
  const Tile tile = tiles[blockIdx.x];
  const DeviceSlice s = slices[tile.slice];
  const bool has_hessian = s.hessians != nullptr;
  const BlockMethod method = static_cast<BlockMethod>(s.method);
  const bool squared = method == BlockMethod::kMse || !has_hessian;
  const float global_amax = s.global_amax;
  const float global_scale = s.global_scale;
  if (has_hessian) LoadTileHessian(s, tile, sh.h);
  if (threadIdx.x == 0) {
    sh.bounds = squared ? *s.identity : s.bounds[tile.col_block];
    if (squared || s.screens == nullptr) {
      sh.screen.valid = 0;
    } else {
      sh.screen = s.screens[tile.col_block];
    }
  }
  const float unit_inverse = ErrorUnitInverse(ErrorUnitExponent(global_scale));
  const float global_scale_unit = MulNoContract(global_scale, unit_inverse);
  if (threadIdx.x < kNumScaleCandidates) {
    const float f = ScaleCandidateValue(static_cast<int>(threadIdx.x));
    const float q = MulNoContract(f, global_scale);
    const float d_unit = MulNoContract(f, global_scale_unit);
    sh.sweep[threadIdx.x] = SweepScale{q, SharedReciprocal(q), d_unit,
                                       UnsaturatedErrorBoundSquare(q, unit_inverse, d_unit)};
  }
  sh.non_finite[threadIdx.x] = 0;
  __syncthreads();

  const int64_t row = tile.row0 + threadIdx.x;
  const bool active = row < s.rows;
  const float* h = has_hessian ? sh.h : nullptr;
  const float* search_h = squared ? nullptr : h;
  const bool all_zero_hessian = has_hessian && IsAllZeroHessian(sh.h);
  RowState& state = rows[threadIdx.x];

  // Phase 1: the `max` method's result and "before" statistics; screen the sweep.
  uint32_t sweep_mask[kSweepWords] = {};
  {
    BlockOutcome out{};
    ScaledBlock b{};
    bool searching = false;
    if (active) {
      float w[kBlockSize];
      LoadAsFloat(s.weights, static_cast<DType>(s.dtype),
                  row * s.cols + tile.col_block * kBlockSize, kBlockSize, w);
      searching =
          BeginBlock(w, global_amax, global_scale, method, GenericBlockObjectives{h}, &out, &b) &&
          method != BlockMethod::kMax;
    }
    float* staged_w = sh.w + threadIdx.x * kStagePitch;
    float* staged_u = sh.w_unit + threadIdx.x * kStagePitch;
    bool shared_reciprocal = true;
    for (int i = 0; i < kBlockSize; ++i) {
      staged_w[i] = b.w[i];
      staged_u[i] = b.w_unit[i];
      shared_reciprocal = shared_reciprocal && SharedReciprocalDividend(b.w[i]);
    }
    const float reference = squared ? out.mse_before : out.hessian_before;
    const int reference_k = out.max_scale_byte - 1;
    state = RowState{out.mse_before,
                     out.hessian_before,
                     reference,
                     static_cast<int16_t>(reference_k),
                     0,
                     out.max_scale_byte,
                     out.scale_byte,
                     static_cast<uint8_t>(searching),
                     static_cast<uint8_t>(shared_reciprocal)};
    if (searching) {
      const BlockPruning pruning = MakeBlockPruning(b, &sh.bounds);
      sh.square_sum_unit[threadIdx.x] = pruning.square_sum_unit;
      sh.amax_unit[threadIdx.x] = pruning.amax_unit;
      if (sh.screen.valid) StageScreenRow(sh, static_cast<int>(threadIdx.x));
      ScreenSweep(sh, pruning, shared_reciprocal, reference, reference_k, sweep_mask);
    }
    sh.best[threadIdx.x] = CandidateKey(reference, static_cast<uint32_t>(reference_k + 1));
  }
  __syncthreads();

  // The second screen (tile-uniform condition: every thread takes part in the queue).
  const bool screen = !squared && sh.screen.valid != 0;
  // Rows or scales outside the shared reciprocal's range are simply not screened (kept).
  // y = SharedReciprocal(q), r_square = UnsaturatedErrorBound(q, d_unit)^2.
  auto screen_keeps = [&](int r, float q, float y, float d_unit, float r_square, float threshold) {
    if (!(rows[r].shared_reciprocal && SharedReciprocalDivisor(q))) return true;
    auto quotient = [&](float v) { return QuotientWithReciprocal(v, q, y); };
    return !ScreenCannotWin(sh.screen, LoadScreenRow(sh, r), sh.square_sum_unit[r], sh.amax_unit[r],
                            sh.bounds.abs_norm, quotient, r_square, d_unit, threshold);
  };
  if (screen) {
    ScreenSurvivors(sweep_mask, sh, [&](int r, uint32_t k) {
      const SweepScale c = sh.sweep[k];
      return screen_keeps(r, c.q, c.q_reciprocal, c.d_unit, c.r_square, rows[r].sweep_objective);
    });
  }

  // Phase 2: the tile's surviving sweep candidates, evaluated canonically by every thread.
  int64_t evaluated = 0;
  EvaluateSurvivors(sweep_mask, sh, &evaluated, [&](int r, uint32_t k) {
    ScaledBlock other;
    LoadStagedBlock(sh, r, global_amax, global_scale, global_scale_unit, &other);
    const SweepScale c = sh.sweep[k];
    return QueuedCandidateObjective(other, c.q, c.d_unit, search_h,
                                    rows[r].shared_reciprocal && SharedReciprocalDivisor(c.q));
  });

  // Phase 3: the sweep's choice; screen DSS around it.
  const DssGrid grid = s.grid;
  const int betas = 2 * grid.beta_steps + 1;
  const bool dss_queued = (2 * grid.neighbours + 1) * betas <= kDssWords * 32;
  uint32_t dss_mask[kDssWords] = {};
  if (state.searching) {
    const unsigned long long key = sh.best[threadIdx.x];
    SweepChoice sweep{static_cast<int>(key & 0xFFFFFFFFu) - 1,
                      FloatFromOrderedBits(static_cast<uint32_t>(key >> 32))};
    ScaledBlock b;
    LoadStagedBlock(sh, static_cast<int>(threadIdx.x), global_amax, global_scale, global_scale_unit,
                    &b);
    const BlockPruning pruning = MakeBlockPruning(b, &sh.bounds);
    const float reference = state.sweep_objective;
    if (sh.non_finite[threadIdx.x] || reference != reference) {
      // NaN objectives: the sequential search, with the CPU reference's semantics.
      sweep = SweepScaleCandidates(b, search_h, pruning, reference);
    }
    state.sweep_candidate = static_cast<int16_t>(sweep.candidate);
    state.sweep_objective = sweep.objective;
    if (method == BlockMethod::kDss && dss_queued) {
      const int k_begin = DssFirstNeighbour(sweep.candidate, grid.neighbours);
      const int k_end = DssLastNeighbour(sweep.candidate, grid.neighbours);
      state.dss_k_begin = static_cast<int16_t>(k_begin);
      // Word by word (a constant index after unrolling: the mask stays in registers).
      const int count = (k_end - k_begin + 1) * betas;
      const bool prunable = BlockPruningApplies(pruning, sweep.objective);
      const float abs_norm = sh.bounds.abs_norm;
      const bool row_shared = state.shared_reciprocal;
      const float* dss_scales = s.dss_scales;
#pragma unroll
      for (int w = 0; w < kDssWords; ++w) {
        uint32_t bits = 0;
        int k = k_begin + (w * 32) / betas;
        int beta = (w * 32) % betas;
        for (int bit = 0; bit < 32 && w * 32 + bit < count; ++bit) {
          // The sweep's own (q, d) again (beta = 1 where DssQuantScale rounds like f_k s2)
          // has the sweep's objective, which no candidate replaces without a strict gain.
          const float dq = __ldg(dss_scales + k * betas + beta);
          bool keep = !(k == sweep.candidate && dq == sh.sweep[k].q);
          // CandidateCannotWinGivenQuotient, its per-block checks hoisted (prunable: the
          // threshold is finite, so are the weights, and the quotient is not NaN).
          if (keep && prunable) {
            const float d_unit = sh.sweep[k].d_unit;
            const bool shared = row_shared && SharedReciprocalDivisor(dq);
            const float quotient =
                Quotient(pruning.w, dq, shared ? SharedReciprocal(dq) : 0.0f, shared);
            const float r_square = UnsaturatedErrorBoundSquare(dq, unit_inverse, d_unit);
            keep = !ElementCannotWin(pruning, abs_norm, pruning.w_unit, pruning.precision,
                                     RoundToE2M1ValueNotNaN(quotient), d_unit,
                                     UnknownSquareBound(kBlockSize - 1, r_square), sweep.objective);
          }
          bits |= keep ? 1u << bit : 0u;
          if (++beta == betas) {
            beta = 0;
            ++k;
          }
        }
        dss_mask[w] = bits;
      }
    }
  }
  if (method == BlockMethod::kDss) {
    __syncthreads();  // every thread has read its sweep result from sh.best
    sh.best[threadIdx.x] = CandidateKey(state.sweep_objective, 0);
    sh.non_finite[threadIdx.x] = 0;
    __syncthreads();
    // Row r's DSS candidate j: its stored-scale index k and quantization scale q.
    auto dss_candidate = [&](int r, uint32_t j, int* k) {
      *k = rows[r].dss_k_begin + static_cast<int>(j) / betas;
      return s.dss_scales[*k * betas + static_cast<int>(j) % betas];
    };
    if (dss_queued && screen) {
      ScreenSurvivors(dss_mask, sh, [&](int r, uint32_t j) {
        int k = 0;
        const float q = dss_candidate(r, j, &k);
        const float d_unit = sh.sweep[k].d_unit;
        return screen_keeps(r, q, SharedReciprocal(q), d_unit,
                            UnsaturatedErrorBoundSquare(q, unit_inverse, d_unit),
                            rows[r].sweep_objective);
      });
    }
    if (dss_queued) {
      EvaluateSurvivors(dss_mask, sh, &evaluated, [&](int r, uint32_t j) {
        ScaledBlock other;
        LoadStagedBlock(sh, r, global_amax, global_scale, global_scale_unit, &other);
        int k = 0;
        const float q = dss_candidate(r, j, &k);
        // dss always has Hessians: sh.h directly, not the nullable h (whose select made the
        // compiler address H element by element).
        return QueuedCandidateObjective(other, q, sh.sweep[k].d_unit, sh.h,
                                        rows[r].shared_reciprocal && SharedReciprocalDivisor(q));
      });
    }
  }

  // Phase 4: the choice, codes, packing and "after" statistics.
  BlockOutcome out{};
  out.hessian_all_zero = all_zero_hessian;
  out.max_scale_byte = state.max_scale_byte;
  out.scale_byte = state.scale_byte;
  out.mse_before = state.mse_before;
  out.hessian_before = state.hessian_before;
  // An all-zero tensor (g = 0) keeps BeginBlock's outcome: its scale byte and zero codes.
  if (active && global_amax != 0.0f) {
    ScaledBlock b;
    LoadStagedBlock(sh, static_cast<int>(threadIdx.x), global_amax, global_scale, global_scale_unit,
                    &b);
    int candidate = state.sweep_candidate;
    float q = MulNoContract(ScaleCandidateValue(candidate), global_scale);
    if (state.searching && method == BlockMethod::kDss) {
      const SweepChoice sweep{candidate, state.sweep_objective};
      DssChoice dss{candidate, 0, q, sweep.objective};
      const unsigned long long key = sh.best[threadIdx.x];
      const int index = static_cast<int>(key & 0xFFFFFFFFu) - 1;
      if (!dss_queued || sh.non_finite[threadIdx.x] || sweep.objective != sweep.objective) {
        dss = DecoupledScaleSearch(b, h, sweep, grid, MakeBlockPruning(b, &sh.bounds));
      } else if (index >= 0) {
        const int k = state.dss_k_begin + index / betas;
        dss = DssChoice{k, index % betas - grid.beta_steps, s.dss_scales[k * betas + index % betas],
                        FloatFromOrderedBits(static_cast<uint32_t>(key >> 32))};
      }
      out.dss_offset = static_cast<int8_t>(dss.candidate - sweep.candidate);
      out.dss_beta_index = static_cast<int16_t>(dss.beta_index);
      candidate = dss.candidate;
      q = dss.q;
    }
    FinishBlock(b, GenericBlockObjectives{h}, candidate, q, &out);
  }
  if (active) {
    const int64_t block = row * (s.cols / kBlockSize) + tile.col_block;
    s.scales[block] = out.scale_byte;
    uint2 packed;
    memcpy(&packed, out.packed, sizeof(packed));
    reinterpret_cast<uint2*>(s.codes)[block] = packed;
  } else {
    out = BlockOutcome{};
  }
  WriteTileStats(active, out, sh.scratch, tile_stats, evaluated);
}

int64_t AlignUp(int64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

// A piece of a slice that goes to the device in one launch.
struct Piece {
  int slice;          // index into the caller's slices
  int64_t row_begin;  // tensor rows
  int64_t row_end;
};

int64_t PieceBytes(const CudaScaleSearch::Slice& s, int64_t rows) {
  const WeightView& w = s.request->weights;
  const int64_t tiles = (rows + kRowsPerTile - 1) / kRowsPerTile * (w.cols / kBlockSize);
  return AlignUp(rows * w.cols * DTypeSize(w.dtype)) + AlignUp(rows * w.cols / 2) +
         AlignUp(rows * w.cols / kBlockSize) +
         AlignUp(tiles * static_cast<int64_t>(sizeof(Tile) + sizeof(TileStats)));
}

int64_t HessianBytes(const CudaScaleSearch::Slice& s) {
  return s.request->hessians.data == nullptr
             ? 0
             : AlignUp(s.request->hessians.num_blocks * kBlockSize * kBlockSize *
                       static_cast<int64_t>(sizeof(float)));
}

// The DSS scales of every (candidate, beta) of a dss slice, for the pruned kernel.
int64_t DssScalesBytes(const CudaScaleSearch::Slice& s) {
  if (s.request->params.method != Method::kDss) return 0;
  return AlignUp(kNumScaleCandidates * (2 * DssBetaSteps(s.request->params) + 1) *
                 static_cast<int64_t>(sizeof(float)));
}

std::vector<float> DssScalesTable(const CudaScaleSearch::Slice& s) {
  const int n = DssBetaSteps(s.request->params);
  std::vector<float> table;
  table.reserve(static_cast<size_t>(kNumScaleCandidates * (2 * n + 1)));
  for (int k = 0; k < kNumScaleCandidates; ++k) {
    for (int i = -n; i <= n; ++i) {
      table.push_back(DssQuantScale(DssBeta(i, s.request->params.beta_step), s.global_amax,
                                    ScaleCandidateValue(k)));
    }
  }
  return table;
}

// The pruning bounds and screens that go with a slice's Hessian blocks (screens after bounds).
int64_t BoundsPartBytes(const CudaScaleSearch::Slice& s) {
  return AlignUp(s.request->hessians.num_blocks * static_cast<int64_t>(sizeof(HessianBlockBounds)));
}
int64_t BoundsBytes(const CudaScaleSearch::Slice& s) {
  return s.request->hessians.data == nullptr
             ? 0
             : BoundsPartBytes(s) + AlignUp(s.request->hessians.num_blocks *
                                            static_cast<int64_t>(sizeof(HessianBlockScreen)));
}

class CudaScaleSearchImpl final : public CudaScaleSearch {
 public:
  static absl::StatusOr<std::unique_ptr<CudaScaleSearch>> Create(
      const CudaScaleSearchOptions& options) {
    std::string reason;
    if (!CudaDeviceAvailable(&reason)) return absl::UnavailableError(reason);
    int count = 0;
    NVFP4_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
    if (options.device < 0 || options.device >= count) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "device = %d is out of range: %d CUDA device(s) present", options.device, count));
    }
    if (options.memory_budget_bytes < (int64_t{16} << 20)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "memory_budget_bytes = %d is below the minimum of 16 MiB", options.memory_budget_bytes));
    }
    auto impl = std::unique_ptr<CudaScaleSearchImpl>(new CudaScaleSearchImpl(options));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
    cudaDeviceProp prop;
    NVFP4_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, options.device));
    impl->description_ = absl::StrFormat("%s (sm_%d%d, %d SMs, %.1f GiB)", prop.name, prop.major,
                                         prop.minor, prop.multiProcessorCount,
                                         static_cast<double>(prop.totalGlobalMem) / (1 << 30));
    if (options.stream == nullptr) {
      NVFP4_CUDA_RETURN_IF_ERROR(
          cudaStreamCreateWithFlags(&impl->owned_stream_, cudaStreamNonBlocking));
      impl->stream_ = impl->owned_stream_;
    }
    NVFP4_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(QuantizeTilesPrunedKernel,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(sizeof(PrunedKernelShared))));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->start_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->stop_));
    return std::unique_ptr<CudaScaleSearch>(std::move(impl));
  }

  ~CudaScaleSearchImpl() override {
    cudaSetDevice(options_.device);
    if (workspace_ != nullptr) cudaFree(workspace_);
    if (start_ != nullptr) cudaEventDestroy(start_);
    if (stop_ != nullptr) cudaEventDestroy(stop_);
    if (owned_stream_ != nullptr) cudaStreamDestroy(owned_stream_);
  }

  std::string_view BackendName() const override { return "cuda"; }
  std::string DeviceDescription() const override { return description_; }
  CudaCallTiming LastCallTiming() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return timing_;
  }

  absl::StatusOr<QuantizedTensor> Quantize(const QuantizeRequest& request) override {
    absl::StatusOr<QuantizedTensor> result = PrepareQuantizedTensor(request);
    if (!result.ok()) return result.status();
    const Slice slice{
        &request,
        result->global_amax,
        0,
        result->rows,
        RowRangeOutput{absl::MakeSpan(result->packed_codes), absl::MakeSpan(result->scales)},
        &result->stats};
    if (absl::Status s = QuantizeBatch(absl::MakeConstSpan(&slice, 1)); !s.ok()) return s;
    return result;
  }

  absl::Status QuantizeRows(const QuantizeRequest& request, float global_amax, int64_t row_begin,
                            int64_t row_end, RowRangeOutput output, TensorStats* stats) override {
    const Slice slice{&request, global_amax, row_begin, row_end, output, stats};
    return QuantizeBatch(absl::MakeConstSpan(&slice, 1));
  }

  absl::Status QuantizeBatch(absl::Span<const Slice> slices) override {
    for (const Slice& s : slices) {
      if (absl::Status st = ValidateSlice(s); !st.ok()) return st;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    timing_ = CudaCallTiming{};
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    for (const Slice& s : slices) InitTensorStats(s.request->params, s.global_amax, s.stats);
    // Greedy packing of slice row ranges into launches that fit the memory budget.
    std::vector<Piece> launch;
    int64_t launch_bytes = 0;
    for (int i = 0; i < static_cast<int>(slices.size()); ++i) {
      const Slice& s = slices[static_cast<size_t>(i)];
      const int64_t fixed = HessianBytes(s) + BoundsBytes(s) + DssScalesBytes(s) +
                            AlignUp(sizeof(DeviceSlice) * (launch.size() + 1)) +
                            AlignUp(sizeof(HessianBlockBounds));
      const int64_t per_row = PieceBytes(s, kRowsPerTile) / kRowsPerTile + 1;
      int64_t row = s.row_begin;
      while (row < s.row_end) {
        int64_t room = (options_.memory_budget_bytes - launch_bytes - fixed) / per_row;
        if (room < kRowsPerTile && !launch.empty()) {
          if (absl::Status st = RunLaunch(slices, launch); !st.ok()) return st;
          launch.clear();
          launch_bytes = 0;
          continue;
        }
        room = std::max<int64_t>(room / kRowsPerTile * kRowsPerTile, kRowsPerTile);
        const int64_t end = std::min(s.row_end, row + room);
        launch.push_back(Piece{i, row, end});
        launch_bytes += PieceBytes(s, end - row) + fixed;
        row = end;
      }
    }
    if (!launch.empty()) return RunLaunch(slices, launch);
    return absl::OkStatus();
  }

 private:
  explicit CudaScaleSearchImpl(const CudaScaleSearchOptions& options)
      : options_(options), stream_(options.stream) {}

  static absl::Status ValidateSlice(const Slice& s) {
    if (s.request == nullptr || s.stats == nullptr) {
      return absl::InvalidArgumentError("slice: request and stats must not be null");
    }
    // Prevalidated slices: only the checks that protect memory (range and output sizes).
    if (s.prevalidated)
      return ValidateRowRange(s.request->weights, s.row_begin, s.row_end, s.output);
    return ValidateRowRangeRequest(*s.request, s.global_amax, s.row_begin, s.row_end, s.output);
  }

  absl::Status EnsureWorkspace(int64_t bytes) {
    if (bytes <= workspace_bytes_) return absl::OkStatus();
    if (workspace_ != nullptr) {
      cudaFree(workspace_);
      workspace_ = nullptr;
      workspace_bytes_ = 0;
    }
    void* p = nullptr;
    const cudaError_t error = cudaMalloc(&p, static_cast<size_t>(bytes));
    if (error != cudaSuccess) {
      (void)cudaGetLastError();
      return absl::ResourceExhaustedError(absl::StrFormat(
          "CUDA device %d: cannot allocate a %d-byte workspace (%s); lower the memory budget or "
          "free device memory",
          options_.device, bytes, cudaGetErrorString(error)));
    }
    workspace_ = static_cast<char*>(p);
    workspace_bytes_ = bytes;
    return absl::OkStatus();
  }

  // Copies the pieces' inputs, launches one kernel over all their tiles, copies results back
  // and adds the statistics to each slice.
  absl::Status RunLaunch(absl::Span<const Slice> slices, const std::vector<Piece>& pieces) {
    // Layout: per piece weights, codes, scales; Hessians deduplicated by host pointer; then the
    // slice table, the tile list and the tile statistics.
    int64_t offset = 0;
    auto take = [&offset](int64_t bytes) {
      const int64_t at = offset;
      offset += AlignUp(bytes);
      return at;
    };
    std::vector<DeviceSlice> device_slices(pieces.size());
    std::vector<int64_t> weight_at(pieces.size()), code_at(pieces.size()), scale_at(pieces.size());
    std::vector<int64_t> dss_at(pieces.size(), -1);
    std::map<const float*, int64_t> hessian_at;
    std::map<const float*, int64_t> bounds_at;
    std::vector<Tile> tiles;
    std::vector<std::pair<size_t, size_t>> tile_ranges(pieces.size());
    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const WeightView& w = s.request->weights;
      const int64_t rows = pieces[p].row_end - pieces[p].row_begin;
      weight_at[p] = take(rows * w.cols * DTypeSize(w.dtype));
      code_at[p] = take(rows * w.cols / 2);
      scale_at[p] = take(rows * w.cols / kBlockSize);
      if (options_.search == CudaSearchAlgorithm::kPruned && DssScalesBytes(s) > 0) {
        dss_at[p] = take(DssScalesBytes(s));
      }
      const float* h = s.request->hessians.data;
      if (h != nullptr && hessian_at.count(h) == 0) {
        hessian_at[h] = take(HessianBytes(s));
        bounds_at[h] = take(BoundsBytes(s));
      }
      tile_ranges[p].first = tiles.size();
      for (int64_t row0 = 0; row0 < rows; row0 += kRowsPerTile) {
        for (int32_t j = 0; j < static_cast<int32_t>(w.cols / kBlockSize); ++j) {
          tiles.push_back(Tile{static_cast<int32_t>(p), j, row0});
        }
      }
      tile_ranges[p].second = tiles.size();
    }
    const int64_t identity_at = take(static_cast<int64_t>(sizeof(HessianBlockBounds)));
    const int64_t slices_at = take(static_cast<int64_t>(sizeof(DeviceSlice) * pieces.size()));
    const int64_t tiles_at = take(static_cast<int64_t>(sizeof(Tile) * tiles.size()));
    const int64_t stats_at = take(static_cast<int64_t>(sizeof(TileStats) * tiles.size()));
    if (absl::Status st = EnsureWorkspace(offset); !st.ok()) return st;

    const auto copy_start = std::chrono::steady_clock::now();
    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const WeightView& w = s.request->weights;
      const int64_t rows = pieces[p].row_end - pieces[p].row_begin;
      const int64_t elem = DTypeSize(w.dtype);
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          workspace_ + weight_at[p],
          static_cast<const char*>(w.data) + pieces[p].row_begin * w.cols * elem,
          static_cast<size_t>(rows * w.cols * elem), cudaMemcpyHostToDevice, stream_));
      const float* h = s.request->hessians.data;
      device_slices[p] = DeviceSlice{
          workspace_ + weight_at[p],
          h == nullptr ? nullptr : reinterpret_cast<const float*>(workspace_ + hessian_at[h]),
          h == nullptr ? nullptr
                       : reinterpret_cast<const HessianBlockBounds*>(workspace_ + bounds_at[h]),
          reinterpret_cast<const HessianBlockBounds*>(workspace_ + identity_at),
          h == nullptr ? nullptr
                       : reinterpret_cast<const HessianBlockScreen*>(workspace_ + bounds_at[h] +
                                                                     BoundsPartBytes(s)),
          dss_at[p] < 0 ? nullptr : reinterpret_cast<const float*>(workspace_ + dss_at[p]),
          reinterpret_cast<uint8_t*>(workspace_ + code_at[p]),
          reinterpret_cast<uint8_t*>(workspace_ + scale_at[p]),
          rows,
          w.cols,
          s.global_amax,
          GlobalScaleFromAmax(s.global_amax),
          static_cast<int>(w.dtype),
          static_cast<int>(s.request->params.method),
          DssGrid{s.request->params.scale_neighbours, DssBetaSteps(s.request->params),
                  s.request->params.beta_step}};
    }
    // Bounds for the pruned search (host-computed, double-precision Cholesky per block); they
    // stay alive until the stream synchronisation below.
    std::vector<std::vector<HessianBlockBounds>> bounds_host;
    std::vector<std::vector<HessianBlockScreen>> screens_host;
    std::vector<std::vector<float>> dss_host;
    for (size_t p = 0; p < pieces.size(); ++p) {
      if (dss_at[p] < 0) continue;
      dss_host.push_back(DssScalesTable(slices[static_cast<size_t>(pieces[p].slice)]));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace_ + dss_at[p], dss_host.back().data(),
                                                 sizeof(float) * dss_host.back().size(),
                                                 cudaMemcpyHostToDevice, stream_));
    }
    const HessianBlockBounds identity = IdentityBounds();
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace_ + identity_at, &identity,
                                               sizeof(identity), cudaMemcpyHostToDevice, stream_));
    for (const auto& [host, at] : hessian_at) {
      const Slice* owner = nullptr;
      for (const Piece& piece : pieces) {
        if (slices[static_cast<size_t>(piece.slice)].request->hessians.data == host) {
          owner = &slices[static_cast<size_t>(piece.slice)];
          break;
        }
      }
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace_ + at, host,
                                                 static_cast<size_t>(HessianBytes(*owner)),
                                                 cudaMemcpyHostToDevice, stream_));
      if (options_.search == CudaSearchAlgorithm::kPruned) {
        bounds_host.push_back(ComputeHessianBlockBounds(owner->request->hessians));
        screens_host.push_back(
            ComputeHessianBlockScreens(owner->request->hessians, bounds_host.back()));
        NVFP4_CUDA_RETURN_IF_ERROR(
            cudaMemcpyAsync(workspace_ + bounds_at[host], bounds_host.back().data(),
                            sizeof(HessianBlockBounds) * bounds_host.back().size(),
                            cudaMemcpyHostToDevice, stream_));
        NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
            workspace_ + bounds_at[host] + BoundsPartBytes(*owner), screens_host.back().data(),
            sizeof(HessianBlockScreen) * screens_host.back().size(), cudaMemcpyHostToDevice,
            stream_));
      }
    }
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace_ + slices_at, device_slices.data(),
                                               sizeof(DeviceSlice) * device_slices.size(),
                                               cudaMemcpyHostToDevice, stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace_ + tiles_at, tiles.data(),
                                               sizeof(Tile) * tiles.size(), cudaMemcpyHostToDevice,
                                               stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    timing_.transfer_ms += MillisecondsSince(copy_start);

    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventRecord(start_, stream_));
    // Grid x is limited to 2^31 - 1 tiles, far beyond any memory budget.
    const auto* slices_device = reinterpret_cast<const DeviceSlice*>(workspace_ + slices_at);
    const auto* tiles_device = reinterpret_cast<const Tile*>(workspace_ + tiles_at);
    auto* stats_device = reinterpret_cast<TileStats*>(workspace_ + stats_at);
    const unsigned grid = static_cast<unsigned>(tiles.size());
    if (options_.search == CudaSearchAlgorithm::kPruned) {
      QuantizeTilesPrunedKernel<<<grid, kRowsPerTile, sizeof(PrunedKernelShared), stream_>>>(
          slices_device, tiles_device, stats_device);
    } else if (options_.search == CudaSearchAlgorithm::kEvents) {
      QuantizeTilesKernel<true>
          <<<grid, kRowsPerTile, 0, stream_>>>(slices_device, tiles_device, stats_device);
    } else {
      QuantizeTilesKernel<false>
          <<<grid, kRowsPerTile, 0, stream_>>>(slices_device, tiles_device, stats_device);
    }
    NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop_, stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop_));
    float kernel_ms = 0.0f;
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&kernel_ms, start_, stop_));
    timing_.kernel_ms += kernel_ms;
    timing_.launches += 1;

    const auto back_start = std::chrono::steady_clock::now();
    std::vector<TileStats> tile_stats(tiles.size());
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tile_stats.data(), workspace_ + stats_at,
                                               sizeof(TileStats) * tiles.size(),
                                               cudaMemcpyDeviceToHost, stream_));
    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const int64_t cols = s.request->weights.cols;
      const int64_t rows = pieces[p].row_end - pieces[p].row_begin;
      const int64_t local_row = pieces[p].row_begin - s.row_begin;
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          s.output.packed_codes.data() + local_row * cols / 2, workspace_ + code_at[p],
          static_cast<size_t>(rows * cols / 2), cudaMemcpyDeviceToHost, stream_));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          s.output.scales.data() + local_row * cols / kBlockSize, workspace_ + scale_at[p],
          static_cast<size_t>(rows * cols / kBlockSize), cudaMemcpyDeviceToHost, stream_));
    }
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    timing_.transfer_ms += MillisecondsSince(back_start);

    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const double unit = ObjectiveUnit(GlobalScaleFromAmax(s.global_amax));
      const bool hessian_objective = MethodNeedsHessian(s.request->params.method);
      TensorStats part;
      for (size_t t = tile_ranges[p].first; t < tile_ranges[p].second; ++t) {
        const TileStats& ts = tile_stats[t];
        part.num_blocks += ts.blocks;
        part.mse_before += unit * ts.mse_before;
        part.mse_after += unit * ts.mse_after;
        part.hessian_error_before += unit * ts.hessian_before;
        part.hessian_error_after += unit * ts.hessian_after;
        part.blocks_scale_changed += ts.scale_changed;
        part.blocks_beta_not_one += ts.beta_not_one;
        part.blocks_offset_not_zero += ts.offset_not_zero;
        part.zero_hessian_blocks += ts.zero_hessian;
        timing_.canonical_evaluations += ts.evaluations;
      }
      part.objective_before = hessian_objective ? part.hessian_error_before : part.mse_before;
      part.objective_after = hessian_objective ? part.hessian_error_after : part.mse_after;
      AccumulateStats(part, s.stats);
    }
    return absl::OkStatus();
  }

  static double MillisecondsSince(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
        .count();
  }

  CudaScaleSearchOptions options_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t owned_stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
  std::string description_;
  mutable std::mutex mutex_;
  char* workspace_ = nullptr;
  int64_t workspace_bytes_ = 0;
  CudaCallTiming timing_;
};

}  // namespace

bool CudaDeviceAvailable(std::string* reason) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    (void)cudaGetLastError();
    if (reason != nullptr) {
      *reason = absl::StrFormat("no usable CUDA device: %s", cudaGetErrorString(error));
    }
    return false;
  }
  if (count == 0) {
    if (reason != nullptr) *reason = "no CUDA device present";
    return false;
  }
  return true;
}

absl::Status CudaDeviceMemory(int device, int64_t* free_bytes, int64_t* total_bytes) {
  int count = 0;
  NVFP4_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrFormat("device = %d is out of range: %d CUDA device(s) present", device, count));
  }
  NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  size_t free = 0;
  size_t total = 0;
  NVFP4_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free, &total));
  *free_bytes = static_cast<int64_t>(free);
  *total_bytes = static_cast<int64_t>(total);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaScaleSearch>> MakeCudaScaleSearch(
    const CudaScaleSearchOptions& options) {
  return CudaScaleSearchImpl::Create(options);
}

}  // namespace nvfp4cal
