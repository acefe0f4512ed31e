// ScaleSearch: quantize one weight tensor to NVFP4 with a chosen block-scale method.
//
// The interface every backend implements (CPU reference in cpu_scale_search.h, CUDA in
// cuda_scale_search.h). Plain C++ types in, codes / scales / statistics out; no files, no RPC.
//
//   std::unique_ptr<nvfp4cal::ScaleSearch> search = nvfp4cal::MakeCpuScaleSearch({});
//   nvfp4cal::QuantizeRequest request;
//   request.weights = {bf16_data, nvfp4cal::DType::kBFloat16, /*rows=*/4096, /*cols=*/4096};
//   request.hessians = {hessian_blocks, /*num_blocks=*/4096 / 16};   // [in/16, 16, 16] fp32
//   request.params.method = nvfp4cal::Method::kDss;
//   absl::StatusOr<nvfp4cal::QuantizedTensor> result = search->Quantize(request);
//
// Numerics follow docs/numerics.md (NUMERICS.md of the team plus the decisions it records).
#ifndef NVFP4CAL_KERNELS_SCALE_SEARCH_H_
#define NVFP4CAL_KERNELS_SCALE_SEARCH_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "nvfp4cal/kernels/dtype.h"

namespace nvfp4cal {

// Block-scale selection methods (NUMERICS §3). kGptq (docs/numerics.md §6) propagates each
// column's error over the full [in, in] Hessian; ScaleSearch backends, which take diagonal
// blocks, refuse it: it runs through gptq.h.
enum class Method { kMax, kMse, kLocalHessian, kDss, kGptq };

// "max", "mse", "local_hessian", "dss", "gptq".
std::string_view MethodName(Method method);
// Inverse of MethodName; INVALID_ARGUMENT naming the accepted values otherwise.
absl::StatusOr<Method> ParseMethod(std::string_view name);
// "float32", "bfloat16", "float16".
std::string_view DTypeName(DType dtype);
// Whether the method's search objective needs Hessian blocks.
bool MethodNeedsHessian(Method method);

// Row-major weight matrix W [rows = out, cols = in]; not owned.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::kBFloat16;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Diagonal Hessian blocks [cols / 16, 16, 16] fp32, row-major; block j covers input columns
// 16j..16j+15 and is shared by every row. Not owned. Empty (null data) when not available.
struct BlockHessiansView {
  const float* data = nullptr;
  int64_t num_blocks = 0;
};

// How gptq picks a 16-column group's FP8 scale on the error-updated weights.
enum class GptqScaleObjective {
  // e^T H_j e with the group's 16x16 diagonal block of H, codes rounded independently (the
  // local_hessian objective).
  kHessianBlock,
  // The exact GPTQ cost of the group: codes quantized one column after the other with the error
  // propagated inside the group, sum_i (e_i / U_ii)^2 with U the inverse-Hessian factor.
  kGptqCost,
};
// Which candidates gptq searches per group: the 126-candidate sweep, or the sweep followed by
// the decoupled search (dss) with SearchParams' beta grid and neighbours.
enum class GptqScaleSearch { kSweep, kDss };

// "hessian_block" / "gptq_cost" and "sweep" / "dss", with their inverses (INVALID_ARGUMENT
// naming the accepted values).
std::string_view GptqScaleObjectiveName(GptqScaleObjective objective);
absl::StatusOr<GptqScaleObjective> ParseGptqScaleObjective(std::string_view name);
std::string_view GptqScaleSearchName(GptqScaleSearch search);
absl::StatusOr<GptqScaleSearch> ParseGptqScaleSearch(std::string_view name);

// Parameters of the gptq method (docs/numerics.md §6).
struct GptqParams {
  // Added to the diagonal of H before factorising, relative to the mean of diag(H); raised
  // tenfold (and reported) while H + damping is not positive definite. Allowed [0, 10].
  float damping = 0.01f;
  // Quantize whole 16-column groups in descending order of their diagonal Hessian mass
  // (act-order), so that the most sensitive inputs are fixed first. Blocks stay aligned.
  bool act_order = false;
  // Lazy-batch width: errors reach columns beyond the current batch in one update per batch.
  // A multiple of 16 in [16, 8192]. Changes only rounding, not the algorithm.
  int block_columns = 128;
  GptqScaleObjective scale_objective = GptqScaleObjective::kHessianBlock;
  GptqScaleSearch scale_search = GptqScaleSearch::kSweep;
  // Also quantize each tensor with local_hessian and report tr(E H E^T) of both results
  // (GptqStats::full_hessian_error and full_hessian_error_local_hessian; both stay 0 without
  // it). Changes no code or scale; costs about a quarter more of a layer's time on a GPU (two
  // rows * n^2 products in double). Not part of a plan's identity: QuantizeRows is told per call.
  bool compare_local_hessian = false;
};

// Method parameters. Defaults are the spec's.
struct SearchParams {
  Method method = Method::kDss;
  // DSS beta grid spacing; betas are 1 + i * beta_step. Allowed [0.005, 0.5].
  float beta_step = 0.05f;
  // DSS betas span 1 +- beta_half_range: i = -n..n with n = round(beta_half_range / beta_step).
  // 0 restricts DSS to beta = 1. Allowed [0, 1) with the smallest beta 1 - n * beta_step > 0.
  float beta_half_range = 0.5f;
  // DSS FP8 neighbours tried on each side of the sweep optimum. Allowed [0, 125].
  int scale_neighbours = 1;
  // Hessian blocks must satisfy |H_ab - H_ba| <= tol * max_c |H_cc| (accumulation noise).
  float symmetry_tolerance = 1e-4f;
  // Used by Method::kGptq only.
  GptqParams gptq;
};

// What gptq adds to a tensor's statistics: errors under the full Hessian, where propagation
// across blocks shows (the block sums of TensorStats only see each block's own H_j).
struct GptqStats {
  // With GptqParams::compare_local_hessian (else 0): tr(E H E^T) with E = W - W_hat and the
  // full, undamped H of the gptq result...
  double full_hessian_error = 0.0;
  // ...and of the local_hessian method's result on the same tensor and g.
  double full_hessian_error_local_hessian = 0.0;
  // Damping used, relative to mean(diag H), and how many tenfold increases it took.
  double damping_relative = 0.0;
  int damping_increases = 0;
  // Wall time: factorisation, quantization with propagation, and the local_hessian comparison.
  double factor_seconds = 0.0;
  double quantize_seconds = 0.0;
  double compare_seconds = 0.0;
  // Of quantize_seconds, the lazy-batch updates (CUDA backend with measure_update only).
  double update_seconds = 0.0;
};

// Statistics every result carries (NUMERICS §4). "Objective" is the method's own objective:
// squared error for max and mse, e^T H_j e for local_hessian and dss. "Before" is the `max`
// method's result on the same tensor and global scale.
struct TensorStats {
  Method method = Method::kDss;
  SearchParams params;
  float global_amax = 0.0f;   // g
  float global_scale = 0.0f;  // s2 = g / 2688
  int64_t num_blocks = 0;
  double objective_before = 0.0;
  double objective_after = 0.0;
  double mse_before = 0.0;
  double mse_after = 0.0;
  // Hessian-weighted error sums when Hessians were given (whatever the method), else 0.
  double hessian_error_before = 0.0;
  double hessian_error_after = 0.0;
  int64_t blocks_scale_changed = 0;    // scale byte differs from the `max` method's
  int64_t blocks_beta_not_one = 0;     // dss: chosen beta index != 0
  int64_t blocks_offset_not_zero = 0;  // dss: chosen byte differs from the sweep optimum
  // Blocks of rows whose H_j is all zeros (every candidate ties; the smallest wins). Nonzero
  // means the Hessian was not collected for some inputs: callers should warn once per tensor.
  int64_t zero_hessian_blocks = 0;
  // Method::kGptq only (zero otherwise).
  GptqStats gptq;
};

// Sets the descriptive fields of *stats (method, parameters, g, s2); leaves the sums alone.
void InitTensorStats(const SearchParams& params, float global_amax, TensorStats* stats);

// Adds the additive fields of `part` (block counts and sums) into `total`.
void AccumulateStats(const TensorStats& part, TensorStats* total);

// One tensor to quantize.
struct HessianBlockBounds;  // internal/block_search.h
struct HessianBlockScreen;  // internal/hessian_bounds.h

struct QuantizeRequest {
  WeightView weights;
  BlockHessiansView hessians;
  SearchParams params;
  // Shared global amax for fused siblings (q/k/v, gate/up): must be >= this tensor's own amax.
  // Computed from the weights when absent.
  std::optional<float> global_amax;
  // Optional: the CPU search's pruning bounds of `hessians` (ComputeHessianBlockBounds, one per
  // block), computed once by a caller that quantizes many row ranges of tensors sharing the
  // blocks (a server), instead of once per call. Must be those of `hessians`; null: computed.
  const HessianBlockBounds* hessian_bounds = nullptr;
  // Optional, read only with hessian_bounds: the CUDA pruned search's screens of `hessians`
  // (ComputeHessianBlockScreens of those bounds, one per block). Null: each launch computes
  // them (about 1.5 us a block on the host, in the GPU worker's path).
  const HessianBlockScreen* hessian_screens = nullptr;
};

// NVFP4 result of one tensor.
struct QuantizedTensor {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<uint8_t> packed_codes;  // [rows, cols / 2]: even element in the low nibble
  std::vector<uint8_t> scales;        // [rows, cols / 16]: E4M3 bytes (weight_scale)
  float global_amax = 0.0f;           // g
  float global_scale = 0.0f;          // weight_scale_2 = g / 2688
  TensorStats stats;
  // Where a remote server spent this tensor's time (its summary's timings), summed over row
  // ranges, seconds; 0 when the backend does not report it (in-process backends).
  double server_kernel_seconds = 0.0;
  double server_queue_seconds = 0.0;
};

// Caller-owned output for a row range [row_begin, row_end) of a tensor.
struct RowRangeOutput {
  absl::Span<uint8_t> packed_codes;  // (row_end - row_begin) * cols / 2 bytes
  absl::Span<uint8_t> scales;        // (row_end - row_begin) * cols / 16 bytes
};

// The weights of a tensor and their amax, from the one scan that also proves every element
// finite. Only ScanWeights makes one: holding a WeightScan means that scan ran over exactly
// these weights (same memory, dtype and shape).
class WeightScan {
 public:
  const WeightView& weights() const { return weights_; }
  float amax() const { return amax_; }

