// Method gptq through the Quantize stream: full Hessians in FULL and FULL_UPPER layout, results
// byte-identical to the in-process CPU backend, one plan per shared Hessian, the server-wide and
// per-session full-Hessian budgets, and the errors of Hessians gptq cannot use.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/gptq.h"
#include "server/calibration_server.h"
#include "tests/server/gptq_test_util.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::AppendTensor;
using ::nvfp4cal::server::testing::CorrelatedHessian;
using ::nvfp4cal::server::testing::GptqReference;
using ::nvfp4cal::server::testing::GptqTensor;
using ::nvfp4cal::server::testing::HeaderOf;
using ::nvfp4cal::server::testing::MakeGptqTensor;
using ::nvfp4cal::server::testing::MakeTensor;
using ::nvfp4cal::server::testing::MetricValue;
using ::nvfp4cal::server::testing::RunSession;
using ::nvfp4cal::server::testing::Scrape;
using ::nvfp4cal::server::testing::SessionResult;
using ::nvfp4cal::server::testing::TestTensor;
using ::nvfp4cal::server::testing::UpperTriangle;
using ::nvfp4cal::server::testing::WeightChunkOf;
using ::testing::HasSubstr;

void SetGptqParameters(const SearchParams& p, v1::QuantizeRequest* header) {
  v1::MethodConfig* m = header->mutable_header()->mutable_method();
  m->set_damping(p.gptq.damping);
  m->set_act_order(p.gptq.act_order);
  m->set_block_columns(p.gptq.block_columns);
  m->set_scale_objective(std::string(GptqScaleObjectiveName(p.gptq.scale_objective)));
  m->set_scale_search(std::string(GptqScaleSearchName(p.gptq.scale_search)));
  m->set_beta_step(p.beta_step);
  if (p.gptq.compare_local_hessian) m->set_compare_local_hessian(true);  // else unset: off
}

void AppendGptq(const GptqTensor& g, std::vector<v1::QuantizeRequest>* out) {
  const size_t header = out->size();
  AppendTensor(g.tensor, out);
  SetGptqParameters(g.params, &(*out)[header]);
}

// relative_tolerance: of the full-Hessian errors (0: equal to 4 ulps, the CPU's sums); the
// GPU's come from cuBLAS in another summation order.
void ExpectMatchesGptqReference(const SessionResult& result, const GptqTensor& g,
                                double relative_tolerance = 0.0) {
  const TestTensor& t = g.tensor;
  SCOPED_TRACE(t.name);
  ASSERT_TRUE(result.tensors.count(t.name));
  const auto& got = result.tensors.at(t.name);
  const QuantizedTensor want = GptqReference(g);
  EXPECT_EQ(got.rows_covered, t.rows);
  EXPECT_EQ(got.packed_codes, std::string(want.packed_codes.begin(), want.packed_codes.end()));
  EXPECT_EQ(got.scales, std::string(want.scales.begin(), want.scales.end()));
  ASSERT_TRUE(got.summary.has_value());
  const v1::TensorSummary& s = *got.summary;
  EXPECT_EQ(s.global_amax(), want.global_amax);
  const v1::TensorStatistics& stats = s.stats();
  EXPECT_EQ(stats.method(), "gptq");
  EXPECT_EQ(stats.params().act_order(), g.params.gptq.act_order);
  EXPECT_EQ(stats.params().scale_search(), GptqScaleSearchName(g.params.gptq.scale_search));
  EXPECT_EQ(stats.num_blocks(), want.stats.num_blocks);
  EXPECT_EQ(stats.blocks_scale_changed(), want.stats.blocks_scale_changed);
  EXPECT_EQ(stats.blocks_beta_not_one(), want.stats.blocks_beta_not_one);
  if (relative_tolerance == 0.0) {
    EXPECT_DOUBLE_EQ(stats.full_hessian_error(), want.stats.gptq.full_hessian_error);
    EXPECT_DOUBLE_EQ(stats.full_hessian_error_local_hessian(),
                     want.stats.gptq.full_hessian_error_local_hessian);
  } else {
    EXPECT_NEAR(stats.full_hessian_error(), want.stats.gptq.full_hessian_error,
                relative_tolerance * want.stats.gptq.full_hessian_error);
    EXPECT_NEAR(stats.full_hessian_error_local_hessian(),
                want.stats.gptq.full_hessian_error_local_hessian,
                relative_tolerance * want.stats.gptq.full_hessian_error_local_hessian);
  }
  EXPECT_EQ(stats.params().compare_local_hessian(), g.params.gptq.compare_local_hessian);
  if (g.params.gptq.compare_local_hessian) {
    EXPECT_GT(stats.full_hessian_error(), 0.0);
    EXPECT_GT(stats.full_hessian_error_local_hessian(), stats.full_hessian_error());
  } else {
    EXPECT_EQ(stats.full_hessian_error(), 0.0);
    EXPECT_EQ(stats.full_hessian_error_local_hessian(), 0.0);
    EXPECT_EQ(stats.gptq_compare_seconds(), 0.0);
  }
  EXPECT_DOUBLE_EQ(stats.damping_relative(), want.stats.gptq.damping_relative);
  EXPECT_EQ(stats.damping_increases(), want.stats.gptq.damping_increases);
  EXPECT_GT(stats.factor_seconds(), 0.0);
}

