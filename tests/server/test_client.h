// Helpers of the loopback tests: build Quantize streams and job requests, run them with a
// synchronous client, and reassemble the results; plus the kernel library's own answer for
// comparison.
#ifndef NVFP4CAL_TESTS_SERVER_TEST_CLIENT_H_
#define NVFP4CAL_TESTS_SERVER_TEST_CLIENT_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/v1/calibrator.grpc.pb.h"
#include "tests/server/http_get.h"

namespace nvfp4cal::server::testing {

// One tensor to send.
struct TestTensor {
  std::string name;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kBFloat16;
  std::string method = "dss";
  std::optional<float> global_amax;
  std::string hessian_name;  // empty: none
  v1::HessianLayout layout = v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL;
  bool send_hessian = true;    // false: reuse one sent earlier in the session
  std::vector<float> hessian;  // in `layout`
  std::vector<float> blocks;   // [cols / 16, 16, 16], for the reference
  std::string weights;         // rows * cols elements of dtype
  int64_t rows_per_chunk = 8;
};

// Deterministic tensor with example weights (and Hessian blocks when hessian_name is set).
inline TestTensor MakeTensor(const std::string& name, int64_t rows, int64_t cols, DType dtype,
                             const std::string& method, const std::string& hessian_name,
                             uint64_t seed) {
  TestTensor t;
  t.name = name;
  t.rows = rows;
  t.cols = cols;
  t.dtype = dtype;
  t.method = method;
  t.hessian_name = hessian_name;
  std::vector<float> w = MakeExampleWeights(rows, cols, seed);
  t.weights.resize(static_cast<size_t>(rows * cols * DTypeSize(dtype)));
  if (dtype == DType::kFloat32) {
    std::memcpy(t.weights.data(), w.data(), t.weights.size());
  } else {
    std::vector<uint16_t> bits(w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      bits[i] = dtype == DType::kBFloat16 ? FloatToBFloat16(w[i]) : FloatToFloat16(w[i]);
    }
    std::memcpy(t.weights.data(), bits.data(), t.weights.size());
  }
  if (!hessian_name.empty()) {
    t.blocks = MakeExampleHessianBlocks(cols / 16, seed + 1);
    t.hessian = t.blocks;
  }
  return t;
}

// Turns the block Hessian into a full [cols, cols] matrix whose diagonal blocks are `blocks`
// (off-diagonal entries are arbitrary: the block methods ignore them).
inline void UseFullLayout(TestTensor* t) {
  const int64_t n = t->cols;
  t->hessian.assign(static_cast<size_t>(n * n), 0.25f);
  for (int64_t j = 0; j < n / 16; ++j) {
    for (int a = 0; a < 16; ++a) {
      for (int b = 0; b < 16; ++b) {
        t->hessian[static_cast<size_t>((j * 16 + a) * n + j * 16 + b)] =
            t->blocks[static_cast<size_t>(j * 256 + a * 16 + b)];
      }
    }
  }
  t->layout = v1::HESSIAN_LAYOUT_FULL;
}

inline v1::DType ToProto(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return v1::DTYPE_FLOAT32;
    case DType::kFloat16:
      return v1::DTYPE_FLOAT16;
    default:
      return v1::DTYPE_BFLOAT16;
  }
}

inline v1::QuantizeRequest HeaderOf(const TestTensor& t) {
  v1::QuantizeRequest request;
  v1::TensorHeader* h = request.mutable_header();
  h->set_name(t.name);
  h->set_rows(t.rows);
  h->set_cols(t.cols);
  h->set_dtype(ToProto(t.dtype));
  h->mutable_method()->set_name(t.method);
  if (t.global_amax.has_value()) h->set_global_amax(*t.global_amax);
  h->mutable_hessian()->set_name(t.hessian_name);
  h->mutable_hessian()->set_layout(t.layout);
  return request;
}

inline v1::QuantizeRequest WeightChunkOf(const TestTensor& t, int64_t row_begin, int64_t num_rows) {
  v1::QuantizeRequest request;
  v1::WeightChunk* c = request.mutable_weights();
  c->set_row_begin(row_begin);
  c->set_num_rows(num_rows);
  const size_t row_bytes = static_cast<size_t>(t.cols * DTypeSize(t.dtype));
  c->set_data(t.weights.substr(static_cast<size_t>(row_begin) * row_bytes,
                               static_cast<size_t>(num_rows) * row_bytes));
  return request;
}

// Header, Hessian in 3 chunks (when sent), weights in rows_per_chunk pieces.
inline void AppendTensor(const TestTensor& t, std::vector<v1::QuantizeRequest>* out) {
  out->push_back(HeaderOf(t));
  if (!t.hessian_name.empty() && t.send_hessian) {
    const int64_t total = static_cast<int64_t>(t.hessian.size());
    const int64_t step = (total + 2) / 3;
    for (int64_t offset = 0; offset < total; offset += step) {
      const int64_t n = std::min(step, total - offset);
      v1::QuantizeRequest request;
      request.mutable_hessian()->set_element_offset(offset);
      request.mutable_hessian()->set_data(std::string(
          reinterpret_cast<const char*>(t.hessian.data() + offset), static_cast<size_t>(n * 4)));
      out->push_back(std::move(request));
    }
  }
  for (int64_t r = 0; r < t.rows; r += t.rows_per_chunk) {
    out->push_back(WeightChunkOf(t, r, std::min(t.rows_per_chunk, t.rows - r)));
  }
}

