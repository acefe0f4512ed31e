// Loopback tests of the real service in-process on a free port: results byte-identical to the
// kernel library, the error table, cancellation, concurrency, health, info and metrics.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/calibration_server.h"
#include "tests/server/gated_executor.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::AppendTensor;
using ::nvfp4cal::server::testing::GatedExecutor;
using ::nvfp4cal::server::testing::HeaderOf;
using ::nvfp4cal::server::testing::JobRequestOf;
using ::nvfp4cal::server::testing::MakeTensor;
using ::nvfp4cal::server::testing::Reference;
using ::nvfp4cal::server::testing::RunSession;
using ::nvfp4cal::server::testing::Scrape;
using ::nvfp4cal::server::testing::SessionResult;
using ::nvfp4cal::server::testing::TestTensor;
using ::nvfp4cal::server::testing::UseFullLayout;
using ::nvfp4cal::server::testing::WeightChunkOf;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

class LoopbackTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(/*with_metrics=*/false); }

  // The metrics endpoint is off by default: stopping its HTTP server takes ~2 s.
  void StartServer(bool with_metrics) {
    server_.reset();
    ServerOptions options;
    options.address = "127.0.0.1:0";
    options.metrics_address = with_metrics ? "127.0.0.1:0" : "";
    options.devices.device = "cpu";  // CPU expectations, also on GPU machines
    options.drain_timeout = absl::Seconds(5);
    options.devices.cpu_workers = 2;
    options.devices.cpu_threads_per_worker = 1;
    options.limits.max_rows_per_item = 16;  // several items per tensor
    options.limits.max_inflight_chunks_per_stream = 2;
    options.limits.max_tensor_elements = 1 << 20;
    server_ = std::make_unique<CalibrationServer>(options);
    const absl::Status started = server_->Start();
    ASSERT_TRUE(started.ok()) << started;
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    stub_ = v1::Calibrator::NewStub(channel_);
  }

  SessionResult Run(const std::vector<TestTensor>& tensors) {
    std::vector<v1::QuantizeRequest> requests;
    for (const TestTensor& t : tensors) AppendTensor(t, &requests);
    return RunSession(stub_.get(), requests);
  }

  // Runs a stream expected to fail and returns its status.
  grpc::Status RunFailing(const std::vector<v1::QuantizeRequest>& requests) {
    return RunSession(stub_.get(), requests).status;
  }

  std::unique_ptr<CalibrationServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Calibrator::Stub> stub_;
};

void ExpectMatchesReference(const SessionResult& result, const TestTensor& t) {
  SCOPED_TRACE(t.name);
  ASSERT_TRUE(result.tensors.count(t.name));
  const auto& got = result.tensors.at(t.name);
  const QuantizedTensor want = Reference(t);
  EXPECT_EQ(got.rows_covered, t.rows);
  EXPECT_FALSE(got.chunk_after_summary);
  EXPECT_EQ(got.packed_codes, std::string(want.packed_codes.begin(), want.packed_codes.end()));
  EXPECT_EQ(got.scales, std::string(want.scales.begin(), want.scales.end()));
  ASSERT_TRUE(got.summary.has_value());
  const v1::TensorSummary& s = *got.summary;
  EXPECT_EQ(s.global_amax(), want.global_amax);
  EXPECT_EQ(s.global_scale(), want.global_scale);
  EXPECT_EQ(s.stats().method(), t.method);
  EXPECT_EQ(s.stats().num_blocks(), want.stats.num_blocks);
  EXPECT_EQ(s.stats().blocks_scale_changed(), want.stats.blocks_scale_changed);
  EXPECT_EQ(s.stats().blocks_beta_not_one(), want.stats.blocks_beta_not_one);
  EXPECT_DOUBLE_EQ(s.stats().objective_after(), want.stats.objective_after);
  EXPECT_DOUBLE_EQ(s.stats().mse_before(), want.stats.mse_before);
  EXPECT_DOUBLE_EQ(s.stats().hessian_error_after(), want.stats.hessian_error_after);
}

