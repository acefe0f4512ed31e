// Result writes on threads of their own. The quantizer hands each result over from its
// workers (in-process: one per CUDA stream); a worker that also wrote its result to the page
// cache (and started it for the disk) spent about 40% of its time there on an H100 machine
// (docs/performance.md, session 9), time its stream's next tensor waited for. With the writes
// here, the workers go on to their next tensor at once.
//
//   nvfp4cal::ResultWriter writer(/*threads=*/4, /*max_queued_bytes=*/256 << 20);
//   absl::Status s = writer.Submit(bytes, [=] { return WriteIt(); });  // may wait for room
//   ...
//   absl::Status all = writer.Finish();  // every queued write done; the first failure
#ifndef NVFP4CAL_CLIENT_RESULT_WRITER_H_
#define NVFP4CAL_CLIENT_RESULT_WRITER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace nvfp4cal {

class ResultWriter {
 public:
  // `threads` >= 1 writers; at most `max_queued_bytes` of submitted writes wait or run at once
  // (a larger one alone), so results queue in bounded memory.
  ResultWriter(int threads, int64_t max_queued_bytes);
  ResultWriter(const ResultWriter&) = delete;
  ResultWriter& operator=(const ResultWriter&) = delete;
  // Finish() if not called.
  ~ResultWriter();

  // Queues `write` (holding `bytes` until it returns), waiting while it does not fit. Once a
  // write has failed, nothing more is queued and that failure is returned (so the caller
  // stops); OK otherwise. Writes queued before a failure still run.
  absl::Status Submit(int64_t bytes, std::function<absl::Status()> write);

  // Runs what is queued, joins the threads and returns the first failed write (OK if none).
  // Submit must not be called after it.
  absl::Status Finish();

 private:
  void Run();

  const int64_t max_queued_bytes_;
  absl::Mutex mu_;
  std::deque<std::pair<int64_t, std::function<absl::Status()>>> queue_ ABSL_GUARDED_BY(mu_);
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;  // queued or being written
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_RESULT_WRITER_H_
