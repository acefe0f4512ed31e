// Loopback benchmark of nvfp4cal-server beside a plain gRPC bytes-echo stream (issue 4).
//
// Two in-process servers on 127.0.0.1: the real calibration service (CalibrationServer, the
// device --device picks) and an echo server whose generic callback service writes every message
// it reads straight back. The same client code drives both with the same messages: the echo
// client calls "/nvfp4cal.v1.Calibrator/Quantize" on the echo server, which returns the
// request bytes (parsed as responses with unknown fields, so payload sizes are comparable).
//
//   1. Streaming throughput: --streams clients, each one Quantize session sending tensors of
//      --tensor_rows x --cols bf16 in --chunk_rows chunks (streamed: global_amax in the header)
//      for --seconds. MB/s = (weight bytes sent + code and scale bytes received) / time; for
//      the echo, (bytes sent + bytes echoed) / time.
//   2. Small-request latency under load: while the streams of 1 run, one client sends small
//      tensors (--small_rows x --cols), each in a new session, and waits for its summary; p50
//      and p99 over --seconds. The echo side does the same against an echo under echo load.
//
// The ratio quantize / echo of 1 is the server's efficiency target (>= 70%). On the CPU
// backend the kernel's compute, not the transport, bounds it; the GPU is what the target is for.
//
//   server_bench [--device=auto] [--streams=2] [--seconds=3] [--method=max]
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/grpcpp.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/v1/calibrator.grpc.pb.h"
#include "server/calibration_server.h"

ABSL_FLAG(std::string, device, "auto", "auto|cpu|cuda for the calibration server");
ABSL_FLAG(int, cpu_workers, 1, "CPU scheduler workers (CPU backend)");
ABSL_FLAG(int, streams, 2, "Parallel streaming clients");
ABSL_FLAG(double, seconds, 3.0, "Duration of each measurement");
ABSL_FLAG(std::string, method, "max", "Block-scale method");
ABSL_FLAG(int64_t, cols, 4096, "Columns of every tensor");
ABSL_FLAG(int64_t, chunk_rows, 128, "Rows per weight chunk (128 x 4096 bf16 = 1 MiB)");
ABSL_FLAG(int64_t, tensor_rows, 1024, "Rows per streamed tensor");
ABSL_FLAG(int64_t, small_rows, 16, "Rows of a small request");

namespace nvfp4cal::server {
namespace {

constexpr int kEchoWindow = 8;  // messages the echo reads ahead of its writes

// Writes every message it reads back, reading ahead up to kEchoWindow messages.
class EchoReactor : public grpc::ServerGenericBidiReactor {
 public:
  EchoReactor() {
    absl::MutexLock lock(&mu_);
    reading_ = true;
    StartRead(&read_);
  }

  void OnReadDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      if (ok) {
        queue_.push_back(std::move(read_));
      } else {
        read_closed_ = true;
      }
      Decide(&actions);
    }
    Perform(actions);
  }
  void OnWriteDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) read_closed_ = true, queue_.clear();
      Decide(&actions);
    }
    Perform(actions);
  }
  void OnDone() override { delete this; }

 private:
  struct Actions {
    bool read = false;
    bool write = false;
    bool finish = false;
  };
  void Decide(Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    if (!writing_ && !queue_.empty()) {
      write_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = actions->write = true;
    }
    if (!reading_ && !read_closed_ && queue_.size() < kEchoWindow) {
      reading_ = actions->read = true;
    }
    if (read_closed_ && !reading_ && !writing_ && queue_.empty())
      finished_ = actions->finish = true;
  }
  // Outside mu_: gRPC may run a reaction inline.
  void Perform(const Actions& actions) {
    if (actions.write) StartWrite(&write_);
    if (actions.read) StartRead(&read_);
    if (actions.finish) Finish(grpc::Status::OK);
  }

  absl::Mutex mu_;
  grpc::ByteBuffer read_;
  grpc::ByteBuffer write_;
  std::deque<grpc::ByteBuffer> queue_ ABSL_GUARDED_BY(mu_);
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool read_closed_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

class EchoService : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* /*context*/) override {
    return new EchoReactor();
  }
};

// The messages of one streamed tensor: header, then its weight chunks.
struct Workload {
  v1::QuantizeRequest header;
  std::vector<v1::QuantizeRequest> chunks;
  int64_t weight_bytes = 0;
};