TEST_F(LoopbackTest, OneTensorIsByteIdenticalToKernelLibrary) {
  TestTensor t = MakeTensor("layers.0.mlp.down_proj", 72, 256, DType::kBFloat16, "dss", "h", 1);
  EXPECT_EQ(server_->DescribeBatches(), "0 batches");
  SessionResult result = Run({t});
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ExpectMatchesReference(result, t);
  // The stop log's summary counts the batches that ran the tensor's work items.
  const SchedulerStats stats = server_->scheduler_stats();
  EXPECT_GE(stats.batches, 1);
  EXPECT_GE(stats.batched_items, stats.batches);
  EXPECT_GT(stats.batched_item_bytes, 72 * 256 * 2);  // the weights at least
  EXPECT_THAT(server_->DescribeBatches(),
              StartsWith(absl::StrFormat("%d batches of %d work items (on average ", stats.batches,
                                         stats.batched_items)));
}

TEST_F(LoopbackTest, ManyTensorSessionIsByteIdenticalToKernelLibrary) {
  std::vector<TestTensor> tensors;
  tensors.push_back(MakeTensor("q_proj", 48, 128, DType::kBFloat16, "local_hessian", "attn", 2));
  TestTensor k = MakeTensor("k_proj", 32, 128, DType::kBFloat16, "dss", "attn", 3);
  k.blocks = tensors[0].blocks;  // shares the Hessian sent with q_proj
  k.send_hessian = false;
  tensors.push_back(k);
  TestTensor fused = MakeTensor("v_proj", 40, 128, DType::kFloat32, "max", "", 4);
  fused.global_amax = 10.0f;  // streamed row by row with a shared global amax
  tensors.push_back(fused);
  tensors.push_back(MakeTensor("o_proj", 17, 64, DType::kFloat16, "mse", "", 5));
  TestTensor full = MakeTensor("gate_proj", 33, 96, DType::kBFloat16, "dss", "mlp_full", 6);
  UseFullLayout(&full);
  tensors.push_back(full);
  SessionResult result = Run(tensors);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.tensors.size(), tensors.size());
  for (const TestTensor& t : tensors) ExpectMatchesReference(result, t);
}

struct ErrorCase {
  std::string name;
  grpc::StatusCode code;
  std::string message;
  std::vector<v1::QuantizeRequest> requests;
};

