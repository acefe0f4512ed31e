// The quantize pipeline on MoE expert tensors: 3-D tensors of an unknown layout are copied and
// listed, never quantized; a 3-D `.weight` [experts, out, in] is quantized expert by expert,
// byte for byte as the same experts stored as 2-D modules, with per-expert or shared Hessians.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/inspect.h"
#include "client/quantize_checkpoint.h"
#include "client/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "nvfp4cal/kernels/codecs.h"
#include "tests/client/quantize_test_util.h"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::testing::ReadAll;
using ::nvfp4cal::testing::RecordingObserver;
using ::nvfp4cal::testing::RunPipeline;
using ::nvfp4cal::testing::Scalar;
using ::nvfp4cal::testing::TempFolder;
using ::nvfp4cal::testing::WriteTinyModel;
using ::testing::HasSubstr;

// 3-D fused expert tensors ([experts, out, in], gpt-oss / Qwen-MoE style) are not quantized yet:
// they are copied unchanged, named in a note, and listed in `ignore` / `exclude_modules`, so a
// runtime never expects NVFP4 experts the checkpoint lacks. (Before: skipped silently and left
// out of the exclude lists.) The lists are checked against the output by walking it: every
// weight tensor that is not NVFP4 is listed.
TEST(QuantizeCheckpoint, ExpertTensorsOfUnknownLayoutAreListedNotQuantized) {
  TempFolder dir("moe");
  WriteTinyModel(dir / "model", 32, {"q_proj", "o_proj"});
  // Add two 3-D expert tensors to the model file.
  auto file = SafetensorsFile::Open(dir / "model/model.safetensors");
  ASSERT_TRUE(file.ok());
  std::vector<SafetensorsTensorData> tensors;
  for (const SafetensorsTensor& t : (*file)->tensors()) {
    tensors.push_back(
        {{t.name, t.dtype, t.shape}, std::vector<uint8_t>(t.data, t.data + t.num_bytes)});
  }
  file->reset();
  const std::string experts = "model.layers.0.mlp.experts.";
  tensors.push_back({{experts + "gate_up_proj", SafetensorsDType::kBF16, {4, 64, 32}},
                     std::vector<uint8_t>(4 * 64 * 32 * 2, 0x3c)});
  tensors.push_back({{experts + "down_proj.weight", SafetensorsDType::kBF16, {4, 32, 32}},
                     std::vector<uint8_t>(4 * 32 * 32 * 2, 0x3b)});
  ASSERT_TRUE(WriteSafetensorsFile(dir / "model/model.safetensors", tensors, {}).ok());
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.out_dir = dir / "out";
  options.params.method = Method::kMax;
  RecordingObserver observer;
  ASSERT_TRUE(RunPipeline(options, &observer).ok());
  bool noted = false;
  for (const std::string& m : observer.messages) {
    noted = noted ||
            m.find(experts + "gate_up_proj not quantized: 3-D expert tensor") != std::string::npos;
  }
  EXPECT_TRUE(noted);
  auto out = SafetensorsFile::Open(dir / "out/model.safetensors");
  ASSERT_TRUE(out.ok());
  const nlohmann::json config = nlohmann::json::parse(ReadAll(dir / "out/config.json"));
  const nlohmann::json hf = nlohmann::json::parse(ReadAll(dir / "out/hf_quant_config.json"));
  std::set<std::string> ignore, excluded;
  for (const auto& m : config["quantization_config"]["ignore"]) ignore.insert(m.get<std::string>());
  for (const auto& m : hf["quantization"]["exclude_modules"]) excluded.insert(m.get<std::string>());
  EXPECT_EQ(ignore, excluded);
  // Walk the output: each tensor is NVFP4 (a module with .weight_scale_2) or, when it is a
  // weight (2-D or 3-D, `.weight` or an expert tensor), listed.
  for (const SafetensorsTensor& t : (*out)->tensors()) {
    const bool weight = absl::EndsWith(t.name, ".weight") ||
                        (t.shape.size() == 3 && !absl::EndsWith(t.name, ".weight_scale"));
    if (!weight) continue;
    const std::string module =
        absl::EndsWith(t.name, ".weight") ? t.name.substr(0, t.name.size() - 7) : t.name;
    const bool nvfp4 = (*out)->Find(module + ".weight_scale_2") != nullptr;
    EXPECT_TRUE(nvfp4 || ignore.count(module) != 0) << t.name << " is neither NVFP4 nor listed";
    EXPECT_FALSE(nvfp4 && ignore.count(module) != 0) << t.name << " is NVFP4 and listed";
  }
  EXPECT_EQ(ignore.count(experts + "gate_up_proj"), 1u);
  // A 3-D `.weight` is [experts, out, in] and quantized expert by expert.
  EXPECT_EQ(ignore.count(experts + "down_proj"), 0u);
  const SafetensorsTensor* down = (*out)->Find(experts + "down_proj.weight_scale_2");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->shape, (std::vector<int64_t>{4}));
  const SafetensorsTensor* copied = (*out)->Find(experts + "gate_up_proj");
  ASSERT_NE(copied, nullptr);
  EXPECT_EQ(copied->shape, (std::vector<int64_t>{4, 64, 32}));
  EXPECT_EQ(copied->data[0], 0x3c);
}

