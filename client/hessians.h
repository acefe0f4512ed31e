// HessianStore: the user's Hessians file, resolved per module and turned into the diagonal
// 16x16 blocks the kernels need.
//
// The file is safetensors with fp32 `<module>.hessian` entries, either the full matrix
// [in, in] or its diagonal blocks [in/16, 16, 16]. Modules that share an input may share one
// entry. The lookup for module `<parent>.<leaf>` (the first hit wins):
//   1. `<parent>.<leaf>.hessian`;
//   2. an alias in the file's `__metadata__`: key `<parent>.<leaf>.hessian`, value the name of
//      another entry, e.g. {"model.layers.0.mlp.up_proj.hessian":
//      "model.layers.0.mlp.gate_proj.hessian"}. The value must name an entry of the file
//      (aliases do not chain), even where rule 1 applies: an alias that names nothing is an
//      error, never a silent fall-through to rule 3;
//   3. the fused siblings' entries in canonical order: q_proj, k_proj, v_proj; gate_proj,
//      up_proj; w1, w3 (so `<parent>.q_proj.hessian` serves k_proj and v_proj).
//
//   auto store = nvfp4cal::HessianStore::Open("hessians.safetensors");
//   absl::StatusOr<std::string> entry =
//       (*store)->FindEntry("model.layers.0.self_attn.k_proj");  // "" if none
//   absl::StatusOr<std::shared_ptr<const std::vector<float>>> blocks =
//       (*store)->Blocks(*entry, "model.layers.0.self_attn.k_proj", /*cols=*/4096, 1e-4f);
#ifndef NVFP4CAL_CLIENT_HESSIANS_H_
#define NVFP4CAL_CLIENT_HESSIANS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "client/safetensors.h"
#include "client/sized_buffers.h"

namespace nvfp4cal {

// A full [n, n] fp32 Hessian, row-major (method gptq), in a buffer of its store's MatrixPool that
// goes back there with the last holder.
struct FullHessian {
  std::unique_ptr<float[]> data;
  int64_t n = 0;
};

// Where HessianStore::Blocks takes the temporary copy of a full matrix from and gives it back
// to (the pipeline's read-ahead pool, so that the copy is counted and its pages are reused);
// without one it allocates.
struct ScratchMemory {
  std::function<std::unique_ptr<uint8_t[]>(int64_t bytes)> take;
  std::function<void(std::unique_ptr<uint8_t[]>, int64_t bytes)> give;
};

// The memory HessianStore reads full matrices into: a matrix's buffer comes back here when its
// last holder lets it go, and the next read of the same size reuses it (SizedBuffers; on a 2-core
// VM reading an 822 MB matrix took 1.4-2.0 s into a fresh buffer, 0.05 s into a reused one); a
// run's matrices come in a few sizes. Kept buffers hold at most kKeptMatrices times the largest
// size given back (a buffer beyond that is freed), within the read-ahead's 3 groups with their
// Hessians. Thread-safe.
class MatrixPool {
 public:
  static constexpr int64_t kKeptMatrices = 3;
  // A buffer of `count` floats: a kept one of that size, else a new one.
  std::unique_ptr<float[]> Take(int64_t count);
  // `buffer` (of `count` floats) back for reuse, or freed.
  void Give(std::unique_ptr<float[]> buffer, int64_t count);
  // Bytes of the buffers kept now.
  int64_t kept_bytes() const;

 private:
  mutable absl::Mutex mu_;
  SizedBuffers<float> kept_ ABSL_GUARDED_BY(mu_);
  int64_t largest_ ABSL_GUARDED_BY(mu_) = 0;  // floats of the largest buffer given back
};

class HessianStore {
 public:
  // Opens the file (NOT_FOUND / INVALID_ARGUMENT naming it, as SafetensorsFile::Open).
  static absl::StatusOr<std::unique_ptr<HessianStore>> Open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  // Where full matrices are read into (Full's buffers return there with their last holder).
  const MatrixPool& matrix_pool() const { return *pool_; }
  // Wall time spent reading and checking entries' data so far (Blocks' extractions, Full's
  // reads), summed over the reads: reads of different entries that ran at once each count, so
  // the sum may exceed the time they took together. Full matrices (gptq) are most of it.
  double read_seconds() const { return static_cast<double>(read_nanos_.load()) * 1e-9; }
  // The entry that serves `module` under the rule above, or "" when none does.
  // INVALID_ARGUMENT "FILE: __metadata__ alias 'KEY' (for MODULE) names entry 'VALUE', which
  // the file does not hold" for the module's alias naming no entry.
  absl::StatusOr<std::string> FindEntry(const std::string& module) const;

