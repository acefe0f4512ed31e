// CUDA backend of ScaleSearch (cuda_scale_search.h): validation, the greedy packing of slices
// into launches that fit the memory budget, and per launch the workspace layout, the copies, the
// kernel (scale_search_kernels.h) and the statistics.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "block_statistics.h"
#include "cuda_status.h"
#include "device_memory.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"
#include "nvfp4cal/kernels/validation.h"
#include "scale_search_kernels.h"

namespace nvfp4cal {
namespace cuda_internal {
namespace {

using Slice = CudaScaleSearch::Slice;

// A piece of a slice that goes to the device in one launch.
struct Piece {
  int slice;          // index into the caller's slices
  int64_t row_begin;  // tensor rows
  int64_t row_end;
};

int64_t PieceBytes(const Slice& s, int64_t rows) {
  const WeightView& w = s.request->weights;
  const int64_t tiles = (rows + kRowsPerTile - 1) / kRowsPerTile * (w.cols / kBlockSize);
  return AlignUp(rows * w.cols * DTypeSize(w.dtype)) + AlignUp(rows * w.cols / 2) +
         AlignUp(rows * w.cols / kBlockSize) +
         AlignUp(tiles * static_cast<int64_t>(sizeof(Tile) + sizeof(TileStats)));
}

int64_t HessianBytes(const Slice& s) {
  return s.request->hessians.data == nullptr
             ? 0
             : AlignUp(s.request->hessians.num_blocks * kBlockSize * kBlockSize *
                       static_cast<int64_t>(sizeof(float)));
}

// The DSS scales of every (candidate, beta) of a dss slice, for the pruned kernel.
int64_t DssScalesBytes(const Slice& s) {
  if (s.request->params.method != Method::kDss) return 0;
  return AlignUp(kNumScaleCandidates * (2 * DssBetaSteps(s.request->params) + 1) *
                 static_cast<int64_t>(sizeof(float)));
}

std::vector<float> DssScalesTable(const Slice& s) {
  const int n = DssBetaSteps(s.request->params);
  std::vector<float> table;
  table.reserve(static_cast<size_t>(kNumScaleCandidates * (2 * n + 1)));
  for (int k = 0; k < kNumScaleCandidates; ++k) {
    for (int i = -n; i <= n; ++i) {
      table.push_back(DssQuantScale(DssBeta(i, s.request->params.beta_step), s.global_amax,
                                    ScaleCandidateValue(k)));
    }
  }
  return table;
}

// The pruning bounds and screens that go with a slice's Hessian blocks (screens after bounds).
int64_t BoundsPartBytes(const Slice& s) {
  return AlignUp(s.request->hessians.num_blocks * static_cast<int64_t>(sizeof(HessianBlockBounds)));
}
int64_t BoundsBytes(const Slice& s) {
  return s.request->hessians.data == nullptr
             ? 0
             : BoundsPartBytes(s) + AlignUp(s.request->hessians.num_blocks *
                                            static_cast<int64_t>(sizeof(HessianBlockScreen)));
}

// Where one launch's buffers sit in the workspace (byte offsets), and its tiles. The inputs
// come first, [0, inputs_bytes): per piece its weights (and the DSS table of a dss slice),
// Hessians and their bounds once per host pointer, then the identity bounds, the slice table
// and the tile list; the outputs after them, [inputs_bytes, bytes): per piece its codes and
// scales, then the tile statistics. Each part is one copy through the host mirror.
struct LaunchLayout {
  std::vector<int64_t> weight_at;
  std::vector<int64_t> code_at;
  std::vector<int64_t> scale_at;
  std::vector<int64_t> dss_at;  // -1: none
  std::map<const float*, int64_t> hessian_at;
  std::map<const float*, int64_t> bounds_at;  // bounds, then screens
  std::vector<Tile> tiles;
  std::vector<std::pair<size_t, size_t>> tile_ranges;  // per piece, into `tiles`
  int64_t identity_at = 0;
  int64_t slices_at = 0;
  int64_t tiles_at = 0;
  int64_t inputs_bytes = 0;  // the inputs' part; the outputs start here
  int64_t stats_at = 0;
  int64_t bytes = 0;  // the workspace the launch needs
};

LaunchLayout PlanLaunch(absl::Span<const Slice> slices, const std::vector<Piece>& pieces,
                        CudaSearchAlgorithm search) {
  LaunchLayout l;
  int64_t offset = 0;
  auto take = [&offset](int64_t bytes) {
    const int64_t at = offset;
    offset += AlignUp(bytes);
    return at;
  };
  l.weight_at.resize(pieces.size());
  l.code_at.resize(pieces.size());
  l.scale_at.resize(pieces.size());
  l.dss_at.assign(pieces.size(), -1);
  l.tile_ranges.resize(pieces.size());
  for (size_t p = 0; p < pieces.size(); ++p) {
    const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
    const WeightView& w = s.request->weights;
    const int64_t rows = pieces[p].row_end - pieces[p].row_begin;
    l.weight_at[p] = take(rows * w.cols * DTypeSize(w.dtype));
    if (search == CudaSearchAlgorithm::kPruned && DssScalesBytes(s) > 0) {
      l.dss_at[p] = take(DssScalesBytes(s));
    }
    const float* h = s.request->hessians.data;
    if (h != nullptr && l.hessian_at.count(h) == 0) {
      l.hessian_at[h] = take(HessianBytes(s));
      l.bounds_at[h] = take(BoundsBytes(s));
    }
    l.tile_ranges[p].first = l.tiles.size();
    for (int64_t row0 = 0; row0 < rows; row0 += kRowsPerTile) {
      for (int32_t j = 0; j < static_cast<int32_t>(w.cols / kBlockSize); ++j) {
        l.tiles.push_back(Tile{static_cast<int32_t>(p), j, row0});
      }
    }
    l.tile_ranges[p].second = l.tiles.size();
  }
  l.identity_at = take(static_cast<int64_t>(sizeof(HessianBlockBounds)));
  l.slices_at = take(static_cast<int64_t>(sizeof(DeviceSlice) * pieces.size()));
  l.tiles_at = take(static_cast<int64_t>(sizeof(Tile) * l.tiles.size()));
  l.inputs_bytes = offset;
  for (size_t p = 0; p < pieces.size(); ++p) {
    const WeightView& w = slices[static_cast<size_t>(pieces[p].slice)].request->weights;
    const int64_t rows = pieces[p].row_end - pieces[p].row_begin;
    l.code_at[p] = take(rows * w.cols / 2);
    l.scale_at[p] = take(rows * w.cols / kBlockSize);
  }
  l.stats_at = take(static_cast<int64_t>(sizeof(TileStats) * l.tiles.size()));
  l.bytes = offset;
  return l;
}

// The kernel's view of piece `p` of `s`, its buffers in the workspace at `base`.
DeviceSlice MakeDeviceSlice(const Slice& s, const Piece& piece, size_t p, const LaunchLayout& l,
                            char* base) {
  const WeightView& w = s.request->weights;
  const float* h = s.request->hessians.data;
  const int64_t hessian_at = h == nullptr ? 0 : l.hessian_at.at(h);
  const int64_t bounds_at = h == nullptr ? 0 : l.bounds_at.at(h);
  return DeviceSlice{
      base + l.weight_at[p],
      h == nullptr ? nullptr : reinterpret_cast<const float*>(base + hessian_at),
      h == nullptr ? nullptr : reinterpret_cast<const HessianBlockBounds*>(base + bounds_at),
      reinterpret_cast<const HessianBlockBounds*>(base + l.identity_at),
      h == nullptr
          ? nullptr
          : reinterpret_cast<const HessianBlockScreen*>(base + bounds_at + BoundsPartBytes(s)),
      l.dss_at[p] < 0 ? nullptr : reinterpret_cast<const float*>(base + l.dss_at[p]),
      reinterpret_cast<uint8_t*>(base + l.code_at[p]),
      reinterpret_cast<uint8_t*>(base + l.scale_at[p]),
      piece.row_end - piece.row_begin,
      w.cols,
      s.global_amax,
      GlobalScaleFromAmax(s.global_amax),
      static_cast<int>(w.dtype),
      static_cast<int>(s.request->params.method),
      DssGrid{s.request->params.scale_neighbours, DssBetaSteps(s.request->params),
              s.request->params.beta_step}};
}

double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
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
    NVFP4_RETURN_IF_ERROR(impl->stream_.Init(options.stream));
    NVFP4_CUDA_RETURN_IF_ERROR(SetScaleSearchKernelAttributes());
    NVFP4_RETURN_IF_ERROR(impl->timer_.Init());
    return std::unique_ptr<CudaScaleSearch>(std::move(impl));
  }

