// HessianAccumulator: X^T X in batches equals the sum computed here directly, the blocks equal
// the full matrix's diagonal, bad input adds nothing, and the written file drives `quantize`.
#include "client/hessian_accumulator.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "client/hessians.h"
#include "client/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/example_data.h"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

using ::nvfp4cal::testing::TempFolder;
using ::testing::HasSubstr;

std::vector<float> Activations(int64_t tokens, int64_t in, uint64_t seed) {
  ExampleRng rng(seed);
  std::vector<float> x(static_cast<size_t>(tokens * in));
  for (float& v : x) v = static_cast<float>(rng.Normal());
  return x;
}

TEST(HessianAccumulator, BatchesSumToXTransposeX) {
  constexpr int64_t kIn = 48, kTokens = 40;
  const std::vector<float> x = Activations(kTokens, kIn, 7);
  HessianAccumulator acc(kIn, /*keep_full_matrix=*/true);
  ASSERT_TRUE(acc.AddBatch(x.data(), 10).ok());
  ASSERT_TRUE(acc.AddBatch(x.data() + 10 * kIn, 30).ok());
  EXPECT_EQ(acc.num_tokens(), kTokens);
  std::vector<float> full = *acc.FullMatrix(/*divide_by_tokens=*/false);
  for (int64_t a = 0; a < kIn; ++a) {
    for (int64_t b = 0; b < kIn; ++b) {
      double want = 0.0;
      for (int64_t t = 0; t < kTokens; ++t) {
        want += static_cast<double>(x[static_cast<size_t>(t * kIn + a)]) *
                x[static_cast<size_t>(t * kIn + b)];
      }
      EXPECT_EQ(full[static_cast<size_t>(a * kIn + b)], static_cast<float>(want));
      EXPECT_EQ(full[static_cast<size_t>(a * kIn + b)], full[static_cast<size_t>(b * kIn + a)]);
    }
  }
  // The blocks are the full matrix's diagonal blocks, divided by the token count on request.
  std::vector<uint8_t> bytes(full.size() * 4);
  std::memcpy(bytes.data(), full.data(), bytes.size());
  EXPECT_EQ(acc.Blocks(false), ExtractDiagonalBlocks(bytes.data(), kIn));
  const std::vector<float> mean = acc.Blocks(true);
  EXPECT_FLOAT_EQ(mean[17], acc.Blocks(false)[17] / kTokens);
}

TEST(HessianAccumulator, Bf16ActivationsAreExactlyTheirFloatValues) {
  const std::vector<uint16_t> bits = MakeExampleWeightsBf16(8, 32, 3);
  std::vector<float> as_float(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) as_float[i] = BFloat16ToFloat(bits[i]);
  HessianAccumulator from_bf16(32), from_float(32);
  ASSERT_TRUE(from_bf16.AddBatch(bits.data(), DType::kBFloat16, 8).ok());
  ASSERT_TRUE(from_float.AddBatch(as_float.data(), 8).ok());
  EXPECT_EQ(from_bf16.Blocks(false), from_float.Blocks(false));
}

