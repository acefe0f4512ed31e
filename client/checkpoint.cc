#include "client/checkpoint.h"

#include <fnmatch.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/temp_dir.h"
#include "common/file_util.h"
#include "nlohmann/json.hpp"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

std::string JoinPath(const std::string& dir, const std::string& name) {
  return (fs::path(dir) / name).string();
}

absl::StatusOr<DType> WeightDType(SafetensorsDType dtype) {
  switch (dtype) {
    case SafetensorsDType::kBF16:
      return DType::kBFloat16;
    case SafetensorsDType::kF16:
      return DType::kFloat16;
    case SafetensorsDType::kF32:
      return DType::kFloat32;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "dtype ", std::string(SafetensorsDTypeName(dtype)), " (expected BF16, F16 or F32)"));
  }
}

struct FusedFamily {
  const char* suffix;
  std::vector<std::string> leaves;
};
const std::vector<FusedFamily>& FusedFamilies() {
  static const auto* families = new std::vector<FusedFamily>{
      {"qkv", {"q_proj", "k_proj", "v_proj"}},
      {"gate_up", {"gate_proj", "up_proj"}},
      {"w13", {"w1", "w3"}},
  };
  return *families;
}

void SplitModule(const std::string& module, std::string* parent, std::string* leaf) {
  const size_t dot = module.rfind('.');
  *parent = dot == std::string::npos ? "" : module.substr(0, dot);
  *leaf = dot == std::string::npos ? module : module.substr(dot + 1);
}

}  // namespace

bool GlobMatch(const std::string& pattern, const std::string& text) {
  return fnmatch(pattern.c_str(), text.c_str(), 0) == 0;
}

const std::vector<std::string>& DefaultExcludes() {
  static const auto* globs = new std::vector<std::string>{
      "*lm_head*", "*router*", "*mlp.gate.*",    "*output_layer*", "*embed*",
      "*.wte.*",   "*.wpe.*",  "*vision_tower*", "*vision_model*", "*visual.*",
  };
  return *globs;
}

std::vector<std::string> FusedSiblingLeaves(const std::string& leaf) {
  for (const FusedFamily& family : FusedFamilies()) {
    if (std::find(family.leaves.begin(), family.leaves.end(), leaf) != family.leaves.end()) {
      return family.leaves;
    }
  }
  return {};
}

std::string FusedGroupKey(const std::string& module) {
  std::string parent, leaf;
  SplitModule(module, &parent, &leaf);
  for (const FusedFamily& family : FusedFamilies()) {
    if (std::find(family.leaves.begin(), family.leaves.end(), leaf) != family.leaves.end()) {
      return absl::StrCat(parent, "|", family.suffix);
    }
  }
  return "";
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("--model ", dir, ": no such folder"));
  }
  std::unique_ptr<Checkpoint> checkpoint(new Checkpoint());
  checkpoint->dir_ = dir;
  absl::StatusOr<std::string> config = ReadTextFile(JoinPath(dir, kConfigFileName));
  if (!config.ok()) {
    return absl::NotFoundError(
        absl::StrCat("--model ", dir, ": no config.json (", config.status().message(), ")"));
  }
  const Json parsed = Json::parse(*config, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(JoinPath(dir, kConfigFileName), ": not a JSON object"));
  }
  checkpoint->config_text_ = *std::move(config);

  // Shards: the index's weight map, or the single file.
  std::map<std::string, std::string> index_map;  // tensor -> shard file
  std::vector<std::string> shard_names;
  const std::string index_path = JoinPath(dir, kIndexFileName);
  if (fs::exists(index_path, ec)) {
    checkpoint->sharded_ = true;
    absl::StatusOr<std::string> text = ReadTextFile(index_path);
    if (!text.ok()) return text.status();
    Json index;
    try {
      index = Json::parse(*text);
    } catch (const Json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": not valid JSON: ", e.what()));
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": no \"weight_map\" object"));
    }
    if (index.contains("metadata")) checkpoint->index_metadata_json_ = index["metadata"].dump();
    std::set<std::string> seen;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": weight_map entry '", it.key(), "' is not a file name"));
      }
      const std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos || file == "." || file == "..") {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map entry '", it.key(),
                                                       "' names '", file,
                                                       "', which is not a file of the folder"));
      }
      index_map[it.key()] = file;
      if (seen.insert(file).second) shard_names.push_back(file);
    }
    std::sort(shard_names.begin(), shard_names.end());
  } else if (fs::exists(JoinPath(dir, kSingleFileName), ec)) {
    shard_names.push_back(kSingleFileName);
  } else {
    return absl::NotFoundError(
        absl::StrCat("--model ", dir, ": no ", kSingleFileName, " or ", kIndexFileName));
  }

  for (const std::string& name : shard_names) {
    if (checkpoint->sharded_ && !fs::exists(JoinPath(dir, name), ec)) {
      for (const auto& [tensor, file] : index_map) {
        if (file != name) continue;
        return absl::NotFoundError(absl::StrCat(index_path, ": weight_map puts '", tensor, "' in ",
                                                name, ", which does not exist"));
      }
    }
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::Open(JoinPath(dir, name));
    if (!file.ok()) return file.status();
    Shard shard;
    shard.file_name = name;
    shard.file = *std::move(file);
    const size_t shard_index = checkpoint->shards_.size();
    for (const SafetensorsTensor& t : shard.file->tensors()) {
      auto [it, inserted] = checkpoint->tensors_.emplace(t.name, Entry{&t, shard_index});
      if (!inserted) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor '", t.name, "' is in both ",
                         checkpoint->shards_[it->second.shard].file_name, " and ", name));
      }
    }
    checkpoint->shards_.push_back(std::move(shard));
  }
  for (const auto& [tensor, file] : index_map) {
    const Entry* entry = checkpoint->Find(tensor);
    if (entry == nullptr || checkpoint->shards_[entry->shard].file_name != file) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map puts '", tensor,
                                                     "' in ", file, ", which does not hold it"));
    }
  }
  return checkpoint;
}

