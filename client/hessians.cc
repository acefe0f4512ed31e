#include "client/hessians.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/checkpoint.h"
#include "client/parallel.h"

namespace nvfp4cal {
namespace {

float LoadFloat(const uint8_t* base, int64_t index) {
  float v;
  std::memcpy(&v, base + index * 4, 4);
  return v;
}

absl::Status Bad(const std::string& path, const std::string& entry, const std::string& module,
                 const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": Hessian '", entry, "' (for ", module, "): ", what));
}

// Finiteness and symmetry of a full [n, n] matrix, in 64x64 tiles so that the transposed reads
// stay in cache; bands of 64 rows on every hardware thread. The error is the one a sequential
// pass in (band, tile, row, column) order meets first: each band stops at its own first one and
// the lowest band with one wins.
absl::Status CheckFullMatrix(const uint8_t* m, int64_t n, float tolerance, std::string* what) {
  float max_diagonal = 0.0f;
  for (int64_t i = 0; i < n; ++i) max_diagonal = std::max(max_diagonal, LoadFloat(m, i * n + i));
  const float limit = tolerance * max_diagonal;
  constexpr int64_t kTile = 64;
  const int64_t bands = (n + kTile - 1) / kTile;
  std::vector<std::string> band_error(static_cast<size_t>(bands));
  std::atomic<int64_t> first_bad{bands};
  ParallelFor(static_cast<size_t>(bands), [&](size_t band) {
    const int64_t r0 = static_cast<int64_t>(band) * kTile;
    for (int64_t c0 = r0; c0 < n; c0 += kTile) {
      // A lower band already failed: this one's error cannot be the first.
      if (first_bad.load(std::memory_order_relaxed) < static_cast<int64_t>(band)) return;
      for (int64_t r = r0; r < std::min(n, r0 + kTile); ++r) {
        for (int64_t c = c0; c < std::min(n, c0 + kTile); ++c) {
          const float a = LoadFloat(m, r * n + c);
          const float b = LoadFloat(m, c * n + r);
          std::string& error = band_error[band];
          if (!std::isfinite(a) || !std::isfinite(b)) {
            error = absl::StrCat("non-finite value at [", std::isfinite(a) ? c : r, ", ",
                                 std::isfinite(a) ? r : c, "]");
          } else if (std::fabs(a - b) > limit) {
            error = absl::StrCat("not symmetric: H[", r, ", ", c, "] = ", a, " but H[", c, ", ", r,
                                 "] = ", b, " (tolerance ", tolerance, " x max diagonal ",
                                 max_diagonal, ")");
          }
          if (!error.empty()) {
            int64_t seen = first_bad.load();
            while (static_cast<int64_t>(band) < seen &&
                   !first_bad.compare_exchange_weak(seen, static_cast<int64_t>(band))) {
            }
            return;
          }
        }
      }
    }
  });
  if (first_bad.load() == bands) return absl::OkStatus();
  *what = band_error[static_cast<size_t>(first_bad.load())];
  return absl::InvalidArgumentError(*what);
}

