// gptq (CPU): equivalences with the block methods where no propagation is possible, an
// independent double-precision reference of the propagation, properties on correlated data,
// determinism and validation.
#include "nvfp4cal/kernels/gptq.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/gptq_group.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"
#include "tests/kernels/gptq_test_data.h"

namespace nvfp4cal {
namespace {

using ::testing::HasSubstr;

QuantizedTensor RunBlockMethod(const std::vector<float>& w, int64_t rows, int64_t cols,
                               const std::vector<float>* blocks, Method method) {
  QuantizeRequest request;
  request.weights = {w.data(), DType::kFloat32, rows, cols};
  if (blocks != nullptr) request.hessians = {blocks->data(), cols / kBlockSize};
  request.params.method = method;
  absl::StatusOr<QuantizedTensor> result = MakeCpuScaleSearch({})->Quantize(request);
  EXPECT_TRUE(result.ok()) << result.status();
  return *result;
}

// tr(E H E^T) in double for codes and scales of a tensor.
double FullHessianErrorOf(const std::vector<float>& w, int64_t rows, int64_t cols,
                          const std::vector<float>& h, const QuantizedTensor& q) {
  double total = 0.0;
  std::vector<double> e(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t byte = q.packed_codes[static_cast<size_t>((r * cols + c) / 2)];
      const uint8_t code = c % 2 == 0 ? (byte & 0xF) : (byte >> 4);
      const double d = static_cast<double>(
                           DecodeE4M3(q.scales[static_cast<size_t>((r * cols + c) / kBlockSize)])) *
                       static_cast<double>(q.global_scale);
      e[static_cast<size_t>(c)] =
          w[static_cast<size_t>(r * cols + c)] - static_cast<double>(DecodeE2M1(code)) * d;
    }
    for (int64_t a = 0; a < cols; ++a) {
      for (int64_t b = 0; b < cols; ++b) {
        total += e[static_cast<size_t>(a)] * h[static_cast<size_t>(a * cols + b)] *
                 e[static_cast<size_t>(b)];
      }
    }
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Where nothing can propagate, gptq is the block method it starts from.
// ---------------------------------------------------------------------------------------------

TEST(CpuGptq, IdentityHessianEqualsMseSweep) {
  const int64_t rows = 24, cols = 96;
  const std::vector<float> w = RandomWeights(rows, cols, 1);
  std::vector<float> h(static_cast<size_t>(cols * cols), 0.0f);
  for (int64_t i = 0; i < cols; ++i) h[static_cast<size_t>(i * cols + i)] = 1.0f;
  const QuantizedTensor mse = RunBlockMethod(w, rows, cols, nullptr, Method::kMse);
  for (bool act_order : {false, true}) {
    GptqRequest request = MakeGptqRequest(w, rows, cols, h);
    request.params.gptq.act_order = act_order;
    absl::StatusOr<QuantizedTensor> gptq = CpuGptqQuantize(request, {});
    ASSERT_TRUE(gptq.ok()) << gptq.status();
    EXPECT_EQ(gptq->scales, mse.scales) << "act_order " << act_order;
    EXPECT_EQ(gptq->packed_codes, mse.packed_codes) << "act_order " << act_order;
    EXPECT_DOUBLE_EQ(gptq->stats.mse_after, mse.stats.mse_after);
    // With H = I both full-Hessian errors are the squared error.
    EXPECT_NEAR(gptq->stats.gptq.full_hessian_error, mse.stats.mse_after,
                1e-6 * mse.stats.mse_after);  // mse_after sums fp32 block sums
    EXPECT_NEAR(gptq->stats.gptq.full_hessian_error_local_hessian, mse.stats.mse_after,
                1e-6 * mse.stats.mse_after);  // mse_after sums fp32 block sums
  }
}

TEST(CpuGptq, DiagonalHessianEqualsLocalHessianSweep) {
  const int64_t rows = 20, cols = 64;
  const std::vector<float> w = RandomWeights(rows, cols, 2);
  std::vector<float> h(static_cast<size_t>(cols * cols), 0.0f);
  ExampleRng rng(3);
  for (int64_t i = 0; i < cols; ++i) {
    h[static_cast<size_t>(i * cols + i)] = static_cast<float>(0.05 + 10.0 * rng.Uniform());
  }
  const std::vector<float> blocks = DiagonalBlocks(h, cols);
  const QuantizedTensor local = RunBlockMethod(w, rows, cols, &blocks, Method::kLocalHessian);
  const QuantizedTensor mse = RunBlockMethod(w, rows, cols, nullptr, Method::kMse);
  ASSERT_NE(local.scales, mse.scales) << "the diagonal must matter for the test to mean anything";
  for (bool act_order : {false, true}) {
    GptqRequest request = MakeGptqRequest(w, rows, cols, h);
    request.params.gptq.act_order = act_order;
    absl::StatusOr<QuantizedTensor> gptq = CpuGptqQuantize(request, {});
    ASSERT_TRUE(gptq.ok()) << gptq.status();
    EXPECT_EQ(gptq->scales, local.scales);
    EXPECT_EQ(gptq->packed_codes, local.packed_codes);
    EXPECT_DOUBLE_EQ(gptq->stats.objective_after, local.stats.objective_after);
    EXPECT_DOUBLE_EQ(gptq->stats.objective_before, local.stats.objective_before);
    EXPECT_EQ(gptq->stats.blocks_scale_changed, local.stats.blocks_scale_changed);
    EXPECT_DOUBLE_EQ(gptq->stats.gptq.full_hessian_error,
                     gptq->stats.gptq.full_hessian_error_local_hessian);
  }
}

// ---------------------------------------------------------------------------------------------
// An independent reference: GPTQ written as optimal brain surgeon updates in double precision,
// with the inverse of the not-yet-quantized part of H recomputed by Gauss-Jordan elimination for
// every column (no Cholesky factor, no lazy batches), and the scale of each group chosen by
// brute force over the 126 FP8 values with e^T H_j e in double.
// ---------------------------------------------------------------------------------------------

std::vector<double> InverseGaussJordan(std::vector<double> a, int64_t n) {
  std::vector<double> inv(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) inv[static_cast<size_t>(i * n + i)] = 1.0;
  for (int64_t c = 0; c < n; ++c) {
    int64_t pivot = c;
    for (int64_t r = c + 1; r < n; ++r) {
      if (std::fabs(a[static_cast<size_t>(r * n + c)]) >
          std::fabs(a[static_cast<size_t>(pivot * n + c)])) {
        pivot = r;
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      std::swap(a[static_cast<size_t>(c * n + k)], a[static_cast<size_t>(pivot * n + k)]);
      std::swap(inv[static_cast<size_t>(c * n + k)], inv[static_cast<size_t>(pivot * n + k)]);
    }
    const double p = a[static_cast<size_t>(c * n + c)];
    for (int64_t k = 0; k < n; ++k) {
      a[static_cast<size_t>(c * n + k)] /= p;
      inv[static_cast<size_t>(c * n + k)] /= p;
    }
    for (int64_t r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = a[static_cast<size_t>(r * n + c)];
      for (int64_t k = 0; k < n; ++k) {
        a[static_cast<size_t>(r * n + k)] -= f * a[static_cast<size_t>(c * n + k)];
        inv[static_cast<size_t>(r * n + k)] -= f * inv[static_cast<size_t>(c * n + k)];
      }
    }
  }
  return inv;
}

double RoundE2M1(double y) { return DecodeE2M1(EncodeE2M1(static_cast<float>(y))); }

struct ReferenceRow {
  std::vector<int> scale_bytes;
  std::vector<double> dequantized;
};

ReferenceRow ReferenceGptqRow(const std::vector<float>& w_row, const std::vector<float>& h,
                              int64_t n, float global_amax, double relative_damping) {
  const double s2 = static_cast<double>(global_amax / 2688.0f);
  double mean = 0.0;
  for (int64_t i = 0; i < n; ++i) mean += h[static_cast<size_t>(i * n + i)];
  mean /= static_cast<double>(n);
  std::vector<double> a(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n * n; ++i) a[static_cast<size_t>(i)] = h[static_cast<size_t>(i)];
  for (int64_t i = 0; i < n; ++i) a[static_cast<size_t>(i * n + i)] += relative_damping * mean;
  std::vector<double> w(w_row.begin(), w_row.end());
  ReferenceRow out;
  out.dequantized.assign(static_cast<size_t>(n), 0.0);
  for (int64_t g = 0; g < n / kBlockSize; ++g) {
    const int64_t c0 = g * kBlockSize;
    // Scale: brute force over the 126 candidates, independent rounding, e^T H_j e.
    int best = -1;
    double best_value = 0.0;
    for (int k = 0; k < kNumScaleCandidates; ++k) {
      const double d = static_cast<double>(DecodeE4M3(static_cast<uint8_t>(k + 1))) * s2;
      double e[kBlockSize];
      for (int i = 0; i < kBlockSize; ++i) {
        e[i] = w[static_cast<size_t>(c0 + i)] - RoundE2M1(w[static_cast<size_t>(c0 + i)] / d) * d;
      }
      double value = 0.0;
      for (int i = 0; i < kBlockSize; ++i) {
        for (int j = 0; j < kBlockSize; ++j) {
          value += e[i] * h[static_cast<size_t>((c0 + i) * n + c0 + j)] * e[j];
        }
      }
      if (best < 0 || value < best_value) {
        best = k;
        best_value = value;
      }
    }
    out.scale_bytes.push_back(best + 1);
    const double d = static_cast<double>(DecodeE4M3(static_cast<uint8_t>(best + 1))) * s2;
    // Columns in order, each error pushed onto the remaining columns through the inverse of
    // the remaining part of the damped H (optimal brain surgeon step).
    for (int64_t j = c0; j < c0 + kBlockSize; ++j) {
      const int64_t m = n - j;
      std::vector<double> sub(static_cast<size_t>(m * m));
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t c = 0; c < m; ++c) {
          sub[static_cast<size_t>(r * m + c)] = a[static_cast<size_t>((j + r) * n + j + c)];
        }
      }
      const std::vector<double> inv = InverseGaussJordan(sub, m);
      const double q = RoundE2M1(w[static_cast<size_t>(j)] / d) * d;
      const double err = (w[static_cast<size_t>(j)] - q) / inv[0];
      out.dequantized[static_cast<size_t>(j)] = q;
      for (int64_t l = 1; l < m; ++l)
        w[static_cast<size_t>(j + l)] -= err * inv[static_cast<size_t>(l)];
    }
  }
  return out;
}

// GptqChooseGroupScale's pruning (exact by construction) leaves every choice as the full
// search makes it, on groups whose best scale clips outliers far below the `max` method's and
// H blocks of channel strengths spanning four decades, one of them all zero (the CUDA group
// kernel prunes with the same bound: cuda_gptq_test compares the two on this data).
TEST(CpuGptq, PrunedGroupChoiceIsTheFullSearchs) {
  const int64_t rows = 64, cols = 256;
  const std::vector<float> h = DiagonalBlocks(SkewedHessian(cols, 3, 81), cols);
  const std::vector<float> w = WeightsWithOutliers(rows, cols, 82);
  float g = 0.0f;
  for (float v : w) g = std::max(g, std::fabs(v));
  const float s2 = GlobalScaleFromAmax(g);
  float u[kBlockSize * kBlockSize] = {};
  for (int i = 0; i < kBlockSize; ++i) u[i * kBlockSize + i] = 1.0f;
  int changed_by_dss = 0;
  for (bool dss : {false, true}) {
    const GptqGroupConfig config{false, dss, DssGrid{1, 10, 0.05f}};
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols / kBlockSize; ++j) {
        const float* hj = h.data() + j * kBlockSize * kBlockSize;
        const float* wj = w.data() + r * cols + j * kBlockSize;
        const HessianBlockBounds bounds = ComputeHessianBlockBounds(hj);
        const GptqGroupChoice pruned = GptqChooseGroupScale(wj, g, s2, hj, u, config, &bounds);
        const GptqGroupChoice full = GptqChooseGroupScale(wj, g, s2, hj, u, config, nullptr);
        ASSERT_EQ(pruned.candidate, full.candidate) << "row " << r << " group " << j;
        ASSERT_EQ(pruned.q, full.q) << "row " << r << " group " << j;
        ASSERT_EQ(pruned.dss_offset, full.dss_offset);
        ASSERT_EQ(pruned.dss_beta_index, full.dss_beta_index);
        changed_by_dss += full.dss_beta_index != 0;
      }
    }
  }
  EXPECT_GT(changed_by_dss, 0) << "DSS's own choices are compared too";
}

