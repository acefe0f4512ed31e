// The quantize pipeline in-process: for the example model and the real dev-lm, every method's
// output bytes equal the kernel library's called directly (with the test's own Hessian block
// extraction, sharing rule and fused-group amax); the checkpoint layout of NUMERICS §5; and the
// pipeline's handling of Hessian sharing, include/exclude and zero-Hessian warnings.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "client/checkpoint.h"
#include "client/example_model.h"
#include "client/hessian_accumulator.h"
#include "client/inspect.h"
#include "client/local_quantizer.h"
#include "client/quantize_checkpoint.h"
#include "client/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::testing::ReadAll;
using ::nvfp4cal::testing::TempFolder;
using ::testing::HasSubstr;
using ::testing::Not;

// Collects observer messages.
class RecordingObserver : public QuantizeObserver {
 public:
  void OnStart(int64_t tensors, int64_t bytes) override {
    tensors_ = tensors;
    bytes_ = bytes;
  }
  void OnTensorDone(const std::string&, int64_t bytes) override {
    ++done_;
    done_bytes_ += bytes;
  }
  void OnMessage(const std::string& line) override { messages.push_back(line); }
  std::vector<std::string> messages;
  int64_t tensors_ = 0, bytes_ = 0, done_ = 0, done_bytes_ = 0;
};

absl::StatusOr<QuantizeReport> RunPipeline(const QuantizeOptions& options,
                                           QuantizeObserver* observer = nullptr) {
  std::unique_ptr<Quantizer> quantizer = MakeLocalQuantizer(MakeCpuScaleSearch({}), "test cpu");
  return QuantizeCheckpoint(options, quantizer.get(), observer);
}

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

class ExampleModel : public ::testing::TestWithParam<Method> {};

TEST_P(ExampleModel, OutputEqualsKernelsCalledDirectly) {
  TempFolder dir("example");
  ExampleModelOptions example;
  example.shards = 2;
  ASSERT_TRUE(WriteExampleModel(dir / "model", example).ok());
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.hessians_path = dir / "model/hessians.safetensors";
  options.out_dir = dir / "out";
  options.params.method = GetParam();
  RecordingObserver observer;
  absl::StatusOr<QuantizeReport> report = RunPipeline(options, &observer);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->modules.size(), 14u);
  EXPECT_EQ(observer.done_, observer.tensors_);
  EXPECT_EQ(observer.done_bytes_, observer.bytes_);
  ExpectMatchesKernels(dir / "model", options.hessians_path, options.out_dir, GetParam());
  // Every report row carries the method that ran.
  for (const ModuleReport& m : report->modules) EXPECT_EQ(m.stats.method, GetParam());
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

// Writes a one-layer model with the given q/k/v weights [rows, cols] bf16.
void WriteTinyModel(const std::string& dir, int64_t cols, const std::vector<std::string>& leaves,
                    float value_scale = 1.0f) {
  fs::create_directories(dir);
  testing::WriteAll(dir + "/config.json", "{\"model_type\": \"llama\"}");
  std::vector<SafetensorsTensorData> tensors;
  int seed = 1;
  for (const std::string& leaf : leaves) {
    SafetensorsTensorData t;
    t.spec = {"model.layers.0.self_attn." + leaf + ".weight", SafetensorsDType::kBF16, {32, cols}};
    std::vector<uint16_t> bits(static_cast<size_t>(32 * cols));
    for (size_t i = 0; i < bits.size(); ++i) {
      const float v =
          value_scale * static_cast<float>(static_cast<int>((i * 37 + seed) % 23) - 11) / 64.0f;
      uint32_t b;
      std::memcpy(&b, &v, 4);
      bits[i] = static_cast<uint16_t>(b >> 16);
    }
    ++seed;
    t.bytes.resize(bits.size() * 2);
    std::memcpy(t.bytes.data(), bits.data(), t.bytes.size());
    tensors.push_back(std::move(t));
  }
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/model.safetensors", tensors, {}).ok());
}

SafetensorsTensorData IdentityBlocks(const std::string& name, int64_t cols, float diag = 1.0f) {
  std::vector<float> blocks(static_cast<size_t>(cols * 16), 0.0f);
  for (int64_t j = 0; j < cols / 16; ++j) {
    for (int a = 0; a < 16; ++a) blocks[static_cast<size_t>(j * 256 + a * 17)] = diag;
  }
  SafetensorsTensorData t{{name, SafetensorsDType::kF32, {cols / 16, 16, 16}}, {}};
  t.bytes.resize(blocks.size() * 4);
  std::memcpy(t.bytes.data(), blocks.data(), t.bytes.size());
  return t;
}

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