// The bytes of `t` read from the file into `to` with pread in pieces on every hardware thread
// (checking the mapping itself would fault every page in, one at a time).
absl::Status ReadTensor(const SafetensorsFile& file, const SafetensorsTensor& t, uint8_t* to) {
  constexpr int64_t kPiece = int64_t{16} << 20;
  const int64_t pieces = (t.num_bytes + kPiece - 1) / kPiece;
  std::vector<absl::Status> read(static_cast<size_t>(pieces));
  ParallelFor(static_cast<size_t>(pieces), [&](size_t k) {
    const int64_t at = static_cast<int64_t>(k) * kPiece;
    read[k] = file.ReadRange(t.data + at, std::min(kPiece, t.num_bytes - at), to + at);
  });
  for (const absl::Status& s : read) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

// Adds the wall time of its scope to *nanos.
class TimeInto {
 public:
  explicit TimeInto(std::atomic<int64_t>* nanos) : nanos_(nanos), start_(absl::Now()) {}
  ~TimeInto() { nanos_->fetch_add(absl::ToInt64Nanoseconds(absl::Now() - start_)); }
  TimeInto(const TimeInto&) = delete;
  TimeInto& operator=(const TimeInto&) = delete;

 private:
  std::atomic<int64_t>* const nanos_;
  const absl::Time start_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<HessianStore>> HessianStore::Open(const std::string& path) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  if (!file.ok()) {
    return absl::Status(file.status().code(),
                        absl::StrCat("--hessians: ", file.status().message()));
  }
  std::unique_ptr<HessianStore> store(new HessianStore());
  store->file_ = *std::move(file);
  return store;
}

absl::StatusOr<std::string> HessianStore::FindEntry(const std::string& module) const {
  const std::string own = module + ".hessian";
  const auto alias = file_->metadata().find(own);
  if (alias != file_->metadata().end() && file_->Find(alias->second) == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(path(), ": __metadata__ alias '", own, "' (for ",
                                                   module, ") names entry '", alias->second,
                                                   "', which the file does not hold"));
  }
  if (file_->Find(own) != nullptr) return own;
  if (alias != file_->metadata().end()) return alias->second;
  const size_t dot = module.rfind('.');
  const std::string parent = dot == std::string::npos ? "" : module.substr(0, dot + 1);
  const std::string leaf = dot == std::string::npos ? module : module.substr(dot + 1);
  for (const std::string& sibling : FusedSiblingLeaves(leaf)) {
    const std::string name = parent + sibling + ".hessian";
    if (file_->Find(name) != nullptr) return name;
  }
  return "";
}

absl::StatusOr<std::optional<float>> HessianStore::InputAmax(const std::string& entry) const {
  const std::string suffix = ".hessian";
  if (!absl::EndsWith(entry, suffix)) return std::optional<float>();
  return ScalarAmax(absl::StrCat(entry.substr(0, entry.size() - suffix.size()), ".input_amax"));
}

absl::StatusOr<std::optional<float>> HessianStore::OutputAmax(const std::string& module) const {
  return ScalarAmax(module + ".output_amax");
}

absl::StatusOr<std::optional<float>> HessianStore::ScalarAmax(const std::string& name) const {
  const SafetensorsTensor* t = file_->Find(name);
  if (t == nullptr) return std::optional<float>();
  if (t->dtype != SafetensorsDType::kF32 || NumElements(t->shape) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(path(), ": ", name, " must be one F32 value (shape [] or [1]), got ",
                     std::string(SafetensorsDTypeName(t->dtype)), " ", ShapeString(t->shape)));
  }
  float amax = 0.0f;
  std::memcpy(&amax, t->data, sizeof(amax));
  if (!(amax >= 0.0f) || !std::isfinite(amax)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path(), ": ", name, " = ", amax, " must be a finite activation amax >= 0"));
  }
  return std::optional<float>(amax);
}

std::vector<float> ExtractDiagonalBlocks(const uint8_t* matrix, int64_t n) {
  const int64_t num_blocks = n / 16;
  std::vector<float> blocks(static_cast<size_t>(num_blocks * 256));
  for (int64_t j = 0; j < num_blocks; ++j) {
    for (int64_t a = 0; a < 16; ++a) {
      std::memcpy(&blocks[static_cast<size_t>(j * 256 + a * 16)],
                  matrix + ((j * 16 + a) * n + j * 16) * 4, 16 * sizeof(float));
    }
  }
  return blocks;
}

absl::StatusOr<const SafetensorsTensor*> HessianStore::FindF32(const std::string& entry,
                                                               const std::string& module) const {
  const SafetensorsTensor* t = file_->Find(entry);
  if (t == nullptr) return Bad(path(), entry, module, "no such entry");
  if (t->dtype != SafetensorsDType::kF32) {
    return Bad(
        path(), entry, module,
        absl::StrCat("dtype ", std::string(SafetensorsDTypeName(t->dtype)), ", expected F32"));
  }
  return t;
}

absl::StatusOr<bool> HessianStore::BlocksFromFull(const std::string& entry,
                                                  const std::string& module, int64_t cols) const {
  absl::StatusOr<const SafetensorsTensor*> found = FindF32(entry, module);
  if (!found.ok()) return found.status();
  const SafetensorsTensor* t = *found;
  const bool full = t->shape.size() == 2 && t->shape[0] == cols && t->shape[1] == cols;
  const bool blocked =
      t->shape.size() == 3 && t->shape[0] * 16 == cols && t->shape[1] == 16 && t->shape[2] == 16;
  if (!full && !blocked) {
    return Bad(path(), entry, module,
               absl::StrCat("shape ", ShapeString(t->shape), " does not match in = ", cols,
                            " (expected [", cols, ", ", cols, "] or [", cols / 16, ", 16, 16])"));
  }
  return full;
}

