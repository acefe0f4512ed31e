// The quantize pipeline in-process: for the example model and the real dev-lm, every method's
// output bytes equal the kernel library's called directly (with the test's own Hessian block
// extraction, sharing rule and fused-group amax); the checkpoint layout of NUMERICS §5; the
// include/exclude globs; and inspect --against on two outputs. Hessians and labels:
// quantize_hessians_test.cc; 3-D expert tensors: quantize_experts_test.cc.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "client/checkpoint.h"
#include "client/example_model.h"
#include "client/inspect.h"
#include "client/local_quantizer.h"
#include "client/quantize_checkpoint.h"
#include "client/safetensors.h"
#include "client/trace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "tests/client/quantize_test_util.h"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::testing::ReadAll;
using ::nvfp4cal::testing::RecordingObserver;
using ::nvfp4cal::testing::RunPipeline;
using ::nvfp4cal::testing::TempFolder;
using ::testing::HasSubstr;

float ToFloat(const SafetensorsTensor& t, int64_t i) {
  uint16_t h;
  float f;
  switch (t.dtype) {
    case SafetensorsDType::kF32:
      std::memcpy(&f, t.data + i * 4, 4);
      return f;
    case SafetensorsDType::kF16:
      std::memcpy(&h, t.data + i * 2, 2);
      return Float16ToFloat(h);
    default:
      std::memcpy(&h, t.data + i * 2, 2);
      return BFloat16ToFloat(h);
  }
}

// Everything the test knows independently of the pipeline about a model folder.
struct ModelFiles {
  std::map<std::string, std::unique_ptr<SafetensorsFile>> shards;  // file name -> file
  std::map<std::string, const SafetensorsTensor*> tensors;
  std::unique_ptr<SafetensorsFile> hessians;
};

ModelFiles OpenModel(const std::string& dir, const std::string& hessians) {
  ModelFiles m;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("model", 0) != 0 || e.path().extension() != ".safetensors") continue;
    auto file = SafetensorsFile::Open(e.path().string());
    EXPECT_TRUE(file.ok()) << file.status();
    for (const SafetensorsTensor& t : (*file)->tensors()) m.tensors[t.name] = &t;
    m.shards[name] = *std::move(file);
  }
  if (!hessians.empty()) m.hessians = *SafetensorsFile::Open(hessians);
  return m;
}

// The modules NUMERICS §5 quantizes in these Llama models: 2-D `.weight`s except lm_head and
// embeddings.
bool ShouldQuantize(const std::string& name, const SafetensorsTensor& t) {
  return name.size() > 7 && name.substr(name.size() - 7) == ".weight" && t.shape.size() == 2 &&
         name.find("lm_head") == std::string::npos && name.find("embed") == std::string::npos;
}

std::string Module(const std::string& weight) { return weight.substr(0, weight.size() - 7); }

// "<parent>|family" for q/k/v and gate/up, else the module itself.
std::string GroupOf(const std::string& module) {
  const size_t dot = module.rfind('.');
  const std::string parent = module.substr(0, dot);
  const std::string leaf = module.substr(dot + 1);
  if (leaf == "q_proj" || leaf == "k_proj" || leaf == "v_proj") return parent + "|qkv";
  if (leaf == "gate_proj" || leaf == "up_proj") return parent + "|gate_up";
  return module;
}

// The Hessian entry of a module: its own, else the first of its fused family.
const SafetensorsTensor* HessianOf(const SafetensorsFile& hessians, const std::string& module) {
  if (const SafetensorsTensor* own = hessians.Find(module + ".hessian")) return own;
  const size_t dot = module.rfind('.');
  const std::string parent = module.substr(0, dot + 1);
  const std::string leaf = module.substr(dot + 1);
  if (leaf == "k_proj" || leaf == "v_proj") return hessians.Find(parent + "q_proj.hessian");
  if (leaf == "up_proj") return hessians.Find(parent + "gate_proj.hessian");
  return nullptr;
}

// Diagonal blocks, extracted here without the client's code.
std::vector<float> TestBlocks(const SafetensorsTensor& h, int64_t cols) {
  std::vector<float> blocks(static_cast<size_t>(cols * 16));
  if (h.shape.size() == 3) {
    std::memcpy(blocks.data(), h.data, blocks.size() * 4);
    return blocks;
  }
  for (int64_t j = 0; j < cols / 16; ++j) {
    for (int64_t a = 0; a < 16; ++a) {
      for (int64_t b = 0; b < 16; ++b) {
        std::memcpy(&blocks[static_cast<size_t>(j * 256 + a * 16 + b)],
                    h.data + ((j * 16 + a) * cols + j * 16 + b) * 4, 4);
      }
    }
  }
  return blocks;
}

