// Test data for method gptq through the server: correlated full Hessians, gptq tensors in any
// Hessian layout and the kernel library's result for them.
#ifndef NVFP4CAL_TESTS_SERVER_GPTQ_TEST_UTIL_H_
#define NVFP4CAL_TESTS_SERVER_GPTQ_TEST_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/gptq.h"
#include "server/calibration_server.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server::testing {

// Full Hessians are released when the last work item let go of them, which may be just after
// the client saw the status or the job became final.
inline void ExpectFullHessiansReleased(const CalibrationServer& server) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (server.full_hessian_bytes_in_use() != 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(server.full_hessian_bytes_in_use(), 0);
}

// H = X^T X / T of `tokens` correlated activations (a few strong channels), exactly symmetric.
inline std::vector<float> CorrelatedHessian(int64_t n, int64_t tokens, uint64_t seed) {
  ExampleRng rng(seed);
  std::vector<double> h(static_cast<size_t>(n * n), 0.0);
  std::vector<double> x(static_cast<size_t>(n));
  for (int64_t t = 0; t < tokens; ++t) {
    double shared = rng.Normal();
    for (int64_t j = 0; j < n; ++j) {
      shared = 0.8 * shared + 0.6 * rng.Normal();  // neighbours (and groups) correlate
      x[static_cast<size_t>(j)] = shared * (j % 7 == 0 ? 4.0 : 1.0);
    }
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = a; b < n; ++b) {
        h[static_cast<size_t>(a * n + b)] += x[static_cast<size_t>(a)] * x[static_cast<size_t>(b)];
      }
    }
  }
  std::vector<float> out(h.size());
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < n; ++b) {
      out[static_cast<size_t>(a * n + b)] =
          static_cast<float>(h[static_cast<size_t>(std::min(a, b) * n + std::max(a, b))] /
                             static_cast<double>(tokens));
    }
  }
  return out;
}

inline std::vector<float> UpperTriangle(const std::vector<float>& full, int64_t n) {
  std::vector<float> upper;
  upper.reserve(static_cast<size_t>(n * (n + 1) / 2));
  for (int64_t r = 0; r < n; ++r) {
    upper.insert(upper.end(), full.begin() + r * n + r, full.begin() + (r + 1) * n);
  }
  return upper;
}

// A gptq tensor of the session: the test tensor (weights, the Hessian in its layout) plus the
// full matrix and the parameters for the in-process reference.
struct GptqTensor {
  TestTensor tensor;
  std::vector<float> full;
  SearchParams params;
};

inline GptqTensor MakeGptqTensor(const std::string& name, int64_t rows, int64_t cols, DType dtype,
                                 const std::string& hessian_name, const std::vector<float>& full,
                                 v1::HessianLayout layout, uint64_t seed) {
  GptqTensor g;
  g.tensor = MakeTensor(name, rows, cols, dtype, "gptq", "", seed);
  g.tensor.hessian_name = hessian_name;
  g.tensor.layout = layout;
  g.tensor.hessian = layout == v1::HESSIAN_LAYOUT_FULL_UPPER ? UpperTriangle(full, cols) : full;
  g.full = full;
  g.params.method = Method::kGptq;
  g.params.gptq.compare_local_hessian = true;  // the tests read tr(E H E^T) of both
  return g;
}

// The kernel library's gptq result for the same tensor (CPU).
inline QuantizedTensor GptqReference(const GptqTensor& g) {
  GptqRequest request;
  request.weights = {g.tensor.weights.data(), g.tensor.dtype, g.tensor.rows, g.tensor.cols};
  request.hessian = {g.full.data(), g.tensor.cols};
  request.params = g.params;
  request.global_amax = g.tensor.global_amax;
  absl::StatusOr<QuantizedTensor> result = CpuGptqQuantize(request, {});
  EXPECT_TRUE(result.ok()) << result.status();
  return *std::move(result);
}

}  // namespace nvfp4cal::server::testing

#endif  // NVFP4CAL_TESTS_SERVER_GPTQ_TEST_UTIL_H_
