#include "client/local_quantizer.h"

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/thread_name.h"
#include "engine/devices.h"
#include "engine/gptq_plan_cache.h"
#include "nvfp4cal/kernels/gptq.h"

namespace nvfp4cal {
namespace {

// The gptq plans of one QuantizeAll call: a cache per full Hessian (tasks with equal
// hessian_key share one; see KeyOf for tasks without one), dropped with its plans after its
// last task. Per Hessian, not per matrix address: the pipeline sets full_hessian.data late (the
// scan reads the matrix beside the quantizer) and frees it after the Hessian's last task, so an
// address can come back for another Hessian within one call.
class HessianPlans {
 public:
  explicit HessianPlans(absl::Span<const TensorTask> tasks) : key_of_(tasks.size()) {
    for (size_t i = 0; i < tasks.size(); ++i) {
      if (tasks[i].params.method != Method::kGptq) continue;
      key_of_[i] = KeyOf(tasks[i], i);
      Entry& e = entries_[key_of_[i]];
      if (e.cache == nullptr) e.cache = std::make_unique<GptqPlanCache>();
      ++e.remaining;
    }
  }

  // A task's Hessian: its key; without one, the matrix's address when it is set already (no
  // gate: the caller holds it for the whole call), else the task alone.
  static std::string KeyOf(const TensorTask& task, size_t index) {
    if (!task.hessian_key.empty()) return task.hessian_key;
    if (task.ready == nullptr && task.full_hessian.data != nullptr) {
      return absl::StrCat(
          "\x01"
          "address ",
          reinterpret_cast<uintptr_t>(task.full_hessian.data));
    }
    return absl::StrCat("\x01task ", index);
  }

  // The cache of gptq task `task`'s Hessian (until Done for its last task).
  GptqPlanCache& Of(size_t task) {
    absl::MutexLock lock(&mu_);
    return *entries_.at(key_of_[task]).cache;
  }

  // Task `task` no longer uses its plan: after the Hessian's last task its plans are freed.
  void Done(size_t task) {
    std::unique_ptr<GptqPlanCache> dropped;  // freed after mu_ is released
    absl::MutexLock lock(&mu_);
    Entry& e = entries_.at(key_of_[task]);
    if (--e.remaining == 0) dropped = std::move(e.cache);
  }

 private:
  struct Entry {
    std::unique_ptr<GptqPlanCache> cache;
    int remaining = 0;
  };
  std::vector<std::string> key_of_;
  absl::Mutex mu_;
  std::map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
};

// Quantizes tasks on one or more backends. With several (CUDA: one per stream), that many tasks
// are in flight, so one tensor's validation scan and host-device copies overlap another's
// kernels; results are handed over as they finish, from the worker threads (several at once).
class LocalQuantizer : public Quantizer {
 public:
  // One worker (a thread) per engine worker.
  LocalQuantizer(std::vector<EngineWorker> workers, std::string description, Trace* trace)
      : workers_(std::move(workers)), description_(std::move(description)), trace_(trace) {}

  std::string Describe() const override { return description_; }

  absl::Status QuantizeAll(absl::Span<const TensorTask> tasks,
                           const QuantizeResultCallback& on_result) override {
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::vector<absl::Status> errors(tasks.size());
    // One gptq plan per full Hessian (and plan domain), prepared by the first task that needs
    // it and freed after the last (q/k/v and gate/up share theirs).
    HessianPlans plans(tasks);
    auto work = [&](size_t worker) {
      for (size_t i; !failed.load() && (i = next.fetch_add(1)) < tasks.size();) {
        absl::Status status = RunTask(tasks[i], workers_[worker], i, plans, failed, on_result);
        if (!status.ok()) {
          errors[i] = std::move(status);
          failed.store(true);
        }
      }
    };
    std::vector<std::thread> pool;
    for (size_t w = 1; w < workers_.size(); ++w) {
      pool.emplace_back([&work, w] {
        NameThisThread("nvf-quantize");
        work(w);
      });
    }
    work(0);  // on the caller's thread, whose name stays (the main thread's is the process's)
    for (std::thread& t : pool) t.join();
    for (absl::Status& s : errors) {
      if (!s.ok()) return s;  // the first failing task in order
    }
    return absl::OkStatus();
  }

