// CUDA gptq backend against the CPU backend: bit-identical codes and scales with the ordered
// update, row splits and chunking, the cuBLAS update's drift measured, damping and errors.
// Skips, with the reason, when no CUDA device is present.
#include "nvfp4cal/kernels/cuda_gptq.h"

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/gptq.h"
#include "tests/kernels/gptq_test_data.h"

namespace nvfp4cal {
namespace {

using ::testing::HasSubstr;

class CudaGptqTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string reason;
    if (!CudaDeviceAvailable(&reason)) GTEST_SKIP() << "no CUDA device: " << reason;
  }

  static std::unique_ptr<GptqBackend> Gpu(CudaGptqOptions options = {}) {
    absl::StatusOr<std::unique_ptr<GptqBackend>> gpu = MakeCudaGptq(options);
    EXPECT_TRUE(gpu.ok()) << gpu.status();
    return gpu.ok() ? *std::move(gpu) : nullptr;
  }
};

// Codes (elements) that differ between two results.
int64_t DifferentCodes(const QuantizedTensor& a, const QuantizedTensor& b) {
  int64_t count = 0;
  for (size_t i = 0; i < a.packed_codes.size(); ++i) {
    count += (a.packed_codes[i] & 0xF) != (b.packed_codes[i] & 0xF);
    count += (a.packed_codes[i] >> 4) != (b.packed_codes[i] >> 4);
  }
  return count;
}

struct Case {
  const char* name;
  DType dtype;
  bool act_order;
  GptqScaleSearch search;
  GptqScaleObjective objective;
  int block_columns;
};

TEST_F(CudaGptqTest, OrderedUpdateIsBitIdenticalToTheCpu) {
  // Same numerics per group (gptq_group.h) and the CPU's update order; the factor comes from
  // cuSOLVER instead of LAPACK, so a difference could only come from a factor element that
  // rounds to another float: none on these shapes (the test would show it).
  const int64_t rows = 300, cols = 384;
  const std::vector<float> h = CorrelatedHessian(cols, 600, 0.15, 31);
  const std::vector<float> w = RandomWeights(rows, cols, 32);
  std::vector<uint16_t> half(w.size());
  for (size_t i = 0; i < w.size(); ++i) half[i] = FloatToBFloat16(w[i]);
  const Case cases[] = {
      {"sweep", DType::kFloat32, false, GptqScaleSearch::kSweep, GptqScaleObjective::kHessianBlock,
       128},
      {"act_order_bf16", DType::kBFloat16, true, GptqScaleSearch::kSweep,
       GptqScaleObjective::kHessianBlock, 128},
      {"dss", DType::kFloat32, true, GptqScaleSearch::kDss, GptqScaleObjective::kHessianBlock, 64},
      {"gptq_cost", DType::kFloat32, false, GptqScaleSearch::kSweep, GptqScaleObjective::kGptqCost,
       48},
  };
  std::unique_ptr<GptqBackend> gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    GptqRequest request = MakeGptqRequest(w, rows, cols, h);
    if (c.dtype == DType::kBFloat16) request.weights = {half.data(), c.dtype, rows, cols};
    request.params.gptq.act_order = c.act_order;
    request.params.gptq.scale_search = c.search;
    request.params.gptq.scale_objective = c.objective;
    request.params.gptq.block_columns = c.block_columns;
    absl::StatusOr<QuantizedTensor> cpu = CpuGptqQuantize(request, {});
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    absl::StatusOr<QuantizedTensor> cuda = GptqQuantize(*gpu, request);
    ASSERT_TRUE(cuda.ok()) << cuda.status();
    EXPECT_EQ(DifferentCodes(*cpu, *cuda), 0);
    EXPECT_EQ(cuda->scales, cpu->scales);
    const TensorStats& a = cpu->stats;
    const TensorStats& b = cuda->stats;
    EXPECT_EQ(b.num_blocks, a.num_blocks);
    EXPECT_EQ(b.blocks_scale_changed, a.blocks_scale_changed);
    EXPECT_EQ(b.blocks_beta_not_one, a.blocks_beta_not_one);
    EXPECT_EQ(b.blocks_offset_not_zero, a.blocks_offset_not_zero);
    EXPECT_NEAR(b.hessian_error_after, a.hessian_error_after, 1e-9 * a.hessian_error_after);
    EXPECT_NEAR(b.mse_before, a.mse_before, 1e-9 * a.mse_before);
    EXPECT_NEAR(b.gptq.full_hessian_error, a.gptq.full_hessian_error,
                1e-9 * a.gptq.full_hessian_error);
    EXPECT_NEAR(b.gptq.full_hessian_error_local_hessian, a.gptq.full_hessian_error_local_hessian,
                1e-9 * a.gptq.full_hessian_error_local_hessian);
    EXPECT_LT(b.gptq.full_hessian_error, b.gptq.full_hessian_error_local_hessian);
    EXPECT_EQ(b.gptq.damping_relative, a.gptq.damping_relative);
  }
}

