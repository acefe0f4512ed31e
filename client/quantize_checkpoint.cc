#include "client/quantize_checkpoint.h"

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/hessians.h"
#include "client/parallel.h"
#include "client/quantize_output.h"
#include "client/quantize_prepare.h"
#include "client/result_writer.h"
#include "client/temp_dir.h"
#include "common/file_util.h"
#include "common/thread_name.h"
#include "nlohmann/json.hpp"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using client_internal::CopyOtherFiles;
using client_internal::DecideActivations;
using client_internal::FloatBytes;
using client_internal::KvCacheScales;
using client_internal::KvScalesByWeight;
using client_internal::ModuleOutput;
using client_internal::NeedsFullHessian;
using client_internal::OutputSpecs;
using client_internal::PlanReadAhead;
using client_internal::PreparedModule;
using client_internal::PrepareModules;
using client_internal::ReadAhead;
using client_internal::ScanGroups;
using client_internal::ScanModules;
using client_internal::WriteIndexAndConfigs;

// Forwards to another observer one call at a time (the copy of untouched tensors runs beside
// the quantizer's callbacks).
class SerialObserver : public QuantizeObserver {
 public:
  explicit SerialObserver(QuantizeObserver* inner) : inner_(inner) {}
  void OnStart(int64_t tensors, int64_t bytes) override {
    absl::MutexLock lock(&mu_);
    inner_->OnStart(tensors, bytes);
  }
  void OnTensorDone(const std::string& name, int64_t bytes) override {
    absl::MutexLock lock(&mu_);
    inner_->OnTensorDone(name, bytes);
  }
  void OnMessage(const std::string& line) override {
    absl::MutexLock lock(&mu_);
    inner_->OnMessage(line);
  }

 private:
  QuantizeObserver* const inner_;
  absl::Mutex mu_;
};

// Untouched tensors are copied in pieces of this size, on this many threads.
constexpr int64_t kCopyPieceBytes = int64_t{16} << 20;
constexpr int kCopyThreads = 3;
// Threads that write results (to the page cache, each write then started for the disk), and
// the result bytes that may wait for them (a Llama-3-8B gate_proj's result is 33 MB).
constexpr int kResultWriters = 4;
constexpr int64_t kMaxQueuedResultBytes = int64_t{256} << 20;

// Removes a folder when it goes out of scope unless released.
class TempDirGuard {
 public:
  explicit TempDirGuard(std::string path) : path_(std::move(path)) {}
  ~TempDirGuard() {
    if (!path_.empty()) RemoveTree(path_).IgnoreError();
  }
  void Release() { path_.clear(); }

 private:
  std::string path_;
};

// What the run reads and where it writes, for CheckOutputTarget.
OutputTarget QuantizeTarget(const QuantizeOptions& options) {
  OutputTarget target;
  target.out_dir = options.out_dir;
  target.overwrite = options.overwrite;
  target.inputs = {{"--model", options.model_dir}, {"--hessians", options.hessians_path}};
  target.inputs.insert(target.inputs.end(), options.other_inputs.begin(),
                       options.other_inputs.end());
  return target;
}

// The options' own checks, before anything is read.
absl::Status CheckOptions(const QuantizeOptions& options, const OutputTarget& target) {
  absl::Status out_ok = CheckOutputTarget(target);
  if (!out_ok.ok()) return out_ok;
  absl::Status params_ok = ValidateParams(options.params);
  if (!params_ok.ok()) return params_ok;
  if (options.fallback_method.has_value() && MethodNeedsHessian(*options.fallback_method)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--fallback-method ", std::string(MethodName(*options.fallback_method)),
                     " needs a Hessian itself; use max or mse"));
  }
  return absl::OkStatus();
}

