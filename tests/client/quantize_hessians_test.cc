// The quantize pipeline's handling of the Hessians file: the sharing rule (alias, then fused
// siblings) and dangling aliases, the labels decided by the recorded activation amax (W4A4 or
// weight-only, never promising an input_scale the checkpoint lacks), FP8 KV-cache scales from
// the recorded output amax, zero-Hessian warnings and the fallback method.
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "client/hessian_accumulator.h"
#include "client/inspect.h"
#include "client/quantize_checkpoint.h"
#include "client/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/client/quantize_test_util.h"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::testing::IdentityBlocks;
using ::nvfp4cal::testing::ReadAll;
using ::nvfp4cal::testing::RecordingObserver;
using ::nvfp4cal::testing::RunPipeline;
using ::nvfp4cal::testing::Scalar;
using ::nvfp4cal::testing::TempFolder;
using ::nvfp4cal::testing::WriteTinyModel;
using ::testing::HasSubstr;
using ::testing::Not;

TEST(QuantizeCheckpoint, HessianSharingRuleAliasThenSiblings) {
  TempFolder dir("sharing");
  WriteTinyModel(dir / "model", 32, {"q_proj", "k_proj", "v_proj", "o_proj"});
  const std::string p = "model.layers.0.self_attn.";
  // q has its own entry; k and v fall back to q's; o is aliased to a differently named entry.
  ASSERT_TRUE(WriteSafetensorsFile(dir / "h.safetensors",
                                   {IdentityBlocks(p + "q_proj.hessian", 32),
                                    IdentityBlocks("attn_output_input", 32, 2.0f)},
                                   {{p + "o_proj.hessian", "attn_output_input"}})
                  .ok());
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "h.safetensors";
  options.out_dir = dir / "out";
  absl::StatusOr<QuantizeReport> report = RunPipeline(options);
  ASSERT_TRUE(report.ok()) << report.status();
  std::map<std::string, std::string> used;
  for (const ModuleReport& m : report->modules) used[m.module] = m.hessian_entry;
  EXPECT_EQ(used[p + "q_proj"], p + "q_proj.hessian");
  EXPECT_EQ(used[p + "k_proj"], p + "q_proj.hessian");
  EXPECT_EQ(used[p + "v_proj"], p + "q_proj.hessian");
  EXPECT_EQ(used[p + "o_proj"], "attn_output_input");
}

// An alias names the entry a module uses; when that entry is missing the run must stop (naming
// the alias and the entry), not fall through to a sibling's Hessian.
TEST(QuantizeCheckpoint, DanglingHessianAliasIsAnErrorNamingAliasAndEntry) {
  TempFolder dir("dangling");
  WriteTinyModel(dir / "model", 32, {"q_proj", "k_proj", "o_proj"});
  const std::string p = "model.layers.0.self_attn.";
  const std::vector<SafetensorsTensorData> entries = {IdentityBlocks(p + "q_proj.hessian", 32),
                                                      IdentityBlocks(p + "o_proj.hessian", 32)};
  struct Case {
    std::map<std::string, std::string> metadata;
    std::string message;
  };
  const std::vector<Case> cases = {
      // k would silently get q's Hessian through the sibling rule.
      {{{p + "k_proj.hessian", "attn_k_input"}},
       "__metadata__ alias '" + p + "k_proj.hessian' (for " + p +
           "k_proj) names entry 'attn_k_input', which the file does not hold"},
      // Aliases do not chain: the value must be an entry.
      {{{p + "k_proj.hessian", "shared"}, {"shared", p + "q_proj.hessian"}},
       "__metadata__ alias '" + p + "k_proj.hessian' (for " + p +
           "k_proj) names entry 'shared', which the file does not hold"},
      // o has its own entry, but its alias says otherwise: the file contradicts itself.
      {{{p + "o_proj.hessian", "attn_o_input"}},
       "__metadata__ alias '" + p + "o_proj.hessian' (for " + p +
           "o_proj) names entry 'attn_o_input', which the file does not hold"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string hessians = dir / ("h" + std::to_string(i) + ".safetensors");
    ASSERT_TRUE(WriteSafetensorsFile(hessians, entries, cases[i].metadata).ok());
    QuantizeOptions options;
    options.model_dir = dir / "model";
    options.hessians_path = hessians;
    options.out_dir = dir / "out";
    absl::StatusOr<QuantizeReport> report = RunPipeline(options);
    ASSERT_FALSE(report.ok()) << "case " << i;
    EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(report.status().message()),
                HasSubstr(hessians + ": " + cases[i].message));
    EXPECT_FALSE(fs::exists(dir / "out"));
  }
}