 private:
  friend absl::StatusOr<WeightScan> ScanWeights(const WeightView& weights);
  WeightScan(const WeightView& weights, float amax) : weights_(weights), amax_(amax) {}

  WeightView weights_;
  float amax_ = 0.0f;
};

// Scans every weight: INVALID_ARGUMENT naming the first NaN or Inf (row-major), else the scan
// with max |W|. Integer passes over the bits, several GB/s per thread.
absl::StatusOr<WeightScan> ScanWeights(const WeightView& weights);

// A tensor's shape, Hessians and parameters checked once, where its header entered the process
// (ValidateShapeHessiansAndParams; O(cols x 16)), before its rows arrive. Only ValidateTensor
// makes one. The request's weights carry the dtype and cols of the rows to come; their data and
// rows are not used. Hessian views must stay valid while it (or rows made from it) is used.
class ValidatedTensor {
 public:
  const QuantizeRequest& request() const { return request_; }

 private:
  friend absl::StatusOr<ValidatedTensor> ValidateTensor(const QuantizeRequest& request);
  explicit ValidatedTensor(const QuantizeRequest& request) : request_(request) {}

  QuantizeRequest request_;
};

// Checks `request` (shape, Hessians, parameters) as ValidateShapeHessiansAndParams does.
absl::StatusOr<ValidatedTensor> ValidateTensor(const QuantizeRequest& request);

// Rows of a tensor, checked where their data entered the process: the tensor (ValidatedTensor or
// ValidatedRequest), the rows' values (a WeightScan of each piece) and the global amax against
// their amax. Only ValidateRows, ValidatedRequest::AllRows and Subrange make one; a backend
// searches it without looking at the data again (ScaleSearch::QuantizeValidatedRows). The
// views must stay valid while it is used.
class ValidatedRows {
 public:
  // The tensor's request with `weights` = these rows.
  const QuantizeRequest& request() const { return request_; }
  float global_amax() const { return global_amax_; }
  int64_t rows() const { return request_.weights.rows; }

