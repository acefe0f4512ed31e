// QuantizeCheckpoint: the `nvfp4cal quantize` pipeline, one for in-process and remote modes.
//
// Hugging Face safetensors checkpoint + Hessians in, NVFP4 checkpoint (NUMERICS §5) out:
//   check --out (output_dir.h) -> plan the modules (checkpoint.h) -> resolve Hessians
//   (hessians.h) -> global amax per tensor or fused group -> the model folder's other files
//   (tokenizer, ...) -> per output shard, a SafetensorsWriter with the final header -> copy the
//   untouched tensors -> hand the quantized modules to the Quantizer and write each result as
//   it arrives -> index, config.json + quantization_config, hf_quant_config.json.
// Everything is written into a temporary folder beside --out (temp_dir.h) that is swapped onto
// --out at the very end, so a failed or interrupted run never leaves an --out that looks
// complete.
//
//   nvfp4cal::QuantizeOptions options;
//   options.model_dir = "/models/llama";
//   options.hessians_path = "/models/llama-hessians.safetensors";
//   options.out_dir = "/models/llama-nvfp4";
//   auto quantizer = nvfp4cal::MakeLocalQuantizer({});
//   absl::StatusOr<nvfp4cal::QuantizeReport> report =
//       nvfp4cal::QuantizeCheckpoint(options, quantizer->get(), /*observer=*/nullptr);
#ifndef NVFP4CAL_CLIENT_QUANTIZE_CHECKPOINT_H_
#define NVFP4CAL_CLIENT_QUANTIZE_CHECKPOINT_H_

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/checkpoint.h"
#include "client/output_dir.h"
#include "client/quantizer.h"
#include "client/trace.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {

// Whether the output quantizes activations too (W4A4, label NVFP4: every quantized module
// has its input_scale) or weights only (W4A16, label W4A16_NVFP4, no input_scale at all).
// A label never promises tensors the checkpoint lacks: runtimes trust it and would scale
// activations by an uninitialised input_scale.
enum class ActivationMode {
  // nvfp4 when the Hessians file has `<input>.input_amax` for every quantized module, none
  // when it has it for none (with a note); for some only: an error naming the others.
  kAuto,
  // Weights only, whatever amax the Hessians file has (none is written).
  kNone,
  // W4A4: an error naming the modules without an amax, if any.
  kNvfp4,
};

// "auto", "none", "nvfp4" (the CLI's --activations); INVALID_ARGUMENT otherwise.
absl::StatusOr<ActivationMode> ParseActivationMode(const std::string& text);

// FP8 KV cache as ModelOpt exports it: `<m>.k_scale` for every k_proj and `<m>.v_scale` for
// every v_proj (F32 scalars, = the module's output amax / 448, from `<m>.output_amax` in the
// Hessians file; an error naming the modules without one), label kv_cache_quant_algo FP8.
enum class KvCacheMode { kNone, kFp8 };

// "none", "fp8" (the CLI's --kv-cache); INVALID_ARGUMENT otherwise.
absl::StatusOr<KvCacheMode> ParseKvCacheMode(const std::string& text);

// Where the experts of a 3-D expert tensor `<m>.weight` [experts, out, in] find their Hessians.
enum class ExpertHessian {
  // Expert e: the module "<m>.<e>" (entry "<m>.<e>.hessian", an alias, ...), as a capture
  // that hooks each expert records it.
  kPerExpert,
  // Every expert: the module "<m>" (one Hessian of the whole layer's input, as routed tokens
  // averaged over experts).
  kShared,
};

// "per-expert", "shared" (the CLI's --expert-hessian); INVALID_ARGUMENT otherwise.
absl::StatusOr<ExpertHessian> ParseExpertHessian(const std::string& text);

// The checkpoint layout written: the same codes and block-scale bytes either way.
enum class OutputFormat {
  // NVIDIA ModelOpt's (hf_quant_config.json, quant_method "modelopt"): `<m>.weight` U8,
  // `<m>.weight_scale` F8_E4M3, `<m>.weight_scale_2` F32 [] = g / 2688, `<m>.input_scale`
  // F32 [] = amax / 2688; KV scales `<k_proj>.k_scale`, `<v_proj>.v_scale`.
  kModelOpt,
  // compressed-tensors' nvfp4-pack-quantized (what llm-compressor writes; quant_method
  // "compressed-tensors"): `<m>.weight_packed` U8, `<m>.weight_scale` F8_E4M3,
  // `<m>.weight_global_scale` F32 [1] = 1 / weight_scale_2 (the divisor:
  // w = code * (weight_scale / weight_global_scale)), `<m>.input_global_scale` F32 [1] =
  // 2688 / amax; KV scales `<attention>.k_scale`, `<attention>.v_scale` F32 [1].
  kCompressedTensors,
};