// Deterministic pseudo-random bf16 weights, scaled per expert so that the experts' global
// scales differ.
std::vector<uint8_t> ExpertWeights(int64_t experts, int64_t rows, int64_t cols, uint32_t seed) {
  std::vector<uint8_t> bytes(static_cast<size_t>(experts * rows * cols * 2));
  uint32_t state = seed * 2654435761u + 1;
  for (int64_t i = 0; i < experts * rows * cols; ++i) {
    state = state * 1664525u + 1013904223u;
    const float unit = static_cast<float>(state >> 8) / static_cast<float>(1u << 24) - 0.5f;
    const float v = unit * static_cast<float>(1 + (i / (rows * cols)) * 3);
    const uint16_t bits = FloatToBFloat16(v);
    std::memcpy(&bytes[static_cast<size_t>(i * 2)], &bits, 2);
  }
  return bytes;
}

// A full [cols, cols] Hessian X^T X of pseudo-random activations (positive definite).
SafetensorsTensorData FullHessian(const std::string& name, int64_t cols, uint32_t seed) {
  const int64_t tokens = 2 * cols;
  std::vector<float> x(static_cast<size_t>(tokens * cols));
  uint32_t state = seed * 747796405u + 7;
  for (float& v : x) {
    state = state * 1664525u + 1013904223u;
    v = static_cast<float>(state >> 8) / static_cast<float>(1u << 24) - 0.5f;
  }
  std::vector<float> h(static_cast<size_t>(cols * cols), 0.0f);
  for (int64_t a = 0; a < cols; ++a) {
    for (int64_t b = 0; b < cols; ++b) {
      double sum = 0.0;
      for (int64_t t = 0; t < tokens; ++t) sum += double{x[t * cols + a]} * x[t * cols + b];
      h[static_cast<size_t>(a * cols + b)] = static_cast<float>(sum);
    }
  }
  SafetensorsTensorData t{{name, SafetensorsDType::kF32, {cols, cols}}, {}};
  t.bytes.resize(h.size() * 4);
  std::memcpy(t.bytes.data(), h.data(), t.bytes.size());
  return t;
}

// The same MoE layer stored two ways: fused 3-D expert tensors `experts.<leaf>.weight`
// [experts, out, in] with per-expert Hessians `experts.<leaf>.<e>.hessian`, or one 2-D module
// per expert `experts.<e>.<leaf>.weight` with `experts.<e>.<leaf>.hessian` (the same
// matrices). w1 and w3 are fused siblings in both (each expert's pair shares its global scale).
struct MoeLayer {
  static constexpr int64_t kExperts = 3;
  static constexpr int64_t kHidden = 48;
  static constexpr int64_t kInter = 32;
  static std::vector<int64_t> Shape(const std::string& leaf) {
    return leaf == "w2" ? std::vector<int64_t>{kHidden, kInter}
                        : std::vector<int64_t>{kInter, kHidden};
  }
  static uint32_t Seed(const std::string& leaf) { return leaf == "w1" ? 1 : leaf == "w2" ? 2 : 3; }
  static void Write(const std::string& dir, const std::string& hessians, bool fused) {
    const std::string prefix = "model.layers.0.mlp.experts.";
    fs::create_directories(dir);
    testing::WriteAll(dir + "/config.json", "{\"model_type\": \"mixtral\"}");
    std::vector<SafetensorsTensorData> tensors, entries;
    for (const std::string leaf : {"w1", "w2", "w3"}) {
      const std::vector<int64_t> shape = Shape(leaf);
      const std::vector<uint8_t> all = ExpertWeights(kExperts, shape[0], shape[1], Seed(leaf));
      const size_t per_expert = all.size() / kExperts;
      if (fused) {
        tensors.push_back(
            {{prefix + leaf + ".weight", SafetensorsDType::kBF16, {kExperts, shape[0], shape[1]}},
             all});
      }
      for (int64_t e = 0; e < kExperts; ++e) {
        const std::string module =
            fused ? absl::StrCat(prefix, leaf, ".", e) : absl::StrCat(prefix, e, ".", leaf);
        if (!fused) {
          tensors.push_back({{module + ".weight", SafetensorsDType::kBF16, shape},
                             std::vector<uint8_t>(all.begin() + e * per_expert,
                                                  all.begin() + (e + 1) * per_expert)});
        }
        entries.push_back(
            FullHessian(module + ".hessian", shape[1], Seed(leaf) * 10 + static_cast<uint32_t>(e)));
        entries.push_back(Scalar(module + ".input_amax", 1.5f + static_cast<float>(e)));
      }
    }
    ASSERT_TRUE(WriteSafetensorsFile(dir + "/model.safetensors", tensors, {}).ok());
    ASSERT_TRUE(WriteSafetensorsFile(hessians, entries, {}).ok());
  }
};

