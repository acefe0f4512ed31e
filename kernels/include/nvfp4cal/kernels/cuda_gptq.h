// CudaGptq: the CUDA backend of the gptq method (gptq.h, docs/numerics.md §6).
//
//   absl::StatusOr<std::unique_ptr<nvfp4cal::GptqBackend>> gpu = nvfp4cal::MakeCudaGptq({});
//   if (!gpu.ok()) { ... fall back to nvfp4cal::MakeCpuGptq({}) ... }
//   absl::StatusOr<nvfp4cal::QuantizedTensor> r = nvfp4cal::GptqQuantize(**gpu, request);
//
// Prepare factorises on the device with cuSOLVER (double precision, the CPU's construction and
// damping rule) and keeps the factor and H there; QuantizeRows runs the ordered group loop on
// the device (a team of lanes per row for the scale search) and applies each lazy batch's errors
// in the CPU's order, so codes and scales are the CPU backend's bit for bit whenever the two
// factors round to the same fp32 values (docs/numerics.md §6); tr(E H E^T) comes from cuBLAS.
// cuBLAS and cuSOLVER are loaded with dlopen when the first backend is made (UNAVAILABLE naming
// the missing library otherwise).
// This header needs no CUDA headers; builds without CUDA get a factory that reports UNAVAILABLE.
#ifndef NVFP4CAL_KERNELS_CUDA_GPTQ_H_
#define NVFP4CAL_KERNELS_CUDA_GPTQ_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/gptq.h"

namespace nvfp4cal {

// How a lazy batch's errors reach the columns after it.
enum class CudaGptqUpdate {
  // The default: a kernel that subtracts the rounded products one error at a time in the CPU
  // backend's order. Bit-identical to the CPU for the same factor, and independent of how rows
  // are split into calls (the service's row ranges give the in-process bytes).
  kOrdered,
  // cuBLAS SGEMM (fp32, no TF32): the library's summation order, which depends on the problem
  // shape, so codes can drift from the CPU's and between row splits.
  kCublas,
};

// How the Cholesky factor is inverted, in double precision (U is stored in fp32; the three
// agree to double rounding).
enum class CudaGptqInverse {
  // The default: the 32 x 32 diagonal blocks by a kernel, then for each node of a binary tree
  // over them A21 = -X22 A21 X11 as two DGEMMs on whole blocks (their upper triangles are 0):
  // twice trmm's flops, at the fp64 tensor cores' pace (n = 14336 on an H100: 38 against 62-83
  // ms per factor with trmm).
  kBlockedGemm,
  // The same tree with cuBLAS trmm (in place, n^3 / 3 flops).
  kBlockedTrmm,
  // cuSOLVER's trtri (3x slower than kBlockedTrmm for n = 14336 on an H100).
  kCusolverTrtri,
};

struct CudaGptqOptions {
  // CUDA device ordinal; plans live on this device.
  int device = 0;
  // Stream the copies and kernels run on; null = a stream the backend creates and owns.
  CudaStream stream = nullptr;
  // Device memory one QuantizeRows call may hold for its rows (working weights, errors,
  // outputs); larger row ranges are processed in row chunks. Plans are not counted here.
  int64_t memory_budget_bytes = int64_t{4} << 30;
  CudaGptqUpdate update = CudaGptqUpdate::kOrdered;
  // Synchronise around every update to report GptqStats::update_seconds (benchmarks; slower).
  bool measure_update = false;
  CudaGptqInverse inverse = CudaGptqInverse::kBlockedGemm;
  // Copy H and the weights to the device through pinned staging filled on several threads
  // (StagedUpload), instead of directly from the caller's pageable memory, whose copies go
  // through the driver's staging at a fraction of the bus, one at a time per process.
  bool staged_copies = true;
};

// The CUDA gptq backend, or UNAVAILABLE (no device / built without CUDA).
absl::StatusOr<std::unique_ptr<GptqBackend>> MakeCudaGptq(const CudaGptqOptions& options);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_CUDA_GPTQ_H_
