#include "client/inspect.h"

#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <system_error>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/checkpoint.h"
#include "client/file_util.h"
#include "client/progress.h"
#include "client/quantize_checkpoint.h"
#include "client/temp_dir.h"
#include "nlohmann/json.hpp"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/example_data.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using OrderedJson = nlohmann::ordered_json;

struct Nvfp4Module {
  std::string module;
  const Checkpoint::Entry* codes = nullptr;
  const Checkpoint::Entry* scales = nullptr;
  const Checkpoint::Entry* scale_2 = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  float global_scale = 0.0f;
};

// Every `<m>.weight_scale_2` with its codes and block scales, shapes checked.
absl::StatusOr<std::vector<Nvfp4Module>> FindNvfp4Modules(const Checkpoint& checkpoint) {
  std::vector<Nvfp4Module> modules;
  for (const auto& [name, entry] : checkpoint.tensors()) {
    if (!absl::EndsWith(name, ".weight_scale_2")) continue;
    Nvfp4Module m;
    m.module = name.substr(0, name.size() - std::string(".weight_scale_2").size());
    m.scale_2 = &entry;
    m.codes = checkpoint.Find(m.module + ".weight");
    m.scales = checkpoint.Find(m.module + ".weight_scale");
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat("NVFP4 module ", m.module, ": ", what));
    };
    if (m.codes == nullptr || m.scales == nullptr) {
      return bad("weight_scale_2 without .weight and .weight_scale");
    }
    const SafetensorsTensor& c = *m.codes->tensor;
    const SafetensorsTensor& s = *m.scales->tensor;
    const SafetensorsTensor& s2 = *entry.tensor;
    if (c.dtype != SafetensorsDType::kU8 || c.shape.size() != 2) {
      return bad(absl::StrCat(".weight is ", std::string(SafetensorsDTypeName(c.dtype)), " ",
                              ShapeString(c.shape), ", expected U8 [out, in/2]"));
    }
    m.rows = c.shape[0];
    m.cols = c.shape[1] * 2;
    if (s.dtype != SafetensorsDType::kF8E4M3 || s.shape.size() != 2 || s.shape[0] != m.rows ||
        s.shape[1] * 16 != m.cols) {
      return bad(absl::StrCat(".weight_scale is ", std::string(SafetensorsDTypeName(s.dtype)), " ",
                              ShapeString(s.shape), ", expected F8_E4M3 [", m.rows, ", ",
                              m.cols / 16, "]"));
    }
    if (s2.dtype != SafetensorsDType::kF32 || s2.num_bytes != 4) {
      return bad(absl::StrCat(".weight_scale_2 is ", std::string(SafetensorsDTypeName(s2.dtype)),
                              " ", ShapeString(s2.shape), ", expected an F32 scalar"));
    }
    std::memcpy(&m.global_scale, s2.data, 4);
    modules.push_back(m);
  }
  return modules;
}

// What the labels promise against the tensors (runtimes trust the label): W4A4 "NVFP4" needs
// every NVFP4 module's input_scale, "W4A16_NVFP4" none; config.json and hf_quant_config.json
// must agree. One "warning: ..." line per problem.
std::string LabelWarnings(const std::string& config_algo, const std::string& hf_algo,
                          const std::vector<Nvfp4Module>& modules, const Checkpoint& checkpoint) {
  std::vector<std::string> with, without;
  for (const Nvfp4Module& m : modules) {
    (checkpoint.Find(m.module + ".input_scale") != nullptr ? with : without).push_back(m.module);
  }
  std::string out =
      absl::StrCat("input_scale: ", with.size(), " of ", modules.size(), " NVFP4 modules\n");
  auto first = [](const std::vector<std::string>& names) {
    std::string list =
        absl::StrJoin(names.begin(), names.begin() + std::min<size_t>(names.size(), 5), ", ");
    if (names.size() > 5) absl::StrAppend(&list, ", ...");
    return list;
  };
  if (!config_algo.empty() && !hf_algo.empty() && config_algo != hf_algo) {
    absl::StrAppend(&out, "warning: config.json says quant_algo ", config_algo,
                    " but hf_quant_config.json says ", hf_algo, "\n");
  }
  for (const std::string& algo : {config_algo, hf_algo}) {
    if (algo == "NVFP4" && !without.empty()) {
      absl::StrAppend(&out,
                      "warning: quant_algo NVFP4 (W4A4) promises an input_scale for every "
                      "quantized module; ",
                      without.size(), " have none (", first(without),
                      "): runtimes would scale their activations by an uninitialised value\n");
      break;
    }
    if (algo == "W4A16_NVFP4" && !with.empty()) {
      absl::StrAppend(&out, "warning: quant_algo W4A16_NVFP4 (weight-only) but ", with.size(),
                      " modules have an input_scale (", first(with), "), which runtimes ignore\n");
      break;
    }
  }
  return out;
}

