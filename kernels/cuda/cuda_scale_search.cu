// CUDA backend: the block searches of block_search.h, one thread per block of 16 weights.
//
// Work is cut into tiles of kRowsPerTile rows x one 16-column block of one tensor slice. The
// tile's CUDA block loads its Hessian block H_j into shared memory once (every row of a column
// block shares it; reads are warp-wide broadcasts), each thread runs QuantizeBlock for its row,
// and the block reduces its statistics in a fixed order, so results are deterministic.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "absl/strings/str_format.h"
#include "nvfp4cal/kernels/block_search.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/event_search.h"
#include "nvfp4cal/kernels/validation.h"

namespace nvfp4cal {
namespace {

constexpr int kRowsPerTile = 128;
constexpr int64_t kAlignment = 256;

absl::Status CudaStatus(cudaError_t error, const char* what) {
  const std::string message = absl::StrFormat("CUDA %s failed: %s (%s)", what,
                                              cudaGetErrorString(error), cudaGetErrorName(error));
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

#define NVFP4_CUDA_RETURN_IF_ERROR(expr)      \
  do {                                        \
    const cudaError_t nvfp4_error_ = (expr);  \
    if (nvfp4_error_ != cudaSuccess) {        \
      (void)cudaGetLastError();               \
      return CudaStatus(nvfp4_error_, #expr); \
    }                                         \
  } while (0)

// One tensor row range as the kernel sees it (device pointers).
struct DeviceSlice {
  const void* weights;    // rows x cols, row-major
  const float* hessians;  // [cols / 16, 16, 16] or null
  uint8_t* codes;         // rows x cols / 2
  uint8_t* scales;        // rows x cols / 16
  int64_t rows;
  int64_t cols;
  float global_amax;
  float global_scale;
  int dtype;
  int method;
  DssGrid grid;
};

struct Tile {
  int32_t slice;
  int32_t col_block;
  int64_t row0;
};

// Statistics of one tile in error units (the slice's ObjectiveUnit converts them on the host).
struct TileStats {
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

// Fixed-order tree sum over the CUDA block (kRowsPerTile threads); result valid in thread 0.
__device__ double BlockSum(double value, double* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kRowsPerTile / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const double sum = scratch[0];
  __syncthreads();
  return sum;
}

// Loads the tile's Hessian block (and what the chosen search needs of it) into shared memory.
struct TileHessian {
  float h[kBlockSize * kBlockSize];
  SymmetricHessian sym;  // event search
  double row_sum[kBlockSize];
  double col_sum[kBlockSize];
};

template <bool kEventSearch>
__global__ void __launch_bounds__(kRowsPerTile)
    QuantizeTilesKernel(const DeviceSlice* slices, const Tile* tiles, TileStats* tile_stats) {
  __shared__ TileHessian th;
  __shared__ double scratch[kRowsPerTile];
  const Tile tile = tiles[blockIdx.x];
  const DeviceSlice s = slices[tile.slice];
  const bool has_hessian = s.hessians != nullptr;
  if (has_hessian) {
    const float* h = s.hessians + static_cast<int64_t>(tile.col_block) * kBlockSize * kBlockSize;
    for (int i = threadIdx.x; i < kBlockSize * kBlockSize; i += kRowsPerTile) th.h[i] = h[i];
  }
  __syncthreads();
  if (has_hessian && kEventSearch) {
    for (int i = threadIdx.x; i < kBlockSize * kBlockSize; i += kRowsPerTile) {
      const int a = i / kBlockSize;
      const int b = i % kBlockSize;
      th.sym.s[i] = 0.5 * (static_cast<double>(th.h[i]) + th.h[b * kBlockSize + a]);
    }
    if (threadIdx.x < 2 * kBlockSize) {
      const int line = threadIdx.x % kBlockSize;
      double sum = 0.0;
      for (int j = 0; j < kBlockSize; ++j) {
        sum += fabs(static_cast<double>(threadIdx.x < kBlockSize ? th.h[line * kBlockSize + j]
                                                                 : th.h[j * kBlockSize + line]));
      }
      (threadIdx.x < kBlockSize ? th.row_sum : th.col_sum)[line] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double norm = 0.0;
      for (int j = 0; j < kBlockSize; ++j) norm = fmax(norm, fmax(th.row_sum[j], th.col_sum[j]));
      th.sym.abs_norm = norm;
    }
  }
  __syncthreads();

  const int64_t row = tile.row0 + threadIdx.x;
  const bool active = row < s.rows;
  BlockOutcome out{};
  if (active) {
    float w[kBlockSize];
    LoadAsFloat(s.weights, static_cast<DType>(s.dtype), row * s.cols + tile.col_block * kBlockSize,
                kBlockSize, w);
    const float* h = has_hessian ? th.h : nullptr;
    if (kEventSearch) {
      out =
          QuantizeBlockEvents(w, s.global_amax, s.global_scale, h, has_hessian ? &th.sym : nullptr,
                              static_cast<BlockMethod>(s.method), s.grid);
    } else {
      // No lower-bound pruning here: threads of a warp prune different candidates, so the warp
      // would still evaluate the union, and the bound itself costs a division per candidate
      // (measured slower on an H200; see docs/performance.md). The CPU path prunes.
      out = QuantizeBlock(w, s.global_amax, s.global_scale, h, static_cast<BlockMethod>(s.method),
                          s.grid);
    }
    const int64_t block = row * (s.cols / kBlockSize) + tile.col_block;
    s.scales[block] = out.scale_byte;
    uint2 packed;
    memcpy(&packed, out.packed, sizeof(packed));
    reinterpret_cast<uint2*>(s.codes)[block] = packed;
  }
  const double mse_before = BlockSum(active ? out.mse_before : 0.0, scratch);
  const double mse_after = BlockSum(active ? out.mse_after : 0.0, scratch);
  const double hessian_before = BlockSum(active ? out.hessian_before : 0.0, scratch);
  const double hessian_after = BlockSum(active ? out.hessian_after : 0.0, scratch);
  const int blocks = __syncthreads_count(active);
  const int changed = __syncthreads_count(active && out.scale_byte != out.max_scale_byte);
  const int beta = __syncthreads_count(active && out.dss_beta_index != 0);
  const int offset = __syncthreads_count(active && out.dss_offset != 0);
  const int zero = __syncthreads_count(active && out.hessian_all_zero);
  if (threadIdx.x == 0) {
    tile_stats[blockIdx.x] = TileStats{mse_before, mse_after, hessian_before, hessian_after, blocks,
                                       changed,    beta,      offset,         zero,          0};
  }
}

int64_t AlignUp(int64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

// A piece of a slice that goes to the device in one launch.
struct Piece {
  int slice;          // index into the caller's slices
  int64_t row_begin;  // tensor rows
  int64_t row_end;
};

int64_t PieceBytes(const CudaScaleSearch::Slice& s, int64_t rows) {
  const WeightView& w = s.request->weights;
  const int64_t tiles = (rows + kRowsPerTile - 1) / kRowsPerTile * (w.cols / kBlockSize);
  return AlignUp(rows * w.cols * DTypeSize(w.dtype)) + AlignUp(rows * w.cols / 2) +
         AlignUp(rows * w.cols / kBlockSize) +
         AlignUp(tiles * static_cast<int64_t>(sizeof(Tile) + sizeof(TileStats)));
}

int64_t HessianBytes(const CudaScaleSearch::Slice& s) {
  return s.request->hessians.data == nullptr
             ? 0
             : AlignUp(s.request->hessians.num_blocks * kBlockSize * kBlockSize *
                       static_cast<int64_t>(sizeof(float)));
}

class CudaScaleSearchImpl final : public CudaScaleSearch {
 public:
  static absl::StatusOr<std::unique_ptr<CudaScaleSearch>> Create(
      const CudaScaleSearchOptions& options) {
    std::string reason;
    if (!CudaDeviceAvailable(&reason)) return absl::UnavailableError(reason);
    int count = 0;
    NVFP4_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
    if (options.device < 0 || options.device >= count) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "device = %d is out of range: %d CUDA device(s) present", options.device, count));
    }
    if (options.memory_budget_bytes < (int64_t{16} << 20)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "memory_budget_bytes = %d is below the minimum of 16 MiB", options.memory_budget_bytes));
    }
    auto impl = std::unique_ptr<CudaScaleSearchImpl>(new CudaScaleSearchImpl(options));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
    cudaDeviceProp prop;
    NVFP4_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, options.device));
    impl->description_ = absl::StrFormat("%s (sm_%d%d, %d SMs, %.1f GiB)", prop.name, prop.major,
                                         prop.minor, prop.multiProcessorCount,
                                         static_cast<double>(prop.totalGlobalMem) / (1 << 30));
    if (options.stream == nullptr) {
      NVFP4_CUDA_RETURN_IF_ERROR(
          cudaStreamCreateWithFlags(&impl->owned_stream_, cudaStreamNonBlocking));
      impl->stream_ = impl->owned_stream_;
    }
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->start_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->stop_));
    return std::unique_ptr<CudaScaleSearch>(std::move(impl));
  }

  ~CudaScaleSearchImpl() override {
    cudaSetDevice(options_.device);
    if (workspace_ != nullptr) cudaFree(workspace_);
    if (start_ != nullptr) cudaEventDestroy(start_);
    if (stop_ != nullptr) cudaEventDestroy(stop_);
    if (owned_stream_ != nullptr) cudaStreamDestroy(owned_stream_);
  }

  std::string_view BackendName() const override { return "cuda"; }
  std::string DeviceDescription() const override { return description_; }
  CudaCallTiming LastCallTiming() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return timing_;
  }

  absl::StatusOr<QuantizedTensor> Quantize(const QuantizeRequest& request) override {
    absl::StatusOr<QuantizedTensor> result = PrepareQuantizedTensor(request);
    if (!result.ok()) return result.status();
    const Slice slice{
        &request,
        result->global_amax,
        0,
        result->rows,
        RowRangeOutput{absl::MakeSpan(result->packed_codes), absl::MakeSpan(result->scales)},
        &result->stats};
    if (absl::Status s = QuantizeBatch(absl::MakeConstSpan(&slice, 1)); !s.ok()) return s;
    return result;
  }

  absl::Status QuantizeRows(const QuantizeRequest& request, float global_amax, int64_t row_begin,
                            int64_t row_end, RowRangeOutput output, TensorStats* stats) override {
    const Slice slice{&request, global_amax, row_begin, row_end, output, stats};
    return QuantizeBatch(absl::MakeConstSpan(&slice, 1));
  }

  absl::Status QuantizeBatch(absl::Span<const Slice> slices) override {
    for (const Slice& s : slices) {
      if (absl::Status st = ValidateSlice(s); !st.ok()) return st;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    timing_ = CudaCallTiming{};
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    for (const Slice& s : slices) InitTensorStats(s.request->params, s.global_amax, s.stats);
    // Greedy packing of slice row ranges into launches that fit the memory budget.
    std::vector<Piece> launch;
    int64_t launch_bytes = 0;
    for (int i = 0; i < static_cast<int>(slices.size()); ++i) {
      const Slice& s = slices[static_cast<size_t>(i)];
      const int64_t fixed = HessianBytes(s) + AlignUp(sizeof(DeviceSlice) * (launch.size() + 1));
      const int64_t per_row = PieceBytes(s, kRowsPerTile) / kRowsPerTile + 1;
      int64_t row = s.row_begin;
      while (row < s.row_end) {
        int64_t room = (options_.memory_budget_bytes - launch_bytes - fixed) / per_row;
        if (room < kRowsPerTile && !launch.empty()) {
          if (absl::Status st = RunLaunch(slices, launch); !st.ok()) return st;
          launch.clear();
          launch_bytes = 0;
          continue;
        }
        room = std::max<int64_t>(room / kRowsPerTile * kRowsPerTile, kRowsPerTile);
        const int64_t end = std::min(s.row_end, row + room);
        launch.push_back(Piece{i, row, end});
        launch_bytes += PieceBytes(s, end - row) + fixed;
        row = end;
      }
    }
    if (!launch.empty()) return RunLaunch(slices, launch);
    return absl::OkStatus();
  }

 private:
  explicit CudaScaleSearchImpl(const CudaScaleSearchOptions& options)
      : options_(options), stream_(options.stream) {}

  static absl::Status ValidateSlice(const Slice& s) {
    if (s.request == nullptr || s.stats == nullptr) {
      return absl::InvalidArgumentError("slice: request and stats must not be null");
    }
    // Prevalidated slices: only the checks that protect memory (range and output sizes).
    if (s.prevalidated)
      return ValidateRowRange(s.request->weights, s.row_begin, s.row_end, s.output);
    return ValidateRowRangeRequest(*s.request, s.global_amax, s.row_begin, s.row_end, s.output);
  }

  absl::Status EnsureWorkspace(int64_t bytes) {
    if (bytes <= workspace_bytes_) return absl::OkStatus();
    if (workspace_ != nullptr) {
      cudaFree(workspace_);
      workspace_ = nullptr;
      workspace_bytes_ = 0;
    }
    void* p = nullptr;
    const cudaError_t error = cudaMalloc(&p, static_cast<size_t>(bytes));
    if (error != cudaSuccess) {
      (void)cudaGetLastError();
      return absl::ResourceExhaustedError(absl::StrFormat(
          "CUDA device %d: cannot allocate a %d-byte workspace (%s); lower the memory budget or "
          "free device memory",
          options_.device, bytes, cudaGetErrorString(error)));
    }
    workspace_ = static_cast<char*>(p);
    workspace_bytes_ = bytes;
    return absl::OkStatus();
  }

  // Copies the pieces' inputs, launches one kernel over all their tiles, copies results back
  // and adds the statistics to each slice.
  absl::Status RunLaunch(absl::Span<const Slice> slices, const std::vector<Piece>& pieces) {
    // Layout: per piece weights, codes, scales; Hessians deduplicated by host pointer; then the
    // slice table, the tile list and the tile statistics.
    int64_t offset = 0;
    auto take = [&offset](int64_t bytes) {
      const int64_t at = offset;
      offset += AlignUp(bytes);
      return at;
    };
    std::vector<DeviceSlice> device_slices(pieces.size());
    std::vector<int64_t> weight_at(pieces.size()), code_at(pieces.size()), scale_at(pieces.size());
    std::map<const float*, int64_t> hessian_at;
    std::vector<Tile> tiles;
    std::vector<std::pair<size_t, size_t>> tile_ranges(pieces.size());
    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const WeightView& w = s.request->weights;
      const int64_t rows = pieces[p].row_end - pieces[p].row_begin;
      weight_at[p] = take(rows * w.cols * DTypeSize(w.dtype));
      code_at[p] = take(rows * w.cols / 2);
      scale_at[p] = take(rows * w.cols / kBlockSize);
      const float* h = s.request->hessians.data;
      if (h != nullptr && hessian_at.count(h) == 0) hessian_at[h] = take(HessianBytes(s));
      tile_ranges[p].first = tiles.size();
      for (int64_t row0 = 0; row0 < rows; row0 += kRowsPerTile) {
        for (int32_t j = 0; j < static_cast<int32_t>(w.cols / kBlockSize); ++j) {
          tiles.push_back(Tile{static_cast<int32_t>(p), j, row0});
        }
      }
      tile_ranges[p].second = tiles.size();
    }
    const int64_t slices_at = take(static_cast<int64_t>(sizeof(DeviceSlice) * pieces.size()));
    const int64_t tiles_at = take(static_cast<int64_t>(sizeof(Tile) * tiles.size()));
    const int64_t stats_at = take(static_cast<int64_t>(sizeof(TileStats) * tiles.size()));
    if (absl::Status st = EnsureWorkspace(offset); !st.ok()) return st;

    const auto copy_start = std::chrono::steady_clock::now();
    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const WeightView& w = s.request->weights;
      const int64_t rows = pieces[p].row_end - pieces[p].row_begin;
      const int64_t elem = DTypeSize(w.dtype);
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          workspace_ + weight_at[p],
          static_cast<const char*>(w.data) + pieces[p].row_begin * w.cols * elem,
          static_cast<size_t>(rows * w.cols * elem), cudaMemcpyHostToDevice, stream_));
      const float* h = s.request->hessians.data;
      device_slices[p] = DeviceSlice{
          workspace_ + weight_at[p],
          h == nullptr ? nullptr : reinterpret_cast<const float*>(workspace_ + hessian_at[h]),
          reinterpret_cast<uint8_t*>(workspace_ + code_at[p]),
          reinterpret_cast<uint8_t*>(workspace_ + scale_at[p]),
          rows,
          w.cols,
          s.global_amax,
          GlobalScaleFromAmax(s.global_amax),
          static_cast<int>(w.dtype),
          static_cast<int>(s.request->params.method),
          DssGrid{s.request->params.scale_neighbours, DssBetaSteps(s.request->params),
                  s.request->params.beta_step}};
    }
    for (const auto& [host, at] : hessian_at) {
      const Slice* owner = nullptr;
      for (const Piece& piece : pieces) {
        if (slices[static_cast<size_t>(piece.slice)].request->hessians.data == host) {
          owner = &slices[static_cast<size_t>(piece.slice)];
          break;
        }
      }
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace_ + at, host,
                                                 static_cast<size_t>(HessianBytes(*owner)),
                                                 cudaMemcpyHostToDevice, stream_));
    }
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace_ + slices_at, device_slices.data(),
                                               sizeof(DeviceSlice) * device_slices.size(),
                                               cudaMemcpyHostToDevice, stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace_ + tiles_at, tiles.data(),
                                               sizeof(Tile) * tiles.size(), cudaMemcpyHostToDevice,
                                               stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    timing_.transfer_ms += MillisecondsSince(copy_start);

    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventRecord(start_, stream_));
    // Grid x is limited to 2^31 - 1 tiles, far beyond any memory budget.
    const auto* slices_device = reinterpret_cast<const DeviceSlice*>(workspace_ + slices_at);
    const auto* tiles_device = reinterpret_cast<const Tile*>(workspace_ + tiles_at);
    auto* stats_device = reinterpret_cast<TileStats*>(workspace_ + stats_at);
    const unsigned grid = static_cast<unsigned>(tiles.size());
    if (options_.search == CudaSearchAlgorithm::kEvents) {
      QuantizeTilesKernel<true>
          <<<grid, kRowsPerTile, 0, stream_>>>(slices_device, tiles_device, stats_device);
    } else {
      QuantizeTilesKernel<false>
          <<<grid, kRowsPerTile, 0, stream_>>>(slices_device, tiles_device, stats_device);
    }
    NVFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop_, stream_));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop_));
    float kernel_ms = 0.0f;
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&kernel_ms, start_, stop_));
    timing_.kernel_ms += kernel_ms;
    timing_.launches += 1;

    const auto back_start = std::chrono::steady_clock::now();
    std::vector<TileStats> tile_stats(tiles.size());
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tile_stats.data(), workspace_ + stats_at,
                                               sizeof(TileStats) * tiles.size(),
                                               cudaMemcpyDeviceToHost, stream_));
    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const int64_t cols = s.request->weights.cols;
      const int64_t rows = pieces[p].row_end - pieces[p].row_begin;
      const int64_t local_row = pieces[p].row_begin - s.row_begin;
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          s.output.packed_codes.data() + local_row * cols / 2, workspace_ + code_at[p],
          static_cast<size_t>(rows * cols / 2), cudaMemcpyDeviceToHost, stream_));
      NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          s.output.scales.data() + local_row * cols / kBlockSize, workspace_ + scale_at[p],
          static_cast<size_t>(rows * cols / kBlockSize), cudaMemcpyDeviceToHost, stream_));
    }
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    timing_.transfer_ms += MillisecondsSince(back_start);

    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const double unit = ObjectiveUnit(GlobalScaleFromAmax(s.global_amax));
      const bool hessian_objective = MethodNeedsHessian(s.request->params.method);
      TensorStats part;
      for (size_t t = tile_ranges[p].first; t < tile_ranges[p].second; ++t) {
        const TileStats& ts = tile_stats[t];
        part.num_blocks += ts.blocks;
        part.mse_before += unit * ts.mse_before;
        part.mse_after += unit * ts.mse_after;
        part.hessian_error_before += unit * ts.hessian_before;
        part.hessian_error_after += unit * ts.hessian_after;
        part.blocks_scale_changed += ts.scale_changed;
        part.blocks_beta_not_one += ts.beta_not_one;
        part.blocks_offset_not_zero += ts.offset_not_zero;
        part.zero_hessian_blocks += ts.zero_hessian;
      }
      part.objective_before = hessian_objective ? part.hessian_error_before : part.mse_before;
      part.objective_after = hessian_objective ? part.hessian_error_after : part.mse_after;
      AccumulateStats(part, s.stats);
    }
    return absl::OkStatus();
  }

  static double MillisecondsSince(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
        .count();
  }

  CudaScaleSearchOptions options_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t owned_stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
  std::string description_;
  mutable std::mutex mutex_;
  char* workspace_ = nullptr;
  int64_t workspace_bytes_ = 0;
  CudaCallTiming timing_;
};

}  // namespace

bool CudaDeviceAvailable(std::string* reason) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    (void)cudaGetLastError();
    if (reason != nullptr) {
      *reason = absl::StrFormat("no usable CUDA device: %s", cudaGetErrorString(error));
    }
    return false;
  }
  if (count == 0) {
    if (reason != nullptr) *reason = "no CUDA device present";
    return false;
  }
  return true;
}

absl::StatusOr<std::unique_ptr<CudaScaleSearch>> MakeCudaScaleSearch(
    const CudaScaleSearchOptions& options) {
  return CudaScaleSearchImpl::Create(options);
}

}  // namespace nvfp4cal
