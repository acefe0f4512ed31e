// GPU throughput of every method on a Llama-3-8B-shaped decoder layer (issue 3's benchmark).
//
// The layer's seven Linear weights (bf16, generated) with one Hessian per distinct input are
// quantized in one batched call per method. Reported per method: kernel time per layer (CUDA
// events) and x32 layers, candidate evaluations per second, achieved fraction of the GPU's FP32
// peak under the FLOP model below, and the speed-up over the CPU reference run on the same
// machine with every hardware thread.
//
// FLOP model per candidate evaluation (what the search must compute, not instructions issued):
// the error e = w - c * d is 2 FLOPs per element (32), e^T H e is 2 * 16 * 16 + 2 * 16 (544),
// the squared error 2 * 16 (32); the 16 divisions and the rounding are not counted.
//
//   cuda_layer_bench [--layers=32] [--cpu_rows_fraction=1.0] [--methods=max,mse,...] [--nofull]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"

#if defined(NVFP4CAL_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

namespace {

struct Linear {
  const char* name;
  int64_t rows;
  int64_t cols;
  int input;  // index of the Hessian (inputs shared by q/k/v and gate/up)
};

double CandidatesPerBlock(nvfp4cal::Method m) {
  switch (m) {
    case nvfp4cal::Method::kMax:
      return 1;
    case nvfp4cal::Method::kMse:
    case nvfp4cal::Method::kLocalHessian:
      return 126;
    case nvfp4cal::Method::kDss:
      return 126 + 3 * 21;
    default:  // gptq is not a ScaleSearch method
      return 0;
  }
  return 0;
}

double FlopsPerCandidate(nvfp4cal::Method m) {
  return nvfp4cal::MethodNeedsHessian(m) ? 32 + 544 : 32 + 32;
}

}  // namespace

int main(int argc, char** argv) {
  int layers = 32;
  double cpu_fraction = 1.0;
  std::string methods = "max,mse,local_hessian,dss";
  bool full = true;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--layers=", 9) == 0) {
      layers = std::atoi(argv[i] + 9);
    } else if (std::strncmp(argv[i], "--cpu_rows_fraction=", 20) == 0) {
      cpu_fraction = std::atof(argv[i] + 20);
    } else if (std::strncmp(argv[i], "--methods=", 10) == 0) {
      methods = argv[i] + 10;
    } else if (std::strcmp(argv[i], "--nofull") == 0) {
      full = false;
    } else {
      std::fprintf(stderr,
                   "usage: cuda_layer_bench [--layers=32] [--cpu_rows_fraction=1.0]\n"
                   "                        [--methods=max,mse,local_hessian,dss] [--nofull]\n"
                   "  --cpu_rows_fraction  time the CPU reference on this fraction of every\n"
                   "                       tensor's rows and scale up (it is much slower)\n"
                   "  --methods            comma-separated methods to run (default: all four)\n"
                   "  --nofull             skip the unpruned search (no comparison with it)\n");
      return 2;
    }
  }
  std::string reason;
  if (!nvfp4cal::CudaDeviceAvailable(&reason)) {
    std::fprintf(stderr, "cuda_layer_bench: %s\n", reason.c_str());
    return 1;
  }
  nvfp4cal::CudaScaleSearchOptions full_options;
  full_options.memory_budget_bytes = int64_t{8} << 30;
  nvfp4cal::CudaScaleSearchOptions unpruned_options = full_options;
  unpruned_options.search = nvfp4cal::CudaSearchAlgorithm::kFull;
  auto gpu = nvfp4cal::MakeCudaScaleSearch(full_options);  // the default: pruned search
  auto gpu_full = nvfp4cal::MakeCudaScaleSearch(unpruned_options);
  if (!gpu.ok() || !gpu_full.ok()) {
    std::fprintf(stderr, "cuda_layer_bench: %s\n", gpu.status().ToString().c_str());
    return 1;
  }
  double peak_tflops = 0.0;
#if defined(NVFP4CAL_HAVE_CUDA)
  int sms = 0, clock_khz = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  peak_tflops = 2.0 * 128.0 * sms * clock_khz * 1e3 / 1e12;  // FP32 FMA lanes per SM on sm_90