  // The diagonal blocks [cols/16, 16, 16] of `entry` for a module with `cols` inputs, extracted
  // and validated once per entry and then shared (concurrent first callers wait for one
  // extraction; later callers share the blocks or the same error). A full matrix is read with
  // pread on every hardware thread into a temporary copy (from `scratch` when given), checked
  // and cut into its blocks. INVALID_ARGUMENT naming the entry (and the module) for a dtype
  // other than F32, a shape other than [cols, cols] or [cols/16, 16, 16], non-finite values, or
  // (full matrices) |H_ab - H_ba| > symmetry_tolerance * max_c H_cc. Thread-safe.
  absl::StatusOr<std::shared_ptr<const std::vector<float>>> Blocks(
      const std::string& entry, const std::string& module, int64_t cols, float symmetry_tolerance,
      const ScratchMemory* scratch = nullptr);
  // The blocks' lifetime within a run: ExpectBlocks counts one more unit that will use
  // `entry`'s blocks, ReleaseBlocks is called after each such unit; after the last one the store
  // lets its blocks go (holders keep theirs), so that a run holds the blocks of the units in
  // flight, not of the whole model. Blocks of entries never expected stay while the store does.
  void ExpectBlocks(const std::string& entry);
  void ReleaseBlocks(const std::string& entry);
  // Whether Blocks of `entry` reads a full [cols, cols] matrix (gigabytes for a large model: the
  // pipeline runs it beside the quantizer) rather than the block layout (read at once). The
  // header checks of Blocks (dtype, shape) without reading the data.
  absl::StatusOr<bool> BlocksFromFull(const std::string& entry, const std::string& module,
                                      int64_t cols) const;

  // The activation amax recorded for `entry`'s input: the scalar fp32 entry named like it with
  // `.input_amax` instead of `.hessian` (shape [] or [1]); nullopt when the file has none, so
  // it follows the same sharing rule as the Hessian. INVALID_ARGUMENT naming the entry for
  // another dtype or shape, or a value that is negative or not finite.
  absl::StatusOr<std::optional<float>> InputAmax(const std::string& entry) const;

  // The amax recorded for `module`'s output (`<module>.output_amax`, scalar fp32; for k_proj and
  // v_proj the FP8 KV-cache scale is amax / 448); nullopt when the file has none. Same errors
  // as InputAmax.
  absl::StatusOr<std::optional<float>> OutputAmax(const std::string& module) const;

  // Method gptq's full matrices. Checked in two steps, so that the slow one (reading and checking
  // gigabytes) runs beside the quantizer instead of before it:
  //   ExpectFull  at preparation: the header (F32, shape [cols, cols]); counts one more use;
  //   Full        as the unit is read: the matrix read with pread on every hardware thread
  //               into memory the store owns and checked (finite; |H_ab - H_ba| <=
  //               symmetry_tolerance * max_c H_cc), once per entry; later callers share the
  //               copy (concurrent first callers wait for one read) or the same error;
  //   ReleaseFull after each use: after the entry's last expected use the store drops its copy
  //               (holders keep theirs alive), so resident memory follows the units in flight.
  // INVALID_ARGUMENT naming the entry and the module for the diagonal-block layout [cols/16, 16,
  // 16] (gptq propagates errors across blocks and needs the whole matrix) and for everything
  // Blocks rejects; DATA_LOSS when the file is shorter than its header says. Full without
  // expected uses reads a copy that is not kept. Thread-safe.
  absl::Status ExpectFull(const std::string& entry, const std::string& module, int64_t cols);
  absl::StatusOr<std::shared_ptr<const FullHessian>> Full(const std::string& entry,
                                                          const std::string& module, int64_t cols,
                                                          float symmetry_tolerance);
  void ReleaseFull(const std::string& entry);