// The FP8 KV cache the label promises (kv_cache_quant_algo FP8) against the k_scale / v_scale
// tensors of the k_proj / v_proj modules.
std::string KvCacheReport(const std::string& kv_algo, const Checkpoint& checkpoint) {
  int64_t attention = 0;
  std::vector<std::string> without;
  int64_t scales = 0;
  for (const auto& [name, entry] : checkpoint.tensors()) {
    for (const auto& [weight, scale] :
         {std::pair<std::string, std::string>{".k_proj.weight", ".k_scale"},
          {".v_proj.weight", ".v_scale"}}) {
      if (!absl::EndsWith(name, weight)) continue;
      ++attention;
      const std::string module = name.substr(0, name.size() - std::string(".weight").size());
      if (checkpoint.Find(module + scale) != nullptr) {
        ++scales;
      } else {
        without.push_back(module);
      }
    }
  }
  std::string out = absl::StrCat("kv cache: ", kv_algo.empty() ? "not quantized" : kv_algo, ", ",
                                 scales, " of ", attention,
                                 " k_proj / v_proj with k_scale / "
                                 "v_scale\n");
  if (kv_algo == "FP8" && !without.empty()) {
    absl::StrAppend(&out, "warning: kv_cache_quant_algo FP8 but ", without.size(),
                    " k_proj / v_proj have no scale (", without.front(),
                    without.size() > 1 ? ", ..." : "", ")\n");
  }
  if (kv_algo.empty() && scales > 0) {
    absl::StrAppend(
        &out, "warning: ", scales,
        " k_scale / v_scale tensors but no kv_cache_quant_algo: runtimes ignore them\n");
  }
  return out;
}

}  // namespace

