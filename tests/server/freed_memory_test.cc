// KeepFreedMemoryForReuse: after it, blocks of a few MiB come from the heap (no mapping of their
// own) and freed ones stay in the process for the next. Its own binary: the setting is
// process-wide. mallinfo2 is glibc's public count of mapped blocks and of free heap bytes.
#include "common/freed_memory.h"

#include <cstdlib>
#include <vector>

#include "gtest/gtest.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

// A sanitizer's allocator replaces glibc's: neither the setting nor mallinfo2 means anything.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define NVFP4CAL_OWN_ALLOCATOR 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define NVFP4CAL_OWN_ALLOCATOR 1
#endif
#endif

namespace nvfp4cal {
namespace {

TEST(KeepFreedMemoryForReuse, RefusesValuesOutOfRange) {
  EXPECT_FALSE(KeepFreedMemoryForReuse(0));
  EXPECT_FALSE(KeepFreedMemoryForReuse(-1));
  EXPECT_FALSE(KeepFreedMemoryForReuse(kMaxKeptFreedBytes + 1));
}

#if defined(__GLIBC__)
constexpr size_t kBlock = size_t{4} << 20;
constexpr int kBlocks = 16;

std::vector<char*> AllocateTouched() {
  std::vector<char*> blocks;
  for (int i = 0; i < kBlocks; ++i) {
    blocks.push_back(static_cast<char*>(std::malloc(kBlock)));
    for (size_t at = 0; at < kBlock; at += 4096) blocks.back()[at] = 1;
  }
  return blocks;
}

TEST(KeepFreedMemoryForReuse, LargeBlocksComeFromTheHeapAndStayAfterFree) {
#if defined(NVFP4CAL_OWN_ALLOCATOR)
  GTEST_SKIP() << "built with a sanitizer: its allocator is not glibc's";
#endif
  // With glibc's defaults, sixteen 4 MiB blocks allocated together are mapped one by one.
  const size_t mapped_before = mallinfo2().hblks;
  std::vector<char*> blocks = AllocateTouched();
  EXPECT_EQ(mallinfo2().hblks, mapped_before + kBlocks) << "the defaults map such blocks";
  for (char* b : blocks) std::free(b);

  ASSERT_TRUE(KeepFreedMemoryForReuse(int64_t{1} << 30));
  blocks = AllocateTouched();
  EXPECT_EQ(mallinfo2().hblks, mapped_before) << "no block of its own mapping";
  for (char* b : blocks) std::free(b);
  // The 64 MiB freed stay in the heap for the next allocations (the defaults trim the top).
  EXPECT_GE(mallinfo2().fordblks, kBlocks * kBlock);
}
#endif

}  // namespace
}  // namespace nvfp4cal
