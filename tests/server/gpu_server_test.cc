// The server on --device=cuda, in-process over loopback gRPC: sessions, concurrent clients and
// jobs batched together give codes and scales byte-identical to the CPU kernel library, the
// GPUs are advertised, and a device allocation failure fails only that batch's work. Every test
// skips, with the reason, when no CUDA device is usable (and in builds without CUDA).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#if defined(NVFP4CAL_HAVE_CUDA)
#include <cuda_runtime.h>
#endif
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "server/calibration_server.h"
#include "tests/server/gated_executor.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::AppendTensor;
using ::nvfp4cal::server::testing::GatedExecutor;
using ::nvfp4cal::server::testing::JobRequestOf;
using ::nvfp4cal::server::testing::MakeTensor;
using ::nvfp4cal::server::testing::MetricValue;
using ::nvfp4cal::server::testing::Reference;
using ::nvfp4cal::server::testing::RunSession;
using ::nvfp4cal::server::testing::Scrape;
using ::nvfp4cal::server::testing::SessionResult;
using ::nvfp4cal::server::testing::TestTensor;
using ::nvfp4cal::server::testing::UseFullLayout;
using ::nvfp4cal::server::testing::WatchUntilDone;
using ::testing::HasSubstr;

class GpuServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string reason;
    if (!CudaDeviceAvailable(&reason)) GTEST_SKIP() << "no CUDA device: " << reason;
    ServerOptions options;
    options.address = "127.0.0.1:0";
    options.metrics_address = "";
    options.drain_timeout = absl::Seconds(10);
    options.devices.device = "cuda";
    options.limits.max_rows_per_item = 64;
    server_ = std::make_unique<CalibrationServer>(options);
    server_->set_executor_wrapper([this](std::unique_ptr<BatchExecutor> real) {
      auto gated = std::make_unique<GatedExecutor>(std::move(real));
      gate_ = gated.get();
      return gated;
    });
    const absl::Status started = server_->Start();
    ASSERT_TRUE(started.ok()) << started;
    std::printf("[ devices   ] %s\n", server_->device_selection().c_str());
    stub_ = v1::Calibrator::NewStub(
        grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (gate_ != nullptr) gate_->Open();
    server_.reset();
  }

  std::unique_ptr<CalibrationServer> server_;
  GatedExecutor* gate_ = nullptr;
  std::unique_ptr<v1::Calibrator::Stub> stub_;
};

// Codes and scales byte for byte; statistics exactly where they are counts, and to summation
// order where they are sums.
void ExpectMatchesCpuLibrary(const SessionResult& result, const TestTensor& t) {
  SCOPED_TRACE(t.name);
  ASSERT_TRUE(result.tensors.count(t.name));
  const auto& got = result.tensors.at(t.name);
  const QuantizedTensor want = Reference(t);
  EXPECT_EQ(got.rows_covered, t.rows);
  EXPECT_EQ(got.packed_codes, std::string(want.packed_codes.begin(), want.packed_codes.end()));
  EXPECT_EQ(got.scales, std::string(want.scales.begin(), want.scales.end()));
  ASSERT_TRUE(got.summary.has_value());
  const v1::TensorSummary& s = *got.summary;
  EXPECT_EQ(s.global_amax(), want.global_amax);
  EXPECT_EQ(s.global_scale(), want.global_scale);
  EXPECT_EQ(s.stats().num_blocks(), want.stats.num_blocks);
  EXPECT_EQ(s.stats().blocks_scale_changed(), want.stats.blocks_scale_changed);
  EXPECT_EQ(s.stats().blocks_beta_not_one(), want.stats.blocks_beta_not_one);
  EXPECT_NEAR(s.stats().objective_after(), want.stats.objective_after,
              1e-9 * std::fabs(want.stats.objective_after));
}

