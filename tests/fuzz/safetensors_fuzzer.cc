// Fuzz target: the safetensors reader and the Hessian store on arbitrary file contents.
//
// The bytes become an in-memory file (memfd); SafetensorsFile::Open must either refuse it with
// INVALID_ARGUMENT or return tensors that lie inside the file, in order, with sizes matching
// their shapes. Every tensor is read through, and each entry goes through HessianStore::Blocks
// (which validates dtype, shape, finiteness and symmetry) for the column counts its shape
// allows.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "client/hessians.h"
#include "client/safetensors.h"
#include "tests/fuzz/fuzz_input.h"

namespace {

// Writes the bytes to a memfd; returns its /proc path ("" when memfd is unavailable).
std::string MemFile(const uint8_t* data, size_t size, int* fd) {
  *fd = memfd_create("nvfp4cal-fuzz", MFD_CLOEXEC);
  if (*fd < 0) return "";
  size_t written = 0;
  while (written < size) {
    const ssize_t n = write(*fd, data + written, size - written);
    if (n <= 0) break;
    written += static_cast<size_t>(n);
  }
  return "/proc/self/fd/" + std::to_string(*fd);
}

void CheckFile(const nvfp4cal::SafetensorsFile& file) {
  int64_t expected_offset = -1;
  uint64_t checksum = 0;
  for (const nvfp4cal::SafetensorsTensor& t : file.tensors()) {
    FUZZ_CHECK(t.num_bytes ==
               nvfp4cal::NumElements(t.shape) * nvfp4cal::SafetensorsDTypeSize(t.dtype));
    FUZZ_CHECK(t.file_offset >= 8 && t.file_offset + t.num_bytes <= file.file_size());
    if (expected_offset >= 0) FUZZ_CHECK(t.file_offset == expected_offset);
    expected_offset = t.file_offset + t.num_bytes;
    for (int64_t i = 0; i < t.num_bytes; ++i) checksum += t.data[i];
    FUZZ_CHECK(file.Find(t.name) == &t);
  }
  if (expected_offset >= 0) FUZZ_CHECK(expected_offset == file.file_size());
  // Keeps the reads from being optimised away.
  if (checksum == 0x5eedf00d5eedf00dULL)
    std::fprintf(stderr, "%llu\n", (unsigned long long)checksum);
}

void CheckHessians(const std::string& path, const nvfp4cal::SafetensorsFile& file) {
  auto store = nvfp4cal::HessianStore::Open(path);
  FUZZ_CHECK(store.ok());
  for (const nvfp4cal::SafetensorsTensor& t : file.tensors()) {
    if (t.shape.empty()) continue;
    for (int64_t cols : {t.shape[0], t.shape[0] * 16, t.shape.back()}) {
      if (cols <= 0 || cols > (1 << 16)) continue;
      auto blocks = (*store)->Blocks(t.name, "fuzz.module", cols, 1e-4f);
      if (blocks.ok()) {
        FUZZ_CHECK((*blocks)->size() == static_cast<size_t>(cols / 16 * 256));
      } else {
        FUZZ_CHECK(blocks.status().code() == absl::StatusCode::kInvalidArgument);
      }
    }
    const std::string name = t.name;
    const size_t dot = name.rfind(".hessian");
    if (dot != std::string::npos) (*store)->FindEntry(name.substr(0, dot)).IgnoreError();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int fd = -1;
  const std::string path = MemFile(data, size, &fd);
  if (path.empty()) return 0;
  auto file = nvfp4cal::SafetensorsFile::Open(path);
  if (file.ok()) {
    CheckFile(**file);
    CheckHessians(path, **file);
  } else {
    FUZZ_CHECK(file.status().code() == absl::StatusCode::kInvalidArgument);
  }
  close(fd);
  return 0;
}
