// gptq: NVFP4 quantization with GPTQ error propagation over the full Hessian (docs/numerics.md
// §6). Columns are quantized in order (16-column groups, optionally in act-order), each group's
// FP8 scale is chosen on its error-updated weights, and each column's rounding error moves the
// columns not yet quantized, weighted by the inverse-Hessian factor. Output is standard NVFP4
// (codes, FP8 block scales, FP32 global scale), like every other method.
//
// Whole tensors:
//   nvfp4cal::GptqRequest request;
//   request.weights = {bf16_data, nvfp4cal::DType::kBFloat16, /*rows=*/4096, /*cols=*/4096};
//   request.hessian = {h_data, 4096};              // full [in, in] fp32, row-major
//   request.params.method = nvfp4cal::Method::kGptq;
//   request.params.gptq.act_order = true;
//   request.params.gptq.compare_local_hessian = true;  // report tr(E H E^T) of both below
//   absl::StatusOr<nvfp4cal::QuantizedTensor> result = nvfp4cal::CpuGptqQuantize(request, {});
//   // result->stats.gptq.full_hessian_error vs .full_hessian_error_local_hessian
//
// Streaming (the service, the CLI's backends): rows are independent given H, so a backend
// prepares a Hessian once (GptqBackend::Prepare: validation and factorisation) and quantizes
// any row ranges of any tensors sharing it (GptqBackend::QuantizeRows), as they arrive.
//
// The pieces are separable: ValidateGptqHessian / ValidateGptqRequest (no side effects),
// ComputeGptqFactor (host, LAPACK, double precision), the per-group step of gptq_group.h (host
// and device), the CPU backend here and the CUDA backend of cuda_gptq.h.
#ifndef NVFP4CAL_KERNELS_GPTQ_H_
#define NVFP4CAL_KERNELS_GPTQ_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {

// Full Hessian H [n, n] fp32, row-major, n = the weights' cols. Not owned.
struct FullHessianView {
  const float* data = nullptr;
  int64_t n = 0;
  // The holder has already checked every value as ValidateGptqHessian does (finite, and
  // |H_ab - H_ba| <= symmetry_tolerance x max diagonal with the tolerance of the parameters it
  // is prepared with): ValidateGptqHessian then skips that O(n^2) pass and checks the rest (shape,
  // parameters, the diagonal). The CLI's Hessian reader checks each matrix as it reads it; a plan
  // checking it again cost its worker 0.05-0.9 s per 14336 x 14336 matrix on an H100 machine.
  // Never set for data from a client or a file that was not checked.
  bool values_checked = false;
};

// One tensor for gptq.
struct GptqRequest {
  WeightView weights;
  FullHessianView hessian;
  // method must be Method::kGptq; params.gptq holds its parameters, beta_step / beta_half_range
  // / scale_neighbours the DSS grid of GptqScaleSearch::kDss, symmetry_tolerance the check of H.
  SearchParams params;
  // Shared global amax of fused siblings (>= the tensor's own); computed when absent.
  std::optional<float> global_amax;
};

// Finiteness and symmetry of H (|H_ab - H_ba| <= params.symmetry_tolerance * max_c H_cc;
// skipped when hessian.values_checked), non-negative diagonal, n a positive multiple of 16
// within the gptq limit, and the parameters (method kGptq). INVALID_ARGUMENT naming the field,
// limit and value; FAILED_PRECONDITION without data. No side effects.
absl::Status ValidateGptqHessian(const FullHessianView& hessian, const SearchParams& params);

// Shape, finiteness and symmetry of H (|H_ab - H_ba| <= tol * max_c H_cc), non-negative
// diagonal, parameters and weights. INVALID_ARGUMENT naming the field, limit and value;
// FAILED_PRECONDITION without a Hessian. No side effects. Positive definiteness is checked by
// ComputeGptqFactor.
absl::Status ValidateGptqRequest(const GptqRequest& request);

// The factorised Hessian, in the order the columns are quantized.
struct GptqFactor {
  int64_t n = 0;
  // group_order[t] = the original 16-column group quantized t-th (identity without act-order).
  std::vector<int64_t> group_order;
  // column[p] = the original column at quantization position p.
  std::vector<int64_t> column;
  // Upper triangular U [n, n] fp32, row-major, in quantization order, with
  // (H_perm + lambda I)^-1 = U^T U; the strict lower triangle is zero.
  std::vector<float> inverse_factor;
  double damping_relative = 0.0;  // lambda / mean(diag H) actually used
  double damping_absolute = 0.0;  // lambda
  int damping_increases = 0;      // tenfold increases it took to be positive definite
};

