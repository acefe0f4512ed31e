// Test data of the gptq tests (CPU and CUDA): weights and correlated full Hessians.
#ifndef NVFP4CAL_TESTS_KERNELS_GPTQ_TEST_DATA_H_
#define NVFP4CAL_TESTS_KERNELS_GPTQ_TEST_DATA_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/gptq.h"

namespace nvfp4cal {

// bf16-rounded Gaussian weights [rows, cols], as fp32.
inline std::vector<float> RandomWeights(int64_t rows, int64_t cols, uint64_t seed) {
  ExampleRng rng(seed);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (float& v : w) v = BFloat16ToFloat(FloatToBFloat16(static_cast<float>(rng.Normal())));
  return w;
}

// H = X^T X for `tokens` correlated inputs: x = z M with M = I + `mixing` x random, so that
// columns, also in different 16-column groups, are correlated. Exactly symmetric.
inline std::vector<float> CorrelatedHessian(int64_t n, int64_t tokens, double mixing,
                                            uint64_t seed) {
  ExampleRng rng(seed);
  std::vector<double> m(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      m[static_cast<size_t>(i * n + j)] = (i == j ? 1.0 : 0.0) + mixing * rng.Normal();
    }
  }
  std::vector<double> h(static_cast<size_t>(n * n), 0.0);
  std::vector<double> z(static_cast<size_t>(n)), x(static_cast<size_t>(n));
  for (int64_t t = 0; t < tokens; ++t) {
    for (double& v : z) v = rng.Normal();
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t i = 0; i < n; ++i)
        s += z[static_cast<size_t>(i)] * m[static_cast<size_t>(i * n + j)];
      // Per-channel scale: a few strong inputs, like real activations.
      x[static_cast<size_t>(j)] = s * (j % 7 == 0 ? 4.0 : 1.0);
    }
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = 0; b < n; ++b) {
        h[static_cast<size_t>(a * n + b)] += x[static_cast<size_t>(a)] * x[static_cast<size_t>(b)];
      }
    }
  }
  std::vector<float> out(h.size());
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < n; ++b) {
      // Symmetric bit for bit.
      out[static_cast<size_t>(a * n + b)] =
          static_cast<float>(h[static_cast<size_t>(std::min(a, b) * n + std::max(a, b))]);
    }
  }
  return out;
}

inline std::vector<float> DiagonalBlocks(const std::vector<float>& h, int64_t n) {
  std::vector<float> blocks(static_cast<size_t>(n * kBlockSize));
  for (int64_t g = 0; g < n / kBlockSize; ++g) {
    for (int64_t a = 0; a < kBlockSize; ++a) {
      for (int64_t b = 0; b < kBlockSize; ++b) {
        blocks[static_cast<size_t>((g * kBlockSize + a) * kBlockSize + b)] =
            h[static_cast<size_t>((g * kBlockSize + a) * n + g * kBlockSize + b)];
      }
    }
  }
  return blocks;
}

// 2x2 blocks [[1, c], [c, 1]] on the diagonal: eigenvalues 1 - c and 1 + c.
inline std::vector<float> PairHessian(int64_t n, float c) {
  std::vector<float> h(static_cast<size_t>(n * n), 0.0f);
  for (int64_t i = 0; i < n; i += 2) {
    h[static_cast<size_t>(i * n + i)] = 1.0f;
    h[static_cast<size_t>((i + 1) * n + i + 1)] = 1.0f;
    h[static_cast<size_t>(i * n + i + 1)] = c;
    h[static_cast<size_t>((i + 1) * n + i)] = c;
  }
  return h;
}

// A gptq request for fp32 weights [rows, cols] and full H [cols, cols], the local_hessian
// comparison on (most tests read tr(E H E^T) of both results).
inline GptqRequest MakeGptqRequest(const std::vector<float>& w, int64_t rows, int64_t cols,
                                   const std::vector<float>& h) {
  GptqRequest request;
  request.weights = {w.data(), DType::kFloat32, rows, cols};
  request.hessian = {h.data(), cols};
  request.params.method = Method::kGptq;
  request.params.gptq.compare_local_hessian = true;
  return request;
}

// CorrelatedHessian with channel strengths spanning four decades (channel i scaled by
// 10^(1 - 2 (i mod 29) / 28), exactly symmetric) and the 16 inputs of group `dead_group` dead
// (their rows and columns zero, so that group's H block is all zeros).
inline std::vector<float> SkewedHessian(int64_t n, int64_t dead_group, uint64_t seed) {
  const std::vector<float> c = CorrelatedHessian(n, 500, 0.1, seed);
  std::vector<double> strength(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    strength[static_cast<size_t>(i)] =
        std::pow(10.0, 1.0 - 2.0 * static_cast<double>(i % 29) / 28.0);
  }
  std::vector<float> h(c.size());
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < n; ++b) {
      const bool dead = a / kBlockSize == dead_group || b / kBlockSize == dead_group;
      h[static_cast<size_t>(a * n + b)] =
          dead ? 0.0f
               : static_cast<float>(strength[static_cast<size_t>(a)] *
                                    strength[static_cast<size_t>(b)] *
                                    c[static_cast<size_t>(a * n + b)]);
    }
  }
  return h;
}

// RandomWeights with outliers (every 13th weight 8x, every 39th 60x), so that many groups'
// best scales clip their largest weight, far below the `max` method's.
inline std::vector<float> WeightsWithOutliers(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<float> w = RandomWeights(rows, cols, seed);
  for (size_t i = 0; i < w.size(); i += 13) w[i] *= i % 3 == 0 ? 60.0f : 8.0f;
  return w;
}

}  // namespace nvfp4cal

#endif  // NVFP4CAL_TESTS_KERNELS_GPTQ_TEST_DATA_H_