  // The members then free the workspace, destroy the events and an owned stream, in this order.
  ~CudaScaleSearchImpl() override { cudaSetDevice(options_.device); }

  std::string_view BackendName() const override { return "cuda"; }
  std::string DeviceDescription() const override { return description_; }
  CudaCallTiming LastCallTiming() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return timing_;
  }

  absl::Status QuantizeRows(const QuantizeRequest& request, float global_amax, int64_t row_begin,
                            int64_t row_end, RowRangeOutput output, TensorStats* stats) override {
    const Slice slice{&request, global_amax, row_begin, row_end, output, stats};
    return QuantizeBatch(absl::MakeConstSpan(&slice, 1));
  }

  absl::Status QuantizePrevalidatedRows(const QuantizeRequest& request, float global_amax,
                                        int64_t row_begin, int64_t row_end, RowRangeOutput output,
                                        TensorStats* stats) override {
    const Slice slice{&request, global_amax, row_begin, row_end, output, stats};
    if (absl::Status st = ValidateSliceSizes(slice); !st.ok()) return st;
    return RunBatch(absl::MakeConstSpan(&slice, 1));
  }

  absl::Status QuantizeBatch(absl::Span<const Slice> slices) override {
    for (const Slice& s : slices) {
      if (absl::Status st = ValidateSlice(s); !st.ok()) return st;
    }
    return RunBatch(slices);
  }

