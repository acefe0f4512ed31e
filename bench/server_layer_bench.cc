// A whole Llama-3-8B-shaped decoder layer sent through nvfp4cal-server (issue 4's GPU figure).
//
// Starts the calibration server in-process on 127.0.0.1 (the device --device picks), opens one
// Quantize session and streams the layer's seven bf16 weights (q 4096x4096, k and v 1024x4096,
// o 4096x4096, gate and up 14336x4096, down 4096x14336) with their Hessian blocks (one per
// distinct input, shared by q/k/v and gate/up) in 1 MiB chunks, reading results as they come.
// Per method it prints the session's wall time, the time the same layer takes through the kernel
// library directly on the same device in the same run (CUDA: kernel time of one batched call;
// CPU: the call's wall time), and the difference: what the service adds (transport, protobuf,
// validation, scheduling, copies). Also the layer's MB/s (weights and Hessians in, codes and
// scales out).
//
//   server_layer_bench [--device=auto] [--methods=max,mse,local_hessian,dss] [--repeats=2]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/v1/calibrator.grpc.pb.h"
#include "server/calibration_server.h"

ABSL_FLAG(std::string, device, "auto", "auto|cpu|cuda for the calibration server");
ABSL_FLAG(std::string, methods, "max,mse,local_hessian,dss", "Methods to time, comma-separated");
ABSL_FLAG(int, repeats, 2, "Sessions per method; the fastest is reported");

