// CUDA gptq backend (cuda_gptq.h, docs/numerics.md §6).
//
// Prepare: H goes to the device once; the damped, permuted and reversed matrix is factorised in
// double precision with cuSOLVER (potrf, then trtri: the CPU's construction, see
// ComputeGptqFactor), retrying with more damping by the CPU's rule; the plan keeps U (fp32,
// quantization order), H (double, for tr(E H E^T)), the diagonal blocks of H and U, and the
// pruning bounds of the H blocks.
//
// QuantizeRows keeps a row chunk's working weights on the device, column-major in quantization
// order (rows side by side, so neighbouring rows' loads coalesce):
//   per lazy batch of block_columns columns:
//     GroupBatchKernel   a team of 16 lanes per row runs the batch's groups in order: the scale
//                        choice with the candidates dealt out to the lanes (the sequential
//                        search's choice), the sequential pass (gptq_group.h, the CPU's code),
//                        errors to the rest of the batch, codes, scales and statistics out;
//     the update         the batch's errors reach every later column: OrderedUpdateKernel
//                        subtracts the rounded products one error at a time, in the CPU's order,
//                        so results are bit-identical to the CPU backend for the same factor and
//                        do not depend on how rows are split; cuBLAS SGEMM is the option
//                        (CudaGptqOptions::update) that gives up both properties.
// tr(E H E^T) of the result and of local_hessian's comes from one cuBLAS DGEMM on both error
// matrices in double, then DDOT. cuBLAS and cuSOLVER are dlopen'ed on first use.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "cuda_status.h"
#include "nvfp4cal/kernels/cuda_gptq.h"
#include "nvfp4cal/kernels/dtype.h"
#include "nvfp4cal/kernels/gptq.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/gptq_group.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"
#include "nvfp4cal/kernels/validation.h"

namespace nvfp4cal {
namespace {

constexpr int kRowThreads = 128;  // threads per CUDA block of the group kernel
constexpr int kGroupTeam = 16;    // lanes per row in the group kernel (a power of two <= 32)
constexpr int kUpdateTile = 128;  // rows x columns of one CUDA block of the update kernel
constexpr int kUpdateDepth = 16;  // errors staged in shared memory per step

// cuBLAS and cuSOLVER, loaded with dlopen on first use instead of linked. Linked libraries'
// thread-local storage goes into every thread's static TLS block, and cuBLASLt's is large
// enough that threads created with a small fixed stack (the metrics endpoint's HTTP server)
// fail to start; a dlopen'ed library's TLS is allocated per thread on demand instead.
struct MathLibraries {
// clang-format off
#define NVFP4_MATH_FUNCTIONS(X)                                                                    \
  X(cublasCreate_v2) X(cublasDestroy_v2) X(cublasSetStream_v2) X(cublasSetMathMode)               \
  X(cublasSgemm_v2) X(cublasDgemm_v2) X(cublasDdot_v2)                                            \
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

#define NVFP4_RETURN_IF_ERROR(expr)                \
  do {                                             \
    const absl::Status nvfp4_status_ = (expr);     \
    if (!nvfp4_status_.ok()) return nvfp4_status_; \
  } while (0)

// Device memory of one device, freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Free(); }