// Checks every output byte of `out_dir` against the kernels called directly.
void ExpectMatchesKernels(const std::string& model_dir, const std::string& hessians_path,
                          const std::string& out_dir, Method method) {
  ModelFiles in = OpenModel(model_dir, hessians_path);
  ModelFiles out = OpenModel(out_dir, "");
  ASSERT_EQ(in.shards.size(), out.shards.size());
  std::map<std::string, float> group_amax;
  for (const auto& [name, t] : in.tensors) {
    if (!ShouldQuantize(name, *t)) continue;
    float& g = group_amax[GroupOf(Module(name))];
    for (int64_t i = 0; i < NumElements(t->shape); ++i) g = std::max(g, std::fabs(ToFloat(*t, i)));
  }
  std::unique_ptr<ScaleSearch> kernels = MakeCpuScaleSearch({});
  int quantized = 0;
  for (const auto& [name, t] : in.tensors) {
    ASSERT_NE(out.tensors.count(name), 0u) << name;
    const SafetensorsTensor& o = *out.tensors[name];
    if (!ShouldQuantize(name, *t)) {
      EXPECT_EQ(o.dtype, t->dtype) << name;
      EXPECT_EQ(o.shape, t->shape) << name;
      ASSERT_EQ(o.num_bytes, t->num_bytes) << name;
      EXPECT_EQ(std::memcmp(o.data, t->data, static_cast<size_t>(t->num_bytes)), 0) << name;
      continue;
    }
    ++quantized;
    const std::string module = Module(name);
    const int64_t rows = t->shape[0], cols = t->shape[1];
    QuantizeRequest request;
    const DType dtype = t->dtype == SafetensorsDType::kF32   ? DType::kFloat32
                        : t->dtype == SafetensorsDType::kF16 ? DType::kFloat16
                                                             : DType::kBFloat16;
    request.weights = {t->data, dtype, rows, cols};
    request.params.method = method;
    request.global_amax = group_amax[GroupOf(module)];
    std::vector<float> blocks;
    if (in.hessians != nullptr) {
      const SafetensorsTensor* h = HessianOf(*in.hessians, module);
      ASSERT_NE(h, nullptr) << module;
      blocks = TestBlocks(*h, cols);
      request.hessians = {blocks.data(), cols / 16};
    }
    absl::StatusOr<QuantizedTensor> want = kernels->Quantize(request);
    ASSERT_TRUE(want.ok()) << want.status();
    const SafetensorsTensor* scales = out.tensors[module + ".weight_scale"];
    const SafetensorsTensor* scale_2 = out.tensors[module + ".weight_scale_2"];
    ASSERT_NE(scales, nullptr) << module;
    ASSERT_NE(scale_2, nullptr) << module;
    EXPECT_EQ(o.dtype, SafetensorsDType::kU8);
    EXPECT_EQ(o.shape, (std::vector<int64_t>{rows, cols / 2}));
    EXPECT_EQ(scales->dtype, SafetensorsDType::kF8E4M3);
    EXPECT_EQ(scales->shape, (std::vector<int64_t>{rows, cols / 16}));
    EXPECT_EQ(scale_2->dtype, SafetensorsDType::kF32);
    EXPECT_TRUE(scale_2->shape.empty());
    EXPECT_EQ(std::memcmp(o.data, want->packed_codes.data(), want->packed_codes.size()), 0)
        << module << " codes differ from kernels/";
    EXPECT_EQ(std::memcmp(scales->data, want->scales.data(), want->scales.size()), 0)
        << module << " scales differ from kernels/";
    float s2 = 0;
    std::memcpy(&s2, scale_2->data, 4);
    EXPECT_EQ(s2, group_amax[GroupOf(module)] / 2688.0f) << module;
  }
  EXPECT_GT(quantized, 0);
  EXPECT_EQ(out.tensors.size(), in.tensors.size() + 2 * static_cast<size_t>(quantized));
}