namespace nvfp4cal::server {
namespace {

constexpr int64_t kChunkBytes = int64_t{1} << 20;

struct Linear {
  const char* name;
  int64_t rows;
  int64_t cols;
  const char* input;  // Hessian name: tensors reading the same input share it
};

struct LayerData {
  std::vector<Linear> linears;
  std::vector<std::vector<uint16_t>> weights;
  std::vector<float> amax;
  std::vector<std::vector<float>> hessians;  // per Linear (copies for shared inputs are equal)
};

LayerData MakeLayer() {
  LayerData layer;
  layer.linears = {{"q_proj", 4096, 4096, "attn_in"},    {"k_proj", 1024, 4096, "attn_in"},
                   {"v_proj", 1024, 4096, "attn_in"},    {"o_proj", 4096, 4096, "attn_out"},
                   {"gate_proj", 14336, 4096, "mlp_in"}, {"up_proj", 14336, 4096, "mlp_in"},
                   {"down_proj", 4096, 14336, "mlp_out"}};
  for (size_t t = 0; t < layer.linears.size(); ++t) {
    const Linear& l = layer.linears[t];
    layer.weights.push_back(MakeExampleWeightsBf16(l.rows, l.cols, 20 + t));
    const WeightView view{layer.weights.back().data(), DType::kBFloat16, l.rows, l.cols};
    layer.amax.push_back(*ComputeGlobalAmax(view));
    const uint64_t seed = std::hash<std::string>{}(l.input) % 1000;
    layer.hessians.push_back(MakeExampleHessianBlocks(l.cols / 16, seed));
  }
  return layer;
}

struct SessionResult {
  double wall_ms = 0.0;
  // From the tensors' summaries: time their row ranges waited in the scheduler and ran in
  // kernels (summed; a range's kernel time is that of the batch it ran in).
  double queue_ms = 0.0;
  double kernel_ms = 0.0;
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
  bool ok = false;
  std::string error;
};

SessionResult RunSession(v1::Calibrator::Stub* stub, const LayerData& layer,
                         const std::string& method) {
  const bool needs_hessian = method == "local_hessian" || method == "dss";
  grpc::ClientContext context;
  auto stream = stub->Quantize(&context);
  SessionResult result;
  const absl::Time start = absl::Now();
  std::thread writer([&] {
    std::vector<std::string> sent_hessians;
    for (size_t t = 0; t < layer.linears.size(); ++t) {
      const Linear& l = layer.linears[t];
      v1::QuantizeRequest header;
      v1::TensorHeader* h = header.mutable_header();
      h->set_name(l.name);
      h->set_rows(l.rows);
      h->set_cols(l.cols);
      h->set_dtype(v1::DTYPE_BFLOAT16);
      h->mutable_method()->set_name(method);
      h->set_global_amax(layer.amax[t]);
      bool send_hessian = false;
      if (needs_hessian) {
        h->mutable_hessian()->set_name(l.input);
        h->mutable_hessian()->set_layout(v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL);
        send_hessian =
            std::find(sent_hessians.begin(), sent_hessians.end(), l.input) == sent_hessians.end();
        if (send_hessian) sent_hessians.push_back(l.input);
      }
      if (!stream->Write(header)) return;
      if (send_hessian) {
        const std::vector<float>& hs = layer.hessians[t];
        const int64_t per_chunk = kChunkBytes / 4;
        for (int64_t e = 0; e < static_cast<int64_t>(hs.size()); e += per_chunk) {
          const int64_t n = std::min<int64_t>(per_chunk, static_cast<int64_t>(hs.size()) - e);
          v1::QuantizeRequest chunk;
          chunk.mutable_hessian()->set_element_offset(e);
          chunk.mutable_hessian()->set_data(reinterpret_cast<const char*>(hs.data() + e),
                                            static_cast<size_t>(n * 4));
          result.bytes_in += n * 4;
          if (!stream->Write(chunk)) return;
        }
      }
      const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkBytes / (l.cols * 2));
      const char* bytes = reinterpret_cast<const char*>(layer.weights[t].data());
      for (int64_t r = 0; r < l.rows; r += rows_per_chunk) {
        const int64_t n = std::min(rows_per_chunk, l.rows - r);
        v1::QuantizeRequest chunk;
        chunk.mutable_weights()->set_row_begin(r);
        chunk.mutable_weights()->set_num_rows(n);
        chunk.mutable_weights()->set_data(bytes + r * l.cols * 2,
                                          static_cast<size_t>(n * l.cols * 2));
        result.bytes_in += n * l.cols * 2;
        if (!stream->Write(chunk)) return;
      }
    }
    stream->WritesDone();
  });
  v1::QuantizeResponse response;
  while (stream->Read(&response)) {
    if (response.has_result()) {
      result.bytes_out += static_cast<int64_t>(response.result().packed_codes().size() +
                                               response.result().scales().size());
    }
    if (response.has_summary()) {
      result.queue_ms += static_cast<double>(response.summary().timings().queue_wait_us()) / 1e3;
      result.kernel_ms += static_cast<double>(response.summary().timings().kernel_us()) / 1e3;
    }
  }
  writer.join();
  const grpc::Status status = stream->Finish();
  result.wall_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  result.ok = status.ok();
  result.error = status.error_message();
  return result;
}

// The same layer through the kernel library on the device the server uses: CUDA kernel time
// of one batched call, or the CPU backend's wall time.
double DirectMilliseconds(const LayerData& layer, const std::string& method_name, bool cuda) {
  const Method method = *ParseMethod(method_name);
  std::vector<QuantizeRequest> requests(layer.linears.size());
  for (size_t t = 0; t < layer.linears.size(); ++t) {
    const Linear& l = layer.linears[t];
    requests[t].weights = {layer.weights[t].data(), DType::kBFloat16, l.rows, l.cols};
    requests[t].hessians = {layer.hessians[t].data(), l.cols / 16};
    requests[t].params.method = method;
    requests[t].global_amax = layer.amax[t];
  }
  if (cuda) {
    CudaScaleSearchOptions options;
    options.memory_budget_bytes = int64_t{8} << 30;
    auto gpu = MakeCudaScaleSearch(options);
    if (!gpu.ok()) return -1.0;
    std::vector<std::vector<uint8_t>> codes(requests.size()), scales(requests.size());
    std::vector<TensorStats> stats(requests.size());
    std::vector<CudaScaleSearch::Slice> slices;
    for (size_t t = 0; t < requests.size(); ++t) {
      const Linear& l = layer.linears[t];
      codes[t].resize(static_cast<size_t>(l.rows * l.cols / 2));
      scales[t].resize(static_cast<size_t>(l.rows * l.cols / 16));
      slices.push_back({&requests[t],
                        layer.amax[t],
                        0,
                        l.rows,
                        {absl::MakeSpan(codes[t]), absl::MakeSpan(scales[t])},
                        &stats[t]});
    }
    double best = 1e30;
    for (int r = 0; r < 2; ++r) {
      if (!(*gpu)->QuantizeBatch(slices).ok()) return -1.0;
      best = std::min(best, (*gpu)->LastCallTiming().kernel_ms);
    }
    return best;
  }
  auto cpu = MakeCpuScaleSearch({});
  const absl::Time start = absl::Now();
  for (const QuantizeRequest& r : requests) {
    if (!cpu->Quantize(r).ok()) return -1.0;
  }
  return absl::ToDoubleMilliseconds(absl::Now() - start);
}

int Main() {
  ServerOptions options;
  options.address = "127.0.0.1:0";
  options.metrics_address = "";
  options.devices.device = absl::GetFlag(FLAGS_device);
  CalibrationServer calibrator(options);
  if (absl::Status s = calibrator.Start(); !s.ok()) {
    std::fprintf(stderr, "server_layer_bench: cannot start the server: %s\n", s.ToString().c_str());
    return 1;
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  auto stub = v1::Calibrator::NewStub(
      grpc::CreateCustomChannel(calibrator.address(), grpc::InsecureChannelCredentials(), args));
  const LayerData layer = MakeLayer();
  std::printf(
      "server_layer_bench: Llama-3-8B-shaped layer through a loopback server, --device=%s\n",
      absl::GetFlag(FLAGS_device).c_str());
  std::string reason;
  const std::string device = absl::GetFlag(FLAGS_device);
  const bool cuda = device == "cuda" || (device == "auto" && CudaDeviceAvailable(&reason));
  std::printf("%-14s %12s %12s %14s %10s %12s %12s\n", "method", "server ms", "direct ms",
              "service ms", "MB/s", "queued ms", "batches ms");
  const std::vector<std::string> methods =
      absl::StrSplit(absl::GetFlag(FLAGS_methods), ',', absl::SkipEmpty());
  for (const std::string& method : methods) {
    SessionResult best;
    for (int r = 0; r < absl::GetFlag(FLAGS_repeats); ++r) {
      SessionResult one = RunSession(stub.get(), layer, method);
      if (!one.ok) {
        std::fprintf(stderr, "%s: %s\n", method.c_str(), one.error.c_str());
        return 1;
      }
      if (r == 0 || one.wall_ms < best.wall_ms) best = one;
    }
    const double direct = DirectMilliseconds(layer, method, cuda);
    std::printf("%-14s %12.1f %12.1f %14.1f %10.0f %12.1f %12.1f\n", method.c_str(), best.wall_ms,
                direct, best.wall_ms - direct,
                static_cast<double>(best.bytes_in + best.bytes_out) / (best.wall_ms * 1e3),
                best.queue_ms, best.kernel_ms);
  }
  std::printf(
      "server: wall time of one Quantize session with the whole layer; direct: the kernel\n"
      "library on the same device (%s); service = server - direct: transport, protobuf,\n"
      "validation, scheduling and copies. queued / batches: the server's own summaries,\n"
      "summed over row ranges (time waiting in the scheduler; time of the batches that\n"
      "ran them, which include host-device copies and overlap across ranges).\n",
      cuda ? "CUDA kernel time of one batched call" : "CPU backend wall time");
  return 0;
}

}  // namespace
}  // namespace nvfp4cal::server

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return nvfp4cal::server::Main();
}
