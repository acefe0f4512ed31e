// `nvfp4cal example`: writes a small Llama-shaped checkpoint with matching Hessians, so that a
// first run needs no network and no model download.
//
//   nvfp4cal::ExampleModelOptions options;   // 2 layers, hidden 256, MLP 688, GQA 4/2 heads
//   absl::Status s = nvfp4cal::WriteExampleModel("/tmp/example", options);
//   // /tmp/example: config.json, generation_config.json, model.safetensors (or shards and
//   // model.safetensors.index.json), hessians.safetensors, nvfp4cal.json
//
// Weights are bf16 with trained-looking statistics (kernels' example_data.h: per-row spread,
// rare outliers) plus a few outlier input columns per matrix. Hessians are X^T X / T of
// synthetic activations with correlated channels and outlier channels. The Hessians file uses
// both accepted layouts and the sharing rule of hessians.h: per layer `q_proj.hessian` (full
// [hidden, hidden], shared by k_proj and v_proj), `gate_proj.hessian` (full, shared by up_proj),
// `o_proj.hessian` and `down_proj.hessian` as diagonal blocks [in/16, 16, 16].
// Everything is deterministic for a given seed.
#ifndef NVFP4CAL_CLIENT_EXAMPLE_MODEL_H_
#define NVFP4CAL_CLIENT_EXAMPLE_MODEL_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "client/output_dir.h"

namespace nvfp4cal {

struct ExampleModelOptions {
  int layers = 2;
  int hidden = 256;
  int intermediate = 688;
  int heads = 4;
  int kv_heads = 2;
  int vocab = 512;
  // 1: model.safetensors; more: model-0000i-of-0000n.safetensors with an index.
  int shards = 1;
  uint64_t seed = 1;
  // What may happen to an existing folder (output_dir.h).
  OverwritePolicy overwrite = OverwritePolicy::kNever;
  // Every Hessian full [in, in] (o_proj and down_proj too), so that method gptq can quantize
  // every module; by default o_proj and down_proj get diagonal blocks.
  bool full_hessians = false;
};

// Writes the example into `out_dir` (through a temporary folder renamed at the end), with
// nvfp4cal.json recording the producer. Errors of CheckOutputTarget on out_dir; INVALID_ARGUMENT
// for sizes that do not make a Llama (hidden not divisible by heads, heads not by kv_heads,
// sizes < 16, ...).
absl::Status WriteExampleModel(const std::string& out_dir, const ExampleModelOptions& options);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_EXAMPLE_MODEL_H_