class GptqSessionTest : public ::testing::Test {
 public:
  void SetUp() override { Start({}); }

  void Start(const ServiceLimits& limits, bool with_metrics = false,
             const std::string& device = "cpu") {
    server_.reset();
    ServerOptions options;
    options.address = "127.0.0.1:0";
    options.metrics_address = with_metrics ? "127.0.0.1:0" : "";
    options.devices.device = device;
    options.drain_timeout = absl::Seconds(5);
    options.devices.cpu_workers = 2;
    options.devices.cpu_threads_per_worker = 1;
    options.limits = limits;
    options.limits.max_rows_per_item = 16;  // several items per tensor
    options.limits.max_inflight_chunks_per_stream = 2;
    server_ = std::make_unique<CalibrationServer>(options);
    ASSERT_TRUE(server_->Start().ok());
    stub_ = v1::Calibrator::NewStub(
        grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  }

  SessionResult Run(const std::vector<v1::QuantizeRequest>& requests) {
    return RunSession(stub_.get(), requests);
  }

  void ExpectFullHessiansReleased() { testing::ExpectFullHessiansReleased(*server_); }

  std::unique_ptr<CalibrationServer> server_;
  std::unique_ptr<v1::Calibrator::Stub> stub_;
};

// q/k/v and gate/up with shared Hessians in both layouts and several parameter sets, checked
// against in-process CPU gptq.
void RunSharedHessiansSession(GptqSessionTest* test, double relative_tolerance);

TEST_F(GptqSessionTest, SharedHessiansInBothLayoutsAreByteIdenticalToInProcessGptq) {
  RunSharedHessiansSession(this, 0.0);
}

TEST_F(GptqSessionTest, OnTheGpuTheBytesAreTheCpus) {
  // The CUDA backend makes the CPU's choices and propagation bit for bit (docs/numerics.md §6).
  std::string reason;
  if (!CudaDeviceAvailable(&reason)) GTEST_SKIP() << "no CUDA device: " << reason;
  Start({}, false, "cuda");
  RunSharedHessiansSession(this, 1e-9);
}

void RunSharedHessiansSession(GptqSessionTest* test, double relative_tolerance) {
  constexpr int64_t kCols = 128;
  const std::vector<float> attn = CorrelatedHessian(kCols, 256, 11);
  const std::vector<float> mlp = CorrelatedHessian(kCols, 256, 12);
  std::vector<GptqTensor> tensors;
  // q/k/v: one Hessian in the upper layout, act-order with the dss scale search, a shared g.
  for (const char* name : {"q_proj", "k_proj", "v_proj"}) {
    tensors.push_back(MakeGptqTensor(name, 40, kCols, DType::kBFloat16, "attn", attn,
                                     v1::HESSIAN_LAYOUT_FULL_UPPER, tensors.size() + 20));
    tensors.back().tensor.send_hessian = tensors.size() == 1;
    tensors.back().params.gptq.act_order = true;
    tensors.back().params.gptq.scale_search = GptqScaleSearch::kDss;
    tensors.back().tensor.global_amax = 6.5f;
  }
  // k_proj without the comparison shares q/v's plan (the comparison is not part of a plan).
  tensors[1].params.gptq.compare_local_hessian = false;
  // gate (buffered: the server computes g) and up in the full layout, default parameters.
  tensors.push_back(MakeGptqTensor("gate_proj", 33, kCols, DType::kFloat32, "mlp", mlp,
                                   v1::HESSIAN_LAYOUT_FULL, 30));
  tensors.push_back(MakeGptqTensor("up_proj", 24, kCols, DType::kFloat16, "mlp", mlp,
                                   v1::HESSIAN_LAYOUT_FULL, 31));
  tensors.back().tensor.send_hessian = false;
  tensors.back().tensor.global_amax = 7.0f;
  tensors.back().params.gptq.scale_objective = GptqScaleObjective::kGptqCost;
  tensors.back().params.gptq.block_columns = 32;

  std::vector<v1::QuantizeRequest> requests;
  for (const GptqTensor& g : tensors) AppendGptq(g, &requests);
  SessionResult result = test->Run(requests);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  for (const GptqTensor& g : tensors) ExpectMatchesGptqReference(result, g, relative_tolerance);
  test->ExpectFullHessiansReleased();
}

TEST_F(GptqSessionTest, WholeTensorResultsAreSplitIntoMessagesOfTheLimit) {
  // gptq items are whole tensors; their results go out in pieces of max_result_chunk_bytes.
  ServiceLimits limits;
  limits.max_result_chunk_bytes = 500;  // 13 rows of 64 columns (36 bytes each)
  Start(limits);
  const std::vector<float> h = CorrelatedHessian(64, 128, 13);
  GptqTensor g =
      MakeGptqTensor("w", 100, 64, DType::kBFloat16, "h", h, v1::HESSIAN_LAYOUT_FULL, 14);
  std::vector<v1::QuantizeRequest> requests;
  AppendGptq(g, &requests);
  SessionResult result = Run(requests);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ExpectMatchesGptqReference(result, g);
  EXPECT_EQ(result.tensors.at("w").result_chunks, 8);  // ceil(100 / 13)
}

TEST_F(GptqSessionTest, OnePlanPerSharedHessianAndBytesReleasedAfterTheSession) {
  Start({}, /*with_metrics=*/true);
  constexpr int64_t kCols = 64;
  const std::vector<float> h = CorrelatedHessian(kCols, 128, 5);
  std::vector<v1::QuantizeRequest> requests;
  std::vector<GptqTensor> tensors;
  for (const char* name : {"q", "k", "v"}) {
    tensors.push_back(MakeGptqTensor(name, 48, kCols, DType::kBFloat16, "attn", h,
                                     v1::HESSIAN_LAYOUT_FULL_UPPER, tensors.size() + 40));
    tensors.back().tensor.send_hessian = tensors.size() == 1;
    tensors.back().tensor.global_amax = 8.0f;
    AppendGptq(tensors.back(), &requests);
  }
  SessionResult result = Run(requests);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  for (const GptqTensor& g : tensors) ExpectMatchesGptqReference(result, g);
  // Nine items over two workers, one factorisation.
  const std::string text = Scrape(server_->metrics_port());
  EXPECT_EQ(MetricValue(text, "nvfp4cal_gptq_plans_prepared_total{backend=\"cpu\"}"), 1) << text;
  ExpectFullHessiansReleased();
  const std::string after = Scrape(server_->metrics_port());
  EXPECT_EQ(MetricValue(after, "nvfp4cal_full_hessian_bytes"), 0);
  EXPECT_EQ(MetricValue(after, "nvfp4cal_gptq_plan_bytes"), 0);
}

TEST_F(GptqSessionTest, ServerBudgetRefusesHessianChunksThatDoNotFitBesideAnotherSessions) {
  constexpr int64_t kCols = 64;  // 16384 bytes as a full Hessian
  ServiceLimits limits;
  limits.max_full_hessian_bytes = 20000;
  Start(limits);
  const std::vector<float> h = CorrelatedHessian(kCols, 64, 6);
  // Session A defines its Hessian (header and the 3 Hessian chunks, no weights yet, so no plan)
  // and keeps the stream open.
  GptqTensor a =
      MakeGptqTensor("a", 16, kCols, DType::kFloat32, "h", h, v1::HESSIAN_LAYOUT_FULL, 50);
  std::vector<v1::QuantizeRequest> first;
  AppendGptq(a, &first);
  constexpr size_t kHeaderAndHessian = 4;
  grpc::ClientContext context;
  auto stream = stub_->Quantize(&context);
  for (size_t i = 0; i < kHeaderAndHessian; ++i) ASSERT_TRUE(stream->Write(first[i]));
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  // The budget is charged chunk by chunk: wait for all three.
  while (server_->full_hessian_bytes_in_use() < kCols * kCols * 4 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  ASSERT_EQ(server_->full_hessian_bytes_in_use(), kCols * kCols * 4);
  // Session B: refused once its chunks pass what the budget has left.
  GptqTensor b =
      MakeGptqTensor("b", 16, kCols, DType::kFloat32, "h", h, v1::HESSIAN_LAYOUT_FULL_UPPER, 51);
  std::vector<v1::QuantizeRequest> second;
  AppendGptq(b, &second);
  const grpc::Status refused = Run(second).status;
  EXPECT_EQ(refused.error_code(), grpc::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr("Hessian 'h' of tensor 'b' needs "));
  EXPECT_THAT(
      refused.error_message(),
      HasSubstr("bytes of full Hessians and gptq plans and max_full_hessian_bytes = 20000"));
  EXPECT_EQ(server_->full_hessian_bytes_in_use(), kCols * kCols * 4);
  // A finishes normally; afterwards nothing is held.
  for (size_t i = kHeaderAndHessian; i < first.size(); ++i) ASSERT_TRUE(stream->Write(first[i]));
  ASSERT_TRUE(stream->WritesDone());
  v1::QuantizeResponse response;
  int summaries = 0;
  while (stream->Read(&response)) summaries += response.has_summary() ? 1 : 0;
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(summaries, 1);
  ExpectFullHessiansReleased();
  // The budget is free again: B now runs.
  SessionResult again = Run(second);
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  ExpectMatchesGptqReference(again, b);
  ExpectFullHessiansReleased();
}

// A stream that sends a gptq header and stalls holds none of the server-wide budget: the
// Hessian is charged as its chunks arrive. (Reserved at the header, two such streams locked
// every other gptq session out.)
TEST_F(GptqSessionTest, AStalledHeaderHoldsNoFullHessianBudget) {
  constexpr int64_t kCols = 64;  // 16384 bytes as a full Hessian
  ServiceLimits limits;
  limits.max_full_hessian_bytes = 20000;
  Start(limits);
  const std::vector<float> h = CorrelatedHessian(kCols, 64, 8);
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReaderWriter<v1::QuantizeRequest, v1::QuantizeResponse>>>
      stalled;
  for (int i = 0; i < 3; ++i) {
    GptqTensor t = MakeGptqTensor(absl::StrCat("stalled", i), 16, kCols, DType::kFloat32, "h", h,
                                  v1::HESSIAN_LAYOUT_FULL, 60 + i);
    std::vector<v1::QuantizeRequest> requests;
    AppendGptq(t, &requests);
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    stalled.push_back(stub_->Quantize(contexts.back().get()));
    ASSERT_TRUE(stalled.back()->Write(requests[0]));  // the header only
  }
  // The headers were read (a session without the budget would have refused them by now).
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(server_->full_hessian_bytes_in_use(), 0);
  GptqTensor b =
      MakeGptqTensor("b", 16, kCols, DType::kFloat32, "h", h, v1::HESSIAN_LAYOUT_FULL_UPPER, 70);
  std::vector<v1::QuantizeRequest> requests;
  AppendGptq(b, &requests);
  SessionResult result = Run(requests);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ExpectMatchesGptqReference(result, b);
  for (size_t i = 0; i < stalled.size(); ++i) contexts[i]->TryCancel();
  for (auto& stream : stalled) stream->Finish().IgnoreError();
  ExpectFullHessiansReleased();
}

TEST_F(GptqSessionTest, SessionLimitRefusesTheSecondFullHessian) {
  ServiceLimits limits;
  limits.max_session_full_hessian_bytes = 30000;
  Start(limits);
  const std::vector<float> h = CorrelatedHessian(64, 64, 7);
  std::vector<v1::QuantizeRequest> requests;
  AppendGptq(MakeGptqTensor("a", 16, 64, DType::kFloat32, "h1", h, v1::HESSIAN_LAYOUT_FULL, 1),
             &requests);
  AppendGptq(MakeGptqTensor("b", 16, 64, DType::kFloat32, "h2", h, v1::HESSIAN_LAYOUT_FULL, 2),
             &requests);
  const grpc::Status status = Run(requests).status;
  EXPECT_EQ(status.error_code(), grpc::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(),
              HasSubstr("Hessian 'h2' of tensor 'b' needs 16384 bytes as a full Hessian; the "
                        "session holds 16384 bytes of full Hessians and "
                        "max_session_full_hessian_bytes = 30000"));
  ExpectFullHessiansReleased();
}

TEST_F(GptqSessionTest, ReleasedHessiansStopCountingAndCanBeDefinedAgain) {
  // The limit holds one full Hessian; with release_after on each Hessian's last tensor the
  // session goes through three of them, and a released name can be defined again.
  ServiceLimits limits;
  limits.max_session_full_hessian_bytes = 30000;
  Start(limits);
  const std::vector<float> h1 = CorrelatedHessian(64, 64, 7);
  const std::vector<float> h2 = CorrelatedHessian(64, 64, 8);
  std::vector<GptqTensor> tensors;
  tensors.push_back(
      MakeGptqTensor("a", 16, 64, DType::kFloat32, "h1", h1, v1::HESSIAN_LAYOUT_FULL, 1));
  tensors.push_back(
      MakeGptqTensor("b", 24, 64, DType::kFloat32, "h1", h1, v1::HESSIAN_LAYOUT_FULL, 2));
  tensors.back().tensor.send_hessian = false;
  tensors.push_back(
      MakeGptqTensor("c", 16, 64, DType::kFloat32, "h2", h2, v1::HESSIAN_LAYOUT_FULL, 3));
  tensors.push_back(
      MakeGptqTensor("d", 16, 64, DType::kFloat32, "h1", h2, v1::HESSIAN_LAYOUT_FULL, 4));
  std::vector<v1::QuantizeRequest> requests;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const size_t header = requests.size();
    AppendGptq(tensors[i], &requests);
    // b is h1's last user, c is h2's; d defines h1 again (with h2's values) and releases it.
    if (i != 0) requests[header].mutable_header()->mutable_hessian()->set_release_after(true);
  }
  SessionResult result = Run(requests);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  for (const GptqTensor& g : tensors) ExpectMatchesGptqReference(result, g);
  ExpectFullHessiansReleased();
  // Without the release the second Hessian exceeds the session's limit.
  requests.clear();
  for (const GptqTensor& g : tensors) AppendGptq(g, &requests);
  EXPECT_EQ(Run(requests).status.error_code(), grpc::RESOURCE_EXHAUSTED);
  // A released name is unknown: reusing it without chunks is an error, not the old matrix.
  requests.clear();
  AppendGptq(tensors[0], &requests);
  requests[0].mutable_header()->mutable_hessian()->set_release_after(true);
  AppendGptq(tensors[1], &requests);  // "h1" again without its chunks
  EXPECT_FALSE(Run(requests).status.ok());
}

TEST_F(GptqSessionTest, HessiansKeptAsBlocksCannotServeGptq) {
  const std::vector<float> h = CorrelatedHessian(64, 64, 8);
  // gptq defining a Hessian in the block layout.
  {
    TestTensor t = MakeTensor("w", 16, 64, DType::kFloat32, "gptq", "h", 3);
    const grpc::Status status = Run({HeaderOf(t)}).status;
    EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(),
                HasSubstr("header.hessian.layout = BLOCK_DIAGONAL for Hessian 'h' of tensor 'w', "
                          "but method gptq propagates errors across blocks"));
  }
  // A full Hessian defined by a block method is kept as blocks only.
  {
    GptqTensor first =
        MakeGptqTensor("a", 16, 64, DType::kFloat32, "h", h, v1::HESSIAN_LAYOUT_FULL, 4);
    first.tensor.method = "dss";
    std::vector<v1::QuantizeRequest> requests;
    AppendTensor(first.tensor, &requests);
    GptqTensor second =
        MakeGptqTensor("b", 16, 64, DType::kFloat32, "h", h, v1::HESSIAN_LAYOUT_FULL, 5);
    second.tensor.send_hessian = false;
    AppendGptq(second, &requests);
    const grpc::Status status = Run(requests).status;
    EXPECT_EQ(status.error_code(), grpc::FAILED_PRECONDITION);
    EXPECT_THAT(status.error_message(),
                HasSubstr("Hessian 'h' is kept as diagonal blocks only (it was defined by tensor "
                          "'a' with method dss), but method gptq of tensor 'b' needs the full "
                          "matrix"));
  }
  ExpectFullHessiansReleased();
}

