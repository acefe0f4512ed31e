// ParallelFor: runs body(0) .. body(n - 1) on every hardware thread (at most n threads), each
// index exactly once, and returns when all are done. For independent, similar-sized pieces of
// host work (tensor generation, scans); the order in which indices run is unspecified.
#ifndef NVFP4CAL_CLIENT_PARALLEL_H_
#define NVFP4CAL_CLIENT_PARALLEL_H_

#include <cstddef>
#include <functional>

namespace nvfp4cal {

void ParallelFor(size_t n, const std::function<void(size_t)>& body);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_PARALLEL_H_
