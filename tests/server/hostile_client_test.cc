// A hostile or broken client against the real service in-process: messages that are not
// protobuf, names of megabytes, a client that never reads, streams that stall, a drain while
// tensors are in flight, a send limit smaller than the result chunks. Each test states the
// bound the server must keep (docs/operations.md lists the limits).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/codegen/client_unary_call.h"
#include "grpcpp/impl/codegen/sync_stream.h"
#include "gtest/gtest.h"
#include "nvfp4cal/v1/calibrator.grpc.pb.h"
#include "server/calibration_server.h"
#include "tests/server/gated_executor.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

using ::nvfp4cal::server::testing::AppendTensor;
using ::nvfp4cal::server::testing::GatedExecutor;
using ::nvfp4cal::server::testing::HeaderOf;
using ::nvfp4cal::server::testing::MakeTensor;
using ::nvfp4cal::server::testing::MetricValue;
using ::nvfp4cal::server::testing::RunSession;
using ::nvfp4cal::server::testing::Scrape;
using ::nvfp4cal::server::testing::SessionResult;
using ::nvfp4cal::server::testing::TestTensor;
using ::nvfp4cal::server::testing::WeightChunkOf;
using ::testing::HasSubstr;

constexpr char kQuantizeMethod[] = "/nvfp4cal.v1.Calibrator/Quantize";

grpc::ByteBuffer Bytes(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

grpc::ByteBuffer Bytes(const google::protobuf::MessageLite& message) {
  return Bytes(message.SerializeAsString());
}

// A Quantize stream that writes raw bytes, as a broken client would.
using RawStream = grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>;
std::unique_ptr<RawStream> OpenRawStream(grpc::Channel* channel, grpc::ClientContext* context) {
  return std::unique_ptr<RawStream>(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel,
          grpc::internal::RpcMethod(kQuantizeMethod, grpc::internal::RpcMethod::BIDI_STREAMING),
          context));
}

// Writes every message, half-closes, reads every response; returns the status and the
// summaries received.
struct RawResult {
  grpc::Status status;
  std::vector<std::string> summaries;
};
RawResult RunRaw(grpc::Channel* channel, const std::vector<grpc::ByteBuffer>& messages) {
  grpc::ClientContext context;
  std::unique_ptr<RawStream> stream = OpenRawStream(channel, &context);
  for (const grpc::ByteBuffer& m : messages) {
    if (!stream->Write(m)) break;
  }
  stream->WritesDone();
  RawResult result;
  grpc::ByteBuffer raw;
  while (stream->Read(&raw)) {
    std::vector<grpc::Slice> slices;
    EXPECT_TRUE(raw.Dump(&slices).ok());
    std::string bytes;
    for (const grpc::Slice& s : slices)
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    v1::QuantizeResponse response;
    EXPECT_TRUE(response.ParseFromString(bytes));
    if (response.has_summary()) result.summaries.push_back(response.summary().tensor_name());
  }
  result.status = stream->Finish();
  return result;
}

grpc::Status RawUnary(grpc::Channel* channel, const std::string& method, const std::string& bytes) {
  grpc::ClientContext context;
  grpc::ByteBuffer response;
  return grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
      channel, grpc::internal::RpcMethod(method.c_str(), grpc::internal::RpcMethod::NORMAL_RPC),
      &context, Bytes(bytes), &response);
}