  // Rows [first, first + count) of these (also checked): INVALID_ARGUMENT outside them.
  absl::StatusOr<ValidatedRows> Subrange(int64_t first, int64_t count) const;

 private:
  friend class ValidatedRequest;
  friend absl::StatusOr<ValidatedRows> ValidateRows(const ValidatedTensor& tensor,
                                                    float global_amax,
                                                    absl::Span<const WeightScan> pieces);
  ValidatedRows(const QuantizeRequest& request, float global_amax)
      : request_(request), global_amax_(global_amax) {}

  QuantizeRequest request_;
  float global_amax_ = 0.0f;
};

// The rows that `pieces` scanned, which must follow each other in memory (one buffer, in
// order) with the tensor's dtype and cols, quantized with `global_amax`: INVALID_ARGUMENT when
// the pieces are not such rows or global_amax is not finite or does not cover their amax.
// O(pieces): the rows are not read again.
absl::StatusOr<ValidatedRows> ValidateRows(const ValidatedTensor& tensor, float global_amax,
                                           absl::Span<const WeightScan> pieces);

// A whole-tensor request checked once, where its data entered the process: shape, Hessians and
// parameters, finite weights, and the global amax against theirs. Only ValidateQuantizeRequest
// makes one, and ScaleSearch::QuantizeValidated searches it without looking at the data again.
// The request's views must stay valid while it is used.
class ValidatedRequest {
 public:
  const QuantizeRequest& request() const { return request_; }
  // The request's shared global amax, else the weights' own.
  float global_amax() const { return global_amax_; }
  // Every row of the request, with global_amax().
  ValidatedRows AllRows() const { return ValidatedRows(request_, global_amax_); }