// The run's inputs, checked, before any output is written.
struct RunInputs {
  std::unique_ptr<Checkpoint> checkpoint;
  std::vector<ModulePlan> plans;
  // Null without --hessians.
  std::unique_ptr<HessianStore> hessians;
  // Modules not quantized, for the labels' exclude lists.
  std::vector<std::string> exclude_modules;
  std::vector<PreparedModule> prepared;
  // W4A4 (every quantized module gets its input scale) or weight-only.
  bool activations = false;
  KvScalesByWeight kv_scales;
};

// Opens the model and the Hessians, plans and prepares the modules, decides the label and the
// KV-cache scales; the skipped modules and the label go into *report.
absl::Status ReadInputs(const QuantizeOptions& options, QuantizeObserver* observer, RunInputs* in,
                        QuantizeReport* report) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::Open(options.model_dir);
  if (!checkpoint.ok()) return checkpoint.status();
  in->checkpoint = *std::move(checkpoint);
  if (nlohmann::json::parse(in->checkpoint->config_text()).contains("quantization_config")) {
    return absl::FailedPreconditionError(
        absl::StrCat(options.model_dir,
                     "/config.json already has a quantization_config: the model is "
                     "quantized already"));
  }
  absl::StatusOr<std::vector<ModulePlan>> plans = PlanModules(*in->checkpoint, options.plan);
  if (!plans.ok()) return plans.status();
  in->plans = *std::move(plans);

  if (!options.hessians_path.empty()) {
    absl::StatusOr<std::unique_ptr<HessianStore>> store = HessianStore::Open(options.hessians_path);
    if (!store.ok()) return store.status();
    in->hessians = *std::move(store);
  }

  for (const ModulePlan& p : in->plans) {
    if (p.quantize) continue;
    in->exclude_modules.push_back(p.module);
    report->skipped.push_back(absl::StrCat(p.module, ": ", p.skip_reason));
    if (observer != nullptr && (p.skip_reason.find("multiple of 16") != std::string::npos ||
                                p.skip_reason.find("3-D expert tensor") != std::string::npos)) {
      observer->OnMessage(absl::StrCat("note: ", p.module, " not quantized: ", p.skip_reason));
    }
  }

  absl::Status ready = PrepareModules(options, *in->checkpoint, in->plans, in->hessians.get(),
                                      observer, &in->prepared);
  if (!ready.ok()) return ready;
  absl::StatusOr<bool> activations = DecideActivations(options.activations, in->prepared, observer);
  if (!activations.ok()) return activations.status();
  in->activations = *activations;
  report->quant_algo = *activations ? kQuantAlgoW4A4 : kQuantAlgoWeightOnly;
  absl::StatusOr<KvScalesByWeight> kv_scales =
      KvCacheScales(options.kv_cache, LayoutOf(options.format), in->plans, in->hessians.get());
  if (!kv_scales.ok()) return kv_scales.status();
  in->kv_scales = *std::move(kv_scales);
  return absl::OkStatus();
}

// The output shards being written.
struct ShardOutputs {
  // One per shard of the model, in its order.
  std::vector<std::unique_ptr<SafetensorsWriter>> writers;
  // Output tensor -> shard file, for the index.
  std::map<std::string, std::string> weight_map;
  // The quantized weights by name (the input tensors not copied as they are).
  std::map<std::string, const ModulePlan*> quantized_by_weight;
};

