#include "client/quantize_prepare.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/parallel.h"

namespace nvfp4cal::client_internal {
namespace {

absl::Status WithContext(const absl::Status& status, const std::string& context) {
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

// One unit (a 2-D module, or expert `expert` of a 3-D one) into `prepared`, or its name into
// `missing` when it needs a Hessian that the file lacks and no fallback is given.
absl::Status PrepareUnit(const QuantizeOptions& options, const Checkpoint& checkpoint,
                         const ModulePlan& plan, int64_t expert, HessianStore* hessians,
                         QuantizeObserver* observer, std::vector<PreparedModule>* prepared,
                         std::vector<std::string>* missing) {
  PreparedModule m;
  m.plan = &plan;
  m.expert = expert;
  m.name = ExpertName(plan.module, expert);
  const Checkpoint::Entry* entry = checkpoint.Find(plan.weight_name);
  m.shard = entry->shard;
  m.tensor = entry->tensor;
  m.file = checkpoint.shards()[entry->shard].file.get();
  m.params = options.params;
  if (hessians != nullptr) {
    // Each expert has its own Hessian ("<module>.<e>.hessian") unless they share the module's.
    const std::string& lookup =
        expert >= 0 && options.expert_hessian == ExpertHessian::kShared ? plan.module : m.name;
    absl::StatusOr<std::string> resolved = hessians->FindEntry(lookup);
    if (!resolved.ok()) return resolved.status();
    m.hessian_entry = *std::move(resolved);
    absl::StatusOr<std::optional<float>> input_amax = hessians->InputAmax(m.hessian_entry);
    if (!input_amax.ok()) return input_amax.status();
    m.input_amax = *input_amax;
  }
  if (m.hessian_entry.empty() && MethodNeedsHessian(m.params.method)) {
    if (!options.fallback_method.has_value()) {
      missing->push_back(m.name);
      return absl::OkStatus();
    }
    m.params.method = *options.fallback_method;
    if (observer != nullptr) {
      observer->OnMessage(absl::StrCat("note: ", m.name,
                                       " has no Hessian; using --fallback-method ",
                                       std::string(MethodName(m.params.method))));
    }
  }
  if (!m.hessian_entry.empty() && m.params.method == Method::kGptq) {
    // The header now; the matrix is read and checked by the scan (ScanModules).
    if (absl::Status full = hessians->ExpectFull(m.hessian_entry, m.name, plan.cols); !full.ok()) {
      return full;
    }
  } else if (!m.hessian_entry.empty()) {
    // A full matrix: the header now; the scan reads and checks it and cuts out the blocks.
    absl::StatusOr<bool> from_full = hessians->BlocksFromFull(m.hessian_entry, m.name, plan.cols);
    if (!from_full.ok()) return from_full.status();
    m.blocks_from_full = *from_full;
    hessians->ExpectBlocks(m.hessian_entry);  // released once the unit's result is written
    if (!m.blocks_from_full) {
      absl::StatusOr<std::shared_ptr<const std::vector<float>>> blocks =
          hessians->Blocks(m.hessian_entry, m.name, plan.cols, options.params.symmetry_tolerance);
      if (!blocks.ok()) return blocks.status();
      m.hessian_blocks = *std::move(blocks);
    }
  }
  const int element = DTypeSize(plan.dtype);
  const int64_t bytes = plan.rows * plan.cols * element;
  // Possibly not aligned to the element size: the scan reads it into aligned memory.
  m.weights = m.tensor->data + std::max<int64_t>(expert, 0) * bytes;
  prepared->push_back(std::move(m));
  return absl::OkStatus();
}

// The error for the units without a Hessian (none: OK).
absl::Status MissingHessians(const QuantizeOptions& options, const HessianStore* hessians,
                             const std::vector<std::string>& missing) {
  if (missing.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "--method ", std::string(MethodName(options.params.method)), " needs a Hessian, but ",
      hessians == nullptr ? std::string("no --hessians file was given")
                          : absl::StrCat(hessians->path(), " has none"),
      " for ", missing.size(), " module(s): ", FirstNames(missing),
      " (looked for '<module>.hessian', a __metadata__ alias and the fused siblings' entries; "
      "experts of a 3-D tensor look for '<module>.<expert>.hessian', or '<module>.hessian' with "
      "--expert-hessian shared; pass --fallback-method max|mse to quantize them without one)"));
}

}  // namespace

// Everything that can be checked before any output is written.
absl::Status PrepareModules(const QuantizeOptions& options, const Checkpoint& checkpoint,
                            const std::vector<ModulePlan>& plans, HessianStore* hessians,
                            QuantizeObserver* observer, std::vector<PreparedModule>* prepared) {
  std::vector<std::string> missing;
  for (const ModulePlan& plan : plans) {
    if (!plan.quantize) continue;
    for (int64_t e = plan.experts == 0 ? -1 : 0; e < plan.experts; ++e) {
      absl::Status unit =
          PrepareUnit(options, checkpoint, plan, e, hessians, observer, prepared, &missing);
      if (!unit.ok()) return unit;
    }
  }
  return MissingHessians(options, hessians, missing);
}

std::vector<std::vector<size_t>> ScanGroups(const std::vector<PreparedModule>& prepared) {
  // Fused siblings share g = the max over the group (NUMERICS §1), expert by expert.
  std::vector<std::vector<size_t>> groups;
  std::map<std::string, size_t> fused;
  for (size_t i = 0; i < prepared.size(); ++i) {
    const PreparedModule& m = prepared[i];
    size_t g = groups.size();
    if (!m.plan->fused_group.empty()) {
      g = fused.emplace(absl::StrCat(m.plan->fused_group, "#", m.expert), groups.size())
              .first->second;
    }
    if (g == groups.size()) groups.emplace_back();
    groups[g].push_back(i);
  }
  return groups;
}

bool ReadAhead::Acquire(size_t ticket, int64_t bytes, const std::function<bool()>& stopped) {
  absl::MutexLock lock(&mu_);
  auto ready = [&] {
    mu_.AssertHeld();
    return next_ticket_ == ticket && (held_ == 0 || held_ + bytes <= budget_);
  };
  for (;;) {
    if (next_ticket_ == ticket) {
      // A stopped run's groups still take their turns, so that none waits for an earlier one.
      if (stopped()) {
        ++next_ticket_;
        return false;
      }
      if (ready()) {
        held_ += bytes;
        ++next_ticket_;
        return true;
      }
    }
    // Releases and earlier tickets wake it; stopped() (the caller's flag) is polled.
    mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Milliseconds(20));
  }
}

