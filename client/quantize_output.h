// The files QuantizeCheckpoint writes into its temporary output folder. Internal to the
// quantize pipeline (quantize_checkpoint.cc); callers use QuantizeCheckpoint
// (quantize_checkpoint.h).
//
// The model folder's other files (CopyOtherFiles), the tensor specs of each output shard
// (OutputSpecs: untouched tensors as they are, quantized modules as NVFP4 tensors in the
// layout asked for), each quantized module's tensors as its results arrive (ModuleOutput),
// and the index and configs at the end (WriteIndexAndConfigs).
//
//   CopyOtherFiles(options, model, temp, observer);
//   SafetensorsWriter::Create(path, OutputSpecs(shard, layout, quantized, w4a4, kv), metadata);
//   ModuleOutput out(plan, layout, writer, /*input_scale=*/w4a4);
//   out.Add(expert, std::move(result), input_amax);   // from the quantizer's callbacks
//   WriteIndexAndConfigs(model, weight_map, bytes_out, exclude_modules, label, format, temp);
#ifndef NVFP4CAL_CLIENT_QUANTIZE_OUTPUT_H_
#define NVFP4CAL_CLIENT_QUANTIZE_OUTPUT_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "client/checkpoint.h"
#include "client/quantize_checkpoint.h"
#include "client/quantize_prepare.h"
#include "client/quantizer.h"
#include "client/safetensors.h"

namespace nvfp4cal::client_internal {

// The 4 bytes of an F32 scalar.
std::vector<uint8_t> FloatBytes(float value);

// The model folder's other files (tokenizer, ...) into `temp`: not the Hessians file or the
// output itself when they live there, and no `.safetensors` file that is not a shard of the
// model (runtimes load every `*.safetensors` of a folder without an index as weights; a
// Hessians file beside the weights would break the output), with a note naming each.
absl::Status CopyOtherFiles(const QuantizeOptions& options, const Checkpoint& model,
                            const std::string& temp, QuantizeObserver* observer);

// Output tensor specs of one shard: untouched tensors as they are, quantized modules (by their
// weight tensor's name) as the NVFP4 tensors of `layout` (the input scale for the modules in
// `with_input_scale`), and each KV-cache scale before the weight it belongs to.
std::vector<SafetensorsTensorSpec> OutputSpecs(
    const SafetensorsFile& shard, const Nvfp4Layout& layout,
    const std::map<std::string, const ModulePlan*>& quantized_by_weight,
    const std::set<std::string>& with_input_scale, const KvScalesByWeight& kv_scales);

// Writes one quantized module's tensors as its results arrive: a 2-D module at once, the
// experts of a 3-D one in expert order (results that arrive early wait here), then the
// per-expert weight_scale_2 and input_scale vectors. Thread-safe.
class ModuleOutput {
 public:
  ModuleOutput(const ModulePlan& plan, const Nvfp4Layout& layout, SafetensorsWriter* writer,
               bool input_scale)
      : plan_(plan), layout_(layout), writer_(writer), input_scale_(input_scale) {}

  // Expert `expert`'s result (0 for a 2-D module) with its input amax (used when an input scale
  // is written).
  absl::Status Add(int64_t expert, QuantizedTensor result, float input_amax);

 private:
  static void AppendFloat(float value, std::vector<uint8_t>* bytes);

  const ModulePlan& plan_;
  const Nvfp4Layout& layout_;
  SafetensorsWriter* const writer_;
  const bool input_scale_;
  absl::Mutex mu_;
  int64_t next_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int64_t, std::pair<QuantizedTensor, float>> waiting_ ABSL_GUARDED_BY(mu_);
  std::vector<uint8_t> global_scales_ ABSL_GUARDED_BY(mu_);
  std::vector<uint8_t> input_scales_ ABSL_GUARDED_BY(mu_);
};

// Into `folder`: the index (sharded models only; `weight_map`: output tensor -> shard file,
// `total_size`: the output's tensor bytes), config.json with the quantization_config of
// `format`, and for ModelOpt hf_quant_config.json.
absl::Status WriteIndexAndConfigs(const Checkpoint& model,
                                  const std::map<std::string, std::string>& weight_map,
                                  int64_t total_size,
                                  const std::vector<std::string>& exclude_modules,
                                  const QuantizationLabel& label, OutputFormat format,
                                  const std::string& folder);

}  // namespace nvfp4cal::client_internal

#endif  // NVFP4CAL_CLIENT_QUANTIZE_OUTPUT_H_