class MoeExperts : public ::testing::TestWithParam<Method> {};

// A 3-D expert tensor is quantized expert by expert: its codes, block scales, weight_scale_2
// and input_scale equal, byte for byte and expert by expert, those of the same experts stored
// as 2-D modules; the report has one line per expert; inspect and dequantize read it.
TEST_P(MoeExperts, FusedExpertTensorEqualsEachExpertQuantizedAsItsOwnTensor) {
  TempFolder dir("moe3d");
  MoeLayer::Write(dir / "fused", dir / "fused.hessians.safetensors", /*fused=*/true);
  MoeLayer::Write(dir / "split", dir / "split.hessians.safetensors", /*fused=*/false);
  std::map<std::string, QuantizeReport> reports;
  for (const std::string form : {"fused", "split"}) {
    QuantizeOptions options;
    options.model_dir = dir / form;
    options.hessians_path = dir / (form + ".hessians.safetensors");
    options.out_dir = dir / (form + "-out");
    options.params.method = GetParam();
    RecordingObserver observer;
    absl::StatusOr<QuantizeReport> report = RunPipeline(options, &observer);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_EQ(report->quant_algo, "NVFP4");
    EXPECT_EQ(observer.done_, observer.tensors_);  // one tick per expert
    reports[form] = *report;
  }
  // One report line per expert, named <module>.<e>.
  ASSERT_EQ(reports["fused"].modules.size(), 9u);
  EXPECT_EQ(reports["fused"].modules[0].module, "model.layers.0.mlp.experts.w1.0");
  auto fused = SafetensorsFile::Open(dir / "fused-out/model.safetensors");
  auto split = SafetensorsFile::Open(dir / "split-out/model.safetensors");
  ASSERT_TRUE(fused.ok() && split.ok());
  const std::string prefix = "model.layers.0.mlp.experts.";
  for (const std::string leaf : {"w1", "w2", "w3"}) {
    const std::vector<int64_t> shape = MoeLayer::Shape(leaf);
    for (const auto& [suffix, bytes_per_expert, dims] :
         std::vector<std::tuple<std::string, int64_t, std::vector<int64_t>>>{
             {".weight", shape[0] * shape[1] / 2, {shape[0], shape[1] / 2}},
             {".weight_scale", shape[0] * shape[1] / 16, {shape[0], shape[1] / 16}},
             {".weight_scale_2", 4, {}},
             {".input_scale", 4, {}}}) {
      const SafetensorsTensor* whole = (*fused)->Find(prefix + leaf + suffix);
      ASSERT_NE(whole, nullptr) << leaf << suffix;
      std::vector<int64_t> want = dims;
      want.insert(want.begin(), MoeLayer::kExperts);
      EXPECT_EQ(whole->shape, want) << leaf << suffix;
      ASSERT_EQ(whole->num_bytes, MoeLayer::kExperts * bytes_per_expert);
      for (int64_t e = 0; e < MoeLayer::kExperts; ++e) {
        const SafetensorsTensor* one = (*split)->Find(absl::StrCat(prefix, e, ".", leaf, suffix));
        ASSERT_NE(one, nullptr);
        EXPECT_EQ(one->shape, dims);
        EXPECT_EQ(0, std::memcmp(whole->data + e * bytes_per_expert, one->data,
                                 static_cast<size_t>(bytes_per_expert)))
            << leaf << suffix << " expert " << e;
      }
    }
    // The experts' global scales differ (the test would not see a shared one otherwise).
    const SafetensorsTensor* s2 = (*fused)->Find(prefix + leaf + ".weight_scale_2");
    EXPECT_NE(0, std::memcmp(s2->data, s2->data + 4, 4)) << leaf;
  }
  // w1 and w3 of one expert share their global scale (fused siblings).
  EXPECT_EQ(0, std::memcmp((*fused)->Find(prefix + "w1.weight_scale_2")->data,
                           (*fused)->Find(prefix + "w3.weight_scale_2")->data, 12));
  // Nothing of the layer is listed as unquantized.
  const nlohmann::json config = nlohmann::json::parse(ReadAll(dir / "fused-out/config.json"));
  EXPECT_TRUE(config["quantization_config"]["ignore"].empty());
  // inspect and dequantize read 3-D NVFP4 tensors: the dequantized experts equal the 2-D ones.
  absl::StatusOr<std::string> inspected =
      InspectCheckpoint(dir / "fused-out", InspectFormat::kJson);
  ASSERT_TRUE(inspected.ok()) << inspected.status();
  const nlohmann::json in = nlohmann::json::parse(*inspected);
  EXPECT_TRUE(in["warnings"].empty()) << *inspected;
  ASSERT_EQ(in["nvfp4_modules"].size(), 3u);
  EXPECT_EQ(in["nvfp4_modules"][0]["experts"], MoeLayer::kExperts);
  EXPECT_EQ(in["nvfp4_modules"][0]["weight_scale_2"].size(), 3u);
  for (const std::string form : {"fused", "split"}) {
    DequantizeOptions deq{dir / (form + "-out"), dir / (form + "-deq")};
    deq.dtype = SafetensorsDType::kF32;
    absl::Status s = DequantizeCheckpoint(deq);
    ASSERT_TRUE(s.ok()) << s;
  }
  auto fused_deq = SafetensorsFile::Open(dir / "fused-deq/model.safetensors");
  auto split_deq = SafetensorsFile::Open(dir / "split-deq/model.safetensors");
  ASSERT_TRUE(fused_deq.ok() && split_deq.ok());
  for (const std::string leaf : {"w1", "w2", "w3"}) {
    const SafetensorsTensor* whole = (*fused_deq)->Find(prefix + leaf + ".weight");
    ASSERT_NE(whole, nullptr);
    const int64_t per_expert = whole->num_bytes / MoeLayer::kExperts;
    for (int64_t e = 0; e < MoeLayer::kExperts; ++e) {
      const SafetensorsTensor* one =
          (*split_deq)->Find(absl::StrCat(prefix, e, ".", leaf, ".weight"));
      ASSERT_NE(one, nullptr);
      ASSERT_EQ(one->num_bytes, per_expert);
      EXPECT_EQ(
          0, std::memcmp(whole->data + e * per_expert, one->data, static_cast<size_t>(per_expert)));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, MoeExperts,
                         ::testing::Values(Method::kMax, Method::kDss, Method::kGptq),
                         [](const ::testing::TestParamInfo<Method>& param) {
                           return std::string(MethodName(param.param));
                         });

// Per-expert Hessians are looked up as "<module>.<e>"; a missing one is an error naming the
// expert (and how to share one Hessian); --expert-hessian shared uses "<module>"'s for all.
TEST(QuantizeCheckpoint, ExpertHessiansPerExpertOrShared) {
  TempFolder dir("moehess");
  MoeLayer::Write(dir / "model", dir / "unused.safetensors", /*fused=*/true);
  const std::string prefix = "model.layers.0.mlp.experts.";
  std::vector<SafetensorsTensorData> shared;
  for (const std::string leaf : {"w1", "w2", "w3"}) {
    shared.push_back(FullHessian(prefix + leaf + ".hessian", MoeLayer::Shape(leaf)[1], 5));
  }
  ASSERT_TRUE(WriteSafetensorsFile(dir / "shared.safetensors", shared, {}).ok());
  // The same matrix written per expert.
  std::vector<SafetensorsTensorData> per_expert;
  for (const SafetensorsTensorData& h : shared) {
    const std::string module = h.spec.name.substr(0, h.spec.name.size() - 8);
    for (int64_t e = 0; e < MoeLayer::kExperts; ++e) {
      per_expert.push_back(
          {{absl::StrCat(module, ".", e, ".hessian"), h.spec.dtype, h.spec.shape}, h.bytes});
    }
  }
  ASSERT_TRUE(WriteSafetensorsFile(dir / "per-expert.safetensors", per_expert, {}).ok());
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.params.method = Method::kDss;
  options.hessians_path = dir / "shared.safetensors";
  options.out_dir = dir / "missing";
  absl::StatusOr<QuantizeReport> missing = RunPipeline(options);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr(prefix + "w1.0, " + prefix + "w1.1, "));
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("--expert-hessian shared"));
  EXPECT_FALSE(fs::exists(dir / "missing"));
  options.expert_hessian = ExpertHessian::kShared;
  options.out_dir = dir / "shared-out";
  ASSERT_TRUE(RunPipeline(options).ok());
  options.expert_hessian = ExpertHessian::kPerExpert;
  options.hessians_path = dir / "per-expert.safetensors";
  options.out_dir = dir / "per-expert-out";
  ASSERT_TRUE(RunPipeline(options).ok());
  EXPECT_EQ(ReadAll(dir / "shared-out/model.safetensors"),
            ReadAll(dir / "per-expert-out/model.safetensors"));
}

}  // namespace
}  // namespace nvfp4cal