absl::StatusOr<std::shared_ptr<const std::vector<float>>> HessianStore::ExtractBlocks(
    const SafetensorsTensor& t, bool full, const std::string& entry, const std::string& module,
    int64_t cols, float symmetry_tolerance, const ScratchMemory* scratch) const {
  const TimeInto timed(&read_nanos_);
  std::vector<float> blocks;
  if (full) {
    // A temporary copy: only the blocks are kept.
    const int64_t bytes = std::max<int64_t>(t.num_bytes, 1);
    std::unique_ptr<uint8_t[]> copy =
        scratch != nullptr ? scratch->take(bytes)
                           : std::unique_ptr<uint8_t[]>(new uint8_t[static_cast<size_t>(bytes)]);
    absl::Status checked = ReadTensor(*file_, t, copy.get());
    std::string what;
    if (checked.ok() && !CheckFullMatrix(copy.get(), cols, symmetry_tolerance, &what).ok()) {
      checked = Bad(path(), entry, module, what);
    }
    if (checked.ok()) blocks = ExtractDiagonalBlocks(copy.get(), cols);
    if (scratch != nullptr) scratch->give(std::move(copy), bytes);
    if (!checked.ok()) return checked;
  } else {
    blocks.resize(static_cast<size_t>(cols * 16));
    std::memcpy(blocks.data(), t.data, blocks.size() * sizeof(float));
    for (size_t i = 0; i < blocks.size(); ++i) {
      if (!std::isfinite(blocks[i])) {
        return Bad(path(), entry, module,
                   absl::StrCat("non-finite value in block ", i / 256, " at [", (i % 256) / 16,
                                ", ", i % 16, "]"));
      }
    }
    file_->DropPages(t.data, t.num_bytes);  // copied
  }
  return std::make_shared<const std::vector<float>>(std::move(blocks));
}

absl::StatusOr<std::shared_ptr<const std::vector<float>>> HessianStore::Blocks(
    const std::string& entry, const std::string& module, int64_t cols, float symmetry_tolerance,
    const ScratchMemory* scratch) {
  absl::StatusOr<bool> full = BlocksFromFull(entry, module, cols);
  if (!full.ok()) return full.status();
  std::shared_ptr<Slot<BlocksPtr>> slot;
  {
    absl::MutexLock lock(&mu_);
    std::shared_ptr<Slot<BlocksPtr>>& s = blocks_[entry].slot;
    if (s == nullptr) s = std::make_shared<Slot<BlocksPtr>>();
    slot = s;
  }
  return slot->Get([&] {
    return ExtractBlocks(*file_->Find(entry), *full, entry, module, cols, symmetry_tolerance,
                         scratch);
  });
}

template <typename T>
void HessianStore::ExpectUse(std::map<std::string, Counted<T>>& slots, const std::string& entry) {
  Counted<T>& counted = slots[entry];
  if (counted.slot == nullptr) counted.slot = std::make_shared<Slot<T>>();
  ++counted.uses;
}

template <typename T>
std::shared_ptr<HessianStore::Slot<T>> HessianStore::ReleaseUse(
    std::map<std::string, Counted<T>>& slots, const std::string& entry) {
  const auto it = slots.find(entry);
  if (it == slots.end() || it->second.uses == 0 || --it->second.uses > 0) return nullptr;
  std::shared_ptr<Slot<T>> dropped = std::move(it->second.slot);
  slots.erase(it);
  return dropped;
}

void HessianStore::ExpectBlocks(const std::string& entry) {
  absl::MutexLock lock(&mu_);
  ExpectUse(blocks_, entry);
}

void HessianStore::ReleaseBlocks(const std::string& entry) {
  std::shared_ptr<Slot<BlocksPtr>> dropped;  // freed after mu_ is released
  absl::MutexLock lock(&mu_);
  dropped = ReleaseUse(blocks_, entry);
}