// The label never promises tensors the checkpoint lacks (runtimes that read NVFP4 allocate an
// input_scale per module and do not complain when it is missing). Every quantized module has
// its activation amax: W4A4 NVFP4 with every input_scale. None has: W4A16_NVFP4, none written.
// Some have: an error naming the others, unless --activations none. (Before: NVFP4 with an
// input_activations group whatever the tensors.)
class Labels : public ::testing::Test {
 protected:
  void SetUp() override {
    WriteTinyModel(dir_ / "model", 32, {"q_proj", "k_proj", "o_proj"});
    // q's entry carries the amax of the attention input (k shares it); o's entry may.
    const std::vector<SafetensorsTensorData> partial = {IdentityBlocks(p_ + "q_proj.hessian", 32),
                                                        Scalar(p_ + "q_proj.input_amax", 13.5f),
                                                        IdentityBlocks(p_ + "o_proj.hessian", 32)};
    std::vector<SafetensorsTensorData> full = partial;
    full.push_back(Scalar(p_ + "o_proj.input_amax", 7.0f));
    ASSERT_TRUE(WriteSafetensorsFile(dir_ / "partial.safetensors", partial, {}).ok());
    ASSERT_TRUE(WriteSafetensorsFile(dir_ / "full.safetensors", full, {}).ok());
    ASSERT_TRUE(WriteSafetensorsFile(dir_ / "none.safetensors",
                                     {IdentityBlocks(p_ + "q_proj.hessian", 32),
                                      IdentityBlocks(p_ + "o_proj.hessian", 32)},
                                     {})
                    .ok());
  }

  absl::StatusOr<QuantizeReport> Run(const std::string& hessians, ActivationMode mode,
                                     const std::string& out,
                                     RecordingObserver* observer = nullptr) {
    QuantizeOptions options;
    options.model_dir = dir_ / "model";
    options.hessians_path = dir_ / hessians;
    options.out_dir = dir_ / out;
    options.activations = mode;
    return RunPipeline(options, observer);
  }

  // config.json's quantization_config and hf_quant_config.json's quant_algo (checked equal).
  std::pair<nlohmann::json, std::string> LabelsOf(const std::string& out) {
    const nlohmann::json config = nlohmann::json::parse(ReadAll(dir_ / out + "/config.json"));
    const nlohmann::json hf = nlohmann::json::parse(ReadAll(dir_ / out + "/hf_quant_config.json"));
    EXPECT_EQ(config["quantization_config"]["quant_algo"], hf["quantization"]["quant_algo"]);
    return std::make_pair(config["quantization_config"],
                          hf["quantization"]["quant_algo"].get<std::string>());
  }

  std::map<std::string, float> InputScales(const std::string& out) {
    auto file = SafetensorsFile::Open(dir_ / out + "/model.safetensors");
    EXPECT_TRUE(file.ok()) << file.status();
    std::map<std::string, float> scales;
    for (const char* leaf : {"q_proj", "k_proj", "o_proj"}) {
      const SafetensorsTensor* t = (*file)->Find(p_ + leaf + ".input_scale");
      if (t == nullptr) continue;
      EXPECT_TRUE(t->shape.empty()) << leaf;
      float v = 0.0f;
      std::memcpy(&v, t->data, 4);
      scales[leaf] = v;
    }
    return scales;
  }

  TempFolder dir_{"labels"};
  const std::string p_ = "model.layers.0.self_attn.";
};

TEST_F(Labels, EveryAmaxGivesW4A4WithEveryInputScale) {
  ASSERT_TRUE(Run("full.safetensors", ActivationMode::kAuto, "w4a4").ok());
  auto [w4a4_config, w4a4_algo] = LabelsOf("w4a4");
  EXPECT_EQ(w4a4_algo, "NVFP4");
  EXPECT_TRUE(w4a4_config["config_groups"]["group_0"].contains("input_activations"));
  const std::map<std::string, float> want = {
      {"q_proj", 13.5f / 2688.0f}, {"k_proj", 13.5f / 2688.0f}, {"o_proj", 7.0f / 2688.0f}};
  EXPECT_EQ(InputScales("w4a4"), want);  // NUMERICS §5: amax / (6 * 448)
}

