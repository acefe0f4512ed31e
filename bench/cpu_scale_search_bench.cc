// CPU throughput of each method on a 4096 x 4096 bf16 tensor with random positive-definite
// Hessian blocks (issue 2's benchmark). Counters: blocks/s and candidate evaluations/s, where
// a candidate is one (q, d) pair: 1 for max, 126 for the sweeps, 126 + 3 * 21 for default dss.
//
//   cpu_scale_search_bench [--benchmark_filter=dss] [google benchmark flags]
#include <benchmark/benchmark.h>

#include <thread>

#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"

namespace nvfp4cal {
namespace {

constexpr int64_t kRows = 4096;
constexpr int64_t kCols = 4096;

struct Fixture {
  std::vector<uint16_t> weights = MakeExampleWeightsBf16(kRows, kCols, 1);
  std::vector<float> hessians = MakeExampleHessianBlocks(kCols / 16, 2);
};

const Fixture& Data() {
  static const Fixture* fixture = new Fixture();
  return *fixture;
}

double CandidatesPerBlock(Method m) {
  switch (m) {
    case Method::kMax:
      return 1;
    case Method::kMse:
    case Method::kLocalHessian:
      return 126;
    case Method::kDss:
      return 126 + 3 * 21;
    default:  // gptq is not a ScaleSearch method
      return 0;
  }
  return 0;
}

void BM_CpuQuantize(benchmark::State& state) {
  const Method method = static_cast<Method>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  const Fixture& data = Data();
  auto search = MakeCpuScaleSearch({threads, 4096});
  QuantizeRequest request;
  request.weights = {data.weights.data(), DType::kBFloat16, kRows, kCols};
  request.hessians = {data.hessians.data(), kCols / 16};
  request.params.method = method;
  for (auto _ : state) {
    absl::StatusOr<QuantizedTensor> result = search->Quantize(request);
    if (!result.ok()) {
      state.SkipWithError(result.status().ToString().c_str());
      return;
    }
    benchmark::DoNotOptimize(result->scales.data());
  }
  const double blocks =
      static_cast<double>(kRows * kCols / 16) * static_cast<double>(state.iterations());
  state.counters["blocks/s"] = benchmark::Counter(blocks, benchmark::Counter::kIsRate);
  state.counters["candidates/s"] =
      benchmark::Counter(blocks * CandidatesPerBlock(method), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(MethodName(method)) + ", " + std::to_string(threads) + " threads");
}

void Args(benchmark::internal::Benchmark* b) {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (Method m : {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss}) {
    b->Args({static_cast<int>(m), 1});
    if (hw > 1) b->Args({static_cast<int>(m), hw});
  }
}

BENCHMARK(BM_CpuQuantize)->Apply(Args)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(1);

}  // namespace
}  // namespace nvfp4cal

BENCHMARK_MAIN();