SafetensorsTensorData Scalar(const std::string& name, float value) {
  SafetensorsTensorData t{{name, SafetensorsDType::kF32, {}}, std::vector<uint8_t>(4)};
  std::memcpy(t.bytes.data(), &value, 4);
  return t;
}

// The label never promises tensors the checkpoint lacks (runtimes that read NVFP4 allocate an
// input_scale per module and do not complain when it is missing). Every quantized module has
// its activation amax: W4A4 NVFP4 with every input_scale. None has: W4A16_NVFP4, none written.
// Some have: an error naming the others, unless --activations none. (Before: NVFP4 with an
// input_activations group whatever the tensors.)
TEST(QuantizeCheckpoint, LabelsNeverPromiseTensorsTheCheckpointLacks) {
  TempFolder dir("labels");
  WriteTinyModel(dir / "model", 32, {"q_proj", "k_proj", "o_proj"});
  const std::string p = "model.layers.0.self_attn.";
  // q's entry carries the amax of the attention input (k shares it); o's entry may.
  const std::vector<SafetensorsTensorData> partial = {IdentityBlocks(p + "q_proj.hessian", 32),
                                                      Scalar(p + "q_proj.input_amax", 13.5f),
                                                      IdentityBlocks(p + "o_proj.hessian", 32)};
  std::vector<SafetensorsTensorData> full = partial;
  full.push_back(Scalar(p + "o_proj.input_amax", 7.0f));
  ASSERT_TRUE(WriteSafetensorsFile(dir / "partial.safetensors", partial, {}).ok());
  ASSERT_TRUE(WriteSafetensorsFile(dir / "full.safetensors", full, {}).ok());
  ASSERT_TRUE(
      WriteSafetensorsFile(
          dir / "none.safetensors",
          {IdentityBlocks(p + "q_proj.hessian", 32), IdentityBlocks(p + "o_proj.hessian", 32)}, {})
          .ok());
  auto run = [&](const std::string& hessians, ActivationMode mode, const std::string& out,
                 RecordingObserver* observer = nullptr) {
    QuantizeOptions options;
    options.model_dir = dir / "model";
    options.hessians_path = dir / hessians;
    options.out_dir = dir / out;
    options.activations = mode;
    return RunPipeline(options, observer);
  };
  auto labels = [&](const std::string& out) {
    const nlohmann::json config = nlohmann::json::parse(ReadAll(dir / out + "/config.json"));
    const nlohmann::json hf = nlohmann::json::parse(ReadAll(dir / out + "/hf_quant_config.json"));
    EXPECT_EQ(config["quantization_config"]["quant_algo"], hf["quantization"]["quant_algo"]);
    return std::make_pair(config["quantization_config"],
                          hf["quantization"]["quant_algo"].get<std::string>());
  };
  auto input_scales = [&](const std::string& out) {
    auto file = SafetensorsFile::Open(dir / out + "/model.safetensors");
    EXPECT_TRUE(file.ok()) << file.status();
    std::map<std::string, float> scales;
    for (const char* leaf : {"q_proj", "k_proj", "o_proj"}) {
      const SafetensorsTensor* t = (*file)->Find(p + leaf + ".input_scale");
      if (t == nullptr) continue;
      EXPECT_TRUE(t->shape.empty()) << leaf;
      float v = 0.0f;
      std::memcpy(&v, t->data, 4);
      scales[leaf] = v;
    }
    return scales;
  };

  // Every module has its amax: W4A4.
  ASSERT_TRUE(run("full.safetensors", ActivationMode::kAuto, "w4a4").ok());
  auto [w4a4_config, w4a4_algo] = labels("w4a4");
  EXPECT_EQ(w4a4_algo, "NVFP4");
  EXPECT_TRUE(w4a4_config["config_groups"]["group_0"].contains("input_activations"));
  const std::map<std::string, float> want = {
      {"q_proj", 13.5f / 2688.0f}, {"k_proj", 13.5f / 2688.0f}, {"o_proj", 7.0f / 2688.0f}};
  EXPECT_EQ(input_scales("w4a4"), want);  // NUMERICS §5: amax / (6 * 448)

  // None has: weight-only, with a note.
  RecordingObserver observer;
  ASSERT_TRUE(run("none.safetensors", ActivationMode::kAuto, "w4a16", &observer).ok());
  auto [w4a16_config, w4a16_algo] = labels("w4a16");
  EXPECT_EQ(w4a16_algo, "W4A16_NVFP4");
  EXPECT_FALSE(w4a16_config["config_groups"]["group_0"].contains("input_activations"));
  EXPECT_TRUE(input_scales("w4a16").empty());
  bool noted = false;
  for (const std::string& m : observer.messages) {
    noted = noted || m.find("weight-only output (W4A16_NVFP4)") != std::string::npos;
  }
  EXPECT_TRUE(noted);

  // Some have: an error naming the module without, nothing written.
  absl::StatusOr<QuantizeReport> mixed = run("partial.safetensors", ActivationMode::kAuto, "mixed");
  ASSERT_FALSE(mixed.ok());
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(mixed.status().message()),
              HasSubstr("of 2 of 3 quantized modules, not of " + p + "o_proj"));
  EXPECT_THAT(std::string(mixed.status().message()), HasSubstr("--activations none"));
  EXPECT_FALSE(fs::exists(dir / "mixed"));

  // ... unless the user asks for weight-only.
  ASSERT_TRUE(run("partial.safetensors", ActivationMode::kNone, "asked_none").ok());
  EXPECT_EQ(labels("asked_none").second, "W4A16_NVFP4");
  EXPECT_TRUE(input_scales("asked_none").empty());
  ASSERT_TRUE(run("full.safetensors", ActivationMode::kNone, "full_none").ok());
  EXPECT_TRUE(input_scales("full_none").empty());

  // Asking for W4A4 without every amax is an error naming the missing.
  absl::StatusOr<QuantizeReport> asked = run("none.safetensors", ActivationMode::kNvfp4, "asked");
  ASSERT_FALSE(asked.ok());
  EXPECT_THAT(std::string(asked.status().message()),
              HasSubstr("--activations nvfp4 needs the activation amax"));
  EXPECT_THAT(std::string(asked.status().message()), HasSubstr("3 of 3 have none: "));
  EXPECT_FALSE(fs::exists(dir / "asked"));

  // inspect reads the labels against the tensors.
  absl::StatusOr<std::string> inspected = InspectCheckpoint(dir / "w4a4");
  ASSERT_TRUE(inspected.ok());
  EXPECT_THAT(*inspected, HasSubstr("input_scale: 3 of 3 NVFP4 modules"));
  EXPECT_THAT(*inspected, Not(HasSubstr("warning")));
  // A planted fault: a W4A4 label on the weight-only output.
  std::string config_text = ReadAll(dir / "w4a16/config.json");
  config_text.replace(config_text.find("W4A16_NVFP4"), 11, "NVFP4");
  testing::WriteAll(dir / "w4a16/config.json", config_text);
  inspected = InspectCheckpoint(dir / "w4a16");
  ASSERT_TRUE(inspected.ok());
  EXPECT_THAT(*inspected, HasSubstr("warning: config.json says quant_algo NVFP4 but "
                                    "hf_quant_config.json says W4A16_NVFP4"));
  EXPECT_THAT(*inspected, HasSubstr("warning: quant_algo NVFP4 (W4A4) promises an input_scale for "
                                    "every quantized module; 3 have none"));
  absl::StatusOr<std::string> as_json = InspectCheckpoint(dir / "w4a16", InspectFormat::kJson);
  ASSERT_TRUE(as_json.ok());
  const nlohmann::json j = nlohmann::json::parse(*as_json);
  EXPECT_EQ(j["label"]["config_quant_algo"], "NVFP4");
  EXPECT_EQ(j["label"]["hf_quant_algo"], "W4A16_NVFP4");
  EXPECT_EQ(j["nvfp4_modules"].size(), 3u);
  EXPECT_TRUE(j["nvfp4_modules"][0]["input_scale"].is_null());
  EXPECT_EQ(j["input_scales"], 0);
  ASSERT_EQ(j["warnings"].size(), 2u);
  EXPECT_THAT(j["warnings"][1].get<std::string>(), HasSubstr("3 have none"));
  as_json = InspectCheckpoint(dir / "w4a4", InspectFormat::kJson);
  ASSERT_TRUE(as_json.ok());
  const nlohmann::json w4a4 = nlohmann::json::parse(*as_json);
  EXPECT_EQ(w4a4["input_scales"], 3);
  EXPECT_TRUE(w4a4["warnings"].empty());
  EXPECT_EQ(w4a4["nvfp4_modules"][0]["input_scale"], 13.5f / 2688.0f);

  // A malformed amax is an error naming it, before anything is written.
  ASSERT_TRUE(
      WriteSafetensorsFile(
          dir / "bad.safetensors",
          {IdentityBlocks(p + "q_proj.hessian", 32), Scalar(p + "q_proj.input_amax", -1.0f)}, {})
          .ok());
  absl::StatusOr<QuantizeReport> bad = run("bad.safetensors", ActivationMode::kAuto, "out_bad");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr(p + "q_proj.input_amax = -1"));
  EXPECT_FALSE(fs::exists(dir / "out_bad"));
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
