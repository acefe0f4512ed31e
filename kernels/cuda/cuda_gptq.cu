// CUDA gptq backend (cuda_gptq.h, docs/numerics.md §6).
//
// Prepare: H goes to the device once; the damped, permuted and reversed matrix is factorised in
// double precision with cuSOLVER potrf and the factor inverted by blocks (a kernel for the
// diagonal blocks, cuBLAS trmm above them; the CPU's construction, see ComputeGptqFactor),
// retrying with more damping by the CPU's rule; the plan keeps U (fp32,
// quantization order), H (double, for tr(E H E^T)), the diagonal blocks of H and U, and the
// pruning bounds of the H blocks.
//
// QuantizeRows keeps a row chunk's working weights on the device, column-major in quantization
// order (rows side by side, so neighbouring rows' loads coalesce):
//   per lazy batch of block_columns columns:
//     GroupBatchKernel   a team of 16 lanes per row runs the batch's groups in order: the scale
//                        choice with the candidates dealt out to the lanes (the sequential
//                        search's choice), the sequential pass (gptq_group.h, the CPU's code),
//                        errors to the rest of the batch, codes and scales out;
//     the update         the batch's errors reach every later column: OrderedUpdateKernel
//                        subtracts the rounded products one error at a time, in the CPU's order,
//                        so results are bit-identical to the CPU backend for the same factor and
//                        do not depend on how rows are split; cuBLAS SGEMM is the option
//                        (CudaGptqOptions::update) that gives up both properties.
//   then GroupStatisticsKernel: each row's block statistics from the final codes (kept out of
//   the group loop, whose latency per group is the kernel's pace).
// tr(E H E^T) of the result and of local_hessian's comes from one cuBLAS DGEMM on both error
// matrices in double, then DDOT. cuBLAS and cuSOLVER are dlopen'ed on first use.
// The kernels are in gptq_kernels.cu; this file holds the backend: the plan, the cuSOLVER /
// cuBLAS calls and the host orchestration.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "block_statistics.h"
#include "cuda_status.h"
#include "device_memory.h"
#include "gptq_kernels.h"
#include "nvfp4cal/kernels/cuda_gptq.h"
#include "nvfp4cal/kernels/dtype.h"
#include "nvfp4cal/kernels/gptq.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/gptq_group.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"
#include "nvfp4cal/kernels/validation.h"