// The group kernel's pruned team search (a window around the `max` method's candidate, then
// the one-element bound) against the CPU's sequential pruned search, where the optimum lies far
// from the `max` candidate (outliers clipped), channel strengths span four decades (strong
// bounds), and one group of inputs is dead (an all-zero H block: no bound, every candidate
// evaluated). The local_hessian comparison's kernel prunes the same way.
TEST_F(CudaGptqTest, PrunedSearchGivesTheCpuBytesOnOutliersAndSkewedHessians) {
  const int64_t rows = 192, cols = 256;
  const std::vector<float> h = SkewedHessian(cols, 3, 81);
  const std::vector<float> w = WeightsWithOutliers(rows, cols, 82);
  std::unique_ptr<GptqBackend> gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  for (GptqScaleSearch search : {GptqScaleSearch::kSweep, GptqScaleSearch::kDss}) {
    SCOPED_TRACE(GptqScaleSearchName(search));
    GptqRequest request = MakeGptqRequest(w, rows, cols, h);
    request.params.gptq.scale_search = search;
    absl::StatusOr<QuantizedTensor> cpu = CpuGptqQuantize(request, {});
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    absl::StatusOr<QuantizedTensor> cuda = GptqQuantize(*gpu, request);
    ASSERT_TRUE(cuda.ok()) << cuda.status();
    EXPECT_EQ(DifferentCodes(*cpu, *cuda), 0);
    EXPECT_EQ(cuda->scales, cpu->scales);
    EXPECT_EQ(cuda->stats.blocks_scale_changed, cpu->stats.blocks_scale_changed);
    EXPECT_EQ(cuda->stats.blocks_beta_not_one, cpu->stats.blocks_beta_not_one);
    EXPECT_EQ(cuda->stats.blocks_offset_not_zero, cpu->stats.blocks_offset_not_zero);
    EXPECT_EQ(cuda->stats.zero_hessian_blocks, cpu->stats.zero_hessian_blocks);
    EXPECT_EQ(cpu->stats.zero_hessian_blocks, rows);
    // The comparison's local_hessian result, through its tr(E H E^T).
    EXPECT_NEAR(cuda->stats.gptq.full_hessian_error_local_hessian,
                cpu->stats.gptq.full_hessian_error_local_hessian,
                1e-9 * cpu->stats.gptq.full_hessian_error_local_hessian);
  }
}

