// The engine below the CLI and the server: device selection (devices.h) and the gptq plan cache
// (gptq_plan_cache.h).
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/devices.h"
#include "engine/gptq_plan_cache.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"

namespace nvfp4cal {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

TEST(SelectDevices, CpuAsAskedBuildsEveryWorkerWithItsGptqBackend) {
  EngineOptions options;
  options.device = "cpu";
  options.cpu_workers = 3;
  options.cpu_threads_per_worker = 2;
  absl::StatusOr<Engine> engine = SelectDevices(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ(engine->backend, "cpu");
  EXPECT_EQ(engine->selection, "cpu -> cpu (as asked): 3 CPU worker(s)");
  EXPECT_EQ(engine->gptq_fallback, "");
  ASSERT_EQ(engine->workers.size(), 3u);
  for (const EngineWorker& w : engine->workers) {
    EXPECT_EQ(w.kind, "cpu");
    EXPECT_EQ(w.name, "CPU worker");
    EXPECT_EQ(w.cuda_device, -1);
    ASSERT_NE(w.cpu_search, nullptr);
    EXPECT_EQ(w.cuda_search, nullptr);
    EXPECT_EQ(w.search().BackendName(), "cpu");
    ASSERT_EQ(w.gptq.streams.size(), 1u);
    EXPECT_EQ(w.gptq.streams[0]->BackendName(), "cpu");
    EXPECT_EQ(w.gptq.plan_domain, "cpu");
  }
  // Each worker its own backends (they run batches at the same time).
  EXPECT_NE(engine->workers[0].cpu_search.get(), engine->workers[1].cpu_search.get());
  EXPECT_NE(engine->workers[0].gptq.streams[0].get(), engine->workers[1].gptq.streams[0].get());
}

TEST(SelectDevices, RefusesUnknownDevicesAndOptionsOutOfRange) {
  EngineOptions options;
  options.device = "gpu";
  absl::StatusOr<Engine> engine = SelectDevices(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(engine.status()));
  EXPECT_EQ(engine.status().message(), "--device = \"gpu\" is not one of auto, cpu, cuda");

  struct Case {
    void (*set)(EngineOptions*);
    std::string message;
  };
  const Case cases[] = {
      {[](EngineOptions* o) { o->workers_per_gpu = 0; },
       "workers per GPU = 0 is out of range [1, 16]"},
      {[](EngineOptions* o) { o->workers_per_gpu = 17; },
       "workers per GPU = 17 is out of range [1, 16]"},
      {[](EngineOptions* o) { o->gptq_streams_per_gpu = 0; },
       "gptq streams per GPU = 0 is out of range [1, 64]"},
      {[](EngineOptions* o) { o->cpu_workers = 0; }, "CPU workers = 0 is out of range [1, 1024]"},
      {[](EngineOptions* o) { o->cpu_threads_per_worker = -1; },
       "CPU threads per worker = -1 is out of range [0, 4096]"},
      {[](EngineOptions* o) { o->cuda_device = -2; }, "CUDA device = -2 is out of range [-1, 63]"},
      {[](EngineOptions* o) { o->cuda_device = 64; }, "CUDA device = 64 is out of range [-1, 63]"},
  };
  for (const Case& c : cases) {
    EngineOptions bad;
    bad.device = "cpu";  // checked before any device is touched
    c.set(&bad);
    absl::StatusOr<Engine> refused = SelectDevices(bad);
    ASSERT_FALSE(refused.ok()) << c.message;
    EXPECT_TRUE(absl::IsInvalidArgument(refused.status()));
    EXPECT_EQ(refused.status().message(), c.message);
  }
}

TEST(SelectDevices, AutoAndCudaFollowTheMachine) {
  std::string reason;
  const bool gpu = CudaDeviceAvailable(&reason);
  EngineOptions automatic;
  automatic.cpu_workers = 2;
  absl::StatusOr<Engine> picked = SelectDevices(automatic);
  ASSERT_TRUE(picked.ok()) << picked.status();
  EngineOptions cuda;
  cuda.device = "cuda";
  cuda.cuda_device = 0;
  cuda.workers_per_gpu = 2;
  cuda.gptq_streams_per_gpu = 4;
  absl::StatusOr<Engine> asked = SelectDevices(cuda);
  if (!gpu) {
    EXPECT_EQ(picked->selection, "auto -> cpu (" + reason + "): 2 CPU worker(s)");
    ASSERT_EQ(picked->workers.size(), 2u);
    ASSERT_FALSE(asked.ok());
    EXPECT_TRUE(absl::IsFailedPrecondition(asked.status()));
    EXPECT_EQ(asked.status().message(),
              "--device=cuda: " + reason + "; use --device=cpu or --device=auto");
    return;
  }
  EXPECT_EQ(picked->backend, "cuda");
  EXPECT_THAT(picked->selection, StartsWith("auto -> cuda (a CUDA device is available): "));
  EXPECT_EQ(picked->workers.size() % 3, 0u);  // three per GPU by default
  ASSERT_TRUE(asked.ok()) << asked.status();
  EXPECT_THAT(asked->selection, StartsWith("cuda -> cuda (as asked): 2 worker(s), 2 per GPU: "));
  ASSERT_EQ(asked->workers.size(), 2u);
  for (const EngineWorker& w : asked->workers) {
    EXPECT_EQ(w.kind, "cuda");
    EXPECT_EQ(w.cuda_device, 0);
    ASSERT_NE(w.cuda_search, nullptr);
    EXPECT_EQ(w.search().BackendName(), "cuda");
    EXPECT_EQ(w.name, w.cuda_search->DeviceDescription());
    // 4 streams over 2 workers; the CPU backend alone when CUDA gptq is unavailable.
    if (w.gptq.plan_domain == "cuda:0") {
      EXPECT_EQ(w.gptq.streams.size(), 2u);
    } else {
      EXPECT_EQ(w.gptq.plan_domain, "cpu");
      EXPECT_THAT(asked->selection, HasSubstr("gptq runs on the CPU backend for device 0"));
      EXPECT_THAT(asked->gptq_fallback, StartsWith("device 0 ("));
    }
  }
  EXPECT_NE(asked->workers[0].cuda_search.get(), asked->workers[1].cuda_search.get());
}

// A gptq backend whose plans are markers: counts preparations, fails for a Hessian whose first
// element is negative.
class CountingGptq : public GptqBackend {
 public:
  std::string_view BackendName() const override { return "counting"; }
  absl::StatusOr<std::shared_ptr<const GptqPlan>> Prepare(const FullHessianView& hessian,
                                                          const SearchParams& params) override {
    prepared.fetch_add(1);
    // Long enough that concurrent callers arrive while it runs.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (hessian.data[0] < 0) return absl::InvalidArgumentError("hessian is not a Gram matrix");
    auto plan = std::make_shared<GptqPlan>();
    plan->n = hessian.n;
    plan->params = params;
    return std::shared_ptr<const GptqPlan>(plan);
  }
  absl::Status QuantizeRows(const GptqPlan&, const WeightView&, float, int64_t, int64_t, bool,
                            RowRangeOutput, TensorStats*) override {
    return absl::UnimplementedError("not used");
  }
  std::atomic<int> prepared{0};
};

SearchParams GptqParams(float damping) {
  SearchParams params;
  params.method = Method::kGptq;
  params.gptq.damping = damping;
  return params;
}

TEST(GptqPlanCache, PreparesOncePerHessianDomainAndParametersWhileCallersWait) {
  const std::vector<float> h(16 * 16, 1.0f);
  const FullHessianView view{h.data(), 16};
  CountingGptq backend;
  GptqPlanCache cache;
  std::vector<std::shared_ptr<const GptqPlan>> got(8);
  std::vector<std::thread> callers;
  for (size_t t = 0; t < got.size(); ++t) {
    callers.emplace_back([&, t] {
      GptqPlanCache::PlanOrError plan = cache.Get(backend, "cuda:0", view, GptqParams(0.01f));
      if (plan.ok()) got[t] = *plan;
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(backend.prepared.load(), 1);
  for (const auto& plan : got) {
    ASSERT_NE(plan, nullptr);
    EXPECT_EQ(plan.get(), got[0].get());
  }
  // Another domain, other parameters (bit for bit), another Hessian: a plan each.
  const std::vector<float> h2(16 * 16, 2.0f);
  ASSERT_TRUE(cache.Get(backend, "cuda:1", view, GptqParams(0.01f)).ok());
  ASSERT_TRUE(cache.Get(backend, "cuda:0", view, GptqParams(0.02f)).ok());
  ASSERT_TRUE(cache.Get(backend, "cuda:0", FullHessianView{h2.data(), 16}, GptqParams(0.01f)).ok());
  EXPECT_EQ(backend.prepared.load(), 4);
  EXPECT_EQ(cache.plans_prepared(), 4);
  // The same key again: the first plan.
  GptqPlanCache::PlanOrError again = cache.Get(backend, "cuda:0", view, GptqParams(0.01f));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->get(), got[0].get());
  EXPECT_EQ(backend.prepared.load(), 4);
}

TEST(GptqPlanCache, FailureIsKeptAndTheHookRunsOnceWithTheResult) {
  std::vector<float> h(16 * 16, 1.0f);
  h[0] = -1.0f;
  CountingGptq backend;
  GptqPlanCache cache;
  int hook_calls = 0;
  std::string hook_saw;
  const GptqPlanCache::PreparedHook hook = [&](const GptqPlanCache::PlanOrError& plan) {
    ++hook_calls;
    hook_saw = plan.status().ToString();
    return std::shared_ptr<void>();
  };
  for (int i = 0; i < 3; ++i) {
    GptqPlanCache::PlanOrError plan =
        cache.Get(backend, "cpu", FullHessianView{h.data(), 16}, GptqParams(0.01f), hook);
    ASSERT_FALSE(plan.ok());
    EXPECT_EQ(plan.status().message(), "hessian is not a Gram matrix");
  }
  EXPECT_EQ(backend.prepared.load(), 1);
  EXPECT_EQ(hook_calls, 1);
  EXPECT_EQ(hook_saw, "INVALID_ARGUMENT: hessian is not a Gram matrix");
  EXPECT_EQ(cache.plans_prepared(), 0);
}

TEST(GptqPlanCache, OwnedPlansLiveUntilTheCacheGoes) {
  const std::vector<float> h(16 * 16, 1.0f);
  CountingGptq backend;
  std::weak_ptr<void> charge;
  std::weak_ptr<const GptqPlan> weak_plan;
  {
    GptqPlanCache cache;
    GptqPlanCache::PlanOrError plan =
        cache.Get(backend, "cpu", FullHessianView{h.data(), 16}, GptqParams(0.01f),
                  [&](const GptqPlanCache::PlanOrError&) {
                    auto kept = std::make_shared<int>(1);
                    charge = kept;
                    return std::shared_ptr<void>(kept);
                  });
    ASSERT_TRUE(plan.ok());
    weak_plan = *plan;
    plan = absl::CancelledError("");  // the caller lets go; the cache still holds it
    EXPECT_FALSE(weak_plan.expired());
    EXPECT_FALSE(charge.expired());
  }
  EXPECT_TRUE(weak_plan.expired());
  EXPECT_TRUE(charge.expired());
}

}  // namespace
}  // namespace nvfp4cal
