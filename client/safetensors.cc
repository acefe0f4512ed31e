#include "client/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "nlohmann/json.hpp"

namespace nvfp4cal {
namespace {

using Json = nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we (a corrupt length field
// must not make us read gigabytes).
constexpr int64_t kMaxHeaderBytes = 100'000'000;

struct DTypeEntry {
  SafetensorsDType dtype;
  std::string_view name;
  int size;
};
constexpr DTypeEntry kDTypes[] = {
    {SafetensorsDType::kBool, "BOOL", 1},      {SafetensorsDType::kU8, "U8", 1},
    {SafetensorsDType::kI8, "I8", 1},          {SafetensorsDType::kF8E4M3, "F8_E4M3", 1},
    {SafetensorsDType::kF8E5M2, "F8_E5M2", 1}, {SafetensorsDType::kI16, "I16", 2},
    {SafetensorsDType::kU16, "U16", 2},        {SafetensorsDType::kF16, "F16", 2},
    {SafetensorsDType::kBF16, "BF16", 2},      {SafetensorsDType::kI32, "I32", 4},
    {SafetensorsDType::kU32, "U32", 4},        {SafetensorsDType::kF32, "F32", 4},
    {SafetensorsDType::kF64, "F64", 8},        {SafetensorsDType::kI64, "I64", 8},
    {SafetensorsDType::kU64, "U64", 8},
};

absl::Status Invalid(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

std::string ErrnoText() { return std::strerror(errno); }

// Reads a non-negative JSON integer; false for anything else (negative, float, string, huge).
bool ReadNonNegative(const Json& value, int64_t* out) {
  if (value.is_number_unsigned()) {
    const uint64_t v = value.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = static_cast<int64_t>(v);
    return true;
  }
  if (value.is_number_integer()) {
    const int64_t v = value.get<int64_t>();
    if (v < 0) return false;
    *out = v;
    return true;
  }
  return false;
}

// Parses one tensor entry of the header into *tensor (without data pointers).
absl::Status ParseTensorEntry(const std::string& path, const std::string& name, const Json& entry,
                              SafetensorsTensor* tensor, int64_t* begin, int64_t* end) {
  const std::string where = absl::StrCat("tensor '", name, "'");
  if (!entry.is_object()) return Invalid(path, absl::StrCat(where, ": entry is not an object"));
  const auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return Invalid(path, absl::StrCat(where, ": missing or non-string \"dtype\""));
  }
  absl::StatusOr<SafetensorsDType> dtype = ParseSafetensorsDType(dtype_it->get<std::string>());
  if (!dtype.ok()) return Invalid(path, absl::StrCat(where, ": ", dtype.status().message()));
  const auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) {
    return Invalid(path, absl::StrCat(where, ": missing or non-array \"shape\""));
  }
  std::vector<int64_t> shape;
  for (const Json& dim : *shape_it) {
    int64_t d = 0;
    if (!ReadNonNegative(dim, &d)) {
      return Invalid(path, absl::StrCat(where, ": shape dimension ", dim.dump(),
                                        " is not a non-negative integer"));
    }
    shape.push_back(d);
  }
  const auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !ReadNonNegative((*offsets_it)[0], begin) || !ReadNonNegative((*offsets_it)[1], end)) {
    return Invalid(path, absl::StrCat(where,
                                      ": \"data_offsets\" must be two non-negative "
                                      "integers [begin, end], got ",
                                      offsets_it == entry.end() ? "nothing" : offsets_it->dump()));
  }
  if (*end < *begin) {
    return Invalid(
        path, absl::StrCat(where, ": data_offsets [", *begin, ", ", *end, "] end before begin"));
  }
  // elements x size with overflow checks: a corrupt shape must not wrap around.
  int64_t expected = SafetensorsDTypeSize(*dtype);
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(expected, d, &expected)) {
      return Invalid(path, absl::StrCat(where, ": shape ", ShapeString(shape), " overflows"));
    }
  }
  if (*end - *begin != expected) {
    return Invalid(
        path, absl::StrCat(where, ": data_offsets [", *begin, ", ", *end, "] hold ", *end - *begin,
                           " bytes but shape ", ShapeString(shape), " x ",
                           std::string(SafetensorsDTypeName(*dtype)), " needs ", expected));
  }
  tensor->name = name;
  tensor->dtype = *dtype;
  tensor->shape = std::move(shape);
  tensor->num_bytes = expected;
  return absl::OkStatus();
}

}  // namespace