Workload MakeWorkload(int64_t rows, int64_t cols, int64_t chunk_rows, const std::string& method) {
  const std::vector<uint16_t> w = MakeExampleWeightsBf16(rows, cols, 11);
  float amax = 0.0f;
  for (uint16_t bits : w) {
    uint32_t f = static_cast<uint32_t>(bits & 0x7FFF) << 16;
    float value;
    std::memcpy(&value, &f, 4);
    amax = std::max(amax, value);
  }
  Workload workload;
  v1::TensorHeader* h = workload.header.mutable_header();
  h->set_rows(rows);
  h->set_cols(cols);
  h->set_dtype(v1::DTYPE_BFLOAT16);
  h->mutable_method()->set_name(method);
  h->set_global_amax(amax);
  const char* bytes = reinterpret_cast<const char*>(w.data());
  for (int64_t r = 0; r < rows; r += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - r);
    v1::QuantizeRequest request;
    request.mutable_weights()->set_row_begin(r);
    request.mutable_weights()->set_num_rows(n);
    request.mutable_weights()->set_data(bytes + r * cols * 2, static_cast<size_t>(n * cols * 2));
    workload.weight_bytes += n * cols * 2;
    workload.chunks.push_back(std::move(request));
  }
  return workload;
}

// Bytes moved by one client.
struct Traffic {
  int64_t sent = 0;      // weight payload
  int64_t received = 0;  // codes + scales (quantize) or echoed message bytes
  bool ok = true;
  std::string error;
};

int64_t PayloadBytes(const v1::QuantizeResponse& response) {
  if (response.has_result()) {
    return static_cast<int64_t>(response.result().packed_codes().size() +
                                response.result().scales().size());
  }
  if (response.has_summary()) return 0;
  return static_cast<int64_t>(response.ByteSizeLong());  // an echoed request
}

// One session: tensors of `workload` until `deadline` (at least `min_tensors`).
Traffic RunStream(v1::Calibrator::Stub* stub, const Workload& workload, absl::Time deadline,
                  int min_tensors, const std::string& prefix) {
  grpc::ClientContext context;
  auto stream = stub->Quantize(&context);
  Traffic traffic;
  std::thread writer([&] {
    v1::QuantizeRequest header = workload.header;
    for (int t = 0; t < min_tensors || absl::Now() < deadline; ++t) {
      header.mutable_header()->set_name(absl::StrCat(prefix, t));
      if (!stream->Write(header)) break;
      for (const v1::QuantizeRequest& chunk : workload.chunks) {
        if (!stream->Write(chunk)) break;
      }
      traffic.sent += workload.weight_bytes;
    }
    stream->WritesDone();
  });
  v1::QuantizeResponse response;
  int64_t received = 0;
  while (stream->Read(&response)) received += PayloadBytes(response);
  writer.join();
  const grpc::Status status = stream->Finish();
  traffic.received = received;
  traffic.ok = status.ok();
  traffic.error = status.error_message();
  return traffic;
}

struct LoadResult {
  double mb_per_s_in = 0.0;
  double mb_per_s_out = 0.0;
  std::vector<double> small_latency_us;
  bool ok = true;
  std::string error;
};

// --streams streaming clients for --seconds; with `measure_small`, one more client sends small
// single-tensor sessions back to back and records their latency.
LoadResult RunLoad(const std::string& address, const Workload& big, const Workload& small,
                   bool measure_small) {
  const int streams = absl::GetFlag(FLAGS_streams);
  const absl::Duration duration = absl::Seconds(absl::GetFlag(FLAGS_seconds));
  std::vector<Traffic> traffic(static_cast<size_t>(streams));
  std::vector<std::thread> clients;
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + duration;
  for (int i = 0; i < streams; ++i) {
    clients.emplace_back([&, i] {
      // A channel per client: separate connections, like separate processes.
      auto stub =
          v1::Calibrator::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
      traffic[static_cast<size_t>(i)] = RunStream(stub.get(), big, deadline, 1, "big");
    });
  }
  LoadResult result;
  if (measure_small) {
    auto stub =
        v1::Calibrator::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    for (int n = 0; absl::Now() < deadline || n < 10; ++n) {
      const absl::Time t0 = absl::Now();
      const Traffic one = RunStream(stub.get(), small, absl::InfinitePast(), 1, "small");
      result.small_latency_us.push_back(absl::ToDoubleMicroseconds(absl::Now() - t0));
      if (!one.ok) {
        result.ok = false;
        result.error = one.error;
        break;
      }
    }
  }
  for (std::thread& c : clients) c.join();
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  int64_t sent = 0;
  int64_t received = 0;
  for (const Traffic& t : traffic) {
    sent += t.sent;
    received += t.received;
    if (!t.ok) {
      result.ok = false;
      result.error = t.error;
    }
  }
  result.mb_per_s_in = static_cast<double>(sent) / seconds / 1e6;
  result.mb_per_s_out = static_cast<double>(received) / seconds / 1e6;
  return result;
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t i =
      std::min(values.size() - 1, static_cast<size_t>(p * static_cast<double>(values.size())));
  return values[i];
}