TEST(CpuGptq, TwoGroupsMatchIndependentReference) {
  // One row of 32 inputs (two groups) with inputs correlated across the groups: group 0's
  // errors move group 1's weights, so its codes differ from what local_hessian rounds.
  const int64_t n = 32;
  int differing_rows = 0;
  for (uint64_t seed = 10; seed < 18; ++seed) {
    const std::vector<float> w = RandomWeights(1, n, seed);
    const std::vector<float> h = CorrelatedHessian(n, 64, 0.3, seed + 100);
    GptqRequest request = MakeGptqRequest(w, 1, n, h);
    absl::StatusOr<QuantizedTensor> gptq = CpuGptqQuantize(request, {});
    ASSERT_TRUE(gptq.ok()) << gptq.status();
    const ReferenceRow ref =
        ReferenceGptqRow(w, h, n, gptq->global_amax, static_cast<double>(0.01f));
    for (int64_t g = 0; g < 2; ++g) {
      EXPECT_EQ(gptq->scales[static_cast<size_t>(g)], ref.scale_bytes[static_cast<size_t>(g)])
          << "seed " << seed << " group " << g;
    }
    for (int64_t c = 0; c < n; ++c) {
      const uint8_t byte = gptq->packed_codes[static_cast<size_t>(c / 2)];
      const uint8_t code = c % 2 == 0 ? (byte & 0xF) : (byte >> 4);
      const double d = static_cast<double>(DecodeE4M3(gptq->scales[static_cast<size_t>(c / 16)])) *
                       static_cast<double>(gptq->global_scale);
      EXPECT_DOUBLE_EQ(static_cast<double>(DecodeE2M1(code)) * d,
                       ref.dequantized[static_cast<size_t>(c)])
          << "seed " << seed << " column " << c;
    }
    // The reported full-Hessian errors are tr(E H E^T) of the codes.
    const std::vector<float> blocks = DiagonalBlocks(h, n);
    const QuantizedTensor local = RunBlockMethod(w, 1, n, &blocks, Method::kLocalHessian);
    EXPECT_NEAR(gptq->stats.gptq.full_hessian_error, FullHessianErrorOf(w, 1, n, h, *gptq),
                1e-9 * gptq->stats.gptq.full_hessian_error);
    EXPECT_NEAR(gptq->stats.gptq.full_hessian_error_local_hessian,
                FullHessianErrorOf(w, 1, n, h, local),
                1e-9 * gptq->stats.gptq.full_hessian_error_local_hessian);
    differing_rows += gptq->packed_codes != local.packed_codes;
  }
  // Propagation must actually have changed codes, or the comparison above proves nothing.
  EXPECT_GE(differing_rows, 6);
}