// "modelopt", "compressed-tensors" (the CLI's --format); INVALID_ARGUMENT otherwise.
absl::StatusOr<OutputFormat> ParseOutputFormat(const std::string& text);

// The tensor names and conventions of an NVFP4 module in one layout.
struct Nvfp4Layout {
  OutputFormat format;
  const char* name;          // "modelopt", "compressed-tensors"
  const char* codes;         // ".weight", ".weight_packed"
  const char* global_scale;  // ".weight_scale_2", ".weight_global_scale"
  const char* input_scale;   // ".input_scale", ".input_global_scale"
  // The global and input scales are stored as reciprocals (divisors) of ModelOpt's.
  bool divisor;
  // The shape of a per-tensor scale: [] (ModelOpt) or [1] (compressed-tensors).
  bool scalar_as_vector;
};
const Nvfp4Layout& LayoutOf(OutputFormat format);

// The stored global scale of a tensor whose ModelOpt weight_scale_2 is `s2`: s2, or 1 / s2
// for compressed-tensors (1 for an all-zero tensor's s2 = 0: its codes are all 0).
float StoredGlobalScale(const Nvfp4Layout& layout, float s2);
// The stored activation scale for an activation amax: amax / 2688, or 2688 / amax.
float StoredInputScale(const Nvfp4Layout& layout, float amax);

// The FP8 KV-cache scale tensor of a k_proj / v_proj module in `layout`: "<m>.k_scale" /
// "<m>.v_scale" (ModelOpt names it after the projection), "<attention>.k_scale" /
// "<attention>.v_scale" (compressed-tensors, after the projection's parent); "" for any other
// module.
std::string KvScaleName(const Nvfp4Layout& layout, const std::string& module);

// What the labels of an output say (and its tensors hold).
struct QuantizationLabel {
  // W4A4 NVFP4 (every quantized module has input_scale), else weight-only W4A16_NVFP4.
  bool activations = false;
  // FP8 KV cache (every k_proj / v_proj has k_scale / v_scale).
  bool kv_cache_fp8 = false;
};

struct QuantizeOptions {
  std::string model_dir;
  // Empty: no Hessians (only `max` and `mse`, or a fallback method, can run).
  std::string hessians_path;
  std::string out_dir;
  // Method and its parameters for every quantized module.
  SearchParams params;
  // Used for modules that have no Hessian when params.method needs one; must not need one
  // itself. Unset: such a module is an error naming it.
  std::optional<Method> fallback_method;
  PlanOptions plan;
  // W4A4 or weight-only output (and its label).
  ActivationMode activations = ActivationMode::kAuto;
  // FP8 KV-cache scales (and the label) or none.
  KvCacheMode kv_cache = KvCacheMode::kNone;
  // The checkpoint layout.
  OutputFormat format = OutputFormat::kModelOpt;
  // Hessians of the experts of 3-D expert tensors.
  ExpertHessian expert_hessian = ExpertHessian::kPerExpert;
  // What may happen to an existing out_dir (output_dir.h).
  OverwritePolicy overwrite = OverwritePolicy::kNever;
  // Other files the run reads (TLS files, the token file), which out_dir must not contain;
  // model_dir and hessians_path are always checked.
  std::vector<RunInput> other_inputs;
  // Set from another thread (a signal handler) to stop between tensors with CANCELLED.
  const std::atomic<bool>* cancel = nullptr;
  // Where the run records its stages' timeline (--trace), or null.
  Trace* trace = nullptr;
  // Memory the pipeline may hold for tensors read ahead of the quantizer (weights and full
  // Hessians read, not yet quantized and written); a tensor larger than it is read alone.
  // 0: 8 groups of fused siblings' weights or 3 groups with their full Hessians, the larger.
  int64_t read_ahead_bytes = 0;
};

// One quantized module's outcome (of each expert of a 3-D expert tensor: "<m>.<e>"), for the
// final table.
struct ModuleReport {
  std::string module;
  int64_t rows = 0;
  int64_t cols = 0;
  // Hessian entry used ("" without one) and the method that ran (the fallback's when used).
  std::string hessian_entry;
  TensorStats stats;
};

