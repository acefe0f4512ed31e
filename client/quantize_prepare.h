// The checks and preparation of QuantizeCheckpoint's inputs, before any output is written.
// Internal to the quantize pipeline (quantize_checkpoint.cc); callers use QuantizeCheckpoint
// (quantize_checkpoint.h).
//
// From the module plans (checkpoint.h) and the Hessians file (hessians.h): one PreparedModule
// per quantized 2-D module or expert of a 3-D expert tensor, with its weights, its Hessian
// (diagonal blocks, or the full matrix for gptq), the method that runs (the fallback's for a
// module without a Hessian), its activation amax and its global amax (shared by fused
// siblings); then whether the output is W4A4 or weight-only, and its FP8 KV-cache scales.
//
//   std::vector<PreparedModule> prepared;
//   absl::Status ready =
//       PrepareModules(options, checkpoint, plans, hessians, observer, &prepared);
//   absl::StatusOr<bool> w4a4 = DecideActivations(options.activations, prepared, observer);
//   absl::StatusOr<KvScalesByWeight> kv =
//       KvCacheScales(options.kv_cache, LayoutOf(options.format), plans, hessians);
//   ... output writers created, the copy of untouched tensors started ...
//   std::vector<std::vector<size_t>> groups = ScanGroups(prepared);
//   ReadAhead read_ahead(PlanReadAhead(groups, &prepared));
//   ScanModules(&prepared, groups, hessians, &read_ahead, stopped, on_ready);
//                       // the weights' one pass (read, NaN/Inf, amax) and gptq's full
//                       // Hessians, beside the quantizer: on_ready(i, status) per unit
#ifndef NVFP4CAL_CLIENT_QUANTIZE_PREPARE_H_
#define NVFP4CAL_CLIENT_QUANTIZE_PREPARE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/checkpoint.h"
#include "client/hessians.h"
#include "client/quantize_checkpoint.h"
#include "client/safetensors.h"
#include "client/sized_buffers.h"
#include "client/trace.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal::client_internal {

// A quantized module (or one expert of a 3-D expert tensor) with everything its job needs.
struct PreparedModule {
  const ModulePlan* plan = nullptr;
  // -1 for a 2-D module, else the expert of plan's 3-D tensor.
  int64_t expert = -1;
  // ExpertName(plan->module, expert): how messages, Hessian entries and reports name it.
  std::string name;
  size_t shard = 0;
  const SafetensorsTensor* tensor = nullptr;
  // The file `weights` first point into (its mapping, possibly not aligned to the element
  // size); null for weights already in memory (tests).
  const SafetensorsFile* file = nullptr;
  // The weights read from `file` by the scan (ScanModules) into aligned memory, which `weights`
  // then points to; freed (with its ReadAhead bytes) once the unit's result is written.
  std::unique_ptr<uint8_t[]> read_copy;
  // What the unit gives back to the ReadAhead once its result is written (PlanReadAhead).
  int64_t read_ahead_bytes = 0;
  const void* weights = nullptr;
  std::string hessian_entry;
  // Activation amax of the module's input (the Hessians file's `.input_amax`), when recorded.
  std::optional<float> input_amax;
  // The Hessian's diagonal blocks (HessianStore::Blocks). From a block-layout entry set by
  // PrepareModules; from a full [cols, cols] one (blocks_from_full) set by the scan, which reads
  // and checks the matrix beside the quantizer (once per entry).
  std::shared_ptr<const std::vector<float>> hessian_blocks;
  bool blocks_from_full = false;
  // Full [cols, cols] Hessian (method gptq, NeedsFullHessian): read and checked by the scan
  // (HessianStore::Full, shared by the units of one entry), dropped once the unit's result is
  // written (with HessianStore::ReleaseFull).
  std::shared_ptr<const FullHessian> hessian_full;
  SearchParams params;
  float own_amax = 0.0f;
  // The scan that found own_amax and proved the weights finite (the only one: the in-process
  // quantizer validates the job with it instead of reading the weights again).
  std::optional<WeightScan> scan;
  float global_amax = 0.0f;
  // When the scan opened the unit (ScanModules, before on_ready): its start in --trace.
  absl::Time scanned_at;
};

// Bytes of the unit's weights (rows x cols x element size).
inline int64_t WeightBytes(const PreparedModule& m) {
  return m.plan->rows * m.plan->cols * DTypeSize(m.plan->dtype);
}

// Whether the scan reads the unit's full Hessian (method gptq with a Hessian entry).
inline bool NeedsFullHessian(const PreparedModule& m) {
  return m.params.method == Method::kGptq && !m.hessian_entry.empty();
}

// Whether the scan reads a full [cols, cols] matrix for the unit: gptq's, or one the diagonal
// blocks are cut from (its temporary copy counts in the read-ahead as gptq's does).
inline bool ScanReadsFullMatrix(const PreparedModule& m) {
  return NeedsFullHessian(m) || m.blocks_from_full;
}

// Every quantized module of `plans` (each expert of a 3-D one) into *prepared, in plan order,
// with its Hessian found and checked; `hessians` may be null (no --hessians). The first error,
// naming the module or tensor; one error naming every module that needs a Hessian the file
// lacks when there is no fallback. The weights are not read yet (ScanModules).
absl::Status PrepareModules(const QuantizeOptions& options, const Checkpoint& checkpoint,
                            const std::vector<ModulePlan>& plans, HessianStore* hessians,
                            QuantizeObserver* observer, std::vector<PreparedModule>* prepared);

