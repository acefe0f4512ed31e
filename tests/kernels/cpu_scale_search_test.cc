// The CPU backend's tensor-level behaviour: thread counts, row ranges (checked and
// prevalidated), statistics, dtypes, the shared global amax, all-zero inputs, and request
// validation naming the field, the limit and the value.
#include "nvfp4cal/kernels/cpu_scale_search.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/dtype.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/kernels/validation.h"

namespace nvfp4cal {
namespace {

using ::testing::HasSubstr;

struct ExampleTensor {
  std::vector<uint16_t> bf16;
  std::vector<float> hessians;
  int64_t rows;
  int64_t cols;
};

ExampleTensor MakeTensor(int64_t rows, int64_t cols, uint64_t seed) {
  return {MakeExampleWeightsBf16(rows, cols, seed), MakeExampleHessianBlocks(cols / 16, seed + 1),
          rows, cols};
}

QuantizeRequest RequestFor(const ExampleTensor& t, Method method) {
  QuantizeRequest r;
  r.weights = {t.bf16.data(), DType::kBFloat16, t.rows, t.cols};
  r.hessians = {t.hessians.data(), t.cols / 16};
  r.params.method = method;
  return r;
}

void ExpectSameResult(const QuantizedTensor& a, const QuantizedTensor& b) {
  EXPECT_EQ(a.packed_codes, b.packed_codes);
  EXPECT_EQ(a.scales, b.scales);
  EXPECT_EQ(FloatBits(a.global_scale), FloatBits(b.global_scale));
  EXPECT_EQ(a.stats.objective_before, b.stats.objective_before);
  EXPECT_EQ(a.stats.objective_after, b.stats.objective_after);
  EXPECT_EQ(a.stats.mse_after, b.stats.mse_after);
  EXPECT_EQ(a.stats.blocks_scale_changed, b.stats.blocks_scale_changed);
  EXPECT_EQ(a.stats.blocks_beta_not_one, b.stats.blocks_beta_not_one);
}

TEST(CpuScaleSearch, IdenticalForAnyThreadCount) {
  const ExampleTensor t = MakeTensor(96, 256, 31);
  for (Method m : {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss}) {
    auto one = MakeCpuScaleSearch({1, 7});
    absl::StatusOr<QuantizedTensor> reference = one->Quantize(RequestFor(t, m));
    ASSERT_TRUE(reference.ok()) << reference.status();
    for (int threads : {2, 3, 8}) {
      auto many = MakeCpuScaleSearch({threads, 7});
      absl::StatusOr<QuantizedTensor> got = many->Quantize(RequestFor(t, m));
      ASSERT_TRUE(got.ok()) << got.status();
      ExpectSameResult(*reference, *got);
    }
  }
}

TEST(CpuScaleSearch, RowRangesReassembleTheWholeTensor) {
  const ExampleTensor t = MakeTensor(50, 128, 32);
  auto search = MakeCpuScaleSearch({2, 16});
  const QuantizeRequest request = RequestFor(t, Method::kDss);
  absl::StatusOr<QuantizedTensor> whole = search->Quantize(request);
  ASSERT_TRUE(whole.ok()) << whole.status();
  std::vector<uint8_t> codes(whole->packed_codes.size());
  std::vector<uint8_t> scales(whole->scales.size());
  TensorStats total;
  for (int64_t begin = 0; begin < t.rows; begin += 17) {
    const int64_t end = std::min<int64_t>(t.rows, begin + 17);
    TensorStats part;
    RowRangeOutput out{
        absl::MakeSpan(codes).subspan(begin * t.cols / 2, (end - begin) * t.cols / 2),
        absl::MakeSpan(scales).subspan(begin * t.cols / 16, (end - begin) * t.cols / 16)};
    ASSERT_TRUE(search->QuantizeRows(request, whole->global_amax, begin, end, out, &part).ok());
    AccumulateStats(part, &total);
  }
  EXPECT_EQ(codes, whole->packed_codes);
  EXPECT_EQ(scales, whole->scales);
  EXPECT_EQ(total.num_blocks, whole->stats.num_blocks);
  EXPECT_NEAR(total.objective_after, whole->stats.objective_after,
              1e-9 * whole->stats.objective_after);
}

// What the server's executor runs: the same bytes and statistics as QuantizeRows for checked
// data; the row range and the output sizes are still refused when wrong; the data checks
// (NaN rows, g below the rows' amax, a bad Hessian) are left to the caller.
TEST(CpuScaleSearch, ValidatedRowsEqualCheckedRowsAndStillCheckTheOutput) {
  const ExampleTensor t = MakeTensor(40, 128, 33);
  auto search = MakeCpuScaleSearch({2, 16});
  for (Method m : {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss}) {
    const QuantizeRequest request = RequestFor(t, m);
    const float g = *ComputeGlobalAmax(request.weights);
    absl::StatusOr<ValidatedTensor> tensor = ValidateTensor(request);
    ASSERT_TRUE(tensor.ok()) << tensor.status();
    for (int64_t begin = 0; begin < t.rows; begin += 13) {
      const int64_t end = std::min<int64_t>(t.rows, begin + 13);
      const size_t codes = static_cast<size_t>((end - begin) * t.cols / 2);
      const size_t scales = static_cast<size_t>((end - begin) * t.cols / 16);
      std::vector<uint8_t> c1(codes), s1(scales), c2(codes), s2(scales);
      TensorStats checked;
      TensorStats validated;
      ASSERT_TRUE(search
                      ->QuantizeRows(request, g, begin, end,
                                     {absl::MakeSpan(c1), absl::MakeSpan(s1)}, &checked)
                      .ok());
      // The rows as a front checks them: a scan of each piece (here two), then ValidateRows.
      const DType dtype = request.weights.dtype;
      const int64_t row_bytes = t.cols * DTypeSize(dtype);
      const char* data = static_cast<const char*>(request.weights.data) + begin * row_bytes;
      const int64_t half = (end - begin + 1) / 2;
      std::vector<WeightScan> pieces = {*ScanWeights({data, dtype, half, t.cols})};
      if (end - begin > half) {
        pieces.push_back(
            *ScanWeights({data + half * row_bytes, dtype, end - begin - half, t.cols}));
      }
      absl::StatusOr<ValidatedRows> rows = ValidateRows(*tensor, g, pieces);
      ASSERT_TRUE(rows.ok()) << rows.status();
      ASSERT_EQ(rows->rows(), end - begin);
      ASSERT_TRUE(
          search->QuantizeValidatedRows(*rows, {absl::MakeSpan(c2), absl::MakeSpan(s2)}, &validated)
              .ok());
      EXPECT_EQ(c1, c2);
      EXPECT_EQ(s1, s2);
      EXPECT_EQ(checked.objective_after, validated.objective_after);
      EXPECT_EQ(checked.blocks_scale_changed, validated.blocks_scale_changed);
    }
  }
  const QuantizeRequest request = RequestFor(t, Method::kDss);
  absl::StatusOr<ValidatedRequest> whole = ValidateQuantizeRequest(request);
  ASSERT_TRUE(whole.ok());
  const ValidatedRows all = whole->AllRows();
  ASSERT_EQ(all.rows(), t.rows);
  std::vector<uint8_t> codes(static_cast<size_t>(4 * t.cols / 2));
  std::vector<uint8_t> scales(static_cast<size_t>(4 * t.cols / 16));
  TensorStats stats;
  // Output sizes are always checked.
  absl::Status s = search->QuantizeValidatedRows(
      *all.Subrange(0, 4), {absl::MakeSpan(codes).subspan(1), absl::MakeSpan(scales)}, &stats);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = search->QuantizeValidatedRows(*all.Subrange(36, 4),
                                    {absl::MakeSpan(codes), absl::MakeSpan(scales)}, &stats);
  EXPECT_TRUE(s.ok()) << s;
  // A subrange is the same rows as the whole tensor's.
  absl::StatusOr<QuantizedTensor> r = search->Quantize(request);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(codes,
            std::vector<uint8_t>(r->packed_codes.end() - 4 * t.cols / 2, r->packed_codes.end()));
}

TEST(ValidateRows, RefusesPiecesThatAreNotTheTensorsRowsAndGBelowTheirAmax) {
  const ExampleTensor t = MakeTensor(8, 64, 5);
  const QuantizeRequest request = RequestFor(t, Method::kMse);
  absl::StatusOr<ValidatedTensor> tensor = ValidateTensor(request);
  ASSERT_TRUE(tensor.ok());
  const char* data = static_cast<const char*>(request.weights.data);
  const DType dtype = request.weights.dtype;
  const int64_t row_bytes = t.cols * DTypeSize(dtype);
  const WeightScan first = *ScanWeights({data, dtype, 3, t.cols});
  const WeightScan rest = *ScanWeights({data + 3 * row_bytes, dtype, 5, t.cols});
  const WeightScan gap = *ScanWeights({data + 4 * row_bytes, dtype, 4, t.cols});
  const WeightScan narrow = *ScanWeights({data + 3 * row_bytes, dtype, 5, 32});
  const float g = std::max(first.amax(), rest.amax());
  ASSERT_TRUE(ValidateRows(*tensor, g, {first, rest}).ok());
  for (const std::vector<WeightScan>& bad :
       std::vector<std::vector<WeightScan>>{{}, {first, gap}, {rest, first}, {first, narrow}}) {
    absl::StatusOr<ValidatedRows> rows = ValidateRows(*tensor, g, bad);
    ASSERT_FALSE(rows.ok());
    EXPECT_EQ(rows.status().code(), absl::StatusCode::kInvalidArgument) << rows.status();
  }
  absl::StatusOr<ValidatedRows> low = ValidateRows(*tensor, g * 0.5f, {first, rest});
  ASSERT_FALSE(low.ok());
  EXPECT_EQ(low.status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<ValidatedRows> rows = ValidateRows(*tensor, g, {first, rest});
  EXPECT_FALSE(rows->Subrange(5, 4).ok());
  EXPECT_FALSE(rows->Subrange(-1, 2).ok());
  EXPECT_FALSE(rows->Subrange(2, 0).ok());
  ASSERT_TRUE(rows->Subrange(7, 1).ok());
  EXPECT_EQ(rows->Subrange(7, 1)->request().weights.data, data + 7 * row_bytes);
  // A tensor whose Hessian is wrong makes no ValidatedTensor.
  QuantizeRequest bad = RequestFor(t, Method::kLocalHessian);
  bad.hessians.num_blocks -= 1;
  EXPECT_FALSE(ValidateTensor(bad).ok());
}

TEST(CpuScaleSearch, StatisticsMatchTheDequantizedOutput) {
  const ExampleTensor t = MakeTensor(40, 256, 33);
  auto search = MakeCpuScaleSearch({});
  for (Method m : {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss}) {
    absl::StatusOr<QuantizedTensor> r = search->Quantize(RequestFor(t, m));
    ASSERT_TRUE(r.ok()) << r.status();
    double mse = 0.0;
    double hess = 0.0;
    for (int64_t row = 0; row < t.rows; ++row) {
      for (int64_t j = 0; j < t.cols / 16; ++j) {
        const float d = DecodeE4M3(r->scales[row * (t.cols / 16) + j]) * r->global_scale;
        double e[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t col = j * 16 + i;
          const uint8_t byte = r->packed_codes[(row * t.cols + col) / 2];
          const uint8_t code = col % 2 ? UnpackE2M1High(byte) : UnpackE2M1Low(byte);
          e[i] = BFloat16ToFloat(t.bf16[row * t.cols + col]) -
                 static_cast<double>(DecodeE2M1(code)) * d;
          mse += e[i] * e[i];
        }
        const float* h = t.hessians.data() + j * 256;
        for (int a = 0; a < 16; ++a)
          for (int b = 0; b < 16; ++b) hess += e[a] * h[a * 16 + b] * e[b];
      }
    }
    EXPECT_NEAR(r->stats.mse_after, mse, 1e-4 * mse) << MethodName(m);
    EXPECT_NEAR(r->stats.hessian_error_after, hess, 1e-4 * hess) << MethodName(m);
    EXPECT_EQ(r->stats.num_blocks, t.rows * t.cols / 16);
    EXPECT_LE(r->stats.objective_after, r->stats.objective_before * (1 + 1e-6)) << MethodName(m);
  }
}

TEST(CpuScaleSearch, MethodsImproveTheirObjectiveInOrder) {
  const ExampleTensor t = MakeTensor(64, 512, 34);
  auto search = MakeCpuScaleSearch({});
  auto after = [&](Method m) {
    absl::StatusOr<QuantizedTensor> r = search->Quantize(RequestFor(t, m));
    EXPECT_TRUE(r.ok()) << r.status();
    return r->stats;
  };
  const TensorStats max = after(Method::kMax);
  const TensorStats mse = after(Method::kMse);
  const TensorStats lh = after(Method::kLocalHessian);
  const TensorStats dss = after(Method::kDss);
  EXPECT_LT(mse.mse_after, max.mse_after);
  EXPECT_LT(lh.hessian_error_after, mse.hessian_error_after);
  EXPECT_LT(dss.hessian_error_after, lh.hessian_error_after);
  EXPECT_GT(dss.blocks_beta_not_one, 0);
  EXPECT_EQ(max.blocks_scale_changed, 0);
}

TEST(CpuScaleSearch, Bf16Fp16AndFp32InputsOfTheSameValuesAgree) {
  const int64_t rows = 24;
  const int64_t cols = 64;
  std::vector<uint16_t> bf16 = MakeExampleWeightsBf16(rows, cols, 35);
  std::vector<float> f32(bf16.size());
  std::vector<uint16_t> f16(bf16.size());
  for (size_t i = 0; i < bf16.size(); ++i) {
    float v = BFloat16ToFloat(bf16[i]);
    if (std::fabs(v) < 6.103515625e-05f) v = 0.0f;  // keep inside fp16's normal range
    bf16[i] = FloatToBFloat16(v);
    f32[i] = v;
    f16[i] = FloatToFloat16(v);
    ASSERT_EQ(Float16ToFloat(f16[i]), v);
  }
  const std::vector<float> h = MakeExampleHessianBlocks(cols / 16, 36);
  auto search = MakeCpuScaleSearch({});
  std::vector<QuantizedTensor> results;
  for (std::pair<const void*, DType> input :
       {std::pair<const void*, DType>{bf16.data(), DType::kBFloat16},
        {f32.data(), DType::kFloat32},
        {f16.data(), DType::kFloat16}}) {
    QuantizeRequest r;
    r.weights = {input.first, input.second, rows, cols};
    r.hessians = {h.data(), cols / 16};
    absl::StatusOr<QuantizedTensor> q = search->Quantize(r);
    ASSERT_TRUE(q.ok()) << q.status();
    results.push_back(*std::move(q));
  }
  ExpectSameResult(results[0], results[1]);
  ExpectSameResult(results[0], results[2]);
}

TEST(CpuScaleSearch, SharedGlobalAmaxIsUsed) {
  const ExampleTensor t = MakeTensor(8, 64, 37);
  auto search = MakeCpuScaleSearch({});
  QuantizeRequest r = RequestFor(t, Method::kMax);
  absl::StatusOr<QuantizedTensor> own = search->Quantize(r);
  ASSERT_TRUE(own.ok());
  r.global_amax = own->global_amax * 4.0f;
  absl::StatusOr<QuantizedTensor> shared = search->Quantize(r);
  ASSERT_TRUE(shared.ok());
  EXPECT_EQ(shared->global_amax, own->global_amax * 4.0f);
  EXPECT_EQ(shared->global_scale, own->global_amax * 4.0f / 2688.0f);
}

TEST(CpuScaleSearch, AllZeroTensor) {
  const std::vector<float> zeros(4 * 32, 0.0f);
  auto search = MakeCpuScaleSearch({});
  for (Method m : {Method::kMax, Method::kMse}) {
    QuantizeRequest r;
    r.weights = {zeros.data(), DType::kFloat32, 4, 32};
    r.params.method = m;
    absl::StatusOr<QuantizedTensor> q = search->Quantize(r);
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_EQ(q->global_scale, 0.0f);
    for (uint8_t b : q->packed_codes) EXPECT_EQ(b, 0);
    for (uint8_t s : q->scales) EXPECT_EQ(s, m == Method::kMax ? 0x7E : 0x01);
  }
}

TEST(CpuScaleSearch, CountsAllZeroHessianBlocks) {
  ExampleTensor t = MakeTensor(4, 64, 38);
  std::fill(t.hessians.begin() + 256, t.hessians.begin() + 512, 0.0f);  // block 1
  auto search = MakeCpuScaleSearch({});
  absl::StatusOr<QuantizedTensor> q = search->Quantize(RequestFor(t, Method::kLocalHessian));
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->stats.zero_hessian_blocks, 4);
  for (int64_t row = 0; row < 4; ++row) EXPECT_EQ(q->scales[row * 4 + 1], 0x01);
}

class Validation : public ::testing::Test {
 protected:
  Validation() : tensor_(MakeTensor(4, 64, 40)) {}
  absl::Status Run(const QuantizeRequest& r) {
    absl::Status v = ValidateRequest(r);
    absl::StatusOr<QuantizedTensor> q = MakeCpuScaleSearch({})->Quantize(r);
    EXPECT_EQ(v.code(), q.status().code()) << v << " vs " << q.status();
    return v;
  }
  ExampleTensor tensor_;
};

TEST_F(Validation, AcceptsAGoodRequest) {
  EXPECT_TRUE(Run(RequestFor(tensor_, Method::kDss)).ok());
}

TEST_F(Validation, InputColumnsNotAMultipleOf16) {
  QuantizeRequest r = RequestFor(tensor_, Method::kMax);
  r.weights.cols = 60;
  const absl::Status s = Run(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(),
              HasSubstr("weights.cols (in) = 60 is not a multiple of the block size 16"));
}

TEST_F(Validation, EmptyTensor) {
  QuantizeRequest r = RequestFor(tensor_, Method::kMax);
  r.weights.rows = 0;
  const absl::Status s = Run(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("empty tensor"));
}

TEST_F(Validation, NonFiniteWeights) {
  std::vector<float> w(4 * 64, 0.5f);
  w[2 * 64 + 17] = std::nanf("");
  QuantizeRequest r;
  r.weights = {w.data(), DType::kFloat32, 4, 64};
  r.params.method = Method::kMse;
  absl::Status s = Run(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("element (2, 17) is nan"));
  w[2 * 64 + 17] = std::numeric_limits<float>::infinity();
  s = Run(r);
  EXPECT_THAT(s.message(), HasSubstr("element (2, 17) is inf"));
}

TEST_F(Validation, NonFiniteHessian) {
  tensor_.hessians[256 * 2 + 3 * 16 + 5] = std::numeric_limits<float>::infinity();
  const absl::Status s = Run(RequestFor(tensor_, Method::kLocalHessian));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("block 2 element (3, 5) is inf"));
}

TEST_F(Validation, MissingHessian) {
  QuantizeRequest r = RequestFor(tensor_, Method::kDss);
  r.hessians = {};
  const absl::Status s = Run(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("method dss needs Hessian blocks [4, 16, 16]"));
  r.params.method = Method::kMse;
  EXPECT_TRUE(Run(r).ok());
}

TEST_F(Validation, WrongHessianShape) {
  QuantizeRequest r = RequestFor(tensor_, Method::kLocalHessian);
  r.hessians.num_blocks = 3;
  const absl::Status s = Run(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("hessians.num_blocks = 3 but weights.cols / 16 = 4"));
}

TEST_F(Validation, NonSymmetricHessian) {
  tensor_.hessians[256 * 1 + 2 * 16 + 9] += 0.5f;
  const absl::Status s = Run(RequestFor(tensor_, Method::kDss));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("block 1 is not symmetric: H(2, 9)"));
}

