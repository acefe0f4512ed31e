// The gptq kernels as the host sees them (not installed): what the kernels of one row chunk
// share, and host-callable launchers that size each grid (gptq_kernels.cu holds the kernels).
// Every launcher enqueues on `stream` and returns the launch's error.
//
// Prepare:       LaunchBuildReversed -> cuSOLVER potrf -> LaunchInvertLowerLeaves and cuBLAS
//                trmm (the factor's inverse) -> LaunchExtractFactor ->
//                LaunchExtractFactorBlocks
// QuantizeRows:  per row chunk LaunchLoadWork, then per lazy batch LaunchGroupBatch and (before
//                the last batch) LaunchOrderedUpdate, then LaunchGroupStatistics; for the
//                comparison LaunchLocalHessian and LaunchErrors for both results.
#ifndef NVFP4CAL_KERNELS_CUDA_GPTQ_KERNELS_H_
#define NVFP4CAL_KERNELS_CUDA_GPTQ_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "block_statistics.h"
#include "nvfp4cal/kernels/internal/gptq_group.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"

namespace nvfp4cal::cuda_internal {

// What the kernels of one row chunk share (device pointers).
struct ChunkArgs {
  const void* weights;  // rows x n of `dtype`, row-major, original order
  int dtype;
  int64_t rows;
  int64_t n;
  float* work;                  // [n][rows]: working weights, quantization order
  float* errors;                // [batch][rows]: the current batch's scaled errors
  uint8_t* codes;               // rows x n / 2, original order
  uint8_t* scales;              // rows x n / 16
  BlockStatistics* stats;       // [rows]: per row, accumulated over its groups in order
  const float* factor;          // U [n, n]
  const float* factor_blocks;   // [groups, 16, 16]
  const float* hessian_blocks;  // [groups, 16, 16]
  const HessianBlockBounds* bounds;
  const int32_t* group_order;
  const int32_t* column;
  float global_amax;
  float global_scale;
  float unit;
  float unit_inverse;
  GptqGroupConfig config;
};

// b = the lower triangle of the reversed A = H_perm + lambda I (column-major, double), as
// ComputeGptqFactor builds it on the host. h: H [n, n] fp32; column: the quantization order.
cudaError_t LaunchBuildReversed(const float* h, const int32_t* column, int64_t n, double lambda,
                                double* b, cudaStream_t stream);

// The lower triangular matrix a (column-major, ld n) is inverted by blocks: first every
// kInverseLeaf x kInverseLeaf diagonal block (this kernel), then the blocks below them, bottom-up
// in a binary tree of leaf ranges, with two triangular products each (cuda_gptq.cu,
// InvertLowerTriangular).
inline constexpr int kInverseLeaf = 32;
cudaError_t LaunchInvertLowerLeaves(double* a, int64_t n, cudaStream_t stream);

// From linv (the inverse of b's factor): U [n, n] fp32 row-major in quantization order, and
// H in double, symmetric (as the CPU's tr(E H E^T) reads it).
cudaError_t LaunchExtractFactor(const double* linv, const float* h, int64_t n, float* u,
                                double* h_double, cudaStream_t stream);

// The diagonal 16x16 blocks of U [n, n] (groups = n / 16 of them).
cudaError_t LaunchExtractFactorBlocks(const float* u, int64_t n, int64_t groups, float* u_blocks,
                                      cudaStream_t stream);

// a.work = the chunk's weights as fp32, column-major in quantization order.
cudaError_t LaunchLoadWork(const ChunkArgs& a, cudaStream_t stream);

// Quantizes the groups of quantization positions [b0, b1) (one lazy batch) of every row: codes,
// scales and the dss counts out, the batch's scaled errors into a.errors, and each group's errors
// applied to the rest of the batch.
cudaError_t LaunchGroupBatch(const ChunkArgs& a, int64_t b0, int64_t b1, cudaStream_t stream);

// After the chunk's last batch: each row's block statistics (mse and e^T H_j e before and
// after, scale changes, all-zero H blocks) added to a.stats in quantization order.
cudaError_t LaunchGroupStatistics(const ChunkArgs& a, cudaStream_t stream);

// The batch's `depth` errors (quantization positions b0 ..) reach every column from c_begin on,
// each product rounded before its subtraction, in the CPU's order (bit-identical updates).
cudaError_t LaunchOrderedUpdate(const ChunkArgs& a, int64_t b0, int64_t depth, int64_t c_begin,
                                cudaStream_t stream);

// local_hessian's codes and scales of the chunk (the comparison's other result).
cudaError_t LaunchLocalHessian(const ChunkArgs& a, uint8_t* codes, uint8_t* scales,
                               cudaStream_t stream);

// e [rows, n] = W - W_hat in double (original order) for the given codes and scales.
cudaError_t LaunchErrors(const ChunkArgs& a, const uint8_t* codes, const uint8_t* scales, double* e,
                         cudaStream_t stream);

}  // namespace nvfp4cal::cuda_internal

#endif  // NVFP4CAL_KERNELS_CUDA_GPTQ_KERNELS_H_
