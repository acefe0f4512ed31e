#include "client/inspect.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <system_error>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "client/checkpoint.h"
#include "client/progress.h"
#include "client/quantize_checkpoint.h"
#include "client/temp_dir.h"
#include "common/file_util.h"
#include "nlohmann/json.hpp"
#include "nvfp4cal/kernels/codecs.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using OrderedJson = nlohmann::ordered_json;

struct Nvfp4Module {
  std::string module;
  // Tensor names and conventions (quantize_checkpoint.h).
  const Nvfp4Layout* layout = &LayoutOf(OutputFormat::kModelOpt);
  const Checkpoint::Entry* codes = nullptr;
  const Checkpoint::Entry* scales = nullptr;
  const Checkpoint::Entry* scale_2 = nullptr;
  int64_t experts = 0;  // 0: [out, in]; else a 3-D expert tensor [experts, out, in]
  int64_t rows = 0;
  int64_t cols = 0;
  // The stored global scale, one per expert (one for a 2-D module).
  std::vector<float> global_scales;
  // ModelOpt's weight_scale_2 of expert e (the reciprocal of compressed-tensors' divisor).
  float WeightScale2(size_t e) const {
    return layout->divisor ? 1.0f / global_scales[e] : global_scales[e];
  }
};

// The NVFP4 module whose global scale is tensor `name` in `layout`, shapes checked; nullopt
// when `name` is not such a tensor.
absl::StatusOr<std::optional<Nvfp4Module>> ReadNvfp4Module(const Checkpoint& checkpoint,
                                                           const std::string& name,
                                                           const Checkpoint::Entry& entry,
                                                           const Nvfp4Layout& layout) {
  if (!absl::EndsWith(name, layout.global_scale)) return std::nullopt;
  Nvfp4Module m;
  m.layout = &layout;
  m.module = name.substr(0, name.size() - std::string(layout.global_scale).size());
  m.scale_2 = &entry;
  m.codes = checkpoint.Find(m.module + layout.codes);
  m.scales = checkpoint.Find(m.module + ".weight_scale");
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("NVFP4 module ", m.module, ": ", what));
  };
  if (m.codes == nullptr || m.scales == nullptr) {
    return bad(
        absl::StrCat(layout.global_scale + 1, " without ", layout.codes, " and .weight_scale"));
  }
  const SafetensorsTensor& c = *m.codes->tensor;
  const SafetensorsTensor& s = *m.scales->tensor;
  const SafetensorsTensor& s2 = *entry.tensor;
  // [out, in/2], or [experts, out, in/2] for a 3-D expert tensor.
  const bool experts = c.shape.size() == 3;
  if (c.dtype != SafetensorsDType::kU8 || (c.shape.size() != 2 && !experts)) {
    return bad(absl::StrCat(layout.codes, " is ", std::string(SafetensorsDTypeName(c.dtype)), " ",
                            ShapeString(c.shape),
                            ", expected U8 [out, in/2] or [experts, out, in/2]"));
  }
  m.experts = experts ? c.shape[0] : 0;
  m.rows = c.shape[c.shape.size() - 2];
  m.cols = c.shape[c.shape.size() - 1] * 2;
  std::vector<int64_t> want_scales = {m.rows, m.cols / 16};
  if (experts) want_scales.insert(want_scales.begin(), m.experts);
  if (s.dtype != SafetensorsDType::kF8E4M3 || s.shape != want_scales) {
    return bad(absl::StrCat(".weight_scale is ", std::string(SafetensorsDTypeName(s.dtype)), " ",
                            ShapeString(s.shape), ", expected F8_E4M3 ", ShapeString(want_scales)));
  }
  const int64_t count = std::max<int64_t>(m.experts, 1);
  if (s2.dtype != SafetensorsDType::kF32 || s2.num_bytes != 4 * count) {
    return bad(absl::StrCat(layout.global_scale, " is ",
                            std::string(SafetensorsDTypeName(s2.dtype)), " ", ShapeString(s2.shape),
                            ", expected F32 with ", count,
                            count == 1 ? " value" : " values (one per expert)"));
  }
  m.global_scales.resize(static_cast<size_t>(count));
  std::memcpy(m.global_scales.data(), s2.data, static_cast<size_t>(4 * count));
  for (float g : m.global_scales) {
    // ModelOpt's weight_scale_2 is 0 for an all-zero tensor; a divisor must be positive.
    if (!std::isfinite(g) || g < 0.0f || (layout.divisor && g == 0.0f)) {
      return bad(absl::StrCat(layout.global_scale, " holds ", g, "; expected a finite ",
                              layout.divisor ? "positive" : "non-negative", " value"));
    }
  }
  return m;
}