TEST_F(GptqSessionTest, BlockMethodsReuseAHessianDefinedForGptq) {
  constexpr int64_t kCols = 64;
  const std::vector<float> h = CorrelatedHessian(kCols, 128, 9);
  GptqTensor g = MakeGptqTensor("q", 32, kCols, DType::kBFloat16, "attn", h,
                                v1::HESSIAN_LAYOUT_FULL_UPPER, 60);
  TestTensor k = MakeTensor("k", 32, kCols, DType::kBFloat16, "dss", "attn", 61);
  k.send_hessian = false;
  k.blocks.assign(static_cast<size_t>(kCols * 16), 0.0f);
  for (int64_t j = 0; j < kCols / 16; ++j) {
    for (int a = 0; a < 16; ++a) {
      for (int b = 0; b < 16; ++b) {
        k.blocks[static_cast<size_t>(j * 256 + a * 16 + b)] =
            h[static_cast<size_t>((j * 16 + a) * kCols + j * 16 + b)];
      }
    }
  }
  std::vector<v1::QuantizeRequest> requests;
  AppendGptq(g, &requests);
  AppendTensor(k, &requests);
  SessionResult result = Run(requests);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ExpectMatchesGptqReference(result, g);
  const QuantizedTensor want = testing::Reference(k);
  EXPECT_EQ(result.tensors.at("k").packed_codes,
            std::string(want.packed_codes.begin(), want.packed_codes.end()));
  EXPECT_EQ(result.tensors.at("k").scales, std::string(want.scales.begin(), want.scales.end()));
}