// Creates a writer with the final header per shard in `temp` (bytes_in and bytes_out go into
// *report; the observer hears the start).
absl::Status StartShards(const RunInputs& in, const Nvfp4Layout& layout, const std::string& temp,
                         QuantizeObserver* observer, ShardOutputs* out, QuantizeReport* report) {
  std::map<std::string, const ModulePlan*>& quantized_by_weight = out->quantized_by_weight;
  std::set<std::string> with_input_scale;
  for (const PreparedModule& m : in.prepared) {
    quantized_by_weight[m.plan->weight_name] = m.plan;
    if (in.activations) with_input_scale.insert(m.plan->module);
  }
  const Checkpoint& model = *in.checkpoint;
  int64_t total_bytes = 0;
  for (const Checkpoint::Shard& shard : model.shards()) {
    std::vector<SafetensorsTensorSpec> specs =
        OutputSpecs(*shard.file, layout, quantized_by_weight, with_input_scale, in.kv_scales);
    for (const SafetensorsTensorSpec& s : specs) {
      out->weight_map[s.name] = shard.file_name;
      report->bytes_out += NumElements(s.shape) * SafetensorsDTypeSize(s.dtype);
    }
    absl::StatusOr<std::unique_ptr<SafetensorsWriter>> writer = SafetensorsWriter::Create(
        (fs::path(temp) / shard.file_name).string(), specs, shard.file->metadata());
    if (!writer.ok()) return writer.status();
    out->writers.push_back(*std::move(writer));
    for (const SafetensorsTensor& t : shard.file->tensors()) total_bytes += t.num_bytes;
  }
  report->bytes_in = total_bytes;
  if (observer != nullptr) {
    // A 3-D expert tensor counts once per expert.
    int64_t units = static_cast<int64_t>(model.tensors().size());
    for (const auto& [weight, plan] : quantized_by_weight) {
      if (plan->experts > 0) units += plan->experts - 1;
    }
    observer->OnStart(units, total_bytes);
  }
  return absl::OkStatus();
}