std::vector<ErrorCase> ErrorTable() {
  std::vector<ErrorCase> cases;
  const TestTensor plain = MakeTensor("w", 16, 64, DType::kFloat32, "max", "", 7);
  const TestTensor dss = MakeTensor("w", 16, 64, DType::kFloat32, "dss", "h", 8);
  auto with = [](const TestTensor& t) {
    std::vector<v1::QuantizeRequest> r;
    AppendTensor(t, &r);
    return r;
  };
  cases.push_back({"weights before header",
                   grpc::FAILED_PRECONDITION,
                   "weight chunk before any tensor header",
                   {WeightChunkOf(plain, 0, 4)}});
  {
    TestTensor t = dss;
    t.hessian_name = "";
    cases.push_back({"missing Hessian", grpc::FAILED_PRECONDITION,
                     "header.hessian.name is empty but method dss", with(t)});
  }
  cases.push_back({"weights before Hessian complete",
                   grpc::FAILED_PRECONDITION,
                   "before its Hessian 'h' was complete: 0 of 1024",
                   {HeaderOf(dss), WeightChunkOf(dss, 0, 4)}});
  cases.push_back({"chunk out of order",
                   grpc::FAILED_PRECONDITION,
                   "row_begin = 8, expected 0",
                   {HeaderOf(plain), WeightChunkOf(plain, 8, 4)}});
  {
    v1::QuantizeRequest beyond = WeightChunkOf(plain, 0, 16);
    std::vector<v1::QuantizeRequest> r = {HeaderOf(plain), beyond, beyond};
    r[2].mutable_weights()->set_row_begin(16);
    cases.push_back({"chunk beyond shape", grpc::FAILED_PRECONDITION,
                     "rows [16, 32) go beyond the declared shape of tensor 'w' (16 rows)", r});
  }
  {
    TestTensor t = plain;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(t.weights.data() + 4 * (3 * 64 + 5), &nan, 4);
    cases.push_back({"NaN weight", grpc::INVALID_ARGUMENT, "element (3, 5) is nan", with(t)});
  }
  {
    TestTensor t = dss;
    t.hessian[1] += 1.0f;  // H(0,1) != H(1,0) in block 0
    cases.push_back({"non-symmetric Hessian", grpc::INVALID_ARGUMENT,
                     "Hessian 'h' of tensor 'w': hessians: block 0 is not symmetric", with(t)});
  }
  {
    TestTensor t = dss;
    t.hessian[17] = std::numeric_limits<float>::infinity();
    cases.push_back(
        {"infinite Hessian", grpc::INVALID_ARGUMENT, "Hessians must be finite", with(t)});
  }
  {
    TestTensor t = plain;
    t.method = "awq";
    cases.push_back(
        {"unknown method", grpc::INVALID_ARGUMENT, "method: unknown value \"awq\"", with(t)});
  }
  {
    TestTensor t = plain;
    t.method = "gptq";
    cases.push_back({"gptq without a Hessian", grpc::FAILED_PRECONDITION,
                     "header.hessian.name is empty but method gptq of tensor 'w' needs a Hessian",
                     with(t)});
  }
  {
    std::vector<v1::QuantizeRequest> r = with(dss);
    r[0].mutable_header()->mutable_method()->set_act_order(true);
    cases.push_back({"gptq parameter with another method", grpc::INVALID_ARGUMENT,
                     "header.method has gptq parameters", r});
  }
  {
    std::vector<v1::QuantizeRequest> r = with(dss);
    r[0].mutable_header()->mutable_method()->set_beta_step(0.9f);
    cases.push_back({"parameter out of range", grpc::INVALID_ARGUMENT,
                     "params.beta_step = 0.9 is out of range [0.005, 0.5]", r});
  }
  {
    std::vector<v1::QuantizeRequest> r = {HeaderOf(plain)};
    r[0].mutable_header()->set_cols(40);
    cases.push_back({"cols not a multiple of 16", grpc::INVALID_ARGUMENT,
                     "header.cols = 40 of tensor 'w' is not a multiple of the block size 16", r});
  }
  {
    std::vector<v1::QuantizeRequest> r = {HeaderOf(plain)};
    r[0].mutable_header()->set_dtype(v1::DTYPE_UNSPECIFIED);
    cases.push_back({"bad dtype", grpc::INVALID_ARGUMENT, "header.dtype = 0 is not one of", r});
  }
  {
    TestTensor t = plain;
    t.global_amax = 0.0001f;
    cases.push_back({"global amax below weights", grpc::INVALID_ARGUMENT,
                     "global_amax = 0.0001 is below the weights' own amax", with(t)});
  }
  {
    std::vector<v1::QuantizeRequest> r = {HeaderOf(plain)};
    r[0].mutable_header()->set_rows(1 << 20);
    cases.push_back({"tensor over limit", grpc::RESOURCE_EXHAUSTED,
                     "has 1048576 x 64 elements; max_tensor_elements = 1048576", r});
  }
  cases.push_back({"stream ends early",
                   grpc::FAILED_PRECONDITION,
                   "stream ended before tensor 'w' was complete: 4 of 16 rows received",
                   {HeaderOf(plain), WeightChunkOf(plain, 0, 4)}});
  {
    v1::QuantizeRequest options;
    options.mutable_session()->set_priority(3);
    cases.push_back({"session options not first",
                     grpc::FAILED_PRECONDITION,
                     "session options must be the first message; got them as message 2",
                     {HeaderOf(plain), options}});
  }
  {
    std::vector<v1::QuantizeRequest> r = with(plain);
    r.push_back(HeaderOf(plain));
    cases.push_back(
        {"duplicate tensor name", grpc::INVALID_ARGUMENT, "header.name = 'w' was already used", r});
  }
  return cases;
}

TEST_F(LoopbackTest, ErrorTableCodesAndMessages) {
  for (const ErrorCase& c : ErrorTable()) {
    const grpc::Status status = RunFailing(c.requests);
    EXPECT_EQ(status.error_code(), c.code) << c.name << ": " << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.message)) << c.name;
  }
  // The server survived all of it.
  TestTensor t = MakeTensor("after_errors", 16, 64, DType::kBFloat16, "mse", "", 9);
  SessionResult result = Run({t});
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ExpectMatchesReference(result, t);
}