TEST_F(GptqSessionTest, InvalidFullHessiansEndTheSessionNamingTheTensor) {
  constexpr int64_t kCols = 64;
  std::vector<float> asymmetric = CorrelatedHessian(kCols, 64, 10);
  asymmetric[3 * kCols + 40] += 1.0f;
  std::vector<float> indefinite(static_cast<size_t>(kCols * kCols), -0.5f);
  for (int64_t i = 0; i < kCols; ++i) indefinite[static_cast<size_t>(i * kCols + i)] = 1.0f;
  struct Case {
    std::vector<float> h;
    std::string message;
  };
  for (const Case& c : {Case{asymmetric,
                             "tensor 'w' rows [0, 16): Hessian 'h': hessian is not symmetric: "
                             "H[3, 40]"},
                        Case{indefinite,
                             "tensor 'w' rows [0, 16): Hessian 'h': hessian is not positive "
                             "definite even with damping"}}) {
    std::vector<v1::QuantizeRequest> requests;
    AppendGptq(
        MakeGptqTensor("w", 16, kCols, DType::kFloat32, "h", c.h, v1::HESSIAN_LAYOUT_FULL, 70),
        &requests);
    const grpc::Status status = Run(requests).status;
    EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.message));
  }
  ExpectFullHessiansReleased();
}