// The 2-shard example model quantized with `method` (the read-ahead budget 0 = the default; its
// timeline into `trace` when not null) equals the kernels called directly; every report row
// carries the method that ran.
void ExpectExampleMatchesKernels(Method method, int64_t read_ahead_bytes, Trace* trace = nullptr) {
  TempFolder dir("example");
  ExampleModelOptions example;
  example.shards = 2;
  ASSERT_TRUE(WriteExampleModel(dir / "model", example).ok());
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "model/hessians.safetensors";
  options.out_dir = dir / "out";
  options.params.method = method;
  options.read_ahead_bytes = read_ahead_bytes;
  options.trace = trace;
  RecordingObserver observer;
  LocalQuantizerOptions local;
  local.device = "cpu";
  local.trace = trace;
  absl::StatusOr<std::unique_ptr<Quantizer>> quantizer = MakeLocalQuantizer(local);
  ASSERT_TRUE(quantizer.ok()) << quantizer.status();
  absl::StatusOr<QuantizeReport> report = QuantizeCheckpoint(options, quantizer->get(), &observer);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->modules.size(), 14u);
  EXPECT_EQ(observer.done_, observer.tensors_);
  EXPECT_EQ(observer.done_bytes_, observer.bytes_);
  ExpectMatchesKernels(dir / "model", options.hessians_path, options.out_dir, method);
  for (const ModuleReport& m : report->modules) EXPECT_EQ(m.stats.method, method);
}

class ExampleModel : public ::testing::TestWithParam<Method> {};

TEST_P(ExampleModel, OutputEqualsKernelsCalledDirectly) {
  ExpectExampleMatchesKernels(GetParam(), 0);
}

INSTANTIATE_TEST_SUITE_P(EveryMethod, ExampleModel,
                         ::testing::Values(Method::kMax, Method::kMse, Method::kLocalHessian,
                                           Method::kDss),
                         [](const auto& param_info) {
                           return std::string(MethodName(param_info.param));
                         });

class DevLm : public ::testing::TestWithParam<Method> {};

