// Per-row-range overhead of the server's CPU path: one 256 x 4096 bf16 tensor with Hessian
// blocks quantized in row ranges of 1 to 256 rows, each range the way the server's executor ran
// it before (ScaleSearch::QuantizeRows: the Hessian blocks re-checked, the rows re-scanned, g
// re-checked and the blocks' pruning bounds recomputed per range) and runs it now
// (QuantizeValidatedRows with the bounds the session or job computed once per Hessian; the
// data was checked on arrival). Same backend, same data, same run; the outputs are compared.
//
//   cpu_row_range_bench [--benchmark_filter=dss] [google benchmark flags]
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/validation.h"

namespace nvfp4cal {
namespace {

constexpr int64_t kRows = 256;
constexpr int64_t kCols = 4096;

struct Fixture {
  std::vector<uint16_t> weights = MakeExampleWeightsBf16(kRows, kCols, 1);
  std::vector<float> hessians = MakeExampleHessianBlocks(kCols / 16, 2);
};

const Fixture& Data() {
  static const Fixture* fixture = new Fixture();
  return *fixture;
}

// range(0): method; range(1): rows per range; range(2): 1 = prevalidated (now), 0 = checked.
void BM_RowRanges(benchmark::State& state) {
  const Method method = static_cast<Method>(state.range(0));
  const int64_t rows_per_range = state.range(1);
  const bool prevalidated = state.range(2) == 1;
  const Fixture& data = Data();
  // One thread, as one server worker with --cpu_threads_per_worker=1.
  auto search = MakeCpuScaleSearch({1, 4096});
  QuantizeRequest request;
  request.weights = {data.weights.data(), DType::kBFloat16, kRows, kCols};
  request.hessians = {data.hessians.data(), kCols / 16};
  request.params.method = method;
  const float g = *ComputeGlobalAmax(request.weights);
  const SharedHessianPruning pruning = ComputeSharedHessianPruning(request.hessians);
  if (prevalidated) pruning.AttachTo(&request);
  // Checked once, as a session or job does: the tensor, then its rows.
  const ValidatedRows all = ValidateQuantizeRequest(request)->AllRows();
  std::vector<uint8_t> codes(static_cast<size_t>(kRows * kCols / 2));
  std::vector<uint8_t> scales(static_cast<size_t>(kRows * kCols / 16));
  for (auto _ : state) {
    for (int64_t r = 0; r < kRows; r += rows_per_range) {
      const int64_t end = std::min(kRows, r + rows_per_range);
      RowRangeOutput out{
          absl::MakeSpan(codes).subspan(static_cast<size_t>(r * kCols / 2),
                                        static_cast<size_t>((end - r) * kCols / 2)),
          absl::MakeSpan(scales).subspan(static_cast<size_t>(r * kCols / 16),
                                         static_cast<size_t>((end - r) * kCols / 16))};
      TensorStats stats;
      const absl::Status s =
          prevalidated ? search->QuantizeValidatedRows(*all.Subrange(r, end - r), out, &stats)
                       : search->QuantizeRows(request, g, r, end, out, &stats);
      if (!s.ok()) {
        state.SkipWithError(s.ToString().c_str());
        return;
      }
    }
    benchmark::DoNotOptimize(scales.data());
  }
  // The bytes must not depend on the path.
  request.global_amax = g;
  absl::StatusOr<QuantizedTensor> whole = search->Quantize(request);
  if (!whole.ok() || whole->scales != scales || whole->packed_codes != codes) {
    state.SkipWithError("row ranges differ from the whole tensor");
    return;
  }
  const double ranges = static_cast<double>((kRows + rows_per_range - 1) / rows_per_range) *
                        static_cast<double>(state.iterations());
  state.counters["ranges/s"] = benchmark::Counter(ranges, benchmark::Counter::kIsRate);
  state.counters["rows/s"] =
      benchmark::Counter(static_cast<double>(kRows) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
  state.SetLabel(std::string(MethodName(method)) + ", " + std::to_string(rows_per_range) +
                 " rows/range, " + (prevalidated ? "checked once (now)" : "checked per range"));
}

void Args(benchmark::internal::Benchmark* b) {
  for (Method m : {Method::kMax, Method::kDss}) {
    for (int64_t rows : {1, 4, 16, 256}) {
      b->Args({static_cast<int>(m), rows, 0});
      b->Args({static_cast<int>(m), rows, 1});
    }
  }
}

BENCHMARK(BM_RowRanges)->Apply(Args)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace nvfp4cal

BENCHMARK_MAIN();
