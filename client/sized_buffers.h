// SizedBuffers: large buffers kept for reuse, keyed by their size. A fresh buffer of hundreds of
// megabytes is fresh pages that the first write faults in one by one (slowly on sandboxed
// kernels); a buffer given back and taken again by the next user of the same size is not.
// The read-ahead's read copies (ReadAhead) and the full Hessians (MatrixPool) keep theirs here,
// each with its own rule for how much to keep. Not thread-safe: the owner locks.
//
//   SizedBuffers<float> kept;
//   std::unique_ptr<float[]> b = kept.TakeSame(n);  // null: none of that size
//   if (b == nullptr) b = SizedBuffers<float>::New(n);
//   kept.Put(std::move(b), n);
#ifndef NVFP4CAL_CLIENT_SIZED_BUFFERS_H_
#define NVFP4CAL_CLIENT_SIZED_BUFFERS_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <utility>

namespace nvfp4cal {

template <typename T>
class SizedBuffers {
 public:
  // A new buffer of `count` elements (at least one).
  static std::unique_ptr<T[]> New(int64_t count) {
    return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(count, 1))]);
  }
  // A kept buffer of exactly `count` elements, or null.
  std::unique_ptr<T[]> TakeSame(int64_t count) {
    const auto same = kept_.find(count);
    if (same == kept_.end()) return nullptr;
    std::unique_ptr<T[]> buffer = std::move(same->second);
    kept_.erase(same);
    count_ -= count;
    return buffer;
  }
  // The largest kept buffer (for the owner to free), or null.
  std::unique_ptr<T[]> TakeLargest() {
    if (kept_.empty()) return nullptr;
    const auto largest = std::prev(kept_.end());
    std::unique_ptr<T[]> buffer = std::move(largest->second);
    count_ -= largest->first;
    kept_.erase(largest);
    return buffer;
  }
  // Keeps `buffer` of `count` elements.
  void Put(std::unique_ptr<T[]> buffer, int64_t count) {
    kept_.emplace(count, std::move(buffer));
    count_ += count;
  }
  bool empty() const { return kept_.empty(); }
  // Elements of the kept buffers.
  int64_t count() const { return count_; }

 private:
  std::multimap<int64_t, std::unique_ptr<T[]>> kept_;
  int64_t count_ = 0;
};

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_SIZED_BUFFERS_H_