// Every NVFP4 module of either layout, shapes checked.
absl::StatusOr<std::vector<Nvfp4Module>> FindNvfp4Modules(const Checkpoint& checkpoint) {
  std::vector<Nvfp4Module> modules;
  for (const auto& [name, entry] : checkpoint.tensors()) {
    for (const Nvfp4Layout* layout :
         {&LayoutOf(OutputFormat::kModelOpt), &LayoutOf(OutputFormat::kCompressedTensors)}) {
      absl::StatusOr<std::optional<Nvfp4Module>> m =
          ReadNvfp4Module(checkpoint, name, entry, *layout);
      if (!m.ok()) return m.status();
      if (m->has_value()) modules.push_back(**std::move(m));
    }
  }
  return modules;
}

// What `inspect` finds in a checkpoint, printed as text or JSON.
struct Inspection {
  std::string dir;
  nlohmann::json architectures;  // null when config.json has none
  size_t shards = 0;
  bool sharded = false;
  size_t tensors = 0;
  int64_t tensor_bytes = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> by_dtype;  // dtype -> (tensors, bytes)
  // quantization_config of config.json; for compressed-tensors, config_algo is what its
  // config groups amount to (NVFP4 with input_activations, else W4A16_NVFP4).
  std::string config_method, config_algo;
  bool compressed_tensors = false;
  bool hf_quant_config = false;  // hf_quant_config.json with a producer
  std::string hf_algo, kv_algo, producer_name, producer_version;
  int64_t group_size = 0;
  nlohmann::json exclude_modules;
  std::vector<Nvfp4Module> modules;
  std::vector<std::string> with_input_scale;
  int64_t kv_modules = 0;  // k_proj and v_proj weights
  int64_t kv_scales = 0;   // of those, with k_scale / v_scale
  std::vector<std::string> warnings;
};

// What the labels promise against the tensors (runtimes trust the label): W4A4 "NVFP4" needs
// every NVFP4 module's input_scale, "W4A16_NVFP4" none, FP8 KV cache a scale for every k_proj /
// v_proj; config.json and hf_quant_config.json must agree.
void CheckLabels(const Checkpoint& checkpoint, Inspection* in) {
  std::vector<std::string> without;
  for (const Nvfp4Module& m : in->modules) {
    if (checkpoint.Find(m.module + m.layout->input_scale) != nullptr) {
      in->with_input_scale.push_back(m.module);
    } else {
      without.push_back(m.module);
    }
  }
  if (!in->config_algo.empty() && !in->hf_algo.empty() && in->config_algo != in->hf_algo) {
    in->warnings.push_back(absl::StrCat("config.json says quant_algo ", in->config_algo,
                                        " but hf_quant_config.json says ", in->hf_algo));
  }
  for (const std::string& algo : {in->config_algo, in->hf_algo}) {
    if (algo == "NVFP4" && !without.empty()) {
      in->warnings.push_back(absl::StrCat(
          "quant_algo NVFP4 (W4A4) promises an input_scale for every quantized module; ",
          without.size(), " have none (", FirstNames(without),
          "): runtimes would scale their activations by an uninitialised value"));
      break;
    }
    if (algo == "W4A16_NVFP4" && !in->with_input_scale.empty()) {
      in->warnings.push_back(
          absl::StrCat("quant_algo W4A16_NVFP4 (weight-only) but ", in->with_input_scale.size(),
                       " modules have an input_scale (", FirstNames(in->with_input_scale),
                       "), which runtimes ignore"));
      break;
    }
  }
  std::vector<std::string> kv_without;
  const Nvfp4Layout& layout =
      LayoutOf(in->compressed_tensors ? OutputFormat::kCompressedTensors : OutputFormat::kModelOpt);
  for (const auto& [name, entry] : checkpoint.tensors()) {
    // A projection's weight: `.weight`, or its codes in the layout (`.weight_packed`).
    std::string module;
    for (const char* suffix : {".weight", layout.codes}) {
      if (absl::EndsWith(name, suffix)) module = name.substr(0, name.size() - std::strlen(suffix));
    }
    const std::string scale = module.empty() ? "" : KvScaleName(layout, module);
    if (scale.empty()) continue;
    ++in->kv_modules;
    if (checkpoint.Find(scale) != nullptr) {
      ++in->kv_scales;
    } else {
      kv_without.push_back(module);
    }
  }
  if (in->kv_algo == "FP8" && !kv_without.empty()) {
    in->warnings.push_back(absl::StrCat("kv_cache_quant_algo FP8 but ", kv_without.size(),
                                        " k_proj / v_proj have no scale (", FirstNames(kv_without),
                                        ")"));
  }
  if (in->kv_algo.empty() && in->kv_scales > 0) {
    in->warnings.push_back(absl::StrCat(in->kv_scales,
                                        " k_scale / v_scale tensors but no kv_cache_quant_algo: "
                                        "runtimes ignore them"));
  }
}