// Quantization order of a Hessian's 16-column groups and its mean diagonal.
struct GptqOrder {
  std::vector<int64_t> group_order;  // as GptqFactor::group_order
  std::vector<int64_t> column;       // original column at quantization position p
  double mean_diagonal = 0.0;
};

// Act-order sorts groups by the sum of their diagonal, heaviest first (stable); otherwise the
// identity. INVALID_ARGUMENT for an all-zero diagonal.
absl::StatusOr<GptqOrder> ComputeGptqOrder(const FullHessianView& hessian, bool act_order);

// The diagonal 16x16 blocks [n/16, 16, 16] of a row-major n x n matrix (the groups' blocks of
// H, or of the factor U).
std::vector<float> DiagonalBlocksOf(const float* matrix, int64_t n);

// The damping rule of every backend: after a failed factorisation with damping `relative`
// (x mean diagonal), the next value to try (1e-6 after 0, else tenfold), or nullopt once it
// would exceed max(1, requested).
std::optional<double> NextGptqDamping(double relative, double requested);

// The error for a Hessian that stays indefinite: names the damping, the original column of the
// failing pivot and its value.
absl::Status GptqNotPositiveDefinite(double relative, double mean_diagonal, int64_t column,
                                     double pivot, double requested);

// Orders the groups (act-order), damps and factorises H in double precision with LAPACK
// (dpotrf and dtrtri on the reversed matrix; docs/numerics.md §6). H must have passed
// ValidateGptqRequest. While H + lambda I is not positive definite, lambda grows tenfold (up to
// 1 x mean diagonal, or the requested damping if larger); then INVALID_ARGUMENT naming the
// failing column and its pivot. INVALID_ARGUMENT for an all-zero diagonal.
absl::StatusOr<GptqFactor> ComputeGptqFactor(const FullHessianView& hessian,
                                             const GptqParams& params);

// A full Hessian prepared for gptq by one backend (its factor and what the backend derives from
// it, in host or device memory). Immutable and thread-safe; quantizes row ranges of every
// tensor that has this Hessian, with the parameters it was prepared with. It keeps its own
// copies: the Hessian it came from need not outlive it.
struct GptqPlan {
  virtual ~GptqPlan() = default;
  int64_t n = 0;
  // The parameters it was prepared with (method kGptq); QuantizeRows uses these.
  SearchParams params;
  double damping_relative = 0.0;  // lambda / mean(diag H) actually used
  int damping_increases = 0;      // tenfold increases it took to be positive definite
  double factor_seconds = 0.0;    // wall time of Prepare
  // Of factor_seconds (the CUDA backend; 0 elsewhere): the host-side checks and preparation
  // before the device work, and the wait for the backend's other calls to finish.
  double host_seconds = 0.0;
  double wait_seconds = 0.0;
  // Of factor_seconds after the wait (the CUDA backend; 0 elsewhere): H's upload, the damped
  // factorisation (potrf, with any damping retries), the factor's inversion (trtri) and storing
  // U, H in double and the diagonal blocks.
  double upload_seconds = 0.0;
  double potrf_seconds = 0.0;
  double invert_seconds = 0.0;
  double store_seconds = 0.0;
  // Bytes the plan holds (host memory for the CPU backend, device memory for CUDA).
  int64_t memory_bytes = 0;
};

// A gptq backend ("cpu" or "cuda"). Implementations are thread-safe.
class GptqBackend {
 public:
  virtual ~GptqBackend() = default;
  virtual std::string_view BackendName() const = 0;

  // Validates H and the parameters (ValidateGptqHessian), orders, damps and factorises.
  // Errors as ValidateGptqHessian and ComputeGptqFactor; RESOURCE_EXHAUSTED when the backend's
  // memory cannot hold the plan.
  virtual absl::StatusOr<std::shared_ptr<const GptqPlan>> Prepare(const FullHessianView& hessian,
                                                                  const SearchParams& params) = 0;

