// Method gptq through the async job API (SubmitJob), against the real service in-process: the
// result equals the kernel library's gptq of the same tensor, byte for byte, like a Quantize
// session's; the job's full Hessian is admitted on the server-wide budget and released when the
// job is final; layouts and budget are checked with the field, the limit and the value.
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/gptq.h"
#include "server/calibration_server.h"
#include "tests/server/gptq_test_util.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::CorrelatedHessian;
using ::nvfp4cal::server::testing::GptqReference;
using ::nvfp4cal::server::testing::GptqTensor;
using ::nvfp4cal::server::testing::JobRequestOf;
using ::nvfp4cal::server::testing::MakeGptqTensor;
using ::nvfp4cal::server::testing::WatchResult;
using ::nvfp4cal::server::testing::WatchUntilDone;
using ::testing::HasSubstr;

class GptqJobTest : public ::testing::Test {
 public:
  void SetUp() override { Start({}); }

  void Start(const ServiceLimits& limits) {
    server_.reset();
    ServerOptions options;
    options.address = "127.0.0.1:0";
    options.metrics_address = "";
    options.devices.device = "cpu";
    options.drain_timeout = absl::Seconds(5);
    options.devices.cpu_workers = 2;
    options.devices.cpu_threads_per_worker = 1;
    options.limits = limits;
    options.limits.max_rows_per_item = 16;
    server_ = std::make_unique<CalibrationServer>(options);
    ASSERT_TRUE(server_->Start().ok());
    stub_ = v1::Calibrator::NewStub(
        grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  }

  static v1::SubmitJobRequest GptqJob(const GptqTensor& g) {
    v1::SubmitJobRequest request = JobRequestOf(g.tensor);
    v1::MethodConfig* m = request.mutable_header()->mutable_method();
    m->set_damping(g.params.gptq.damping);
    m->set_act_order(g.params.gptq.act_order);
    m->set_block_columns(g.params.gptq.block_columns);
    m->set_scale_search(std::string(GptqScaleSearchName(g.params.gptq.scale_search)));
    m->set_compare_local_hessian(g.params.gptq.compare_local_hessian);
    return request;
  }

  grpc::Status Submit(const v1::SubmitJobRequest& request, v1::Job* job) {
    grpc::ClientContext context;
    return stub_->SubmitJob(&context, request, job);
  }

  // Watches the job to its end and returns it with its result.
  v1::Job Finished(const std::string& id) {
    const WatchResult watched = WatchUntilDone(stub_.get(), id);
    EXPECT_TRUE(watched.status.ok()) << watched.status.error_message();
    grpc::ClientContext context;
    v1::GetJobRequest request;
    request.set_job_id(id);
    request.set_include_result(true);
    v1::Job job;
    const grpc::Status status = stub_->GetJob(&context, request, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }

  void ExpectFullHessiansReleased() { testing::ExpectFullHessiansReleased(*server_); }

  std::unique_ptr<CalibrationServer> server_;
  std::unique_ptr<v1::Calibrator::Stub> stub_;
};

TEST_F(GptqJobTest, SubmitJobRunsGptqByteIdenticalToTheKernelLibrary) {
  constexpr int64_t kCols = 64;
  const std::vector<float> h = CorrelatedHessian(kCols, 128, 21);
  for (const bool act_order : {false, true}) {
    // 40 rows: several row ranges of max_rows_per_item, merged into one gptq run or not.
    GptqTensor g = MakeGptqTensor(act_order ? "w_act" : "w", 40, kCols, DType::kBFloat16, "h", h,
                                  v1::HESSIAN_LAYOUT_FULL, act_order ? 31 : 30);
    g.params.gptq.act_order = act_order;
    SCOPED_TRACE(g.tensor.name);
    v1::Job submitted;
    const grpc::Status status = Submit(GptqJob(g), &submitted);
    ASSERT_TRUE(status.ok()) << status.error_message();
    const v1::Job job = Finished(submitted.job_id());
    ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error_message();
    const QuantizedTensor want = GptqReference(g);
    EXPECT_EQ(job.result().packed_codes(),
              std::string(want.packed_codes.begin(), want.packed_codes.end()));
    EXPECT_EQ(job.result().scales(), std::string(want.scales.begin(), want.scales.end()));
    const v1::TensorSummary& summary = job.result().summary();
    EXPECT_EQ(summary.global_amax(), want.global_amax);
    EXPECT_EQ(summary.stats().method(), "gptq");
    EXPECT_EQ(summary.stats().params().act_order(), act_order);
    EXPECT_EQ(summary.stats().num_blocks(), want.stats.num_blocks);
    EXPECT_DOUBLE_EQ(summary.stats().full_hessian_error(), want.stats.gptq.full_hessian_error);
    EXPECT_GT(summary.stats().full_hessian_error(), 0.0);
    EXPECT_GT(summary.stats().factor_seconds(), 0.0);
    ExpectFullHessiansReleased();
  }
}

TEST_F(GptqJobTest, BlockLayoutAndBadFullHessiansAreRefusedNamingTheJob) {
  constexpr int64_t kCols = 32;
  const std::vector<float> h = CorrelatedHessian(kCols, 64, 22);
  GptqTensor g = MakeGptqTensor("w", 8, kCols, DType::kFloat32, "h", h, v1::HESSIAN_LAYOUT_FULL, 3);
  {
    v1::SubmitJobRequest request = GptqJob(g);
    request.mutable_header()->mutable_hessian()->set_layout(v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL);
    request.set_hessian(std::string(static_cast<size_t>(kCols * 16 * 4), '\0'));
    v1::Job job;
    const grpc::Status status = Submit(request, &job);
    EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(),
                HasSubstr("header.hessian.layout = BLOCK_DIAGONAL of job tensor 'w', but method "
                          "gptq propagates errors across blocks and needs the full matrix"));
  }
  {
    // Not symmetric: found when its plan is prepared (on a worker, as for a session), so the
    // job fails naming the Hessian.
    GptqTensor bad = g;
    bad.tensor.hessian[1] += 1.0f;  // H[0][1] != H[1][0]
    v1::Job submitted;
    const grpc::Status status = Submit(GptqJob(bad), &submitted);
    ASSERT_TRUE(status.ok()) << status.error_message();
    const v1::Job job = Finished(submitted.job_id());
    EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
    EXPECT_THAT(job.error_message(), HasSubstr("Hessian 'h': "));
    EXPECT_THAT(job.error_message(), HasSubstr("not symmetric"));
  }
  ExpectFullHessiansReleased();
}

TEST_F(GptqJobTest, FullHessianBudgetRefusesAJobThatDoesNotFit) {
  ServiceLimits limits;
  limits.max_full_hessian_bytes = 64 * 64 * 4 - 1;
  Start(limits);
  const std::vector<float> h = CorrelatedHessian(64, 64, 23);
  const GptqTensor g =
      MakeGptqTensor("w", 8, 64, DType::kBFloat16, "h", h, v1::HESSIAN_LAYOUT_FULL, 4);
  v1::Job job;
  const grpc::Status status = Submit(GptqJob(g), &job);
  EXPECT_EQ(status.error_code(), grpc::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_THAT(status.error_message(),
              HasSubstr("Hessian of job tensor 'w' needs 16384 more bytes"));
  EXPECT_THAT(status.error_message(), HasSubstr("max_full_hessian_bytes = 16383"));
  EXPECT_EQ(server_->full_hessian_bytes_in_use(), 0);
}

}  // namespace
}  // namespace nvfp4cal::server
