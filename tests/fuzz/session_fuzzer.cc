// Fuzz target: the Quantize session state machine fed arbitrary message sequences, in-process
// (CalibrationServer::InProcessChannel, no network).
//
// The input is a little program: each op appends one message (session options, header,
// Hessian chunk, weight chunk, an empty message, or raw bytes parsed as a QuantizeRequest),
// cancels the call, or stops writing. Field values are drawn from the input, biased towards
// the values a correct client would send so that deep states are reached (complete Hessians,
// buffered and streamed tensors, several tensors per stream) as well as every error path.
// Checked: the call ends with a documented status (never UNKNOWN or INTERNAL); result chunks
// have the sizes their rows need, lie inside their tensor, and no chunk follows its tensor's
// summary; an OK call has a summary for every tensor whose rows were all sent.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "nvfp4cal/v1/calibrator.grpc.pb.h"
#include "server/calibration_server.h"
#include "tests/fuzz/fuzz_input.h"

namespace {

using nvfp4cal::fuzz::FuzzInput;
namespace v1 = nvfp4cal::v1;

struct Fixture {
  std::unique_ptr<nvfp4cal::server::CalibrationServer> server;
  std::unique_ptr<v1::Calibrator::Stub> stub;
};

Fixture& Get() {
  static Fixture* fixture = [] {
    nvfp4cal::server::ServerOptions options;
    options.address = "";  // in-process only
    options.metrics_address = "";
    options.devices.device = "cpu";
    options.devices.cpu_workers = 1;
    options.devices.cpu_threads_per_worker = 1;
    options.limits.max_rows_per_item = 4;
    options.limits.max_inflight_chunks_per_stream = 2;
    options.limits.max_tensor_elements = 4096;
    options.limits.max_buffered_tensor_bytes = 16 << 10;
    options.limits.max_session_hessian_bytes = 64 << 10;
    auto* f = new Fixture;
    f->server = std::make_unique<nvfp4cal::server::CalibrationServer>(options);
    FUZZ_CHECK(f->server->Start().ok());
    f->stub = v1::Calibrator::NewStub(f->server->InProcessChannel());
    return f;
  }();
  return *fixture;
}

// What the generator believes about the stream, to propose plausible next values.
struct Model {
  int64_t rows = 0;
  int64_t cols = 16;
  int dtype_size = 2;
  int64_t rows_sent = 0;
  int64_t hessian_elements = 0;
  int64_t hessian_sent = 0;
  bool full_layout = false;
};

const char* const kNames[] = {"a", "b", "c", "a", ""};
const char* const kMethods[] = {"max", "mse", "local_hessian", "dss", "bogus", ""};
const char* const kHessianNames[] = {"", "h1", "h2", "h1"};
const int64_t kCols[] = {16, 32, 48, 24, 0, -16};

v1::QuantizeRequest Header(FuzzInput& in, Model* m) {
  v1::QuantizeRequest r;
  v1::TensorHeader* h = r.mutable_header();
  h->set_name(kNames[in.Byte() % 5]);
  m->rows = in.Range(-1, 12);
  m->cols = kCols[in.Byte() % 6];
  h->set_rows(m->rows);
  h->set_cols(m->cols);
  const int dtype = static_cast<int>(in.Range(0, 4));
  h->set_dtype(static_cast<v1::DType>(dtype));
  m->dtype_size = dtype == v1::DTYPE_FLOAT32 ? 4 : 2;
  h->mutable_method()->set_name(kMethods[in.Byte() % 6]);
  const uint8_t extras = in.Byte();
  if (extras & 1) h->mutable_method()->set_beta_step(in.Bool() ? 0.1f : in.Float());
  if (extras & 2) h->mutable_method()->set_scale_neighbours(static_cast<int32_t>(in.Range(-1, 3)));
  if (extras & 4) h->set_global_amax(in.Bool() ? 8.0f : in.Float());
  h->mutable_hessian()->set_name(kHessianNames[in.Byte() % 4]);
  const int layout = static_cast<int>(in.Range(0, 3));
  h->mutable_hessian()->set_layout(static_cast<v1::HessianLayout>(layout));
  m->full_layout = layout == v1::HESSIAN_LAYOUT_FULL;
  const int64_t cols = m->cols > 0 ? m->cols : 16;
  m->hessian_elements = m->full_layout ? cols * cols : cols / 16 * 256;
  m->hessian_sent = 0;
  m->rows_sent = 0;
  return r;
}

v1::QuantizeRequest HessianChunk(FuzzInput& in, Model* m) {
  v1::QuantizeRequest r;
  v1::HessianChunk* c = r.mutable_hessian();
  const bool plausible = in.Byte() < 200;
  const int64_t offset = plausible ? m->hessian_sent : in.Range(-2, 4096);
  const int64_t left = m->hessian_elements - m->hessian_sent;
  const int64_t count = plausible && left > 0 ? in.Range(1, left) : in.Range(0, 300);
  c->set_element_offset(offset);
  std::string data(static_cast<size_t>(count) * 4, '\0');
  const bool garbage = in.Byte() < 20;
  const int64_t n = m->full_layout ? (m->cols > 0 ? m->cols : 16) : 16;
  for (int64_t i = 0; i < count; ++i) {
    float v;
    if (garbage) {
      v = in.Float();
    } else {
      // Identity-like: 1 on the diagonal, small symmetric values elsewhere.
      const int64_t e = offset + i;
      const int64_t row = m->full_layout ? e / n : (e % 256) / 16;
      const int64_t col = m->full_layout ? e % n : e % 16;
      v = row == col ? 1.0f : 0.01f;
    }
    std::memcpy(data.data() + i * 4, &v, 4);
  }
  c->set_data(std::move(data));
  if (plausible) m->hessian_sent += count;
  return r;
}

v1::QuantizeRequest WeightChunk(FuzzInput& in, Model* m) {
  v1::QuantizeRequest r;
  v1::WeightChunk* c = r.mutable_weights();
  const bool plausible = in.Byte() < 220;
  const int64_t left = m->rows - m->rows_sent;
  const int64_t begin = plausible ? m->rows_sent : in.Range(-1, 12);
  const int64_t rows = plausible && left > 0 ? in.Range(1, left) : in.Range(-1, 6);
  c->set_row_begin(begin);
  c->set_num_rows(rows);
  int64_t bytes = rows * (m->cols > 0 ? m->cols : 16) * m->dtype_size;
  if (!plausible) bytes += in.Range(-1, 1);
  if (bytes < 0) bytes = 0;
  std::string data(static_cast<size_t>(bytes), '\0');
  const uint8_t mode = in.Byte();
  for (int64_t i = 0; i < bytes; ++i) {
    // Mostly small finite values (bf16/fp16/fp32 alike: a low mantissa byte and 0x3c/0x3e high
    // bytes); sometimes raw input bytes (NaN, Inf, huge values).
    data[static_cast<size_t>(i)] =
        mode < 30 ? static_cast<char>(in.Byte())
                  : static_cast<char>(i % m->dtype_size == m->dtype_size - 1 ? 0x3c + (i & 2)
                                                                             : (i * 37) & 0xff);
  }
  c->set_data(std::move(data));
  if (plausible && rows > 0) m->rows_sent += rows;
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Fixture& f = Get();
  FuzzInput in(data, size);
  Model model;
  std::vector<v1::QuantizeRequest> messages;
  int cancel_after = -1;
  std::map<std::string, std::pair<int64_t, int64_t>> declared;  // name -> rows, cols
  for (int step = 0; step < 24 && !in.empty(); ++step) {
    const uint8_t op = in.Byte() % 10;
    if (op == 0) {
      v1::QuantizeRequest r;
      r.mutable_session()->set_priority(static_cast<int32_t>(in.Range(-1, 11)));
      r.mutable_session()->set_client_name("fuzz");
      messages.push_back(std::move(r));
    } else if (op == 1 || op == 2) {
      messages.push_back(Header(in, &model));
      // The first header of a name is the one results can belong to (a repeat is refused).
      declared.emplace(messages.back().header().name(), std::make_pair(model.rows, model.cols));
    } else if (op == 3 || op == 4) {
      messages.push_back(HessianChunk(in, &model));
    } else if (op == 5 || op == 6) {
      messages.push_back(WeightChunk(in, &model));
    } else if (op == 7) {
      messages.emplace_back();  // no payload
    } else if (op == 8) {
      v1::QuantizeRequest r;
      r.ParseFromString(in.Bytes(static_cast<size_t>(in.Range(0, 48))));
      messages.push_back(std::move(r));
    } else if (cancel_after < 0) {
      cancel_after = static_cast<int>(messages.size());
    }
  }

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  auto stream = f.stub->Quantize(&context);
  std::thread writer([&] {
    for (size_t i = 0; i < messages.size(); ++i) {
      if (static_cast<int>(i) == cancel_after) {
        context.TryCancel();
        break;
      }
      if (!stream->Write(messages[i])) break;
    }
    stream->WritesDone();
  });
  std::map<std::string, int64_t> rows_covered;
  std::map<std::string, bool> summarized;
  v1::QuantizeResponse response;
  while (stream->Read(&response)) {
    if (response.has_result()) {
      const v1::ResultChunk& c = response.result();
      const auto it = declared.find(c.tensor_name());
      FUZZ_CHECK(it != declared.end());
      FUZZ_CHECK(!summarized[c.tensor_name()]);
      const auto [rows, cols] = it->second;
      FUZZ_CHECK(c.row_begin() >= 0 && c.num_rows() > 0 && c.row_begin() + c.num_rows() <= rows);
      FUZZ_CHECK(static_cast<int64_t>(c.packed_codes().size()) == c.num_rows() * cols / 2);
      FUZZ_CHECK(static_cast<int64_t>(c.scales().size()) == c.num_rows() * cols / 16);
      rows_covered[c.tensor_name()] += c.num_rows();
    } else if (response.has_summary()) {
      const v1::TensorSummary& s = response.summary();
      FUZZ_CHECK(!summarized[s.tensor_name()]);
      summarized[s.tensor_name()] = true;
      FUZZ_CHECK(rows_covered[s.tensor_name()] == s.rows());
    }
  }
  writer.join();
  const grpc::Status status = stream->Finish();
  switch (status.error_code()) {
    case grpc::StatusCode::OK:
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::CANCELLED:
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      // Nothing here takes more than milliseconds: the session hung.
      std::fprintf(stderr, "session did not end within 20 s\n");
      std::abort();
    default:
      std::fprintf(stderr, "unexpected status %d: %s\n", status.error_code(),
                   status.error_message().c_str());
      std::abort();
  }
  if (status.ok()) {
    for (const auto& [name, covered] : rows_covered) FUZZ_CHECK(summarized[name]);
  }
  static const bool verbose = std::getenv("NVFP4CAL_FUZZ_VERBOSE") != nullptr;
  if (verbose) {
    std::fprintf(stderr, "%zu messages -> %d %s; %zu tensors summarized\n", messages.size(),
                 status.error_code(), status.error_message().c_str(), summarized.size());
  }
  return 0;
}
