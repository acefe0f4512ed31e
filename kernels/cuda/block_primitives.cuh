// Device-side building blocks of the CUDA kernels (not installed), independent of any method:
// fixed-order reductions over a CUDA block, (objective, index) keys that order candidates as the
// sequential searches do, and IEEE quotients from one shared reciprocal. The numerics themselves
// (codecs, objectives, block searches) are the `__host__ __device__` functions of codecs.h and
// block_search.h, shared with the CPU reference.
//
//   __shared__ double scratch[kThreads];
//   const double total = BlockSum<kThreads>(my_error, scratch);  // same bits on every run
#ifndef NVFP4CAL_KERNELS_CUDA_BLOCK_PRIMITIVES_CUH_
#define NVFP4CAL_KERNELS_CUDA_BLOCK_PRIMITIVES_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "nvfp4cal/kernels/codecs.h"

namespace nvfp4cal::cuda_internal {

// Fixed-order tree sum over the CUDA block (kThreads threads, a power of two, all taking part);
// the result is valid in thread 0. `scratch` holds kThreads doubles of shared memory.
template <int kThreads>
__device__ inline double BlockSum(double value, double* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const double sum = scratch[0];
  __syncthreads();
  return sum;
}

// Exclusive prefix sum of `count` over the CUDA block (kThreads threads, a multiple of 32, all
// taking part); *total receives the sum. `warp_total` holds kThreads / 32 ints of shared memory.
template <int kThreads>
__device__ inline int BlockExclusiveScan(int count, int* warp_total, int* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int inclusive = count;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int v = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += v;
  }
  if (lane == 31) warp_total[warp] = inclusive;
  __syncthreads();
  int before = 0;
  int sum = 0;
  for (int w = 0; w < kThreads / 32; ++w) {
    before += w < warp ? warp_total[w] : 0;
    sum += warp_total[w];
  }
  __syncthreads();
  *total = sum;
  return before + inclusive - count;
}

// Orders floats as unsigned integers (-0 and +0 taken as equal, NaN above +Inf).
__device__ inline uint32_t OrderedFloatBits(float x) {
  const uint32_t u = FloatBits(AddNoContract(x, 0.0f));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ inline float FloatFromOrderedBits(uint32_t u) {
  return BitsToFloat((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
}

// A candidate's key: the smallest key is the smallest objective, the smaller index on ties (the
// first minimal candidate in visiting order). atomicMin over keys picks the sequential choice.
__device__ inline unsigned long long CandidateKey(float objective, uint32_t index) {
  return (static_cast<unsigned long long>(OrderedFloatBits(objective)) << 32) | index;
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

}  // namespace nvfp4cal::cuda_internal

#endif  // NVFP4CAL_KERNELS_CUDA_BLOCK_PRIMITIVES_CUH_