TEST_F(Labels, NoAmaxGivesWeightOnlyWithANote) {
  RecordingObserver observer;
  ASSERT_TRUE(Run("none.safetensors", ActivationMode::kAuto, "w4a16", &observer).ok());
  auto [w4a16_config, w4a16_algo] = LabelsOf("w4a16");
  EXPECT_EQ(w4a16_algo, "W4A16_NVFP4");
  EXPECT_FALSE(w4a16_config["config_groups"]["group_0"].contains("input_activations"));
  EXPECT_TRUE(InputScales("w4a16").empty());
  bool noted = false;
  for (const std::string& m : observer.messages) {
    noted = noted || m.find("weight-only output (W4A16_NVFP4)") != std::string::npos;
  }
  EXPECT_TRUE(noted);
}

TEST_F(Labels, SomeAmaxIsAnErrorUnlessWeightOnlyIsAsked) {
  // Some have: an error naming the module without, nothing written.
  absl::StatusOr<QuantizeReport> mixed = Run("partial.safetensors", ActivationMode::kAuto, "mixed");
  ASSERT_FALSE(mixed.ok());
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(mixed.status().message()),
              HasSubstr("of 2 of 3 quantized modules, not of " + p_ + "o_proj"));
  EXPECT_THAT(std::string(mixed.status().message()), HasSubstr("--activations none"));
  EXPECT_FALSE(fs::exists(dir_ / "mixed"));

  // ... unless the user asks for weight-only.
  ASSERT_TRUE(Run("partial.safetensors", ActivationMode::kNone, "asked_none").ok());
  EXPECT_EQ(LabelsOf("asked_none").second, "W4A16_NVFP4");
  EXPECT_TRUE(InputScales("asked_none").empty());
  ASSERT_TRUE(Run("full.safetensors", ActivationMode::kNone, "full_none").ok());
  EXPECT_TRUE(InputScales("full_none").empty());

  // Asking for W4A4 without every amax is an error naming the missing.
  absl::StatusOr<QuantizeReport> asked = Run("none.safetensors", ActivationMode::kNvfp4, "asked");
  ASSERT_FALSE(asked.ok());
  EXPECT_THAT(std::string(asked.status().message()),
              HasSubstr("--activations nvfp4 needs the activation amax"));
  EXPECT_THAT(std::string(asked.status().message()), HasSubstr("3 of 3 have none: "));
  EXPECT_FALSE(fs::exists(dir_ / "asked"));
}

TEST_F(Labels, InspectReadsTheLabelsAgainstTheTensors) {
  ASSERT_TRUE(Run("full.safetensors", ActivationMode::kAuto, "w4a4").ok());
  ASSERT_TRUE(Run("none.safetensors", ActivationMode::kAuto, "w4a16").ok());
  absl::StatusOr<std::string> inspected = InspectCheckpoint(dir_ / "w4a4");
  ASSERT_TRUE(inspected.ok());
  EXPECT_THAT(*inspected, HasSubstr("input_scale: 3 of 3 NVFP4 modules"));
  EXPECT_THAT(*inspected, Not(HasSubstr("warning")));
  // A planted fault: a W4A4 label on the weight-only output.
  std::string config_text = ReadAll(dir_ / "w4a16/config.json");
  config_text.replace(config_text.find("W4A16_NVFP4"), 11, "NVFP4");
  testing::WriteAll(dir_ / "w4a16/config.json", config_text);
  inspected = InspectCheckpoint(dir_ / "w4a16");
  ASSERT_TRUE(inspected.ok());
  EXPECT_THAT(*inspected, HasSubstr("warning: config.json says quant_algo NVFP4 but "
                                    "hf_quant_config.json says W4A16_NVFP4"));
  EXPECT_THAT(*inspected, HasSubstr("warning: quant_algo NVFP4 (W4A4) promises an input_scale for "
                                    "every quantized module; 3 have none"));
  absl::StatusOr<std::string> as_json = InspectCheckpoint(dir_ / "w4a16", InspectFormat::kJson);
  ASSERT_TRUE(as_json.ok());
  const nlohmann::json j = nlohmann::json::parse(*as_json);
  EXPECT_EQ(j["label"]["config_quant_algo"], "NVFP4");
  EXPECT_EQ(j["label"]["hf_quant_algo"], "W4A16_NVFP4");
  EXPECT_EQ(j["nvfp4_modules"].size(), 3u);
  EXPECT_TRUE(j["nvfp4_modules"][0]["input_scale"].is_null());
  EXPECT_EQ(j["input_scales"], 0);
  ASSERT_EQ(j["warnings"].size(), 2u);
  EXPECT_THAT(j["warnings"][1].get<std::string>(), HasSubstr("3 have none"));
  as_json = InspectCheckpoint(dir_ / "w4a4", InspectFormat::kJson);
  ASSERT_TRUE(as_json.ok());
  const nlohmann::json w4a4 = nlohmann::json::parse(*as_json);
  EXPECT_EQ(w4a4["input_scales"], 3);
  EXPECT_TRUE(w4a4["warnings"].empty());
  EXPECT_EQ(w4a4["nvfp4_modules"][0]["input_scale"], 13.5f / 2688.0f);
}

