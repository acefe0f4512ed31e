// The labels and layouts of QuantizeCheckpoint's outputs (quantize_checkpoint.h): the values
// of --activations, --kv-cache, --expert-hessian and --format, the tensor names and scale
// conventions of each layout, and the JSON files that label a checkpoint (config.json's
// quantization_config, hf_quant_config.json, the producer record).
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/quantize_checkpoint.h"
#include "nlohmann/json.hpp"

#ifndef NVFP4CAL_VERSION
#define NVFP4CAL_VERSION "0.0.0"
#endif

namespace nvfp4cal {
namespace {

using OrderedJson = nlohmann::ordered_json;

OrderedJson QuantArgs() {
  OrderedJson args = OrderedJson::object();
  args["num_bits"] = 4;
  args["type"] = "float";
  args["group_size"] = 16;
  args["dynamic"] = false;
  return args;
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

}  // namespace nvfp4cal