std::string_view SafetensorsDTypeName(SafetensorsDType dtype) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

absl::StatusOr<SafetensorsDType> ParseSafetensorsDType(std::string_view name) {
  std::vector<std::string> names;
  for (const DTypeEntry& e : kDTypes) {
    if (e.name == name) return e.dtype;
    names.push_back(std::string(e.name));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown dtype \"", std::string(name), "\" (accepted: ", absl::StrJoin(names, ", "), ")"));
}

int SafetensorsDTypeSize(SafetensorsDType dtype) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == dtype) return e.size;
  }
  return 1;
}

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// ---------------------------------------------------------------------------------------------
// Reader

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  absl::StatusOr<ReadableFile> opened = ReadableFile::Open(path);
  if (!opened.ok()) return opened.status();
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->file_size_ = opened->size();
  if (file->file_size_ < 8) {
    return Invalid(path, absl::StrCat("file is ", file->file_size_,
                                      " bytes, shorter than the 8-byte header length"));
  }
  void* mapping =
      mmap(nullptr, static_cast<size_t>(file->file_size_), PROT_READ, MAP_SHARED, opened->fd(), 0);
  if (mapping == MAP_FAILED) return Invalid(path, absl::StrCat("mmap failed: ", ErrnoText()));
  file->mapping_ = mapping;
  file->fd_ = ::fcntl(opened->fd(), F_DUPFD_CLOEXEC, 0);
  if (file->fd_ < 0) return Invalid(path, absl::StrCat("dup failed: ", ErrnoText()));
  const uint8_t* base = static_cast<const uint8_t*>(mapping);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  if (header_len > static_cast<uint64_t>(kMaxHeaderBytes)) {
    return Invalid(path, absl::StrCat("header length ", header_len, " exceeds the limit of ",
                                      kMaxHeaderBytes, " bytes"));
  }
  const int64_t header_bytes = static_cast<int64_t>(header_len);
  if (8 + header_bytes > file->file_size_) {
    return Invalid(path, absl::StrCat("header length ", header_bytes, " runs past the end of the ",
                                      file->file_size_, "-byte file"));
  }
  const std::string_view text(reinterpret_cast<const char*>(base + 8),
                              static_cast<size_t>(header_bytes));
  if (text.empty() || text[0] != '{') {
    return Invalid(path, "header does not start with '{'");
  }
  Json header;
  try {
    header = Json::parse(text);
  } catch (const Json::exception& e) {
    return Invalid(path, absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) return Invalid(path, "header is not a JSON object");

  struct Placed {
    SafetensorsTensor tensor;
    int64_t begin;
    int64_t end;
  };
  std::vector<Placed> placed;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) return Invalid(path, "__metadata__ is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string()) {
          return Invalid(path, absl::StrCat("__metadata__ value of \"", m.key(),
                                            "\" is not a string: ", m.value().dump()));
        }
        file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    Placed p;
    absl::Status status = ParseTensorEntry(path, it.key(), it.value(), &p.tensor, &p.begin, &p.end);
    if (!status.ok()) return status;
    placed.push_back(std::move(p));
  }
  std::stable_sort(placed.begin(), placed.end(), [](const Placed& a, const Placed& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const int64_t buffer_begin = 8 + header_bytes;
  const int64_t buffer_size = file->file_size_ - buffer_begin;
  int64_t expected_begin = 0;
  std::string previous;
  for (const Placed& p : placed) {
    if (p.begin < expected_begin) {
      return Invalid(
          path, absl::StrCat("tensor '", p.tensor.name, "': data_offsets [", p.begin, ", ", p.end,
                             "] overlap tensor '", previous, "' which ends at ", expected_begin));
    }
    if (p.begin > expected_begin) {
      return Invalid(path, absl::StrCat("tensor '", p.tensor.name, "': data_offsets [", p.begin,
                                        ", ", p.end, "] leave a hole of ", p.begin - expected_begin,
                                        " bytes after offset ", expected_begin));
    }
    if (p.end > buffer_size) {
      return Invalid(path, absl::StrCat("tensor '", p.tensor.name, "': data_offsets [", p.begin,
                                        ", ", p.end, "] end past the data buffer of ", buffer_size,
                                        " bytes (file truncated?)"));
    }
    expected_begin = p.end;
    previous = p.tensor.name;
  }
  if (expected_begin != buffer_size) {
    return Invalid(path, absl::StrCat("data buffer is ", buffer_size,
                                      " bytes but the tensors "
                                      "cover ",
                                      expected_begin, " (trailing bytes)"));
  }
  for (Placed& p : placed) {
    p.tensor.file_offset = buffer_begin + p.begin;
    p.tensor.data = base + p.tensor.file_offset;
    file->index_[p.tensor.name] = file->tensors_.size();
    file->tensors_.push_back(std::move(p.tensor));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) munmap(mapping_, static_cast<size_t>(file_size_));
  if (fd_ >= 0) ::close(fd_);
}

absl::Status SafetensorsFile::ReadRange(const void* data, int64_t bytes, void* out) const {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(mapping_);
  const uintptr_t from = reinterpret_cast<uintptr_t>(data);
  if (mapping_ == nullptr || bytes < 0 || from < begin ||
      from - begin > static_cast<uintptr_t>(file_size_) ||
      bytes > file_size_ - static_cast<int64_t>(from - begin)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": a read of ", bytes, " bytes outside the file's mapping"));
  }
  const int64_t offset = static_cast<int64_t>(from - begin);
  char* to = static_cast<char*>(out);
  for (int64_t done = 0; done < bytes;) {
    const ssize_t n = ::pread(fd_, to + done, static_cast<size_t>(bytes - done),
                              static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::DataLossError(absl::StrCat(
          path_, ": cannot read ", bytes - done, " bytes at offset ", offset + done, ": ",
          n == 0 ? "the file ends there (changed since it was opened)" : ErrnoText()));
    }
    done += n;
  }
  return absl::OkStatus();
}

