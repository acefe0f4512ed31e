// The async job API through gRPC against the real service in-process: SubmitJob, GetJob with
// progress and result, WatchJob, CancelJob, ListJobs, the limits and the error table. A gate
// around the real executor keeps work queued where a test needs it, so nothing depends on
// timing.
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/calibration_server.h"
#include "tests/server/gated_executor.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::GatedExecutor;
using ::nvfp4cal::server::testing::JobRequestOf;
using ::nvfp4cal::server::testing::MakeTensor;
using ::nvfp4cal::server::testing::Reference;
using ::nvfp4cal::server::testing::TestTensor;
using ::nvfp4cal::server::testing::UseFullLayout;
using ::nvfp4cal::server::testing::WatchResult;
using ::nvfp4cal::server::testing::WatchUntilDone;
using ::testing::HasSubstr;

constexpr int kMaxJobs = 4;
constexpr int64_t kMaxJobRequestBytes = 64 << 10;

class JobApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.address = "127.0.0.1:0";
    options.metrics_address = "";
    options.devices.device = "cpu";  // CPU expectations, also on GPU machines
    options.drain_timeout = absl::Seconds(5);
    options.devices.cpu_workers = 1;  // one worker: the gate holds all work behind one batch
    options.devices.cpu_threads_per_worker = 1;
    options.limits.max_rows_per_item = 16;
    options.limits.max_jobs = kMaxJobs;
    options.limits.max_job_request_bytes = kMaxJobRequestBytes;
    options.devices.max_items_per_batch = max_items_per_batch_;
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

  grpc::Status Submit(const v1::SubmitJobRequest& request, v1::Job* job) {
    grpc::ClientContext context;
    return stub_->SubmitJob(&context, request, job);
  }
  v1::Job SubmitOk(const TestTensor& t, int priority = 0) {
    v1::Job job;
    const grpc::Status status = Submit(JobRequestOf(t, priority), &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }
  grpc::Status Get(const std::string& id, bool include_result, v1::Job* job) {
    grpc::ClientContext context;
    v1::GetJobRequest request;
    request.set_job_id(id);
    request.set_include_result(include_result);
    return stub_->GetJob(&context, request, job);
  }
  grpc::Status Cancel(const std::string& id, v1::Job* job) {
    grpc::ClientContext context;
    v1::CancelJobRequest request;
    request.set_job_id(id);
    return stub_->CancelJob(&context, request, job);
  }
  grpc::Status List(int page_size, const std::string& token, v1::ListJobsResponse* page) {
    grpc::ClientContext context;
    v1::ListJobsRequest request;
    request.set_page_size(page_size);
    request.set_page_token(token);
    return stub_->ListJobs(&context, request, page);
  }
  // Holds the only worker with a one-item job, so later jobs stay queued until Open().
  v1::Job HoldWorker() {
    gate_->Close();
    v1::Job blocker = SubmitOk(MakeTensor("blocker", 8, 64, DType::kBFloat16, "max", "", 90));
    EXPECT_TRUE(gate_->WaitUntilWaiting(1));
    return blocker;
  }
  WatchResult Watch(const std::string& id) { return WatchUntilDone(stub_.get(), id); }

  int max_items_per_batch_ = 64;
  std::unique_ptr<CalibrationServer> server_;
  GatedExecutor* gate_ = nullptr;
  std::unique_ptr<v1::Calibrator::Stub> stub_;
};