TEST_F(CudaGptqTest, EveryInverseGivesTheBytesOfTheCpu) {
  // n = 1040: 33 diagonal leaves of 32 (the last one 16 wide), so the tree of products has
  // uneven halves; an ill-conditioned H (few tokens, strong mixing). The blocked tree with
  // DGEMMs (the default: whole blocks, their upper triangles zero) or trmm, and cuSOLVER's
  // trtri, all give the CPU's bytes.
  const int64_t rows = 48, cols = 1040;
  const std::vector<float> h = CorrelatedHessian(cols, 1100, 0.3, 41);
  const std::vector<float> w = RandomWeights(rows, cols, 42);
  GptqRequest request;
  request.weights = {w.data(), DType::kFloat32, rows, cols};
  request.hessian = {h.data(), cols};
  request.params.method = Method::kGptq;
  request.params.gptq.act_order = true;
  absl::StatusOr<QuantizedTensor> cpu = CpuGptqQuantize(request, {});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  for (CudaGptqInverse inverse : {CudaGptqInverse::kBlockedGemm, CudaGptqInverse::kBlockedTrmm,
                                  CudaGptqInverse::kCusolverTrtri}) {
    CudaGptqOptions options;
    options.inverse = inverse;
    std::unique_ptr<GptqBackend> gpu = Gpu(options);
    ASSERT_NE(gpu, nullptr);
    absl::StatusOr<QuantizedTensor> result = GptqQuantize(*gpu, request);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(DifferentCodes(*result, *cpu), 0) << static_cast<int>(inverse);
    EXPECT_EQ(result->scales, cpu->scales) << static_cast<int>(inverse);
  }
}

TEST_F(CudaGptqTest, RowSplitsAndChunksGiveTheSameBytes) {
  const int64_t rows = 333, cols = 256;
  const std::vector<float> h = CorrelatedHessian(cols, 400, 0.2, 41);
  const std::vector<float> w = RandomWeights(rows, cols, 42);
  SearchParams params;
  params.method = Method::kGptq;
  params.gptq.act_order = true;
  params.gptq.compare_local_hessian = true;
  GptqRequest request;
  request.weights = {w.data(), DType::kFloat32, rows, cols};
  request.hessian = {h.data(), cols};
  request.params = params;
  request.global_amax = 5.5f;
  std::unique_ptr<GptqBackend> gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  absl::StatusOr<QuantizedTensor> whole = GptqQuantize(*gpu, request);
  ASSERT_TRUE(whole.ok()) << whole.status();
  // A 1 MiB budget forces chunks of a few rows.
  CudaGptqOptions small;
  small.memory_budget_bytes = 1 << 20;
  std::unique_ptr<GptqBackend> chunked = Gpu(small);
  ASSERT_NE(chunked, nullptr);
  absl::StatusOr<std::shared_ptr<const GptqPlan>> plan = chunked->Prepare({h.data(), cols}, params);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<uint8_t> codes(whole->packed_codes.size()), scales(whole->scales.size());
  TensorStats stats;
  for (auto [begin, end] : {std::pair<int64_t, int64_t>{100, 333}, {0, 7}, {7, 100}}) {
    const RowRangeOutput out{
        absl::MakeSpan(codes).subspan(begin * cols / 2, (end - begin) * cols / 2),
        absl::MakeSpan(scales).subspan(begin * cols / 16, (end - begin) * cols / 16)};
    ASSERT_TRUE(
        chunked->QuantizeRows(**plan, request.weights, 5.5f, begin, end, true, out, &stats).ok());
  }
  EXPECT_EQ(codes, whole->packed_codes);
  EXPECT_EQ(scales, whole->scales);
  EXPECT_EQ(stats.num_blocks, rows * cols / 16);
  EXPECT_NEAR(stats.gptq.full_hessian_error, whole->stats.gptq.full_hessian_error,
              1e-9 * whole->stats.gptq.full_hessian_error);
  EXPECT_NEAR(stats.gptq.full_hessian_error_local_hessian,
              whole->stats.gptq.full_hessian_error_local_hessian,
              1e-9 * whole->stats.gptq.full_hessian_error_local_hessian);
  // A plan of one backend does not run on another.
  std::unique_ptr<GptqBackend> cpu = MakeCpuGptq({});
  const RowRangeOutput all{absl::MakeSpan(codes), absl::MakeSpan(scales)};
  EXPECT_THAT(
      cpu->QuantizeRows(**plan, request.weights, 5.5f, 0, rows, false, all, &stats).message(),
      HasSubstr("prepared by another backend"));
  absl::StatusOr<std::shared_ptr<const GptqPlan>> cpu_plan = cpu->Prepare({h.data(), cols}, params);
  ASSERT_TRUE(cpu_plan.ok());
  EXPECT_THAT(
      gpu->QuantizeRows(**cpu_plan, request.weights, 5.5f, 0, rows, false, all, &stats).message(),
      HasSubstr("prepared by another backend"));
}