// ---------------------------------------------------------------------------------------------
// Properties on correlated data.
// ---------------------------------------------------------------------------------------------

struct Variant {
  const char* name;
  GptqParams params;
};

std::vector<Variant> Variants() {
  GptqParams base;
  GptqParams act = base;
  act.act_order = true;
  GptqParams cost = base;
  cost.scale_objective = GptqScaleObjective::kGptqCost;
  GptqParams dss = base;
  dss.scale_search = GptqScaleSearch::kDss;
  GptqParams small_batch = base;
  small_batch.block_columns = 16;
  return {{"default", base},
          {"act_order", act},
          {"gptq_cost", cost},
          {"dss", dss},
          {"block_columns_16", small_batch}};
}

TEST(CpuGptq, NeverWorseThanLocalHessianOnCorrelatedData) {
  const int64_t rows = 48, cols = 128;
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    const std::vector<float> w = RandomWeights(rows, cols, seed);
    const std::vector<float> h = CorrelatedHessian(cols, 512, 0.15, seed + 50);
    for (const Variant& v : Variants()) {
      GptqRequest request = MakeGptqRequest(w, rows, cols, h);
      request.params.gptq = v.params;
      request.params.gptq.compare_local_hessian = true;
      absl::StatusOr<QuantizedTensor> gptq = CpuGptqQuantize(request, {});
      ASSERT_TRUE(gptq.ok()) << gptq.status();
      const GptqStats& s = gptq->stats.gptq;
      // Propagation must buy something on correlated inputs (1% at least) and never cost.
      EXPECT_LT(s.full_hessian_error, 0.99 * s.full_hessian_error_local_hessian)
          << v.name << " seed " << seed;
      EXPECT_GT(s.full_hessian_error, 0.0);
    }
  }
}

