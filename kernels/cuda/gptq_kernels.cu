// The gptq kernels (gptq_kernels.h; cuda_gptq.cu runs them): the factor's preparation on the
// device, and per row chunk the working weights, the group kernel, the ordered update and the
// local_hessian comparison.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "gptq_kernels.h"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/dtype.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/gptq_group.h"
#include "team_scale_search.cuh"

namespace nvfp4cal::cuda_internal {
namespace {

constexpr int kRowThreads = 128;  // threads per CUDA block of the group kernel
constexpr int kGroupTeam = 16;    // lanes per row in the group kernel (a power of two <= 32)
constexpr int kUpdateTile = 128;  // rows x columns of one CUDA block of the update kernel
constexpr int kUpdateDepth = 16;  // errors staged in shared memory per step

// B(j, i) = A(n-1-j, n-1-i) for i <= j (column-major lower triangle) with A = H_perm + lambda I,
// as ComputeGptqFactor builds it on the host; the upper triangle 0 (potrf reads the lower one
// only; the blocked inverse multiplies whole blocks, whose upper triangles must be 0).
__global__ void BuildReversedKernel(const float* h, const int32_t* column, int64_t n, double lambda,
                                    double* b) {
  const int64_t j = blockIdx.x;
  const int64_t cj = column[n - 1 - j];
  for (int64_t i = threadIdx.x + static_cast<int64_t>(blockIdx.y) * blockDim.x; i < n;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    b[j + i * n] =
        i <= j ? static_cast<double>(h[column[n - 1 - i] * n + cj]) + (i == j ? lambda : 0.0) : 0.0;
  }
}

// Each kInverseLeaf x kInverseLeaf diagonal block of the lower triangular a (column-major,
// ld n; the last block may be smaller) replaced by its inverse: thread j solves L x = e_j by
// forward substitution (x_i = (delta_ij - sum_{j<=k<i} L_ik x_k) / L_ii, k ascending). Only the
// lower triangles are read and written.
__global__ void InvertLowerLeavesKernel(double* a, int64_t n) {
  __shared__ double l[kInverseLeaf][kInverseLeaf + 1];
  __shared__ double x[kInverseLeaf][kInverseLeaf + 1];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kInverseLeaf;
  const int size = static_cast<int>(min(static_cast<int64_t>(kInverseLeaf), n - base));
  for (int e = threadIdx.x; e < size * size; e += blockDim.x) {
    const int i = e % size;
    const int j = e / size;
    l[i][j] = i >= j ? a[(base + i) + (base + j) * n] : 0.0;
  }
  __syncthreads();
  const int j = threadIdx.x;
  if (j < size) {
    for (int i = j; i < size; ++i) {
      double sum = i == j ? 1.0 : 0.0;
      for (int k = j; k < i; ++k) sum -= l[i][k] * x[k][j];
      x[i][j] = sum / l[i][i];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < size * size; e += blockDim.x) {
    const int i = e % size;
    const int j = e / size;
    if (i >= j) a[(base + i) + (base + j) * n] = x[i][j];
  }
}

// U(i, j) = Linv(n-1-i, n-1-j) for j >= i, else 0 (float, row-major); and H in double,
// symmetric: the upper triangle mirrored, as the CPU's tr(E H E^T) reads it.
__global__ void ExtractFactorKernel(const double* linv, const float* h, int64_t n, float* u,
                                    double* h_double) {
  const int64_t i = blockIdx.x;
  for (int64_t j = threadIdx.x + static_cast<int64_t>(blockIdx.y) * blockDim.x; j < n;
       j += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    u[i * n + j] = j >= i ? static_cast<float>(linv[(n - 1 - i) + (n - 1 - j) * n]) : 0.0f;
    h_double[i * n + j] = static_cast<double>(j >= i ? h[i * n + j] : h[j * n + i]);
  }
}

// Diagonal 16x16 blocks of U (quantization order); H's come from the host (DiagonalBlocksOf).
__global__ void ExtractFactorBlocksKernel(const float* u, int64_t n, float* u_blocks) {
  const int64_t g = blockIdx.x;
  const int a = threadIdx.x / kBlockSize;
  const int b = threadIdx.x % kBlockSize;
  u_blocks[g * kBlockSize * kBlockSize + threadIdx.x] =
      u[(g * kBlockSize + a) * n + g * kBlockSize + b];
}

// work[p][r] = W(r, column[p]) as fp32.
__global__ void LoadWorkKernel(ChunkArgs a) {
  const int64_t p = blockIdx.x;
  const int64_t col = a.column[p];
  for (int64_t r = threadIdx.x + static_cast<int64_t>(blockIdx.y) * blockDim.x; r < a.rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float v;
    LoadAsFloat(a.weights, static_cast<DType>(a.dtype), r * a.n + col, 1, &v);
    a.work[p * a.rows + r] = v;
  }
}

// A team of kTeam lanes per row runs the groups of quantization positions [b0, b1) in order.
// The CUDA block's rows all reach the same group together, so its blocks of H and U sit in
// shared memory for the whole block. One instantiation per objective and search (a.config's
// exact_cost and dss), so that each carries only its own path: the gptq_cost ones need 72-126
// registers (sm_90). The e^T H e ones search with the one-element pruning of
// GptqChooseGroupScale (TeamChooseScale's window around the `max` method's candidate, then the
// bound): the sweep's instantiation takes 128 registers without spills, the dss one 255 with
// spills.
template <int kTeam, bool kExactCost, bool kDss>
__global__ void __launch_bounds__(kRowThreads)
    GroupBatchKernel(ChunkArgs a, int64_t b0, int64_t b1) {
  __shared__ float hs[kBlockSize * kBlockSize];
  __shared__ float us[kBlockSize * kBlockSize];
  __shared__ HessianBlockBounds bs;
  const int lane = threadIdx.x % kTeam;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (kRowThreads / kTeam) + threadIdx.x / kTeam;
  const bool active = row < a.rows;
  // Teams past the last row compute on the last row and write nothing (the shuffles and the
  // barriers need every lane).
  const int64_t r = active ? row : a.rows - 1;
  BlockStatistics st = active && lane == 0 ? a.stats[r] : BlockStatistics{};
  for (int64_t p0 = b0; p0 < b1; p0 += kBlockSize) {
    const int64_t t = p0 / kBlockSize;
    const int64_t group = a.group_order[t];
    __syncthreads();
    for (int i = threadIdx.x; i < kBlockSize * kBlockSize; i += kRowThreads) {
      hs[i] = a.hessian_blocks[group * kBlockSize * kBlockSize + i];
      us[i] = a.factor_blocks[t * kBlockSize * kBlockSize + i];
    }
    if (threadIdx.x == 0) bs = a.bounds[group];
    __syncthreads();
    float w[kBlockSize];
    for (int i = 0; i < kBlockSize; ++i) w[i] = a.work[(p0 + i) * a.rows + r];
    GptqGroupOutput out{};
    GptqGroupChoice choice{0, 0.0f, 0, 0};
    if (a.global_amax > 0.0f) {
      ScaledBlock b{};
      PrepareScaledBlock(w, a.global_amax, a.global_scale, &b);
      const GptqGroupConfig config{kExactCost, kDss, a.config.grid};
      if constexpr (kExactCost) {
        const GptqCostObjective cost{w, a.unit, a.unit_inverse, us};
        choice = TeamChooseScale<kTeam>(b, config, lane, cost);
      } else {
        choice = TeamChooseScale<kTeam>(
            b, config, lane,
            [&](float q, float d_unit) { return CandidateObjective(b, q, d_unit, hs); },
            SweepWindowStart<kTeam>(MaxMethodScaleByteOf(w, a.global_amax) - 1),
            OneElementPruning{MakeBlockPruning(b, &bs)});
      }
      const float d_unit = MulNoContract(ScaleCandidateValue(choice.candidate),
                                         MulNoContract(a.global_scale, a.unit_inverse));
      GptqGroupPass(w, choice.q, d_unit, a.unit, a.unit_inverse, us, &out);
    }
    // All-zero tensor (g = 0): codes 0, scale byte 0x01, nothing to propagate. The group's
    // statistics come after the whole row (GroupStatisticsKernel), off this loop's path.
    const uint8_t scale_byte = static_cast<uint8_t>(choice.candidate + 1);
    if (active && lane == 0) {
      a.scales[r * (a.n / kBlockSize) + group] = scale_byte;
      for (int i = 0; i < kBlockSize / 2; ++i) {
        a.codes[r * (a.n / 2) + group * (kBlockSize / 2) + i] =
            PackE2M1Pair(out.codes[2 * i], out.codes[2 * i + 1]);
      }
      st.beta_not_one += choice.dss_beta_index != 0;
      st.offset_not_zero += choice.dss_offset != 0;
      for (int i = 0; i < kBlockSize; ++i) {
        a.errors[(p0 - b0 + i) * a.rows + r] = out.scaled_error[i];
      }
    }
    // The group's errors reach the rest of the batch now, one error after the other per
    // element (the CPU's order); the lanes share the columns.
    if (active) {
      for (int64_t l = p0 + kBlockSize + lane; l < b1; l += kTeam) {
        float x = a.work[l * a.rows + r];
        for (int i = 0; i < kBlockSize; ++i) {
          x = AddNoContract(x, -MulNoContract(out.scaled_error[i], a.factor[(p0 + i) * a.n + l]));
        }
        a.work[l * a.rows + r] = x;
      }
    }
    __syncwarp();
  }
  if (active && lane == 0) a.stats[r] = st;
}

// Each row's block statistics from its original weights and final codes and scales, groups in
// quantization order (the order GroupBatchKernel chose them in): one thread per row.
__global__ void GroupStatisticsKernel(ChunkArgs a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= a.rows) return;
  const int64_t groups = a.n / kBlockSize;
  BlockStatistics st = a.stats[r];
  for (int64_t t = 0; t < groups; ++t) {
    const int64_t group = a.group_order[t];
    uint8_t codes[kBlockSize];
    for (int i = 0; i < kBlockSize / 2; ++i) {
      const uint8_t pair = a.codes[r * (a.n / 2) + group * (kBlockSize / 2) + i];
      codes[2 * i] = UnpackE2M1Low(pair);
      codes[2 * i + 1] = UnpackE2M1High(pair);
    }
    float orig[kBlockSize];
    LoadAsFloat(a.weights, static_cast<DType>(a.dtype), r * a.n + group * kBlockSize, kBlockSize,
                orig);
    const GptqGroupStats g =
        GptqGroupStatistics(orig, a.global_amax, a.global_scale, a.unit_inverse,
                            a.hessian_blocks + group * kBlockSize * kBlockSize,
                            a.scales[r * groups + group], codes, a.config.grid);
    st.mse_before += g.mse_before;
    st.mse_after += g.mse_after;
    st.hessian_before += g.hessian_before;
    st.hessian_after += g.hessian_after;
    st.blocks += 1;
    st.scale_changed += g.scale_changed;
    st.zero_hessian += g.zero_hessian;
  }
  a.stats[r] = st;
}

// work[c][r] -= errors[k][r] * U(b0 + k, c) for every column c >= c_begin, k = 0, 1, ... in
// order, each product rounded before its subtraction: the CPU backend's update, bit for bit.
// A CUDA block owns 128 rows x 128 columns; each thread 8 x 8 of them (rows tx, tx + 16, ...,
// so that a warp's loads and stores of `work`, column-major, cover 16 consecutive rows of each
// of two columns, and 8 consecutive columns), staging 16 errors and 16 factor rows in shared
// memory per step and reading the factor rows as float4.
constexpr int kUpdatePerThread = 8;
__global__ void __launch_bounds__(256)
    OrderedUpdateKernel(float* work, const float* errors, const float* factor, int64_t rows,
                        int64_t n, int64_t b0, int64_t depth, int64_t c_begin) {
  __shared__ __align__(16) float es[kUpdateDepth][kUpdateTile];
  __shared__ __align__(16) float us[kUpdateDepth][kUpdateTile];
  const int tx = threadIdx.x % 16;  // rows tx, tx + 16, ..
  const int ty = threadIdx.x / 16;  // columns ty * 8 ..
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kUpdateTile;
  const int64_t col0 = c_begin + static_cast<int64_t>(blockIdx.y) * kUpdateTile;
  float acc[kUpdatePerThread][kUpdatePerThread];
  for (int i = 0; i < kUpdatePerThread; ++i) {
    for (int j = 0; j < kUpdatePerThread; ++j) {
      const int64_t r = row0 + tx + 16 * i;
      const int64_t c = col0 + ty * kUpdatePerThread + j;
      acc[i][j] = (r < rows && c < n) ? work[c * rows + r] : 0.0f;
    }
  }
  for (int64_t k0 = 0; k0 < depth; k0 += kUpdateDepth) {
    for (int e = threadIdx.x; e < kUpdateDepth * kUpdateTile; e += 256) {
      const int kk = e / kUpdateTile;
      const int x = e % kUpdateTile;
      const bool k_in = k0 + kk < depth;
      es[kk][x] = (k_in && row0 + x < rows) ? errors[(k0 + kk) * rows + row0 + x] : 0.0f;
      us[kk][x] = (k_in && col0 + x < n) ? factor[(b0 + k0 + kk) * n + col0 + x] : 0.0f;
    }
    __syncthreads();
    const int steps = static_cast<int>(min(static_cast<int64_t>(kUpdateDepth), depth - k0));
    for (int kk = 0; kk < steps; ++kk) {
      float e8[kUpdatePerThread];
      float u8[kUpdatePerThread];
      for (int i = 0; i < kUpdatePerThread; ++i) e8[i] = es[kk][tx + 16 * i];
      const float4* uv = reinterpret_cast<const float4*>(&us[kk][ty * kUpdatePerThread]);
      for (int h = 0; h < kUpdatePerThread / 4; ++h) {
        const float4 y = uv[h];
        u8[4 * h] = y.x;
        u8[4 * h + 1] = y.y;
        u8[4 * h + 2] = y.z;
        u8[4 * h + 3] = y.w;
      }
      for (int i = 0; i < kUpdatePerThread; ++i) {
        for (int j = 0; j < kUpdatePerThread; ++j) {
          acc[i][j] = __fsub_rn(acc[i][j], __fmul_rn(e8[i], u8[j]));
        }
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < kUpdatePerThread; ++i) {
    for (int j = 0; j < kUpdatePerThread; ++j) {
      const int64_t r = row0 + tx + 16 * i;
      const int64_t c = col0 + ty * kUpdatePerThread + j;
      if (r < rows && c < n) work[c * rows + r] = acc[i][j];
    }
  }
}

// e[r, c] = W(r, c) - W_hat(r, c) in double (original order) for the given codes and scales.
__global__ void ErrorKernel(ChunkArgs a, const uint8_t* codes, const uint8_t* scales, double* e) {
  const int64_t r = blockIdx.x;
  for (int64_t c = threadIdx.x + static_cast<int64_t>(blockIdx.y) * blockDim.x; c < a.n;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float w;
    LoadAsFloat(a.weights, static_cast<DType>(a.dtype), r * a.n + c, 1, &w);
    const uint8_t byte = codes[(r * a.n + c) / 2];
    const uint8_t code = c % 2 == 0 ? UnpackE2M1Low(byte) : UnpackE2M1High(byte);
    const double d = static_cast<double>(DecodeE4M3(scales[(r * a.n + c) / kBlockSize])) *
                     static_cast<double>(a.global_scale);
    e[r * a.n + c] = static_cast<double>(w) - static_cast<double>(DecodeE2M1(code)) * d;
  }
}

// local_hessian's codes and scales for the chunk, for the comparison: a team of kTeam lanes
// per block runs the 126-candidate sweep (TeamChooseScale, the same choice as QuantizeBlock's
// pruned sweep). With g = 0 every weight is 0 and so is every error, whatever the scale.
template <int kTeam>
__global__ void __launch_bounds__(kRowThreads)
    LocalHessianKernel(ChunkArgs a, uint8_t* codes, uint8_t* scales) {
  const int64_t blocks_per_row = a.n / kBlockSize;
  const int lane = threadIdx.x % kTeam;
  const int64_t team_block =
      static_cast<int64_t>(blockIdx.x) * (kRowThreads / kTeam) + threadIdx.x / kTeam;
  // Teams past the last block compute the last one and write nothing (the shuffles need every
  // lane of the warp).
  const bool active = team_block < a.rows * blocks_per_row;
  const int64_t block = active ? team_block : a.rows * blocks_per_row - 1;
  const int64_t r = block / blocks_per_row;
  const int64_t j = block % blocks_per_row;
  float w[kBlockSize];
  LoadAsFloat(a.weights, static_cast<DType>(a.dtype), r * a.n + j * kBlockSize, kBlockSize, w);
  GptqGroupChoice choice{0, 0.0f, 0, 0};
  if (a.global_amax > 0.0f) {
    ScaledBlock b{};
    PrepareScaledBlock(w, a.global_amax, a.global_scale, &b);
    const float* h = a.hessian_blocks + j * kBlockSize * kBlockSize;
    const GptqGroupConfig sweep_only{false, false, a.config.grid};
    choice = TeamChooseScale<kTeam>(
        b, sweep_only, lane,
        [&](float q, float d_unit) { return CandidateObjective(b, q, d_unit, h); },
        SweepWindowStart<kTeam>(MaxMethodScaleByteOf(w, a.global_amax) - 1),
        OneElementPruning{MakeBlockPruning(b, a.bounds + j)});
  }
  if (active && lane == 0) {
    scales[block] = static_cast<uint8_t>(choice.candidate + 1);
    for (int i = 0; i < kBlockSize / 2; ++i) {
      codes[block * (kBlockSize / 2) + i] =
          a.global_amax > 0.0f
              ? PackE2M1Pair(EncodeE2M1(w[2 * i] / choice.q), EncodeE2M1(w[2 * i + 1] / choice.q))
              : 0;
    }
  }
}

// Grid y of the kernels that stride over a long dimension: enough blocks of 256 threads for
// `count` elements, at most 64.
unsigned StrideBlocks(int64_t count) {
  return static_cast<unsigned>(std::min<int64_t>((count + 255) / 256, 64));
}

}  // namespace

cudaError_t LaunchBuildReversed(const float* h, const int32_t* column, int64_t n, double lambda,
                                double* b, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n), StrideBlocks(n));
  BuildReversedKernel<<<grid, 256, 0, stream>>>(h, column, n, lambda, b);
  return cudaGetLastError();
}

cudaError_t LaunchInvertLowerLeaves(double* a, int64_t n, cudaStream_t stream) {
  const unsigned leaves = static_cast<unsigned>((n + kInverseLeaf - 1) / kInverseLeaf);
  InvertLowerLeavesKernel<<<leaves, kInverseLeaf, 0, stream>>>(a, n);
  return cudaGetLastError();
}

cudaError_t LaunchExtractFactor(const double* linv, const float* h, int64_t n, float* u,
                                double* h_double, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n), StrideBlocks(n));
  ExtractFactorKernel<<<grid, 256, 0, stream>>>(linv, h, n, u, h_double);
  return cudaGetLastError();
}

