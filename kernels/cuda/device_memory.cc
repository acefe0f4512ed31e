#include "device_memory.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "cuda_status.h"

namespace nvfp4cal::cuda_internal {

absl::Status DeviceBuffer::Reserve(int device, int64_t bytes, cudaStream_t stream,
                                   cudaStream_t free_stream) {
  if (bytes <= bytes_) return absl::OkStatus();
  Free();
  device_ = device;
  stream_ordered_ = true;
  free_stream_ = free_stream;
  NVFP4_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&data_, static_cast<size_t>(bytes), stream));
  bytes_ = bytes;
  return absl::OkStatus();
}

absl::Status DeviceBuffer::ReserveSynchronous(int device, int64_t bytes) {
  if (bytes <= bytes_) return absl::OkStatus();
  Free();
  void* p = nullptr;
  const cudaError_t error = cudaMalloc(&p, static_cast<size_t>(bytes));
  if (error != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::ResourceExhaustedError(absl::StrFormat(
        "CUDA device %d: cannot allocate a %d-byte workspace (%s); lower the memory budget or "
        "free device memory",
        device, bytes, cudaGetErrorString(error)));
  }
  device_ = device;
  stream_ordered_ = false;
  free_stream_ = nullptr;
  data_ = p;
  bytes_ = bytes;
  return absl::OkStatus();
}

void DeviceBuffer::Free() {
  if (data_ != nullptr) {
    cudaSetDevice(device_);
    if (stream_ordered_) {
      cudaFreeAsync(data_, free_stream_);
    } else {
      cudaFree(data_);
    }
  }
  data_ = nullptr;
  bytes_ = 0;
}

PinnedHostBuffer::~PinnedHostBuffer() {
  if (data_ != nullptr) cudaFreeHost(data_);
}

bool PinnedHostBuffer::Reserve(int64_t bytes) {
  if (bytes <= bytes_) return true;
  if (data_ != nullptr) cudaFreeHost(data_);
  data_ = nullptr;
  bytes_ = 0;
  void* p = nullptr;
  if (cudaMallocHost(&p, static_cast<size_t>(bytes)) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  data_ = static_cast<char*>(p);
  bytes_ = bytes;
  return true;
}

void ParallelHostCopy(char* to, const char* from, int64_t bytes, int threads) {
  constexpr int64_t kMinPiece = int64_t{4} << 20;
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(threads, bytes / kMinPiece));
  const int64_t step = (bytes + pieces - 1) / pieces;
  std::vector<std::thread> pool;
  for (int64_t p = 1; p < pieces; ++p) {
    const int64_t at = p * step;
    const int64_t n = std::min(step, bytes - at);
    if (n > 0) pool.emplace_back([=] { std::memcpy(to + at, from + at, static_cast<size_t>(n)); });
  }
  std::memcpy(to, from, static_cast<size_t>(std::min(step, bytes)));
  for (std::thread& t : pool) t.join();
}

StagedUpload::~StagedUpload() {
  for (int h = 0; h < 2; ++h) {
    if (done_[h] == nullptr) continue;
    if (pending_[h]) cudaEventSynchronize(done_[h]);  // the buffer is freed after this
    cudaEventDestroy(done_[h]);
  }
}

absl::Status StagedUpload::Copy(void* to, const void* from, int64_t bytes, cudaStream_t stream) {
  if (bytes < kMinStagedBytes || direct_) {
    NVFP4_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(to, from, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream));
    return absl::OkStatus();
  }
  if (done_[0] == nullptr) {
    if (!buffer_.Reserve(2 * kPieceBytes)) {
      direct_ = true;
      return Copy(to, from, bytes, stream);
    }
    for (cudaEvent_t& event : done_) {
      NVFP4_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    }
  }
  int half = 0;
  for (int64_t at = 0; at < bytes; at += kPieceBytes, half ^= 1) {
    const int64_t piece = std::min(kPieceBytes, bytes - at);
    if (pending_[half]) NVFP4_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_[half]));
    char* const staged = buffer_.data() + half * kPieceBytes;
    ParallelHostCopy(staged, static_cast<const char*>(from) + at, piece, kThreads);
    NVFP4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(to) + at, staged,
                                               static_cast<size_t>(piece), cudaMemcpyHostToDevice,
                                               stream));
    NVFP4_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_[half], stream));
    pending_[half] = true;
  }
  return absl::OkStatus();
}

BackendStream::~BackendStream() {
  if (owned_ != nullptr) cudaStreamDestroy(owned_);
}

absl::Status BackendStream::Init(cudaStream_t given) {
  stream_ = given;
  if (given == nullptr) {
    NVFP4_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&owned_, cudaStreamNonBlocking));
    stream_ = owned_;
  }
  return absl::OkStatus();
}

StreamTimer::~StreamTimer() {
  if (start_ != nullptr) cudaEventDestroy(start_);
  if (stop_ != nullptr) cudaEventDestroy(stop_);
}

absl::Status StreamTimer::Init() {
  NVFP4_CUDA_RETURN_IF_ERROR(cudaEventCreate(&start_));
  NVFP4_CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop_));
  return absl::OkStatus();
}

absl::Status StreamTimer::Start(cudaStream_t stream) {
  NVFP4_CUDA_RETURN_IF_ERROR(cudaEventRecord(start_, stream));
  return absl::OkStatus();
}

absl::Status StreamTimer::Stop(cudaStream_t stream, float* elapsed_ms) {
  NVFP4_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop_, stream));
  NVFP4_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop_));
  NVFP4_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(elapsed_ms, start_, stop_));
  return absl::OkStatus();
}

}  // namespace nvfp4cal::cuda_internal
