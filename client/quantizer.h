// Quantizer: what the quantize pipeline hands tensors to, in-process or through servers.
//
// The CLI has one pipeline for both modes: it plans the checkpoint, reads weights (views into
// memory-mapped files), resolves Hessians and the shared global amax of fused siblings, and then
// gives every tensor to a Quantizer. MakeLocalQuantizer (local_quantizer.h) runs kernels/
// in-process; MakeRemoteQuantizer (remote_quantizer.h) streams to nvfp4cal servers. Both return
// the kernel library's bytes for the same task, so outputs are byte-identical.
//
//   std::unique_ptr<nvfp4cal::Quantizer> q = *nvfp4cal::MakeLocalQuantizer({});
//   std::vector<nvfp4cal::TensorTask> tasks = ...;
//   absl::Status done = q->QuantizeAll(tasks, [&](size_t index, nvfp4cal::QuantizedTensor r) {
//     return Write(tasks[index].name, r);   // may run on any thread, one call at a time per task
//   });
#ifndef NVFP4CAL_CLIENT_QUANTIZER_H_
#define NVFP4CAL_CLIENT_QUANTIZER_H_

#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "nvfp4cal/kernels/gptq.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {

// When a task's late fields are set. The pipeline hands every task to the quantizer at once and
// fills weights.data, global_amax, weight_scan, full_hessian.data and (blocks cut from a full
// matrix) hessians.data as the read and scan of the weights and full Hessians (which run beside
// the quantizer) reach each task; it opens the
// task's gate then, or with the error that stopped it.
//
//   TaskGate gate;                       // the pipeline, one per task
//   task.ready = &gate;
//   ... later, on the scanning thread: task.weights.data = ...; task.global_amax = ...;
//   gate.Open(absl::OkStatus());
//   absl::Status ok = AwaitTask(task);   // the quantizer, before it reads the late fields
class TaskGate {
 public:
  TaskGate() = default;
  TaskGate(const TaskGate&) = delete;
  TaskGate& operator=(const TaskGate&) = delete;

  // Sets the outcome and wakes every waiter; only the first call counts.
  void Open(absl::Status status) {
    absl::MutexLock lock(&mu_);
    if (open_) return;
    status_ = std::move(status);
    open_ = true;
  }

  // Blocks until Open, then returns its status; CANCELLED once give_up() (polled every few
  // milliseconds while it waits) returns true first.
  absl::Status Wait(const std::function<bool()>& give_up = nullptr) const {
    absl::MutexLock lock(&mu_);
    while (!mu_.AwaitWithTimeout(absl::Condition(&open_), absl::Milliseconds(10))) {
      if (give_up && give_up()) {
        return absl::CancelledError("stopped while waiting for the tensor's weights");
      }
    }
    return status_;
  }

 private:
  mutable absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
};

// One weight tensor to quantize. Pointers are not owned and stay valid during QuantizeAll (but
// see `ready` for weights.data).
struct TensorTask {
  // Tensor name, e.g. "model.layers.0.mlp.up_proj.weight" (unique within a QuantizeAll call).
  std::string name;
  WeightView weights;
  // Diagonal Hessian blocks [cols / 16, 16, 16]; null data when the method needs none and none
  // was given. With a gate, num_blocks is set at once and data may come late (blocks the
  // pipeline cuts from a full matrix as it reads it).
  BlockHessiansView hessians;
  // Identifies the Hessian: tasks with equal non-empty keys share the very same blocks (q/k/v,
  // gate/up), so a remote session sends them once.
  std::string hessian_key;
  SearchParams params;
  // The global amax g to quantize with: max |W| of the tensor, or of its fused group.
  float global_amax = 0.0f;
  // Last, so that positional initialisers of the fields above stay valid.
  // Full Hessian [cols, cols] for Method::kGptq (n = 0 otherwise). Tasks with equal non-empty
  // hessian_key share the matrix. With a gate, n is set at once and data late (like
  // weights.data: the pipeline reads the matrix beside the quantizer and frees it after the
  // Hessian's last task).
  FullHessianView full_hessian;
  // The scan of `weights` when the caller took one (ScanWeights: finite, their amax): the
  // in-process quantizer validates the task with it instead of reading the weights again.
  std::optional<WeightScan> weight_scan;
  // Null when every field is set; otherwise weights.data, global_amax, weight_scan,
  // hessians.data and full_hessian.data may be read only after AwaitTask returned OK (a quantizer
  // waits for each task before its first use of them), and weights.data, hessians.data and
  // full_hessian.data only until the task's result was handed over (the pipeline then frees what
  // it read, and a Hessian after its last task).
  const TaskGate* ready = nullptr;
};

// Waits until `task`'s late fields are set (at once without a gate); non-OK: the error that
// kept them from being set (the task must not run), or CANCELLED when give_up() returned true
// first. A quantizer passes a give_up that turns true once its call has failed or its stream
// ended: the producer may be waiting for other tasks to finish (read-ahead memory).
inline absl::Status AwaitTask(const TensorTask& task,
                              const std::function<bool()>& give_up = nullptr) {
  return task.ready == nullptr ? absl::OkStatus() : task.ready->Wait(give_up);
}

// Receives the result of tasks[index]. Called once per task, possibly from several threads at
// once (for different tasks), in any task order. A non-OK return stops QuantizeAll with it.
using QuantizeResultCallback = std::function<absl::Status(size_t index, QuantizedTensor result)>;

class Quantizer {
 public:
  virtual ~Quantizer() = default;

  // One line for logs: "in-process cpu", "in-process cuda (NVIDIA H100 ..., 3 streams)",
  // "remote 127.0.0.1:50051 (cpu)".
  virtual std::string Describe() const = 0;

  // Quantizes every task and hands each result to `on_result`. Returns the first error (a
  // task's, the callback's or the transport's, naming the tensor where there is one); results
  // already delivered stay delivered.
  virtual absl::Status QuantizeAll(absl::Span<const TensorTask> tasks,
                                   const QuantizeResultCallback& on_result) = 0;
};

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_QUANTIZER_H_
