#include "client/quantize_checkpoint.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/file_util.h"
#include "client/hessians.h"
#include "client/parallel.h"
#include "client/temp_dir.h"
#include "nlohmann/json.hpp"

#ifndef NVFP4CAL_VERSION
#define NVFP4CAL_VERSION "0.0.0"
#endif

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using OrderedJson = nlohmann::ordered_json;

// A quantized module (or one expert of a 3-D expert tensor) with everything its job needs.
struct PreparedModule {
  const ModulePlan* plan = nullptr;
  // -1 for a 2-D module, else the expert of plan's 3-D tensor.
  int64_t expert = -1;
  // ExpertName(plan->module, expert): how messages, Hessian entries and reports name it.
  std::string name;
  size_t shard = 0;
  const SafetensorsTensor* tensor = nullptr;
  // Aligned copy of the weights (of this expert) when the mapping is not aligned to the
  // element size.
  std::vector<uint8_t> aligned_copy;
  const void* weights = nullptr;
  std::string hessian_entry;
  // Activation amax of the module's input (the Hessians file's `.input_amax`), when recorded.
  std::optional<float> input_amax;
  std::shared_ptr<const std::vector<float>> hessian_blocks;
  // Full [cols, cols] Hessian (method gptq), owned by the HessianStore.
  const float* hessian_full = nullptr;
  SearchParams params;
  float own_amax = 0.0f;
  float global_amax = 0.0f;
};

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

absl::Status WithContext(const absl::Status& status, const std::string& context) {
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

std::vector<uint8_t> FloatBytes(float value) {
  std::vector<uint8_t> bytes(4);
  std::memcpy(bytes.data(), &value, 4);
  return bytes;
}

OrderedJson QuantArgs() {
  OrderedJson args = OrderedJson::object();
  args["num_bits"] = 4;
  args["type"] = "float";
  args["group_size"] = 16;
  args["dynamic"] = false;
  return args;
}

bool SamePath(const std::string& a, const std::string& b) {
  std::error_code ec;
  return fs::equivalent(a, b, ec);
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
    absl::StatusOr<const float*> full =
        hessians->Full(m.hessian_entry, m.name, plan.cols, options.params.symmetry_tolerance);
    if (!full.ok()) return full.status();
    m.hessian_full = *full;
  } else if (!m.hessian_entry.empty()) {
    absl::StatusOr<std::shared_ptr<const std::vector<float>>> blocks =
        hessians->Blocks(m.hessian_entry, m.name, plan.cols, options.params.symmetry_tolerance);
    if (!blocks.ok()) return blocks.status();
    m.hessian_blocks = *std::move(blocks);
  }
  const int element = DTypeSize(plan.dtype);
  const int64_t bytes = plan.rows * plan.cols * element;
  const uint8_t* data = m.tensor->data + std::max<int64_t>(expert, 0) * bytes;
  m.weights = data;
  if (reinterpret_cast<uintptr_t>(data) % static_cast<uintptr_t>(element) != 0) {
    m.aligned_copy.assign(data, data + bytes);
    m.weights = m.aligned_copy.data();
  }
  prepared->push_back(std::move(m));
  return absl::OkStatus();
}

