// `nvfp4cal inspect` and `nvfp4cal dequantize`: reading NVFP4 checkpoints back.
//
//   absl::StatusOr<std::string> summary = nvfp4cal::InspectCheckpoint("/models/llama-nvfp4");
//   // shards, tensors, sizes by dtype, quantization config, one line per quantized module
//
//   nvfp4cal::DequantizeOptions options{"/models/llama-nvfp4", "/models/llama-deq"};
//   absl::Status s = nvfp4cal::DequantizeCheckpoint(options);
//   // every NVFP4 module back to a dense weight: w = e2m1(code) * e4m3(weight_scale) *
//   // weight_scale_2 in fp32 (then rounded to bf16 unless dtype is F32)
#ifndef NVFP4CAL_CLIENT_INSPECT_H_
#define NVFP4CAL_CLIENT_INSPECT_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/output_dir.h"
#include "client/safetensors.h"

namespace nvfp4cal {

enum class InspectFormat { kText, kJson };

// A summary of a checkpoint folder (quantized or not, made by any tool): shards, tensors, sizes
// by dtype, the labels (config.json's quantization_config, hf_quant_config.json), the NVFP4
// modules, how many have an input_scale and a KV-cache scale, and a warning for every label
// that promises more or less than the tensors hold. kText: lines for people ("warning: ...");
// kJson: the same as one JSON object (`inspect --json`). Errors as Checkpoint::Open;
// INVALID_ARGUMENT naming the module when NVFP4 tensors have inconsistent shapes or dtypes.
// With `against` (another checkpoint folder, `inspect --against`): for every NVFP4 module both
// have with the same shapes, how many block scales (weight_scale bytes) and E2M1 codes differ
// and whether weight_scale_2 does (e.g. after `finetune-scales`, or between two methods).
absl::StatusOr<std::string> InspectCheckpoint(const std::string& dir,
                                              InspectFormat format = InspectFormat::kText,
                                              const std::string& against = "");

struct DequantizeOptions {
  std::string in_dir;
  std::string out_dir;
  // kBF16 (the usual weight dtype) or kF32 (exact dequantized values).
  SafetensorsDType dtype = SafetensorsDType::kBF16;
  // What may happen to an existing out_dir (output_dir.h).
  OverwritePolicy overwrite = OverwritePolicy::kNever;
};

// Writes a dense copy of an NVFP4 checkpoint (ModelOpt or compressed-tensors layout): each
// module's codes (`<m>.weight` or `<m>.weight_packed`, U8) with its `weight_scale` and global
// scale become one `<m>.weight` [out, in] ([experts, out, in] for a 3-D expert tensor) in
// options.dtype, by each layout's own rule (ModelOpt: code * weight_scale * weight_scale_2;
// compressed-tensors: code * (weight_scale / weight_global_scale)); other tensors and files
// are copied (no `.safetensors` file that is not a shard); config.json loses quantization_config;
// sharding and the index are kept; nvfp4cal.json records the producer. Errors of CheckOutputTarget
// on out_dir (which must not be or contain in_dir); FAILED_PRECONDITION when the input has no NVFP4
// module.
absl::Status DequantizeCheckpoint(const DequantizeOptions& options);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_INSPECT_H_
