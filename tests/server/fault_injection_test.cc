// Fault injection on the real service in-process: device allocation failures, kernel errors and
// slow kernels injected per tensor (FaultInjectingExecutor), and clients that disconnect
// mid-stream. The failing request gets its documented status, concurrent requests finish with
// the kernel library's bytes, the server keeps serving, and the metrics count the failures.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/calibration_server.h"
#include "tests/server/fault_injecting_executor.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::AppendTensor;
using ::nvfp4cal::server::testing::FaultInjectingExecutor;
using ::nvfp4cal::server::testing::JobRequestOf;
using ::nvfp4cal::server::testing::MakeTensor;
using ::nvfp4cal::server::testing::Reference;
using ::nvfp4cal::server::testing::RunSession;
using ::nvfp4cal::server::testing::SessionResult;
using ::nvfp4cal::server::testing::TestTensor;
using ::nvfp4cal::server::testing::WatchUntilDone;
using ::testing::HasSubstr;
using Fault = FaultInjectingExecutor::Fault;

std::string Scrape(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string body;
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0) {
    const std::string get = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
    if (write(fd, get.data(), get.size()) == static_cast<ssize_t>(get.size())) {
      char buffer[4096];
      for (ssize_t n; (n = read(fd, buffer, sizeof(buffer))) > 0;) {
        body.append(buffer, static_cast<size_t>(n));
      }
    }
  }
  close(fd);
  return body;
}

// The value of one sample line "name{labels} value" of a scrape, or -1 when absent.
double Sample(const std::string& text, const std::string& series) {
  size_t at = 0;
  while ((at = text.find(series, at)) != std::string::npos) {
    const bool line_start = at == 0 || text[at - 1] == '\n';
    const size_t value = at + series.size();
    if (line_start && value < text.size() && text[value] == ' ') {
      return std::stod(text.substr(value + 1, text.find('\n', value) - value - 1));
    }
    at = value;
  }
  return -1;
}

class FaultInjectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.address = "127.0.0.1:0";
    options.metrics_address = "127.0.0.1:0";
    options.devices.device = "cpu";
    options.devices.cpu_workers = 2;
    options.devices.cpu_threads_per_worker = 1;
    // One item per batch: an allocation failure fails its own batch only (a batch failure
    // fails every request batched with it, docs/operations.md).
    options.devices.max_items_per_batch = 1;
    options.limits.max_rows_per_item = 8;
    options.drain_timeout = absl::Seconds(5);
    server_ = std::make_unique<CalibrationServer>(options);
    server_->set_executor_wrapper([this](std::unique_ptr<BatchExecutor> real) {
      auto wrapped = std::make_unique<FaultInjectingExecutor>(std::move(real));
      faults_ = wrapped.get();
      return wrapped;
    });
    ASSERT_TRUE(server_->Start().ok());
    stub_ = v1::Calibrator::NewStub(
        grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  }

  static TestTensor Tensor(const std::string& name, uint64_t seed) {
    TestTensor t = MakeTensor(name, 32, 64, DType::kBFloat16, "dss", name + ".h", seed);
    t.global_amax = 64.0f;
    return t;
  }

  SessionResult Run(const TestTensor& t, absl::Duration deadline = absl::ZeroDuration()) {
    std::vector<v1::QuantizeRequest> requests;
    AppendTensor(t, &requests);
    grpc::ClientContext context;
    if (deadline > absl::ZeroDuration()) {
      context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(deadline));
    }
    return RunSession(stub_.get(), requests, &context);
  }

  static void ExpectReference(const SessionResult& r, const TestTensor& t) {
    SCOPED_TRACE(t.name);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    const QuantizedTensor ref = Reference(t);
    ASSERT_EQ(r.tensors.count(t.name), 1u);
    EXPECT_EQ(r.tensors.at(t.name).packed_codes,
              std::string(ref.packed_codes.begin(), ref.packed_codes.end()));
    EXPECT_EQ(r.tensors.at(t.name).scales, std::string(ref.scales.begin(), ref.scales.end()));
  }

  // Runs the victim and four bystanders concurrently; returns the victim's result and checks
  // every bystander against the kernel library.
  SessionResult RunAmongBystanders(const TestTensor& victim,
                                   absl::Duration deadline = absl::ZeroDuration()) {
    std::vector<std::future<void>> bystanders;
    for (int i = 0; i < 4; ++i) {
      bystanders.push_back(std::async(std::launch::async, [this, i] {
        const TestTensor t = Tensor(absl::StrCat("bystander", i), 100 + static_cast<uint64_t>(i));
        ExpectReference(Run(t), t);
      }));
    }
    SessionResult result = Run(victim, deadline);
    for (auto& b : bystanders) b.get();
    return result;
  }

  double Metric(const std::string& series) {
    return Sample(Scrape(server_->metrics_port()), series);
  }

  std::unique_ptr<CalibrationServer> server_;
  FaultInjectingExecutor* faults_ = nullptr;
  std::unique_ptr<v1::Calibrator::Stub> stub_;
};

