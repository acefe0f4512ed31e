// Method golden cases small enough to check by hand (NUMERICS §3), and block-level properties
// against an independent double-precision brute force.
#include "nvfp4cal/kernels/internal/block_search.h"

#include <array>
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "nvfp4cal/kernels/example_data.h"

namespace nvfp4cal {
namespace {

using Block = std::array<float, kBlockSize>;
using HessianBlock = std::array<float, kBlockSize * kBlockSize>;

constexpr DssGrid kDefaultGrid{1, 10, 0.05f};
// With g = 2688 the global scale s2 is exactly 1, so every dequant scale d is an FP8 value.
constexpr float kUnitScaleAmax = 2688.0f;

HessianBlock Identity() {
  HessianBlock h{};
  for (int i = 0; i < kBlockSize; ++i) h[i * kBlockSize + i] = 1.0f;
  return h;
}

HessianBlock AllOnes() {
  HessianBlock h;
  h.fill(1.0f);
  return h;
}

std::array<uint8_t, kBlockSize> Unpack(const BlockOutcome& out) {
  std::array<uint8_t, kBlockSize> codes;
  for (int i = 0; i < kBlockSize / 2; ++i) {
    codes[2 * i] = UnpackE2M1Low(out.packed[i]);
    codes[2 * i + 1] = UnpackE2M1High(out.packed[i]);
  }
  return codes;
}

TEST(MaxMethod, ExactlyRepresentableBlockHasNoError) {
  // amax 6 with g = 2688: v = ((6 / 6) * 448) / (2688 / 6) = 1 -> byte 0x38, d = 1.
  Block w{};
  w[0] = 6.0f;
  w[1] = 3.0f;
  w[2] = -1.5f;
  w[3] = -0.25f;  // rounds to zero, negative -> "-0" (code 8)
  const BlockOutcome out =
      QuantizeBlock(w.data(), kUnitScaleAmax, 1.0f, nullptr, BlockMethod::kMax, kDefaultGrid);
  EXPECT_EQ(out.scale_byte, 0x38);
  EXPECT_EQ(out.packed[0], 0x57);  // codes 7 (6.0) | 5 (3.0) << 4
  EXPECT_EQ(out.packed[1], 0x8B);  // codes 0xB (-1.5) | 8 (-0) << 4
  for (int i = 2; i < 8; ++i) EXPECT_EQ(out.packed[i], 0x00);
  EXPECT_FLOAT_EQ(out.mse_after, 0.0625f);  // only -0.25 is lost
  EXPECT_EQ(out.mse_before, out.mse_after);
}

TEST(MaxMethod, ScaleRoundsToFp8AndCodesUseTheStoredScale) {
  // amax 5 with g = 2688: v = ((5 / 6) * 448) / 448 = 0.8333 -> E4M3 0.8125 (byte 0x35: e = 6, m =
  // 5). d = 0.8125: 5 / d = 6.15 -> 6 (code 7), 1 / d = 1.23 -> 1 (code 2).
  Block w{};
  w[0] = 5.0f;
  w[1] = 1.0f;
  const BlockOutcome out =
      QuantizeBlock(w.data(), kUnitScaleAmax, 1.0f, nullptr, BlockMethod::kMax, kDefaultGrid);
  EXPECT_EQ(out.scale_byte, 0x35);
  EXPECT_EQ(DecodeE4M3(0x35), 0.8125f);
  EXPECT_EQ(out.packed[0], 0x27);
  // (5 - 4.875)^2 + (1 - 0.8125)^2
  EXPECT_FLOAT_EQ(out.mse_after, 0.125f * 0.125f + 0.1875f * 0.1875f);
}

TEST(Sweeps, AllZeroBlockGetsCodesZeroAndTheSmallestCandidate) {
  const Block w{};
  const HessianBlock h = Identity();
  const BlockOutcome max =
      QuantizeBlock(w.data(), kUnitScaleAmax, 1.0f, h.data(), BlockMethod::kMax, kDefaultGrid);
  // a_b / 6 is replaced by 1: v = 448 / (2688 / 6) = 1.
  EXPECT_EQ(max.scale_byte, 0x38);
  for (BlockMethod m : {BlockMethod::kMse, BlockMethod::kLocalHessian, BlockMethod::kDss}) {
    const BlockOutcome out =
        QuantizeBlock(w.data(), kUnitScaleAmax, 1.0f, h.data(), m, kDefaultGrid);
    EXPECT_EQ(out.scale_byte, 0x01) << "every candidate ties at zero error";
    for (uint8_t b : out.packed) EXPECT_EQ(b, 0);
    EXPECT_EQ(out.mse_after, 0.0f);
    EXPECT_EQ(out.dss_beta_index, 0);
  }
}

TEST(Sweeps, AllZeroTensorNeverDividesByZero) {
  const Block w{};
  for (BlockMethod m :
       {BlockMethod::kMax, BlockMethod::kMse, BlockMethod::kLocalHessian, BlockMethod::kDss}) {
    const HessianBlock h = Identity();
    const BlockOutcome out = QuantizeBlock(w.data(), 0.0f, 0.0f, h.data(), m, kDefaultGrid);
    EXPECT_EQ(out.scale_byte, m == BlockMethod::kMax ? 0x7E : 0x01);
    for (uint8_t b : out.packed) EXPECT_EQ(b, 0);
  }
}

TEST(Sweeps, SaturatedBlockTakesTheLargestScale) {
  // Every element is +-g: only d = 448 * s2 = g / 6 represents them (codes +-6).
  Block w;
  for (int i = 0; i < kBlockSize; ++i) w[i] = (i % 2 ? -1.0f : 1.0f) * kUnitScaleAmax;
  const HessianBlock h = Identity();
  for (BlockMethod m :
       {BlockMethod::kMax, BlockMethod::kMse, BlockMethod::kLocalHessian, BlockMethod::kDss}) {
    const BlockOutcome out =
        QuantizeBlock(w.data(), kUnitScaleAmax, 1.0f, h.data(), m, kDefaultGrid);
    EXPECT_EQ(out.scale_byte, 0x7E);
    for (uint8_t b : out.packed) EXPECT_EQ(b, 0xF7);  // code 7 (+6) low, 15 (-6) high
    EXPECT_EQ(out.mse_after, 0.0f);
  }
}

TEST(LocalHessian, AllZeroHessianBlockPicksTheSmallestCandidate) {
  // Every candidate's objective is 0: byte 0x01 (d = 2^-9) wins and codes saturate.
  Block w{};
  w[0] = 1.0f;
  w[5] = -2.0f;
  const HessianBlock h{};
  const BlockOutcome out = QuantizeBlock(w.data(), kUnitScaleAmax, 1.0f, h.data(),
                                         BlockMethod::kLocalHessian, kDefaultGrid);
  EXPECT_TRUE(out.hessian_all_zero);
  EXPECT_EQ(out.scale_byte, 0x01);
  const auto codes = Unpack(out);
  EXPECT_EQ(codes[0], 7);
  EXPECT_EQ(codes[5], 15);
  EXPECT_EQ(out.hessian_after, 0.0f);
}

TEST(DecoupledScaleSearch, PicksBetaBelowOneAndBeatsLocalHessian) {
  // H = all ones, so e^T H e = (sum of errors)^2: errors of opposite signs cancel.
  // w = (0.5, 1.3, 0, ...), g = 2688 (s2 = 1).
  // local_hessian: byte 0x26 (d = 0.21875) codes (2, 6) -> 0.4375, 1.3125,
  //   errors 0.0625 and -0.0125: objective 0.05^2 = 0.0025 (best of the 126).
  // dss: neighbour byte 0x25 (d = 0.203125) with beta = 0.75 (i = -5): q = 0.15234375,
  //   0.5 / q = 3.28 -> 3 and 1.3 / q = 8.5 -> 6 (saturated); dequant 0.609375, 1.21875,
  //   errors -0.109375 and 0.08125: objective 0.028125^2 = 0.000791. Betas 0.70 and below give
  //   code 4 for 0.5, so i = -5 is the first beta reaching this objective.
  Block w{};
  w[0] = 0.5f;
  w[1] = 1.3f;
  const HessianBlock h = AllOnes();
  const BlockOutcome lh = QuantizeBlock(w.data(), kUnitScaleAmax, 1.0f, h.data(),
                                        BlockMethod::kLocalHessian, kDefaultGrid);
  EXPECT_EQ(lh.scale_byte, 0x26);
  EXPECT_EQ(Unpack(lh)[0], 4);  // magnitude index 4 = 2.0
  EXPECT_EQ(Unpack(lh)[1], 7);
  EXPECT_NEAR(lh.hessian_after, 0.0025f, 1e-6f);

  const BlockOutcome dss =
      QuantizeBlock(w.data(), kUnitScaleAmax, 1.0f, h.data(), BlockMethod::kDss, kDefaultGrid);
  EXPECT_EQ(dss.scale_byte, 0x25);
  EXPECT_EQ(dss.dss_offset, -1);
  EXPECT_EQ(dss.dss_beta_index, -5);
  EXPECT_EQ(Unpack(dss)[0], 5);  // magnitude index 5 = 3.0
  EXPECT_EQ(Unpack(dss)[1], 7);
  EXPECT_NEAR(dss.hessian_after, 0.028125f * 0.028125f, 1e-7f);
  EXPECT_LT(dss.hessian_after, lh.hessian_after);
}

TEST(BlockObjective, HessianWithIdentityEqualsSquaredErrorBitForBit) {
  ExampleRng rng(11);
  const HessianBlock id = Identity();
  for (int t = 0; t < 10000; ++t) {
    float e[kBlockSize];
    for (float& v : e) v = static_cast<float>(rng.Normal());
    ASSERT_EQ(FloatBits(BlockHessianError(id.data(), e)), FloatBits(BlockSquaredError(e)));
  }
}

}  // namespace
}  // namespace nvfp4cal
