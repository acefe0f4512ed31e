// The real nvfp4cal-server binary as a subprocess: SIGTERM in the middle of a stream lets the
// accepted tensor finish, refuses new tensors with UNAVAILABLE, flips readiness and exits 0.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "tests/server/server_process.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::HeaderOf;
using ::nvfp4cal::server::testing::MakeTensor;
using ::nvfp4cal::server::testing::Reference;
using ::nvfp4cal::server::testing::ServerProcess;
using ::nvfp4cal::server::testing::TestTensor;
using ::nvfp4cal::server::testing::WeightChunkOf;
using ::testing::HasSubstr;
using ::testing::Not;
using HealthResponse = grpc::health::v1::HealthCheckResponse;

TEST(ServerBinary, SigtermMidStreamFinishesAcceptedWorkAndExitsZero) {
  ServerProcess server({NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0",
                        "--metrics_address=", "--drain_timeout=30s", "--max_rows_per_item=8",
                        "--cpu_threads_per_worker=1"});
  const std::string address = server.ReadLineStartingWith("listening on ");
  ASSERT_FALSE(address.empty()) << "server did not print its address";
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = v1::Calibrator::NewStub(channel);
  auto health = grpc::health::v1::Health::NewStub(channel);

  grpc::ClientContext watch_context;
  grpc::health::v1::HealthCheckRequest readiness;
  readiness.set_service("nvfp4cal.v1.Calibrator");
  auto watch = health->Watch(&watch_context, readiness);
  HealthResponse update;
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), HealthResponse::SERVING);

  // Stream A: half of a tensor sent, first rows already back.
  TestTensor t = MakeTensor("in_flight", 64, 128, DType::kBFloat16, "max", "", 21);
  t.global_amax = 100.0f;
  grpc::ClientContext a_context;
  auto a = stub->Quantize(&a_context);
  ASSERT_TRUE(a->Write(HeaderOf(t)));
  for (int64_t r = 0; r < 32; r += 8) ASSERT_TRUE(a->Write(WeightChunkOf(t, r, 8)));
  std::string codes;
  std::string scales;
  int64_t rows_back = 0;
  v1::QuantizeResponse response;
  auto take = [&](const v1::QuantizeResponse& r) {
    if (!r.has_result()) return;
    const size_t row = static_cast<size_t>(r.result().row_begin());
    codes.resize(std::max(codes.size(), (row + static_cast<size_t>(r.result().num_rows())) * 64));
    scales.resize(std::max(scales.size(), (row + static_cast<size_t>(r.result().num_rows())) * 8));
    codes.replace(row * 64, r.result().packed_codes().size(), r.result().packed_codes());
    scales.replace(row * 8, r.result().scales().size(), r.result().scales());
    rows_back += r.result().num_rows();
  };
  ASSERT_TRUE(a->Read(&response));
  take(response);

  // Stream B: accepted by the server (one tensor done), idle when the signal comes.
  grpc::ClientContext b_context;
  auto b = stub->Quantize(&b_context);
  TestTensor warmup = MakeTensor("warmup", 16, 64, DType::kBFloat16, "max", "", 23);
  warmup.global_amax = 100.0f;
  ASSERT_TRUE(b->Write(HeaderOf(warmup)));
  ASSERT_TRUE(b->Write(WeightChunkOf(warmup, 0, 16)));
  do {
    ASSERT_TRUE(b->Read(&response));
  } while (!response.has_summary());

  server.Signal(SIGTERM);
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), HealthResponse::NOT_SERVING);

  // New work on B is refused...
  b->Write(HeaderOf(MakeTensor("too_late", 16, 64, DType::kBFloat16, "max", "", 22)));
  b->WritesDone();
  while (b->Read(&response)) {
  }
  const grpc::Status b_status = b->Finish();
  EXPECT_EQ(b_status.error_code(), grpc::UNAVAILABLE);
  EXPECT_THAT(b_status.error_message(), HasSubstr("draining"));

  // ...while the tensor A had started completes.
  for (int64_t r = 32; r < 64; r += 8) ASSERT_TRUE(a->Write(WeightChunkOf(t, r, 8)));
  a->WritesDone();
  bool summary = false;
  while (a->Read(&response)) {
    take(response);
    summary = summary || response.has_summary();
  }
  const grpc::Status a_status = a->Finish();
  ASSERT_TRUE(a_status.ok()) << a_status.error_message();
  EXPECT_TRUE(summary);
  EXPECT_EQ(rows_back, 64);
  const QuantizedTensor want = Reference(t);
  EXPECT_EQ(codes, std::string(want.packed_codes.begin(), want.packed_codes.end()));
  EXPECT_EQ(scales, std::string(want.scales.begin(), want.scales.end()));

  watch_context.TryCancel();
  EXPECT_EQ(server.Wait(), 0);
}