void ExpectResultMatchesKernelLibrary(const v1::Job& job, const TestTensor& t) {
  SCOPED_TRACE(t.name);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error_message();
  ASSERT_TRUE(job.has_result());
  const QuantizedTensor want = Reference(t);
  EXPECT_EQ(job.result().packed_codes(),
            std::string(want.packed_codes.begin(), want.packed_codes.end()));
  EXPECT_EQ(job.result().scales(), std::string(want.scales.begin(), want.scales.end()));
  const v1::TensorSummary& s = job.result().summary();
  EXPECT_EQ(s.tensor_name(), t.name);
  EXPECT_EQ(s.rows(), t.rows);
  EXPECT_EQ(s.cols(), t.cols);
  EXPECT_EQ(s.global_amax(), want.global_amax);
  EXPECT_EQ(s.global_scale(), want.global_scale);
  EXPECT_EQ(s.stats().method(), t.method);
  EXPECT_EQ(s.stats().num_blocks(), want.stats.num_blocks);
  EXPECT_EQ(s.stats().blocks_scale_changed(), want.stats.blocks_scale_changed);
  EXPECT_DOUBLE_EQ(s.stats().objective_after(), want.stats.objective_after);
  EXPECT_DOUBLE_EQ(s.stats().hessian_error_after(), want.stats.hessian_error_after);
}

TEST_F(JobApiTest, SubmitWatchAndGetResultByteIdenticalToKernelLibrary) {
  std::vector<TestTensor> tensors;
  tensors.push_back(MakeTensor("dss_block", 72, 256, DType::kBFloat16, "dss", "h", 1));
  TestTensor full = MakeTensor("lh_full", 40, 64, DType::kFloat16, "local_hessian", "h2", 2);
  UseFullLayout(&full);
  tensors.push_back(full);
  TestTensor streamed = MakeTensor("max_f32", 33, 128, DType::kFloat32, "max", "", 3);
  streamed.global_amax = 50.0f;
  tensors.push_back(streamed);
  for (const TestTensor& t : tensors) {
    SCOPED_TRACE(t.name);
    gate_->Close();
    const v1::Job submitted = SubmitOk(t);
    EXPECT_EQ(submitted.state(), v1::JOB_STATE_QUEUED);
    EXPECT_EQ(submitted.rows_total(), t.rows);
    EXPECT_EQ(submitted.rows_done(), 0);
    EXPECT_EQ(submitted.tensor_name(), t.name);
    EXPECT_GT(submitted.created_unix_ms(), 0);
    EXPECT_EQ(submitted.finished_unix_ms(), 0);
    ASSERT_TRUE(gate_->WaitUntilWaiting(1));
    gate_->Open();
    const WatchResult watched = Watch(submitted.job_id());
    ASSERT_TRUE(watched.status.ok()) << watched.status.error_message();
    ASSERT_FALSE(watched.updates.empty());
    int64_t rows_done = 0;
    for (const v1::Job& update : watched.updates) {
      EXPECT_GE(update.rows_done(), rows_done);
      rows_done = update.rows_done();
    }
    EXPECT_EQ(watched.updates.back().state(), v1::JOB_STATE_SUCCEEDED);
    EXPECT_EQ(watched.updates.back().rows_done(), t.rows);
    EXPECT_FALSE(watched.updates.back().has_result());

    v1::Job without_result;
    ASSERT_TRUE(Get(submitted.job_id(), false, &without_result).ok());
    EXPECT_EQ(without_result.state(), v1::JOB_STATE_SUCCEEDED);
    EXPECT_FALSE(without_result.has_result());
    EXPECT_GE(without_result.finished_unix_ms(), without_result.created_unix_ms());
    v1::Job with_result;
    ASSERT_TRUE(Get(submitted.job_id(), true, &with_result).ok());
    ExpectResultMatchesKernelLibrary(with_result, t);
  }
}

// One item per batch, so progress moves one row range at a time.
class JobApiOneItemPerBatchTest : public JobApiTest {
 protected:
  JobApiOneItemPerBatchTest() { max_items_per_batch_ = 1; }
};