TEST_F(CudaGptqTest, StagedCopiesGiveTheBytesOfDirectCopies) {
  // H (n = 4096, 64 MiB) crosses the two 32 MiB halves of the pinned staging; the second
  // tensor's 72 MiB of fp32 weights reuse both halves, so a half refilled before its copy to
  // the device finished would show as different bytes.
  const int64_t cols = 4096;
  const std::vector<float> h = MakeExampleFullHessian(cols, 61);
  const std::vector<uint16_t> w1 = MakeExampleWeightsBf16(2100, cols, 62);
  const std::vector<float> w2 = RandomWeights(4500, cols, 63);
  CudaGptqOptions direct_options;
  direct_options.staged_copies = false;
  std::unique_ptr<GptqBackend> staged = Gpu();
  std::unique_ptr<GptqBackend> direct = Gpu(direct_options);
  ASSERT_NE(staged, nullptr);
  ASSERT_NE(direct, nullptr);
  for (const WeightView& weights : {WeightView{w1.data(), DType::kBFloat16, 2100, cols},
                                    WeightView{w2.data(), DType::kFloat32, 4500, cols}}) {
    GptqRequest request;
    request.weights = weights;
    request.hessian = {h.data(), cols};
    request.params.method = Method::kGptq;
    absl::StatusOr<QuantizedTensor> a = GptqQuantize(*staged, request);
    ASSERT_TRUE(a.ok()) << a.status();
    absl::StatusOr<QuantizedTensor> b = GptqQuantize(*direct, request);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(DifferentCodes(*a, *b), 0) << weights.rows << " rows";
    EXPECT_EQ(a->scales, b->scales) << weights.rows << " rows";
  }
}

TEST_F(CudaGptqTest, CublasUpdateIsDeterministicAndDriftsLittle) {
  const int64_t rows = 512, cols = 512;
  const std::vector<float> h = CorrelatedHessian(cols, 800, 0.15, 51);
  const std::vector<float> w = RandomWeights(rows, cols, 52);
  GptqRequest request;
  request.weights = {w.data(), DType::kFloat32, rows, cols};
  request.hessian = {h.data(), cols};
  request.params.method = Method::kGptq;
  std::unique_ptr<GptqBackend> ordered = Gpu();
  CudaGptqOptions options;
  options.update = CudaGptqUpdate::kCublas;
  std::unique_ptr<GptqBackend> cublas = Gpu(options);
  ASSERT_NE(ordered, nullptr);
  ASSERT_NE(cublas, nullptr);
  absl::StatusOr<QuantizedTensor> a = GptqQuantize(*ordered, request);
  absl::StatusOr<QuantizedTensor> b = GptqQuantize(*cublas, request);
  absl::StatusOr<QuantizedTensor> b2 = GptqQuantize(*cublas, request);
  ASSERT_TRUE(a.ok() && b.ok() && b2.ok());
  EXPECT_EQ(b->packed_codes, b2->packed_codes);
  EXPECT_EQ(b->scales, b2->scales);
  const int64_t differ = DifferentCodes(*a, *b);
  int64_t scales_differ = 0;
  for (size_t i = 0; i < a->scales.size(); ++i) scales_differ += a->scales[i] != b->scales[i];
  std::printf(
      "cuBLAS update vs ordered (%lld x %lld): %lld of %lld codes, %lld of %zu scales "
      "differ; tr(E H E^T) %.9g vs %.9g\n",
      static_cast<long long>(rows), static_cast<long long>(cols), static_cast<long long>(differ),
      static_cast<long long>(rows * cols), static_cast<long long>(scales_differ), a->scales.size(),
      b->stats.gptq.full_hessian_error, a->stats.gptq.full_hessian_error);
  // Drift, not a different method: few codes move and the error stays within 1%.
  EXPECT_LT(differ, rows * cols / 20);
  EXPECT_NEAR(b->stats.gptq.full_hessian_error, a->stats.gptq.full_hessian_error,
              0.01 * a->stats.gptq.full_hessian_error);
}