class HostileClientTest : public ::testing::Test {
 protected:
  // A CPU server on a free port with small windows; `tweak` adjusts the options first.
  void Start(const std::function<void(ServerOptions*)>& tweak = nullptr, bool gated = false) {
    ServerOptions options;
    options.address = "127.0.0.1:0";
    options.metrics_address = "";
    options.devices.device = "cpu";
    options.drain_timeout = absl::Seconds(10);
    options.devices.cpu_workers = 1;
    options.devices.cpu_threads_per_worker = 1;
    options.limits.max_rows_per_item = 64;
    options.limits.max_inflight_chunks_per_stream = 2;
    if (tweak) tweak(&options);
    server_ = std::make_unique<CalibrationServer>(options);
    if (gated) {
      server_->set_executor_wrapper([this](std::unique_ptr<BatchExecutor> real) {
        auto wrapped = std::make_unique<GatedExecutor>(std::move(real));
        gate_ = wrapped.get();
        return wrapped;
      });
    }
    const absl::Status started = server_->Start();
    ASSERT_TRUE(started.ok()) << started;
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    stub_ = v1::Calibrator::NewStub(channel_);
  }

  std::unique_ptr<CalibrationServer> server_;
  GatedExecutor* gate_ = nullptr;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Calibrator::Stub> stub_;
};

TestTensor SmallTensor(const std::string& name, int64_t rows = 16, int64_t cols = 64) {
  TestTensor t = MakeTensor(name, rows, cols, DType::kBFloat16, "max", "", 7);
  t.global_amax = 100.0f;  // streams the rows (no buffering)
  return t;
}

TEST_F(HostileClientTest, MalformedMessageMidStreamEndsWithInvalidArgument) {
  Start([](ServerOptions* o) { o->metrics_address = "127.0.0.1:0"; });
  std::vector<v1::QuantizeRequest> t1;
  AppendTensor(SmallTensor("t1"), &t1);
  std::vector<grpc::ByteBuffer> messages;
  for (const v1::QuantizeRequest& m : t1) messages.push_back(Bytes(m));
  const int malformed_index = static_cast<int>(messages.size()) + 1;
  messages.push_back(Bytes(std::string("\xff\xff\xff", 3)));
  std::vector<v1::QuantizeRequest> t2;
  AppendTensor(SmallTensor("t2"), &t2);
  for (const v1::QuantizeRequest& m : t2) messages.push_back(Bytes(m));
  const RawResult result = RunRaw(channel_.get(), messages);
  // Before: OK with t1's summary only, t2 silently dropped.
  EXPECT_EQ(result.status.error_code(), grpc::INVALID_ARGUMENT) << result.status.error_message();
  EXPECT_THAT(result.status.error_message(),
              HasSubstr(absl::StrCat("message ", malformed_index,
                                     " of the stream (3 bytes) is not a valid "
                                     "nvfp4cal.v1.QuantizeRequest")));
  const std::string metrics = Scrape(server_->metrics_port());
  EXPECT_EQ(MetricValue(metrics,
                        "nvfp4cal_requests_total{code=\"INVALID_ARGUMENT\",method=\"Quantize\"}"),
            1.0);
  EXPECT_EQ(MetricValue(metrics, "nvfp4cal_malformed_messages_total{method=\"Quantize\"}"), 1.0);
}

TEST_F(HostileClientTest, NameThatIsNotUtf8IsInvalidArgument) {
  Start();
  v1::QuantizeRequest header = HeaderOf(SmallTensor("placeholder"));
  // The name field's bytes replaced by an invalid UTF-8 sequence of the same length.
  std::string bytes = header.SerializeAsString();
  const size_t at = bytes.find("placeholder");
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at, 11, std::string("\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc", 11));
  const RawResult result = RunRaw(channel_.get(), {Bytes(bytes)});
  EXPECT_EQ(result.status.error_code(), grpc::INVALID_ARGUMENT) << result.status.error_message();
  EXPECT_THAT(result.status.error_message(), HasSubstr("not UTF-8"));
}

