#include "common/freed_memory.h"

#include <algorithm>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace nvfp4cal {

bool KeepFreedMemoryForReuse(int64_t keep_bytes) {
  if (keep_bytes < 1 || keep_bytes > kMaxKeptFreedBytes) return false;
#if defined(__GLIBC__)
  // Setting either turns off glibc's moving mmap threshold, so both are set.
  const int mapped_from = static_cast<int>(std::min(keep_bytes, kHeapBlockLimitBytes));
  return mallopt(M_MMAP_THRESHOLD, mapped_from) == 1 &&
         mallopt(M_TRIM_THRESHOLD, static_cast<int>(keep_bytes)) == 1;
#else
  return false;
#endif
}

}  // namespace nvfp4cal