// Copies every untouched tensor (read with pread in pieces, so no page of the mapping is
// faulted in) on a few threads of its own and then writes the KV-cache scales; runs beside the
// quantizer, so it stops early when `stop` is set (the quantizer failed).
absl::Status CopyUntouched(const QuantizeOptions& options, const RunInputs& in,
                           const ShardOutputs& out, QuantizeObserver* observer,
                           const std::atomic<bool>& stop, int64_t* kv_cache_scales) {
  const Checkpoint& model = *in.checkpoint;
  std::vector<std::pair<size_t, const SafetensorsTensor*>> untouched;
  for (size_t s = 0; s < model.shards().size(); ++s) {
    for (const SafetensorsTensor& t : model.shards()[s].file->tensors()) {
      if (out.quantized_by_weight.count(t.name) == 0) untouched.emplace_back(s, &t);
    }
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::vector<absl::Status> errors(untouched.size());
  auto copy = [&] {
    std::unique_ptr<uint8_t[]> piece(new uint8_t[static_cast<size_t>(kCopyPieceBytes)]);
    for (size_t k; !failed.load() && (k = next.fetch_add(1)) < untouched.size();) {
      const auto [s, t] = untouched[k];
      absl::Status status;
      if (stop.load()) return;  // the quantizer's error is the run's
      if (options.cancel != nullptr && options.cancel->load()) {
        status = absl::CancelledError("interrupted");
      }
      TraceSpan span(options.trace, "copy " + t->name, "copy");
      for (int64_t at = 0; status.ok() && at < t->num_bytes; at += kCopyPieceBytes) {
        const int64_t n = std::min(kCopyPieceBytes, t->num_bytes - at);
        status = model.shards()[s].file->ReadRange(t->data + at, n, piece.get());
        if (status.ok()) {
          status = out.writers[s]->Write(t->name,
                                         absl::MakeConstSpan(piece.get(), static_cast<size_t>(n)));
        }
      }
      if (!status.ok()) {
        errors[k] = std::move(status);
        failed.store(true);
        return;
      }
      if (observer != nullptr) observer->OnTensorDone(t->name, t->num_bytes);
    }
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < kCopyThreads; ++i) pool.emplace_back(copy);
  copy();
  for (std::thread& t : pool) t.join();
  for (absl::Status& e : errors) {
    if (!e.ok()) return e;  // the first failing tensor in order
  }
  if (stop.load()) return absl::OkStatus();
  for (size_t s = 0; s < model.shards().size(); ++s) {
    for (const SafetensorsTensor& t : model.shards()[s].file->tensors()) {
      const auto kv = in.kv_scales.find(t.name);
      if (kv == in.kv_scales.end()) continue;
      absl::Status written = out.writers[s]->Write(kv->second.tensor, FloatBytes(kv->second.value));
      if (!written.ok()) return written;
      ++*kv_cache_scales;
    }
  }
  return absl::OkStatus();
}

// The quantizer's task of every prepared module, tasks[k] of prepared[order[k]]; the scan sets
// each one's weights, global amax and scan later (ScanModules).
std::vector<TensorTask> MakeTasks(const std::vector<PreparedModule>& prepared,
                                  const std::vector<size_t>& order) {
  std::vector<TensorTask> tasks;
  for (size_t i : order) {
    const PreparedModule& m = prepared[i];
    TensorTask task;
    task.name =
        m.expert < 0 ? m.plan->weight_name : absl::StrCat(m.plan->weight_name, "[", m.expert, "]");
    task.weights = {m.weights, m.plan->dtype, m.plan->rows, m.plan->cols};
    if (m.hessian_blocks != nullptr || m.blocks_from_full) {
      // From a full matrix the blocks come with the scan (data set then).
      task.hessians = {m.blocks_from_full ? nullptr : m.hessian_blocks->data(), m.plan->cols / 16};
      task.hessian_key = m.hessian_entry;
    }
    if (NeedsFullHessian(m)) {
      // Data: the scan's read, which checked every value (HessianStore::Full, with this module's
      // symmetry tolerance), so the plan does not check them again.
      task.full_hessian = {nullptr, m.plan->cols, /*values_checked=*/true};
      task.hessian_key = m.hessian_entry;
    }
    task.params = m.params;
    tasks.push_back(std::move(task));
  }
  return tasks;
}

// One result into its module's output, its report row into *module_report and the observer's
// messages. Runs on the result writer's threads.
absl::Status WriteResult(const QuantizeOptions& options, const TensorTask& task,
                         const PreparedModule& m, QuantizedTensor result, ModuleOutput& output,
                         QuantizeObserver* observer, absl::Mutex& report_mu, QuantizeReport* report,
                         std::optional<ModuleReport>* module_report) {
  const ModulePlan& p = *m.plan;
  ModuleReport r;
  r.module = m.name;
  r.rows = p.rows;
  r.cols = p.cols;
  r.hessian_entry = m.hessian_entry;
  r.stats = result.stats;
  const double kernel_seconds = result.server_kernel_seconds;
  const double queue_seconds = result.server_queue_seconds;
  if (options.trace != nullptr) {
    options.trace->Async(task.name, "quantize", m.scanned_at, absl::Now());
  }
  {
    TraceSpan span(options.trace, "write " + task.name, "write");
    absl::Status written =
        output.Add(std::max<int64_t>(m.expert, 0), std::move(result), m.input_amax.value_or(0.0f));
    if (!written.ok()) return written;
  }
  if (observer != nullptr && r.stats.zero_hessian_blocks > 0) {
    observer->OnMessage(absl::StrCat("warning: ", m.name, ": ", r.stats.zero_hessian_blocks, " of ",
                                     r.stats.num_blocks, " blocks have an all-zero Hessian block (",
                                     m.hessian_entry,
                                     " missed those inputs); the smallest scale won there"));
  }
  if (observer != nullptr && r.stats.gptq.damping_increases > 0) {
    observer->OnMessage(absl::StrCat("warning: ", m.name, ": ", m.hessian_entry,
                                     " is not positive definite with --gptq-damping ",
                                     m.params.gptq.damping, "; gptq used ",
                                     r.stats.gptq.damping_relative, " x mean diagonal"));
  }
  if (observer != nullptr) observer->OnTensorDone(task.name, p.rows * p.cols * DTypeSize(p.dtype));
  absl::MutexLock lock(&report_mu);
  report->server_kernel_seconds += kernel_seconds;
  report->server_queue_seconds += queue_seconds;
  *module_report = std::move(r);
  return absl::OkStatus();
}

// QuantizeModules' quantizer call (tasks[k] of prepared[order[k]]) and the callback that gives
// each result's inputs back (done(prepared index)) and queues the result for writing.
absl::Status QuantizeTasks(const QuantizeOptions& options, const RunInputs& in,
                           const Nvfp4Layout& layout, absl::Span<const TensorTask> tasks,
                           const std::vector<size_t>& order,
                           const std::function<void(size_t)>& done, Quantizer* quantizer,
                           QuantizeObserver* observer, const ShardOutputs& shards,
                           const std::atomic<bool>& copy_failed,
                           std::vector<std::optional<ModuleReport>>* module_reports,
                           QuantizeReport* report) {
  const std::vector<PreparedModule>& prepared = in.prepared;
  absl::Mutex report_mu;  // guards *report and *module_reports in the callbacks
  module_reports->assign(prepared.size(), std::nullopt);
  std::map<const ModulePlan*, std::unique_ptr<ModuleOutput>> outputs;
  for (const PreparedModule& m : prepared) {
    std::unique_ptr<ModuleOutput>& out = outputs[m.plan];
    if (out == nullptr) {
      out = std::make_unique<ModuleOutput>(*m.plan, layout, shards.writers[m.shard].get(),
                                           in.activations);
    }
  }
  // Each result is written by the writer's threads, so that the quantizer's workers (one per
  // CUDA stream in-process) go on to their next tensor at once.
  ResultWriter writer(kResultWriters, kMaxQueuedResultBytes);
  absl::Status quantized =
      quantizer->QuantizeAll(tasks, [&](size_t task, QuantizedTensor result) -> absl::Status {
        const size_t index = order[task];
        if (options.cancel != nullptr && options.cancel->load()) {
          return absl::CancelledError("interrupted");
        }
        if (copy_failed.load()) {
          return absl::CancelledError("the copy of untouched tensors failed");
        }
        const ModulePlan& p = *prepared[index].plan;
        if (result.rows != p.rows || result.cols != p.cols ||
            result.packed_codes.size() != static_cast<size_t>(p.rows * p.cols / 2) ||
            result.scales.size() != static_cast<size_t>(p.rows * p.cols / 16)) {
          return absl::InternalError(absl::StrCat(p.weight_name, ": result has the wrong size"));
        }
        // The result no longer needs its inputs: giving them back now (not after the write)
        // lets the scan read ahead while results wait for the writer's threads.
        done(index);
        const int64_t bytes =
            static_cast<int64_t>(result.packed_codes.size() + result.scales.size());
        auto held = std::make_shared<QuantizedTensor>(std::move(result));
        return writer.Submit(bytes, [&, task, index, held]() {
          return WriteResult(options, tasks[task], prepared[index], std::move(*held),
                             *outputs.at(prepared[index].plan), observer, report_mu, report,
                             &(*module_reports)[index]);
        });
      });
  absl::Status written = writer.Finish();
  return quantized.ok() ? written : quantized;
}

// Hands the prepared modules to the quantizer while their weights are scanned (a task waits for
// its scan: ScanModules beside the quantizer) and writes each result as it arrives; one report
// row per module into *module_reports (in prepared order), the scan's wall time into
// *scan_time, the servers' times into *report.
absl::Status QuantizeModules(const QuantizeOptions& options, RunInputs& in,
                             const Nvfp4Layout& layout, Quantizer* quantizer,
                             QuantizeObserver* observer, const ShardOutputs& shards,
                             const std::atomic<bool>& copy_failed,
                             std::vector<std::optional<ModuleReport>>* module_reports,
                             absl::Duration* scan_time, QuantizeReport* report) {
  std::vector<PreparedModule>& prepared = in.prepared;
  // Tasks in the scan's order (fused siblings together), so that the quantizer takes them as
  // they become ready and the read-ahead memory always goes to tasks it takes next.
  const std::vector<std::vector<size_t>> groups = ScanGroups(prepared);
  std::vector<size_t> order;
  for (const std::vector<size_t>& group : groups) {
    order.insert(order.end(), group.begin(), group.end());
  }
  std::vector<size_t> task_of(prepared.size());
  for (size_t k = 0; k < order.size(); ++k) task_of[order[k]] = k;
  std::vector<TensorTask> tasks = MakeTasks(prepared, order);
  // Each task's gate opens once the scan has set its weights and global amax (or failed).
  std::vector<std::unique_ptr<TaskGate>> gates;
  for (TensorTask& task : tasks) {
    gates.push_back(std::make_unique<TaskGate>());
    task.ready = gates.back().get();
  }
  const int64_t planned_read_ahead = PlanReadAhead(groups, &prepared);
  ReadAhead read_ahead(options.read_ahead_bytes > 0 ? options.read_ahead_bytes
                                                    : planned_read_ahead);
  std::atomic<bool> quantizer_done{false};
  // Threads are named for top -H and gdb; the ones they start inherit the name.
  std::thread scanner([&] {
    NameThisThread("nvf-scan");
    const absl::Time scan_start = absl::Now();
    ScanModules(
        &prepared, groups, in.hessians.get(), &read_ahead, options.trace,
        [&] {
          return quantizer_done.load() || copy_failed.load() ||
                 (options.cancel != nullptr && options.cancel->load());
        },
        [&](size_t i, const absl::Status& status) {
          TensorTask& task = tasks[task_of[i]];
          if (status.ok()) {
            task.weights.data = prepared[i].weights;
            task.global_amax = prepared[i].global_amax;
            task.weight_scan = prepared[i].scan;
            if (prepared[i].hessian_full != nullptr) {
              task.full_hessian.data = prepared[i].hessian_full->data.get();
            }
            if (prepared[i].blocks_from_full) {
              task.hessians.data = prepared[i].hessian_blocks->data();
            }
          }
          gates[task_of[i]]->Open(status);
        });
    *scan_time = absl::Now() - scan_start;
  });
  // A unit's result has arrived: its read copy and its hold on its Hessian go.
  auto done = [&](size_t i) {
    PreparedModule& m = prepared[i];
    read_ahead.Give(std::move(m.read_copy), WeightBytes(m));
    if (NeedsFullHessian(m)) {
      m.hessian_full.reset();
      in.hessians->ReleaseFull(m.hessian_entry);
    } else if (!m.hessian_entry.empty()) {
      m.hessian_blocks.reset();
      in.hessians->ReleaseBlocks(m.hessian_entry);
    }
    read_ahead.Release(std::exchange(m.read_ahead_bytes, 0));
  };
  absl::Status quantized = QuantizeTasks(options, in, layout, tasks, order, done, quantizer,
                                         observer, shards, copy_failed, module_reports, report);
  // After a failure the tasks not yet read need no reading.
  quantizer_done.store(true);
  scanner.join();
  return quantized;
}

}  // namespace