cudaError_t LaunchExtractFactorBlocks(const float* u, int64_t n, int64_t groups, float* u_blocks,
                                      cudaStream_t stream) {
  ExtractFactorBlocksKernel<<<static_cast<unsigned>(groups), kBlockSize * kBlockSize, 0, stream>>>(
      u, n, u_blocks);
  return cudaGetLastError();
}

cudaError_t LaunchLoadWork(const ChunkArgs& a, cudaStream_t stream) {
  LoadWorkKernel<<<dim3(static_cast<unsigned>(a.n), StrideBlocks(a.rows)), 256, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t LaunchGroupBatch(const ChunkArgs& a, int64_t b0, int64_t b1, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kRowThreads / kGroupTeam;
  const unsigned blocks = static_cast<unsigned>((a.rows + kRowsPerBlock - 1) / kRowsPerBlock);
  if (a.config.exact_cost) {
    if (a.config.dss) {
      GroupBatchKernel<kGroupTeam, true, true><<<blocks, kRowThreads, 0, stream>>>(a, b0, b1);
    } else {
      GroupBatchKernel<kGroupTeam, true, false><<<blocks, kRowThreads, 0, stream>>>(a, b0, b1);
    }
  } else if (a.config.dss) {
    GroupBatchKernel<kGroupTeam, false, true><<<blocks, kRowThreads, 0, stream>>>(a, b0, b1);
  } else {
    GroupBatchKernel<kGroupTeam, false, false><<<blocks, kRowThreads, 0, stream>>>(a, b0, b1);
  }
  return cudaGetLastError();
}

cudaError_t LaunchGroupStatistics(const ChunkArgs& a, cudaStream_t stream) {
  GroupStatisticsKernel<<<static_cast<unsigned>((a.rows + 127) / 128), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t LaunchOrderedUpdate(const ChunkArgs& a, int64_t b0, int64_t depth, int64_t c_begin,
                                cudaStream_t stream) {
  const int64_t columns = a.n - c_begin;
  const dim3 grid(static_cast<unsigned>((a.rows + kUpdateTile - 1) / kUpdateTile),
                  static_cast<unsigned>((columns + kUpdateTile - 1) / kUpdateTile));
  OrderedUpdateKernel<<<grid, 256, 0, stream>>>(a.work, a.errors, a.factor, a.rows, a.n, b0, depth,
                                                c_begin);
  return cudaGetLastError();
}

cudaError_t LaunchLocalHessian(const ChunkArgs& a, uint8_t* codes, uint8_t* scales,
                               cudaStream_t stream) {
  constexpr int kBlocksPerCta = kRowThreads / kGroupTeam;
  const int64_t blocks = a.rows * (a.n / kBlockSize);
  LocalHessianKernel<kGroupTeam>
      <<<static_cast<unsigned>((blocks + kBlocksPerCta - 1) / kBlocksPerCta), kRowThreads, 0,
         stream>>>(a, codes, scales);
  return cudaGetLastError();
}

cudaError_t LaunchErrors(const ChunkArgs& a, const uint8_t* codes, const uint8_t* scales, double* e,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.rows), StrideBlocks(a.n));
  ErrorKernel<<<grid, 256, 0, stream>>>(a, codes, scales, e);
  return cudaGetLastError();
}

}  // namespace nvfp4cal::cuda_internal