TEST_F(LoopbackTest, CancelMidStream) {
  TestTensor t = MakeTensor("big", 64, 128, DType::kBFloat16, "max", "", 10);
  t.global_amax = 100.0f;  // rows are quantized as they arrive
  grpc::ClientContext context;
  auto stream = stub_->Quantize(&context);
  ASSERT_TRUE(stream->Write(HeaderOf(t)));
  ASSERT_TRUE(stream->Write(WeightChunkOf(t, 0, 8)));
  v1::QuantizeResponse response;
  ASSERT_TRUE(stream->Read(&response));  // the first rows came back: the stream is mid-way
  EXPECT_EQ(response.result().row_begin(), 0);
  context.TryCancel();
  while (stream->Read(&response)) {
  }
  EXPECT_EQ(stream->Finish().error_code(), grpc::CANCELLED);
  // The server keeps serving.
  SessionResult result = Run({MakeTensor("next", 16, 64, DType::kBFloat16, "max", "", 11)});
  EXPECT_TRUE(result.status.ok()) << result.status.error_message();
}

TEST_F(LoopbackTest, ThirtyTwoConcurrentClients) {
  constexpr int kClients = 32;
  std::vector<TestTensor> tensors;
  for (int i = 0; i < kClients; ++i) {
    tensors.push_back(MakeTensor(absl::StrCat("t", i), 24 + i % 5, 64, DType::kBFloat16,
                                 i % 2 ? "dss" : "max", i % 2 ? "h" : "", 100 + i));
  }
  std::vector<SessionResult> results(kClients);
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      // Each client its own channel: separate connections, like separate processes.
      auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
      auto stub = v1::Calibrator::NewStub(channel);
      std::vector<v1::QuantizeRequest> requests;
      AppendTensor(tensors[static_cast<size_t>(i)], &requests);
      results[static_cast<size_t>(i)] = RunSession(stub.get(), requests);
    });
  }
  for (std::thread& c : clients) c.join();
  for (int i = 0; i < kClients; ++i) {
    ASSERT_TRUE(results[static_cast<size_t>(i)].status.ok())
        << i << ": " << results[static_cast<size_t>(i)].status.error_message();
    ExpectMatchesReference(results[static_cast<size_t>(i)], tensors[static_cast<size_t>(i)]);
  }
}

TEST_F(LoopbackTest, HealthLivenessReadinessAndWatch) {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  for (const char* service : {"", "nvfp4cal.v1.Calibrator"}) {
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    ASSERT_TRUE(health->Check(&context, request, &response).ok()) << service;
    EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  grpc::ClientContext unknown_context;
  grpc::health::v1::HealthCheckRequest unknown;
  unknown.set_service("no.such.Service");
  grpc::health::v1::HealthCheckResponse ignored;
  EXPECT_EQ(health->Check(&unknown_context, unknown, &ignored).error_code(), grpc::NOT_FOUND);

  grpc::ClientContext watch_context;
  grpc::health::v1::HealthCheckRequest readiness;
  readiness.set_service("nvfp4cal.v1.Calibrator");
  auto watch = health->Watch(&watch_context, readiness);
  grpc::health::v1::HealthCheckResponse update;
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  std::thread drain([this] { server_->Drain(); });
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  watch_context.TryCancel();
  drain.join();
}

TEST_F(LoopbackTest, ServerInfoAdvertisesMethodsAndLimits) {
  grpc::ClientContext context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.version(), kServerVersion);
  EXPECT_EQ(info.backend(), "cpu");
  std::vector<std::string> names;
  for (const v1::MethodInfo& m : info.methods()) names.push_back(m.name());
  EXPECT_THAT(names, ::testing::ElementsAre("max", "mse", "local_hessian", "dss", "gptq"));
  ASSERT_EQ(info.devices_size(), 2);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(info.devices(i).index(), i);
    EXPECT_EQ(info.devices(i).kind(), "cpu");
    EXPECT_EQ(info.devices(i).name(), "CPU worker");
    EXPECT_EQ(info.devices(i).memory_budget_bytes(), int64_t{1} << 30);
  }
  EXPECT_EQ(info.limits().max_tensor_elements(), 1 << 20);
  EXPECT_EQ(info.limits().max_rows_per_item(), 16);
  EXPECT_EQ(info.limits().max_jobs(), 256);
  EXPECT_EQ(info.limits().max_job_request_bytes(), 8 << 20);
}

