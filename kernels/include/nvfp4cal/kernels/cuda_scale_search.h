// CudaScaleSearch: the CUDA backend of ScaleSearch, and its batched entry point.
//
// Every method runs the block searches of block_search.h on the GPU, one thread per block of 16
// weights, the threads of a CUDA block sharing one 16-column block (and so one Hessian block,
// kept in shared memory). The codes and scales are bit-identical to the CPU reference.
//
//   absl::StatusOr<std::unique_ptr<nvfp4cal::CudaScaleSearch>> gpu =
//       nvfp4cal::MakeCudaScaleSearch({});
//   if (!gpu.ok()) { ... fall back to MakeCpuScaleSearch ... }
//   absl::StatusOr<nvfp4cal::QuantizedTensor> r = (*gpu)->Quantize(request);
//
// Host API shape: validate (no side effects) -> size the device workspace within
// `memory_budget_bytes` and 256 MiB per launch (rows are chunked to fit, so any tensor size
// works) -> write the launch's inputs into a page-locked mirror of the workspace, one copy to
// the device, the kernel on the stream, one copy back. A failed device allocation is
// RESOURCE_EXHAUSTED; the backend stays usable. This header needs no CUDA headers; builds without
// CUDA get a backend that reports UNAVAILABLE.
#ifndef NVFP4CAL_KERNELS_CUDA_SCALE_SEARCH_H_
#define NVFP4CAL_KERNELS_CUDA_SCALE_SEARCH_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "nvfp4cal/kernels/scale_search.h"

struct CUstream_st;

namespace nvfp4cal {

// cudaStream_t without the CUDA headers.
using CudaStream = CUstream_st*;

// How the kernels search the candidates. All give the same codes and scales bit for bit.
enum class CudaSearchAlgorithm {
  // The default. Each row screens its candidates with the exact lower bound of block_search.h
  // (one element's error); the survivors of a tile's 128 rows are evaluated canonically by all
  // its threads from a shared-memory queue, so no warp waits on its slowest row.
  kPruned,
  // Every candidate evaluated with the canonical objective, one thread per block.
  kFull,
  // Event-driven sweeps (event_search.h): codes change at most 7 times per element along a
  // sweep, so the objective is updated per change and evaluated exactly only for the few
  // candidates that can still win. Far less arithmetic, but with one thread per block its
  // data-dependent control flow diverges within warps and it measured 1.6-1.8x slower.
  kEvents,
};

struct CudaScaleSearchOptions {
  // CUDA device ordinal.
  int device = 0;
  // Device memory one call may hold for weights, Hessians and outputs; larger work is chunked
  // (into launches of at most 256 MiB, the size of the page-locked mirror they go through).
  int64_t memory_budget_bytes = int64_t{1} << 30;
  // Stream the copies and kernels run on; null = a stream the backend creates and owns.
  CudaStream stream = nullptr;
  // Search algorithm of the kernels (benchmarks compare them; results are identical).
  CudaSearchAlgorithm search = CudaSearchAlgorithm::kPruned;
  // The launches' host mirror in page-locked memory; false = pageable memory, what the backend
  // falls back to when page-locked memory cannot be had (tests and benchmarks compare them).
  bool pinned_mirror = true;
};

// Timing of the last call, for benchmarks and metrics.
struct CudaCallTiming {
  double kernel_ms = 0.0;    // sum of kernel times (CUDA events around each launch)
  double transfer_ms = 0.0;  // host <-> device copies
  int64_t launches = 0;
  // Candidates the pruned search evaluated with the canonical objective (its queues); the
  // rest of the 126 (+ DSS) per block were ruled out by the exact bound.
  int64_t canonical_evaluations = 0;
};

class CudaScaleSearch : public ScaleSearch {
 public:
  // A row range of one tensor in a batch. The request (and what it points to) must outlive the
  // call; `stats` receives the range's statistics (added to what it holds).
  struct Slice {
    const QuantizeRequest* request = nullptr;
    float global_amax = 0.0f;
    int64_t row_begin = 0;
    int64_t row_end = 0;
    RowRangeOutput output;
    TensorStats* stats = nullptr;
    // Rows checked where they entered the process (as the server does per chunk): the slice
    // is exactly them (Of) and skips the O(cols x 16) Hessian check and the O(rows x cols)
    // scan; row range and output sizes are still checked. Null: everything is checked.
    const ValidatedRows* validated = nullptr;

    // The slice of all of `rows` (which must outlive the call).
    static Slice Of(const ValidatedRows& rows, RowRangeOutput output, TensorStats* stats) {
      return Slice{&rows.request(), rows.global_amax(), 0, rows.rows(), output, stats, &rows};
    }
  };

  // Quantizes many row ranges of many tensors, each with its own Hessians, method and global
  // scale, in as few launches as the memory budget allows. All slices are validated first;
  // on a validation error nothing is launched.
  virtual absl::Status QuantizeBatch(absl::Span<const Slice> slices) = 0;

  virtual CudaCallTiming LastCallTiming() const = 0;

  // "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)" or similar.
  virtual std::string DeviceDescription() const = 0;
};

// Whether a CUDA device is usable in this process; when not, *reason says why (no driver, no
// device, built without CUDA).
bool CudaDeviceAvailable(std::string* reason);

// Memory of CUDA device `device` as the driver reports it (cudaMemGetInfo: every process's
// allocations count): bytes free and in total. UNAVAILABLE without CUDA, INVALID_ARGUMENT for a
// device that does not exist.
absl::Status CudaDeviceMemory(int device, int64_t* free_bytes, int64_t* total_bytes);

// The CUDA backend, or UNAVAILABLE (no device / built without CUDA) / RESOURCE_EXHAUSTED.
absl::StatusOr<std::unique_ptr<CudaScaleSearch>> MakeCudaScaleSearch(
    const CudaScaleSearchOptions& options);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_CUDA_SCALE_SEARCH_H_
