#include "client/example_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/checkpoint.h"
#include "client/parallel.h"
#include "client/quantize_checkpoint.h"
#include "client/safetensors.h"
#include "client/temp_dir.h"
#include "common/file_util.h"
#include "nlohmann/json.hpp"
#include "nvfp4cal/kernels/example_data.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using OrderedJson = nlohmann::ordered_json;

template <typename T>
std::vector<uint8_t> ToBytes(const std::vector<T>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(T));
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

// A bf16 Linear weight [rows, cols]: example statistics plus outlier input columns (about one
// column in 64 scaled by 6-12x, as the input channels that LLMs concentrate magnitude in).
SafetensorsTensorData LinearWeight(const std::string& name, int64_t rows, int64_t cols,
                                   uint64_t seed) {
  std::vector<float> w = MakeExampleWeights(rows, cols, seed);
  ExampleRng rng(seed ^ 0x5EEDull);
  for (int64_t c = 0; c < cols; ++c) {
    if (rng.Uniform() >= 1.0 / 64) continue;
    const float boost = static_cast<float>(6.0 + 6.0 * rng.Uniform());
    for (int64_t r = 0; r < rows; ++r) w[static_cast<size_t>(r * cols + c)] *= boost;
  }
  std::vector<uint16_t> bits(w.size());
  for (size_t i = 0; i < w.size(); ++i) bits[i] = FloatToBFloat16(w[i]);
  return {{name, SafetensorsDType::kBF16, {rows, cols}}, ToBytes(bits)};
}

SafetensorsTensorData NormWeight(const std::string& name, int64_t n, uint64_t seed) {
  ExampleRng rng(seed);
  std::vector<uint16_t> bits(static_cast<size_t>(n));
  for (uint16_t& b : bits) b = FloatToBFloat16(static_cast<float>(1.0 + 0.1 * rng.Normal()));
  return {{name, SafetensorsDType::kBF16, {n}}, ToBytes(bits)};
}

// Full Hessian [n, n] = X^T X / T of synthetic activations: channels share a few latent
// factors (correlated inputs) and about one channel in 32 is an outlier (10-30x).
SafetensorsTensorData FullHessian(const std::string& name, int64_t n, uint64_t seed) {
  constexpr int kTokens = 384;
  constexpr int kFactors = 4;
  ExampleRng rng(seed);
  std::vector<double> scale(static_cast<size_t>(n));
  std::vector<double> loading(static_cast<size_t>(n * kFactors));
  for (int64_t i = 0; i < n; ++i) {
    scale[static_cast<size_t>(i)] =
        (0.3 + rng.Uniform()) * (rng.Uniform() < 1.0 / 32 ? 10.0 + 20.0 * rng.Uniform() : 1.0);
    for (int f = 0; f < kFactors; ++f)
      loading[static_cast<size_t>(i * kFactors + f)] = rng.Normal();
  }
  std::vector<double> x(static_cast<size_t>(kTokens * n));
  for (int t = 0; t < kTokens; ++t) {
    double factor[kFactors];
    for (double& f : factor) f = rng.Normal();
    for (int64_t i = 0; i < n; ++i) {
      double v = 0.7 * rng.Normal();
      for (int f = 0; f < kFactors; ++f)
        v += 0.35 * factor[f] * loading[static_cast<size_t>(i * kFactors + f)];
      x[static_cast<size_t>(t * n + i)] = scale[static_cast<size_t>(i)] * v;
    }
  }
  // Token-minor copy, so that both operands of a dot product are contiguous; four columns at
  // once (independent sums, each over t in order: the same values as one at a time).
  std::vector<double> xt(x.size());
  for (int t = 0; t < kTokens; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      xt[static_cast<size_t>(i * kTokens + t)] = x[static_cast<size_t>(t * n + i)];
    }
  }
  std::vector<float> h(static_cast<size_t>(n * n));
  auto store = [&](int64_t i, int64_t j, double s) {
    const float v = static_cast<float>(s / kTokens);
    h[static_cast<size_t>(i * n + j)] = v;
    h[static_cast<size_t>(j * n + i)] = v;
  };
  auto row = [&](int64_t i) {
    const double* a = &xt[static_cast<size_t>(i * kTokens)];
    int64_t j = i;
    for (; j + 4 <= n; j += 4) {
      const double* b = &xt[static_cast<size_t>(j * kTokens)];
      double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
      for (int t = 0; t < kTokens; ++t) {
        s0 += a[t] * b[t];
        s1 += a[t] * b[kTokens + t];
        s2 += a[t] * b[2 * kTokens + t];
        s3 += a[t] * b[3 * kTokens + t];
      }
      store(i, j, s0);
      store(i, j + 1, s1);
      store(i, j + 2, s2);
      store(i, j + 3, s3);
    }
    for (; j < n; ++j) {
      const double* b = &xt[static_cast<size_t>(j * kTokens)];
      double s = 0.0;
      for (int t = 0; t < kTokens; ++t) s += a[t] * b[t];
      store(i, j, s);
    }
  };
  // Large matrices (an 8B model's down_proj: 14336^2 x 384 multiply-adds) on every thread,
  // interleaved rows so the triangle's work is balanced; the values do not depend on it.
  if (n >= 8192) {
    constexpr size_t kStripes = 64;
    ParallelFor(kStripes, [&](size_t stripe) {
      for (int64_t i = static_cast<int64_t>(stripe); i < n; i += kStripes) row(i);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) row(i);
  }
  return {{name, SafetensorsDType::kF32, {n, n}}, ToBytes(h)};
}