const Checkpoint::Entry* Checkpoint::Find(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::vector<std::string> Checkpoint::OtherFiles() const {
  std::set<std::string> skip = {kConfigFileName, kIndexFileName, kHfQuantConfigFileName,
                                kProducerRecordFileName};
  for (const Shard& shard : shards_) skip.insert(shard.file_name);
  std::vector<std::string> names;
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(dir_, ec)) {
    const std::string name = e.path().filename().string();
    if (skip.count(name) == 0 && !IsTempDirName(name)) {
      names.push_back(name);
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

int64_t Checkpoint::total_tensor_bytes() const {
  int64_t total = 0;
  for (const auto& [name, entry] : tensors_) total += entry.tensor->num_bytes;
  return total;
}

bool IsFusedExpertTensor(const std::string& name, const SafetensorsTensor& t) {
  if (t.shape.size() != 3) return false;
  if (!WeightDType(t.dtype).ok()) return false;  // packed or integer data: not a weight
  // `.../experts.gate_up_proj`, `.../experts.down_proj` (no .weight suffix) or a `.weight`
  // whose leading dimension indexes experts.
  return absl::EndsWith(name, ".weight") || name.find(".experts.") != std::string::npos;
}

std::string FirstNames(const std::vector<std::string>& names, size_t shown) {
  const size_t n = std::min(names.size(), shown);
  std::string list =
      absl::StrJoin(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(n), ", ");
  if (names.size() > n) absl::StrAppend(&list, ", ... (", names.size(), " in all)");
  return list;
}

std::string ExpertName(const std::string& module, int64_t expert) {
  return expert < 0 ? module : absl::StrCat(module, ".", expert);
}

absl::StatusOr<std::vector<ModulePlan>> PlanModules(const Checkpoint& checkpoint,
                                                    const PlanOptions& options) {
  std::vector<ModulePlan> plans;
  for (const auto& [name, entry] : checkpoint.tensors()) {
    const SafetensorsTensor& t = *entry.tensor;
    const bool experts = IsFusedExpertTensor(name, t);
    if (experts && !absl::EndsWith(name, ".weight")) {
      // Not quantized, but listed: a runtime reading the label must not expect NVFP4 experts.
      ModulePlan plan;
      plan.weight_name = name;
      plan.module = name;
      plan.experts = t.shape[0];
      plan.rows = t.shape[1];
      plan.cols = t.shape[2];
      plan.skip_reason = absl::StrCat(
          "3-D expert tensor ", ShapeString(t.shape),
          " without a .weight suffix: its layout ([experts, out, in] or [experts, in, out]) "
          "differs between models, so it is kept as is");
      plans.push_back(std::move(plan));
      continue;
    }
    if (!absl::EndsWith(name, ".weight") || (t.shape.size() != 2 && !experts)) continue;
    ModulePlan plan;
    plan.weight_name = name;
    plan.module = name.substr(0, name.size() - 7);
    plan.experts = experts ? t.shape[0] : 0;
    plan.rows = t.shape[t.shape.size() - 2];
    plan.cols = t.shape[t.shape.size() - 1];
    auto matches = [&](const std::string& glob) {
      return GlobMatch(glob, plan.module) || GlobMatch(glob, plan.weight_name);
    };
    if (!options.includes.empty() &&
        std::none_of(options.includes.begin(), options.includes.end(), matches)) {
      plan.skip_reason = "matches no --include pattern";
    }
    for (const std::string& glob : options.excludes) {
      if (plan.skip_reason.empty() && matches(glob)) {
        plan.skip_reason = absl::StrCat("excluded by --exclude '", glob, "'");
      }
    }
    if (options.default_excludes) {
      for (const std::string& glob : DefaultExcludes()) {
        if (plan.skip_reason.empty() && matches(glob)) {
          plan.skip_reason = absl::StrCat("excluded by default pattern '", glob, "'");
        }
      }
    }
    absl::StatusOr<DType> dtype = WeightDType(t.dtype);
    if (plan.skip_reason.empty() && !dtype.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' has ", dtype.status().message(),
                       "; exclude it with --exclude or pass an unquantized checkpoint"));
    }
    if (dtype.ok()) plan.dtype = *dtype;
    if (plan.skip_reason.empty() && (plan.cols % 16 != 0 || plan.cols == 0 || plan.rows == 0)) {
      plan.skip_reason = absl::StrCat("in = ", plan.cols, " is not a positive multiple of 16");
    }
    if (plan.skip_reason.empty() && experts && plan.experts == 0) {
      plan.skip_reason = "a 3-D expert tensor with no experts";
    }
    plan.quantize = plan.skip_reason.empty();
    if (plan.quantize) {
      for (const char* suffix : {".weight_scale", ".weight_scale_2"}) {
        if (checkpoint.Find(plan.module + suffix) != nullptr) {
          return absl::InvalidArgumentError(
              absl::StrCat("tensor '", plan.module, suffix,
                           "' already exists: the checkpoint looks quantized already"));
        }
      }
      plan.fused_group = FusedGroupKey(plan.module);
    }
    plans.push_back(std::move(plan));
  }
  // A fused group of one quantized member is no group.
  std::map<std::string, int> members;
  for (const ModulePlan& p : plans) {
    if (!p.fused_group.empty()) ++members[p.fused_group];
  }
  for (ModulePlan& p : plans) {
    if (!p.fused_group.empty() && members[p.fused_group] < 2) p.fused_group.clear();
  }
  return plans;
}

}  // namespace nvfp4cal