TEST_F(GpuServerTest, MetricsReportDriverMemoryOfEveryGpu) {
  ServerOptions options;
  options.address = "127.0.0.1:0";
  options.metrics_address = "127.0.0.1:0";
  options.devices.device = "cuda";
  CalibrationServer server(options);
  ASSERT_TRUE(server.Start().ok());
  // The server's own workspace is allocated on first use; a session makes it real.
  auto stub = v1::Calibrator::NewStub(
      grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
  const TestTensor t = MakeTensor("m", 256, 512, DType::kBFloat16, "dss", "h", 41);
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(t, &requests);
  ASSERT_TRUE(RunSession(stub.get(), requests).status.ok());
  const std::string text = Scrape(server.metrics_port());
  const double used = MetricValue(text, "nvfp4cal_device_memory_used_bytes{device=\"0\"}");
  const double total = MetricValue(text, "nvfp4cal_device_memory_total_bytes{device=\"0\"}");
  EXPECT_GT(used, 0.0) << text;
  EXPECT_GT(total, used);
#if defined(NVFP4CAL_HAVE_CUDA)
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  EXPECT_EQ(total, static_cast<double>(total_bytes));
#endif
}

TEST_F(GpuServerTest, ServerInfoListsEveryGpuAsAWorker) {
  grpc::ClientContext context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.backend(), "cuda");
  ASSERT_GE(info.devices_size(), 1);
  for (int i = 0; i < info.devices_size(); ++i) {
    EXPECT_EQ(info.devices(i).index(), i);
    EXPECT_EQ(info.devices(i).kind(), "cuda");
    EXPECT_THAT(info.devices(i).name(), HasSubstr("sm_"));
    EXPECT_EQ(info.devices(i).memory_budget_bytes(), int64_t{1} << 30);
  }
  EXPECT_THAT(server_->device_selection(), ::testing::StartsWith("cuda -> cuda (as asked)"));
}

TEST_F(GpuServerTest, ManyTensorSessionIsByteIdenticalToCpuLibrary) {
  std::vector<TestTensor> tensors;
  tensors.push_back(MakeTensor("q_proj", 512, 1024, DType::kBFloat16, "local_hessian", "attn", 2));
  TestTensor k = MakeTensor("k_proj", 256, 1024, DType::kBFloat16, "dss", "attn", 3);
  k.blocks = tensors[0].blocks;  // shares the Hessian sent with q_proj
  k.send_hessian = false;
  tensors.push_back(k);
  TestTensor v = MakeTensor("v_proj", 300, 1024, DType::kFloat32, "max", "", 4);
  v.global_amax = 10.0f;  // streamed row by row with a shared global amax
  tensors.push_back(v);
  tensors.push_back(MakeTensor("o_proj", 130, 512, DType::kFloat16, "mse", "", 5));
  TestTensor gate = MakeTensor("gate_proj", 200, 256, DType::kBFloat16, "dss", "mlp_full", 6);
  UseFullLayout(&gate);
  tensors.push_back(gate);
  for (TestTensor& t : tensors) t.rows_per_chunk = 100;
  std::vector<v1::QuantizeRequest> requests;
  for (const TestTensor& t : tensors) AppendTensor(t, &requests);
  const SessionResult result = RunSession(stub_.get(), requests);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  for (const TestTensor& t : tensors) ExpectMatchesCpuLibrary(result, t);
}

TEST_F(GpuServerTest, ConcurrentClientsAreByteIdenticalToCpuLibrary) {
  constexpr int kClients = 16;
  std::vector<TestTensor> tensors;
  for (int i = 0; i < kClients; ++i) {
    tensors.push_back(MakeTensor(absl::StrCat("t", i), 96 + 7 * i, 512, DType::kBFloat16,
                                 i % 2 ? "dss" : "mse", i % 2 ? "h" : "", 100 + i));
  }
  std::vector<SessionResult> results(kClients);
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
      auto stub = v1::Calibrator::NewStub(channel);
      std::vector<v1::QuantizeRequest> requests;
      AppendTensor(tensors[static_cast<size_t>(i)], &requests);
      results[static_cast<size_t>(i)] = RunSession(stub.get(), requests);
    });
  }
  for (std::thread& c : clients) c.join();
  for (int i = 0; i < kClients; ++i) {
    const SessionResult& r = results[static_cast<size_t>(i)];
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    ExpectMatchesCpuLibrary(r, tensors[static_cast<size_t>(i)]);
  }
}

