// The floor of each stage of `nvfp4cal quantize`, each stage alone at the machine's pace:
//
//   read   every *.safetensors file of --model, from the page cache (pread on every hardware
//          thread into private buffers; what a reader thread pool can reach)
//   h2d    --h2d-bytes from pinned host memory to the device (two streams, 64 MiB copies)
//   d2h    --d2h-bytes from the device to pinned host memory
//   write  --write-bytes into files in --out-dir (page cache; every hardware thread, then one)
//   disk   the same with an fsync of every file (a durable output waits for the disk)
//
// The kernels' floor comes from cuda_layer_bench. end_to_end_bench.py runs this beside the
// end-to-end runs and prints each floor next to them.
//
//   stage_floor_bench --model DIR --out-dir DIR --h2d-bytes N --d2h-bytes N --write-bytes N
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#if defined(NVFP4CAL_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr int64_t kChunk = int64_t{64} << 20;

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void Print(const char* stage, int64_t bytes, double seconds, const std::string& how) {
  std::printf("floor %-6s %8.3f s  %7.2f GB/s  %7.2f GB  (%s)\n", stage, seconds,
              seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0.0,
              static_cast<double>(bytes) / 1e9, how.c_str());
}

// Runs body(t) on `threads` threads and returns the wall time.
template <typename Body>
double OnThreads(int threads, Body body) {
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(body, t);
  for (std::thread& t : pool) t.join();
  return Since(start);
}

// pread of every file in 64 MiB pieces, pieces shared out to the threads.
void ReadFloor(const std::string& model, int threads) {
  struct Piece {
    std::string path;
    int64_t offset;
    int64_t size;
  };
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (const fs::directory_entry& e : fs::directory_iterator(model)) {
    if (!e.is_regular_file() || e.path().extension() != ".safetensors") continue;
    const int64_t size = static_cast<int64_t>(e.file_size());
    for (int64_t at = 0; at < size; at += kChunk) {
      pieces.push_back({e.path().string(), at, std::min(kChunk, size - at)});
    }
    total += size;
  }
  for (int pass = 0; pass < 2; ++pass) {  // the first pass fills the page cache
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    const double seconds = OnThreads(threads, [&](int) {
      std::vector<char> buffer(static_cast<size_t>(kChunk));
      for (size_t i; (i = next.fetch_add(1)) < pieces.size();) {
        const int fd = open(pieces[i].path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0 || pread(fd, buffer.data(), static_cast<size_t>(pieces[i].size),
                            pieces[i].offset) != pieces[i].size) {
          failed = true;
        }
        if (fd >= 0) close(fd);
      }
    });
    if (failed) {
      std::fprintf(stderr, "stage_floor_bench: reading %s failed\n", model.c_str());
      std::exit(1);
    }
    if (pass == 1) Print("read", total, seconds, std::to_string(threads) + " threads, pread");
  }
}

// Page-cache writes on `threads` threads and on one, then on every thread with an fsync of each
// file at the end (what a durable output costs: the disk).
void WriteFloor(const std::string& dir, int64_t bytes, int threads) {
  const std::vector<char> buffer(static_cast<size_t>(kChunk), 1);
  for (int pass = 0; pass < 3; ++pass) {
    const int t = pass == 1 ? 1 : threads;
    const bool sync = pass == 2;
    std::atomic<bool> failed{false};
    const double seconds = OnThreads(t, [&](int i) {
      const std::string path = dir + "/floor-" + std::to_string(i) + ".bin";
      const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0) {
        failed = true;
        return;
      }
      for (int64_t done = 0; done < bytes / t;) {
        const int64_t n = std::min(kChunk, bytes / t - done);
        if (write(fd, buffer.data(), static_cast<size_t>(n)) != n) failed = true;
        done += n;
      }
      if (sync && fsync(fd) != 0) failed = true;
      close(fd);
    });
    for (int i = 0; i < t; ++i) unlink((dir + "/floor-" + std::to_string(i) + ".bin").c_str());
    if (failed) {
      std::fprintf(stderr, "stage_floor_bench: writing into %s failed\n", dir.c_str());
      std::exit(1);
    }
    Print(sync ? "disk" : "write", bytes, seconds,
          std::to_string(t) + (t == 1 ? " thread" : " threads") + (sync ? ", fsync" : ""));
  }
}

#if defined(NVFP4CAL_HAVE_CUDA)
bool Check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "stage_floor_bench: %s: %s\n", what, cudaGetErrorString(e));
  return false;
}