TEST_F(LoopbackTest, StartLogsTheDeviceChoiceAndItsReason) {
  // auto's fallback is checked on the binary (server_binary_test).
  EXPECT_EQ(server_->backend(), "cpu");
  EXPECT_EQ(server_->device_selection(), "cpu -> cpu (as asked): 2 CPU worker(s)");
  const std::string config = server_->DescribeConfig();
  EXPECT_THAT(config, HasSubstr("address = 127.0.0.1:0\n"));
  EXPECT_THAT(config, HasSubstr(absl::StrCat("device_selection = ", server_->device_selection())));
  EXPECT_THAT(config, HasSubstr("keepalive_permit_without_calls = true\n"));
  EXPECT_THAT(config, HasSubstr("max_jobs = 256\n"));
}

TEST_F(LoopbackTest, MetricsEndpointCountsRequestsBytesAndBlocks) {
  StartServer(/*with_metrics=*/true);
  TestTensor t = MakeTensor("metered", 32, 64, DType::kBFloat16, "max", "", 12);
  ASSERT_TRUE(Run({t}).status.ok());
  RunFailing({WeightChunkOf(t, 0, 4)});
  v1::Job job;
  {
    grpc::ClientContext context;
    const TestTensor job_tensor = MakeTensor("job", 16, 64, DType::kBFloat16, "max", "", 13);
    ASSERT_TRUE(stub_->SubmitJob(&context, JobRequestOf(job_tensor), &job).ok());
  }
  ASSERT_TRUE(testing::WatchUntilDone(stub_.get(), job.job_id()).status.ok());
  ASSERT_GT(server_->metrics_port(), 0);
  const std::string text = Scrape(server_->metrics_port());
  EXPECT_THAT(text, HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_requests_total{code=\"OK\",method=\"Quantize\"} 1"));
  EXPECT_THAT(
      text,
      HasSubstr("nvfp4cal_requests_total{code=\"FAILED_PRECONDITION\",method=\"Quantize\"} 1"));
  // 32 * 64 / 16 blocks of the stream, 16 * 64 / 16 of the job.
  EXPECT_THAT(text, HasSubstr("nvfp4cal_blocks_quantized_total 192"));
  EXPECT_THAT(text, HasSubstr(absl::StrCat("nvfp4cal_bytes_out_total ",
                                           32 * 32 + 32 * 4 + 16 * 32 + 16 * 4)));
  EXPECT_THAT(text, HasSubstr(absl::StrCat("nvfp4cal_bytes_in_total ", (32 + 16) * 64 * 2)));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_requests_total{code=\"OK\",method=\"SubmitJob\"} 1"));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_requests_total{code=\"OK\",method=\"WatchJob\"} 1"));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_jobs_finished_total{state=\"SUCCEEDED\"} 1"));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_inflight_jobs 0"));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_queue_wait_seconds_count"));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_kernel_seconds_count"));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_rpc_duration_seconds_count{method=\"Quantize\"} 2"));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_queue_depth 0"));
  EXPECT_THAT(text, HasSubstr("nvfp4cal_device_memory_in_use_bytes 0"));
  // No CUDA device serves here: no driver-reported device memory.
  EXPECT_THAT(text, Not(HasSubstr("nvfp4cal_device_memory_used_bytes{")));
}

// One worker behind a gate, a queue of two items and one-row items: the queue is easy to fill
// while the gate holds the worker.
class GatedLoopbackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.address = "127.0.0.1:0";
    options.metrics_address = "";
    options.devices.device = "cpu";  // CPU expectations, also on GPU machines
    options.drain_timeout = absl::Seconds(5);
    options.devices.cpu_workers = 1;
    options.devices.cpu_threads_per_worker = 1;
    options.devices.max_queued_items = 2;
    options.devices.max_items_per_batch = 1;
    options.limits.max_rows_per_item = 1;
    options.limits.max_inflight_chunks_per_stream = 2;
    server_ = std::make_unique<CalibrationServer>(options);
    server_->set_executor_wrapper([this](std::unique_ptr<BatchExecutor> real) {
      auto gated = std::make_unique<GatedExecutor>(std::move(real));
      gate_ = gated.get();
      return gated;
    });
    ASSERT_TRUE(server_->Start().ok());
    stub_ = v1::Calibrator::NewStub(
        grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (gate_ != nullptr) gate_->Open();
    server_.reset();
  }

  // A tensor streamed one row per chunk, so the flow-control window keeps the queue within
  // its limit.
  SessionResult RunWithinTheWindow(const std::string& name, uint64_t seed) {
    TestTensor t = MakeTensor(name, 6, 64, DType::kBFloat16, "mse", "", seed);
    t.global_amax = 100.0f;
    t.rows_per_chunk = 1;
    std::vector<v1::QuantizeRequest> requests;
    AppendTensor(t, &requests);
    SessionResult result = RunSession(stub_.get(), requests);
    if (result.status.ok()) ExpectMatchesReference(result, t);
    return result;
  }

  std::unique_ptr<CalibrationServer> server_;
  GatedExecutor* gate_ = nullptr;
  std::unique_ptr<v1::Calibrator::Stub> stub_;
};