TEST_F(CudaGptqTest, DampingAndIndefiniteHessiansAsOnTheCpu) {
  const int64_t cols = 32;
  std::unique_ptr<GptqBackend> gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  std::unique_ptr<GptqBackend> cpu = MakeCpuGptq({});
  SearchParams params;
  params.method = Method::kGptq;
  // Smallest eigenvalue -0.05: one tenfold increase of the damping, on both backends.
  const std::vector<float> slightly = PairHessian(cols, 1.05f);
  absl::StatusOr<std::shared_ptr<const GptqPlan>> g = gpu->Prepare({slightly.data(), cols}, params);
  absl::StatusOr<std::shared_ptr<const GptqPlan>> c = cpu->Prepare({slightly.data(), cols}, params);
  ASSERT_TRUE(g.ok()) << g.status();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*g)->damping_increases, 1);
  EXPECT_EQ((*g)->damping_relative, (*c)->damping_relative);
  // Smallest eigenvalue -2: beyond any automatic damping; the same error, naming the pivot.
  const std::vector<float> bad = PairHessian(cols, 3.0f);
  absl::Status gs = gpu->Prepare({bad.data(), cols}, params).status();
  absl::Status cs = cpu->Prepare({bad.data(), cols}, params).status();
  EXPECT_EQ(gs.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(gs.message(), HasSubstr("not positive definite"));
  // The same damping and column; the pivot's value comes from each library's own elimination.
  auto upto_value = [](absl::string_view m) {
    return std::string(m.substr(0, m.find(" is ", 40)));
  };
  EXPECT_EQ(upto_value(gs.message()), upto_value(cs.message())) << gs << "\n" << cs;
  // Validation before any device work.
  EXPECT_THAT(gpu->Prepare({bad.data(), 40}, params).status().message(),
              HasSubstr("hessian.n = 40"));
}

TEST_F(CudaGptqTest, AllZeroTensorAfterOtherWork) {
  const int64_t rows = 70, cols = 128;
  const std::vector<float> h = CorrelatedHessian(cols, 300, 0.2, 71);
  const std::vector<float> w = RandomWeights(rows, cols, 72);
  const std::vector<float> zeros(w.size(), 0.0f);
  std::unique_ptr<GptqBackend> gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  GptqRequest request;
  request.hessian = {h.data(), cols};
  request.params.method = Method::kGptq;
  request.weights = {w.data(), DType::kFloat32, rows, cols};
  ASSERT_TRUE(GptqQuantize(*gpu, request).ok());
  request.weights = {zeros.data(), DType::kFloat32, rows, cols};
  absl::StatusOr<QuantizedTensor> r = GptqQuantize(*gpu, request);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->packed_codes, std::vector<uint8_t>(r->packed_codes.size(), 0));
  EXPECT_EQ(r->scales, std::vector<uint8_t>(r->scales.size(), 0x01));
  absl::StatusOr<QuantizedTensor> cpu = CpuGptqQuantize(request, {});
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(r->scales, cpu->scales);
}

}  // namespace
}  // namespace nvfp4cal