absl::StatusOr<Inspection> Inspect(const std::string& dir, const Checkpoint& checkpoint) {
  Inspection in;
  in.dir = dir;
  absl::StatusOr<std::vector<Nvfp4Module>> modules = FindNvfp4Modules(checkpoint);
  if (!modules.ok()) return modules.status();
  in.modules = *std::move(modules);
  const nlohmann::json config = nlohmann::json::parse(checkpoint.config_text());
  if (config.contains("architectures")) in.architectures = config["architectures"];
  in.shards = checkpoint.shards().size();
  in.sharded = checkpoint.sharded();
  in.tensors = checkpoint.tensors().size();
  in.tensor_bytes = checkpoint.total_tensor_bytes();
  for (const auto& [name, entry] : checkpoint.tensors()) {
    auto& d = in.by_dtype[std::string(SafetensorsDTypeName(entry.tensor->dtype))];
    ++d.first;
    d.second += entry.tensor->num_bytes;
  }
  if (config.contains("quantization_config") && config["quantization_config"].is_object()) {
    const nlohmann::json& q = config["quantization_config"];
    in.config_method = q.value("quant_method", "?");
    in.config_algo = q.value("quant_algo", "");
    in.compressed_tensors = in.config_method == "compressed-tensors";
    if (in.compressed_tensors) {
      const nlohmann::json* group = nullptr;
      if (q.contains("config_groups") && q["config_groups"].is_object() &&
          !q["config_groups"].empty()) {
        group = &q["config_groups"].begin().value();
      }
      const bool activations = group != nullptr && group->is_object() &&
                               group->contains("input_activations") &&
                               !(*group)["input_activations"].is_null();
      in.config_algo = activations ? "NVFP4" : "W4A16_NVFP4";
      if (q.contains("kv_cache_scheme") && !q["kv_cache_scheme"].is_null()) in.kv_algo = "FP8";
      if (q.contains("ignore")) in.exclude_modules = q["ignore"];
    }
  }
  const std::string hf_path = (fs::path(dir) / kHfQuantConfigFileName).string();
  absl::StatusOr<std::string> hf = ReadTextFile(hf_path);
  if (!hf.ok() && !absl::IsNotFound(hf.status())) return hf.status();
  if (hf.ok()) {
    const nlohmann::json h = nlohmann::json::parse(*hf, nullptr, false);
    if (!h.is_discarded() && h.contains("quantization") && h.contains("producer")) {
      const nlohmann::json& q = h["quantization"];
      in.hf_quant_config = true;
      in.hf_algo = q.value("quant_algo", "");
      if (q.contains("kv_cache_quant_algo") && q["kv_cache_quant_algo"].is_string()) {
        in.kv_algo = q["kv_cache_quant_algo"].get<std::string>();
      }
      in.group_size = q.value("group_size", 0);
      in.exclude_modules = q.contains("exclude_modules") ? q["exclude_modules"] : nlohmann::json();
      in.producer_name = h["producer"].value("name", "?");
      in.producer_version = h["producer"].value("version", "?");
    }
  }
  CheckLabels(checkpoint, &in);
  return in;
}