TEST_F(GptqSessionTest, UpperLayoutSizeIsChecked) {
  constexpr int64_t kCols = 64;
  const std::vector<float> h = CorrelatedHessian(kCols, 64, 11);
  // The whole matrix sent where the header declared the upper triangle (2080 elements).
  GptqTensor t =
      MakeGptqTensor("w", 16, kCols, DType::kFloat32, "h", h, v1::HESSIAN_LAYOUT_FULL_UPPER, 80);
  t.tensor.hessian = h;
  std::vector<v1::QuantizeRequest> requests;
  AppendGptq(t, &requests);
  grpc::Status status = Run(requests).status;
  EXPECT_EQ(status.error_code(), grpc::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(),
              HasSubstr("goes beyond the declared shape of Hessian 'h' (2080 elements)"));
  // Too few elements: the weights arrive before the Hessian is complete.
  t.tensor.hessian = UpperTriangle(h, kCols);
  t.tensor.hessian.resize(2000);
  requests.clear();
  AppendGptq(t, &requests);
  status = Run(requests).status;
  EXPECT_EQ(status.error_code(), grpc::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(),
              HasSubstr("before its Hessian 'h' was complete: 2000 of 2080 elements received"));
  ExpectFullHessiansReleased();
}

TEST_F(GptqSessionTest, ParametersAreCheckedAndAdvertised) {
  const std::vector<float> h = CorrelatedHessian(64, 64, 12);
  GptqTensor t = MakeGptqTensor("w", 16, 64, DType::kFloat32, "h", h, v1::HESSIAN_LAYOUT_FULL, 90);
  std::vector<v1::QuantizeRequest> requests;
  AppendGptq(t, &requests);
  requests[0].mutable_header()->mutable_method()->set_block_columns(20);
  grpc::Status status = Run(requests).status;
  EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("params.gptq.block_columns = 20 must be"));
  requests[0].mutable_header()->mutable_method()->set_block_columns(64);
  requests[0].mutable_header()->mutable_method()->set_scale_objective("mse");
  status = Run(requests).status;
  EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("gptq.scale_objective: unknown value \"mse\""));

  grpc::ClientContext context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
  const v1::MethodInfo* gptq = nullptr;
  for (const v1::MethodInfo& m : info.methods()) {
    if (m.name() == "gptq") gptq = &m;
  }
  ASSERT_NE(gptq, nullptr);
  EXPECT_TRUE(gptq->needs_hessian());
  EXPECT_THAT(gptq->hessian_layouts(),
              ::testing::ElementsAre(v1::HESSIAN_LAYOUT_FULL, v1::HESSIAN_LAYOUT_FULL_UPPER));
  std::map<std::string, v1::ParameterRange> ranges;
  for (const v1::ParameterRange& r : gptq->parameters()) ranges[r.name()] = r;
  EXPECT_EQ(ranges["damping"].max(), 10.0);
  EXPECT_EQ(ranges["block_columns"].min(), 16.0);
  EXPECT_EQ(ranges["block_columns"].max(), 8192.0);
  EXPECT_THAT(ranges["scale_objective"].allowed_values(),
              ::testing::ElementsAre("hessian_block", "gptq_cost"));
  EXPECT_EQ(ranges["scale_search"].default_string(), "sweep");
  EXPECT_EQ(info.limits().max_full_hessian_bytes(), int64_t{8} << 30);
  EXPECT_EQ(info.limits().max_session_full_hessian_bytes(), int64_t{4} << 30);
}

}  // namespace
}  // namespace nvfp4cal::server