namespace nvfp4cal {
namespace cuda_internal {
namespace {

// cuBLAS and cuSOLVER, loaded with dlopen on first use instead of linked. Linked libraries'
// thread-local storage goes into every thread's static TLS block, and cuBLASLt's is large
// enough that threads created with a small fixed stack (the metrics endpoint's HTTP server)
// fail to start; a dlopen'ed library's TLS is allocated per thread on demand instead.
struct MathLibraries {
// clang-format off
#define NVFP4_MATH_FUNCTIONS(X)                                                                    \
  X(cublasCreate_v2) X(cublasDestroy_v2) X(cublasSetStream_v2) X(cublasSetMathMode)               \
  X(cublasSgemm_v2) X(cublasDgemm_v2) X(cublasDdot_v2) X(cublasDtrmm_v2)                          \
  X(cusolverDnCreate) X(cusolverDnDestroy) X(cusolverDnSetStream) X(cusolverDnCreateParams)       \
  X(cusolverDnDestroyParams) X(cusolverDnXpotrf_bufferSize) X(cusolverDnXpotrf)                  \
  X(cusolverDnXtrtri_bufferSize) X(cusolverDnXtrtri)
// clang-format on
#define NVFP4_DECLARE(name) decltype(&::name) name = nullptr;
  NVFP4_MATH_FUNCTIONS(NVFP4_DECLARE)
#undef NVFP4_DECLARE
};

// The libraries of the toolkit this was built with (by soname), loaded once; UNAVAILABLE with
// the loader's message when they are missing.
absl::StatusOr<const MathLibraries*> LoadMathLibraries() {
  static absl::StatusOr<const MathLibraries*>* loaded = [] {
    const std::string cublas = absl::StrFormat("libcublas.so.%d", CUBLAS_VER_MAJOR);
    const std::string cusolver = absl::StrFormat("libcusolver.so.%d", CUSOLVER_VER_MAJOR);
    void* handles[2] = {dlopen(cublas.c_str(), RTLD_NOW | RTLD_LOCAL),
                        dlopen(cusolver.c_str(), RTLD_NOW | RTLD_LOCAL)};
    for (int i = 0; i < 2; ++i) {
      if (handles[i] == nullptr) {
        const char* error = dlerror();
        return new absl::StatusOr<const MathLibraries*>(absl::UnavailableError(
            absl::StrFormat("the CUDA gptq backend needs %s: %s", i == 0 ? cublas : cusolver,
                            error != nullptr ? error : "dlopen failed")));
      }
    }
    auto* libraries = new MathLibraries;
#define NVFP4_LOAD(name)                                                                    \
  libraries->name = reinterpret_cast<decltype(&::name)>(                                    \
      dlsym(handles[std::string(#name).rfind("cublas", 0) == 0 ? 0 : 1], #name));           \
  if (libraries->name == nullptr) {                                                         \
    return new absl::StatusOr<const MathLibraries*>(absl::UnavailableError(absl::StrFormat( \
        "the CUDA gptq backend needs %s, which the loaded library lacks", #name)));         \
  }
    NVFP4_MATH_FUNCTIONS(NVFP4_LOAD)
#undef NVFP4_LOAD
    return new absl::StatusOr<const MathLibraries*>(libraries);
  }();
  return *loaded;
}
#undef NVFP4_MATH_FUNCTIONS

absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string message =
      absl::StrFormat("cuBLAS %s failed with status %d", what, static_cast<int>(status));
  if (status == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

absl::Status CusolverStatus(cusolverStatus_t status, const char* what) {
  if (status == CUSOLVER_STATUS_SUCCESS) return absl::OkStatus();
  const std::string message =
      absl::StrFormat("cuSOLVER %s failed with status %d", what, static_cast<int>(status));
  if (status == CUSOLVER_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

// A Hessian prepared on the device.
struct CudaGptqPlan : GptqPlan {
  int device = 0;
  GptqGroupConfig config{};
  DeviceBuffer hessian;         // double [n, n], original order
  DeviceBuffer factor;          // float U [n, n], row-major, quantization order
  DeviceBuffer factor_blocks;   // float [groups, 16, 16]: diagonal blocks of U, quant. order
  DeviceBuffer hessian_blocks;  // float [groups, 16, 16]: diagonal blocks of H, original order
  DeviceBuffer bounds;          // HessianBlockBounds [groups + 1]; the last: identity
  DeviceBuffer group_order;     // int32 [groups]: original group at quantization position t
  DeviceBuffer column;          // int32 [n]: original column at quantization position p
};

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// A row chunk's buffers in the workspace (chunk rows at most).
struct ChunkBuffers {
  char* weights;   // rows x n of the weights' dtype
  float* work;     // [n][rows]
  float* errors;   // [batch][rows]
  uint8_t* codes;  // gptq's
  uint8_t* scales;
  uint8_t* lh_codes;  // local_hessian's, for the comparison
  uint8_t* lh_scales;
  BlockStatistics* stats;  // [rows]
  double* e;               // comparison: both error matrices, [2 rows, n] ...
  double* t;               // ... and T = E H for both
};

class CudaGptq : public GptqBackend {
 public:
  static absl::StatusOr<std::unique_ptr<GptqBackend>> Create(const CudaGptqOptions& options) {
    std::string reason;
    if (!CudaDeviceAvailable(&reason)) return absl::UnavailableError(reason);
    if (options.memory_budget_bytes < (int64_t{1} << 20)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "memory_budget_bytes = %d is below the minimum 1 MiB", options.memory_budget_bytes));
    }
    absl::StatusOr<const MathLibraries*> libs = LoadMathLibraries();
    if (!libs.ok()) return libs.status();
    std::unique_ptr<CudaGptq> impl(new CudaGptq(options, *libs));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
    NVFP4_RETURN_IF_ERROR(impl->stream_.Init(options.stream));
    const cudaStream_t stream = impl->stream_.get();
    const MathLibraries* l = impl->libs_;
    NVFP4_RETURN_IF_ERROR(CublasStatus(l->cublasCreate(&impl->cublas_), "cublasCreate"));
    NVFP4_RETURN_IF_ERROR(
        CublasStatus(l->cublasSetStream(impl->cublas_, stream), "cublasSetStream"));
    // Default math: fp32 stays fp32 (no TF32: it keeps fewer mantissa bits than requested) and
    // DGEMM may use the fp64 tensor cores (IEEE double fused multiply-adds).
    NVFP4_RETURN_IF_ERROR(CublasStatus(l->cublasSetMathMode(impl->cublas_, CUBLAS_DEFAULT_MATH),
                                       "cublasSetMathMode"));
    NVFP4_RETURN_IF_ERROR(
        CusolverStatus(l->cusolverDnCreate(&impl->cusolver_), "cusolverDnCreate"));
    NVFP4_RETURN_IF_ERROR(
        CusolverStatus(l->cusolverDnSetStream(impl->cusolver_, stream), "cusolverDnSetStream"));
    NVFP4_RETURN_IF_ERROR(
        CusolverStatus(l->cusolverDnCreateParams(&impl->solver_params_), "cusolverDnCreateParams"));
    return std::unique_ptr<GptqBackend>(std::move(impl));
  }

  // The workspace and the handles go first; the stream member (when owned) is destroyed last.
  ~CudaGptq() override {
    cudaSetDevice(options_.device);
    workspace_.Free();
    if (solver_params_ != nullptr) libs_->cusolverDnDestroyParams(solver_params_);
    if (cusolver_ != nullptr) libs_->cusolverDnDestroy(cusolver_);
    if (cublas_ != nullptr) libs_->cublasDestroy(cublas_);
  }

  std::string_view BackendName() const override { return "cuda"; }

  absl::StatusOr<std::shared_ptr<const GptqPlan>> Prepare(const FullHessianView& hessian,
                                                          const SearchParams& params) override {
    const auto start = std::chrono::steady_clock::now();
    NVFP4_RETURN_IF_ERROR(ValidateGptqHessian(hessian, params));
    absl::StatusOr<GptqOrder> order = ComputeGptqOrder(hessian, params.gptq.act_order);
    if (!order.ok()) return order.status();
    const int64_t n = hessian.n;
    const int64_t groups = n / kBlockSize;
    auto plan = std::make_shared<CudaGptqPlan>();
    plan->n = n;
    plan->params = params;
    plan->device = options_.device;
    plan->config = GptqGroupConfigOf(params);
    // The H blocks and their bounds on the host (small), uploaded with the rest.
    const std::vector<float> host_blocks = DiagonalBlocksOf(hessian.data, n);
    std::vector<HessianBlockBounds> bounds =
        ComputeHessianBlockBounds(BlockHessiansView{host_blocks.data(), groups});
    bounds.push_back(IdentityBounds());

    plan->host_seconds = SecondsSince(start);
    std::lock_guard<std::mutex> lock(mutex_);
    plan->wait_seconds = SecondsSince(start) - plan->host_seconds;
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    DeviceBuffer h_float;  // H, fp32 [n, n]
    DeviceBuffer b;        // the reversed damped matrix, its factor, then the factor's inverse
    auto step = std::chrono::steady_clock::now();
    // Each step ends synchronised with the stream, so these are the steps' device times.
    auto lap = [&step]() {
      const double seconds = SecondsSince(step);
      step = std::chrono::steady_clock::now();
      return seconds;
    };
    NVFP4_RETURN_IF_ERROR(UploadHessian(hessian, *order, bounds, &h_float, &b, plan.get()));
    DeviceBuffer info;
    NVFP4_RETURN_IF_ERROR(info.Reserve(options_.device, sizeof(int), stream(), stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
    plan->upload_seconds = lap();
    NVFP4_RETURN_IF_ERROR(FactorDamped(*order, h_float, b, info, plan.get()));
    plan->potrf_seconds = lap();
    if (options_.inverse == CudaGptqInverse::kCusolverTrtri) {
      NVFP4_RETURN_IF_ERROR(InvertFactor(n, b, info));
    } else {
      NVFP4_RETURN_IF_ERROR(InvertLowerTriangular(b.As<double>(), n));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
    }
    plan->invert_seconds = lap();
    NVFP4_RETURN_IF_ERROR(StoreFactor(h_float, b, host_blocks, plan.get()));
    plan->store_seconds = lap();
    plan->memory_bytes = plan->hessian.bytes() + plan->factor.bytes() +
                         plan->factor_blocks.bytes() + plan->hessian_blocks.bytes() +
                         plan->bounds.bytes() + plan->group_order.bytes() + plan->column.bytes();
    plan->factor_seconds = SecondsSince(start);
    return std::shared_ptr<const GptqPlan>(std::move(plan));
  }

  absl::Status QuantizeRows(const GptqPlan& plan_base, const WeightView& weights, float global_amax,
                            int64_t row_begin, int64_t row_end, bool compare_local_hessian,
                            RowRangeOutput output, TensorStats* stats) override {
    const auto* plan = dynamic_cast<const CudaGptqPlan*>(&plan_base);
    if (plan == nullptr || plan->device != options_.device) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "gptq plan: prepared by another backend or device; prepare it with this (cuda, "
          "device %d) backend",
          options_.device));
    }
    NVFP4_RETURN_IF_ERROR(
        ValidateGptqRows(*plan, weights, global_amax, row_begin, row_end, output));
    const int64_t n = plan->n;
    const int64_t batch = plan->params.gptq.block_columns;
    const int64_t element_bytes = DTypeSize(weights.dtype);
    // Per row: weights, working weights, the batch's errors, outputs, statistics, and for
    // the comparison the local_hessian outputs and two double error rows.
    const int64_t per_row = n * element_bytes + n * 4 + batch * 4 + n / 2 + n / kBlockSize +
                            static_cast<int64_t>(sizeof(BlockStatistics)) +
                            (compare_local_hessian ? n / 2 + n / kBlockSize + 4 * n * 8 : 0) + 64;
    int64_t chunk = std::max<int64_t>(1, options_.memory_budget_bytes / per_row);
    // cuBLAS level-1 lengths are 32-bit.
    chunk = std::min<int64_t>(chunk, (int64_t{1} << 31) / (2 * n) - 1);
    chunk = std::min(chunk, row_end - row_begin);

    std::lock_guard<std::mutex> lock(mutex_);
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    ChunkBuffers buffers{};
    NVFP4_RETURN_IF_ERROR(
        ReserveChunk(chunk, n, batch, element_bytes, compare_local_hessian, &buffers));
    ChunkArgs a = MakeChunkArgs(*plan, weights.dtype, global_amax, buffers);
    const double objective_unit = ObjectiveUnit(a.global_scale);

    TensorStats part;
    double update_seconds = 0.0;
    double compare_seconds = 0.0;
    const auto start = std::chrono::steady_clock::now();
    std::vector<BlockStatistics> row_stats;
    for (int64_t c0 = row_begin; c0 < row_end; c0 += chunk) {
      a.rows = std::min(chunk, row_end - c0);
      NVFP4_RETURN_IF_ERROR(QuantizeChunk(a, batch, weights, c0, row_begin, buffers, output,
                                          &row_stats, &update_seconds));
      for (const BlockStatistics& s : row_stats) AddBlockStatistics(s, objective_unit, &part);
      if (compare_local_hessian) {
        const auto compare_start = std::chrono::steady_clock::now();
        NVFP4_CUDA_RETURN_IF_ERROR(
            LaunchLocalHessian(a, buffers.lh_codes, buffers.lh_scales, stream()));
        double errors[2] = {0.0, 0.0};
        NVFP4_RETURN_IF_ERROR(FullHessianErrors(a, *plan, buffers, errors));
        part.gptq.full_hessian_error += errors[0];
        part.gptq.full_hessian_error_local_hessian += errors[1];
        compare_seconds += SecondsSince(compare_start);
      }
    }
    part.objective_before = part.hessian_error_before;
    part.objective_after = part.hessian_error_after;
    AccumulateStats(part, stats);
    GptqStats& g = stats->gptq;
    g.damping_relative = plan->damping_relative;
    g.damping_increases = plan->damping_increases;
    g.quantize_seconds += SecondsSince(start) - compare_seconds;
    g.compare_seconds += compare_seconds;
    g.update_seconds += update_seconds;
    return absl::OkStatus();
  }

 private:
  CudaGptq(const CudaGptqOptions& options, const MathLibraries* libs)
      : options_(options), libs_(libs), upload_(options.staged_copies) {}

  cudaStream_t stream() const { return stream_.get(); }

  // Reserves H (fp32) and b on the device and the plan's column order, group order and bounds,
  // and copies H and those three there.
  absl::Status UploadHessian(const FullHessianView& hessian, const GptqOrder& order,
                             const std::vector<HessianBlockBounds>& bounds, DeviceBuffer* h_float,
                             DeviceBuffer* b, CudaGptqPlan* plan) {
    const int device = options_.device;
    const int64_t n = hessian.n;
    const int64_t groups = n / kBlockSize;
    const int64_t nn = n * n;
    const std::vector<int32_t> group_order(order.group_order.begin(), order.group_order.end());
    const std::vector<int32_t> column(order.column.begin(), order.column.end());
    NVFP4_RETURN_IF_ERROR(h_float->Reserve(device, nn * 4, stream(), stream()));
    NVFP4_RETURN_IF_ERROR(b->Reserve(device, nn * 8, stream(), stream()));
    NVFP4_RETURN_IF_ERROR(plan->column.Reserve(device, n * 4, stream(), nullptr));
    NVFP4_RETURN_IF_ERROR(plan->group_order.Reserve(device, groups * 4, stream(), nullptr));
    NVFP4_RETURN_IF_ERROR(plan->bounds.Reserve(
        device, static_cast<int64_t>(bounds.size() * sizeof(HessianBlockBounds)), stream(),
        nullptr));
    NVFP4_RETURN_IF_ERROR(upload_.Copy(h_float->As<float>(), hessian.data, nn * 4, stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(plan->column.As<int32_t>(), column.data(),
                                               static_cast<size_t>(n * 4), cudaMemcpyHostToDevice,
                                               stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(plan->group_order.As<int32_t>(), group_order.data(),
                                               static_cast<size_t>(groups * 4),
                                               cudaMemcpyHostToDevice, stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(plan->bounds.As<HessianBlockBounds>(), bounds.data(),
                                               bounds.size() * sizeof(HessianBlockBounds),
                                               cudaMemcpyHostToDevice, stream()));
    return absl::OkStatus();
  }

  // b = the lower Cholesky factor of the reversed H_perm + lambda I (potrf), lambda growing by
  // the CPU's rule (NextGptqDamping) until it factorises; sets the plan's damping.
  absl::Status FactorDamped(const GptqOrder& order, const DeviceBuffer& h_float,
                            const DeviceBuffer& b, const DeviceBuffer& info, CudaGptqPlan* plan) {
    const int64_t n = plan->n;
    const double damping = plan->params.gptq.damping;
    double relative = damping;
    int increases = 0;
    for (;; ++increases) {
      const double lambda = relative * order.mean_diagonal;
      NVFP4_CUDA_RETURN_IF_ERROR(LaunchBuildReversed(
          h_float.As<float>(), plan->column.As<int32_t>(), n, lambda, b.As<double>(), stream()));
      size_t device_bytes = 0;
      size_t host_bytes = 0;
      NVFP4_RETURN_IF_ERROR(CusolverStatus(
          libs_->cusolverDnXpotrf_bufferSize(cusolver_, solver_params_, CUBLAS_FILL_MODE_LOWER, n,
                                             CUDA_R_64F, b.As<double>(), n, CUDA_R_64F,
                                             &device_bytes, &host_bytes),
          "potrf_bufferSize"));
      NVFP4_RETURN_IF_ERROR(workspace_.Reserve(
          options_.device, static_cast<int64_t>(device_bytes) + 8, stream(), stream()));
      std::vector<char> host_work(host_bytes + 8);
      NVFP4_RETURN_IF_ERROR(CusolverStatus(
          libs_->cusolverDnXpotrf(cusolver_, solver_params_, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_64F,
                                  b.As<double>(), n, CUDA_R_64F, workspace_.As<void>(),
                                  device_bytes, host_work.data(), host_bytes, info.As<int>()),
          "potrf"));
      int host_info = 0;
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&host_info, info.As<int>(), sizeof(int),
                                                 cudaMemcpyDeviceToHost, stream()));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
      if (host_info == 0) break;
      if (host_info < 0) {
        return absl::InternalError(absl::StrFormat("potrf: argument %d", -host_info));
      }
      const std::optional<double> next = NextGptqDamping(relative, damping);
      if (!next.has_value()) {
        const int64_t r = host_info - 1;
        double pivot = 0.0;
        NVFP4_CUDA_RETURN_IF_ERROR(
            cudaMemcpy(&pivot, b.As<double>() + r + r * n, sizeof(double), cudaMemcpyDeviceToHost));
        return GptqNotPositiveDefinite(relative, order.mean_diagonal,
                                       order.column[static_cast<size_t>(n - 1 - r)], pivot,
                                       damping);
      }
      relative = *next;
    }
    plan->damping_relative = relative;
    plan->damping_increases = increases;
    return absl::OkStatus();
  }

  // b = the inverse of its lower triangular factor (trtri).
  absl::Status InvertFactor(int64_t n, const DeviceBuffer& b, const DeviceBuffer& info) {
    size_t device_bytes = 0;
    size_t host_bytes = 0;
    NVFP4_RETURN_IF_ERROR(CusolverStatus(
        libs_->cusolverDnXtrtri_bufferSize(cusolver_, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT,
                                           n, CUDA_R_64F, b.As<double>(), n, &device_bytes,
                                           &host_bytes),
        "trtri_bufferSize"));
    NVFP4_RETURN_IF_ERROR(workspace_.Reserve(
        options_.device, static_cast<int64_t>(device_bytes) + 8, stream(), stream()));
    std::vector<char> host_work(host_bytes + 8);
    NVFP4_RETURN_IF_ERROR(CusolverStatus(
        libs_->cusolverDnXtrtri(cusolver_, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n,
                                CUDA_R_64F, b.As<double>(), n, workspace_.As<void>(), device_bytes,
                                host_work.data(), host_bytes, info.As<int>()),
        "trtri"));
    int host_info = 0;
    NVFP4_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(&host_info, info.As<int>(), sizeof(int), cudaMemcpyDeviceToHost, stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
    if (host_info != 0) {
      return absl::InternalError(absl::StrFormat("trtri failed with info = %d", host_info));
    }
    return absl::OkStatus();
  }

  // a (lower triangular, column-major [n, n], nonzero diagonal: a Cholesky factor) = its
  // inverse, in place: the diagonal leaves by a kernel, then for each node of a binary tree over
  // the leaves, children first, with A = [A11 0; A21 A22] and A11, A22 already inverted,
  // A21 = -A22^-1 A21 A11^-1: by two DGEMMs on whole blocks (kBlockedGemm; the upper triangles
  // are 0, BuildReversedKernel writes them; 2 n^3 / 3 flops on the fp64 tensor cores), the first
  // into a temporary, or by two in-place cuBLAS trmm (kBlockedTrmm; n^3 / 3 flops, at a fraction
  // of that pace: 62-83 against 38 ms for n = 14336 on an H100; cuSOLVER's trtri took 3x longer
  // still).
  absl::Status InvertLowerTriangular(double* a, int64_t n) {
    NVFP4_CUDA_RETURN_IF_ERROR(LaunchInvertLowerLeaves(a, n, stream()));
    DeviceBuffer temp;  // [m2, m1] of a node, m1 * m2 <= n^2 / 4
    if (options_.inverse == CudaGptqInverse::kBlockedGemm) {
      NVFP4_RETURN_IF_ERROR(temp.Reserve(options_.device, n * n * 2 + 8, stream(), stream()));
    }
    return InvertLowerAbove(a, n, 0, (n + kInverseLeaf - 1) / kInverseLeaf, temp.As<double>());
  }

  // The off-diagonal blocks of leaves [l0, l1) (their diagonal blocks already inverted).
  absl::Status InvertLowerAbove(double* a, int64_t n, int64_t l0, int64_t l1, double* temp) {
    if (l1 - l0 < 2) return absl::OkStatus();
    const int64_t mid = l0 + (l1 - l0) / 2;
    NVFP4_RETURN_IF_ERROR(InvertLowerAbove(a, n, l0, mid, temp));
    NVFP4_RETURN_IF_ERROR(InvertLowerAbove(a, n, mid, l1, temp));
    const int64_t r0 = l0 * kInverseLeaf;
    const int64_t r1 = mid * kInverseLeaf;
    const int64_t r2 = std::min(n, l1 * kInverseLeaf);
    const int m1 = static_cast<int>(r1 - r0);
    const int m2 = static_cast<int>(r2 - r1);
    const int ld = static_cast<int>(n);
    const double* x11 = a + r0 + r0 * n;
    const double* x22 = a + r1 + r1 * n;
    double* a21 = a + r1 + r0 * n;
    const double one = 1.0;
    const double minus_one = -1.0;
    if (temp != nullptr) {
      const double zero = 0.0;
      NVFP4_RETURN_IF_ERROR(
          CublasStatus(libs_->cublasDgemm(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, m2, m1, m1, &one, a21,
                                          ld, x11, ld, &zero, temp, m2),
                       "dgemm"));
      return CublasStatus(libs_->cublasDgemm(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, m2, m1, m2,
                                             &minus_one, x22, ld, temp, m2, &zero, a21, ld),
                          "dgemm");
    }
    // A21 = A21 X11, then A21 = -X22 A21 (in place: cuBLAS writes C, here B itself).
    NVFP4_RETURN_IF_ERROR(CublasStatus(
        libs_->cublasDtrmm(cublas_, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                           CUBLAS_DIAG_NON_UNIT, m2, m1, &one, x11, ld, a21, ld, a21, ld),
        "trmm"));
    NVFP4_RETURN_IF_ERROR(CublasStatus(
        libs_->cublasDtrmm(cublas_, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                           CUBLAS_DIAG_NON_UNIT, m2, m1, &minus_one, x22, ld, a21, ld, a21, ld),
        "trmm"));
    return absl::OkStatus();
  }

  // The plan's U (from b's inverse), H in double, and the diagonal blocks of both; returns once
  // they are on the device.
  absl::Status StoreFactor(const DeviceBuffer& h_float, const DeviceBuffer& b,
                           const std::vector<float>& host_blocks, CudaGptqPlan* plan) {
    const int device = options_.device;
    const int64_t n = plan->n;
    const int64_t groups = n / kBlockSize;
    NVFP4_RETURN_IF_ERROR(plan->factor.Reserve(device, n * n * 4, stream(), nullptr));
    NVFP4_RETURN_IF_ERROR(plan->hessian.Reserve(device, n * n * 8, stream(), nullptr));
    NVFP4_CUDA_RETURN_IF_ERROR(LaunchExtractFactor(b.As<double>(), h_float.As<float>(), n,
                                                   plan->factor.As<float>(),
                                                   plan->hessian.As<double>(), stream()));
    NVFP4_RETURN_IF_ERROR(plan->factor_blocks.Reserve(device, groups * kBlockSize * kBlockSize * 4,
                                                      stream(), nullptr));
    NVFP4_RETURN_IF_ERROR(plan->hessian_blocks.Reserve(device, groups * kBlockSize * kBlockSize * 4,
                                                       stream(), nullptr));
    NVFP4_CUDA_RETURN_IF_ERROR(LaunchExtractFactorBlocks(
        plan->factor.As<float>(), n, groups, plan->factor_blocks.As<float>(), stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(plan->hessian_blocks.As<float>(), host_blocks.data(),
                                               host_blocks.size() * sizeof(float),
                                               cudaMemcpyHostToDevice, stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
    return absl::OkStatus();
  }

  // Reserves the workspace for row chunks of `chunk` rows and carves it into *buffers.
  absl::Status ReserveChunk(int64_t chunk, int64_t n, int64_t batch, int64_t element_bytes,
                            bool compare, ChunkBuffers* buffers) {
    const int64_t weights_bytes = AlignUp(chunk * n * element_bytes);
    const int64_t work_bytes = AlignUp(chunk * n * 4);
    const int64_t errors_bytes = AlignUp(chunk * batch * 4);
    const int64_t codes_bytes = AlignUp(chunk * n / 2);
    const int64_t scales_bytes = AlignUp(chunk * n / kBlockSize);
    const int64_t stats_bytes = AlignUp(chunk * static_cast<int64_t>(sizeof(BlockStatistics)));
    // E and T = E H for both results, stacked: [2 rows, n] each.
    const int64_t e_bytes = compare ? AlignUp(2 * chunk * n * 8) : 0;
    const int64_t total = weights_bytes + work_bytes + errors_bytes + 2 * codes_bytes +
                          2 * scales_bytes + stats_bytes + 2 * e_bytes;
    NVFP4_RETURN_IF_ERROR(workspace_.Reserve(options_.device, total, stream(), stream()));
    char* at = workspace_.As<char>();
    auto take = [&at](int64_t bytes) {
      char* p = at;
      at += bytes;
      return p;
    };
    buffers->weights = take(weights_bytes);
    buffers->work = reinterpret_cast<float*>(take(work_bytes));
    buffers->errors = reinterpret_cast<float*>(take(errors_bytes));
    buffers->codes = reinterpret_cast<uint8_t*>(take(codes_bytes));
    buffers->scales = reinterpret_cast<uint8_t*>(take(scales_bytes));
    buffers->lh_codes = reinterpret_cast<uint8_t*>(take(codes_bytes));
    buffers->lh_scales = reinterpret_cast<uint8_t*>(take(scales_bytes));
    buffers->stats = reinterpret_cast<BlockStatistics*>(take(stats_bytes));
    buffers->e = reinterpret_cast<double*>(take(e_bytes));
    buffers->t = reinterpret_cast<double*>(take(e_bytes));
    return absl::OkStatus();
  }

  // What the kernels of every row chunk share (a.rows is set per chunk).
  static ChunkArgs MakeChunkArgs(const CudaGptqPlan& plan, DType dtype, float global_amax,
                                 const ChunkBuffers& buffers) {
    ChunkArgs a{};
    a.dtype = static_cast<int>(dtype);
    a.n = plan.n;
    a.work = buffers.work;
    a.errors = buffers.errors;
    a.codes = buffers.codes;
    a.scales = buffers.scales;
    a.stats = buffers.stats;
    a.factor = plan.factor.As<float>();
    a.factor_blocks = plan.factor_blocks.As<float>();
    a.hessian_blocks = plan.hessian_blocks.As<float>();
    a.bounds = plan.bounds.As<HessianBlockBounds>();
    a.group_order = plan.group_order.As<int32_t>();
    a.column = plan.column.As<int32_t>();
    a.global_amax = global_amax;
    a.global_scale = GlobalScaleFromAmax(global_amax);
    const int exponent = ErrorUnitExponent(a.global_scale);
    a.unit = ErrorUnitInverse(-exponent);
    a.unit_inverse = ErrorUnitInverse(exponent);
    a.config = plan.config;
    a.weights = buffers.weights;
    return a;
  }

  // Rows [c0, c0 + a.rows) of the tensor: weights in, the lazy batches of `batch` columns (group
  // kernel, then the update of the later columns), codes and scales out into `output` (whose
  // first row is row_begin) and the rows' statistics into *row_stats; returns once they are on
  // the host.
  absl::Status QuantizeChunk(const ChunkArgs& a, int64_t batch, const WeightView& weights,
                             int64_t c0, int64_t row_begin, const ChunkBuffers& buffers,
                             const RowRangeOutput& output, std::vector<BlockStatistics>* row_stats,
                             double* update_seconds) {
    const int64_t n = a.n;
    const int64_t rows = a.rows;
    const int64_t element_bytes = DTypeSize(weights.dtype);
    NVFP4_RETURN_IF_ERROR(upload_.Copy(
        buffers.weights, static_cast<const char*>(weights.data) + c0 * n * element_bytes,
        rows * n * element_bytes, stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
        buffers.stats, 0, static_cast<size_t>(rows) * sizeof(BlockStatistics), stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(LaunchLoadWork(a, stream()));
    for (int64_t b0 = 0; b0 < n; b0 += batch) {
      const int64_t b1 = std::min(n, b0 + batch);
      NVFP4_CUDA_RETURN_IF_ERROR(LaunchGroupBatch(a, b0, b1, stream()));
      if (b1 < n) NVFP4_RETURN_IF_ERROR(Update(a, b0, b1 - b0, update_seconds));
    }
    NVFP4_CUDA_RETURN_IF_ERROR(LaunchGroupStatistics(a, stream()));
    const int64_t blocks_per_row = n / kBlockSize;
    NVFP4_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(output.packed_codes.data() + (c0 - row_begin) * (n / 2), buffers.codes,
                        static_cast<size_t>(rows * n / 2), cudaMemcpyDeviceToHost, stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        output.scales.data() + (c0 - row_begin) * blocks_per_row, buffers.scales,
        static_cast<size_t>(rows * blocks_per_row), cudaMemcpyDeviceToHost, stream()));
    row_stats->resize(static_cast<size_t>(rows));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(row_stats->data(), buffers.stats,
                                               static_cast<size_t>(rows) * sizeof(BlockStatistics),
                                               cudaMemcpyDeviceToHost, stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
    return absl::OkStatus();
  }

  // The lazy batch's errors reach every column after it.
  absl::Status Update(const ChunkArgs& a, int64_t b0, int64_t depth, double* seconds) {
    const int64_t c_begin = b0 + depth;
    const int64_t columns = a.n - c_begin;
    std::chrono::steady_clock::time_point start{};
    if (options_.measure_update) {
      // The group kernel before it must not count.
      NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
      start = std::chrono::steady_clock::now();
    }
    if (options_.update == CudaGptqUpdate::kOrdered) {
      NVFP4_CUDA_RETURN_IF_ERROR(LaunchOrderedUpdate(a, b0, depth, c_begin, stream()));
    } else {
      // work[:, c_begin:] (rows x columns, column-major, ld rows) -= errors (rows x depth) *
      // U[b0:b0+depth, c_begin:]; the row-major U block read column-major is its transpose.
      const float minus_one = -1.0f;
      const float one = 1.0f;
      NVFP4_RETURN_IF_ERROR(CublasStatus(
          libs_->cublasSgemm(cublas_, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(a.rows),
                             static_cast<int>(columns), static_cast<int>(depth), &minus_one,
                             a.errors, static_cast<int>(a.rows), a.factor + b0 * a.n + c_begin,
                             static_cast<int>(a.n), &one, a.work + c_begin * a.rows,
                             static_cast<int>(a.rows)),
          "sgemm"));
    }
    if (options_.measure_update) {
      NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
      *seconds += SecondsSince(start);
    }
    return absl::OkStatus();
  }

  // tr(E H E^T) of the chunk's rows for two results (gptq's and local_hessian's): both error
  // matrices in double, stacked, then T = H E^T in one DGEMM with the symmetric H (the CPU's
  // upper triangle, mirrored) and sum(E .* T) per result (DDOT).
  absl::Status FullHessianErrors(const ChunkArgs& a, const CudaGptqPlan& plan,
                                 const ChunkBuffers& buffers, double* errors) {
    double* const e = buffers.e;
    double* const t = buffers.t;
    NVFP4_CUDA_RETURN_IF_ERROR(LaunchErrors(a, buffers.codes, buffers.scales, e, stream()));
    NVFP4_CUDA_RETURN_IF_ERROR(
        LaunchErrors(a, buffers.lh_codes, buffers.lh_scales, e + a.rows * a.n, stream()));
    // Column-major: E^T is n x (2 rows) with ld n.
    const double one = 1.0;
    const double zero = 0.0;
    NVFP4_RETURN_IF_ERROR(
        CublasStatus(libs_->cublasDgemm(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(a.n),
                                        static_cast<int>(2 * a.rows), static_cast<int>(a.n), &one,
                                        plan.hessian.As<double>(), static_cast<int>(a.n), e,
                                        static_cast<int>(a.n), &zero, t, static_cast<int>(a.n)),
                     "dgemm"));
    for (int k = 0; k < 2; ++k) {
      NVFP4_RETURN_IF_ERROR(CublasStatus(
          libs_->cublasDdot(cublas_, static_cast<int>(a.rows * a.n), e + k * a.rows * a.n, 1,
                            t + k * a.rows * a.n, 1, &errors[k]),
          "ddot"));
    }
    return absl::OkStatus();
  }

  const CudaGptqOptions options_;
  const MathLibraries* const libs_;
  BackendStream stream_;
  cublasHandle_t cublas_ = nullptr;
  cusolverDnHandle_t cusolver_ = nullptr;
  cusolverDnParams_t solver_params_ = nullptr;
  std::mutex mutex_;
  DeviceBuffer workspace_;
  StagedUpload upload_;  // H and the weights to the device; used under mutex_
};

}  // namespace
}  // namespace cuda_internal

absl::StatusOr<std::unique_ptr<GptqBackend>> MakeCudaGptq(const CudaGptqOptions& options) {
  return cuda_internal::CudaGptq::Create(options);
}

}  // namespace nvfp4cal
