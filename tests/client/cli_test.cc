// The nvfp4cal binary: exit codes and the message of each bad input (docs/cli.md's error
// table), that a failed run leaves neither --out nor a temporary folder, --overwrite, and the
// example -> quantize -> inspect -> dequantize path a user runs first.
#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "client/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::testing::ProcessResult;
using ::nvfp4cal::testing::ReadAll;
using ::nvfp4cal::testing::RunCli;
using ::nvfp4cal::testing::TempFolder;
using ::nvfp4cal::testing::WriteAll;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kQ[] = "model.layers.0.self_attn.q_proj";
constexpr char kO[] = "model.layers.0.self_attn.o_proj";

std::vector<uint8_t> Bf16Bytes(int64_t n, float scale, float special = 0.0f,
                               int64_t special_at = -1) {
  std::vector<uint8_t> bytes(static_cast<size_t>(n * 2));
  for (int64_t i = 0; i < n; ++i) {
    float v = scale * static_cast<float>(static_cast<int>((i * 29 + 3) % 31) - 15) / 16.0f;
    if (i == special_at) v = special;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const uint16_t h = static_cast<uint16_t>(bits >> 16);
    std::memcpy(&bytes[static_cast<size_t>(i * 2)], &h, 2);
  }
  return bytes;
}

std::vector<uint8_t> F32Bytes(const std::vector<float>& values) {
  std::vector<uint8_t> bytes(values.size() * 4);
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

// Full [n, n] Hessian: identity plus a small symmetric coupling.
std::vector<float> FullHessian(int64_t n) {
  std::vector<float> h(static_cast<size_t>(n * n), 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    h[static_cast<size_t>(i * n + i)] = 2.0f;
    if (i + 1 < n) {
      h[static_cast<size_t>(i * n + i + 1)] = 0.5f;
      h[static_cast<size_t>((i + 1) * n + i)] = 0.5f;
    }
  }
  return h;
}

// A one-layer model folder: q_proj and o_proj [32, 64] bf16 plus a norm, and a Hessians file
// with a full [64, 64] entry for each.
class BadInputs : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = dir_ / "model";
    hessians_ = dir_ / "hessians.safetensors";
    out_ = dir_ / "out";
    fs::create_directories(model_);
    WriteAll(model_ + "/config.json", "{\"model_type\": \"llama\"}");
    WriteModel({});
    WriteHessians({{std::string(kQ) + ".hessian", SafetensorsDType::kF32, {64, 64}},
                   {std::string(kO) + ".hessian", SafetensorsDType::kF32, {64, 64}}},
                  {F32Bytes(FullHessian(64)), F32Bytes(FullHessian(64))});
  }

  void WriteModel(std::vector<SafetensorsTensorData> extra) {
    std::vector<SafetensorsTensorData> tensors = {
        {{std::string(kQ) + ".weight", SafetensorsDType::kBF16, {32, 64}},
         Bf16Bytes(32 * 64, 0.5f)},
        {{std::string(kO) + ".weight", SafetensorsDType::kBF16, {32, 64}},
         Bf16Bytes(32 * 64, 0.25f)},
        {{"model.norm.weight", SafetensorsDType::kBF16, {64}}, Bf16Bytes(64, 1.0f)}};
    for (auto& t : extra) {
      bool replaced = false;
      for (auto& existing : tensors) {
        if (existing.spec.name == t.spec.name) {
          existing = t;
          replaced = true;
        }
      }
      if (!replaced) tensors.push_back(t);
    }
    ASSERT_TRUE(WriteSafetensorsFile(model_ + "/model.safetensors", tensors, {}).ok());
  }

  void WriteHessians(const std::vector<SafetensorsTensorSpec>& specs,
                     const std::vector<std::vector<uint8_t>>& data) {
    std::vector<SafetensorsTensorData> tensors;
    for (size_t i = 0; i < specs.size(); ++i) tensors.push_back({specs[i], data[i]});
    ASSERT_TRUE(WriteSafetensorsFile(hessians_, tensors, {}).ok());
  }

  ProcessResult Quantize(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"quantize", "--model", model_, "--hessians",
                                     hessians_,  "--out",   out_};
    args.insert(args.end(), extra.begin(), extra.end());
    return RunCli(args);
  }

  // A failed run: exit 1, the message on stderr, no --out and no temporary folder left.
  void ExpectFailure(const ProcessResult& r, const std::string& message) {
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_THAT(r.err, HasSubstr(message));
    EXPECT_FALSE(fs::exists(out_));
    EXPECT_THAT(testing::LeftoverTempFolders(out_), IsEmpty());
  }

  TempFolder dir_{"cli"};
  std::string model_, hessians_, out_;
};

TEST_F(BadInputs, BaselineSucceeds) {
  const ProcessResult r = Quantize();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("quantized 2 modules"));
  EXPECT_THAT(r.out, HasSubstr(kQ));
  EXPECT_TRUE(fs::exists(out_ + "/model.safetensors"));
  // Not a terminal: no progress bar.
  EXPECT_THAT(r.err, ::testing::Not(HasSubstr("tensors  ")));
}