void ReadAhead::Release(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  held_ -= bytes;
}

int64_t ReadAhead::held() const {
  absl::MutexLock lock(&mu_);
  return held_;
}

std::unique_ptr<uint8_t[]> ReadAhead::Take(int64_t bytes) {
  std::vector<std::unique_ptr<uint8_t[]>> dropped;  // freed after mu_ is released
  {
    absl::MutexLock lock(&mu_);
    if (std::unique_ptr<uint8_t[]> same = pool_.TakeSame(bytes)) return same;
    // held_ counts this buffer already: make room for it among the pooled ones.
    while (!pool_.empty() && pool_.count() + held_ > budget_) {
      dropped.push_back(pool_.TakeLargest());
    }
  }
  return SizedBuffers<uint8_t>::New(bytes);
}

void ReadAhead::Give(std::unique_ptr<uint8_t[]> buffer, int64_t bytes) {
  if (buffer == nullptr) return;
  absl::MutexLock lock(&mu_);
  pool_.Put(std::move(buffer), bytes);
}

int64_t ReadAhead::pooled() const {
  absl::MutexLock lock(&mu_);
  return pool_.count();
}

int64_t PlanReadAhead(const std::vector<std::vector<size_t>>& groups,
                      std::vector<PreparedModule>* prepared) {
  // 8 x 235 MB (gate and up of a Llama-3-8B layer) for weights alone; with gptq's full
  // Hessians 3 x 939 MB (down_proj and its [14336, 14336] matrix). Resident memory follows the
  // model's largest tensors, not its size.
  constexpr int64_t kWeightGroups = 8;
  constexpr int64_t kHessianGroups = 3;
  std::set<std::string> hessians_read;
  int64_t largest_weights = 0;
  int64_t largest = 0;
  for (const std::vector<size_t>& group : groups) {
    int64_t weights = 0;
    int64_t total = 0;
    for (size_t k = 0; k < group.size(); ++k) {
      PreparedModule& m = (*prepared)[group[k]];
      m.read_ahead_bytes = m.file != nullptr ? WeightBytes(m) : 0;
      weights += m.read_ahead_bytes;
      total += m.read_ahead_bytes;
    }
    // Each Hessian this group reads first goes with the group's last unit that uses it.
    for (size_t k = group.size(); k-- > 0;) {
      PreparedModule& m = (*prepared)[group[k]];
      if (ScanReadsFullMatrix(m) && hessians_read.insert(m.hessian_entry).second) {
        const int64_t bytes = m.plan->cols * m.plan->cols * static_cast<int64_t>(sizeof(float));
        m.read_ahead_bytes += bytes;
        total += bytes;
      }
    }
    largest_weights = std::max(largest_weights, weights);
    largest = std::max(largest, total);
  }
  return std::max<int64_t>({kWeightGroups * largest_weights, kHessianGroups * largest, 1});
}