void SafetensorsFile::DropPages(const void* data, int64_t bytes) const {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(mapping_);
  const uintptr_t end = begin + static_cast<uintptr_t>(file_size_);
  const uintptr_t from = reinterpret_cast<uintptr_t>(data);
  if (mapping_ == nullptr || bytes <= 0 || from < begin ||
      from + static_cast<uintptr_t>(bytes) > end) {
    return;
  }
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = from / page * page;
  const uintptr_t last =
      std::min(end, (from + static_cast<uintptr_t>(bytes) + page - 1) / page * page);
  // Advice only: a failure leaves the pages resident, which is never wrong.
  (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

const SafetensorsTensor* SafetensorsFile::Find(std::string_view name) const {
  const auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

// ---------------------------------------------------------------------------------------------
// Writer

absl::StatusOr<SafetensorsLayout> PlanSafetensorsLayout(
    const std::vector<SafetensorsTensorSpec>& specs,
    const std::map<std::string, std::string>& metadata) {
  std::vector<const SafetensorsTensorSpec*> sorted;
  for (const SafetensorsTensorSpec& s : specs) sorted.push_back(&s);
  std::sort(sorted.begin(), sorted.end(),
            [](const auto* a, const auto* b) { return a->name < b->name; });
  SafetensorsLayout layout;
  // nlohmann's json object keeps keys sorted, which is the layout order: offsets ascend with
  // the key order in the header, as in files written by the reference implementation.
  Json header = Json::object();
  if (!metadata.empty()) {
    Json m = Json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  int64_t offset = 0;
  for (const SafetensorsTensorSpec* s : sorted) {
    if (s->name.empty() || s->name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat("invalid tensor name \"", s->name, "\""));
    }
    if (layout.data_offsets.count(s->name) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name \"", s->name, "\""));
    }
    for (int64_t d : s->shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", s->name, "': negative dimension in shape ", ShapeString(s->shape)));
      }
    }
    const int64_t bytes = NumElements(s->shape) * SafetensorsDTypeSize(s->dtype);
    Json entry = Json::object();
    entry["dtype"] = std::string(SafetensorsDTypeName(s->dtype));
    entry["shape"] = s->shape;
    entry["data_offsets"] = {offset, offset + bytes};
    header[s->name] = std::move(entry);
    layout.data_offsets[s->name] = offset;
    offset += bytes;
  }
  layout.data_size = offset;
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  layout.header.resize(8);
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i)
    layout.header[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
  layout.header += json;
  return layout;
}