// --stats-json: the statistics as JSON, totals the sums of the modules, the label written; a
// path inside an input or --out is a usage error before anything runs.
TEST_F(BadInputs, StatsJsonHoldsEveryModuleAndTheTotals) {
  const std::string stats = dir_ / "stats.json";
  const ProcessResult r = Quantize({"--stats-json", stats, "--quiet"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(ReadAll(stats));
  ASSERT_EQ(j["modules"].size(), 2u);
  double before = 0.0;
  int64_t blocks = 0;
  for (const auto& m : j["modules"]) {
    EXPECT_EQ(m["method"], "dss");
    EXPECT_EQ(m["blocks"], m["rows"].get<int64_t>() * m["cols"].get<int64_t>() / 16);
    EXPECT_LE(m["objective_after"].get<double>(), m["objective_before"].get<double>());
    before += m["objective_before"].get<double>();
    blocks += m["blocks"].get<int64_t>();
  }
  EXPECT_EQ(j["totals"]["blocks"], blocks);
  EXPECT_DOUBLE_EQ(j["totals"]["objective_before"].get<double>(), before);
  const nlohmann::json hf = nlohmann::json::parse(ReadAll(out_ + "/hf_quant_config.json"));
  EXPECT_EQ(j["label"]["quant_algo"], hf["quantization"]["quant_algo"]);
  EXPECT_GE(j["seconds"]["quantize"].get<double>(), 0.0);
  // The example's Hessians were read and checked: a time above zero, within the run's.
  EXPECT_GT(j["seconds"]["hessian_read"].get<double>(), 0.0);
  EXPECT_LT(j["seconds"]["hessian_read"].get<double>(), j["seconds"]["total"].get<double>());
  for (const auto& entry : fs::directory_iterator(std::string(dir_ / ""))) {
    EXPECT_EQ(entry.path().filename().string().find("stats.json.nvfp4cal-tmp"), std::string::npos)
        << entry.path() << " left behind";
  }

  fs::remove_all(out_);
  const ProcessResult bad = Quantize({"--stats-json", model_ + "/stats.json"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err,
              HasSubstr("--stats-json " + model_ + "/stats.json is or lies inside --model"));
  EXPECT_FALSE(fs::exists(out_));
  EXPECT_FALSE(fs::exists(model_ + "/stats.json"));
}

// --trace: every quantized tensor from its scan to its result (an async pair), its read, scan,
// wait for a worker, quantization and write, the backend's start, each shard's fsync, the index
// and the rename, in Chrome's trace-event JSON; also written after a failure;
// a path inside an input or --out is a usage error.
TEST_F(BadInputs, TraceHoldsEveryStageOfEveryTensor) {
  const std::string trace = dir_ / "trace.json";
  const ProcessResult r = Quantize({"--trace", trace, "--quiet"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(ReadAll(trace));
  std::map<std::string, int> spans;  // "phase name"
  for (const auto& e : j["traceEvents"]) {
    const std::string phase = e["ph"];
    if (phase == "M") continue;
    spans[phase + " " + e["name"].get<std::string>()]++;
    EXPECT_GE(e["ts"].get<int64_t>(), 0) << e;
    if (phase == "X") {
      EXPECT_GE(e["dur"].get<int64_t>(), 0) << e;
    }
  }
  for (const char* module : {kQ, kO}) {
    const std::string weight = std::string(module) + ".weight";
    EXPECT_EQ(spans["b " + weight], 1) << weight;
    EXPECT_EQ(spans["e " + weight], 1) << weight;
    EXPECT_EQ(spans["X write " + weight], 1) << weight;
    EXPECT_EQ(spans["X read " + std::string(module)], 1) << module;
    EXPECT_EQ(spans["X scan " + std::string(module)], 1) << module;
    EXPECT_EQ(spans["X wait for " + weight], 1) << weight;
    EXPECT_EQ(spans["X quantize " + weight], 1) << weight;
  }
  EXPECT_EQ(spans["X fsync shard 1"], 1);
  EXPECT_EQ(spans["X open and plan"], 1);
  EXPECT_EQ(spans["X start the in-process backend"], 1);
  EXPECT_EQ(spans["X index and configs"], 1);
  EXPECT_EQ(spans["X rename to --out"], 1);

  // After a failure (a Hessian the run finds non-finite) the trace still holds what ran.
  fs::remove_all(out_);
  fs::remove(trace);
  std::vector<float> h = FullHessian(64);
  h[7] = std::numeric_limits<float>::quiet_NaN();
  WriteHessians({{std::string(kQ) + ".hessian", SafetensorsDType::kF32, {64, 64}},
                 {std::string(kO) + ".hessian", SafetensorsDType::kF32, {64, 64}}},
                {F32Bytes(FullHessian(64)), F32Bytes(h)});
  const ProcessResult failed = Quantize({"--trace", trace, "--method", "gptq", "--device", "cpu"});
  EXPECT_EQ(failed.exit_code, 1) << failed.err;
  EXPECT_THAT(ReadAll(trace), HasSubstr("\"open and plan\""));

  const ProcessResult bad = Quantize({"--trace", out_ + "/t.json"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err, HasSubstr("--trace " + out_ + "/t.json is or lies inside --out"));
  EXPECT_FALSE(fs::exists(out_));
  // Refused before the run, not after it: a folder that does not exist, one file for both.
  const std::string nowhere = dir_ / "no-such-folder/f.json";
  for (const char* flag : {"--trace", "--stats-json"}) {
    const ProcessResult missing = Quantize({flag, nowhere});
    EXPECT_EQ(missing.exit_code, 2) << flag;
    EXPECT_THAT(missing.err, HasSubstr(std::string(flag) + " " + nowhere + ": its folder " +
                                       (dir_ / "no-such-folder") + " does not exist"));
    EXPECT_FALSE(fs::exists(out_)) << flag;
  }
  const ProcessResult same =
      Quantize({"--trace", dir_ / "both.json", "--stats-json", dir_ / "./both.json"});
  EXPECT_EQ(same.exit_code, 2);
  EXPECT_THAT(same.err, HasSubstr("--stats-json and --trace name the same file"));
  EXPECT_FALSE(fs::exists(out_));
  EXPECT_FALSE(fs::exists(dir_ / "both.json"));
}

TEST_F(BadInputs, MissingModelFolder) {
  model_ = dir_ / "nope";
  ExpectFailure(Quantize(), "--model " + model_ + ": no such folder");
}

TEST_F(BadInputs, MissingConfig) {
  fs::remove(model_ + "/config.json");
  ExpectFailure(Quantize(), "no config.json");
}

TEST_F(BadInputs, MissingWeights) {
  fs::remove(model_ + "/model.safetensors");
  ExpectFailure(Quantize(), "no model.safetensors or model.safetensors.index.json");
}

TEST_F(BadInputs, MissingHessiansFile) {
  hessians_ = dir_ / "nope.safetensors";
  ExpectFailure(Quantize(), "--hessians: " + hessians_ + ": cannot open");
}

TEST_F(BadInputs, CorruptedHeader) {
  std::string bytes = ReadAll(model_ + "/model.safetensors");
  bytes[9] = '#';  // inside the JSON
  WriteAll(model_ + "/model.safetensors", bytes);
  ExpectFailure(Quantize(), model_ + "/model.safetensors: header is not valid JSON");
}

TEST_F(BadInputs, TruncatedData) {
  std::string bytes = ReadAll(model_ + "/model.safetensors");
  bytes.resize(bytes.size() - 100);
  WriteAll(model_ + "/model.safetensors", bytes);
  const ProcessResult r = Quantize();
  ExpectFailure(r, model_ + "/model.safetensors: tensor '");
  EXPECT_THAT(r.err, HasSubstr("end past the data buffer"));
}

TEST_F(BadInputs, WrongHessianDtype) {
  WriteHessians({{std::string(kQ) + ".hessian", SafetensorsDType::kBF16, {64, 64}},
                 {std::string(kO) + ".hessian", SafetensorsDType::kF32, {64, 64}}},
                {Bf16Bytes(64 * 64, 1.0f), F32Bytes(FullHessian(64))});
  ExpectFailure(Quantize(), "Hessian '" + std::string(kQ) + ".hessian' (for " + kQ +
                                "): dtype BF16, expected F32");
}

TEST_F(BadInputs, WrongWeightDtype) {
  WriteModel({{{std::string(kO) + ".weight", SafetensorsDType::kI32, {32, 64}},
               std::vector<uint8_t>(32 * 64 * 4, 0)}});
  ExpectFailure(Quantize(), "tensor '" + std::string(kO) +
                                ".weight' has dtype I32 (expected BF16, F16 or F32)");
}

TEST_F(BadInputs, HessianShapeMismatch) {
  WriteHessians({{std::string(kQ) + ".hessian", SafetensorsDType::kF32, {48, 48}},
                 {std::string(kO) + ".hessian", SafetensorsDType::kF32, {64, 64}}},
                {F32Bytes(FullHessian(48)), F32Bytes(FullHessian(64))});
  ExpectFailure(Quantize(),
                "shape [48, 48] does not match in = 64 (expected [64, 64] or "
                "[4, 16, 16])");
}

TEST_F(BadInputs, GptqRefusesBlockHessiansNamingTheModule) {
  std::vector<float> blocks(4 * 16 * 16, 0.0f);
  for (int b = 0; b < 4; ++b) {
    for (int i = 0; i < 16; ++i) blocks[static_cast<size_t>(b * 256 + i * 17)] = 1.0f;
  }
  WriteHessians({{std::string(kQ) + ".hessian", SafetensorsDType::kF32, {4, 16, 16}},
                 {std::string(kO) + ".hessian", SafetensorsDType::kF32, {64, 64}}},
                {F32Bytes(blocks), F32Bytes(FullHessian(64))});
  // The block layout is fine for the block methods...
  EXPECT_EQ(Quantize({"--method", "local_hessian"}).exit_code, 0);
  fs::remove_all(out_);
  // ...but gptq needs the whole matrix.
  ExpectFailure(Quantize({"--method", "gptq"}),
                std::string("(for ") + kQ +
                    "): method gptq needs the full [64, 64] Hessian, but this entry holds only "
                    "the diagonal blocks [4, 16, 16]");
}

// The in-process backend starts beside the reading: a start that fails still fails the run
// and leaves nothing behind.
TEST_F(BadInputs, DeviceCudaWithoutAUsableGpuFailsTheRunLeavingNothing) {
  const ProcessResult r = Quantize({"--device", "cuda"});
  if (r.exit_code == 0) GTEST_SKIP() << "a GPU is usable here";
  ExpectFailure(r, "--device=cuda: ");
}

// The local_hessian comparison is opt-in (--gptq-compare): a table and JSON fields when asked,
// neither otherwise, and the same output bytes either way.
TEST_F(BadInputs, GptqReportsTheFullHessianErrorWhenAsked) {
  const std::string stats = dir_ / "stats.json";
  const ProcessResult plain =
      Quantize({"--method", "gptq", "--gptq-act-order", "--stats-json", stats});
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_THAT(plain.out, ::testing::Not(HasSubstr("full-Hessian error")));
  nlohmann::json j = nlohmann::json::parse(ReadAll(stats));
  ASSERT_FALSE(j["modules"].empty());
  for (const nlohmann::json& m : j["modules"]) {
    EXPECT_TRUE(m["gptq"].contains("damping_relative")) << m.dump();
    EXPECT_FALSE(m["gptq"].contains("full_hessian_error")) << m.dump();
  }
  const std::string plain_bytes = ReadAll(out_ + "/model.safetensors");
  fs::remove_all(out_);

  const ProcessResult r =
      Quantize({"--method", "gptq", "--gptq-act-order", "--gptq-compare", "--stats-json", stats});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("full-Hessian error tr(E H E^T), local_hessian vs gptq"));
  EXPECT_THAT(r.out, HasSubstr("total (2)"));
  j = nlohmann::json::parse(ReadAll(stats));
  for (const nlohmann::json& m : j["modules"]) {
    // (Random 64-column example data: gptq need not beat local_hessian here.)
    EXPECT_GT(m["gptq"]["full_hessian_error"].get<double>(), 0.0) << m.dump();
    EXPECT_GT(m["gptq"]["full_hessian_error_local_hessian"].get<double>(), 0.0) << m.dump();
  }
  EXPECT_EQ(ReadAll(out_ + "/model.safetensors"), plain_bytes);
}

TEST_F(BadInputs, ExampleWithFullHessiansQuantizesEveryModuleWithGptq) {
  const std::string example = dir_ / "example";
  ProcessResult r = RunCli({"example", "--out", example, "--layers", "1", "--full-hessians"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunCli({"quantize", "--model", example, "--hessians", example + "/hessians.safetensors",
              "--out", out_, "--method", "gptq", "--device", "cpu"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // q, k, v, o, gate, up, down: all seven with full Hessians.
  EXPECT_THAT(r.out, HasSubstr("total (7)"));
  // Without the switch o_proj's and down_proj's Hessians are blocks, which gptq refuses
  // naming the module.
  const std::string blocks = dir_ / "blocks";
  ASSERT_EQ(RunCli({"example", "--out", blocks, "--layers", "1"}).exit_code, 0);
  r = RunCli({"quantize", "--model", blocks, "--hessians", blocks + "/hessians.safetensors",
              "--out", dir_ / "out2", "--method", "gptq", "--device", "cpu"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("method gptq needs the full"));
}

TEST_F(BadInputs, MissingHessianNamesTheModule) {
  WriteHessians({{std::string(kQ) + ".hessian", SafetensorsDType::kF32, {64, 64}}},
                {F32Bytes(FullHessian(64))});
  const ProcessResult r = Quantize();
  ExpectFailure(
      r, "--method dss needs a Hessian, but " + hessians_ + " has none for 1 module(s): " + kO);
  EXPECT_THAT(r.err, HasSubstr("--fallback-method"));
  // With the fallback the run succeeds.
  const ProcessResult fallback = Quantize({"--fallback-method", "max"});
  EXPECT_EQ(fallback.exit_code, 0) << fallback.err;
  EXPECT_THAT(fallback.err,
              HasSubstr(std::string(kO) + " has no Hessian; using --fallback-method max"));
}

TEST_F(BadInputs, DanglingHessianAliasNamesAliasAndMissingEntry) {
  ASSERT_TRUE(
      WriteSafetensorsFile(hessians_,
                           {{{std::string(kQ) + ".hessian", SafetensorsDType::kF32, {64, 64}},
                             F32Bytes(FullHessian(64))},
                            {{std::string(kO) + ".hessian", SafetensorsDType::kF32, {64, 64}},
                             F32Bytes(FullHessian(64))}},
                           {{std::string(kO) + ".hessian", "model.layers.0.attn_output_input"}})
          .ok());
  ExpectFailure(Quantize(), hessians_ + ": __metadata__ alias '" + kO + ".hessian' (for " + kO +
                                ") names entry 'model.layers.0.attn_output_input', which the "
                                "file does not hold");
}

TEST_F(BadInputs, IndexNamingAMissingShard) {
  fs::rename(model_ + "/model.safetensors", model_ + "/model-00001-of-00002.safetensors");
  WriteAll(model_ + "/model.safetensors.index.json",
           "{\"weight_map\": {\"" + std::string(kQ) +
               ".weight\": \"model-00001-of-00002.safetensors\", \"model.norm.weight\": "
               "\"model-00002-of-00002.safetensors\"}}");
  ExpectFailure(Quantize(), model_ +
                                "/model.safetensors.index.json: weight_map puts "
                                "'model.norm.weight' in model-00002-of-00002.safetensors, "
                                "which does not exist");
}

TEST_F(BadInputs, NoHessiansFileForAHessianMethod) {
  const ProcessResult r = RunCli({"quantize", "--model", model_, "--out", out_});
  ExpectFailure(r, "needs a Hessian, but no --hessians file was given for 2 module(s)");
  // max and mse need none.
  EXPECT_EQ(RunCli({"quantize", "--model", model_, "--out", out_, "--method", "mse"}).exit_code, 0);
}

TEST_F(BadInputs, NonSymmetricHessian) {
  std::vector<float> h = FullHessian(64);
  h[1] = 1.5f;  // H[0, 1] != H[1, 0] = 0.5
  WriteHessians({{std::string(kQ) + ".hessian", SafetensorsDType::kF32, {64, 64}},
                 {std::string(kO) + ".hessian", SafetensorsDType::kF32, {64, 64}}},
                {F32Bytes(h), F32Bytes(FullHessian(64))});
  ExpectFailure(Quantize(), "not symmetric: H[0, 1] = 1.5 but H[1, 0] = 0.5");
}

TEST_F(BadInputs, NonSymmetricFullHessianFailsMidRunAndLeavesNothing) {
  // Full matrices (gptq's, and those the other methods cut their diagonal blocks from) are
  // checked as the run reads them (beside the quantizer), after the output folder was begun:
  // the failure still leaves no --out and no temporary folder.
  std::vector<float> h = FullHessian(64);
  h[3 * 64 + 40] = 2.5f;  // H[3, 40] != H[40, 3]
  WriteHessians({{std::string(kQ) + ".hessian", SafetensorsDType::kF32, {64, 64}},
                 {std::string(kO) + ".hessian", SafetensorsDType::kF32, {64, 64}}},
                {F32Bytes(FullHessian(64)), F32Bytes(h)});
  const std::vector<std::vector<std::string>> runs = {{"--method", "gptq", "--device", "cpu"},
                                                      {"--method", "gptq", "--device", "auto"},
                                                      {"--method", "dss", "--device", "cpu"},
                                                      {"--method", "local_hessian"}};
  for (const std::vector<std::string>& flags : runs) {
    SCOPED_TRACE(absl::StrJoin(flags, " "));
    ExpectFailure(Quantize(flags), std::string("Hessian '") + kO + ".hessian' (for " + kO +
                                       "): not symmetric: H[3, 40] = 2.5 but H[40, 3]");
  }
}

TEST_F(BadInputs, NonFiniteHessian) {
  std::vector<float> h = FullHessian(64);
  h[5 * 64 + 5] = std::numeric_limits<float>::infinity();
  WriteHessians({{std::string(kQ) + ".hessian", SafetensorsDType::kF32, {64, 64}},
                 {std::string(kO) + ".hessian", SafetensorsDType::kF32, {64, 64}}},
                {F32Bytes(h), F32Bytes(FullHessian(64))});
  ExpectFailure(Quantize(), "non-finite value at [5, 5]");
}

TEST_F(BadInputs, NonFiniteWeight) {
  WriteModel({{{std::string(kO) + ".weight", SafetensorsDType::kBF16, {32, 64}},
               Bf16Bytes(32 * 64, 0.25f, std::numeric_limits<float>::quiet_NaN(), 70)}});
  ExpectFailure(Quantize(),
                "tensor '" + std::string(kO) + ".weight': weights: element (1, 6) is nan");
}

TEST_F(BadInputs, InNotMultipleOf16IsExcludedWithANote) {
  WriteModel({{{"model.layers.0.mlp.odd_proj.weight", SafetensorsDType::kBF16, {16, 40}},
               Bf16Bytes(16 * 40, 0.5f)}});
  const ProcessResult r = Quantize();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("note: model.layers.0.mlp.odd_proj not quantized: in = 40 is not "
                               "a positive multiple of 16"));
  const nlohmann::json hf = nlohmann::json::parse(ReadAll(out_ + "/hf_quant_config.json"));
  EXPECT_EQ(hf["quantization"]["exclude_modules"], nlohmann::json({"model.layers.0.mlp.odd_proj"}));
  // Copied unchanged.
  auto file = SafetensorsFile::Open(out_ + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  EXPECT_EQ((*file)->Find("model.layers.0.mlp.odd_proj.weight")->dtype, SafetensorsDType::kBF16);
}

TEST_F(BadInputs, ExistingOutputNeedsOverwrite) {
  fs::create_directories(out_);
  WriteAll(out_ + "/old.txt", "old");
  const ProcessResult r = Quantize();
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("--out " + out_ + " already exists; pass --overwrite"));
  EXPECT_EQ(ReadAll(out_ + "/old.txt"), "old");
  // Not an nvfp4cal output: --overwrite leaves it, --overwrite-any replaces it.
  const ProcessResult refused = Quantize({"--overwrite"});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_THAT(refused.err, HasSubstr("pass --overwrite-any to replace it anyway"));
  EXPECT_EQ(ReadAll(out_ + "/old.txt"), "old");
  const ProcessResult again = Quantize({"--overwrite-any"});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_FALSE(fs::exists(out_ + "/old.txt"));
  EXPECT_TRUE(fs::exists(out_ + "/model.safetensors"));
  EXPECT_THAT(testing::LeftoverTempFolders(out_), IsEmpty());
  // Now it is one, and --overwrite replaces it.
  const ProcessResult third = Quantize({"--overwrite"});
  ASSERT_EQ(third.exit_code, 0) << third.err;
  EXPECT_THAT(testing::LeftoverTempFolders(out_), IsEmpty());
}

// A FIFO (or a folder, a device) where the CLI expects a file it reads fails at once with the
// path and its type, instead of blocking in open() until a writer comes.
TEST_F(BadInputs, NonRegularInputFilesFailAtOnceNamingPathAndType) {
  constexpr double kLimitSeconds = 5.0;
  auto make_fifo = [](const std::string& path) {
    fs::remove(path);
    ASSERT_EQ(mkfifo(path.c_str(), 0644), 0) << path;
  };
  auto expect_refused = [&](const ProcessResult& r, int exit_code, const std::string& message) {
    EXPECT_FALSE(r.timed_out) << "blocked: " << message;
    EXPECT_EQ(r.exit_code, exit_code) << r.err;
    EXPECT_THAT(r.err, HasSubstr(message));
    EXPECT_FALSE(fs::exists(out_));
  };
  auto quantize = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {"quantize", "--model", model_, "--hessians",
                                     hessians_,  "--out",   out_};
    args.insert(args.end(), extra.begin(), extra.end());
    return RunCli(args, kLimitSeconds);
  };
  const std::string fifo_type = ": is a FIFO (named pipe), not a regular file";

  // The weights, the Hessians, config.json, a file copied to the output, the index.
  for (const std::string name : {"model.safetensors", "config.json", "tokenizer.json"}) {
    const std::string saved = ReadAll(model_ + "/" + name);
    make_fifo(model_ + "/" + name);
    expect_refused(quantize({}), 1, model_ + "/" + name + fifo_type);
    fs::remove(model_ + "/" + name);
    if (name != "tokenizer.json") WriteAll(model_ + "/" + name, saved);
  }
  make_fifo(model_ + "/model.safetensors.index.json");
  expect_refused(quantize({}), 1, model_ + "/model.safetensors.index.json" + fifo_type);
  fs::remove(model_ + "/model.safetensors.index.json");
  const std::string pipe = dir_ / "pipe";
  make_fifo(pipe);
  hessians_ = pipe;
  expect_refused(quantize({}), 1, "--hessians: " + pipe + fifo_type);
  hessians_ = dir_.path();
  expect_refused(quantize({}), 1, "--hessians: " + dir_.path() + ": is a directory");
  hessians_ = "/dev/null";
  expect_refused(quantize({}), 1, "--hessians: /dev/null: is a character device");
  hessians_ = dir_ / "hessians.safetensors";

  // Files of the remote options, read before any server is contacted.
  expect_refused(quantize({"--server", "127.0.0.1:1", "--token-file", pipe}), 2, pipe + fifo_type);
  expect_refused(quantize({"--server", "127.0.0.1:1", "--tls-ca", pipe}), 2, pipe + fifo_type);

  // inspect reads hf_quant_config.json of the folder; dequantize reads its --in.
  ASSERT_EQ(Quantize().exit_code, 0);
  make_fifo(out_ + "/hf_quant_config.json");
  const ProcessResult inspect = RunCli({"inspect", out_}, kLimitSeconds);
  EXPECT_FALSE(inspect.timed_out);
  EXPECT_EQ(inspect.exit_code, 1);
  EXPECT_THAT(inspect.err, HasSubstr(out_ + "/hf_quant_config.json" + fifo_type));
  make_fifo(out_ + "/model.safetensors");
  const ProcessResult dequantize =
      RunCli({"dequantize", "--in", out_, "--out", dir_ / "d"}, kLimitSeconds);
  EXPECT_FALSE(dequantize.timed_out);
  EXPECT_EQ(dequantize.exit_code, 1);
  EXPECT_THAT(dequantize.err, HasSubstr(out_ + "/model.safetensors" + fifo_type));
}

TEST_F(BadInputs, AlreadyQuantizedInputIsRefused) {
  ASSERT_EQ(Quantize().exit_code, 0);
  const ProcessResult r =
      RunCli({"quantize", "--model", out_, "--out", dir_ / "again", "--method", "max"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("already has a quantization_config"));
}

TEST_F(BadInputs, CommandLineErrorsExitWithUsageCode) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"quantize", "--out", out_}, "--model DIR is required"},
      {{"quantize", "--model", model_, "--out", out_, "--bogus"},
       "unknown option --bogus for 'quantize'"},
      {{"quantize", "--model", model_, "--out", out_, "--method", "gptqx"},
       "--method: unknown value \"gptqx\"; expected one of max, mse, local_hessian, dss, gptq"},
      {{"quantize", "--model", model_, "--out", out_, "--gptq-damping", "0.1"},
       "--gptq-damping applies to --method gptq only"},
      {{"quantize", "--model", model_, "--out", out_, "--cuda-workers", "0"},
       "--cuda-workers = 0 is out of range [1, 16]"},
      {{"quantize", "--model", model_, "--out", out_, "--cuda-workers", "17"},
       "--cuda-workers = 17 is out of range [1, 16]"},
      {{"quantize", "--model", model_, "--out", out_, "--server", "localhost:1", "--cuda-workers",
        "2"},
       "--cuda-workers applies in-process only"},
      {{"quantize", "--model", model_, "--out", out_, "--device", "gpu"},
       "--device = \"gpu\" is not one of auto, cpu, cuda"},
      {{"quantize", "--model", model_, "--out", out_, "--method", "dss", "--gptq-compare"},
       "--gptq-compare applies to --method gptq only"},
      {{"quantize", "--model", model_, "--out", out_, "--method", "gptq", "--gptq-damping", "-1"},
       "--gptq-damping: params.gptq.damping = -1 is out of range [0, 10]"},
      {{"quantize", "--model", model_, "--out", out_, "--method", "gptq", "--gptq-block-columns",
        "20"},
       "--gptq-block-columns: params.gptq.block_columns = 20 must be a multiple of 16"},
      {{"quantize", "--model", model_, "--out", out_, "--method", "gptq", "--gptq-scale-objective",
        "x"},
       "expected one of hessian_block, gptq_cost"},
      {{"quantize", "--model", model_, "--out", out_, "--method", "gptq", "--gptq-hessian-layout",
        "full"},
       "--gptq-hessian-layout applies with --server only"},
      {{"quantize", "--model", model_, "--out", out_, "--method", "gptq", "--server", "localhost:1",
        "--gptq-hessian-layout", "lower"},
       "--gptq-hessian-layout: unknown value \"lower\"; expected one of upper, full"},
      {{"quantize", "--model", model_, "--out", out_, "--beta-step", "0.001"},
       "--beta-step: params.beta_step = 0.001 is out of range [0.005, 0.5]"},
      {{"quantize", "--model", model_, "--out", out_, "--beta-step", "abc"},
       "--beta-step: \"abc\" is not a finite number"},
      {{"quantize", "--model", model_, "--out", out_, "--beta-step", "nan"},
       "--beta-step: \"nan\" is not a finite number"},
      // Before: accepted (negative threads, no attempts, a negative deadline).
      {{"quantize", "--model", model_, "--out", out_, "--threads", "-3"},
       "--threads = -3 is out of range [0, 4096]"},
      {{"quantize", "--model", model_, "--out", out_, "--retries", "0"},
       "--retries = 0 is out of range [1, 100]"},
      {{"quantize", "--model", model_, "--out", out_, "--streams-per-server", "2"},
       "--streams-per-server applies with --server only"},
      {{"quantize", "--model", model_, "--out", out_, "--server", "localhost:1",
        "--streams-per-server", "0"},
       "--streams-per-server = 0 is out of range [1, 16]"},
      {{"quantize", "--model", model_, "--out", out_, "--chunk-kib", "64"},
       "--chunk-kib applies with --server only"},
      {{"quantize", "--model", model_, "--out", out_, "--server", "localhost:1", "--chunk-kib",
        "0"},
       "--chunk-kib = 0 is out of range [1, 65536]"},
      // Before: "is not an integer" for integers beyond int's (and int64's) range.
      {{"quantize", "--model", model_, "--out", out_, "--server", "localhost:1", "--chunk-kib",
        "99999999999"},
       "--chunk-kib = 99999999999 is out of range [1, 65536]"},
      {{"quantize", "--model", model_, "--out", out_, "--read-ahead-mib", "-1"},
       "--read-ahead-mib = -1 is out of range [0, 1048576]"},
      {{"quantize", "--model", model_, "--out", out_, "--read-ahead-mib", "1048577"},
       "--read-ahead-mib = 1048577 is out of range [0, 1048576]"},
      {{"quantize", "--model", model_, "--out", out_, "--keep-freed-memory-mib", "-1"},
       "--keep-freed-memory-mib = -1 is out of range [0, 2047]"},
      {{"quantize", "--model", model_, "--out", out_, "--keep-freed-memory-mib", "2048"},
       "--keep-freed-memory-mib = 2048 is out of range [0, 2047]"},
      {{"quantize", "--model", model_, "--out", out_, "--threads", "-999999999999999999999"},
       "--threads = -999999999999999999999 is out of range [0, 4096]"},
      {{"quantize", "--model", model_, "--out", out_, "--threads", "4x"},
       "--threads: \"4x\" is not an integer"},
      {{"quantize", "--model", model_, "--out", out_, "--threads", "-"},
       "--threads: \"-\" is not an integer"},
      {{"quantize", "--model", model_, "--out", out_, "--timeout", "-1"},
       "--timeout = -1 is out of range [0, 1e+07]"},
      {{"quantize", "--model", model_, "--out", out_, "--server", "localhost"},
       "--server: \"localhost\" is not HOST:PORT"},
      {{"quantize", "--model", model_, "--out"}, "--out needs a value (DIR)"},
      {{"inspect"}, "nvfp4cal inspect takes 1 argument(s) (DIR), got 0"},
      {{"frobnicate"}, "unknown command 'frobnicate'"},
  };
  for (const Case& c : cases) {
    const ProcessResult r = RunCli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.message;
    EXPECT_THAT(r.err, HasSubstr(c.message));
  }
  EXPECT_FALSE(fs::exists(out_));
}

TEST(Cli, HelpListsTheContract) {
  const ProcessResult top = RunCli({"--help"});
  EXPECT_EQ(top.exit_code, 0);
  for (const char* command : {"quantize", "inspect", "example", "dequantize"}) {
    EXPECT_THAT(top.out, HasSubstr(command));
  }
  const ProcessResult quantize = RunCli({"quantize", "--help"});
  EXPECT_EQ(quantize.exit_code, 0);
  for (const char* option : {"--model DIR", "--hessians FILE", "--out DIR", "--method NAME",
                             "--beta-step X", "--server HOST:PORT[,...]", "--include GLOB",
                             "--exclude GLOB", "--device NAME", "--overwrite"}) {
    EXPECT_THAT(quantize.out, HasSubstr(option));
  }
}

TEST(Cli, ExampleQuantizeInspectDequantize) {
  TempFolder dir("flow");
  const ProcessResult example = RunCli({"example", "--out", dir / "ex", "--shards", "2"});
  ASSERT_EQ(example.exit_code, 0) << example.err;
  EXPECT_EQ(RunCli({"example", "--out", dir / "ex"}).exit_code, 1);
  const ProcessResult q = RunCli({"quantize", "--model", dir / "ex", "--hessians",
                                  dir / "ex/hessians.safetensors", "--out", dir / "q"});
  ASSERT_EQ(q.exit_code, 0) << q.err;
  // The table: one row per quantized module and a total.
  EXPECT_THAT(q.out, HasSubstr("model.layers.1.mlp.down_proj"));
  EXPECT_THAT(q.out, HasSubstr("total (14)"));
  const ProcessResult inspect = RunCli({"inspect", dir / "q"});
  ASSERT_EQ(inspect.exit_code, 0) << inspect.err;
  EXPECT_THAT(inspect.out, HasSubstr("NVFP4 modules: 14"));
  EXPECT_THAT(inspect.out, HasSubstr("(4.500 bits per weight)"));
  EXPECT_THAT(inspect.out, HasSubstr("shards: 2 (with model.safetensors.index.json)"));
  EXPECT_THAT(inspect.out, HasSubstr("producer nvfp4cal"));
  const ProcessResult deq = RunCli({"dequantize", "--in", dir / "q", "--out", dir / "d"});
  ASSERT_EQ(deq.exit_code, 0) << deq.err;
  const ProcessResult plain = RunCli({"inspect", dir / "d"});
  EXPECT_THAT(plain.out, HasSubstr("NVFP4 modules: none"));
  const nlohmann::json config = nlohmann::json::parse(ReadAll(dir / "d/config.json"));
  EXPECT_FALSE(config.contains("quantization_config"));
}

}  // namespace
}  // namespace nvfp4cal
