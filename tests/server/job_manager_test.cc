// JobManager without gRPC: retention on a fake clock, and what a server shutdown does to jobs
// (WaitUntilIdle, CancelAll). The scheduler runs the real CPU executor behind a gate.
#include "server/job_manager.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "tests/server/gated_executor.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::GatedExecutor;
using ::nvfp4cal::server::testing::JobRequestOf;
using ::nvfp4cal::server::testing::MakeTensor;
using ::testing::HasSubstr;

// Collects snapshots; Wait blocks until a final one arrived.
class RecordingObserver : public JobObserver {
 public:
  void OnJobUpdate(const v1::Job& job, uint64_t version) override {
    absl::MutexLock lock(&mu_);
    updates_.push_back(job);
    versions_.push_back(version);
  }
  v1::Job WaitForFinal() {
    absl::MutexLock lock(&mu_);
    auto final = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return !updates_.empty() && IsFinalJobState(updates_.back().state());
    };
    EXPECT_TRUE(mu_.AwaitWithTimeout(absl::Condition(&final), testing::kGateHangLimit));
    return updates_.empty() ? v1::Job() : updates_.back();
  }
  std::vector<uint64_t> versions() {
    absl::MutexLock lock(&mu_);
    return versions_;
  }

 private:
  absl::Mutex mu_;
  std::vector<v1::Job> updates_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> versions_ ABSL_GUARDED_BY(mu_);
};

class JobManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::vector<std::unique_ptr<ScaleSearch>> backends;
    CpuScaleSearchOptions cpu;
    cpu.num_threads = 1;
    backends.push_back(MakeCpuScaleSearch(cpu));
    auto gated =
        std::make_unique<GatedExecutor>(std::make_unique<KernelExecutor>(std::move(backends)));
    gate_ = gated.get();
    executor_ = std::move(gated);
    scheduler_ = std::make_unique<Scheduler>(SchedulerOptions(), executor_.get());
    JobManagerOptions options;
    options.limits.max_rows_per_item = 16;
    options.limits.job_retention = absl::Minutes(1);
    options.clock = [this] {
      absl::MutexLock lock(&clock_mu_);
      return now_;
    };
    jobs_ = std::make_unique<JobManager>(options, scheduler_.get(), &metrics_);
  }
  void TearDown() override {
    gate_->Open();
    scheduler_->Shutdown();  // no item callback may reach the manager after this
    jobs_.reset();
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&clock_mu_);
    now_ += d;
  }
  v1::Job Submit(const std::string& name) {
    absl::StatusOr<v1::Job> job =
        jobs_->Submit(JobRequestOf(MakeTensor(name, 40, 64, DType::kBFloat16, "mse", "", 5)));
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? *job : v1::Job();
  }

  absl::Mutex clock_mu_;
  absl::Time now_ ABSL_GUARDED_BY(clock_mu_) = absl::FromUnixSeconds(1'700'000'000);
  ServerMetrics metrics_;
  GatedExecutor* gate_ = nullptr;
  std::unique_ptr<BatchExecutor> executor_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<JobManager> jobs_;
};

TEST_F(JobManagerTest, FinishedJobsAreForgottenOnceTheRetentionPassed) {
  const v1::Job job = Submit("kept_for_a_minute");
  EXPECT_EQ(job.created_unix_ms(), int64_t{1'700'000'000'000});
  auto observer = std::make_shared<RecordingObserver>();
  ASSERT_TRUE(jobs_->Watch(job.job_id(), observer).ok());
  ASSERT_EQ(observer->WaitForFinal().state(), v1::JOB_STATE_SUCCEEDED);

  Advance(absl::Minutes(1) - absl::Milliseconds(1));
  absl::StatusOr<v1::Job> still = jobs_->Get(job.job_id(), /*include_result=*/true);
  ASSERT_TRUE(still.ok()) << still.status();
  EXPECT_EQ(still->result().scales().size(), 40u * 64 / 16);
  Advance(absl::Milliseconds(1));
  absl::StatusOr<v1::Job> gone = jobs_->Get(job.job_id(), false);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(gone.status().message(), HasSubstr("job_retention = 1m"));
  absl::StatusOr<v1::ListJobsResponse> list = jobs_->List(v1::ListJobsRequest());
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->jobs_size(), 0);
}

TEST_F(JobManagerTest, ShutdownWaitsForJobsThenCancelsTheRest) {
  gate_->Close();
  const v1::Job job = Submit("unfinished");
  auto observer = std::make_shared<RecordingObserver>();
  ASSERT_TRUE(jobs_->Watch(job.job_id(), observer).ok());
  EXPECT_EQ(jobs_->unfinished_jobs(), 1);
  EXPECT_FALSE(jobs_->WaitUntilIdle(absl::Now()));  // deadline already reached
  jobs_->CancelAll(absl::UnavailableError("the server shut down before the job finished"));
  const v1::Job last = observer->WaitForFinal();
  EXPECT_EQ(last.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(last.error_code(), static_cast<int>(absl::StatusCode::kUnavailable));
  EXPECT_THAT(last.error_message(), HasSubstr("shut down"));
  EXPECT_EQ(jobs_->unfinished_jobs(), 0);
  EXPECT_TRUE(jobs_->WaitUntilIdle(absl::Now()));
  // Cancelled work never reaches the kernels, and its result is not kept.
  gate_->Open();
  absl::StatusOr<v1::Job> kept = jobs_->Get(job.job_id(), true);
  ASSERT_TRUE(kept.ok());
  EXPECT_FALSE(kept->has_result());
}

TEST_F(JobManagerTest, WatchingAFinishedJobDeliversItsFinalStateOnce) {
  const v1::Job job = Submit("done");
  auto first = std::make_shared<RecordingObserver>();
  ASSERT_TRUE(jobs_->Watch(job.job_id(), first).ok());
  ASSERT_EQ(first->WaitForFinal().state(), v1::JOB_STATE_SUCCEEDED);
  auto late = std::make_shared<RecordingObserver>();
  ASSERT_TRUE(jobs_->Watch(job.job_id(), late).ok());
  EXPECT_EQ(late->WaitForFinal().rows_done(), 40);
  EXPECT_EQ(late->versions().size(), 1u);
  EXPECT_EQ(jobs_->Watch("job-12345", late).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace nvfp4cal::server