 private:
  absl::Status RunTask(const TensorTask& task, EngineWorker& worker, size_t index,
                       HessianPlans& plans, const std::atomic<bool>& failed,
                       const QuantizeResultCallback& on_result) {
    // Its weights may still be on their way (the caller reads them beside); a failed call
    // stops waiting (the reader may wait for memory the failed tasks hold).
    absl::Status ready;
    {
      TraceSpan span(trace_, "wait for " + task.name, "quantize");
      ready = AwaitTask(task, [&failed] { return failed.load(); });
    }
    if (!ready.ok()) return ready;
    TraceSpan quantize_span(trace_, "quantize " + task.name, "quantize");
    absl::StatusOr<QuantizedTensor> result;
    if (task.params.method == Method::kGptq) {
      // Full-Hessian propagation on the worker's gptq backend, with the Hessian's shared plan.
      GptqRequest gptq;
      gptq.weights = task.weights;
      gptq.hessian = task.full_hessian;
      gptq.params = task.params;
      gptq.global_amax = task.global_amax;
      GptqBackend& backend = *worker.gptq.streams[0];
      {
        GptqPlanCache::PlanOrError plan =
            plans.Of(index).Get(backend, worker.gptq.plan_domain, task.full_hessian, task.params);
        result = plan.ok() ? GptqQuantizeWithPlan(backend, **plan, gptq)
                           : absl::StatusOr<QuantizedTensor>(plan.status());
      }
      plans.Done(index);
    } else {
      QuantizeRequest request;
      request.weights = task.weights;
      request.hessians = task.hessians;
      request.params = task.params;
      request.global_amax = task.global_amax;
      // Checked once: with the scan the caller took (its amax pass), else scanned here.
      absl::StatusOr<ValidatedRequest> validated =
          task.weight_scan.has_value() ? ValidateQuantizeRequest(request, *task.weight_scan)
                                       : ValidateQuantizeRequest(request);
      result = validated.ok() ? worker.search().QuantizeValidated(*validated)
                              : absl::StatusOr<QuantizedTensor>(validated.status());
    }
    if (!result.ok()) {
      return absl::Status(result.status().code(),
                          absl::StrCat(task.name, ": ", result.status().message()));
    }
    quantize_span.End();
    // The callback may run for several tasks at once (Quantizer's contract); the CLI's only
    // queues the result for its writer threads, so the worker goes on to its next tensor.
    return on_result(index, *std::move(result));
  }

  std::vector<EngineWorker> workers_;
  std::string description_;
  Trace* const trace_;
};

// A quantizer being made on its own thread; every call waits for it.
class BackgroundQuantizer : public Quantizer {
 public:
  explicit BackgroundQuantizer(std::function<absl::StatusOr<std::unique_ptr<Quantizer>>()> make)
      : thread_([this, make = std::move(make)] {
          absl::StatusOr<std::unique_ptr<Quantizer>> made = make();
          absl::MutexLock lock(&mu_);
          made_ = std::move(made);
          done_ = true;
        }) {}
  ~BackgroundQuantizer() override { thread_.join(); }

  std::string Describe() const override {
    const absl::StatusOr<std::unique_ptr<Quantizer>>& made = Wait();
    return made.ok() ? (*made)->Describe()
                     : absl::StrCat("in-process (not started: ", made.status().message(), ")");
  }

  absl::Status QuantizeAll(absl::Span<const TensorTask> tasks,
                           const QuantizeResultCallback& on_result) override {
    const absl::StatusOr<std::unique_ptr<Quantizer>>& made = Wait();
    if (!made.ok()) return made.status();
    return (*made)->QuantizeAll(tasks, on_result);
  }

 private:
  // The result, once made (it never changes after).
  const absl::StatusOr<std::unique_ptr<Quantizer>>& Wait() const {
    absl::MutexLock lock(&mu_, absl::Condition(&done_));
    return made_;
  }

  mutable absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::StatusOr<std::unique_ptr<Quantizer>> made_ ABSL_GUARDED_BY(mu_) =
      absl::UnknownError("not made yet");
  std::thread thread_;  // last: it starts once the members it sets exist
};

}  // namespace

absl::StatusOr<std::unique_ptr<Quantizer>> StartLocalQuantizer(
    const LocalQuantizerOptions& options) {
  if (absl::Status s = CheckDeviceName(options.device); !s.ok()) return s;
  return std::make_unique<BackgroundQuantizer>([options] {
    TraceSpan span(options.trace, "start the in-process backend", "setup");
    return MakeLocalQuantizer(options);
  });
}

absl::StatusOr<std::unique_ptr<Quantizer>> MakeLocalQuantizer(
    const LocalQuantizerOptions& options) {
  EngineOptions engine_options;
  engine_options.device = options.device;
  engine_options.cuda_device = options.cuda_device;
  engine_options.workers_per_gpu = options.cuda_workers;
  engine_options.gptq_streams_per_gpu = options.cuda_workers;  // one per worker
  engine_options.cpu_workers = 1;                              // its threads share each tensor
  engine_options.cpu_threads_per_worker = options.cpu_threads;
  // A usable GPU that cannot be set up (its memory taken by another process) leaves the CPU.
  engine_options.auto_falls_back_to_cpu = true;
  absl::StatusOr<Engine> engine = SelectDevices(engine_options);
  if (!engine.ok()) return engine.status();
  // "in-process cpu", or "in-process cuda (NVIDIA H100 ..., 3 streams)" (the CLI's report).
  std::string description = "in-process cpu";
  if (engine->backend == "cuda") {
    description = absl::StrCat(
        "in-process cuda (", engine->workers.front().name, ", ", engine->workers.size(), " streams",
        engine->gptq_fallback.empty() ? ""
                                      : absl::StrCat("; gptq on the cpu: ", engine->gptq_fallback),
        ")");
  }
  return std::make_unique<LocalQuantizer>(std::move(engine->workers), std::move(description),
                                          options.trace);
}

std::unique_ptr<Quantizer> MakeLocalQuantizer(std::unique_ptr<ScaleSearch> search,
                                              std::string description, int gptq_threads) {
  std::vector<EngineWorker> workers;
  workers.push_back(CpuWorker(std::move(search), gptq_threads));
  return std::make_unique<LocalQuantizer>(std::move(workers), std::move(description),
                                          /*trace=*/nullptr);
}

}  // namespace nvfp4cal