namespace nvfp4cal::server {
namespace {

TEST(GptqWork, ContiguousTasksOfATensorRunAsOneCallWithTheSameBytes) {
  // Tasks of two tensors (one Hessian), shuffled, with a gap in the second tensor's rows: each
  // contiguous run is one QuantizeRows call; every task gets its own rows' bytes.
  constexpr int64_t kCols = 64;
  const std::vector<float> h = CorrelatedHessian(kCols, 128, 9);
  absl::StatusOr<std::shared_ptr<FullHessian>> full =
      FullHessian::Create("h", kCols, nullptr, nullptr, nullptr);
  ASSERT_TRUE(full.ok()) << full.status();
  std::copy(h.begin(), h.end(), (*full)->mutable_data());
  std::vector<GptqTensor> refs;
  std::vector<std::shared_ptr<TensorInput>> inputs;
  std::vector<std::shared_ptr<const std::string>> weights;
  for (int t = 0; t < 2; ++t) {
    refs.push_back(MakeGptqTensor(t == 0 ? "a" : "b", 40, kCols, DType::kFloat32, "h", h,
                                  v1::HESSIAN_LAYOUT_FULL, 60 + static_cast<uint64_t>(t)));
    refs.back().tensor.global_amax = 6.0f;
    auto input = std::make_shared<TensorInput>();
    input->name = refs.back().tensor.name;
    input->dtype = DType::kFloat32;
    input->cols = kCols;
    input->params = refs.back().params;
    input->global_amax = 6.0f;
    input->full_hessian = *full;
    inputs.push_back(input);
    weights.push_back(std::make_shared<const std::string>(refs.back().tensor.weights.begin(),
                                                          refs.back().tensor.weights.end()));
  }
  // (tensor, first row, rows): a's rows in three pieces; b's in two with rows 24..31 missing.
  const int64_t pieces[][3] = {{0, 16, 24}, {1, 32, 8}, {0, 0, 10}, {1, 0, 24}, {0, 10, 6}};
  std::vector<std::shared_ptr<RowRangeTask>> owned;
  std::vector<RowRangeTask*> tasks;
  for (const auto& p : pieces) {
    auto task = std::make_shared<RowRangeTask>();
    task->tensor = inputs[static_cast<size_t>(p[0])];
    task->weights = weights[static_cast<size_t>(p[0])];
    task->byte_offset = static_cast<size_t>(p[1] * kCols * 4);
    task->row_begin = p[1];
    task->num_rows = p[2];
    ASSERT_TRUE(AllocateOutputs(task.get()).ok());
    owned.push_back(task);
    tasks.push_back(task.get());
  }
  // Two more backends: the runs of the two tensors go to different ones in parallel.
  GptqBackends worker{{MakeCpuGptq({})}, "cpu"};
  worker.streams.push_back(MakeCpuGptq({}));
  worker.streams.push_back(MakeCpuGptq({}));
  std::vector<absl::Status> status;
  RunGptqTasks(worker, tasks, &status);
  for (size_t k = 0; k < tasks.size(); ++k) {
    SCOPED_TRACE(k);
    ASSERT_TRUE(status[k].ok()) << status[k];
    const QuantizedTensor want = GptqReference(refs[static_cast<size_t>(pieces[k][0])]);
    const int64_t first = pieces[k][1];
    const int64_t rows = pieces[k][2];
    EXPECT_EQ(tasks[k]->packed_codes,
              std::string(want.packed_codes.begin() + first * kCols / 2,
                          want.packed_codes.begin() + (first + rows) * kCols / 2));
    EXPECT_EQ(tasks[k]->scales, std::string(want.scales.begin() + first * kCols / 16,
                                            want.scales.begin() + (first + rows) * kCols / 16));
  }
  // a's three pieces ran as one call: its statistics sit on the first piece (rows 0..9).
  EXPECT_EQ(tasks[2]->stats.num_blocks, 40 * kCols / 16);
  EXPECT_EQ(tasks[0]->stats.num_blocks, 0);
  EXPECT_EQ(tasks[4]->stats.num_blocks, 0);
  // b's pieces are not contiguous: two calls.
  EXPECT_EQ(tasks[3]->stats.num_blocks, 24 * kCols / 16);
  EXPECT_EQ(tasks[1]->stats.num_blocks, 8 * kCols / 16);
  EXPECT_EQ((*full)->plans_prepared(), 1);
}

}  // namespace
}  // namespace nvfp4cal::server