TEST_F(JobApiOneItemPerBatchTest, ProgressIsReportedRowRangeByRowRange) {
  const v1::Job blocker = HoldWorker();  // batch 0
  const TestTensor t = MakeTensor("progress", 64, 64, DType::kBFloat16, "mse", "", 4);
  const v1::Job job = SubmitOk(t);  // batches 1..4, one row range of 16 rows each
  v1::Job now;
  ASSERT_TRUE(Get(job.job_id(), false, &now).ok());
  EXPECT_EQ(now.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(now.rows_done(), 0);
  gate_->PassBatches(2);
  ASSERT_TRUE(gate_->WaitUntilHeld(2));
  ASSERT_TRUE(Get(job.job_id(), false, &now).ok());
  EXPECT_EQ(now.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(now.rows_done(), 16);
  EXPECT_EQ(now.finished_unix_ms(), 0);
  gate_->PassBatches(1);
  ASSERT_TRUE(gate_->WaitUntilHeld(3));
  ASSERT_TRUE(Get(job.job_id(), false, &now).ok());
  EXPECT_EQ(now.rows_done(), 32);
  gate_->Open();
  const WatchResult done = Watch(job.job_id());
  ASSERT_TRUE(done.status.ok());
  EXPECT_EQ(done.updates.back().state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(done.updates.back().rows_done(), 64);
  EXPECT_EQ(Watch(blocker.job_id()).updates.back().state(), v1::JOB_STATE_SUCCEEDED);
  v1::Job result;
  ASSERT_TRUE(Get(job.job_id(), true, &result).ok());
  ExpectResultMatchesKernelLibrary(result, t);
}

TEST_F(JobApiTest, OneBatchTakesRowRangesOfSeveralJobs) {
  HoldWorker();
  const TestTensor a = MakeTensor("a", 32, 64, DType::kBFloat16, "dss", "h", 5);  // 2 items
  const TestTensor b = MakeTensor("b", 32, 128, DType::kFloat32, "mse", "", 6);   // 2 items
  const v1::Job job_a = SubmitOk(a);
  const v1::Job job_b = SubmitOk(b);
  gate_->Open();
  for (const auto& [job, t] : {std::pair(job_a, a), std::pair(job_b, b)}) {
    const WatchResult done = Watch(job.job_id());
    ASSERT_TRUE(done.status.ok());
    v1::Job result;
    ASSERT_TRUE(Get(job.job_id(), true, &result).ok());
    ExpectResultMatchesKernelLibrary(result, t);
  }
  // The blocker ran alone; the queued items of both jobs went into one batch.
  EXPECT_THAT(gate_->TensorsPerBatch(), ::testing::Contains(2));
}

TEST_F(JobApiTest, CancelDropsQueuedWorkAndFinishedJobsStayUnchanged) {
  const v1::Job blocker = HoldWorker();
  const v1::Job job = SubmitOk(MakeTensor("doomed", 48, 64, DType::kBFloat16, "mse", "", 7));
  grpc::ClientContext watch_context;
  v1::WatchJobRequest watch_request;
  watch_request.set_job_id(job.job_id());
  auto watch = stub_->WatchJob(&watch_context, watch_request);
  v1::Job update;
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.state(), v1::JOB_STATE_QUEUED);

  v1::Job cancelled;
  ASSERT_TRUE(Cancel(job.job_id(), &cancelled).ok());
  EXPECT_EQ(cancelled.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(cancelled.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_THAT(cancelled.error_message(), HasSubstr("cancelled by CancelJob"));
  EXPECT_EQ(cancelled.rows_done(), 0);
  EXPECT_GT(cancelled.finished_unix_ms(), 0);
  // The watcher sees the final state, then the stream ends OK.
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_FALSE(watch->Read(&update));
  EXPECT_TRUE(watch->Finish().ok());

  gate_->Open();
  const WatchResult blocker_done = Watch(blocker.job_id());
  ASSERT_EQ(blocker_done.updates.back().state(), v1::JOB_STATE_SUCCEEDED);
  // The cancelled job's rows never ran: only the blocker's batch went through.
  EXPECT_EQ(gate_->TensorsPerBatch().size(), 1u);
  v1::Job again;
  ASSERT_TRUE(Cancel(job.job_id(), &again).ok());
  EXPECT_EQ(again.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(again.finished_unix_ms(), cancelled.finished_unix_ms());
  v1::Job finished;
  ASSERT_TRUE(Cancel(blocker.job_id(), &finished).ok());
  EXPECT_EQ(finished.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(finished.error_code(), 0);
}

TEST_F(JobApiTest, TimeoutFailsQueuedJobWithDeadlineExceeded) {
  HoldWorker();
  v1::SubmitJobRequest request =
      JobRequestOf(MakeTensor("late", 16, 64, DType::kBFloat16, "max", "", 8));
  request.set_timeout_ms(1);
  v1::Job job;
  ASSERT_TRUE(Submit(request, &job).ok());
  // Waiting for the clock (not for another thread): the deadline must be in the past.
  const absl::Time deadline = absl::FromUnixMillis(job.created_unix_ms()) + absl::Milliseconds(2);
  while (absl::Now() < deadline) absl::SleepFor(deadline - absl::Now());
  gate_->Open();
  const WatchResult done = Watch(job.job_id());
  ASSERT_TRUE(done.status.ok());
  const v1::Job& last = done.updates.back();
  EXPECT_EQ(last.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(last.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_THAT(last.error_message(), HasSubstr("passed its deadline"));
}

TEST_F(JobApiTest, ListJobsNewestFirstInPages) {
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    ids.push_back(
        SubmitOk(MakeTensor(absl::StrCat("t", i), 16, 64, DType::kBFloat16, "max", "", 10 + i))
            .job_id());
  }
  v1::ListJobsResponse first;
  ASSERT_TRUE(List(2, "", &first).ok());
  ASSERT_EQ(first.jobs_size(), 2);
  EXPECT_EQ(first.jobs(0).job_id(), ids[2]);
  EXPECT_EQ(first.jobs(1).job_id(), ids[1]);
  EXPECT_FALSE(first.jobs(0).has_result());
  ASSERT_FALSE(first.next_page_token().empty());
  v1::ListJobsResponse second;
  ASSERT_TRUE(List(2, first.next_page_token(), &second).ok());
  ASSERT_EQ(second.jobs_size(), 1);
  EXPECT_EQ(second.jobs(0).job_id(), ids[0]);
  EXPECT_TRUE(second.next_page_token().empty());
  v1::ListJobsResponse all;
  ASSERT_TRUE(List(0, "", &all).ok());
  EXPECT_EQ(all.jobs_size(), 3);

  v1::ListJobsResponse ignored;
  grpc::Status bad_token = List(2, "not-a-token", &ignored);
  EXPECT_EQ(bad_token.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(bad_token.error_message(), HasSubstr("page_token = 'not-a-token'"));
  grpc::Status bad_size = List(-1, "", &ignored);
  EXPECT_EQ(bad_size.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(bad_size.error_message(), HasSubstr("page_size = -1 must be >= 0"));
}

TEST_F(JobApiTest, LimitsAreAdvertisedAndEnforcedWithLimitAndValue) {
  grpc::ClientContext info_context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&info_context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.limits().max_jobs(), kMaxJobs);
  EXPECT_EQ(info.limits().max_job_request_bytes(), kMaxJobRequestBytes);
  EXPECT_EQ(info.limits().job_retention_ms(), 10 * 60 * 1000);

  // Request size: 1024 x 64 bf16 = 128 KiB of weights.
  const v1::SubmitJobRequest big =
      JobRequestOf(MakeTensor("big", 1024, 64, DType::kBFloat16, "max", "", 20));
  v1::Job job;
  const grpc::Status too_big = Submit(big, &job);
  EXPECT_EQ(too_big.error_code(), grpc::RESOURCE_EXHAUSTED);
  EXPECT_THAT(too_big.error_message(),
              HasSubstr(absl::StrCat("SubmitJob request has ", big.ByteSizeLong(),
                                     " bytes; max_job_request_bytes = 65536")));

  // Job count: every kept job unfinished.
  const v1::Job blocker = HoldWorker();
  std::vector<v1::Job> queued = {blocker};
  for (int i = 1; i < kMaxJobs; ++i) {
    queued.push_back(
        SubmitOk(MakeTensor(absl::StrCat("q", i), 16, 64, DType::kBFloat16, "max", "", 30 + i)));
  }
  const TestTensor extra = MakeTensor("extra", 16, 64, DType::kBFloat16, "max", "", 40);
  const grpc::Status full = Submit(JobRequestOf(extra), &job);
  EXPECT_EQ(full.error_code(), grpc::RESOURCE_EXHAUSTED);
  EXPECT_THAT(full.error_message(),
              HasSubstr("too many jobs: max_jobs = 4 and all 4 kept jobs are unfinished"));

  // Once they finished, a new job makes the oldest finished one forgotten.
  gate_->Open();
  for (const v1::Job& q : queued) ASSERT_TRUE(Watch(q.job_id()).status.ok());
  const v1::Job accepted = SubmitOk(extra);
  ASSERT_TRUE(Watch(accepted.job_id()).status.ok());
  v1::Job forgotten;
  const grpc::Status gone = Get(blocker.job_id(), false, &forgotten);
  EXPECT_EQ(gone.error_code(), grpc::NOT_FOUND);
  EXPECT_THAT(gone.error_message(), HasSubstr("max_jobs = 4"));
  v1::Job kept;
  EXPECT_TRUE(Get(queued[1].job_id(), false, &kept).ok());
}

TEST_F(JobApiTest, InvalidJobsNameTheFieldTheLimitAndTheValue) {
  struct Case {
    std::string name;
    grpc::StatusCode code;
    std::string message;
    v1::SubmitJobRequest request;
  };
  const TestTensor plain = MakeTensor("w", 16, 64, DType::kFloat32, "max", "", 50);
  const TestTensor dss = MakeTensor("w", 16, 64, DType::kFloat32, "dss", "h", 51);
  std::vector<Case> cases;
  {
    v1::SubmitJobRequest r = JobRequestOf(plain);
    r.mutable_header()->set_dtype(v1::DTYPE_UNSPECIFIED);
    cases.push_back({"dtype", grpc::INVALID_ARGUMENT, "header.dtype = 0 is not one of", r});
  }
  {
    v1::SubmitJobRequest r = JobRequestOf(plain);
    r.mutable_weights()->pop_back();
    cases.push_back({"weights size", grpc::INVALID_ARGUMENT,
                     "weights has 4095 bytes; 16 rows x 64 cols of float32 need 4096", r});
  }
  {
    TestTensor t = plain;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(t.weights.data() + 4 * (2 * 64 + 7), &nan, 4);
    cases.push_back({"NaN", grpc::INVALID_ARGUMENT, "element (2, 7) is nan", JobRequestOf(t)});
  }
  {
    v1::SubmitJobRequest r = JobRequestOf(dss);
    r.clear_hessian();
    cases.push_back({"missing Hessian", grpc::FAILED_PRECONDITION,
                     "hessian is empty but method dss of job tensor 'w' needs a Hessian", r});
  }
  {
    v1::SubmitJobRequest r = JobRequestOf(dss);
    r.mutable_hessian()->resize(r.hessian().size() - 4);
    cases.push_back({"Hessian size", grpc::INVALID_ARGUMENT,
                     "hessian has 4092 bytes; layout BLOCK_DIAGONAL for cols = 64 needs 4096", r});
  }
  {
    TestTensor t = dss;
    t.hessian[1] += 1.0f;
    cases.push_back({"non-symmetric Hessian", grpc::INVALID_ARGUMENT,
                     "Hessian of job tensor 'w': hessians: block 0 is not symmetric",
                     JobRequestOf(t)});
  }
  {
    v1::SubmitJobRequest r = JobRequestOf(plain);
    r.mutable_header()->mutable_method()->set_name("awq");
    cases.push_back({"unknown method", grpc::INVALID_ARGUMENT, "method: unknown value \"awq\"", r});
  }
  {
    v1::SubmitJobRequest r = JobRequestOf(plain);
    r.mutable_header()->mutable_method()->set_name("gptq");
    cases.push_back({"gptq without a Hessian", grpc::FAILED_PRECONDITION,
                     "hessian is empty but method gptq of job tensor 'w' needs a Hessian", r});
  }
  {
    v1::SubmitJobRequest r = JobRequestOf(plain);
    r.set_priority(11);
    cases.push_back(
        {"priority", grpc::INVALID_ARGUMENT, "priority = 11 is out of range [0, 10]", r});
  }
  {
    v1::SubmitJobRequest r = JobRequestOf(plain);
    r.mutable_header()->set_global_amax(1e-4f);
    cases.push_back({"global amax", grpc::INVALID_ARGUMENT,
                     "global_amax = 0.0001 is below the weights' own amax", r});
  }
  {
    v1::SubmitJobRequest r = JobRequestOf(plain);
    r.mutable_header()->set_cols(40);
    cases.push_back({"cols", grpc::INVALID_ARGUMENT,
                     "header.cols = 40 of tensor 'w' is not a multiple of the block size 16", r});
  }
  for (const Case& c : cases) {
    v1::Job job;
    const grpc::Status status = Submit(c.request, &job);
    EXPECT_EQ(status.error_code(), c.code) << c.name << ": " << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.message)) << c.name;
  }
  v1::ListJobsResponse none;
  ASSERT_TRUE(List(0, "", &none).ok());
  EXPECT_EQ(none.jobs_size(), 0) << "rejected jobs are not kept";
}

TEST_F(JobApiTest, UnknownJobsAreNotFound) {
  v1::Job job;
  EXPECT_EQ(Get("job-999", false, &job).error_code(), grpc::NOT_FOUND);
  EXPECT_EQ(Cancel("job-999", &job).error_code(), grpc::NOT_FOUND);
  const WatchResult watched = Watch("job-999");
  EXPECT_EQ(watched.status.error_code(), grpc::NOT_FOUND);
  EXPECT_THAT(watched.status.error_message(), HasSubstr("job_id = 'job-999'"));
  EXPECT_TRUE(watched.updates.empty());
}

TEST_F(JobApiTest, DeviceOutOfMemoryFailsTheBatchsJobsAndTheServerKeepsServing) {
  const v1::Job blocker = HoldWorker();  // batch 0
  const v1::Job a = SubmitOk(MakeTensor("a", 16, 64, DType::kBFloat16, "max", "", 60));
  const v1::Job b = SubmitOk(MakeTensor("b", 16, 64, DType::kBFloat16, "mse", "", 61));
  gate_->FailBatch(1, absl::ResourceExhaustedError(
                          "CUDA device 0: cannot allocate a 123-byte workspace (out of memory)"));
  gate_->Open();
  for (const v1::Job& job : {a, b}) {
    const WatchResult done = Watch(job.job_id());
    ASSERT_TRUE(done.status.ok());
    const v1::Job& last = done.updates.back();
    EXPECT_EQ(last.state(), v1::JOB_STATE_FAILED) << job.tensor_name();
    EXPECT_EQ(last.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(last.error_message(), HasSubstr("cannot allocate a 123-byte workspace"));
  }
  EXPECT_THAT(gate_->TensorsPerBatch(), ::testing::ElementsAre(1, 2));
  EXPECT_EQ(Watch(blocker.job_id()).updates.back().state(), v1::JOB_STATE_SUCCEEDED);
  const TestTensor after = MakeTensor("after", 16, 64, DType::kBFloat16, "mse", "", 62);
  const v1::Job next = SubmitOk(after);
  ASSERT_TRUE(Watch(next.job_id()).status.ok());
  v1::Job result;
  ASSERT_TRUE(Get(next.job_id(), true, &result).ok());
  ExpectResultMatchesKernelLibrary(result, after);
}

}  // namespace
}  // namespace nvfp4cal::server
