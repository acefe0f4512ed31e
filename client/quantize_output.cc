#include "client/quantize_output.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "nlohmann/json.hpp"

namespace nvfp4cal::client_internal {
namespace {

namespace fs = std::filesystem;
using OrderedJson = nlohmann::ordered_json;

bool SamePath(const std::string& a, const std::string& b) {
  std::error_code ec;
  return fs::equivalent(a, b, ec);
}

}  // namespace

std::vector<uint8_t> FloatBytes(float value) {
  std::vector<uint8_t> bytes(4);
  std::memcpy(bytes.data(), &value, 4);
  return bytes;
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

absl::Status ModuleOutput::Add(int64_t expert, QuantizedTensor result, float input_amax) {
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

void ModuleOutput::AppendFloat(float value, std::vector<uint8_t>* bytes) {
  const std::vector<uint8_t> b = FloatBytes(value);
  bytes->insert(bytes->end(), b.begin(), b.end());
}

absl::Status WriteIndexAndConfigs(const Checkpoint& model,
                                  const std::map<std::string, std::string>& weight_map,
                                  int64_t total_size,
                                  const std::vector<std::string>& exclude_modules,
                                  const QuantizationLabel& label, OutputFormat format,
                                  const std::string& folder) {
  if (model.sharded()) {
    OrderedJson index = OrderedJson::object();
    OrderedJson metadata = OrderedJson::parse(model.index_metadata_json(), nullptr, false);
    if (metadata.is_discarded() || !metadata.is_object()) metadata = OrderedJson::object();
    metadata["total_size"] = total_size;
    index["metadata"] = std::move(metadata);
    OrderedJson map = OrderedJson::object();
    for (const auto& [name, file] : weight_map) map[name] = file;
    index["weight_map"] = std::move(map);
    absl::Status written =
        WriteTextFile((fs::path(folder) / kIndexFileName).string(), index.dump(2) + "\n");
    if (!written.ok()) return written;
  }
  // compressed-tensors has its label in config.json only (an hf_quant_config.json would make
  // tools that look for it first read the folder as ModelOpt's).
  const bool modelopt = format == OutputFormat::kModelOpt;
  absl::StatusOr<std::string> config =
      modelopt ? QuantizedConfigJson(model.config_text(), exclude_modules, label)
               : CompressedTensorsConfigJson(model.config_text(), exclude_modules, label);
  if (!config.ok()) return config.status();
  absl::Status written = WriteTextFile((fs::path(folder) / kConfigFileName).string(), *config);
  if (written.ok() && modelopt) {
    written = WriteTextFile((fs::path(folder) / kHfQuantConfigFileName).string(),
                            HfQuantConfigJson(exclude_modules, label));
  }
  return written;
}

}  // namespace nvfp4cal::client_internal
