// Codec golden cases written from NUMERICS §1-2, plus brute-force properties.
#include "nvfp4cal/kernels/codecs.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "gtest/gtest.h"
#include "nvfp4cal/kernels/example_data.h"

namespace nvfp4cal {
namespace {

// E4M3 value of a byte from the format definition, in double (independent of DecodeE4M3).
double E4M3ValueFromDefinition(int byte) {
  const int e = (byte >> 3) & 15;
  const int m = byte & 7;
  const double magnitude =
      e == 0 ? m * std::ldexp(1.0, -9) : (1.0 + m / 8.0) * std::ldexp(1.0, e - 7);
  return (byte & 0x80) ? -magnitude : magnitude;
}

float NextUp(float x) { return std::nextafter(x, std::numeric_limits<float>::infinity()); }
float NextDown(float x) { return std::nextafter(x, -std::numeric_limits<float>::infinity()); }

TEST(E2M1, DecodesTheSixteenCodes) {
  const float expected[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  for (int c = 0; c < 16; ++c) {
    EXPECT_EQ(DecodeE2M1(static_cast<uint8_t>(c)), expected[c]) << "code " << c;
  }
  EXPECT_TRUE(std::signbit(DecodeE2M1(8)));
}

TEST(E2M1, EveryThresholdAndTieRoundsHalfToEven) {
  // Ties: 0.25 between 0 and 0.5 -> 0; 0.75 between 0.5 and 1 -> 1 (index 2); 1.25 -> 1;
  // 1.75 -> 2; 2.5 -> 2; 3.5 -> 4; 5 -> 4. Just above / below each tie go to the nearer value.
  struct Case {
    float y;
    uint8_t code;
  };
  const Case cases[] = {
      {0.0f, 0},  {0.25f, 0}, {NextUp(0.25f), 1}, {NextDown(0.75f), 1},
      {0.75f, 2}, {1.25f, 2}, {NextUp(1.25f), 3}, {NextDown(1.75f), 3},
      {1.75f, 4}, {2.5f, 4},  {NextUp(2.5f), 5},  {NextDown(3.5f), 5},
      {3.5f, 6},  {5.0f, 6},  {NextUp(5.0f), 7},  {6.0f, 7},
      {0.5f, 1},  {1.0f, 2},  {1.5f, 3},          {2.0f, 4},
      {3.0f, 5},  {4.0f, 6},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(EncodeE2M1(c.y), c.code) << "y = " << c.y;
    EXPECT_EQ(EncodeE2M1(-c.y), c.y == 0.0f ? 0 : (c.code | 8)) << "y = " << -c.y;
  }
}

TEST(E2M1, SaturatesAtSix) {
  EXPECT_EQ(EncodeE2M1(7.0f), 7);
  EXPECT_EQ(EncodeE2M1(1e30f), 7);
  EXPECT_EQ(EncodeE2M1(std::numeric_limits<float>::infinity()), 7);
  EXPECT_EQ(EncodeE2M1(-1e30f), 15);
  EXPECT_EQ(EncodeE2M1(-std::numeric_limits<float>::infinity()), 15);
}

TEST(E2M1, NegativeValuesThatRoundToZeroGiveMinusZero) {
  EXPECT_EQ(EncodeE2M1(-0.1f), 8);
  EXPECT_EQ(EncodeE2M1(-0.25f), 8);
  EXPECT_EQ(EncodeE2M1(-1e-30f), 8);
  // The sign is (y < 0): negative zero itself is not below zero.
  EXPECT_EQ(EncodeE2M1(-0.0f), 0);
}

TEST(E2M1, RoundToValueMatchesEncodeThenDecode) {
  ExampleRng rng(5);
  for (int i = 0; i < 200000; ++i) {
    const float y = static_cast<float>((rng.Uniform() - 0.5) * 16.0);
    const float via_code = DecodeE2M1(EncodeE2M1(y));
    const float direct = RoundToE2M1Value(y);
    ASSERT_EQ(FloatBits(via_code), FloatBits(direct)) << "y = " << y;
  }
}

// The first fp32 y with |y| in [from, to), either sign, where f(y) and g(y) differ in their
// bits; nullopt when there is none.
template <class F, class G>
std::optional<float> FirstDifference(float from, float to, const F& f, const G& g) {
  for (uint32_t bits = FloatBits(from); bits < FloatBits(to); ++bits) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      const float y = BitsToFloat(bits | sign);
      if (FloatBits(f(y)) != FloatBits(g(y))) return y;
    }
  }
  return std::nullopt;
}

TEST(E2M1, RoundToValueMatchesEncodeThenDecodeOnEveryRelevantFloat) {
  // Every fp32 value with |y| in [2^-4, 16) (all thresholds and saturation), both signs, and the
  // special values.
  const std::optional<float> differ = FirstDifference(
      0.0625f, 16.0f, [](float y) { return RoundToE2M1Value(y); },
      [](float y) { return DecodeE2M1(EncodeE2M1(y)); });
  EXPECT_FALSE(differ.has_value()) << "y = " << *differ;
  for (float y :
       {0.0f, -0.0f, 1e-30f, -1e-30f, 1e30f, -1e30f, std::numeric_limits<float>::infinity(),
        -std::numeric_limits<float>::infinity(), std::nanf(""), 0.0624999f, 16.0f, 1e7f}) {
    EXPECT_EQ(FloatBits(RoundToE2M1Value(y)), FloatBits(DecodeE2M1(EncodeE2M1(y)))) << "y = " << y;
  }
}

TEST(E2M1, RoundingByMagicAdditionMatchesRoundToValueOnEveryFloatThatMatters) {
  // Every fp32 value with |y| in [2^-8, 2^8), both signs: all thresholds, ties, the spacing
  // changes at 2 and 4 and saturation. Outside, both give 0 or 6 (the samples below).
  const std::optional<float> differ = FirstDifference(
      0.00390625f, 256.0f, [](float y) { return RoundToE2M1ValueNotNaN(y); },
      [](float y) { return RoundToE2M1Value(y); });
  EXPECT_FALSE(differ.has_value()) << "y = " << *differ;
  for (float y :
       {0.0f, -0.0f, 1e-45f, -1e-45f, 1e-38f, -1e-30f, 0.0039f, -0.0039f, 256.0f, -300.0f,
        1.6777216e7f, 3.3554436e7f, -1e30f, 3.4e38f, std::numeric_limits<float>::infinity(),
        -std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(FloatBits(RoundToE2M1ValueNotNaN(y)), FloatBits(RoundToE2M1Value(y))) << "y = " << y;
  }
}

TEST(E2M1, EncodeIsTheNearestValueByBruteForce) {
  ExampleRng rng(6);
  const double magnitudes[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  for (int i = 0; i < 200000; ++i) {
    const float y = static_cast<float>((rng.Uniform() - 0.5) * 14.0);
    const double a = std::fabs(static_cast<double>(y));
    int best = 0;
    for (int m = 1; m < 8; ++m) {
      const double dm = std::fabs(a - magnitudes[m]);
      const double db = std::fabs(a - magnitudes[best]);
      if (dm < db || (dm == db && m % 2 == 0)) best = m;
    }
    ASSERT_EQ(EncodeE2M1(y) & 7, best) << "y = " << y;
  }
}

TEST(E2M1, PacksEvenElementInTheLowNibble) {
  EXPECT_EQ(PackE2M1Pair(0x3, 0xA), 0xA3);
  EXPECT_EQ(PackE2M1Pair(0xF, 0x0), 0x0F);
  for (int lo = 0; lo < 16; ++lo) {
    for (int hi = 0; hi < 16; ++hi) {
      const uint8_t b = PackE2M1Pair(static_cast<uint8_t>(lo), static_cast<uint8_t>(hi));
      EXPECT_EQ(UnpackE2M1Low(b), lo);
      EXPECT_EQ(UnpackE2M1High(b), hi);
    }
  }
}

TEST(E4M3, All126PositiveValuesRoundTrip) {
  float previous = 0.0f;
  for (int byte = 1; byte <= 0x7E; ++byte) {
    const float v = DecodeE4M3(static_cast<uint8_t>(byte));
    EXPECT_EQ(static_cast<double>(v), E4M3ValueFromDefinition(byte)) << "byte " << byte;
    EXPECT_GT(v, previous) << "values ascend with the byte";
    EXPECT_EQ(EncodeE4M3(v), byte);
    EXPECT_EQ(EncodeE4M3Scale(v), byte);
    EXPECT_EQ(EncodeE4M3(-v), byte | 0x80);
    EXPECT_EQ(ScaleCandidateValue(byte - 1), v);
    previous = v;
  }
  EXPECT_EQ(DecodeE4M3(0x01), 0.001953125f);  // 2^-9, smallest subnormal
  EXPECT_EQ(DecodeE4M3(0x07), 7 * 0.001953125f);
  EXPECT_EQ(DecodeE4M3(0x08), 0.015625f);  // 2^-6, smallest normal
  EXPECT_EQ(DecodeE4M3(0x38), 1.0f);
  EXPECT_EQ(DecodeE4M3(0x7D), 416.0f);
  EXPECT_EQ(DecodeE4M3(0x7E), 448.0f);
  EXPECT_EQ(DecodeE4M3(0xB8), -1.0f);
  EXPECT_TRUE(std::isnan(DecodeE4M3(0x7F)));
  EXPECT_TRUE(std::isnan(DecodeE4M3(0xFF)));
}

TEST(E4M3, TiesRoundToEven) {
  EXPECT_EQ(EncodeE4M3(1.0625f), 0x38);  // between 1.0 (m=0) and 1.125 (m=1)
  EXPECT_EQ(EncodeE4M3(1.1875f), 0x3A);  // between 1.125 (m=1) and 1.25 (m=2)
  EXPECT_EQ(EncodeE4M3(NextUp(1.0625f)), 0x39);
  EXPECT_EQ(EncodeE4M3(NextDown(1.1875f)), 0x39);
  EXPECT_EQ(EncodeE4M3(432.0f), 0x7E);  // between 416 (m=5) and 448 (m=6)
  EXPECT_EQ(EncodeE4M3(NextDown(432.0f)), 0x7D);
  EXPECT_EQ(EncodeE4M3(15.5f), 0x58);  // between 15 (0x57: e=10, m=7) and 16 (0x58) -> 16
  EXPECT_EQ(DecodeE4M3(0x58), 16.0f);
}

TEST(E4M3, SubnormalsRoundHalfToEven) {
  const float step = 0.001953125f;           // 2^-9
  EXPECT_EQ(EncodeE4M3(0.5f * step), 0x00);  // tie between 0 and 2^-9 -> 0
  EXPECT_EQ(EncodeE4M3(NextUp(0.5f * step)), 0x01);
  EXPECT_EQ(EncodeE4M3(1.5f * step), 0x02);  // tie between 1 and 2 -> 2
  EXPECT_EQ(EncodeE4M3(2.5f * step), 0x02);  // tie between 2 and 3 -> 2
  EXPECT_EQ(EncodeE4M3(3.2f * step), 0x03);
  EXPECT_EQ(EncodeE4M3(7.5f * step), 0x08);  // tie between 7*2^-9 and 2^-6 -> 2^-6 (even)
  EXPECT_EQ(EncodeE4M3(6.5f * step), 0x06);
  EXPECT_EQ(EncodeE4M3(1e-30f), 0x00);
}

TEST(E4M3, SaturatesAndClampsForExport) {
  EXPECT_EQ(EncodeE4M3(448.0f), 0x7E);
  EXPECT_EQ(EncodeE4M3(464.0f), 0x7E);  // would be NaN without saturation
  EXPECT_EQ(EncodeE4M3(1e30f), 0x7E);
  EXPECT_EQ(EncodeE4M3(std::numeric_limits<float>::infinity()), 0x7E);
  EXPECT_EQ(EncodeE4M3(-1000.0f), 0xFE);
  EXPECT_EQ(EncodeE4M3(std::nanf("")), 0x7F);
  // The export clamp: never 0x00.
  EXPECT_EQ(EncodeE4M3Scale(0.0f), 0x01);
  EXPECT_EQ(EncodeE4M3Scale(1e-30f), 0x01);
  EXPECT_EQ(EncodeE4M3Scale(0.0009f), 0x01);
  EXPECT_EQ(EncodeE4M3Scale(1e9f), 0x7E);
  EXPECT_EQ(EncodeE4M3Scale(std::numeric_limits<float>::infinity()), 0x7E);
}

TEST(E4M3, EncodeIsTheNearestValueByBruteForce) {
  ExampleRng rng(7);
  for (int i = 0; i < 100000; ++i) {
    // Log-uniform over the whole range, subnormals included.
    const float v = static_cast<float>(
        std::ldexp(1.0 + rng.Uniform(), -12 + static_cast<int>(rng.Uniform() * 21)));
    if (v > 448.0f) continue;
    int best = 0;
    for (int b = 1; b <= 0x7E; ++b) {
      const double db = std::fabs(v - E4M3ValueFromDefinition(b));
      const double dbest = std::fabs(v - E4M3ValueFromDefinition(best));
      if (db < dbest || (db == dbest && b % 2 == 0)) best = b;
    }
    ASSERT_EQ(EncodeE4M3(v), best) << "v = " << v;
  }
}

TEST(InputDTypes, BFloat16AndFloat16DecodeExactly) {
  EXPECT_EQ(BFloat16ToFloat(0x3F80), 1.0f);
  EXPECT_EQ(BFloat16ToFloat(0xC000), -2.0f);
  EXPECT_EQ(BFloat16ToFloat(0x0001), std::ldexp(1.0f, -133));
  EXPECT_TRUE(std::isinf(BFloat16ToFloat(0x7F80)));
  EXPECT_EQ(Float16ToFloat(0x3C00), 1.0f);
  EXPECT_EQ(Float16ToFloat(0xC000), -2.0f);
  EXPECT_EQ(Float16ToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(Float16ToFloat(0x03FF), 1023 * std::ldexp(1.0f, -24));
  EXPECT_EQ(Float16ToFloat(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(Float16ToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(Float16ToFloat(0xFBFF), -65504.0f);
  EXPECT_TRUE(std::signbit(Float16ToFloat(0x8000)));
  EXPECT_TRUE(std::isinf(Float16ToFloat(0x7C00)));
  EXPECT_TRUE(std::isnan(Float16ToFloat(0x7E00)));
  // Every finite half value survives fp32 -> half -> fp32 through the test helper.
  for (uint32_t h = 0; h < 0x7C00; ++h) {
    const float f = Float16ToFloat(static_cast<uint16_t>(h));
    ASSERT_EQ(FloatToFloat16(f), h) << "half bits " << h;
  }
}

}  // namespace
}  // namespace nvfp4cal