struct QuantizeReport {
  // Quantized modules in name order.
  std::vector<ModuleReport> modules;
  // Modules not quantized with the reason.
  std::vector<std::string> skipped;
  int64_t bytes_in = 0;   // tensor bytes read
  int64_t bytes_out = 0;  // tensor bytes written
  std::string quantizer;  // Quantizer::Describe()
  // Wall-time split of the run, seconds.
  double read_seconds = 0.0;          // open, plan, read the Hessians
  double scan_seconds = 0.0;          // the weights' one pass (NaN/Inf, global amax), beside the
                                      // quantizer: a tensor is quantized once its scan is done
  double copy_seconds = 0.0;          // other files and untouched tensors copied to the output
                                      // (the tensors beside the quantizer, so it overlaps)
  double hessian_read_seconds = 0.0;  // within read and scan: the Hessians' data read and
                                      // checked (HessianStore::read_seconds, summed over reads)
  double quantize_seconds = 0.0;      // the quantizer (search; with --server also transport)
  double write_seconds = 0.0;         // quantized tensors, index, configs, rename
  double total_seconds = 0.0;         // wall time of the whole run
  // With --server: what the servers reported, summed over tensors (tensors run concurrently,
  // so these may exceed quantize_seconds): time in their kernels and in their queues. The rest
  // of quantize_seconds is transport, protobuf and validation.
  double server_kernel_seconds = 0.0;
  double server_queue_seconds = 0.0;
  // The label written: "NVFP4" (W4A4, every quantized module has input_scale) or
  // "W4A16_NVFP4" (weights only, no input_scale).
  std::string quant_algo;
  // k_scale / v_scale tensors written (--kv-cache fp8).
  int64_t kv_cache_scales = 0;
  // Peak resident memory of the process so far (getrusage), bytes. Inputs are memory-mapped
  // and their pages dropped after use, so it stays near the tensors in flight, not the model.
  int64_t peak_rss_bytes = 0;
};

// Hears about progress; every method may be called from several threads, one call at a time.
class QuantizeObserver {
 public:
  virtual ~QuantizeObserver() = default;
  // Before the first tensor: how many tensors and input bytes the run will go through.
  virtual void OnStart(int64_t tensors, int64_t bytes) = 0;
  // After each tensor (copied or quantized) of `bytes` input bytes.
  virtual void OnTensorDone(const std::string& name, int64_t bytes) = 0;
  // Notes ("skipped: in = 100 ...") and warnings ("all-zero Hessian blocks ...").
  virtual void OnMessage(const std::string& line) = 0;
};

// Runs the pipeline. Errors (the first one, naming the module, tensor or file): every check of
// the inputs happens before anything is quantized; on any error the temporary folder is
// removed and out_dir is left as it was. The checks of CheckOutputTarget (output_dir.h) on
// out_dir, before the run and again before the swap.
absl::StatusOr<QuantizeReport> QuantizeCheckpoint(const QuantizeOptions& options,
                                                  Quantizer* quantizer, QuantizeObserver* observer);

// Labels of a W4A4 output (every quantized module has input_scale) and of a weight-only one.
inline constexpr char kQuantAlgoW4A4[] = "NVFP4";
inline constexpr char kQuantAlgoWeightOnly[] = "W4A16_NVFP4";

// config.json with compressed-tensors' `quantization_config` (format nvfp4-pack-quantized;
// input_activations null for weight-only; kv_cache_scheme for FP8 KV), pretty-printed.
absl::StatusOr<std::string> CompressedTensorsConfigJson(const std::string& config_text,
                                                        const std::vector<std::string>& ignore,
                                                        const QuantizationLabel& label);

// config.json with `quantization_config` added (NUMERICS §5; weight-only: quant_algo
// W4A16_NVFP4 and a config group with `weights` only; FP8 KV cache: kv_cache_quant_algo FP8 and
// kv_cache_scheme), pretty-printed, key order kept.
absl::StatusOr<std::string> QuantizedConfigJson(const std::string& config_text,
                                                const std::vector<std::string>& exclude_modules,
                                                const QuantizationLabel& label);

// hf_quant_config.json (NUMERICS §5; weight-only: quant_algo W4A16_NVFP4; FP8 KV cache:
// kv_cache_quant_algo FP8), with the producer record.
std::string HfQuantConfigJson(const std::vector<std::string>& exclude_modules,
                              const QuantizationLabel& label);

// nvfp4cal.json (kProducerRecordFileName) of the outputs of `command` ("example",
// "dequantize"): {"producer": {"name": "nvfp4cal", "version": ...}, "command": ...}.
std::string ProducerRecordJson(const std::string& command);

// "0.1.0".
std::string NvFp4CalVersion();

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_QUANTIZE_CHECKPOINT_H_
