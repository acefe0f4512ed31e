// Input element types and the one loader that turns a block of them into fp32.
//
// Kept free of Abseil and the standard library beyond <cstdint> so that CUDA device code can
// include it.
#ifndef NVFP4CAL_KERNELS_DTYPE_H_
#define NVFP4CAL_KERNELS_DTYPE_H_

#include <cstdint>

#include "nvfp4cal/kernels/codecs.h"

namespace nvfp4cal {

// Element type of the input weights.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Bytes per element.
NVFP4_HD int DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Loads `count` consecutive elements starting at element `offset` of `data` as fp32 (exact).
NVFP4_HD void LoadAsFloat(const void* data, DType dtype, int64_t offset, int count, float* out) {
  if (dtype == DType::kFloat32) {
    const float* src = static_cast<const float*>(data) + offset;
    for (int i = 0; i < count; ++i) out[i] = src[i];
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(data) + offset;
    if (dtype == DType::kBFloat16) {
      for (int i = 0; i < count; ++i) out[i] = BFloat16ToFloat(src[i]);
    } else {
      for (int i = 0; i < count; ++i) out[i] = Float16ToFloat(src[i]);
    }
  }
}

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_DTYPE_H_
