// Wall time of gptq on the CPU for one generated tensor: factorisation (LAPACK), quantization
// with propagation, and the local_hessian comparison (tr(E H E^T) of both results).
//
//   cpu_gptq_bench [ROWS COLS [THREADS [compare|nocompare]]]     default 4096 4096 0 compare
//
// Weights: example bf16 weights. Hessian: MakeExampleFullHessian (positive definite, with
// correlations across 16-column groups and a few strong channels, like real activations).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/gptq.h"

int main(int argc, char** argv) {
  const int64_t rows = argc > 2 ? std::atoll(argv[1]) : 4096;
  const int64_t cols = argc > 2 ? std::atoll(argv[2]) : 4096;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 0;
  const bool compare = argc > 4 ? std::string(argv[4]) != "nocompare" : true;
  const std::vector<float> h = nvfp4cal::MakeExampleFullHessian(cols, 42);
  const std::vector<uint16_t> w = nvfp4cal::MakeExampleWeightsBf16(rows, cols, 7);
  nvfp4cal::GptqRequest request;
  request.weights = {w.data(), nvfp4cal::DType::kBFloat16, rows, cols};
  request.hessian = {h.data(), cols};
  request.params.method = nvfp4cal::Method::kGptq;
  request.params.gptq.compare_local_hessian = compare;
  nvfp4cal::CpuGptqOptions options;
  options.num_threads = threads;
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<nvfp4cal::QuantizedTensor> result = nvfp4cal::CpuGptqQuantize(request, options);
  const double total =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!result.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(result.status().message()).c_str());
    return 1;
  }
  const nvfp4cal::GptqStats& s = result->stats.gptq;
  std::printf(
      "gptq %lldx%lld bf16, threads %d (hardware %u): total %.2f s = factor %.2f s + quantize "
      "%.2f s + compare %.2f s (+ validation)\n",
      static_cast<long long>(rows), static_cast<long long>(cols), threads,
      std::thread::hardware_concurrency(), total, s.factor_seconds, s.quantize_seconds,
      s.compare_seconds);
  std::printf("tr(E H E^T): gptq %.6g, local_hessian %.6g (%+.1f%%)\n", s.full_hessian_error,
              s.full_hessian_error_local_hessian,
              s.full_hessian_error_local_hessian > 0
                  ? 100.0 * (s.full_hessian_error / s.full_hessian_error_local_hessian - 1.0)
                  : 0.0);
  return 0;
}