  // Quantizes rows [row_begin, row_end) of `weights` (cols = plan.n) with global amax g into the
  // caller's spans and adds the rows' statistics to *stats: TensorStats' block sums,
  // quantize_seconds, and with compare_local_hessian (GptqParams) gptq.full_hessian_error,
  // full_hessian_error_local_hessian and compare_seconds; sets damping_relative /
  // damping_increases from the plan. The codes follow the plan's parameters only. Rows are
  // independent: any split of a tensor into ranges gives the same bytes. Checks the plan's origin,
  // shapes, spans, NaN/Inf in the rows and g >= their amax (INVALID_ARGUMENT) before writing
  // anything.
  virtual absl::Status QuantizeRows(const GptqPlan& plan, const WeightView& weights,
                                    float global_amax, int64_t row_begin, int64_t row_end,
                                    bool compare_local_hessian, RowRangeOutput output,
                                    TensorStats* stats) = 0;
};

// What every backend's QuantizeRows checks before writing: cols = plan.n, dtype and data, the
// range and span sizes (ValidateRowRange), NaN/Inf in the rows and g against their amax.
absl::Status ValidateGptqRows(const GptqPlan& plan, const WeightView& weights, float global_amax,
                              int64_t row_begin, int64_t row_end, const RowRangeOutput& output);

// Whole tensor on any backend: validates the request, computes g when absent, prepares,
// quantizes every row. stats.gptq.factor_seconds is the plan's.
absl::StatusOr<QuantizedTensor> GptqQuantize(GptqBackend& backend, const GptqRequest& request);

// The same with a plan prepared earlier from request.hessian (tensors sharing a Hessian share
// the plan); the Hessian is not validated again, the weights are.
absl::StatusOr<QuantizedTensor> GptqQuantizeWithPlan(GptqBackend& backend, const GptqPlan& plan,
                                                     const GptqRequest& request);

// A gptq plan prepared once and shared by every tensor (and row range) that uses its Hessian
// with the same parameters on one kind of backend: the first Get prepares it
// (GptqBackend::Prepare: validation, damping, factorisation, seconds for large n) while
// concurrent callers wait, and a failed preparation is kept and returned to every later caller,
// so H is validated once. Release frees the plan (gigabytes of device memory for a layer)
// after its last use; Get then answers FAILED_PRECONDITION. Thread-safe.
//
//   SharedGptqPlan plan;                                   // one per (Hessian, parameters)
//   absl::StatusOr<std::shared_ptr<const GptqPlan>> p = plan.Get(backend, hessian, params);
//   ... GptqQuantizeWithPlan(backend, **p, request) ...
//   plan.Release();                                        // after the last tensor
class SharedGptqPlan {
 public:
  // Called once, right after the preparation and before any caller sees its result, with that
  // result (a server charges the plan's memory and records metrics there).
  using PreparedHook =
      std::function<void(const absl::StatusOr<std::shared_ptr<const GptqPlan>>& plan)>;

  absl::StatusOr<std::shared_ptr<const GptqPlan>> Get(GptqBackend& backend,
                                                      const FullHessianView& hessian,
                                                      const SearchParams& params,
                                                      const PreparedHook& on_prepared = nullptr);

  // Drops this cell's reference to the plan (callers still holding it keep it alive).
  void Release();

  // Whether a preparation succeeded (also after Release).
  bool prepared() const;

 private:
  mutable absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool succeeded_ ABSL_GUARDED_BY(mu_) = false;
  absl::StatusOr<std::shared_ptr<const GptqPlan>> plan_ ABSL_GUARDED_BY(mu_);
};

struct CpuGptqOptions {
  // Worker threads; 0 uses every hardware thread. Results do not depend on it.
  int num_threads = 0;
  // Rows per task: rows are independent given H, so tasks are row ranges that each run the
  // whole column loop; small enough to balance, large enough that each pass over U is shared.
  int rows_per_task = 16;
};

// The CPU backend: LAPACK factor, row tasks over threads. TensorStats as for local_hessian
// (block sums of e^T H_j e against the `max` method, mse, changed scales; dss counts with
// GptqScaleSearch::kDss) plus GptqStats. Deterministic for any thread count.
std::unique_ptr<GptqBackend> MakeCpuGptq(const CpuGptqOptions& options);

// GptqQuantize on a CPU backend with these options.
absl::StatusOr<QuantizedTensor> CpuGptqQuantize(const GptqRequest& request,
                                                const CpuGptqOptions& options);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_GPTQ_H_