TEST(HessianAccumulator, RejectsBadInputWithoutAddingAnything) {
  std::vector<float> x = Activations(4, 32, 1);
  x[2 * 32 + 5] = std::numeric_limits<float>::quiet_NaN();
  HessianAccumulator acc(32);
  const absl::Status bad = acc.AddBatch(x.data(), 4);
  EXPECT_THAT(std::string(bad.message()), HasSubstr("activation (token 2, feature 5) is nan"));
  EXPECT_EQ(acc.num_tokens(), 0);
  EXPECT_EQ(acc.Blocks(false), std::vector<float>(32 * 16, 0.0f));
  HessianAccumulator odd(40);
  EXPECT_THAT(std::string(odd.AddBatch(x.data(), 1).message()),
              HasSubstr("in_features = 40 must be a positive multiple of 16"));
  EXPECT_EQ(acc.FullMatrix(false).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(HessianAccumulator, WrittenFileIsReadByTheHessianStoreWithAliases) {
  TempFolder dir("accumulator");
  const std::vector<float> x = Activations(64, 32, 9);
  HessianAccumulator blocks_only(32), full(32, true);
  ASSERT_TRUE(blocks_only.AddBatch(x.data(), 64).ok());
  ASSERT_TRUE(full.AddBatch(x.data(), 64).ok());
  const std::string path = dir / "h.safetensors";
  ASSERT_TRUE(
      WriteHessiansFile(path, {{"a.q_proj.hessian", &full}, {"a.o_proj.hessian", &blocks_only}},
                        /*divide_by_tokens=*/true, {{"a.down_proj.hessian", "a.o_proj.hessian"}})
          .ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Find("a.q_proj.hessian")->shape, (std::vector<int64_t>{32, 32}));
  EXPECT_EQ((*file)->Find("a.o_proj.hessian")->shape, (std::vector<int64_t>{2, 16, 16}));
  EXPECT_EQ((*file)->metadata().at("tokens.a.q_proj.hessian"), "64");
  auto store = HessianStore::Open(path);
  ASSERT_TRUE(store.ok());
  EXPECT_EQ((*store)->FindEntry("a.k_proj").value_or(""), "a.q_proj.hessian");
  EXPECT_EQ((*store)->FindEntry("a.down_proj").value_or(""), "a.o_proj.hessian");
  auto from_full = (*store)->Blocks("a.q_proj.hessian", "a.q_proj", 32, 1e-4f);
  auto from_blocks = (*store)->Blocks("a.o_proj.hessian", "a.o_proj", 32, 1e-4f);
  ASSERT_TRUE(from_full.ok() && from_blocks.ok());
  EXPECT_EQ(**from_full, **from_blocks);
  EXPECT_EQ(**from_blocks, blocks_only.Blocks(true));
  // An alias must name an entry of the file, and must not shadow one.
  const absl::Status dangling =
      WriteHessiansFile(dir / "dangling.safetensors", {{"a.q_proj.hessian", &full}}, true,
                        {{"a.k_proj.hessian", "a.x_proj.hessian"}});
  EXPECT_EQ(dangling.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(dangling.message()),
              HasSubstr("alias 'a.k_proj.hessian' names 'a.x_proj.hessian', which is not one of "
                        "the Hessians written"));
  const absl::Status shadowing = WriteHessiansFile(
      dir / "shadowing.safetensors", {{"a.q_proj.hessian", &full}, {"a.k_proj.hessian", &full}},
      true, {{"a.k_proj.hessian", "a.q_proj.hessian"}});
  EXPECT_EQ(shadowing.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(shadowing.message()),
              HasSubstr("alias 'a.k_proj.hessian' is also the name of a Hessian written"));
  EXPECT_FALSE(std::filesystem::exists(dir / "dangling.safetensors"));
  HessianAccumulator empty(16);
  EXPECT_EQ(WriteHessiansFile(dir / "empty.safetensors", {{"e.hessian", &empty}}, false).code(),
            absl::StatusCode::kFailedPrecondition);
  // The activation amax goes next to each entry, and resolves like the Hessian.
  float expected_amax = 0.0f;
  for (float v : x) expected_amax = std::max(expected_amax, std::fabs(v));
  EXPECT_EQ(full.input_amax(), expected_amax);
  const SafetensorsTensor* amax = (*file)->Find("a.q_proj.input_amax");
  ASSERT_NE(amax, nullptr);
  EXPECT_TRUE(amax->shape.empty());
  float stored = 0.0f;
  std::memcpy(&stored, amax->data, 4);
  EXPECT_EQ(stored, expected_amax);
  auto via_alias = (*store)->InputAmax((*store)->FindEntry("a.down_proj").value_or(""));
  ASSERT_TRUE(via_alias.ok());
  EXPECT_EQ(*via_alias, std::optional<float>(expected_amax));
  auto none = (*store)->InputAmax("not_an_entry");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

}  // namespace
}  // namespace nvfp4cal
