// SessionProtocol: the Quantize stream's protocol without a transport (docs/server.md, "The
// stream"): the order of the messages, the checks of each, Hessian assembly (diagonal blocks
// whatever the layout, and the whole matrix for gptq, charged on the server-wide full-Hessian
// budget as it arrives), buffered tensors and the session's limits. QuantizeSession (the gRPC
// reactor) parses each message and hands it here in stream order; the protocol answers with
// what the message asks for: a tensor accepted, rows ready to quantize, or the stream stopped
// because the server drains. It knows nothing of gRPC, the scheduler or threads, and is not
// thread-safe (the reactor calls it under its lock).
//
//   SessionProtocol protocol({&limits, &metrics, &budget});
//   SessionProtocol::Step step;
//   absl::Status s = protocol.Handle(message_number, &request, draining, &step);
//   if (step.opened) ...              // a new tensor: its summary is now owed
//   if (step.ready != nullptr) ...    // rows [row_begin, row_begin + num_rows) to quantize
#ifndef NVFP4CAL_SERVER_SESSION_PROTOCOL_H_
#define NVFP4CAL_SERVER_SESSION_PROTOCOL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/v1/calibrator.pb.h"
#include "server/full_hessian_budget.h"
#include "server/gptq_work.h"
#include "server/metrics.h"
#include "server/server_options.h"
#include "server/tensor_run.h"
#include "server/tensor_spec.h"

namespace nvfp4cal::server {

class SessionProtocol {
 public:
  // What the protocol needs from the server; everything must outlive it.
  struct Environment {
    const ServiceLimits* limits = nullptr;
    ServerMetrics* metrics = nullptr;
    // Server-wide account of full Hessians (method gptq); limits->max_full_hessian_bytes.
    FullHessianBudget* full_hessians = nullptr;
  };

  // A Hessian defined in the session, kept as diagonal blocks whatever layout it came in, and
  // also whole when the header defining it had method gptq (a full layout).
  struct Hessian {
    std::string name;
    v1::HessianLayout layout = v1::HESSIAN_LAYOUT_UNSPECIFIED;
    int64_t cols = 0;
    int64_t expected_elements = 0;
    int64_t received_elements = 0;
    std::shared_ptr<std::vector<float>> blocks;
    // The blocks' pruning tables, computed when the first tensor of a block method runs with
    // them.
    SharedHessianPruning pruning;
    // Method gptq: the whole matrix and its plans; null when kept as blocks only.
    std::shared_ptr<FullHessian> full;
    // The tensor whose header defined it and that tensor's method, for error messages.
    std::string defined_by;
    bool complete() const { return received_elements == expected_elements; }
  };

  // A tensor of the session, from its header until its summary was sent.
  struct Tensor {
    int64_t index = 0;
    std::string name;
    int64_t rows = 0;
    int64_t cols = 0;
    DType dtype = DType::kBFloat16;
    SearchParams params;
    std::optional<float> header_amax;
    std::shared_ptr<Hessian> hessian;
    // Made when its first rows are ready (the Hessian is complete by then); the reactor splits
    // rows into tasks with it and records their results.
    std::unique_ptr<TensorRun> run;
    int64_t rows_received = 0;
    // Buffered mode (no header amax, and gptq): the whole tensor and its running amax.
    std::shared_ptr<std::string> buffer;
    float buffered_amax = 0.0f;
    // Every method but gptq: the header and Hessian as checked once (set when the Hessian is
    // complete, or at the header without one), and in buffered mode the scans of the rows
    // appended so far (each chunk's rows in the buffer).
    std::optional<ValidatedTensor> checked;
    std::vector<WeightScan> buffered_scans;
    // When its header arrived.
    absl::Time started;
  };

  // What one message asks of the reactor.
  struct Step {
    // A header was accepted: this tensor now owes the client its results and summary.
    std::shared_ptr<Tensor> opened;
    // Rows [row_begin, row_begin + num_rows) of `ready` are checked and ready to quantize; their
    // bytes start at the beginning of `bytes` (a chunk, or the whole buffered tensor).
    std::shared_ptr<Tensor> ready;
    std::shared_ptr<const std::string> bytes;
    int64_t row_begin = 0;
    int64_t num_rows = 0;
    // The same rows as checked (ValidateRows); absent for gptq.
    std::optional<ValidatedRows> rows;
    // The server drains and this message was the next tensor's header: it is refused and the
    // stream ends with `stop_status` (UNAVAILABLE naming it) once the accepted tensors are done.
    bool stop = false;
    absl::Status stop_status;
  };

  explicit SessionProtocol(const Environment& environment);

  // Handles message `message_number` (1-based) of the stream. `draining`: whether the server
  // drains now (a header that would start a new tensor stops the stream instead). Payload bytes
  // may be moved out of `request`. An error ends the stream with it.
  absl::Status Handle(int64_t message_number, v1::QuantizeRequest* request, bool draining,
                      Step* step);

  // SessionOptions.priority (0 until given).
  int priority() const { return priority_; }
  // Whether every row of the current tensor was received (true when there is none).
  bool CurrentTensorComplete() const;
  // The tensor being received; null before the first header.
  const Tensor* current() const { return current_.get(); }

 private:
  absl::Status HandleSessionOptions(int64_t message_number, const v1::SessionOptions& options);
  absl::Status HandleHeader(const v1::TensorHeader& header, Step* step);
  absl::Status HandleHessianChunk(v1::HessianChunk* chunk);
  absl::Status HandleWeightChunk(v1::WeightChunk* chunk, Step* step);
  // A Hessian not seen before in the session, named by `header`: layout, limits, admission of
  // a full Hessian on the server-wide budget (method gptq), allocation.
  absl::StatusOr<std::shared_ptr<Hessian>> DefineHessian(const v1::TensorHeader& header,
                                                         const TensorSpec& spec);
  // Stores `count` fp32 elements at the Hessian's next position (blocks, and the whole matrix
  // when kept).
  static void StoreHessianElements(Hessian* hessian, const float* values, int64_t count);
  // Validates the tensor's shape, Hessian (when it has one, once complete) and parameters, and
  // keeps the result in tensor->checked. Not for gptq (its worker validates the full Hessian).
  static absl::Status CheckTensor(Tensor* tensor);
  // Marks rows of the current tensor ready (making its run on first use); `rows`: them as
  // checked (absent for gptq).
  void Ready(std::shared_ptr<const std::string> bytes, int64_t row_begin, int64_t num_rows,
             std::optional<ValidatedRows> rows, Step* step);

  const ServiceLimits& limits_;
  ServerMetrics* const metrics_;
  FullHessianBudget* const full_hessians_;

  int priority_ = 0;
  int64_t tensors_started_ = 0;
  std::shared_ptr<Tensor> current_;
  absl::flat_hash_set<std::string> tensor_names_;
  absl::flat_hash_map<std::string, std::shared_ptr<Hessian>> hessians_;
  int64_t hessian_bytes_ = 0;
  // Full Hessians (method gptq) defined in this session, for
  // limits.max_session_full_hessian_bytes; each holds its own reservation on the budget.
  int64_t full_hessian_bytes_ = 0;
  // Bytes of tensor_names_ (names plus per-entry overhead), for
  // limits.max_session_tensor_name_bytes.
  int64_t tensor_name_bytes_ = 0;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_SESSION_PROTOCOL_H_