int Main() {
  ServerOptions options;
  options.address = "127.0.0.1:0";
  options.metrics_address = "";
  options.devices.device = absl::GetFlag(FLAGS_device);
  options.devices.cpu_workers = absl::GetFlag(FLAGS_cpu_workers);
  CalibrationServer calibrator(options);
  if (absl::Status s = calibrator.Start(); !s.ok()) {
    std::fprintf(stderr, "server_bench: cannot start the server: %s\n", s.ToString().c_str());
    return 1;
  }

  EchoService echo_service;
  grpc::ServerBuilder builder;
  int echo_port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &echo_port);
  builder.RegisterCallbackGenericService(&echo_service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.limits.max_receive_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.limits.max_send_message_bytes));
  std::unique_ptr<grpc::Server> echo = builder.BuildAndStart();
  if (echo == nullptr) {
    std::fprintf(stderr, "server_bench: cannot start the echo server\n");
    return 1;
  }
  const std::string echo_address = absl::StrCat("127.0.0.1:", echo_port);

  const int64_t cols = absl::GetFlag(FLAGS_cols);
  const std::string method = absl::GetFlag(FLAGS_method);
  const Workload big =
      MakeWorkload(absl::GetFlag(FLAGS_tensor_rows), cols, absl::GetFlag(FLAGS_chunk_rows), method);
  const Workload small =
      MakeWorkload(absl::GetFlag(FLAGS_small_rows), cols, absl::GetFlag(FLAGS_small_rows), method);
  std::printf("server_bench: %s\n", calibrator.device_selection().c_str());
  std::printf(
      "  %d streams of bf16 [%lld x %lld] tensors in %lld-row chunks (%.2f MiB), method "
      "%s, %.1f s per run; small requests: [%lld x %lld], one session each\n",
      absl::GetFlag(FLAGS_streams), static_cast<long long>(absl::GetFlag(FLAGS_tensor_rows)),
      static_cast<long long>(cols), static_cast<long long>(absl::GetFlag(FLAGS_chunk_rows)),
      static_cast<double>(big.chunks.front().weights().data().size()) / (1 << 20), method.c_str(),
      absl::GetFlag(FLAGS_seconds), static_cast<long long>(absl::GetFlag(FLAGS_small_rows)),
      static_cast<long long>(cols));

  // Warm-up: connections, allocator, the device's workspace.
  RunLoad(calibrator.address(), big, small, false);
  const LoadResult quantize = RunLoad(calibrator.address(), big, small, true);
  const LoadResult echoed = RunLoad(echo_address, big, small, true);
  if (!quantize.ok || !echoed.ok) {
    std::fprintf(stderr, "server_bench: a stream failed: %s%s\n", quantize.error.c_str(),
                 echoed.error.c_str());
    return 1;
  }
  const double q_total = quantize.mb_per_s_in + quantize.mb_per_s_out;
  const double e_total = echoed.mb_per_s_in + echoed.mb_per_s_out;
  std::printf("\n%-16s %10s %10s %12s %14s %14s %8s\n", "", "in MB/s", "out MB/s", "in+out MB/s",
              "small p50 us", "small p99 us", "small n");
  for (const auto& [name, r, total] :
       {std::tuple("quantize", &quantize, q_total), std::tuple("echo", &echoed, e_total)}) {
    std::printf("%-16s %10.1f %10.1f %12.1f %14.0f %14.0f %8zu\n", name, r->mb_per_s_in,
                r->mb_per_s_out, total, Percentile(r->small_latency_us, 0.5),
                Percentile(r->small_latency_us, 0.99), r->small_latency_us.size());
  }
  std::printf("\nthroughput quantize / echo (in+out): %.0f%% (target >= 70%%)\n",
              100.0 * q_total / e_total);
  std::printf("weights-in rate quantize / echo:     %.0f%%\n",
              100.0 * quantize.mb_per_s_in / echoed.mb_per_s_in);
  echo->Shutdown();
  calibrator.Drain();
  return 0;
}

}  // namespace
}  // namespace nvfp4cal::server

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return nvfp4cal::server::Main();
}
