// Safetensors reading (memory-mapped, header validated) and writing (streaming, header first).
//
// The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length N,
// N bytes of JSON `{"<tensor>": {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}, ...,
// "__metadata__": {"k": "v"}}` (padded with spaces), then the data buffer; offsets are relative
// to the buffer. The reader checks everything a corrupt or truncated file could get wrong and
// names the file, the tensor and the bad value; tensors are views into the mapping, never copies.
//
//   absl::StatusOr<std::unique_ptr<nvfp4cal::SafetensorsFile>> file =
//       nvfp4cal::SafetensorsFile::Open("model.safetensors");
//   const nvfp4cal::SafetensorsTensor* w = (*file)->Find("lm_head.weight");
//   // w->dtype, w->shape, w->data (mapped bytes), w->num_bytes
//
//   std::vector<nvfp4cal::SafetensorsTensorSpec> specs = {{"x", SafetensorsDType::kF32, {2, 3}}};
//   auto writer = nvfp4cal::SafetensorsWriter::Create("out.safetensors", specs, {});
//   (*writer)->Write("x", bytes);   // any tensor order; each tensor's bytes in order
//   (*writer)->Finish();            // checks that every byte was written
#ifndef NVFP4CAL_CLIENT_SAFETENSORS_H_
#define NVFP4CAL_CLIENT_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace nvfp4cal {

// Element types of the safetensors format.
enum class SafetensorsDType {
  kBool,
  kU8,
  kI8,
  kF8E4M3,
  kF8E5M2,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
};

// "BF16", "F8_E4M3", ... as written in headers.
std::string_view SafetensorsDTypeName(SafetensorsDType dtype);
// Inverse of SafetensorsDTypeName; INVALID_ARGUMENT listing the accepted names otherwise.
absl::StatusOr<SafetensorsDType> ParseSafetensorsDType(std::string_view name);
// Bytes per element.
int SafetensorsDTypeSize(SafetensorsDType dtype);

// Number of elements of a shape (1 for a scalar shape []).
int64_t NumElements(absl::Span<const int64_t> shape);
// "[4096, 4096]".
std::string ShapeString(absl::Span<const int64_t> shape);

// One tensor of an open file: a view into the mapping, valid while the file is open.
struct SafetensorsTensor {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::kF32;
  std::vector<int64_t> shape;
  // Offset of the first byte within the file (not the data buffer).
  int64_t file_offset = 0;
  int64_t num_bytes = 0;
  const uint8_t* data = nullptr;
};

// A memory-mapped, validated safetensors file. Read-only and thread-safe.
class SafetensorsFile {
 public:
  // Maps `path` and validates its header: length, JSON, dtypes, shapes, sizes = elements x dtype
  // size, offsets contiguous from 0 without overlaps or holes, and the buffer ending exactly at
  // the end of the file. Errors: NOT_FOUND (no file), INVALID_ARGUMENT (bad header or data
  // size), naming the file, the tensor and the value.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Tensors in order of their data offsets.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // The header's `__metadata__` (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The tensor with this name, or null.
  const SafetensorsTensor* Find(std::string_view name) const;
  // Size of the file in bytes.
  int64_t file_size() const { return file_size_; }

  // Hands the pages of [data, data + bytes) back to the page cache once the caller is done
  // with them (MADV_DONTNEED on the pages the range touches): the process's resident memory
  // drops, and a later read maps them again from the cache (or the file). Whole pages, so a
  // neighbouring tensor's first or last page may be dropped too (it is read again on use). A
  // range outside the mapping is ignored.
  void DropPages(const void* data, int64_t bytes) const;

  // Copies the file's bytes behind [data, data + bytes) of the mapping into `out` with pread:
  // the same bytes without faulting the mapped pages in (one system call per piece instead of
  // one fault per page, which matters where faults are slow, e.g. under a sandboxing kernel).
  // INVALID_ARGUMENT for a range outside the mapping; DATA_LOSS naming the file and the offset
  // when the file ends early (changed since it was opened) or the read fails.
  absl::Status ReadRange(const void* data, int64_t bytes, void* out) const;

 private:
  SafetensorsFile() = default;

  std::string path_;
  int fd_ = -1;  // for ReadRange
  void* mapping_ = nullptr;
  int64_t file_size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A tensor to be written: name, dtype and shape (its bytes come later).
struct SafetensorsTensorSpec {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::kF32;
  std::vector<int64_t> shape;
};

// Builds the header of a file holding `specs` (tensors laid out in name order) and the data
// offset of every tensor within the buffer. The header's length is a multiple of 8 (padded with
// spaces), so the buffer starts 8-byte aligned. INVALID_ARGUMENT for a duplicate or empty name,
// the name "__metadata__" or a negative dimension.
struct SafetensorsLayout {
  std::string header;  // the 8-byte length followed by the padded JSON
  std::map<std::string, int64_t> data_offsets;
  int64_t data_size = 0;
};
absl::StatusOr<SafetensorsLayout> PlanSafetensorsLayout(
    const std::vector<SafetensorsTensorSpec>& specs,
    const std::map<std::string, std::string>& metadata);

// Writes a safetensors file: the header first (all offsets are known from the specs), then the
// data of each tensor, tensors in any order (pwrite at their offsets), each tensor's bytes in
// order. Thread-safe: different tensors may be written from different threads.
class SafetensorsWriter {
 public:
  // Creates (truncates) `path` and writes the header.
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, const std::vector<SafetensorsTensorSpec>& specs,
      const std::map<std::string, std::string>& metadata);

  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Appends `bytes` to tensor `name` (after what was written to it before). INVALID_ARGUMENT
  // for an unknown name or more bytes than the tensor holds; INTERNAL on an I/O error.
  absl::Status Write(std::string_view name, absl::Span<const uint8_t> bytes);

  // Checks that every tensor is complete, flushes and closes the file. FAILED_PRECONDITION
  // naming the first incomplete tensor.
  absl::Status Finish();

  const std::string& path() const { return path_; }

 private:
  struct Slot {
    int64_t file_offset = 0;
    int64_t num_bytes = 0;
    int64_t written = 0;
  };
  SafetensorsWriter() = default;

  std::string path_;
  int fd_ = -1;
  absl::Mutex mu_;
  std::map<std::string, Slot, std::less<>> slots_ ABSL_GUARDED_BY(mu_);
};

// Writes a whole file at once from in-memory tensors (tests, small files).
struct SafetensorsTensorData {
  SafetensorsTensorSpec spec;
  std::vector<uint8_t> bytes;
};
absl::Status WriteSafetensorsFile(const std::string& path,
                                  const std::vector<SafetensorsTensorData>& tensors,
                                  const std::map<std::string, std::string>& metadata);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_SAFETENSORS_H_