void ScanModules(std::vector<PreparedModule>* prepared,
                 const std::vector<std::vector<size_t>>& groups, HessianStore* hessians,
                 ReadAhead* read_ahead, Trace* trace, const std::function<bool()>& stopped,
                 const std::function<void(size_t, const absl::Status&)>& on_ready) {
  absl::Mutex mu;  // one on_ready call at a time
  // Full matrices cut into blocks are read into the read-ahead's pooled buffers.
  const ScratchMemory scratch{[read_ahead](int64_t size) { return read_ahead->Take(size); },
                              [read_ahead](std::unique_ptr<uint8_t[]> buffer, int64_t size) {
                                read_ahead->Give(std::move(buffer), size);
                              }};
  // Group by group in order on every hardware thread, so that the first tasks are ready first.
  ParallelFor(groups.size(), [&](size_t g) {
    int64_t bytes = 0;
    for (size_t i : groups[g]) bytes += (*prepared)[i].read_ahead_bytes;
    std::vector<absl::Status> scans(groups[g].size());
    bool acquired = false;
    {
      TraceSpan span(trace, "wait for read-ahead memory", "scan");
      acquired = read_ahead->Acquire(g, bytes, stopped);
    }
    if (!acquired) {
      for (absl::Status& s : scans) {
        s = absl::CancelledError("the run stopped before this tensor was read");
      }
    } else {
      for (size_t k = 0; k < groups[g].size(); ++k) {
        PreparedModule& m = (*prepared)[groups[g][k]];
        const ModulePlan& plan = *m.plan;
        const std::string where =
            m.expert < 0 ? absl::StrCat("tensor '", plan.weight_name, "'")
                         : absl::StrCat("tensor '", plan.weight_name, "', expert ", m.expert);
        if (m.file != nullptr) {
          const int64_t n = WeightBytes(m);
          TraceSpan span(trace, "read " + m.name, "scan");
          m.read_copy = read_ahead->Take(n);
          scans[k] = m.file->ReadRange(m.weights, n, m.read_copy.get());
          if (!scans[k].ok()) {
            scans[k] = WithContext(scans[k], where);
            continue;
          }
          m.weights = m.read_copy.get();
        }
        absl::StatusOr<WeightScan> scan = [&] {
          TraceSpan span(trace, "scan " + m.name, "scan");
          return ScanWeights(WeightView{m.weights, plan.dtype, plan.rows, plan.cols});
        }();
        if (!scan.ok()) {
          scans[k] = WithContext(scan.status(), where);
          continue;
        }
        m.own_amax = scan->amax();
        m.scan = *scan;
        if (NeedsFullHessian(m) && hessians != nullptr) {
          TraceSpan span(trace, "Hessian " + m.hessian_entry, "scan");
          absl::StatusOr<std::shared_ptr<const FullHessian>> full =
              hessians->Full(m.hessian_entry, m.name, plan.cols, m.params.symmetry_tolerance);
          if (!full.ok()) {
            scans[k] = full.status();  // names the file, the entry and the module
            continue;
          }
          m.hessian_full = *std::move(full);
        }
        if (m.blocks_from_full && hessians != nullptr) {
          TraceSpan span(trace, "Hessian blocks " + m.hessian_entry, "scan");
          absl::StatusOr<std::shared_ptr<const std::vector<float>>> blocks = hessians->Blocks(
              m.hessian_entry, m.name, plan.cols, m.params.symmetry_tolerance, &scratch);
          if (!blocks.ok()) {
            scans[k] = blocks.status();  // names the file, the entry and the module
            continue;
          }
          m.hessian_blocks = *std::move(blocks);
        }
      }
    }
    // The group's amax, or the first failure among its units.
    absl::Status group_status;
    float amax = 0.0f;
    for (size_t k = 0; k < groups[g].size(); ++k) {
      if (!scans[k].ok() && group_status.ok()) group_status = scans[k];
      amax = std::max(amax, (*prepared)[groups[g][k]].own_amax);
    }
    absl::MutexLock lock(&mu);
    const absl::Time now = absl::Now();
    for (size_t i : groups[g]) {
      (*prepared)[i].global_amax = amax;
      (*prepared)[i].scanned_at = now;
      on_ready(i, group_status);
    }
  });
}