TEST_F(HostileClientTest, UnparseableUnaryRequestsAreInvalidArgumentAndCounted) {
  Start([](ServerOptions* o) { o->metrics_address = "127.0.0.1:0"; });
  const std::string garbage("\xff\xff\xff", 3);
  for (const char* method : {"SubmitJob", "GetJob", "CancelJob", "ListJobs", "GetServerInfo"}) {
    const grpc::Status status =
        RawUnary(channel_.get(), absl::StrCat("/nvfp4cal.v1.Calibrator/", method), garbage);
    // Before: UNIMPLEMENTED with an empty message, not counted.
    EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT) << method;
    EXPECT_THAT(status.error_message(), HasSubstr(absl::StrCat(method, " request (3 bytes)")));
  }
  const std::string metrics = Scrape(server_->metrics_port());
  EXPECT_EQ(
      MetricValue(metrics, "nvfp4cal_requests_total{code=\"INVALID_ARGUMENT\",method=\"GetJob\"}"),
      1.0);
}

TEST_F(HostileClientTest, NamesLongerThanOneKibAreRefused) {
  Start();
  TestTensor t = SmallTensor(std::string(kMaxNameBytes + 1, 'n'));
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(t, &requests);
  grpc::Status status = RunSession(stub_.get(), requests).status;
  EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("header.name has 1025 bytes; the limit is 1024"));
  // The message quotes only the name's start.
  EXPECT_LT(status.error_message().size(), 300u);

  TestTensor h = MakeTensor("w", 16, 64, DType::kBFloat16, "dss", std::string(4 << 20, 'h'), 3);
  requests.clear();
  AppendTensor(h, &requests);
  status = RunSession(stub_.get(), requests).status;
  EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("header.hessian.name has 4194304 bytes"));

  v1::QuantizeRequest options;
  options.mutable_session()->set_client_name(std::string(5000, 'c'));
  status = RunSession(stub_.get(), {options}).status;
  EXPECT_THAT(status.error_message(), HasSubstr("session.client_name has 5000 bytes"));

  grpc::ClientContext context;
  v1::GetJobRequest get;
  get.set_job_id(std::string(1 << 20, 'j'));
  v1::Job job;
  status = stub_->GetJob(&context, get, &job);
  EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("job_id has 1048576 bytes"));
}

TEST_F(HostileClientTest, TensorNamesOneSessionKeepsAreBounded) {
  constexpr int64_t kLimit = 8 * (1000 + ServiceLimits::kNameEntryOverheadBytes);
  Start([](ServerOptions* o) { o->limits.max_session_tensor_name_bytes = kLimit; });
  std::vector<v1::QuantizeRequest> requests;
  for (int i = 0; i < 9; ++i) {
    AppendTensor(SmallTensor(absl::StrCat(i, std::string(999, 'x'))), &requests);
  }
  const SessionResult result = RunSession(stub_.get(), requests);
  EXPECT_EQ(result.status.error_code(), grpc::RESOURCE_EXHAUSTED);
  EXPECT_THAT(result.status.error_message(),
              HasSubstr(absl::StrCat("the session keeps ", kLimit,
                                     " bytes of tensor names (8 tensors) and "
                                     "max_session_tensor_name_bytes = ",
                                     kLimit)));
}