 private:
  explicit CudaScaleSearchImpl(const CudaScaleSearchOptions& options)
      : options_(options), pinned_failed_(!options.pinned_mirror) {}

  // QuantizeBatch after its checks.
  absl::Status RunBatch(absl::Span<const Slice> slices) {
    std::lock_guard<std::mutex> lock(mutex_);
    timing_ = CudaCallTiming{};
    NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    for (const Slice& s : slices) InitTensorStats(s.request->params, s.global_amax, s.stats);
    // Greedy packing of slice row ranges into launches that fit the memory budget.
    std::vector<Piece> launch;
    int64_t launch_bytes = 0;
    for (int i = 0; i < static_cast<int>(slices.size()); ++i) {
      const Slice& s = slices[static_cast<size_t>(i)];
      const int64_t fixed = HessianBytes(s) + BoundsBytes(s) + DssScalesBytes(s) +
                            AlignUp(sizeof(DeviceSlice) * (launch.size() + 1)) +
                            AlignUp(sizeof(HessianBlockBounds));
      const int64_t per_row = PieceBytes(s, kRowsPerTile) / kRowsPerTile + 1;
      int64_t row = s.row_begin;
      while (row < s.row_end) {
        int64_t room = (LaunchBudget() - launch_bytes - fixed) / per_row;
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

  // The workspace one launch may use: the memory budget, at most kMaxLaunchBytes.
  int64_t LaunchBudget() const { return std::min(options_.memory_budget_bytes, kMaxLaunchBytes); }

  // What protects memory whatever the data: pointers, the row range and the output sizes.
  static absl::Status ValidateSliceSizes(const Slice& s) {
    if (s.request == nullptr || s.stats == nullptr) {
      return absl::InvalidArgumentError("slice: request and stats must not be null");
    }
    return ValidateRowRange(s.request->weights, s.row_begin, s.row_end, s.output);
  }

  static absl::Status ValidateSlice(const Slice& s) {
    if (s.validated != nullptr) {
      // Checked rows: the slice must be exactly them (their request, g and rows).
      if (s.request != &s.validated->request() || s.global_amax != s.validated->global_amax() ||
          s.row_begin != 0 || s.row_end != s.validated->rows()) {
        return absl::InvalidArgumentError(
            "slice: with validated rows, request, global_amax and the row range must be theirs "
            "(use Slice::Of)");
      }
      return ValidateSliceSizes(s);
    }
    if (absl::Status st = ValidateSliceSizes(s); !st.ok()) return st;
    return ValidateRowRangeRequest(*s.request, s.global_amax, s.row_begin, s.row_end, s.output);
  }

  // Writes the pieces' inputs into the host mirror, copies them to the device in one copy,
  // launches one kernel over all their tiles, copies the outputs back in one copy, hands each
  // piece its codes and scales and adds the statistics to each slice. A launch's copies come
  // from and go to page-locked memory (when it can be had): a copy from or to pageable memory
  // goes through the driver's staging, one at a time per process, which the many small
  // launches of a server's batches of chunks would queue on.
  absl::Status RunLaunch(absl::Span<const Slice> slices, const std::vector<Piece>& pieces) {
    const LaunchLayout layout = PlanLaunch(slices, pieces, options_.search);
    NVFP4_RETURN_IF_ERROR(workspace_.ReserveSynchronous(options_.device, layout.bytes));
    char* const base = workspace_.As<char>();
    char* const host = ReserveMirror(layout.bytes);
    const cudaStream_t stream = stream_.get();
    const auto copy_start = std::chrono::steady_clock::now();
    FillInputs(slices, pieces, layout, base, host);
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(base, host, static_cast<size_t>(layout.inputs_bytes),
                                               cudaMemcpyHostToDevice, stream));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    timing_.transfer_ms += MillisecondsSince(copy_start);

    NVFP4_RETURN_IF_ERROR(timer_.Start(stream));
    NVFP4_CUDA_RETURN_IF_ERROR(
        LaunchQuantizeTiles(options_.search, static_cast<unsigned>(layout.tiles.size()), stream,
                            reinterpret_cast<const DeviceSlice*>(base + layout.slices_at),
                            reinterpret_cast<const Tile*>(base + layout.tiles_at),
                            reinterpret_cast<TileStats*>(base + layout.stats_at)));
    float kernel_ms = 0.0f;
    NVFP4_RETURN_IF_ERROR(timer_.Stop(stream, &kernel_ms));
    timing_.kernel_ms += kernel_ms;
    timing_.launches += 1;

    const auto back_start = std::chrono::steady_clock::now();
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        host + layout.inputs_bytes, base + layout.inputs_bytes,
        static_cast<size_t>(layout.bytes - layout.inputs_bytes), cudaMemcpyDeviceToHost, stream));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    const auto* tile_stats = reinterpret_cast<const TileStats*>(host + layout.stats_at);
    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const int64_t cols = s.request->weights.cols;
      const int64_t rows = pieces[p].row_end - pieces[p].row_begin;
      const int64_t local_row = pieces[p].row_begin - s.row_begin;
      std::memcpy(s.output.packed_codes.data() + local_row * cols / 2, host + layout.code_at[p],
                  static_cast<size_t>(rows * cols / 2));
      std::memcpy(s.output.scales.data() + local_row * cols / kBlockSize, host + layout.scale_at[p],
                  static_cast<size_t>(rows * cols / kBlockSize));
    }
    timing_.transfer_ms += MillisecondsSince(back_start);

    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const double unit = ObjectiveUnit(GlobalScaleFromAmax(s.global_amax));
      const bool hessian_objective = MethodNeedsHessian(s.request->params.method);
      TensorStats part;
      for (size_t t = layout.tile_ranges[p].first; t < layout.tile_ranges[p].second; ++t) {
        AddBlockStatistics(tile_stats[t].sums, unit, &part);
        timing_.canonical_evaluations += tile_stats[t].evaluations;
      }
      part.objective_before = hessian_objective ? part.hessian_error_before : part.mse_before;
      part.objective_after = hessian_objective ? part.hessian_error_after : part.mse_after;
      AccumulateStats(part, s.stats);
    }
    return absl::OkStatus();
  }

  // The host mirror of a launch's workspace, at least `bytes`: page-locked memory, or pageable
  // memory when it cannot be had. It grows in powers of two (cudaMallocHost is slow, and the
  // old buffer's cudaFreeHost may wait for the device) and is kept for the next launch.
  char* ReserveMirror(int64_t bytes) {
    if (!pinned_failed_) {
      int64_t want = int64_t{8} << 20;
      while (want < bytes) want *= 2;
      if (mirror_.Reserve(std::min(want, std::max(bytes, kMaxLaunchBytes)))) return mirror_.data();
      pinned_failed_ = true;  // and pageable from now on
    }
    if (static_cast<int64_t>(pageable_mirror_.size()) < bytes) {
      pageable_mirror_.resize(static_cast<size_t>(bytes));
    }
    return pageable_mirror_.data();
  }

  // Writes the launch's inputs into `host`, the mirror of the workspace at `base` (whose
  // addresses the slice table holds): the weights (a large piece's copy on several threads:
  // weights come from memory-mapped files), DSS tables, Hessians with their pruning bounds and
  // screens (host-computed in double precision unless the request brings them), the identity
  // bounds, the slice table and the tiles.
  void FillInputs(absl::Span<const Slice> slices, const std::vector<Piece>& pieces,
                  const LaunchLayout& layout, char* base, char* host) {
    std::vector<DeviceSlice> device_slices(pieces.size());
    for (size_t p = 0; p < pieces.size(); ++p) {
      const Slice& s = slices[static_cast<size_t>(pieces[p].slice)];
      const WeightView& w = s.request->weights;
      const char* from =
          static_cast<const char*>(w.data) + pieces[p].row_begin * w.cols * DTypeSize(w.dtype);
      ParallelHostCopy(host + layout.weight_at[p], from, PieceWeightBytes(slices, pieces[p]),
                       kStagingThreads);
      if (layout.dss_at[p] >= 0) {
        const std::vector<float> table = DssScalesTable(s);
        std::memcpy(host + layout.dss_at[p], table.data(), sizeof(float) * table.size());
      }
      device_slices[p] = MakeDeviceSlice(s, pieces[p], p, layout, base);
    }
    const HessianBlockBounds identity = IdentityBounds();
    std::memcpy(host + layout.identity_at, &identity, sizeof(identity));
    for (const auto& [h, at] : layout.hessian_at) {
      const Slice* owner = nullptr;
      for (const Piece& piece : pieces) {
        if (slices[static_cast<size_t>(piece.slice)].request->hessians.data == h) {
          owner = &slices[static_cast<size_t>(piece.slice)];
          break;
        }
      }
      std::memcpy(host + at, h, static_cast<size_t>(HessianBytes(*owner)));
      if (options_.search != CudaSearchAlgorithm::kPruned) continue;
      const QuantizeRequest& request = *owner->request;
      const size_t blocks = static_cast<size_t>(request.hessians.num_blocks);
      // The caller's tables when it computed them once for many calls (SharedHessianPruning).
      std::vector<HessianBlockBounds> bounds_computed;
      std::vector<HessianBlockScreen> screens_computed;
      const HessianBlockBounds* bounds = request.hessian_bounds;
      const HessianBlockScreen* screens = request.hessian_screens;
      if (bounds == nullptr || screens == nullptr) {
        bounds_computed = ComputeHessianBlockBounds(request.hessians);
        screens_computed = ComputeHessianBlockScreens(request.hessians, bounds_computed);
        bounds = bounds_computed.data();
        screens = screens_computed.data();
      }
      const int64_t bounds_at = layout.bounds_at.at(h);
      std::memcpy(host + bounds_at, bounds, sizeof(HessianBlockBounds) * blocks);
      std::memcpy(host + bounds_at + BoundsPartBytes(*owner), screens,
                  sizeof(HessianBlockScreen) * blocks);
    }
    std::memcpy(host + layout.slices_at, device_slices.data(),
                sizeof(DeviceSlice) * device_slices.size());
    std::memcpy(host + layout.tiles_at, layout.tiles.data(), sizeof(Tile) * layout.tiles.size());
  }

  // Bytes of a piece's weights.
  static int64_t PieceWeightBytes(absl::Span<const Slice> slices, const Piece& piece) {
    const WeightView& w = slices[static_cast<size_t>(piece.slice)].request->weights;
    return (piece.row_end - piece.row_begin) * w.cols * DTypeSize(w.dtype);
  }

  // A launch's workspace at most (and so its host mirror, page-locked memory being locked RAM);
  // a slice larger than that runs in several launches.
  static constexpr int64_t kMaxLaunchBytes = int64_t{256} << 20;
  // Threads that fill the mirror with a large piece's weights (several backends may at once).
  static constexpr int kStagingThreads = 4;

  CudaScaleSearchOptions options_;
  std::string description_;
  mutable std::mutex mutex_;
  PinnedHostBuffer mirror_;
  bool pinned_failed_;  // pageable mirror: page-locked memory refused, or not asked for
  std::vector<char> pageable_mirror_;
  CudaCallTiming timing_;
  // Destroyed in reverse order: the workspace, the events, then an owned stream.
  BackendStream stream_;
  StreamTimer timer_;
  DeviceBuffer workspace_;
};

}  // namespace
}  // namespace cuda_internal

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

absl::Status CudaDeviceMemory(int device, int64_t* free_bytes, int64_t* total_bytes) {
  int count = 0;
  NVFP4_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrFormat("device = %d is out of range: %d CUDA device(s) present", device, count));
  }
  NVFP4_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  size_t free = 0;
  size_t total = 0;
  NVFP4_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free, &total));
  *free_bytes = static_cast<int64_t>(free);
  *total_bytes = static_cast<int64_t>(total);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaScaleSearch>> MakeCudaScaleSearch(
    const CudaScaleSearchOptions& options) {
  return cuda_internal::CudaScaleSearchImpl::Create(options);
}

}  // namespace nvfp4cal