// After every unit is prepared: each one's amax (a full scan that also rejects NaN/Inf), the
// error for the units without a Hessian, the fused groups' shared amax.
absl::Status FinishPreparing(const QuantizeOptions& options, const HessianStore* hessians,
                             const std::vector<std::string>& missing,
                             std::vector<PreparedModule>* prepared) {
  // On every hardware thread.
  std::vector<absl::Status> scans(prepared->size());
  ParallelFor(prepared->size(), [&](size_t i) {
    PreparedModule& m = (*prepared)[i];
    const ModulePlan& plan = *m.plan;
    absl::StatusOr<float> amax =
        ComputeGlobalAmax(WeightView{m.weights, plan.dtype, plan.rows, plan.cols});
    if (!amax.ok()) {
      const std::string where =
          m.expert < 0 ? absl::StrCat("tensor '", plan.weight_name, "'")
                       : absl::StrCat("tensor '", plan.weight_name, "', expert ", m.expert);
      scans[i] = WithContext(amax.status(), where);
      return;
    }
    m.own_amax = *amax;
  });
  for (const absl::Status& s : scans) {
    if (!s.ok()) return s;  // the first module in order that failed
  }
  if (!missing.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--method ", std::string(MethodName(options.params.method)), " needs a Hessian, but ",
        hessians == nullptr ? std::string("no --hessians file was given")
                            : absl::StrCat(hessians->path(), " has none"),
        " for ", missing.size(), " module(s): ", FirstNames(missing),
        " (looked for '<module>.hessian', a __metadata__ alias and the fused siblings' entries; "
        "experts of a 3-D tensor look for '<module>.<expert>.hessian', or '<module>.hessian' with "
        "--expert-hessian shared; pass --fallback-method max|mse to quantize them without one)"));
  }
  // Fused siblings share g = the max over the group (NUMERICS §1), expert by expert.
  auto group_key = [](const PreparedModule& m) {
    return absl::StrCat(m.plan->fused_group, "#", m.expert);
  };
  std::map<std::string, float> group_amax;
  for (const PreparedModule& m : *prepared) {
    if (m.plan->fused_group.empty()) continue;
    float& g = group_amax[group_key(m)];
    g = std::max(g, m.own_amax);
  }
  for (PreparedModule& m : *prepared) {
    m.global_amax = m.plan->fused_group.empty() ? m.own_amax : group_amax[group_key(m)];
  }
  return absl::OkStatus();
}

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
  return FinishPreparing(options, hessians, missing, prepared);
}

// Output tensor specs of one shard: untouched tensors as they are, quantized modules as the
// three NVFP4 tensors.
// An FP8 KV-cache scale: `<m>.k_scale` or `<m>.v_scale` = output amax / 448.
struct KvScale {
  std::string tensor;
  float value = 0.0f;
};
// By the weight tensor of the module it belongs to (written in the same shard).
using KvScalesByWeight = std::map<std::string, KvScale>;

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

std::vector<SafetensorsTensorSpec> OutputSpecs(
    const SafetensorsFile& shard, const Nvfp4Layout& layout,
    const std::map<std::string, const ModulePlan*>& quantized_by_weight,
    const std::set<std::string>& with_input_scale, const KvScalesByWeight& kv_scales) {
  std::vector<SafetensorsTensorSpec> specs;
  const std::vector<int64_t> scalar =
      layout.scalar_as_vector ? std::vector<int64_t>{1} : std::vector<int64_t>{};
  for (const SafetensorsTensor& t : shard.tensors()) {
    if (const auto kv = kv_scales.find(t.name); kv != kv_scales.end()) {
      specs.push_back({kv->second.tensor, SafetensorsDType::kF32, scalar});
    }
    const auto it = quantized_by_weight.find(t.name);
    if (it == quantized_by_weight.end()) {
      specs.push_back({t.name, t.dtype, t.shape});
      continue;
    }
    const ModulePlan& p = *it->second;
    // A 3-D expert tensor keeps its leading dimension; its scalars become one per expert.
    auto shape = [&p](std::vector<int64_t> dims) {
      if (p.experts > 0) dims.insert(dims.begin(), p.experts);
      return dims;
    };
    // Per-tensor scales: [] or [1] as the layout has them, [experts] for a 3-D tensor.
    const std::vector<int64_t> per_tensor = p.experts > 0 ? shape({}) : scalar;
    specs.push_back({p.module + layout.codes, SafetensorsDType::kU8, shape({p.rows, p.cols / 2})});
    specs.push_back(
        {p.module + ".weight_scale", SafetensorsDType::kF8E4M3, shape({p.rows, p.cols / 16})});
    specs.push_back({p.module + layout.global_scale, SafetensorsDType::kF32, per_tensor});
    if (with_input_scale.count(p.module) != 0) {
      specs.push_back({p.module + layout.input_scale, SafetensorsDType::kF32, per_tensor});
    }
  }
  return specs;
}