// How one NVFP4 module differs from the same module of another checkpoint (`--against`).
struct ModuleDifference {
  std::string module;
  int64_t blocks = 0;
  int64_t scales_moved = 0;  // weight_scale bytes that differ
  int64_t weights = 0;
  int64_t codes_changed = 0;  // E2M1 codes that differ
  bool global_scale_equal = true;
};

struct Comparison {
  std::string against;
  std::vector<ModuleDifference> modules;  // in both, same shapes
  std::vector<std::string> unmatched;     // NVFP4 in one only, or of another shape
};

// Block scales, codes and global scales of every NVFP4 module that both checkpoints have.
Comparison Compare(const std::string& against, const std::vector<Nvfp4Module>& mine,
                   const std::vector<Nvfp4Module>& theirs) {
  Comparison c;
  c.against = against;
  std::map<std::string, const Nvfp4Module*> other;
  for (const Nvfp4Module& m : theirs) other[m.module] = &m;
  for (const Nvfp4Module& m : mine) {
    const auto it = other.find(m.module);
    if (it == other.end() || it->second->codes->tensor->num_bytes != m.codes->tensor->num_bytes ||
        it->second->scales->tensor->num_bytes != m.scales->tensor->num_bytes ||
        it->second->global_scales.size() != m.global_scales.size()) {
      c.unmatched.push_back(m.module);
      continue;
    }
    const Nvfp4Module& o = *it->second;
    other.erase(it);
    ModuleDifference d;
    d.module = m.module;
    d.blocks = m.scales->tensor->num_bytes;
    d.weights = 2 * m.codes->tensor->num_bytes;
    for (int64_t i = 0; i < d.blocks; ++i) {
      d.scales_moved += m.scales->tensor->data[i] != o.scales->tensor->data[i];
    }
    for (int64_t i = 0; i < m.codes->tensor->num_bytes; ++i) {
      const uint8_t a = m.codes->tensor->data[i];
      const uint8_t b = o.codes->tensor->data[i];
      d.codes_changed += ((a ^ b) & 0x0F) != 0;
      d.codes_changed += ((a ^ b) & 0xF0) != 0;
    }
    for (size_t e = 0; e < m.global_scales.size(); ++e) {
      d.global_scale_equal = d.global_scale_equal && m.WeightScale2(e) == o.WeightScale2(e);
    }
    c.modules.push_back(d);
  }
  for (const auto& [name, module] : other) c.unmatched.push_back(name);
  return c;
}

std::string Percent(int64_t part, int64_t whole) {
  return absl::StrFormat(
      "%.2f%%", whole == 0 ? 0.0 : 100.0 * static_cast<double>(part) / static_cast<double>(whole));
}

std::string FormatComparisonText(const Comparison& c) {
  int64_t blocks = 0, moved = 0, weights = 0, changed = 0, global_differs = 0;
  for (const ModuleDifference& d : c.modules) {
    blocks += d.blocks;
    moved += d.scales_moved;
    weights += d.weights;
    changed += d.codes_changed;
    global_differs += d.global_scale_equal ? 0 : 1;
  }
  std::string out =
      absl::StrCat("against ", c.against, ": ", c.modules.size(), " NVFP4 modules compared");
  if (!c.unmatched.empty()) {
    absl::StrAppend(&out, ", ", c.unmatched.size(), " in one checkpoint only or of another shape (",
                    FirstNames(c.unmatched), ")");
  }
  absl::StrAppend(&out, "\n  block scales moved: ", moved, " of ", blocks, " (",
                  Percent(moved, blocks), "); codes changed: ", changed, " of ", weights, " (",
                  Percent(changed, weights), "); weight_scale_2 differs in ", global_differs,
                  " modules\n");
  for (const ModuleDifference& d : c.modules) {
    if (d.scales_moved == 0 && d.codes_changed == 0 && d.global_scale_equal) continue;
    absl::StrAppend(&out, "  ", d.module, ": scales moved ", d.scales_moved, " of ", d.blocks,
                    ", codes changed ", d.codes_changed, " of ", d.weights,
                    d.global_scale_equal ? "" : ", weight_scale_2 differs", "\n");
  }
  return out;
}

