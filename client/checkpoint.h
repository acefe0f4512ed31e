// Checkpoint: a Hugging Face safetensors model folder opened for reading, and the plan of which
// Linear weights of it get quantized (include/exclude globs, default excludes, fused siblings).
//
//   absl::StatusOr<std::unique_ptr<nvfp4cal::Checkpoint>> model =
//       nvfp4cal::Checkpoint::Open("/models/llama");       // config.json + shard(s) (+ index)
//   nvfp4cal::PlanOptions plan_options;                      // defaults: every eligible Linear
//   absl::StatusOr<std::vector<nvfp4cal::ModulePlan>> plan =
//       nvfp4cal::PlanModules(**model, plan_options);
//
// A folder holds `config.json` and either `model.safetensors` or the shards listed by
// `model.safetensors.index.json`. Tensors stay memory-mapped; nothing is copied.
#ifndef NVFP4CAL_CLIENT_CHECKPOINT_H_
#define NVFP4CAL_CLIENT_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/safetensors.h"
#include "nvfp4cal/kernels/dtype.h"

namespace nvfp4cal {

inline constexpr char kSingleFileName[] = "model.safetensors";
inline constexpr char kIndexFileName[] = "model.safetensors.index.json";
inline constexpr char kConfigFileName[] = "config.json";
inline constexpr char kHfQuantConfigFileName[] = "hf_quant_config.json";
// The producer record `example` and `dequantize` leave in their output (quantize's is in
// hf_quant_config.json): {"producer": {"name": "nvfp4cal", "version": ...}, "command": ...}.
inline constexpr char kProducerRecordFileName[] = "nvfp4cal.json";

class Checkpoint {
 public:
  // Opens the folder. Errors name the folder and the file: NOT_FOUND for a missing folder,
  // config.json or weights, or a shard the index names that does not exist; INVALID_ARGUMENT
  // for an unreadable config or index, a corrupt shard, a tensor the index puts in a shard that
  // lacks it, a tensor in two shards, or a file that is not a regular file (a FIFO, ...).
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  struct Shard {
    std::string file_name;  // relative to dir, e.g. "model-00001-of-00002.safetensors"
    std::unique_ptr<SafetensorsFile> file;
  };
  struct Entry {
    const SafetensorsTensor* tensor = nullptr;
    size_t shard = 0;
  };

  const std::string& dir() const { return dir_; }
  // config.json as text.
  const std::string& config_text() const { return config_text_; }
  // Whether the weights came with model.safetensors.index.json.
  bool sharded() const { return sharded_; }
  // The index's "metadata" object as JSON text ("{}" when none).
  const std::string& index_metadata_json() const { return index_metadata_json_; }
  const std::vector<Shard>& shards() const { return shards_; }
  // Every tensor by name.
  const std::map<std::string, Entry>& tensors() const { return tensors_; }
  const Entry* Find(const std::string& name) const;
  // Files and folders of dir other than config.json, the index and the shards (tokenizer,
  // generation config, ...), relative to dir; without nvfp4cal's own records
  // (hf_quant_config.json, nvfp4cal.json), which describe the folder rather than the model, and
  // temporary folders.
  std::vector<std::string> OtherFiles() const;
  // Bytes of all shards' tensor data.
  int64_t total_tensor_bytes() const;

 private:
  std::string dir_;
  std::string config_text_;
  bool sharded_ = false;
  std::string index_metadata_json_ = "{}";
  std::vector<Shard> shards_;
  std::map<std::string, Entry> tensors_;
};

// Which modules to quantize.
struct PlanOptions {
  // Glob patterns (fnmatch, `*` crosses dots) matched against the module name and the weight
  // name; when non-empty, only modules matching one are quantized.
  std::vector<std::string> includes;
  // Modules matching any of these are not quantized.
  std::vector<std::string> excludes;
  // Apply DefaultExcludes() too.
  bool default_excludes = true;
};

// NUMERICS §5's default excludes: lm_head, routers, MoE gates, output layers, embeddings,
// vision towers.
const std::vector<std::string>& DefaultExcludes();

// One Linear-like weight of the checkpoint: a 2-D float tensor named `<module>.weight`
// [out, in], or a 3-D one [experts, out, in] (fused MoE experts, quantized expert by expert).
struct ModulePlan {
  std::string module;       // "model.layers.0.self_attn.q_proj"
  std::string weight_name;  // module + ".weight"
  int64_t experts = 0;      // 0: a 2-D weight; else the leading dimension of a 3-D one
  int64_t rows = 0;         // out features (of one expert)
  int64_t cols = 0;         // in features
  DType dtype = DType::kBFloat16;
  bool quantize = false;
  // Why it is not quantized: "excluded by default pattern '*lm_head*'", "in = 100 is not a
  // multiple of 16", ...
  std::string skip_reason;
  // Fused siblings (q|k|v, gate|up, w1|w3 under one parent) share one key and one global amax;
  // empty for modules that fuse with nothing.
  std::string fused_group;
};

// Whether `t` is a 3-D fused expert weight (a `.weight`, or a tensor under `.experts.` as
// gpt-oss-style checkpoints name them) in a float dtype.
bool IsFusedExpertTensor(const std::string& name, const SafetensorsTensor& t);

// The name of expert `e` of a 3-D module, as Hessian entries and reports name it:
// "<module>.<e>" ("model.layers.0.mlp.experts.w1.3"); the module itself for a 2-D one (e < 0).
std::string ExpertName(const std::string& module, int64_t expert);

// The Linear-like weights in name order with the decision for each. A 3-D `.weight` is
// [experts, out, in] (the nn.Linear convention per expert) and is planned like a 2-D one; a 3-D
// tensor under `.experts.` without `.weight` (gpt-oss / Llama-4 style `gate_up_proj`, stored
// [experts, in, out] by some models and [experts, out, in] by others) is listed, not quantized.
// INVALID_ARGUMENT naming the tensor for a selected `.weight` whose dtype is not BF16, F16 or
// F32, or whose output tensor names (`.weight_scale`, `.weight_scale_2`) already exist.
absl::StatusOr<std::vector<ModulePlan>> PlanModules(const Checkpoint& checkpoint,
                                                    const PlanOptions& options);

// The fused-group key of a module ("<parent>|qkv", "<parent>|gate_up", "<parent>|w13") or "".
std::string FusedGroupKey(const std::string& module);

// The fused siblings of a module's leaf name in their canonical order ({"q_proj", "k_proj",
// "v_proj"} for "k_proj"), empty when it has none.
std::vector<std::string> FusedSiblingLeaves(const std::string& leaf);

// The first `shown` names joined by ", ", then ", ... (N in all)" when there are more: how
// messages name a list of modules.
std::string FirstNames(const std::vector<std::string>& names, size_t shown = 5);

// fnmatch without flags: `*` matches any characters, dots included.
bool GlobMatch(const std::string& pattern, const std::string& text);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_CHECKPOINT_H_
