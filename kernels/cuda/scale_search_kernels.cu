// The scale-search kernels (scale_search_kernels.h): the block searches of block_search.h, one
// thread per block of 16 weights.
//
// A tile's CUDA block loads its Hessian block H_j into shared memory once (every row of a column
// block shares it; reads are warp-wide broadcasts), each thread runs the search for its row, and
// the block reduces its statistics in a fixed order, so results are deterministic.
#include <cuda_runtime.h>

#include <cstring>

#include "block_primitives.cuh"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/event_search.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"
#include "pruned_tile_search.cuh"
#include "scale_search_kernels.h"

namespace nvfp4cal::cuda_internal {
namespace {

// The tile's statistics, summed in a fixed order (thread 0 writes them).
__device__ void WriteTileStats(bool active, const BlockOutcome& out, double* scratch,
                               TileStats* tile_stats, int64_t evaluations = 0) {
  const double mse_before = BlockSum<kRowsPerTile>(active ? out.mse_before : 0.0, scratch);
  const double mse_after = BlockSum<kRowsPerTile>(active ? out.mse_after : 0.0, scratch);
  const double hessian_before = BlockSum<kRowsPerTile>(active ? out.hessian_before : 0.0, scratch);
  const double hessian_after = BlockSum<kRowsPerTile>(active ? out.hessian_after : 0.0, scratch);
  const int blocks = __syncthreads_count(active);
  const int changed = __syncthreads_count(active && out.scale_byte != out.max_scale_byte);
  const int beta = __syncthreads_count(active && out.dss_beta_index != 0);
  const int offset = __syncthreads_count(active && out.dss_offset != 0);
  const int zero = __syncthreads_count(active && out.hessian_all_zero);
  if (threadIdx.x == 0) {
    tile_stats[blockIdx.x] =
        TileStats{BlockStatistics{mse_before, mse_after, hessian_before, hessian_after, blocks,
                                  changed, beta, offset, zero, 0},
                  evaluations};
  }
}

// Copies the tile's 16x16 Hessian block into shared memory (every thread of the tile takes part).
__device__ void LoadTileHessian(const DeviceSlice& s, const Tile& tile, float* h) {
  const float* hj = s.hessians + static_cast<int64_t>(tile.col_block) * kBlockSize * kBlockSize;
  for (int i = threadIdx.x; i < kBlockSize * kBlockSize; i += kRowsPerTile) h[i] = hj[i];
}

// Writes a row's scale byte and packed codes to the slice's outputs.
__device__ __forceinline__ void WriteBlock(const DeviceSlice& s, const Tile& tile, int64_t row,
                                           const BlockOutcome& out) {
  const int64_t block = row * (s.cols / kBlockSize) + tile.col_block;
  s.scales[block] = out.scale_byte;
  uint2 packed;
  memcpy(&packed, out.packed, sizeof(packed));
  reinterpret_cast<uint2*>(s.codes)[block] = packed;
}

// The tile's Hessian block, and what the event search needs of it, in shared memory.
struct TileHessian {
  float h[kBlockSize * kBlockSize];
  SymmetricHessian sym;  // event search
  double row_sum[kBlockSize];
  double col_sum[kBlockSize];
};

// The full search (CudaSearchAlgorithm::kFull) or the event search (kEvents): each thread runs
// the sequential search of block_search.h / event_search.h for its row.
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
    // S = (H + H^T) / 2, and abs_norm: the largest absolute row or column sum of H.
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
    WriteBlock(s, tile, row, out);
  }
  WriteTileStats(active, out, scratch, tile_stats);
}

// ---------------------------------------------------------------------------------------------
// The pruned search (CudaSearchAlgorithm::kPruned; pruned_tile_search.cuh says how it works),
// in phases: each row's `max` result and first screen, the tile's sweep queue, each row's sweep
// choice and DSS screen, the tile's DSS queue, each row's choice and outputs.
// ---------------------------------------------------------------------------------------------

// One function of about 250 lines on purpose (the project's limit is 120): with its phases moved
// into __forceinline__ device functions the compiler generates different code (each callee is
// optimised before it is inlined), which measured 2-3% slower on an H100 (cuda_layer_bench, same
// run: dss 29.3-29.6 -> 30.3 ms, local_hessian 15.4-15.5 -> 15.9 ms, mse 10.3 -> 10.5 ms per
// layer). Phases are marked by comments instead; docs/performance.md describes them.
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

}  // namespace

cudaError_t SetScaleSearchKernelAttributes() {
  return cudaFuncSetAttribute(QuantizeTilesPrunedKernel,
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(sizeof(PrunedKernelShared)));
}

cudaError_t LaunchQuantizeTiles(CudaSearchAlgorithm search, unsigned num_tiles, cudaStream_t stream,
                                const DeviceSlice* slices, const Tile* tiles,
                                TileStats* tile_stats) {
  if (search == CudaSearchAlgorithm::kPruned) {
    QuantizeTilesPrunedKernel<<<num_tiles, kRowsPerTile, sizeof(PrunedKernelShared), stream>>>(
        slices, tiles, tile_stats);
  } else if (search == CudaSearchAlgorithm::kEvents) {
    QuantizeTilesKernel<true><<<num_tiles, kRowsPerTile, 0, stream>>>(slices, tiles, tile_stats);
  } else {
    QuantizeTilesKernel<false><<<num_tiles, kRowsPerTile, 0, stream>>>(slices, tiles, tile_stats);
  }
  return cudaGetLastError();
}

}  // namespace nvfp4cal::cuda_internal