 private:
  friend absl::StatusOr<ValidatedRequest> ValidateQuantizeRequest(const QuantizeRequest& request,
                                                                  const WeightScan& scan);
  friend absl::StatusOr<ValidatedRequest> ValidateQuantizeRequest(const QuantizeRequest& request);
  ValidatedRequest(const QuantizeRequest& request, float global_amax)
      : request_(request), global_amax_(global_amax) {}
  // The last step of both: the request's shared global amax against the weights' own.
  static absl::StatusOr<ValidatedRequest> WithWeightsAmax(const QuantizeRequest& request,
                                                          float weights_amax);

  QuantizeRequest request_;
  float global_amax_ = 0.0f;
};

// Validates `request` with the scan of its weights (taken earlier, e.g. with the amax pass of a
// reader): INVALID_ARGUMENT when the scan is of other weights, or what ValidateRequest reports.
// O(cols x 16): the weights are not read again.
absl::StatusOr<ValidatedRequest> ValidateQuantizeRequest(const QuantizeRequest& request,
                                                         const WeightScan& scan);
// Checks shape, Hessians and parameters, scans the weights, then checks the global amax.
absl::StatusOr<ValidatedRequest> ValidateQuantizeRequest(const QuantizeRequest& request);

// A backend that quantizes tensors. Implementations are thread-safe.
class ScaleSearch {
 public:
  virtual ~ScaleSearch() = default;