// A client that sends tensor after tensor and never reads a response: the server stops reading
// it once max_unsent_result_bytes_per_stream of results wait, so what it holds stays bounded.
// (Before: it kept reading and quantizing, 1 GB of queued results for 1,500 tensors.)
TEST_F(HostileClientTest, ClientThatNeverReadsHoldsBoundedResults) {
  constexpr int64_t kUnsentLimit = 256 << 10;
  Start([](ServerOptions* o) {
    o->metrics_address = "127.0.0.1:0";
    o->limits.max_unsent_result_bytes_per_stream = kUnsentLimit;
  });
  constexpr int kTensors = 400;
  constexpr int64_t kRows = 256;
  constexpr int64_t kCols = 1024;
  std::atomic<int> sent{0};
  grpc::ClientContext context;
  auto stream = stub_->Quantize(&context);
  std::thread writer([&] {
    for (int i = 0; i < kTensors; ++i) {
      TestTensor t = SmallTensor(absl::StrCat("t", i), kRows, kCols);
      t.rows_per_chunk = kRows;
      std::vector<v1::QuantizeRequest> requests;
      AppendTensor(t, &requests);
      for (const v1::QuantizeRequest& r : requests) {
        if (!stream->Write(r)) return;
      }
      ++sent;
    }
  });
  // Wait until the server has stopped making progress on this stream.
  double blocks = -1;
  for (int i = 0; i < 100; ++i) {
    absl::SleepFor(absl::Milliseconds(100));
    const double now =
        MetricValue(Scrape(server_->metrics_port()), "nvfp4cal_blocks_quantized_total");
    if (now == blocks && now > 0) break;
    blocks = now;
  }
  const std::string metrics = Scrape(server_->metrics_port());
  const int64_t result_bytes_per_tensor = kRows * (kCols / 2 + kCols / 16);
  // Bound: the limit, plus what the items in flight (max_inflight_chunks_per_stream = 2 items
  // of 64 rows) add after reading paused, plus one tensor being written.
  const double bound = static_cast<double>(kUnsentLimit + 2 * result_bytes_per_tensor);
  EXPECT_LE(MetricValue(metrics, "nvfp4cal_unsent_result_bytes"), bound);
  EXPECT_LE(MetricValue(metrics, "nvfp4cal_blocks_quantized_total") * 9.0, bound + (4 << 20))
      << "the server quantized far more than the client took";
  EXPECT_LT(sent.load(), kTensors / 2);
  context.TryCancel();
  writer.join();
  stream->Finish().IgnoreError();
}

// Result messages are sized by the server's own send limit. (Before: a 1024 x 4096 tensor
// failed with gRPC's "Sent message larger than max" under --max_send_message_bytes=1048576.)
TEST_F(HostileClientTest, ResultChunksFitTheSendLimit) {
  Start([](ServerOptions* o) {
    o->limits.max_send_message_bytes = 1 << 20;
    o->limits.max_rows_per_item = 1024;
    o->limits.max_tensor_elements = int64_t{1} << 24;
  });
  TestTensor t = SmallTensor("big", 1024, 4096);
  t.rows_per_chunk = 512;  // items of 512 rows: 1.2 MB of codes and scales each
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(t, &requests);
  const SessionResult result = RunSession(stub_.get(), requests);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.tensors.at("big").rows_covered, 1024);
  EXPECT_GE(result.tensors.at("big").result_chunks, 3);
}

// SIGTERM while a stream has tensors in flight: the tensors sent before the drain finish and
// get their summaries; the first header after it ends the stream with UNAVAILABLE naming it.
// (Before: the stream ended at once, the accepted tensors' work cancelled.)
TEST_F(HostileClientTest, DrainFinishesTheTensorsAlreadySent) {
  // A window wide enough that the server has read all six tensors when the drain starts.
  Start([](ServerOptions* o) { o->limits.max_inflight_chunks_per_stream = 64; }, /*gated=*/true);
  gate_->Close();
  grpc::ClientContext context;
  auto stream = stub_->Quantize(&context);
  for (int i = 0; i < 6; ++i) {
    std::vector<v1::QuantizeRequest> requests;
    AppendTensor(SmallTensor(absl::StrCat("t", i)), &requests);
    for (const v1::QuantizeRequest& r : requests) ASSERT_TRUE(stream->Write(r));
  }
  ASSERT_TRUE(gate_->WaitUntilWaiting(1));
  absl::SleepFor(absl::Milliseconds(200));  // the server reads the rest meanwhile
  std::thread drain([this] { server_->Drain(); });
  absl::SleepFor(absl::Milliseconds(300));  // StartDraining comes first in Drain
  std::vector<v1::QuantizeRequest> late;
  AppendTensor(SmallTensor("t6"), &late);
  stream->Write(late[0]);
  // Half-close as the client library does after its last message: a server that ends a call the
  // client still writes to follows its trailers with RST_STREAM, which under load can reach the
  // client first and turn the status into CANCELLED.
  stream->WritesDone();
  absl::SleepFor(absl::Milliseconds(100));
  gate_->Open();
  std::vector<std::string> summaries;
  v1::QuantizeResponse response;
  while (stream->Read(&response)) {
    if (response.has_summary()) summaries.push_back(response.summary().tensor_name());
  }
  const grpc::Status status = stream->Finish();
  drain.join();
  EXPECT_EQ(summaries.size(), 6u);
  EXPECT_EQ(status.error_code(), grpc::UNAVAILABLE) << status.error_message();
  EXPECT_THAT(status.error_message(),
              HasSubstr("tensor 't6' (message 19 of the stream) and every tensor after it were "
                        "not started; the stream's first 6 tensors finished"));
}