// The units in the order the scan reads them and the quantizer takes them: groups of fused
// siblings (expert by expert; each group's units in prepared order) and every other unit as a
// group of its own, groups in the order of their first unit.
std::vector<std::vector<size_t>> ScanGroups(const std::vector<PreparedModule>& prepared);

// The memory the scan reads weights into ahead of the quantizer: groups take their bytes in
// group order (a group's ticket is its position in ScanGroups), at most `budget` bytes held at
// once (a larger group alone), and give them back as their units' results are written.
class ReadAhead {
 public:
  explicit ReadAhead(int64_t budget) : budget_(budget) {}

  // Waits for group `ticket`'s turn (every earlier ticket taken) and for `bytes` to fit, then
  // takes them; false (nothing taken, the ticket passed on) once stopped() is true.
  bool Acquire(size_t ticket, int64_t bytes, const std::function<bool()>& stopped);
  // Gives back bytes taken before.
  void Release(int64_t bytes);
  // Bytes held now.
  int64_t held() const;

  // Memory for one read copy of `bytes` (within bytes taken by Acquire): a buffer of that size
  // given back earlier when there is one, else a new one. Reuse matters: a new allocation this
  // large is fresh pages, and the read that fills it faults every page in (slowly on sandboxed
  // kernels), which is what reading with pread instead of through the mapping avoids. Pooled
  // buffers of other sizes are freed first while pooled + held bytes would exceed the budget.
  std::unique_ptr<uint8_t[]> Take(int64_t bytes);
  // A read copy of `bytes` back for reuse by Take (before its bytes are Released).
  void Give(std::unique_ptr<uint8_t[]> buffer, int64_t bytes);
  // Bytes of the buffers kept for reuse.
  int64_t pooled() const;

 private:
  const int64_t budget_;
  mutable absl::Mutex mu_;
  size_t next_ticket_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t held_ ABSL_GUARDED_BY(mu_) = 0;
  // Given-back buffers by size.
  SizedBuffers<uint8_t> pool_ ABSL_GUARDED_BY(mu_);
};

// Sets each unit's read_ahead_bytes and returns the ReadAhead's budget: a unit takes its
// weights' bytes (when read from a file) and, for the last unit of the group that reads a full
// matrix first (ScanReadsFullMatrix), that matrix's bytes; the budget holds 8 groups' weights or 3
// groups with their Hessians, the larger. (A Hessian shared by later groups counts with its first
// group only, so that no group waits for memory that only a later group gives back.)
int64_t PlanReadAhead(const std::vector<std::vector<size_t>>& groups,
                      std::vector<PreparedModule>* prepared);

// The one pass over every prepared unit's weights and full Hessians, meant to run beside the
// quantizer: group by group (`groups` from ScanGroups) on every hardware thread, each group's
// read_ahead_bytes taken from `read_ahead`, each unit's weights read from its file (pread, into
// read_copy, which `weights` then points to; units without a file are scanned where they are),
// then ScanWeights (rejects NaN/Inf naming the tensor; its scan and amax go into the unit), and
// for NeedsFullHessian units the matrix (`hessians`->Full: read and checked once per entry)
// into hessian_full, for blocks_from_full units the diagonal blocks (`hessians`->Blocks: the
// matrix read into a buffer of `read_ahead`'s pool, checked and cut, once per entry) into
// hessian_blocks. Once a group is done its global amax (fused siblings share the group's
// max) is set and on_ready(index, status) is called for each of its units, with the first
// failure among the group's reads and checks, if any. Once stopped() returns true the units not
// yet read get CANCELLED. Returns after on_ready was called for every unit; on_ready runs on
// the scanning threads, one call at a time. Its stages go to `trace` when not null.
void ScanModules(std::vector<PreparedModule>* prepared,
                 const std::vector<std::vector<size_t>>& groups, HessianStore* hessians,
                 ReadAhead* read_ahead, Trace* trace, const std::function<bool()>& stopped,
                 const std::function<void(size_t, const absl::Status&)>& on_ready);

// W4A4 (true) or weight-only (false) under `mode`, from which modules have an activation amax;
// the label must never promise an input_scale the checkpoint lacks.
absl::StatusOr<bool> DecideActivations(ActivationMode mode,
                                       const std::vector<PreparedModule>& prepared,
                                       QuantizeObserver* observer);

// An FP8 KV-cache scale: `<m>.k_scale` or `<m>.v_scale` = output amax / 448.
struct KvScale {
  std::string tensor;
  float value = 0.0f;
};
// By the weight tensor of the module it belongs to (written in the same shard).
using KvScalesByWeight = std::map<std::string, KvScale>;

// The k_scale of every k_proj and the v_scale of every v_proj among `plans` (quantized or
// not: the KV cache is the attention's), from the Hessians file's `<m>.output_amax`; none
// for KvCacheMode::kNone.
absl::StatusOr<KvScalesByWeight> KvCacheScales(KvCacheMode mode, const Nvfp4Layout& layout,
                                               const std::vector<ModulePlan>& plans,
                                               const HessianStore* hessians);

}  // namespace nvfp4cal::client_internal

#endif  // NVFP4CAL_CLIENT_QUANTIZE_PREPARE_H_