OrderedJson ComparisonJson(const Comparison& c) {
  OrderedJson modules = OrderedJson::array();
  for (const ModuleDifference& d : c.modules) {
    modules.push_back({{"module", d.module},
                       {"blocks", d.blocks},
                       {"scales_moved", d.scales_moved},
                       {"weights", d.weights},
                       {"codes_changed", d.codes_changed},
                       {"weight_scale_2_equal", d.global_scale_equal}});
  }
  return {{"checkpoint", c.against}, {"modules", std::move(modules)}, {"unmatched", c.unmatched}};
}

// An error of the --against checkpoint, named as that option (Checkpoint::Open names --model).
absl::Status AgainstError(const absl::Status& status) {
  absl::string_view message = status.message();
  absl::ConsumePrefix(&message, "--model ");
  return absl::Status(status.code(), absl::StrCat("--against ", message));
}

std::string FormatText(const Inspection& in, const Checkpoint& checkpoint) {
  std::string out = absl::StrCat("checkpoint: ", in.dir, "\n");
  if (!in.architectures.is_null()) {
    absl::StrAppend(&out, "architecture: ", in.architectures.dump(), "\n");
  }
  absl::StrAppend(&out, "shards: ", in.shards,
                  in.sharded ? " (with model.safetensors.index.json)" : "", "\n");
  absl::StrAppend(&out, "tensors: ", in.tensors, ", ", FormatBytes(in.tensor_bytes), "\n");
  for (const auto& [dtype, count] : in.by_dtype) {
    absl::StrAppendFormat(&out, "  %-8s %5d tensors  %s\n", dtype, count.first,
                          FormatBytes(count.second));
  }
  if (!in.config_method.empty()) {
    absl::StrAppend(&out, "quantization_config: quant_method ", in.config_method,
                    in.compressed_tensors ? ", config groups amount to " : ", quant_algo ",
                    in.config_algo.empty() ? "?" : in.config_algo, "\n");
  }
  if (in.hf_quant_config) {
    absl::StrAppend(&out, "hf_quant_config: ", in.hf_algo.empty() ? "?" : in.hf_algo,
                    ", group size ", in.group_size, ", producer ", in.producer_name, " ",
                    in.producer_version, ", excluded modules: ", in.exclude_modules.dump(), "\n");
  }
  if (in.modules.empty()) {
    absl::StrAppend(&out, "NVFP4 modules: none\n");
    return out;
  }
  int64_t packed_bytes = 0;
  int64_t elements = 0;
  for (const Nvfp4Module& m : in.modules) {
    packed_bytes +=
        m.codes->tensor->num_bytes + m.scales->tensor->num_bytes + m.scale_2->tensor->num_bytes;
    elements += std::max<int64_t>(m.experts, 1) * m.rows * m.cols;
  }
  absl::StrAppendFormat(&out, "NVFP4 modules: %d, %d weights in %s (%.3f bits per weight)\n",
                        in.modules.size(), elements, FormatBytes(packed_bytes),
                        8.0 * static_cast<double>(packed_bytes) / static_cast<double>(elements));
  absl::StrAppend(&out, "input_scale: ", in.with_input_scale.size(), " of ", in.modules.size(),
                  " NVFP4 modules\n");
  absl::StrAppend(&out, "kv cache: ", in.kv_algo.empty() ? "not quantized" : in.kv_algo, ", ",
                  in.kv_scales, " of ", in.kv_modules, " k_proj / v_proj with k_scale / v_scale\n");
  for (const std::string& w : in.warnings) absl::StrAppend(&out, "warning: ", w, "\n");
  size_t width = 6;
  for (const Nvfp4Module& m : in.modules) width = std::max(width, m.module.size());
  absl::StrAppendFormat(&out, "  %-*s  %-11s  %14s  %12s  %s\n", static_cast<int>(width), "module",
                        "shape", "weight_scale_2", "global amax", "shard");
  for (const Nvfp4Module& m : in.modules) {
    // A 3-D expert tensor: its experts' largest weight_scale_2.
    float s2 = 0.0f;
    for (size_t e = 0; e < m.global_scales.size(); ++e) s2 = std::max(s2, m.WeightScale2(e));
    const std::string shape = m.experts > 0 ? absl::StrCat(m.experts, "x", m.rows, "x", m.cols)
                                            : absl::StrCat(m.rows, "x", m.cols);
    absl::StrAppendFormat(&out, "  %-*s  %-11s  %14.6g  %12.6g  %s%s\n", static_cast<int>(width),
                          m.module, shape, s2, s2 * kGlobalScaleDivisor,
                          checkpoint.shards()[m.codes->shard].file_name,
                          m.experts > 0 ? "  (largest of the experts')" : "");
  }
  return out;
}

