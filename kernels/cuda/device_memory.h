// Device memory, streams and events as the CUDA backends hold them (not installed): workspace
// offsets aligned like cudaMalloc's, a device buffer freed on destruction, the stream a backend
// runs on, and an event pair that times work on a stream.
//
//   DeviceBuffer workspace;  // a member of the backend: grows, never shrinks
//   if (absl::Status s = workspace.Reserve(device, AlignUp(a) + AlignUp(b), stream, stream);
//       !s.ok()) return s;
//   float* x = workspace.As<float>();
//   float* y = reinterpret_cast<float*>(workspace.As<char>() + AlignUp(a));
#ifndef NVFP4CAL_KERNELS_CUDA_DEVICE_MEMORY_H_
#define NVFP4CAL_KERNELS_CUDA_DEVICE_MEMORY_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace nvfp4cal::cuda_internal {

// Alignment of the buffers the backends carve out of one workspace (cudaMalloc's own).
constexpr int64_t kDeviceAlignment = 256;

// `bytes` rounded up to kDeviceAlignment: the size a buffer takes in a workspace.
constexpr int64_t AlignUp(int64_t bytes) {
  return (bytes + kDeviceAlignment - 1) / kDeviceAlignment * kDeviceAlignment;
}

// Device memory of one device, freed on destruction. It grows on request and never shrinks;
// growing does not keep the contents.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Free(); }

  // Holds at least `bytes`, allocated in stream order on `stream` (no device-wide
  // synchronisation, unlike cudaMalloc / cudaFree). It is freed in stream order on
  // `free_stream`: the owner's stream for temporaries, the legacy default stream (0) for memory
  // that outlives its maker (gptq plans) and is only freed once no call uses it.
  // RESOURCE_EXHAUSTED when the allocation fails.
  absl::Status Reserve(int device, int64_t bytes, cudaStream_t stream, cudaStream_t free_stream);

  // Holds at least `bytes`, allocated with cudaMalloc and freed with cudaFree, so that the memory
  // returns to the device as soon as it is freed (no stream-ordered pool keeps it). On failure
  // RESOURCE_EXHAUSTED naming the device and the size, and the buffer is empty (usable again).
  absl::Status ReserveSynchronous(int device, int64_t bytes);

  // Returns the memory (stream-ordered memory on its free stream); the buffer is then empty.
  void Free();

  template <typename T>
  T* As() const {
    return static_cast<T*>(data_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  int device_ = 0;
  bool stream_ordered_ = false;
  cudaStream_t free_stream_ = nullptr;
  void* data_ = nullptr;
  int64_t bytes_ = 0;
};

// Page-locked host memory for copies at the bus's pace (a copy from pageable memory goes through
// the driver's staging at a fraction of it). Grows on request, never shrinks; freed on
// destruction.
class PinnedHostBuffer {
 public:
  PinnedHostBuffer() = default;
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;
  ~PinnedHostBuffer();

  // Holds at least `bytes`; false (and empty) when the allocation fails, so that the caller can
  // copy from pageable memory instead.
  bool Reserve(int64_t bytes);
  char* data() const { return data_; }

 private:
  char* data_ = nullptr;
  int64_t bytes_ = 0;
};

// Copies pageable host memory to the device at the bus's pace: in pieces through the two halves
// of a pinned buffer, one half filled on several threads (ParallelHostCopy) while the other's
// copy to the device runs. A copy from pageable memory goes through the driver's own staging,
// at a fraction of the bus and serialised with the process's other pageable copies.
//
//   StagedUpload upload;  // a member of the backend, used on one stream at a time
//   NVFP4_RETURN_IF_ERROR(upload.Copy(device_ptr, host_ptr, bytes, stream));
//   // host_ptr may change now; device_ptr is written in stream order.
class StagedUpload {
 public:
  // staged = false: every copy goes directly (for comparisons).
  explicit StagedUpload(bool staged = true) : direct_(!staged) {}
  StagedUpload(const StagedUpload&) = delete;
  StagedUpload& operator=(const StagedUpload&) = delete;
  ~StagedUpload();

  // Queues the copy of `bytes` from `from` (host) to `to` (device) on `stream` and returns once
  // `from` has been read. Copies below kMinStagedBytes, and every copy when staging is off or the
  // pinned buffer cannot be had, go directly (pageable). A later call waits for the halves it
  // reuses.
  absl::Status Copy(void* to, const void* from, int64_t bytes, cudaStream_t stream);

  // Smaller copies gain nothing from staging.
  static constexpr int64_t kMinStagedBytes = int64_t{1} << 20;
  // Each half's size and the host threads that fill it.
  static constexpr int64_t kPieceBytes = int64_t{32} << 20;
  static constexpr int kThreads = 4;

 private:
  PinnedHostBuffer buffer_;                   // two halves of kPieceBytes
  bool direct_;                               // staging off, or no pinned memory to be had
  cudaEvent_t done_[2] = {nullptr, nullptr};  // each half's last copy to the device
  bool pending_[2] = {false, false};
};

// Copies `bytes` from `from` to `to` on up to `threads` threads (pieces of at least 4 MiB), for
// filling pinned staging from memory-mapped files: one thread's memcpy with page faults runs at
// a fraction of the bus.
void ParallelHostCopy(char* to, const char* from, int64_t bytes, int threads);

// The stream a backend runs on: the caller's, or a non-blocking stream it creates and destroys
// with itself.
class BackendStream {
 public:
  BackendStream() = default;
  BackendStream(const BackendStream&) = delete;
  BackendStream& operator=(const BackendStream&) = delete;
  ~BackendStream();

  // Uses `given`, or when it is null creates a stream on the current device.
  absl::Status Init(cudaStream_t given);

  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
  cudaStream_t owned_ = nullptr;
};

// Times work on a stream with a pair of CUDA events (the GPU's time, not the host's).
class StreamTimer {
 public:
  StreamTimer() = default;
  StreamTimer(const StreamTimer&) = delete;
  StreamTimer& operator=(const StreamTimer&) = delete;
  ~StreamTimer();

  // Creates the events on the current device.
  absl::Status Init();

  // Marks the start of the timed work on `stream`.
  absl::Status Start(cudaStream_t stream);

  // Marks its end, waits for it and sets *elapsed_ms to the time since Start.
  absl::Status Stop(cudaStream_t stream, float* elapsed_ms);

 private:
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

}  // namespace nvfp4cal::cuda_internal

#endif  // NVFP4CAL_KERNELS_CUDA_DEVICE_MEMORY_H_