absl::StatusOr<QuantizeReport> QuantizeCheckpoint(const QuantizeOptions& options,
                                                  Quantizer* quantizer,
                                                  QuantizeObserver* observer) {
  const OutputTarget target = QuantizeTarget(options);
  absl::Status options_ok = CheckOptions(options, target);
  if (!options_ok.ok()) return options_ok;

  const absl::Time start = absl::Now();
  QuantizeReport report;
  // The copy of untouched tensors reports progress beside the quantizer's callbacks.
  std::optional<SerialObserver> serial;
  if (observer != nullptr) observer = &serial.emplace(observer);
  RunInputs in;
  absl::Status read;
  {
    TraceSpan span(options.trace, "open and plan", "read");
    read = ReadInputs(options, observer, &in, &report);
  }
  if (!read.ok()) return read;
  const QuantizationLabel label{in.activations, options.kv_cache == KvCacheMode::kFp8};
  const Nvfp4Layout& layout = LayoutOf(options.format);
  report.read_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  const absl::Time copy_start = absl::Now();

  // From here on everything goes to the temporary folder.
  absl::StatusOr<std::string> temp = MakeTempDirBeside(options.out_dir);
  if (!temp.ok()) return temp.status();
  TempDirGuard guard(*temp);
  // First the other files: a bad one (a FIFO, say) fails the run before the long part.
  absl::Status others = CopyOtherFiles(options, *in.checkpoint, *temp, observer);
  if (!others.ok()) return others;
  ShardOutputs shards;
  absl::Status started = StartShards(in, layout, *temp, observer, &shards, &report);
  if (!started.ok()) return started;
  report.copy_seconds = absl::ToDoubleSeconds(absl::Now() - copy_start);

  // The untouched tensors are copied (and their pages start for the disk) beside the scan of
  // the weights and the quantizer; whichever fails stops the other.
  std::atomic<bool> quantize_failed{false};
  std::atomic<bool> copy_failed{false};
  absl::Status copied;
  absl::Duration copy_time;
  int64_t kv_cache_scales = 0;
  std::thread copier([&] {
    NameThisThread("nvf-copy");
    const absl::Time copy_begin = absl::Now();
    copied = CopyUntouched(options, in, shards, observer, quantize_failed, &kv_cache_scales);
    if (!copied.ok()) copy_failed.store(true);
    copy_time = absl::Now() - copy_begin;
  });
  const absl::Time quantize_start = absl::Now();
  absl::Duration scan_time;  // beside the quantizer
  std::vector<std::optional<ModuleReport>> module_reports;
  absl::Status quantized = QuantizeModules(options, in, layout, quantizer, observer, shards,
                                           copy_failed, &module_reports, &scan_time, &report);
  const absl::Time quantize_end = absl::Now();
  report.scan_seconds = absl::ToDoubleSeconds(scan_time);
  // After the quantizer's work: an in-process backend may still be starting before it.
  report.quantizer = quantizer->Describe();
  if (!quantized.ok()) quantize_failed.store(true);
  copier.join();
  if (!copied.ok()) return copied;
  if (!quantized.ok()) return quantized;
  report.kv_cache_scales = kv_cache_scales;
  report.copy_seconds += absl::ToDoubleSeconds(copy_time);
  // Results are written as they arrive, inside the quantize phase; `write` is what is left.
  report.quantize_seconds = absl::ToDoubleSeconds(quantize_end - quantize_start);
  if (in.hessians != nullptr) report.hessian_read_seconds = in.hessians->read_seconds();
  const absl::Time finish_start = absl::Now();
  for (std::optional<ModuleReport>& r : module_reports) {
    if (!r.has_value()) return absl::InternalError("a module's result never arrived");
    report.modules.push_back(*std::move(r));
  }

  // Every shard's tail goes to the disk at once (fsync on a thread per shard).
  std::vector<absl::Status> finished(shards.writers.size());
  ParallelFor(shards.writers.size(), [&](size_t s) {
    TraceSpan span(options.trace, absl::StrCat("fsync shard ", s + 1), "write");
    finished[s] = shards.writers[s]->Finish();
  });
  for (absl::Status& f : finished) {
    if (!f.ok()) return f;
  }
  // Index, configs.
  absl::Status written;
  {
    TraceSpan span(options.trace, "index and configs", "write");
    written = WriteIndexAndConfigs(*in.checkpoint, shards.weight_map, report.bytes_out,
                                   in.exclude_modules, label, options.format, *temp);
  }
  if (!written.ok()) return written;
  if (options.cancel != nullptr && options.cancel->load()) {
    return absl::CancelledError("interrupted");
  }
  absl::Status renamed;
  {
    // With --overwrite this removes the previous output.
    TraceSpan span(options.trace, "rename to --out", "write");
    renamed = ReplaceWithTempDir(*temp, target);
  }
  if (!renamed.ok()) return renamed;
  guard.Release();
  report.write_seconds = absl::ToDoubleSeconds(absl::Now() - finish_start);
  report.total_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  struct rusage usage {};
  if (getrusage(RUSAGE_SELF, &usage) == 0) report.peak_rss_bytes = int64_t{usage.ru_maxrss} * 1024;
  return report;
}

}  // namespace nvfp4cal