// Copies `bytes` in 64 MiB pieces on two streams between pinned host memory and the device.
void CopyFloor(const char* stage, int64_t bytes, cudaMemcpyKind kind) {
  char* host = nullptr;
  char* device = nullptr;
  cudaStream_t streams[2];
  if (!Check(cudaMallocHost(&host, 2 * kChunk), "cudaMallocHost") ||
      !Check(cudaMalloc(&device, 2 * kChunk), "cudaMalloc") ||
      !Check(cudaStreamCreate(&streams[0]), "stream") ||
      !Check(cudaStreamCreate(&streams[1]), "stream")) {
    return;
  }
  std::memset(host, 1, 2 * kChunk);
  for (int pass = 0; pass < 2; ++pass) {  // the first pass warms the copy engines up
    const Clock::time_point start = Clock::now();
    int i = 0;
    for (int64_t done = 0; done < bytes; done += kChunk, ++i) {
      const size_t n = static_cast<size_t>(std::min(kChunk, bytes - done));
      char* h = host + (i % 2) * kChunk;
      char* d = device + (i % 2) * kChunk;
      const bool up = kind == cudaMemcpyHostToDevice;
      Check(cudaMemcpyAsync(up ? d : h, up ? h : d, n, kind, streams[i % 2]), "copy");
    }
    Check(cudaDeviceSynchronize(), "synchronize");
    if (pass == 1) Print(stage, bytes, Since(start), "pinned, 2 streams");
  }
  cudaStreamDestroy(streams[0]);
  cudaStreamDestroy(streams[1]);
  cudaFree(device);
  cudaFreeHost(host);
}

// Not a floor: H2D straight from the memory-mapped shards (pageable, as a copy from a mapping
// is), 64 MiB per copy, for comparison with the pinned figure.
void MappedCopy(const std::string& model, int64_t bytes) {
  char* device = nullptr;
  if (!Check(cudaMalloc(&device, kChunk), "cudaMalloc")) return;
  int64_t done = 0;
  double seconds = 0.0;
  for (const fs::directory_entry& e : fs::directory_iterator(model)) {
    if (done >= bytes) break;
    if (!e.is_regular_file() || e.path().extension() != ".safetensors") continue;
    const int fd = open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
    const size_t size = static_cast<size_t>(e.file_size());
    void* map = fd < 0 ? MAP_FAILED : mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    if (fd >= 0) close(fd);
    if (map == MAP_FAILED) continue;
    const Clock::time_point start = Clock::now();
    for (size_t at = 0; at < size && done < bytes; at += static_cast<size_t>(kChunk)) {
      const size_t n = std::min(static_cast<size_t>(kChunk), size - at);
      Check(cudaMemcpy(device, static_cast<char*>(map) + at, n, cudaMemcpyHostToDevice), "copy");
      done += static_cast<int64_t>(n);
    }
    seconds += Since(start);
    munmap(map, size);
  }
  cudaFree(device);
  std::printf("(not a floor) h2d from the mapped shards: %.3f s, %.2f GB/s, %.2f GB (pageable)\n",
              seconds, seconds > 0 ? static_cast<double>(done) / seconds / 1e9 : 0.0,
              static_cast<double>(done) / 1e9);
}
#endif

int64_t ParseBytes(const char* flag, const char* value) {
  char* end = nullptr;
  const long long v = std::strtoll(value, &end, 10);
  if (end == value || *end != '\0' || v < 0) {
    std::fprintf(stderr, "stage_floor_bench: %s must be a byte count >= 0; got \"%s\"\n", flag,
                 value);
    std::exit(2);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model;
  std::string out_dir;
  int64_t h2d = 0;
  int64_t d2h = 0;
  int64_t written = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--model") {
      model = argv[i + 1];
    } else if (flag == "--out-dir") {
      out_dir = argv[i + 1];
    } else if (flag == "--h2d-bytes") {
      h2d = ParseBytes(argv[i], argv[i + 1]);
    } else if (flag == "--d2h-bytes") {
      d2h = ParseBytes(argv[i], argv[i + 1]);
    } else if (flag == "--write-bytes") {
      written = ParseBytes(argv[i], argv[i + 1]);
    } else {
      std::fprintf(stderr, "stage_floor_bench: unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  if (model.empty() || out_dir.empty() || argc % 2 == 0) {
    std::fprintf(stderr,
                 "usage: stage_floor_bench --model DIR --out-dir DIR [--h2d-bytes N] "
                 "[--d2h-bytes N] [--write-bytes N]\n");
    return 2;
  }
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  ReadFloor(model, threads);
#if defined(NVFP4CAL_HAVE_CUDA)
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) {
    if (h2d > 0) CopyFloor("h2d", h2d, cudaMemcpyHostToDevice);
    if (h2d > 0) MappedCopy(model, h2d);
    if (d2h > 0) CopyFloor("d2h", d2h, cudaMemcpyDeviceToHost);
  } else {
    std::printf("floor h2d/d2h: no CUDA device\n");
  }
#else
  std::printf("floor h2d/d2h: built without CUDA (%lld and %lld bytes not copied)\n",
              static_cast<long long>(h2d), static_cast<long long>(d2h));
#endif
  if (written > 0) WriteFloor(out_dir, written, threads);
  return 0;
}