absl::StatusOr<const SafetensorsTensor*> HessianStore::FullEntry(const std::string& entry,
                                                                 const std::string& module,
                                                                 int64_t cols) const {
  absl::StatusOr<const SafetensorsTensor*> found = FindF32(entry, module);
  if (!found.ok()) return found.status();
  const SafetensorsTensor* t = *found;
  if (t->shape.size() == 2 && t->shape[0] == cols && t->shape[1] == cols) return t;
  const bool blocked =
      t->shape.size() == 3 && t->shape[0] * 16 == cols && t->shape[1] == 16 && t->shape[2] == 16;
  return Bad(path(), entry, module,
             blocked
                 ? absl::StrCat("method gptq needs the full [", cols, ", ", cols,
                                "] Hessian, but this entry holds only the diagonal blocks ",
                                ShapeString(t->shape), " (gptq propagates errors across blocks)")
                 : absl::StrCat("shape ", ShapeString(t->shape), " does not match in = ", cols,
                                " (method gptq needs [", cols, ", ", cols, "])"));
}

std::unique_ptr<float[]> MatrixPool::Take(int64_t count) {
  {
    absl::MutexLock lock(&mu_);
    if (std::unique_ptr<float[]> same = kept_.TakeSame(count)) return same;
  }
  return SizedBuffers<float>::New(count);
}

void MatrixPool::Give(std::unique_ptr<float[]> buffer, int64_t count) {
  if (buffer == nullptr) return;
  absl::MutexLock lock(&mu_);
  largest_ = std::max(largest_, count);
  if (kept_.count() + count > kKeptMatrices * largest_) return;  // freed as `buffer` goes
  kept_.Put(std::move(buffer), count);
}

int64_t MatrixPool::kept_bytes() const {
  absl::MutexLock lock(&mu_);
  return kept_.count() * static_cast<int64_t>(sizeof(float));
}

absl::StatusOr<std::shared_ptr<const FullHessian>> HessianStore::ReadFull(
    const SafetensorsTensor& t, const std::string& entry, const std::string& module, int64_t cols,
    float symmetry_tolerance) const {
  const TimeInto timed(&read_nanos_);
  const int64_t count = cols * cols;
  // The buffer goes back to the pool with the matrix's last holder (or with a failed read).
  std::shared_ptr<FullHessian> matrix(new FullHessian(), [pool = pool_, count](FullHessian* m) {
    pool->Give(std::move(m->data), count);
    delete m;
  });
  matrix->data = pool_->Take(count);
  matrix->n = cols;
  uint8_t* bytes = reinterpret_cast<uint8_t*>(matrix->data.get());
  if (absl::Status read = ReadTensor(*file_, t, bytes); !read.ok()) return read;
  std::string what;
  if (!CheckFullMatrix(bytes, cols, symmetry_tolerance, &what).ok()) {
    return Bad(path(), entry, module, what);
  }
  return std::shared_ptr<const FullHessian>(std::move(matrix));
}

absl::Status HessianStore::ExpectFull(const std::string& entry, const std::string& module,
                                      int64_t cols) {
  absl::StatusOr<const SafetensorsTensor*> t = FullEntry(entry, module, cols);
  if (!t.ok()) return t.status();
  absl::MutexLock lock(&mu_);
  ExpectUse(full_, entry);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const FullHessian>> HessianStore::Full(const std::string& entry,
                                                                      const std::string& module,
                                                                      int64_t cols,
                                                                      float symmetry_tolerance) {
  absl::StatusOr<const SafetensorsTensor*> t = FullEntry(entry, module, cols);
  if (!t.ok()) return t.status();
  std::shared_ptr<Slot<FullPtr>> slot;
  {
    absl::MutexLock lock(&mu_);
    const auto it = full_.find(entry);
    if (it != full_.end()) slot = it->second.slot;
  }
  if (slot == nullptr) return ReadFull(**t, entry, module, cols, symmetry_tolerance);
  return slot->Get([&] { return ReadFull(**t, entry, module, cols, symmetry_tolerance); });
}

void HessianStore::ReleaseFull(const std::string& entry) {
  std::shared_ptr<Slot<FullPtr>> dropped;  // freed after mu_ is released
  absl::MutexLock lock(&mu_);
  dropped = ReleaseUse(full_, entry);
}

}  // namespace nvfp4cal
