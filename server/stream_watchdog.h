// StreamWatchdog: ends Quantize streams that make no progress (--stream_idle_timeout).
//
// A stream that sends a header and then nothing holds a stream slot, its Hessians and a share
// of the full-Hessian budget; a client that stops taking results holds its unsent results. One
// thread per server looks at every open stream a few times per timeout and lets each decide
// (QuantizeSession::CheckIdle) whether it has been idle too long.
//
//   StreamWatchdog watchdog(absl::Minutes(5));
//   watchdog.Add(session);      // QuantizeSession's constructor
//   watchdog.Remove(session);   // its OnDone, before the last reference goes
#ifndef NVFP4CAL_SERVER_STREAM_WATCHDOG_H_
#define NVFP4CAL_SERVER_STREAM_WATCHDOG_H_

#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace nvfp4cal::server {

class QuantizeSession;

class StreamWatchdog {
 public:
  // Checks every stream each min(timeout / 4, 1 s); `timeout` must be > 0.
  explicit StreamWatchdog(absl::Duration timeout);
  // Stops the thread; every session must have been removed.
  ~StreamWatchdog();
  StreamWatchdog(const StreamWatchdog&) = delete;
  StreamWatchdog& operator=(const StreamWatchdog&) = delete;

  void Add(QuantizeSession* session) ABSL_LOCKS_EXCLUDED(mu_);
  // After Remove returns, the watchdog no longer touches `session`.
  void Remove(QuantizeSession* session) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Run();

  const absl::Duration period_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<QuantizeSession*> sessions_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_STREAM_WATCHDOG_H_
