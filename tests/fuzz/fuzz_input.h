// FuzzInput: reads typed values off a fuzzer's byte string; past the end every read returns
// zeros, so a target never fails on short inputs (libFuzzer's FuzzedDataProvider is clang-only;
// this also builds with gcc for the replay tests).
#ifndef NVFP4CAL_TESTS_FUZZ_FUZZ_INPUT_H_
#define NVFP4CAL_TESTS_FUZZ_FUZZ_INPUT_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

// A property every fuzz target checks: on failure, print it and abort (libFuzzer then keeps the
// input as a crash reproducer).
#define FUZZ_CHECK(cond)                                                             \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                  \
    }                                                                                \
  } while (0)

namespace nvfp4cal::fuzz {

class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  bool empty() const { return pos_ >= size_; }
  size_t remaining() const { return pos_ < size_ ? size_ - pos_ : 0; }

  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  uint32_t U32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(Byte()) << (8 * i);
    return v;
  }
  // A value in [lo, hi] (inclusive).
  int64_t Range(int64_t lo, int64_t hi) {
    const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
    return lo + static_cast<int64_t>(U32() % span);
  }
  bool Bool() { return (Byte() & 1) != 0; }
  float Float() {
    const uint32_t bits = U32();
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  // `n` bytes (zero-padded past the end of the input).
  std::string Bytes(size_t n) {
    std::string out(n, '\0');
    const size_t take = n < remaining() ? n : remaining();
    if (take > 0) std::memcpy(out.data(), data_ + pos_, take);
    pos_ += take;
    return out;
  }
  // Everything not read yet.
  std::string Rest() { return Bytes(remaining()); }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

}  // namespace nvfp4cal::fuzz

#endif  // NVFP4CAL_TESTS_FUZZ_FUZZ_INPUT_H_
