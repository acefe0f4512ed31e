#include "nvfp4cal/kernels/example_data.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "nvfp4cal/kernels/codecs.h"

namespace nvfp4cal {

uint64_t ExampleRng::NextU64() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double ExampleRng::Uniform() { return static_cast<double>(NextU64() >> 11) * 0x1.0p-53; }

double ExampleRng::Normal() {
  const double u1 = 1.0 - Uniform();  // (0, 1]
  const double u2 = Uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

std::vector<float> MakeExampleWeights(int64_t rows, int64_t cols, uint64_t seed) {
  ExampleRng rng(seed);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  std::vector<double> column_scale(static_cast<size_t>(cols));
  for (double& s : column_scale) s = 0.5 + rng.Uniform();
  for (int64_t r = 0; r < rows; ++r) {
    const double row_scale = 0.01 * (0.5 + 1.5 * rng.Uniform());
    for (int64_t c = 0; c < cols; ++c) {
      double v = rng.Normal() * row_scale * column_scale[static_cast<size_t>(c)];
      if (rng.Uniform() < 0.001) v *= 8.0;  // rare outliers, as in trained weights
      w[static_cast<size_t>(r * cols + c)] = static_cast<float>(v);
    }
  }
  return w;
}

std::vector<uint16_t> MakeExampleWeightsBf16(int64_t rows, int64_t cols, uint64_t seed) {
  const std::vector<float> w = MakeExampleWeights(rows, cols, seed);
  std::vector<uint16_t> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = FloatToBFloat16(w[i]);
  return out;
}

std::vector<float> MakeExampleHessianBlocks(int64_t num_blocks, uint64_t seed,
                                            float condition_boost) {
  constexpr int kN = kBlockSize;
  constexpr int kTokens = 48;
  ExampleRng rng(seed);
  std::vector<float> out(static_cast<size_t>(num_blocks * kN * kN));
  double x[kTokens][kN];
  for (int64_t b = 0; b < num_blocks; ++b) {
    // Activations with a shared component (correlated inputs) and per-channel magnitudes.
    double channel[kN];
    for (double& c : channel) c = 0.2 + 2.0 * rng.Uniform();
    for (int t = 0; t < kTokens; ++t) {
      const double shared = rng.Normal();
      for (int i = 0; i < kN; ++i) x[t][i] = channel[i] * (0.6 * rng.Normal() + 0.4 * shared);
      if (condition_boost != 1.0f) {
        for (int i = 0; i < kN; ++i) x[t][i] += condition_boost * shared;
      }
    }
    float* h = out.data() + b * kN * kN;
    for (int i = 0; i < kN; ++i) {
      for (int j = i; j < kN; ++j) {
        double s = 0.0;
        for (int t = 0; t < kTokens; ++t) s += x[t][i] * x[t][j];
        const float v = static_cast<float>(s / kTokens + (i == j ? 1e-3 : 0.0));
        h[i * kN + j] = v;
        h[j * kN + i] = v;
      }
    }
  }
  return out;
}

std::vector<float> MakeExampleFullHessian(int64_t n, uint64_t seed, int threads) {
  constexpr int64_t kRank = 64;
  ExampleRng rng(seed);
  std::vector<double> a(static_cast<size_t>(n * kRank));
  for (double& v : a) v = rng.Normal();
  std::vector<double> scale(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) scale[static_cast<size_t>(i)] = i % 97 == 0 ? 8.0 : 1.0;
  std::vector<float> h(static_cast<size_t>(n * n));
  auto rows = [&](int64_t first, int64_t step) {
    for (int64_t i = first; i < n; i += step) {
      for (int64_t j = i; j < n; ++j) {
        double s = 0.0;
        for (int64_t k = 0; k < kRank; ++k) {
          s += a[static_cast<size_t>(i * kRank + k)] * a[static_cast<size_t>(j * kRank + k)];
        }
        s = (s / static_cast<double>(kRank) + (i == j ? 0.05 : 0.0)) *
            scale[static_cast<size_t>(i)] * scale[static_cast<size_t>(j)];
        h[static_cast<size_t>(i * n + j)] = static_cast<float>(s);
        h[static_cast<size_t>(j * n + i)] = static_cast<float>(s);
      }
    }
  };
  const int count =
      threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int t = 1; t < count; ++t) pool.emplace_back(rows, t, count);
  rows(0, count);
  for (std::thread& t : pool) t.join();
  return h;
}

}  // namespace nvfp4cal