// A tensor's reassembled result.
struct Received {
  std::string packed_codes;
  std::string scales;
  std::optional<v1::TensorSummary> summary;
  int64_t rows_covered = 0;
  int result_chunks = 0;  // ResultChunk messages received
  bool chunk_after_summary = false;
};

struct SessionResult {
  grpc::Status status;
  std::map<std::string, Received> tensors;
};

// Sends `requests` on one stream (writer thread) while reading every response.
inline SessionResult RunSession(v1::Calibrator::Stub* stub,
                                const std::vector<v1::QuantizeRequest>& requests,
                                grpc::ClientContext* context = nullptr) {
  std::map<std::string, int64_t> cols_by_tensor;
  for (const v1::QuantizeRequest& request : requests) {
    if (request.has_header()) cols_by_tensor[request.header().name()] = request.header().cols();
  }
  grpc::ClientContext own_context;
  if (context == nullptr) context = &own_context;
  auto stream = stub->Quantize(context);
  std::thread writer([&] {
    for (const v1::QuantizeRequest& request : requests) {
      if (!stream->Write(request)) break;
    }
    stream->WritesDone();
  });
  SessionResult result;
  v1::QuantizeResponse response;
  while (stream->Read(&response)) {
    if (response.has_result()) {
      const v1::ResultChunk& chunk = response.result();
      Received& r = result.tensors[chunk.tensor_name()];
      if (r.summary.has_value()) r.chunk_after_summary = true;
      const int64_t cols = cols_by_tensor.at(chunk.tensor_name());
      const size_t code_row = static_cast<size_t>(cols / 2);
      const size_t scale_row = static_cast<size_t>(cols / 16);
      const size_t end = static_cast<size_t>(chunk.row_begin() + chunk.num_rows());
      if (r.packed_codes.size() < end * code_row) r.packed_codes.resize(end * code_row);
      if (r.scales.size() < end * scale_row) r.scales.resize(end * scale_row);
      r.packed_codes.replace(static_cast<size_t>(chunk.row_begin()) * code_row,
                             chunk.packed_codes().size(), chunk.packed_codes());
      r.scales.replace(static_cast<size_t>(chunk.row_begin()) * scale_row, chunk.scales().size(),
                       chunk.scales());
      r.rows_covered += chunk.num_rows();
      ++r.result_chunks;
    } else if (response.has_summary()) {
      result.tensors[response.summary().tensor_name()].summary = response.summary();
    }
  }
  writer.join();
  result.status = stream->Finish();
  return result;
}

// The SubmitJob request for a tensor (its Hessian, if any, in the tensor's layout).
inline v1::SubmitJobRequest JobRequestOf(const TestTensor& t, int priority = 0) {
  v1::SubmitJobRequest request;
  *request.mutable_header() = HeaderOf(t).header();
  if (!t.hessian_name.empty()) {
    request.set_hessian(std::string(reinterpret_cast<const char*>(t.hessian.data()),
                                    t.hessian.size() * sizeof(float)));
  }
  request.set_weights(t.weights);
  request.set_priority(priority);
  return request;
}

// Every snapshot WatchJob streams until the call ends, and the call's status.
struct WatchResult {
  std::vector<v1::Job> updates;
  grpc::Status status;
};

inline WatchResult WatchUntilDone(v1::Calibrator::Stub* stub, const std::string& job_id) {
  grpc::ClientContext context;
  v1::WatchJobRequest request;
  request.set_job_id(job_id);
  auto reader = stub->WatchJob(&context, request);
  WatchResult result;
  v1::Job job;
  while (reader->Read(&job)) result.updates.push_back(job);
  result.status = reader->Finish();
  return result;
}

// The kernel library's result for the same tensor.
inline QuantizedTensor Reference(const TestTensor& t) {
  std::unique_ptr<ScaleSearch> search = MakeCpuScaleSearch({});
  QuantizeRequest request;
  request.weights = {t.weights.data(), t.dtype, t.rows, t.cols};
  if (!t.blocks.empty()) request.hessians = {t.blocks.data(), t.cols / 16};
  absl::StatusOr<Method> method = ParseMethod(t.method);
  request.params.method = *method;
  request.global_amax = t.global_amax;
  absl::StatusOr<QuantizedTensor> result = search->Quantize(request);
  return *std::move(result);
}

}  // namespace nvfp4cal::server::testing

#endif  // NVFP4CAL_TESTS_SERVER_TEST_CLIENT_H_