std::string FormatJson(const Inspection& in, const Checkpoint& checkpoint) {
  OrderedJson dtypes = OrderedJson::object();
  for (const auto& [dtype, count] : in.by_dtype) {
    dtypes[dtype] = {{"tensors", count.first}, {"bytes", count.second}};
  }
  OrderedJson modules = OrderedJson::array();
  for (const Nvfp4Module& m : in.modules) {
    // Scales as ModelOpt defines them (compressed-tensors stores their reciprocals): a number,
    // or an array with one per expert for a 3-D expert tensor.
    const size_t count = m.global_scales.size();
    auto per_module = [&m, count](auto value_of) {
      if (m.experts == 0) return OrderedJson(value_of(0));
      OrderedJson values = OrderedJson::array();
      for (size_t e = 0; e < count; ++e) values.push_back(value_of(e));
      return values;
    };
    const Checkpoint::Entry* input = checkpoint.Find(m.module + m.layout->input_scale);
    OrderedJson input_scale;  // null when absent
    if (input != nullptr && input->tensor->num_bytes == static_cast<int64_t>(4 * count)) {
      input_scale = per_module([&](size_t e) {
        float v = 0.0f;
        std::memcpy(&v, input->tensor->data + 4 * e, 4);
        return m.layout->divisor ? 1.0f / v : v;
      });
    }
    modules.push_back({{"module", m.module},
                       {"format", m.layout->name},
                       {"experts", m.experts > 0 ? OrderedJson(m.experts) : OrderedJson()},
                       {"rows", m.rows},
                       {"cols", m.cols},
                       {"weight_scale_2", per_module([&](size_t e) { return m.WeightScale2(e); })},
                       {"global_amax", per_module([&](size_t e) {
                          return m.WeightScale2(e) * kGlobalScaleDivisor;
                        })},
                       {"input_scale", std::move(input_scale)},
                       {"shard", checkpoint.shards()[m.codes->shard].file_name}});
  }
  auto or_null = [](const std::string& s) { return s.empty() ? OrderedJson() : OrderedJson(s); };
  OrderedJson root = {
      {"checkpoint", in.dir},
      {"architectures", OrderedJson::parse(in.architectures.dump())},
      {"shards", in.shards},
      {"tensors", in.tensors},
      {"tensor_bytes", in.tensor_bytes},
      {"dtypes", std::move(dtypes)},
      {"label",
       {{"config_quant_method", or_null(in.config_method)},
        {"config_quant_algo", or_null(in.config_algo)},
        {"hf_quant_algo", or_null(in.hf_algo)},
        {"kv_cache_quant_algo", or_null(in.kv_algo)},
        {"group_size", in.hf_quant_config ? OrderedJson(in.group_size) : OrderedJson()},
        {"exclude_modules", OrderedJson::parse(in.exclude_modules.dump())},
        {"producer", in.hf_quant_config ? OrderedJson({{"name", in.producer_name},
                                                       {"version", in.producer_version}})
                                        : OrderedJson()}}},
      {"nvfp4_modules", std::move(modules)},
      {"input_scales", in.with_input_scale.size()},
      {"kv_cache", {{"k_v_projections", in.kv_modules}, {"scales", in.kv_scales}}},
      {"warnings", in.warnings}};
  return root.dump(2) + "\n";
}

}  // namespace

