// NVFP4 codecs: E2M1 (FP4) and E4M3 (FP8) rounding, input dtype conversion, nibble packing.
//
// The single definition of every rounding rule in nvfp4cal (docs/numerics.md, NUMERICS §1-2).
// Every function is an inline `__host__ __device__` function so that the CPU reference and the
// CUDA kernels compile the very same code and agree bit for bit.
//
//   float y = w / q;                          // a true fp32 division
//   uint8_t code = nvfp4cal::EncodeE2M1(y);   // 0..15, bit 3 = sign, 8 = "-0"
//   float back = nvfp4cal::DecodeE2M1(code);  // one of +-{0, .5, 1, 1.5, 2, 3, 4, 6}
//   uint8_t sf8 = nvfp4cal::EncodeE4M3Scale(v);  // clamped to [2^-9, 448], ties to even
//
// Floating-point contraction matters: `w - c * d` fused into one FMA rounds differently from a
// product followed by a subtraction. Products whose result feeds an addition go through
// MulNoContract(), and host code is compiled with -ffp-contract=off.
#ifndef NVFP4CAL_KERNELS_CODECS_H_
#define NVFP4CAL_KERNELS_CODECS_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NVFP4_HD __host__ __device__ __forceinline__
#define NVFP4_HD_FLATTEN __host__ __device__ __forceinline__
#else
#define NVFP4_HD inline
// For the frames that the CPU backend instantiates with its vector searches: they must be
// inlined into the caller, which is compiled once per instruction set (target_clones).
#define NVFP4_HD_FLATTEN inline __attribute__((always_inline))
#endif