// Runs the generators on every hardware thread; results in the generators' order.
std::vector<SafetensorsTensorData> GenerateAll(
    const std::vector<std::function<SafetensorsTensorData()>>& makers) {
  std::vector<SafetensorsTensorData> out(makers.size());
  ParallelFor(makers.size(), [&](size_t i) { out[i] = makers[i](); });
  return out;
}

SafetensorsTensorData BlockHessian(const std::string& name, int64_t n, uint64_t seed) {
  return {{name, SafetensorsDType::kF32, {n / 16, 16, 16}},
          ToBytes(MakeExampleHessianBlocks(n / 16, seed))};
}

absl::Status CheckOptions(const ExampleModelOptions& o) {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("example model: ", what));
  };
  if (o.layers < 1 || o.layers > 64)
    return bad(absl::StrCat("--layers ", o.layers, " not in [1, 64]"));
  if (o.hidden < 16 || o.hidden > 8192 || o.hidden % 16 != 0) {
    return bad(absl::StrCat("--hidden ", o.hidden, " must be a multiple of 16 in [16, 8192]"));
  }
  if (o.intermediate < 16 || o.intermediate > 32768 || o.intermediate % 16 != 0) {
    return bad(absl::StrCat("--intermediate ", o.intermediate,
                            " must be a multiple of 16 in [16, 32768]"));
  }
  if (o.heads < 1 || o.hidden % o.heads != 0 || o.kv_heads < 1 || o.heads % o.kv_heads != 0) {
    return bad(absl::StrCat("--heads ", o.heads, " / --kv-heads ", o.kv_heads,
                            " must divide hidden ", o.hidden, " and each other"));
  }
  if (o.vocab < 16 || o.vocab > 262144)
    return bad(absl::StrCat("--vocab ", o.vocab, " not in [16, 262144]"));
  if (o.shards < 1 || o.shards > 99)
    return bad(absl::StrCat("--shards ", o.shards, " not in [1, 99]"));
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteExampleModel(const std::string& out_dir, const ExampleModelOptions& o) {
  absl::Status valid = CheckOptions(o);
  if (!valid.ok()) return valid;
  OutputTarget target;
  target.out_dir = out_dir;
  target.overwrite = o.overwrite;
  absl::Status out_ok = CheckOutputTarget(target);
  if (!out_ok.ok()) return out_ok;
  const int64_t hidden = o.hidden;
  const int64_t inter = o.intermediate;
  const int64_t head_dim = hidden / o.heads;
  const int64_t kv = head_dim * o.kv_heads;
  uint64_t seed = o.seed * 1000003ull;

  // Every tensor is generated from its own seed, in this fixed order, so the files do not
  // depend on how many threads build them.
  using Generator = std::function<SafetensorsTensorData()>;
  std::vector<Generator> tensor_makers;
  std::vector<Generator> hessian_makers;
  {
    const uint64_t s = ++seed;
    tensor_makers.push_back([s, &o, hidden] {
      // Embeddings: small Gaussian values.
      ExampleRng rng(s);
      std::vector<uint16_t> bits(static_cast<size_t>(o.vocab * hidden));
      for (uint16_t& b : bits) b = FloatToBFloat16(static_cast<float>(0.02 * rng.Normal()));
      return SafetensorsTensorData{
          {"model.embed_tokens.weight", SafetensorsDType::kBF16, {o.vocab, hidden}}, ToBytes(bits)};
    });
  }
  auto norm = [&](std::string name, int64_t n) {
    const uint64_t s = ++seed;
    tensor_makers.push_back([name, n, s] { return NormWeight(name, n, s); });
  };
  auto linear = [&](std::string name, int64_t rows, int64_t cols) {
    const uint64_t s = ++seed;
    tensor_makers.push_back([name, rows, cols, s] { return LinearWeight(name, rows, cols, s); });
  };
  auto hessian = [&](std::string name, int64_t n, bool full) {
    const uint64_t s = ++seed;
    hessian_makers.push_back(
        [name, n, s, full] { return full ? FullHessian(name, n, s) : BlockHessian(name, n, s); });
  };
  for (int l = 0; l < o.layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    norm(p + "input_layernorm.weight", hidden);
    norm(p + "post_attention_layernorm.weight", hidden);
    linear(p + "self_attn.q_proj.weight", hidden, hidden);
    linear(p + "self_attn.k_proj.weight", kv, hidden);
    linear(p + "self_attn.v_proj.weight", kv, hidden);
    linear(p + "self_attn.o_proj.weight", hidden, hidden);
    linear(p + "mlp.gate_proj.weight", inter, hidden);
    linear(p + "mlp.up_proj.weight", inter, hidden);
    linear(p + "mlp.down_proj.weight", hidden, inter);
    hessian(p + "self_attn.q_proj.hessian", hidden, /*full=*/true);
    hessian(p + "self_attn.o_proj.hessian", hidden, /*full=*/o.full_hessians);
    hessian(p + "mlp.gate_proj.hessian", hidden, /*full=*/true);
    hessian(p + "mlp.down_proj.hessian", inter, /*full=*/o.full_hessians);
  }
  norm("model.norm.weight", hidden);
  linear("lm_head.weight", o.vocab, hidden);
  std::vector<SafetensorsTensorData> tensors = GenerateAll(tensor_makers);
  std::vector<SafetensorsTensorData> hessians = GenerateAll(hessian_makers);

  absl::StatusOr<std::string> temp = MakeTempDirBeside(out_dir);
  if (!temp.ok()) return temp.status();
  auto fail = [&](const absl::Status& status) {
    RemoveTree(*temp).IgnoreError();
    return status;
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (o.shards == 1) {
    absl::Status s =
        WriteSafetensorsFile((fs::path(*temp) / kSingleFileName).string(), tensors, metadata);
    if (!s.ok()) return fail(s);
  } else {
    // Consecutive runs of tensors (in name order) of about equal size per shard.
    std::sort(tensors.begin(), tensors.end(),
              [](const auto& a, const auto& b) { return a.spec.name < b.spec.name; });
    int64_t total = 0;
    for (const auto& t : tensors) total += static_cast<int64_t>(t.bytes.size());
    std::vector<std::vector<SafetensorsTensorData>> shards(static_cast<size_t>(o.shards));
    OrderedJson weight_map = OrderedJson::object();
    int64_t done = 0;
    for (auto& t : tensors) {
      const size_t shard =
          std::min(static_cast<size_t>(o.shards - 1),
                   static_cast<size_t>(done * o.shards / std::max<int64_t>(total, 1)));
      done += static_cast<int64_t>(t.bytes.size());
      weight_map[t.spec.name] =
          absl::StrFormat("model-%05d-of-%05d.safetensors", shard + 1, o.shards);
      shards[shard].push_back(std::move(t));
    }
    for (int s = 0; s < o.shards; ++s) {
      const std::string name = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, o.shards);
      absl::Status w = WriteSafetensorsFile((fs::path(*temp) / name).string(),
                                            shards[static_cast<size_t>(s)], metadata);
      if (!w.ok()) return fail(w);
    }
    OrderedJson index = OrderedJson::object();
    index["metadata"] = {{"total_size", total}};
    index["weight_map"] = std::move(weight_map);
    absl::Status w =
        WriteTextFile((fs::path(*temp) / kIndexFileName).string(), index.dump(2) + "\n");
    if (!w.ok()) return fail(w);
  }
  absl::Status h =
      WriteSafetensorsFile((fs::path(*temp) / "hessians.safetensors").string(), hessians,
                           {{"calib_tokens", "384"}, {"producer", "nvfp4cal example"}});
  if (!h.ok()) return fail(h);

  OrderedJson config = OrderedJson::object();
  config["architectures"] = {"LlamaForCausalLM"};
  config["model_type"] = "llama";
  config["vocab_size"] = o.vocab;
  config["hidden_size"] = hidden;
  config["intermediate_size"] = inter;
  config["num_hidden_layers"] = o.layers;
  config["num_attention_heads"] = o.heads;
  config["num_key_value_heads"] = o.kv_heads;
  config["head_dim"] = head_dim;
  config["max_position_embeddings"] = 2048;
  config["rope_theta"] = 10000.0;
  config["rms_norm_eps"] = 1e-5;
  config["hidden_act"] = "silu";
  config["attention_bias"] = false;
  config["mlp_bias"] = false;
  config["tie_word_embeddings"] = false;
  config["torch_dtype"] = "bfloat16";
  OrderedJson generation = OrderedJson::object();
  generation["do_sample"] = false;
  generation["max_new_tokens"] = 32;
  for (const absl::Status& s :
       {WriteTextFile((fs::path(*temp) / kConfigFileName).string(), config.dump(2) + "\n"),
        WriteTextFile((fs::path(*temp) / "generation_config.json").string(),
                      generation.dump(2) + "\n"),
        WriteTextFile((fs::path(*temp) / kProducerRecordFileName).string(),
                      ProducerRecordJson("example"))}) {
    if (!s.ok()) return fail(s);
  }
  absl::Status replaced = ReplaceWithTempDir(*temp, target);
  if (!replaced.ok()) return fail(replaced);
  return absl::OkStatus();
}

}  // namespace nvfp4cal