TEST_F(Labels, MalformedAmaxIsAnErrorBeforeAnythingIsWritten) {
  ASSERT_TRUE(
      WriteSafetensorsFile(
          dir_ / "bad.safetensors",
          {IdentityBlocks(p_ + "q_proj.hessian", 32), Scalar(p_ + "q_proj.input_amax", -1.0f)}, {})
          .ok());
  absl::StatusOr<QuantizeReport> bad = Run("bad.safetensors", ActivationMode::kAuto, "out_bad");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr(p_ + "q_proj.input_amax = -1"));
  EXPECT_FALSE(fs::exists(dir_ / "out_bad"));
}

// --kv-cache fp8 writes ModelOpt's FP8 KV-cache scales: k_proj.k_scale and v_proj.v_scale =
// the module's output amax / 448 (F32 scalars, beside the module's weight), and labels
// kv_cache_quant_algo FP8 in both configs; without every amax it is an error naming the missing
// module and nothing is written. Without the option nothing of it appears.
TEST(QuantizeCheckpoint, FpEightKvCacheScalesFromRecordedOutputAmax) {
  TempFolder dir("kv_cache");
  WriteTinyModel(dir / "model", 32, {"q_proj", "k_proj", "v_proj", "o_proj"});
  const std::string p = "model.layers.0.self_attn.";
  // Written the way a C++ calibration would: accumulators plus the outputs' amax.
  HessianAccumulator attention(32);
  HessianAccumulator o_input(32);
  std::vector<float> x(4 * 32);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) - 3.0f;
  ASSERT_TRUE(attention.AddBatch(x.data(), 4).ok());
  ASSERT_TRUE(o_input.AddBatch(x.data(), 4).ok());
  const std::vector<NamedHessian> hessians = {{p + "q_proj.hessian", &attention},
                                              {p + "o_proj.hessian", &o_input}};
  ASSERT_TRUE(WriteHessiansFile(dir / "h.safetensors", hessians, true, {},
                                {{p + "k_proj", 44.8f}, {p + "v_proj", 3.5f}})
                  .ok());
  ASSERT_TRUE(
      WriteHessiansFile(dir / "no_v.safetensors", hessians, true, {}, {{p + "k_proj", 44.8f}})
          .ok());
  EXPECT_THAT(std::string(WriteHessiansFile(dir / "bad.safetensors", hessians, true, {},
                                            {{p + "k_proj", -1.0f}})
                              .message()),
              HasSubstr("output amax of '" + p + "k_proj' = -1 must be finite and >= 0"));

  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "h.safetensors";
  options.out_dir = dir / "fp8";
  options.kv_cache = KvCacheMode::kFp8;
  absl::StatusOr<QuantizeReport> report = RunPipeline(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->kv_cache_scales, 2);
  EXPECT_EQ(report->quant_algo, "NVFP4");  // the accumulators recorded every input's amax
  auto out = SafetensorsFile::Open(dir / "fp8/model.safetensors");
  ASSERT_TRUE(out.ok()) << out.status();
  for (const auto& [tensor, want] : std::vector<std::pair<std::string, float>>{
           {p + "k_proj.k_scale", 44.8f / 448.0f}, {p + "v_proj.v_scale", 3.5f / 448.0f}}) {
    const SafetensorsTensor* t = (*out)->Find(tensor);
    ASSERT_NE(t, nullptr) << tensor;
    EXPECT_EQ(t->dtype, SafetensorsDType::kF32);
    EXPECT_TRUE(t->shape.empty());
    float v = 0.0f;
    std::memcpy(&v, t->data, 4);
    EXPECT_EQ(v, want) << tensor;
  }
  EXPECT_EQ((*out)->Find(p + "q_proj.k_scale"), nullptr);
  const nlohmann::json hf = nlohmann::json::parse(ReadAll(dir / "fp8/hf_quant_config.json"));
  EXPECT_EQ(hf["quantization"]["kv_cache_quant_algo"], "FP8");
  const nlohmann::json q =
      nlohmann::json::parse(ReadAll(dir / "fp8/config.json"))["quantization_config"];
  EXPECT_EQ(q["kv_cache_quant_algo"], "FP8");
  const nlohmann::json scheme = {{"dynamic", false}, {"num_bits", 8}, {"type", "float"}};
  EXPECT_EQ(q["kv_cache_scheme"], scheme);
  absl::StatusOr<std::string> inspected = InspectCheckpoint(dir / "fp8");
  ASSERT_TRUE(inspected.ok());
  EXPECT_THAT(*inspected, HasSubstr("kv cache: FP8, 2 of 2 k_proj / v_proj with k_scale"));
  EXPECT_THAT(*inspected, Not(HasSubstr("warning")));

  // A missing amax: an error naming the module, nothing written.
  options.hessians_path = dir / "no_v.safetensors";
  options.out_dir = dir / "no_v";
  absl::StatusOr<QuantizeReport> missing = RunPipeline(options);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("--kv-cache fp8 needs the output amax (`<module>.output_amax` in the "
                        "Hessians file) of every k_proj and v_proj; missing for " +
                        p + "v_proj."));
  EXPECT_FALSE(fs::exists(dir / "no_v"));

  // Not asked: no scales, no label, even with the amax recorded.
  options.hessians_path = dir / "h.safetensors";
  options.out_dir = dir / "none";
  options.kv_cache = KvCacheMode::kNone;
  ASSERT_TRUE(RunPipeline(options).ok());
  auto plain = SafetensorsFile::Open(dir / "none/model.safetensors");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->Find(p + "k_proj.k_scale"), nullptr);
  EXPECT_TRUE(nlohmann::json::parse(
                  ReadAll(dir / "none/hf_quant_config.json"))["quantization"]["kv_cache_quant_algo"]
                  .is_null());
}