TEST_F(GatedLoopbackTest, FullQueueAnswersResourceExhaustedAtOnceWithLimitAndValue) {
  // A one-row job holds the only worker at the closed gate; the queue is empty.
  gate_->Close();
  auto submit = [this](const std::string& name, int64_t rows, v1::Job* job) {
    grpc::ClientContext context;
    return stub_->SubmitJob(
        &context, JobRequestOf(MakeTensor(name, rows, 64, DType::kBFloat16, "max", "", 70)), job);
  };
  v1::Job blocker;
  ASSERT_TRUE(submit("blocker", 1, &blocker).ok());
  ASSERT_TRUE(gate_->WaitUntilWaiting(1));

  // One chunk of 8 rows is 8 items; 2 fit. The status arrives while the gate is still closed:
  // nothing waited for the device.
  TestTensor t = MakeTensor("w", 8, 64, DType::kBFloat16, "max", "", 71);
  t.global_amax = 100.0f;
  t.rows_per_chunk = 8;
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(t, &requests);
  const SessionResult rejected = RunSession(stub_.get(), requests);
  EXPECT_EQ(rejected.status.error_code(), grpc::RESOURCE_EXHAUSTED);
  EXPECT_THAT(rejected.status.error_message(),
              HasSubstr("tensor 'w': scheduler queue is full: max_queued_items = 2, queued = 2"));

  // The failed stream's queued items were dropped; a two-item job fills the queue again and
  // the next job is refused the same way.
  v1::Job job;
  ASSERT_TRUE(submit("fill", 2, &job).ok());
  const v1::Job fill = job;
  const grpc::Status full = submit("one_more", 1, &job);
  EXPECT_EQ(full.error_code(), grpc::RESOURCE_EXHAUSTED);
  EXPECT_THAT(full.error_message(),
              HasSubstr("SubmitJob of tensor 'one_more': scheduler queue is full: "
                        "max_queued_items = 2, queued = 2"));

  grpc::ClientContext info_context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&info_context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.limits().max_queued_items(), 2);

  gate_->Open();
  // Once the queued jobs ran, the server takes new work again.
  for (const v1::Job& queued : {blocker, fill}) {
    const testing::WatchResult done = testing::WatchUntilDone(stub_.get(), queued.job_id());
    ASSERT_TRUE(done.status.ok());
    EXPECT_EQ(done.updates.back().state(), v1::JOB_STATE_SUCCEEDED);
  }
  const SessionResult after = RunWithinTheWindow("after", 73);
  EXPECT_TRUE(after.status.ok()) << after.status.error_message();
}

TEST_F(GatedLoopbackTest, DeviceOutOfMemoryFailsTheStreamAndTheServerKeepsServing) {
  gate_->FailBatch(0, absl::ResourceExhaustedError(
                          "CUDA device 0: cannot allocate a 4096-byte workspace (out of memory)"));
  const SessionResult failed = RunWithinTheWindow("oom", 74);
  EXPECT_EQ(failed.status.error_code(), grpc::RESOURCE_EXHAUSTED);
  // The stream's scheduler flow fails with the batch's status: seen first either by a row range of
  // the failed batch or by the next chunk's admission, which names only the tensor.
  EXPECT_THAT(failed.status.error_message(),
              ::testing::MatchesRegex("tensor 'oom'( rows \\[[0-9], [0-9]\\))?: CUDA device 0: "
                                      "cannot allocate a 4096-byte workspace \\(out of memory\\)"));
  const SessionResult next = RunWithinTheWindow("next", 75);
  EXPECT_TRUE(next.status.ok()) << next.status.error_message();
}

}  // namespace
}  // namespace nvfp4cal::server