  // "cpu" or "cuda".
  virtual std::string_view BackendName() const = 0;

  // Quantizes a whole tensor: validates the request first (ValidateQuantizeRequest) and
  // returns its error without side effects, then QuantizeValidated.
  absl::StatusOr<QuantizedTensor> Quantize(const QuantizeRequest& request);

  // Quantizes a request validated once: allocates the result and searches every row
  // (QuantizeValidatedRows of AllRows); the weights are read once more only by the search.
  absl::StatusOr<QuantizedTensor> QuantizeValidated(const ValidatedRequest& validated);

  // Quantizes rows [row_begin, row_end) with the given global amax g into caller-owned spans,
  // accumulating statistics into *stats. For streaming huge tensors: call ComputeGlobalAmax
  // (or take the fused group's) first. The request's own global_amax is ignored here.
  virtual absl::Status QuantizeRows(const QuantizeRequest& request, float global_amax,
                                    int64_t row_begin, int64_t row_end, RowRangeOutput output,
                                    TensorStats* stats) = 0;

  // Quantizes rows checked once where their data entered the process (a server's Quantize
  // session or job, a ValidatedRequest): only the output sizes are checked again, so many small
  // row ranges of one tensor do not each pay the O(cols x 16) Hessian check and the
  // O(rows x cols) scan. Output spans hold rows.rows() rows; statistics are added to *stats.
  absl::Status QuantizeValidatedRows(const ValidatedRows& rows, RowRangeOutput output,
                                     TensorStats* stats);

 protected:
  // The search of QuantizeRows without its checks of the tensor and the rows' values (the
  // row range and output sizes are still checked). Reached only through QuantizeValidatedRows
  // and QuantizeValidated, whose arguments prove the checks ran.
  virtual absl::Status QuantizePrevalidatedRows(const QuantizeRequest& request, float global_amax,
                                                int64_t row_begin, int64_t row_end,
                                                RowRangeOutput output, TensorStats* stats) = 0;
};

// Checks a request against NUMERICS (shape, finiteness, Hessian shape and symmetry, parameter
// ranges). INVALID_ARGUMENT naming the field, the limit and the value; no side effects.
absl::Status ValidateRequest(const QuantizeRequest& request);

// Only the parameter ranges of ValidateRequest.
absl::Status ValidateParams(const SearchParams& params);

// g = max |W| over the tensor (fp32). INVALID_ARGUMENT if any weight is NaN or Inf.
absl::StatusOr<float> ComputeGlobalAmax(const WeightView& weights);

// s2 = g / 2688.
float GlobalScaleFromAmax(float global_amax);

// The pruning tables of one Hessian's blocks, computed once and shared by every call that
// quantizes with them (a server's row ranges, fused siblings): QuantizeRequest::hessian_bounds
// and hessian_screens. Recomputing them costs a few microseconds per 16 x 16 block on every call
// (3 ms for a 14336-column Hessian), which a server quantizing 1 MiB row ranges paid per range.
struct SharedHessianPruning {
  // One per block (ComputeHessianBlockBounds / ComputeHessianBlockScreens); null without Hessians.
  std::shared_ptr<const std::vector<HessianBlockBounds>> bounds;
  std::shared_ptr<const std::vector<HessianBlockScreen>> screens;
  // Points request->hessian_bounds and hessian_screens at these tables.
  void AttachTo(QuantizeRequest* request) const;
};
// Empty (both null) when hessians.data is null.
SharedHessianPruning ComputeSharedHessianPruning(const BlockHessiansView& hessians);

// n = round(beta_half_range / beta_step): the number of betas on each side of 1.
int DssBetaSteps(const SearchParams& params);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_SCALE_SEARCH_H_