absl::StatusOr<std::string> InspectCheckpoint(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> opened = Checkpoint::Open(dir);
  if (!opened.ok()) return opened.status();
  const Checkpoint& checkpoint = **opened;
  absl::StatusOr<std::vector<Nvfp4Module>> modules = FindNvfp4Modules(checkpoint);
  if (!modules.ok()) return modules.status();

  std::string out = absl::StrCat("checkpoint: ", dir, "\n");
  const nlohmann::json config = nlohmann::json::parse(checkpoint.config_text());
  if (config.contains("architectures")) {
    absl::StrAppend(&out, "architecture: ", config["architectures"].dump(), "\n");
  }
  absl::StrAppend(&out, "shards: ", checkpoint.shards().size(),
                  checkpoint.sharded() ? " (with model.safetensors.index.json)" : "", "\n");
  absl::StrAppend(&out, "tensors: ", checkpoint.tensors().size(), ", ",
                  FormatBytes(checkpoint.total_tensor_bytes()), "\n");
  std::map<std::string, std::pair<int64_t, int64_t>> by_dtype;
  for (const auto& [name, entry] : checkpoint.tensors()) {
    auto& d = by_dtype[std::string(SafetensorsDTypeName(entry.tensor->dtype))];
    ++d.first;
    d.second += entry.tensor->num_bytes;
  }
  for (const auto& [dtype, count] : by_dtype) {
    absl::StrAppendFormat(&out, "  %-8s %5d tensors  %s\n", dtype, count.first,
                          FormatBytes(count.second));
  }
  std::string config_algo, hf_algo, kv_algo;
  if (config.contains("quantization_config") && config["quantization_config"].is_object()) {
    const nlohmann::json& q = config["quantization_config"];
    config_algo = q.value("quant_algo", "");
    absl::StrAppend(&out, "quantization_config: quant_method ", q.value("quant_method", "?"),
                    ", quant_algo ", q.value("quant_algo", "?"), "\n");
  }
  const std::string hf_path = (fs::path(dir) / kHfQuantConfigFileName).string();
  absl::StatusOr<std::string> hf = ReadTextFile(hf_path);
  if (!hf.ok() && !absl::IsNotFound(hf.status())) return hf.status();
  if (hf.ok()) {
    const nlohmann::json h = nlohmann::json::parse(*hf, nullptr, false);
    if (!h.is_discarded() && h.contains("quantization") && h.contains("producer")) {
      hf_algo = h["quantization"].value("quant_algo", "");
      if (h["quantization"].contains("kv_cache_quant_algo") &&
          h["quantization"]["kv_cache_quant_algo"].is_string()) {
        kv_algo = h["quantization"]["kv_cache_quant_algo"].get<std::string>();
      }
      absl::StrAppend(&out, "hf_quant_config: ", h["quantization"].value("quant_algo", "?"),
                      ", group size ", h["quantization"].value("group_size", 0), ", producer ",
                      h["producer"].value("name", "?"), " ", h["producer"].value("version", "?"),
                      ", excluded modules: ", h["quantization"]["exclude_modules"].dump(), "\n");
    }
  }
  if (modules->empty()) {
    absl::StrAppend(&out, "NVFP4 modules: none\n");
    return out;
  }
  int64_t packed_bytes = 0;
  int64_t elements = 0;
  for (const Nvfp4Module& m : *modules) {
    packed_bytes += m.codes->tensor->num_bytes + m.scales->tensor->num_bytes + 4;
    elements += m.rows * m.cols;
  }
  absl::StrAppendFormat(&out, "NVFP4 modules: %d, %d weights in %s (%.3f bits per weight)\n",
                        modules->size(), elements, FormatBytes(packed_bytes),
                        8.0 * static_cast<double>(packed_bytes) / static_cast<double>(elements));
  absl::StrAppend(&out, LabelWarnings(config_algo, hf_algo, *modules, checkpoint));
  absl::StrAppend(&out, KvCacheReport(kv_algo, checkpoint));
  size_t width = 6;
  for (const Nvfp4Module& m : *modules) width = std::max(width, m.module.size());
  absl::StrAppendFormat(&out, "  %-*s  %-11s  %14s  %12s  %s\n", static_cast<int>(width), "module",
                        "shape", "weight_scale_2", "global amax", "shard");
  for (const Nvfp4Module& m : *modules) {
    absl::StrAppendFormat(&out, "  %-*s  %-11s  %14.6g  %12.6g  %s\n", static_cast<int>(width),
                          m.module, absl::StrCat(m.rows, "x", m.cols), m.global_scale,
                          m.global_scale * kGlobalScaleDivisor,
                          checkpoint.shards()[m.codes->shard].file_name);
  }
  return out;
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
    by_part[m.module + ".weight"] = &m;
    by_part[m.module + ".weight_scale"] = &m;
    by_part[m.module + ".weight_scale_2"] = &m;
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
      } else if (t.name == it->second->module + ".weight") {
        specs.push_back({t.name, options.dtype, {it->second->rows, it->second->cols}});
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
      } else if (t.name == it->second->module + ".weight") {
        const Nvfp4Module& m = *it->second;
        const uint8_t* codes = m.codes->tensor->data;
        const uint8_t* scales = m.scales->tensor->data;
        std::vector<uint8_t> row(static_cast<size_t>(m.cols * element));
        for (int64_t r = 0; r < m.rows && s.ok(); ++r) {
          for (int64_t c = 0; c < m.cols; ++c) {
            const uint8_t byte = codes[(r * m.cols + c) / 2];
            const uint8_t code = (c % 2 == 0) ? UnpackE2M1Low(byte) : UnpackE2M1High(byte);
            const float block = DecodeE4M3(scales[(r * m.cols + c) / 16]);
            const float w = (DecodeE2M1(code) * block) * m.global_scale;
            if (options.dtype == SafetensorsDType::kF32) {
              std::memcpy(&row[static_cast<size_t>(c * 4)], &w, 4);
            } else {
              const uint16_t bits = FloatToBFloat16(w);
              std::memcpy(&row[static_cast<size_t>(c * 2)], &bits, 2);
            }
          }
          s = (*writer)->Write(t.name, row);
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
    absl::Status s = CopyPath(from, (fs::path(*temp) / name).string());
    if (!s.ok()) return fail(s);
  }
  absl::Status replaced = ReplaceWithTempDir(*temp, target);
  if (!replaced.ok()) return fail(replaced);
  return absl::OkStatus();
}

}  // namespace nvfp4cal