TEST(CpuGptq, LazyBatchWidthChangesOnlyRounding) {
  const int64_t rows = 32, cols = 256;
  const std::vector<float> w = RandomWeights(rows, cols, 7);
  const std::vector<float> h = CorrelatedHessian(cols, 512, 0.1, 8);
  std::vector<QuantizedTensor> results;
  for (int width : {16, 128, 256}) {
    GptqRequest request = MakeGptqRequest(w, rows, cols, h);
    request.params.gptq.block_columns = width;
    absl::StatusOr<QuantizedTensor> r = CpuGptqQuantize(request, {});
    ASSERT_TRUE(r.ok()) << r.status();
    results.push_back(*std::move(r));
  }
  for (size_t i = 1; i < results.size(); ++i) {
    int64_t same = 0;
    for (size_t b = 0; b < results[0].scales.size(); ++b) {
      same += results[i].scales[b] == results[0].scales[b];
    }
    EXPECT_GE(static_cast<double>(same), 0.98 * static_cast<double>(results[0].scales.size()));
    EXPECT_NEAR(results[i].stats.gptq.full_hessian_error, results[0].stats.gptq.full_hessian_error,
                0.01 * results[0].stats.gptq.full_hessian_error);
  }
}

TEST(CpuGptq, DeterministicForAnyThreadCount) {
  const int64_t rows = 70, cols = 128;
  const std::vector<uint16_t> bf16 = MakeExampleWeightsBf16(rows, cols, 5);
  const std::vector<float> h = CorrelatedHessian(cols, 256, 0.2, 6);
  GptqRequest request;
  request.weights = {bf16.data(), DType::kBFloat16, rows, cols};
  request.hessian = {h.data(), cols};
  request.params.method = Method::kGptq;
  request.params.gptq.act_order = true;
  request.params.gptq.scale_search = GptqScaleSearch::kDss;
  absl::StatusOr<QuantizedTensor> one = CpuGptqQuantize(request, {1, 16});
  ASSERT_TRUE(one.ok()) << one.status();
  for (int threads : {2, 3, 8}) {
    absl::StatusOr<QuantizedTensor> many = CpuGptqQuantize(request, {threads, 16});
    ASSERT_TRUE(many.ok()) << many.status();
    EXPECT_EQ(many->packed_codes, one->packed_codes) << threads;
    EXPECT_EQ(many->scales, one->scales) << threads;
    EXPECT_EQ(many->stats.objective_after, one->stats.objective_after) << threads;
    EXPECT_EQ(many->stats.gptq.full_hessian_error, one->stats.gptq.full_hessian_error) << threads;
    EXPECT_EQ(many->stats.gptq.full_hessian_error_local_hessian,
              one->stats.gptq.full_hessian_error_local_hessian)
        << threads;
    EXPECT_EQ(many->stats.blocks_beta_not_one, one->stats.blocks_beta_not_one) << threads;
  }
}