TEST_F(Validation, NegativeHessianDiagonal) {
  tensor_.hessians[7 * 16 + 7] = -1.0f;
  const absl::Status s = Run(RequestFor(tensor_, Method::kDss));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("block 0 diagonal element (7, 7) = -1 is negative"));
}

TEST_F(Validation, BetaStepOutOfRange) {
  for (float step : {0.001f, 0.6f, std::nanf("")}) {
    QuantizeRequest r = RequestFor(tensor_, Method::kDss);
    r.params.beta_step = step;
    const absl::Status s = Run(r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr("params.beta_step = "));
    EXPECT_THAT(s.message(), HasSubstr("is out of range [0.005, 0.5]"));
  }
}

TEST_F(Validation, BetaRangeMustKeepBetasPositive) {
  QuantizeRequest r = RequestFor(tensor_, Method::kDss);
  r.params.beta_step = 0.5f;
  r.params.beta_half_range = 0.9f;  // n = 2: betas 0, 0.5, 1, 1.5, 2
  const absl::Status s = Run(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("smallest beta of 0"));
}

TEST_F(Validation, NeighboursOutOfRange) {
  QuantizeRequest r = RequestFor(tensor_, Method::kDss);
  r.params.scale_neighbours = -1;
  EXPECT_THAT(Run(r).message(), HasSubstr("params.scale_neighbours = -1 is out of range [0, 125]"));
}

TEST_F(Validation, SharedGlobalAmaxBelowTheWeights) {
  QuantizeRequest r = RequestFor(tensor_, Method::kMax);
  r.global_amax = 1e-6f;
  const absl::Status s = Run(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("below the weights' own amax"));
}

TEST(MethodNames, RoundTripAndRejectUnknown) {
  for (Method m : {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss}) {
    absl::StatusOr<Method> parsed = ParseMethod(MethodName(m));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, m);
  }
  const absl::StatusOr<Method> bad = ParseMethod("gptqq");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("\"gptqq\""));
}

}  // namespace
}  // namespace nvfp4cal
