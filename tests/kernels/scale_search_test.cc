// ScaleSearch (CPU backend): validation, properties on random blocks against an independent
// double-precision brute force, determinism, row ranges and dtypes.
#include "nvfp4cal/kernels/scale_search.h"

#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/event_search.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"

namespace nvfp4cal {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// Random blocks with the hard cases of NUMERICS §7.
// ---------------------------------------------------------------------------------------------

struct RandomBlock {
  std::array<float, kBlockSize> w;
  std::array<float, kBlockSize * kBlockSize> h;
  float g;
};

enum class BlockKind {
  kTypical,
  kSaturated,
  kZero,
  kSubnormalScale,
  kTinyG,
  kHugeG,
  kIllConditioned
};
constexpr BlockKind kAllKinds[] = {BlockKind::kTypical,       BlockKind::kSaturated,
                                   BlockKind::kZero,          BlockKind::kSubnormalScale,
                                   BlockKind::kTinyG,         BlockKind::kHugeG,
                                   BlockKind::kIllConditioned};

RandomBlock MakeRandomBlock(ExampleRng& rng, BlockKind kind, uint64_t seed) {
  RandomBlock b;
  double scale = 1.0;
  if (kind == BlockKind::kTinyG) scale = 1e-30;
  if (kind == BlockKind::kHugeG) scale = 1e30;
  float amax = 0.0f;
  for (float& v : b.w) {
    // bf16-rounded like real checkpoints, so w / q hits E2M1 boundaries often.
    v = kind == BlockKind::kZero
            ? 0.0f
            : BFloat16ToFloat(FloatToBFloat16(static_cast<float>(rng.Normal() * scale)));
    amax = std::fmax(amax, std::fabs(v));
  }
  b.g = amax;
  if (kind == BlockKind::kTypical || kind == BlockKind::kIllConditioned) {
    b.g = amax * static_cast<float>(1.0 + 4.0 * rng.Uniform());
  } else if (kind == BlockKind::kSubnormalScale) {
    b.g = amax * 3000.0f;  // block scale ~ 448 / 3000 * 6 / 6: FP8 subnormal range
  } else if (kind == BlockKind::kZero) {
    b.g = 1.0f;
  } else if (kind == BlockKind::kSaturated) {
    for (int i = 0; i < 4; ++i)
      b.w[static_cast<size_t>(rng.NextU64() % kBlockSize)] = (i % 2 ? -amax : amax);
  }
  const std::vector<float> h =
      MakeExampleHessianBlocks(1, seed, kind == BlockKind::kIllConditioned ? 30.0f : 1.0f);
  std::copy(h.begin(), h.end(), b.h.begin());
  return b;
}

// Objective of (q, d) in double, with codes chosen by brute force (nearest magnitude, ties to
// the even index) from the fp32 quotient w / q. Independent of block_search.h.
struct ReferenceObjective {
  double value;
  double fp32_error_bound;  // how far an fp32 evaluation may be from `value`
};

ReferenceObjective Reference(const RandomBlock& b, float q, float d, bool hessian) {
  static const double kMagnitudes[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  double e[kBlockSize];
  for (int i = 0; i < kBlockSize; ++i) {
    const float y = b.w[i] / q;
    const double a = std::fabs(static_cast<double>(y));
    int best = 0;
    for (int m = 1; m < 8; ++m) {
      const double dm = std::fabs(a - kMagnitudes[m]);
      const double dbest = std::fabs(a - kMagnitudes[best]);
      if (dm < dbest || (dm == dbest && m % 2 == 0)) best = m;
    }
    const double c = (y < 0.0f ? -1.0 : 1.0) * kMagnitudes[best];
    e[i] = static_cast<double>(b.w[i]) - c * static_cast<double>(d);
  }
  double value = 0.0;
  double magnitude = 0.0;
  for (int i = 0; i < kBlockSize; ++i) {
    for (int j = 0; j < kBlockSize; ++j) {
      const double hij = hessian ? b.h[i * kBlockSize + j] : (i == j ? 1.0 : 0.0);
      value += e[i] * hij * e[j];
      magnitude += std::fabs(e[i] * hij * e[j]);
    }
  }
  // fp32 products and sums of 16-term dot products: a generous 64 ulps of the magnitude, plus
  // the rounding of w_hat = c * d (one ulp of each |e| contribution).
  return {value, magnitude * 64.0 * std::ldexp(1.0, -24)};
}

bool IsNearTie(const ReferenceObjective& a, const ReferenceObjective& b) {
  return std::fabs(a.value - b.value) <= 1e-6 * std::fmax(std::fabs(a.value), std::fabs(b.value)) +
                                             a.fp32_error_bound + b.fp32_error_bound;
}

// ---------------------------------------------------------------------------------------------
// Properties of the searches.
// ---------------------------------------------------------------------------------------------

TEST(LocalHessianSweep, ChoiceIsTheExhaustiveDoublePrecisionArgmin) {
  ExampleRng rng(21);
  int near_ties = 0;
  int blocks = 0;
  for (BlockKind kind : kAllKinds) {
    for (int t = 0; t < 700; ++t, ++blocks) {
      const RandomBlock b = MakeRandomBlock(rng, kind, 1000 + static_cast<uint64_t>(blocks));
      const float s2 = GlobalScaleFromAmax(b.g);
      for (bool hessian : {true, false}) {
        ScaledBlock scaled;
        PrepareScaledBlock(b.w.data(), b.g, s2, &scaled);
        const SweepChoice got = SweepScaleCandidates(scaled, hessian ? b.h.data() : nullptr);
        int best = 0;
        ReferenceObjective best_ref{0, 0};
        for (int k = 0; k < kNumScaleCandidates; ++k) {
          const float d = ScaleCandidateValue(k) * s2;
          const ReferenceObjective r = Reference(b, d, d, hessian);
          if (k == 0 || r.value < best_ref.value) {
            best = k;
            best_ref = r;
          }
        }
        if (got.candidate != best) {
          const float d = ScaleCandidateValue(got.candidate) * s2;
          const ReferenceObjective got_ref = Reference(b, d, d, hessian);
          ASSERT_TRUE(IsNearTie(got_ref, best_ref))
              << "kind " << static_cast<int>(kind) << " block " << t << ": got k=" << got.candidate
              << " (" << got_ref.value << "), exhaustive argmin k=" << best << " ("
              << best_ref.value << ")";
          ++near_ties;
        }
      }
    }
  }
  std::printf(
      "[ near ties ] %d of %d sweeps chose a different candidate within the near-tie rule\n",
      near_ties, 2 * blocks);
  EXPECT_LT(near_ties, blocks / 20);
}

TEST(DecoupledScaleSearch, NeverWorseThanLocalHessianSweep) {
  ExampleRng rng(22);
  const DssGrid grid{1, 10, 0.05f};
  int improved = 0;
  int blocks = 0;
  for (BlockKind kind : kAllKinds) {
    for (int t = 0; t < 500; ++t, ++blocks) {
      const RandomBlock b = MakeRandomBlock(rng, kind, 5000 + static_cast<uint64_t>(blocks));
      const float s2 = GlobalScaleFromAmax(b.g);
      const BlockOutcome lh =
          QuantizeBlock(b.w.data(), b.g, s2, b.h.data(), BlockMethod::kLocalHessian, grid);
      const BlockOutcome dss =
          QuantizeBlock(b.w.data(), b.g, s2, b.h.data(), BlockMethod::kDss, grid);
      ASSERT_LE(dss.hessian_after, lh.hessian_after) << "kind " << static_cast<int>(kind);
      improved += dss.hessian_after < lh.hessian_after;
      if (!(dss.hessian_after < lh.hessian_after)) {
        // Only a strict improvement replaces the start: otherwise the sweep's codes stay.
        ASSERT_EQ(dss.scale_byte, lh.scale_byte);
        ASSERT_EQ(std::memcmp(dss.packed, lh.packed, sizeof(lh.packed)), 0);
      }
    }
  }
  EXPECT_GT(improved, blocks / 10) << "dss should improve a good share of random blocks";
}

TEST(DecoupledScaleSearch, WithBetaFixedToOneDiffersOnlyWhereQRoundsDifferently) {
  // With beta = 1 the only freedom left is q = ((g * (f / 448)) / 6) versus d = f * (g / 2688):
  // equal in exact arithmetic. A different choice is possible only when that one-ulp difference
  // changes a code, i.e. the chosen codes differ from e2m1(w / d).
  ExampleRng rng(23);
  const DssGrid beta_one{1, 0, 0.05f};
  int differ = 0;
  int blocks = 0;
  for (BlockKind kind : kAllKinds) {
    for (int t = 0; t < 500; ++t, ++blocks) {
      const RandomBlock b = MakeRandomBlock(rng, kind, 9000 + static_cast<uint64_t>(blocks));
      const float s2 = GlobalScaleFromAmax(b.g);
      const BlockOutcome lh =
          QuantizeBlock(b.w.data(), b.g, s2, b.h.data(), BlockMethod::kLocalHessian, beta_one);
      const BlockOutcome dss =
          QuantizeBlock(b.w.data(), b.g, s2, b.h.data(), BlockMethod::kDss, beta_one);
      if (dss.scale_byte == lh.scale_byte &&
          std::memcmp(dss.packed, lh.packed, sizeof(lh.packed)) == 0) {
        continue;
      }
      ++differ;
      const float d = DequantScale(dss.scale_byte, s2);
      bool codes_differ_from_d = false;
      for (int i = 0; i < kBlockSize; ++i) {
        const uint8_t code =
            i % 2 ? UnpackE2M1High(dss.packed[i / 2]) : UnpackE2M1Low(dss.packed[i / 2]);
        codes_differ_from_d = codes_differ_from_d || code != EncodeE2M1(b.w[i] / d);
      }
      ASSERT_TRUE(codes_differ_from_d) << "dss(beta = 1) beat the sweep with the sweep's own codes";
    }
  }
  EXPECT_LT(differ, blocks / 20);
}

TEST(DecoupledScaleSearch, GainsNothingUnderThePlainMseObjective) {
  // For a fixed dequant scale d the nearest codes e2m1(w / d) minimise the squared error, and
  // every d DSS tries is one of the sweep's candidates: decoupling cannot help beyond fp32 noise.
  ExampleRng rng(24);
  const DssGrid grid{1, 10, 0.05f};
  std::array<float, kBlockSize * kBlockSize> identity{};
  for (int i = 0; i < kBlockSize; ++i) identity[i * kBlockSize + i] = 1.0f;
  int strict_gains = 0;
  int blocks = 0;
  for (BlockKind kind : kAllKinds) {
    for (int t = 0; t < 500; ++t, ++blocks) {
      const RandomBlock b = MakeRandomBlock(rng, kind, 13000 + static_cast<uint64_t>(blocks));
      const float s2 = GlobalScaleFromAmax(b.g);
      const BlockOutcome mse = QuantizeBlock(b.w.data(), b.g, s2, nullptr, BlockMethod::kMse, grid);
      const BlockOutcome dss =
          QuantizeBlock(b.w.data(), b.g, s2, identity.data(), BlockMethod::kDss, grid);
      ASSERT_GE(dss.mse_after, mse.mse_after * (1.0f - 1e-5f)) << "kind " << static_cast<int>(kind);
      strict_gains += dss.mse_after < mse.mse_after;
    }
  }
  std::printf("[ mse dss   ] strict fp32-noise gains on %d of %d blocks\n", strict_gains, blocks);
  EXPECT_LT(strict_gains, blocks / 100);
}

TEST(CandidatePruning, ChoosesExactlyWhatTheFullSearchChooses) {
  ExampleRng rng(26);
  const DssGrid grid{1, 10, 0.05f};
  const HessianBlockBounds identity = IdentityBounds();
  int64_t pruned_blocks = 0;
  for (int t = 0; t < 7000; ++t) {
    RandomBlock b = MakeRandomBlock(rng, kAllKinds[t % 7], 30000 + static_cast<uint64_t>(t));
    if (t % 50 == 0) {
      // Singular (rank one) Hessians: the bound must switch itself off.
      for (int i = 0; i < 256; ++i) b.h[i] = 1.0f;
    }
    const float s2 = GlobalScaleFromAmax(b.g);
    const HessianBlockBounds bounds = ComputeHessianBlockBounds(b.h.data());
    pruned_blocks += bounds.precision[0] > 0.0f;
    for (BlockMethod m : {BlockMethod::kMse, BlockMethod::kLocalHessian, BlockMethod::kDss}) {
      const BlockOutcome full = QuantizeBlock(b.w.data(), b.g, s2, b.h.data(), m, grid);
      const BlockOutcome pruned =
          QuantizeBlock(b.w.data(), b.g, s2, b.h.data(), m, grid, &bounds, &identity);
      ASSERT_EQ(full.scale_byte, pruned.scale_byte) << "block " << t;
      ASSERT_EQ(std::memcmp(full.packed, pruned.packed, 8), 0) << "block " << t;
      ASSERT_EQ(full.dss_beta_index, pruned.dss_beta_index);
      ASSERT_EQ(FloatBits(full.hessian_after), FloatBits(pruned.hessian_after));
    }
  }
  EXPECT_GT(pruned_blocks, 6000) << "most random Hessians are positive definite";
}

TEST(EventSearch, ChoosesExactlyWhatTheFullSearchChooses) {
  // The event-driven searches (used by the CUDA kernels) against the full canonical searches,
  // on every hard kind of block plus singular and all-zero Hessians, with default and wide DSS
  // grids.
  ExampleRng rng(27);
  const DssGrid grids[] = {{1, 10, 0.05f}, {3, 100, 0.005f}, {0, 1, 0.5f}};
  int64_t compared = 0;
  for (int t = 0; t < 6000; ++t) {
    RandomBlock b = MakeRandomBlock(rng, kAllKinds[t % 7], 40000 + static_cast<uint64_t>(t));
    if (t % 50 == 0) std::fill(b.h.begin(), b.h.end(), 1.0f);  // rank one
    if (t % 70 == 0) std::fill(b.h.begin(), b.h.end(), 0.0f);  // all zero: everything ties
    const float s2 = GlobalScaleFromAmax(b.g);
    SymmetricHessian sym;
    MakeSymmetricHessian(b.h.data(), &sym);
    const DssGrid grid = grids[t % 3 == 0 && t % 9 != 0 ? 1 : (t % 9 == 0 ? 2 : 0)];
    for (BlockMethod m : {BlockMethod::kMse, BlockMethod::kLocalHessian, BlockMethod::kDss}) {
      const BlockOutcome full = QuantizeBlock(b.w.data(), b.g, s2, b.h.data(), m, grid);
      const BlockOutcome events =
          QuantizeBlockEvents(b.w.data(), b.g, s2, b.h.data(), &sym, m, grid);
      ASSERT_EQ(full.scale_byte, events.scale_byte)
          << "block " << t << " kind " << t % 7 << " method " << static_cast<int>(m);
      ASSERT_EQ(std::memcmp(full.packed, events.packed, 8), 0) << "block " << t;
      ASSERT_EQ(full.dss_beta_index, events.dss_beta_index) << "block " << t;
      ASSERT_EQ(full.dss_offset, events.dss_offset) << "block " << t;
      ++compared;
    }
  }
  EXPECT_EQ(compared, 18000);
}

TEST(CandidatePruning, BoundsOfTheIdentityAndOfSingularBlocks) {
  const HessianBlockBounds identity = IdentityBounds();
  std::array<float, 256> eye{};
  for (int i = 0; i < 16; ++i) eye[i * 17] = 1.0f;
  const HessianBlockBounds computed = ComputeHessianBlockBounds(eye.data());
  for (int i = 0; i < 16; ++i) {
    EXPECT_LE(computed.precision[i], 1.0f);
    EXPECT_GT(computed.precision[i], 0.9999f);
    EXPECT_LE(identity.precision[i], 1.0f);
  }
  EXPECT_GE(computed.abs_norm, 1.0f);
  // diag(4, 1, ...) with a coupling: (S^-1)_00 = 1 / (4 - 1) for S = [[4, 1], [1, 1]].
  std::array<float, 256> coupled = eye;
  coupled[0] = 4.0f;
  coupled[1] = coupled[16] = 1.0f;
  const HessianBlockBounds c = ComputeHessianBlockBounds(coupled.data());
  EXPECT_NEAR(c.precision[0], 3.0f, 1e-5f);
  EXPECT_LE(c.precision[0], 3.0f);
  EXPECT_NEAR(c.precision[1], 0.75f, 1e-6f);  // 1 / (S^-1)_11 = 1 / (4 / 3)
  EXPECT_GE(c.abs_norm, 5.0f);
  std::array<float, 256> zero{};
  EXPECT_EQ(ComputeHessianBlockBounds(zero.data()).precision[3], 0.0f);
}

TEST(CandidatePruning, SharedTablesAreEachBlocksBoundsAndScreens) {
  // Blocks of several kinds (random, rank one, all zero, identity) in one Hessian: the shared
  // tables must be, byte for byte, what ComputeHessianBlockBounds/Screens give block by block,
  // since the CUDA search uploads whichever it is given.
  ExampleRng rng(28);
  constexpr int64_t kBlocks = 40;
  std::vector<float> h(static_cast<size_t>(kBlocks) * 256);
  for (int64_t j = 0; j < kBlocks; ++j) {
    RandomBlock b = MakeRandomBlock(rng, kAllKinds[j % 7], 50000 + static_cast<uint64_t>(j));
    if (j % 10 == 3) std::fill(b.h.begin(), b.h.end(), 1.0f);
    if (j % 10 == 5) std::fill(b.h.begin(), b.h.end(), 0.0f);
    if (j % 10 == 7) {
      std::fill(b.h.begin(), b.h.end(), 0.0f);
      for (int i = 0; i < 16; ++i) b.h[static_cast<size_t>(i) * 17] = 1.0f;
    }
    std::copy(b.h.begin(), b.h.end(), h.begin() + j * 256);
  }
  const BlockHessiansView view{h.data(), kBlocks};
  const SharedHessianPruning shared = ComputeSharedHessianPruning(view);
  ASSERT_NE(shared.bounds, nullptr);
  ASSERT_NE(shared.screens, nullptr);
  ASSERT_EQ(shared.bounds->size(), static_cast<size_t>(kBlocks));
  ASSERT_EQ(shared.screens->size(), static_cast<size_t>(kBlocks));
  int valid_screens = 0;
  for (int64_t j = 0; j < kBlocks; ++j) {
    const size_t k = static_cast<size_t>(j);
    // Against the block-by-block functions.
    const float* block = h.data() + j * 256;
    const HessianBlockBounds bound = ComputeHessianBlockBounds(block);
    EXPECT_EQ(std::memcmp(&(*shared.bounds)[k], &bound, sizeof(HessianBlockBounds)), 0)
        << "block " << j;
    // Field by field: the struct's padding carries nothing.
    const HessianBlockScreen& a = (*shared.screens)[k];
    const HessianBlockScreen b = ComputeHessianBlockScreen(block, bound);
    EXPECT_EQ(std::memcmp(a.factor, b.factor, sizeof(float) * kScreenFactorSize), 0)
        << "block " << j;
    EXPECT_EQ(FloatBits(a.kappa_squared), FloatBits(b.kappa_squared)) << "block " << j;
    EXPECT_EQ(std::memcmp(a.element, b.element, sizeof(a.element)), 0) << "block " << j;
    EXPECT_EQ(a.valid, b.valid) << "block " << j;
    valid_screens += a.valid;
  }
  EXPECT_GT(valid_screens, kBlocks / 2) << "random and identity blocks are positive definite";
  EXPECT_EQ((*shared.screens)[5].valid, 0) << "an all-zero block has no screen";

  QuantizeRequest request;
  shared.AttachTo(&request);
  EXPECT_EQ(request.hessian_bounds, shared.bounds->data());
  EXPECT_EQ(request.hessian_screens, shared.screens->data());
  const SharedHessianPruning none = ComputeSharedHessianPruning(BlockHessiansView{});
  EXPECT_EQ(none.bounds, nullptr);
  EXPECT_EQ(none.screens, nullptr);
}

// The error bound behind the pruning's rounding allowance: for every element of every candidate
// (sweep and DSS scales, wide beta grids), |e_i| <= max(|w_i| - 6 d, r) with r =
// UnsaturatedErrorBound(q, d), up to the fused error's own rounding; and the allowance's norm
// bound (16 unknown elements) covers sum e_i^2. Also at the ends of fp32: tiny (subnormal s2)
// and huge global scales.
TEST(CandidatePruning, ErrorBoundCoversEveryElementOfEveryCandidate) {
  ExampleRng rng(33);
  const DssGrid grid{3, 40, 0.0125f};  // beta in [0.5, 1.5]
  int64_t checked = 0;
  int64_t tight = 0;
  for (int t = 0; t < 1400; ++t) {
    RandomBlock b = MakeRandomBlock(rng, kAllKinds[t % 7], 50000 + static_cast<uint64_t>(t));
    const float extra = t % 5 == 0 ? 1e-36f : (t % 5 == 1 ? 1e30f : 1.0f);
    for (float& v : b.w) v = BFloat16ToFloat(FloatToBFloat16(v * extra));
    float amax = 0.0f;
    for (float v : b.w) amax = std::fmax(amax, std::fabs(v));
    if (amax == 0.0f || !std::isfinite(amax)) continue;
    const float g = amax;
    const float s2 = GlobalScaleFromAmax(g);
    ScaledBlock block;
    PrepareScaledBlock(b.w.data(), g, s2, &block);
    HessianBlockBounds unit_norm{};
    unit_norm.abs_norm = 1.0f;
    const BlockPruning p = MakeBlockPruning(block, &unit_norm);
    for (int k = 0; k < kNumScaleCandidates; ++k) {
      const float f = ScaleCandidateValue(k);
      const float d_unit = MulNoContract(f, block.global_scale_unit);
      for (int i = -grid.beta_steps - 1; i <= grid.beta_steps; ++i) {
        // i = -beta_steps - 1 stands for the sweep's own q = d.
        const float q = i < -grid.beta_steps ? MulNoContract(f, s2)
                                             : DssQuantScale(DssBeta(i, grid.beta_step), g, f);
        const float r = UnsaturatedErrorBound(MulNoContract(q, p.unit_inverse), d_unit);
        double sum = 0.0;
        for (int j = 0; j < kBlockSize; ++j) {
          const float e = ElementError(block.w_unit[j], RoundToE2M1Value(block.w[j] / q), d_unit);
          const double limit =
              std::fmax(std::fabs(static_cast<double>(block.w_unit[j])) - 6.0 * d_unit,
                        static_cast<double>(r));
          ASSERT_LE(std::fabs(e), limit * (1.0 + 0x1p-23))
              << "block " << t << " k " << k << " beta index " << i << " element " << j;
          tight += std::fabs(e) > 0.5 * limit;
          sum += static_cast<double>(e) * e;
          ++checked;
        }
        const float allowance =
            CanonicalRoundingAllowance(1.0f, p.amax_unit, p.square_sum_unit, 0.0f,
                                       UnknownSquareBound(kBlockSize, MulNoContract(r, r)), d_unit);
        ASSERT_GE(static_cast<double>(allowance) * (1.0 + 1e-6), kObjectiveRoundingSlack * sum)
            << "block " << t << " k " << k << " beta index " << i;
      }
    }
  }
  EXPECT_GT(checked, 10000000);
  EXPECT_GT(tight, checked / 20) << "the bound is not vacuous";
}

// The CUDA search's Schur-complement screen: on random positive-definite blocks (well and badly
// conditioned) and random error vectors, (255/256) |L_MM^T e_M|^2 - kappa^2 |e_M|^2 never
// exceeds e^T S e, computed in long double; and it is tight (within 2%) for the e that
// minimises e^T S e given e_M, where e^T S e is exactly the Schur complement's form.
TEST(CandidatePruning, ScreenNeverExceedsTheQuadraticFormAndIsTightAtItsMinimiser) {
  ExampleRng rng(31);
  int valid = 0;
  for (float boost : {1.0f, 30.0f}) {
    const std::vector<float> blocks = MakeExampleHessianBlocks(200, 32, boost);
    for (int blk = 0; blk < 200; ++blk) {
      const float* h = blocks.data() + blk * 256;
      const HessianBlockScreen screen = ComputeHessianBlockScreen(h, ComputeHessianBlockBounds(h));
      if (!screen.valid) continue;
      ++valid;
      auto form = [&](const long double* e) {
        long double v = 0.0L;
        for (int a = 0; a < 16; ++a) {
          for (int b = 0; b < 16; ++b) v += e[a] * static_cast<long double>(h[a * 16 + b]) * e[b];
        }
        return v;
      };
      auto bound = [&](const long double* e) {
        long double zz = 0.0L;
        long double ee = 0.0L;
        for (int j = 0; j < kScreenElements; ++j) {
          long double z = 0.0L;
          for (int i = j; i < kScreenElements; ++i) {
            z +=
                static_cast<long double>(screen.factor[i * (i + 1) / 2 + j]) * e[screen.element[i]];
          }
          zz += z * z;
          ee += e[screen.element[j]] * e[screen.element[j]];
        }
        return zz * 255.0L / 256.0L - static_cast<long double>(screen.kappa_squared) * ee;
      };
      for (int t = 0; t < 20; ++t) {
        long double e[16];
        for (long double& v : e) v = rng.Normal() * (rng.Uniform() < 0.3 ? 1e-3 : 1.0);
        ASSERT_LE(bound(e), form(e) * (1.0L + 1e-12L)) << "block " << blk;
      }
      // The minimiser over the other channels: solve S_cc e_c = -S_cM e_M (Gaussian
      // elimination in long double).
      bool in_m[16] = {};
      for (int i = 0; i < kScreenElements; ++i) in_m[screen.element[i]] = true;
      int others[16];
      int n = 0;
      for (int i = 0; i < 16; ++i) {
        if (!in_m[i]) others[n++] = i;
      }
      long double e[16] = {};
      for (int i = 0; i < kScreenElements; ++i) e[screen.element[i]] = rng.Normal();
      long double a[16][17];
      for (int r = 0; r < n; ++r) {
        long double rhs = 0.0L;
        for (int c = 0; c < 16; ++c) {
          const long double s = 0.5L * (static_cast<long double>(h[others[r] * 16 + c]) +
                                        static_cast<long double>(h[c * 16 + others[r]]));
          if (in_m[c]) rhs -= s * e[c];
        }
        for (int c = 0; c < n; ++c) {
          a[r][c] = 0.5L * (static_cast<long double>(h[others[r] * 16 + others[c]]) +
                            static_cast<long double>(h[others[c] * 16 + others[r]]));
        }
        a[r][n] = rhs;
      }
      for (int c = 0; c < n; ++c) {
        for (int r = c + 1; r < n; ++r) {
          const long double f = a[r][c] / a[c][c];
          for (int k = c; k <= n; ++k) a[r][k] -= f * a[c][k];
        }
      }
      for (int r = n - 1; r >= 0; --r) {
        long double v = a[r][n];
        for (int k = r + 1; k < n; ++k) v -= a[r][k] * e[others[k]];
        e[others[r]] = v / a[r][r];
      }
      EXPECT_LE(bound(e), form(e) * (1.0L + 1e-12L)) << "block " << blk;
      EXPECT_GE(bound(e), 0.98L * form(e)) << "block " << blk;
    }
  }
  EXPECT_GT(valid, 300);
  // A singular block has no screen; the identity's factor is the identity.
  std::array<float, 256> zero{};
  EXPECT_EQ(ComputeHessianBlockScreen(zero.data(), ComputeHessianBlockBounds(zero.data())).valid,
            0);
  std::array<float, 256> eye{};
  for (int i = 0; i < 16; ++i) eye[i * 17] = 1.0f;
  const HessianBlockScreen identity = ComputeHessianBlockScreen(eye.data(), IdentityBounds());
  ASSERT_EQ(identity.valid, 1);
  for (int i = 0; i < kScreenElements; ++i) {
    EXPECT_NEAR(identity.factor[i * (i + 1) / 2 + i], 1.0f, 1e-6f);
    EXPECT_EQ(identity.element[i], i);
  }
}

TEST(MseSweep, EqualsLocalHessianSweepWithIdentityHessian) {
  ExampleRng rng(25);
  std::array<float, kBlockSize * kBlockSize> identity{};
  for (int i = 0; i < kBlockSize; ++i) identity[i * kBlockSize + i] = 1.0f;
  for (int t = 0; t < 3000; ++t) {
    const RandomBlock b = MakeRandomBlock(rng, kAllKinds[t % 7], 17000 + static_cast<uint64_t>(t));
    const float s2 = GlobalScaleFromAmax(b.g);
    ScaledBlock scaled;
    PrepareScaledBlock(b.w.data(), b.g, s2, &scaled);
    const SweepChoice mse = SweepScaleCandidates(scaled, nullptr);
    const SweepChoice lh = SweepScaleCandidates(scaled, identity.data());
    ASSERT_EQ(mse.candidate, lh.candidate);
    ASSERT_EQ(FloatBits(mse.objective), FloatBits(lh.objective));
  }
}

// ---------------------------------------------------------------------------------------------
// Whole tensors through the CPU backend.
// ---------------------------------------------------------------------------------------------

TEST(CpuScaleSearch, MatchesTheGenericBlockSearchBitForBit) {
  // The CPU backend runs vectorised searches compiled for the machine's instruction set; they
  // must pick exactly what block_search.h (shared with CUDA) picks, hard cases included.
  ExampleRng rng(39);
  const int64_t rows = 48;
  const int64_t cols = 64;
  auto search = MakeCpuScaleSearch({2, 5});
  const DssGrid grid{1, 10, 0.05f};
  int64_t blocks = 0;
  for (BlockKind kind : kAllKinds) {
    std::vector<float> w(static_cast<size_t>(rows * cols));
    std::vector<float> h(static_cast<size_t>(cols / 16 * 256));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols / 16; ++j) {
        const RandomBlock b = MakeRandomBlock(rng, kind, 20000 + static_cast<uint64_t>(blocks++));
        std::copy(b.w.begin(), b.w.end(), w.begin() + r * cols + j * 16);
        if (r == 0) std::copy(b.h.begin(), b.h.end(), h.begin() + j * 256);
      }
    }
    for (Method m : {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss}) {
      QuantizeRequest request;
      request.weights = {w.data(), DType::kFloat32, rows, cols};
      request.hessians = {h.data(), cols / 16};
      request.params.method = m;
      absl::StatusOr<QuantizedTensor> got = search->Quantize(request);
      ASSERT_TRUE(got.ok()) << got.status();
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < cols / 16; ++j) {
          const BlockOutcome want = QuantizeBlock(
              w.data() + r * cols + j * 16, got->global_amax, got->global_scale, h.data() + j * 256,
              static_cast<BlockMethod>(static_cast<int>(m)), grid);
          ASSERT_EQ(got->scales[r * (cols / 16) + j], want.scale_byte)
              << "kind " << static_cast<int>(kind) << " method " << MethodName(m);
          ASSERT_EQ(std::memcmp(got->packed_codes.data() + (r * cols + j * 16) / 2, want.packed, 8),
                    0);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Validation: every error names the field, the limit and the value.
// ---------------------------------------------------------------------------------------------

}  // namespace
}  // namespace nvfp4cal