TEST(CpuGptq, OnePlanServesRowRangesOfSeveralTensors) {
  // Rows are independent given H: one prepared plan, ranges in any split and order, and two
  // tensors sharing the Hessian give the whole-tensor bytes.
  const int64_t rows = 37, cols = 96;
  const std::vector<float> h = CorrelatedHessian(cols, 200, 0.2, 21);
  const std::vector<float> a = RandomWeights(rows, cols, 22);
  const std::vector<float> b = RandomWeights(rows, cols, 23);
  SearchParams params;
  params.method = Method::kGptq;
  params.gptq.act_order = true;
  params.gptq.compare_local_hessian = true;
  std::unique_ptr<GptqBackend> backend = MakeCpuGptq({2, 5});
  absl::StatusOr<std::shared_ptr<const GptqPlan>> plan = backend->Prepare({h.data(), cols}, params);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ((*plan)->n, cols);
  EXPECT_GT((*plan)->memory_bytes, cols * cols * 4);
  for (const std::vector<float>* w : {&a, &b}) {
    GptqRequest request = MakeGptqRequest(*w, rows, cols, h);
    request.params = params;
    request.global_amax = 6.0f;
    absl::StatusOr<QuantizedTensor> whole = CpuGptqQuantize(request, {});
    ASSERT_TRUE(whole.ok()) << whole.status();
    std::vector<uint8_t> codes(whole->packed_codes.size()), scales(whole->scales.size());
    TensorStats stats;
    const WeightView view{w->data(), DType::kFloat32, rows, cols};
    for (auto [begin, end] : {std::pair<int64_t, int64_t>{20, 37}, {0, 1}, {1, 20}}) {
      const RowRangeOutput out{
          absl::MakeSpan(codes).subspan(begin * cols / 2, (end - begin) * cols / 2),
          absl::MakeSpan(scales).subspan(begin * cols / 16, (end - begin) * cols / 16)};
      ASSERT_TRUE(backend->QuantizeRows(**plan, view, 6.0f, begin, end, true, out, &stats).ok());
    }
    EXPECT_EQ(codes, whole->packed_codes);
    EXPECT_EQ(scales, whole->scales);
    EXPECT_EQ(stats.num_blocks, rows * cols / 16);
    EXPECT_NEAR(stats.gptq.full_hessian_error, whole->stats.gptq.full_hessian_error,
                1e-9 * whole->stats.gptq.full_hessian_error);
  }
  // Checks before writing anything.
  std::vector<uint8_t> codes(static_cast<size_t>(cols / 2), 0xAB), scales(cols / 16, 0xAB);
  const RowRangeOutput one_row{absl::MakeSpan(codes), absl::MakeSpan(scales)};
  TensorStats stats;
  const WeightView narrow{a.data(), DType::kFloat32, rows * 2, cols / 2};
  absl::Status s = backend->QuantizeRows(**plan, narrow, 6.0f, 0, 1, false,
                                         RowRangeOutput{one_row.packed_codes.subspan(0, cols / 4),
                                                        one_row.scales.subspan(0, cols / 32)},
                                         &stats);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("weights.cols = 48 but the gptq plan's Hessian is [96, 96]"));
  const WeightView view{a.data(), DType::kFloat32, rows, cols};
  s = backend->QuantizeRows(**plan, view, 0.5f, 0, 1, false, one_row, &stats);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = backend->QuantizeRows(**plan, view, 6.0f, 5, 5, false, one_row, &stats);
  EXPECT_THAT(s.message(), HasSubstr("row range [5, 5)"));
  EXPECT_EQ(codes, std::vector<uint8_t>(static_cast<size_t>(cols / 2), 0xAB));
  struct OtherPlan : GptqPlan {};
  OtherPlan other;
  other.n = cols;
  s = backend->QuantizeRows(other, view, 6.0f, 0, 1, false, one_row, &stats);
  EXPECT_THAT(s.message(), HasSubstr("prepared by another backend"));
  // Prepare validates H and the parameters.
  SearchParams not_gptq = params;
  not_gptq.method = Method::kDss;
  EXPECT_THAT(backend->Prepare({h.data(), cols}, not_gptq).status().message(),
              HasSubstr("params.method = dss"));
  EXPECT_THAT(backend->Prepare({h.data(), 40}, params).status().message(),
              HasSubstr("hessian.n = 40"));
}

