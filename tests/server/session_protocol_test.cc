// The Quantize stream's protocol without a transport (server/session_protocol.h): messages fed
// in order, what each asks of the reactor checked directly (tensors opened, rows ready with
// their bytes, the drain's stop), Hessians assembled from any chunking and layout, and the
// protocol's errors naming the field, the limit and the value.
#include "server/session_protocol.h"

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/gptq_work.h"
#include "tests/server/gptq_test_util.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::AppendTensor;
using ::nvfp4cal::server::testing::CorrelatedHessian;
using ::nvfp4cal::server::testing::HeaderOf;
using ::nvfp4cal::server::testing::MakeGptqTensor;
using ::nvfp4cal::server::testing::MakeTensor;
using ::nvfp4cal::server::testing::TestTensor;
using ::nvfp4cal::server::testing::UseFullLayout;
using ::nvfp4cal::server::testing::WeightChunkOf;
using ::testing::HasSubstr;

class SessionProtocolTest : public ::testing::Test {
 protected:
  SessionProtocolTest() : budget_(int64_t{1} << 30, &metrics_) {}

  SessionProtocol& protocol() {
    if (protocol_ == nullptr) {
      protocol_ = std::make_unique<SessionProtocol>(
          SessionProtocol::Environment{&limits_, &metrics_, &budget_});
    }
    return *protocol_;
  }

  // Feeds the message as the next of the stream.
  absl::Status Feed(v1::QuantizeRequest request, SessionProtocol::Step* step,
                    bool draining = false) {
    *step = SessionProtocol::Step{};
    return protocol().Handle(++messages_, &request, draining, step);
  }

  // Feeds every message of `requests`; each ready step is appended to `ready`.
  void FeedAll(const std::vector<v1::QuantizeRequest>& requests,
               std::vector<SessionProtocol::Step>* ready) {
    for (const v1::QuantizeRequest& r : requests) {
      SessionProtocol::Step step;
      const absl::Status s = Feed(r, &step);
      ASSERT_TRUE(s.ok()) << s;
      if (step.ready != nullptr) ready->push_back(std::move(step));
    }
  }

  ServiceLimits limits_;
  ServerMetrics metrics_;
  FullHessianBudget budget_;
  std::unique_ptr<SessionProtocol> protocol_;
  int64_t messages_ = 0;
};

TEST_F(SessionProtocolTest, StreamedChunksAreReadyOneByOneBufferedTensorsOnceWhole) {
  TestTensor streamed = MakeTensor("streamed", 20, 32, DType::kBFloat16, "max", "", 1);
  streamed.global_amax = 100.0f;
  TestTensor buffered = MakeTensor("buffered", 20, 32, DType::kFloat16, "max", "", 2);
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(streamed, &requests);
  AppendTensor(buffered, &requests);
  std::vector<SessionProtocol::Step> ready;
  FeedAll(requests, &ready);
  ASSERT_EQ(ready.size(), 4u);  // rows 0-8, 8-16, 16-20 streamed; the buffered tensor once
  const int64_t row_bytes = 32 * 2;
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(ready[i].ready->name, "streamed");
    EXPECT_EQ(ready[i].row_begin, static_cast<int64_t>(i) * 8);
    EXPECT_EQ(*ready[i].bytes,
              streamed.weights.substr(static_cast<size_t>(ready[i].row_begin * row_bytes),
                                      static_cast<size_t>(ready[i].num_rows * row_bytes)));
    EXPECT_EQ(ready[i].ready->run->input().global_amax, 100.0f);
  }
  EXPECT_EQ(ready[3].ready->name, "buffered");
  EXPECT_EQ(ready[3].row_begin, 0);
  EXPECT_EQ(ready[3].num_rows, 20);
  EXPECT_EQ(*ready[3].bytes, buffered.weights);
  // g of a buffered tensor is max |W| over all its rows.
  const WeightView view{buffered.weights.data(), DType::kFloat16, 20, 32};
  EXPECT_EQ(ready[3].ready->run->input().global_amax, *ComputeGlobalAmax(view));
  EXPECT_EQ(ready[3].ready->index, 1);
}

TEST_F(SessionProtocolTest, HeadersOpenTensorsAndMessageOrderIsChecked) {
  const TestTensor t = MakeTensor("t", 16, 32, DType::kBFloat16, "max", "", 3);
  SessionProtocol::Step step;
  absl::Status s = Feed(WeightChunkOf(t, 0, 8), &step);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(), "weight chunk before any tensor header");
  v1::QuantizeRequest options;
  options.mutable_session()->set_priority(3);
  s = Feed(options, &step);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("got them as message 2"));
  ASSERT_TRUE(Feed(HeaderOf(t), &step).ok());
  ASSERT_NE(step.opened, nullptr);
  EXPECT_EQ(step.opened->name, "t");
  EXPECT_EQ(step.opened->index, 0);
  ASSERT_TRUE(Feed(WeightChunkOf(t, 0, 8), &step).ok());
  s = Feed(HeaderOf(MakeTensor("u", 16, 32, DType::kBFloat16, "max", "", 4)), &step);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(),
            "header of tensor 'u' arrived before tensor 't' was complete: 8 of 16 rows received");
  s = Feed(WeightChunkOf(t, 0, 8), &step);
  EXPECT_EQ(s.message(), "weight chunk out of order for tensor 't': row_begin = 0, expected 8");
  ASSERT_TRUE(Feed(WeightChunkOf(t, 8, 8), &step).ok());
  EXPECT_TRUE(protocol().CurrentTensorComplete());
  s = Feed(HeaderOf(t), &step);
  EXPECT_EQ(s.message(), "header.name = 't' was already used in this session");
}