TEST(QuantizeCheckpoint, WarnsOncePerTensorAboutAllZeroHessianBlocks) {
  TempFolder dir("zero");
  WriteTinyModel(dir / "model", 64, {"q_proj", "o_proj"});
  const std::string p = "model.layers.0.self_attn.";
  SafetensorsTensorData zeros = IdentityBlocks(p + "q_proj.hessian", 64, 0.0f);
  ASSERT_TRUE(WriteSafetensorsFile(dir / "h.safetensors",
                                   {zeros, IdentityBlocks(p + "o_proj.hessian", 64)}, {})
                  .ok());
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "h.safetensors";
  options.out_dir = dir / "out";
  RecordingObserver observer;
  ASSERT_TRUE(RunPipeline(options, &observer).ok());
  int warnings = 0;
  for (const std::string& m : observer.messages) {
    if (m.find("all-zero Hessian") == std::string::npos) continue;
    ++warnings;
    EXPECT_THAT(m, HasSubstr(p + "q_proj: 128 of 128 blocks"));
  }
  EXPECT_EQ(warnings, 1);
}

TEST(QuantizeCheckpoint, FallbackMethodCoversModulesWithoutHessian) {
  TempFolder dir("fallback");
  WriteTinyModel(dir / "model", 32, {"q_proj", "o_proj"});
  const std::string p = "model.layers.0.self_attn.";
  ASSERT_TRUE(
      WriteSafetensorsFile(dir / "h.safetensors", {IdentityBlocks(p + "q_proj.hessian", 32)}, {})
          .ok());
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "h.safetensors";
  options.out_dir = dir / "out";
  options.fallback_method = Method::kMse;
  RecordingObserver observer;
  absl::StatusOr<QuantizeReport> report = RunPipeline(options, &observer);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->modules.size(), 2u);
  EXPECT_EQ(report->modules[0].module, p + "o_proj");
  EXPECT_EQ(report->modules[0].stats.method, Method::kMse);
  EXPECT_EQ(report->modules[1].stats.method, Method::kDss);
  EXPECT_THAT(observer.messages, ::testing::Contains(HasSubstr(p + "o_proj has no Hessian")));
}

}  // namespace
}  // namespace nvfp4cal
