// Deterministic example tensors and Hessians for the demo, tests and benchmarks.
//
// Not part of the numerics: a reproducible stand-in for real model data. Weights look like a
// trained Linear layer (Gaussian rows with per-row spread and rare outliers); Hessian blocks are
// X^T X of correlated random activations, so they are positive definite with realistic
// off-diagonal structure.
#ifndef NVFP4CAL_KERNELS_EXAMPLE_DATA_H_
#define NVFP4CAL_KERNELS_EXAMPLE_DATA_H_

#include <cstdint>
#include <vector>

#include "nvfp4cal/kernels/codecs.h"  // FloatToBFloat16, FloatToFloat16

namespace nvfp4cal {

// SplitMix64-based generator: identical sequences on every platform.
class ExampleRng {
 public:
  explicit ExampleRng(uint64_t seed) : state_(seed) {}
  uint64_t NextU64();
  // Uniform in [0, 1).
  double Uniform();
  // Standard normal (Box-Muller).
  double Normal();

 private:
  uint64_t state_;
};

// rows x cols weights as fp32, row-major.
std::vector<float> MakeExampleWeights(int64_t rows, int64_t cols, uint64_t seed);

// The same as bfloat16 bits.
std::vector<uint16_t> MakeExampleWeightsBf16(int64_t rows, int64_t cols, uint64_t seed);

// num_blocks positive-definite 16x16 blocks [num_blocks, 16, 16], symmetric bit for bit.
// condition_boost > 1 makes them ill-conditioned (one direction dominates).
std::vector<float> MakeExampleHessianBlocks(int64_t num_blocks, uint64_t seed,
                                            float condition_boost = 1.0f);

// A full n x n Hessian like real activations' (benchmarks of gptq): D (A A^T / k + 0.05 I) D with
// A [n, k = 64] Gaussian and D a per-channel scale (8 for every 97th channel, else 1), so H is
// positive definite and correlated across 16-column groups. Symmetric bit for bit; computed on
// `threads` threads (0 = all), the same values for any count.
std::vector<float> MakeExampleFullHessian(int64_t n, uint64_t seed, int threads = 0);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_EXAMPLE_DATA_H_