namespace {

absl::Status PwriteAll(int fd, const uint8_t* data, int64_t size, int64_t offset,
                       const std::string& path) {
  while (size > 0) {
    const ssize_t n = ::pwrite(fd, data, static_cast<size_t>(size), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat(path, ": write failed: ", ErrnoText()));
    }
    data += n;
    size -= n;
    offset += n;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, const std::vector<SafetensorsTensorSpec>& specs,
    const std::map<std::string, std::string>& metadata) {
  absl::StatusOr<SafetensorsLayout> layout = PlanSafetensorsLayout(specs, metadata);
  if (!layout.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", layout.status().message()));
  }
  std::unique_ptr<SafetensorsWriter> writer(new SafetensorsWriter());
  writer->path_ = path;
  writer->fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (writer->fd_ < 0) {
    return absl::PermissionDeniedError(absl::StrCat(path, ": cannot create: ", ErrnoText()));
  }
  const int64_t header_size = static_cast<int64_t>(layout->header.size());
  absl::Status status = PwriteAll(
      writer->fd_, reinterpret_cast<const uint8_t*>(layout->header.data()), header_size, 0, path);
  if (!status.ok()) return status;
  // Size the file now so that out-of-order writes leave no sparse surprises at the end.
  if (::ftruncate(writer->fd_, static_cast<off_t>(header_size + layout->data_size)) != 0) {
    return absl::InternalError(absl::StrCat(path, ": cannot size the file: ", ErrnoText()));
  }
  absl::MutexLock lock(&writer->mu_);
  for (const SafetensorsTensorSpec& s : specs) {
    Slot slot;
    slot.file_offset = header_size + layout->data_offsets.at(s.name);
    slot.num_bytes = NumElements(s.shape) * SafetensorsDTypeSize(s.dtype);
    writer->slots_.emplace(s.name, slot);
  }
  return writer;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

absl::Status SafetensorsWriter::Write(std::string_view name, absl::Span<const uint8_t> bytes) {
  int64_t offset = 0;
  {
    absl::MutexLock lock(&mu_);
    const auto it = slots_.find(name);
    if (it == slots_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": no tensor '", std::string(name), "' in the planned header"));
    }
    Slot& slot = it->second;
    const int64_t size = static_cast<int64_t>(bytes.size());
    if (slot.written + size > slot.num_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": tensor '", std::string(name), "' holds ", slot.num_bytes,
                       " bytes; writing ", size, " after ", slot.written, " overruns it"));
    }
    offset = slot.file_offset + slot.written;
    slot.written += size;
  }
  absl::Status written =
      PwriteAll(fd_, bytes.data(), static_cast<int64_t>(bytes.size()), offset, path_);
  if (!written.ok()) return written;
  // Start writing these pages to the disk now (asynchronously), so that the disk works while
  // the run goes on and Finish's fsync waits only for the tail. Advice: errors are Finish's.
  (void)::sync_file_range(fd_, static_cast<off_t>(offset), static_cast<off_t>(bytes.size()),
                          SYNC_FILE_RANGE_WRITE);
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Finish() {
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [name, slot] : slots_) {
      if (slot.written != slot.num_bytes) {
        return absl::FailedPreconditionError(absl::StrCat(path_, ": tensor '", name, "' has ",
                                                          slot.written, " of ", slot.num_bytes,
                                                          " bytes written"));
      }
    }
  }
  if (::fsync(fd_) != 0) {
    return absl::InternalError(absl::StrCat(path_, ": fsync failed: ", ErrnoText()));
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    return absl::InternalError(absl::StrCat(path_, ": close failed: ", ErrnoText()));
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensorsFile(const std::string& path,
                                  const std::vector<SafetensorsTensorData>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsTensorSpec> specs;
  for (const SafetensorsTensorData& t : tensors) specs.push_back(t.spec);
  absl::StatusOr<std::unique_ptr<SafetensorsWriter>> writer =
      SafetensorsWriter::Create(path, specs, metadata);
  if (!writer.ok()) return writer.status();
  for (const SafetensorsTensorData& t : tensors) {
    absl::Status status = (*writer)->Write(t.spec.name, t.bytes);
    if (!status.ok()) return status;
  }
  return (*writer)->Finish();
}

}  // namespace nvfp4cal