 private:
  HessianStore() = default;
  // The scalar amax entry `name`, nullopt when absent (InputAmax's rules).
  absl::StatusOr<std::optional<float>> ScalarAmax(const std::string& name) const;
  // The entry `entry` (for `module`, in messages), which must exist and be F32.
  absl::StatusOr<const SafetensorsTensor*> FindF32(const std::string& entry,
                                                   const std::string& module) const;

  std::unique_ptr<SafetensorsFile> file_;
  absl::Mutex mu_;
  // A value of one entry (its blocks, its full matrix) made once under the slot's own lock:
  // concurrent first callers wait for it, later ones share it or its error.
  template <typename T>
  struct Slot {
    absl::Mutex mu;
    bool done ABSL_GUARDED_BY(mu) = false;
    absl::StatusOr<T> value ABSL_GUARDED_BY(mu);
    absl::StatusOr<T> Get(const std::function<absl::StatusOr<T>()>& make) {
      absl::MutexLock lock(&mu);
      if (!done) {
        value = make();
        done = true;
      }
      return value;
    }
  };
  // A slot and the uses expected of it (Expect... minus Release...).
  template <typename T>
  struct Counted {
    int uses = 0;
    std::shared_ptr<Slot<T>> slot;
  };
  using BlocksPtr = std::shared_ptr<const std::vector<float>>;
  using FullPtr = std::shared_ptr<const FullHessian>;
  // One more expected use of `entry` (its slot made if new). The caller holds mu_.
  template <typename T>
  static void ExpectUse(std::map<std::string, Counted<T>>& slots, const std::string& entry);
  // One expected use fewer; after the last one the entry leaves `slots` and its slot is returned
  // (for the caller to free after mu_ is released). Entries never expected stay. The caller
  // holds mu_.
  template <typename T>
  static std::shared_ptr<Slot<T>> ReleaseUse(std::map<std::string, Counted<T>>& slots,
                                             const std::string& entry);
  std::map<std::string, Counted<BlocksPtr>> blocks_ ABSL_GUARDED_BY(mu_);
  // Reads and checks `t` (BlocksFromFull's header checks passed) and extracts its blocks.
  absl::StatusOr<std::shared_ptr<const std::vector<float>>> ExtractBlocks(
      const SafetensorsTensor& t, bool full, const std::string& entry, const std::string& module,
      int64_t cols, float symmetry_tolerance, const ScratchMemory* scratch) const;
  // The header checks that ExpectFull and Full share; the entry's tensor.
  absl::StatusOr<const SafetensorsTensor*> FullEntry(const std::string& entry,
                                                     const std::string& module, int64_t cols) const;
  // Reads and checks the matrix (no caching).
  absl::StatusOr<std::shared_ptr<const FullHessian>> ReadFull(const SafetensorsTensor& t,
                                                              const std::string& entry,
                                                              const std::string& module,
                                                              int64_t cols,
                                                              float symmetry_tolerance) const;
  // Full matrices with expected uses: read and checked once, kept until the uses are released.
  std::map<std::string, Counted<FullPtr>> full_ ABSL_GUARDED_BY(mu_);

  // Buffers of the full matrices (shared with the matrices' deleters).
  std::shared_ptr<MatrixPool> pool_ = std::make_shared<MatrixPool>();
  // read_seconds(), in nanoseconds.
  mutable std::atomic<int64_t> read_nanos_{0};
};

// Extracts the diagonal 16x16 blocks of a row-major [n, n] fp32 matrix (n % 16 == 0) read from
// possibly unaligned memory.
std::vector<float> ExtractDiagonalBlocks(const uint8_t* matrix, int64_t n);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_HESSIANS_H_
