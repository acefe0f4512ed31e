// Keeps freed heap memory in the process for reuse instead of returning it to the kernel.
//
//   if (!KeepFreedMemoryForReuse(int64_t{1} << 30)) { ... the C library's defaults stay ... }
//
// A buffer on fresh pages costs a page fault per 4 KiB page the first time it is written. The
// server receives gigabytes as 1 MiB messages into fresh buffers (gRPC's reads, the parsed
// message's bytes), and glibc's defaults hand large freed blocks back to the kernel (blocks of
// more than 128 KiB to 32 MiB are mapped and unmapped one by one; the heap's free top is trimmed
// beyond twice that threshold), so every message faulted its pages in again. With this, blocks
// below 64 MiB come from the heap and up to `keep_bytes` of its free top stays mapped: the next
// message reuses the pages. Process-wide; call it before threads start.
#ifndef NVFP4CAL_COMMON_FREED_MEMORY_H_
#define NVFP4CAL_COMMON_FREED_MEMORY_H_

#include <cstdint>

namespace nvfp4cal {

// Blocks smaller than this come from the heap once KeepFreedMemoryForReuse ran.
inline constexpr int64_t kHeapBlockLimitBytes = int64_t{64} << 20;
// The largest `keep_bytes` (the C library takes an int).
inline constexpr int64_t kMaxKeptFreedBytes = (int64_t{2} << 30) - (int64_t{1} << 20);

// keep_bytes in [1, kMaxKeptFreedBytes]: true once set; false where the C library has no such
// setting (not glibc) or refuses the values, and for keep_bytes out of range.
bool KeepFreedMemoryForReuse(int64_t keep_bytes);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_COMMON_FREED_MEMORY_H_