// A stream that sends a header and stalls is ended after stream_idle_timeout and frees its
// slot. (Before: it held the slot, and a gptq header the full-Hessian budget, until it closed.)
TEST_F(HostileClientTest, IdleStreamIsEndedAndFreesItsSlot) {
  Start([](ServerOptions* o) {
    o->metrics_address = "127.0.0.1:0";
    o->limits.stream_idle_timeout = absl::Milliseconds(300);
    o->limits.max_concurrent_streams = 1;
  });
  grpc::ClientContext context;
  // Safety net: without the idle timeout the call would wait for this deadline.
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stalled = stub_->Quantize(&context);
  ASSERT_TRUE(stalled->Write(HeaderOf(SmallTensor("t"))));
  const absl::Time begin = absl::Now();
  v1::QuantizeResponse response;
  EXPECT_FALSE(stalled->Read(&response));
  const grpc::Status status = stalled->Finish();
  EXPECT_LT(absl::Now() - begin, absl::Seconds(5));
  EXPECT_EQ(status.error_code(), grpc::DEADLINE_EXCEEDED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("(stream_idle_timeout)"));
  // The slot is free again once the server has released the call.
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (MetricValue(Scrape(server_->metrics_port()), "nvfp4cal_inflight_streams") != 0 &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  std::vector<v1::QuantizeRequest> requests;
  AppendTensor(SmallTensor("u"), &requests);
  const SessionResult result = RunSession(stub_.get(), requests);
  EXPECT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(MetricValue(Scrape(server_->metrics_port()), "nvfp4cal_stream_idle_timeouts_total"),
            1.0);
}

// A client that stops reading results is idle too: its stream ends although a write is stuck.
TEST_F(HostileClientTest, ClientThatStopsReadingIsEndedByTheIdleTimeout) {
  Start([](ServerOptions* o) {
    o->metrics_address = "127.0.0.1:0";
    o->limits.stream_idle_timeout = absl::Milliseconds(500);
    o->limits.max_unsent_result_bytes_per_stream = 64 << 10;
  });
  grpc::ClientContext context;
  auto stream = stub_->Quantize(&context);
  std::thread writer([&] {
    for (int i = 0; i < 200; ++i) {
      TestTensor t = SmallTensor(absl::StrCat("t", i), 256, 1024);
      t.rows_per_chunk = 256;
      std::vector<v1::QuantizeRequest> requests;
      AppendTensor(t, &requests);
      for (const v1::QuantizeRequest& r : requests) {
        if (!stream->Write(r)) return;
      }
    }
  });
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  double open = 1;
  while (absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(200));
    open = MetricValue(Scrape(server_->metrics_port()), "nvfp4cal_inflight_streams");
    if (open == 0) break;
  }
  EXPECT_EQ(open, 0.0);
  EXPECT_EQ(MetricValue(Scrape(server_->metrics_port()), "nvfp4cal_unsent_result_bytes"), 0.0);
  context.TryCancel();
  writer.join();
  stream->Finish().IgnoreError();
}

}  // namespace
}  // namespace nvfp4cal::server