TEST(CpuGptq, AllZeroTensorGivesZeroCodes) {
  const int64_t rows = 3, cols = 32;
  const std::vector<float> w(static_cast<size_t>(rows * cols), 0.0f);
  const std::vector<float> h = CorrelatedHessian(cols, 64, 0.2, 1);
  absl::StatusOr<QuantizedTensor> r = CpuGptqQuantize(MakeGptqRequest(w, rows, cols, h), {});
  ASSERT_TRUE(r.ok()) << r.status();
  for (uint8_t b : r->packed_codes) EXPECT_EQ(b, 0);
  for (uint8_t s : r->scales) EXPECT_EQ(s, 0x01);
  EXPECT_EQ(r->stats.gptq.full_hessian_error, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

TEST(CpuGptq, SlightlyIndefiniteHessianRaisesDampingAndReportsIt) {
  const int64_t cols = 32;
  const std::vector<float> w = RandomWeights(2, cols, 1);
  const std::vector<float> h = PairHessian(cols, 1.05f);  // smallest eigenvalue -0.05
  absl::StatusOr<QuantizedTensor> r = CpuGptqQuantize(MakeGptqRequest(w, 2, cols, h), {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->stats.gptq.damping_increases, 1);
  EXPECT_NEAR(r->stats.gptq.damping_relative, 0.1, 1e-7);
}

TEST(CpuGptq, IndefiniteHessianIsAnErrorNamingThePivot) {
  const int64_t cols = 32;
  const std::vector<float> w = RandomWeights(2, cols, 1);
  const std::vector<float> h = PairHessian(cols, 3.0f);  // smallest eigenvalue -2
  absl::StatusOr<QuantizedTensor> r = CpuGptqQuantize(MakeGptqRequest(w, 2, cols, h), {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("not positive definite"));
  EXPECT_THAT(r.status().message(), HasSubstr("pivot of column"));
  EXPECT_THAT(r.status().message(), HasSubstr("damping 1 x mean diagonal"));
}

TEST(CpuGptq, ValidationNamesFieldLimitAndValue) {
  const int64_t cols = 32;
  const std::vector<float> w = RandomWeights(2, cols, 1);
  const std::vector<float> h = CorrelatedHessian(cols, 64, 0.2, 2);
  struct Case {
    const char* what;
    std::function<void(GptqRequest&)> change;
    absl::StatusCode code;
    const char* message;
  };
  const std::vector<float> small_h = CorrelatedHessian(16, 32, 0.2, 2);
  std::vector<float> asymmetric = h;
  asymmetric[1] += 1.0f;
  std::vector<float> negative_diagonal = h;
  negative_diagonal[static_cast<size_t>(5 * cols + 5)] = -1.0f;
  std::vector<float> nan_h = h;
  nan_h[static_cast<size_t>(3 * cols + 4)] = std::nanf("");
  const std::vector<float> zero_h(h.size(), 0.0f);
  const std::vector<Case> cases = {
      {"no hessian", [](GptqRequest& r) { r.hessian = {}; }, absl::StatusCode::kFailedPrecondition,
       "needs the full Hessian [32, 32]"},
      {"block-sized hessian",
       [&](GptqRequest& r) {
         r.hessian = {small_h.data(), 16};
       },
       absl::StatusCode::kInvalidArgument, "hessian.n = 16 but weights.cols = 32"},
      {"asymmetric", [&](GptqRequest& r) { r.hessian.data = asymmetric.data(); },
       absl::StatusCode::kInvalidArgument, "not symmetric: H[0, 1]"},
      {"negative diagonal", [&](GptqRequest& r) { r.hessian.data = negative_diagonal.data(); },
       absl::StatusCode::kInvalidArgument, "hessian[5, 5] = -1"},
      {"nan", [&](GptqRequest& r) { r.hessian.data = nan_h.data(); },
       absl::StatusCode::kInvalidArgument, "must be finite"},
      {"zero hessian", [&](GptqRequest& r) { r.hessian.data = zero_h.data(); },
       absl::StatusCode::kInvalidArgument, "every diagonal element is 0"},
      {"damping", [](GptqRequest& r) { r.params.gptq.damping = -0.5f; },
       absl::StatusCode::kInvalidArgument, "params.gptq.damping = -0.5 is out of range [0, 10]"},
      {"block columns", [](GptqRequest& r) { r.params.gptq.block_columns = 20; },
       absl::StatusCode::kInvalidArgument,
       "params.gptq.block_columns = 20 must be a multiple of 16 in [16, 8192]"},
      {"beta step", [](GptqRequest& r) { r.params.beta_step = 0.001f; },
       absl::StatusCode::kInvalidArgument, "params.beta_step = 0.001 is out of range"},
      {"method", [](GptqRequest& r) { r.params.method = Method::kDss; },
       absl::StatusCode::kInvalidArgument, "runs method gptq only"},
      {"amax", [](GptqRequest& r) { r.global_amax = 1e-3f; }, absl::StatusCode::kInvalidArgument,
       "global"},
  };
  for (const Case& c : cases) {
    GptqRequest request = MakeGptqRequest(w, 2, cols, h);
    c.change(request);
    absl::StatusOr<QuantizedTensor> r = CpuGptqQuantize(request, {});
    ASSERT_FALSE(r.ok()) << c.what;
    EXPECT_EQ(r.status().code(), c.code) << c.what << ": " << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(c.message)) << c.what;
  }
}

TEST(CpuGptq, ValuesCheckedByTheHolderSkipOnlyTheTilePass) {
  // A holder that checked H's values (the CLI's reader) sets values_checked: the O(n^2) pass is
  // skipped, so an asymmetric H it vouched for passes, while the diagonal, shape and parameters
  // are still checked.
  const int64_t cols = 32;
  const std::vector<float> h = CorrelatedHessian(cols, 64, 0.2, 2);
  SearchParams params;
  params.method = Method::kGptq;
  std::vector<float> asymmetric = h;
  asymmetric[1] += 1.0f;
  std::vector<float> negative_diagonal = h;
  negative_diagonal[static_cast<size_t>(5 * cols + 5)] = -1.0f;
  EXPECT_THAT(ValidateGptqHessian({asymmetric.data(), cols}, params).message(),
              HasSubstr("not symmetric"));
  EXPECT_TRUE(ValidateGptqHessian({asymmetric.data(), cols, true}, params).ok());
  EXPECT_TRUE(ValidateGptqHessian({h.data(), cols, true}, params).ok());
  EXPECT_THAT(ValidateGptqHessian({negative_diagonal.data(), cols, true}, params).message(),
              HasSubstr("hessian[5, 5] = -1"));
  EXPECT_THAT(ValidateGptqHessian({h.data(), 24, true}, params).message(),
              HasSubstr("hessian.n = 24"));
  SearchParams wrong = params;
  wrong.gptq.damping = -0.5f;
  EXPECT_THAT(ValidateGptqHessian({h.data(), cols, true}, wrong).message(),
              HasSubstr("params.gptq.damping"));
}

TEST(CpuGptq, BlockHessianBackendsRefuseGptq) {
  const std::vector<float> w = RandomWeights(2, 32, 1);
  const std::vector<float> blocks = DiagonalBlocks(CorrelatedHessian(32, 64, 0.2, 2), 32);
  QuantizeRequest request;
  request.weights = {w.data(), DType::kFloat32, 2, 32};
  request.hessians = {blocks.data(), 2};
  request.params.method = Method::kGptq;
  absl::StatusOr<QuantizedTensor> r = MakeCpuScaleSearch({})->Quantize(request);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(r.status().message(), HasSubstr("needs the full [in, in] Hessian"));
}

TEST(CpuGptq, ParsesItsNames) {
  EXPECT_EQ(*ParseMethod("gptq"), Method::kGptq);
  EXPECT_TRUE(MethodNeedsHessian(Method::kGptq));
  EXPECT_EQ(*ParseGptqScaleObjective("gptq_cost"), GptqScaleObjective::kGptqCost);
  EXPECT_EQ(*ParseGptqScaleObjective("hessian_block"), GptqScaleObjective::kHessianBlock);
  EXPECT_EQ(*ParseGptqScaleSearch("dss"), GptqScaleSearch::kDss);
  EXPECT_THAT(ParseGptqScaleSearch("x").status().message(),
              HasSubstr("expected one of sweep, dss"));
  EXPECT_THAT(ParseGptqScaleObjective("x").status().message(),
              HasSubstr("expected one of hessian_block, gptq_cost"));
}

// A backend whose Prepare counts its calls, takes a while (so that callers overlap) and
// succeeds or fails as told; QuantizeRows is never called.
class CountingGptq : public GptqBackend {
 public:
  explicit CountingGptq(bool fail) : fail_(fail) {}
  std::string_view BackendName() const override { return "counting"; }
  absl::StatusOr<std::shared_ptr<const GptqPlan>> Prepare(const FullHessianView& hessian,
                                                          const SearchParams& params) override {
    prepares_.fetch_add(1);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (fail_) return absl::InvalidArgumentError("hessian is not symmetric (test)");
    auto plan = std::make_shared<GptqPlan>();
    plan->n = hessian.n;
    plan->params = params;
    return plan;
  }
  absl::Status QuantizeRows(const GptqPlan&, const WeightView&, float, int64_t, int64_t, bool,
                            RowRangeOutput, TensorStats*) override {
    return absl::InternalError("not used");
  }
  int prepares() const { return prepares_.load(); }

 private:
  const bool fail_;
  std::atomic<int> prepares_{0};
};

TEST(SharedGptqPlan, PreparedOnceForConcurrentCallersAndReleased) {
  for (const bool fail : {false, true}) {
    CountingGptq backend(fail);
    SharedGptqPlan cell;
    std::atomic<int> hooks{0};
    const std::vector<float> h(32 * 32, 0.0f);
    std::vector<absl::StatusOr<std::shared_ptr<const GptqPlan>>> got(8);
    std::vector<std::thread> callers;
    for (size_t i = 0; i < got.size(); ++i) {
      callers.emplace_back([&, i] {
        got[i] = cell.Get(backend, {h.data(), 32}, SearchParams{},
                          [&](const absl::StatusOr<std::shared_ptr<const GptqPlan>>& p) {
                            hooks.fetch_add(1);
                            EXPECT_EQ(p.ok(), !fail);
                          });
      });
    }
    for (std::thread& t : callers) t.join();
    EXPECT_EQ(backend.prepares(), 1);
    EXPECT_EQ(hooks.load(), 1);
    EXPECT_EQ(cell.prepared(), !fail);
    for (const auto& g : got) {
      ASSERT_EQ(g.ok(), !fail);
      if (fail) {
        EXPECT_THAT(g.status().message(), HasSubstr("not symmetric"));
      } else {
        EXPECT_EQ(g->get(), got[0]->get());  // the very same plan
      }
    }
    cell.Release();
    const absl::StatusOr<std::shared_ptr<const GptqPlan>> after =
        cell.Get(backend, {h.data(), 32}, SearchParams{});
    EXPECT_EQ(backend.prepares(), 1);  // never prepared again
    if (fail) {
      EXPECT_THAT(after.status().message(), HasSubstr("not symmetric"));  // the failure stays
    } else {
      EXPECT_EQ(after.status().code(), absl::StatusCode::kFailedPrecondition);
      EXPECT_THAT(after.status().message(), HasSubstr("released"));
      EXPECT_EQ(got[0]->use_count(), static_cast<long>(got.size()));  // callers keep theirs
    }
  }
}

}  // namespace
}  // namespace nvfp4cal