// Writes one quantized module's tensors as its results arrive: a 2-D module at once, the
// experts of a 3-D one in expert order (results that arrive early wait here), then the
// per-expert weight_scale_2 and input_scale vectors. Thread-safe.
class ModuleOutput {
 public:
  ModuleOutput(const ModulePlan& plan, const Nvfp4Layout& layout, SafetensorsWriter* writer,
               bool input_scale)
      : plan_(plan), layout_(layout), writer_(writer), input_scale_(input_scale) {}

  // Expert `expert`'s result (0 for a 2-D module) with its input amax (used when an input scale
  // is written).
  absl::Status Add(int64_t expert, QuantizedTensor result, float input_amax) {
    absl::MutexLock lock(&mu_);
    waiting_[expert] = {std::move(result), input_amax};
    for (auto it = waiting_.find(next_); it != waiting_.end(); it = waiting_.find(next_)) {
      const QuantizedTensor& r = it->second.first;
      for (const absl::Status& s : {writer_->Write(plan_.module + layout_.codes, r.packed_codes),
                                    writer_->Write(plan_.module + ".weight_scale", r.scales)}) {
        if (!s.ok()) return s;
      }
      AppendFloat(StoredGlobalScale(layout_, r.global_scale), &global_scales_);
      AppendFloat(StoredInputScale(layout_, it->second.second), &input_scales_);
      waiting_.erase(it);
      ++next_;
    }
    if (next_ < std::max<int64_t>(plan_.experts, 1)) return absl::OkStatus();
    absl::Status s = writer_->Write(plan_.module + layout_.global_scale, global_scales_);
    if (s.ok() && input_scale_) {
      s = writer_->Write(plan_.module + layout_.input_scale, input_scales_);
    }
    return s;
  }

 private:
  static void AppendFloat(float value, std::vector<uint8_t>* bytes) {
    const std::vector<uint8_t> b = FloatBytes(value);
    bytes->insert(bytes->end(), b.begin(), b.end());
  }