  // Holds at least `bytes` (contents not kept when it grows), allocated in stream order on
  // `stream` (no device-wide synchronisation, unlike cudaMalloc / cudaFree). It is freed in
  // stream order on `free_stream`: the owner's stream for temporaries, the legacy default
  // stream (0) for plans, which outlive the backend that made them and are only freed once no
  // call uses them. RESOURCE_EXHAUSTED on failure.
  absl::Status Reserve(int device, int64_t bytes, cudaStream_t stream, cudaStream_t free_stream) {
    if (bytes <= bytes_) return absl::OkStatus();
    Free();
    device_ = device;
    free_stream_ = free_stream;
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&data_, static_cast<size_t>(bytes), stream));
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void Free() {
    if (data_ != nullptr) {
      cudaSetDevice(device_);
      cudaFreeAsync(data_, free_stream_);
    }
    data_ = nullptr;
    bytes_ = 0;
  }
  template <typename T>
  T* As() const {
    return static_cast<T*>(data_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  int device_ = 0;
  cudaStream_t free_stream_ = nullptr;
  void* data_ = nullptr;
  int64_t bytes_ = 0;
};

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

// Per-row statistics, accumulated over the row's groups in order.
struct RowStats {
  double mse_before;
  double mse_after;
  double hessian_before;
  double hessian_after;
  int32_t blocks;
  int32_t scale_changed;
  int32_t beta_not_one;
  int32_t offset_not_zero;
  int32_t zero_hessian;
  int32_t padding;
};

// What the kernels of one row chunk share.
struct ChunkArgs {
  const void* weights;  // rows x n of `dtype`, row-major, original order
  int dtype;
  int64_t rows;
  int64_t n;
  float* work;                  // [n][rows]: working weights, quantization order
  float* errors;                // [batch][rows]: the current batch's scaled errors
  uint8_t* codes;               // rows x n / 2, original order
  uint8_t* scales;              // rows x n / 16
  RowStats* stats;              // [rows]
  const float* factor;          // U [n, n]
  const float* factor_blocks;   // [groups, 16, 16]
  const float* hessian_blocks;  // [groups, 16, 16]
  const HessianBlockBounds* bounds;
  const int32_t* group_order;
  const int32_t* column;
  float global_amax;
  float global_scale;
  float unit;
  float unit_inverse;
  GptqGroupConfig config;
};

// B(i, j) = A(n-1-i, n-1-j) for j >= i (column-major lower triangle) with A = H_perm + lambda I,
// as ComputeGptqFactor builds it on the host.
__global__ void BuildReversedKernel(const float* h, const int32_t* column, int64_t n, double lambda,
                                    double* b) {
  const int64_t j = blockIdx.x;
  for (int64_t i = threadIdx.x + static_cast<int64_t>(blockIdx.y) * blockDim.x; i <= j && i < n;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t ci = column[n - 1 - i];
    const int64_t cj = column[n - 1 - j];
    b[j + i * n] = static_cast<double>(h[ci * n + cj]) + (i == j ? lambda : 0.0);
  }
}

// U(i, j) = Linv(n-1-i, n-1-j) for j >= i, else 0 (float, row-major); and H in double,
// symmetric: the upper triangle mirrored, as the CPU's tr(E H E^T) reads it.
__global__ void ExtractFactorKernel(const double* linv, const float* h, int64_t n, float* u,
                                    double* h_double) {
  const int64_t i = blockIdx.x;
  for (int64_t j = threadIdx.x + static_cast<int64_t>(blockIdx.y) * blockDim.x; j < n;
       j += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    u[i * n + j] = j >= i ? static_cast<float>(linv[(n - 1 - i) + (n - 1 - j) * n]) : 0.0f;
    h_double[i * n + j] = static_cast<double>(j >= i ? h[i * n + j] : h[j * n + i]);
  }
}

// Diagonal 16x16 blocks of U (quantization order); H's come from the host (DiagonalBlocksOf).
__global__ void ExtractFactorBlocksKernel(const float* u, int64_t n, float* u_blocks) {
  const int64_t g = blockIdx.x;
  const int a = threadIdx.x / kBlockSize;
  const int b = threadIdx.x % kBlockSize;
  u_blocks[g * kBlockSize * kBlockSize + threadIdx.x] =
      u[(g * kBlockSize + a) * n + g * kBlockSize + b];
}

// work[p][r] = W(r, column[p]) as fp32.
__global__ void LoadWorkKernel(ChunkArgs a) {
  const int64_t p = blockIdx.x;
  const int64_t col = a.column[p];
  for (int64_t r = threadIdx.x + static_cast<int64_t>(blockIdx.y) * blockDim.x; r < a.rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float v;
    LoadAsFloat(a.weights, static_cast<DType>(a.dtype), r * a.n + col, 1, &v);
    a.work[p * a.rows + r] = v;
  }
}

// A candidate of a team's search: its objective and its position in the sequential visiting
// order.
struct TeamCandidate {
  float objective;
  int index;
};

// The sweep's order (SweepScaleCandidates): the candidate the sequential loop keeps is the
// first one (index 0) when its objective is NaN, else the smallest non-NaN objective, the
// smaller index on ties. `x` better than `y` in that order:
__device__ bool SweepBetter(const TeamCandidate& x, const TeamCandidate& y) {
  const bool x_top = x.index == 0 && isnan(x.objective);
  const bool y_top = y.index == 0 && isnan(y.objective);
  if (x_top || y_top) return x_top;
  if (isnan(x.objective) || isnan(y.objective)) return !isnan(x.objective);
  return x.objective < y.objective || (x.objective == y.objective && x.index < y.index);
}

// DSS's order (VisitDssCandidates): the smallest objective, the earlier visit on ties; NaN never
// wins (it never improves on the start).
__device__ bool DssBetter(const TeamCandidate& x, const TeamCandidate& y) {
  if (isnan(x.objective) || isnan(y.objective)) return !isnan(x.objective);
  return x.objective < y.objective || (x.objective == y.objective && x.index < y.index);
}

// The best of the team's candidates (every lane returns it). kTeam lanes, aligned in the warp.
template <int kTeam, class Better>
__device__ TeamCandidate TeamBest(TeamCandidate c, const Better& better) {
  for (int offset = kTeam / 2; offset > 0; offset /= 2) {
    const TeamCandidate other{__shfl_xor_sync(0xffffffffu, c.objective, offset, kTeam),
                              __shfl_xor_sync(0xffffffffu, c.index, offset, kTeam)};
    if (better(other, c)) c = other;
  }
  return c;
}

// A group's scale chosen by a team of lanes: the candidates are dealt out to the lanes, every
// one evaluated with the canonical objective, and the team's best in the sequential order is
// exactly the choice of GptqChooseGroupScale (whose pruning never changes it).
template <int kTeam, class Objective>
__device__ GptqGroupChoice TeamChooseScale(const ScaledBlock& b, const GptqGroupConfig& config,
                                           int lane, const Objective& objective) {
  TeamCandidate best{0.0f, -1};
  for (int k = lane; k < kNumScaleCandidates; k += kTeam) {
    const float f = ScaleCandidateValue(k);
    const TeamCandidate c{
        objective(MulNoContract(f, b.global_scale), MulNoContract(f, b.global_scale_unit)), k};
    if (best.index < 0 || SweepBetter(c, best)) best = c;
  }
  const TeamCandidate sweep = TeamBest<kTeam>(best, SweepBetter);
  if (!config.dss) {
    return GptqGroupChoice{sweep.index,
                           MulNoContract(ScaleCandidateValue(sweep.index), b.global_scale), 0, 0};
  }
  const DssGrid& grid = config.grid;
  const int k_begin = DssFirstNeighbour(sweep.index, grid.neighbours);
  const int k_end = DssLastNeighbour(sweep.index, grid.neighbours);
  const int betas = 2 * grid.beta_steps + 1;
  const int visits = (k_end - k_begin + 1) * betas;
  TeamCandidate dss{__int_as_float(0x7fc00000), visits};  // NaN: loses to every number
  for (int v = lane; v < visits; v += kTeam) {
    const int k = k_begin + v / betas;
    const int i = v % betas - grid.beta_steps;
    const float f = ScaleCandidateValue(k);
    const float q = DssQuantScale(DssBeta(i, grid.beta_step), b.global_amax, f);
    const TeamCandidate c{objective(q, MulNoContract(f, b.global_scale_unit)), v};
    if (DssBetter(c, dss)) dss = c;
  }
  dss = TeamBest<kTeam>(dss, DssBetter);
  if (!(dss.objective < sweep.objective)) {
    return GptqGroupChoice{sweep.index,
                           MulNoContract(ScaleCandidateValue(sweep.index), b.global_scale), 0, 0};
  }
  const int k = k_begin + dss.index / betas;
  const int i = dss.index % betas - grid.beta_steps;
  return GptqGroupChoice{
      k, DssQuantScale(DssBeta(i, grid.beta_step), b.global_amax, ScaleCandidateValue(k)),
      k - sweep.index, i};
}

// A team of kTeam lanes per row runs the groups of quantization positions [b0, b1) in order.
// The CUDA block's rows all reach the same group together, so its blocks of H and U sit in
// shared memory for the whole block.
template <int kTeam>
__global__ void __launch_bounds__(kRowThreads)
    GroupBatchKernel(ChunkArgs a, int64_t b0, int64_t b1) {
  __shared__ float hs[kBlockSize * kBlockSize];
  __shared__ float us[kBlockSize * kBlockSize];
  const int lane = threadIdx.x % kTeam;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (kRowThreads / kTeam) + threadIdx.x / kTeam;
  const bool active = row < a.rows;
  // Teams past the last row compute on the last row and write nothing (the shuffles and the
  // barriers need every lane).
  const int64_t r = active ? row : a.rows - 1;
  RowStats st = active && lane == 0 ? a.stats[r] : RowStats{};
  for (int64_t p0 = b0; p0 < b1; p0 += kBlockSize) {
    const int64_t t = p0 / kBlockSize;
    const int64_t group = a.group_order[t];
    __syncthreads();
    for (int i = threadIdx.x; i < kBlockSize * kBlockSize; i += kRowThreads) {
      hs[i] = a.hessian_blocks[group * kBlockSize * kBlockSize + i];
      us[i] = a.factor_blocks[t * kBlockSize * kBlockSize + i];
    }
    __syncthreads();
    float w[kBlockSize];
    for (int i = 0; i < kBlockSize; ++i) w[i] = a.work[(p0 + i) * a.rows + r];
    GptqGroupOutput out{};
    GptqGroupChoice choice{0, 0.0f, 0, 0};
    if (a.global_amax > 0.0f) {
      ScaledBlock b{};
      PrepareScaledBlock(w, a.global_amax, a.global_scale, &b);
      if (a.config.exact_cost) {
        const GptqCostObjective cost{w, a.unit, a.unit_inverse, us};
        choice = TeamChooseScale<kTeam>(b, a.config, lane, cost);
      } else {
        choice = TeamChooseScale<kTeam>(b, a.config, lane, [&](float q, float d_unit) {
          return CandidateObjective(b, q, d_unit, hs);
        });
      }
      const float d_unit = MulNoContract(ScaleCandidateValue(choice.candidate),
                                         MulNoContract(a.global_scale, a.unit_inverse));
      GptqGroupPass(w, choice.q, d_unit, a.unit, a.unit_inverse, us, &out);
    }
    // All-zero tensor (g = 0): codes 0, scale byte 0x01, nothing to propagate.
    const uint8_t scale_byte = static_cast<uint8_t>(choice.candidate + 1);
    if (active && lane == 0) {
      a.scales[r * (a.n / kBlockSize) + group] = scale_byte;
      for (int i = 0; i < kBlockSize / 2; ++i) {
        a.codes[r * (a.n / 2) + group * (kBlockSize / 2) + i] =
            PackE2M1Pair(out.codes[2 * i], out.codes[2 * i + 1]);
      }
      float orig[kBlockSize];
      LoadAsFloat(a.weights, static_cast<DType>(a.dtype), r * a.n + group * kBlockSize, kBlockSize,
                  orig);
      const GptqGroupStats g =
          GptqGroupStatistics(orig, a.global_amax, a.global_scale, a.unit_inverse, hs, scale_byte,
                              out.codes, a.config.grid);
      st.mse_before += g.mse_before;
      st.mse_after += g.mse_after;
      st.hessian_before += g.hessian_before;
      st.hessian_after += g.hessian_after;
      st.blocks += 1;
      st.scale_changed += g.scale_changed;
      st.beta_not_one += choice.dss_beta_index != 0;
      st.offset_not_zero += choice.dss_offset != 0;
      st.zero_hessian += g.zero_hessian;
      for (int i = 0; i < kBlockSize; ++i) {
        a.errors[(p0 - b0 + i) * a.rows + r] = out.scaled_error[i];
      }
    }
    // The group's errors reach the rest of the batch now, one error after the other per
    // element (the CPU's order); the lanes share the columns.
    if (active) {
      for (int64_t l = p0 + kBlockSize + lane; l < b1; l += kTeam) {
        float x = a.work[l * a.rows + r];
        for (int i = 0; i < kBlockSize; ++i) {
          x = AddNoContract(x, -MulNoContract(out.scaled_error[i], a.factor[(p0 + i) * a.n + l]));
        }
        a.work[l * a.rows + r] = x;
      }
    }
    __syncwarp();
  }
  if (active && lane == 0) a.stats[r] = st;
}

// work[c][r] -= errors[k][r] * U(b0 + k, c) for every column c >= c_begin, k = 0, 1, ... in
// order, each product rounded before its subtraction: the CPU backend's update, bit for bit.
// A CUDA block owns 128 rows x 128 columns; each thread 8 x 8 of them (8 consecutive rows and 8
// consecutive columns), staging 16 errors and 16 factor rows in shared memory per step and
// reading them as float4.
constexpr int kUpdatePerThread = 8;
__global__ void __launch_bounds__(256)
    OrderedUpdateKernel(float* work, const float* errors, const float* factor, int64_t rows,
                        int64_t n, int64_t b0, int64_t depth, int64_t c_begin) {
  __shared__ __align__(16) float es[kUpdateDepth][kUpdateTile];
  __shared__ __align__(16) float us[kUpdateDepth][kUpdateTile];
  const int tx = threadIdx.x % 16;  // rows tx * 8 ..
  const int ty = threadIdx.x / 16;  // columns ty * 8 ..
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kUpdateTile;
  const int64_t col0 = c_begin + static_cast<int64_t>(blockIdx.y) * kUpdateTile;
  float acc[kUpdatePerThread][kUpdatePerThread];
  for (int i = 0; i < kUpdatePerThread; ++i) {
    for (int j = 0; j < kUpdatePerThread; ++j) {
      const int64_t r = row0 + tx * kUpdatePerThread + i;
      const int64_t c = col0 + ty * kUpdatePerThread + j;
      acc[i][j] = (r < rows && c < n) ? work[c * rows + r] : 0.0f;
    }
  }
  for (int64_t k0 = 0; k0 < depth; k0 += kUpdateDepth) {
    for (int e = threadIdx.x; e < kUpdateDepth * kUpdateTile; e += 256) {
      const int kk = e / kUpdateTile;
      const int x = e % kUpdateTile;
      const bool k_in = k0 + kk < depth;
      es[kk][x] = (k_in && row0 + x < rows) ? errors[(k0 + kk) * rows + row0 + x] : 0.0f;
      us[kk][x] = (k_in && col0 + x < n) ? factor[(b0 + k0 + kk) * n + col0 + x] : 0.0f;
    }
    __syncthreads();
    const int steps = static_cast<int>(min(static_cast<int64_t>(kUpdateDepth), depth - k0));
    for (int kk = 0; kk < steps; ++kk) {
      float e8[kUpdatePerThread];
      float u8[kUpdatePerThread];
      const float4* ev = reinterpret_cast<const float4*>(&es[kk][tx * kUpdatePerThread]);
      const float4* uv = reinterpret_cast<const float4*>(&us[kk][ty * kUpdatePerThread]);
      for (int h = 0; h < kUpdatePerThread / 4; ++h) {
        const float4 x = ev[h];
        const float4 y = uv[h];
        e8[4 * h] = x.x;
        e8[4 * h + 1] = x.y;
        e8[4 * h + 2] = x.z;
        e8[4 * h + 3] = x.w;
        u8[4 * h] = y.x;
        u8[4 * h + 1] = y.y;
        u8[4 * h + 2] = y.z;
        u8[4 * h + 3] = y.w;
      }
      for (int i = 0; i < kUpdatePerThread; ++i) {
        for (int j = 0; j < kUpdatePerThread; ++j) {
          acc[i][j] = __fsub_rn(acc[i][j], __fmul_rn(e8[i], u8[j]));
        }
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < kUpdatePerThread; ++i) {
    for (int j = 0; j < kUpdatePerThread; ++j) {
      const int64_t r = row0 + tx * kUpdatePerThread + i;
      const int64_t c = col0 + ty * kUpdatePerThread + j;
      if (r < rows && c < n) work[c * rows + r] = acc[i][j];
    }
  }
}

// e[r, c] = W(r, c) - W_hat(r, c) in double (original order) for the given codes and scales.
__global__ void ErrorKernel(ChunkArgs a, const uint8_t* codes, const uint8_t* scales, double* e) {
  const int64_t r = blockIdx.x;
  for (int64_t c = threadIdx.x + static_cast<int64_t>(blockIdx.y) * blockDim.x; c < a.n;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float w;
    LoadAsFloat(a.weights, static_cast<DType>(a.dtype), r * a.n + c, 1, &w);
    const uint8_t byte = codes[(r * a.n + c) / 2];
    const uint8_t code = c % 2 == 0 ? UnpackE2M1Low(byte) : UnpackE2M1High(byte);
    const double d = static_cast<double>(DecodeE4M3(scales[(r * a.n + c) / kBlockSize])) *
                     static_cast<double>(a.global_scale);
    e[r * a.n + c] = static_cast<double>(w) - static_cast<double>(DecodeE2M1(code)) * d;
  }
}

// local_hessian's codes and scales for the chunk, for the comparison: a team of kTeam lanes
// per block runs the 126-candidate sweep (TeamChooseScale, the same choice as QuantizeBlock's
// pruned sweep). With g = 0 every weight is 0 and so is every error, whatever the scale.
template <int kTeam>
__global__ void __launch_bounds__(kRowThreads)
    LocalHessianKernel(ChunkArgs a, uint8_t* codes, uint8_t* scales) {
  const int64_t blocks_per_row = a.n / kBlockSize;
  const int lane = threadIdx.x % kTeam;
  const int64_t team_block =
      static_cast<int64_t>(blockIdx.x) * (kRowThreads / kTeam) + threadIdx.x / kTeam;
  // Teams past the last block compute the last one and write nothing (the shuffles need every
  // lane of the warp).
  const bool active = team_block < a.rows * blocks_per_row;
  const int64_t block = active ? team_block : a.rows * blocks_per_row - 1;
  const int64_t r = block / blocks_per_row;
  const int64_t j = block % blocks_per_row;
  float w[kBlockSize];
  LoadAsFloat(a.weights, static_cast<DType>(a.dtype), r * a.n + j * kBlockSize, kBlockSize, w);
  GptqGroupChoice choice{0, 0.0f, 0, 0};
  if (a.global_amax > 0.0f) {
    ScaledBlock b{};
    PrepareScaledBlock(w, a.global_amax, a.global_scale, &b);
    const float* h = a.hessian_blocks + j * kBlockSize * kBlockSize;
    const GptqGroupConfig sweep_only{false, false, a.config.grid};
    choice = TeamChooseScale<kTeam>(b, sweep_only, lane, [&](float q, float d_unit) {
      return CandidateObjective(b, q, d_unit, h);
    });
  }
  if (active && lane == 0) {
    scales[block] = static_cast<uint8_t>(choice.candidate + 1);
    for (int i = 0; i < kBlockSize / 2; ++i) {
      codes[block * (kBlockSize / 2) + i] =
          a.global_amax > 0.0f
              ? PackE2M1Pair(EncodeE2M1(w[2 * i] / choice.q), EncodeE2M1(w[2 * i + 1] / choice.q))
              : 0;
    }
  }
}

int64_t AlignUp(int64_t bytes) { return (bytes + 255) / 256 * 256; }

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

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
    if (options.stream == nullptr) {
      NVFP4_CUDA_RETURN_IF_ERROR(
          cudaStreamCreateWithFlags(&impl->owned_stream_, cudaStreamNonBlocking));
      impl->stream_ = impl->owned_stream_;
    }
    NVFP4_RETURN_IF_ERROR(CublasStatus(impl->libs_->cublasCreate(&impl->cublas_), "cublasCreate"));
    NVFP4_RETURN_IF_ERROR(CublasStatus(impl->libs_->cublasSetStream(impl->cublas_, impl->stream_),
                                       "cublasSetStream"));
    // Default math: fp32 stays fp32 (no TF32: it keeps fewer mantissa bits than requested) and
    // DGEMM may use the fp64 tensor cores (IEEE double fused multiply-adds).
    NVFP4_RETURN_IF_ERROR(CublasStatus(
        impl->libs_->cublasSetMathMode(impl->cublas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode"));
    NVFP4_RETURN_IF_ERROR(
        CusolverStatus(impl->libs_->cusolverDnCreate(&impl->cusolver_), "cusolverDnCreate"));
    NVFP4_RETURN_IF_ERROR(CusolverStatus(
        impl->libs_->cusolverDnSetStream(impl->cusolver_, impl->stream_), "cusolverDnSetStream"));
    NVFP4_RETURN_IF_ERROR(CusolverStatus(impl->libs_->cusolverDnCreateParams(&impl->solver_params_),
                                         "cusolverDnCreateParams"));
    return std::unique_ptr<GptqBackend>(std::move(impl));
  }

  ~CudaGptq() override {
    cudaSetDevice(options_.device);
    workspace_.Free();
    if (solver_params_ != nullptr) libs_->cusolverDnDestroyParams(solver_params_);
    if (cusolver_ != nullptr) libs_->cusolverDnDestroy(cusolver_);
    if (cublas_ != nullptr) libs_->cublasDestroy(cublas_);
    if (owned_stream_ != nullptr) cudaStreamDestroy(owned_stream_);
  }

  std::string_view BackendName() const override { return "cuda"; }

  absl::StatusOr<std::shared_ptr<const GptqPlan>> Prepare(const FullHessianView& hessian,
                                                          const SearchParams& params) override {
    NVFP4_RETURN_IF_ERROR(ValidateGptqHessian(hessian, params));
    const auto start = std::chrono::steady_clock::now();
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
    std::vector<int32_t> group_order(order->group_order.begin(), order->group_order.end());
    std::vector<int32_t> column(order->column.begin(), order->column.end());

    std::lock_guard<std::mutex> lock(mutex_);
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    const int device = options_.device;
    const int64_t nn = n * n;
    DeviceBuffer h_float;
    DeviceBuffer b;
    NVFP4_RETURN_IF_ERROR(h_float.Reserve(device, nn * 4, stream_, stream_));
    NVFP4_RETURN_IF_ERROR(b.Reserve(device, nn * 8, stream_, stream_));
    NVFP4_RETURN_IF_ERROR(plan->column.Reserve(device, n * 4, stream_, nullptr));
    NVFP4_RETURN_IF_ERROR(plan->group_order.Reserve(device, groups * 4, stream_, nullptr));
    NVFP4_RETURN_IF_ERROR(plan->bounds.Reserve(
        device, static_cast<int64_t>(bounds.size() * sizeof(HessianBlockBounds)), stream_,
        nullptr));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_float.As<float>(), hessian.data,
                                               static_cast<size_t>(nn * 4), cudaMemcpyHostToDevice,
                                               stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(plan->column.As<int32_t>(), column.data(),
                                               static_cast<size_t>(n * 4), cudaMemcpyHostToDevice,
                                               stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(plan->group_order.As<int32_t>(), group_order.data(),
                                               static_cast<size_t>(groups * 4),
                                               cudaMemcpyHostToDevice, stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(plan->bounds.As<HessianBlockBounds>(), bounds.data(),
                                               bounds.size() * sizeof(HessianBlockBounds),
                                               cudaMemcpyHostToDevice, stream_));
    DeviceBuffer info;
    NVFP4_RETURN_IF_ERROR(info.Reserve(device, sizeof(int), stream_, stream_));
    const dim3 tri_grid(static_cast<unsigned>(n),
                        static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 64)));
    double relative = params.gptq.damping;
    int increases = 0;
    for (;; ++increases) {
      const double lambda = relative * order->mean_diagonal;
      BuildReversedKernel<<<tri_grid, 256, 0, stream_>>>(
          h_float.As<float>(), plan->column.As<int32_t>(), n, lambda, b.As<double>());
      NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      size_t device_bytes = 0;
      size_t host_bytes = 0;
      NVFP4_RETURN_IF_ERROR(CusolverStatus(
          libs_->cusolverDnXpotrf_bufferSize(cusolver_, solver_params_, CUBLAS_FILL_MODE_LOWER, n,
                                             CUDA_R_64F, b.As<double>(), n, CUDA_R_64F,
                                             &device_bytes, &host_bytes),
          "potrf_bufferSize"));
      NVFP4_RETURN_IF_ERROR(
          workspace_.Reserve(device, static_cast<int64_t>(device_bytes) + 8, stream_, stream_));
      std::vector<char> host_work(host_bytes + 8);
      NVFP4_RETURN_IF_ERROR(CusolverStatus(
          libs_->cusolverDnXpotrf(cusolver_, solver_params_, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_64F,
                                  b.As<double>(), n, CUDA_R_64F, workspace_.As<void>(),
                                  device_bytes, host_work.data(), host_bytes, info.As<int>()),
          "potrf"));
      int host_info = 0;
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&host_info, info.As<int>(), sizeof(int),
                                                 cudaMemcpyDeviceToHost, stream_));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      if (host_info == 0) break;
      if (host_info < 0) {
        return absl::InternalError(absl::StrFormat("potrf: argument %d", -host_info));
      }
      const std::optional<double> next = NextGptqDamping(relative, params.gptq.damping);
      if (!next.has_value()) {
        const int64_t r = host_info - 1;
        double pivot = 0.0;
        NVFP4_CUDA_RETURN_IF_ERROR(
            cudaMemcpy(&pivot, b.As<double>() + r + r * n, sizeof(double), cudaMemcpyDeviceToHost));
        return GptqNotPositiveDefinite(relative, order->mean_diagonal,
                                       order->column[static_cast<size_t>(n - 1 - r)], pivot,
                                       params.gptq.damping);
      }
      relative = *next;
    }
    plan->damping_relative = relative;
    plan->damping_increases = increases;
    {
      size_t device_bytes = 0;
      size_t host_bytes = 0;
      NVFP4_RETURN_IF_ERROR(CusolverStatus(
          libs_->cusolverDnXtrtri_bufferSize(cusolver_, CUBLAS_FILL_MODE_LOWER,
                                             CUBLAS_DIAG_NON_UNIT, n, CUDA_R_64F, b.As<double>(), n,
                                             &device_bytes, &host_bytes),
          "trtri_bufferSize"));
      NVFP4_RETURN_IF_ERROR(
          workspace_.Reserve(device, static_cast<int64_t>(device_bytes) + 8, stream_, stream_));
      std::vector<char> host_work(host_bytes + 8);
      NVFP4_RETURN_IF_ERROR(CusolverStatus(
          libs_->cusolverDnXtrtri(cusolver_, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n,
                                  CUDA_R_64F, b.As<double>(), n, workspace_.As<void>(),
                                  device_bytes, host_work.data(), host_bytes, info.As<int>()),
          "trtri"));
      int host_info = 0;
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&host_info, info.As<int>(), sizeof(int),
                                                 cudaMemcpyDeviceToHost, stream_));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      if (host_info != 0) {
        return absl::InternalError(absl::StrFormat("trtri failed with info = %d", host_info));
      }
    }
    NVFP4_RETURN_IF_ERROR(plan->factor.Reserve(device, nn * 4, stream_, nullptr));
    NVFP4_RETURN_IF_ERROR(plan->hessian.Reserve(device, nn * 8, stream_, nullptr));
    ExtractFactorKernel<<<tri_grid, 256, 0, stream_>>>(b.As<double>(), h_float.As<float>(), n,
                                                       plan->factor.As<float>(),
                                                       plan->hessian.As<double>());
    NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    NVFP4_RETURN_IF_ERROR(plan->factor_blocks.Reserve(device, groups * kBlockSize * kBlockSize * 4,
                                                      stream_, nullptr));
    NVFP4_RETURN_IF_ERROR(plan->hessian_blocks.Reserve(device, groups * kBlockSize * kBlockSize * 4,
                                                       stream_, nullptr));
    ExtractFactorBlocksKernel<<<static_cast<unsigned>(groups), kBlockSize * kBlockSize, 0,
                                stream_>>>(plan->factor.As<float>(), n,
                                           plan->factor_blocks.As<float>());
    NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(plan->hessian_blocks.As<float>(), host_blocks.data(),
                                               host_blocks.size() * sizeof(float),
                                               cudaMemcpyHostToDevice, stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    plan->memory_bytes = plan->hessian.bytes() + plan->factor.bytes() +
                         plan->factor_blocks.bytes() + plan->hessian_blocks.bytes() +
                         plan->bounds.bytes() + plan->group_order.bytes() + plan->column.bytes();
    plan->factor_seconds = SecondsSince(start);
    return std::shared_ptr<const GptqPlan>(std::move(plan));
  }

  absl::Status QuantizeRows(const GptqPlan& plan_base, const WeightView& weights, float global_amax,
                            int64_t row_begin, int64_t row_end, RowRangeOutput output,
                            TensorStats* stats) override {
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
    const bool compare = options_.compare_local_hessian;
    // Per row: weights, working weights, the batch's errors, outputs, statistics, and for
    // the comparison the local_hessian outputs and two double error rows.
    const int64_t per_row = n * element_bytes + n * 4 + batch * 4 + n / 2 + n / kBlockSize +
                            static_cast<int64_t>(sizeof(RowStats)) +
                            (compare ? n / 2 + n / kBlockSize + 4 * n * 8 : 0) + 64;
    int64_t chunk = std::max<int64_t>(1, options_.memory_budget_bytes / per_row);
    // cuBLAS level-1 lengths are 32-bit.
    chunk = std::min<int64_t>(chunk, (int64_t{1} << 31) / (2 * n) - 1);
    chunk = std::min(chunk, row_end - row_begin);

    std::lock_guard<std::mutex> lock(mutex_);
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    const int64_t weights_bytes = AlignUp(chunk * n * element_bytes);
    const int64_t work_bytes = AlignUp(chunk * n * 4);
    const int64_t errors_bytes = AlignUp(chunk * batch * 4);
    const int64_t codes_bytes = AlignUp(chunk * n / 2);
    const int64_t scales_bytes = AlignUp(chunk * n / kBlockSize);
    const int64_t stats_bytes = AlignUp(chunk * static_cast<int64_t>(sizeof(RowStats)));
    // E and T = E H for both results, stacked: [2 rows, n] each.
    const int64_t e_bytes = compare ? AlignUp(2 * chunk * n * 8) : 0;
    const int64_t total = weights_bytes + work_bytes + errors_bytes + 2 * codes_bytes +
                          2 * scales_bytes + stats_bytes + 2 * e_bytes;
    NVFP4_RETURN_IF_ERROR(workspace_.Reserve(options_.device, total, stream_, stream_));
    char* base = workspace_.As<char>();
    char* d_weights = base;
    float* d_work = reinterpret_cast<float*>(d_weights + weights_bytes);
    float* d_errors = reinterpret_cast<float*>(reinterpret_cast<char*>(d_work) + work_bytes);
    uint8_t* d_codes = reinterpret_cast<uint8_t*>(d_errors) + errors_bytes;
    uint8_t* d_scales = d_codes + codes_bytes;
    uint8_t* d_lh_codes = d_scales + scales_bytes;
    uint8_t* d_lh_scales = d_lh_codes + codes_bytes;
    RowStats* d_stats = reinterpret_cast<RowStats*>(d_lh_scales + scales_bytes);
    double* d_e = reinterpret_cast<double*>(reinterpret_cast<char*>(d_stats) + stats_bytes);
    double* d_t = reinterpret_cast<double*>(reinterpret_cast<char*>(d_e) + e_bytes);

    ChunkArgs a{};
    a.dtype = static_cast<int>(weights.dtype);
    a.n = n;
    a.work = d_work;
    a.errors = d_errors;
    a.codes = d_codes;
    a.scales = d_scales;
    a.stats = d_stats;
    a.factor = plan->factor.As<float>();
    a.factor_blocks = plan->factor_blocks.As<float>();
    a.hessian_blocks = plan->hessian_blocks.As<float>();
    a.bounds = plan->bounds.As<HessianBlockBounds>();
    a.group_order = plan->group_order.As<int32_t>();
    a.column = plan->column.As<int32_t>();
    a.global_amax = global_amax;
    a.global_scale = GlobalScaleFromAmax(global_amax);
    const int exponent = ErrorUnitExponent(a.global_scale);
    a.unit = ErrorUnitInverse(-exponent);
    a.unit_inverse = ErrorUnitInverse(exponent);
    a.config = plan->config;
    a.weights = d_weights;
    const double objective_unit = ObjectiveUnit(a.global_scale);

    TensorStats part;
    double update_seconds = 0.0;
    double compare_seconds = 0.0;
    const auto start = std::chrono::steady_clock::now();
    std::vector<RowStats> row_stats;
    for (int64_t c0 = row_begin; c0 < row_end; c0 += chunk) {
      const int64_t rows = std::min(chunk, row_end - c0);
      a.rows = rows;
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          d_weights, static_cast<const char*>(weights.data) + c0 * n * element_bytes,
          static_cast<size_t>(rows * n * element_bytes), cudaMemcpyHostToDevice, stream_));
      NVFP4_CUDA_RETURN_IF_ERROR(
          cudaMemsetAsync(d_stats, 0, static_cast<size_t>(rows) * sizeof(RowStats), stream_));
      const unsigned row_blocks = static_cast<unsigned>(std::min<int64_t>((rows + 255) / 256, 64));
      LoadWorkKernel<<<dim3(static_cast<unsigned>(n), row_blocks), 256, 0, stream_>>>(a);
      NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      for (int64_t b0 = 0; b0 < n; b0 += batch) {
        const int64_t b1 = std::min(n, b0 + batch);
        constexpr int kRowsPerBlock = kRowThreads / kGroupTeam;
        GroupBatchKernel<kGroupTeam>
            <<<static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock), kRowThreads, 0,
               stream_>>>(a, b0, b1);
        NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
        if (b1 < n) NVFP4_RETURN_IF_ERROR(Update(a, b0, b1 - b0, &update_seconds));
      }
      const int64_t blocks_per_row = n / kBlockSize;
      NVFP4_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(output.packed_codes.data() + (c0 - row_begin) * (n / 2), d_codes,
                          static_cast<size_t>(rows * n / 2), cudaMemcpyDeviceToHost, stream_));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          output.scales.data() + (c0 - row_begin) * blocks_per_row, d_scales,
          static_cast<size_t>(rows * blocks_per_row), cudaMemcpyDeviceToHost, stream_));
      row_stats.resize(static_cast<size_t>(rows));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(row_stats.data(), d_stats,
                                                 static_cast<size_t>(rows) * sizeof(RowStats),
                                                 cudaMemcpyDeviceToHost, stream_));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      for (const RowStats& s : row_stats) {
        part.num_blocks += s.blocks;
        part.mse_before += objective_unit * s.mse_before;
        part.mse_after += objective_unit * s.mse_after;
        part.hessian_error_before += objective_unit * s.hessian_before;
        part.hessian_error_after += objective_unit * s.hessian_after;
        part.blocks_scale_changed += s.scale_changed;
        part.blocks_beta_not_one += s.beta_not_one;
        part.blocks_offset_not_zero += s.offset_not_zero;
        part.zero_hessian_blocks += s.zero_hessian;
      }
      if (compare) {
        const auto compare_start = std::chrono::steady_clock::now();
        constexpr int kBlocksPerCta = kRowThreads / kGroupTeam;
        LocalHessianKernel<kGroupTeam>
            <<<static_cast<unsigned>((rows * blocks_per_row + kBlocksPerCta - 1) / kBlocksPerCta),
               kRowThreads, 0, stream_>>>(a, d_lh_codes, d_lh_scales);
        NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
        double errors[2] = {0.0, 0.0};
        NVFP4_RETURN_IF_ERROR(FullHessianErrors(a, *plan, d_codes, d_scales, d_lh_codes,
                                                d_lh_scales, d_e, d_t, errors));
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
      : options_(options), libs_(libs), stream_(options.stream) {}

  // The lazy batch's errors reach every column after it.
  absl::Status Update(const ChunkArgs& a, int64_t b0, int64_t depth, double* seconds) {
    const int64_t c_begin = b0 + depth;
    const int64_t columns = a.n - c_begin;
    std::chrono::steady_clock::time_point start{};
    if (options_.measure_update) {
      // The group kernel before it must not count.
      NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      start = std::chrono::steady_clock::now();
    }
    if (options_.update == CudaGptqUpdate::kOrdered) {
      const dim3 grid(static_cast<unsigned>((a.rows + kUpdateTile - 1) / kUpdateTile),
                      static_cast<unsigned>((columns + kUpdateTile - 1) / kUpdateTile));
      OrderedUpdateKernel<<<grid, 256, 0, stream_>>>(a.work, a.errors, a.factor, a.rows, a.n, b0,
                                                     depth, c_begin);
      NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
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
      NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      *seconds += SecondsSince(start);
    }
    return absl::OkStatus();
  }

  // tr(E H E^T) of the chunk's rows for two results (gptq's and local_hessian's): both error
  // matrices in double, stacked, then T = H E^T in one DGEMM with the symmetric H (the CPU's
  // upper triangle, mirrored) and sum(E .* T) per result (DDOT).
  absl::Status FullHessianErrors(const ChunkArgs& a, const CudaGptqPlan& plan, const uint8_t* codes,
                                 const uint8_t* scales, const uint8_t* lh_codes,
                                 const uint8_t* lh_scales, double* e, double* t, double* errors) {
    const unsigned col_blocks = static_cast<unsigned>(std::min<int64_t>((a.n + 255) / 256, 64));
    const dim3 grid(static_cast<unsigned>(a.rows), col_blocks);
    ErrorKernel<<<grid, 256, 0, stream_>>>(a, codes, scales, e);
    ErrorKernel<<<grid, 256, 0, stream_>>>(a, lh_codes, lh_scales, e + a.rows * a.n);
    NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
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
  cudaStream_t stream_ = nullptr;
  cudaStream_t owned_stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cusolverDnHandle_t cusolver_ = nullptr;
  cusolverDnParams_t solver_params_ = nullptr;
  std::mutex mutex_;
  DeviceBuffer workspace_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GptqBackend>> MakeCudaGptq(const CudaGptqOptions& options) {
  return CudaGptq::Create(options);
}

}  // namespace nvfp4cal