namespace nvfp4cal {

// Number of elements sharing one FP8 scale.
inline constexpr int kBlockSize = 16;
// Largest E2M1 magnitude and largest finite E4M3 value; 2688 = 6 * 448 maps g to the FP8 range.
inline constexpr float kE2M1Max = 6.0f;
inline constexpr float kE4M3Max = 448.0f;
inline constexpr float kGlobalScaleDivisor = 2688.0f;
// Smallest positive E4M3 value (subnormal 2^-9); scale bytes written to a checkpoint never go
// below it.
inline constexpr float kE4M3MinSubnormal = 0.001953125f;
// E4M3 bytes 0x01..0x7E are the 126 positive finite values, ascending with the byte.
inline constexpr int kNumScaleCandidates = 126;
inline constexpr uint8_t kE4M3MaxByte = 0x7E;
inline constexpr uint8_t kE4M3NaNByte = 0x7F;

NVFP4_HD uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

NVFP4_HD float BitsToFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// a * b rounded once, never fused with a following addition (CUDA contracts by default).
NVFP4_HD float MulNoContract(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// a * b + c rounded once (IEEE fusedMultiplyAdd) on host and device alike.
NVFP4_HD float FusedMulAdd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// a + b rounded once, never fused with a preceding product.
NVFP4_HD float AddNoContract(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// ---------------------------------------------------------------------------------------------
// Input dtypes
// ---------------------------------------------------------------------------------------------

// bfloat16 bits -> fp32 (exact).
NVFP4_HD float BFloat16ToFloat(uint16_t h) { return BitsToFloat(static_cast<uint32_t>(h) << 16); }

// IEEE binary16 bits -> fp32 (exact, subnormals, Inf and NaN included).
NVFP4_HD float Float16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0) {
    // Subnormal: mantissa * 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return BitsToFloat(FloatBits(magnitude) | sign);
  }
  if (exponent == 31) return BitsToFloat(sign | 0x7F800000u | (mantissa << 13));
  return BitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// fp32 -> bfloat16 bits, round to nearest even (finite inputs).
NVFP4_HD uint16_t FloatToBFloat16(float value) {
  uint32_t bits = FloatBits(value);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// fp32 -> IEEE binary16 bits, round to nearest even (finite inputs; beyond 65520 -> Inf).
inline uint16_t FloatToFloat16(float value) {
  const uint32_t bits = FloatBits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const float a = std::fabs(value);
  if (a >= 65520.0f) return sign | 0x7C00u;  // rounds to Inf
  if (a < 6.103515625e-05f) {
    // Subnormal half: multiples of 2^-24; rintf rounds half to even.
    return sign | static_cast<uint16_t>(rintf(a * 16777216.0f));
  }
  uint32_t m = FloatBits(a);
  m += 0xFFFu + ((m >> 13) & 1u);
  return sign | static_cast<uint16_t>((m >> 13) - ((127u - 15u) << 10));
}

// ---------------------------------------------------------------------------------------------
// E2M1 (FP4): magnitude index 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign.
// ---------------------------------------------------------------------------------------------

// Magnitude index of |y| rounded to E2M1, half to even, saturating at 6. The thresholds
// alternate between <= and < so that ties go to the even index. NaN gives 0 (the callers
// reject NaN weights; a zero quantization scale can still produce 0/0 inside a sweep).
NVFP4_HD int E2M1MagnitudeIndex(float a) {
  return static_cast<int>(a > 0.25f) + static_cast<int>(a >= 0.75f) + static_cast<int>(a > 1.25f) +
         static_cast<int>(a >= 1.75f) + static_cast<int>(a > 2.5f) + static_cast<int>(a >= 3.5f) +
         static_cast<int>(a > 5.0f);
}

// Value of an E2M1 magnitude index (0..7).
NVFP4_HD float E2M1MagnitudeValue(int index) {
  return index <= 4 ? 0.5f * static_cast<float>(index)
                    : (index == 5 ? 3.0f : (index == 6 ? 4.0f : 6.0f));
}

// fp32 -> E2M1 code. The sign comes from y before rounding: a negative y that rounds to zero
// gives code 8 ("-0").
NVFP4_HD uint8_t EncodeE2M1(float y) {
  const uint8_t sign = y < 0.0f ? 8 : 0;
  return static_cast<uint8_t>(sign | E2M1MagnitudeIndex(std::fabs(y)));
}

// E2M1 code (low nibble) -> fp32. Code 8 decodes to -0.0f.
NVFP4_HD float DecodeE2M1(uint8_t code) {
  const float magnitude = E2M1MagnitudeValue(code & 7);
  return (code & 8) ? -magnitude : magnitude;
}

// DecodeE2M1(EncodeE2M1(y)) without building the code: what the searches use per candidate.
// Round half to even onto the E2M1 grid, whose spacing is 0.5 below 2, 1 up to 4 and 2 above:
// scale by the inverse spacing (exact), rintf (ties to even), scale back, saturate at 6. About
// half the instructions of the threshold comparisons on a GPU; the tests check it against
// encode-then-decode bit for bit over every fp32 value that matters. A NaN quotient (0 / 0)
// gives 0, as EncodeE2M1 does.
NVFP4_HD float RoundToE2M1Value(float y) {
  const float a = std::fabs(y);
  const float spacing_inverse = a < 2.0f ? 2.0f : (a < 4.0f ? 1.0f : 0.5f);
  const float spacing = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
  float magnitude = MulNoContract(rintf(MulNoContract(a, spacing_inverse)), spacing);
  // Saturate at 6 (Inf included); comparisons rather than fminf, which compilers may not inline.
  magnitude = magnitude < 6.0f ? magnitude : 6.0f;
  magnitude = a == a ? magnitude : 0.0f;
  // A negative y that rounds to zero gives -0, as code 8 decodes.
  return y < 0.0f ? -magnitude : magnitude;
}

// RoundToE2M1Value for every y that is not NaN, in fewer instructions (the CUDA searches use it
// on quotients, which are never NaN): adding 2^22, 2^23 or 2^24 rounds |y| to the grid spacing
// 0.5, 1 or 2 (the ulp there), ties to even as rintf does, and subtracting it again is exact.
// The tests compare it with RoundToE2M1Value over every fp32 value in [2^-8, 2^8) and both
// signs; below, both give 0 (|y| + 2^22 rounds to 2^22), above, both saturate at 6.
NVFP4_HD float RoundToE2M1ValueNotNaN(float y) {
  const float a = std::fabs(y);
  const float magic = a < 2.0f ? 4194304.0f : (a < 4.0f ? 8388608.0f : 16777216.0f);
  float magnitude = AddNoContract(AddNoContract(a, magic), -magic);
  magnitude = magnitude < 6.0f ? magnitude : 6.0f;
  return y < 0.0f ? -magnitude : magnitude;
}

// Two codes per byte, even element in the low nibble.
NVFP4_HD uint8_t PackE2M1Pair(uint8_t even, uint8_t odd) {
  return static_cast<uint8_t>((even & 0xF) | ((odd & 0xF) << 4));
}
NVFP4_HD uint8_t UnpackE2M1Low(uint8_t byte) { return byte & 0xF; }
NVFP4_HD uint8_t UnpackE2M1High(uint8_t byte) { return byte >> 4; }

// ---------------------------------------------------------------------------------------------
// E4M3 ("fn": bias 7, no infinities, 0x7F/0xFF NaN, max 448, smallest subnormal 2^-9)
// ---------------------------------------------------------------------------------------------

// fp32 -> E4M3 byte, round to nearest even (subnormals included), saturating at +-448.
// NaN gives 0x7F. No lower clamp: values below 2^-10 round to zero.
NVFP4_HD uint8_t EncodeE4M3(float v) {
  if (v != v) return kE4M3NaNByte;
  const uint8_t sign = (FloatBits(v) >> 31) ? 0x80 : 0x00;
  const float a = std::fabs(v);
  if (a >= kE4M3Max) return sign | kE4M3MaxByte;
  if (a < 0.015625f) {
    // Subnormal range: multiples of 2^-9. a * 512 is exact and rintf rounds half to even; the
    // result 0..8 is the byte itself (8 = 0x08 = 2^-6, the smallest normal).
    return sign | static_cast<uint8_t>(rintf(a * 512.0f));
  }
  // Normal range: drop 20 of fp32's 23 mantissa bits with round-half-to-even; a carry into the
  // exponent is the correct result. Rebias the exponent from 127 to 7.
  uint32_t bits = FloatBits(a);
  bits += 0x7FFFFu + ((bits >> 20) & 1u);
  const uint32_t byte = (bits >> 20) - ((127u - 7u) << 3);
  return sign | static_cast<uint8_t>(byte > kE4M3MaxByte ? kE4M3MaxByte : byte);
}

// Scale-byte rounding as written to checkpoints: clamp to [2^-9, 448], then EncodeE4M3. Never
// returns 0x00. A NaN input is taken as the lower clamp.
NVFP4_HD uint8_t EncodeE4M3Scale(float v) {
  const float lower = v > kE4M3MinSubnormal ? v : kE4M3MinSubnormal;  // NaN -> 2^-9
  return EncodeE4M3(lower < kE4M3Max ? lower : kE4M3Max);
}

// E4M3 byte -> fp32 (exact).
NVFP4_HD float DecodeE4M3(uint8_t byte) {
  const uint32_t exponent = (byte >> 3) & 0xFu;
  const uint32_t mantissa = byte & 7u;
  if (exponent == 15 && mantissa == 7) return BitsToFloat(0x7FC00000u);
  const float magnitude = exponent == 0 ? static_cast<float>(mantissa) * kE4M3MinSubnormal
                                        : BitsToFloat(((exponent + 120u) << 23) | (mantissa << 20));
  return (byte & 0x80) ? -magnitude : magnitude;
}

// Value of scale candidate k (0..125), i.e. E4M3 byte k + 1.
NVFP4_HD float ScaleCandidateValue(int k) { return DecodeE4M3(static_cast<uint8_t>(k + 1)); }

}  // namespace nvfp4cal

#endif  // NVFP4CAL_KERNELS_CODECS_H_