TEST_F(SessionProtocolTest, HessiansAreAssembledFromAnyChunkingAndLayout) {
  // The same Hessian as FULL (for dss: blocks only) and as FULL_UPPER (for gptq: blocks and
  // the whole matrix), sent in chunks of odd sizes.
  constexpr int64_t kCols = 48;
  const std::vector<float> full = CorrelatedHessian(kCols, 64, 5);
  testing::GptqTensor g = MakeGptqTensor("g", 8, kCols, DType::kBFloat16, "upper", full,
                                         v1::HESSIAN_LAYOUT_FULL_UPPER, 6);
  TestTensor d = MakeTensor("d", 8, kCols, DType::kBFloat16, "dss", "full", 7);
  d.layout = v1::HESSIAN_LAYOUT_FULL;
  d.hessian = full;
  for (TestTensor* t : {&g.tensor, &d}) {
    SessionProtocol::Step step;
    ASSERT_TRUE(Feed(HeaderOf(*t), &step).ok());
    const int64_t total = static_cast<int64_t>(t->hessian.size());
    for (int64_t offset = 0, n = 7; offset < total; offset += n, n = n * 3 % 1000 + 1) {
      n = std::min(n, total - offset);
      v1::QuantizeRequest chunk;
      chunk.mutable_hessian()->set_element_offset(offset);
      chunk.mutable_hessian()->set_data(std::string(
          reinterpret_cast<const char*>(t->hessian.data() + offset), static_cast<size_t>(n * 4)));
      const absl::Status s = Feed(chunk, &step);
      ASSERT_TRUE(s.ok()) << t->name << ": " << s;
    }
    ASSERT_TRUE(Feed(WeightChunkOf(*t, 0, 8), &step).ok());
    ASSERT_NE(step.ready, nullptr);
  }
  std::vector<float> blocks(static_cast<size_t>(kCols * 16));
  ExtractDiagonalBlocks(full.data(), 0, kCols * kCols, kCols, blocks.data());
  const SessionProtocol::Tensor& dss = *protocol().current();  // g: the next test
  EXPECT_EQ(*dss.run->input().hessian_blocks, blocks);
  EXPECT_EQ(dss.run->input().full_hessian, nullptr);
  EXPECT_EQ(budget_.in_use_bytes(), kCols * kCols * 4);  // g's whole matrix, charged in full
}

TEST_F(SessionProtocolTest, GptqMatrixFromUpperChunksIsTheFullMatrix) {
  constexpr int64_t kCols = 32;
  const std::vector<float> full = CorrelatedHessian(kCols, 64, 8);
  const testing::GptqTensor g =
      MakeGptqTensor("g", 4, kCols, DType::kFloat32, "h", full, v1::HESSIAN_LAYOUT_FULL_UPPER, 9);
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(g.tensor, &requests);
  std::vector<SessionProtocol::Step> ready;
  FeedAll(requests, &ready);
  ASSERT_EQ(ready.size(), 1u);
  const std::shared_ptr<FullHessian>& matrix = ready[0].ready->run->input().full_hessian;
  ASSERT_NE(matrix, nullptr);
  const FullHessianView view = matrix->view();
  EXPECT_EQ(std::vector<float>(view.data, view.data + kCols * kCols), full);
}

TEST_F(SessionProtocolTest, DrainStopsAtTheNextHeaderNamingItAndTheFinishedTensors) {
  TestTensor t = MakeTensor("t", 8, 32, DType::kBFloat16, "max", "", 10);
  t.global_amax = 50.0f;
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(t, &requests);
  std::vector<SessionProtocol::Step> ready;
  FeedAll(requests, &ready);
  SessionProtocol::Step step;
  ASSERT_TRUE(Feed(HeaderOf(MakeTensor("late", 8, 32, DType::kBFloat16, "max", "", 11)), &step,
                   /*draining=*/true)
                  .ok());
  EXPECT_TRUE(step.stop);
  EXPECT_EQ(step.opened, nullptr);
  EXPECT_EQ(step.stop_status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(step.stop_status.message(),
            "server is draining; tensor 'late' (message 3 of the stream) and every tensor after "
            "it were not started; the stream's first 1 tensors finished and their summaries were "
            "sent");
}

TEST_F(SessionProtocolTest, SessionLimitsNameTheLimitAndTheValue) {
  limits_.max_session_hessian_bytes = 32 * 16 * 4 + 100;
  limits_.max_buffered_tensor_bytes = 1000;
  SessionProtocol::Step step;
  TestTensor big = MakeTensor("big", 32, 32, DType::kBFloat16, "max", "", 12);
  absl::Status s = Feed(HeaderOf(big), &step);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("2048 bytes exceed max_buffered_tensor_bytes = 1000"));
  TestTensor a = MakeTensor("a", 4, 32, DType::kBFloat16, "dss", "ha", 13);
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(a, &requests);
  std::vector<SessionProtocol::Step> ready;
  FeedAll(requests, &ready);
  s = Feed(HeaderOf(MakeTensor("b", 4, 32, DType::kBFloat16, "dss", "hb", 14)), &step);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "Hessian 'hb' needs 2048 bytes; the session holds 2048 and "
            "max_session_hessian_bytes = 2148");
}

}  // namespace
}  // namespace nvfp4cal::server
