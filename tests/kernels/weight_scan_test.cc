// ScanWeights (the one pass that proves weights finite and takes their amax) against a
// brute-force reference on random bit patterns of every dtype, and the validated-request type:
// made only from a scan of the very weights, searched without another look at them.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/dtype.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {
namespace {

using ::testing::HasSubstr;

// The value of one element of `dtype` given by its bits.
float ValueOf(DType dtype, uint32_t bits) {
  if (dtype == DType::kBFloat16) return BFloat16ToFloat(static_cast<uint16_t>(bits));
  if (dtype == DType::kFloat16) return Float16ToFloat(static_cast<uint16_t>(bits));
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Random weights of `dtype` as raw bits: every finite pattern (signed zeros, subnormals, the
// largest values) may occur; none is NaN or Inf.
std::vector<uint32_t> RandomFiniteBits(DType dtype, size_t n, std::mt19937_64& rng) {
  std::vector<uint32_t> bits(n);
  for (uint32_t& b : bits) {
    do {
      b = static_cast<uint32_t>(rng());
      if (dtype != DType::kFloat32) b &= 0xffff;
    } while (!std::isfinite(ValueOf(dtype, b)));
  }
  return bits;
}

// The weights in the dtype's storage (2 or 4 bytes per element).
std::vector<uint8_t> Store(DType dtype, const std::vector<uint32_t>& bits) {
  const size_t size = DTypeSize(dtype);
  std::vector<uint8_t> bytes(bits.size() * size);
  for (size_t i = 0; i < bits.size(); ++i) std::memcpy(&bytes[i * size], &bits[i], size);
  return bytes;  // little-endian: the low bytes of each value
}

// The reference: every element converted, max of |x| in float.
float ReferenceAmax(const WeightView& w) {
  float amax = 0.0f;
  for (int64_t i = 0; i < w.rows * w.cols; ++i) {
    float v;
    LoadAsFloat(w.data, w.dtype, i, 1, &v);
    amax = std::max(amax, std::fabs(v));
  }
  return amax;
}

TEST(ScanWeights, AmaxEqualsTheReferenceOnRandomBitsOfEveryDtype) {
  std::mt19937_64 rng(7);
  for (DType dtype : {DType::kBFloat16, DType::kFloat16, DType::kFloat32}) {
    for (int trial = 0; trial < 40; ++trial) {
      const int64_t rows = 1 + static_cast<int64_t>(rng() % 9);
      const int64_t cols = 16 * (1 + static_cast<int64_t>(rng() % 40));
      std::vector<uint32_t> bits = RandomFiniteBits(dtype, rows * cols, rng);
      if (trial % 4 == 0) {  // small magnitudes only, so that the max is not always large
        for (uint32_t& b : bits) b &= dtype == DType::kFloat32 ? 0x807fffffu : 0x807fu;
      }
      const std::vector<uint8_t> bytes = Store(dtype, bits);
      const WeightView w{bytes.data(), dtype, rows, cols};
      absl::StatusOr<WeightScan> scan = ScanWeights(w);
      ASSERT_TRUE(scan.ok()) << scan.status();
      EXPECT_EQ(FloatBits(scan->amax()), FloatBits(ReferenceAmax(w)))
          << static_cast<int>(dtype) << " trial " << trial;
      EXPECT_EQ(FloatBits(*ComputeGlobalAmax(w)), FloatBits(scan->amax()));
    }
  }
}

TEST(ScanWeights, NamesTheFirstNonFiniteElementInRowMajorOrder) {
  std::mt19937_64 rng(11);
  struct Bad {
    DType dtype;
    uint32_t bits;
    const char* text;
  };
  const Bad bad[] = {{DType::kBFloat16, 0x7f80, "inf"},      {DType::kBFloat16, 0xff80, "-inf"},
                     {DType::kBFloat16, 0xffc1, "-nan"},     {DType::kFloat16, 0x7c00, "inf"},
                     {DType::kFloat16, 0xfe01, "-nan"},      {DType::kFloat32, 0x7f800000u, "inf"},
                     {DType::kFloat32, 0xff800001u, "-nan"}, {DType::kFloat32, 0x7fffffffu, "nan"}};
  for (const Bad& b : bad) {
    for (int trial = 0; trial < 20; ++trial) {
      const int64_t rows = 1 + static_cast<int64_t>(rng() % 6);
      const int64_t cols = 16 * (1 + static_cast<int64_t>(rng() % 8));
      std::vector<uint32_t> bits = RandomFiniteBits(b.dtype, rows * cols, rng);
      // One to three bad elements; the first in row-major order must be named.
      size_t first = bits.size();
      for (int k = 0; k < 1 + trial % 3; ++k) {
        const size_t at = rng() % bits.size();
        bits[at] = b.bits;
        first = std::min(first, at);
      }
      const std::vector<uint8_t> bytes = Store(b.dtype, bits);
      absl::StatusOr<WeightScan> scan = ScanWeights({bytes.data(), b.dtype, rows, cols});
      ASSERT_FALSE(scan.ok());
      EXPECT_EQ(scan.status().code(), absl::StatusCode::kInvalidArgument);
      const std::string where =
          "element (" + std::to_string(first / cols) + ", " + std::to_string(first % cols) + ")";
      EXPECT_THAT(scan.status().message(), HasSubstr(where + " is " + b.text))
          << static_cast<int>(b.dtype);
    }
  }
}

struct Tensor {
  std::vector<uint16_t> bf16 = MakeExampleWeightsBf16(32, 128, 3);
  std::vector<float> hessians = MakeExampleHessianBlocks(128 / 16, 4);
  QuantizeRequest Request(Method method) const {
    QuantizeRequest r;
    r.weights = {bf16.data(), DType::kBFloat16, 32, 128};
    r.hessians = {hessians.data(), 128 / 16};
    r.params.method = method;
    return r;
  }
};

TEST(ValidatedRequest, OnlyFromAScanOfTheVeryWeights) {
  const Tensor t;
  const Tensor copy;  // equal values, other memory
  const QuantizeRequest r = t.Request(Method::kDss);
  absl::StatusOr<ValidatedRequest> v = ValidateQuantizeRequest(r, *ScanWeights(r.weights));
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(FloatBits(v->global_amax()), FloatBits(*ComputeGlobalAmax(r.weights)));

  absl::StatusOr<ValidatedRequest> other =
      ValidateQuantizeRequest(r, *ScanWeights(copy.Request(Method::kDss).weights));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(other.status().message(), HasSubstr("the scan given is of other weights"));
  WeightView fewer_rows = r.weights;
  fewer_rows.rows = 16;
  other = ValidateQuantizeRequest(r, *ScanWeights(fewer_rows));
  EXPECT_THAT(other.status().message(), HasSubstr("[16, 128]"));

  // The rest of the request is still checked: a shared amax below the weights', a bad param.
  QuantizeRequest low = r;
  low.global_amax = v->global_amax() / 2;
  EXPECT_THAT(ValidateQuantizeRequest(low, *ScanWeights(r.weights)).status().message(),
              HasSubstr("below the weights' own amax"));
  QuantizeRequest bad_step = r;
  bad_step.params.beta_step = 0.0f;
  EXPECT_THAT(ValidateQuantizeRequest(bad_step, *ScanWeights(r.weights)).status().message(),
              HasSubstr("beta_step"));
  QuantizeRequest shared = r;
  shared.global_amax = v->global_amax() * 3;
  EXPECT_EQ(ValidateQuantizeRequest(shared, *ScanWeights(r.weights))->global_amax(),
            v->global_amax() * 3);
}

TEST(ValidatedRequest, QuantizeValidatedEqualsQuantize) {
  const Tensor t;
  std::unique_ptr<ScaleSearch> cpu = MakeCpuScaleSearch({});
  for (Method m : {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss}) {
    QuantizeRequest r = t.Request(m);
    r.global_amax = 1.5f * *ComputeGlobalAmax(r.weights);
    absl::StatusOr<QuantizedTensor> direct = cpu->Quantize(r);
    absl::StatusOr<QuantizedTensor> validated =
        cpu->QuantizeValidated(*ValidateQuantizeRequest(r, *ScanWeights(r.weights)));
    ASSERT_TRUE(direct.ok() && validated.ok());
    EXPECT_EQ(direct->packed_codes, validated->packed_codes);
    EXPECT_EQ(direct->scales, validated->scales);
    EXPECT_EQ(FloatBits(direct->global_amax), FloatBits(validated->global_amax));
    EXPECT_EQ(FloatBits(direct->global_scale), FloatBits(validated->global_scale));
    EXPECT_EQ(direct->stats.objective_after, validated->stats.objective_after);
    EXPECT_EQ(direct->stats.num_blocks, validated->stats.num_blocks);
  }
}

}  // namespace
}  // namespace nvfp4cal
