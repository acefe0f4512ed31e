// nvfp4cal-kernels-demo: quantizes a generated toy decoder layer with every method and prints
// the statistics of NUMERICS §4 per tensor and method.
//
//   nvfp4cal-kernels-demo [--threads=N] [--rows_scale=K]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"

namespace {

struct ExampleLinear {
  const char* name;
  int64_t rows;
  int64_t cols;
  int fused_group;  // tensors of one group share their global amax (q|k|v, gate|up)
};

void PrintUsage() {
  std::printf(
      "usage: nvfp4cal-kernels-demo [--threads=N] [--rows_scale=K]\n"
      "Quantizes a generated toy decoder layer (bf16 weights, positive-definite Hessian\n"
      "blocks) with the max, mse, local_hessian and dss methods on the CPU backend and\n"
      "prints, per tensor and method: global amax g, blocks, the method's objective before\n"
      "(max method) and after, squared error before/after, blocks whose scale changed, and\n"
      "for dss the blocks that chose beta != 1 and a neighbouring FP8 scale.\n"
      "  --threads=N     worker threads (default: all hardware threads)\n"
      "  --rows_scale=K  multiply every tensor's rows by K (default 1)\n");
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0;
  int rows_scale = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      PrintUsage();
      return 0;
    } else if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      threads = std::atoi(argv[i] + 10);
    } else if (std::strncmp(argv[i], "--rows_scale=", 13) == 0) {
      rows_scale = std::atoi(argv[i] + 13);
    } else {
      std::fprintf(stderr, "nvfp4cal-kernels-demo: unknown argument %s (see --help)\n", argv[i]);
      return 2;
    }
  }
  if (threads < 0 || rows_scale < 1) {
    std::fprintf(stderr, "nvfp4cal-kernels-demo: --threads must be >= 0, --rows_scale >= 1\n");
    return 2;
  }

  const std::vector<ExampleLinear> layer = {
      {"self_attn.q_proj", 512, 512, 0}, {"self_attn.k_proj", 128, 512, 0},
      {"self_attn.v_proj", 128, 512, 0}, {"self_attn.o_proj", 512, 512, 1},
      {"mlp.gate_proj", 1024, 512, 2},   {"mlp.up_proj", 1024, 512, 2},
      {"mlp.down_proj", 512, 1024, 3},
  };
  const nvfp4cal::Method methods[] = {nvfp4cal::Method::kMax, nvfp4cal::Method::kMse,
                                      nvfp4cal::Method::kLocalHessian, nvfp4cal::Method::kDss};
  auto search = nvfp4cal::MakeCpuScaleSearch({threads, 4096});

  // Weights, Hessians (one per distinct input, shared by q/k/v and gate/up) and group amax.
  std::vector<std::vector<uint16_t>> weights;
  std::vector<float> group_amax(4, 0.0f);
  for (size_t t = 0; t < layer.size(); ++t) {
    weights.push_back(
        nvfp4cal::MakeExampleWeightsBf16(layer[t].rows * rows_scale, layer[t].cols, 1000 + t));
    nvfp4cal::WeightView view{weights.back().data(), nvfp4cal::DType::kBFloat16,
                              layer[t].rows * rows_scale, layer[t].cols};
    absl::StatusOr<float> amax = nvfp4cal::ComputeGlobalAmax(view);
    if (!amax.ok()) {
      std::fprintf(stderr, "%s\n", amax.status().ToString().c_str());
      return 1;
    }
    float& g = group_amax[static_cast<size_t>(layer[t].fused_group)];
    g = std::max(g, *amax);
  }
  const std::vector<float> hessian_512 = nvfp4cal::MakeExampleHessianBlocks(512 / 16, 7);
  const std::vector<float> hessian_attn_out = nvfp4cal::MakeExampleHessianBlocks(512 / 16, 8);
  const std::vector<float> hessian_mlp_in = nvfp4cal::MakeExampleHessianBlocks(512 / 16, 9);
  const std::vector<float> hessian_1024 = nvfp4cal::MakeExampleHessianBlocks(1024 / 16, 10);
  const std::vector<float>* hessians[] = {&hessian_512, &hessian_attn_out, &hessian_mlp_in,
                                          &hessian_1024};

  std::printf("nvfp4cal kernels demo: toy decoder layer, bf16 weights, CPU backend\n");
  std::printf("objective = squared error (max, mse) or sum of e^T H_j e (local_hessian, dss);\n");
  std::printf("'before' = the max method on the same tensor and global scale.\n\n");
  std::printf("%-18s %-13s %10s %7s %12s %12s %8s %11s %11s %7s %7s %7s %8s\n", "tensor", "method",
              "g", "blocks", "obj_before", "obj_after", "obj_chg", "mse_before", "mse_after",
              "changed", "beta!=1", "off!=0", "ms");
  for (size_t t = 0; t < layer.size(); ++t) {
    for (nvfp4cal::Method method : methods) {
      nvfp4cal::QuantizeRequest request;
      request.weights = {weights[t].data(), nvfp4cal::DType::kBFloat16, layer[t].rows * rows_scale,
                         layer[t].cols};
      const std::vector<float>& h = *hessians[layer[t].fused_group];
      request.hessians = {h.data(), static_cast<int64_t>(h.size() / 256)};
      request.params.method = method;
      request.global_amax = group_amax[static_cast<size_t>(layer[t].fused_group)];
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<nvfp4cal::QuantizedTensor> result = search->Quantize(request);
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count();
      if (!result.ok()) {
        std::fprintf(stderr, "%s %s: %s\n", layer[t].name,
                     std::string(nvfp4cal::MethodName(method)).c_str(),
                     result.status().ToString().c_str());
        return 1;
      }
      const nvfp4cal::TensorStats& s = result->stats;
      const double change =
          s.objective_before > 0
              ? 100.0 * (s.objective_after - s.objective_before) / s.objective_before
              : 0.0;
      std::printf(
          "%-18s %-13s %10.4g %7lld %12.5g %12.5g %7.2f%% %11.4g %11.4g %7lld %7lld %7lld %8.1f\n",
          layer[t].name, std::string(nvfp4cal::MethodName(method)).c_str(), s.global_amax,
          static_cast<long long>(s.num_blocks), s.objective_before, s.objective_after, change,
          s.mse_before, s.mse_after, static_cast<long long>(s.blocks_scale_changed),
          static_cast<long long>(s.blocks_beta_not_one),
          static_cast<long long>(s.blocks_offset_not_zero), ms);
      if (s.zero_hessian_blocks > 0) {
        std::printf("warning: %s: %lld blocks have an all-zero Hessian block\n", layer[t].name,
                    static_cast<long long>(s.zero_hessian_blocks));
      }
    }
  }
  return 0;
}