TEST_F(GpuServerTest, OneQuantizeBatchCallRunsRowRangesOfSeveralJobs) {
  // Hold every worker at the gate with one-item jobs, queue two jobs behind them, release.
  grpc::ClientContext info_context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&info_context, v1::GetServerInfoRequest(), &info).ok());
  gate_->Close();
  std::vector<std::string> blockers;
  for (int w = 0; w < info.devices_size(); ++w) {
    grpc::ClientContext context;
    v1::Job job;
    ASSERT_TRUE(stub_
                    ->SubmitJob(&context,
                                JobRequestOf(MakeTensor(absl::StrCat("blocker", w), 16, 64,
                                                        DType::kBFloat16, "max", "", 200 + w)),
                                &job)
                    .ok());
    blockers.push_back(job.job_id());
    ASSERT_TRUE(gate_->WaitUntilWaiting(w + 1));
  }
  const std::vector<TestTensor> tensors = {
      MakeTensor("a", 200, 512, DType::kBFloat16, "dss", "h", 210),
      MakeTensor("b", 150, 256, DType::kFloat16, "local_hessian", "h", 211),
      MakeTensor("c", 64, 1024, DType::kFloat32, "mse", "", 212)};
  std::vector<std::string> ids;
  for (const TestTensor& t : tensors) {
    grpc::ClientContext context;
    v1::Job job;
    ASSERT_TRUE(stub_->SubmitJob(&context, JobRequestOf(t), &job).ok());
    ids.push_back(job.job_id());
  }
  gate_->Open();
  for (size_t i = 0; i < tensors.size(); ++i) {
    ASSERT_TRUE(WatchUntilDone(stub_.get(), ids[i]).status.ok());
    grpc::ClientContext context;
    v1::GetJobRequest request;
    request.set_job_id(ids[i]);
    request.set_include_result(true);
    v1::Job job;
    ASSERT_TRUE(stub_->GetJob(&context, request, &job).ok());
    ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error_message();
    const QuantizedTensor want = Reference(tensors[i]);
    EXPECT_EQ(job.result().packed_codes(),
              std::string(want.packed_codes.begin(), want.packed_codes.end()))
        << tensors[i].name;
    EXPECT_EQ(job.result().scales(), std::string(want.scales.begin(), want.scales.end()))
        << tensors[i].name;
  }
  for (const std::string& id : blockers) ASSERT_TRUE(WatchUntilDone(stub_.get(), id).status.ok());
  // Some batch held row ranges of more than one job (the executor ran it as one QuantizeBatch).
  const std::vector<int> per_batch = gate_->TensorsPerBatch();
  EXPECT_GT(*std::max_element(per_batch.begin(), per_batch.end()), 1);
}

#if defined(NVFP4CAL_HAVE_CUDA)
TEST_F(GpuServerTest, DeviceAllocationFailureFailsTheStreamAndTheServerRecovers) {
  // A fresh server has no workspace yet: hold nearly all free memory of every GPU first.
  int count = 0;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess);
  std::vector<std::pair<int, void*>> held;
  for (int d = 0; d < count; ++d) {
    ASSERT_EQ(cudaSetDevice(d), cudaSuccess);
    for (size_t chunk = size_t{1} << 30; chunk >= (size_t{1} << 20);) {
      void* p = nullptr;
      if (cudaMalloc(&p, chunk) == cudaSuccess) {
        held.emplace_back(d, p);
      } else {
        (void)cudaGetLastError();
        chunk /= 2;
      }
    }
  }
  TestTensor t = MakeTensor("oom", 1024, 4096, DType::kBFloat16, "mse", "", 300);  // 8 MiB
  t.rows_per_chunk = 256;
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(t, &requests);
  const SessionResult failed = RunSession(stub_.get(), requests);
  EXPECT_EQ(failed.status.error_code(), grpc::RESOURCE_EXHAUSTED) << failed.status.error_message();
  EXPECT_THAT(failed.status.error_message(), HasSubstr("cannot allocate"));
  for (const auto& [d, p] : held) {
    cudaSetDevice(d);
    cudaFree(p);
  }
  const SessionResult retried = RunSession(stub_.get(), requests);
  ASSERT_TRUE(retried.status.ok()) << retried.status.error_message();
  ExpectMatchesCpuLibrary(retried, t);
}
#endif

}  // namespace
}  // namespace nvfp4cal::server