  const ModulePlan& plan_;
  const Nvfp4Layout& layout_;
  SafetensorsWriter* const writer_;
  const bool input_scale_;
  absl::Mutex mu_;
  int64_t next_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int64_t, std::pair<QuantizedTensor, float>> waiting_ ABSL_GUARDED_BY(mu_);
  std::vector<uint8_t> global_scales_ ABSL_GUARDED_BY(mu_);
  std::vector<uint8_t> input_scales_ ABSL_GUARDED_BY(mu_);
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

// The model folder's other files (tokenizer, ...) into `temp`: not the Hessians file or the
// output itself when they live there, and no `.safetensors` file that is not a shard of the
// model (runtimes load every `*.safetensors` of a folder without an index as weights; a
// Hessians file beside the weights would break the output), with a note naming each.
absl::Status CopyOtherFiles(const QuantizeOptions& options, const Checkpoint& model,
                            const std::string& temp, QuantizeObserver* observer) {
  for (const std::string& name : model.OtherFiles()) {
    const std::string from = (fs::path(model.dir()) / name).string();
    if (!options.hessians_path.empty() && SamePath(from, options.hessians_path)) continue;
    if (SamePath(from, options.out_dir)) continue;
    if (absl::EndsWith(name, ".safetensors")) {
      if (observer != nullptr) {
        observer->OnMessage(
            absl::StrCat("note: ", name,
                         " is not copied to the output: it is no shard of the model, and "
                         "runtimes would load it as weights"));
      }
      continue;
    }
    absl::Status copied = CopyPath(from, (fs::path(temp) / name).string());
    if (!copied.ok()) return copied;
  }
  return absl::OkStatus();
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

OrderedJson ProducerJson() {
  OrderedJson producer = OrderedJson::object();
  producer["name"] = "nvfp4cal";
  producer["version"] = NvFp4CalVersion();
  return producer;
}

}  // namespace

std::string NvFp4CalVersion() { return NVFP4CAL_VERSION; }

absl::StatusOr<ActivationMode> ParseActivationMode(const std::string& text) {
  if (text == "auto") return ActivationMode::kAuto;
  if (text == "none") return ActivationMode::kNone;
  if (text == "nvfp4") return ActivationMode::kNvfp4;
  return absl::InvalidArgumentError(absl::StrCat("--activations: unknown value \"", text,
                                                 "\"; expected one of auto, none, nvfp4"));
}

absl::StatusOr<OutputFormat> ParseOutputFormat(const std::string& text) {
  if (text == "modelopt") return OutputFormat::kModelOpt;
  if (text == "compressed-tensors") return OutputFormat::kCompressedTensors;
  return absl::InvalidArgumentError(absl::StrCat(
      "--format: unknown value \"", text, "\"; expected one of modelopt, compressed-tensors"));
}

const Nvfp4Layout& LayoutOf(OutputFormat format) {
  static constexpr Nvfp4Layout kModelOpt{
      OutputFormat::kModelOpt, "modelopt", ".weight", ".weight_scale_2",
      ".input_scale",          false,      false};
  static constexpr Nvfp4Layout kCompressedTensors{OutputFormat::kCompressedTensors,
                                                  "compressed-tensors",
                                                  ".weight_packed",
                                                  ".weight_global_scale",
                                                  ".input_global_scale",
                                                  true,
                                                  true};
  return format == OutputFormat::kModelOpt ? kModelOpt : kCompressedTensors;
}

float StoredGlobalScale(const Nvfp4Layout& layout, float s2) {
  if (!layout.divisor) return s2;
  return s2 > 0.0f ? 1.0f / s2 : 1.0f;
}

float StoredInputScale(const Nvfp4Layout& layout, float amax) {
  if (!layout.divisor) return amax / kGlobalScaleDivisor;  // NUMERICS §5
  return amax > 0.0f ? kGlobalScaleDivisor / amax : 1.0f;
}

std::string KvScaleName(const Nvfp4Layout& layout, const std::string& module) {
  const size_t dot = module.rfind('.');
  const std::string leaf = dot == std::string::npos ? module : module.substr(dot + 1);
  if (leaf != "k_proj" && leaf != "v_proj") return "";
  const std::string owner = layout.format == OutputFormat::kModelOpt || dot == std::string::npos
                                ? module
                                : module.substr(0, dot);
  return owner + (leaf == "k_proj" ? ".k_scale" : ".v_scale");
}

absl::StatusOr<ExpertHessian> ParseExpertHessian(const std::string& text) {
  if (text == "per-expert") return ExpertHessian::kPerExpert;
  if (text == "shared") return ExpertHessian::kShared;
  return absl::InvalidArgumentError(absl::StrCat("--expert-hessian: unknown value \"", text,
                                                 "\"; expected one of per-expert, shared"));
}

absl::StatusOr<KvCacheMode> ParseKvCacheMode(const std::string& text) {
  if (text == "none") return KvCacheMode::kNone;
  if (text == "fp8") return KvCacheMode::kFp8;
  return absl::InvalidArgumentError(
      absl::StrCat("--kv-cache: unknown value \"", text, "\"; expected one of none, fp8"));
}

absl::StatusOr<std::string> QuantizedConfigJson(const std::string& config_text,
                                                const std::vector<std::string>& exclude_modules,
                                                const QuantizationLabel& label) {
  OrderedJson config = OrderedJson::parse(config_text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError("config.json is not a JSON object");
  }
  OrderedJson group = OrderedJson::object();
  group["weights"] = QuantArgs();
  if (label.activations) group["input_activations"] = QuantArgs();
  group["targets"] = {"Linear"};
  OrderedJson q = OrderedJson::object();
  q["quant_method"] = "modelopt";
  q["quant_algo"] = label.activations ? kQuantAlgoW4A4 : kQuantAlgoWeightOnly;
  q["config_groups"] = {{"group_0", group}};
  q["ignore"] = exclude_modules;
  if (label.kv_cache_fp8) {
    q["kv_cache_quant_algo"] = "FP8";
    q["kv_cache_scheme"] = {{"dynamic", false}, {"num_bits", 8}, {"type", "float"}};
  }
  config["quantization_config"] = std::move(q);
  return config.dump(2) + "\n";
}

absl::StatusOr<std::string> CompressedTensorsConfigJson(const std::string& config_text,
                                                        const std::vector<std::string>& ignore,
                                                        const QuantizationLabel& label) {
  OrderedJson config = OrderedJson::parse(config_text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError("config.json is not a JSON object");
  }
  // compressed-tensors' QuantizationArgs of NVFP4: FP4 values in groups of 16 with an FP8
  // scale each and one global scale per tensor ("tensor_group"); activations are quantized
  // at run time per group ("local") with the calibrated global scale.
  auto args = [](OrderedJson dynamic) {
    OrderedJson a = OrderedJson::object();
    a["num_bits"] = 4;
    a["type"] = "float";
    a["symmetric"] = true;
    a["group_size"] = 16;
    a["strategy"] = "tensor_group";
    a["block_structure"] = nullptr;
    a["dynamic"] = std::move(dynamic);
    a["actorder"] = nullptr;
    return a;
  };
  constexpr char kFormat[] = "nvfp4-pack-quantized";
  OrderedJson group = OrderedJson::object();
  group["targets"] = {"Linear"};
  group["weights"] = args(false);
  group["input_activations"] = label.activations ? args("local") : OrderedJson();
  group["output_activations"] = nullptr;
  group["format"] = kFormat;
  OrderedJson q = OrderedJson::object();
  q["quant_method"] = "compressed-tensors";
  q["format"] = kFormat;
  q["quantization_status"] = "compressed";
  q["config_groups"] = {{"group_0", std::move(group)}};
  q["ignore"] = ignore;
  q["kv_cache_scheme"] = label.kv_cache_fp8 ? OrderedJson({{"num_bits", 8},
                                                           {"type", "float"},
                                                           {"symmetric", true},
                                                           {"strategy", "tensor"},
                                                           {"dynamic", false}})
                                            : OrderedJson();
  q["sparsity_config"] = OrderedJson::object();
  q["producer"] = ProducerJson();
  config["quantization_config"] = std::move(q);
  return config.dump(2) + "\n";
}

std::string HfQuantConfigJson(const std::vector<std::string>& exclude_modules,
                              const QuantizationLabel& label) {
  OrderedJson quantization = OrderedJson::object();
  quantization["quant_algo"] = label.activations ? kQuantAlgoW4A4 : kQuantAlgoWeightOnly;
  quantization["kv_cache_quant_algo"] = label.kv_cache_fp8 ? OrderedJson("FP8") : OrderedJson();
  quantization["group_size"] = 16;
  quantization["exclude_modules"] = exclude_modules;
  OrderedJson root = OrderedJson::object();
  root["producer"] = ProducerJson();
  root["quantization"] = std::move(quantization);
  return root.dump(2) + "\n";
}

std::string ProducerRecordJson(const std::string& command) {
  OrderedJson root = OrderedJson::object();
  root["producer"] = ProducerJson();
  root["command"] = command;
  return root.dump(2) + "\n";
}

absl::StatusOr<QuantizeReport> QuantizeCheckpoint(const QuantizeOptions& options,
                                                  Quantizer* quantizer,
                                                  QuantizeObserver* observer) {
  const OutputTarget target = QuantizeTarget(options);
  absl::Status out_ok = CheckOutputTarget(target);
  if (!out_ok.ok()) return out_ok;
  absl::Status params_ok = ValidateParams(options.params);
  if (!params_ok.ok()) return params_ok;
  if (options.fallback_method.has_value() && MethodNeedsHessian(*options.fallback_method)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--fallback-method ", std::string(MethodName(*options.fallback_method)),
                     " needs a Hessian itself; use max or mse"));
  }

  const absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::Open(options.model_dir);
  if (!checkpoint.ok()) return checkpoint.status();
  if (nlohmann::json::parse((*checkpoint)->config_text()).contains("quantization_config")) {
    return absl::FailedPreconditionError(
        absl::StrCat(options.model_dir,
                     "/config.json already has a quantization_config: the model is "
                     "quantized already"));
  }
  absl::StatusOr<std::vector<ModulePlan>> plans = PlanModules(**checkpoint, options.plan);
  if (!plans.ok()) return plans.status();

  std::unique_ptr<HessianStore> hessians;
  if (!options.hessians_path.empty()) {
    absl::StatusOr<std::unique_ptr<HessianStore>> store = HessianStore::Open(options.hessians_path);
    if (!store.ok()) return store.status();
    hessians = *std::move(store);
  }

  QuantizeReport report;
  report.quantizer = quantizer->Describe();
  std::vector<std::string> exclude_modules;
  for (const ModulePlan& p : *plans) {
    if (p.quantize) continue;
    exclude_modules.push_back(p.module);
    report.skipped.push_back(absl::StrCat(p.module, ": ", p.skip_reason));
    if (observer != nullptr && (p.skip_reason.find("multiple of 16") != std::string::npos ||
                                p.skip_reason.find("3-D expert tensor") != std::string::npos)) {
      observer->OnMessage(absl::StrCat("note: ", p.module, " not quantized: ", p.skip_reason));
    }
  }

  std::vector<PreparedModule> prepared;
  absl::Status ready =
      PrepareModules(options, **checkpoint, *plans, hessians.get(), observer, &prepared);
  if (!ready.ok()) return ready;
  absl::StatusOr<bool> activations = DecideActivations(options.activations, prepared, observer);
  if (!activations.ok()) return activations.status();
  report.quant_algo = *activations ? kQuantAlgoW4A4 : kQuantAlgoWeightOnly;
  absl::StatusOr<KvScalesByWeight> kv_scales =
      KvCacheScales(options.kv_cache, LayoutOf(options.format), *plans, hessians.get());
  if (!kv_scales.ok()) return kv_scales.status();
  const QuantizationLabel label{*activations, options.kv_cache == KvCacheMode::kFp8};
  const Nvfp4Layout& layout = LayoutOf(options.format);
  report.read_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  const absl::Time copy_start = absl::Now();

  // From here on everything goes to the temporary folder.
  absl::StatusOr<std::string> temp = MakeTempDirBeside(options.out_dir);
  if (!temp.ok()) return temp.status();
  TempDirGuard guard(*temp);
  // First the other files: a bad one (a FIFO, say) fails the run before the long part.
  absl::Status others = CopyOtherFiles(options, **checkpoint, *temp, observer);
  if (!others.ok()) return others;

  std::map<std::string, const ModulePlan*> quantized_by_weight;
  std::set<std::string> with_input_scale;
  for (const PreparedModule& m : prepared) {
    quantized_by_weight[m.plan->weight_name] = m.plan;
    if (*activations) with_input_scale.insert(m.plan->module);
  }
  const Checkpoint& model = **checkpoint;
  std::vector<std::unique_ptr<SafetensorsWriter>> writers;
  std::map<std::string, std::string> weight_map;  // output tensor -> shard file
  int64_t total_bytes = 0;
  for (const Checkpoint::Shard& shard : model.shards()) {
    std::vector<SafetensorsTensorSpec> specs =
        OutputSpecs(*shard.file, layout, quantized_by_weight, with_input_scale, *kv_scales);
    for (const SafetensorsTensorSpec& s : specs) {
      weight_map[s.name] = shard.file_name;
      report.bytes_out += NumElements(s.shape) * SafetensorsDTypeSize(s.dtype);
    }
    absl::StatusOr<std::unique_ptr<SafetensorsWriter>> writer = SafetensorsWriter::Create(
        (fs::path(*temp) / shard.file_name).string(), specs, shard.file->metadata());
    if (!writer.ok()) return writer.status();
    writers.push_back(*std::move(writer));
    for (const SafetensorsTensor& t : shard.file->tensors()) total_bytes += t.num_bytes;
  }
  report.bytes_in = total_bytes;
  if (observer != nullptr) {
    // A 3-D expert tensor counts once per expert.
    int64_t units = static_cast<int64_t>(model.tensors().size());
    for (const auto& [weight, plan] : quantized_by_weight) {
      if (plan->experts > 0) units += plan->experts - 1;
    }
    observer->OnStart(units, total_bytes);
  }

  // Untouched tensors: copied straight from the mapping.
  for (size_t s = 0; s < model.shards().size(); ++s) {
    for (const SafetensorsTensor& t : model.shards()[s].file->tensors()) {
      if (quantized_by_weight.count(t.name) != 0) continue;
      if (options.cancel != nullptr && options.cancel->load()) {
        return absl::CancelledError("interrupted");
      }
      absl::Status written =
          writers[s]->Write(t.name, absl::MakeConstSpan(t.data, static_cast<size_t>(t.num_bytes)));
      if (!written.ok()) return written;
      if (observer != nullptr) observer->OnTensorDone(t.name, t.num_bytes);
    }
    for (const SafetensorsTensor& t : model.shards()[s].file->tensors()) {
      const auto kv = kv_scales->find(t.name);
      if (kv == kv_scales->end()) continue;
      absl::Status written = writers[s]->Write(kv->second.tensor, FloatBytes(kv->second.value));
      if (!written.ok()) return written;
      ++report.kv_cache_scales;
    }
  }

  report.copy_seconds = absl::ToDoubleSeconds(absl::Now() - copy_start);
  const absl::Time quantize_start = absl::Now();
  absl::Duration write_time;  // inside the quantizer's callbacks, guarded by report_mu

  // Quantized modules.
  std::vector<TensorJob> jobs;
  for (const PreparedModule& m : prepared) {
    TensorJob job;
    job.name =
        m.expert < 0 ? m.plan->weight_name : absl::StrCat(m.plan->weight_name, "[", m.expert, "]");
    job.weights = {m.weights, m.plan->dtype, m.plan->rows, m.plan->cols};
    if (m.hessian_blocks != nullptr) {
      job.hessians = {m.hessian_blocks->data(), m.plan->cols / 16};
      job.hessian_key = m.hessian_entry;
    }
    if (m.hessian_full != nullptr) {
      job.full_hessian = {m.hessian_full, m.plan->cols};
      job.hessian_key = m.hessian_entry;
    }
    job.params = m.params;
    job.global_amax = m.global_amax;
    jobs.push_back(std::move(job));
  }
  std::vector<std::string> job_names;
  for (const TensorJob& job : jobs) job_names.push_back(job.name);
  absl::Mutex report_mu;
  std::vector<std::optional<ModuleReport>> module_reports(prepared.size());
  std::map<const ModulePlan*, std::unique_ptr<ModuleOutput>> outputs;
  for (const PreparedModule& m : prepared) {
    std::unique_ptr<ModuleOutput>& out = outputs[m.plan];
    if (out == nullptr) {
      out = std::make_unique<ModuleOutput>(*m.plan, layout, writers[m.shard].get(), *activations);
    }
  }
  absl::Status quantized =
      quantizer->QuantizeAll(jobs, [&](size_t index, QuantizedTensor result) -> absl::Status {
        if (options.cancel != nullptr && options.cancel->load()) {
          return absl::CancelledError("interrupted");
        }
        const PreparedModule& m = prepared[index];
        const ModulePlan& p = *m.plan;
        if (result.rows != p.rows || result.cols != p.cols ||
            result.packed_codes.size() != static_cast<size_t>(p.rows * p.cols / 2) ||
            result.scales.size() != static_cast<size_t>(p.rows * p.cols / 16)) {
          return absl::InternalError(absl::StrCat(p.weight_name, ": result has the wrong size"));
        }
        ModuleReport r;
        r.module = m.name;
        r.rows = p.rows;
        r.cols = p.cols;
        r.hessian_entry = m.hessian_entry;
        r.stats = result.stats;
        const double kernel_seconds = result.server_kernel_seconds;
        const double queue_seconds = result.server_queue_seconds;
        const absl::Time write_start = absl::Now();
        absl::Status written = outputs[&p]->Add(std::max<int64_t>(m.expert, 0), std::move(result),
                                                m.input_amax.value_or(0.0f));
        if (!written.ok()) return written;
        {
          absl::MutexLock lock(&report_mu);
          write_time += absl::Now() - write_start;
          report.server_kernel_seconds += kernel_seconds;
          report.server_queue_seconds += queue_seconds;
        }
        if (observer != nullptr && r.stats.zero_hessian_blocks > 0) {
          observer->OnMessage(
              absl::StrCat("warning: ", m.name, ": ", r.stats.zero_hessian_blocks, " of ",
                           r.stats.num_blocks, " blocks have an all-zero Hessian block (",
                           m.hessian_entry, " missed those inputs); the smallest scale won there"));
        }
        if (observer != nullptr && r.stats.gptq.damping_increases > 0) {
          observer->OnMessage(absl::StrCat("warning: ", m.name, ": ", m.hessian_entry,
                                           " is not positive definite with --gptq-damping ",
                                           m.params.gptq.damping, "; gptq used ",
                                           r.stats.gptq.damping_relative, " x mean diagonal"));
        }
        if (observer != nullptr) {
          observer->OnTensorDone(job_names[index], p.rows * p.cols * DTypeSize(p.dtype));
        }
        absl::MutexLock lock(&report_mu);
        module_reports[index] = std::move(r);
        return absl::OkStatus();
      });
  if (!quantized.ok()) return quantized;
  report.quantize_seconds = absl::ToDoubleSeconds(absl::Now() - quantize_start - write_time);
  const absl::Time finish_start = absl::Now();
  for (std::optional<ModuleReport>& r : module_reports) {
    if (!r.has_value()) return absl::InternalError("a module's result never arrived");
    report.modules.push_back(*std::move(r));
  }

  for (std::unique_ptr<SafetensorsWriter>& writer : writers) {
    absl::Status finished = writer->Finish();
    if (!finished.ok()) return finished;
  }

  // Index, configs, other files.
  if (model.sharded()) {
    OrderedJson index = OrderedJson::object();
    OrderedJson metadata = OrderedJson::parse(model.index_metadata_json(), nullptr, false);
    if (metadata.is_discarded() || !metadata.is_object()) metadata = OrderedJson::object();
    metadata["total_size"] = report.bytes_out;
    index["metadata"] = std::move(metadata);
    OrderedJson map = OrderedJson::object();
    for (const auto& [name, file] : weight_map) map[name] = file;
    index["weight_map"] = std::move(map);
    absl::Status written =
        WriteTextFile((fs::path(*temp) / kIndexFileName).string(), index.dump(2) + "\n");
    if (!written.ok()) return written;
  }
  // compressed-tensors has its label in config.json only (an hf_quant_config.json would make
  // tools that look for it first read the folder as ModelOpt's).
  const bool modelopt = options.format == OutputFormat::kModelOpt;
  absl::StatusOr<std::string> config =
      modelopt ? QuantizedConfigJson(model.config_text(), exclude_modules, label)
               : CompressedTensorsConfigJson(model.config_text(), exclude_modules, label);
  if (!config.ok()) return config.status();
  absl::Status written = WriteTextFile((fs::path(*temp) / kConfigFileName).string(), *config);
  if (written.ok() && modelopt) {
    written = WriteTextFile((fs::path(*temp) / kHfQuantConfigFileName).string(),
                            HfQuantConfigJson(exclude_modules, label));
  }
  if (!written.ok()) return written;
  if (options.cancel != nullptr && options.cancel->load()) {
    return absl::CancelledError("interrupted");
  }
  absl::Status renamed = ReplaceWithTempDir(*temp, target);
  if (!renamed.ok()) return renamed;
  guard.Release();
  report.write_seconds = absl::ToDoubleSeconds(write_time + (absl::Now() - finish_start));
  return report;
}

}  // namespace nvfp4cal