TEST_F(FaultInjectionTest, AllocationFailureFailsOnlyThatRequestWithResourceExhausted) {
  faults_->Inject("victim", Fault::kAllocationFailure);
  const SessionResult victim = RunAmongBystanders(Tensor("victim", 1));
  EXPECT_EQ(victim.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(victim.status.error_message(), HasSubstr("tensor 'victim'"));
  EXPECT_THAT(victim.status.error_message(), HasSubstr("out of memory"));
  EXPECT_GE(faults_->injected(), 1);
  const TestTensor after = Tensor("after", 2);
  ExpectReference(Run(after), after);
  EXPECT_EQ(Metric("nvfp4cal_requests_total{code=\"RESOURCE_EXHAUSTED\",method=\"Quantize\"}"), 1);
  EXPECT_EQ(Metric("nvfp4cal_requests_total{code=\"OK\",method=\"Quantize\"}"), 5);
  EXPECT_EQ(Metric("nvfp4cal_queue_depth"), 0);
  EXPECT_EQ(Metric("nvfp4cal_device_memory_in_use_bytes"), 0);
}

TEST_F(FaultInjectionTest, KernelErrorFailsOnlyThatRequestWithInternal) {
  faults_->Inject("victim", Fault::kKernelError);
  const SessionResult victim = RunAmongBystanders(Tensor("victim", 3));
  EXPECT_EQ(victim.status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(victim.status.error_message(), HasSubstr("tensor 'victim' rows ["));
  EXPECT_THAT(victim.status.error_message(), HasSubstr("kernel launch failed"));

  // The same fault in an async job: FAILED with the code; jobs beside it succeed.
  grpc::ClientContext c1, c2;
  v1::Job failing, fine;
  ASSERT_TRUE(stub_->SubmitJob(&c1, JobRequestOf(Tensor("victim", 4)), &failing).ok());
  ASSERT_TRUE(stub_->SubmitJob(&c2, JobRequestOf(Tensor("fine", 5)), &fine).ok());
  const auto failed = WatchUntilDone(stub_.get(), failing.job_id());
  const auto succeeded = WatchUntilDone(stub_.get(), fine.job_id());
  ASSERT_FALSE(failed.updates.empty());
  EXPECT_EQ(failed.updates.back().state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(failed.updates.back().error_code(), static_cast<int>(grpc::StatusCode::INTERNAL));
  ASSERT_FALSE(succeeded.updates.empty());
  EXPECT_EQ(succeeded.updates.back().state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(Metric("nvfp4cal_requests_total{code=\"INTERNAL\",method=\"Quantize\"}"), 1);
  EXPECT_EQ(Metric("nvfp4cal_jobs_finished_total{state=\"FAILED\"}"), 1);
  EXPECT_EQ(Metric("nvfp4cal_jobs_finished_total{state=\"SUCCEEDED\"}"), 1);
}

TEST_F(FaultInjectionTest, SlowKernelPastTheDeadlineIsDeadlineExceeded) {
  faults_->Inject("slow", Fault::kSlow, absl::Milliseconds(600));
  const SessionResult late = RunAmongBystanders(Tensor("slow", 6), absl::Milliseconds(300));
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);

  // An async job with timeout_ms: FAILED with DEADLINE_EXCEEDED.
  v1::SubmitJobRequest request = JobRequestOf(Tensor("slow", 7));
  request.set_timeout_ms(200);
  grpc::ClientContext context;
  v1::Job job;
  ASSERT_TRUE(stub_->SubmitJob(&context, request, &job).ok());
  const auto watched = WatchUntilDone(stub_.get(), job.job_id());
  ASSERT_FALSE(watched.updates.empty());
  EXPECT_EQ(watched.updates.back().state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(watched.updates.back().error_code(),
            static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED));
  // The worker is free again once the slow batches are through.
  const TestTensor after = Tensor("after", 8);
  ExpectReference(Run(after), after);
  EXPECT_EQ(Metric("nvfp4cal_jobs_finished_total{state=\"FAILED\"}"), 1);
}

TEST_F(FaultInjectionTest, ClientDisconnectMidStreamFreesEverythingAndOthersContinue) {
  faults_->Inject("abandoned", Fault::kSlow, absl::Milliseconds(50));
  const TestTensor abandoned = Tensor("abandoned", 9);
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(abandoned, &requests);
  for (int round = 0; round < 3; ++round) {
    // A client on its own connection sends the header, the Hessian and part of the weights,
    // then goes away without half-closing (its channel is destroyed).
    auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    auto stub = v1::Calibrator::NewStub(channel);
    auto context = std::make_unique<grpc::ClientContext>();
    auto stream = stub->Quantize(context.get());
    for (size_t i = 0; i + 2 < requests.size(); ++i) ASSERT_TRUE(stream->Write(requests[i]));
    v1::QuantizeResponse response;
    ASSERT_TRUE(stream->Read(&response));  // some work was admitted and ran
    context->TryCancel();
    stream->Finish();
    stream.reset();
    stub.reset();
    channel.reset();
  }
  const TestTensor after = Tensor("after", 10);
  ExpectReference(Run(after), after);
  // Everything the abandoned streams held is released.
  bool drained = false;
  for (int i = 0; i < 100 && !drained; ++i) {
    drained = Metric("nvfp4cal_inflight_streams") == 0 &&
              Metric("nvfp4cal_device_memory_in_use_bytes") == 0 &&
              Metric("nvfp4cal_queue_depth") == 0;
    if (!drained) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(drained);
  EXPECT_EQ(Metric("nvfp4cal_requests_total{code=\"CANCELLED\",method=\"Quantize\"}"), 3)
      << Scrape(server_->metrics_port());
}

}  // namespace
}  // namespace nvfp4cal::server