// The k_scale of every k_proj and the v_scale of every v_proj among `plans` (quantized or
// not: the KV cache is the attention's), from the Hessians file's `<m>.output_amax`.
absl::StatusOr<KvScalesByWeight> KvCacheScales(KvCacheMode mode, const Nvfp4Layout& layout,
                                               const std::vector<ModulePlan>& plans,
                                               const HessianStore* hessians) {
  KvScalesByWeight scales;
  if (mode == KvCacheMode::kNone) return scales;
  std::vector<std::string> missing;
  for (const ModulePlan& p : plans) {
    if (p.experts > 0) continue;  // MoE experts are no attention projections
    const std::string scale_name = KvScaleName(layout, p.module);
    if (scale_name.empty()) continue;
    std::optional<float> amax;
    if (hessians != nullptr) {
      absl::StatusOr<std::optional<float>> recorded = hessians->OutputAmax(p.module);
      if (!recorded.ok()) return recorded.status();
      amax = *recorded;
    }
    if (!amax.has_value()) {
      missing.push_back(p.module);
      continue;
    }
    // FP8 E4M3's largest value: the cache stores k / k_scale within [-448, 448].
    scales[p.weight_name] = {scale_name, *amax / 448.0f};
  }
  if (scales.empty() && missing.empty()) {
    return absl::FailedPreconditionError(
        "--kv-cache fp8: the model has no k_proj or v_proj module to attach k_scale / v_scale "
        "to");
  }
  if (!missing.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--kv-cache fp8 needs the output amax (`<module>.output_amax` in the Hessians file) of "
        "every k_proj and v_proj; missing for ",
        FirstNames(missing), ". Record it during calibration, or pass --kv-cache none"));
  }
  return scales;
}

// W4A4 (true) or weight-only (false) under `mode`, from which modules have an activation amax;
// the label must never promise an input_scale the checkpoint lacks.
absl::StatusOr<bool> DecideActivations(ActivationMode mode,
                                       const std::vector<PreparedModule>& prepared,
                                       QuantizeObserver* observer) {
  std::vector<std::string> without;
  for (const PreparedModule& m : prepared) {
    if (!m.input_amax.has_value()) without.push_back(m.plan->module);
  }
  const size_t with = prepared.size() - without.size();
  auto note = [observer](const std::string& line) {
    if (observer != nullptr) observer->OnMessage(line);
  };
  switch (mode) {
    case ActivationMode::kNone:
      if (with > 0) {
        note(absl::StrCat("note: --activations none: weight-only output (", kQuantAlgoWeightOnly,
                          "); the activation amax of ", with,
                          " modules is not used and no input_scale is written"));
      }
      return false;
    case ActivationMode::kNvfp4:
      if (!without.empty()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "--activations nvfp4 needs the activation amax (`<input>.input_amax` in the Hessians "
            "file) of every quantized module; ",
            without.size(), " of ", prepared.size(), " have none: ", FirstNames(without),
            ". Record it (HessianAccumulator does) or pass --activations none"));
      }
      return true;
    case ActivationMode::kAuto:
      if (without.empty() && !prepared.empty()) return true;
      if (with == 0) {
        note(absl::StrCat("note: weight-only output (", kQuantAlgoWeightOnly,
                          "): the Hessians file has no activation amax (`<input>.input_amax`), "
                          "so no input_scale is written; record it (HessianAccumulator does) "
                          "for a W4A4 ",
                          kQuantAlgoW4A4, " checkpoint"));
        return false;
      }
      return absl::FailedPreconditionError(
          absl::StrCat("the Hessians file has the activation amax (`<input>.input_amax`) of ", with,
                       " of ", prepared.size(), " quantized modules, not of ", FirstNames(without),
                       ": a W4A4 (", kQuantAlgoW4A4,
                       ") checkpoint needs it for every module. Record the missing ones, or pass "
                       "--activations none for a weight-only (",
                       kQuantAlgoWeightOnly, ") checkpoint"));
  }
  return false;
}

}  // namespace nvfp4cal::client_internal