TEST_P(DevLm, OutputEqualsKernelsCalledDirectly) {
  const std::string source = NVFP4CAL_DEV_LM_DIR;
  if (!fs::exists(source + "/model.safetensors")) GTEST_SKIP() << "no dev-lm at " << source;
  TempFolder dir("devlm");
  fs::create_directories(dir / "model");
  for (const char* f : {"config.json", "model.safetensors", "hessians.safetensors"}) {
    fs::copy_file(source + "/" + f, dir / (std::string("model/") + f));
  }
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "model/hessians.safetensors";
  options.out_dir = dir / "out";
  options.params.method = GetParam();
  absl::StatusOr<QuantizeReport> report = RunPipeline(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->modules.size(), 28u);
  ExpectMatchesKernels(options.model_dir, options.hessians_path, options.out_dir, GetParam());
  // The Hessians file is an input, not part of the model: it is not copied.
  EXPECT_FALSE(fs::exists(dir / "out/hessians.safetensors"));
  if (GetParam() == Method::kDss) {
    // DSS never loses to the max method on the Hessian objective (NUMERICS §3).
    for (const ModuleReport& m : report->modules) {
      EXPECT_LE(m.stats.objective_after, m.stats.objective_before) << m.module;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(EveryMethod, DevLm,
                         ::testing::Values(Method::kMax, Method::kMse, Method::kLocalHessian,
                                           Method::kDss),
                         [](const auto& param_info) {
                           return std::string(MethodName(param_info.param));
                         });

// The example model with every tensor converted to `dtype` (F32 exactly, F16 rounded).
void ConvertExample(const std::string& dir, SafetensorsDType dtype) {
  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<SafetensorsTensorData> tensors;
  for (const SafetensorsTensor& t : (*file)->tensors()) {
    SafetensorsTensorData c{{t.name, dtype, t.shape}, {}};
    const int64_t n = NumElements(t.shape);
    c.bytes.resize(static_cast<size_t>(n * SafetensorsDTypeSize(dtype)));
    for (int64_t i = 0; i < n; ++i) {
      const float v = ToFloat(t, i);
      if (dtype == SafetensorsDType::kF32) {
        std::memcpy(&c.bytes[static_cast<size_t>(i * 4)], &v, 4);
      } else {
        const uint16_t h = FloatToFloat16(v);
        std::memcpy(&c.bytes[static_cast<size_t>(i * 2)], &h, 2);
      }
    }
    tensors.push_back(std::move(c));
  }
  file->reset();
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/model.safetensors", tensors, {{"format", "pt"}}).ok());
}

TEST(QuantizeCheckpoint, AOneByteReadAheadReadsGroupByGroupAndGivesTheSameBytes) {
  // A budget below every tensor: a group is read only once every earlier group's results
  // arrived (no deadlock, nothing read into memory still in use). So in the timeline the last
  // group's wait for read-ahead memory ends after the 13 earlier tensors' quantization began
  // (with the default budget the small model is read ahead at once, while few have begun).
  Trace trace;
  ExpectExampleMatchesKernels(Method::kDss, 1, &trace);
  std::vector<int64_t> quantize_begins_us;
  int64_t last_wait_end_us = 0;
  int waits = 0;
  const nlohmann::json parsed = nlohmann::json::parse(trace.Json());
  for (const nlohmann::json& event : parsed["traceEvents"]) {
    if (!event.contains("cat") || !event.contains("dur")) continue;
    const std::string name = event["name"];
    const int64_t begin = event["ts"];
    if (name.rfind("quantize ", 0) == 0) quantize_begins_us.push_back(begin);
    if (name == "wait for read-ahead memory") {
      ++waits;
      last_wait_end_us = std::max(last_wait_end_us, begin + int64_t{event["dur"]});
    }
  }
  ASSERT_EQ(waits, 8);  // 2 layers x (q/k/v, o, gate/up, down)
  ASSERT_EQ(quantize_begins_us.size(), 14u);
  EXPECT_GE(std::count_if(quantize_begins_us.begin(), quantize_begins_us.end(),
                          [&](int64_t begin) { return begin <= last_wait_end_us; }),
            13);
}

TEST(QuantizeCheckpoint, Float16AndFloat32WeightsEqualKernelsCalledDirectly) {
  for (SafetensorsDType dtype : {SafetensorsDType::kF16, SafetensorsDType::kF32}) {
    TempFolder dir("dtypes");
    ExampleModelOptions example;
    example.layers = 1;
    ASSERT_TRUE(WriteExampleModel(dir / "model", example).ok());
    ConvertExample(dir / "model", dtype);
    QuantizeOptions options;
    options.model_dir = dir / "model";
    options.hessians_path = dir / "model/hessians.safetensors";
    options.out_dir = dir / "out";
    absl::StatusOr<QuantizeReport> report = RunPipeline(options);
    ASSERT_TRUE(report.ok()) << report.status();
    ExpectMatchesKernels(options.model_dir, options.hessians_path, options.out_dir, Method::kDss);
  }
}

TEST(QuantizeCheckpoint, WritesConfigsIndexAndOtherFilesPerNumerics5) {
  TempFolder dir("layout");
  ExampleModelOptions example;
  example.shards = 3;
  ASSERT_TRUE(WriteExampleModel(dir / "model", example).ok());
  testing::WriteAll(dir / "model/tokenizer.json", "{\"version\": \"1.0\"}");
  // A Hessians file beside the weights that the run does not read: never copied (runtimes
  // load every *.safetensors of the folder), with a note.
  fs::copy_file(dir / "model/hessians.safetensors", dir / "model/other.safetensors");
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "model/hessians.safetensors";
  options.out_dir = dir / "out";
  RecordingObserver observer;
  ASSERT_TRUE(RunPipeline(options, &observer).ok());
  EXPECT_FALSE(fs::exists(dir / "out/other.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "out/hessians.safetensors"));
  EXPECT_THAT(observer.messages,
              ::testing::Contains(HasSubstr("other.safetensors is not copied to the output")));

  EXPECT_EQ(ReadAll(dir / "out/tokenizer.json"), "{\"version\": \"1.0\"}");
  EXPECT_EQ(ReadAll(dir / "out/generation_config.json"),
            ReadAll(dir / "model/generation_config.json"));
  const nlohmann::json config = nlohmann::json::parse(ReadAll(dir / "out/config.json"));
  const nlohmann::json original = nlohmann::json::parse(ReadAll(dir / "model/config.json"));
  for (auto it = original.begin(); it != original.end(); ++it) {
    EXPECT_EQ(config[it.key()], it.value()) << it.key();
  }
  // The example's Hessians carry no activation amax: a weight-only checkpoint, labelled so.
  const nlohmann::json& q = config["quantization_config"];
  EXPECT_EQ(q["quant_method"], "modelopt");
  EXPECT_EQ(q["quant_algo"], "W4A16_NVFP4");
  const nlohmann::json args = {
      {"num_bits", 4}, {"type", "float"}, {"group_size", 16}, {"dynamic", false}};
  EXPECT_EQ(q["config_groups"]["group_0"]["weights"], args);
  EXPECT_FALSE(q["config_groups"]["group_0"].contains("input_activations"));
  EXPECT_EQ(q["config_groups"]["group_0"]["targets"], nlohmann::json({"Linear"}));
  const nlohmann::json excluded = {"lm_head", "model.embed_tokens"};
  EXPECT_EQ(q["ignore"], excluded);
  const nlohmann::json hf = nlohmann::json::parse(ReadAll(dir / "out/hf_quant_config.json"));
  EXPECT_EQ(hf["producer"]["name"], "nvfp4cal");
  EXPECT_EQ(hf["producer"]["version"], NvFp4CalVersion());
  EXPECT_EQ(hf["quantization"]["quant_algo"], "W4A16_NVFP4");
  EXPECT_TRUE(hf["quantization"]["kv_cache_quant_algo"].is_null());
  EXPECT_EQ(hf["quantization"]["group_size"], 16);
  EXPECT_EQ(hf["quantization"]["exclude_modules"], excluded);

  // Sharding kept: same shard files, the index maps every output tensor to the shard that
  // holds it and totals their bytes.
  const nlohmann::json index =
      nlohmann::json::parse(ReadAll(dir / "out/model.safetensors.index.json"));
  ModelFiles out = OpenModel(dir / "out", "");
  ModelFiles in = OpenModel(dir / "model", "");
  EXPECT_EQ(out.shards.size(), 3u);
  std::set<std::string> in_names, out_names;
  for (const auto& [name, file] : in.shards) in_names.insert(name);
  for (const auto& [name, file] : out.shards) out_names.insert(name);
  EXPECT_EQ(in_names, out_names);
  int64_t total = 0;
  size_t mapped = 0;
  for (const auto& [file_name, file] : out.shards) {
    for (const SafetensorsTensor& t : file->tensors()) {
      EXPECT_EQ(index["weight_map"][t.name], file_name) << t.name;
      total += t.num_bytes;
      ++mapped;
    }
  }
  EXPECT_EQ(index["weight_map"].size(), mapped);
  EXPECT_EQ(index["metadata"]["total_size"], total);
  // Quantized tensors stay in the shard of their original weight.
  const nlohmann::json in_index =
      nlohmann::json::parse(ReadAll(dir / "model/model.safetensors.index.json"));
  EXPECT_EQ(index["weight_map"]["model.layers.1.mlp.up_proj.weight_scale"],
            in_index["weight_map"]["model.layers.1.mlp.up_proj.weight"]);
}

TEST(QuantizeCheckpoint, FusedSiblingsShareTheGlobalScale) {
  TempFolder dir("fused");
  ASSERT_TRUE(WriteExampleModel(dir / "model", {}).ok());
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "model/hessians.safetensors";
  options.out_dir = dir / "out";
  ASSERT_TRUE(RunPipeline(options).ok());
  ModelFiles out = OpenModel(dir / "out", "");
  auto s2 = [&](const std::string& m) {
    float v;
    std::memcpy(&v, out.tensors.at(m + ".weight_scale_2")->data, 4);
    return v;
  };
  const std::string p = "model.layers.0.";
  EXPECT_EQ(s2(p + "self_attn.q_proj"), s2(p + "self_attn.k_proj"));
  EXPECT_EQ(s2(p + "self_attn.q_proj"), s2(p + "self_attn.v_proj"));
  EXPECT_EQ(s2(p + "mlp.gate_proj"), s2(p + "mlp.up_proj"));
  EXPECT_NE(s2(p + "self_attn.q_proj"), s2(p + "self_attn.o_proj"));
  EXPECT_NE(s2(p + "mlp.gate_proj"), s2(p + "mlp.down_proj"));
}

TEST(QuantizeCheckpoint, IncludeAndExcludeGlobsPickModules) {
  TempFolder dir("globs");
  ASSERT_TRUE(WriteExampleModel(dir / "model", {}).ok());
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "model/hessians.safetensors";
  options.out_dir = dir / "out";
  options.plan.includes = {"*.mlp.*"};
  options.plan.excludes = {"model.layers.1.*"};
  absl::StatusOr<QuantizeReport> report = RunPipeline(options);
  ASSERT_TRUE(report.ok()) << report.status();
  std::vector<std::string> modules;
  for (const ModuleReport& m : report->modules) modules.push_back(m.module);
  EXPECT_EQ(modules, (std::vector<std::string>{"model.layers.0.mlp.down_proj",
                                               "model.layers.0.mlp.gate_proj",
                                               "model.layers.0.mlp.up_proj"}));
  const nlohmann::json hf = nlohmann::json::parse(ReadAll(dir / "out/hf_quant_config.json"));
  EXPECT_EQ(hf["quantization"]["exclude_modules"].size(), 16u - 3u);
  // lm_head only with the default excludes switched off.
  options.out_dir = dir / "out2";
  options.plan = {};
  options.plan.includes = {"lm_head"};
  options.plan.default_excludes = false;
  options.params.method = Method::kMse;
  report = RunPipeline(options);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->modules.size(), 1u);
  EXPECT_EQ(report->modules[0].module, "lm_head");
}

// inspect --against counts, per module, the block scales and codes that differ between two
// checkpoints (how users see what finetune-scales moved): checked against a direct count, and
// a checkpoint against itself differs nowhere.
TEST(QuantizeCheckpoint, InspectAgainstCountsMovedScalesAndChangedCodes) {
  TempFolder dir("against");
  ASSERT_TRUE(WriteExampleModel(dir / "model", ExampleModelOptions{}).ok());
  for (const auto& [name, method] :
       std::vector<std::pair<std::string, Method>>{{"max", Method::kMax}, {"dss", Method::kDss}}) {
    QuantizeOptions options;
    options.model_dir = dir / "model";
    options.hessians_path = dir / "model/hessians.safetensors";
    options.out_dir = dir / name;
    options.params.method = method;
    ASSERT_TRUE(RunPipeline(options).ok());
  }
  absl::StatusOr<std::string> json =
      InspectCheckpoint(dir / "dss", InspectFormat::kJson, dir / "max");
  ASSERT_TRUE(json.ok()) << json.status();
  const nlohmann::json against = nlohmann::json::parse(*json)["against"];
  auto dss = SafetensorsFile::Open(dir / "dss/model.safetensors");
  auto max = SafetensorsFile::Open(dir / "max/model.safetensors");
  ASSERT_TRUE(dss.ok() && max.ok());
  ASSERT_EQ(against["modules"].size(), 14u);
  EXPECT_TRUE(against["unmatched"].empty());
  int64_t total_moved = 0;
  for (const nlohmann::json& m : against["modules"]) {
    const std::string module = m["module"];
    const SafetensorsTensor* a = (*dss)->Find(module + ".weight_scale");
    const SafetensorsTensor* b = (*max)->Find(module + ".weight_scale");
    const SafetensorsTensor* ca = (*dss)->Find(module + ".weight");
    const SafetensorsTensor* cb = (*max)->Find(module + ".weight");
    ASSERT_TRUE(a && b && ca && cb);
    int64_t moved = 0, changed = 0;
    for (int64_t i = 0; i < a->num_bytes; ++i) moved += a->data[i] != b->data[i];
    for (int64_t i = 0; i < ca->num_bytes; ++i) {
      changed += (ca->data[i] & 0x0F) != (cb->data[i] & 0x0F);
      changed += (ca->data[i] >> 4) != (cb->data[i] >> 4);
    }
    EXPECT_EQ(m["scales_moved"], moved) << module;
    EXPECT_EQ(m["codes_changed"], changed) << module;
    EXPECT_EQ(m["blocks"], a->num_bytes);
    EXPECT_EQ(m["weights"], 2 * ca->num_bytes);
    EXPECT_EQ(m["weight_scale_2_equal"], true);  // same g whatever the method
    total_moved += moved;
  }
  EXPECT_GT(total_moved, 0);
  absl::StatusOr<std::string> self =
      InspectCheckpoint(dir / "dss", InspectFormat::kText, dir / "dss");
  ASSERT_TRUE(self.ok());
  EXPECT_THAT(*self, HasSubstr("block scales moved: 0 of "));
  absl::StatusOr<std::string> missing =
      InspectCheckpoint(dir / "dss", InspectFormat::kText, dir / "nowhere");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("--against "));
}

}  // namespace
}  // namespace nvfp4cal
