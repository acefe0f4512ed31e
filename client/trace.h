// Trace: a timeline of one quantize run's stages (`nvfp4cal quantize --trace FILE`), written as
// Chrome's trace-event JSON (open it in https://ui.perfetto.dev or chrome://tracing): a row per
// thread for the stages that run on one (the backend's start, open and plan, wait for read-ahead
// memory, read, scan, copy, an in-process worker's wait for a tensor and its quantization, write
// a result, fsync), and an async row per tensor from its scan's end to its result (queued for a
// worker, then quantized). Times are microseconds since the trace began.
//
//   Trace trace;                                  // the origin: now
//   { TraceSpan span(&trace, "read q_proj", "scan"); ... }
//   trace.Async("q_proj", "quantize", ready_time, absl::Now());
//   absl::Status s = ReplaceTextFile(path, trace.Json());
//
// Every call is thread-safe; a null Trace* makes TraceSpan do nothing.
#ifndef NVFP4CAL_CLIENT_TRACE_H_
#define NVFP4CAL_CLIENT_TRACE_H_

#include <cstdint>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace nvfp4cal {

class Trace {
 public:
  Trace() : origin_(absl::Now()) {}

  // A span on the calling thread's row.
  void Span(std::string name, std::string category, absl::Time begin, absl::Time end);
  // A span on a row of its own (overlapping spans of other tensors show side by side).
  void Async(std::string name, std::string category, absl::Time begin, absl::Time end);

  // {"traceEvents": [...], "displayTimeUnit": "ms"}, events in the order they were recorded;
  // threads named "thread N" in the order they first recorded.
  std::string Json() const;

 private:
  struct Event {
    std::string name;
    std::string category;
    int64_t begin_us = 0;
    int64_t duration_us = 0;
    int thread = 0;  // -1: async, with id
    int64_t id = 0;
  };
  int64_t Micros(absl::Time t) const { return absl::ToInt64Microseconds(t - origin_); }

  const absl::Time origin_;
  mutable absl::Mutex mu_;
  std::vector<Event> events_ ABSL_GUARDED_BY(mu_);
  std::map<std::thread::id, int> threads_ ABSL_GUARDED_BY(mu_);
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
};

// Records a span from construction to destruction on `trace` (nothing when null).
class TraceSpan {
 public:
  TraceSpan(Trace* trace, std::string name, std::string category)
      : trace_(trace),
        name_(std::move(name)),
        category_(std::move(category)),
        begin_(absl::Now()) {}
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;
  ~TraceSpan() { End(); }

  // Records the span now (the destructor then records nothing).
  void End() {
    if (trace_ != nullptr)
      trace_->Span(std::move(name_), std::move(category_), begin_, absl::Now());
    trace_ = nullptr;
  }

 private:
  Trace* trace_;
  std::string name_;
  std::string category_;
  const absl::Time begin_;
};

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_TRACE_H_