TEST(ServerBinary, CudaWithoutAGpuExitsOneAndSaysWhy) {
  std::string reason;
  if (CudaDeviceAvailable(&reason)) GTEST_SKIP() << "a CUDA device is present: cuda starts";
  ServerProcess server(
      {NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0", "--metrics_address=", "--device=cuda"});
  EXPECT_EQ(server.ReadLineStartingWith("listening on "), "");
  EXPECT_EQ(server.Wait(), 1);
  EXPECT_THAT(server.Stderr(), HasSubstr("cannot start: FAILED_PRECONDITION: --device=cuda: " +
                                         reason + "; use --device=cpu or --device=auto"));
}

TEST(ServerBinary, AutoWithoutAGpuLogsTheCpuFallbackAndWhy) {
  std::string reason;
  if (CudaDeviceAvailable(&reason)) GTEST_SKIP() << "a CUDA device is present: auto picks it";
  ServerProcess server({NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0",
                        "--metrics_address=", "--device=auto", "--cpu_workers=3"});
  ASSERT_FALSE(server.ReadLineStartingWith("listening on ").empty());
  server.Signal(SIGTERM);
  EXPECT_EQ(server.Wait(), 0);
  EXPECT_THAT(server.Stderr(),
              HasSubstr("device_selection = auto -> cpu (" + reason + "): 3 CPU worker(s)\n"));
}

// The allocator setting is part of the effective configuration the server logs.
TEST(ServerBinary, LogsHowMuchFreedMemoryItKeeps) {
  for (const std::string& keep : {std::string(), std::string("0"), std::string("16")}) {
    std::vector<std::string> args = {NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0",
                                     "--metrics_address=", "--device=cpu"};
    if (!keep.empty()) args.push_back("--keep_freed_memory_mib=" + keep);
    ServerProcess server(args);
    ASSERT_FALSE(server.ReadLineStartingWith("listening on ").empty()) << keep;
    server.Signal(SIGTERM);
    EXPECT_EQ(server.Wait(), 0);
    EXPECT_THAT(server.Stderr(),
                HasSubstr("keep_freed_memory_mib = " + (keep.empty() ? "1024" : keep) + "\n"));
    EXPECT_THAT(server.Stderr(), Not(HasSubstr("no such setting")));
  }
}

// Nonsense limits are refused at start-up, naming the flag, the range and the value. (Before:
// each started; some made every request fail, --max_inflight_chunks_per_stream=0 made every
// session hang while health said SERVING, a port of 99999 listened on another port.)
TEST(ServerBinary, NonsenseFlagsExitOneNamingFlagRangeAndValue) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--max_inflight_chunks_per_stream=0",
       "--max_inflight_chunks_per_stream = 0 is out of range [1, "},
      {"--max_queued_items=0", "--max_queued_items = 0 is out of range [1, "},
      {"--max_queued_items=-1", "--max_queued_items = -1 is out of range [1, "},
      {"--memory_budget_bytes=-5", "--memory_budget_bytes = -5 is out of range [1048576, "},
      {"--max_concurrent_streams=-1", "--max_concurrent_streams = -1 is out of range [1, "},
      {"--max_tensor_elements=-1", "--max_tensor_elements = -1 is out of range [16, "},
      {"--max_jobs=0", "--max_jobs = 0 is out of range [1, "},
      {"--drain_timeout=-1s", "--drain_timeout = -1s is out of range [0s, 24h]"},
      {"--cpu_workers=0", "--cpu_workers = 0 is out of range [1, 1024]"},
      {"--cuda_workers_per_device=17", "--cuda_workers_per_device = 17 is out of range [1, 16]"},
      {"--max_send_message_bytes=100", "--max_send_message_bytes = 100 is out of range [65536, "},
      {"--max_receive_message_bytes=4294967296",
       "--max_receive_message_bytes = 4294967296 is out of range [65536, 2147483647]"},
      {"--stream_idle_timeout=-5s", "--stream_idle_timeout = -5s is out of range [0s, 24h]"},
      {"--max_unsent_result_bytes_per_stream=0",
       "--max_unsent_result_bytes_per_stream = 0 is out of range [1, "},
      {"--address=127.0.0.1:99999",
       "--address = \"127.0.0.1:99999\": port \"99999\" is not a number in [0, 65535]"},
      {"--metrics_address=localhost", "--metrics_address = \"localhost\" is not host:port"},
      {"--keep_freed_memory_mib=-1", "--keep_freed_memory_mib = -1 is out of range [0, 2047]"},
      {"--keep_freed_memory_mib=2048", "--keep_freed_memory_mib = 2048 is out of range [0, 2047]"},
  };
  for (const auto& [flag, message] : cases) {
    std::vector<std::string> args = {NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0",
                                     "--metrics_address=", "--device=cpu"};
    args.push_back(flag);
    ServerProcess server(args);
    if (!server.ReadLineStartingWith("listening on ").empty()) {
      server.Signal(SIGKILL);  // started: fail, do not wait for a server that serves
      ADD_FAILURE() << flag << " was accepted: the server started";
      continue;
    }
    EXPECT_EQ(server.Wait(), 1) << flag;
    EXPECT_THAT(server.Stderr(), HasSubstr(message)) << flag;
  }
}

// A named pipe given as a token, certificate or key file is refused at start-up naming it,
// instead of blocking in open() before the server listens.
TEST(ServerBinary, FifoGivenForAFileExitsOneNamingIt) {
  char dir_template[] = "/tmp/nvfp4cal-fifo-XXXXXX";
  const std::string dir = mkdtemp(dir_template);
  const std::string fifo = dir + "/pipe";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  for (const std::string& flag :
       {"--auth_token_file=" + fifo, "--tls_cert=" + fifo + " --tls_key=" + fifo}) {
    std::vector<std::string> args = {NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0",
                                     "--metrics_address=", "--device=cpu"};
    for (absl::string_view part : absl::StrSplit(flag, ' ')) args.emplace_back(part);
    ServerProcess server(args);
    EXPECT_EQ(server.ReadLineStartingWith("listening on "), "") << flag;
    EXPECT_EQ(server.Wait(), 1) << flag;
    EXPECT_THAT(server.Stderr(), HasSubstr(fifo + ": is a FIFO (named pipe), not a regular file"))
        << flag;
  }
  unlink(fifo.c_str());
  rmdir(dir.c_str());
}

}  // namespace
}  // namespace nvfp4cal::server