absl::StatusOr<std::string> InspectCheckpoint(const std::string& dir, InspectFormat format,
                                              const std::string& against) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> opened = Checkpoint::Open(dir);
  if (!opened.ok()) return opened.status();
  absl::StatusOr<Inspection> in = Inspect(dir, **opened);
  if (!in.ok()) return in.status();
  if (against.empty()) {
    return format == InspectFormat::kJson ? FormatJson(*in, **opened) : FormatText(*in, **opened);
  }
  absl::StatusOr<std::unique_ptr<Checkpoint>> other = Checkpoint::Open(against);
  if (!other.ok()) return AgainstError(other.status());
  absl::StatusOr<std::vector<Nvfp4Module>> theirs = FindNvfp4Modules(**other);
  if (!theirs.ok()) return AgainstError(theirs.status());
  const Comparison comparison = Compare(against, in->modules, *theirs);
  if (format == InspectFormat::kText) {
    return FormatText(*in, **opened) + FormatComparisonText(comparison);
  }
  OrderedJson root = OrderedJson::parse(FormatJson(*in, **opened));
  root["against"] = ComparisonJson(comparison);
  return root.dump(2) + "\n";
}

absl::Status DequantizeCheckpoint(const DequantizeOptions& options) {
  if (options.dtype != SafetensorsDType::kBF16 && options.dtype != SafetensorsDType::kF32) {
    return absl::InvalidArgumentError("dequantize: --dtype must be bfloat16 or float32");
  }
  OutputTarget target;
  target.out_dir = options.out_dir;
  target.overwrite = options.overwrite;
  target.inputs = {{"--in", options.in_dir}};
  absl::Status out_ok = CheckOutputTarget(target);
  if (!out_ok.ok()) return out_ok;
  absl::StatusOr<std::unique_ptr<Checkpoint>> opened = Checkpoint::Open(options.in_dir);
  if (!opened.ok()) return opened.status();
  const Checkpoint& checkpoint = **opened;
  absl::StatusOr<std::vector<Nvfp4Module>> modules = FindNvfp4Modules(checkpoint);
  if (!modules.ok()) return modules.status();
  if (modules->empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(options.in_dir, " has no NVFP4 module (no *.weight_scale_2 tensor)"));
  }
  std::map<std::string, const Nvfp4Module*> by_part;  // every NVFP4 tensor -> its module
  for (const Nvfp4Module& m : *modules) {
    by_part[m.module + m.layout->codes] = &m;
    by_part[m.module + ".weight_scale"] = &m;
    by_part[m.module + m.layout->global_scale] = &m;
  }
  absl::StatusOr<std::string> temp = MakeTempDirBeside(options.out_dir);
  if (!temp.ok()) return temp.status();
  auto fail = [&](const absl::Status& status) {
    RemoveTree(*temp).IgnoreError();
    return status;
  };
  OrderedJson weight_map = OrderedJson::object();
  int64_t total = 0;
  const int element = SafetensorsDTypeSize(options.dtype);
  for (const Checkpoint::Shard& shard : checkpoint.shards()) {
    std::vector<SafetensorsTensorSpec> specs;
    for (const SafetensorsTensor& t : shard.file->tensors()) {
      const auto it = by_part.find(t.name);
      if (it == by_part.end()) {
        specs.push_back({t.name, t.dtype, t.shape});
      } else if (t.name == it->second->module + it->second->layout->codes) {
        const Nvfp4Module& m = *it->second;
        std::vector<int64_t> shape = {m.rows, m.cols};
        if (m.experts > 0) shape.insert(shape.begin(), m.experts);
        specs.push_back({m.module + ".weight", options.dtype, shape});
      }
    }
    for (const SafetensorsTensorSpec& s : specs) {
      weight_map[s.name] = shard.file_name;
      total += NumElements(s.shape) * SafetensorsDTypeSize(s.dtype);
    }
    auto writer = SafetensorsWriter::Create((fs::path(*temp) / shard.file_name).string(), specs,
                                            shard.file->metadata());
    if (!writer.ok()) return fail(writer.status());
    for (const SafetensorsTensor& t : shard.file->tensors()) {
      const auto it = by_part.find(t.name);
      absl::Status s;
      if (it == by_part.end()) {
        s = (*writer)->Write(t.name, absl::MakeConstSpan(t.data, static_cast<size_t>(t.num_bytes)));
      } else if (t.name == it->second->module + it->second->layout->codes) {
        const Nvfp4Module& m = *it->second;
        const uint8_t* codes = m.codes->tensor->data;
        const uint8_t* scales = m.scales->tensor->data;
        std::vector<uint8_t> row(static_cast<size_t>(m.cols * element));
        // Rows of every expert in turn (a 2-D module is one expert).
        for (int64_t r = 0; r < std::max<int64_t>(m.experts, 1) * m.rows && s.ok(); ++r) {
          const float g = m.global_scales[static_cast<size_t>(r / m.rows)];
          for (int64_t c = 0; c < m.cols; ++c) {
            const uint8_t byte = codes[(r * m.cols + c) / 2];
            const uint8_t code = (c % 2 == 0) ? UnpackE2M1Low(byte) : UnpackE2M1High(byte);
            const float block = DecodeE4M3(scales[(r * m.cols + c) / 16]);
            // Each layout's own rule: ModelOpt multiplies by weight_scale_2, compressed-tensors
            // divides the block scale by weight_global_scale.
            const float w =
                m.layout->divisor ? DecodeE2M1(code) * (block / g) : (DecodeE2M1(code) * block) * g;
            if (options.dtype == SafetensorsDType::kF32) {
              std::memcpy(&row[static_cast<size_t>(c * 4)], &w, 4);
            } else {
              const uint16_t bits = FloatToBFloat16(w);
              std::memcpy(&row[static_cast<size_t>(c * 2)], &bits, 2);
            }
          }
          s = (*writer)->Write(m.module + ".weight", row);
        }
      }
      if (!s.ok()) return fail(s);
    }
    absl::Status finished = (*writer)->Finish();
    if (!finished.ok()) return fail(finished);
  }
  if (checkpoint.sharded()) {
    OrderedJson index = OrderedJson::object();
    index["metadata"] = {{"total_size", total}};
    index["weight_map"] = std::move(weight_map);
    absl::Status s =
        WriteTextFile((fs::path(*temp) / kIndexFileName).string(), index.dump(2) + "\n");
    if (!s.ok()) return fail(s);
  }
  OrderedJson config = OrderedJson::parse(checkpoint.config_text());
  config.erase("quantization_config");
  for (const absl::Status& s :
       {WriteTextFile((fs::path(*temp) / kConfigFileName).string(), config.dump(2) + "\n"),
        WriteTextFile((fs::path(*temp) / kProducerRecordFileName).string(),
                      ProducerRecordJson("dequantize"))}) {
    if (!s.ok()) return fail(s);
  }
  std::error_code ec;
  for (const std::string& name : checkpoint.OtherFiles()) {
    const std::string from = (fs::path(options.in_dir) / name).string();
    if (fs::equivalent(from, options.out_dir, ec)) continue;  // an --out inside --in
    // Runtimes would load a `.safetensors` file that is no shard as weights.
    if (absl::EndsWith(name, ".safetensors")) continue;
    absl::Status s = CopyPath(from, (fs::path(*temp) / name).string());
    if (!s.ok()) return fail(s);
  }
  absl::Status replaced = ReplaceWithTempDir(*temp, target);
  if (!replaced.ok()) return fail(replaced);
  return absl::OkStatus();
}

}  // namespace nvfp4cal