#endif
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::printf("device: %s, FP32 peak %.1f TFLOP/s (boost clock); CPU reference: %u threads\n",
              (*gpu)->DeviceDescription().c_str(), peak_tflops, threads);

  const std::vector<Linear> layer = {{"q_proj", 4096, 4096, 0},     {"k_proj", 1024, 4096, 0},
                                     {"v_proj", 1024, 4096, 0},     {"o_proj", 4096, 4096, 1},
                                     {"gate_proj", 14336, 4096, 2}, {"up_proj", 14336, 4096, 2},
                                     {"down_proj", 4096, 14336, 3}};
  std::vector<std::vector<uint16_t>> weights;
  for (size_t t = 0; t < layer.size(); ++t) {
    weights.push_back(nvfp4cal::MakeExampleWeightsBf16(layer[t].rows, layer[t].cols, 10 + t));
  }
  const std::vector<std::vector<float>> hessians = {
      nvfp4cal::MakeExampleHessianBlocks(4096 / 16, 1),
      nvfp4cal::MakeExampleHessianBlocks(4096 / 16, 2),
      nvfp4cal::MakeExampleHessianBlocks(4096 / 16, 3),
      nvfp4cal::MakeExampleHessianBlocks(14336 / 16, 4)};
  int64_t blocks = 0;
  for (const Linear& l : layer) blocks += l.rows * l.cols / 16;
  std::printf("layer: 7 Linear weights, %lld blocks of 16\n\n", static_cast<long long>(blocks));
  std::printf("%-14s %12s %12s %14s %10s %12s %12s %10s %10s\n", "method", "kernel ms",
              "x32 layers s", "candidates/s", "FP32 peak", "full ms", "CPU ms", "speed-up",
              "evaluated");

  auto cpu = nvfp4cal::MakeCpuScaleSearch({0, 4096});
  for (nvfp4cal::Method m : {nvfp4cal::Method::kMax, nvfp4cal::Method::kMse,
                             nvfp4cal::Method::kLocalHessian, nvfp4cal::Method::kDss}) {
    if (("," + methods + ",").find("," + std::string(nvfp4cal::MethodName(m)) + ",") ==
        std::string::npos) {
      continue;
    }
    std::vector<nvfp4cal::QuantizeRequest> requests(layer.size());
    std::vector<std::vector<uint8_t>> codes(layer.size()), scales(layer.size());
    std::vector<nvfp4cal::TensorStats> stats(layer.size());
    std::vector<nvfp4cal::CudaScaleSearch::Slice> slices;
    for (size_t t = 0; t < layer.size(); ++t) {
      requests[t].weights = {weights[t].data(), nvfp4cal::DType::kBFloat16, layer[t].rows,
                             layer[t].cols};
      const std::vector<float>& h = hessians[static_cast<size_t>(layer[t].input)];
      requests[t].hessians = {h.data(), static_cast<int64_t>(h.size() / 256)};
      requests[t].params.method = m;
      codes[t].resize(static_cast<size_t>(layer[t].rows * layer[t].cols / 2));
      scales[t].resize(static_cast<size_t>(layer[t].rows * layer[t].cols / 16));
      absl::StatusOr<float> amax = nvfp4cal::ComputeGlobalAmax(requests[t].weights);
      slices.push_back({&requests[t],
                        *amax,
                        0,
                        layer[t].rows,
                        {absl::MakeSpan(codes[t]), absl::MakeSpan(scales[t])},
                        &stats[t]});
    }
    // Warm-up, then the timed call.
    if (absl::Status s = (*gpu)->QuantizeBatch(slices); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }
    double kernel_ms = 1e30;
    double evaluated_per_block = 0.0;
    for (int rep = 0; rep < 3; ++rep) {
      for (auto& s : stats) s = nvfp4cal::TensorStats{};
      if (absl::Status s = (*gpu)->QuantizeBatch(slices); !s.ok()) return 1;
      kernel_ms = std::min(kernel_ms, (*gpu)->LastCallTiming().kernel_ms);
      evaluated_per_block = static_cast<double>((*gpu)->LastCallTiming().canonical_evaluations) /
                            static_cast<double>(blocks);
    }
    // The unpruned search (every candidate evaluated) on the same data: comparison and check.
    std::vector<std::vector<uint8_t>> full_codes = codes, full_scales = scales;
    std::vector<nvfp4cal::TensorStats> full_stats(layer.size());
    std::vector<nvfp4cal::CudaScaleSearch::Slice> full_slices = slices;
    for (size_t t = 0; t < layer.size(); ++t) {
      full_slices[t].output = {absl::MakeSpan(full_codes[t]), absl::MakeSpan(full_scales[t])};
      full_slices[t].stats = &full_stats[t];
    }
    double full_ms = 0.0;
    if (full) {
      if (absl::Status s = (*gpu_full)->QuantizeBatch(full_slices); !s.ok()) return 1;
      full_ms = (*gpu_full)->LastCallTiming().kernel_ms;
    }
    if (full && (full_codes != codes || full_scales != scales)) {
      std::fprintf(stderr, "mismatch between the pruned and the full GPU search\n");
      return 1;
    }
    // CPU reference on (a fraction of) the same rows.
    double cpu_ms = 0.0;
    for (size_t t = 0; t < layer.size(); ++t) {
      const int64_t rows = std::max<int64_t>(
          1, static_cast<int64_t>(static_cast<double>(layer[t].rows) * cpu_fraction));
      std::vector<uint8_t> c(static_cast<size_t>(rows * layer[t].cols / 2));
      std::vector<uint8_t> s(static_cast<size_t>(rows * layer[t].cols / 16));
      nvfp4cal::TensorStats st;
      const auto start = std::chrono::steady_clock::now();
      (void)cpu->QuantizeRows(requests[t], slices[t].global_amax, 0, rows,
                              {absl::MakeSpan(c), absl::MakeSpan(s)}, &st);
      cpu_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                    .count() *
                static_cast<double>(layer[t].rows) / static_cast<double>(rows);
      // The GPU's first rows must equal the CPU's.
      if (std::memcmp(c.data(), codes[t].data(), c.size()) != 0 ||
          std::memcmp(s.data(), scales[t].data(), s.size()) != 0) {
        std::fprintf(stderr, "mismatch between CPU and GPU on %s\n", layer[t].name);
        return 1;
      }
    }
    const double candidates = static_cast<double>(blocks) * CandidatesPerBlock(m);
    const double per_s = candidates / (kernel_ms * 1e-3);
    const double tflops = per_s * FlopsPerCandidate(m) / 1e12;
    std::printf("%-14s %12.2f %12.3f %14.3e %9.1f%% %12.2f %12.1f %9.0fx %10.1f\n",
                std::string(nvfp4cal::MethodName(m)).c_str(), kernel_ms, kernel_ms * layers / 1e3,
                per_s, 100.0 * tflops / peak_tflops, full_ms, cpu_ms, cpu_ms / kernel_ms,
                evaluated_per_block);
  }
  return 0;
}
